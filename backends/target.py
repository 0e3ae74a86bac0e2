"""Targets are data: a name, a backend, a description, the compression scheme they fix, and a
function returning the pipeline's phases (phase name -> passes).

``runtime(target, device, artifact_dir)`` says what runs a compiled model of this target on a
device (``lowc bench`` prints it), and whether that is the target's own kernels.

Phases (TVM-style): ``method`` (how weights/transforms are found: RTN by default; replaced by the
user's ``--pass``/recipe passes), ``lower`` (backend legalization, e.g. activation quantization,
repacking), ``finalize`` (cleanup). Passes the user gives replace the ``method`` phase only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from lowc.ir.scheme import (
    Scheme,  # the one scheme form; targets name their default with it
)
from lowc.passes.quant.gptq import GPTQ
from lowc.passes.quant.rtn import RTN


@dataclass(frozen=True)
class Runtime:
    """What runs a compiled model: the implementation, whether it is the target's own kernels, a
    one-line note for the reader of its timings, and, for a backend whose artifact is run by another
    runtime (ONNX), a callable used instead of the loaded program."""

    implementation: str  # "reference oracle", "Triton kernels", "LUT C kernels", "onnxruntime", ...
    target_kernels: bool
    note: str = ""
    call: Callable[..., Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"implementation": self.implementation, "target_kernels": self.target_kernels, "note": self.note}


@dataclass(frozen=True)
class Phase:
    name: str
    passes: tuple


@dataclass(frozen=True)
class Target:
    name: str
    backend: str  # "reference" | "triton" | "cpu-lut" | "onnx"
    description: str
    scheme: Scheme | None
    pipeline: Callable[["Target", "CompileOptions"], list[Phase]]
    #: optional: write backend files into the artifact's backend/ directory: emit(program, dir)
    emit: Callable[[Any, str], None] | None = None
    #: optional: make a program runnable on this backend (load kernels, repack): prepare(program, device)
    prepare: Callable[[Any, str], None] | None = None
    #: what runs the compiled model on a device: runtime(target, device, artifact_dir) -> Runtime
    runtime: Callable[["Target", str, str | None], Runtime] | None = None
    #: the dialect ops this target runs beyond the dense quantized linears, e.g. ``("linear_gsq",)``
    #: for group-sparse layers (GQSA); a compile whose method passes produce another such op fails,
    #: naming the layer and the target
    runs: tuple[str, ...] = ()
    #: the weight bit widths its kernels take (a per-layer search recipe is checked against it)
    weight_bits: tuple[int, int] = (1, 8)

    def phases(self, options: "CompileOptions") -> list[Phase]:
        return self.pipeline(self, options)

    def runtime_on(self, device: str, artifact_dir: str | None = None) -> Runtime:
        if self.runtime is None:
            return Runtime("reference oracle", False, f"{self.name}: the backend does not say what runs it; "
                           "the dialect ops' reference implementations are assumed")
        return self.runtime(self, device, artifact_dir)


@dataclass(frozen=True)
class CompileOptions:
    """What the user asked for beyond the target: passes replacing the method phase, calibration
    availability (method defaults may depend on it), device."""

    user_passes: tuple | None = None
    has_calib: bool = False
    device: str = "cpu"


def method_passes(target: Target, options: CompileOptions) -> tuple:
    """The ``method`` phase every target shares: the user's passes if given; else nothing for an
    uncompressed target, GPTQ when calibration data is given, RTN otherwise."""
    if options.user_passes is not None:
        return tuple(options.user_passes)
    if target.scheme is None:
        return ()

    return (GPTQ(),) if options.has_calib else (RTN(),)
