"""``quantize-activations``: lower weight-only quantized linears to ``lowc::linear_wqaq`` so their
inputs are quantized too (per-token, symmetric, dynamic). The op also takes a static per-tensor
scale (``act_scale``); measuring such scales on calibration data is left to the activation
quantization work of the quantization issue.

This is a lowering pass of the ``*-w8a8`` / ``*-w4a4`` targets: the method passes decide the
weights, this pass fixes how activations are fed to the kernel. Idempotent: ``linear_wqaq`` nodes
are left alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from lowc.ir import meta as nodemeta
from lowc.passes.base import Pass, PassContext, PassResult, opt


@dataclass(frozen=True)
class QuantizeActivations(Pass):
    name = "quantize-activations"
    summary = "quantize linear inputs per token (symmetric, dynamic) for W*A8/W*A4 schemes"

    bits: Optional[int] = opt(None, "activation bits, 2..8 (default: the target's)")

    def validate(self) -> None:
        if self.bits is not None and not 2 <= self.bits <= 8:
            raise self.fail(f"bits={self.bits}: choose 2..8")

    def run(self, program, ctx: PassContext) -> PassResult:
        from lowc.ir.dialect import ensure_registered

        ensure_registered()
        bits = self.bits if self.bits is not None else (ctx.scheme.a_bits if ctx.scheme else None)
        if bits is None or bits >= 16:
            raise self.fail("no activation bit width: give bits= or use a target with quantized activations")
        changed = 0
        for node in list(program.nodes(torch.ops.lowc.linear_wq.default)):
            with program.graph.inserting_before(node):
                new = program.graph.call_function(torch.ops.lowc.linear_wqaq.default, (*node.args, bits, None))
            new.meta = dict(node.meta)
            info = nodemeta.get(node)
            nodemeta.set_info(new, info.with_scheme({**(info.scheme or {}), "a_bits": bits}))
            node.replace_all_uses_with(new)
            program.graph.erase_node(node)
            changed += 1
        program.gm.recompile()
        return PassResult(changed=changed > 0, stats={"quantized": changed, "a_bits": bits})
