"""``triton-lower``: rewrite ``lowc::linear_wq`` into ``lowc::linear_wq_tr`` with weights repacked into
the Triton kernels' ``k-packed-int32`` layout (:mod:`lowc.backends.triton.layout`).

Precondition: a method pass produced ``linear_wq`` nodes. A layer the kernels cannot take raises,
naming it: weights other than 4 or 8 bits, a group size that is not a multiple of 16 (a K tile of at
least 16 must lie inside one group; per-channel layers always fit), or an activation-quantized
``linear_wqaq``. Each node keeps its own bits and group size (read from its arguments), so per-layer
mixed 4/8-bit models lower as is. The reference-layout buffers become ``<layer>.tr_qweight`` (int32
``[K_pad/P, N]``), ``.tr_scales`` (``[G, N]``, same dtype) and ``.tr_zeros`` (uint8 ``[G, N]``); the
old ones are dropped. Idempotent: ``linear_wq_tr`` nodes are left alone.

Group-sparse layers (``lowc::linear_gsq``, e.g. from ``gqsa``) become ``lowc::linear_gsq_tr``
(:mod:`lowc.backends.triton.gsq_op`): the compact rows repacked the same way
(:func:`lowc.backends.triton.layout.sparse_from_reference`), buffers ``.tr_qweight``, ``.tr_scales``,
``.tr_zeros`` and ``.tr_idx`` (int16 ``[n_keep, N]``); a layer the group-sparse kernels cannot take
(other than 4 or 8 bits, a sparse group that is not a power of two) raises, naming it. Runs on the weights'
device (repacking is a reinterpretation and a transpose). The rewrite itself is the one every backend
shares (:func:`lowc.backends.lowering.lower_linear_wq`); this module supplies the check and the repacking.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowc.backends.lowering import lower_linear_wq, replace_linear
from lowc.backends.triton import gsq, gsq_op, layout
from lowc.backends.triton import op as tr_op
from lowc.errors import KernelError
from lowc.ir import meta as nodemeta
from lowc.ir.dialect.args import LinearQArgs
from lowc.ir.dialect import ensure_registered
from lowc.passes.base import Pass, PassContext, PassResult
from lowc.progress import bar


def unsupported_reason(bits: int, group_size: int, n_groups: int) -> str | None:
    """Why the Triton kernels cannot take a layer, or None."""

    if bits not in layout.SUPPORTED_BITS:
        return f"Triton kernels take 4- or 8-bit weights, got bits={bits}"
    if n_groups > 1 and group_size % 16:
        return (f"Triton kernels need a group size that is a multiple of 16 (or per-channel, -1), "
                f"got group_size={group_size}")
    return None


def _check(layer: str, bits: int, group_size: int, in_features: int, scales: torch.Tensor) -> str | None:
    why = unsupported_reason(bits, group_size, scales.shape[1])
    if why:
        return f"layer {layer} ({scales.shape[0]}x{in_features}): {why}; quantize it differently or add it to ignore="
    return None


def _repack(qweight, scales, zeros, bits: int, group_size: int, in_features: int) -> tuple:
    tw = layout.from_reference(qweight, scales, zeros, bits, group_size, in_features)
    return tw.qweight, tw.scales, tw.zeros, tw.out_features


@dataclass(frozen=True)
class TritonLower(Pass):
    name = "triton-lower"
    summary = "repack 4/8-bit linear_wq weights into the Triton kernels' layout (lowc::linear_wq_tr)"

    def run(self, program, ctx: PassContext) -> PassResult:
        res = lower_linear_wq(program, tr_op.LINEAR_WQ_TR, kernels="cuda-* Triton kernels",
                              check=_check, repack=_repack, buffers=("tr_qweight", "tr_scales", "tr_zeros"),
                              progress=ctx.progress)
        n_sparse = lower_sparse(program, progress=ctx.progress)
        if not n_sparse:
            return res
        stats = dict(res.stats, lowered=res.stats["lowered"] + n_sparse, sparse=n_sparse)
        return PassResult(changed=True, stats=stats)


def lower_sparse(program, progress: bool = False) -> int:
    """Rewrite every ``lowc::linear_gsq`` node into ``lowc::linear_gsq_tr`` (module docstring); returns how many."""
    ensure_registered()
    nodes = list(program.nodes(torch.ops.lowc.linear_gsq.default))
    for node in bar(nodes, desc="repack group-sparse layers for cuda-* Triton kernels", enabled=progress):
        a = LinearQArgs.of(node)
        qweight, scales = program.attr(a.weight.target), program.attr(a.scales.target)
        why = gsq.unsupported_reason(a.bits, a.sparse_group)
        if why:
            raise KernelError(f"layer {nodemeta.get(node).layer or node.name} ({scales.shape[0]}x{a.in_features}, "
                              f"group-sparse): {why}; prune it differently or add it to ignore=")
        zeros = program.attr(a.zeros.target) if a.zeros is not None else None
        tw = layout.sparse_from_reference(qweight, scales, zeros, a.bits, a.group_size, a.in_features,
                                          program.attr(a.idx.target), a.sparse_group)
        replace_linear(program, a, gsq_op.LINEAR_GSQ_TR, {"tr_qweight": tw.qweight, "tr_scales": tw.scales,
                                                          "tr_zeros": tw.zeros, "tr_idx": tw.idx},
                       out_features=tw.out_features)
    if nodes:
        program.remove_dead()
    return len(nodes)
