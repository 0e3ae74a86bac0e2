"""``onnx-fp32``, ``onnx-w8``, ``onnx-w4``: targets as data.

Pipeline: ``method`` (RTN at the target's scheme; passes the user gives replace it), ``lower``
(``onnx-check``: every layer's scheme must be expressible in ONNX, failing at compile time with
the layer and scheme named), ``finalize`` (``remove-dead``). The emitter then lowers a copy of the
program to the ONNX layout and writes ``backend/model.onnx`` plus ``backend/onnx.json`` (opset,
inputs/outputs, per-layer ONNX form, op counts). The artifact's own graph stays in the lowc
dialect, so ``lowc.load`` runs it with the reference backend (the oracle the ONNX file is tested
against).
"""

from __future__ import annotations

import os

from lowc.backends.target import CompileOptions, Phase, Scheme, Target, method_passes


def onnx_pipeline(target: Target, options: CompileOptions) -> list[Phase]:
    from lowc.backends.onnx.check import OnnxCheck
    from lowc.passes.cleanup import RemoveDead

    return [Phase("method", method_passes(target, options)), Phase("lower", (OnnxCheck(),)),
            Phase("finalize", (RemoveDead(),))]


def emit(program, backend_dir: str) -> None:
    from lowc.backends.onnx.export import export_program, write_sidecar

    result = export_program(program, os.path.join(backend_dir, "model.onnx"))
    result.path = "model.onnx"
    write_sidecar(result, os.path.join(backend_dir, "onnx.json"))


def targets() -> list[Target]:
    def t(name, scheme, desc):
        return Target(name, "onnx", desc, scheme, onnx_pipeline, emit=emit)

    return [
        t("onnx-fp32", None, "ONNX (opset 21) for onnxruntime, float weights"),
        t("onnx-w8", Scheme(8, -1, True), "ONNX: int8 weights per output channel (symmetric), DequantizeLinear->MatMul"),
        t("onnx-w4", Scheme(4, 128, False), "ONNX: uint4 weights, groups of 128 (asymmetric), blocked DequantizeLinear->MatMul"),
    ]
