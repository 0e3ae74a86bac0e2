"""lowc.distributed: scoring assignments on a pool of Ray actors.

Results come back in input order and equal the in-process scores for 1 and 2 workers; a worker whose
process dies mid-evaluation is replaced and its assignment scored again; after ``max_replacements``
deaths the run stops with one line; a scorer's own error reaches the caller; without Ray the one-line
error names the extra; a runtime the evaluator starts is quiet, leaves no files in the working
directory and is stopped by ``close()``. The Ray tests share one local runtime (module fixture) and
skip when Ray is not installed.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys

import pytest
import torch

from lowc.distributed import ray_evaluator
from lowc.errors import DistributedError, LowcError

LAYERS = ("fc0", "fc1", "fc2")


@dataclasses.dataclass(frozen=True)
class TinySpec:
    """A real scorer: a seeded 3-layer MLP whose layers are round-to-nearest quantized to the bits the
    assignment gives each; fitness is the KL of its output distribution to the float MLP's on the
    first ``n_tokens`` of 64 fixed rows."""

    seed: int = 0
    dim: int = 16
    #: the worker process exits (os._exit) when asked to score an assignment with fc0 at these bits...
    crash_on: int = -1
    #: ... and this file does not exist yet (it is created first, so the crash happens once); "": every time
    crash_flag: str = ""

    def build(self) -> TinyScorer:
        return TinyScorer(self)


class TinyScorer:
    def __init__(self, spec: TinySpec):
        g = torch.Generator().manual_seed(spec.seed)
        self.spec = spec
        self.weights = {n: torch.randn(spec.dim, spec.dim, generator=g) / spec.dim ** 0.5 for n in LAYERS}
        self.x = torch.randn(64, spec.dim, generator=g)

    def _logprobs(self, weights, n_tokens):
        h = self.x[:n_tokens]
        for w in weights:
            h = torch.tanh(h @ w.t()) * 3
        return torch.log_softmax(h, dim=-1)

    def score(self, assignment: dict[str, int], n_tokens: int) -> float:
        if set(assignment) != set(LAYERS):
            raise LowcError(f"assignment names {sorted(set(assignment) ^ set(LAYERS))}: not the tiny MLP's layers")
        flag = self.spec.crash_flag
        if assignment["fc0"] == self.spec.crash_on and not (flag and os.path.exists(flag)):
            if flag:
                open(flag, "w").close()
            os._exit(1)
        wq = [_rtn(self.weights[n], assignment[n]) for n in LAYERS]
        logp, logq = self._logprobs(self.weights.values(), n_tokens), self._logprobs(wq, n_tokens)
        return float((logp.exp() * (logp - logq)).sum(-1).mean())


def _rtn(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Round to nearest on an asymmetric per-row grid of 2**bits levels (dequantized)."""
    lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    scale = (hi - lo) / (2 ** bits - 1)
    return torch.round((w - lo) / scale) * scale + lo


ASSIGNMENTS = [{"fc0": 2 + i % 3, "fc1": 2 + (i // 3) % 3, "fc2": 2 + (i * 7) % 4} for i in range(10)]
N_TOKENS = 48


def in_process(assignments, n_tokens=N_TOKENS):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in every worker
    try:
        scorer = TinySpec().build()
        return [scorer.score(a, n_tokens) for a in assignments]
    finally:
        torch.set_num_threads(threads)


def test_one_worker_on_a_runtime_it_starts_quiet_no_files_stopped(tmp_path, monkeypatch, capfd):
    """The 1-worker half of "the same for 1 and 2 workers" (the 2-worker half below, on the shared
    runtime): this evaluator starts its own local runtime, says nothing, writes nothing in the working
    directory, and stops the runtime on close()."""
    ray = pytest.importorskip("ray")
    assert not ray.is_initialized()
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # see runtime()
    monkeypatch.chdir(tmp_path)
    with ray_evaluator(TinySpec(), workers=1) as one:
        assert one.workers == 1 and ray.is_initialized()
        got = one.evaluate(ASSIGNMENTS, N_TOKENS)
    assert not ray.is_initialized()
    assert got == in_process(ASSIGNMENTS)
    assert os.listdir(tmp_path) == []
    out, err = capfd.readouterr()
    assert out == "" and err == "", err[-3000:]


@pytest.fixture(scope="module")
def runtime():
    ray = pytest.importorskip("ray")
    # the workers cannot import this test module (pytest put its folder on sys.path, Ray's workers do
    # not see it): its specs travel by value
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=3, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def pool(runtime, tmp_path_factory):
    """Two workers of a spec that crashes once on fc0=1 bits (a flag file makes it once)."""
    flag = tmp_path_factory.mktemp("crash") / "crashed"
    with ray_evaluator(TinySpec(crash_on=1, crash_flag=str(flag)), workers=2) as ev:
        yield ev, flag


def test_results_in_order_and_the_same_for_2_workers(runtime, pool):
    expected = in_process(ASSIGNMENTS)
    assert len(set(expected)) == len(expected), "the check of the order needs distinct scores"
    two, _ = pool
    assert two.workers == 2 and [i["threads"] for i in two.setup_info] == [1, 1]
    assert len({i["pid"] for i in two.setup_info} | {os.getpid()}) == 3  # two worker processes
    before = sum(st["scored"] for st in two.stats())
    assert two.evaluate(ASSIGNMENTS, N_TOKENS) == expected
    after = two.stats()
    assert sum(st["scored"] for st in after) - before == len(ASSIGNMENTS)
    assert all(st["scored"] > 0 and st["score_cpu_s"] > 0 for st in after), "both workers take assignments"
    assert runtime.is_initialized(), "an evaluator leaves a runtime it did not start running"


def test_a_dead_worker_is_replaced_and_its_assignment_scored_again(pool, capsys):
    ev, flag = pool
    crash = {"fc0": 1, "fc1": 3, "fc2": 4}
    batch = ASSIGNMENTS[:4] + [crash] + ASSIGNMENTS[4:]
    before = ev.replacements
    got = ev.evaluate(batch, N_TOKENS, progress=True)
    assert flag.exists(), "the worker did not crash"
    assert ev.replacements == before + 1
    assert got == in_process(batch)
    assert "scoring offspring" in capsys.readouterr().err


def test_a_scorer_error_reaches_the_caller_and_is_no_death(pool):
    ev, _ = pool
    before = ev.replacements
    with pytest.raises(LowcError, match=r"assignment names \['fc9'\]"):
        ev.evaluate([ASSIGNMENTS[0], {"fc0": 2, "fc1": 2, "fc2": 2, "fc9": 4}], N_TOKENS)
    assert ev.replacements == before
    assert ev.evaluate(ASSIGNMENTS[:3], 8) == in_process(ASSIGNMENTS[:3], 8)


def test_gives_up_after_max_replacements(runtime):
    crash = {"fc0": 1, "fc1": 2, "fc2": 2}
    with ray_evaluator(TinySpec(crash_on=1), workers=1, max_replacements=0) as ev, \
            pytest.raises(DistributedError) as err:
        ev.evaluate([ASSIGNMENTS[0], crash], N_TOKENS)
    msg = str(err.value)
    assert "\n" not in msg and "1 Ray worker(s) died" in msg and "max_replacements=0" in msg, msg


def _missing_module():
    raise ModuleNotFoundError("No module named 'scorer_only_on_the_driver'")


class UnimportableSpec(TinySpec):
    """Unpickles on a worker as a spec whose module the worker lacks (a cluster node without the package)."""

    def __reduce__(self):
        return (_missing_module, ())


def test_a_worker_that_cannot_load_the_spec_fails_at_once(runtime):
    with pytest.raises(DistributedError) as err:
        ray_evaluator(UnimportableSpec(), workers=1, max_replacements=3)
    msg = str(err.value)
    assert "\n" not in msg and "could not start" in msg and "No module named 'scorer_only_on_the_driver'" in msg, msg


def test_more_workers_than_the_cluster_has_cpus(runtime):
    with pytest.raises(DistributedError, match="9 workers of 1 CPU"):
        ray_evaluator(TinySpec(), workers=9)


def test_without_ray_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    for kwargs in ({"workers": 2}, {"address": "auto"}):
        with pytest.raises(DistributedError) as err:
            ray_evaluator(TinySpec(), **kwargs)
        assert str(err.value) == "--workers/--ray need Ray, which is not installed: pip install 'lowc[distributed]'"
