"""``smoothquant``: migrate activation outliers into the weights (Xiao et al., 2023, "SmoothQuant").

For each group of linears reading the output of a normalization (q/k/v after the attention norm,
gate/up after the MLP norm), with per-input-channel activation maxima ``max|X_j|`` measured on the
calibration data (block by block) and weight maxima ``max|W_j|`` over the group's linears:

    s_j = max|X_j|^α / max|W_j|^(1−α),   X' = X·diag(s)⁻¹,   W' = W·diag(s)

``diag(s)⁻¹`` is folded into the norm's elementwise weight (and bias), so the graph gains no op and
the float model's outputs are unchanged up to rounding; only the ranges change, which is what makes
per-token int8 activations (``*-w8a8``) accurate. Run it before a weight-quantizing method pass:
``--pass 'smoothquant{alpha=0.5}' --pass rtn``.

Scope (documented simplifications): scales are folded into norms only. Groups whose norm output
also feeds something other than the group's linears cannot be folded exactly (post-norm models such
as BERT, where the normalized value is also the residual stream) and are skipped, as are linears
without a preceding norm (o_proj, down_proj) and groups outside transformer blocks (no block-wise
statistics); the pass reports how many groups it smoothed and skipped and logs the skipped ones by
layer. Idempotent: smoothed linears carry ``smoothquant(alpha=...)`` in their NodeInfo transforms, and a
second run leaves them alone (``already_smoothed`` in the stats).

Precondition: the linears are still float. Smoothing a quantized linear would change its input
without changing its packed weight, so a group with a linear that a method pass already quantized
(and that smoothquant did not smooth before) raises a PassError that says to run smoothquant first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowc.errors import PassError
from lowc.ir import meta as nodemeta
from lowc.ir.analysis import (
    is_float_linear,
    linear_layer,
    norm_before_linears,
    only_reaches,
)
from lowc.ir.dialect.args import LinearArgs
from lowc.ir.printer import target_name
from lowc.passes.base import Pass, PassContext, PassResult, opt
from lowc.passes.blockwise import BlockwiseRunner
from lowc.passes.quant.common import matches
from lowc.passes.quant.fold import fold_into_norm
from lowc.passes.quant.transforms import smooth_scales, update_absmax


@dataclass(frozen=True)
class SmoothQuant(Pass):
    name = "smoothquant"
    requires = frozenset({"calibration"})
    summary = "SmoothQuant: fold per-channel activation/weight balancing scales into the preceding norms"

    alpha: float = opt(0.5, "migration strength α in [0, 1]: 0 keeps activations, 1 moves all range to weights")
    ignore: tuple[str, ...] = opt(("lm_head",), "layers whose groups are left alone: names, dotted suffixes or globs")

    def validate(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise self.fail(f"alpha={self.alpha}: choose 0 <= alpha <= 1")

    @staticmethod
    def _log_skipped(ctx: PassContext, skipped: list[str]) -> None:
        if skipped:
            ctx.log.append(f"smoothquant: {len(skipped)} group(s) not foldable into a norm, left unsmoothed: "
                           + ", ".join(skipped[:4]) + ("..." if len(skipped) > 4 else ""))

    def run(self, program, ctx: PassContext) -> PassResult:
        links, skipped, already = [], [], 0
        for link in norm_before_linears(program):
            lins = link.group.linears
            if any(matches(linear_layer(n), self.ignore) for n in lins):
                continue
            if any(t.startswith("smoothquant") for n in lins for t in nodemeta.get(n).transforms):
                already += 1  # smoothed by an earlier run (and maybe quantized since): idempotence
                continue
            compressed = next((n for n in lins if not is_float_linear(n)), None)
            if compressed is not None:
                raise PassError(f"pass 'smoothquant': {linear_layer(compressed)} is already compressed "
                                f"({target_name(compressed)}): smoothing must come before the quantizing pass, "
                                "e.g. --pass smoothquant --pass rtn")
            if link.kind is None or link.weight is None or not only_reaches(link.norm, lins):
                skipped.append(link.layer)
                continue
            links.append(link)
        stats = {"smoothed": 0, "skipped": len(skipped), "alpha": self.alpha}
        if already:
            stats["already_smoothed"] = already
        if not links:
            self._log_skipped(ctx, skipped)
            return PassResult(changed=False, stats=stats)
        # per-channel activation absmax of every group's input, block by block
        amax: dict[str, torch.Tensor] = {}
        first = {link.group.linears[0].name: link for link in links}
        by_block: dict[int | None, list[str]] = {}
        for name, link in first.items():
            by_block.setdefault(link.group.block, []).append(name)
        runner = BlockwiseRunner(program, ctx.calib, device=ctx.device, progress=ctx.progress,
                                 desc="smoothquant", propagate="float")
        for block in runner:
            names = [n for n in by_block.get(block.index, []) if n in {x.name for x in block.nodes}]
            if names:
                block.run(lambda name, x, y: update_absmax(amax, name, x, "smoothquant"), nodes=names)
        runner.close()
        missing = [first[n].layer for n in first if n not in amax]
        if missing:  # groups outside transformer blocks: no block-wise statistics
            ctx.log.append(f"smoothquant: {len(missing)} group(s) outside transformer blocks (no block-wise statistics), "
                           "left unsmoothed: " + ", ".join(missing[:4]) + ("..." if len(missing) > 4 else ""))
        smoothed = 0
        with torch.no_grad():
            for name, link in first.items():
                if name not in amax:
                    continue
                lins = link.group.linears
                targets = [LinearArgs.of(n).weight.target for n in lins]
                weights = [program.attr(t) for t in targets]
                s = smooth_scales(amax[name], weights, self.alpha)
                fold_into_norm(program, link, lambda v, _s=s: v / _s.to(v.device))
                for t, w in zip(targets, weights):
                    program.replace_attr(t, (w.detach().float() * s.to(w.device)).to(w.dtype))
                for n in lins:
                    nodemeta.set_info(n, nodemeta.get(n).transformed(f"smoothquant(alpha={self.alpha})"))
                smoothed += 1
        self._log_skipped(ctx, skipped)
        stats.update(smoothed=smoothed, skipped=len(skipped) + len(missing))
        return PassResult(changed=smoothed > 0, stats=stats)
