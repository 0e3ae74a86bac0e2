"""``lut-lower``: rewrite ``lowc::linear_wq`` into ``lowc::linear_lut`` with weights repacked into the
LUT layout (bit planes, row tiles of 32; :mod:`lowc.backends.cpu_lut.layout`).

Precondition: a method pass produced ``linear_wq`` nodes with 1..4-bit weights; a wider layer or an
activation-quantized ``linear_wqaq`` raises, naming the layer. Each node keeps its own bits and group
size (read from its arguments), so per-layer mixed precision lowers as is. The reference-layout
buffers become ``<layer>.lut_weight``, ``.lut_scales`` (float32) and ``.lut_zeros``; the old ones are
dropped. Idempotent: ``linear_lut`` nodes are left alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowc.errors import KernelError
from lowc.ir import meta as nodemeta
from lowc.passes.base import Pass, PassContext, PassResult


@dataclass(frozen=True)
class LutLower(Pass):
    name = "lut-lower"
    summary = "repack 1-4-bit linear_wq weights into the cpu-lut layout (lowc::linear_lut)"

    def run(self, program, ctx: PassContext) -> PassResult:
        from lowc.backends.cpu_lut import layout
        from lowc.backends.cpu_lut import op as lut_op  # noqa: F401  (defines lowc::linear_lut)
        from lowc.ir.dialect import ensure_registered

        ensure_registered()
        for node in program.nodes(torch.ops.lowc.linear_wqaq.default):
            raise KernelError(f"layer {nodemeta.get(node).layer or node.name}: cpu-lut kernels take float "
                              f"activations; quantized activations (linear_wqaq) cannot be lowered")
        changed = 0
        per_bits: dict[int, int] = {}
        for node in list(program.nodes(torch.ops.lowc.linear_wq.default)):
            x, q_n, s_n, z_n, bias, bits, gs, k = node.args
            info = nodemeta.get(node)
            layer = info.layer or node.name
            if not 1 <= bits <= 4:
                raise KernelError(f"layer {layer}: cpu-lut kernels take 1..4-bit weights, got bits={bits} "
                                  f"(quantize it with fewer bits or add it to ignore=)")
            qweight, scales = program.attr(q_n.target), program.attr(s_n.target)
            zeros = program.attr(z_n.target) if z_n is not None else None
            lw = layout.from_reference(qweight, scales, zeros, bits, gs, k)
            module_path = q_n.target.rpartition(".")[0]
            dev = qweight.device
            w_t = program.add_buffer(module_path, "lut_weight", lw.weight.to(dev))
            s_t = program.add_buffer(module_path, "lut_scales", lw.scales.to(dev))
            z_t = program.add_buffer(module_path, "lut_zeros", lw.zeros.to(dev)) if lw.zeros is not None else None
            w_n = program.get_attr_node(w_t, node)
            s2 = program.get_attr_node(s_t, node)
            z2 = program.get_attr_node(z_t, node) if z_t else None
            with program.graph.inserting_before(node):
                new = program.graph.call_function(torch.ops.lowc.linear_lut.default,
                                                  (x, w_n, s2, z2, bias, bits, gs, k, lw.out_features))
            new.meta = dict(node.meta)
            nodemeta.set_info(new, info.with_scheme({**(info.scheme or {}), "layout": "cpu-lut"}))
            node.replace_all_uses_with(new)
            program.graph.erase_node(node)
            changed += 1
            per_bits[bits] = per_bits.get(bits, 0) + 1
        if changed:
            program.remove_dead()
        return PassResult(changed=changed > 0, stats={"lowered": changed, "layers_by_bits": {str(b): n for b, n in sorted(per_bits.items())}})
