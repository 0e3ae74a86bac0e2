"""Find the softmax attentions to linearize and rewrite them into feature maps + ``lowc::linear_attention``.

:func:`find_sites` turns each chosen ``aten.scaled_dot_product_attention`` (from
:func:`lowc.ir.analysis.attention_subgraphs`) into a :class:`Site`: which values feed it, whether it
is causal, its scale, head counts, the q/k/v/o linears (for LoRA) and how the key/value heads are laid
out for grouped-query attention. Causality is read from the attention itself: ``is_causal=True``, or
a mask that, evaluated on an unpadded example, is lower triangular (causal decoders such as Llama
build a boolean causal+padding mask) or all true (bidirectional encoders such as BERT). Any other
mask (sliding window, ALiBi, prefix-LM) is refused, naming the layer.

:func:`emit_site` replaces the SDPA node of one site by the nodes of
:func:`lowc.passes.linearize.maps.linearized_attention` reading new buffers registered on the
attention module (``<layer>.fq_weight``, ``fk_weight``, Hedgehog's ``fq_bias``/``fk_bias``,
LoLCATs' ``window_factor``), so they are saved in the artifact like any weight. Padding: a single
``key_mask = attention_mask != 0`` node (``[B, L]`` bool) is added after the inputs and read by every
linearized layer, so padded keys are excluded as the softmax mask excluded them. New nodes carry the
SDPA's ``nn_module_stack`` and a :class:`lowc.ir.meta.NodeInfo` with its layer and block (roles
``fmap_q``/``fmap_k``/``attn``), so block-wise calibration (GPTQ after linearization) keeps working.
Nodes that only fed the softmax (the mask construction, repeated key/value heads that are no longer
read) are erased.

GQA: export of Hugging Face Llama repeats k/v to the query heads before SDPA
(``reshape(expand(unsqueeze(x, 2)))``). By default each query head gets its own key map (as the
reference code, which maps keys after ``repeat_kv``), so the op reads the repeated k/v; with
``kv_head_maps`` one key map per key/value head reads the un-repeated k/v (the op's grouped-query
form; the recurrent state is then ``H / Hk`` times smaller).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.fx
from torch.fx.proxy import GraphAppendingTracer

from lowc.errors import PassError
from lowc.ir import meta as nodemeta
from lowc.ir.analysis import ancestors
from lowc.ir.dialect import ensure_registered
from lowc.ir.program import Program
from lowc.passes.linearize import maps
from lowc.passes.quant.common import matches

LINEAR_ATTENTION = "lowc.linear_attention"
SDPA = torch.ops.aten.scaled_dot_product_attention.default


@dataclass
class Site:
    """One attention to linearize (node names refer to the program before the rewrite)."""

    index: int  # the block index (or position among attentions when the model has no blocks)
    layer: str  # attention module path, where the new buffers live
    block: int | None
    sdpa: str
    q: str  # node giving the queries SDPA reads (after RoPE), [B, H, L, D]
    k: str  # node giving the keys SDPA reads, [B, Hs, L, D] (Hs = H if repeated, else Hk)
    v: str
    k_kv: str | None  # the un-repeated keys [B, Hk, L, D] when SDPA reads repeated ones (export's repeat_kv)
    v_kv: str | None
    heads: int  # query heads H
    kv_heads: int  # key/value heads Hk
    sdpa_kv_heads: int  # heads of SDPA's k/v (H after repeat_kv, Hk with enable_gqa)
    head_dim: int
    v_dim: int
    scale: float
    causal: bool
    linears: tuple[str, ...] = ()  # q/k/v/o (or fused qkv) linear nodes, for LoRA
    meta: dict = field(default_factory=dict, repr=False)  # SDPA node's nn_module_stack


def _op_name(node: torch.fx.Node) -> str:
    t = node.target
    if node.op == "call_function" and isinstance(t, torch._ops.OpOverload):
        return f"{t.namespace}.{t._opname}"
    return ""


def is_linear_attention(node: torch.fx.Node) -> bool:
    return _op_name(node) == LINEAR_ATTENTION


def _static(node, dim: int) -> int | None:
    v = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    if not isinstance(v, torch.Tensor) or v.dim() != 4:
        return None
    d = v.shape[dim]
    return d if type(d) is int else None


def _unrepeat(node: torch.fx.Node) -> torch.fx.Node | None:
    """``x`` if ``node`` is ``reshape(expand(unsqueeze(x, 2)))`` (Hugging Face ``repeat_kv``)."""
    if _op_name(node) not in ("aten.reshape", "aten.view", "aten._unsafe_view"):
        return None
    e = node.args[0]
    if not isinstance(e, torch.fx.Node) or _op_name(e) != "aten.expand":
        return None
    u = e.args[0]
    if not isinstance(u, torch.fx.Node) or _op_name(u) != "aten.unsqueeze" or u.args[1] != 2:
        return None
    x = u.args[0]
    return x if isinstance(x, torch.fx.Node) and _static(x, 1) is not None else None


def _arg(node: torch.fx.Node, i: int, name: str, default=None):
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


# ---- causality, by evaluating the masks ------------------------------------------------------------
def _evaluate(program, nodes: list[torch.fx.Node], inputs: list[torch.Tensor]) -> tuple:
    """Values of ``nodes`` for ``inputs``, computing only their ancestors."""
    need = ancestors(nodes)
    g = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for n in program.graph.nodes:
        if n.op == "placeholder" or n in need:
            env[n] = g.node_copy(n, lambda a: env[a])
    g.output(tuple(env[n] for n in nodes))
    gm = torch.fx.GraphModule(program.gm, g)
    with torch.no_grad():
        return gm(*inputs)


def _allowed(mask: torch.Tensor) -> torch.Tensor:
    """Boolean "may attend" from a boolean or additive float mask, [B, *, Lq, Lk] -> [B, Lq, Lk]."""
    if mask.dtype == torch.bool:
        a = mask
    else:
        if not bool(((mask == 0) | (mask <= -1e4)).all()):
            return None  # an additive bias (ALiBi, relative positions), not a pure mask
        a = mask == 0
    while a.dim() > 3:
        if a.shape[1] != 1 and not bool((a == a[:, :1]).all()):
            return None  # differs per head
        a = a[:, 0]
    return a


def attention_modes(program, sdpas: list[torch.fx.Node], who: str = "linearize") -> tuple[dict[str, bool], bool]:
    """``({sdpa name: causal}, padding_follows_attention_mask)``; raises PassError for masks that are
    neither causal nor bidirectional."""
    masks = []
    for s in sdpas:
        m = _arg(s, 3, "attn_mask")
        if isinstance(m, torch.fx.Node) and m not in masks:
            masks.append(m)
    causal: dict[str, bool] = {}
    pad_ok = True
    values: dict[torch.fx.Node, tuple] = {}
    if masks:
        L = 6
        specs = program.info.inputs
        inputs = program.example_inputs(batch=2, seq=L)
        padded = [t.clone() for t in inputs]
        am = next((i for i, s in enumerate(specs) if s.name == "attention_mask"), None)
        if am is not None:
            inputs[am] = torch.ones_like(inputs[am])
            padded[am] = torch.ones_like(inputs[am])
            padded[am][1, :2] = 0  # batch row 1: first two keys are padding
        try:
            plain = _evaluate(program, masks, inputs)
            pad = _evaluate(program, masks, padded) if am is not None else plain
        except Exception as e:  # noqa: BLE001 - report which attention we could not analyse
            raise PassError(f"pass '{who}': cannot evaluate the attention mask %{masks[0].name} on an example "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
        tri = torch.ones(L, L, dtype=torch.bool).tril()
        for m, a, p in zip(masks, plain, pad):
            a, p = _allowed(a), _allowed(p)
            if a is None or a.shape[-2:] != (L, L):
                values[m] = (None, False)
                continue
            if bool(a.all()):
                mode = False
            elif bool((a == tri).all()):
                mode = True
            else:
                mode = None
            follows = am is not None and p is not None and not bool(p[1, :, :2].any()) and bool(p[0].eq(a[0]).all())
            values[m] = (mode, follows)
    for s in sdpas:
        m = _arg(s, 3, "attn_mask")
        is_causal = bool(_arg(s, 5, "is_causal", False))
        layer = nodemeta.get(s).layer or s.name
        if isinstance(m, torch.fx.Node):
            mode, follows = values[m]
            if mode is None or is_causal:
                raise PassError(f"pass '{who}': layer {layer}: its attention mask is neither causal nor "
                                "bidirectional (sliding window, ALiBi or prefix mask?); "
                                f"{who} supports plain causal and bidirectional softmax attention")
            causal[s.name] = mode
            pad_ok = pad_ok and follows
        elif m is not None:
            raise PassError(f"pass '{who}': layer {layer}: a constant attention mask is not supported")
        else:
            causal[s.name] = is_causal
            pad_ok = False
    return causal, pad_ok


# ---- sites -----------------------------------------------------------------------------------------
def existing_layers(program) -> list[tuple[int | None, str]]:
    """``(block, layer)`` of the layers already linearized (their ``lowc::linear_attention`` nodes)."""
    return [(nodemeta.get(n).block, nodemeta.get(n).layer) for n in program.graph.nodes if is_linear_attention(n)]


def check_layers(layers, fail) -> None:
    """Option check of a ``layers`` selection (block indices or globs): ``fail(msg)`` builds the error."""
    for s in layers:
        if not str(s).strip():
            raise fail("layers: empty entry")
        if str(s).strip().lstrip("-").isdigit() and int(s) < 0:
            raise fail(f"layers={s}: block indices are >= 0")


def select(atts: list, layers: tuple[str, ...], done: list[tuple[int | None, str]] = (), who: str = "linearize") -> list:
    """The attentions ``layers`` chooses: block indices (``"3"``) or layer patterns (names, dotted
    suffixes, globs); all of them when ``layers`` is empty. ``done``: layers already linearized
    (:func:`existing_layers`), which a spec may name without error (a second run changes nothing).
    Raises PassError for an index out of range or a pattern matching no layer."""

    if not layers:
        return list(atts)
    index = {a: (a.block if a.block is not None else i) for i, a in enumerate(atts)}
    chosen = []
    for spec in layers:
        s = str(spec).strip()
        if s.lstrip("-").isdigit():
            i = int(s)
            hit = [a for a in atts if index[a] == i]
            if not hit and not any(b == i for b, _ in done):
                have = sorted({*index.values(), *(b for b, _ in done if b is not None)})
                raise PassError(f"pass '{who}': layers={s}: no attention at layer index {i} "
                                f"(this model's attention layers: {have[0]}..{have[-1]})")
        else:
            hit = [a for a in atts if matches(a.layer, (s,))]
            if not hit and not any(matches(layer, (s,)) for _, layer in done):
                example = (atts[0].layer if atts else done[0][1]) if (atts or done) else "?"
                raise PassError(f"pass '{who}': layers={s}: matches no attention layer (e.g. {example})")
        chosen.extend(a for a in hit if a not in chosen)
    return [a for a in atts if a in chosen]


def find_sites(program, atts: list, who: str = "linearize") -> tuple[list[Site], bool]:
    """A :class:`Site` for each attention in ``atts`` (see module docstring), and whether the softmax
    masks exclude the keys ``attention_mask`` marks as padding (then so must ``key_mask``)."""
    causal, pad = attention_modes(program, [a.sdpa for a in atts], who)
    sites = []
    for i, a in enumerate(atts):
        s = a.sdpa
        layer = a.layer or f"attention_{i}"
        qa, ka, va = (_arg(s, j, n) for j, n in enumerate(("query", "key", "value")))
        if not all(isinstance(x, torch.fx.Node) for x in (qa, ka, va)):
            raise PassError(f"pass '{who}': layer {layer}: q/k/v of its attention are not graph values")
        h, d, hs, dv = _static(qa, 1), _static(qa, 3), _static(ka, 1), _static(va, 3)
        if None in (h, d, hs, dv):
            raise PassError(f"pass '{who}': layer {layer}: head counts/sizes are not static in the graph "
                            "(expected q/k/v of shape [batch, heads, seq, head_dim])")
        if _static(ka, 3) != d or _static(va, 1) != hs or h % hs:
            raise PassError(f"pass '{who}': layer {layer}: unexpected attention shapes "
                            f"(q {h}x{d} heads, k {hs}x{_static(ka, 3)}, v {_static(va, 1)}x{dv})")
        k_kv, v_kv = _unrepeat(ka), _unrepeat(va)
        kv = a.num_kv_heads or hs
        if hs != h:
            kv = hs  # SDPA reads un-repeated heads itself (enable_gqa)
            k_kv = v_kv = None
        elif k_kv is None or v_kv is None or _static(k_kv, 1) != _static(v_kv, 1):
            k_kv = v_kv = None
        else:
            kv = _static(k_kv, 1)
        if h % kv:
            raise PassError(f"pass '{who}': layer {layer}: {h} query heads are not a multiple of {kv} key/value heads")
        scale = _arg(s, 6, "scale")
        scale = float(scale) if scale is not None else 1.0 / math.sqrt(d)
        lin = tuple(n.name for n in (a.q, a.k, a.v, a.o) if n is not None)
        sites.append(Site(
            index=a.block if a.block is not None else i, layer=layer, block=a.block, sdpa=s.name,
            q=qa.name, k=ka.name, v=va.name, k_kv=k_kv.name if k_kv is not None else None,
            v_kv=v_kv.name if v_kv is not None else None, heads=h, kv_heads=kv, sdpa_kv_heads=hs,
            head_dim=d, v_dim=dv, scale=scale, causal=causal[s.name],
            linears=tuple(dict.fromkeys(lin)), meta={"nn_module_stack": s.meta.get("nn_module_stack")},
        ))
    return sites, pad


# ---- GQA layout helpers (tensors; the graph gets the same ops) ------------------------------------
def key_heads_for_maps(x, x_heads: int, site: Site, kv_head_maps: bool):
    """Keys (or values) ``x`` with ``x_heads`` heads (``H`` repeated as SDPA reads them, or ``Hk``) laid out
    as the maps read them: ``[B, Hk, L, *]`` with ``kv_head_maps``, else ``[B, H, L, *]``."""
    n = site.heads // site.kv_heads
    if kv_head_maps and x_heads != site.kv_heads:  # repeated: query head h reads kv head h // n
        return torch.ops.aten.slice.Tensor(x, 1, 0, site.heads, n)
    if not kv_head_maps and x_heads != site.heads:
        return torch.ops.aten.repeat_interleave.self_int(x, n, 1)
    return x


# ---- the rewrite -------------------------------------------------------------------------------------
def key_mask_node(program) -> torch.fx.Node | None:
    """The ``attention_mask != 0`` node every linearized layer reads (created once, after the inputs)."""
    graph = program.graph
    for n in graph.nodes:
        if n.op == "call_function" and nodemeta.get(n).role == "key_mask":
            return n
    ph = {n.target: n for n in graph.nodes if n.op == "placeholder"}
    am = ph.get("attention_mask")
    if am is None:
        return None
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    with graph.inserting_after(last):
        node = graph.create_node("call_function", torch.ops.aten.ne.Scalar, (am, 0), name="key_mask")
    nodemeta.set_info(node, nodemeta.NodeInfo(role="key_mask"))
    return node


def _erase_dead(graph: torch.fx.Graph, nodes) -> None:
    stack = [n for n in nodes if isinstance(n, torch.fx.Node)]
    while stack:
        n = stack.pop()
        if n.op != "call_function" or n.users or n.graph is not graph:
            continue
        if isinstance(n.target, torch._ops.OpOverload) and n.target._schema.is_mutable:
            continue
        inputs = list(n.all_input_nodes)
        graph.erase_node(n)
        stack.extend(inputs)


def emit_site(program, site: Site, method: str, window: int, kv_head_maps: bool,
              params: dict[str, torch.Tensor], key_mask: torch.fx.Node | None) -> torch.fx.Node:
    """Replace ``site``'s SDPA node; ``params`` are stored as fp32 buffers (the maps compute in fp32)."""

    ensure_registered()
    graph = program.graph
    by_name = {n.name: n for n in graph.nodes}
    sdpa = by_name[site.sdpa]
    for name, t in params.items():
        program.add_buffer(site.layer, name, t.detach().to(device=program.device, dtype=torch.float32))
    before = set(graph.nodes)
    tracer = GraphAppendingTracer(graph)
    P = lambda n: torch.fx.Proxy(n, tracer)  # noqa: E731
    with graph.inserting_before(sdpa):
        attrs = {name: P(program.get_attr_node(f"{site.layer}.{name}", sdpa)) for name in params}
    with graph.inserting_before(sdpa):
        q = P(by_name[site.q])
        if kv_head_maps and site.k_kv is not None:  # read the un-repeated heads; repeat_kv goes dead
            k, v = P(by_name[site.k_kv]), P(by_name[site.v_kv])
        else:
            k = key_heads_for_maps(P(by_name[site.k]), site.sdpa_kv_heads, site, kv_head_maps)
            v = key_heads_for_maps(P(by_name[site.v]), site.sdpa_kv_heads, site, kv_head_maps)
        out = maps.linearized_attention(method, q, k, v, attrs, P(key_mask) if key_mask is not None else None,
                                        causal=site.causal, window=window, scale=site.scale,
                                        op=torch.ops.lowc.linear_attention.default)
    new = out.node
    info = nodemeta.get(sdpa)
    added = [n for n in graph.nodes if n not in before and n.op != "get_attr"]
    q_side, k_side = ancestors([new.args[0]], set(added)), ancestors([new.args[1]], set(added))
    for n in added:
        role = "fmap_q" if n in q_side else ("fmap_k" if n in k_side else "attn")
        nodemeta.set_info(n, nodemeta.NodeInfo(layer=info.layer, role=role, block=info.block))
        if site.meta.get("nn_module_stack"):
            n.meta["nn_module_stack"] = dict(site.meta["nn_module_stack"])
        if n is not new:  # readable names: fq_matmul, fk__softmax_1, attn_sigmoid
            n._rename({"fmap_q": "fq_", "fmap_k": "fk_"}.get(role, "attn_") + n.target._opname)
    new._rename("linear_attention")
    sdpa.replace_all_uses_with(new)
    inputs = list(sdpa.all_input_nodes)
    graph.erase_node(sdpa)
    _erase_dead(graph, inputs)
    return new


def shallow_copy(program):
    """A Program with a copy of the graph over the same tensors (the float teacher)."""

    g = torch.fx.Graph()
    out = g.graph_copy(program.graph, {})
    g.output(out)
    g._codegen = program.graph._codegen
    gm = torch.fx.GraphModule(program.gm, g)
    return Program(gm, program.info)


