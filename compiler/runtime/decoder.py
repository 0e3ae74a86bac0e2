"""The decoder interface the generation loop drives, and what every decoding strategy shares.

A :class:`Decoder` runs a compiled causal LM one call per token:

* ``prefill(input_ids [B, L], attention_mask [B, L] | None)`` starts over on a prompt (left padding
  allowed) and returns the next-token logits ``[B, V]`` (fp32);
* ``step(tokens [B])`` adds one position per sequence and returns the next logits ``[B, V]``;
* ``state_bytes()`` (constant-size recurrent state) and ``kv_cache_bytes()`` (grows per token) say
  what it keeps between calls; ``linear_layers`` / ``softmax_layers`` count the graph's attentions.

The strategies (:mod:`lowc.runtime.strategy` chooses among them): ``recurrent``
(:mod:`lowc.runtime.recurrent`, an FX interpreter of the compiled graph with per-layer state),
``kv-cache`` (:mod:`lowc.runtime.hf_rebuild`, the Hugging Face model rebuilt around the compiled ops)
and ``recompute`` (:mod:`lowc.runtime.recompute`, the whole sequence each token; the oracle).

Backends plug in below this interface, not into it: a decoder calls the graph's dialect ops, and a
backend registers their device implementation (Triton kernels on CUDA, generated C for LUT layers).

Preconditions checked here for every strategy: a causal LM program (``kind == "causal-lm"``) whose
first input is token ids and whose other inputs, if any, are ``attention_mask``.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import torch

from lowc.errors import GenerationError

SDPA = torch.ops.aten.scaled_dot_product_attention.default


def program_of(model):
    """The :class:`lowc.ir.Program` of a ``CompiledModel`` (or the program itself)."""
    return getattr(model, "program", model)


def is_linear_attention(node: torch.fx.Node) -> bool:
    t = node.target
    return node.op == "call_function" and getattr(t, "namespace", None) == "lowc" and t._opname == "linear_attention"


def is_ssd(node: torch.fx.Node) -> bool:
    """A ``lowc::ssd`` (Mamba-2 / SSD mixer, from ``distill_ssm``) node: decoded with constant-size state."""
    t = node.target
    return node.op == "call_function" and getattr(t, "namespace", None) == "lowc" and t._opname == "ssd"


def attention_counts(program) -> tuple[int, int]:
    """``(constant-state, softmax)`` attention layers of the graph: linearized attention and SSD mixers
    count as constant-state layers."""
    nodes = list(program.graph.nodes)
    return sum(1 for n in nodes if is_linear_attention(n) or is_ssd(n)), sum(1 for n in nodes if n.target is SDPA)


def last_logits(out: Any) -> torch.Tensor:
    """The last position's logits ``[B, V]`` (fp32) of a causal LM's output (a tensor, a dict or a
    ``ModelOutput`` with ``logits``)."""
    if not isinstance(out, torch.Tensor):
        logits = out.get("logits") if hasattr(out, "get") else getattr(out, "logits", None)
        if logits is None and isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
            logits = out[0]
        if not isinstance(logits, torch.Tensor):
            raise GenerationError(f"cannot find logits in the model output ({type(out).__name__})")
        out = logits
    if out.dim() != 3:
        raise GenerationError(f"expected logits [batch, seq, vocab], got a tensor of shape {tuple(out.shape)}")
    return out[:, -1].float()


class Decoder(abc.ABC):
    """One decoding strategy over one compiled causal LM (module docstring)."""

    #: the strategy's name (``CompiledModel.generate(strategy=...)``, ``lowc generate --strategy``)
    strategy: ClassVar[str]

    def __init__(self, model):
        self.program = program_of(model)
        info = self.program.info
        if info.kind != "causal-lm":
            raise GenerationError(f"generation needs a causal LM; this program is a {info.kind!r} model")
        names = [s.name for s in info.inputs]
        if not names or info.inputs[0].dtype not in ("int64", "int32"):
            raise GenerationError(f"generation needs token ids as the first input (inputs: {', '.join(names)})")
        other = [n for n in names[1:] if n != "attention_mask"]
        if other:
            raise GenerationError(f"generation cannot make input(s) {', '.join(other)}")
        self.input_names = names
        self.linear_layers, self.softmax_layers = attention_counts(self.program)
        #: why this strategy was chosen (set by :func:`lowc.runtime.strategy.make_decoder`)
        self.reason = ""

    @property
    def device(self) -> torch.device:
        return self.program.device

    def inputs(self, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """The program's inputs by name for token ids and their mask."""
        vals = {self.input_names[0]: ids, "attention_mask": mask}
        return {n: vals[n] for n in self.input_names}

    def reset(self) -> None:
        """Drop what the decoder keeps between calls (caches, state); ``prefill`` starts over anyway."""

    @abc.abstractmethod
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Start over on the prompt ``[B, L]``; return the next-token logits ``[B, V]``."""

    @abc.abstractmethod
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per sequence (``[B]`` or ``[B, 1]``); return the next logits ``[B, V]``."""

    def state_bytes(self) -> int:
        """Bytes of constant-size recurrent state (linearized layers)."""
        return 0

    def kv_cache_bytes(self) -> int:
        """Bytes of KV caches (softmax layers; grows per token)."""
        return 0
