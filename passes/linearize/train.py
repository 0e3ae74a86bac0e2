"""Training for the ``linearize`` pass: attention transfer (step 1) and low-rank adjustment (step 2).

**Attention transfer** runs the *float teacher* (an unmodified copy of the program's graph over the
same weights) block by block over the calibration samples (:class:`lowc.passes.blockwise.BlockwiseRunner`),
so every layer sees the inputs the frozen float model gives it (teacher forcing), and taps, per
linearized layer, the queries and keys after RoPE, the values and the softmax attention output
(per head, before ``o_proj``). Only the layer's feature maps (and LoLCATs' window factors) are trained,
with AdamW (no weight decay), one sample per step, ``epochs`` passes over the samples in a seeded
random order:

* Hedgehog: cross-entropy between the softmax attention weights and the row-normalised linear
  attention weights, ``−Σ_j a_ij log â_ij`` averaged over heads and queries (the reference clamps
  ``â`` at 1e-12 before the log);
* LoLCATs: mean squared error between the (hybrid) linearized attention output and the softmax
  output, per head, scaled by 1000 as the reference ``mse_factor``.

The differentiable forward is :func:`lowc.passes.linearize.maps.linearized_attention` with the op
itself (differentiable, chunked), i.e. exactly what the graph computes. Each layer's attention-output MSE
to softmax attention is measured on the samples before and after training.

**Low-rank adjustment** (LoLCATs step 2): LoRA adapters ``W + (α/r)·B·A`` (``A`` Kaiming-uniform as
PEFT, ``B`` zero) on the q/k/v/o projections of the linearized layers, everything else frozen,
trained end to end through the rewritten graph (an FX interpreter adding the adapters) with AdamW.
Loss: next-token cross-entropy on the calibration samples for causal LMs (``lora_loss=xent``, as the
paper), or ``lora_loss=distill``: KL(float || linearized) of the next-token distributions, the float
model as teacher (more signal per token when the data budget is small); for encoders, which have no
next-token objective, the mean squared error between the last hidden state and the float model's
(self-distillation). The adapters are then merged into the weights, so no extra op remains.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lowc.errors import PassError
from lowc.frontend.outputs import main_tensor
from lowc.ir.analysis import is_float_linear
from lowc.ir.dialect import ensure_registered
from lowc.ir.dialect.args import LinearArgs
from lowc.passes.blockwise import calibration_inputs
from lowc.passes.linearize import maps
from lowc.passes.linearize.rewrite import Site, key_heads_for_maps

MSE_FACTOR = 1000.0


def _op():
    """``lowc::linear_attention`` itself: its registered (chunked, O(L)-memory) implementation is
    differentiable, so training runs exactly what the graph runs."""

    ensure_registered()
    return torch.ops.lowc.linear_attention.default


def _full_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


def softmax_weights(q: torch.Tensor, k: torch.Tensor, scale: float, causal: bool) -> torch.Tensor:
    s = torch.einsum("bhid,bhjd->bhij", q, _full_heads(k, q.shape[1])) * scale
    if causal:
        L = s.shape[-1]
        s = s.masked_fill(~torch.ones(L, L, dtype=torch.bool, device=s.device).tril(), float("-inf"))
    return torch.softmax(s, dim=-1)


def linear_weights(fq: torch.Tensor, fk: torch.Tensor, causal: bool) -> torch.Tensor:
    a = torch.einsum("bhif,bhjf->bhij", fq, _full_heads(fk, fq.shape[1]))
    if causal:
        L = a.shape[-1]
        a = a.masked_fill(~torch.ones(L, L, dtype=torch.bool, device=a.device).tril(), 0.0)
    return a / a.sum(-1, keepdim=True).clamp_min(maps.EPS)


class SiteData:
    """One layer's tapped teacher tensors, per sample: q, k, v (before repeat_kv when the graph has it,
    else as SDPA read them) and y (SDPA's output)."""

    def __init__(self):
        self.q: list[torch.Tensor] = []
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.y: list[torch.Tensor] = []

    def __len__(self) -> int:
        return len(self.y)


def tap_sites(block, taps) -> None:
    """Run ``block`` over its calibration samples, appending to each ``(site, record)`` of ``taps`` the
    teacher tensors per sample: ``record.q`` (SDPA's query input), ``record.y`` (SDPA's output),
    ``record.k``/``record.v`` (before repeat_kv when the graph has it: less memory for GQA). Records
    are any objects with those four lists (:class:`SiteData`, the distillation hooks' captures)."""
    role: dict[str, list] = {}
    for site, rec in taps:
        role.setdefault(site.sdpa, []).append((rec, "qy"))
        role.setdefault(site.k_kv or site.k, []).append((rec, "k"))
        role.setdefault(site.v_kv or site.v, []).append((rec, "v"))

    def hook(name, x, y):
        for rec, what in role[name]:
            if what == "qy":
                rec.q.append(x.detach())
                rec.y.append(y.detach())
            else:
                getattr(rec, what).append(y.detach())

    if role:
        block.run(hook, nodes=list(role))


def transfer(site: Site, data: SiteData, method: str, window: int, kv_head_maps: bool,
             params: dict[str, torch.Tensor], *, epochs: int, lr: float, device, seed: int,
             on_step: Callable[[float], None] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Attention transfer for one layer; returns the trained fp32 parameters and before/after numbers."""
    op = _op()
    p = {k: v.detach().to(device=device, dtype=torch.float32).clone().requires_grad_(True) for k, v in params.items()}

    def sample(i):
        q = data.q[i].to(device=device, dtype=torch.float32)
        k = data.k[i].to(device=device, dtype=torch.float32)
        v = data.v[i].to(device=device, dtype=torch.float32)
        y = data.y[i].to(device=device, dtype=torch.float32)
        return q, k, v, y

    def forward(q, k, v):
        kf, vf = key_heads_for_maps(k, k.shape[1], site, kv_head_maps), key_heads_for_maps(v, v.shape[1], site, kv_head_maps)
        return maps.linearized_attention(method, q, kf, vf, p, None, causal=site.causal, window=window,
                                         scale=site.scale, op=op), kf

    def loss_of(q, k, v, y):
        out, kf = forward(q, k, v)
        if method == "hedgehog":
            fq, fk = maps.feature_map(method, q, p, "q"), maps.feature_map(method, kf, p, "k")
            with torch.no_grad():
                target = softmax_weights(q, k, site.scale, site.causal)
            pred = linear_weights(fq, fk, site.causal)
            return -(target * pred.clamp_min(maps.EPS).log()).sum(-1).mean(), out
        return F.mse_loss(out, y) * MSE_FACTOR, out

    def evaluate() -> tuple[float, float]:
        mse = tl = 0.0
        with torch.no_grad():
            for i in range(len(data)):
                q, k, v, y = sample(i)
                loss, out = loss_of(q, k, v, y)
                mse += F.mse_loss(out, y).item()
                tl += loss.item()
        return mse / len(data), tl / len(data)

    mse0, loss0 = evaluate()
    opt = torch.optim.AdamW(list(p.values()), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    last = loss0
    for _ in range(epochs):
        for i in torch.randperm(len(data), generator=g).tolist():
            q, k, v, y = sample(i)
            loss, _ = loss_of(q, k, v, y)
            if not torch.isfinite(loss):
                raise PassError(f"pass 'linearize': layer {site.layer}: the attention-transfer loss became "
                                f"{loss.item()} (try a lower lr)")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            last = loss.item()
            if on_step is not None:
                on_step(last)
    mse1, loss1 = evaluate()
    trained = {k: v.detach() for k, v in p.items()}
    stats = {"layer": site.layer, "mse_before": mse0, "mse_after": mse1,
             "loss": "xent" if method == "hedgehog" else "mse_x1000", "loss_before": loss0, "loss_after": loss1}
    if "window_factor" in trained:
        stats["window_weight"] = torch.sigmoid(trained["window_factor"]).mean().item()
    return trained, stats


# ---- step 2: LoRA ----------------------------------------------------------------------------------
class _TrainInterpreter(torch.fx.Interpreter):
    """Runs the program's graph with autograd: parameters are read detached (frozen) and the LoRA
    adapters are added to chosen linears (``lowc::linear_attention`` is differentiable itself)."""

    def __init__(self, gm, adapters: dict[str, tuple[torch.Tensor, torch.Tensor, float]]):
        super().__init__(gm)
        self.adapters = adapters

    def get_attr(self, target, args, kwargs):
        v = super().get_attr(target, args, kwargs)
        return v.detach() if isinstance(v, torch.Tensor) else v

    def run_node(self, n):
        out = super().run_node(n)
        ad = self.adapters.get(n.name)
        if ad is not None:
            a, b, s = ad
            x = self.env[n.args[0]]
            out = out + F.linear(F.linear(x.to(a.dtype), a), b).to(out.dtype) * s
        return out


def lora_targets(program, sites: list[Site]) -> list[torch.fx.Node]:
    by_name = {n.name: n for n in program.graph.nodes}
    out = []
    for site in sites:
        for name in site.linears:
            n = by_name.get(name)
            if n is None:
                continue
            if not is_float_linear(n):
                raise PassError(f"pass 'linearize': layer {site.layer}: LoRA needs float linears, but %{name} is "
                                f"{getattr(n.target, '__name__', n.target)}: run linearize before quantizing passes "
                                "(or set lora_rank=0)")
            out.append(n)
    return out


LORA_SCHEDULES = ("constant", "cosine")
STATS_SAMPLES = 64  # samples the LoRA loss before/after is reported on (the first ones)


def _lr_factor(schedule: str, step: int, total: int) -> float:
    """Learning-rate multiplier before optimizer step ``step`` (0-based) of ``total``: ``constant``, or
    ``cosine`` (linear warmup over the first 5% of the steps, then cosine decay to 0)."""
    if schedule == "constant":
        return 1.0
    warm = max(1, round(0.05 * total))
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def lora_finetune(program, teacher, sites: list[Site], calib, *, rank: int, alpha: float, lr: float, epochs: int,
                  device, seed: int, progress: bool, objective: str = "xent", batch: int = 1,
                  schedule: str = "constant", on_step: Callable | None = None) -> dict[str, Any]:
    """LoRA on the linearized layers' projections, merged into the weights afterwards. ``objective``: for
    causal LMs ``xent`` (next-token cross-entropy, the paper's) or ``distill`` (KL(float || linearized)
    of the next-token distributions, the float model as teacher); encoders always distill their last
    hidden state (MSE). ``batch`` samples per AdamW step (one forward over the stacked samples when
    they have the same length, else gradient accumulation; the loss is their mean), ``epochs`` passes in
    a seeded random order, learning rate ``lr`` times :func:`_lr_factor` of ``schedule``.
    ``on_step(step, total, loss, lr, logits_of)``, if given, is called after every optimizer step
    (``logits_of(input_ids)`` runs the model with the current adapters, without gradients: for curves)."""


    if schedule not in LORA_SCHEDULES:
        raise PassError(f"pass 'linearize': lora_schedule={schedule!r}: choose one of {', '.join(LORA_SCHEDULES)}")
    targets = lora_targets(program, sites)
    if not targets:
        raise PassError("pass 'linearize': no q/k/v/o projections found for LoRA in the linearized layers")
    g = torch.Generator().manual_seed(seed)
    scale = alpha / rank
    adapters: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    for n in targets:
        w = program.attr(LinearArgs.of(n).weight.target)
        out_f, in_f = w.shape
        bound = 1.0 / math.sqrt(in_f)  # kaiming_uniform_(a=sqrt(5)) on [r, in], as PEFT
        a = (torch.rand(rank, in_f, generator=g) * 2 - 1).mul_(bound).to(device).requires_grad_(True)
        b = torch.zeros(out_f, rank, device=device, requires_grad=True)
        adapters[n.name] = (a, b, scale)
    interp = _TrainInterpreter(program.gm, adapters)
    causal = program.info.kind == "causal-lm"
    samples = [s.to(device) for s in calib.samples]

    def inputs_of(ids: torch.Tensor) -> list[torch.Tensor]:
        return [t.to(device) for t in calibration_inputs(program, ids)]

    def loss_on(ids: torch.Tensor) -> torch.Tensor:
        """Mean loss over a [b, L] stack of samples."""
        x = inputs_of(ids)
        out = main_tensor(interp.run(*x)).float()
        with torch.no_grad():
            ref = main_tensor(teacher.gm(*x)).float() if not causal or objective == "distill" else None
        if causal and objective == "distill":
            ref = torch.log_softmax(ref, -1)
            return (ref.exp() * (ref - torch.log_softmax(out, -1))).sum(-1).mean()
        if causal:
            return F.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]), ids[:, 1:].reshape(-1))
        return F.mse_loss(out, ref)

    def chunk_loss(idx: list[int]) -> float:
        """Forward + backward of one optimizer step's samples (stacked when their lengths agree)."""
        groups: dict[int, list[int]] = {}
        for i in idx:
            groups.setdefault(int(samples[i].shape[-1]), []).append(i)
        total = 0.0
        for members in groups.values():
            ids = torch.cat([samples[i] for i in members], 0)
            loss = loss_on(ids)
            if not torch.isfinite(loss):
                raise PassError(f"pass 'linearize': the LoRA loss became {loss.item()} (try a lower lora_lr)")
            w = ids.shape[0] / len(idx)
            (loss * w).backward()
            total += loss.item() * w
        return total

    def evaluate() -> float:
        n = min(len(samples), STATS_SAMPLES)
        with torch.no_grad():
            return sum(loss_on(samples[i]).item() for i in range(n)) / n

    def logits_of(ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return main_tensor(interp.run(*inputs_of(ids.to(device)))).float()

    before = evaluate()
    params = [t for a, b, _ in adapters.values() for t in (a, b)]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    batch = max(1, min(batch, len(samples)))
    per_epoch = math.ceil(len(samples) / batch)
    total_steps = epochs * per_epoch
    bar = tqdm(total=total_steps, desc="linearize lora", unit="step", disable=not progress)
    step = 0
    try:
        for _ in range(epochs):
            order = torch.randperm(len(samples), generator=g).tolist()
            for c in range(per_epoch):
                for group in opt.param_groups:
                    group["lr"] = lr * _lr_factor(schedule, step, total_steps)
                opt.zero_grad(set_to_none=True)
                loss = chunk_loss(order[c * batch:(c + 1) * batch])
                opt.step()
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4g}")
                if on_step is not None:
                    on_step(step, total_steps, loss, opt.param_groups[0]["lr"], logits_of)
    finally:
        bar.close()
    after = evaluate()
    with torch.no_grad():
        for n in targets:
            a, b, s = adapters[n.name]
            t = LinearArgs.of(n).weight.target
            w = program.attr(t)
            program.replace_attr(t, (w.detach().float() + s * (b @ a).to(w.device)).to(w.dtype))
    name = ("next-token xent" if objective == "xent" else "KL to float") if causal else "hidden-state mse"
    return {"lora_layers": len(targets), "lora_loss": name, "lora_steps": total_steps,
            "lora_tokens": epochs * sum(int(s.numel()) for s in samples),
            "lora_loss_before": before, "lora_loss_after": after}
