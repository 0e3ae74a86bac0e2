"""The callables a lowc graph may contain besides ATen/prims/lowc ops: written as data so the
verifier and the artifact loader share one whitelist (the loader resolves nothing outside it)."""

from __future__ import annotations

import operator
from typing import Any, Callable

import torch

#: namespaces whose OpOverloads are allowed (resolved through ``torch.ops.<ns>``)
OP_NAMESPACES = ("aten", "prims", "lowc")


def _hops() -> dict[str, Callable]:
    out: dict[str, Callable] = {}
    try:
        from torch._higher_order_ops.wrap import wrap_with_autocast, wrap_with_set_grad_enabled

        out["wrap_with_set_grad_enabled"] = wrap_with_set_grad_enabled
        out["wrap_with_autocast"] = wrap_with_autocast
    except ImportError:  # pragma: no cover - older torch
        pass
    return out


def python_callables() -> dict[str, Callable]:
    """name -> callable for the non-op targets allowed in a graph."""
    return {"getitem": operator.getitem, **_hops()}


def callable_name(target: Any) -> str | None:
    """The whitelist name of a non-op target, or None if it is not whitelisted."""
    for name, fn in python_callables().items():
        if target is fn:
            return name
    return None


def resolve_op(qualname: str) -> torch._ops.OpOverload:
    """``aten.linear.default`` -> the OpOverload; raises KeyError for anything not allowed."""
    parts = qualname.split(".")
    if len(parts) != 3 or parts[0] not in OP_NAMESPACES:
        raise KeyError(qualname)
    if parts[0] == "lowc":
        from lowc.ir.dialect import ensure_registered

        ensure_registered()
    ns = getattr(torch.ops, parts[0])
    try:
        packet = getattr(ns, parts[1])
        return getattr(packet, parts[2])
    except (AttributeError, RuntimeError) as e:
        raise KeyError(qualname) from e


def op_qualname(target: Any) -> str | None:
    if isinstance(target, torch._ops.OpOverload) and target.namespace in OP_NAMESPACES:
        return f"{target.namespace}.{target._opname}.{target._overloadname}"
    return None
