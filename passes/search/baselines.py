"""The baselines EvoPress is compared with, in the same run and on the same tokens.

* **uniform**: every layer at the highest level whose uniform total fits the budget.
* **error-sum DP**: each layer's error is measured *alone* (KL to the float model with only that
  layer at that level, every other layer float), then dynamic programming picks the assignment with
  the smallest summed error whose total bits fit the budget (an exact 0/1 multiple-choice knapsack:
  per layer, the Pareto front of (total bits, summed error) is kept). The EvoPress paper's point is
  that the smallest summed error is not the smallest model error: layer errors do not add up.
"""

from __future__ import annotations

from lowc.errors import PassOptionError
from lowc.passes.search.evopress import Evaluator, Space


def uniform_level(space: Space, budget: float) -> int:
    """Index of the highest level whose uniform assignment fits ``budget`` bits per weight."""
    target = space.check_budget(budget)
    fits = [i for i in range(len(space.levels)) if space.total_bits(space.uniform(i)) <= target + 1e-6 * target]
    return fits[-1]


def layer_errors(space: Space, evaluator: Evaluator, n_tokens: int) -> list[list[float]]:
    """``err[layer][level]``: fitness with only that layer at that level (the rest float)."""
    assignments = [{name: i} for name in space.layers for i in range(len(space.levels))]
    flat = evaluator.evaluate(assignments, n_tokens)
    k = len(space.levels)
    return [list(map(float, flat[j * k:(j + 1) * k])) for j in range(len(space.layers))]


def knapsack(costs: list[list[float]], weights: list[list[int]], capacity: float) -> tuple[tuple[int, ...], float]:
    """One choice per item minimising the summed cost with summed weight ≤ ``capacity`` (exact:
    Pareto front over total weight). Ties go to the lower choice index. Raises if nothing fits."""
    front: list[tuple[int, float, tuple[int, ...]]] = [(0, 0.0, ())]
    for c, w in zip(costs, weights):
        best: dict[int, tuple[float, tuple[int, ...]]] = {}
        for b, e, ch in front:
            for i, (ci, wi) in enumerate(zip(c, w)):
                nb = b + wi
                if nb > capacity:
                    continue
                ne = e + ci
                if nb not in best or ne < best[nb][0]:
                    best[nb] = (ne, ch + (i,))
        front, lowest = [], float("inf")
        for b in sorted(best):
            e, ch = best[b]
            if e < lowest:
                front.append((b, e, ch))
                lowest = e
        if not front:
            raise PassOptionError(f"search: no assignment fits {capacity:.0f} bits")
    b, e, ch = min(front, key=lambda t: (t[1], t[0]))
    return ch, e


def dp_assignment(space: Space, budget: float, errors: list[list[float]]) -> tuple[tuple[int, ...], float]:
    """The error-sum DP baseline's assignment and its summed error."""
    return knapsack(errors, [list(b) for b in space.bits], space.check_budget(budget))
