"""The token loop: prefill the prompt, then pick a token and step, until ``max_new_tokens`` or EOS.

One loop for every decoding strategy (:mod:`lowc.runtime.decoder`) and every way of picking a token:

* greedy (``do_sample=False``, or ``temperature == 0``): the argmax of the logits;
* sampling: logits / ``temperature``, then keep the ``top_k`` most likely tokens, then the nucleus
  (the fewest most likely tokens whose probability reaches ``top_p``; the most likely token is always
  kept), then draw from the renormalised distribution. The draw runs on the host in fp32 with a
  generator seeded by ``seed`` (``None``: torch's global generator), so a seed gives the same tokens
  on every device and strategy whose logits agree.

EOS: a sequence that produces one of ``eos_token_id`` is finished; it then gets ``pad_token_id``
(default: the first EOS id) while the others go on, and the loop stops when every sequence is
finished. The result is ``[B, L + n]`` token ids on the host (the prompt, then ``n <= max_new_tokens``
generated tokens, the EOS token included).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

from lowc.errors import GenerationError
from lowc.runtime.decoder import Decoder
from lowc.runtime.device import check_prompt, to_host


@dataclass(frozen=True)
class GenerationConfig:
    """How many tokens to generate and how to pick each one (module docstring)."""

    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    eos_token_id: tuple[int, ...] = field(default=())
    pad_token_id: int | None = None

    def __post_init__(self):
        eos = self.eos_token_id
        eos = () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)
        object.__setattr__(self, "eos_token_id", eos)
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise GenerationError(f"max_new_tokens must be an integer >= 0, got {self.max_new_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not self.temperature >= 0:
            raise GenerationError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1):
            raise GenerationError(f"top_k must be an integer >= 1, got {self.top_k!r}")
        if self.top_p is not None and not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise GenerationError(f"seed must be an integer, got {self.seed!r}")
        for t in (*eos, *(() if self.pad_token_id is None else (self.pad_token_id,))):
            if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                raise GenerationError(f"token ids must be integers >= 0, got {t!r} (eos_token_id / pad_token_id)")

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["eos_token_id"] = list(self.eos_token_id)
        return d


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> torch.Tensor:
    """``logits [B, V] / temperature`` (``temperature > 0``) with ``-inf`` outside the top-k and the
    nucleus (module docstring), in fp32."""
    x = logits.float() / temperature
    if top_k is not None and top_k < x.shape[-1]:
        kth = torch.topk(x, top_k, dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        probs = sorted_x.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass of the more likely tokens
        drop_sorted = before >= top_p  # the nucleus already holds top_p without this token
        drop_sorted[:, 0] = False
        x = x.masked_fill(torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted), float("-inf"))
    return x


class Sampler:
    """Picks the next token of each sequence from its logits (``config``: greedy or sampling)."""

    def __init__(self, config: GenerationConfig):
        self.config = config
        self.generator = None if config.seed is None else torch.Generator().manual_seed(config.seed)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits [B, V]`` (any device) -> tokens ``[B]`` int64 on the host."""
        c = self.config
        if c.greedy:
            return to_host(logits.argmax(-1))
        x = filter_logits(to_host(logits), c.temperature, c.top_k, c.top_p)
        return torch.multinomial(x.softmax(-1), 1, generator=self.generator).squeeze(1)


def generate(decoder: Decoder, input_ids: torch.Tensor, config: GenerationConfig | None = None, *,
             attention_mask: torch.Tensor | None = None,
             on_token: Callable[[int, Decoder], None] | None = None) -> torch.Tensor:
    """Generate with ``decoder`` from ``input_ids [B, L]`` (optional left-padding ``attention_mask``):
    ``[B, L + n]`` token ids on the host. ``on_token(i, decoder)`` is called after the ``i``-th
    generated token (e.g. to record the decoder's memory)."""
    config = config or GenerationConfig()
    check_prompt(input_ids, attention_mask)
    out = [to_host(input_ids).to(torch.int64)]
    if config.max_new_tokens == 0:
        return out[0]
    sample = Sampler(config)
    eos = torch.tensor(config.eos_token_id, dtype=torch.int64)
    pad = config.pad_token_id if config.pad_token_id is not None else (config.eos_token_id or (0,))[0]
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool)
    logits = decoder.prefill(input_ids, attention_mask)
    for i in range(config.max_new_tokens):
        tok = sample(logits).to(torch.int64)
        if len(eos):
            tok = torch.where(finished, torch.full_like(tok, pad), tok)
            finished |= torch.isin(tok, eos)
        out.append(tok.unsqueeze(1))
        if on_token is not None:
            on_token(i, decoder)
        if i + 1 == config.max_new_tokens or bool(finished.all()):
            break
        logits = decoder.step(tok)
    return torch.cat(out, 1)

