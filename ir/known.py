"""The callables a lowc graph may contain besides ATen/prims/lowc ops: written as data so the
verifier and the artifact loader share one whitelist (the loader resolves nothing outside it)."""

from __future__ import annotations

import operator
import re
from typing import Any, Callable

import torch

from lowc.ir import dialect

#: namespaces whose OpOverloads are allowed (resolved through ``torch.ops.<ns>``)
OP_NAMESPACES = ("aten", "prims", "lowc", "lowc_onnx")


def _hops() -> dict[str, Callable]:
    out: dict[str, Callable] = {}
    try:
        from torch._higher_order_ops.wrap import (  # optional: torch-internal, not in every version
            wrap_with_autocast,
            wrap_with_set_grad_enabled,
        )

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


#: ops a graph may never contain, whatever their namespace: they reach outside the tensors (files,
#: stdout, warnings) or exist only to test torch. Checked on load and by the verifier.
DENIED_OPS = re.compile(r"(from_file|save|load|_print|print|warn|_test_\w*|_use_\w+|sleep|_set_item|Delete|setdefault|pop)\Z")

_PART = re.compile(r"_?[A-Za-z][A-Za-z0-9_]*\Z")
_DUNDER_OP = re.compile(r"__[a-z]+__\Z")  # aten.__and__.Tensor (``a & b`` in HF mask code)


def resolve_op(qualname: str, define: Callable[[str], bool] | None = None) -> torch._ops.OpOverload:
    """``aten.linear.default`` -> the OpOverload; raises KeyError for anything not allowed.

    A ``lowc`` op is defined first by name through ``define`` (default: this layer's dialect
    registry, :func:`lowc.ir.dialect.define`; the artifact loader passes the registry of every
    layer, :func:`lowc.backends.registry.define_op`), so resolving never depends on what happened
    to be imported before.

    ``qualname`` may come from an untrusted file: each part must be a plain name (the op name may
    be an operator dunder such as ``__and__``), the namespace one of :data:`OP_NAMESPACES`, the op
    not in :data:`DENIED_OPS`, and the result an OpOverload of exactly that name (never some other
    attribute of the namespace object)."""
    parts = qualname.split(".") if isinstance(qualname, str) else []
    if (len(parts) != 3 or parts[0] not in OP_NAMESPACES or not _PART.match(parts[2])
            or not (_PART.match(parts[1]) or _DUNDER_OP.match(parts[1]))):
        raise KeyError(qualname)
    if DENIED_OPS.match(parts[1]):
        raise KeyError(qualname)
    if parts[0] == "lowc":
        (define or dialect.define)(parts[1])
    ns = getattr(torch.ops, parts[0])
    try:
        packet = getattr(ns, parts[1])
        op = getattr(packet, parts[2])
    except (AttributeError, RuntimeError) as e:
        raise KeyError(qualname) from e
    if not isinstance(op, torch._ops.OpOverload) or op_qualname(op) != qualname:
        raise KeyError(qualname)
    return op


def op_qualname(target: Any) -> str | None:
    """``aten.linear.default`` for an allowed OpOverload, None for anything else (a denied op too)."""
    if (isinstance(target, torch._ops.OpOverload) and target.namespace in OP_NAMESPACES
            and not DENIED_OPS.match(target._opname)):
        return f"{target.namespace}.{target._opname}.{target._overloadname}"
    return None
