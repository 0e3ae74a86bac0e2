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
without a preceding norm (o_proj, down_proj); the pass reports how many groups it smoothed and
skipped. Idempotent: smoothed linears carry ``smoothquant(alpha=...)`` in their NodeInfo transforms.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowc.errors import CalibrationError
from lowc.ir import meta as nodemeta
from lowc.passes.base import Pass, PassContext, PassResult, opt
from lowc.passes.quant.common import layer_name, matches


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

    @staticmethod
    def _only_feeds(norm: torch.fx.Node, linears) -> bool:
        from lowc.ir.analysis import only_reaches

        return only_reaches(norm, linears)

    def run(self, program, ctx: PassContext) -> PassResult:
        from lowc.ir.analysis import norm_before_linears
        from lowc.ir.program import LINEAR
        from lowc.passes.blockwise import BlockwiseRunner

        links, skipped = [], []
        for link in norm_before_linears(program):
            lins = link.group.linears
            if any(matches(layer_name(n), self.ignore) for n in lins):
                continue
            if any(n.target != LINEAR or any(t.startswith("smoothquant") for t in nodemeta.get(n).transforms) for n in lins):
                continue  # already quantized or already smoothed
            if link.kind is None or link.weight is None or not self._only_feeds(link.norm, lins):
                skipped.append(link.layer)
                continue
            links.append(link)
        if not links:
            self._log_skipped(ctx, skipped)
            return PassResult(changed=False, stats={"smoothed": 0, "skipped": len(skipped), "alpha": self.alpha})
        # per-channel activation absmax of every group's input, block by block
        amax: dict[str, torch.Tensor] = {}
        first = {link.group.linears[0].name: link for link in links}
        by_block: dict[int | None, list[str]] = {}
        for name, link in first.items():
            by_block.setdefault(link.group.block, []).append(name)

        def hook(name, x, y):
            x = x.detach().reshape(-1, x.shape[-1]).abs().float()
            if not torch.isfinite(x).all():
                raise CalibrationError(f"smoothquant: non-finite activations reach {name} in calibration")
            m = x.amax(dim=0).cpu()
            amax[name] = torch.maximum(amax[name], m) if name in amax else m

        runner = BlockwiseRunner(program, ctx.calib, device=ctx.device, progress=ctx.progress,
                                 desc="smoothquant", propagate="float")
        for block in runner:
            names = [n for n in by_block.get(block.index, []) if n in {x.name for x in block.nodes}]
            if names:
                block.run(hook, nodes=names)
        runner.close()
        missing = [first[n].layer for n in first if n not in amax]
        if missing:  # groups outside transformer blocks: no block-wise statistics
            skipped.extend(missing)
        smoothed = 0
        with torch.no_grad():
            for name, link in first.items():
                if name not in amax:
                    continue
                lins = link.group.linears
                targets = [n.args[1].target for n in lins]
                weights = [program.attr(t) for t in targets]
                w_max = torch.stack([w.detach().abs().float().amax(dim=0) for w in weights]).amax(dim=0).cpu()
                a = amax[name].clamp(min=1e-5)
                s = (a.pow(self.alpha) / w_max.clamp(min=1e-5).pow(1 - self.alpha)).clamp(min=1e-5)
                # new tensors, never in-place: the program may share tensors with the user's model
                for t in (link.weight, link.bias):
                    if t is not None:
                        v = program.attr(t)
                        program.replace_attr(t, (v.detach().float() / s.to(v.device)).to(v.dtype))
                for t, w in zip(targets, weights):
                    program.replace_attr(t, (w.detach().float() * s.to(w.device)).to(w.dtype))
                for n in lins:
                    nodemeta.set_info(n, nodemeta.get(n).transformed(f"smoothquant(alpha={self.alpha})"))
                smoothed += 1
        self._log_skipped(ctx, skipped)
        return PassResult(changed=smoothed > 0, stats={"smoothed": smoothed, "skipped": len(skipped), "alpha": self.alpha})
