"""The rewrite every kernel backend's lowering pass performs (``triton-lower``, ``lut-lower``): each
``lowc::linear_wq`` node becomes the backend's op with the same operands, its weights repacked into
the backend's layout.

Per node: the backend's ``check`` may refuse the layer (a one-line message naming it, raised as
:class:`~lowc.errors.KernelError`); ``repack`` turns the reference-layout tensors into the backend's
``(weight, scales, zeros, out_features)``; these become buffers ``<layer>.<buffers[i]>`` (the old ones
are dropped once unread), and the new node ``op(x, weight, scales, zeros, bias, bits, group_size,
in_features, out_features)`` keeps the node's metadata, its scheme gaining ``"layout"``. An
activation-quantized ``lowc::linear_wqaq`` cannot be lowered by a weight-only kernel and raises,
naming the layer. Nodes already lowered are not ``linear_wq`` any more, so the rewrite is idempotent.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from lowc.errors import KernelError
from lowc.ir import meta as nodemeta
from lowc.passes.base import PassResult

#: ``check(layer, bits, group_size, in_features, scales) -> message or None``
Check = Callable[[str, int, int, int, torch.Tensor], Optional[str]]
#: ``repack(qweight, scales, zeros, bits, group_size, in_features) -> (weight, scales, zeros, out_features)``
Repack = Callable[..., tuple]


def lower_linear_wq(program, op: torch._ops.OpOverload, *, kernels: str, check: Check, repack: Repack,
                    buffers: Sequence[str], layout: str, progress: bool = False) -> PassResult:
    """Rewrite every ``linear_wq`` node of ``program`` into ``op`` (module docstring). ``kernels`` names
    the backend's kernels in the error for ``linear_wqaq`` (e.g. "cpu-lut kernels"); ``buffers`` are
    the names of the repacked weight, scales and zeros buffers; ``layout`` goes into the scheme;
    ``progress`` shows a bar per layer."""
    from lowc.ir.dialect import ensure_registered
    from lowc.progress import bar

    ensure_registered()
    for node in program.nodes(torch.ops.lowc.linear_wqaq.default):
        raise KernelError(f"layer {nodemeta.get(node).layer or node.name}: {kernels} take float "
                          f"activations; quantized activations (linear_wqaq) cannot be lowered")
    changed = 0
    per_bits: dict[int, int] = {}
    nodes = list(program.nodes(torch.ops.lowc.linear_wq.default))
    for node in bar(nodes, desc=f"repack for {kernels}", enabled=progress):
        x, q_n, s_n, z_n, bias, bits, gs, k = node.args
        info = nodemeta.get(node)
        qweight, scales = program.attr(q_n.target), program.attr(s_n.target)
        zeros = program.attr(z_n.target) if z_n is not None else None
        why = check(info.layer or node.name, bits, gs, k, scales)
        if why:
            raise KernelError(why)
        weight, new_scales, new_zeros, out_features = repack(qweight, scales, zeros, bits, gs, k)
        module_path = q_n.target.rpartition(".")[0]
        w_n, s2, z2 = program.add_operand_buffers(module_path, node, dict(zip(buffers, (weight, new_scales, new_zeros))))
        with program.graph.inserting_before(node):
            new = program.graph.call_function(op, (x, w_n, s2, z2, bias, bits, gs, k, out_features))
        new.meta = dict(node.meta)
        nodemeta.set_info(new, info.with_scheme({**(info.scheme or {}), "layout": layout}))
        node.replace_all_uses_with(new)
        program.graph.erase_node(node)
        changed += 1
        per_bits[bits] = per_bits.get(bits, 0) + 1
    if changed:
        program.remove_dead()
    return PassResult(changed=changed > 0,
                      stats={"lowered": changed, "layers_by_bits": {str(b): n for b, n in sorted(per_bits.items())}})
