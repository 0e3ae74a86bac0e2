"""What every weight-quantizing method pass shares: the scheme options (``bits``, ``group_size``,
``symmetric``, ``ignore``; taken from the target unless given), selecting the linears to quantize,
and rewriting an ``aten.linear`` node into ``lowc::linear_wq``.

``ignore`` patterns match a layer (module path such as ``model.layers.0.mlp.down_proj``, see
:func:`lowc.ir.analysis.linear_layer`) when the pattern equals it, is a dotted suffix of it
(``lm_head``, ``mlp.down_proj``), or matches it as a shell glob (``model.layers.0.*``). Embeddings are
never linears, so they are never quantized here. A selected linear whose weight is not 2-D cannot be
packed: :func:`quantize_linears` leaves it in float, counts it as skipped and logs it by layer.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.fx

from lowc.ir import meta as nodemeta
from lowc.ir.analysis import linear_layer
from lowc.ir.dialect import ensure_registered, quant, sparse
from lowc.ir.dialect.args import LinearArgs
from lowc.ir.scheme import Scheme
from lowc.passes.base import Pass, PassContext, opt
from lowc.progress import bar

VALID_GROUP_SIZES = "-1 (per channel) or a multiple of 8 such as 32, 64, 128"


def matches(layer: str, patterns: tuple[str, ...]) -> bool:
    for p in patterns:
        if layer == p or layer.endswith("." + p) or fnmatch.fnmatchcase(layer, p):
            return True
    return False


@dataclass(frozen=True)
class WeightQuantPass(Pass):
    """Base of weight-quantizing passes. Options left unset come from the target's scheme."""

    bits: Optional[int] = opt(None, "weight bits, 1..8 (default: the target's)")
    group_size: Optional[int] = opt(None, f"input channels per scale: {VALID_GROUP_SIZES} (default: the target's)")
    symmetric: Optional[bool] = opt(None, "symmetric (absmax, fixed zero point) or asymmetric min/max (default: the target's)")
    ignore: tuple[str, ...] = opt(("lm_head",), "layers left in float: names, dotted suffixes or globs")

    # defaults when neither the options nor the target say (e.g. on ref-fp32)
    default_bits = 4
    default_group_size = 128
    default_symmetric = False

    def validate(self) -> None:
        if self.bits is not None and not 1 <= self.bits <= 8:
            raise self.fail(f"bits={self.bits} cannot be packed: choose 1..8")
        if self.group_size is not None and not (self.group_size == -1 or (self.group_size > 0 and self.group_size % 8 == 0)):
            raise self.fail(f"group_size={self.group_size} cannot be packed: use {VALID_GROUP_SIZES}")

    def scheme(self, ctx: PassContext) -> Scheme:
        """The weight-only scheme this pass stores: its options over the target's scheme, over the
        pass defaults where the target has none (activations are a lowering's business)."""
        return Scheme.resolve(ctx.scheme, w_bits=self.bits, group_size=self.group_size, symmetric=self.symmetric,
                              fallback=Scheme(self.default_bits, self.default_group_size, self.default_symmetric)
                              ).with_(a_bits=16, a_static=None)

    def select(self, program) -> list[torch.fx.Node]:
        """Float linears this pass should quantize (not ignored, weight is a constant)."""
        out = []
        for node in program.linears():
            if not matches(linear_layer(node), self.ignore):
                out.append(node)
        return out

    def layer_scheme(self, s: Scheme, layer: str) -> Scheme:
        """The scheme of one layer (the pass's own here; :class:`MixedBitsPass` overrides it per layer)."""
        return s

    def check_layers(self, program) -> None:
        """Raise if the options name layers the program does not have (see :class:`MixedBitsPass`)."""


@dataclass(frozen=True)
class MixedBitsPass(WeightQuantPass):
    """A weight-quantizing pass that also takes per-layer bits (and group sizes): what a search
    recipe (``lowc search``) compiles to, e.g. ``gptq{layer_bits=[model.layers.0.mlp.down_proj=3/128,...]}``.
    Layers it does not name get the pass's scheme; naming a layer the pass would not quantize (not in
    the model, or ignored) is an error naming it."""

    layer_bits: tuple[str, ...] = opt((), "per-layer 'layer=bits' or 'layer=bits/group_size' (a search recipe's levels)")

    def validate(self) -> None:
        super().validate()
        self.overrides()

    def overrides(self) -> dict[str, tuple[int, int | None]]:
        out: dict[str, tuple[int, int | None]] = {}
        for item in self.layer_bits:
            layer, _, spec = item.partition("=")
            bits, _, gs = spec.partition("/")
            try:
                b, g = int(bits), (int(gs) if gs else None)
            except ValueError:
                raise self.fail(f"layer_bits entry {item!r}: expected layer=bits or layer=bits/group_size") from None
            if not layer or layer in out:
                raise self.fail(f"layer_bits entry {item!r}: {'no layer name' if not layer else 'layer given twice'}")
            if not 1 <= b <= 8:
                raise self.fail(f"layer_bits entry {item!r}: bits={b} cannot be packed: choose 1..8")
            if g is not None and not (g == -1 or (g > 0 and g % 8 == 0)):
                raise self.fail(f"layer_bits entry {item!r}: group_size={g}: use {VALID_GROUP_SIZES}")
            out[layer] = (b, g)
        return out

    def layer_scheme(self, s: Scheme, layer: str) -> Scheme:
        o = self.overrides().get(layer)
        if o is None:
            return s
        return s.with_(w_bits=o[0], group_size=s.group_size if o[1] is None else o[1])

    def check_target(self, target) -> None:
        lo, hi = getattr(target, "weight_bits", (1, 8))
        bad = sorted((b, layer) for layer, (b, _) in self.overrides().items() if not lo <= b <= hi)
        if bad:
            raise self.fail(f"layer_bits gives {bad[0][1]} {bad[0][0]} bits; target '{target.name}' takes {lo}..{hi}-bit "
                            f"weights ({len(bad)} such layer(s)): search with levels in that range")

    def check_layers(self, program) -> None:
        names = set(self.overrides())
        if not names:
            return
        known = {linear_layer(n) for n in self.select(program)}
        unknown = sorted(names - known)
        if unknown:
            raise self.fail(f"layer_bits names layer {unknown[0]}, which the model does not have or ignore= leaves "
                            f"in float ({len(unknown)} such layer(s))")


def linear_weight(program, node: torch.fx.Node) -> torch.Tensor:
    """The constant weight of ``aten.linear(x, W, b)``."""
    return program.attr(LinearArgs.of(node).weight.target)


def linear_bias(program, node: torch.fx.Node) -> torch.Tensor | None:
    """The constant bias of ``aten.linear(x, W, b)``, or None when it has none."""
    bias = LinearArgs.of(node).bias
    return program.attr(bias.target) if isinstance(bias, torch.fx.Node) else None


def rewrite_linear(program, node: torch.fx.Node, qw: quant.QuantizedWeight | sparse.SparseQuantizedWeight,
                   scheme: Scheme, method: str) -> torch.fx.Node:
    """Replace ``aten.linear(x, W, b)`` by ``lowc::linear_wq(x, qweight, scales, zeros, b, ...)``, or by
    ``lowc::linear_gsq(..., idx, sparse_group)`` for a group-sparse weight.

    Buffers are registered on the linear's module (``<layer>.qweight/.scales/.zeros[/.idx]``); the float
    weight is dropped by :meth:`Program.remove_dead` once nothing reads it. The new node's NodeInfo
    records ``scheme`` and ``method`` and keeps the layer's earlier transforms.
    """

    ensure_registered()
    lin = LinearArgs.of(node)
    module_path = lin.weight.target.rpartition(".")[0]
    buffers = {"qweight": qw.qweight, "scales": qw.scales, "zeros": qw.zeros}
    is_sparse = isinstance(qw, sparse.SparseQuantizedWeight)
    if is_sparse:
        buffers["idx"] = qw.idx
    q_n, s_n, z_n, *idx_n = program.add_operand_buffers(module_path, node, buffers)
    args = (lin.input, q_n, s_n, z_n, lin.bias, qw.bits, qw.group_size, qw.in_features)
    op = torch.ops.lowc.linear_wq.default
    if is_sparse:
        op, args = torch.ops.lowc.linear_gsq.default, (*args, idx_n[0], qw.sparse_group)
    with program.graph.inserting_before(node):
        new = program.graph.call_function(op, args)
    new.meta = {k: v for k, v in node.meta.items() if k in ("nn_module_stack", "val", "stack_trace")}
    info = nodemeta.get(node)
    nodemeta.set_info(new, replace(info, layer=info.layer or module_path).compressed(scheme, method))
    node.replace_all_uses_with(new)
    program.graph.erase_node(node)
    return new


def rtn_fallback(program, nodes, scheme: Scheme) -> None:
    """RTN at ``scheme`` for linears a calibrated method could not reach (outside transformer
    blocks, e.g. BERT's pooler); the caller logs which."""
    for node in nodes:
        qw = quant.rtn_quantize(linear_weight(program, node), scheme.w_bits, scheme.group_size, scheme.symmetric)
        rewrite_linear(program, node, qw, scheme, "rtn")


def quantize_linears(program, ctx: PassContext, p: WeightQuantPass, quantize_fn, method: str) -> tuple[int, dict]:
    """Shared driver: quantize each selected linear with ``quantize_fn(weight, node) -> QuantizedWeight``
    (a progress bar per layer when ``ctx.progress``). Returns the number quantized and the stats;
    linears whose weight is not 2-D are left in float, counted in ``stats["skipped"]`` and logged by layer."""

    s = p.scheme(ctx)
    p.check_layers(program)
    nodes = p.select(program)
    padded, skipped, done = [], [], 0
    for node in bar(nodes, desc=method, enabled=ctx.progress):
        w = linear_weight(program, node)
        if w.dim() != 2:
            skipped.append(f"{linear_layer(node)} (weight {list(w.shape)})")
            continue
        sn = p.layer_scheme(s, linear_layer(node))
        qw = quantize_fn(w, node, sn)
        if qw.k_pad != qw.in_features:
            padded.append(linear_layer(node))
        rewrite_linear(program, node, qw, sn, method)
        done += 1
    if done:
        program.remove_dead()
    stats = {"quantized": done, "bits": s.w_bits, "group_size": s.group_size, "symmetric": s.symmetric}
    if padded:
        stats["padded"] = padded
        ctx.log.append(f"{method}: {len(padded)} layer(s) padded to a multiple of group_size={s.group_size}: {', '.join(padded[:4])}{'...' if len(padded) > 4 else ''}")
    if skipped:
        stats["skipped"] = len(skipped)
        ctx.log.append(f"{method}: {len(skipped)} linear(s) left in float, their weight is not 2-D: {', '.join(skipped[:4])}"
                       f"{'...' if len(skipped) > 4 else ''}")
    return done, stats
