"""EvoPress (Sieberling et al., 2024, arXiv 2410.14649): (1 + λ) evolutionary search over per-layer
levels under an exact bit budget.

* **Search space** (:class:`Space`): one level index per searched layer; a layer at level ``i``
  stores ``bits[layer][i]`` bits (codes plus scales/zeros, from the level database). The budget is
  the average stored bits per weight over the searched layers; a budget outside
  [uniform lowest level, uniform highest level] fails at once, naming the range.
* **Size classes**: layers whose stored bits are equal at every level (same weight count and group
  count, e.g. all ``q_proj``; ``gate_proj`` and ``down_proj`` of a Llama MLP). Mutations stay inside
  a class, so the total stays exact.
* **Initialisation**: the uniform level when the budget is exactly one; otherwise (as the paper for
  a fractional target) ``offspring`` random candidates: all layers at the lowest uniform level above
  the budget, random layers lowered one step until the total fits, then random layers raised while
  it still fits (the closest feasible total); the fittest on the first stage's tokens is the parent.
* **Mutation**: ``min(randint(1, 3), randint(1, 3))`` level switches; each picks a size class
  (weighted by its number of layers), raises one layer a step and lowers another of the class a step
  whose bit change is the same (for evenly spaced levels: any other layer that can go down).
  Offspring equal to the parent or to each other are drawn again.
* **Multi-step selection** (:class:`Schedule`): all λ offspring are scored on the first stage's
  tokens, the best ``survivors`` go on to the next stage's (more) tokens, and so on; the parent joins
  the last stage (its score there is kept from the generation it won: the tokens are fixed, so it is
  the same number) and survives unless an offspring is strictly better. The paper uses λ = 128,
  (16 on 2048 tokens) → (4 on 16384) → (1 on 131072) and ~150 generations for quantization; the
  defaults here are scaled to small models and CPUs: λ = 16, (4 on 512) → (2 on 2048) → (1 on 8192),
  50 generations.
* **Determinism**: all randomness comes from ``random.Random(seed)``; scores depend only on (assignment,
  tokens) and ties are broken by position, so the result does not depend on the evaluator. A checkpoint
  (JSON: generation, parent, its fitness, the generator's state, the history) is written after every
  generation; ``resume=True`` continues from it and ends where an uninterrupted run ends.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import sys
from dataclasses import dataclass, field
from typing import Any, Protocol

from tqdm.auto import tqdm

from lowc import untrusted
from lowc.errors import ArtifactError, PassOptionError
from lowc.progress import step

CHECKPOINT_KIND = "lowc-search-checkpoint"


class Evaluator(Protocol):
    def evaluate(self, assignments: list[dict[str, int]], n_tokens: int) -> list[float]: ...


@dataclass(frozen=True)
class Space:
    """Searched layers (graph order), their weight counts, and their stored bits per level index."""

    layers: tuple[str, ...]
    numel: tuple[int, ...]
    bits: tuple[tuple[int, ...], ...]
    levels: tuple[int, ...]

    @classmethod
    def from_db(cls, db, levels: tuple[int, ...], layers: tuple[str, ...] | None = None) -> Space:
        layers = tuple(layers or db.layers)
        return cls(layers, tuple(db.layers[n].numel for n in layers),
                   tuple(tuple(db.bits(n, b) for b in levels) for n in layers), tuple(levels))

    @property
    def weights(self) -> int:
        return sum(self.numel)

    def total_bits(self, a: tuple[int, ...]) -> int:
        return sum(self.bits[l][i] for l, i in enumerate(a))

    def avg_bits(self, a: tuple[int, ...]) -> float:
        return self.total_bits(a) / self.weights

    def uniform(self, i: int) -> tuple[int, ...]:
        return (i,) * len(self.layers)

    def bits_range(self) -> tuple[float, float]:
        return self.avg_bits(self.uniform(0)), self.avg_bits(self.uniform(len(self.levels) - 1))

    def classes(self) -> list[list[int]]:
        """Size classes (module docstring), in order of first layer."""
        out: dict[tuple[int, ...], list[int]] = {}
        for l, b in enumerate(self.bits):
            out.setdefault(b, []).append(l)
        return list(out.values())

    def assignment(self, a: tuple[int, ...]) -> dict[str, int]:
        return dict(zip(self.layers, a))

    def check_budget(self, budget: float) -> float:
        """The budget's total in bits; raises when it lies outside the levels' range."""
        lo, hi = self.bits_range()
        if not isinstance(budget, (int, float)) or isinstance(budget, bool) or not lo - 1e-9 <= budget <= hi + 1e-9:
            raise PassOptionError(f"search: budget {budget} is outside [{lo:.4f}, {hi:.4f}] bits per weight (levels "
                                  f"{', '.join(map(str, self.levels))}, counting scales and zeros)")
        return budget * self.weights


@dataclass(frozen=True)
class Schedule:
    """λ offspring per generation and the selection stages ``(survivors, tokens)``."""

    offspring: int = 16
    stages: tuple[tuple[int, int], ...] = ((4, 512), (2, 2048), (1, 8192))

    def __post_init__(self) -> None:
        s = self.stages
        if type(self.offspring) is not int or self.offspring < 1:
            raise PassOptionError(f"search: offspring={self.offspring!r}: choose at least 1")
        if not s or s[-1][0] != 1:
            raise PassOptionError("search: the selection schedule must end with a single survivor (…,1:TOKENS)")
        for (a, ta), (b, tb) in itertools.pairwise(s):
            if b > a or tb < ta:
                raise PassOptionError(f"search: selection stages must keep fewer survivors on more tokens, got "
                                      f"{a}:{ta} then {b}:{tb}")
        if any(v < 1 for st in s for v in st) or s[0][0] > self.offspring:
            raise PassOptionError(f"search: selection stages {self.spelling()} need positive numbers and at most "
                                  f"{self.offspring} (offspring) survivors")

    @classmethod
    def parse(cls, text: str, offspring: int) -> Schedule:
        """``"4:512,2:2048,1:8192"`` (survivors:tokens per stage)."""
        try:
            stages = tuple(tuple(int(v) for v in part.split(":")) for part in text.split(","))
            if any(len(s) != 2 for s in stages):
                raise ValueError
        except ValueError:
            raise PassOptionError(f"search: schedule {text!r}: expected survivors:tokens,... such as 4:512,2:2048,1:8192") from None
        return cls(offspring, stages)

    @property
    def max_tokens(self) -> int:
        return self.stages[-1][1]

    def spelling(self) -> str:
        return ",".join(f"{a}:{t}" for a, t in self.stages)


@dataclass
class SearchResult:
    assignment: tuple[int, ...]
    fitness: float  # at the last stage's tokens
    history: list[float] = field(default_factory=list)  # the parent's fitness after each generation
    evaluations: int = 0
    generations: int = 0


def mutate(parent: tuple[int, ...], space: Space, rng: random.Random,
           classes: list[list[int]] | None = None) -> tuple[int, ...]:
    """``parent`` after ``min(randint(1,3), randint(1,3))`` budget-preserving level switches."""
    movable = [c for c in (classes or space.classes()) if len(c) > 1]
    if not movable:
        raise PassOptionError("search: no two searched layers share a size class, so no level switch keeps the budget")
    child = list(parent)
    top = len(space.levels) - 1
    for _ in range(min(rng.randint(1, 3), rng.randint(1, 3))):
        for _attempt in range(64):
            cls = rng.choices(movable, weights=[len(c) for c in movable])[0]
            up = [l for l in cls if child[l] < top]
            if not up:
                continue
            u = rng.choice(up)
            delta = space.bits[u][child[u] + 1] - space.bits[u][child[u]]
            down = [l for l in cls if l != u and child[l] > 0
                    and space.bits[l][child[l]] - space.bits[l][child[l] - 1] == delta]
            if not down:
                continue
            d = rng.choice(down)
            child[u] += 1
            child[d] -= 1
            break
    return tuple(child)


def random_init(space: Space, target: float, rng: random.Random) -> tuple[int, ...]:
    """A random assignment with total bits ≤ ``target``, as close as one-step raises get it."""
    top = len(space.levels) - 1
    start = next((i for i in range(top + 1) if space.total_bits(space.uniform(i)) >= target), top)
    a = list(space.uniform(start))
    total = space.total_bits(tuple(a))
    n = len(a)
    while total > target:
        l = rng.choice([l for l in range(n) if a[l] > 0])
        total -= space.bits[l][a[l]] - space.bits[l][a[l] - 1]
        a[l] -= 1
    for l in rng.sample(range(n), n):
        if a[l] < top and total + space.bits[l][a[l] + 1] - space.bits[l][a[l]] <= target:
            total += space.bits[l][a[l] + 1] - space.bits[l][a[l]]
            a[l] += 1
    return tuple(a)


def _score(evaluator: Evaluator, space: Space, cands: list[tuple[int, ...]], tokens: int) -> list[float]:
    if not cands:
        return []
    out = evaluator.evaluate([space.assignment(c) for c in cands], tokens)
    if len(out) != len(cands):
        raise PassOptionError(f"search: the evaluator returned {len(out)} scores for {len(cands)} assignments")
    return [float(v) for v in out]


def _config(space: Space, budget: float, schedule: Schedule, seed: int, db: str) -> dict[str, Any]:
    return {"layers": list(space.layers), "levels": list(space.levels), "budget": budget, "seed": seed,
            "offspring": schedule.offspring, "schedule": schedule.spelling(), "db": db}


def _write_checkpoint(path: str, state: dict[str, Any]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(state, f)
    os.replace(tmp, path)


def read_checkpoint(path: str, config: dict[str, Any], n_layers: int, n_levels: int) -> dict[str, Any]:
    """The checkpoint at ``path``, checked strictly against this search's ``config``."""
    d = untrusted.load_json(path)
    keys = ("kind", "version", "config", "generation", "parent", "parent_fitness", "rng", "history", "evaluations")
    untrusted.fields(d, path, keys, keys)
    if d["kind"] != CHECKPOINT_KIND or d["version"] != 1:
        raise ArtifactError(f"{path}: not a lowc search checkpoint (version 1)")
    if d["config"] != config:
        cfg = d["config"] if isinstance(d["config"], dict) else {}
        diff = next((k for k in config if cfg.get(k) != config[k]), "config")
        raise ArtifactError(f"{path}: the checkpoint belongs to another search ({diff} differs); drop --resume or use "
                            "another output")
    untrusted.int_in(d["generation"], 0, 1 << 30, f"{path}: generation")
    parent = untrusted.typed(d["parent"], list, f"{path}: parent")
    if len(parent) != n_layers or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n_levels for i in parent):
        raise ArtifactError(f"{path}: parent is not {n_layers} level indices in 0..{n_levels - 1}")
    if d["parent_fitness"] is not None:
        untrusted.typed(d["parent_fitness"], (int, float), f"{path}: parent_fitness")
    rng = untrusted.typed(d["rng"], list, f"{path}: rng")
    if len(rng) != 3 or not isinstance(rng[1], list) or len(rng[1]) != 625 or not all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 32 for v in rng[1]):
        raise ArtifactError(f"{path}: rng is not a random.Random state")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in untrusted.typed(d["history"], list, f"{path}: history")):
        raise ArtifactError(f"{path}: history must be numbers")
    untrusted.int_in(d["evaluations"], 0, 1 << 50, f"{path}: evaluations")
    return d


def evopress(space: Space, budget: float, evaluator: Evaluator, *, generations: int = 50,
             schedule: Schedule = Schedule(), seed: int = 0, checkpoint: str | None = None, resume: bool = False,
             progress: bool = True, db: str = "") -> SearchResult:
    """Run the search (module docstring); ``checkpoint`` is the JSON file written every generation."""
    if type(generations) is not int or generations < 0:
        raise PassOptionError(f"search: generations={generations!r}: choose 0 or more")
    target = space.check_budget(budget)
    classes = space.classes()
    config = _config(space, budget, schedule, seed, db)
    stages = schedule.stages
    last_tokens = schedule.max_tokens
    rng = random.Random(seed)
    evaluations = 0
    state = None
    if resume and checkpoint and os.path.isfile(checkpoint):
        state = read_checkpoint(checkpoint, config, len(space.layers), len(space.levels))
        step(f"resuming the search from {checkpoint} (generation {state['generation']})")
    if state is not None:
        rng.setstate((state["rng"][0], tuple(state["rng"][1]), state["rng"][2]))
        parent = tuple(state["parent"])
        parent_fit = state["parent_fitness"]
        history = list(state["history"])
        start = state["generation"]
        evaluations = state["evaluations"]
    else:
        exact = [i for i in range(len(space.levels)) if abs(space.total_bits(space.uniform(i)) - target) < 1e-6 * target]
        if exact:
            parent, parent_fit = space.uniform(exact[0]), None
        else:
            cands = [random_init(space, target, rng) for _ in range(schedule.offspring)]
            fits = _score(evaluator, space, cands, stages[0][1])
            evaluations += len(cands)
            best = min(range(len(cands)), key=lambda i: (fits[i], i))
            parent, parent_fit = cands[best], (fits[best] if stages[0][1] == last_tokens else None)
        history, start = [], 0

    def save(gen: int) -> None:
        if checkpoint:
            st = rng.getstate()
            _write_checkpoint(checkpoint, {"kind": CHECKPOINT_KIND, "version": 1, "config": config, "generation": gen,
                                           "parent": list(parent), "parent_fitness": parent_fit,
                                           "rng": [st[0], list(st[1]), st[2]], "history": history,
                                           "evaluations": evaluations})

    if state is None:
        save(0)
    bar = tqdm(range(start, generations), desc="evopress", unit="gen", leave=False, file=sys.stderr,
               disable=not progress, initial=start, total=generations)
    for gen in bar:
        offspring: list[tuple[int, ...]] = []
        seen = {parent}
        for _ in range(100 * schedule.offspring):
            if len(offspring) == schedule.offspring:
                break
            child = mutate(parent, space, rng, classes)
            if child not in seen:
                seen.add(child)
                offspring.append(child)
        cands = offspring
        fits: list[float] = []
        for k, (survivors, tokens) in enumerate(stages):
            if k == len(stages) - 1:
                cands = [parent] + [c for c in cands if c != parent]  # first: a tie keeps the parent
                rest = _score(evaluator, space, cands[1:] if parent_fit is not None else cands, tokens)
                scores = [parent_fit] + rest if parent_fit is not None else rest
            else:
                scores = _score(evaluator, space, cands, tokens)
            evaluations += len(cands) - (1 if k == len(stages) - 1 and parent_fit is not None else 0)
            order = sorted(range(len(cands)), key=lambda i: (scores[i], i))[:survivors]
            cands, fits = [cands[i] for i in order], [scores[i] for i in order]
        parent, parent_fit = cands[0], fits[0]
        history.append(parent_fit)
        bar.set_postfix(kl=f"{parent_fit:.5f}", bits=f"{space.avg_bits(parent):.3f}")
        save(gen + 1)
    bar.close()
    if parent_fit is None:
        parent_fit = _score(evaluator, space, [parent], last_tokens)[0]
        evaluations += 1
    return SearchResult(parent, parent_fit, history, evaluations, generations)
