"""The ONNX backend's lowered ops: ``lowc_onnx::*``, declared with ``torch.library``.

They take their tensors in the layout the ONNX graph stores, so each one translates to ONNX with no
repacking (:mod:`lowc.backends.onnx.translate`), and each has a plain-PyTorch implementation with
the ONNX operator's semantics, so a lowered program still runs in PyTorch and can be checked
against the program it came from. They live only in the copy of a program that
:mod:`lowc.backends.onnx.lower` makes for export; artifacts never contain them.

``lowc_onnx::dq_matmul(x, w, scale, zero?, bias?, axis, block_size, bits, pad) -> y``
    ``y = pad(x, pad zero columns) @ DequantizeLinear(w, scale, zero, axis, block_size) (+ bias)``. ``w`` holds
    the codes ``[K_pad, N]``, one per byte: uint8 with ``zero`` (asymmetric) or int8 without
    (symmetric, codes shifted by ``-2^(bits-1)``). ``axis=0`` is blocked (``scale``/``zero``
    ``[K_pad/block_size, N]``); ``axis=1`` is per output channel (``scale`` ``[N]``, ``block_size=0``).
    The ONNX graph stores ``w`` (and ``zero``) as 4-bit tensors when ``bits=4``.

``lowc_onnx::matmul_nbits(x, b, scales, zero_points, bits, block_size, k, n, accuracy_level) -> y``
    onnxruntime's ``com.microsoft::MatMulNBits``: ``b`` uint8 ``[N, n_blocks, block_size*bits/8]``
    (lowc's packed layout, row by row), ``scales`` ``[N, n_blocks]``, ``zero_points`` uint8
    ``[N, ceil(n_blocks*bits/8)]`` packed like ``b`` (symmetric layers pass ``2^(bits-1)``); the bias
    is a separate ``aten.add``. ``accuracy_level`` is MatMulNBits' attribute (0: fp32 arithmetic, what
    the reference computes; 4: int8 activations, faster, not modelled here).

``lowc_onnx::qdq_per_token(x, bits, scale?, k) -> x'``
    ``DequantizeLinear(QuantizeLinear(x, s), s)`` with int``bits`` codes: ``s`` per token (the last
    dim, ``k`` wide, is one block) when ``scale`` is ``None``, else that per-tensor scalar. Same arithmetic as
    :func:`lowc.ir.dialect.quant.fake_quantize_per_token`.
"""

from __future__ import annotations

from typing import Optional

import torch

from lowc.ir.dialect import packing, quant


def dequantize_dq(w: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor], axis: int, block_size: int) -> torch.Tensor:
    """ONNX DequantizeLinear on ``w`` [K, N] (blocked along K, or per column), in fp32."""
    wf = w.to(torch.float32)
    if axis == 1:
        s, z = scale.float()[None, :], (zero.float()[None, :] if zero is not None else 0.0)
    else:
        s = scale.float().repeat_interleave(block_size, dim=0)[: w.shape[0]]
        z = zero.float().repeat_interleave(block_size, dim=0)[: w.shape[0]] if zero is not None else 0.0
    return (wf - z) * s


@torch.library.custom_op("lowc_onnx::dq_matmul", mutates_args=())
def dq_matmul(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor],
              bias: Optional[torch.Tensor], axis: int, block_size: int, bits: int, pad: int) -> torch.Tensor:
    wf = dequantize_dq(w, scale, zero, axis, block_size).to(x.dtype)
    xp = torch.nn.functional.pad(x, (0, pad)) if pad else x
    y = xp @ wf
    return y if bias is None else y + bias.to(x.dtype)


@dq_matmul.register_fake
def _dq_matmul_fake(x, w, scale, zero, bias, axis, block_size, bits, pad):
    return x.new_empty((*x.shape[:-1], w.shape[1]))


@torch.library.custom_op("lowc_onnx::matmul_nbits", mutates_args=())
def matmul_nbits(x: torch.Tensor, b: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor,
                 bits: int, block_size: int, k: int, n: int, accuracy_level: int) -> torch.Tensor:
    n_blocks = b.shape[1]
    q = packing.unpack(b.reshape(n, -1), bits).float().reshape(n, n_blocks, block_size)
    z = packing.unpack(_pad_cols(zero_points, bits), bits)[:, :n_blocks].float()
    w = ((q - z[..., None]) * scales.float()[..., None]).reshape(n, -1)[:, :k]
    return torch.nn.functional.linear(x, w.to(x.dtype))


def _pad_cols(zp: torch.Tensor, bits: int) -> torch.Tensor:
    """Pad packed zero-point rows to whole runs of 8 values so :func:`packing.unpack` takes them."""
    return torch.nn.functional.pad(zp, (0, (-zp.shape[1]) % bits))


@matmul_nbits.register_fake
def _matmul_nbits_fake(x, b, scales, zero_points, bits, block_size, k, n, accuracy_level):
    return x.new_empty((*x.shape[:-1], n))


@torch.library.custom_op("lowc_onnx::qdq_per_token", mutates_args=())
def qdq_per_token(x: torch.Tensor, bits: int, scale: Optional[torch.Tensor], k: int) -> torch.Tensor:
    return quant.fake_quantize_per_token(x, bits, scale)


@qdq_per_token.register_fake
def _qdq_per_token_fake(x, bits, scale, k):
    return torch.empty_like(x)


DQ_MATMUL = torch.ops.lowc_onnx.dq_matmul.default
MATMUL_NBITS = torch.ops.lowc_onnx.matmul_nbits.default
QDQ_PER_TOKEN = torch.ops.lowc_onnx.qdq_per_token.default
