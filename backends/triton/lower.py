"""``triton-lower``: rewrite ``lowc::linear_wq`` into ``lowc::linear_wq_tr`` with weights repacked into
the Triton kernels' ``k-packed-int32`` layout (:mod:`lowc.backends.triton.layout`).

Precondition: a method pass produced ``linear_wq`` nodes. A layer the kernels cannot take raises,
naming it: weights other than 4 or 8 bits, a group size that is not a multiple of 16 (a K tile of at
least 16 must lie inside one group; per-channel layers always fit), or an activation-quantized
``linear_wqaq``. Each node keeps its own bits and group size (read from its arguments), so per-layer
mixed 4/8-bit models lower as is. The reference-layout buffers become ``<layer>.tr_qweight`` (int32
``[K_pad/P, N]``), ``.tr_scales`` (``[G, N]``, same dtype) and ``.tr_zeros`` (uint8 ``[G, N]``); the
old ones are dropped. Idempotent: ``linear_wq_tr`` nodes are left alone. Runs on the weights'
device (repacking is a reinterpretation and a transpose). The rewrite itself is the one every backend
shares (:func:`lowc.backends.lowering.lower_linear_wq`); this module supplies the check and the repacking.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowc.backends.lowering import lower_linear_wq
from lowc.backends.triton import layout
from lowc.backends.triton import op as tr_op
from lowc.passes.base import Pass, PassContext, PassResult


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
        return lower_linear_wq(program, tr_op.LINEAR_WQ_TR, kernels="cuda-* Triton kernels",
                               check=_check, repack=_repack, buffers=("tr_qweight", "tr_scales", "tr_zeros"),
                               progress=ctx.progress)
