"""``triton-lower``: rewrite ``lowc::linear_wq`` into ``lowc::linear_wq_tr`` with weights repacked into
the Triton kernels' ``k-packed-int32`` layout (:mod:`lowc.backends.triton.layout`).

Precondition: a method pass produced ``linear_wq`` nodes. A layer the kernels cannot take raises,
naming it: weights other than 4 or 8 bits, a group size that is not a multiple of 16 (a K tile of at
least 16 must lie inside one group; per-channel layers always fit), or an activation-quantized
``linear_wqaq``. Each node keeps its own bits and group size (read from its arguments), so per-layer
mixed 4/8-bit models lower as is. The reference-layout buffers become ``<layer>.tr_qweight`` (int32
``[K_pad/P, N]``), ``.tr_scales`` (``[G, N]``, same dtype) and ``.tr_zeros`` (uint8 ``[G, N]``); the
old ones are dropped. Idempotent: ``linear_wq_tr`` nodes are left alone. Runs on the weights'
device (repacking is a reinterpretation and a transpose).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowc.errors import KernelError
from lowc.ir import meta as nodemeta
from lowc.passes.base import Pass, PassContext, PassResult


def unsupported_reason(bits: int, group_size: int, n_groups: int) -> str | None:
    """Why the Triton kernels cannot take a layer, or None."""
    from lowc.backends.triton import layout

    if bits not in layout.SUPPORTED_BITS:
        return f"Triton kernels take 4- or 8-bit weights, got bits={bits}"
    if n_groups > 1 and group_size % 16:
        return (f"Triton kernels need a group size that is a multiple of 16 (or per-channel, -1), "
                f"got group_size={group_size}")
    return None


@dataclass(frozen=True)
class TritonLower(Pass):
    name = "triton-lower"
    summary = "repack 4/8-bit linear_wq weights into the Triton kernels' layout (lowc::linear_wq_tr)"

    def run(self, program, ctx: PassContext) -> PassResult:
        from lowc.backends.triton import layout
        from lowc.backends.triton import op as tr_op  # noqa: F401  (defines lowc::linear_wq_tr)
        from lowc.ir.dialect import ensure_registered

        ensure_registered()
        for node in program.nodes(torch.ops.lowc.linear_wqaq.default):
            raise KernelError(f"layer {nodemeta.get(node).layer or node.name}: cuda-* Triton kernels take float "
                              f"activations; quantized activations (linear_wqaq) cannot be lowered")
        changed = 0
        per_bits: dict[int, int] = {}
        for node in list(program.nodes(torch.ops.lowc.linear_wq.default)):
            x, q_n, s_n, z_n, bias, bits, gs, k = node.args
            info = nodemeta.get(node)
            layer = info.layer or node.name
            qweight, scales = program.attr(q_n.target), program.attr(s_n.target)
            zeros = program.attr(z_n.target) if z_n is not None else None
            why = unsupported_reason(bits, gs, scales.shape[1])
            if why:
                raise KernelError(f"layer {layer} ({scales.shape[0]}x{k}): {why}; quantize it differently or add it "
                                  f"to ignore=")
            tw = layout.from_reference(qweight, scales, zeros, bits, gs, k)
            module_path = q_n.target.rpartition(".")[0]
            w_t = program.add_buffer(module_path, "tr_qweight", tw.qweight)
            s_t = program.add_buffer(module_path, "tr_scales", tw.scales)
            z_t = program.add_buffer(module_path, "tr_zeros", tw.zeros) if tw.zeros is not None else None
            w_n = program.get_attr_node(w_t, node)
            s2 = program.get_attr_node(s_t, node)
            z2 = program.get_attr_node(z_t, node) if z_t else None
            with program.graph.inserting_before(node):
                new = program.graph.call_function(torch.ops.lowc.linear_wq_tr.default,
                                                  (x, w_n, s2, z2, bias, bits, gs, k, tw.out_features))
            new.meta = dict(node.meta)
            nodemeta.set_info(new, info.with_scheme({**(info.scheme or {}), "layout": layout.LAYOUT}))
            node.replace_all_uses_with(new)
            program.graph.erase_node(node)
            changed += 1
            per_bits[bits] = per_bits.get(bits, 0) + 1
        if changed:
            program.remove_dead()
        return PassResult(changed=changed > 0,
                          stats={"lowered": changed, "layers_by_bits": {str(b): n for b, n in sorted(per_bits.items())}})
