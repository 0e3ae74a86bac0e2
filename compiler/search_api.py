"""``lowc.search``: find per-layer bit widths for a budget with EvoPress, and write a recipe.

Steps (each failing at once, before the long work, on bad input):

1. **Check** the arguments: the target, the levels (bit widths 1..8 that the target's kernels take;
   default 2,3,4,5,6 within the target's range, so 2,3,4 for ``cpu-lut-*``), the method, the budget
   against the levels' range, the selection schedule against the calibration size.
2. **Trace** the model (a Hugging Face directory or a preset name: workers rebuild it from that
   spelling) and read the calibration (default: the shipped WikiText-2 validation text, 32 x 512
   tokens); the budget is checked against the exact range with scales/zeros.
3. **Level database** (:mod:`lowc.passes.search.levels`): built or resumed in ``db`` (default:
   ``$LOWC_CACHE_DIR/levels/<key>`` when that is set, else ``<output's folder>/.lowc-levels/<key>``, the key
   hashing model, method, group size and calibration), so later searches and budgets reuse it.
4. **Evaluator**: in-process (:class:`lowc.passes.search.scoring.InProcessEvaluator`), or with
   ``workers``/``ray`` a Ray pool from ``lowc.distributed`` (the ``lowc[distributed]`` extra).
5. **Baselines** (uniform, error-sum DP; :mod:`lowc.passes.search.baselines`) and **EvoPress**
   (:mod:`lowc.passes.search.evopress`; checkpoint ``<output>.checkpoint.json``), all scored on the
   same first ``max_tokens`` calibration tokens.
6. **Recipe** (:mod:`lowc.passes.search.recipe`) written to ``output`` and returned.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable
from typing import Any

import torch

from lowc import distributed, untrusted
from lowc.backends.registry import get_target
from lowc.errors import PassOptionError
from lowc.frontend.hf import fingerprint_dir
from lowc.ir.analysis import linear_layer
from lowc.ir.capture import trace
from lowc.passes.calibration import load_calibration
from lowc.passes.quant.common import linear_weight
from lowc.passes.search import baselines
from lowc.passes.search.evopress import Schedule, Space, evopress
from lowc.passes.search.levels import (
    DEFAULT_GROUP_SIZE,
    DEFAULT_LEVELS,
    METHODS,
    build_level_db,
    layer_group_size,
    searched_linears,
    stored_bits,
)
from lowc.passes.search.recipe import Recipe
from lowc.passes.search.scoring import InProcessEvaluator, ScorerSpec
from lowc.progress import current, reporting, step, to_stderr

DEFAULT_CALIB = "wikitext-2-valid"
DEFAULT_CALIB_SAMPLES = 32
DEFAULT_SEQ_LEN = 512
DEFAULT_GENERATIONS = 50
DEFAULT_OFFSPRING = 16


def check_levels(levels: Iterable[Any] | None, tgt) -> tuple[int, ...]:
    """The levels as sorted unique ints, each a bit width the target takes (default: 2..6 within it)."""
    lo, hi = tgt.weight_bits
    if levels is None:
        levels = tuple(b for b in DEFAULT_LEVELS if lo <= b <= hi)
    out = []
    for b in levels:
        if isinstance(b, str) and b.strip().isdigit():
            b = int(b)
        if type(b) is not int or not 1 <= b <= 8:
            raise PassOptionError(f"search: unknown level {b!r}: levels are weight bit widths 1..8")
        if not lo <= b <= hi:
            raise PassOptionError(f"search: level {b} bits: target '{tgt.name}' takes {lo}..{hi}-bit weights")
        out.append(b)
    out = sorted(set(out))
    if len(out) < 2:
        raise PassOptionError(f"search: give at least two levels, got {out}")
    return tuple(out)


def _model_spelling(model: Any) -> str:
    if isinstance(model, os.PathLike):
        model = os.fspath(model)
    if not isinstance(model, str):
        raise PassOptionError("search: give the model as a Hugging Face directory or a preset name (workers rebuild it "
                              f"from that), not a {type(model).__name__}")
    return os.path.abspath(model) if os.path.isdir(model) else model


def model_fingerprint(program) -> str:
    """The checkpoint's fingerprint for a directory (as artifacts record it), else a hash of the weights."""
    src = program.info.source
    if isinstance(src.get("path"), str) and os.path.isdir(src["path"]):
        return fingerprint_dir(src["path"])
    h = hashlib.sha256(json.dumps(src, sort_keys=True).encode())
    for name, t in sorted(program.state_tensors().items()):
        h.update(name.encode() + str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()[:1 << 20])
    return h.hexdigest()


def default_db(model: str, method: str, calib: Any, samples: int, seq_len: int, seed: int, output: str | None) -> str:
    key = json.dumps([model, method, DEFAULT_GROUP_SIZE, os.fspath(calib) if isinstance(calib, (str, os.PathLike))
                      else repr(type(calib)), samples, seq_len, seed])
    name = f"{os.path.basename(model.rstrip('/')) or 'model'}-{method}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    cache = os.environ.get("LOWC_CACHE_DIR")
    base = os.path.join(cache, "levels") if cache else os.path.join(os.path.dirname(os.path.abspath(output or ".")) if output
                                                                     else os.getcwd(), ".lowc-levels")
    return os.path.join(base, name)


def make_evaluator(spec: ScorerSpec, workers: int | None, ray: str | None):
    """In-process, or a Ray pool (``lowc.distributed``, the ``lowc[distributed]`` extra)."""
    if workers is None and ray is None:
        return InProcessEvaluator(spec)
    return distributed.ray_evaluator(spec, workers=workers, address=ray)  # without ray: one line naming the extra


def _cached_errors(db: str, fingerprint: str, space: Space, evaluator, n_tokens: int) -> list[list[float]]:
    """The DP baseline's per-layer errors, kept in the database folder: they depend only on the
    database, the layers, the levels and the tokens, not on the budget (scores are deterministic)."""
    key = hashlib.sha256(json.dumps([fingerprint, list(space.layers), list(space.levels), n_tokens]).encode()).hexdigest()
    path = os.path.join(db, f"layer-errors-{key[:16]}.json")
    if os.path.isfile(path):
        d = untrusted.load_json(path)
        k = len(space.levels)
        if (isinstance(d, list) and len(d) == len(space.layers) and all(isinstance(r, list) and len(r) == k and all(
                isinstance(v, float) for v in r) for r in d)):
            return d
    errors = baselines.layer_errors(space, evaluator, n_tokens)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(errors, f)
    os.replace(tmp, path)
    return errors


def search(model: Any, target: str, budget: float, *, levels: Iterable[int] | None = None, method: str = "gptq",
           calib: Any = DEFAULT_CALIB, generations: int = DEFAULT_GENERATIONS, offspring: int = DEFAULT_OFFSPRING,
           seed: int = 0, workers: int | None = None, ray: str | None = None, resume: bool = False, db: str | None = None,
           output: str | None = None, schedule: str | Schedule | None = None, calib_samples: int = DEFAULT_CALIB_SAMPLES,
           seq_len: int = DEFAULT_SEQ_LEN, dp_tokens: int | None = None, device: str = "cpu",
           progress: bool = True) -> Recipe:
    """Search per-layer bit widths for ``model`` on ``target`` at ``budget`` average stored bits per
    weight (scales and zeros included) and return the recipe (written to ``output`` when given).

    Defaults (scaled from the paper to small models on CPUs): levels 2,3,4,5,6 within the target's
    range, GPTQ with groups of 128, calibration 32 x 512 tokens of WikiText-2 validation,
    ``generations=50``, ``offspring=16``, schedule ``4:512,2:2048,1:8192`` (survivors:tokens; the
    last stage's tokens are the fitness of the recipe and of the baselines), the DP baseline's
    per-layer errors on the middle stage's tokens (``dp_tokens``). ``workers``/``ray``: score on a
    Ray pool (``lowc[distributed]``); ``resume``: continue from ``<output>.checkpoint.json``."""
    t0 = time.perf_counter()
    tgt = get_target(target)
    levels = check_levels(levels, tgt)
    if method not in METHODS:
        raise PassOptionError(f"search: method {method!r} is not one of {', '.join(METHODS)}")
    if not isinstance(budget, (int, float)) or isinstance(budget, bool) or not levels[0] <= budget <= levels[-1] + 1:
        raise PassOptionError(f"search: budget {budget!r} is outside the levels' range ({levels[0]}..{levels[-1]} bits "
                              "per weight plus scales and zeros)")
    if workers is not None and ray is not None:
        raise PassOptionError("search: give --workers N or --ray ADDRESS, not both")
    if workers is not None and (type(workers) is not int or workers < 1):
        raise PassOptionError(f"search: workers={workers!r}: choose at least 1")
    sched = schedule if isinstance(schedule, Schedule) else (
        Schedule.parse(schedule, offspring) if schedule else Schedule(offspring))
    if calib_samples * seq_len < sched.max_tokens:
        raise PassOptionError(f"search: the schedule scores on {sched.max_tokens} tokens but the calibration has "
                              f"{calib_samples} x {seq_len}: give more calibration samples or a shorter schedule")
    spelling = _model_spelling(model)
    if output is not None and os.path.isdir(output):
        raise PassOptionError(f"search: output {output!r} is a directory; give a recipe file such as recipe.yaml")

    with reporting((current() or to_stderr) if progress else None):
        step(f"searching per-layer bits for {spelling} on {tgt.name}: budget {budget} bits per weight, levels "
             f"{','.join(map(str, levels))}, {method}")
        program = trace(spelling)
        layers = searched_linears(program)
        shapes = {linear_layer(n): tuple(int(s) for s in linear_weight(program, n).shape) for n in layers}
        probe = Space(tuple(shapes), tuple(n * k for n, k in shapes.values()),
                      tuple(tuple(stored_bits(n, k, b, layer_group_size(k, DEFAULT_GROUP_SIZE), False) for b in levels)
                            for n, k in shapes.values()), levels)
        probe.check_budget(budget)
        vocab = next((s.vocab_size for s in program.info.inputs if s.vocab_size), None)
        calib_data = load_calibration(calib, getattr(program, "tokenizer", None), calib_samples, seq_len, seed,
                                      vocab_size=vocab)
        db = db or default_db(spelling, method, calib, calib_samples, seq_len, seed, output)
        level_db = build_level_db(db, program, calib_data, model_fingerprint=model_fingerprint(program), source=spelling,
                                  calib_seed=seed, levels=levels, method=method, device=device, progress=progress)
        del program
        t_db = time.perf_counter() - t0
        space = Space.from_db(level_db, levels, tuple(shapes))
        spec = ScorerSpec(spelling, os.path.abspath(db), levels, space.layers, sched.max_tokens,
                          level_db.fingerprint(), device)
        evaluator = make_evaluator(spec, workers, ray)
        try:
            t1 = time.perf_counter()
            step("baselines: uniform, and the error-sum DP over per-layer errors")
            ui = baselines.uniform_level(space, budget)
            n_dp = dp_tokens or sched.stages[len(sched.stages) // 2][1]
            errors = _cached_errors(db, level_db.fingerprint(), space, evaluator, n_dp)
            dp, dp_sum = baselines.dp_assignment(space, budget, errors)
            f_uniform, f_dp = evaluator.evaluate([space.assignment(space.uniform(ui)), space.assignment(dp)],
                                                 sched.max_tokens)
            t_base = time.perf_counter() - t1
            step(f"evopress: {generations} generations of {sched.offspring} offspring, selection {sched.spelling()}")
            t2 = time.perf_counter()
            checkpoint = (output + ".checkpoint.json") if output else os.path.join(db, f"search-{seed}.checkpoint.json")
            res = evopress(space, budget, evaluator, generations=generations, schedule=sched, seed=seed,
                           checkpoint=checkpoint, resume=resume, progress=progress, db=level_db.fingerprint())
            t_evo = time.perf_counter() - t2
        finally:
            evaluator.close()
        recipe = Recipe(
            model={"source": spelling, "fingerprint": level_db.model_fingerprint}, target=tgt.name, method=method,
            symmetric=level_db.symmetric, levels=levels, budget=float(budget),
            achieved_bits=round(space.avg_bits(res.assignment), 6),
            layers={name: {"bits": levels[i], "group_size": level_db.layers[name].group_size}
                    for name, i in zip(space.layers, res.assignment)},
            fitness={"metric": "kl", "tokens": sched.max_tokens, "evopress": res.fitness},
            baselines={"uniform": {"bits": levels[ui], "achieved_bits": round(space.avg_bits(space.uniform(ui)), 6),
                                   "fitness": f_uniform},
                       "dp": {"achieved_bits": round(space.avg_bits(dp), 6), "fitness": f_dp, "error_sum": dp_sum,
                              "error_tokens": n_dp, "layers": {n: levels[i] for n, i in zip(space.layers, dp)}}},
            search={"generations": generations, "offspring": sched.offspring, "schedule": sched.spelling(), "seed": seed,
                    "evaluations": res.evaluations, "history": [round(v, 6) for v in res.history],
                    "calibration": dict(level_db.manifest["calibration"]), "db": os.path.abspath(db),
                    "workers": workers, "ray": ray,
                    "wall_s": {"database": round(t_db, 2), "baselines": round(t_base, 2), "evopress": round(t_evo, 2)}})
        if output is not None:
            recipe.save(output)
            step(f"wrote {output}: EvoPress KL {res.fitness:.5f} at {recipe.achieved_bits:.3f} bits; uniform "
                 f"{levels[ui]}-bit {f_uniform:.5f}; DP {f_dp:.5f}")
    return recipe

