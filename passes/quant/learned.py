"""Shared machinery of the learned-transform quantization passes (``affinequant``, ``flatquant``):
differentiable fake quantization, learnable clipping, and a block trainer on top of
:class:`lowc.passes.blockwise.BlockwiseRunner`.

* :class:`WeightFakeQuant` - fake quantization of an ``[N, K]`` weight with a straight-through
  rounding estimator, in exactly the conventions of :mod:`lowc.ir.dialect.quant` (groups along K,
  zero-padding to the group size, asymmetric min/max widened to include 0 with an integer zero point,
  symmetric ``scale = 2·absmax/(2^b−1)`` with the fixed zero point ``2^(b−1)``), optionally with
  learnable weight clipping (OmniQuant's LWC: the group's max and min are multiplied by
  ``sigmoid(γ)``, ``sigmoid(β)``, logits initialised to 4.0, so ``sigmoid ≈ 0.982``), one pair of
  logits per (row, group) or per row. :meth:`WeightFakeQuant.quantize` packs the codes the forward
  pass rounds to (same scale, zero and rounding), so ``lowc::linear_wq`` computes with exactly the
  weight the block was trained with.
* :func:`fake_quant_act` - per-token symmetric activation quantization (STE), as
  ``quant.fake_quantize_per_token`` / ``lowc::linear_wqaq`` compute it; :func:`clip_tokens` is the
  learned activation clipping of ``lowc::kron_transform``.
* :class:`QLinear` - a linear whose input passes an optional (learnable) transform and activation
  fake-quant, and whose weight passes an optional transform and weight fake-quant.
* :func:`patch_linears` - swap ``aten.linear`` nodes of a block's GraphModule copy
  (``block.module()``) for such modules; the program's graph is untouched.
* :func:`train_block` - AdamW over the transform/clipping parameters only (the block's parameters stay
  frozen), MSE between the float block's outputs and the patched block's, mini-batches of samples,
  optional cosine schedule and ``loss / loss.detach()`` normalisation (FlatQuant), an epoch callback
  (AffineQuant's gradual mask), the loss on the runner's progress bar, deterministic order.
* what the passes share around it: :class:`LearnedQuantPass` (their base: calibration required, the
  training options checked), :func:`block_qlinears`/:func:`qlinear` (a block's linears as
  :class:`QLinear` with their transforms), :func:`param_groups`, :func:`fold_into_norm`, and the
  block-by-block driver :func:`run_blockwise` with its :class:`BlockPlan`.

Preconditions: the block's inputs are the per-sample tuples the runner stores (batch 1 each);
samples of one mini-batch are accumulated (their losses averaged before one optimizer step, which
is the gradient of the batched loss).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable, Sequence

import torch
import torch.fx
import torch.nn.functional as F

from lowc.errors import CalibrationError
from lowc.ir.dialect import quant
from lowc.passes.quant.common import WeightQuantPass

LWC_INIT = 4.0


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest in the forward pass, identity in the backward pass."""
    return (x.round() - x).detach() + x


# ---- weights -------------------------------------------------------------------------------------
class WeightFakeQuant(torch.nn.Module):
    """Fake quantization of one ``[N, K]`` weight in lowc's packed-layout conventions.

    ``lwc``: ``None`` (plain min/max), ``"group"`` (one clipping pair per row and group, OmniQuant)
    or ``"channel"`` (one pair per row, FlatQuant)."""

    def __init__(self, shape: Sequence[int], bits: int, group_size: int, symmetric: bool, lwc: str | None = None,
                 init: float = LWC_INIT, device: str | torch.device = "cpu"):
        super().__init__()
        if lwc not in (None, "group", "channel"):
            raise ValueError(f"lwc={lwc!r}: choose None, 'group' or 'channel'")
        n, k = int(shape[0]), int(shape[1])
        self.n, self.k = n, k
        self.bits, self.symmetric, self.lwc = bits, symmetric, lwc
        self.gs, self.k_pad = quant.padded_in_features(k, group_size)
        self.n_groups = self.k_pad // self.gs
        self.maxq = (1 << bits) - 1
        if lwc is not None:
            cols = self.n_groups if lwc == "group" else 1
            self.up = torch.nn.Parameter(torch.full((n, cols), float(init), device=device))
            self.low = torch.nn.Parameter(torch.full((n, cols), float(init), device=device))

    def _groups(self, w: torch.Tensor) -> torch.Tensor:
        w = w.float()
        if self.k_pad != self.k:
            w = F.pad(w, (0, self.k_pad - self.k))
        return w.reshape(self.n, self.n_groups, self.gs)

    def qparams(self, wg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero ``[N, G]`` (fp32) of grouped weights ``[N, G, gs]``; differentiable in the
        scale (the zero point is rounded without a gradient, as OmniQuant does)."""
        xmax = wg.amax(dim=-1).clamp(min=0)
        xmin = wg.amin(dim=-1).clamp(max=0)
        if self.lwc is not None:
            xmax = xmax * torch.sigmoid(self.up)
            xmin = xmin * torch.sigmoid(self.low)
        if self.symmetric:
            scale = 2 * torch.maximum(-xmin, xmax) / self.maxq
            zero = torch.full_like(scale, float((self.maxq + 1) // 2))
        else:
            scale = (xmax - xmin) / self.maxq
            safe = torch.where(scale > 0, scale, torch.ones_like(scale))
            zero = torch.round(-xmin / safe).detach()
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return scale, zero

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        wg = self._groups(w)
        scale, zero = self.qparams(wg)
        scale, zero = scale[..., None], zero[..., None]
        q = torch.clamp(round_ste(wg / scale) + zero, 0, self.maxq)
        return ((q - zero) * scale).reshape(self.n, self.k_pad)[:, : self.k].to(w.dtype)

    @torch.no_grad()
    def quantize(self, w: torch.Tensor, dtype: torch.dtype | None = None) -> quant.QuantizedWeight:
        """The packed weight whose dequantization equals :meth:`forward` (codes, scale, zero)."""
        wg = self._groups(w)
        scale, zero = self.qparams(wg)
        codes = quant.quantize_codes(wg, scale[..., None], zero[..., None], self.bits).reshape(self.n, self.k_pad)
        return quant.from_codes(codes, scale, zero, self.bits, self.gs, self.k, self.symmetric, dtype or w.dtype)

    @torch.no_grad()
    def clip_weight(self, w: torch.Tensor) -> torch.Tensor:
        """``w`` clamped, group by group, to the learned clipping range (what a quantizer that sets
        its range from min/max, such as GPTQ's, must see to honour the learned clipping)."""
        if self.lwc is None:
            return w
        wg = self._groups(w)
        hi = wg.amax(dim=-1).clamp(min=0) * torch.sigmoid(self.up)
        lo = wg.amin(dim=-1).clamp(max=0) * torch.sigmoid(self.low)
        out = torch.minimum(torch.maximum(wg, lo[..., None]), hi[..., None])
        return out.reshape(self.n, self.k_pad)[:, : self.k].to(w.dtype)

    def clip_parameters(self) -> list[torch.nn.Parameter]:
        return [self.up, self.low] if self.lwc is not None else []


# ---- activations ---------------------------------------------------------------------------------
def clip_tokens(x: torch.Tensor, ratio: torch.Tensor | float | None) -> torch.Tensor:
    """Clamp each token (last dim) to ``±ratio·max|x_token|`` (``lowc::kron_transform``'s ``clip``)."""
    if ratio is None:
        return x
    bound = x.abs().amax(dim=-1, keepdim=True) * ratio
    return torch.minimum(torch.maximum(x, -bound), bound)


def fake_quant_act(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-token (last dim) symmetric dynamic quantization with STE rounding, as
    :func:`lowc.ir.dialect.quant.fake_quantize_per_token` computes it (fp32)."""
    qmax = (1 << (bits - 1)) - 1
    xf = x.float()
    s = xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / qmax
    return (torch.clamp(round_ste(xf / s), -qmax - 1, qmax) * s).to(x.dtype)


# ---- linears -------------------------------------------------------------------------------------
class QLinear(torch.nn.Module):
    """``y = fq_a(in_fn(x)) · fq_w(weight_fn(W))ᵀ + bias_fn(b)`` computed in fp32 (cast back to x's
    dtype). ``W``/``b`` are the block's frozen tensors; the callables read shared transform objects
    whose parameters are the ones trained."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, wq: WeightFakeQuant | None, act_bits: int = 16,
                 in_fn: Callable | None = None, weight_fn: Callable | None = None, bias_fn: Callable | None = None):
        super().__init__()
        self.weight = weight.detach()
        self.bias = None if bias is None else bias.detach()
        self.wq = wq
        self.act_bits = act_bits
        self.in_fn, self.weight_fn, self.bias_fn = in_fn, weight_fn, bias_fn
        self.caching = False  # train_block turns it on inside a step
        self._cache = None
        self.tap: Callable | None = None  # tap(x): sees the input the quantized weight multiplies

    def effective_weight(self) -> torch.Tensor:
        w = self.weight.float()
        return self.weight_fn(w) if self.weight_fn is not None else w

    def effective_bias(self) -> torch.Tensor | None:
        if self.bias is None:
            return None
        b = self.bias.float()
        return self.bias_fn(b) if self.bias_fn is not None else b

    def begin_step(self) -> None:
        """Forget the cached weight: the transforms changed (called by :func:`train_block` before
        each optimizer step, so the samples of one step share one weight computation)."""
        self._cache = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        if self.in_fn is not None:
            x = self.in_fn(x)
        if self.act_bits < 16:
            x = fake_quant_act(x, self.act_bits)
        if self.tap is not None:
            self.tap(x)
        cache = getattr(self, "_cache", None)
        if cache is None:
            w = self.effective_weight()
            if self.wq is not None:
                w = self.wq(w)
            cache = (w, self.effective_bias())
            if self.caching:
                self._cache = cache
        return F.linear(x, cache[0], cache[1]).to(dtype)


def patch_linears(gm: torch.fx.GraphModule, modules: dict[str, torch.nn.Module]) -> torch.fx.GraphModule:
    """Replace the ``aten.linear`` nodes of a block copy (keys: node names in the *program's* graph,
    mapped through ``gm.source_names``) by calls of the given modules on the linear's input."""
    by_name = {n.name: n for n in gm.graph.nodes}
    for i, (prog_name, mod) in enumerate(modules.items()):
        node = by_name[gm.source_names[prog_name]]
        sub = f"lowc_learned_{i}"
        gm.add_submodule(sub, mod)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(sub, (node.args[0],))
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


class _Tap(torch.fx.Interpreter):
    def __init__(self, gm, taps: dict[str, str], hook):
        super().__init__(gm)
        self.taps, self.hook = taps, hook

    def run_node(self, n):
        out = super().run_node(n)
        if n.name in self.taps:
            self.hook(self.taps[n.name], self.env[n.args[0]])
        return out


@torch.no_grad()
def input_absmax(gm: torch.fx.GraphModule, names: Iterable[str], inputs: Sequence[tuple], device, where: str) -> dict[str, torch.Tensor]:
    """Per-channel ``max |x|`` of the inputs of the linears ``names`` (program node names) of a block
    copy over every sample (fp32, on CPU). Raises CalibrationError on non-finite activations."""
    taps = {gm.source_names[n]: n for n in names}
    out: dict[str, torch.Tensor] = {}

    def hook(name, x):
        x = x.detach().reshape(-1, x.shape[-1]).abs().float()
        if not torch.isfinite(x).all():
            raise CalibrationError(f"{where}: non-finite activations reach {name} in calibration")
        m = x.amax(dim=0).cpu()
        out[name] = torch.maximum(out[name], m) if name in out else m

    tap = _Tap(gm, taps, hook)
    for sample in inputs:
        tap.run(*[v.to(device) if isinstance(v, torch.Tensor) else v for v in sample])
    return out


def check_finite(values: Sequence[tuple], where: str, streams: Sequence[tuple] = ()) -> None:
    """Raise CalibrationError if a block input holds NaN, or a hidden-state input (one shaped like a
    tensor of ``streams``, e.g. the block's outputs) holds ±inf. Additive attention masks may hold
    -inf legitimately, so infinities elsewhere are allowed."""
    shapes = {tuple(v.shape) for s in streams for v in s if isinstance(v, torch.Tensor)}
    for sample in values:
        for v in sample:
            if not (isinstance(v, torch.Tensor) and v.is_floating_point()):
                continue
            bad = torch.isnan(v).any() or (tuple(v.shape) in shapes and torch.isinf(v).any())
            if bad:
                raise CalibrationError(f"{where}: non-finite (NaN/inf) activations in calibration")


# ---- training ------------------------------------------------------------------------------------
def _to(sample: tuple, device) -> list:
    return [v.to(device) if isinstance(v, torch.Tensor) else v for v in sample]


def _mse(out: Any, target: tuple) -> torch.Tensor:
    outs = out if isinstance(out, (tuple, list)) else (out,)
    terms = [F.mse_loss(o.float(), t.float()) for o, t in zip(outs, target)
             if isinstance(o, torch.Tensor) and o.is_floating_point()]
    return sum(terms) / len(terms)


def block_loss(gm: torch.fx.GraphModule, inputs: Sequence[tuple], targets: Sequence[tuple], device,
               refresh: Callable[[], None] | None = None) -> float:
    """Mean MSE of ``gm`` over every sample (no gradient)."""
    total = 0.0
    with torch.no_grad():
        if refresh is not None:
            refresh()
        with cached_weights(gm):
            for x, t in zip(inputs, targets):
                total += float(_mse(gm(*_to(x, device)), _to(t, device)))
    return total / max(len(inputs), 1)


class cached_weights:
    """Within the block, every :class:`QLinear` computes its (transformed, fake-quantized) weight
    once and reuses it for every sample (one optimizer step, or an evaluation pass)."""

    def __init__(self, gm: torch.nn.Module):
        self.qlinears = [m for m in gm.modules() if isinstance(m, QLinear)]

    def __enter__(self):
        for m in self.qlinears:
            m.begin_step()
            m.caching = True
        return self

    def __exit__(self, *exc):
        for m in self.qlinears:
            m.caching = False
            m.begin_step()
        return False


def train_block(gm: torch.fx.GraphModule, param_groups: list[dict], inputs: Sequence[tuple], targets: Sequence[tuple],
                *, epochs: int, batch_size: int, device, refresh: Callable[[], None] | None = None,
                on_epoch: Callable[[int], None] | None = None, extra_targets: Sequence[tuple] | None = None,
                normalize: bool = False, cosine: bool = False, weight_decay: float = 0.0,
                postfix: Callable[[float], None] | None = None, where: str = "block") -> dict[str, float]:
    """Train ``param_groups`` (AdamW; every other tensor of ``gm`` is frozen) to minimise the MSE
    between ``gm(inputs[j])`` and ``targets[j]`` (plus ``extra_targets[j]`` when given: AffineQuant's
    augmented loss). ``refresh()`` recomputes the transforms from their parameters before each
    forward; ``on_epoch(e)`` runs at the start of epoch ``e``. Returns the initial and final loss."""
    params = [p for g in param_groups for p in g["params"]]
    if not params or epochs <= 0:
        loss = block_loss(gm, inputs, targets, device, refresh)
        return {"loss_init": loss, "loss": loss, "steps": 0}
    frozen = [(t, t.requires_grad) for t in list(gm.parameters()) + list(gm.buffers()) if all(t is not p for p in params)]
    for t, _ in frozen:
        t.requires_grad_(False)
    n = len(inputs)
    bs = max(1, min(batch_size, n))
    steps_per_epoch = (n + bs - 1) // bs
    opt = torch.optim.AdamW(param_groups, weight_decay=weight_decay)
    sched = None
    if cosine:
        base = [g["lr"] for g in opt.param_groups]
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch, eta_min=min(base) * 1e-3)
    if on_epoch is not None:
        on_epoch(0)
    first = block_loss(gm, inputs, targets, device, refresh)
    last = first
    try:
        for epoch in range(epochs):
            if on_epoch is not None and epoch > 0:
                on_epoch(epoch)
            total = 0.0
            for start in range(0, n, bs):
                idx = range(start, min(start + bs, n))
                with torch.enable_grad(), cached_weights(gm):
                    if refresh is not None:
                        refresh()
                    losses = []
                    for j in idx:
                        out = gm(*_to(inputs[j], device))
                        l = _mse(out, _to(targets[j], device))
                        if extra_targets is not None:
                            l = l + _mse(out, _to(extra_targets[j], device))
                        losses.append(l)
                    loss = torch.stack(losses).mean()
                    if not torch.isfinite(loss):
                        raise CalibrationError(f"{where}: the training loss became {float(loss)} in epoch {epoch + 1}: "
                                               "lower lr or check the calibration data")
                    total += float(loss.detach()) * len(idx)
                    opt.zero_grad(set_to_none=True)
                    (loss / loss.detach() if normalize else loss).backward()
                opt.step()
                if sched is not None:
                    sched.step()
            last = total / n
            if postfix is not None:
                postfix(last)
    finally:
        for t, flag in frozen:
            t.requires_grad_(flag)
    final = block_loss(gm, inputs, targets, device, refresh)
    return {"loss_init": first, "loss_train": last, "loss": final, "steps": epochs * steps_per_epoch}


# ---- transform helpers ---------------------------------------------------------------------------
def smooth_scales(act_absmax: torch.Tensor, weights: Sequence[torch.Tensor], alpha: float) -> torch.Tensor:
    """SmoothQuant's ``s_j = max|X_j|^α / max|W_j|^(1−α)`` over the linears sharing the input (fp32,
    clamped to 1e-5 as the papers do)."""
    w_max = torch.stack([w.detach().abs().float().amax(dim=0).cpu() for w in weights]).amax(dim=0)
    a = act_absmax.float().clamp(min=1e-5)
    return (a.pow(alpha) / w_max.clamp(min=1e-5).pow(1 - alpha)).clamp(min=1e-5)


def balanced_factors(n: int) -> tuple[int, int]:
    """``(n1, n2)`` with ``n1·n2 = n``, ``n1 <= n2`` and ``n1`` the largest divisor ``<= sqrt(n)``
    (FlatQuant's most balanced Kronecker factorisation: 4096 -> 64x64, 11008 -> 86x128)."""
    n1 = int(math.isqrt(n))
    while n % n1:
        n1 -= 1
    return n1, n // n1


def cayley(raw: torch.Tensor) -> torch.Tensor:
    """An orthogonal matrix from an unconstrained square one: ``A = tril(raw, -1) − tril(raw, -1)ᵀ``
    (skew-symmetric), ``Q = (I − A/2)⁻¹(I + A/2)`` (the Cayley map ``torch.nn.utils.parametrizations
    .orthogonal`` uses)."""
    low = torch.tril(raw, -1)
    a = low - low.transpose(0, 1)
    eye = torch.eye(raw.shape[0], dtype=raw.dtype, device=raw.device)
    return torch.linalg.solve(eye - a / 2, eye + a / 2)


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-random orthogonal matrix (QR of a Gaussian with the signs of R's diagonal fixed)."""
    h = torch.randn(n, n, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(h)
    return (q * torch.sign(torch.diagonal(r)).unsqueeze(0)).float()


# ---- block structure -----------------------------------------------------------------------------
class Group:
    """Linears of one block sharing an input, as a learned-transform pass sees them.

    ``kind``: ``"norm"`` (the input is an RMSNorm/LayerNorm output: q/k/v, gate/up, BERT's
    intermediate), ``"o"`` (the attention output projection, with ``v`` the value projection whose
    output heads feed it) or ``"other"`` (down_proj, BERT's output.dense, ...). ``norm_foldable``: a
    per-channel scale of the input can be folded into the norm's weight (and bias) exactly, because
    the norm output feeds nothing but these linears (false for post-norm BERT, where it is also the
    residual). ``up``: for an input ``f(gate) * up`` (SwiGLU), the linear whose output rows may absorb
    a per-channel scale of the input exactly."""

    def __init__(self, kind, linears, input, link=None, norm_foldable=False, up=None, attn=None, v=None):
        self.kind, self.linears, self.input = kind, list(linears), input
        self.link, self.norm_foldable, self.up = link, norm_foldable, up
        self.attn, self.v = attn, v

    def __repr__(self) -> str:
        from lowc.ir.analysis import linear_layer

        return f"Group({self.kind}, {[linear_layer(n) for n in self.linears]})"


def _const_linear(node: torch.fx.Node) -> bool:
    from lowc.ir.program import LINEAR

    return (node.op == "call_function" and node.target == LINEAR and isinstance(node.args[1], torch.fx.Node)
            and node.args[1].op == "get_attr")


def block_groups(program, index: int) -> list[Group]:
    """The linear groups of transformer block ``index`` whose linears are all still float
    ``aten.linear`` with constant weights (groups already quantized are left out)."""
    from lowc.ir import analysis as A
    from lowc.passes.quant.smoothquant import SmoothQuant

    groups = [g for g in A.shared_input_groups(program) if g.block == index and all(_const_linear(n) for n in g.linears)]
    links = A.norm_before_linears(program, groups, include_unnormalized=True)
    attns = [a for a in A.attention_subgraphs(program) if a.block == index]
    where = A.node_blocks(program)
    out = []
    for link in links:
        lins = list(link.group.linears)
        src = link.group.input
        attn = next((a for a in attns if a.o is not None and lins == [a.o]), None)
        if attn is not None and attn.v is not None and attn.v not in (attn.q, attn.k) and _const_linear(attn.v) \
                and attn.num_heads and attn.num_kv_heads and attn.head_dim \
                and A.only_reaches(attn.v, {attn.sdpa}, lambda u: A._op(u) in A._LAYOUT):
            out.append(Group("o", lins, src, attn=attn, v=attn.v))
            continue
        if link.kind is not None:
            foldable = link.weight is not None and SmoothQuant._only_feeds(link.norm, lins)
            out.append(Group("norm", lins, src, link=link, norm_foldable=foldable))
            continue
        up = None
        if A._op(src) == "aten.mul" and len(src.args) == 2:
            for a in src.args:
                if not isinstance(a, torch.fx.Node):
                    continue
                cand = A.strip_identity(a)
                if _const_linear(cand) and where.get(cand) == index \
                        and A.only_reaches(cand, {src}, A._is_identity):
                    up = cand
                    break
        out.append(Group("other", lins, src, up=up))
    return out


def insert_transform(program, group: Group, block_index: int, *, scale: torch.Tensor | None, p1: torch.Tensor,
                     p2: torch.Tensor | None, clip: float | None, prefix: str) -> torch.fx.Node:
    """Insert ``lowc::kron_transform(x, scale, p1, p2, clip)`` before the group's first linear and
    make every linear of the group read it. Buffers ``<prefix>_scale/_p1/_p2`` live on the first
    linear's module."""
    from lowc.ir import meta as nodemeta
    from lowc.ir.analysis import linear_layer
    from lowc.ir.dialect import ensure_registered

    ensure_registered()
    first = group.linears[0]
    module_path = first.args[1].target.rpartition(".")[0]
    dev = program.attr(first.args[1].target).device  # the program's device (training may run elsewhere)
    args = program.add_operand_buffers(module_path, first, {
        f"{prefix}_{name}": None if t is None else t.detach().float().to(dev).contiguous().clone()
        for name, t in (("scale", scale), ("p1", p1), ("p2", p2))})
    x = group.input
    with program.graph.inserting_before(first):
        node = program.graph.call_function(torch.ops.lowc.kron_transform.default,
                                           (x, args[0], args[1], args[2], None if clip is None else float(clip)))
    nodemeta.set_info(node, nodemeta.NodeInfo(layer=f"{linear_layer(first)}.input_transform", role="", block=block_index))
    for lin in group.linears:
        lin.args = (node, *lin.args[1:])
    return node


def fold_into_norm(program, group: Group, scale: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Replace the weight (and bias) ``v`` of the norm a ``"norm"`` group reads by ``scale(v)``,
    computed in fp32 and cast back (a per-channel input scale absorbed by the norm)."""
    for target in (group.link.weight, group.link.bias):
        if target is not None:
            v = program.attr(target)
            program.replace_attr(target, scale(v.detach().float()).to(v.dtype))


# ---- the passes' shared parts --------------------------------------------------------------------
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
    from lowc.passes.quant.common import linear_bias, linear_weight

    w = linear_weight(program, node).to(device)
    wq = (WeightFakeQuant(w.shape, scheme.bits, scheme.group_size, scheme.symmetric, lwc, device=device)
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


@dataclass(frozen=True)
class LearnedQuantPass(WeightQuantPass):
    """Base of the learned-transform passes: they need calibration data, share the checks of the
    training options (``epochs``, the learning rates named by ``lr_options``, ``alpha``,
    ``batch_size``: fields of the subclass) and run ``_run`` with quantization (tests call
    ``_run(quantize=False)`` to fold the trained transforms into a float model)."""

    requires = frozenset({"calibration"})
    lr_options: ClassVar[tuple[str, ...]] = ("lr",)

    def validate(self) -> None:
        super().validate()
        if self.epochs < 0:
            raise self.fail(f"epochs={self.epochs}: must be >= 0")
        lrs = {name: getattr(self, name) for name in self.lr_options}
        if any(v <= 0 for v in lrs.values()):
            what = ", ".join(f"{name}={v}" for name, v in lrs.items())
            raise self.fail(f"{what}: must be positive" if len(lrs) == 1 else f"{what}: learning rates must be positive")
        if not 0.0 <= self.alpha <= 1.0:
            raise self.fail(f"alpha={self.alpha}: choose 0 <= alpha <= 1")
        if self.batch_size < 1:
            raise self.fail(f"batch_size={self.batch_size}: must be >= 1")

    def run(self, program, ctx):
        return self._run(program, ctx)

    def _run(self, program, ctx, quantize: bool = True):  # pragma: no cover - interface
        raise NotImplementedError


# ---- the block-by-block driver -------------------------------------------------------------------
class BlockPlan:
    """What a learned-transform pass decides for one block: ``modules`` (program node name ->
    :class:`QLinear` patched into the block copy), the trainable ``param_groups``, ``refresh()``
    (recompute transforms from parameters), ``on_epoch(e)``, and ``fold(program, weights)`` which
    moves the trained transforms into the program (norm weights, online ops, rows of other linears)
    and may adjust ``weights`` (node name -> [W, b] effective tensors) before they are quantized."""

    modules: dict[str, QLinear]
    param_groups: list[dict]
    notes: list[str]
    skipped: list[str]  # norms whose scale stays online (they also feed the residual), logged

    def __init__(self):
        self.modules, self.param_groups, self.notes, self.skipped = {}, [], [], []

    def refresh(self) -> None:  # pragma: no cover - interface
        pass

    def on_epoch(self, epoch: int) -> None:
        pass

    def fold(self, program, weights: dict[str, list], quantize: bool) -> None:  # pragma: no cover - interface
        raise NotImplementedError


def run_blockwise(p, program, ctx, *, propagate: str, make_plan: Callable, train: dict, aug_loss: bool = False,
                  quantize: bool = True, gptq: dict | None = None):
    """The shared driver of ``affinequant``/``flatquant`` (see the module docstring). ``make_plan(block,
    groups, fm, float_inputs, targets)`` returns a :class:`BlockPlan` or None (nothing to do).
    ``quantize=False`` folds the trained transforms with float weights (tests use it to check that the
    folded float model is unchanged). ``gptq``: quantize the transformed (and clipped) weights with
    GPTQ (options of :func:`lowc.passes.quant.gptq.gptq_quantize`) instead of rounding them to nearest;
    the Hessians come from the trained block's inputs to each linear (transformed, fake-quantized
    activations)."""
    from lowc.ir.analysis import linear_layer
    from lowc.passes.base import PassResult
    from lowc.passes.blockwise import BlockwiseRunner
    from lowc.passes.quant.common import layer_name, linear_weight, rewrite_linear

    ctx.require("calibration", p.name)
    s = p.scheme(ctx)
    targets = {n.name for n in p.select(program)}
    if not targets:
        return PassResult(changed=False, stats={"quantized": 0})
    torch.manual_seed(ctx.seed)
    device = torch.device(ctx.device)
    runner = BlockwiseRunner(program, ctx.calib, device=ctx.device, progress=ctx.progress, desc=p.name, propagate=propagate)
    done, losses, losses_init, notes, padded, skipped = 0, [], [], [], [], []
    meta = {"method": p.name, "w_bits": s.bits, "group_size": s.group_size, "symmetric": s.symmetric, "a_bits": 16}
    for block in runner:
        groups = block_groups(program, block.index)
        if not any(n.name in targets for g in groups for n in g.linears):
            continue
        where = f"{p.name}: {block.layer_prefix}"
        outs = block.float_outputs
        check_finite(outs, where, outs[:1])
        check_finite(block.inputs, where, outs[:1])
        float_inputs = block.float_inputs
        if propagate == "both":
            check_finite(float_inputs, where, outs[:1])
        fm = block.module()
        plan = make_plan(block, groups, fm, float_inputs, targets)
        if plan is None:
            continue
        train_inputs = block.inputs
        extra = None
        if aug_loss:
            with torch.no_grad():
                extra = [tuple(v.detach() for v in fm(*_to(x, device))) for x in train_inputs]
        patch_linears(fm, plan.modules)
        postfix = (lambda l, _b=block: runner.set_postfix(block=_b.index, loss=f"{l:.4g}")) if ctx.progress else None
        info = train_block(fm, plan.param_groups, train_inputs, block.float_outputs, device=device, refresh=plan.refresh,
                           on_epoch=plan.on_epoch, extra_targets=extra, postfix=postfix, where=where, **train)
        del extra
        if propagate == "both":
            with torch.no_grad(), cached_weights(fm):
                plan.refresh()
                block.set_outputs([tuple(v.detach() for v in fm(*_to(x, device))) for x in train_inputs])
        hessians = collect_hessians(fm, plan, train_inputs, targets, device) if (gptq is not None and quantize) else {}
        with torch.no_grad():
            plan.refresh()
            weights = {name: [m.effective_weight(), m.effective_bias()] for name, m in plan.modules.items()}
            plan.fold(program, weights, quantize)
            by_name = {n.name: n for n in program.graph.nodes}
            for name, mod in plan.modules.items():
                node = by_name[name]
                w_t = node.args[1].target
                dtype = program.attr(w_t).dtype
                w, b = weights[name]
                bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
                if b is not None and isinstance(bias, torch.fx.Node):
                    old = program.attr(bias.target)
                    program.replace_attr(bias.target, b.to(device=old.device, dtype=old.dtype))
                if quantize and name in targets and mod.wq is not None:
                    if name in hessians:
                        from lowc.passes.quant.gptq import gptq_quantize

                        qw, _ = gptq_quantize(mod.wq.clip_weight(w).to(dtype), hessians[name], s.bits, s.group_size,
                                              s.symmetric, name=linear_layer(node), **gptq)
                    else:
                        qw = mod.wq.quantize(w, dtype=dtype)
                    dev = program.attr(w_t).device
                    qw = quant.QuantizedWeight(qw.qweight.to(dev), qw.scales.to(dev),
                                               None if qw.zeros is None else qw.zeros.to(dev), qw.bits, qw.group_size, qw.in_features)
                    if qw.k_pad != qw.in_features:
                        padded.append(linear_layer(node))
                    rewrite_linear(program, node, qw, {**meta, "gptq": True} if name in hessians else dict(meta))
                    done += 1
                else:
                    old = program.attr(w_t)
                    program.replace_attr(w_t, w.to(device=old.device, dtype=old.dtype))
        notes.extend(plan.notes)
        skipped.extend(getattr(plan, "skipped", ()))
        losses.append(info["loss"])
        losses_init.append(info["loss_init"])
        runner.set_postfix(block=block.index, loss=f"{info['loss']:.4g}")
        del fm, plan
    runner.close()
    rest = [n for n in p.select(program) if n.name in targets] if quantize else []
    for node in rest:  # outside transformer blocks (BERT's pooler): no block-wise training
        qw = quant.rtn_quantize(linear_weight(program, node), s.bits, s.group_size, s.symmetric)
        rewrite_linear(program, node, qw, {**meta, "method": "rtn"})
    if rest:
        ctx.log.append(f"{p.name}: {len(rest)} linear(s) outside transformer blocks quantized with RTN: "
                       + ", ".join(layer_name(n) for n in rest[:4]))
    if notes:
        ctx.log.append(f"{p.name}: " + "; ".join(dict.fromkeys(notes)))
    if skipped:
        ctx.log.append(f"{p.name}: {len(skipped)} norm(s) also feed the residual (post-norm), so their smoothing "
                       f"scale stays in an online lowc::kron_transform: " + ", ".join(skipped[:3])
                       + ("..." if len(skipped) > 3 else ""))
    if padded:
        ctx.log.append(f"{p.name}: {len(padded)} layer(s) padded to a multiple of group_size={s.group_size}: "
                       + ", ".join(padded[:4]) + ("..." if len(padded) > 4 else ""))
    program.graph.eliminate_dead_code()
    program.remove_dead()
    stats = {"quantized": done, "rtn_outside_blocks": len(rest), "bits": s.bits, "group_size": s.group_size,
             "symmetric": s.symmetric, "a_bits": act_bits(ctx), "samples": len(ctx.calib),
             "block_loss": [round(l, 6) for l in losses], "block_loss_init": [round(l, 6) for l in losses_init],
             "epochs": train.get("epochs")}
    if padded:
        stats["padded"] = padded
    return PassResult(changed=bool(done or (not quantize and losses)), stats=stats)


@torch.no_grad()
def collect_hessians(fm, plan, inputs, targets: set, device) -> dict[str, torch.Tensor]:
    """``H = 2/n Σ x xᵀ`` (fp32) of the input each quantized linear of the trained block copy
    multiplies (after its transform and activation fake-quant), over every sample."""
    hess: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def tap(name):
        def add(x):
            x = x.reshape(-1, x.shape[-1]).float()
            c, m = counts.get(name, 0), x.shape[0]
            h = hess.get(name)
            if h is None:
                h = torch.zeros(x.shape[-1], x.shape[-1], device=x.device)
            h.mul_(c / (c + m)).add_(x.t() @ x, alpha=2.0 / (c + m))
            hess[name], counts[name] = h, c + m
        return add

    mods = {name: m for name, m in plan.modules.items() if name in targets and m.wq is not None}
    for name, m in mods.items():
        m.tap = tap(name)
    try:
        plan.refresh()
        with cached_weights(fm):
            for x in inputs:
                fm(*_to(x, device))
    finally:
        for m in mods.values():
            m.tap = None
    return hess


def act_bits(ctx) -> int:
    """Bits of the target's activation quantization (16: float activations)."""
    return ctx.scheme.a_bits if ctx.scheme is not None else 16
