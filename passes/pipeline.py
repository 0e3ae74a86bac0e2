"""Run passes in order: verify after each, time each, print after a named pass, and on failure name
the pass and the passes that ran before it. ``on_start``/``on_end`` hear of each pass as it starts
and ends (the CLI's progress lines)."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from lowc.errors import LowcError, PassError, VerificationError
from lowc.ir import printer, verifier
from lowc.passes.base import Pass, PassContext, PassResult


@dataclass
class PassRecord:
    pass_: Pass
    phase: str
    result: PassResult
    seconds: float

    def to_json(self) -> dict:
        return {**self.pass_.to_json(), "phase": self.phase, "changed": self.result.changed,
                "seconds": round(self.seconds, 4), "stats": self.result.stats}

    def summary(self) -> str:
        """One line: pass, time, whether it changed anything, its scalar stats."""
        stats = "".join(f", {k}={v}" for k, v in self.result.stats.items() if not isinstance(v, (list, dict)))
        return (f"{self.pass_.name} done in {self.seconds * 1000:.1f} ms: "
                f"{'changed' if self.result.changed else 'no change'}{stats}")


@dataclass
class Pipeline:
    """An ordered list of ``(phase, pass)``."""

    steps: list[tuple[str, Pass]]
    verify: bool = True
    print_after: Sequence[str] = ()
    printer_out: Callable[[str], None] = field(default=lambda s: sys.stdout.write(s))
    #: called as each pass starts: ``on_start(index, phase, pass)`` (index from 0)
    on_start: Callable[[int, str, Pass], None] | None = None
    #: called with each pass's record when it has run and verified
    on_end: Callable[[PassRecord], None] | None = None

    def names(self) -> list[str]:
        return [p.name for _, p in self.steps]

    def check(self) -> None:
        """What can be checked before any work: ``print_after`` names passes of this pipeline."""
        unknown = set(self.print_after) - set(self.names())
        if unknown:
            raise PassError(f"--print-after {', '.join(sorted(unknown))}: no such pass in this pipeline ({', '.join(self.names())})")

    def run(self, program, ctx: PassContext) -> list[PassRecord]:
        self.check()
        records: list[PassRecord] = []
        for i, (phase, p) in enumerate(self.steps):
            if self.on_start is not None:
                self.on_start(i, phase, p)
            done = [r.pass_.name for r in records]
            before = f" (after {', '.join(done)})" if done else " (first pass)"
            try:
                for req in p.requirements():
                    ctx.require(req, p.name)
                t0 = time.perf_counter()
                result = p.run(program, ctx)
                seconds = time.perf_counter() - t0
                if not isinstance(result, PassResult):
                    raise PassError(f"pass '{p.name}' returned {type(result).__name__}, not PassResult")
                if self.verify:
                    verifier.verify(program)
            except VerificationError as e:
                raise PassError(f"IR invalid after pass '{p.spelling()}'{before}: {e}") from e
            except LowcError as e:
                if isinstance(e, PassError):
                    raise
                raise type(e)(f"{e}{before if p.name not in str(e) else ''}") from e
            except KeyboardInterrupt:
                raise
            except Exception as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise PassError(f"pass '{p.spelling()}' failed{before}: {type(e).__name__}: {first}") from e
            records.append(PassRecord(p, phase, result, seconds))
            if self.on_end is not None:
                self.on_end(records[-1])
            if p.name in self.print_after:
                self.printer_out(f"// ----- IR after {p.spelling()} -----\n" + printer.format_program(program))
        return records


def run_passes(program, passes: Sequence[Pass], ctx: PassContext | None = None, verify: bool = True) -> list[PassRecord]:
    """Convenience: run ``passes`` (phase 'user') on ``program``."""
    return Pipeline([("user", p) for p in passes], verify=verify).run(program, ctx or PassContext())
