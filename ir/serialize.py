"""Graph <-> JSON, without pickle and without executing anything from the file.

A graph is a list of nodes ``{name, op, target, args, kwargs, meta}``. Call targets are written as
qualified op names (``aten.linear.default``, ``lowc.linear_wq.default``) or whitelisted callable
names (``getitem``) and resolved on load only through :mod:`lowc.ir.known`: an unknown name is an
error, never an import. Arguments are JSON with tagged forms for nodes, tuples, dtypes, devices,
layouts and memory formats. The pytree input/output specs use torch's JSON treespec format.

Loading treats the file as untrusted (:mod:`lowc.ir.untrusted`). torch.fx generates the Python
source of ``forward`` from node names, placeholder targets, attribute paths, keyword names and the
pytree specs' argument names, so every one of those strings must match a strict grammar
(identifiers; attribute paths of the tensor table) before a GraphModule is built, and the generated
source is then parsed and checked against the only shapes fx writes (assignments of op calls,
attribute reads from ``self``, one return) before it is compiled. Pytree node types resolve
through a fixed table (builtins containers and the installed transformers' ``ModelOutput``
classes), never by importing a module the file names.

Node ``val`` metadata is not stored; the verifier recomputes it by fake-tensor propagation.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import math
import re
from typing import Any

import torch
import torch.fx
import torch.fx._pytree as fx_pytree
import transformers
from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo
from torch.utils import _pytree as pytree
from transformers.utils import ModelOutput

from lowc import untrusted as U
from lowc.errors import ArtifactError
from lowc.ir import known
from lowc.ir import meta as nodemeta

_DTYPES = {str(d).replace("torch.", ""): d for d in (
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16,
    torch.int8, torch.uint8, torch.bool, torch.complex64)}
_LAYOUTS = {"strided": torch.strided, "sparse_coo": torch.sparse_coo}
_MEMFMT = {"contiguous_format": torch.contiguous_format, "preserve_format": torch.preserve_format,
           "channels_last": torch.channels_last}
_FLOATS = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}

#: nesting depth of one node argument (a list of lists of tensors is depth 3)
MAX_ARG_DEPTH = 16
GRAPH = "graph.json"


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


def _dec(a: Any, env: dict[str, torch.fx.Node], device: torch.device | None, what: str, depth: int = 0) -> Any:
    if depth > MAX_ARG_DEPTH:
        raise ArtifactError(f"{what}: argument nested deeper than {MAX_ARG_DEPTH}")
    if a is None or isinstance(a, (bool, int, float)):
        return a
    if isinstance(a, str):
        if len(a) > 1000:
            raise ArtifactError(f"{what}: string argument longer than 1000 characters")
        return a
    if not isinstance(a, dict) or len(a) != 1:
        raise ArtifactError(f"{what}: malformed argument {U._show(a)}")
    (tag, v), = a.items()
    if tag == "node":
        if not isinstance(v, str) or v not in env:
            raise ArtifactError(f"{what}: argument refers to {U._show(v)}, which is not an earlier node")
        return env[v]
    if tag in ("tuple", "list"):
        items = [_dec(x, env, device, what, depth + 1) for x in U.typed(v, list, what)]
        return tuple(items) if tag == "tuple" else items
    if tag == "dict":
        return {U.identifier(k, f"{what}: dict key"): _dec(x, env, device, what, depth + 1)
                for k, x in U.typed(v, dict, what).items()}
    table = {"float": _FLOATS, "dtype": _DTYPES, "layout": _LAYOUTS, "memory_format": _MEMFMT}.get(tag)
    if table is not None:
        if not isinstance(v, str) or v not in table:
            raise ArtifactError(f"{what}: unknown {tag} {U._show(v)}")
        return table[v]
    if tag == "device":
        if not isinstance(v, str) or not re.fullmatch(r"(cpu|cuda|meta)(:\d{1,3})?", v):
            raise ArtifactError(f"{what}: unknown device {U._show(v)}")
        return device if device is not None else torch.device(v)
    raise ArtifactError(f"{what}: unknown argument tag {U._show(tag)}")


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


# ---- pytree specs ---------------------------------------------------------------------------------

#: serialized container types a spec may name, besides transformers ModelOutput classes
_CONTAINERS = {"builtins.tuple", "builtins.list", "builtins.dict", "collections.OrderedDict"}
_MODEL_OUTPUT = re.compile(r"transformers\.(modeling_outputs|models\.([a-z0-9_]+)\.modeling_\2)\.([A-Za-z_][A-Za-z0-9_]*)\Z")


def _model_output_class(type_name: str, what: str) -> None:
    """Make sure the transformers ``ModelOutput`` class ``type_name`` is registered with pytree.

    Only ``transformers.modeling_outputs.X`` and ``transformers.models.<m>.modeling_<m>.X`` are
    accepted, and only when the installed transformers has that module: the name selects a class of
    an installed, trusted package; nothing from the artifact is imported."""
    m = _MODEL_OUTPUT.match(type_name)
    if m is None:
        raise ArtifactError(f"{what}: output type {U._show(type_name)} is not allowed "
                            "(only builtins containers and transformers ModelOutput classes)")


    module = type_name.rpartition(".")[0]
    try:
        if m.group(2) is not None and importlib.util.find_spec(module) is None:
            raise ImportError(module)
        mod = importlib.import_module(module)  # a module of the installed transformers, by pattern
    except ImportError:
        raise ArtifactError(f"{what}: output type {type_name} is not in the installed transformers "
                            f"{transformers.__version__}") from None
    cls = getattr(mod, m.group(3), None)

    if not (isinstance(cls, type) and issubclass(cls, ModelOutput)):
        raise ArtifactError(f"{what}: output type {type_name} is not a transformers ModelOutput")


def _check_spec_node(d: Any, what: str, depth: int) -> None:
    if depth > MAX_ARG_DEPTH:
        raise ArtifactError(f"{what}: nested deeper than {MAX_ARG_DEPTH}")
    U.fields(d, what, ("type", "context", "children_spec"), ("type", "context", "children_spec"))
    t, ctx, children = d["type"], d["context"], U.typed(d["children_spec"], list, what)
    if t is None:
        if ctx is not None or children:
            raise ArtifactError(f"{what}: a leaf has a context or children")
        return
    U.typed(t, str, what)
    if t not in _CONTAINERS:
        _model_output_class(t, what)
    if t in ("builtins.tuple", "builtins.list"):
        if ctx != "null":
            raise ArtifactError(f"{what}: {t} with a context")
    else:  # dict, OrderedDict, ModelOutput: the context is a JSON list of keys (argument/field names)
        try:
            keys = json.loads(U.typed(ctx, str, what))
        except ValueError:
            raise ArtifactError(f"{what}: the context of {t} is not JSON") from None
        for k in U.typed(keys, list, what):
            U.identifier(k, f"{what}: key of {t}")
        if len(keys) != len(children) or len(set(keys)) != len(keys):
            raise ArtifactError(f"{what}: {t} has {len(keys)} keys for {len(children)} children")
    for c in children:
        _check_spec_node(c, what, depth + 1)


def _load_treespec(s: Any, what: str):
    if s is None:
        return None
    try:
        protocol, root = json.loads(U.typed(s, str, what))
    except (ValueError, TypeError):
        raise ArtifactError(f"{what}: not a JSON [protocol, spec] pair") from None
    except RecursionError:
        raise ArtifactError(f"{what}: nested too deeply") from None
    if protocol != 1:
        raise ArtifactError(f"{what}: unknown treespec protocol {U._show(protocol)}")
    _check_spec_node(root, what, 0)
    try:
        return pytree.treespec_loads(s)
    except Exception as e:
        raise ArtifactError(f"{what}: cannot rebuild the pytree spec ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


# ---- loading --------------------------------------------------------------------------------------

_NODE_KEYS = ("name", "op", "target", "args", "kwargs", "meta")


def _resolve_target(name: Any, what: str, define_op=None):
    U.typed(name, str, what)
    try:
        if name.count(".") == 2:
            return known.resolve_op(name, define_op)
        return known.python_callables()[name]
    except KeyError:
        raise ArtifactError(f"{what}: unknown op {U._show(name)}") from None


def _check_kwargs(target, kwargs: dict, what: str) -> None:
    schema = getattr(target, "_schema", None)
    names = {a.name for a in schema.arguments} if schema is not None else set()
    for k in kwargs:
        if k not in names:
            raise ArtifactError(f"{what}: keyword argument {U._show(k)} is not an argument of {getattr(target, '__name__', target)}")


def _node_meta(m: Any, what: str, version: int) -> tuple[dict | None, nodemeta.NodeInfo | None]:
    U.fields(m, what, ("nn_module_stack", "lowc"))
    stack = None
    if "nn_module_stack" in m:
        stack = {}
        for entry in U.typed(m["nn_module_stack"], list, f"{what}.nn_module_stack"):
            if not (isinstance(entry, list) and len(entry) == 3 and all(isinstance(x, str) and len(x) <= 1000 for x in entry)):
                raise ArtifactError(f"{what}.nn_module_stack: entries must be [key, path, type] strings")
            stack[entry[0]] = (entry[1], entry[2])
    info = nodemeta.NodeInfo.from_json(m["lowc"], f"{what}.lowc", version) if "lowc" in m else None
    return stack, info


def graph_from_json(d: dict[str, Any], root: torch.nn.Module, device: torch.device | str | None = None,
                    tensors: set[str] | None = None, inputs: list[str] | None = None, by_name: bool = True,
                    what: str = GRAPH, version: int = 2, define_op=None) -> torch.fx.GraphModule:
    """Rebuild a GraphModule over ``root`` (which holds the attributes) from :func:`graph_to_json`.

    ``tensors``: the attribute paths ``get_attr`` nodes may read (default: any valid path);
    ``inputs``: the model's inputs in order, when the caller knows them: the graph must have as many
    placeholders, of the same names if ``by_name`` (models called with keyword inputs). ``version``:
    the artifact format version the node metadata was written in (1 or 2). ``define_op(name)``
    defines the op ``lowc::<name>`` a node calls (default: the IR dialect's own registry)."""
    dev = torch.device(device) if device is not None else None
    U.fields(d, what, ("nodes", "pytree", "tensors"), ("nodes",))
    graph = torch.fx.Graph()
    env: dict[str, torch.fx.Node] = {}
    placeholders: list[str] = []
    nodes = U.typed(d["nodes"], list, f"{what}: nodes")
    for i, nd in enumerate(nodes):
        w = f"{what}: node {i}"
        U.fields(nd, w, _NODE_KEYS, ("name", "op"))
        name = U.identifier(nd["name"], f"{w} name")
        w = f"{what}: node {name}"
        op = nd["op"]
        if (op == "output") != (i == len(nodes) - 1):
            raise ArtifactError(f"{w}: the graph must end with exactly one output node")
        args = _dec(nd.get("args", {"tuple": []}), env, dev, w)
        kwargs = _dec(nd.get("kwargs", {"dict": {}}), env, dev, w)
        if not isinstance(args, tuple) or not isinstance(kwargs, dict):
            raise ArtifactError(f"{w}: args must be a tuple and kwargs a dict")
        if op in ("placeholder", "get_attr"):
            if args or kwargs:
                raise ArtifactError(f"{w}: a {op} takes no arguments")
            if op == "placeholder":
                target = U.identifier(nd.get("target"), f"{w} target")
                placeholders.append(target)
            else:
                target = U.attr_path(nd.get("target"), f"{w} target")
                if tensors is not None and target not in tensors:
                    raise ArtifactError(f"{w}: reads {target!r}, which is not in the tensor table")
        elif op == "call_function":
            target = _resolve_target(nd.get("target"), w, define_op)
            _check_kwargs(target, kwargs, w)
        elif op == "output":
            if "target" in nd and nd["target"] not in (None, "output"):
                raise ArtifactError(f"{w}: an output node has no target")
            if len(args) != 1 or kwargs:
                raise ArtifactError(f"{w}: an output node takes one argument")
            target = "output"
        else:
            raise ArtifactError(f"{w}: unsupported op {U._show(op)}")
        node = graph.create_node(op, target, args, kwargs, name=name)
        if node.name != name:
            raise ArtifactError(f"{w}: duplicate or reserved node name")
        stack, info = _node_meta(nd.get("meta", {}), f"{w} meta", version)
        if stack is not None:
            node.meta["nn_module_stack"] = stack
        if info is not None:
            nodemeta.set_info(node, info)
        env[name] = node
    if not nodes:
        raise ArtifactError(f"{what}: the graph has no nodes")
    if inputs is not None and (len(placeholders) != len(inputs) or (by_name and placeholders != list(inputs))):
        raise ArtifactError(f"{what}: graph inputs {placeholders} do not match the model's inputs {list(inputs)}")
    if "pytree" in d:
        pt = U.fields(d["pytree"], f"{what}: pytree", ("orig_args", "in_spec", "out_spec"), ("orig_args", "in_spec", "out_spec"))
        orig = [U.identifier(a, f"{what}: pytree.orig_args") for a in U.typed(pt["orig_args"], list, f"{what}: pytree.orig_args")]
        if orig != placeholders:
            raise ArtifactError(f"{what}: pytree.orig_args {orig} do not match the graph inputs {placeholders}")
        graph._codegen = _PyTreeCodeGen(_PyTreeInfo(orig, _load_treespec(pt["in_spec"], f"{what}: pytree.in_spec"),
                                                     _load_treespec(pt["out_spec"], f"{what}: pytree.out_spec")))
    try:
        graph.lint()
    except Exception as e:
        raise ArtifactError(f"{what}: the graph is malformed: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    check_generated_source(graph, what)
    return torch.fx.GraphModule(root, graph)


# ---- the generated source -------------------------------------------------------------------------

_EXPRS = (ast.Name, ast.Constant, ast.Tuple, ast.List, ast.Dict, ast.Call, ast.keyword, ast.Attribute,
          ast.Subscript, ast.Slice, ast.UnaryOp, ast.USub, ast.Load, ast.Store)


def _allowed_global(value: Any) -> bool:
    if value is torch or value is fx_pytree or value is pytree or value is torch.device or value is type(None):
        return True
    if isinstance(value, float) and not math.isfinite(value):
        return True
    return known.op_qualname(value) is not None or known.callable_name(value) is not None


def _op_dunder(n: ast.Attribute) -> bool:
    """``torch.ops.aten.__and__``: an operator op of an allowed namespace."""
    v = n.value
    return (re.fullmatch(r"__[a-z]+__", n.attr) is not None and isinstance(v, ast.Attribute)
            and v.attr in known.OP_NAMESPACES and isinstance(v.value, ast.Attribute) and v.value.attr == "ops"
            and isinstance(v.value.value, ast.Name) and v.value.value.id == "torch")


def check_generated_source(graph: torch.fx.Graph, what: str = GRAPH) -> None:
    """Parse the ``forward`` torch.fx would compile for ``graph`` and check it has only the shapes
    fx writes for ATen graphs; anything else (a default value, a decorator, a dunder attribute, a
    name that is neither an input, a node nor a known global) is an ArtifactError. A second line of
    defence behind the grammar checks of :func:`graph_from_json`: nothing is executed before it."""
    code = graph.python_code(root_module="self")
    bad = next((k for k, v in code.globals.items() if not _allowed_global(v)), None)
    if bad is not None:
        raise ArtifactError(f"{what}: the graph refers to a global {bad!r} that is not an allowed op")
    try:
        tree = ast.parse(code.src)
    except SyntaxError as e:
        raise ArtifactError(f"{what}: the graph does not generate valid code ({e.msg})") from None

    def fail(node: ast.AST, why: str):
        raise ArtifactError(f"{what}: the generated code has {why} at line {getattr(node, 'lineno', '?')}")

    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.FunctionDef):
        fail(tree, "something besides one function")
    fn = tree.body[0]
    a = fn.args
    if (fn.name != "forward" or fn.decorator_list or fn.returns or a.vararg or a.kwarg or a.kwonlyargs
            or a.posonlyargs or a.defaults or a.kw_defaults or any(x.annotation for x in a.args)):
        fail(fn, "an unexpected function signature")
    names = {x.arg for x in a.args} | set(code.globals) | {"getattr"}
    for stmt in fn.body:
        if isinstance(stmt, ast.Assign):
            values = [stmt.value]
            for t in stmt.targets:
                elts = t.elts if isinstance(t, ast.Tuple) else [t]
                if not all(isinstance(e, ast.Name) for e in elts):
                    fail(stmt, "an assignment to something other than names")
        elif isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call):
            values = [stmt.value]
        elif isinstance(stmt, ast.Return):
            values = [stmt.value] if stmt.value is not None else []
        else:
            fail(stmt, f"a {type(stmt).__name__} statement")
        for v in values:
            for n in ast.walk(v):
                if not isinstance(n, _EXPRS):
                    fail(n, f"a {type(n).__name__} expression")
                if isinstance(n, ast.Attribute) and n.attr.startswith("__") and not _op_dunder(n):
                    fail(n, f"the attribute {n.attr!r}")
                if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load) and n.id not in names:
                    fail(n, f"the unknown name {n.id!r}")
                if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "getattr":
                    if len(n.args) != 2 or n.keywords or not (isinstance(n.args[1], ast.Constant)
                                                               and isinstance(n.args[1].value, str)
                                                               and re.fullmatch(r"\w+", n.args[1].value)):
                        fail(n, "a getattr of something other than a plain attribute")
        if isinstance(stmt, ast.Assign):
            for t in stmt.targets:
                names.update(e.id for e in (t.elts if isinstance(t, ast.Tuple) else [t]))
