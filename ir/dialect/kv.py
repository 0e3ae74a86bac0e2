"""KV-cache quantization in the dialect: ``lowc::fake_quant_kv``.

``lowc::fake_quant_kv(x, bits, group_size, symmetric) -> x'``
    The value a quantized KV cache hands back to attention: ``x`` (keys after RoPE, or values, laid
    out ``[..., head_dim]``, e.g. ``[batch, kv_heads, seq, head_dim]``) is quantized per token and per
    head, in groups of ``group_size`` consecutive channels of the last dimension (``-1``: the whole
    head, one scale per token per head), and returned dequantized in ``x``'s dtype.

    * asymmetric (``symmetric=False``, the default of ``quantize-kv``): min/max of the group widened
      to include 0, ``scale = (max - min) / (2^b - 1)``, integer zero point ``round(-min / scale)``,
      codes ``clamp(round(x / scale) + zero, 0, 2^b - 1)``;
    * symmetric: absmax, ``scale = 2·absmax / (2^b - 1)``, zero point ``2^(b-1)``.

    These are the weight quantizer's conventions (:func:`lowc.ir.dialect.quant.compute_qparams`):
    an exact 0 stays exact, and an all-zero group dequantizes to zeros. The ranges are dynamic
    (measured on the tensor itself), so no calibration is needed.

The reference implementation (:func:`fake_quantize_kv`) is the oracle; a backend with a real
quantized cache stores the codes and the per-group scale/zero and must read back the same values.
Importing this module defines the op; it is imported by name through the dialect registry (:data:`lowc.ir.dialect.OPS`).
"""

from __future__ import annotations

import torch

from lowc.ir.dialect import quant

OP_NAME = "lowc::fake_quant_kv"


def _check(x: torch.Tensor, bits: int, group_size: int) -> None:
    if not 2 <= bits <= 8:
        raise ValueError(f"{OP_NAME}: bits must be in 2..8, got {bits}")
    if not x.is_floating_point():
        raise ValueError(f"{OP_NAME}: expected a floating-point tensor, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{OP_NAME}: expected a tensor [..., head_dim], got a scalar")
    d = x.shape[-1]
    if group_size != -1 and (group_size <= 0 or d % group_size):
        raise ValueError(f"{OP_NAME}: group_size={group_size} does not divide the head dimension {d}")


def fake_quantize_kv(x: torch.Tensor, bits: int, group_size: int = -1, symmetric: bool = False) -> torch.Tensor:
    """Plain-PyTorch reference: quantize ``x`` per group of its last dim and dequantize (fp32 math)."""
    _check(x, bits, group_size)
    d = x.shape[-1]
    gs = d if group_size == -1 else group_size
    xf = x.float().reshape(*x.shape[:-1], d // gs, gs)
    scale, zero = quant.compute_qparams(xf, bits, symmetric)
    q = quant.quantize_codes(xf, scale[..., None], zero[..., None], bits)
    return ((q - zero[..., None]) * scale[..., None]).reshape(x.shape).to(x.dtype)


@torch.library.custom_op(OP_NAME, mutates_args=())
def fake_quant_kv(x: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> torch.Tensor:
    return fake_quantize_kv(x, bits, group_size, symmetric)


@fake_quant_kv.register_fake
def _fake_quant_kv_fake(x, bits, group_size, symmetric):
    _check(x, bits, group_size)
    return torch.empty_like(x)


FAKE_QUANT_KV = torch.ops.lowc.fake_quant_kv.default
