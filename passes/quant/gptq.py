"""``gptq``: Hessian-based weight quantization (Frantar et al., 2022, "GPTQ").

For each linear, ``H = 2/n · Σ x xᵀ`` is accumulated over the calibration tokens reaching it
(through :class:`lowc.passes.blockwise.BlockwiseRunner`, one transformer block at a time, so
calibration memory does not grow with depth). Columns are quantized one at a time; each column's
rounding error, scaled by the Cholesky factor of ``H⁻¹``, is pushed onto the columns not yet
quantized, which minimises ``‖XWᵀ − XŴᵀ‖²`` greedily. As in the paper:

* dead columns (``H_ii = 0``) get ``H_ii = 1`` and a zero weight;
* dampening ``H += λ·mean(diag H)·I`` (``damp``, default 0.01); if ``H`` is still not positive
  definite the damping is multiplied by 10 and the layer retried (a warning names the layer);
* columns in blocks of ``block_size`` (128) with lazy batch updates: inside a block, column updates
  touch only the block; the accumulated error updates the rest of the matrix once per block;
* groups: scale/zero are computed from the (already updated) columns when a group starts;
* ``act_order``: columns in order of decreasing ``H_ii``, with a *static group map*: group
  parameters are computed up front on the original column order, so the packed layout stays
  contiguous and any kernel reads it unchanged.
* ``true_sequential`` (default, as AutoGPTQ): within a block, linears sharing an input are
  quantized together, in graph order (q/k/v, then o, then gate/up, then down); each later group's
  Hessian is measured with the earlier groups already quantized. Blocks are sequential too: block
  i+1 is calibrated on the outputs of quantized block i.
* pruned layers (``prune`` ran before, see :mod:`lowc.passes.quant.prune`): their zero weights are
  held at 0 (stored as the group's zero point, so they dequantize to exactly 0) while the sweep
  pushes their rounding error, like any other, onto the columns not yet quantized. Without this
  the error feedback would refill them. Group ranges are computed from the kept weights.

The column sweep is :func:`obs_sweep`, shared with SparseGPT (which chooses the zeros as it goes).

Inner loops are vectorised over output rows (one column step is a rank-1 update of the block).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lowc.errors import CalibrationError
from lowc.ir import meta as nodemeta
from lowc.ir.analysis import linear_input, linear_layer
from lowc.ir.dialect import quant
from lowc.passes.base import PassContext, PassResult, opt
from lowc.passes.blockwise import BlockwiseRunner
from lowc.passes.quant.common import (
    MixedBitsPass,
    linear_weight,
    rewrite_linear,
    rtn_fallback,
)


def _qparams(w: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale and zero of a [N, g] slice (fp32)."""
    return quant.compute_qparams(w, bits, symmetric)


#: SparseGPT's adaptive mask selection (:mod:`lowc.passes.quant.prune`): called before each column
#: ``i`` of a block with the block's current weights ``W1``, the diagonal of its ``H⁻¹`` Cholesky
#: factor and the block's mask (True = pruned), which it may extend for columns ``i`` onwards
Select = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, int], None]


def inverse_hessian_factor(H: torch.Tensor, damp: float, max_retries: int = 6, name: str = "layer",
                           what: str = "gptq") -> tuple[torch.Tensor, float]:
    """The upper Cholesky factor of ``(H + λ·mean(diag H)·I)⁻¹`` and the λ used (``damp``, raised
    ×10 per retry while the matrix is not positive definite); ``H`` has no dead columns left."""
    k = H.shape[0]
    lam = damp
    mean_diag = torch.mean(torch.diag(H)).item()
    retries = 0
    while True:
        Hd = H + lam * mean_diag * torch.eye(k, device=H.device)
        L, info = torch.linalg.cholesky_ex(Hd)
        if info.item() == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info.item() == 0 and torch.isfinite(U).all():
                break
        retries += 1
        if retries > max_retries:
            raise CalibrationError(f"{what}: {name}: the Hessian is not positive definite even with damping {lam:g}")
        lam *= 10
    if retries:
        warnings.warn(f"{what}: {name}: Hessian not positive definite; damping raised to {lam:g}", stacklevel=3)
    return U, lam


def effective_block(block_size: int, group_size: int | None) -> int:
    """Columns per block of the sweep: blocks hold whole quantization groups (``group_size``; None
    when not quantizing or per-channel), so a group never starts on columns missing in-block updates."""
    return block_size if group_size is None or group_size == -1 else max(group_size, (block_size // group_size) * group_size)


def obs_sweep(weight: torch.Tensor, hessian: torch.Tensor, bits: int | None, group_size: int, symmetric: bool,
              *, act_order: bool = False, damp: float = 0.01, block_size: int = 128, max_retries: int = 6,
              name: str = "layer", mask: torch.Tensor | None = None, select: Select | None = None,
              what: str = "gptq") -> dict:
    """The column sweep GPTQ and SparseGPT share, on one ``[N, K]`` weight with Hessian ``[K, K]``:
    each column is replaced by its quantized value (``bits``; ``None``: kept in float) or by 0 where
    the mask says pruned, and the error, scaled by ``H⁻¹``'s Cholesky factor, is pushed onto the
    columns to its right. ``mask`` (``[N, K]``, True = pruned) fixes pruned weights up front (GPTQ
    after ``prune``); ``select`` chooses them block by block as the sweep goes (SparseGPT). A pruned
    weight is stored as the group's zero point, so it dequantizes to exactly 0.

    Returns ``Q`` (codes ``[N, K]``, or the float weights when ``bits`` is None), ``scales``/``zeros``
    ``[N, G]`` (quantizing), ``mask`` (or None), ``loss`` and the ``damp`` used."""
    W = weight.detach().float().clone()
    n, k = W.shape
    H = hessian.detach().float().to(W.device).clone()
    if not torch.isfinite(H).all():
        raise CalibrationError(f"{what}: {name}: the Hessian has NaN/inf entries (non-finite calibration activations)")
    quantizing = bits is not None
    maxq = (1 << bits) - 1 if quantizing else 0
    gs, k_pad = quant.padded_in_features(k, group_size)
    n_groups = k_pad // gs
    pruning = mask is not None or select is not None
    M = mask.to(W.device).clone() if mask is not None else torch.zeros(n, k, dtype=torch.bool, device=W.device)

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    # static group parameters (act_order) / per-channel parameters are fixed before any update
    static = None
    if quantizing and (act_order or group_size == -1):
        Wp = torch.nn.functional.pad(W.masked_fill(M, 0), (0, k_pad - k)).reshape(n, n_groups, gs)
        static = _qparams(Wp, bits, symmetric)  # each [N, G]
    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H, M = W[:, perm], H[perm][:, perm], M[:, perm]
        invperm = torch.argsort(perm)

    Hinv, lam = inverse_hessian_factor(H, damp, max_retries, name, what)

    bs = effective_block(block_size, gs if quantizing and group_size != -1 else None)
    scales = torch.empty(n, n_groups, device=W.device)
    zeros = torch.empty(n, n_groups, device=W.device)
    if static is not None:
        scales, zeros = static
    Q = torch.empty_like(W)
    losses = torch.zeros(n, device=W.device)
    cur_s = cur_z = None
    for i1 in range(0, k, bs):
        i2 = min(i1 + bs, k)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        M1 = M[:, i1:i2]  # a view: selections land in M
        for i in range(i2 - i1):
            col = i1 + i
            if select is not None:
                select(W1, torch.diag(Hinv1), M1, i, col)
            w = W1[:, i]
            d = Hinv1[i, i]
            if not quantizing:
                deq = w.masked_fill(M1[:, i], 0) if pruning else w
                Q1[:, i] = deq
            else:
                if act_order:
                    g = int(perm[col]) // gs
                    s, z = scales[:, g], zeros[:, g]
                elif group_size == -1:
                    s, z = scales[:, 0], zeros[:, 0]
                else:
                    if col % gs == 0:
                        # the group's range from the weights it keeps (pruned ones chosen so far read as 0)
                        cur_s, cur_z = _qparams(W1[:, i : i + gs].masked_fill(M1[:, i : i + gs], 0), bits, symmetric)
                        scales[:, col // gs], zeros[:, col // gs] = cur_s, cur_z
                    s, z = cur_s, cur_z
                q = (w / s).round_().add_(z).clamp_(0, maxq)
                if pruning:
                    q = torch.where(M1[:, i], z, q)
                deq = (q - z).mul_(s)
                Q1[:, i] = q
            err = (w - deq).div_(d)
            Err1[:, i] = err
            W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1)  # the rank-1 update of the columns to the right
        losses += Err1.pow(2).sum(1) / 2  # (w - deq)² / d² / 2 per column
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    if act_order:
        Q, M = Q[:, invperm], M[:, invperm]
    return {"Q": Q, "scales": scales, "zeros": zeros, "mask": M if pruning else None,
            "loss": losses.sum().item(), "row_loss": losses, "damp": lam, "k_pad": k_pad, "group_size": gs}


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                  *, act_order: bool = False, damp: float = 0.01, block_size: int = 128, max_retries: int = 6,
                  name: str = "layer", mask: torch.Tensor | None = None, select: Select | None = None,
                  what: str = "gptq") -> tuple[quant.QuantizedWeight, dict]:
    """GPTQ on one ``[N, K]`` weight with Hessian ``[K, K]`` (fp32 math on the weight's device);
    ``mask``/``select``: weights held at 0, see :func:`obs_sweep`."""
    r = obs_sweep(weight, hessian, bits, group_size, symmetric, act_order=act_order, damp=damp,
                  block_size=block_size, max_retries=max_retries, name=name, mask=mask, select=select, what=what)
    qw = _packed(r["Q"], r["scales"], r["zeros"], r["k_pad"], r["group_size"], weight.shape[1], bits, symmetric, weight.dtype)
    return qw, {"loss": r["loss"], "damp": r["damp"], "mask": r["mask"]}


def _packed(Q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, k_pad: int, gs: int, k: int, bits: int,
            symmetric: bool, dtype: torch.dtype) -> quant.QuantizedWeight:
    n = Q.shape[0]
    codes = torch.empty(n, k_pad, device=Q.device)
    codes[:, :k] = Q
    if k_pad > k:  # padded columns store the zero point: they dequantize to exactly 0
        codes[:, k:] = zeros[:, -1:].expand(n, k_pad - k)
    return quant.from_codes(codes, scales, zeros, bits, gs, k, symmetric, dtype)


def gptq_quantize_shared(weights: list[torch.Tensor], hessian: torch.Tensor, bits: int, group_size: int,
                         symmetric: bool, *, masks: list[torch.Tensor | None] | None = None, name: str = "layers",
                         **options) -> list[tuple[quant.QuantizedWeight, dict]]:
    """GPTQ on several ``[N_i, K]`` weights that read the same input, so share one Hessian (q/k/v,
    gate/up): their rows are stacked into one sweep. Each row's sweep depends only on that row and
    ``H``, so this gives each weight what :func:`gptq_quantize` gives it alone, with one Cholesky
    factorisation and one column loop instead of one per weight (options as :func:`gptq_quantize`)."""
    if len(weights) == 1:
        return [gptq_quantize(weights[0], hessian, bits, group_size, symmetric, mask=masks[0] if masks else None,
                              name=name, **options)]
    masks = masks or [None] * len(weights)
    mask = None
    if any(m is not None for m in masks):
        mask = torch.cat([m if m is not None else torch.zeros(w.shape, dtype=torch.bool, device=w.device)
                          for w, m in zip(weights, masks)])
    stacked = torch.cat([w.detach().float() for w in weights])
    r = obs_sweep(stacked, hessian, bits, group_size, symmetric, mask=mask, name=name, **options)
    out, row = [], 0
    for w, m in zip(weights, masks):
        rows = slice(row, row + w.shape[0])
        row += w.shape[0]
        qw = _packed(r["Q"][rows], r["scales"][rows], r["zeros"][rows], r["k_pad"], r["group_size"], w.shape[1], bits,
                     symmetric, w.dtype)
        out.append((qw, {"loss": r["row_loss"][rows].sum().item(), "damp": r["damp"],
                         "mask": r["mask"][rows] if m is not None else None}))
    return out


def stage_hessians(block, stage: list, what: str = "gptq", diagonal: bool = False) -> dict[str, torch.Tensor]:
    """``H = 2/n · Σ x xᵀ`` over the calibration tokens reaching each linear of ``stage`` (run
    through ``block``), keyed by linear node name; linears sharing an input share one tensor.
    ``diagonal``: only ``diag H`` (``[K]``, what Wanda's ``‖X_j‖₂²`` needs)."""
    hess: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    key_of = {n.name: linear_input(n).name for n in stage}
    first_of_key: dict[str, str] = {}
    for nm, key in key_of.items():
        first_of_key.setdefault(key, nm)

    def hook(name, x, y):
        key = key_of[name]
        x = x.reshape(-1, x.shape[-1]).float()
        h = hess.get(key)
        c = counts.get(key, 0)
        m = x.shape[0]
        if h is None:
            h = torch.zeros(x.shape[-1], device=x.device) if diagonal else torch.zeros(x.shape[-1], x.shape[-1], device=x.device)
        if diagonal:
            h.mul_(c / (c + m)).add_(x.pow(2).sum(0), alpha=2.0 / (c + m))
        else:
            h.addmm_(x.t(), x, beta=c / (c + m), alpha=2.0 / (c + m))
        hess[key], counts[key] = h, c + m

    # one tap per shared input: the other linears reading it need not run
    block.run(hook, nodes=list(first_of_key.values()))
    for key, name in first_of_key.items():  # NaN/inf in any activation reaches its sum (once, not per batch)
        if key in hess and not torch.isfinite(hess[key]).all():
            raise CalibrationError(f"{what}: non-finite activations reach {name} in calibration")
    return {nm: hess[key] for nm, key in key_of.items()}


#: calibration tokens run together in block-wise calibration (samples batched up to this many tokens)
CALIB_BATCH_TOKENS = 2048


def calibration_batch(calib) -> int:
    """Samples per block-wise calibration batch: as many as fit in :data:`CALIB_BATCH_TOKENS` tokens
    (the Hessian sums are the same up to rounding; fewer, larger matmuls and Python steps)."""
    samples = list(getattr(calib, "samples", calib) or [])
    longest = max((int(s.shape[-1]) for s in samples), default=1)
    return max(1, CALIB_BATCH_TOKENS // longest)


def sequential_stages(nodes: list, true_sequential: bool) -> list[list]:
    """A block's linears in calibration stages: groups sharing an input, in graph order
    (``true_sequential``), or all at once."""
    return shared_input_groups(nodes) if true_sequential else [nodes]


def shared_input_groups(stage: list) -> list[list]:
    """The linears of ``stage`` grouped by the value they read (in order): each group shares one
    Hessian, so :func:`gptq_quantize_shared` quantizes it in one sweep."""
    groups: dict[str, list] = {}
    for n in stage:
        groups.setdefault(linear_input(n).name, []).append(n)
    return list(groups.values())


@dataclass(frozen=True)
class GPTQ(MixedBitsPass):
    name = "gptq"
    requires = frozenset({"calibration"})
    summary = "GPTQ: Hessian-based weight quantization, block by block over calibration data"

    act_order: bool = opt(False, "quantize columns in decreasing Hessian-diagonal order (static group map)")
    damp: float = opt(0.01, "dampening λ: H += λ·mean(diag H)·I (raised ×10 and retried if H is not PD)")
    block_size: int = opt(128, "columns per lazy-update block")
    true_sequential: bool = opt(True, "within a block, quantize linear groups in order, each measured after the previous")

    def validate(self) -> None:
        super().validate()
        if not 0 < self.damp < 1:
            raise self.fail(f"damp={self.damp}: choose 0 < damp < 1")
        if self.block_size < 1:
            raise self.fail(f"block_size={self.block_size}: must be positive")

    def run(self, program, ctx: PassContext) -> PassResult:
        s = self.scheme(ctx)
        self.check_layers(program)
        targets = {n.name for n in self.select(program)}
        if not targets:
            return PassResult(changed=False, stats={"quantized": 0})
        torch.manual_seed(ctx.seed)
        runner = BlockwiseRunner(program, ctx.calib, device=ctx.device, progress=ctx.progress, desc="gptq",
                                 batch=calibration_batch(ctx.calib))
        done, total_loss, padded = 0, 0.0, []
        for block in runner:
            mine = [n for n in block.linears() if n.name in targets]
            if not mine:
                continue
            block_loss = 0.0
            for stage in sequential_stages(mine, self.true_sequential):
                hess = stage_hessians(block, stage)
                for group in shared_input_groups(stage):
                    ws = [linear_weight(program, n) for n in group]
                    # a pruned layer keeps its zeros: GPTQ's error feedback would refill them
                    masks = [(w == 0) if nodemeta.pruned(nodemeta.get(n)) else None for n, w in zip(group, ws)]
                    # linears sharing an input are swept together when they share a scheme (a search
                    # recipe may give q, k and v different widths)
                    by_scheme: dict = {}
                    for i, n in enumerate(group):
                        by_scheme.setdefault(self.layer_scheme(s, linear_layer(n)), []).append(i)
                    for sn, idx in by_scheme.items():
                        sub = [group[i] for i in idx]
                        sub_name = ", ".join(linear_layer(n) for n in sub)
                        results = gptq_quantize_shared([ws[i] for i in idx], hess[group[0].name], sn.w_bits,
                                                       sn.group_size, sn.symmetric, masks=[masks[i] for i in idx],
                                                       act_order=self.act_order, damp=self.damp,
                                                       block_size=self.block_size, name=sub_name)
                        if results[0][1]["damp"] != self.damp:
                            ctx.log.append(f"gptq: {sub_name}: Hessian not positive definite; damping raised to "
                                           f"{results[0][1]['damp']:g}")
                        for node, (qw, info) in zip(sub, results):
                            if qw.k_pad != qw.in_features:
                                padded.append(linear_layer(node))
                            rewrite_linear(program, node, qw, sn, "gptq")
                            block_loss += info["loss"]
                            done += 1
                hess.clear()
            total_loss += block_loss
            runner.set_postfix(loss=f"{block_loss:.4g}")
        runner.close()
        # linears outside transformer blocks (e.g. BERT's pooler) see no block-wise calibration:
        # they get RTN at the same scheme, and the log says so
        rest = [n for n in self.select(program) if n.name in targets]
        for n in rest:
            rtn_fallback(program, [n], self.layer_scheme(s, linear_layer(n)))
        if rest:
            ctx.log.append(f"gptq: {len(rest)} linear(s) outside transformer blocks quantized with RTN: "
                           + ", ".join(linear_layer(n) for n in rest[:4]))
        program.remove_dead()
        stats = {"quantized": done, "rtn_outside_blocks": len(rest), "bits": s.w_bits, "group_size": s.group_size, "symmetric": s.symmetric,
                 "loss": round(total_loss, 6), "samples": len(ctx.calib)}
        if padded:
            stats["padded"] = padded
        return PassResult(changed=done > 0, stats=stats)
