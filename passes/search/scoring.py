"""Fitness of a level assignment: KL divergence from the float model's next-token distributions.

:class:`ScorerSpec` is what an evaluator (in-process here, a Ray worker pool in
``lowc.distributed``) needs to score assignments anywhere: the model's spelling (a Hugging Face
directory or a preset name, loaded with :func:`lowc.frontend.trace.load_source`; never a pickled
module), the level database directory and its manifest fingerprint, the levels (an assignment's
level *index* ``i`` means ``levels[i]`` bits) and the searched layers. It is a small picklable frozen
dataclass; :meth:`ScorerSpec.build` makes a :class:`Scorer`, once per process: it loads the model,
opens the database (hash checked; its tensors are read through safetensors' memory map and kept
once read), and computes the float model's log-probabilities on the first ``max_tokens``
calibration tokens of the database (the tokens the database was quantized with), once.

``Scorer.score(assignment, n_tokens)`` swaps each assigned layer's weight for its dequantized level
(layers not in the assignment stay float: that is how the error-sum baseline measures one layer
alone) and returns the mean over the first ``n_tokens`` calibration tokens (row-major over the
``[samples, seq_len]`` token table) of ``KL(p_float || p_assigned)``, lower is better. Scoring is a
pure function of (assignment, n_tokens) on one machine, so any evaluator gives the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from lowc.errors import PassOptionError
from lowc.frontend.outputs import main_tensor
from lowc.frontend.trace import load_source
from lowc.passes.search.levels import LevelDB
from lowc.progress import step

Assignment = dict[str, int]


@dataclass(frozen=True)
class ScorerSpec:
    """Everything a process needs to build a :class:`Scorer` (module docstring)."""

    model: str
    db: str
    levels: tuple[int, ...]
    layers: tuple[str, ...]
    max_tokens: int
    db_fingerprint: str = ""  # the manifest sha256 the search started with ("" = do not check)
    device: str = "cpu"
    batch_rows: int = 8  # calibration rows per forward pass

    def build(self) -> Scorer:
        return Scorer(self)


class Scorer:
    """Scores assignments for one :class:`ScorerSpec` (module docstring)."""

    def __init__(self, spec: ScorerSpec):
        self.spec = spec
        self.db = LevelDB.open(spec.db)
        if spec.db_fingerprint and self.db.fingerprint() != spec.db_fingerprint:
            raise PassOptionError(f"search: the level database {spec.db} changed since the search started")
        missing = [b for b in spec.levels if b not in self.db.levels]
        if missing:
            raise PassOptionError(f"search: level {missing[0]} is not in the level database {spec.db} "
                                  f"(it has {', '.join(map(str, self.db.levels))})")
        model, _, _, _ = load_source(spec.model)
        self.model = model.eval().to(spec.device)
        self.modules = {}
        for name in spec.layers:
            if name not in self.db.layers:
                raise PassOptionError(f"search: layer {name} is not in the level database {spec.db}")
            try:
                self.modules[name] = self.model.get_submodule(name)
            except AttributeError:
                raise PassOptionError(f"search: the model {spec.model} has no layer {name}") from None
        self.float_weights = {n: m.weight.data for n, m in self.modules.items()}
        self.current: dict[str, int | None] = {n: None for n in spec.layers}
        self._weights: dict[tuple[str, int], torch.Tensor] = {}
        tokens = self.db.calibration_tokens()
        if spec.max_tokens > tokens.numel():
            raise PassOptionError(f"search: fitness needs {spec.max_tokens} calibration tokens, the level database has "
                                  f"{tokens.numel()} ({tokens.shape[0]} x {tokens.shape[1]}): use more calibration samples")
        self.tokens = tokens
        step(f"computing the float model's next-token distributions on {spec.max_tokens} tokens")
        self.target = torch.cat([torch.log_softmax(lg, -1) for lg in self._logits(spec.max_tokens)], 0)

    def _rows(self, n_tokens: int):
        """The calibration token rows covering the first ``n_tokens`` tokens, in forward batches."""
        seq = self.tokens.shape[1]
        full, rest = divmod(n_tokens, seq)
        for i in range(0, full, self.spec.batch_rows):
            yield self.tokens[i:min(full, i + self.spec.batch_rows)]
        if rest:
            yield self.tokens[full:full + 1, :rest]

    def _logits(self, n_tokens: int):
        """Logits ``[tokens, vocab]`` (float32) of each forward batch, in token order."""
        with torch.inference_mode():
            for rows in self._rows(n_tokens):
                out = main_tensor(self.model(input_ids=rows.to(self.spec.device), use_cache=False))
                yield out.float().reshape(-1, out.shape[-1]).cpu()

    def apply(self, assignment: Assignment) -> None:
        """Put each layer at its assigned level (float where unassigned)."""
        unknown = sorted(set(assignment) - set(self.modules))
        if unknown:
            raise PassOptionError(f"search: assignment names layer {unknown[0]}, which is not searched")
        for name, module in self.modules.items():
            idx = assignment.get(name)
            if idx is not None and not (isinstance(idx, int) and 0 <= idx < len(self.spec.levels)):
                raise PassOptionError(f"search: layer {name}: level index {idx!r} is not in 0..{len(self.spec.levels) - 1}")
            if idx == self.current[name]:
                continue
            if idx is None:
                module.weight.data = self.float_weights[name]
            else:
                key = (name, self.spec.levels[idx])
                w = self._weights.get(key)
                if w is None:
                    w = self._weights[key] = self.db.weight(*key).to(self.float_weights[name].dtype).to(self.spec.device)
                module.weight.data = w
            self.current[name] = idx

    def score(self, assignment: Assignment, n_tokens: int) -> float:
        """Mean ``KL(float || assigned)`` over the first ``n_tokens`` calibration tokens."""
        if not 1 <= n_tokens <= self.spec.max_tokens:
            raise PassOptionError(f"search: n_tokens={n_tokens} is outside 1..{self.spec.max_tokens}")
        self.apply(assignment)
        total, pos = 0.0, 0
        for logits in self._logits(n_tokens):
            logp = self.target[pos:pos + logits.shape[0]]
            logq = torch.log_softmax(logits, -1)
            total += float((logp.exp() * (logp - logq)).sum())
            pos += logits.shape[0]
        return total / n_tokens


class InProcessEvaluator:
    """Scores assignments in this process (the evaluator ``lowc search`` uses without
    ``--workers``/``--ray``); the Scorer is built on first use."""

    def __init__(self, spec: ScorerSpec):
        self.spec = spec
        self._scorer: Scorer | None = None

    @property
    def scorer(self) -> Scorer:
        if self._scorer is None:
            self._scorer = self.spec.build()
        return self._scorer

    def evaluate(self, assignments: list[Assignment], n_tokens: int) -> list[float]:
        """Fitness of each assignment on the first ``n_tokens`` tokens, in input order."""
        return [self.scorer.score(a, n_tokens) for a in assignments]

    def close(self) -> None:
        self._scorer = None
