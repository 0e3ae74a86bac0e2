"""``flatquant``: learned flatness transforms with Kronecker-factored matrices (Sun et al., 2024,
"FlatQuant: Flatness Matters for LLM Quantization").

For every group of linears sharing an input ``x`` (q/k/v after the attention norm; gate/up after the
MLP norm; down_proj; o_proj), a per-channel smoothing vector ``d`` and an invertible
``P = P₁ ⊗ P₂`` rewrite the group as

    x' = (x ⊙ d) · (P₁ ⊗ P₂),    W' = (W ⊘ d) · (P₁ ⊗ P₂)⁻ᵀ,    x Wᵀ = x' W'ᵀ

and both ``x'`` and ``W'`` are quantized. As in the paper and its reference code:

* ``P₁ ⊗ P₂`` uses the most balanced factorisation of the width (4096 → 64×64, 11008 → 86×128;
  :func:`lowc.passes.quant.transforms.balanced_factors`); each factor is ``U·diag(s)·Vᵀ`` with ``U``,
  ``V`` orthogonal through the Cayley map of a learned matrix (initialised as in the reference code
  from a random orthogonal matrix, seeded), ``s`` initialised to ones; ``P⁻ᵀ = U·diag(1/s)·Vᵀ`` needs
  no matrix inverse.
* ``d`` is initialised SmoothQuant-style with α = 0.3 (``alpha``): ``d = max|W|^(1−α) / max|X|^α``
  from the float model's calibration activations.
* **o_proj**: the transform of its input is ``P_heads ⊗ P_v``: ``P_v`` (``head_dim × head_dim``) is
  folded into ``v_proj``'s output rows (per KV head, so grouped-query attention works) and into
  ``o_proj``'s weight; ``P_heads`` (heads × heads) stays online. No ``d`` there (as the reference code).
* **learnable clipping**: weights per output channel (``max``/``min`` times ``sigmoid`` of logits
  initialised to 4.0, applied to every group of the row), activations per tensor (one ratio per
  group's input, ``sigmoid`` of a logit initialised to 4.0) when the target quantizes activations.
  The reference code has separate max/min activation factors per linear; lowc's activations are
  symmetric per token, so one ratio per shared input is the same family.
* **training**: block by block (:func:`lowc.passes.quant.learned.run_blockwise`; the block's plan is
  :func:`make_plan`, a function of the groups and their input maxima) on the float model's inputs, targets its outputs
  (``BlockwiseRunner(propagate="float")``), activation fake-quantization when the target quantizes
  activations; MSE normalised as ``loss / loss.detach()``; AdamW (weight decay 0.01, PyTorch's
  default the reference code keeps), ``lr`` 5e-3 for the transforms and 10× for clipping, cosine
  schedule to ``lr·1e-3``, ``epochs`` 15, ``batch_size`` 4.
* **after training**: ``d`` goes into the preceding RMSNorm/LayerNorm weight (and bias) when the norm
  output feeds only the group, into ``up_proj``'s output rows for ``down_proj`` (``x = f(gate)·up``),
  and otherwise stays in the online op (post-norm BERT, BERT's GELU MLP); ``(P₁⊗P₂)⁻ᵀ`` goes into the
  weights, which are quantized with the learned clipping into ``lowc::linear_wq``; the online part
  ``x → clip((x ⊙ d)·(P₁⊗P₂))`` stays in the graph as ``lowc::kron_transform`` (dialect op with a
  plain-PyTorch reference; a fused Triton transform+quantize kernel can replace it). The
  ``quantize-activations`` lowering then quantizes the transformed input, which is what the kernel
  reads.
* ``gptq=true`` (the reference code's ``--gptq``): the transformed weights, clamped to the learned
  clipping range, are quantized by GPTQ with Hessians of the trained block's transformed (and, with
  quantized activations, fake-quantized) inputs, instead of round-to-nearest. On weight-only 3-bit
  this is what brings FlatQuant below GPTQ alone (measured: see the README's quality notes).

Simplifications (documented): the K-cache transform is not used (KV-cache quantization is a separate
option); training runs in fp32 (no AMP); the SVD-parameterised mode only (the reference code's
``--direct_inv`` mode with plain matrices is not offered). Linears outside transformer blocks (BERT's
pooler) get RTN, logged.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from lowc.ir.analysis import BlockGroup
from lowc.ir.dialect.kron import kron_apply
from lowc.ir.scheme import Scheme
from lowc.passes.base import PassContext, PassResult, opt
from lowc.passes.quant.common import linear_weight
from lowc.passes.quant.fakequant import LWC_INIT, clip_tokens
from lowc.passes.quant.fold import fold_into_norm, insert_transform
from lowc.passes.quant.learned import LearnedQuantPass, act_bits, run_blockwise
from lowc.passes.quant.plan import (
    BlockPlan,
    block_qlinears,
    param_groups,
    qlinear,
    weight_clip_parameters,
)
from lowc.passes.quant.transforms import (
    balanced_factors,
    cayley,
    random_orthogonal,
    smooth_scales,
)


class Factor:
    """One learned factor ``P = U·diag(s)·Vᵀ`` (``U``, ``V`` Cayley-orthogonal)."""

    def __init__(self, n: int, gen: torch.Generator, device):
        self.n = n
        self.u = torch.nn.Parameter(random_orthogonal(n, gen).to(device))
        self.v = torch.nn.Parameter(random_orthogonal(n, gen).to(device))
        self.s = torch.nn.Parameter(torch.ones(n, device=device))

    def params(self) -> list:
        return [self.u, self.v, self.s]

    def refresh(self) -> None:
        u, v = cayley(self.u), cayley(self.v)
        self.P = (u * self.s) @ v.transpose(0, 1)
        self.P_invT = (u / self.s) @ v.transpose(0, 1)


class Kron:
    """``x -> clip((x ⊙ d)·(P₁⊗P₂))`` and its weight side ``W -> (W ⊘ d)·(P₁⊗P₂)⁻ᵀ``. ``p2`` None:
    the identity of size ``width / n1`` (the o_proj heads transform)."""

    def __init__(self, f1: Factor, f2: Factor | None, d: torch.Tensor | None, clip: bool, device):
        self.f1, self.f2 = f1, f2
        self.d = torch.nn.Parameter(d.to(device)) if d is not None else None
        self.clip = torch.nn.Parameter(torch.full((1,), LWC_INIT, device=device)) if clip else None
        self.w_invT2: torch.Tensor | None = None  # o_proj: P_v⁻ᵀ applied on the weight side only

    def params(self) -> list:
        out = self.f1.params() + (self.f2.params() if self.f2 is not None else [])
        return out + ([self.d] if self.d is not None else [])

    def refresh(self) -> None:
        self.f1.refresh()
        if self.f2 is not None:
            self.f2.refresh()

    def ratio(self):
        return torch.sigmoid(self.clip) if self.clip is not None else None

    def in_fn(self, x):
        y = kron_apply(x, self.d, self.f1.P, self.f2.P if self.f2 is not None else None)
        return clip_tokens(y, self.ratio())

    def weight_fn(self, w):
        if self.d is not None:
            w = w / self.d
        p2 = self.f2.P_invT if self.f2 is not None else (self.w_invT2() if self.w_invT2 is not None else None)
        return kron_apply(w, None, self.f1.P_invT, p2)


class FlatPlan(BlockPlan):
    """One block's transforms: ``krons`` (group, :class:`Kron`, where ``d`` is folded: ``"norm"``,
    ``"up"``, ``"online"`` or None for the o_proj heads transform) and their ``factors``."""

    def __init__(self):
        super().__init__()
        self.krons: list[tuple[BlockGroup, Kron, str | None]] = []
        self.factors: list[Factor] = []

    def refresh(self) -> None:
        for f in self.factors:
            f.refresh()

    def fold(self, program, weights) -> None:
        for group, k, how in self.krons:
            d = k.d.detach() if k.d is not None else None
            if how == "norm":
                fold_into_norm(program, group.link, lambda v, _d=d: v * _d.to(v.device))
            elif how == "up":
                w, b = weights[group.up.name]
                weights[group.up.name] = [w * d[:, None], None if b is None else b * d]
            clip = float(k.ratio()) if k.clip is not None else None
            insert_transform(program, group, scale=d if how == "online" else None, p1=k.f1.P.detach(),
                             p2=k.f2.P.detach() if k.f2 is not None else None, clip=clip, prefix="flat")


@dataclass(frozen=True)
class FlatSetup:
    """What a flatquant block plan depends on: the pass options resolved against the target
    (:meth:`FlatQuant.setup`). ``scheme`` None: no weight fake-quant; ``lac``: learned activation
    clipping (only with quantized activations); ``seed``: the factors of block ``i`` are drawn from a
    generator seeded with ``seed * 100003 + i``."""

    scheme: Scheme | None
    a_bits: int
    lac: bool
    lwc: bool
    alpha: float
    lr: float
    seed: int
    device: torch.device


def _vo_fns(f_v: Factor, kv: int, hd: int):
    """``v_proj``'s weight and bias sides of the per-KV-head ``P_v`` folded from o_proj's input."""
    def v_weight(w):  # rows per KV head: P_vᵀ W_j
        return (f_v.P.transpose(0, 1) @ w.reshape(kv, hd, -1)).reshape(kv * hd, -1)

    def v_bias(b):
        return (b.reshape(kv, 1, hd) @ f_v.P).reshape(-1)

    return v_weight, v_bias


def make_plan(setup: FlatSetup, program, block_index: int, groups: list[BlockGroup], amax: dict[str, torch.Tensor],
              targets: set[str]) -> FlatPlan:
    """FlatQuant's plan for one block: per group holding a target a :class:`Kron` (``P_heads ⊗ P_v``
    for an ``"o"`` group, with ``P_v`` folded into ``v_proj``; else balanced factors and a smoothing
    vector ``d`` initialised from ``amax``, input maxima by the group's first linear's name), every
    target linear a :class:`QLinear` with weight fake-quant (learned per-channel clipping if
    ``setup.lwc``)."""
    plan = FlatPlan()
    device = setup.device
    gen = torch.Generator().manual_seed(setup.seed * 100003 + block_index)
    in_fn, w_fns, b_fns = {}, {}, {}
    transformed: set[str] = set()
    counts = {"norm": 0, "up": 0, "online": 0}
    for g in groups:
        if not any(n.name in targets for n in g.linears):
            continue
        if g.kind == "o":
            a = g.attn
            f_heads, f_v = Factor(a.num_heads, gen, device), Factor(a.head_dim, gen, device)
            plan.factors += [f_heads, f_v]
            k = Kron(f_heads, None, None, setup.lac, device)
            k.w_invT2 = lambda _f=f_v: _f.P_invT
            plan.krons.append((g, k, None))
            o, v = g.linears[0], g.v
            in_fn[o.name] = k.in_fn
            w_fns.setdefault(o.name, []).append(k.weight_fn)
            v_weight, v_bias = _vo_fns(f_v, a.num_kv_heads, a.head_dim)
            w_fns.setdefault(v.name, []).append(v_weight)
            b_fns[v.name] = v_bias
            transformed.update((o.name, v.name))
            continue
        weights = [linear_weight(program, n) for n in g.linears]
        n1, n2 = balanced_factors(int(weights[0].shape[1]))
        f1, f2 = Factor(n1, gen, device), Factor(n2, gen, device)
        plan.factors += [f1, f2]
        d = 1.0 / smooth_scales(amax[g.linears[0].name], weights, setup.alpha)
        k = Kron(f1, f2, d, setup.lac, device)
        if g.kind == "norm" and g.norm_foldable:
            how = "norm"
        elif g.kind == "other" and g.up is not None:
            how = "up"
        else:
            how = "online"
            if g.kind == "norm":
                plan.skipped.append(g.link.layer)
        counts[how] += 1
        plan.krons.append((g, k, how))
        for n in g.linears:
            in_fn[n.name] = k.in_fn
            w_fns.setdefault(n.name, []).insert(0, k.weight_fn)
            transformed.add(n.name)
    block_linears = [n for g in groups for n in g.linears]
    plan.modules = block_qlinears(program, block_linears, targets, transformed, setup.scheme,
                                  "channel" if setup.lwc else None, setup.a_bits, device, in_fn, w_fns, b_fns)
    # a "down" group folds d into up_proj's rows: up must be patched (it is, as a gate/up linear)
    for g, k, how in plan.krons:
        if how == "up" and g.up.name not in plan.modules:
            plan.modules[g.up.name] = qlinear(program, g.up, device)
    transforms = [p for f in plan.factors for p in f.params()] + [k.d for _, k, _ in plan.krons if k.d is not None]
    clips = weight_clip_parameters(plan.modules) + [k.clip for _, k, _ in plan.krons if k.clip is not None]
    plan.param_groups = param_groups(transforms, setup.lr, clips, 10 * setup.lr)
    if plan.krons:
        plan.notes.append(
            f"{len(plan.krons)} online Kronecker transforms per block; smoothing folded into {counts['norm']} "
            f"norm(s) and {counts['up']} up projection(s), kept in the online op for {counts['online']} group(s)")
    return plan


@dataclass(frozen=True)
class FlatQuant(LearnedQuantPass):
    name = "flatquant"
    summary = "FlatQuant: learned per-group Kronecker transforms + smoothing + learnable clipping, block by block"

    epochs: int = opt(15, "training epochs per block (0: initial transforms and clipping, no training)")
    lr: float = opt(5e-3, "AdamW learning rate of the transforms (clipping logits use 10x)")
    alpha: float = opt(0.3, "SmoothQuant migration strength of the smoothing-vector initialisation, in [0, 1]")
    lwc: bool = opt(True, "learnable weight clipping, per output channel")
    lac: bool = opt(True, "learnable activation clipping, per input tensor (only when the target quantizes activations)")
    batch_size: int = opt(4, "calibration samples per optimizer step")
    gptq: bool = opt(False, "quantize the transformed weights with GPTQ (Hessians of the transformed inputs, the learned clipping bounding each group) instead of round-to-nearest, as the reference code's --gptq")

    def setup(self, ctx: PassContext) -> FlatSetup:
        """The options resolved against the target (activation clipping only when it quantizes
        activations)."""
        return FlatSetup(scheme=self.scheme(ctx), a_bits=act_bits(ctx), lac=self.lac and act_bits(ctx) < 16, lwc=self.lwc,
                         alpha=self.alpha, lr=self.lr, seed=ctx.seed, device=torch.device(ctx.device))

    def run(self, program, ctx: PassContext) -> PassResult:
        train = dict(epochs=self.epochs, batch_size=self.batch_size, weight_decay=0.01, normalize=True, cosine=True)
        return run_blockwise(self, program, ctx, propagate="float", make_plan=functools.partial(make_plan, self.setup(ctx)),
                             train=train, gptq={} if self.gptq else None)
