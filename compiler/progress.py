"""What lowc says while it works: one line per long step as it starts, and progress bars on
per-layer work.

``step("tracing ...")`` hands a line to the current reporter, if any. Nothing reports by default
(``lowc.trace`` in a user's script is silent); ``lowc.compile(progress=True)`` and the CLI install a
reporter with :func:`reporting` for the duration of the call. Lines go to stderr, flushed at once,
so they arrive as each step starts even when the output is piped.

``bar(items, desc)`` wraps per-layer loops in a tqdm bar (on stderr) that is shown only while a
reporter is installed or when asked for explicitly.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
from typing import Callable, Iterable, Iterator, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
Reporter = Callable[[str], None]

_reporter: contextvars.ContextVar[Reporter | None] = contextvars.ContextVar("lowc_progress", default=None)


def to_stderr(line: str) -> None:
    """The default reporter: ``lowc: <line>`` on stderr, flushed."""
    print(f"lowc: {line}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def reporting(reporter: Reporter | None) -> Iterator[None]:
    """Report steps to ``reporter`` inside the block (None: silence them)."""
    token = _reporter.set(reporter)
    try:
        yield
    finally:
        _reporter.reset(token)


def current() -> Reporter | None:
    """The reporter installed now, if any."""
    return _reporter.get()


def active() -> bool:
    return _reporter.get() is not None


def step(line: str) -> None:
    """Say that a step starts (a no-op unless a reporter is installed)."""
    reporter = _reporter.get()
    if reporter is not None:
        reporter(line)


def bar(items: Iterable[T], desc: str, *, total: int | None = None, unit: str = "layer",
        enabled: bool | None = None) -> Iterable[T]:
    """``items`` with a tqdm bar on stderr; shown when ``enabled`` (default: while reporting)."""

    show = active() if enabled is None else enabled
    if not show:
        return items
    return tqdm(items, desc=desc, total=total, unit=unit, leave=False, file=sys.stderr)
