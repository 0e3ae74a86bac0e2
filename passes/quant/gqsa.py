"""``gqsa``: group sparsity + group quantization (Zeng et al., 2024, "GQSA", arXiv 2412.17560).

Rewrites each selected ``aten.linear`` into ``lowc::linear_gsq`` (layout:
:mod:`lowc.ir.dialect.sparse`): every row keeps the same number of *sparse groups* (``sparse_group``
consecutive input weights, kept or dropped together) and stores only their ``bits``-bit codes, with
group scales/zero points over the compact row and an int16 index per kept group.

Steps, block by block on :class:`lowc.passes.blockwise.BlockwiseRunner` (``propagate="both"``: inputs
from the already compressed blocks, targets from the float model):

1. **salience** (:func:`lowc.passes.quant.gqsa_train.group_salience`) from the inputs each linear
   sees in the compressed model: ``hessian`` (default, the paper's choice: the OBS saliency
   ``w² / [H⁻¹]_kk`` with ``H`` and damping as GPTQ's) or ``wanda`` (``|w|·‖X_k‖₂``), summed over each
   sparse group; per row the ``round(n_groups · (1 − sparsity))`` best groups are kept (at least
   one). The mask is then fixed. With ``hessian`` the kept weights are refitted to the layer's
   float outputs on those inputs (the OBS update for the fixed mask, solved exactly by batched
   conjugate gradients: :func:`lowc.passes.quant.gqsa_train.obs_prune`); on the seeded test Llama
   this lifts the logits' SQNR at W4 S50% from 1.6 dB (mask only) to 8.4 dB before any training.
2. **BQPO** (block-wise quantization-pruning optimisation): the block's kept weights and
   OmniQuant-style clipping logits per quantization group (straight-through rounding) are trained
   with AdamW on the MSE between the block's outputs and the float block's
   (:func:`lowc.passes.quant.blocktrain.train_block`). The paper's BQPO also optimises the weights
   of the block under the fixed sparsity pattern (weight recovery), so ``train_weights`` defaults
   to true; if training ends with a higher block loss than salience + RTN, RTN is kept (logged).
3. **E2E-OQP** (:func:`lowc.passes.quant.gqsa_train.e2e_tune`): with codes and masks frozen, only
   the scales are tuned end to end (a log-multiplier each) on KL(float ‖ compressed) of the
   next-token distribution (MSE of the main output for encoders), over the calibration samples;
   kept only if the calibration loss goes down.

Options and defaults. ``sparse_group`` 16 and ``sparsity`` 0.5 are the paper's main setting (W4
S50%). ``bits``, ``group_size`` and ``symmetric`` default to the target's scheme like ``rtn``/``gptq``
(W4 g128 on ``ref-w4a16``); ``group_size`` must be -1 or a multiple of ``sparse_group`` (a scale
then covers whole kept groups); the paper's own layout, one scale per kept group, is
``group_size=16``. The paper describes BQPO as block-wise training of the (masked) weights with
their quantization, and E2E-OQP as end-to-end tuning of the quantization parameters with the
weights frozen, on GPUs over OmniQuant-style calibration; its exact epoch counts and learning
rates were not readable from the sources reachable here, so lowc's defaults are its own, scaled to
the small models it compiles on CPUs (``lowc compile`` takes 128 × 512 tokens): ``epochs`` 2,
``e2e_epochs`` 1, ``lr`` 1e-2 for the clipping logits (OmniQuant's LWC rate), ``weight_lr`` 1e-5
for the kept weights, ``e2e_lr`` 1e-3 for the scales' log-multipliers.

Errors (one line, naming the option or layer): sparsity outside [0, 1), ``sparse_group`` not a
positive multiple of 8, ``group_size`` not -1 or a multiple of ``sparse_group``, a layer whose
weight is not 2-D. Linears outside transformer blocks (BERT's pooler) get salience from the weight
alone (``|w|``) and RTN (logged). Idempotent: compressed layers are no longer ``aten.linear``, so a
second run reports ``changed=False``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from lowc.errors import PassOptionError
from lowc.ir.analysis import linear_layer
from lowc.ir.dialect import sparse
from lowc.ir.scheme import Scheme
from lowc.passes.base import PassContext, PassResult, opt
from lowc.passes.blockwise import BlockwiseRunner
from lowc.passes.quant.blocktrain import block_loss, check_finite, patch_linears, train_block
from lowc.passes.quant.common import WeightQuantPass, linear_bias, linear_weight, rewrite_linear
from lowc.passes.quant.gqsa_train import (
    SALIENCE,
    SparseQLinear,
    e2e_tune,
    group_salience,
    inverse_factor,
    obs_prune,
    select_groups,
)


@dataclass(frozen=True)
class GQSA(WeightQuantPass):
    name = "gqsa"
    requires = frozenset({"calibration"})
    summary = "GQSA: structured group sparsity + group quantization (lowc::linear_gsq), BQPO block-wise then E2E-OQP"
    emits: ClassVar[tuple[str, ...]] = ("linear_gsq",)

    sparsity: float = opt(0.5, "fraction of sparse groups dropped in every row, 0 <= s < 1")
    sparse_group: int = opt(16, "consecutive input weights kept or dropped together (a positive multiple of 8)")
    salience: str = opt("hessian", "group salience: hessian (OBS w²/[H⁻¹]_kk) or wanda (|w|·‖x‖₂), summed per group")
    epochs: int = opt(2, "BQPO training epochs per block (0: salience + RTN)")
    lr: float = opt(1e-2, "BQPO AdamW learning rate of the clipping logits")
    weight_lr: float = opt(1e-5, "BQPO AdamW learning rate of the kept weights")
    train_weights: bool = opt(True, "BQPO also trains the kept weights (the paper's weight recovery), not only the clipping")
    e2e_epochs: int = opt(1, "E2E-OQP epochs over the calibration samples (0: off)")
    e2e_lr: float = opt(1e-3, "E2E-OQP Adam learning rate of the scales' log-multipliers")
    damp: float = opt(0.01, "Hessian dampening λ of the hessian salience, as GPTQ's")
    batch_size: int = opt(1, "calibration samples per BQPO optimizer step")

    def validate(self) -> None:
        super().validate()
        if isinstance(self.sparsity, bool) or not 0 <= self.sparsity < 1:
            raise self.fail(f"sparsity={self.sparsity}: choose 0 <= sparsity < 1")
        if self.sparse_group <= 0 or self.sparse_group % 8:
            raise self.fail(f"sparse_group={self.sparse_group}: must be a positive multiple of 8")
        if self.group_size is not None and self.group_size != -1 and self.group_size % self.sparse_group:
            raise self.fail(f"group_size={self.group_size}: must be -1 or a multiple of sparse_group={self.sparse_group}")
        if self.salience not in SALIENCE:
            raise self.fail(f"salience={self.salience!r}: choose {' or '.join(SALIENCE)}")
        if self.epochs < 0 or self.e2e_epochs < 0:
            raise self.fail(f"epochs={self.epochs}, e2e_epochs={self.e2e_epochs}: must be >= 0")
        if min(self.lr, self.weight_lr, self.e2e_lr) <= 0:
            raise self.fail(f"lr={self.lr}, weight_lr={self.weight_lr}, e2e_lr={self.e2e_lr}: learning rates must be positive")
        if not 0 < self.damp < 1:
            raise self.fail(f"damp={self.damp}: choose 0 < damp < 1")
        if self.batch_size < 1:
            raise self.fail(f"batch_size={self.batch_size}: must be >= 1")

    def scheme(self, ctx: PassContext) -> Scheme:
        s = super().scheme(ctx)
        if s.group_size != -1 and s.group_size % self.sparse_group:
            raise self.fail(f"group_size={s.group_size} (the target's) is not a multiple of sparse_group={self.sparse_group}: "
                            "give group_size= (-1 or a multiple of sparse_group)")
        return s.with_(sparsity=float(self.sparsity), sparse_group=self.sparse_group) if self.sparsity else s

    def check_target(self, target) -> None:
        self.scheme(PassContext(target=target, scheme=target.scheme))  # group_size against the target's

    def run(self, program, ctx: PassContext) -> PassResult:
        ctx.require("calibration", self.name)
        s = self.scheme(ctx)
        nodes = self.select(program)
        for node in nodes:
            w = linear_weight(program, node)
            if w.dim() != 2:
                raise PassOptionError(f"pass 'gqsa': layer {linear_layer(node)}: weight {list(w.shape)} is not 2-D, "
                                      "so its inputs cannot be grouped (add it to ignore=)")
        if not nodes:
            return PassResult(changed=False, stats={"quantized": 0})
        torch.manual_seed(ctx.seed)
        reference = program.clone() if self.e2e_epochs else None
        targets = {n.name for n in nodes}
        done, written, losses, rtn_losses, reverted = [], [], [], [], []
        runner = BlockwiseRunner(program, ctx.calib, device=ctx.device, progress=ctx.progress, desc="gqsa bqpo",
                                 propagate="both")
        for block in runner:
            mine = [n for n in block.linears() if n.name in targets]
            if not mine:
                continue
            where = f"gqsa: {block.layer_prefix}"
            check_finite(block.inputs, where, block.float_outputs[:1])
            info = self._block(program, block, mine, s, ctx, where, runner, written)
            losses.append(info["loss"])
            rtn_losses.append(info["loss_rtn"])
            if info["reverted"]:
                reverted.append(block.layer_prefix)
            done.extend(n.name for n in mine)
        runner.close()
        # linears outside transformer blocks see no block-wise calibration: magnitude salience + RTN
        rest = [n for n in self.select(program) if n.name in targets]
        for node in rest:
            w = linear_weight(program, node)
            idx = select_groups(group_salience(w, torch.ones(w.shape[1]), self.sparse_group, "wanda"), self._n_keep(w))
            qw = sparse.rtn_quantize_sparse(w, idx, s.w_bits, s.group_size, self.sparse_group, s.symmetric)
            written.append(rewrite_linear(program, node, qw, s, "gqsa"))
        if rest:
            ctx.log.append(f"gqsa: {len(rest)} linear(s) outside transformer blocks pruned by |w| and quantized with RTN: "
                           + ", ".join(linear_layer(n) for n in rest[:4]))
        if reverted:
            ctx.log.append(f"gqsa: BQPO did not lower the block loss of {', '.join(reverted[:4])}; salience + RTN kept there")
        program.remove_dead()
        stats = {"quantized": len(done) + len(rest), "bits": s.w_bits, "group_size": s.group_size,
                 "symmetric": s.symmetric, "sparsity": self.sparsity, "sparse_group": self.sparse_group,
                 "salience": self.salience, "samples": len(ctx.calib), "block_loss": [round(v, 6) for v in losses],
                 "block_loss_rtn": [round(v, 6) for v in rtn_losses], "rtn_outside_blocks": len(rest)}
        if self.e2e_epochs and written:
            e2e = e2e_tune(program, reference, written, list(getattr(ctx.calib, "samples", ctx.calib)),
                           epochs=self.e2e_epochs, lr=self.e2e_lr, progress=ctx.progress)
            stats.update(e2e_loss_init=round(e2e["loss_init"], 6), e2e_loss=round(e2e["loss"], 6), e2e_kept=e2e["kept"])
            if not e2e["kept"]:
                ctx.log.append("gqsa: E2E-OQP did not lower the calibration loss; the BQPO scales are kept")
        return PassResult(changed=bool(done or rest), stats=stats)

    # ---- helpers ---------------------------------------------------------------------------------
    def _n_keep(self, weight: torch.Tensor) -> int:
        return sparse.kept_groups(weight.shape[1], self.sparse_group, self.sparsity)

    def _block(self, program, block, mine, s: Scheme, ctx: PassContext, where: str, runner, written: list) -> dict:
        """Salience, masks, BQPO and the rewrite of one block's linears ``mine`` (new nodes appended to ``written``)."""
        device = torch.device(ctx.device)
        stats: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        hessian = self.salience == "hessian"

        def hook(name, x, y):
            x = x.reshape(-1, x.shape[-1]).float()
            c, m = counts.get(name, 0), x.shape[0]
            add = (x.t() @ x) * 2.0 if hessian else (x * x).sum(dim=0)
            prev = stats.get(name)
            stats[name] = add / (c + m) if prev is None else prev * (c / (c + m)) + add / (c + m)
            counts[name] = c + m

        block.run(hook, nodes=[n.name for n in mine])
        idx, weights = {}, {}
        for n in mine:
            w = linear_weight(program, n)
            stat = stats.pop(n.name)
            factor = inverse_factor(stat, self.damp, linear_layer(n)) if hessian else None
            score = group_salience(w, stat if not hessian else None, self.sparse_group, self.salience, factor)
            idx[n.name] = select_groups(score, self._n_keep(w))
            if hessian:  # the OBS update of the kept weights for the chosen mask
                keep = sparse.group_mask(idx[n.name], w.shape[1], self.sparse_group)
                w = obs_prune(w, stat, keep, self.damp).to(w.dtype)
            weights[n.name] = w

        def modules(train: bool) -> dict[str, SparseQLinear]:
            return {n.name: SparseQLinear(weights[n.name], linear_bias(program, n), idx[n.name], s.w_bits,
                                          s.group_size, self.sparse_group, s.symmetric, lwc=train,
                                          train_weights=train and self.train_weights, device=device)
                    for n in mine}

        rtn = modules(False)
        fm = patch_linears(block.module(), rtn)
        loss_rtn = block_loss(fm, block.inputs, block.float_outputs, device)
        chosen, loss, reverted = rtn, loss_rtn, False
        if self.epochs:
            trained = modules(True)
            tm = patch_linears(block.module(), trained)
            weights = [p for m in trained.values() for p in m.trainable()[0]]
            clips = [p for m in trained.values() for p in m.trainable()[1]]
            groups = [g for g in ({"params": weights, "lr": self.weight_lr}, {"params": clips, "lr": self.lr}) if g["params"]]
            postfix = (lambda v, _b=block: runner.set_postfix(block=_b.index, loss=f"{v:.4g}")) if ctx.progress else None
            info = train_block(tm, groups, block.inputs, block.float_outputs, epochs=self.epochs,
                               batch_size=self.batch_size, device=device, postfix=postfix, where=where)
            if info["loss"] < loss_rtn:
                chosen, loss = trained, info["loss"]
            else:
                reverted = True
        for n in mine:
            dtype = linear_weight(program, n).dtype
            qw = chosen[n.name].pack(dtype)
            dev = linear_weight(program, n).device
            qw = sparse.SparseQuantizedWeight(qw.qweight.to(dev), qw.scales.to(dev),
                                              None if qw.zeros is None else qw.zeros.to(dev), qw.idx.to(dev), qw.bits,
                                              qw.group_size, qw.sparse_group, qw.in_features)
            written.append(rewrite_linear(program, n, qw, s, "gqsa"))
        runner.set_postfix(block=block.index, loss=f"{loss:.4g}", rtn=f"{loss_rtn:.4g}")
        return {"loss": loss, "loss_rtn": loss_rtn, "reverted": reverted}
