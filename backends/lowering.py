"""The rewrite every kernel backend's lowering pass performs (``triton-lower``, ``lut-lower``): each
``lowc::linear_wq`` node becomes the backend's op with the same operands, its weights repacked into
the backend's layout.

Per node: the backend's ``check`` may refuse the layer (a one-line message naming it, raised as
:class:`~lowc.errors.KernelError`); ``repack`` turns the reference-layout tensors into the backend's
``(weight, scales, zeros, out_features)``; these become buffers ``<layer>.<buffers[i]>`` (the old ones
are dropped once unread), and the new node ``op(x, weight, scales, zeros, bias, bits, group_size,
in_features, out_features)`` keeps the node's metadata (the op itself names the layout); that replacement
is :func:`replace_linear`, which backends also use for their other layouts (e.g. group-sparse ones). An
activation-quantized ``lowc::linear_wqaq`` cannot be lowered by a weight-only kernel and raises,
naming the layer. Nodes already lowered are not ``linear_wq`` any more, so the rewrite is idempotent.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from lowc.errors import KernelError
from lowc.ir import meta as nodemeta
from lowc.ir.dialect import ensure_registered
from lowc.ir.dialect.args import LinearQArgs
from lowc.passes.base import PassResult
from lowc.progress import bar

#: ``check(layer, bits, group_size, in_features, scales) -> message or None``
Check = Callable[[str, int, int, int, torch.Tensor], Optional[str]]
#: ``repack(qweight, scales, zeros, bits, group_size, in_features) -> (weight, scales, zeros, out_features)``
Repack = Callable[..., tuple]


def replace_node(program, a: LinearQArgs, op: torch._ops.OpOverload, tensors: dict, names: Sequence[str],
                 **changes) -> torch.fx.Node:
    """Replace the node of ``a`` by a call of ``op``: ``tensors`` (buffer name -> tensor or None)
    become buffers of the layer's module, passed as the arguments ``names`` (in order), with the
    other ``changes`` by name; the node's metadata (its NodeInfo) is kept."""
    node = a.node
    module_path = a.weight.target.rpartition(".")[0]
    attrs = program.add_operand_buffers(module_path, node, tensors)
    with program.graph.inserting_before(node):
        new = program.graph.call_function(op, a.rebuild(op, **dict(zip(names, attrs)), **changes))
    new.meta = dict(node.meta)  # the layer's NodeInfo (scheme, method) is unchanged: the op says the layout
    node.replace_all_uses_with(new)
    program.graph.erase_node(node)
    return new


def lower_linear_wq(program, op: torch._ops.OpOverload, *, kernels: str, check: Check, repack: Repack,
                    buffers: Sequence[str], progress: bool = False) -> PassResult:
    """Rewrite every ``linear_wq`` node of ``program`` into ``op`` (module docstring). ``kernels`` names
    the backend's kernels in the error for ``linear_wqaq`` (e.g. "cpu-lut kernels"); ``buffers`` are
    the names of the repacked weight, scales and zeros buffers; ``progress`` shows a bar per layer."""

    ensure_registered()
    for node in program.nodes(torch.ops.lowc.linear_wqaq.default):
        raise KernelError(f"layer {nodemeta.get(node).layer or node.name}: {kernels} take float "
                          f"activations; quantized activations (linear_wqaq) cannot be lowered")
    changed = 0
    per_bits: dict[int, int] = {}
    nodes = list(program.nodes(torch.ops.lowc.linear_wq.default))
    for node in bar(nodes, desc=f"repack for {kernels}", enabled=progress):
        a = LinearQArgs.of(node)
        info = nodemeta.get(node)
        qweight, scales = program.attr(a.weight.target), program.attr(a.scales.target)
        zeros = program.attr(a.zeros.target) if a.zeros is not None else None
        why = check(info.layer or node.name, a.bits, a.group_size, a.in_features, scales)
        if why:
            raise KernelError(why)
        weight, new_scales, new_zeros, out_features = repack(qweight, scales, zeros, a.bits, a.group_size, a.in_features)
        replace_linear(program, a, op, dict(zip(buffers, (weight, new_scales, new_zeros))), out_features=out_features)
        changed += 1
        per_bits[a.bits] = per_bits.get(a.bits, 0) + 1
    if changed:
        program.remove_dead()
    return PassResult(changed=changed > 0,
                      stats={"lowered": changed, "layers_by_bits": {str(b): n for b, n in sorted(per_bits.items())}})


def replace_linear(program, a: LinearQArgs, op: torch._ops.OpOverload, tensors: dict[str, torch.Tensor | None],
                   **changes) -> torch.fx.Node:
    """:func:`replace_node` for a layout whose operands are the packed weight, scales and zeros (and,
    for group-sparse layouts, kept-group indices): ``tensors`` (buffer name -> tensor) in that order."""
    return replace_node(program, a, op, tensors, ("weight", "scales", "zeros", "idx")[: len(tensors)], **changes)
