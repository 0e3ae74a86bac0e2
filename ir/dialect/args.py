"""Typed, by-name access to the arguments of op nodes, built from each op's schema.

Code never indexes ``node.args`` by position for a dialect op: positions differ between ops
(argument 8 is ``act_bits`` in ``linear_wqaq`` but ``out_features`` in ``linear_lut``) and change
when an op gains an argument. Instead:

* :func:`op_args` - a read-only mapping ``schema argument name -> value`` for any OpOverload node
  (defaults filled in), and :func:`rebuild` to make the positional arguments of a new node from a
  few changed names;
* :class:`LinearQArgs` - the quantized-linear family (``linear_wq``, ``linear_wqaq`` and the backend
  layouts ``linear_lut``, ``linear_wq_tr``): any op whose schema starts ``(x, qweight|weight,
  scales, zeros, bias, bits, group_size, in_features, ...)``, recognised by that shape, not by a list
  of names, so a new backend layout needs no change here;
* :class:`LinearArgs` - ``aten.linear(input, weight, bias=None)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping

import torch
import torch.fx

from lowc.ir.scheme import Scheme

_LINEAR_PREFIX = ("x", "weight", "scales", "zeros", "bias", "bits", "group_size", "in_features")


def schema_names(node: torch.fx.Node) -> list[str]:
    schema = getattr(node.target, "_schema", None)
    if node.op != "call_function" or schema is None:
        raise TypeError(f"node {node.name} is not a call of an op with a schema")
    return [a.name for a in schema.arguments]


def op_args(node: torch.fx.Node) -> Mapping[str, Any]:
    """``{argument name: value}`` of an op node, defaults filled in (read-only)."""
    schema = node.target._schema if node.op == "call_function" and hasattr(node.target, "_schema") else None
    if schema is None:
        raise TypeError(f"node {node.name} is not a call of an op with a schema")
    values: dict[str, Any] = {}
    for i, a in enumerate(schema.arguments):
        if i < len(node.args):
            values[a.name] = node.args[i]
        elif a.name in node.kwargs:
            values[a.name] = node.kwargs[a.name]
        elif a.has_default_value():
            values[a.name] = a.default_value
        else:
            raise TypeError(f"node {node.name}: argument {a.name!r} of {node.target} is missing")
    return MappingProxyType(values)


def rebuild(node: torch.fx.Node, op: torch._ops.OpOverload | None = None, **changes: Any) -> tuple:
    """Positional arguments for a call of ``op`` (default: the node's own op) taking the node's
    arguments by name, with ``changes`` applied; every argument of ``op`` must be known."""
    values = {**op_args(node), **changes}
    op = op or node.target
    out = []
    for a in op._schema.arguments:
        if a.name in values:
            out.append(values[a.name])
        elif a.has_default_value():
            out.append(a.default_value)
        else:
            raise TypeError(f"{op}: no value for argument {a.name!r}")
    return tuple(out)


def is_quantized_linear(node: torch.fx.Node) -> bool:
    """Whether ``node`` calls an op of the quantized-linear family (module docstring)."""
    try:
        names = schema_names(node)
    except TypeError:
        return False
    names = ["weight" if n == "qweight" else n for n in names[: len(_LINEAR_PREFIX)]]
    return tuple(names) == _LINEAR_PREFIX


@dataclass(frozen=True)
class LinearQArgs:
    """The arguments of a quantized-linear node, by name (``weight`` is the packed weight, called
    ``qweight`` in the reference layout). ``out_features`` is given by backend layouts only;
    ``act_bits`` is 16 and ``act_scale`` None unless the op quantizes its input."""

    node: torch.fx.Node
    x: Any
    weight: torch.fx.Node
    scales: torch.fx.Node
    zeros: torch.fx.Node | None
    bias: torch.fx.Node | None
    bits: int
    group_size: int
    in_features: int
    out_features: int | None = None
    act_bits: int = 16
    act_scale: torch.fx.Node | None = None
    idx: torch.fx.Node | None = None  # group-sparse layouts (``linear_gsq``): kept sparse-group indices
    sparse_group: int = 0  # group-sparse layouts: inputs per kept/dropped group; 0 = dense

    @property
    def sparse(self) -> bool:
        return self.sparse_group > 0

    @staticmethod
    def of(node: torch.fx.Node) -> "LinearQArgs":
        if not is_quantized_linear(node):
            raise TypeError(f"node {node.name} ({node.target}) is not a quantized linear")
        a = dict(op_args(node))
        weight = a.pop("qweight", None) or a.pop("weight")
        return LinearQArgs(node=node, weight=weight, **{k: v for k, v in a.items() if k in _FIELDS})

    @property
    def op_name(self) -> str:
        return self.node.target.name()

    def scheme(self, k_pad: int | None = None) -> Scheme:
        """The storage scheme the arguments say: bits, grouping (``-1`` when one group spans the
        whole padded row ``k_pad``, if given), symmetric when there are no zero points, and the
        activation bits."""
        gs = -1 if k_pad is not None and self.group_size == k_pad else self.group_size
        return Scheme(w_bits=self.bits, group_size=gs, symmetric=self.zeros is None, a_bits=self.act_bits,
                      a_static=None)

    def rebuild(self, op: torch._ops.OpOverload | None = None, **changes: Any) -> tuple:
        """Arguments for a new node of ``op`` (default: this one's) with ``changes`` by name; the
        packed weight may be given as ``weight`` whatever the op calls it."""
        op = op or self.node.target
        names = [a.name for a in op._schema.arguments]
        if "weight" in changes and "qweight" in names:
            changes["qweight"] = changes.pop("weight")
        values = {"qweight" if "qweight" in names else "weight": self.weight,
                  **{k: getattr(self, k) for k in _FIELDS}, **changes}
        return tuple(values[n] if n in values else a.default_value for n, a in zip(names, op._schema.arguments))


_FIELDS = ("x", "scales", "zeros", "bias", "bits", "group_size", "in_features", "out_features", "act_bits", "act_scale",
           "idx", "sparse_group")

LINEAR = torch.ops.aten.linear.default


@dataclass(frozen=True)
class LinearArgs:
    """``aten.linear(input, weight, bias=None)`` by name; ``constant`` when the weight is a stored
    attribute (a ``get_attr`` node), i.e. a layer compression passes can rewrite."""

    node: torch.fx.Node
    input: Any
    weight: Any
    bias: Any = None

    @staticmethod
    def of(node: torch.fx.Node) -> "LinearArgs":
        if node.op != "call_function" or node.target != LINEAR:
            raise TypeError(f"node {node.name} is not an aten.linear")
        a = op_args(node)
        return LinearArgs(node, a["input"], a["weight"], a["bias"])

    @property
    def constant(self) -> bool:
        return isinstance(self.weight, torch.fx.Node) and self.weight.op == "get_attr"
