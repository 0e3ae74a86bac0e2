"""``lowc::linear_wq_tr``: the Triton backend's op (what ``triton-lower`` rewrites ``lowc::linear_wq`` into).

``lowc::linear_wq_tr(x, qweight, scales, zeros?, bias?, bits, group_size, in_features, out_features) -> y``
    ``y = x @ W.T + bias`` with ``W`` stored in the kernel layout (:mod:`lowc.backends.triton.layout`,
    ``k-packed-int32``): ``qweight`` int32 ``[K_pad/P, N]`` (``P = 32/bits``), ``scales`` ``[G, N]``,
    ``zeros`` uint8 ``[G, N]`` or ``None`` (symmetric, zero point ``2^(bits-1)``), ``bias`` ``[N]``
    or ``None``; ``x`` is ``[..., in_features]``.

The reference implementation (every device; the oracle) converts back to the reference layout and
runs exactly the arithmetic of ``lowc::linear_wq`` (tested bit for bit). The Triton kernels
(:mod:`lowc.backends.triton.wq`) are registered as the CUDA implementation by the ``cuda-*``
targets' ``prepare``; with ``TRITON_INTERPRET=1`` they can also be registered for CPU tensors.
Importing this module defines the op; the Triton backend imports it when its targets are listed, so
a saved graph containing the op can be read back.
"""

from __future__ import annotations

from typing import Optional

import torch

from lowc.backends.triton import layout
from lowc.ir.dialect import quant

OP = "lowc::linear_wq_tr"


def check(x, qweight, scales, zeros, bias, bits, group_size, in_features, out_features) -> None:
    """Operand checks shared by the fake kernel, the reference and the Triton wrapper."""
    if bits not in layout.SUPPORTED_BITS:
        raise ValueError(f"{OP}: bits must be one of {layout.SUPPORTED_BITS}, got {bits}")
    p = 32 // bits
    if scales.dim() != 2:
        raise ValueError(f"{OP}: scales must be 2-D [G, N], got {tuple(scales.shape)}")
    g, n = scales.shape
    k_pad = g * group_size
    if n != out_features:
        raise ValueError(f"{OP}: scales {tuple(scales.shape)} do not have out_features={out_features} columns")
    if qweight.dtype != torch.int32 or tuple(qweight.shape) != (k_pad // p, n) or k_pad % p:
        raise ValueError(f"{OP}: qweight {qweight.dtype}{tuple(qweight.shape)} is not the k-packed-int32 layout "
                         f"for N={n}, K_pad={k_pad}, bits={bits} (expected int32{(k_pad // p, n)})")
    if zeros is not None and (zeros.dtype != torch.uint8 or tuple(zeros.shape) != (g, n)):
        raise ValueError(f"{OP}: zeros {zeros.dtype}{tuple(zeros.shape)} must be uint8 of the shape of scales {(g, n)}")
    quant.check_linear_operands(OP, x, None, bias, n, (g, n), k_pad, in_features)  # zeros: checked above, with their dtype


def reference_linear_wq_tr(x, qweight, scales, zeros, bias, bits, group_size, in_features, out_features):
    """The oracle: the same dequantized weight and ``F.linear`` as ``lowc::linear_wq``."""
    q, s, z = layout.to_reference(qweight, scales, zeros, bits)
    w = quant.dequantize(q, s, z, bits, group_size, in_features, dtype=x.dtype)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


@torch.library.custom_op(OP, mutates_args=())
def linear_wq_tr(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    bits: int,
    group_size: int,
    in_features: int,
    out_features: int,
) -> torch.Tensor:
    check(x, qweight, scales, zeros, bias, bits, group_size, in_features, out_features)
    return reference_linear_wq_tr(x, qweight, scales, zeros, bias, bits, group_size, in_features, out_features)


@linear_wq_tr.register_fake
def _linear_wq_tr_fake(x, qweight, scales, zeros, bias, bits, group_size, in_features, out_features):
    check(x, qweight, scales, zeros, bias, bits, group_size, in_features, out_features)
    return x.new_empty((*x.shape[:-1], out_features))


#: the op, for passes and tables that build or find its nodes
LINEAR_WQ_TR = torch.ops.lowc.linear_wq_tr.default
