"""``distill_ssm``: distil chosen softmax attention layers into Mamba-2 (SSD) mixers, MOHAWK-style.

For each chosen layer the ``aten.scaled_dot_product_attention`` node becomes a ``lowc::ssd`` student
initialised from the attention (Q→C, K→B, V→x, the output projection kept; a new per-head decay from
the attention's input; see :mod:`lowc.passes.distill.ssm`), then the students are trained in up to
three stages (Bick et al., 2024, "Transformers to SSMs", arXiv 2408.10189; see
:mod:`lowc.passes.distill.train`): 1, matrix orientation (per layer, the SSD matrix against the softmax
attention matrix); 2, hidden-state alignment (per block, block outputs); 3, end-to-end KL to the float
model's logits, all students jointly. Stages 1 and 2 run in one block-wise sweep over the float
teacher (:mod:`lowc.passes.distill.hooks`), so memory holds one block's teacher tensors at a time.
Layers not chosen keep softmax attention (a hybrid is ``layers=[...]``).

Defaults are sized for small models and small calibration sets (tens of samples of 128–512 tokens):
``epochs=[2,2,1]``, ``lr=[1e-3,3e-4,1e-4]`` (stages 1, 2, 3), convolutions of ``kernel=4`` taps. The
paper used ~3B tokens (80M / 160M / 2.76B per stage); a few thousand tokens recover far less.

Preconditions: calibration data; causal softmax attention in a model with transformer blocks (an
encoder's bidirectional attention is refused, naming the layer: the SSD mixer is causal). Invariants:
the chosen layers have no softmax attention left, the other layers are untouched; padding keys
(``attention_mask == 0``) are excluded through ``key_mask`` as the softmax mask excluded them. A
second run finds no softmax attention in distilled layers and reports ``changed=False``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from lowc.errors import PassError
from lowc.ir import meta as nodemeta
from lowc.ir.analysis import attention_subgraphs
from lowc.passes.base import Pass, PassContext, PassResult, opt
from lowc.passes.distill import ssm, train
from lowc.passes.distill.hooks import capture
from lowc.passes.linearize import rewrite

STAGES = (1, 2, 3)


@dataclass(frozen=True)
class DistillSSM(Pass):
    name = "distill_ssm"
    requires = frozenset({"calibration"})
    summary = "MOHAWK: distil attention layers into Mamba-2 (SSD) mixers, stage by stage (matrix, block, logits)"

    layers: tuple[str, ...] = opt((), "layers to distil: block indices and/or layer names, dotted suffixes or globs "
                                      "(default: all); the others keep softmax attention (a hybrid)")
    stages: tuple[int, ...] = opt(STAGES, "MOHAWK stages to run, a subset of [1,2,3]: 1 matrix orientation, "
                                          "2 hidden-state alignment, 3 end-to-end KL distillation")
    epochs: tuple[int, ...] = opt((2, 2, 1), "passes over the calibration samples for stages 1, 2, 3")
    lr: tuple[float, ...] = opt((1e-3, 3e-4, 1e-4), "AdamW learning rates for stages 1, 2, 3")
    kernel: int = opt(4, "taps of the short causal convolutions on C, B and x (identity at init; 0 = none)")
    chunk: int = opt(64, "chunk length of the SSD op's O(L) form (speed only, not results)")

    def validate(self) -> None:
        if not self.stages:
            raise self.fail("stages=[]: give a subset of [1,2,3]")
        bad = [s for s in self.stages if s not in STAGES]
        if bad:
            raise self.fail(f"stages={list(self.stages)}: unknown stage {bad[0]} (stages are 1, 2 and 3)")
        if len(set(self.stages)) != len(self.stages):
            raise self.fail(f"stages={list(self.stages)}: a stage is listed twice")
        if len(self.epochs) != 3 or any(e < 0 for e in self.epochs):
            raise self.fail(f"epochs={list(self.epochs)}: give three counts >= 0 (stages 1, 2, 3)")
        if len(self.lr) != 3 or not all(x > 0 for x in self.lr):
            raise self.fail(f"lr={list(self.lr)}: give three positive learning rates (stages 1, 2, 3)")
        if self.kernel < 0:
            raise self.fail(f"kernel={self.kernel}: must be >= 0 (0 = no convolution)")
        if self.chunk < 1:
            raise self.fail(f"chunk={self.chunk}: must be positive")
        rewrite.check_layers(self.layers, self.fail)

    # ---- run ------------------------------------------------------------------------------------------
    def run(self, program, ctx: PassContext) -> PassResult:
        done = [(nodemeta.get(n).block, nodemeta.get(n).layer) for n in program.graph.nodes if ssm.is_ssd(n)]
        atts = attention_subgraphs(program)
        if not atts and not done:
            raise PassError("pass 'distill_ssm': the model has no softmax attention "
                            "(no aten.scaled_dot_product_attention in its graph) to distil")
        chosen = rewrite.select(atts, tuple(self.layers), done, who=self.name) if atts else []
        if not chosen:
            return PassResult(changed=False, stats={"distilled": 0, "already": len(done)})
        sites, padding = rewrite.find_sites(program, chosen, who=self.name)
        for s in sites:
            if not s.causal:
                raise PassError(f"pass 'distill_ssm': layer {s.layer}: its attention is bidirectional (an encoder); "
                                "the SSD mixer is causal, so only causal (decoder) attention can be distilled")
            if s.block is None:
                raise PassError(f"pass 'distill_ssm': layer {s.layer} lies outside the model's transformer blocks; "
                                "distillation runs block by block")
        projections = {s.layer: {r: getattr(a, r).name for r in ("q", "k", "v", "o") if getattr(a, r) is not None}
                       for a, s in zip(chosen, sites)}
        torch.manual_seed(ctx.seed)
        g = torch.Generator().manual_seed(ctx.seed)
        teacher = rewrite.shallow_copy(program)
        key_mask = rewrite.key_mask_node(program) if padding else None
        nodes = {}
        for site in sites:
            hidden = ssm.hidden_input(program, site).meta["val"].shape[-1]
            params = ssm.init_params(site, int(hidden), self.kernel, g)
            nodes[site.layer] = ssm.emit_site(program, site, params, key_mask, self.chunk)
        if key_mask is not None and not key_mask.users:
            program.graph.erase_node(key_mask)
        program.gm.recompile()

        stats: dict = {"distilled": len(sites), "layers": [s.layer for s in sites], "stages": list(self.stages),
                       "samples": len(ctx.calib), "tokens": int(sum(s.numel() for s in ctx.calib.samples)),
                       "state_dim": sites[0].head_dim, "kernel": self.kernel}
        t0 = time.perf_counter()
        if 1 in self.stages or 2 in self.stages:
            per_layer, per_block = self._blockwise(program, teacher, sites, projections, nodes, ctx)
            if per_layer:
                stats["stage1"] = _summary(per_layer, "stage1", "layer")
            if per_block:
                stats["stage2"] = _summary(per_block, "stage2", "block")
        t1 = time.perf_counter()
        if 3 in self.stages:
            e, lr = self.epochs[2], self.lr[2]
            bar = tqdm(total=e * len(ctx.calib), desc="distill_ssm stage 3", unit="step", disable=not ctx.progress)
            try:
                st = train.stage3(program, teacher, sites, projections, ctx.calib, epochs=e, lr=lr, device=ctx.device,
                                  seed=ctx.seed, on_step=lambda loss: (bar.update(1), bar.set_postfix(kl=f"{loss:.4g}")))
            finally:
                bar.close()
            stats["stage3"] = {"loss": "kl", "before": st["stage3_before"], "after": st["stage3_after"]}
            ctx.log.append(f"distill_ssm: stage 3 (end-to-end KL, {len(sites)} students jointly): "
                           f"{st['stage3_before']:.4g} -> {st['stage3_after']:.4g}")
        stats["train_s"] = round(time.perf_counter() - t0, 2)
        stats["stage3_s"] = round(time.perf_counter() - t1, 2)
        del teacher
        program.remove_dead()
        return PassResult(changed=True, stats=stats)

    def _blockwise(self, program, teacher, sites, projections, nodes, ctx: PassContext):
        """Stages 1 and 2 in one block-wise sweep over the float teacher."""
        per_layer, per_block = [], []
        by_block: dict[int, list] = {}
        for s in sites:
            by_block.setdefault(s.block, []).append(s)
        for cap in capture(teacher, ctx.calib, sites, qkv=1 in self.stages, device=ctx.device, progress=ctx.progress,
                           desc="distill_ssm stages " + "+".join(str(s) for s in self.stages if s < 3)):
            mine = by_block.get(cap.index, [])
            if 1 in self.stages:
                for s in mine:
                    st = train.stage1(program, cap, s, projections[s.layer], nodes[s.layer], epochs=self.epochs[0],
                                      lr=self.lr[0], device=ctx.device, seed=ctx.seed + s.index)
                    per_layer.append(st)
                    ctx.log.append(f"distill_ssm: stage 1 {s.layer}: ‖T − softmax‖_F {st['stage1_before']:.4g} -> "
                                   f"{st['stage1_after']:.4g}")
            if 2 in self.stages and mine:
                st = train.stage2(program, cap, mine, projections, epochs=self.epochs[1], lr=self.lr[1],
                                  device=ctx.device, seed=ctx.seed + cap.index)
                per_block.append(st)
                ctx.log.append(f"distill_ssm: stage 2 block {cap.index}: block-output MSE {st['stage2_before']:.4g} -> "
                               f"{st['stage2_after']:.4g}")
        return per_layer, per_block


def _summary(rows: list[dict], stage: str, key: str) -> dict:
    n = len(rows)
    return {"loss": "frobenius" if stage == "stage1" else "mse",
            "before": sum(r[f"{stage}_before"] for r in rows) / n, "after": sum(r[f"{stage}_after"] for r in rows) / n,
            "per_" + key: [{key: r[key], "before": round(r[f"{stage}_before"], 6), "after": round(r[f"{stage}_after"], 6)}
                           for r in rows]}
