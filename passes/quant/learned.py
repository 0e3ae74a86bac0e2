"""The base and the block-by-block driver of the learned-transform quantization passes
(``affinequant``, ``flatquant``).

:func:`run_blockwise` walks the transformer blocks with :class:`lowc.passes.blockwise.BlockwiseRunner`
(float targets; inputs from the float model, ``propagate="float"``, or from the already quantized
blocks, ``"both"``). For each block holding a linear to quantize it

1. classifies the block's float linear groups (:func:`lowc.ir.analysis.block_groups`), checks the
   calibration values are finite and measures each group's per-channel input maximum on the float
   stream (:func:`lowc.passes.quant.blocktrain.input_absmax`);
2. asks the pass for a :class:`lowc.passes.quant.plan.BlockPlan`
   (``make_plan(program, block_index, groups, amax, targets)``);
3. patches the plan's modules into a copy of the block and trains them
   (:func:`lowc.passes.quant.blocktrain.train_block`);
4. :func:`apply_plan`: folds the trained transforms into the program and writes each linear's
   effective weight, which the driver then quantizes into ``lowc::linear_wq``: round-to-nearest with
   the learned clipping (the codes the training rounded to) or, with ``gptq``, GPTQ on Hessians of the
   trained block's (transformed, fake-quantized) inputs.

Target linears no plan covers get RTN, logged: those outside transformer blocks (BERT's pooler) and
those sharing their input with a linear another pass already compressed.

Preconditions: calibration data (raises otherwise); the program is annotated and has transformer
blocks. Idempotent: a second run finds no float linear to quantize and reports ``changed=False``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
import torch.fx

from lowc.ir import meta as nodemeta
from lowc.ir.analysis import block_groups, linear_layer
from lowc.ir.dialect import quant
from lowc.ir.dialect.args import LinearArgs
from lowc.passes.base import PassResult
from lowc.passes.blockwise import BlockwiseRunner
from lowc.passes.quant.blocktrain import (
    check_finite,
    collect_hessians,
    input_absmax,
    patch_linears,
    to_device,
    train_block,
)
from lowc.passes.quant.common import (
    WeightQuantPass,
    rewrite_linear,
    rtn_fallback,
)
from lowc.passes.quant.fakequant import QLinear, cached_weights
from lowc.passes.quant.gptq import gptq_quantize
from lowc.passes.quant.plan import BlockPlan

#: quantize(node, module, weight) -> the packed weight, or None to keep the (transformed) float weight
Quantizer = Callable[[torch.fx.Node, QLinear, torch.Tensor], "quant.QuantizedWeight | None"]


@dataclass(frozen=True)
class LearnedQuantPass(WeightQuantPass):
    """Base of the learned-transform passes: they need calibration data and share the checks of the
    training options (``epochs``, the learning rates named by ``lr_options``, ``alpha``,
    ``batch_size``: fields of the subclass)."""

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


def act_bits(ctx) -> int:
    """Bits of the target's activation quantization (16: float activations)."""
    return ctx.scheme.a_bits if ctx.scheme is not None else 16


@torch.no_grad()
def apply_plan(program, plan: BlockPlan, quantize: Quantizer) -> list[tuple[torch.fx.Node, quant.QuantizedWeight]]:
    """Move a trained plan into the program: refresh its transforms, :meth:`BlockPlan.fold` them, and
    write each patched linear's effective bias, and its effective weight where ``quantize`` returns
    None. Returns the ``(node, packed weight)`` pairs ``quantize`` produced, for the caller to rewrite
    into ``lowc::linear_wq`` (the nodes are still ``aten.linear``)."""
    plan.refresh()
    weights = {name: [m.effective_weight(), m.effective_bias()] for name, m in plan.modules.items()}
    plan.fold(program, weights)
    by_name = {n.name: n for n in program.graph.nodes}
    out = []
    for name, mod in plan.modules.items():
        node = by_name[name]
        w, b = weights[name]
        lin = LinearArgs.of(node)
        bias = lin.bias
        if b is not None and isinstance(bias, torch.fx.Node):
            old = program.attr(bias.target)
            program.replace_attr(bias.target, b.to(device=old.device, dtype=old.dtype))
        qw = quantize(node, mod, w)
        if qw is None:
            old = program.attr(lin.weight.target)
            program.replace_attr(lin.weight.target, w.to(device=old.device, dtype=old.dtype))
        else:
            out.append((node, qw))
    return out


def _log_list(ctx, what: str, items: list[str], shown: int) -> None:
    ctx.log.append(f"{what}: " + ", ".join(items[:shown]) + ("..." if len(items) > shown else ""))


def run_blockwise(p: LearnedQuantPass, program, ctx, *, propagate: str, make_plan: Callable[..., BlockPlan],
                  train: dict, aug_loss: bool = False, gptq: dict | None = None) -> PassResult:
    """The shared driver of ``affinequant``/``flatquant`` (module docstring). ``train``: keywords of
    :func:`train_block`. ``aug_loss``: also fit the float block run on the training inputs
    (AffineQuant's augmented loss). ``gptq``: quantize the transformed (and clipped) weights with
    GPTQ (options of :func:`lowc.passes.quant.gptq.gptq_quantize`) instead of rounding them."""
    ctx.require("calibration", p.name)
    s = p.scheme(ctx)
    targets = {n.name for n in p.select(program)}
    if not targets:
        return PassResult(changed=False, stats={"quantized": 0})
    torch.manual_seed(ctx.seed)
    device = torch.device(ctx.device)
    runner = BlockwiseRunner(program, ctx.calib, device=ctx.device, progress=ctx.progress, desc=p.name, propagate=propagate)
    done, losses, losses_init, notes, padded, skipped = 0, [], [], [], [], []
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
        amax = input_absmax(fm, [g.linears[0].name for g in groups], float_inputs, device, where)
        plan = make_plan(program, block.index, groups, amax, targets)
        train_inputs = block.inputs
        extra = None
        if aug_loss:
            with torch.no_grad():
                extra = [tuple(v.detach() for v in fm(*to_device(x, device))) for x in train_inputs]
        patch_linears(fm, plan.modules)
        postfix = (lambda l, _b=block: runner.set_postfix(block=_b.index, loss=f"{l:.4g}")) if ctx.progress else None
        info = train_block(fm, plan.param_groups, train_inputs, block.float_outputs, device=device, refresh=plan.refresh,
                           on_epoch=plan.on_epoch, extra_targets=extra, postfix=postfix, where=where, **train)
        del extra
        if propagate == "both":
            with torch.no_grad(), cached_weights(fm):
                plan.refresh()
                block.set_outputs([tuple(v.detach() for v in fm(*to_device(x, device))) for x in train_inputs])
        quantized = {name: m for name, m in plan.modules.items() if name in targets and m.wq is not None}
        hessians = collect_hessians(fm, quantized, train_inputs, device, plan.refresh) if gptq is not None else {}

        def quantize(node, mod, w):
            if node.name not in quantized:
                return None
            weight = program.attr(LinearArgs.of(node).weight.target)
            dtype = weight.dtype
            if node.name in hessians:
                qw, _ = gptq_quantize(mod.wq.clip_weight(w).to(dtype), hessians[node.name], s.w_bits, s.group_size,
                                      s.symmetric, name=linear_layer(node), **gptq)
            else:
                qw = mod.wq.quantize(w, dtype=dtype)
            dev = weight.device
            return quant.QuantizedWeight(qw.qweight.to(dev), qw.scales.to(dev), None if qw.zeros is None else qw.zeros.to(dev),
                                         qw.bits, qw.group_size, qw.in_features)

        for node, qw in apply_plan(program, plan, quantize):
            if qw.k_pad != qw.in_features:
                padded.append(linear_layer(node))
            rewrite_linear(program, node, qw, s, f"{p.name}+gptq" if node.name in hessians else p.name)
            done += 1
        notes.extend(plan.notes)
        skipped.extend(plan.skipped)
        losses.append(info["loss"])
        losses_init.append(info["loss_init"])
        runner.set_postfix(block=block.index, loss=f"{info['loss']:.4g}")
        del fm, plan, hessians
    runner.close()
    # targets no plan covered: outside transformer blocks (BERT's pooler), or in a block but sharing
    # their input with a linear another pass compressed (block_groups leaves that group out)
    rest = [n for n in p.select(program) if n.name in targets]
    outside = [n for n in rest if nodemeta.get(n).block is None]
    rtn_fallback(program, rest, s)
    if outside:
        ctx.log.append(f"{p.name}: {len(outside)} linear(s) outside transformer blocks quantized with RTN: "
                       + ", ".join(linear_layer(n) for n in outside[:4]))
    inside = [linear_layer(n) for n in rest if nodemeta.get(n).block is not None]
    if inside:
        _log_list(ctx, f"{p.name}: {len(inside)} linear(s) share their input with an already compressed linear, "
                  "so no transform was learned for them; quantized with RTN", inside, 4)
    if notes:
        ctx.log.append(f"{p.name}: " + "; ".join(dict.fromkeys(notes)))
    if skipped:
        _log_list(ctx, f"{p.name}: {len(skipped)} norm(s) also feed the residual (post-norm), so their smoothing "
                  "scale stays in an online lowc::kron_transform", skipped, 3)
    if padded:
        _log_list(ctx, f"{p.name}: {len(padded)} layer(s) padded to a multiple of group_size={s.group_size}", padded, 4)
    program.graph.eliminate_dead_code()
    program.remove_dead()
    stats = {"quantized": done, "rtn_outside_blocks": len(outside), "bits": s.w_bits, "group_size": s.group_size,
             "symmetric": s.symmetric, "a_bits": act_bits(ctx), "samples": len(ctx.calib),
             "block_loss": [round(l, 6) for l in losses], "block_loss_init": [round(l, 6) for l in losses_init],
             "epochs": train.get("epochs")}
    if padded:
        stats["padded"] = padded
    if inside:
        stats["rtn_in_blocks"] = len(inside)
    return PassResult(changed=bool(done or rest), stats=stats)
