"""Typed lowc metadata carried on FX nodes (``node.meta["lowc"]``).

torch.export already records ``nn_module_stack`` (which module each node came from). lowc adds a
:class:`NodeInfo`: the layer (module path), its role in a transformer (q/k/v/o/up/gate/down/...),
the transformer block index, and, once a method pass has run, the compression scheme.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

import torch.fx

from lowc import untrusted as U
from lowc.errors import ArtifactError
from lowc.ir.scheme import Scheme

KEY = "lowc"

# module-name suffix -> role; first match wins. Covers Llama/Mistral/Qwen, BERT-style and GPT-2-style names.
ROLE_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"(^|\.)(q_proj|query|wq)$", "q"),
    (r"(^|\.)(k_proj|key|wk)$", "k"),
    (r"(^|\.)(v_proj|value|wv)$", "v"),
    (r"(^|\.)(qkv_proj|c_attn|query_key_value|Wqkv)$", "qkv"),
    (r"(^|\.)(o_proj|out_proj|attention\.output\.dense|wo|c_proj\b(?=.*attn))$", "o"),
    (r"(^|\.)(gate_proj|w1)$", "gate"),
    (r"(^|\.)(up_proj|w3|intermediate\.dense|fc1|c_fc)$", "up"),
    (r"(^|\.)(down_proj|w2|fc2|mlp\.c_proj)$", "down"),
    (r"(^|\.)\d+\.output\.dense$", "down"),
    (r"(^|\.)(lm_head|embed_out)$", "lm_head"),
    (r"(^|\.)(embed_tokens|word_embeddings|wte|position_embeddings|token_type_embeddings)$", "embed"),
    (r"(^|\.)(input_layernorm|post_attention_layernorm|layer_?norm\w*|LayerNorm|norm|ln_\w+)$", "norm"),
)

_BLOCK_RE = re.compile(r"^(?P<stack>.*?)\.(?P<idx>\d+)(\.|$)")


@dataclass(frozen=True)
class NodeInfo:
    """What lowc knows about a node: its layer (module path), role and block; once a method pass
    has compressed it, the :class:`~lowc.ir.scheme.Scheme` it is stored in and the ``method`` that
    chose the stored values (``rtn``, ``gptq``, ``affinequant``, ``flatquant+gptq``, ...);
    ``transforms`` lists what earlier passes folded into the layer (``smoothquant(alpha=0.5)``)."""

    layer: str = ""
    role: str = ""
    block: int | None = None
    scheme: Scheme | None = None
    method: str = ""
    transforms: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"layer": self.layer, "role": self.role, "block": self.block,
                             "scheme": self.scheme.to_json() if self.scheme else None, "method": self.method,
                             "transforms": list(self.transforms)}
        return {k: v for k, v in d.items() if v not in (None, "", [])}

    @staticmethod
    def from_json(d: Any, what: str = "lowc", version: int = 2) -> "NodeInfo":
        """Parse :meth:`to_json` output strictly (it may come from an untrusted artifact); format
        ``version`` 1 kept the method and the passes' notes inside the scheme dict."""
        if version == 1 and isinstance(d, dict) and isinstance(d.get("scheme"), dict):
            d = {**d, **_scheme_v1(d["scheme"], f"{what}.scheme")}
        U.fields(d, what, ("layer", "role", "block", "scheme", "method", "transforms"))
        layer = U.typed(d.get("layer", ""), str, f"{what}.layer")
        if len(layer) > 1000 or not re.fullmatch(r"[\w.]*", layer):
            raise ArtifactError(f"{what}.layer: {U._show(layer)} is not a module path")
        role = U.typed(d.get("role", ""), str, f"{what}.role")
        if not re.fullmatch(r"\w{0,32}", role):
            raise ArtifactError(f"{what}.role: {U._show(role)} is not a role name")
        block = d.get("block")
        if block is not None:
            U.int_in(block, 0, 1 << 20, f"{what}.block")
        scheme = d.get("scheme")
        method = U.typed(d.get("method", ""), str, f"{what}.method")
        transforms = tuple(U.typed(t, str, f"{what}.transforms") for t in U.typed(d.get("transforms", []), list, f"{what}.transforms"))
        for label in (method, *transforms):
            if len(label) > 200 or not re.fullmatch(r"[\w+.=,:()\-]*", label):
                raise ArtifactError(f"{what}: {U._show(label)} is not a method or transform label")
        return NodeInfo(layer=layer, role=role, block=block,
                        scheme=Scheme.from_json(scheme, f"{what}.scheme") if scheme is not None else None,
                        method=method, transforms=transforms)

    def compressed(self, scheme: Scheme, method: str) -> "NodeInfo":
        """This layer stored in ``scheme`` by ``method`` (layer, role, block, transforms kept)."""
        return replace(self, scheme=scheme, method=method)

    def transformed(self, label: str) -> "NodeInfo":
        """This layer with ``label`` added to its transforms."""
        return replace(self, transforms=(*self.transforms, label))


#: the ``transforms`` label of a layer pruned by ``prune`` (:mod:`lowc.passes.quant.prune`):
#: ``prune(method=wanda,pattern=2:4,sparsity=0.5)``, ``sparsity`` the fraction of the layer's weights
#: that are zero after pruning
_PRUNE_RE = re.compile(r"prune\(method=(\w+),pattern=(unstructured|\d+:\d+),sparsity=([0-9.]+)\)")


def prune_label(method: str, pattern: str, sparsity: float) -> str:
    return f"prune(method={method},pattern={pattern},sparsity={sparsity:.4g})"


def pruned(info: NodeInfo) -> tuple[str, str, float] | None:
    """``(method, pattern, sparsity)`` when a ``prune`` pass zeroed weights of this layer, else None."""
    for t in info.transforms:
        m = _PRUNE_RE.fullmatch(t)
        if m:
            return m.group(1), m.group(2), float(m.group(3))
    return None


def _scheme_v1(d: dict[str, Any], what: str) -> dict[str, Any]:
    """A version-1 scheme dict (scheme fields, ``method``, the passes' notes) as version-2 fields.

    ``padded_in_features`` and ``layout`` are dropped: they are read from the op now."""
    d = dict(d)
    out: dict[str, Any] = {}
    method = d.pop("method", "")
    if d.pop("gptq", False) and method:
        method += "+gptq"
    out["method"] = method
    alpha = d.pop("smoothquant_alpha", None)
    out["transforms"] = [f"smoothquant(alpha={alpha})"] if isinstance(alpha, (int, float)) and not isinstance(alpha, bool) else []
    d.pop("padded_in_features", None)
    d.pop("layout", None)
    out["scheme"] = d if "w_bits" in d else None  # a smoothed float linear had notes but no scheme
    return out


def role_of(layer: str) -> str:
    for pattern, role in ROLE_PATTERNS:
        if re.search(pattern, layer):
            return role
    return ""


def module_path(node: torch.fx.Node) -> str:
    """Innermost module path from ``nn_module_stack`` ('' for nodes outside any submodule)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    if path.startswith("_empty"):  # export's placeholder stack for nodes outside any module
        return ""
    # torch.export may prefix paths with "L['self']." (strict mode); keep the plain attribute path
    return re.sub(r"^L\['self'\]\.?", "", path)


def block_of(node: torch.fx.Node, block_prefix: str | None) -> int | None:
    """Index of the transformer block (child of the ModuleList ``block_prefix``) a node came from."""
    if not block_prefix:
        return None
    stack = node.meta.get("nn_module_stack") or {}
    for path, _ in stack.values():
        path = re.sub(r"^L\['self'\]\.?", "", path)
        if path.startswith(block_prefix + "."):
            rest = path[len(block_prefix) + 1 :]
            idx = rest.split(".", 1)[0]
            if idx.isdigit():
                return int(idx)
    return None


def find_block_prefix(gm: torch.fx.GraphModule) -> str | None:
    """The ModuleList path holding the transformer blocks: the path ``P`` for which module paths
    ``P.0, P.1, ...`` occur in the graph with the most distinct indices (ties: the shortest path)."""
    counts: dict[str, set[int]] = {}
    for node in gm.graph.nodes:
        for path, _ in (node.meta.get("nn_module_stack") or {}).values():
            path = re.sub(r"^L\['self'\]\.?", "", path)
            parts = path.split(".")
            for i, part in enumerate(parts):
                if part.isdigit() and i > 0:
                    counts.setdefault(".".join(parts[:i]), set()).add(int(part))
    if not counts:
        return None
    best = max(counts.items(), key=lambda kv: (len(kv[1]), -len(kv[0])))
    return best[0] if len(best[1]) >= 1 else None


def get(node: torch.fx.Node) -> NodeInfo:
    return node.meta.get(KEY) or NodeInfo()


def set_info(node: torch.fx.Node, info: NodeInfo) -> None:
    node.meta[KEY] = info


def annotate(gm: torch.fx.GraphModule) -> str | None:
    """Attach :class:`NodeInfo` to every call_function node; returns the block ModuleList path."""
    prefix = find_block_prefix(gm)
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        layer = module_path(node)
        old = get(node)
        set_info(node, replace(old, layer=layer, role=role_of(layer), block=block_of(node, prefix)))
    return prefix
