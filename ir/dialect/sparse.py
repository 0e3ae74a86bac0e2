"""Group-sparse quantized linear (GQSA): the op ``lowc::linear_gsq``, its storage layout and reference.

Layout (block-sparse rows, "BSR" with blocks of one row by ``sparse_group`` inputs)
-----------------------------------------------------------------------------------
A weight ``W`` ``[N, K]`` is padded with zero columns to ``K_pad = ceil(K / sg) * sg`` (``sg`` =
``sparse_group``, a multiple of 8) and cut, per row, into ``K_pad / sg`` *sparse groups* of ``sg``
consecutive input weights. Every row keeps the same number ``n_keep`` of sparse groups (balanced
rows: every row of a kernel's tile does the same work) and drops the others (their weights are 0).

* ``idx`` int16 ``[N, n_keep]``: per row, the indices of the kept sparse groups, strictly
  increasing, in ``[0, K_pad / sg)``. Kept group ``j`` of row ``n`` covers inputs
  ``idx[n, j] * sg ... idx[n, j] * sg + sg - 1``.
* the kept weights of a row, in that order, form its *compact row* of ``Kc = n_keep * sg`` values;
  compact position ``c = j * sg + t`` is input ``idx[n, j] * sg + t``.
* ``qweight`` uint8 ``[N, Kc * bits / 8]``: the compact rows' codes in the reference packing
  (:mod:`lowc.ir.dialect.packing`).
* quantization groups are runs of ``group_size`` consecutive compact positions (``group_size`` a
  multiple of 8; one group spanning the whole compact row for per-channel); ``scales`` ``[N, G]``
  with ``G = ceil(Kc / group_size)`` (the last group may be shorter), ``zeros`` uint8 ``[N, G]`` or
  ``None`` (symmetric: zero point ``2^(bits-1)``). Compact position ``c`` uses group ``c // group_size``.
  With ``group_size == sparse_group`` every kept group has its own scale (the GQSA paper's layout);
  with a multiple of it a scale covers several kept groups, which need not be adjacent in the input.
* the real weight: ``W[n, idx[n, j] * sg + t] = (q[n, c] - zero[n, g]) * scale[n, g]``, every other
  entry 0; ``y = x @ W[:, :in_features].T + bias``.

Storage per weight (what ``inspect`` reports): ``(1 - s) * (bits + (16 + zero bits) / group_size +
16 / sg)`` bits for sparsity ``s`` (fp16 scales, int16 indices): :meth:`lowc.ir.scheme.Scheme.bits_per_weight`.

Kernels skip dropped groups: they walk ``idx`` and read only the kept codes. A dense backend may
*densify* (:func:`densify`) into a ``linear_wq``-style weight only when asked.

Importing this module defines the op; it is imported by name through the dialect's registry
(:data:`lowc.ir.dialect.OPS`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from lowc.ir.dialect import packing, quant
from lowc.ir.scheme import kept_sparse_groups


@dataclass(frozen=True)
class SparseQuantizedWeight:
    """A packed group-sparse weight ready for ``lowc::linear_gsq`` (tensors on the source's device)."""

    qweight: torch.Tensor  # uint8 [N, Kc*bits/8]
    scales: torch.Tensor  # float [N, G]
    zeros: torch.Tensor | None  # uint8 [N, G]; None for symmetric
    idx: torch.Tensor  # int16 [N, n_keep], strictly increasing per row
    bits: int
    group_size: int  # effective (Kc for per-channel)
    sparse_group: int
    in_features: int

    @property
    def n_keep(self) -> int:
        return self.idx.shape[1]

    @property
    def compact_width(self) -> int:
        return self.n_keep * self.sparse_group


def padded_sparse_width(in_features: int, sparse_group: int) -> int:
    """``K_pad`` for a sparse layer: ``in_features`` rounded up to a multiple of ``sparse_group``."""
    if sparse_group <= 0 or sparse_group % 8:
        raise ValueError(f"sparse_group must be a positive multiple of 8, got {sparse_group}")
    return -(-in_features // sparse_group) * sparse_group


def kept_groups(in_features: int, sparse_group: int, sparsity: float) -> int:
    """Sparse groups kept per row at ``sparsity`` (fraction dropped, rounded to the nearest group; at least one)."""
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    padded_sparse_width(in_features, sparse_group)  # checks sparse_group
    return kept_sparse_groups(in_features, sparse_group, sparsity)


def effective_group_size(group_size: int, compact_width: int) -> int:
    """The quantization group over the compact row: ``group_size``, or the whole row for -1 / a larger one."""
    if group_size == -1 or group_size >= compact_width:
        return compact_width
    if group_size <= 0 or group_size % 8:
        raise ValueError(f"group_size must be a positive multiple of 8 (or -1), got {group_size}")
    return group_size


def gather_compact(weight: torch.Tensor, idx: torch.Tensor, sparse_group: int) -> torch.Tensor:
    """The compact rows ``[N, n_keep * sg]`` of a dense ``[N, K]`` weight (padded with zeros to K_pad) at ``idx``."""
    n, k = weight.shape
    k_pad = padded_sparse_width(k, sparse_group)
    w = torch.nn.functional.pad(weight, (0, k_pad - k)).reshape(n, k_pad // sparse_group, sparse_group)
    kept = torch.gather(w, 1, idx.long().unsqueeze(-1).expand(-1, -1, sparse_group))
    return kept.reshape(n, -1)


def scatter_dense(compact: torch.Tensor, idx: torch.Tensor, sparse_group: int, in_features: int) -> torch.Tensor:
    """Inverse of :func:`gather_compact`: a dense ``[N, in_features]`` weight with zeros in dropped groups."""
    n = compact.shape[0]
    k_pad = padded_sparse_width(in_features, sparse_group)
    out = compact.new_zeros(n, k_pad // sparse_group, sparse_group)
    out.scatter_(1, idx.long().unsqueeze(-1).expand(-1, -1, sparse_group), compact.reshape(n, -1, sparse_group))
    return out.reshape(n, k_pad)[:, :in_features]


def group_mask(idx: torch.Tensor, in_features: int, sparse_group: int) -> torch.Tensor:
    """Boolean ``[N, in_features]``: True where a weight belongs to a kept group."""
    ones = torch.ones(idx.shape[0], idx.shape[1] * sparse_group, dtype=torch.bool, device=idx.device)
    return scatter_dense(ones, idx, sparse_group, in_features)


def check_idx(idx: torch.Tensor, n: int, n_groups: int, op: str = "lowc::linear_gsq", values: bool = True) -> None:
    """``idx`` is int16 ``[n, n_keep]`` with strictly increasing entries in ``[0, n_groups)`` per row
    (the values are checked only when ``values``: not on fake tensors)."""
    if idx.dtype != torch.int16 or idx.dim() != 2 or idx.shape[0] != n or not 1 <= idx.shape[1] <= n_groups:
        raise ValueError(f"{op}: idx must be int16 [{n}, 1..{n_groups}], got {idx.dtype} {tuple(idx.shape)}")
    if not values or idx.device.type == "meta" or idx.numel() == 0:
        return
    i = idx.long()
    if int(i.min()) < 0 or int(i.max()) >= n_groups or (idx.shape[1] > 1 and not bool((i[:, 1:] > i[:, :-1]).all())):
        raise ValueError(f"{op}: idx entries must be strictly increasing per row and in [0, {n_groups})")


def from_compact_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, idx: torch.Tensor, bits: int,
                       group_size: int, sparse_group: int, in_features: int, symmetric: bool,
                       dtype: torch.dtype) -> SparseQuantizedWeight:
    """Pack compact codes ``[N, Kc]`` with fp32 group ``scale``/``zero`` ``[N, G]`` (``group_size`` effective)."""
    return SparseQuantizedWeight(
        qweight=packing.pack(codes.to(torch.int32), bits),
        scales=scale.to(dtype),
        zeros=None if symmetric else zero.to(torch.uint8),
        idx=idx.to(torch.int16),
        bits=bits,
        group_size=group_size,
        sparse_group=sparse_group,
        in_features=in_features,
    )


def _groups(compact: torch.Tensor, gs: int) -> tuple[torch.Tensor, int]:
    """``[N, G, gs]`` view of compact rows padded with zeros to a whole number of groups (and the pad)."""
    n, kc = compact.shape
    pad = -kc % gs
    return torch.nn.functional.pad(compact, (0, pad)).reshape(n, -1, gs), pad


def rtn_quantize_sparse(weight: torch.Tensor, idx: torch.Tensor, bits: int, group_size: int, sparse_group: int,
                        symmetric: bool) -> SparseQuantizedWeight:
    """Round-to-nearest quantization of the kept groups ``idx`` of a dense ``[N, K]`` weight."""
    n, k = weight.shape
    check_idx(idx.to(torch.int16), n, padded_sparse_width(k, sparse_group) // sparse_group)
    compact = gather_compact(weight.detach().float(), idx, sparse_group)
    gs = effective_group_size(group_size, compact.shape[1])
    groups, pad = _groups(compact, gs)
    scale, zero = quant.compute_qparams(groups, bits, symmetric)
    q = quant.quantize_codes(groups, scale[..., None], zero[..., None], bits).reshape(n, -1)
    q = q[:, : q.shape[1] - pad]
    return from_compact_codes(q, scale, zero, idx, bits, gs, sparse_group, k, symmetric, weight.dtype)


def dequantize_compact(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
                       group_size: int, compact_width: int) -> torch.Tensor:
    """Real compact rows ``[N, Kc]`` (fp32)."""
    q = packing.unpack(qweight, bits)[:, :compact_width].float()
    g = torch.arange(compact_width, device=q.device) // group_size
    z = zeros.float() if zeros is not None else torch.full_like(scales, float(1 << (bits - 1)), dtype=torch.float32)
    return (q - z[:, g]) * scales.float()[:, g]


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int, group_size: int,
               in_features: int, idx: torch.Tensor, sparse_group: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dense real weight ``[N, in_features]`` (zeros in dropped groups): the reference semantics of the op."""
    compact = dequantize_compact(qweight, scales, zeros, bits, group_size, idx.shape[1] * sparse_group)
    return scatter_dense(compact, idx, sparse_group, in_features).to(dtype or scales.dtype)


def densify(w: SparseQuantizedWeight) -> torch.Tensor:
    """The dense float weight of a packed sparse weight (for backends that cannot skip groups, on request)."""
    return dequantize(w.qweight, w.scales, w.zeros, w.bits, w.group_size, w.in_features, w.idx, w.sparse_group)


def _check_gsq(x, qweight, scales, zeros, bias, bits, group_size, in_features, idx, sparse_group, values=True) -> int:
    op = "lowc::linear_gsq"
    if not 1 <= bits <= 8:
        raise ValueError(f"{op}: bits must be in 1..8, got {bits}")
    if sparse_group <= 0 or sparse_group % 8:
        raise ValueError(f"{op}: sparse_group must be a positive multiple of 8, got {sparse_group}")
    if group_size <= 0 or group_size % 8:
        raise ValueError(f"{op}: group_size must be a positive multiple of 8, got {group_size}")
    if qweight.dtype != torch.uint8 or qweight.dim() != 2 or scales.dim() != 2:
        raise ValueError(f"{op}: qweight must be a 2-D uint8 tensor, got {qweight.dtype} {tuple(qweight.shape)}")
    n = scales.shape[0]
    k_pad = padded_sparse_width(in_features, sparse_group)
    check_idx(idx, n, k_pad // sparse_group, op, values)
    kc = idx.shape[1] * sparse_group
    if qweight.shape[0] != n or qweight.shape[1] * 8 != kc * bits or scales.shape[1] != -(-kc // group_size):
        raise ValueError(f"{op}: qweight {tuple(qweight.shape)} / scales {tuple(scales.shape)} do not match "
                         f"idx {tuple(idx.shape)} with bits={bits}, group_size={group_size}, sparse_group={sparse_group}")
    quant.check_linear_operands(op, x, zeros, bias, n, scales.shape, k_pad, in_features)
    return n


@torch.library.custom_op("lowc::linear_gsq", mutates_args=())
def linear_gsq(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    bits: int,
    group_size: int,
    in_features: int,
    idx: torch.Tensor,
    sparse_group: int,
) -> torch.Tensor:
    _check_gsq(x, qweight, scales, zeros, bias, bits, group_size, in_features, idx, sparse_group)
    w = dequantize(qweight, scales, zeros, bits, group_size, in_features, idx, sparse_group, dtype=x.dtype)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


@linear_gsq.register_fake
def _linear_gsq_fake(x, qweight, scales, zeros, bias, bits, group_size, in_features, idx, sparse_group):
    n = _check_gsq(x, qweight, scales, zeros, bias, bits, group_size, in_features, idx, sparse_group, values=False)
    return x.new_empty((*x.shape[:-1], n))
