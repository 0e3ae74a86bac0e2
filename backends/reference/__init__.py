"""The reference backend: runs any compiled graph with the dialect ops' plain-PyTorch reference
implementations, on CPU or CUDA. It is the correctness oracle for every other backend.

Targets: ``ref-fp32`` (no compression: output identical to the input model), ``ref-w8a16``,
``ref-w4a16``, ``ref-w8a8``, ``ref-w4a4``.
"""

from __future__ import annotations

from lowc.backends.target import CompileOptions, Phase, Runtime, Target, method_passes
from lowc.ir.scheme import Scheme
from lowc.passes.cleanup import RemoveDead
from lowc.passes.quant.activations import QuantizeActivations


def reference_pipeline(target: Target, options: CompileOptions) -> list[Phase]:
    method = method_passes(target, options)
    lower = ()
    if target.scheme is not None and target.scheme.a_bits < 16:
        lower = (QuantizeActivations(),)
    return [Phase("method", method), Phase("lower", lower), Phase("finalize", (RemoveDead(),))]


def runtime(target: Target, device: str, artifact_dir: str | None = None) -> Runtime:
    note = ""
    if target.scheme is not None:
        note = (f"{target.name} runs the plain-PyTorch reference ops (the correctness oracle): they dequantize "
                "every weight on every call, so they are slower than float; the speed of compressed layers "
                "comes from the cuda-*, cpu-lut-* and onnx-* targets' kernels")
    return Runtime("reference oracle", True, note)


def targets() -> list[Target]:
    def t(name, scheme, desc):
        return Target(name, "reference", desc, scheme, reference_pipeline, runtime=runtime,
                      runs=("linear_gsq",))

    return [
        t("ref-fp32", None, "no compression; plain PyTorch (output identical to the input model)"),
        t("ref-w8a16", Scheme(8, -1, True), "int8 weights per output channel (symmetric), float activations"),
        t("ref-w4a16", Scheme(4, 128, False), "int4 weights, groups of 128 (asymmetric), float activations"),
        t("ref-w8a8", Scheme(8, -1, True, a_bits=8), "int8 weights per channel + int8 per-token dynamic activations"),
        t("ref-w4a4", Scheme(4, -1, True, a_bits=4), "int4 weights per channel + int4 per-token dynamic activations"),
    ]


#: the reference backend adds no pass and no op: it runs the dialect's reference implementations
PASSES: dict[str, str] = {}
OPS: dict[str, str] = {}
