"""A stable text form of a Program, for tests (FileCheck-style) and ``--print-after``.

One line per node::

    %q_proj = aten.linear.default(%x, @model.layers.0.self_attn.q_proj.weight) : f32[s0, s1, 96]  # layer=... role=q block=0

``@path`` is an attribute (parameter/buffer) read; shapes come from the node's ``val`` metadata when
present. The form depends only on the graph, so it is stable across runs and processes.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx

from lowc.ir import meta as nodemeta

_DTYPE_ABBR = {
    torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64",
    torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
    torch.bool: "bool",
}


def _fmt_val(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        return f"{_DTYPE_ABBR.get(v.dtype, str(v.dtype))}[{', '.join(str(d) for d in v.shape)}]"
    if isinstance(v, (list, tuple)):
        return "(" + ", ".join(_fmt_val(x) for x in v) + ")"
    if isinstance(v, (torch.SymInt, int)):
        return f"sym {v}" if isinstance(v, torch.SymInt) else str(v)
    return type(v).__name__


def _fmt_arg(a: Any) -> str:
    if isinstance(a, torch.fx.Node):
        return f"@{a.target}" if a.op == "get_attr" else f"%{a.name}"
    if isinstance(a, (list, tuple)):
        inner = ", ".join(_fmt_arg(x) for x in a)
        return f"[{inner}]" if isinstance(a, list) else f"({inner}{',' if len(a) == 1 else ''})"
    if isinstance(a, dict):
        return "{" + ", ".join(f"{k}: {_fmt_arg(v)}" for k, v in a.items()) + "}"
    if isinstance(a, torch.dtype):
        return _DTYPE_ABBR.get(a, str(a))
    if isinstance(a, float):
        return repr(a)
    return repr(a) if isinstance(a, str) else str(a)


def target_name(node: torch.fx.Node) -> str:
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return f"{t.namespace}.{t._opname}.{t._overloadname}"
    if isinstance(t, torch._ops.HigherOrderOperator):
        return t.name()
    return getattr(t, "__name__", str(t))


def format_node(node: torch.fx.Node) -> str | None:
    if node.op == "get_attr":
        return None  # shown inline as @path
    if node.op == "placeholder":
        line = f"%{node.name} = input()"
    elif node.op == "output":
        return f"return {_fmt_arg(node.args[0])}"
    else:
        args = [_fmt_arg(a) for a in node.args] + [f"{k}={_fmt_arg(v)}" for k, v in node.kwargs.items()]
        line = f"%{node.name} = {target_name(node)}({', '.join(args)})"
    if "val" in node.meta:
        line += f" : {_fmt_val(node.meta['val'])}"
    info = nodemeta.get(node)
    tags = []
    if info.layer:
        tags.append(f"layer={info.layer}")
    if info.role:
        tags.append(f"role={info.role}")
    if info.block is not None:
        tags.append(f"block={info.block}")
    if info.scheme:
        tags.append(f"scheme={info.scheme.label.replace(' ', ',')}")
    if info.method:
        tags.append(f"method={info.method}")
    if info.transforms:
        tags.append(f"transforms={','.join(info.transforms)}")
    if tags:
        line += "  # " + " ".join(tags)
    return line


def format_graph(gm: torch.fx.GraphModule) -> str:
    lines = [l for l in (format_node(n) for n in gm.graph.nodes) if l is not None]
    return "\n".join(lines) + "\n"


def format_program(program) -> str:
    header = f"program kind={program.info.kind} blocks={program.info.block_prefix or '-'}\n"
    return header + format_graph(program.gm)
