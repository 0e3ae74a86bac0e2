"""Put a trained or computed input transform into the program: fold a per-channel scale into the
norm that produces the input, or insert the online op ``lowc::kron_transform`` before a group of
linears that share an input.

Preconditions: the group's linears are float ``aten.linear`` with constant weights
(:func:`lowc.ir.analysis.is_float_linear`). Invariant: the program's tensors are replaced by new
ones, never changed in place (the program may share tensors with the user's model); new buffers live
on the program's device and are fp32.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.fx

from lowc.ir import meta as nodemeta
from lowc.ir.analysis import BlockGroup, NormLink, linear_layer
from lowc.ir.dialect import ensure_registered
from lowc.ir.dialect.args import LinearArgs


def fold_into_norm(program, link: NormLink, scale: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Replace the weight (and bias) ``v`` of the norm ``link`` by ``scale(v)``, computed in fp32 and
    cast back (a per-channel input scale absorbed by the norm)."""
    for target in (link.weight, link.bias):
        if target is not None:
            v = program.attr(target)
            program.replace_attr(target, scale(v.detach().float()).to(v.dtype))


def insert_transform(program, group: BlockGroup, *, scale: torch.Tensor | None, p1: torch.Tensor,
                     p2: torch.Tensor | None, clip: float | None, prefix: str) -> torch.fx.Node:
    """Insert ``lowc::kron_transform(x, scale, p1, p2, clip)`` before the group's first linear and
    make every linear of the group read it. Buffers ``<prefix>_scale/_p1/_p2`` live on the first
    linear's module; the new node carries the layer ``<first linear>.input_transform`` and the block
    of the first linear."""
    ensure_registered()
    first = group.linears[0]
    weight = LinearArgs.of(first).weight.target
    module_path = weight.rpartition(".")[0]
    dev = program.attr(weight).device  # the program's device (training may run elsewhere)
    args = program.add_operand_buffers(module_path, first, {
        f"{prefix}_{name}": None if t is None else t.detach().float().to(dev).contiguous().clone()
        for name, t in (("scale", scale), ("p1", p1), ("p2", p2))})
    with program.graph.inserting_before(first):
        node = program.graph.call_function(torch.ops.lowc.kron_transform.default,
                                           (group.input, args[0], args[1], args[2], None if clip is None else float(clip)))
    nodemeta.set_info(node, nodemeta.NodeInfo(layer=f"{linear_layer(first)}.input_transform", role="",
                                              block=nodemeta.get(first).block))
    for lin in group.linears:
        lin.update_arg(0, node)  # aten.linear's input: the group's shared value, now transformed
    return node
