"""``affinequant``: learned affine transforms before quantization (Ma et al., ICLR 2024, "AffineQuant").

For a group of linears sharing an input ``X`` with weights ``W`` (``[out, in]``), an invertible
matrix ``A`` rewrites ``X Wᵀ = (X A⁻¹)(W Aᵀ)ᵀ``: the weights are quantized as ``W Aᵀ`` and the
activations as ``X A⁻¹``, and ``A`` is trained so the quantized block reproduces the float block.
As in the paper and its reference code (built on OmniQuant):

* **where**: the input of q/k/v (after the attention norm) and of gate/up (after the MLP norm), and
  the value→output path: a block-diagonal ``A`` with one ``head_dim × head_dim`` block per KV head,
  so ``v_proj`` becomes ``A⁻ᵀ W_v`` (bias ``b_v A⁻¹``) and ``o_proj`` ``W_o Aᵀ`` (the block repeated
  for the query heads sharing a KV head: grouped-query attention is handled; the paper's code assumes
  MHA). ``down_proj`` gets no transform, only clipping, as in the reference code.
* **norm groups**: ``ln_matrix=false`` (the paper's W4A4 setting): ``A = diag(s)``, folded into the
  norm's weight (and bias) after training, so the graph gains no op. ``ln_matrix=true`` (the paper's
  weight-only setting, ``--use_ln_matrix``): a full ``A``, whose inverse the reference code applies
  after the norm at inference; here that matmul is the online op ``lowc::kron_transform(x, None,
  A⁻¹, None)`` (one ``D × D`` factor). A diagonal cannot be folded into a norm whose output also
  feeds the residual (post-norm BERT): there it stays online as ``lowc::kron_transform(x, 1/s,
  [[1]], None)``, an elementwise scale (logged).
* **initialisation**: ``A = diag(s)`` with SmoothQuant's ``s = max|X|^α / max|W|^(1−α)`` from the
  float model's calibration activations (α = ``alpha``).
* **gradual mask**: at epoch ``e`` of ``E`` the trained matrix is ``A ⊙ M`` with ``M = I + sf·B_k``,
  ``B_k`` the off-diagonal band ``0 < |i−j| < k``, ``k = ⌊(D−1)/(E−1)·e⌋ + 1`` (``D`` the matrix
  size: hidden for norm groups, head_dim for v/o), so training starts diagonal and unlocks
  off-diagonals gradually; the stability factor ``sf`` (0.1 with quantized activations, 0.01
  weight-only: the paper's scripts) keeps ``A`` strongly diagonally dominant, hence invertible.
  Diagonal entries are kept at ``|a_ii| >= 1e-2`` (the reference code's truncation, with a
  straight-through gradient).
* **learnable weight clipping** (OmniQuant LWC): per row and group, ``max`` and ``min`` scaled by
  ``sigmoid`` of logits initialised to 4.0 (``lwc_lr`` 1e-2).
* **training**: block by block (:func:`lowc.passes.quant.learned.run_blockwise`; the block's plan is
  :func:`make_plan`, a function of the groups and their input maxima), inputs from the
  *quantized* model (the outputs of the already-quantized blocks, with activation fake-quantization
  when the target quantizes activations), targets from the *float* model (``BlockwiseRunner``'s
  ``propagate="both"``), MSE, AdamW (weight decay 0) with ``lr`` 5e-3 for ``A`` and ``lwc_lr`` for
  clipping, ``epochs`` 20, ``batch_size`` 1; with quantized activations also the MSE to the float
  block run on the quantized inputs (the paper's ``--aug_loss``).
* **after training** the transforms are folded (norm weights, ``v_proj``/``o_proj`` weights and
  bias) and every linear is quantized with its learned clipping into ``lowc::linear_wq``; the packed
  codes are exactly those the training rounded to.

Simplifications (documented): OmniQuant's channel-wise shift is not learned (the paper's LLaMA runs
initialise it to zero; it would add a bias the RMSNorm graph lacks); the query/key transform
(``--use_matrix``) is not used: it is not an equivalence through RoPE and only matters for quantized
Q/K products, which lowc does not perform; training runs in fp32 (no AMP). Linears outside
transformer blocks (BERT's pooler) get RTN, logged.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch

from lowc.ir.analysis import BlockGroup
from lowc.ir.scheme import Scheme
from lowc.passes.base import PassContext, PassResult, opt
from lowc.passes.quant.common import linear_weight
from lowc.passes.quant.fold import fold_into_norm, insert_transform
from lowc.passes.quant.learned import LearnedQuantPass, act_bits, run_blockwise
from lowc.passes.quant.plan import (
    BlockPlan,
    block_qlinears,
    param_groups,
    weight_clip_parameters,
)
from lowc.passes.quant.transforms import smooth_scales, smoothing_scale

TRUNCATE = 1e-2


def _truncate_diag(d: torch.Tensor) -> torch.Tensor:
    """``|d_i| >= 1e-2`` keeping the sign (zeros stay zero), with a straight-through gradient."""
    t = torch.where(d.abs() < TRUNCATE, torch.sign(d) * TRUNCATE, d)
    return d + (t - d).detach()


def band_mask(n: int, k: int, sf: float, device) -> torch.Tensor:
    """``I + sf·B_k``: 1 on the diagonal, ``sf`` where ``0 < |i−j| < k``, 0 elsewhere."""
    i = torch.arange(n, device=device)
    dist = (i[:, None] - i[None, :]).abs()
    m = torch.where(dist < k, torch.full((n, n), sf, device=device), torch.zeros(n, n, device=device))
    m.fill_diagonal_(1.0)
    return m


def band_width(n: int, epoch: int, epochs: int) -> int:
    """The gradual mask's band width at ``epoch`` (0-based) of ``epochs``: ``⌊(n−1)/(E−1)·e⌋ + 1``."""
    if epochs <= 1:
        return n
    return int((n - 1) / (epochs - 1) * epoch) + 1


def _with_diag(a: torch.Tensor) -> torch.Tensor:
    """``a`` (``[..., n, n]``) with its diagonal truncated away from zero."""
    d = torch.diagonal(a, dim1=-2, dim2=-1)
    return a + torch.diag_embed(_truncate_diag(d) - d)


class NormAffine:
    """The transform of a group reading a norm output: ``diag(s)`` or a full masked matrix ``A``.
    ``online``: applied by an inserted op instead of being folded into the norm."""

    def __init__(self, s: torch.Tensor, matrix: bool, sf: float, device, online: bool | None = None):
        self.matrix, self.sf, self.n = matrix, sf, s.numel()
        self.online = matrix if online is None else online
        s = s.to(device)
        self.param = torch.nn.Parameter(torch.diag(s) if matrix else s.clone())
        self.mask = torch.eye(self.n, device=device) if matrix else None

    def set_band(self, k: int) -> None:
        if self.matrix:
            self.mask = band_mask(self.n, k, self.sf, self.param.device)

    def refresh(self) -> None:
        if self.matrix:
            self.A = _with_diag(self.param * self.mask)
            self.Ainv = torch.linalg.inv(self.A)
        else:
            self.s = _truncate_diag(self.param)

    def in_fn(self, x):
        return x @ self.Ainv if self.matrix else x / self.s

    def weight_fn(self, w):
        return w @ self.A.transpose(0, 1) if self.matrix else w * self.s


class VOAffine:
    """Block-diagonal ``A`` on the value heads (one ``[hd, hd]`` block per KV head)."""

    def __init__(self, s_kv: torch.Tensor, heads: int, kv_heads: int, head_dim: int, sf: float, device):
        self.h, self.kv, self.hd, self.sf = heads, kv_heads, head_dim, sf
        self.param = torch.nn.Parameter(torch.diag_embed(s_kv.to(device)))
        self.mask = torch.eye(head_dim, device=device)

    def set_band(self, k: int) -> None:
        self.mask = band_mask(self.hd, k, self.sf, self.param.device)

    def refresh(self) -> None:
        self.A = _with_diag(self.param * self.mask)
        self.Ainv = torch.linalg.inv(self.A)

    def v_weight(self, w):  # [KV*hd, in]: per head  A⁻ᵀ W_j
        wr = w.reshape(self.kv, self.hd, -1)
        return (self.Ainv.transpose(1, 2) @ wr).reshape(self.kv * self.hd, -1)

    def v_bias(self, b):  # b_j A⁻¹
        return (b.reshape(self.kv, 1, self.hd) @ self.Ainv).reshape(-1)

    def o_weight(self, w):  # [out, H*hd]: per head W_h Aᵀ
        a = self.A.repeat_interleave(self.h // self.kv, dim=0)
        wr = w.reshape(w.shape[0], self.h, self.hd)
        return torch.einsum("nhi,hji->nhj", wr, a).reshape(w.shape[0], -1)


class AffinePlan(BlockPlan):
    """One block's transforms: ``norms`` (group, :class:`NormAffine`) and ``vos`` (:class:`VOAffine`)."""

    def __init__(self, epochs: int):
        super().__init__()
        self.norms: list[tuple[BlockGroup, NormAffine]] = []
        self.vos: list[VOAffine] = []
        self.epochs = epochs

    def refresh(self) -> None:
        for _, t in self.norms:
            t.refresh()
        for t in self.vos:
            t.refresh()

    def on_epoch(self, epoch: int) -> None:
        for _, t in self.norms:
            t.set_band(band_width(t.n, epoch, self.epochs))
        for t in self.vos:
            t.set_band(band_width(t.hd, epoch, self.epochs))

    def fold(self, program, weights) -> None:
        for group, t in self.norms:
            if t.matrix:
                insert_transform(program, group, scale=None, p1=t.Ainv.detach(), p2=None, clip=None, prefix="affine")
            elif t.online:  # a diagonal the norm cannot absorb (its output also feeds the residual)
                one = torch.ones(1, 1, device=t.s.device)
                insert_transform(program, group, scale=1.0 / t.s.detach(), p1=one, p2=None, clip=None, prefix="affine")
            else:
                s = t.s.detach()
                fold_into_norm(program, group.link, lambda v, _s=s: v / _s.to(v.device))


@dataclass(frozen=True)
class AffineSetup:
    """What an affinequant block plan depends on: the pass options resolved against the target
    (:meth:`AffineQuant.setup`). ``scheme`` None: no weight fake-quant."""

    scheme: Scheme | None
    a_bits: int
    ln_matrix: bool
    sf: float
    alpha: float
    lwc: bool
    lr: float
    lwc_lr: float
    epochs: int
    device: torch.device


def vo_scale(amax: torch.Tensor, w_o: torch.Tensor, attn, alpha: float) -> torch.Tensor:
    """The smoothing initialisation of the v/o transform, ``[KV, head_dim]``: activation and
    ``o_proj`` weight maxima of each channel taken over the query heads sharing a KV head."""
    kv, per_kv, hd = attn.num_kv_heads, attn.num_heads // attn.num_kv_heads, attn.head_dim
    act = amax.reshape(kv, per_kv, hd).amax(dim=1).reshape(-1)
    wmax = w_o.detach().abs().float().amax(dim=0).cpu().reshape(kv, per_kv, hd).amax(dim=1).reshape(-1)
    return smoothing_scale(act, wmax, alpha).reshape(kv, hd)


def make_plan(setup: AffineSetup, program, block_index: int, groups: list[BlockGroup], amax: dict[str, torch.Tensor],
              targets: set[str]) -> AffinePlan:
    """AffineQuant's plan for one block: a :class:`NormAffine` per ``"norm"`` group and a
    :class:`VOAffine` per ``"o"`` group holding a target (``down_proj``-like groups: clipping only),
    initialised from ``amax`` (input maxima by the group's first linear's name); every target linear
    a :class:`QLinear` with weight fake-quant (learned clipping if ``setup.lwc``)."""
    plan = AffinePlan(setup.epochs)
    device = setup.device
    in_fn, w_fns, b_fns = {}, {}, {}
    transformed: set[str] = set()
    for g in groups:
        if not any(n.name in targets for n in g.linears):
            continue
        if g.kind == "norm":
            sc = smooth_scales(amax[g.linears[0].name], [linear_weight(program, n) for n in g.linears], setup.alpha)
            t = NormAffine(sc, setup.ln_matrix, setup.sf, device, online=setup.ln_matrix or not g.norm_foldable)
            if t.online and not setup.ln_matrix:
                plan.skipped.append(g.link.layer)
            plan.norms.append((g, t))
            for n in g.linears:
                in_fn[n.name] = t.in_fn
                w_fns.setdefault(n.name, []).insert(0, t.weight_fn)
                transformed.add(n.name)
        elif g.kind == "o":
            a, o, v = g.attn, g.linears[0], g.v
            t = VOAffine(vo_scale(amax[o.name], linear_weight(program, o), a, setup.alpha), a.num_heads,
                         a.num_kv_heads, a.head_dim, setup.sf, device)
            plan.vos.append(t)
            w_fns.setdefault(o.name, []).insert(0, t.o_weight)
            w_fns.setdefault(v.name, []).append(t.v_weight)
            b_fns[v.name] = t.v_bias
            transformed.update((o.name, v.name))
    block_linears = [n for g in groups for n in g.linears]
    block_linears += [g.v for g in groups if g.kind == "o" and g.v not in block_linears]
    plan.modules = block_qlinears(program, block_linears, targets, transformed, setup.scheme,
                                  "group" if setup.lwc else None, setup.a_bits, device, in_fn, w_fns, b_fns)
    transforms = [t.param for _, t in plan.norms] + [t.param for t in plan.vos]
    plan.param_groups = param_groups(transforms, setup.lr, weight_clip_parameters(plan.modules), setup.lwc_lr)
    kinds = []
    if plan.norms:
        folded = sum(1 for _, t in plan.norms if not t.online)
        what = "full matrices applied online" if setup.ln_matrix else f"diagonals, {folded} folded into the norms"
        kinds.append(f"{len(plan.norms)} norm group(s) ({what})")
    if plan.vos:
        kinds.append(f"{len(plan.vos)} v/o head transform(s) folded")
    if kinds:
        plan.notes.append(", ".join(kinds) + " per block")
    return plan


@dataclass(frozen=True)
class AffineQuant(LearnedQuantPass):
    name = "affinequant"
    lr_options = ("lr", "lwc_lr")
    summary = "AffineQuant: learned invertible affine transforms (gradual band mask) + learnable weight clipping, block by block"

    epochs: int = opt(20, "training epochs per block (0: SmoothQuant-initialised transforms and initial clipping, no training)")
    lr: float = opt(5e-3, "AdamW learning rate of the affine transforms")
    lwc_lr: float = opt(1e-2, "AdamW learning rate of the weight-clipping logits")
    alpha: float = opt(0.5, "SmoothQuant migration strength of the diagonal initialisation, in [0, 1]")
    sf: Optional[float] = opt(None, "stability factor of the gradual mask, in (0, 1] (default: 0.1 with quantized activations, 0.01 weight-only)")
    lwc: bool = opt(True, "learnable weight clipping (OmniQuant LWC), per row and group")
    ln_matrix: Optional[bool] = opt(None, "full matrices after the norms, applied online (lowc::kron_transform); false: diagonals folded into the norms (default: true weight-only, false with quantized activations)")
    aug_loss: Optional[bool] = opt(None, "also fit the float block run on the quantized inputs (default: on with quantized activations)")
    batch_size: int = opt(1, "calibration samples per optimizer step")

    def validate(self) -> None:
        super().validate()
        if self.sf is not None and not 0.0 < self.sf <= 1.0:
            raise self.fail(f"sf={self.sf}: choose 0 < sf <= 1")

    def setup(self, ctx: PassContext) -> AffineSetup:
        """The options resolved against the target: defaults of ``ln_matrix`` and ``sf`` follow
        whether the target quantizes activations."""
        quant_acts = act_bits(ctx) < 16
        return AffineSetup(
            scheme=self.scheme(ctx), a_bits=act_bits(ctx),
            ln_matrix=self.ln_matrix if self.ln_matrix is not None else not quant_acts,
            sf=self.sf if self.sf is not None else (0.1 if quant_acts else 1e-2),
            alpha=self.alpha, lwc=self.lwc, lr=self.lr, lwc_lr=self.lwc_lr, epochs=self.epochs,
            device=torch.device(ctx.device))

    def run(self, program, ctx: PassContext) -> PassResult:
        setup = self.setup(ctx)
        aug = self.aug_loss if self.aug_loss is not None else setup.a_bits < 16
        train = dict(epochs=self.epochs, batch_size=self.batch_size, weight_decay=0.0)
        return run_blockwise(self, program, ctx, propagate="both", make_plan=functools.partial(make_plan, setup),
                             train=train, aug_loss=aug)
