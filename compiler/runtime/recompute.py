"""The ``recompute`` strategy: no cache; the compiled graph reruns on the whole sequence for each token.

Correct for any causal-LM program (it is the parallel form the graph was traced for), quadratic in
the number of tokens: the oracle the other strategies are checked against (``lowc generate --check``)
and the fallback when neither of them applies. Generated tokens are appended to the sequence with
mask 1; the prompt's left padding stays masked.
"""

from __future__ import annotations

import torch

from lowc.errors import GenerationError
from lowc.runtime.decoder import Decoder, last_logits
from lowc.runtime.device import prompt_on, tokens_on


class RecomputeDecoder(Decoder):
    """Reruns the graph on the whole sequence each step. ``model``: a ``CompiledModel`` or a Program."""

    strategy = "recompute"

    def __init__(self, model):
        super().__init__(model)
        self.reset()

    def reset(self) -> None:
        self._ids: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None

    def _run(self) -> torch.Tensor:
        with torch.inference_mode():
            return last_logits(self.program.call(**self.inputs(self._ids, self._mask)))

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        self._ids, self._mask = prompt_on(self.device, input_ids, attention_mask)
        return self._run()

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        if self._ids is None:
            raise GenerationError("call prefill(prompt) before step()")
        tok = tokens_on(self.device, tokens).to(self._ids.dtype)
        self._ids = torch.cat([self._ids, tok], 1)
        self._mask = torch.cat([self._mask, torch.ones_like(tok).to(self._mask.dtype)], 1)
        return self._run()
