"""``quantize-kv``: KV-cache quantization (per head, per token, asymmetric by default).

lowc traces models without a cache (``use_cache=False``), so the KV cache is what enters attention:
the keys and values reaching each ``aten.scaled_dot_product_attention``. For each attention found
by :func:`lowc.ir.analysis.attention_subgraphs` the pass inserts ``lowc::fake_quant_kv``
(:mod:`lowc.ir.dialect.kv`) on

* the keys *after* RoPE (a cache stores rotated keys) and
* the values,

both *before* any grouped-query-attention repeat (``unsqueeze``/``expand``/``reshape``,
``repeat_interleave``): the point it is inserted is found by walking back from the attention's
key/value argument through such ops while the last dimension stays the head dimension, so one
scale per token per KV head is what a cache with ``num_kv_heads`` heads would store. Encoders
(BERT/MiniLM) have K/V too (no cache, but the same tensors): the pass applies to them the same way.

Ranges are dynamic (each token's own min/max per head, or per ``group_size`` channels), so no
calibration is needed. Run it after a weight method, e.g. ``--pass gptq --pass 'quantize-kv{bits=4}'``.

Preconditions: the model's attention is ``scaled_dot_product_attention`` (a program without one is
an error naming the pass). Idempotent: K/V already read through ``lowc::fake_quant_kv`` are left
alone. The inserted nodes carry ``NodeInfo(layer=<attention>, role="k_cache"|"v_cache")`` and no
``scheme`` (they are not linear-like layers of the layer table); the pass's stats record the scheme.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx

from lowc.ir import meta as nodemeta
from lowc.ir.analysis import attention_subgraphs
from lowc.ir.dialect import ensure_registered
from lowc.passes.base import Pass, PassContext, PassResult, opt
from lowc.passes.quant.common import matches

#: ops that regroup K/V heads for grouped-query attention (or copy them) without changing values
_REPEAT = frozenset({
    "aten.expand", "aten.unsqueeze", "aten.reshape", "aten.view", "aten._unsafe_view", "aten.repeat",
    "aten.repeat_interleave", "aten.clone", "aten.contiguous", "aten.alias", "aten.flatten",
})
TENSORS = ("k", "v")


def _op(node: torch.fx.Node) -> str:
    t = node.target
    return f"{t.namespace}.{t._opname}" if node.op == "call_function" and isinstance(t, torch._ops.OpOverload) else ""


def _last_dim(node) -> int | None:
    v = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    if not isinstance(v, torch.Tensor) or v.dim() == 0:
        return None
    d = v.shape[-1]
    return d if type(d) is int else None


def cache_point(arg: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node | None]:
    """(the value a cache would store, the node reading it on the way to attention) for an SDPA
    key/value argument: walk back through GQA-repeat ops while the input keeps the head dim.
    The reader is ``None`` when ``arg`` itself is the cached value (the SDPA reads it directly)."""
    node, reader = arg, None
    d = _last_dim(arg)
    while (_op(node) in _REPEAT and node.args and isinstance(node.args[0], torch.fx.Node)
           and node.args[0].op == "call_function" and _last_dim(node.args[0]) == d):
        node, reader = node.args[0], node
    return node, reader


@dataclass(frozen=True)
class QuantizeKV(Pass):
    name = "quantize-kv"
    summary = "KV-cache quantization: K (after RoPE) and V per token and head, asymmetric, dynamic ranges"

    bits: int = opt(8, "cache bits, 2..8")
    group_size: int = opt(-1, "channels per scale along the head dim: -1 = the whole head (one scale per token per head) or a divisor of head_dim")
    symmetric: bool = opt(False, "symmetric (absmax) instead of asymmetric min/max with a zero point")
    tensors: tuple[str, ...] = opt(TENSORS, "which cache tensors to quantize: k, v or both")
    ignore: tuple[str, ...] = opt((), "attention layers left in float: names, dotted suffixes or globs (e.g. model.layers.0.*)")

    def validate(self) -> None:
        if not 2 <= self.bits <= 8:
            raise self.fail(f"bits={self.bits}: choose 2..8")
        if self.group_size != -1 and self.group_size < 1:
            raise self.fail(f"group_size={self.group_size}: use -1 (whole head) or a divisor of head_dim")
        bad = [t for t in self.tensors if t not in TENSORS]
        if bad or not self.tensors or len(set(self.tensors)) != len(self.tensors):
            raise self.fail(f"tensors={list(self.tensors)}: choose k, v or [k,v]")

    def run(self, program, ctx: PassContext) -> PassResult:
        ensure_registered()
        op = torch.ops.lowc.fake_quant_kv.default
        attns = attention_subgraphs(program)
        if not attns:
            raise self.fail("the program has no scaled_dot_product_attention: KV-cache quantization finds K and V "
                            "at the attention's inputs (trace the model with its SDPA attention implementation)")
        done, skipped, ignored = 0, 0, 0
        for attn in attns:
            layer = attn.layer or attn.sdpa.name
            if self.ignore and matches(layer, self.ignore):
                ignored += 1
                continue
            seen: set[torch.fx.Node] = set()
            for which, index in (("k", 1), ("v", 2)):
                if which not in self.tensors:
                    continue
                arg = attn.sdpa.args[index] if len(attn.sdpa.args) > index else attn.sdpa.kwargs.get(("key", "value")[index - 1])
                if not isinstance(arg, torch.fx.Node):
                    raise self.fail(f"{layer}: the attention's {'key' if which == 'k' else 'value'} is not a graph value")
                cached, reader = cache_point(arg)
                if cached.op == "call_function" and cached.target == op:
                    skipped += 1  # already quantized
                    continue
                if cached in seen:
                    continue
                seen.add(cached)
                d = _last_dim(cached)
                if d is None:
                    raise self.fail(f"{layer}: the {which.upper()} tensor has no static head dimension")
                if self.group_size != -1 and d % self.group_size:
                    raise self.fail(f"{layer}: group_size={self.group_size} does not divide head_dim={d}")
                with program.graph.inserting_after(cached):
                    q = program.graph.call_function(op, (cached, self.bits, self.group_size, self.symmetric))
                info = nodemeta.get(attn.sdpa)
                nodemeta.set_info(q, nodemeta.NodeInfo(layer=info.layer, role=f"{which}_cache", block=info.block))
                (reader or attn.sdpa).replace_input_with(cached, q)
                done += 1
        program.gm.recompile()
        stats = {"quantized": done, "attentions": len(attns), "bits": self.bits, "group_size": self.group_size,
                 "symmetric": self.symmetric}
        if ignored:
            stats["ignored"] = ignored
        if skipped:  # quantized by an earlier run (idempotence), said in the stats rather than dropped
            stats["already_quantized"] = skipped
        if done:
            ctx.log.append(f"quantize-kv: {done} K/V tensor(s) of {len(attns) - ignored} attention(s) quantized to "
                           f"{self.bits} bits ({'symmetric' if self.symmetric else 'asymmetric'}, "
                           f"{'per head' if self.group_size == -1 else f'groups of {self.group_size}'}, per token)")
        return PassResult(changed=done > 0, stats=stats)
