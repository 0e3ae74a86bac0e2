"""``lut-lower``: rewrite ``lowc::linear_wq`` into ``lowc::linear_lut`` with weights repacked into the
LUT layout (bit planes, row tiles of 32; :mod:`lowc.backends.cpu_lut.layout`).

Precondition: a method pass produced ``linear_wq`` nodes with 1..4-bit weights; a wider layer or an
activation-quantized ``linear_wqaq`` raises, naming the layer. Each node keeps its own bits and group
size (read from its arguments), so per-layer mixed precision lowers as is. The reference-layout
buffers become ``<layer>.lut_weight``, ``.lut_scales`` (float32) and ``.lut_zeros``; the old ones are
dropped. Idempotent: ``linear_lut`` nodes are left alone. The rewrite itself is the one every backend
shares (:func:`lowc.backends.lowering.lower_linear_wq`); this module supplies the check and the repacking.

Group-sparse layers (``lowc::linear_gsq``, 1..4 bits) become ``lowc::linear_lut_gs`` (the
group-sparse LUT layout: buffers ``<layer>.lut_gs_weight``, ``.lut_gs_mask``, ``.lut_scales``,
``.lut_zeros``); their kernels need a sparse group that is a multiple of 16 and a quantization
group that is a multiple of the sparse group (at most 32768): any other layer raises, naming it.
Dense and sparse layers mix freely in one program.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowc.backends.cpu_lut import layout
from lowc.backends.cpu_lut import op as lut_op
from lowc.backends.cpu_lut.codegen import MAX_SPARSE_GROUP_SIZE
from lowc.backends.lowering import lower_linear_wq, replace_node
from lowc.errors import KernelError
from lowc.ir import meta as nodemeta
from lowc.ir.dialect.args import LinearQArgs
from lowc.passes.base import Pass, PassContext, PassResult
from lowc.progress import bar


def _check(layer: str, bits: int, group_size: int, in_features: int, scales: torch.Tensor) -> str | None:
    if not 1 <= bits <= 4:
        return (f"layer {layer}: cpu-lut kernels take 1..4-bit weights, got bits={bits} "
                f"(quantize it with fewer bits or add it to ignore=)")
    return None


def _repack(qweight, scales, zeros, bits: int, group_size: int, in_features: int) -> tuple:
    lw = layout.from_reference(qweight, scales, zeros, bits, group_size, in_features)
    dev = qweight.device
    return lw.weight.to(dev), lw.scales.to(dev), lw.zeros.to(dev) if lw.zeros is not None else None, lw.out_features


def _check_sparse(layer: str, bits: int, group_size: int, sparse_group: int) -> str | None:
    if not 1 <= bits <= 4:
        return f"layer {layer}: cpu-lut kernels take 1..4-bit weights, got bits={bits} (group-sparse)"
    if sparse_group % 16 or group_size % sparse_group or group_size > MAX_SPARSE_GROUP_SIZE:
        return (f"layer {layer}: cpu-lut group-sparse kernels need sparse_group a multiple of 16 and group_size a "
                f"multiple of it (at most {MAX_SPARSE_GROUP_SIZE}), got sparse_group={sparse_group}, "
                f"group_size={group_size}")
    return None


def lower_sparse(program, progress: bool = False) -> int:
    """Rewrite every ``linear_gsq`` node into ``linear_lut_gs`` (module docstring); the count."""
    nodes = list(program.nodes(torch.ops.lowc.linear_gsq.default))
    for node in bar(nodes, desc="repack group-sparse layers for cpu-lut kernels", enabled=progress):
        a = LinearQArgs.of(node)
        why = _check_sparse(nodemeta.get(node).layer or node.name, a.bits, a.group_size, a.sparse_group)
        if why:
            raise KernelError(why)
        qweight, scales, idx = (program.attr(t.target) for t in (a.weight, a.scales, a.idx))
        zeros = program.attr(a.zeros.target) if a.zeros is not None else None
        lw = layout.from_sparse_reference(qweight, scales, zeros, idx, a.bits, a.group_size, a.sparse_group,
                                          a.in_features)
        dev = qweight.device
        tensors = {"lut_gs_weight": lw.weight.to(dev), "lut_gs_mask": lw.mask.to(dev), "lut_scales": lw.scales.to(dev),
                   "lut_zeros": None if lw.zeros is None else lw.zeros.to(dev)}
        replace_node(program, a, lut_op.LINEAR_LUT_GS, tensors, ("weight", "mask", "scales", "zeros"),
                     out_features=lw.out_features, n_keep=lw.n_keep)
    if nodes:
        program.remove_dead()
    return len(nodes)


@dataclass(frozen=True)
class LutLower(Pass):
    name = "lut-lower"
    summary = ("repack 1-4-bit linear_wq weights into the cpu-lut layout (lowc::linear_lut), group-sparse "
               "linear_gsq into lowc::linear_lut_gs")

    def run(self, program, ctx: PassContext) -> PassResult:
        sparse = lower_sparse(program, ctx.progress)
        res = lower_linear_wq(program, lut_op.LINEAR_LUT, kernels="cpu-lut kernels", check=_check,
                              repack=_repack, buffers=("lut_weight", "lut_scales", "lut_zeros"),
                              progress=ctx.progress)
        stats = dict(res.stats, lowered=res.stats["lowered"] + sparse, sparse=sparse)
        return PassResult(changed=res.changed or sparse > 0, stats=stats)
