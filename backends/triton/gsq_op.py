"""``lowc::linear_gsq_tr``: the Triton backend's group-sparse op (what ``triton-lower`` rewrites
``lowc::linear_gsq`` into).

``lowc::linear_gsq_tr(x, qweight, scales, zeros?, bias?, bits, group_size, in_features, out_features, idx,
sparse_group) -> y``
    ``y = x @ W.T + bias`` with the group-sparse ``W`` in the kernels' layout
    (:class:`lowc.backends.triton.layout.SparseTritonWeight`, ``compact-k-packed-int32``): ``qweight``
    int32 ``[Kc/P, N]`` (the compact rows, ``Kc = n_keep * sparse_group``), ``scales`` ``[G, N]``,
    ``zeros`` uint8 ``[G, N]`` or ``None``, ``idx`` int16 ``[n_keep, N]``.

The reference implementation (every device; the oracle) converts back to the dialect's layout and
runs exactly ``lowc::linear_gsq``'s arithmetic (tested bit for bit). The Triton kernels
(:mod:`lowc.backends.triton.gsq`) are registered as its CUDA implementation by the ``cuda-*``
targets' ``prepare``. Importing this module defines the op (through the backend's ``OPS``).
"""

from __future__ import annotations

from typing import Optional

import torch

from lowc.backends.triton import layout
from lowc.ir.dialect import sparse

OP = "lowc::linear_gsq_tr"


def check(x, qweight, scales, zeros, bias, bits, group_size, in_features, out_features, idx, sparse_group,
          values: bool = True) -> None:
    """Operand checks shared by the fake kernel, the reference and the Triton wrapper (``values``:
    also the index values, not on fake tensors)."""
    if bits not in layout.SUPPORTED_BITS:
        raise ValueError(f"{OP}: bits must be one of {layout.SUPPORTED_BITS}, got {bits}")
    if scales.dim() != 2 or scales.shape[1] != out_features:
        raise ValueError(f"{OP}: scales {tuple(scales.shape)} must be [G, out_features={out_features}]")
    if idx.dim() != 2 or idx.shape[1] != out_features:
        raise ValueError(f"{OP}: idx {idx.dtype}{tuple(idx.shape)} must be int16 [n_keep, out_features={out_features}]")
    p = 32 // bits
    kc = idx.shape[0] * sparse_group
    if qweight.dtype != torch.int32 or kc % p or tuple(qweight.shape) != (kc // p, out_features):
        raise ValueError(f"{OP}: qweight {qweight.dtype}{tuple(qweight.shape)} is not the compact-k-packed-int32 layout "
                         f"for N={out_features}, Kc={kc}, bits={bits} (expected int32{(kc // p, out_features)})")
    if zeros is not None and (zeros.dtype != torch.uint8 or zeros.shape != scales.shape):
        raise ValueError(f"{OP}: zeros {zeros.dtype}{tuple(zeros.shape)} must be uint8 of the shape of scales "
                         f"{tuple(scales.shape)}")
    # the dialect's checks on the transposed views (shapes, index values, x and bias)
    packed = torch.empty((out_features, kc * bits // 8), dtype=torch.uint8, device="meta")  # its shape (checked above)
    sparse._check_gsq(x, packed, scales.t(), None if zeros is None else zeros.t(), bias, bits, group_size, in_features,
                      idx.t(), sparse_group, values=values)


def reference_linear_gsq_tr(x, qweight, scales, zeros, bias, bits, group_size, in_features, out_features, idx,
                            sparse_group):
    """The oracle: the same dequantized weight and ``F.linear`` as ``lowc::linear_gsq``."""
    q, s, z, i = layout.sparse_to_reference(qweight, scales, zeros, idx, bits)
    w = sparse.dequantize(q, s, z, bits, group_size, in_features, i, sparse_group, dtype=x.dtype)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


@torch.library.custom_op(OP, mutates_args=())
def linear_gsq_tr(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    bits: int,
    group_size: int,
    in_features: int,
    out_features: int,
    idx: torch.Tensor,
    sparse_group: int,
) -> torch.Tensor:
    check(x, qweight, scales, zeros, bias, bits, group_size, in_features, out_features, idx, sparse_group)
    return reference_linear_gsq_tr(x, qweight, scales, zeros, bias, bits, group_size, in_features, out_features, idx,
                                   sparse_group)


@linear_gsq_tr.register_fake
def _linear_gsq_tr_fake(x, qweight, scales, zeros, bias, bits, group_size, in_features, out_features, idx,
                        sparse_group):
    check(x, qweight, scales, zeros, bias, bits, group_size, in_features, out_features, idx, sparse_group, values=False)
    return x.new_empty((*x.shape[:-1], out_features))


#: the op, for passes and tables that build or find its nodes
LINEAR_GSQ_TR = torch.ops.lowc.linear_gsq_tr.default
