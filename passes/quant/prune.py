"""``prune``: the pruning baselines beside GQSA: Wanda, SparseGPT (and magnitude), unstructured or N:M.

The pruned weights stay dense float ``aten.linear`` weights holding zeros (dense baselines run on the
reference backend: their quality is the point), so ``prune`` composes with a quantizer after it
(``--pass 'prune{method=sparsegpt,pattern=2:4}' --pass gptq``): GPTQ holds a pruned layer's zeros at
0 (see :mod:`lowc.passes.quant.gptq`), RTN keeps them because 0 rounds to the group's integer zero
point. Each pruned layer gets the transform ``prune(method=...,pattern=...,sparsity=...)`` (the
fraction of its weights that are zero), which later passes keep and ``lowc inspect`` shows.

Methods (scores compared per output row, so every row keeps the same number of weights):

* ``magnitude``: ``|W_ij|``; needs no calibration.
* ``wanda`` (Sun et al. 2023, "A Simple and Effective Pruning Approach for LLMs"): ``|W_ij|·‖X_j‖₂``
  over the calibration tokens reaching the layer; no weight update.
* ``sparsegpt`` (Frantar & Alistarh 2023): the OBS column sweep of GPTQ with the same Hessian
  ``2/n·Σ x xᵀ``, damping and Cholesky factor of ``H⁻¹`` (:func:`lowc.passes.quant.gptq.obs_sweep`):
  columns in blocks of ``block_size`` (128); the mask is chosen adaptively as the sweep reaches each
  block by ``w²/[H⁻¹]²_jj`` (the OBS saliency, with the weights already updated by the errors of
  earlier columns); pruning a weight pushes its error onto the columns to its right. One deviation
  from the paper's reference: unstructured selection is per row within each block (the reference
  thresholds over the whole block), so rows stay balanced like Wanda's; per row exactly
  ``round(sparsity·K)`` weights go. With ``bits`` it is the paper's joint mode: each column is
  pruned and quantized in the same sweep, and the layer becomes ``lowc::linear_wq`` whose pruned
  weights dequantize to exactly 0 (stored as the zero point).

Patterns: ``unstructured``; ``N:M`` (``2:4``, ``4:8``) keeps ``N`` of every ``M`` consecutive input
weights of a row (groups start at column 0; a trailing partial group keeps ``N/M`` of its width,
rounded), so ``sparsity`` must be ``1 - N/M``.

Calibration is block-wise (:class:`lowc.passes.blockwise.BlockwiseRunner`): block ``i+1`` is
calibrated on the outputs of pruned block ``i``; within a block, linears sharing an input are pruned
together, in graph order (as GPTQ's ``true_sequential``). Linears outside transformer blocks (a BERT
pooler) see no block-wise calibration and stay dense (the log names them); ``ignore`` layers too
(``lm_head`` by default). A layer already pruned is left as it is, so a second run changes nothing.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from lowc.ir import meta as nodemeta
from lowc.ir.analysis import linear_layer
from lowc.ir.dialect.args import LinearArgs
from lowc.passes.base import PassContext, PassResult, opt
from lowc.passes.blockwise import BlockwiseRunner
from lowc.passes.quant.common import WeightQuantPass, linear_weight, rewrite_linear
from lowc.passes.quant.gptq import (
    effective_block,
    gptq_quantize,
    obs_sweep,
    sequential_stages,
    stage_hessians,
)
from lowc.progress import bar

METHODS = ("magnitude", "wanda", "sparsegpt")
_NM_RE = re.compile(r"(\d+):(\d+)")


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """``(n, m)`` for ``N:M`` (keep ``n`` of every ``m``), None for ``unstructured``; ValueError otherwise."""
    if pattern == "unstructured":
        return None
    m = _NM_RE.fullmatch(pattern)
    if not m or not 0 < int(m.group(1)) < int(m.group(2)) <= 64:
        raise ValueError(pattern)
    return int(m.group(1)), int(m.group(2))


def _cut(sparsity: float, width: int) -> int:
    """How many of ``width`` weights to prune: ``round(sparsity·width)``, halves up (not banker's)."""
    return math.floor(sparsity * width + 0.5)


def prune_mask(score: torch.Tensor, sparsity: float, nm: tuple[int, int] | None) -> torch.Tensor:
    """True where the lowest-``score`` weights of each row are pruned: ``round(sparsity·K)`` of each
    row (unstructured) or ``M-N`` of each group of ``M`` consecutive columns (``nm``)."""
    n, k = score.shape
    mask = torch.zeros_like(score, dtype=torch.bool)
    if nm is None:
        cut = _cut(sparsity, k)
        if cut:
            mask.scatter_(1, torch.topk(score, cut, dim=1, largest=False).indices, True)
        return mask
    keep, m = nm
    full = k // m * m
    if full:
        idx = torch.topk(score[:, :full].reshape(n, k // m, m), m - keep, dim=2, largest=False).indices
        mask[:, :full] = torch.zeros(n, k // m, m, dtype=torch.bool, device=score.device).scatter_(2, idx, True).reshape(n, full)
    if full < k:
        mask[:, full:] = prune_mask(score[:, full:], 1 - keep / m, None)
    return mask


def sparsegpt_select(sparsity: float, nm: tuple[int, int] | None, k: int):
    """SparseGPT's adaptive selection for :func:`obs_sweep`: at the start of each block (unstructured,
    per row, the block's share of ``round(sparsity·K)`` so the row's total is exact) or of each group
    of ``M`` columns (``N:M``, groups aligned to column 0; blocks hold whole groups), prune the lowest
    ``w²/[H⁻¹]²_jj`` of the weights as the sweep has updated them."""

    def select(W1: torch.Tensor, hdiag: torch.Tensor, M1: torch.Tensor, i: int, col: int) -> None:
        if nm is None:
            cut = _cut(sparsity, col + M1.shape[1]) - _cut(sparsity, col) if i == 0 else 0
            if cut:
                score = W1 ** 2 / hdiag.unsqueeze(0) ** 2
                M1.scatter_(1, torch.topk(score, cut, dim=1, largest=False).indices, True)
        elif col % nm[1] == 0:
            width = min(nm[1], k - col)
            score = W1[:, i : i + width] ** 2 / hdiag[i : i + width].unsqueeze(0) ** 2
            M1[:, i : i + width] |= prune_mask(score, sparsity, nm if width == nm[1] else None)

    return select


@dataclass(frozen=True)
class Prune(WeightQuantPass):
    name = "prune"
    requires = frozenset({"calibration"})
    summary = "pruning baselines (Wanda, SparseGPT, magnitude; unstructured or N:M), dense zeros or SparseGPT's joint prune+quantize"

    method: str = opt("wanda", "wanda (|W|·‖X_j‖₂), sparsegpt (OBS with weight updates) or magnitude (|W|, no calibration)")
    pattern: str = opt("unstructured", "unstructured, or N:M (2:4, 4:8): keep N of every M consecutive input weights")
    sparsity: float = opt(0.5, "fraction of each row's weights set to 0, 0 <= s < 1 (N:M: must be 1 - N/M)")
    bits: int | None = opt(None, "sparsegpt only: quantize while pruning (joint mode) to this many bits; default: keep float")
    damp: float = opt(0.01, "sparsegpt: dampening λ, H += λ·mean(diag H)·I (raised ×10 and retried if H is not PD)")
    block_size: int = opt(128, "sparsegpt: columns per block (mask selection and lazy updates)")

    def validate(self) -> None:
        super().validate()
        if self.method not in METHODS:
            raise self.fail(f"method={self.method!r}: choose one of {', '.join(METHODS)}")
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)) or not 0 <= self.sparsity < 1:
            raise self.fail(f"sparsity={self.sparsity!r}: choose 0 <= sparsity < 1")
        try:
            nm = parse_pattern(self.pattern)
        except ValueError:
            raise self.fail(f"pattern={self.pattern!r}: choose unstructured or N:M with 0 < N < M <= 64 (2:4, 4:8)") from None
        if nm is not None and abs(self.sparsity - (1 - nm[0] / nm[1])) > 1e-9:
            raise self.fail(f"pattern={self.pattern} prunes {1 - nm[0] / nm[1]:g} of the weights, not sparsity={self.sparsity:g}: "
                            f"set sparsity={1 - nm[0] / nm[1]:g} or pattern=unstructured")
        if self.bits is not None and self.method != "sparsegpt":
            raise self.fail(f"bits={self.bits}: joint prune+quantize is sparsegpt's; for {self.method} add a gptq or rtn pass after")
        if self.bits is None and (self.group_size is not None or self.symmetric is not None):
            raise self.fail("group_size/symmetric are for the joint mode: set bits too, or quantize in a later pass")
        if not 0 < self.damp < 1:
            raise self.fail(f"damp={self.damp}: choose 0 < damp < 1")
        if self.block_size < 1:
            raise self.fail(f"block_size={self.block_size}: must be positive")

    def requirements(self) -> frozenset[str]:
        return frozenset() if self.method == "magnitude" else self.requires

    def label(self, w: torch.Tensor) -> str:
        return nodemeta.prune_label(self.method, self.pattern, (w == 0).float().mean().item())

    def run(self, program, ctx: PassContext) -> PassResult:
        for req in self.requirements():
            ctx.require(req, self.name)
        nm = parse_pattern(self.pattern)
        nodes = [n for n in self.select(program) if not nodemeta.pruned(nodemeta.get(n)) and linear_weight(program, n).dim() == 2]
        if not nodes or self.sparsity == 0:
            return PassResult(changed=False, stats={"pruned": 0})
        torch.manual_seed(ctx.seed)
        zeros = total = 0
        done: list[str] = []

        def store(node, w_new: torch.Tensor) -> None:
            nonlocal zeros, total
            w = linear_weight(program, node)
            program.replace_attr(LinearArgs.of(node).weight.target, w_new.to(w.dtype))
            nodemeta.set_info(node, nodemeta.get(node).transformed(self.label(w_new)))
            zeros += int((w_new == 0).sum())
            total += w_new.numel()
            done.append(node.name)

        if self.method == "magnitude":
            for node in bar(nodes, desc="prune[magnitude]", enabled=ctx.progress):
                w = linear_weight(program, node).detach().float()
                store(node, w.masked_fill(prune_mask(w.abs(), self.sparsity, nm), 0))
        else:
            scheme = self.scheme(ctx) if self.bits is not None else None
            if nm is not None and self.method == "sparsegpt":
                bs = effective_block(self.block_size, None if scheme is None else scheme.group_size)
                if bs % nm[1]:
                    raise self.fail(f"pattern={self.pattern}: blocks of {bs} columns split groups of {nm[1]}: "
                                    f"choose block_size (and group_size) a multiple of {nm[1]}")
            targets = {n.name for n in nodes}
            loss = 0.0
            runner = BlockwiseRunner(program, ctx.calib, device=ctx.device, progress=ctx.progress, desc=f"prune[{self.method}]")
            for block in runner:
                mine = [n for n in block.linears() if n.name in targets]
                for stage in sequential_stages(mine, True):
                    hess = stage_hessians(block, stage, "prune", diagonal=self.method == "wanda")
                    for node in stage:
                        lname = linear_layer(node)
                        runner.set_postfix(layer=lname)
                        w = linear_weight(program, node)
                        if self.method == "wanda":
                            wf = w.detach().float()
                            score = wf.abs() * hess[node.name].to(wf.device).clamp(min=0).sqrt().unsqueeze(0)
                            store(node, wf.masked_fill(prune_mask(score, self.sparsity, nm), 0))
                            continue
                        select = sparsegpt_select(self.sparsity, nm, w.shape[1])
                        kw = {"damp": self.damp, "block_size": self.block_size, "name": lname, "select": select, "what": "prune"}
                        if scheme is None:
                            r = obs_sweep(w, hess[node.name], None, -1, False, **kw)
                            store(node, r["Q"])
                        else:  # joint mode: the layer becomes lowc::linear_wq
                            qw, r = gptq_quantize(w, hess[node.name], scheme.w_bits, scheme.group_size, scheme.symmetric, **kw)
                            new = rewrite_linear(program, node, qw, scheme, "sparsegpt")
                            nodemeta.set_info(new, nodemeta.get(new).transformed(
                                nodemeta.prune_label(self.method, self.pattern, r["mask"].float().mean().item())))
                            zeros += int(r["mask"].sum())
                            total += r["mask"].numel()
                            done.append(node.name)
                        loss += r["loss"]
                        if r["damp"] != self.damp:
                            ctx.log.append(f"prune: {lname}: Hessian not positive definite; damping raised to {r['damp']:g}")
                    hess.clear()
            runner.close()
            rest = [linear_layer(n) for n in nodes if n.name not in set(done)]
            if rest:
                ctx.log.append(f"prune: {len(rest)} linear(s) outside transformer blocks left dense: " + ", ".join(rest[:4])
                               + ("..." if len(rest) > 4 else ""))
        program.remove_dead()
        stats = {"pruned": len(done), "method": self.method, "pattern": self.pattern,
                 "sparsity": round(zeros / max(total, 1), 6)}
        if self.method == "sparsegpt":
            stats["loss"] = round(loss, 6)
        if self.bits is not None:
            stats["bits"] = self.bits
        return PassResult(changed=bool(done), stats=stats)

