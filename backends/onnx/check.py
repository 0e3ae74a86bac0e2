"""``onnx-check``: the ONNX targets' lowering check. Every compressed layer's scheme must have an
ONNX form (4/8-bit weights, 4/8-bit per-token activations); otherwise compilation fails naming the
layer and scheme, before anything is written. Changes nothing."""

from __future__ import annotations

from dataclasses import dataclass

from lowc.backends.onnx.lower import check_program
from lowc.passes.base import Pass, PassResult


@dataclass(frozen=True)
class OnnxCheck(Pass):
    name = "onnx-check"
    summary = "check that ONNX can express every compressed layer (names the layer and scheme if not)"

    def run(self, program, ctx) -> PassResult:
        return PassResult(changed=False, stats={"layers": check_program(program)})
