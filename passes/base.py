"""The pass contract.

A pass is a frozen dataclass: ``name`` (its registry key and CLI spelling), its options as typed
fields (each with a ``doc`` in the field metadata, validated in ``__post_init__``), what it
requires (``requires``: e.g. ``{"calibration"}``), and ``run(program, ctx) -> PassResult``.
A pass mutates the program in place and reports whether it changed anything; running it a second
time must report ``changed=False`` (idempotence). A missing precondition raises; nothing is skipped
silently.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from lowc.errors import CalibrationError, PassError, PassOptionError
from lowc.passes.options import format_value

#: what a pass may require (``Pass.requires``) and :meth:`PassContext.require` can check
REQUIREMENTS = frozenset({"calibration"})


@dataclass
class PassResult:
    changed: bool
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class PassContext:
    """What a pass may read besides the program: the target's scheme, calibration data, device,
    seed, and whether to show progress. ``log`` collects one-line notes for the manifest."""

    target: Any = None  # lowc.backends.target.Target
    scheme: Any = None  # lowc.backends.target.Scheme or None (no compression)
    calib: Any = None  # lowc.passes.calibration.CalibrationData or None
    device: str = "cpu"
    seed: int = 0
    progress: bool = True
    log: list[str] = field(default_factory=list)

    def require(self, what: str, pass_name: str) -> None:
        """Raise unless the context provides ``what`` (one of :data:`REQUIREMENTS`); an unknown
        requirement is an error too, so a misspelt one cannot pass unchecked."""
        if what not in REQUIREMENTS:
            raise PassError(f"pass '{pass_name}' requires {what!r}, which is not a known requirement "
                            f"(known: {', '.join(sorted(REQUIREMENTS))})")
        if what == "calibration" and self.calib is None:
            raise CalibrationError(
                f"pass '{pass_name}' needs calibration data: pass calib= (Python) or --calib FILE (CLI)"
            )


def opt(default: Any, doc: str, **kw) -> Any:
    """A pass option: a dataclass field with a default and a one-line doc."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("use a tuple for sequence defaults (passes are frozen)")
    return field(default=default, metadata={"doc": doc, **kw})


@dataclass(frozen=True)
class Pass:
    name: ClassVar[str] = ""
    requires: ClassVar[frozenset[str]] = frozenset()
    summary: ClassVar[str] = ""
    #: dialect ops beyond the dense quantized linears that this pass writes (e.g. ``("linear_gsq",)``):
    #: the API refuses the pass, before loading the model, on a target whose ``Target.runs`` lacks one
    emits: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise PassOptionError for invalid option values (override in subclasses)."""

    def requirements(self) -> frozenset[str]:
        """What this pass, with its options, needs (default: the class's ``requires``). Override
        when it depends on an option (``quantize-activations{static=true}`` needs calibration)."""
        return self.requires

    def check_target(self, target) -> None:
        """Raise PassOptionError if the options cannot work with ``target`` (a
        :class:`lowc.backends.target.Target`); the API calls it before the model is loaded."""

    def run(self, program, ctx: PassContext) -> PassResult:  # pragma: no cover - interface
        raise NotImplementedError

    # ---- options -------------------------------------------------------------------------------
    def options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def to_json(self) -> dict[str, Any]:
        """``{"name": ..., "options": {...}}`` with JSON-able values (tuples become lists)."""
        def j(v):
            return list(v) if isinstance(v, tuple) else v

        return {"name": self.name, "options": {k: j(v) for k, v in self.options().items()}}

    def spelling(self) -> str:
        """``name{k=v,...}`` listing options that differ from their defaults."""

        parts = []
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v != f.default:
                parts.append(f"{f.name}={format_value(v)}")
        return self.name + ("{" + ",".join(parts) + "}" if parts else "")

    def fail(self, message: str) -> PassOptionError:
        return PassOptionError(f"pass '{self.name}': {message}")
