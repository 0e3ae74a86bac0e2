"""How offspring scoring scales on a pool of Ray workers (``lowc.distributed``).

    nice python benchmarks/search_scaling.py [--offspring 64] [--tokens 256] [--dim 512] [--layers 8]

Times ``evaluate()`` on one fixed batch of assignments: in this process (no Ray), then on a local Ray
runtime with 1 worker, 2 workers, and 1 worker of 2 torch threads (what the cores do better: two
single-threaded processes or one process with two threads). Each wall time is the best of
``--repeat`` runs. Reports the start-up cost (runtime + each actor's ``spec.build()``), wall and CPU
seconds per offspring (CPU: what the scorer spent, in the workers too; on a shared machine it is the
stable number), Ray's round trip per offspring (the same batch scored on 1 token), the scaling
efficiency of 2 workers, and what 16 workers would give at the measured per-offspring cost. Every configuration must return exactly the in-process
results (single-threaded torch). Writes benchmarks/results/search_scaling.{md,json}.

:func:`measure` takes any scorer spec (``build() -> scorer``, ``scorer.score(assignment, n_tokens)``);
this script runs it on :class:`SyntheticSpec`, a seeded MLP whose layers are quantized with lowc's RTN
at every level once per process (a small level database), scored by the KL of its output
distribution to the float MLP's: the same shape of work as the search's scorer, at a chosen size.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import random
import sys
import time

import torch

from lowc.distributed import ray_evaluator
from lowc.ir.dialect import quant


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
    """A seeded ``layers``-deep MLP of width ``dim`` on ``rows`` fixed inputs; each layer quantized with
    RTN (group 64, asymmetric) at every level in ``levels`` when built."""

    seed: int = 0
    dim: int = 512
    layers: int = 8
    rows: int = 256
    levels: tuple[int, ...] = (2, 3, 4, 5, 6)

    def layer_names(self) -> list[str]:
        return [f"layers.{i}" for i in range(self.layers)]

    def build(self) -> SyntheticScorer:
        return SyntheticScorer(self)


class SyntheticScorer:
    def __init__(self, spec: SyntheticSpec):
        g = torch.Generator().manual_seed(spec.seed)
        weights = [torch.randn(spec.dim, spec.dim, generator=g) / spec.dim ** 0.5 for _ in range(spec.layers)]
        self.x = torch.randn(spec.rows, spec.dim, generator=g)
        self.names = spec.layer_names()
        self.levels = {
            name: {b: _rtn(w, b) for b in spec.levels} for name, w in zip(self.names, weights)}
        self.ref = torch.log_softmax(self._forward(weights, spec.rows), dim=-1)

    def _forward(self, weights, n_tokens: int) -> torch.Tensor:
        h = self.x[:n_tokens]
        for w in weights:
            h = torch.tanh(h @ w.t()) * 2
        return h

    def score(self, assignment: dict[str, int], n_tokens: int) -> float:
        logq = torch.log_softmax(self._forward([self.levels[n][assignment[n]] for n in self.names], n_tokens), -1)
        logp = self.ref[:n_tokens]
        return float((logp.exp() * (logp - logq)).sum(-1).mean())


def _rtn(w: torch.Tensor, bits: int) -> torch.Tensor:
    q = quant.rtn_quantize(w, bits, 64, False)
    return quant.dequantize(q.qweight, q.scales, q.zeros, q.bits, q.group_size, q.in_features, torch.float32)


def random_assignments(layers: list[str], levels: list[int], count: int, seed: int = 0) -> list[dict[str, int]]:
    rng = random.Random(seed)
    return [{name: rng.choice(levels) for name in layers} for _ in range(count)]


def measure(spec, assignments: list[dict[str, int]], n_tokens: int,
            configs: tuple[tuple[int, int], ...] = ((1, 1), (2, 1), (1, 2)), repeat: int = 3) -> dict:
    """Time ``evaluate`` of ``assignments`` in process and on Ray for each (workers, threads) config.

    Wall times are the best of ``repeat`` runs; CPU seconds per offspring are what the scorer spent
    (in this process, or in the workers: ``RayEvaluator.stats``), which a shared machine's load does
    not inflate as it inflates wall time. Ray's overhead per offspring is the wall time per offspring
    and worker of the same batch scored on 1 token (a round trip with almost no work)."""
    def best(fn) -> float:
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    n = len(assignments)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t0 = time.perf_counter()
        scorer = spec.build()
        build_s = time.perf_counter() - t0
        expected = [float(scorer.score(a, n_tokens)) for a in assignments]
        c0 = time.process_time()
        inproc_s = best(lambda: [scorer.score(a, n_tokens) for a in assignments])
        inproc_cpu = (time.process_time() - c0) / (repeat * n)
    finally:
        torch.set_num_threads(threads)
    rows = [{"config": "in-process (no Ray), 1 thread", "workers": 0, "threads": 1, "startup_s": build_s,
             "wall_s": inproc_s, "per_offspring_s": inproc_s / n, "cpu_per_offspring_s": inproc_cpu,
             "identical": True}]
    for workers, th in configs:
        t0 = time.perf_counter()
        with ray_evaluator(spec, workers=workers, threads=th) as ev:
            startup = time.perf_counter() - t0
            got = ev.evaluate(assignments, n_tokens)
            before = ev.stats()
            wall = best(lambda ev=ev: ev.evaluate(assignments, n_tokens))
            after = ev.stats()
            tiny = best(lambda ev=ev: ev.evaluate(assignments, 1))
            builds = [i.get("build_s", 0.0) for i in ev.setup_info]
        cpu = sum(a["score_cpu_s"] - b["score_cpu_s"] for a, b in zip(after, before))
        scored = sum(a["scored"] - b["scored"] for a, b in zip(after, before))
        rows.append({"config": f"Ray, {workers} worker(s) x {th} thread(s)", "workers": workers, "threads": th,
                     "startup_s": startup, "build_s_max": max(builds), "wall_s": wall, "per_offspring_s": wall / n,
                     "cpu_per_offspring_s": cpu / scored, "overhead_per_offspring_s": tiny * workers / n,
                     "identical": got == expected, "max_abs_diff": max(abs(a - b) for a, b in zip(got, expected))})
    by = {(r["workers"], r["threads"]): r for r in rows}
    out = {"offspring": n, "n_tokens": n_tokens, "repeat": repeat, "rows": rows}
    if (1, 1) in by and (2, 1) in by:
        one, two = by[(1, 1)], by[(2, 1)]
        out["efficiency_2"] = one["wall_s"] / (2 * two["wall_s"])
        out["cpu_efficiency_2"] = one["cpu_per_offspring_s"] / two["cpu_per_offspring_s"]
        # 16 workers, one core each: the CPU cost per offspring measured with 2 workers plus Ray's round
        # trip, 16 at a time (the driver's dispatch is far below one offspring's cost)
        out["per_offspring_s_16"] = (two["cpu_per_offspring_s"] + two["overhead_per_offspring_s"]) / 16
    return out


def _markdown(res: dict, info: dict) -> str:
    lines = [f"# Offspring scoring on Ray workers ({info['date']})", "",
             (f"`{info['command']}` — {info['machine']} (load average {info['load']}), torch {info['torch']}, "
              f"ray {info['ray']}; spec `{info['spec']}`; {res['offspring']} offspring × {res['n_tokens']} "
              f"tokens; wall times best of {res['repeat']}."), "",
             ("| configuration | start-up s | batch s (wall) | ms / offspring (wall) | CPU ms / offspring "
              "| Ray round trip ms / offspring | same as in-process |"),
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in res["rows"]:
        ov = f"{r['overhead_per_offspring_s'] * 1e3:.2f}" if "overhead_per_offspring_s" in r else "–"
        lines.append(f"| {r['config']} | {r['startup_s']:.2f} | {r['wall_s']:.2f} | {r['per_offspring_s'] * 1e3:.1f} "
                     f"| {r['cpu_per_offspring_s'] * 1e3:.1f} | {ov} | {'yes' if r['identical'] else 'no'} |")
    if "efficiency_2" in res:
        p16 = res["per_offspring_s_16"]
        lines += ["", (f"Scaling efficiency of 2 workers: {res['efficiency_2']:.2f} in wall time (1-worker batch / "
                       f"(2 × 2-worker batch)), {res['cpu_efficiency_2']:.2f} in CPU per offspring (1 worker / 2 "
                       f"workers: what two workers cost each other in caches and memory bandwidth). 16 workers, "
                       f"one core each, at the 2-worker CPU cost per offspring plus Ray's round trip: "
                       f"{p16 * 1e3:.2f} ms per offspring, {1 / p16:.0f} offspring/s.")]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--offspring", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3, help="best of this many runs per configuration")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "search_scaling"))
    args = ap.parse_args()
    import ray  # optional: the lowc[distributed] extra (only to report its version)

    spec = SyntheticSpec(dim=args.dim, layers=args.layers, rows=args.tokens)
    assignments = random_assignments(spec.layer_names(), list(spec.levels), args.offspring)
    load = os.getloadavg()[0]
    res = measure(spec, assignments, args.tokens, repeat=args.repeat)
    info = {"command": "python benchmarks/search_scaling.py " + " ".join(sys.argv[1:]),
            "date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "torch": torch.__version__, "ray": ray.__version__, "spec": repr(spec),
            "load": f"{load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"}
    md = _markdown(res, info)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump({**info, **res}, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
