"""What a learned-transform pass (AffineQuant, FlatQuant) decides for one transformer block: a
:class:`BlockPlan`, and the helpers that build one.

A plan holds, per program linear it touches, a :class:`lowc.passes.quant.fakequant.QLinear` (its
input and weight transforms, weight and activation fake-quant), the trainable parameters, and how to
fold the trained transforms back into the program. The driver
(:func:`lowc.passes.quant.learned.run_blockwise`) patches the modules into a copy of the block,
trains them and calls :meth:`BlockPlan.fold`; the program is not touched before ``fold``.

Invariant: a linear's ``QLinear`` computes, in float and without fake-quant, exactly what the
program computes after ``fold`` (the transforms are equivalences; tests check the folded float
model against the original).
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
import torch.fx

from lowc.passes.quant.common import linear_bias, linear_weight
from lowc.passes.quant.fakequant import QLinear, WeightFakeQuant


class BlockPlan:
    """What a learned-transform pass decides for one block: ``modules`` (program node name ->
    :class:`QLinear` patched into the block copy), the trainable ``param_groups``, ``refresh()``
    (recompute transforms from parameters), ``on_epoch(e)``, and ``fold(program, weights)`` which
    moves the trained transforms into the program (norm weights, online ops, rows of other linears)
    and may adjust ``weights`` (node name -> [W, b] effective tensors) before they are written.
    ``notes`` and ``skipped`` (norms whose scale stays online because they also feed the residual)
    go to the pass's log."""

    modules: dict[str, QLinear]
    param_groups: list[dict]
    notes: list[str]
    skipped: list[str]

    def __init__(self):
        self.modules, self.param_groups, self.notes, self.skipped = {}, [], [], []

    def refresh(self) -> None:
        """Recompute the transforms from their parameters (before each forward and before folding)."""

    def on_epoch(self, epoch: int) -> None:
        """Called at the start of training epoch ``epoch`` (0-based)."""

    def fold(self, program, weights: dict[str, list]) -> None:  # pragma: no cover - interface
        raise NotImplementedError


def compose(fns: Sequence[Callable], x):
    """``fns`` applied to ``x`` in order."""
    for f in fns:
        x = f(x)
    return x


def qlinear(program, node: torch.fx.Node, device, *, scheme=None, lwc: str | None = None, act_bits: int = 16,
            in_fn: Callable | None = None, weight_fns: Sequence[Callable] = (), bias_fn: Callable | None = None) -> QLinear:
    """A :class:`QLinear` for the program's linear ``node``, its weight and bias moved to ``device``:
    the weight passes ``weight_fns`` in order, then :class:`WeightFakeQuant` with ``scheme`` (bits,
    group size, symmetric) and clipping mode ``lwc`` when a scheme is given (else no quantization)."""
    w = linear_weight(program, node).to(device)
    wq = (WeightFakeQuant(w.shape, scheme.w_bits, scheme.group_size, scheme.symmetric, lwc, device=device)
          if scheme is not None else None)
    fns = tuple(weight_fns)
    wfn = (lambda x, _f=fns: compose(_f, x)) if fns else None
    b = linear_bias(program, node)
    return QLinear(w, None if b is None else b.to(device), wq, act_bits, in_fn, wfn, bias_fn)


def block_qlinears(program, nodes: Iterable[torch.fx.Node], targets: set, transformed: set, scheme, lwc: str | None,
                   a_bits: int, device, in_fn: dict, w_fns: dict, b_fns: dict) -> dict[str, QLinear]:
    """:func:`qlinear` for each of a block's linears ``nodes`` that is quantized (in ``targets``: weight
    and activation fake-quant) or ``transformed`` (float, its weight rewritten by another group's
    transform); ``in_fn``/``w_fns``/``b_fns`` map node names to its transforms."""
    out: dict[str, QLinear] = {}
    for n in nodes:
        if n.name not in targets and n.name not in transformed:
            continue
        q = n.name in targets
        out[n.name] = qlinear(program, n, device, scheme=scheme if q else None, lwc=lwc, act_bits=a_bits if q else 16,
                              in_fn=in_fn.get(n.name), weight_fns=w_fns.get(n.name, ()), bias_fn=b_fns.get(n.name))
    return out


def param_groups(transforms: list, lr: float, clips: list, clip_lr: float) -> list[dict]:
    """AdamW groups of the transform parameters and of the clipping parameters (empty ones left out)."""
    return [g for g in ({"params": transforms, "lr": lr}, {"params": clips, "lr": clip_lr}) if g["params"]]


def weight_clip_parameters(modules: dict[str, QLinear]) -> list[torch.nn.Parameter]:
    """The learnable weight-clipping logits of the quantized modules."""
    return [q for m in modules.values() if m.wq is not None for q in m.wq.clip_parameters()]
