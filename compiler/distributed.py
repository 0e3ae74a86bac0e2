"""Score search offspring on a pool of Ray actors (the ``lowc[distributed]`` extra).

``ray_evaluator(spec, workers=N)`` starts a local Ray runtime with N actors; ``ray_evaluator(spec,
address=ADDR)`` joins a running cluster (``ray start --head`` on one machine, ``ray start
--address=...`` on the others) with as many actors as asked, or one per CPU of the cluster. Each
actor calls ``spec.build()`` once (load the model, memory-map the level database), then scores the
assignments it is sent. ``evaluate`` keeps one assignment in flight per actor, hands the next one to
whichever actor finishes first (``ray.wait``) and puts each result back at its index.

Invariants:
- Results do not depend on the number of workers: each result is ``scorer.score(assignment)`` in a
  process whose torch runs ``threads`` intra-op threads (1 by default, so every process sums in the
  same order); the scorer itself is deterministic (the spec's contract).
- An actor that dies (its process exits, its node goes away: ``RayActorError``) is replaced by a new
  one, which builds the scorer again, and the assignment it held is scored again. After
  ``max_replacements`` replacements in one evaluator the run stops with one DistributedError.
- An exception raised by the scorer is not a death: it reaches the caller (a LowcError as itself).

The spec contract (``lowc.passes.search.scoring.ScorerSpec``): a picklable object with ``build() ->
Scorer``, ``Scorer.score(assignment: dict[str, int], n_tokens: int) -> float`` (lower is better). On a
cluster, every node needs lowc (and what the spec loads) installed at the same paths.

Ray is imported inside the functions that need it (an optional dependency): without it
``ray_evaluator`` raises a one-line DistributedError naming the extra.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import time
from collections import deque
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from lowc.errors import DistributedError, LowcError
from lowc.progress import active, step

#: what the CLI and the error messages tell a user to install
EXTRA = "pip install 'lowc[distributed]'"


class Scorer(Protocol):
    def score(self, assignment: dict[str, int], n_tokens: int) -> float: ...


class ScorerSpec(Protocol):
    def build(self) -> Scorer: ...


class _Worker:
    """An actor's body (wrapped by ``ray.remote`` when a pool starts): builds the scorer once."""

    def __init__(self, spec: ScorerSpec, threads: int):
        self.spec, self.threads, self.scorer = spec, threads, None
        self.scored, self.score_cpu_s = 0, 0.0

    def setup(self) -> dict[str, Any]:
        """Build the scorer (idempotent); what it cost and where it runs."""
        t0 = time.perf_counter()
        if self.scorer is None:
            torch.set_num_threads(self.threads)
            self.scorer = self.spec.build()
        return {"pid": os.getpid(), "build_s": time.perf_counter() - t0, "threads": torch.get_num_threads()}

    def score(self, assignment: dict[str, int], n_tokens: int) -> float:
        if self.scorer is None:  # a replacement actor builds on its first assignment
            self.setup()
        t0 = time.process_time()
        value = float(self.scorer.score(assignment, n_tokens))
        self.scored, self.score_cpu_s = self.scored + 1, self.score_cpu_s + time.process_time() - t0
        return value

    def stats(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "scored": self.scored, "score_cpu_s": self.score_cpu_s}


def _import_ray():
    try:
        import ray  # optional: the lowc[distributed] extra
    except ImportError:
        raise DistributedError(f"--workers/--ray need Ray, which is not installed: {EXTRA}") from None
    return ray


def _last_line(err: BaseException) -> str:
    """The last line of a remote traceback (the exception itself), without terminal colours."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", s).strip() for s in str(err).splitlines()]
    return [s for s in lines if s][-1][:300] if any(lines) else type(err).__name__


def _one_line(err: BaseException) -> str:
    lines = [s.strip() for s in str(err).splitlines() if s.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else ''}"[:300]


class RayEvaluator:
    """A pool of Ray actors scoring assignments; see the module docstring. Build with :func:`ray_evaluator`."""

    def __init__(self, ray, spec: ScorerSpec, workers: int, *, threads: int = 1, max_replacements: int = 3,
                 owns_runtime: bool = False):
        self._ray, self.spec, self.threads = ray, spec, threads
        self.max_replacements, self.replacements = max_replacements, 0
        self._owns_runtime = owns_runtime
        self._actor_cls = ray.remote(num_cpus=threads, max_restarts=0)(_Worker)
        self._actors = [self._actor_cls.remote(spec, threads) for _ in range(workers)]
        #: per actor: pid, seconds spent in ``spec.build()``, torch threads (from the last setup)
        self.setup_info: list[dict[str, Any]] = [{} for _ in range(workers)]
        try:
            self._setup_all()
        except BaseException:
            self.close()
            raise

    @property
    def workers(self) -> int:
        return len(self._actors)

    def _setup_all(self) -> None:
        RayActorError, RayTaskError = self._ray.exceptions.RayActorError, self._ray.exceptions.RayTaskError

        pending = {a.setup.remote(): slot for slot, a in enumerate(self._actors)}
        while pending:
            (ref,), _ = self._ray.wait(list(pending), num_returns=1)
            slot = pending.pop(ref)
            try:
                self.setup_info[slot] = self._ray.get(ref)
            except RayActorError as err:
                self._replace(slot, err)
                pending[self._actors[slot].setup.remote()] = slot
            except RayTaskError as err:
                raise _cause(err) from None

    def _replace(self, slot: int, err: BaseException) -> None:
        if getattr(err, "actor_init_failed", False):  # its creation failed: a new one would fail the same way
            raise DistributedError(
                f"lowc.distributed: a Ray worker could not start ({_last_line(err)}): every worker must import "
                "the scorer spec (lowc and the spec's module installed on each node)")
        self.replacements += 1
        if self.replacements > self.max_replacements:
            raise DistributedError(
                f"lowc.distributed: {self.replacements} Ray worker(s) died ({_one_line(err)}); giving up after "
                f"max_replacements={self.max_replacements}")
        step(f"a Ray worker died ({_one_line(err)}); starting a replacement "
                      f"({self.replacements}/{self.max_replacements})")
        with contextlib.suppress(self._ray.exceptions.RayError):  # gone with its node: nothing to kill
            self._ray.kill(self._actors[slot], no_restart=True)
        self._actors[slot] = self._actor_cls.remote(self.spec, self.threads)

    def evaluate(self, assignments: Sequence[dict[str, int]], n_tokens: int,
                 progress: bool | None = None) -> list[float]:
        """``score(a, n_tokens)`` for every assignment, in input order. ``progress``: a bar of scored
        offspring on stderr (default: while lowc reports progress)."""
        RayActorError, RayTaskError = self._ray.exceptions.RayActorError, self._ray.exceptions.RayTaskError

        if not self._actors:
            raise DistributedError("lowc.distributed: evaluate() on a closed RayEvaluator")
        results: list[float | None] = [None] * len(assignments)
        todo = deque(range(len(assignments)))
        inflight: dict[Any, tuple[int, int]] = {}  # object ref -> (actor slot, assignment index)
        show = active() if progress is None else progress
        with tqdm(total=len(assignments), desc="scoring offspring", unit="offspring", disable=not show,
                  leave=False, file=sys.stderr) as pbar:
            while todo or inflight:
                busy = {slot for slot, _ in inflight.values()}
                for slot in range(len(self._actors)):
                    if todo and slot not in busy:
                        i = todo.popleft()
                        inflight[self._actors[slot].score.remote(assignments[i], n_tokens)] = (slot, i)
                (ref,), _ = self._ray.wait(list(inflight), num_returns=1)
                slot, i = inflight.pop(ref)
                try:
                    results[i] = self._ray.get(ref)
                except RayActorError as err:
                    self._replace(slot, err)
                    todo.appendleft(i)
                    continue
                except RayTaskError as err:
                    raise _cause(err) from None
                pbar.update(1)
        return results  # type: ignore[return-value]

    def stats(self) -> list[dict[str, Any]]:
        """Per live actor: pid, assignments scored and the CPU seconds spent scoring them (a machine's
        load does not change CPU time as it changes wall time)."""
        return self._ray.get([a.stats.remote() for a in self._actors])

    def close(self) -> None:
        """Stop the actors, and the Ray runtime if this evaluator started it (idempotent)."""
        actors, self._actors = self._actors, []
        for a in actors:
            with contextlib.suppress(self._ray.exceptions.RayError):
                self._ray.kill(a, no_restart=True)
        if self._owns_runtime and self._ray.is_initialized():
            self._ray.shutdown()
        self._owns_runtime = False

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _cause(err) -> BaseException:
    """The scorer's own exception out of a RayTaskError: a LowcError as itself, anything else as an
    exception that is both its type and the RayTaskError (with the remote traceback)."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, LowcError):
        return cause
    return err.as_instanceof_cause()


def ray_evaluator(spec: ScorerSpec, workers: int | None = None, address: str | None = None, *, threads: int = 1,
                  max_replacements: int = 3) -> RayEvaluator:
    """A :class:`RayEvaluator` of ``workers`` actors, each building ``spec`` once.

    ``address=None``: a local Ray runtime with ``workers`` CPUs (default: this machine's CPUs),
    stopped by ``close()``. ``address="HOST:PORT"`` (or ``"auto"``): join that cluster; ``workers``
    defaults to its CPUs. A runtime this process already started (``ray.init``) is used as it is and
    left running. ``threads``: torch threads (and Ray CPUs) per actor."""
    ray = _import_ray()
    if workers is not None and workers < 1:
        raise DistributedError(f"lowc.distributed: workers must be at least 1, got {workers}")
    if threads < 1:
        raise DistributedError(f"lowc.distributed: threads must be at least 1, got {threads}")
    owns = False
    if not ray.is_initialized():
        quiet = {"logging_level": logging.ERROR, "log_to_driver": False}
        if address is None:
            n = workers or os.cpu_count() or 1
            step(f"starting a local Ray runtime with {n} workers")
            ray.init(num_cpus=n * threads, include_dashboard=False, **quiet)
        else:
            step(f"joining the Ray cluster at {address}")
            try:
                ray.init(address=address, **quiet)
            except (ConnectionError, RuntimeError, ValueError) as err:
                raise DistributedError(f"--ray {address}: cannot join the Ray cluster ({_one_line(err)})") from None
        owns = True
    cpus = int(ray.cluster_resources().get("CPU", 0))
    n = workers or max(cpus // threads, 0)
    if n < 1 or n * threads > cpus:
        if owns:
            ray.shutdown()
        raise DistributedError(f"lowc.distributed: {n or 'no'} workers of {threads} CPU(s) asked, "
                               f"but the Ray cluster has {cpus} CPUs")
    return RayEvaluator(ray, spec, n, threads=threads, max_replacements=max_replacements, owns_runtime=owns)
