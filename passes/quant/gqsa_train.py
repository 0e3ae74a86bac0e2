"""The pieces of the ``gqsa`` pass (:mod:`lowc.passes.quant.gqsa`): group salience and selection,
the trainable group-sparse linear of BQPO, and E2E-OQP (end-to-end tuning of the scales).

* :func:`group_salience` scores each sparse group (``sparse_group`` consecutive inputs of a row) by
  Wanda's ``|W_nk|·‖X_k‖₂`` or the OBS saliency ``W_nk² / [H⁻¹]_kk`` (``H = 2/n Σ x xᵀ`` with GPTQ's
  damping, :func:`lowc.passes.quant.gptq.inverse_hessian_factor`), summed over the group;
  :func:`select_groups` keeps the ``n_keep`` best groups of every row (balanced rows).
* :class:`SparseQLinear` is a :class:`lowc.passes.quant.fakequant.QLinear` whose weight is the
  scatter of its fake-quantized *compact* rows (the kept groups, in the op's layout), with
  OmniQuant-style learnable clipping per quantization group and, optionally, the kept weights
  themselves trainable; :meth:`SparseQLinear.pack` gives the ``linear_gsq`` weight whose
  dequantization is exactly the trained forward.
* :func:`e2e_tune` learns, for every ``gqsa`` layer, a log-multiplier per stored scale (codes, zero
  points, indices and every other tensor frozen) on the KL divergence between the float model's and
  the compressed model's next-token distributions (causal LMs), or the MSE of the main output
  (encoders), over the calibration samples; it writes the tuned scales back only if the
  calibration loss went down.

Invariant (tested): ``SparseQLinear.effective_weight()`` equals the dequantization of
``SparseQLinear.pack()``; dropped groups are exactly zero in both.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.fx
import torch.nn.functional as F

from lowc.errors import CalibrationError
from lowc.frontend.outputs import main_tensor
from lowc.ir.dialect import quant, sparse
from lowc.ir.dialect.args import LinearQArgs
from lowc.passes.blockwise import calibration_inputs
from lowc.passes.quant.fakequant import QLinear, WeightFakeQuant
from lowc.passes.quant.gptq import inverse_hessian_factor
from lowc.progress import bar

SALIENCE = ("wanda", "hessian")
#: conjugate-gradient iterations of the masked least-squares refit (:func:`obs_prune`)
CG_STEPS = 30
#: E2E-OQP keeps the float model's outputs for every sample when they hold at most this many values
REF_CACHE_ELEMENTS = 64_000_000


# ---- salience -------------------------------------------------------------------------------------
def inverse_factor(H: torch.Tensor, damp: float, name: str = "layer") -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, dead)``: the upper Cholesky factor of the damped ``H⁻¹`` (GPTQ's,
    :func:`lowc.passes.quant.gptq.inverse_hessian_factor`) after dead columns (``H_kk = 0``, mask ``dead``)
    got ``H_kk = 1``."""
    H = H.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    U, _ = inverse_hessian_factor(H, damp, name=name, what="gqsa")
    return U, dead


def group_salience(weight: torch.Tensor, stat: torch.Tensor, sparse_group: int, method: str,
                   factor: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``[N, K_pad / sg]`` scores of the sparse groups of ``weight`` ``[N, K]``. ``stat``: the input's
    ``Σ x_k²`` per channel ``[K]`` (``wanda``); for ``hessian`` the :func:`inverse_factor` of its Hessian."""
    w = weight.detach().float()
    n, k = w.shape
    if method == "wanda":
        score = w.abs() * stat.float().to(w.device).clamp(min=0).sqrt()[None, :]
    else:
        U, dead = factor
        hinv_diag = (U * U).sum(dim=0).to(w.device)  # diag(UᵀU) = diag(H⁻¹)
        score = w * w / hinv_diag[None, :]
        score[:, dead.to(w.device)] = 0
    k_pad = sparse.padded_sparse_width(k, sparse_group)
    return F.pad(score, (0, k_pad - k)).reshape(n, k_pad // sparse_group, sparse_group).sum(dim=-1)


def obs_prune(weight: torch.Tensor, H: torch.Tensor, keep: torch.Tensor, damp: float = 0.01,
              steps: int = CG_STEPS) -> torch.Tensor:
    """``weight`` with the inputs ``~keep`` (``[N, K]`` bool) zeroed and the kept weights of every row
    refitted: ``min ‖X(W − V)ᵀ‖²`` over ``V`` zero outside ``keep``, i.e. ``(V − W)·H`` zero on the kept
    entries (the OBS update for a fixed mask, exact, not SparseGPT's column-sequential
    approximation), solved for all rows at once by ``steps`` conjugate-gradient iterations on the
    damped ``H`` (``λ·mean(diag H)``, as GPTQ's). fp32."""
    W = weight.detach().float()
    M = keep.to(W.device, torch.float32)
    Hd = H.float().to(W.device)
    Hd = Hd + damp * torch.diag(Hd).mean() * torch.eye(Hd.shape[0], device=W.device)
    V = W * M
    R = -((V - W) @ Hd) * M  # minus half the gradient, restricted to the kept entries
    P, rs = R.clone(), (R * R).sum(dim=1)
    tiny = torch.finfo(torch.float32).tiny
    for _ in range(steps):
        if float(rs.max()) <= 1e-12 * float((W * W).sum(dim=1).max() + tiny):
            break
        HP = (P @ Hd) * M
        alpha = rs / (P * HP).sum(dim=1).clamp(min=tiny)
        V = V + alpha[:, None] * P
        R = R - alpha[:, None] * HP
        rs_new = (R * R).sum(dim=1)
        P = R + (rs_new / rs.clamp(min=tiny))[:, None] * P
        rs = rs_new
    return V * M


def select_groups(score: torch.Tensor, n_keep: int) -> torch.Tensor:
    """int16 ``[N, n_keep]``: per row the indices of the ``n_keep`` highest-scoring groups, increasing
    (ties go to the lower index, so the choice is deterministic)."""
    order = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :n_keep]
    return torch.sort(order, dim=1).values.to(torch.int16)


# ---- BQPO's trainable layer -----------------------------------------------------------------------
class SparseQLinear(QLinear):
    """``y = x · scatter(fq(C))ᵀ + b``: ``C`` the compact rows ``[N, n_keep·sg]`` of the kept groups
    ``idx`` (a parameter when ``train_weights``), ``fq`` group fake quantization over the compact row
    (``group_size`` consecutive compact positions, the ``linear_gsq`` layout) with learnable clipping
    when ``lwc``. Without clipping and training, ``pack`` is :func:`lowc.ir.dialect.sparse.rtn_quantize_sparse`."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, idx: torch.Tensor, bits: int, group_size: int,
                 sparse_group: int, symmetric: bool, *, lwc: bool, train_weights: bool, device):
        super().__init__(weight.to(device), None if bias is None else bias.to(device), None)
        self.idx = idx.to(device)
        self.sparse_group, self.in_features, self.bits, self.symmetric = sparse_group, weight.shape[1], bits, symmetric
        compact = sparse.gather_compact(weight.detach().float().to(device), self.idx, sparse_group)
        self.compact = torch.nn.Parameter(compact, requires_grad=train_weights)
        self.group_size = sparse.effective_group_size(group_size, compact.shape[1])
        self.fq = WeightFakeQuant(compact.shape, bits, self.group_size, symmetric, "group" if lwc else None, device=device)

    def trainable(self) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
        """(kept weights if trained, clipping logits)."""
        return ([self.compact] if self.compact.requires_grad else []), self.fq.clip_parameters()

    def effective_weight(self) -> torch.Tensor:
        return sparse.scatter_dense(self.fq(self.compact), self.idx, self.sparse_group, self.in_features)

    @torch.no_grad()
    def pack(self, dtype: torch.dtype) -> sparse.SparseQuantizedWeight:
        """The ``linear_gsq`` weight computing exactly :meth:`effective_weight` (scales in ``dtype``)."""
        wg = self.fq._groups(self.compact)
        scale, zero = self.fq.qparams(wg)
        kc = self.compact.shape[1]
        codes = quant.quantize_codes(wg, scale[..., None], zero[..., None], self.bits).reshape(wg.shape[0], -1)[:, :kc]
        return sparse.from_compact_codes(codes, scale, zero, self.idx, self.bits, self.group_size, self.sparse_group,
                                         self.in_features, self.symmetric, dtype)


# ---- E2E-OQP --------------------------------------------------------------------------------------
class ScaleTuned(torch.nn.Module):
    """A ``linear_gsq`` layer with fixed codes, zero points and indices whose scales are
    ``scale · exp(θ)``, ``θ`` (one per stored scale, initialised to 0) the only trainable tensor."""

    def __init__(self, program, node: torch.fx.Node):
        super().__init__()
        a = LinearQArgs.of(node)
        qweight, scales = program.attr(a.weight.target), program.attr(a.scales.target)
        zeros = program.attr(a.zeros.target) if a.zeros is not None else None
        idx = program.attr(a.idx.target)
        kc = idx.shape[1] * a.sparse_group
        ones = torch.ones_like(scales, dtype=torch.float32)
        self.register_buffer("levels", sparse.dequantize_compact(qweight, ones, zeros, a.bits, a.group_size, kc))
        self.register_buffer("scale0", scales.detach().float())
        self.register_buffer("group", torch.arange(kc, device=scales.device) // a.group_size)
        self.register_buffer("idx", idx)
        self.bias = None if a.bias is None else program.attr(a.bias.target).detach()
        self.sparse_group, self.in_features, self.dtype = a.sparse_group, a.in_features, scales.dtype
        self.theta = torch.nn.Parameter(torch.zeros_like(self.scale0))

    def scales(self) -> torch.Tensor:
        return self.scale0 * torch.exp(self.theta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        compact = self.levels * self.scales()[:, self.group]
        w = sparse.scatter_dense(compact, self.idx, self.sparse_group, self.in_features)
        return F.linear(x.float(), w, None if self.bias is None else self.bias.float()).to(x.dtype)


def _loss(out: torch.Tensor, ref: torch.Tensor, kl: bool) -> torch.Tensor:
    if kl:  # KL(float ‖ compressed) per token, averaged
        logp = F.log_softmax(out.float(), dim=-1).reshape(-1, out.shape[-1])
        logq = F.log_softmax(ref.float(), dim=-1).reshape(-1, ref.shape[-1])
        return F.kl_div(logp, logq, log_target=True, reduction="batchmean")
    return F.mse_loss(out.float(), ref.float())


def e2e_tune(program, reference, nodes: Sequence[torch.fx.Node], samples: Sequence[torch.Tensor], *, epochs: int,
             lr: float, progress: bool) -> dict:
    """E2E-OQP (module docstring) on the program's ``nodes`` (``linear_gsq``), ``reference`` the float
    program. Returns ``{"loss_init", "loss", "kept"}``: the calibration loss before and after, and
    whether the tuned scales were written back (only if the loss went down)."""
    names = {n.name for n in nodes}
    tuned = program.clone()
    mods: dict[str, ScaleTuned] = {}
    for i, node in enumerate([n for n in tuned.graph.nodes if n.name in names]):
        mod = ScaleTuned(tuned, node)
        sub = f"lowc_e2e_{i}"
        tuned.gm.add_submodule(sub, mod)
        with tuned.graph.inserting_before(node):
            new = tuned.graph.call_module(sub, (LinearQArgs.of(node).x,))
        node.replace_all_uses_with(new)
        tuned.graph.erase_node(node)
        mods[node.name] = mod
    tuned.graph.eliminate_dead_code()
    tuned.gm.recompile()
    params = [m.theta for m in mods.values()]
    for t in list(tuned.gm.parameters()) + list(tuned.gm.buffers()):
        if all(t is not p for p in params):
            t.requires_grad_(False)
    kl = program.info.kind == "causal-lm"
    inputs = [calibration_inputs(program, s.to(program.device)) for s in samples]
    refs: dict[int, torch.Tensor] = {}

    def ref(j):  # the float outputs, kept while they fit in REF_CACHE_ELEMENTS, else recomputed
        if j in refs:
            return refs[j]
        with torch.no_grad():
            r = main_tensor(reference.call(*inputs[j])).detach()
        if r.numel() * len(inputs) <= REF_CACHE_ELEMENTS:
            refs[j] = r
        return r

    def calib_loss() -> float:
        with torch.no_grad():
            return sum(float(_loss(main_tensor(tuned.call(*x)), ref(j), kl)) for j, x in enumerate(inputs)) / len(inputs)

    first = calib_loss()
    opt = torch.optim.Adam(params, lr=lr)
    it = bar(range(epochs * len(inputs)), desc="gqsa e2e", unit="step", enabled=progress)
    for step in it:
        j = step % len(inputs)
        with torch.enable_grad():
            loss = _loss(main_tensor(tuned.call(*inputs[j])), ref(j), kl)
            if not torch.isfinite(loss):
                raise CalibrationError(f"gqsa: the end-to-end loss became {loss.detach().item()}: lower e2e_lr or check the calibration data")
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()
        if hasattr(it, "set_postfix"):
            it.set_postfix(loss=f"{loss.detach().item():.4g}")
    last = calib_loss()
    kept = last < first
    if kept:
        by_name = {n.name: n for n in nodes}
        with torch.no_grad():
            for name, mod in mods.items():
                target = LinearQArgs.of(by_name[name]).scales.target
                program.replace_attr(target, mod.scales().to(mod.dtype))
    return {"loss_init": first, "loss": last, "kept": kept}
