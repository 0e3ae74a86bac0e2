"""Training a block copy against its float outputs, for the learned-transform passes.

The block is a GraphModule copy from :meth:`lowc.passes.blockwise.CalibrationBlock.module` (the
program's graph is never touched here). :func:`patch_linears` swaps its ``aten.linear`` nodes for
:class:`lowc.passes.quant.fakequant.QLinear` modules; :func:`train_block` fits their trainable
parameters (AdamW; every other tensor frozen) to the MSE between the patched block's outputs and the
float block's, mini-batch by mini-batch, with optional cosine schedule and ``loss / loss.detach()``
normalisation (FlatQuant), an epoch callback (AffineQuant's gradual mask), deterministic order.
:func:`input_absmax` and :func:`collect_hessians` measure what the linears of a copy read.

Preconditions: the block's inputs are the per-sample tuples the runner stores (batch 1 each);
samples of one mini-batch are accumulated (their losses averaged before one optimizer step, which is
the gradient of the batched loss).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx
import torch.nn.functional as F

from lowc.errors import CalibrationError
from lowc.passes.blockwise import Tapping
from lowc.passes.quant.fakequant import QLinear, cached_weights
from lowc.passes.quant.transforms import update_absmax


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


@torch.no_grad()
def input_absmax(gm: torch.fx.GraphModule, names: Iterable[str], inputs: Sequence[tuple], device, where: str) -> dict[str, torch.Tensor]:
    """Per-channel ``max |x|`` of the inputs of the linears ``names`` (program node names) of a block
    copy over every sample (fp32, on CPU). Raises CalibrationError on non-finite activations."""
    out: dict[str, torch.Tensor] = {}
    tap = Tapping(gm, names, lambda name, x, y: update_absmax(out, name, x, where))
    for sample in inputs:
        tap.run(*to_device(sample, device))
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


def to_device(sample: tuple, device) -> list:
    """A stored sample's values, tensors moved to ``device``."""
    return [v.to(device) if isinstance(v, torch.Tensor) else v for v in sample]


def mse(out: Any, target: tuple) -> torch.Tensor:
    """The mean over the block's floating outputs of each output's MSE to its target (fp32)."""
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
                total += float(mse(gm(*to_device(x, device)), to_device(t, device)))
    return total / max(len(inputs), 1)


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
                        out = gm(*to_device(inputs[j], device))
                        l = mse(out, to_device(targets[j], device))
                        if extra_targets is not None:
                            l = l + mse(out, to_device(extra_targets[j], device))
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


@torch.no_grad()
def collect_hessians(gm: torch.fx.GraphModule, modules: dict[str, QLinear], inputs: Sequence[tuple], device,
                     refresh: Callable[[], None] | None = None) -> dict[str, torch.Tensor]:
    """``H = 2/n Σ x xᵀ`` (fp32) of the input each of ``modules`` (patched into the block copy ``gm``)
    multiplies, after its transform and activation fake-quant, over every sample. ``refresh()``
    recomputes the transforms first."""
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

    for name, m in modules.items():
        m.tap = tap(name)
    try:
        if refresh is not None:
            refresh()
        with cached_weights(gm):
            for x in inputs:
                gm(*to_device(x, device))
    finally:
        for m in modules.values():
            m.tap = None
    return hess
