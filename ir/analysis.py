"""Read-only analyses of a Program: its networkx view and the transformer structure passes need.

* :func:`to_networkx` - the data-flow graph as a ``networkx.DiGraph`` (for dominators, paths,
  reachability). It is a view for analysis: passes rewrite the FX graph, never this.
* :func:`transformer_blocks` - the nodes of each block of ``program.info.block_prefix`` (calibration
  runs block by block), with their linears by role, the values flowing in and the value flowing out.
* :func:`shared_input_groups` - linears reading the same value (q/k/v, gate/up), whose input
  transforms (SmoothQuant, FlatQuant) must be shared.
* :func:`norm_before_linears` - the RMSNorm / LayerNorm producing a group's input, with the
  attributes of its weight and bias, so a scale can be folded into it.
* :func:`attention_subgraphs` - per ``scaled_dot_product_attention``: its q/k/v/o linears, the RoPE
  nodes on the q and k paths, the mask and the head counts.
* :func:`block_groups` - a block's float linear groups classified by where a per-channel transform
  of their input can go (a norm, the v/o head path, the ``up`` rows of a SwiGLU product), for the
  learned-transform passes (AffineQuant, FlatQuant).

Two linear predicates: :func:`is_linear` (any linear, ``aten.linear`` or a dialect ``linear_*``) and
:func:`is_float_linear` (an ``aten.linear`` with a constant weight: not compressed yet, what method
passes rewrite; :meth:`Program.linears` lists these).

Linears are ``aten.linear`` and the lowc dialect's ``linear_*`` ops (input is argument 0, weight or
packed weight argument 1), so every analysis works before and after quantization passes. Results are
frozen dataclasses holding FX nodes of the analysed graph; they are invalid once the graph changes.

Preconditions: the program is annotated (:meth:`Program.annotate`, done by ``lowc.trace``) and nodes
created by passes carry :class:`lowc.ir.meta.NodeInfo` (nodes without it are assigned to the block
of their users).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable, Iterable

import networkx as nx
import torch
import torch.fx

from lowc.ir import meta as nodemeta
from lowc.ir.printer import target_name

# Ops are compared by "namespace.opname" (overload-independent), kept here as data.
_LINEAR = "aten.linear"
_DIALECT_NS = "lowc"
_DIALECT_LINEAR_PREFIX = "linear"  # lowc::linear_wq, lowc::linear_wqaq, ...: x is argument 0
_SDPA = frozenset({"aten.scaled_dot_product_attention"})

# ops that return their input unchanged in an inference graph (to/_to_copy/dropout: conditionally)
_IDENTITY = frozenset({"aten.alias", "aten.clone", "aten.detach", "aten.contiguous", "aten.lift_fresh_copy"})
_CASTS = frozenset({"aten.to", "aten._to_copy"})
_DROPOUT = frozenset({"aten.dropout"})

# ops that move or regroup values without computing on them (heads split/merge, repeat_kv)
_LAYOUT = frozenset({
    "aten.view", "aten.reshape", "aten._unsafe_view", "aten.transpose", "aten.permute", "aten.t",
    "aten.unsqueeze", "aten.squeeze", "aten.expand", "aten.flatten", "aten.unflatten", "aten.repeat",
    "aten.repeat_interleave", "aten.split", "aten.split_with_sizes", "aten.chunk", "aten.unbind",
    "aten.select", "aten.narrow", "aten.slice",
}) | _IDENTITY | _CASTS | _DROPOUT
# the elementwise ops rotary embeddings are made of (rotate_half: slice/neg/cat; x*cos + rot(x)*sin)
_ROPE = frozenset({"aten.mul", "aten.add", "aten.sub", "aten.neg", "aten.cat", "aten.stack", "aten.slice"})
# what may lie between a q/k/v linear and the attention: layout ops, RoPE, and KV-cache quantization
_QKV_PATH = _LAYOUT | _ROPE | frozenset({"lowc.fake_quant_kv"})


# ---- op predicates -------------------------------------------------------------------------------
def _op(node: torch.fx.Node) -> str:
    """``namespace.opname`` of a call_function node ("getitem" for tuple access, "" otherwise)."""
    if node.op != "call_function":
        return ""
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return f"{t.namespace}.{t._opname}"
    if t is operator.getitem:
        return "getitem"
    return getattr(t, "__name__", "")


def is_linear(node: torch.fx.Node) -> bool:
    """True for ``aten.linear`` and for the lowc dialect's linear ops (``lowc::linear_wq`` ...)."""
    if node.op != "call_function":
        return False
    t = node.target
    if not isinstance(t, torch._ops.OpOverload):
        return False
    if t.namespace == "aten":
        return t._opname == "linear"
    return t.namespace == _DIALECT_NS and t._opname.startswith(_DIALECT_LINEAR_PREFIX)


def is_float_linear(node: torch.fx.Node) -> bool:
    """True for an ``aten.linear`` whose weight is a constant attribute (``get_attr``): a linear no
    pass has compressed yet."""
    if _op(node) != _LINEAR or len(node.args) < 2:
        return False
    w = node.args[1]
    return isinstance(w, torch.fx.Node) and w.op == "get_attr"


def linear_input(node: torch.fx.Node) -> torch.fx.Node:
    """The activation a linear reads (argument 0 of ``aten.linear`` and of every dialect linear)."""
    if not is_linear(node):
        raise ValueError(f"node {node.name} ({target_name(node)}) is not a linear")
    x = node.args[0] if node.args else node.kwargs.get("input", node.kwargs.get("x"))
    if not isinstance(x, torch.fx.Node):
        raise ValueError(f"linear {node.name}: input is {x!r}, not a graph value")
    return x


def linear_layer(node: torch.fx.Node) -> str:
    """A linear's module path: its NodeInfo layer, else the module owning its weight attribute (the
    attribute itself when it belongs to the root module), else the node's name. This is the name users
    see in logs and that ``ignore`` patterns match."""
    info = nodemeta.get(node)
    if info.layer:
        return info.layer
    w = node.args[1] if len(node.args) > 1 else None
    if isinstance(w, torch.fx.Node) and w.op == "get_attr":
        return w.target.rpartition(".")[0] or w.target
    return node.name


def _val(node) -> torch.Tensor | None:
    v = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _static_dim(node: torch.fx.Node | None, dim: int) -> int | None:
    """A dimension of the node's recorded value if it is a concrete int (not symbolic)."""
    v = _val(node) if node is not None else None
    if v is None or not -v.dim() <= dim < v.dim():
        return None
    d = v.shape[dim]
    return d if type(d) is int else None


def _is_identity(node: torch.fx.Node) -> bool:
    """Whether ``node`` returns its (first) input unchanged when the graph runs for inference."""
    op = _op(node)
    if op in _IDENTITY:
        return True
    if op in _DROPOUT:
        p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5)
        train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
        return train is False or p == 0
    if op in _CASTS:
        src, out = _val(node.args[0]) if node.args else None, _val(node)
        return src is not None and out is not None and src.dtype == out.dtype and src.device == out.device
    return False


def strip_identity(node: torch.fx.Node) -> torch.fx.Node:
    """Follow ``node`` back through ops that do not change its value (alias, clone, eval dropout,
    same-dtype ``to``) to the value that is actually computed."""
    while node.op == "call_function" and node.args and isinstance(node.args[0], torch.fx.Node) and _is_identity(node):
        node = node.args[0]
    return node


def only_reaches(start: torch.fx.Node, allowed: Iterable[torch.fx.Node],
                 through: Callable[[torch.fx.Node], bool] | None = None) -> bool:
    """Whether every use of ``start`` is in ``allowed``, looking through users for which ``through``
    holds (default: ops that return their input unchanged, :func:`_is_identity`)."""
    allowed = set(allowed)
    through = through or _is_identity
    todo, seen = list(start.users), set()
    while todo:
        u = todo.pop()
        if u in seen:
            continue
        seen.add(u)
        if u in allowed:
            continue
        if through(u):
            todo.extend(u.users)
            continue
        return False
    return True


def ancestors(nodes: Iterable, within: set | None = None) -> set[torch.fx.Node]:
    """``nodes`` and every node they read, transitively. With ``within``, only nodes in it are taken
    and the walk stops at any other node; arguments that are not nodes are skipped."""
    out, stack = set(), list(nodes)
    while stack:
        n = stack.pop()
        if n in out or not isinstance(n, torch.fx.Node) or (within is not None and n not in within):
            continue
        out.add(n)
        stack.extend(n.all_input_nodes)
    return out


def _strip_casts(node: torch.fx.Node) -> torch.fx.Node:
    """As :func:`strip_identity`, also through dtype casts (norms compute in fp32 and cast back)."""
    while node.op == "call_function" and node.args and isinstance(node.args[0], torch.fx.Node) and (
        _is_identity(node) or _op(node) in _CASTS
    ):
        node = node.args[0]
    return node


def _arg(node: torch.fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _graph(program) -> torch.fx.Graph:
    return program.graph if hasattr(program, "graph") else program


# ---- networkx view -------------------------------------------------------------------------------
def to_networkx(program) -> nx.DiGraph:
    """The data-flow graph of ``program`` (a Program, GraphModule or Graph) as a DiGraph.

    Nodes are FX node names with attributes ``op`` (placeholder/get_attr/call_function/output),
    ``target`` (``aten.linear.default``, the attribute path of a get_attr, the input name of a
    placeholder), ``layer``, ``role``, ``block`` (from NodeInfo; ``""``/``None`` when absent) and
    ``node`` (the FX node itself). An edge ``a -> b`` means ``b`` reads the value of ``a``.
    """
    g = nx.DiGraph()
    for node in _graph(program).nodes:
        info = nodemeta.get(node)
        target = target_name(node) if node.op == "call_function" else str(node.target)
        g.add_node(node.name, op=node.op, target=target, layer=info.layer, role=info.role, block=info.block, node=node)
    for node in _graph(program).nodes:
        for inp in node.all_input_nodes:
            g.add_edge(inp.name, node.name)
    return g


# ---- transformer blocks --------------------------------------------------------------------------
@dataclass(frozen=True)
class Block:
    """One transformer block (a child of the ModuleList ``program.info.block_prefix``): a frozen
    snapshot of its structure. Not :class:`lowc.passes.blockwise.CalibrationBlock`, the block-wise
    runner's live handle on the block being calibrated (per-sample values, valid for one loop step)."""

    index: int
    prefix: str  # module path, e.g. "model.layers.0"
    nodes: tuple[torch.fx.Node, ...]  # its call_function nodes, in graph order
    linears: tuple[torch.fx.Node, ...]  # its linears (aten or dialect), in graph order
    inputs: tuple[torch.fx.Node, ...]  # values from outside the block it reads (not attributes), graph order
    outputs: tuple[torch.fx.Node, ...]  # its values read after the block, graph order
    attrs: tuple[str, ...]  # attribute targets (parameters, buffers) its nodes read, first-use order

    @property
    def output(self) -> torch.fx.Node | None:
        """The block's result: the last of its values used after it (the residual stream)."""
        return self.outputs[-1] if self.outputs else None

    @property
    def hidden_input(self) -> torch.fx.Node | None:
        """The input carrying the residual stream: the first input with the output's dtype and
        shape (symbolic dims compared by name); None when no input matches."""
        out = _val(self.output) if self.output is not None else None
        if out is None:
            return None
        for node in self.inputs:
            v = _val(node)
            if v is not None and v.dtype == out.dtype and [str(d) for d in v.shape] == [str(d) for d in out.shape]:
                return node
        return None

    def by_role(self) -> dict[str, tuple[torch.fx.Node, ...]]:
        """Linears by NodeInfo role ("q", "k", "v", "o", "gate", "up", "down"; "" when unknown)."""
        out: dict[str, tuple[torch.fx.Node, ...]] = {}
        for node in self.linears:
            role = nodemeta.get(node).role
            out[role] = out.get(role, ()) + (node,)
        return out

    def linear(self, role: str) -> torch.fx.Node:
        """The block's one linear with ``role``; KeyError if it has none or several."""
        found = self.by_role().get(role, ())
        if len(found) != 1:
            raise KeyError(f"block {self.prefix} has {len(found)} linears with role {role!r}")
        return found[0]


def node_blocks(program) -> dict[torch.fx.Node, int | None]:
    """Block index of every call_function node: its NodeInfo block, or for nodes without NodeInfo
    (created by a pass that did not set it) the block of all its users when they agree."""
    graph = _graph(program)
    out: dict[torch.fx.Node, int | None] = {}
    for node in reversed(list(graph.nodes)):
        if node.op != "call_function":
            continue
        if nodemeta.KEY in node.meta:
            out[node] = nodemeta.get(node).block
            continue
        users = {out.get(u) for u in node.users}
        out[node] = users.pop() if len(users) == 1 else None
    return out


def transformer_blocks(program) -> list[Block]:
    """The program's transformer blocks, by index; empty when it has no ``block_prefix``."""
    prefix = program.info.block_prefix
    if not prefix:
        return []
    where = node_blocks(program)
    members: dict[int, list[torch.fx.Node]] = {}
    for node in program.graph.nodes:
        b = where.get(node)
        if b is not None:
            members.setdefault(b, []).append(node)
    order = {n: i for i, n in enumerate(program.graph.nodes)}
    blocks = []
    for index in sorted(members):
        nodes = members[index]
        inside = set(nodes)
        inputs: set[torch.fx.Node] = set()
        attrs: dict[str, None] = {}
        for node in nodes:
            for inp in node.all_input_nodes:
                if inp.op == "get_attr":
                    attrs[inp.target] = None
                elif inp not in inside:
                    inputs.add(inp)
        outputs = [n for n in nodes if any(u not in inside for u in n.users)]
        blocks.append(Block(
            index=index,
            prefix=f"{prefix}.{index}",
            nodes=tuple(nodes),
            linears=tuple(n for n in nodes if is_linear(n)),
            inputs=tuple(sorted(inputs, key=order.__getitem__)),
            outputs=tuple(outputs),
            attrs=tuple(attrs),
        ))
    return blocks


# ---- linears sharing an input --------------------------------------------------------------------
@dataclass(frozen=True)
class LinearGroup:
    """Linears that read the same value (after looking through identity ops such as eval dropout)."""

    input: torch.fx.Node  # the shared value
    linears: tuple[torch.fx.Node, ...]  # graph order
    block: int | None  # the block of all its linears, None if outside blocks or mixed

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(nodemeta.get(n).role for n in self.linears)

    @property
    def layers(self) -> tuple[str, ...]:
        return tuple(linear_layer(n) for n in self.linears)


def shared_input_groups(program, min_size: int = 1) -> list[LinearGroup]:
    """Linears grouped by the value they read, in graph order of their first linear. ``min_size=2``
    keeps only inputs shared by several linears (q/k/v, gate/up); the default keeps every linear."""
    groups: dict[torch.fx.Node, list[torch.fx.Node]] = {}
    for node in _graph(program).nodes:
        if is_linear(node):
            groups.setdefault(strip_identity(linear_input(node)), []).append(node)
    where = node_blocks(program)
    out = []
    for src, linears in groups.items():
        if len(linears) < min_size:
            continue
        blocks = {where.get(n) for n in linears}
        out.append(LinearGroup(input=src, linears=tuple(linears), block=blocks.pop() if len(blocks) == 1 else None))
    return out


# ---- norms feeding linears -----------------------------------------------------------------------
@dataclass(frozen=True)
class NormLink:
    """The normalization producing a :class:`LinearGroup`'s input. ``kind`` is None (and the other
    fields empty) when the input is not a recognised norm (o_proj, down_proj)."""

    group: LinearGroup
    kind: str | None  # "rmsnorm" | "layernorm" | None
    norm: torch.fx.Node | None  # the node computing the normalized value (weight mul / layer_norm)
    layer: str  # the norm's module path, e.g. "model.layers.0.input_layernorm"
    weight: str | None  # attribute target of its elementwise weight; None if it has no constant one
    bias: str | None  # attribute target of its bias (LayerNorm), else None
    eps: float | None


def _attr_target(node) -> str | None:
    if isinstance(node, torch.fx.Node):
        node = _strip_casts(node)
        if node.op == "get_attr":
            return node.target
    return None


def _rms_core(node: torch.fx.Node) -> tuple[torch.fx.Node, float | None] | None:
    """Match ``x * rsqrt(mean(x ** 2, -1) + eps)`` (either operand order); returns (x, eps)."""
    if _op(node) != "aten.mul" or len(node.args) != 2:
        return None
    for x, r in (node.args, node.args[::-1]):
        if not isinstance(x, torch.fx.Node) or not isinstance(r, torch.fx.Node):
            continue
        r = _strip_casts(r)
        if _op(r) != "aten.rsqrt" or not isinstance(r.args[0], torch.fx.Node):
            continue
        add = r.args[0]
        eps = None
        if _op(add) == "aten.add":
            eps = next((a for a in add.args if isinstance(a, (int, float))), None)
            add = next((a for a in add.args if isinstance(a, torch.fx.Node)), None)
        if add is None or _op(add) != "aten.mean":
            continue
        sq = add.args[0]
        if not isinstance(sq, torch.fx.Node):
            continue
        if _op(sq) == "aten.pow" and sq.args[1] == 2:
            base = (sq.args[0],)
        elif _op(sq) == "aten.mul":
            base = sq.args if sq.args[0] is sq.args[1] else ()
        else:
            continue
        if base and _strip_casts(base[0]) is _strip_casts(x):
            return x, eps
    return None


def _layer_or(node: torch.fx.Node, weight: str | None) -> str:
    layer = nodemeta.get(node).layer
    if layer:
        return layer
    return weight.rpartition(".")[0] if weight else ""


def match_norm(node: torch.fx.Node) -> tuple[str, str | None, str | None, float | None] | None:
    """If ``node`` computes a normalization: (kind, weight target, bias target, eps), else None.

    Recognised: ``aten.layer_norm`` (and ``native_layer_norm``'s first output), ``aten.rms_norm``,
    and the RMSNorm pattern ``weight * (x * rsqrt(mean(x**2) + eps))`` as exported from Hugging Face
    models (casts allowed between its steps), with or without the weight multiply.
    """
    op = _op(node)
    if op == "getitem" and isinstance(node.args[0], torch.fx.Node) and node.args[1] == 0 \
            and _op(node.args[0]) == "aten.native_layer_norm":
        node, op = node.args[0], "aten.layer_norm"
    if op in ("aten.layer_norm", "aten.native_layer_norm"):
        return ("layernorm", _attr_target(_arg(node, 2, "weight")), _attr_target(_arg(node, 3, "bias")),
                _arg(node, 4, "eps", 1e-5))
    if op == "aten.rms_norm":
        return "rmsnorm", _attr_target(_arg(node, 2, "weight")), None, _arg(node, 3, "eps")
    if op != "aten.mul" or len(node.args) != 2:
        return None
    core = _rms_core(node)
    if core is not None:
        return "rmsnorm", None, None, core[1]
    for w, x in (node.args, node.args[::-1]):
        weight = _attr_target(w)
        if weight is None or not isinstance(x, torch.fx.Node):
            continue
        core = _rms_core(_strip_casts(x))
        if core is not None:
            return "rmsnorm", weight, None, core[1]
    return None


def norm_before_linears(program, groups: Iterable[LinearGroup] | None = None,
                        include_unnormalized: bool = False) -> list[NormLink]:
    """For each shared-input group (default: all of :func:`shared_input_groups`), the norm that
    produces its input. Groups whose input is not a norm are left out unless
    ``include_unnormalized``, which gives them a link with ``kind=None``."""
    out = []
    for group in shared_input_groups(program) if groups is None else groups:
        found = match_norm(group.input)
        if found is None:
            if include_unnormalized:
                out.append(NormLink(group, None, None, "", None, None, None))
            continue
        kind, weight, bias, eps = found
        out.append(NormLink(group, kind, group.input, _layer_or(group.input, weight), weight, bias,
                            float(eps) if isinstance(eps, (int, float)) else None))
    return out


# ---- attention -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Attention:
    """One ``scaled_dot_product_attention`` and the linears around it."""

    sdpa: torch.fx.Node
    block: int | None
    layer: str  # module path of the attention, e.g. "model.layers.0.self_attn"
    q: torch.fx.Node | None  # nearest linear behind SDPA argument 0 (through layout and RoPE ops)
    k: torch.fx.Node | None
    v: torch.fx.Node | None
    o: torch.fx.Node | None  # first linear reading the SDPA output through layout ops
    q_rope: tuple[torch.fx.Node, ...]  # RoPE ops (mul/add/neg/cat/slice) between q and SDPA; () if none
    k_rope: tuple[torch.fx.Node, ...]
    mask: torch.fx.Node | None  # attn_mask argument
    is_causal: bool
    num_heads: int | None  # query heads, from the recorded shapes
    num_kv_heads: int | None  # key/value heads before any repeat for grouped-query attention
    head_dim: int | None


def _nearest_linear(start) -> torch.fx.Node | None:
    """Breadth-first backwards from ``start`` through layout/RoPE ops to the nearest linear."""
    if not isinstance(start, torch.fx.Node):
        return None
    seen, frontier = {start}, [start]
    while frontier:
        nxt = []
        for node in frontier:
            if is_linear(node):
                return node
            if _op(node) not in _QKV_PATH and _op(node) != "getitem":
                continue
            for inp in node.all_input_nodes:
                if inp not in seen and inp.op == "call_function":
                    seen.add(inp)
                    nxt.append(inp)
        frontier = nxt
    return None


def _first_linear_after(start: torch.fx.Node) -> torch.fx.Node | None:
    """Breadth-first forwards from ``start`` through layout ops to the first linear reading it."""
    seen, frontier = {start}, [start]
    while frontier:
        nxt = []
        for node in frontier:
            for user in node.users:
                if user in seen:
                    continue
                seen.add(user)
                if is_linear(user) and linear_input(user) is node:
                    return user
                if _op(user) in _LAYOUT or _op(user) == "getitem":
                    nxt.append(user)
        frontier = nxt
    return None


def _between(linear: torch.fx.Node, end: torch.fx.Node, order: dict[torch.fx.Node, int]) -> set[torch.fx.Node]:
    """Nodes on data paths from ``linear`` (excluded) to ``end`` (included)."""
    start = order[linear]
    ancestors, stack = {end}, [end]
    while stack:
        for inp in stack.pop().all_input_nodes:
            if inp not in ancestors and inp.op == "call_function" and order[inp] > start:
                ancestors.add(inp)
                stack.append(inp)
    reach, stack = set(), [linear]
    while stack:
        for user in stack.pop().users:
            if user in ancestors and user not in reach:
                reach.add(user)
                stack.append(user)
    return reach


def _has_trig_ancestor(node: torch.fx.Node, limit: int = 64) -> bool:
    seen, stack = {node}, [node]
    while stack and len(seen) <= limit:
        n = stack.pop()
        if _op(n) in ("aten.cos", "aten.sin"):
            return True
        for inp in n.all_input_nodes:
            if inp not in seen:
                seen.add(inp)
                stack.append(inp)
    return False


def _rope_nodes(linear: torch.fx.Node | None, end, order: dict[torch.fx.Node, int]) -> tuple[torch.fx.Node, ...]:
    """The RoPE ops on the path ``linear -> end``: present when a path value is multiplied by an
    off-path factor that is derived from cos/sin, or when two path branches are recombined by an
    add/sub after such a multiply (``x*cos + rotate_half(x)*sin`` with cached cos/sin tables)."""
    if linear is None or not isinstance(end, torch.fx.Node):
        return ()
    path = _between(linear, end, order)
    factors = [a for n in path if _op(n) == "aten.mul"
               for a in n.all_input_nodes if a not in path and a is not linear]
    if not factors:
        return ()
    recombined = any(_op(n) in ("aten.add", "aten.sub") and len([a for a in n.all_input_nodes if a in path or a is linear]) == 2
                     for n in path)
    if not (recombined or any(_has_trig_ancestor(f) for f in factors)):
        return ()
    return tuple(sorted((n for n in path if _op(n) in _ROPE), key=order.__getitem__))


def _kv_heads(q: torch.fx.Node | None, k: torch.fx.Node | None, v: torch.fx.Node | None, sdpa: torch.fx.Node,
              num_heads: int | None, head_dim: int | None) -> int | None:
    if not head_dim:
        return None
    if k is not None and k is not q:  # separate k projection, or one fused k/v projection
        width = _static_dim(k, -1)
        heads = width // head_dim if width and width % head_dim == 0 else None
        return heads // 2 if heads and k is v else heads
    if k is not None and num_heads:  # fused qkv projection: width = (H + 2 * KV) * D
        width = _static_dim(k, -1)
        if width and width % head_dim == 0 and (width // head_dim - num_heads) % 2 == 0:
            return (width // head_dim - num_heads) // 2
        return None
    return _static_dim(_arg(sdpa, 1, "key"), 1)  # no k projection found: the heads SDPA sees


def attention_subgraphs(program) -> list[Attention]:
    """Every ``scaled_dot_product_attention`` node of ``program`` with its surrounding linears, in
    graph order."""
    where = node_blocks(program)
    order = {n: i for i, n in enumerate(_graph(program).nodes)}
    out = []
    for node in _graph(program).nodes:
        if _op(node) not in _SDPA:
            continue
        qa, ka, va = (_arg(node, i, name) for i, name in enumerate(("query", "key", "value")))
        q, k, v = _nearest_linear(qa), _nearest_linear(ka), _nearest_linear(va)
        mask = _arg(node, 3, "attn_mask")
        num_heads, head_dim = _static_dim(qa, 1), _static_dim(qa, -1)
        out.append(Attention(
            sdpa=node,
            block=where.get(node),
            layer=nodemeta.get(node).layer,
            q=q, k=k, v=v,
            o=_first_linear_after(node),
            q_rope=_rope_nodes(q, qa, order),
            k_rope=_rope_nodes(k, ka, order),
            mask=mask if isinstance(mask, torch.fx.Node) else None,
            is_causal=bool(_arg(node, 5, "is_causal", False)),
            num_heads=num_heads,
            num_kv_heads=_kv_heads(q, k, v, node, num_heads, head_dim),
            head_dim=head_dim,
        ))
    return out


# ---- where a block's input transforms can go ---------------------------------------------------------
@dataclass(frozen=True)
class BlockGroup:
    """Float linears of one block that share an input, classified by where a per-channel transform of
    that input can be absorbed (what the learned-transform passes need to know).

    ``kind``: ``"norm"`` (the input is an RMSNorm/LayerNorm output: q/k/v, gate/up, BERT's
    intermediate; ``link`` is the norm), ``"o"`` (the attention output projection alone, with ``v``
    the value projection whose output heads feed it, through layout ops only, and ``attn`` the
    attention) or ``"other"`` (down_proj, BERT's output.dense, ...). ``norm_foldable``: a per-channel
    scale of the input can be folded into the norm's weight (and bias) exactly, because the norm
    output feeds nothing but these linears (false for post-norm BERT, where it is also the residual).
    ``up``: for an input ``f(gate) * up`` (SwiGLU), the float linear whose output rows may absorb a
    per-channel scale of the input exactly."""

    kind: str
    linears: tuple[torch.fx.Node, ...]
    input: torch.fx.Node
    link: NormLink | None = None
    norm_foldable: bool = False
    up: torch.fx.Node | None = None
    attn: Attention | None = None
    v: torch.fx.Node | None = None

    def __repr__(self) -> str:
        return f"BlockGroup({self.kind}, {[linear_layer(n) for n in self.linears]})"


def _value_path(attn: Attention) -> bool:
    """Whether ``attn``'s v projection reaches nothing but the attention, through layout ops, and the
    head counts are known (then a per-head transform moves exactly from o_proj into v_proj)."""
    return (attn.v is not None and attn.v not in (attn.q, attn.k) and is_float_linear(attn.v)
            and bool(attn.num_heads and attn.num_kv_heads and attn.head_dim)
            and only_reaches(attn.v, {attn.sdpa}, lambda u: _op(u) in _LAYOUT))


def _up_factor(src: torch.fx.Node, block: int, where: dict[torch.fx.Node, int | None]) -> torch.fx.Node | None:
    """For ``src = a * b``: the float linear of ``block`` behind a factor (through identity ops)
    whose value feeds only ``src`` (SwiGLU's up_proj), else None."""
    if _op(src) != "aten.mul" or len(src.args) != 2:
        return None
    for a in src.args:
        if not isinstance(a, torch.fx.Node):
            continue
        cand = strip_identity(a)
        if is_float_linear(cand) and where.get(cand) == block and only_reaches(cand, {src}, _is_identity):
            return cand
    return None


def block_groups(program, index: int) -> list[BlockGroup]:
    """The linear groups of transformer block ``index`` whose linears are all float
    (:func:`is_float_linear`; groups with a compressed linear are left out), in graph order."""
    groups = [g for g in shared_input_groups(program) if g.block == index and all(is_float_linear(n) for n in g.linears)]
    links = norm_before_linears(program, groups, include_unnormalized=True)
    attns = [a for a in attention_subgraphs(program) if a.block == index]
    where = node_blocks(program)
    out = []
    for link in links:
        lins = tuple(link.group.linears)
        src = link.group.input
        attn = next((a for a in attns if a.o is not None and lins == (a.o,)), None)
        if attn is not None and _value_path(attn):
            out.append(BlockGroup("o", lins, src, attn=attn, v=attn.v))
        elif link.kind is not None:
            foldable = link.weight is not None and only_reaches(link.norm, lins)
            out.append(BlockGroup("norm", lins, src, link=link, norm_foldable=foldable))
        else:
            out.append(BlockGroup("other", lins, src, up=_up_factor(src, index, where)))
    return out
