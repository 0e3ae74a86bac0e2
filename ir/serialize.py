"""Graph <-> JSON, without pickle and without executing anything from the file.

A graph is a list of nodes ``{name, op, target, args, kwargs, meta}``. Call targets are written as
qualified op names (``aten.linear.default``, ``lowc.linear_wq.default``) or whitelisted callable
names (``getitem``) and resolved on load only through :mod:`lowc.ir.known`: an unknown name is an
error, never an import. Arguments are JSON with tagged forms for nodes, tuples, dtypes, devices,
layouts and memory formats. The pytree input/output specs use torch's JSON treespec format; their
node types must be builtins or ``transformers`` ModelOutput classes (imported from the installed
transformers package, never from the artifact).

Node ``val`` metadata is not stored; the verifier recomputes it by fake-tensor propagation.
"""

from __future__ import annotations

import importlib
import json
import math
from typing import Any

import torch
import torch.fx
from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo
from torch.utils import _pytree as pytree

from lowc.errors import ArtifactError
from lowc.ir import known
from lowc.ir import meta as nodemeta

_DTYPES = {str(d).replace("torch.", ""): d for d in (
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16,
    torch.int8, torch.uint8, torch.bool, torch.complex64)}
_LAYOUTS = {"strided": torch.strided, "sparse_coo": torch.sparse_coo}
_MEMFMT = {"contiguous_format": torch.contiguous_format, "preserve_format": torch.preserve_format,
           "channels_last": torch.channels_last}


def _enc(a: Any) -> Any:
    if isinstance(a, torch.fx.Node):
        return {"node": a.name}
    if a is None or isinstance(a, (bool, int, str)):
        return a
    if isinstance(a, float):
        return a if math.isfinite(a) else {"float": repr(a)}
    if isinstance(a, tuple):
        return {"tuple": [_enc(x) for x in a]}
    if isinstance(a, list):
        return {"list": [_enc(x) for x in a]}
    if isinstance(a, dict):
        return {"dict": {str(k): _enc(v) for k, v in a.items()}}
    if isinstance(a, torch.dtype):
        return {"dtype": str(a).replace("torch.", "")}
    if isinstance(a, torch.device):
        return {"device": str(a)}
    if isinstance(a, torch.layout):
        return {"layout": str(a).replace("torch.", "")}
    if isinstance(a, torch.memory_format):
        return {"memory_format": str(a).replace("torch.", "")}
    raise ArtifactError(f"cannot serialize graph argument of type {type(a).__name__}: {a!r}")


def _dec(a: Any, env: dict[str, torch.fx.Node], device: torch.device | None) -> Any:
    if not isinstance(a, dict):
        return a
    (tag, v), = a.items()
    if tag == "node":
        return env[v]
    if tag == "float":
        return float(v)
    if tag == "tuple":
        return tuple(_dec(x, env, device) for x in v)
    if tag == "list":
        return [_dec(x, env, device) for x in v]
    if tag == "dict":
        return {k: _dec(x, env, device) for k, x in v.items()}
    if tag == "dtype":
        return _DTYPES[v]
    if tag == "device":
        return device if device is not None else torch.device(v)
    if tag == "layout":
        return _LAYOUTS[v]
    if tag == "memory_format":
        return _MEMFMT[v]
    raise ArtifactError(f"graph.json: unknown argument tag {tag!r}")


def _target_name(node: torch.fx.Node) -> str:
    name = known.op_qualname(node.target) or known.callable_name(node.target)
    if name is None:
        raise ArtifactError(f"cannot serialize node {node.name}: target {node.target!r} is not a known op")
    return name


def graph_to_json(gm: torch.fx.GraphModule) -> dict[str, Any]:
    nodes = []
    for n in gm.graph.nodes:
        d: dict[str, Any] = {"name": n.name, "op": n.op}
        if n.op == "call_function":
            d["target"] = _target_name(n)
        elif n.op in ("get_attr", "placeholder"):
            d["target"] = n.target
        elif n.op != "output":
            raise ArtifactError(f"cannot serialize node {n.name}: op {n.op}")
        d["args"] = _enc(n.args)
        if n.kwargs:
            d["kwargs"] = _enc(dict(n.kwargs))
        m: dict[str, Any] = {}
        if n.meta.get("nn_module_stack"):
            m["nn_module_stack"] = [[k, p, t if isinstance(t, str) else getattr(t, "__qualname__", str(t))]
                                    for k, (p, t) in n.meta["nn_module_stack"].items()]
        info = nodemeta.get(n)
        if info.to_json():
            m["lowc"] = info.to_json()
        if m:
            d["meta"] = m
        nodes.append(d)
    out: dict[str, Any] = {"nodes": nodes}
    cg = gm.graph._codegen
    if isinstance(cg, _PyTreeCodeGen):
        info = cg.pytree_info
        out["pytree"] = {
            "orig_args": list(info.orig_args),
            "in_spec": pytree.treespec_dumps(info.in_spec) if info.in_spec is not None else None,
            "out_spec": pytree.treespec_dumps(info.out_spec) if info.out_spec is not None else None,
        }
    return out


def _load_treespec(s: str | None):
    if s is None:
        return None
    types = set()

    def walk(d):
        if isinstance(d, dict):
            if d.get("type"):
                types.add(d["type"])
            for c in d.get("children_spec", []):
                walk(c)

    try:
        walk(json.loads(s)[1])
    except (ValueError, IndexError, TypeError) as e:
        raise ArtifactError(f"graph.json: bad pytree spec ({e})") from None
    for t in types:
        mod = t.rpartition(".")[0]
        if mod and mod.split(".")[0] == "transformers":
            try:
                importlib.import_module(mod)  # registers the ModelOutput pytree node (installed package)
            except ImportError as e:
                raise ArtifactError(f"graph.json: output type {t!r} cannot be imported ({e})") from None
        elif mod and mod.split(".")[0] not in ("builtins", "collections", "torch"):
            raise ArtifactError(f"graph.json: output type {t!r} is not allowed (only builtins and transformers outputs)")
    try:
        return pytree.treespec_loads(s)
    except Exception as e:
        raise ArtifactError(f"graph.json: cannot rebuild pytree spec ({str(e).splitlines()[0]})") from None


def graph_from_json(d: dict[str, Any], root: torch.nn.Module, device: torch.device | str | None = None) -> torch.fx.GraphModule:
    """Rebuild a GraphModule over ``root`` (which holds the attributes) from :func:`graph_to_json`."""
    dev = torch.device(device) if device is not None else None
    graph = torch.fx.Graph()
    env: dict[str, torch.fx.Node] = {}
    try:
        for nd in d["nodes"]:
            op = nd["op"]
            args = _dec(nd.get("args", {"tuple": []}), env, dev)
            kwargs = _dec(nd.get("kwargs", {"dict": {}}), env, dev)
            if op in ("placeholder", "get_attr"):
                target, args, kwargs = nd["target"], (), {}
            elif op == "call_function":
                name = nd["target"]
                try:
                    target = known.resolve_op(name) if name.count(".") == 2 else known.python_callables()[name]
                except KeyError:
                    raise ArtifactError(f"graph.json: node {nd['name']}: unknown op {name!r}") from None
            elif op == "output":
                target = "output"
            else:
                raise ArtifactError(f"graph.json: node {nd.get('name')}: unsupported op {op!r}")
            node = graph.create_node(op, target, tuple(args), dict(kwargs), name=nd["name"])
            if node.name != nd["name"]:
                raise ArtifactError(f"graph.json: duplicate node name {nd['name']!r}")
            m = nd.get("meta", {})
            if "nn_module_stack" in m:
                node.meta["nn_module_stack"] = {k: (p, t) for k, p, t in m["nn_module_stack"]}
            if "lowc" in m:
                nodemeta.set_info(node, nodemeta.NodeInfo.from_json(m["lowc"]))
            env[nd["name"]] = node
    except ArtifactError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"graph.json is malformed: {type(e).__name__}: {e}") from None
    if "pytree" in d:
        pt = d["pytree"]
        graph._codegen = _PyTreeCodeGen(_PyTreeInfo(pt["orig_args"], _load_treespec(pt["in_spec"]), _load_treespec(pt["out_spec"])))
    gm = torch.fx.GraphModule(root, graph)
    return gm
