"""``linearize``: replace softmax attention by learned linear attention (Hedgehog or LoLCATs).

For each chosen layer the ``aten.scaled_dot_product_attention`` node becomes feature-map nodes and one
``lowc::linear_attention`` (see :mod:`lowc.passes.linearize.rewrite` for the graph form,
:mod:`lowc.passes.linearize.maps` for the maps, :mod:`lowc.passes.linearize.train` for training):

* ``method=hedgehog`` (Zhang et al., 2024, "The Hedgehog & the Porcupine"): ``φ(x) = [exp(xW+b),
  exp(−xW−b)]`` per head, separate maps for queries and keys, ``W`` initialised to the identity
  (``feature_dim`` defaults to the head size, so φ has ``2·head_dim`` features), plain causal (prefix
  sums) or bidirectional (global sums) linear attention; maps trained per layer, teacher-forced, with
  the cross-entropy between softmax and linear attention weights.
* ``method=lolcats`` (Zhang et al., 2025, "LoLCATs"): ``φ(x) = [softmax_f(xW), softmax_f(−xW)]``,
  ``W`` of ``head_dim × 64`` per head, separate q/k maps after RoPE; the hybrid of exact softmax
  attention over the last ``window`` (64) keys and linear attention beyond, sharing one denominator,
  with a learned per-head window weight ``sigmoid(factor)`` (factor initialised to −2.1972); step 1
  (attention transfer: MSE ×1000 to the softmax output per head, only maps and factors trainable,
  AdamW lr 1e-2), step 2 (LoRA rank 8, α 16 on q/k/v/o, next-token loss, lr 1e-4) merged into the
  weights. ``window=0`` gives LoLCATs' maps with plain linear attention; ``lora_rank=0`` stops after
  step 1.

Preconditions: calibration data (token samples longer than ``window`` for the linear part to be
trained); causal or bidirectional softmax attention (other masks are refused); LoRA needs the q/k/v/o
projections still in float (run ``linearize`` before quantizing passes). Invariants: the chosen
layers have no softmax attention left, other layers are untouched (hybrid models); padding keys are
excluded through ``key_mask`` (``attention_mask != 0``). A second run finds no softmax attention in
the linearized layers and reports ``changed=False``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import torch

from lowc.errors import PassError
from lowc.ir.analysis import attention_subgraphs
from lowc.passes.base import Pass, PassContext, PassResult, opt
from lowc.passes.blockwise import BlockwiseRunner
from lowc.passes.linearize import maps, rewrite
from lowc.passes.linearize.train import (
    LORA_SCHEDULES,
    SiteData,
    lora_finetune,
    tap_sites,
    transfer,
)

DEFAULT_FEATURE_DIM = {"lolcats": 64}  # hedgehog: the head size
DEFAULT_WINDOW = {"hedgehog": 0, "lolcats": 64}
DEFAULT_LORA_RANK = {"hedgehog": 0, "lolcats": 8}
LORA_LOSSES = ("xent", "distill")


@dataclass(frozen=True)
class Linearize(Pass):
    name = "linearize"
    requires = frozenset({"calibration"})
    summary = "Hedgehog / LoLCATs: learned feature-map linear attention in place of softmax attention"

    method: str = opt("lolcats", "hedgehog (exp feature maps, attention-weight cross-entropy) or lolcats "
                                 "(softmax feature maps, sliding window + linear hybrid, attention-output MSE, then LoRA)")
    layers: tuple[str, ...] = opt((), "layers to linearize: block indices and/or layer names, dotted suffixes or "
                                      "globs (default: all); the others keep softmax attention")
    feature_dim: Optional[int] = opt(None, "output size of the learned map per half (φ has 2x this many features); "
                                           "default: head size (hedgehog), 64 (lolcats)")
    window: Optional[int] = opt(None, "sliding-window size of exact softmax attention (lolcats; 0 = linear "
                                      "attention only); default: 64 (lolcats), 0 (hedgehog)")
    kv_head_maps: bool = opt(False, "grouped-query attention: one key map per key/value head (decode state "
                                    "H/Hk times smaller) instead of one per query head as the papers' code")
    epochs: int = opt(2, "attention-transfer passes over the calibration samples (0 keeps the initial maps)")
    lr: float = opt(1e-2, "AdamW learning rate of attention transfer")
    lora_rank: Optional[int] = opt(None, "LoRA rank of step 2 on q/k/v/o (0 = step 1 only); default: 8 (lolcats), 0 (hedgehog)")
    lora_alpha: float = opt(16.0, "LoRA alpha (adapter scale alpha/rank)")
    lora_lr: float = opt(1e-4, "AdamW learning rate of the LoRA step")
    lora_epochs: int = opt(2, "LoRA passes over the calibration samples")
    lora_batch: int = opt(1, "LoRA samples per AdamW step (stacked into one forward when their lengths agree)")
    lora_schedule: str = opt("constant", "LoRA learning-rate schedule: constant, or cosine (5% linear warmup, then cosine decay to 0)")
    lora_loss: str = opt("xent", "LoRA objective for causal LMs: xent (next-token cross-entropy, the paper's) or "
                                 "distill (KL to the float model's next-token distribution); encoders always "
                                 "distill their last hidden state")

    # ---- effective options --------------------------------------------------------------------------
    @property
    def eff_window(self) -> int:
        return DEFAULT_WINDOW[self.method] if self.window is None else self.window

    @property
    def eff_lora_rank(self) -> int:
        return DEFAULT_LORA_RANK[self.method] if self.lora_rank is None else self.lora_rank

    def eff_feature_dim(self, head_dim: int) -> int:
        if self.feature_dim is not None:
            return self.feature_dim
        return DEFAULT_FEATURE_DIM.get(self.method, head_dim)

    def validate(self) -> None:
        if self.method not in maps.METHODS:
            raise self.fail(f"method={self.method!r}: choose one of {', '.join(maps.METHODS)}")
        if self.feature_dim is not None and self.feature_dim < 1:
            raise self.fail(f"feature_dim={self.feature_dim}: must be positive")
        if self.window is not None and self.window < 0:
            raise self.fail(f"window={self.window}: must be >= 0 (0 = linear attention only)")
        if self.method == "hedgehog" and self.eff_window != 0:
            raise self.fail(f"window={self.window}: hedgehog is plain linear attention (window=0); "
                            "the sliding-window hybrid is method=lolcats")
        if self.epochs < 0:
            raise self.fail(f"epochs={self.epochs}: must be >= 0")
        if not self.lr > 0 or not self.lora_lr > 0:
            raise self.fail(f"lr={self.lr}, lora_lr={self.lora_lr}: learning rates must be positive")
        if self.lora_rank is not None and self.lora_rank < 0:
            raise self.fail(f"lora_rank={self.lora_rank}: must be >= 0 (0 = no LoRA step)")
        if not self.lora_alpha > 0:
            raise self.fail(f"lora_alpha={self.lora_alpha}: must be positive")
        if self.lora_epochs < 1:
            raise self.fail(f"lora_epochs={self.lora_epochs}: must be >= 1")
        if self.lora_batch < 1:
            raise self.fail(f"lora_batch={self.lora_batch}: must be >= 1")
        if self.lora_schedule not in LORA_SCHEDULES:
            raise self.fail(f"lora_schedule={self.lora_schedule!r}: choose one of {', '.join(LORA_SCHEDULES)}")
        if self.lora_loss not in LORA_LOSSES:
            raise self.fail(f"lora_loss={self.lora_loss!r}: choose one of {', '.join(LORA_LOSSES)}")
        rewrite.check_layers(self.layers, self.fail)

    # ---- run ------------------------------------------------------------------------------------------
    def run(self, program, ctx: PassContext) -> PassResult:
        done_before = rewrite.existing_layers(program)
        atts = attention_subgraphs(program)
        if not atts and not done_before:
            raise PassError("pass 'linearize': the model has no softmax attention "
                            "(no aten.scaled_dot_product_attention in its graph) to linearize")
        if not atts:
            return PassResult(changed=False, stats={"linearized": 0, "already": len(done_before)})
        chosen = rewrite.select(atts, tuple(self.layers), done_before)
        if not chosen:
            return PassResult(changed=False, stats={"linearized": 0, "already": len(done_before)})
        sites, padding = rewrite.find_sites(program, chosen)
        window = self.eff_window
        seq = min(int(s.shape[-1]) for s in ctx.calib.samples)
        if self.epochs > 0 and window >= seq:
            raise PassError(f"pass 'linearize': window={window} >= calibration length {seq}: the linear part "
                            "would never be trained; give longer samples (--seq-len) or a smaller window")
        torch.manual_seed(ctx.seed)
        g = torch.Generator().manual_seed(ctx.seed)
        init: dict[str, dict[str, torch.Tensor]] = {}
        for site in sites:
            kh = site.kv_heads if self.kv_head_maps else site.heads
            init[site.sdpa] = maps.init_params(self.method, site.heads, kh, site.head_dim,
                                               self.eff_feature_dim(site.head_dim), window, g)
        teacher = rewrite.shallow_copy(program)
        key_mask = rewrite.key_mask_node(program) if padding else None
        for site in sites:
            rewrite.emit_site(program, site, self.method, window, self.kv_head_maps, init[site.sdpa], key_mask)
        if key_mask is not None and not key_mask.users:
            program.graph.erase_node(key_mask)
        program.gm.recompile()

        t0 = time.perf_counter()
        layer_stats = self._transfer(program, teacher, sites, ctx, init) if self.epochs > 0 else []
        t1 = time.perf_counter()
        stats = {"linearized": len(sites), "method": self.method, "window": window,
                 "feature_dim": 2 * self.eff_feature_dim(sites[0].head_dim), "causal": sites[0].causal,
                 "samples": len(ctx.calib), "transfer_s": round(t1 - t0, 2)}
        if layer_stats:
            n = len(layer_stats)
            stats["attn_mse_before"] = sum(s["mse_before"] for s in layer_stats) / n
            stats["attn_mse_after"] = sum(s["mse_after"] for s in layer_stats) / n
            stats["layers"] = [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in s.items()} for s in layer_stats]
            for s in layer_stats:
                ctx.log.append(f"linearize: {s['layer']}: attention-output MSE {s['mse_before']:.4g} -> "
                               f"{s['mse_after']:.4g} ({s['loss']} {s['loss_before']:.4g} -> {s['loss_after']:.4g})")
        if self.eff_lora_rank > 0:

            lstats = lora_finetune(program, teacher, sites, ctx.calib, rank=self.eff_lora_rank, alpha=self.lora_alpha,
                                   lr=self.lora_lr, epochs=self.lora_epochs, device=ctx.device, seed=ctx.seed,
                                   progress=ctx.progress, objective=self.lora_loss,
                                   batch=self.lora_batch, schedule=self.lora_schedule)
            stats.update(lstats)
            stats["lora_s"] = round(time.perf_counter() - t1, 2)
            ctx.log.append(f"linearize: LoRA rank {self.eff_lora_rank} on {lstats['lora_layers']} projections: "
                           f"{lstats['lora_loss']} {lstats['lora_loss_before']:.4g} -> {lstats['lora_loss_after']:.4g} (merged)")
        del teacher
        program.remove_dead()
        return PassResult(changed=True, stats=stats)

    def _transfer(self, program, teacher, sites, ctx: PassContext, init) -> list[dict]:
        outside = [s.layer for s in sites if s.block is None]
        if outside:
            raise PassError(f"pass 'linearize': layer {outside[0]} lies outside the model's transformer blocks; "
                            "attention transfer runs block by block")
        by_block: dict[int, list] = {}
        for s in sites:
            by_block.setdefault(s.block, []).append(s)
        runner = BlockwiseRunner(teacher, ctx.calib, device=ctx.device, progress=ctx.progress,
                                 desc=f"linearize {self.method}", propagate="float")
        out = []
        try:
            for block in runner:
                mine = by_block.get(block.index, [])
                if not mine:
                    continue
                data = {s.sdpa: SiteData() for s in mine}
                tap_sites(block, [(s, data[s.sdpa]) for s in mine])
                for s in mine:
                    trained, st = transfer(s, data[s.sdpa], self.method, self.eff_window, self.kv_head_maps,
                                           init[s.sdpa], epochs=self.epochs, lr=self.lr, device=ctx.device,
                                           seed=ctx.seed + s.index,
                                           on_step=lambda loss: runner.set_postfix(loss=f"{loss:.4g}"))
                    for name, t in trained.items():
                        target = f"{s.layer}.{name}"
                        old = program.attr(target)
                        program.replace_attr(target, t.to(device=old.device, dtype=old.dtype))
                    runner.set_postfix(loss=f"{st['loss_after']:.4g}", mse=f"{st['mse_after']:.3g}")
                    out.append(st)
                del data
        finally:
            runner.close()
        return out
