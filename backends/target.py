"""Targets are data: a name, a backend, a description, the compression scheme they fix, and a
function returning the pipeline's phases (phase name -> passes).

Phases (TVM-style): ``method`` (how weights/transforms are found: RTN by default; replaced by the
user's ``--pass``/recipe passes), ``lower`` (backend legalization, e.g. activation quantization,
repacking), ``finalize`` (cleanup). Passes the user gives replace the ``method`` phase only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Scheme:
    """What a target stores: weight bits and grouping, and activation bits (16 = not quantized)."""

    w_bits: int
    group_size: int = 128  # -1 = per output channel
    symmetric: bool = False
    a_bits: int = 16

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def label(self) -> str:
        g = "per-channel" if self.group_size == -1 else f"g{self.group_size}"
        return f"W{self.w_bits}A{self.a_bits} {g} {'sym' if self.symmetric else 'asym'}"


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

    def phases(self, options: "CompileOptions") -> list[Phase]:
        return self.pipeline(self, options)


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
    from lowc.passes.quant.gptq import GPTQ
    from lowc.passes.quant.rtn import RTN

    return (GPTQ(),) if options.has_calib else (RTN(),)
