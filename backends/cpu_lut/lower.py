"""``lut-lower``: rewrite ``lowc::linear_wq`` into ``lowc::linear_lut`` with weights repacked into the
LUT layout (bit planes, row tiles of 32; :mod:`lowc.backends.cpu_lut.layout`).

Precondition: a method pass produced ``linear_wq`` nodes with 1..4-bit weights; a wider layer or an
activation-quantized ``linear_wqaq`` raises, naming the layer. Each node keeps its own bits and group
size (read from its arguments), so per-layer mixed precision lowers as is. The reference-layout
buffers become ``<layer>.lut_weight``, ``.lut_scales`` (float32) and ``.lut_zeros``; the old ones are
dropped. Idempotent: ``linear_lut`` nodes are left alone. The rewrite itself is the one every backend
shares (:func:`lowc.backends.lowering.lower_linear_wq`); this module supplies the check and the repacking.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowc.backends.cpu_lut import layout
from lowc.backends.cpu_lut import op as lut_op
from lowc.backends.lowering import lower_linear_wq
from lowc.passes.base import Pass, PassContext, PassResult


def _check(layer: str, bits: int, group_size: int, in_features: int, scales: torch.Tensor) -> str | None:
    if not 1 <= bits <= 4:
        return (f"layer {layer}: cpu-lut kernels take 1..4-bit weights, got bits={bits} "
                f"(quantize it with fewer bits or add it to ignore=)")
    return None


def _repack(qweight, scales, zeros, bits: int, group_size: int, in_features: int) -> tuple:
    lw = layout.from_reference(qweight, scales, zeros, bits, group_size, in_features)
    dev = qweight.device
    return lw.weight.to(dev), lw.scales.to(dev), lw.zeros.to(dev) if lw.zeros is not None else None, lw.out_features


@dataclass(frozen=True)
class LutLower(Pass):
    name = "lut-lower"
    summary = "repack 1-4-bit linear_wq weights into the cpu-lut layout (lowc::linear_lut)"

    def run(self, program, ctx: PassContext) -> PassResult:
        return lower_linear_wq(program, lut_op.LINEAR_LUT, kernels="cpu-lut kernels", check=_check,
                               repack=_repack, buffers=("lut_weight", "lut_scales", "lut_zeros"),
                               progress=ctx.progress)
