"""The ``recurrent`` strategy: constant-memory decoding of a causal program whose attention is linearized.

The program's graph was traced for whole sequences. :class:`RecurrentDecoder` runs that same graph
with an FX interpreter in two modes:

* **prefill** (the prompt, ``[B, L]``): every node runs as traced; each ``lowc::linear_attention``
  node runs :func:`lowc.runtime.state.prefill`, which returns the op's output and
  leaves that layer's constant-size state (``S = Σφ(k)vᵀ``, ``z = Σφ(k)`` per key/value head, and a
  ring buffer of the window's last keys/values);
* **step** (one token, ``[B, 1]``): every node runs on the single new position, except

  - *position sources*: the ``aten.arange`` nodes from which RoPE's cos/sin (or a learned position
    embedding's indices) are computed return ``offset .. offset+1`` instead of ``0 .. 1``, so the
    token gets the position it has in the parallel form (Hugging Face graphs compute positions as
    ``arange(seq_len)``);
  - each ``lowc::linear_attention`` node runs :func:`~lowc.runtime.state.step`
    on its layer's state (the new key is padding iff its ``key_mask`` entry is false);
  - each ``lowc::ssd`` node (an SSD mixer from ``distill_ssm``) runs :func:`lowc.ir.dialect.ssd.ssd_prefill`
    on the prompt and :func:`~lowc.ir.dialect.ssd.ssd_step` per token: a constant-size state per layer
    (the SSM state ``[B, H, P, N]`` and the last ``K-1`` inputs of each short convolution);
  - each remaining softmax ``scaled_dot_product_attention`` (layers left unlinearized in a hybrid
    model) attends over a KV cache of its past keys/values (this part grows with the sequence; the
    decoder reports it separately).

Every other node (embeddings, norms, projections, MLPs, quantized dialect linears) is position-wise,
so running it on one token equals the last row of the parallel form. The result: the same tokens as
re-running the full sequence each step (the ``recompute`` strategy, :mod:`lowc.runtime.recompute`),
with a state whose size does not depend on the number of tokens when every layer is linearized. The
token loop (greedy or sampled) is :func:`lowc.runtime.generation.generate`.

Preconditions: a causal LM program (``kind == "causal-lm"``) with token ids and an optional
``attention_mask`` input; every ``lowc::linear_attention`` node causal; attention is the only op that
mixes positions (true of decoder-only transformers; ``lowc generate --check`` compares with the
parallel form). A program without linearized layers decodes too (all softmax layers, KV caches).
Padding: left padding in ``attention_mask`` is honoured (padded keys never attended, as in the
parallel form).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx

from lowc.errors import GenerationError
from lowc.ir.analysis import ancestors
from lowc.ir.dialect import ensure_registered
from lowc.ir.dialect.args import op_args, schema_names
from lowc.ir.dialect.ssd import CHUNK, SSDState, ssd_prefill, ssd_step
from lowc.runtime import state as las
from lowc.runtime.decoder import SDPA, Decoder, is_linear_attention, is_ssd, last_logits
from lowc.runtime.device import prompt_on, tokens_on

ARANGE = torch.ops.aten.arange.default


def _op(node) -> str:
    t = node.target
    if node.op == "call_function" and isinstance(t, torch._ops.OpOverload):
        return f"{t.namespace}.{t._opname}"
    return ""


def position_sources(program) -> list[torch.fx.Node]:
    """The ``aten.arange`` nodes positions are computed from: ancestors of RoPE's cos/sin and of the
    indices of embeddings that do not read an input (learned position embeddings)."""
    graph = program.graph
    roots = [n for n in graph.nodes if _op(n) in ("aten.cos", "aten.sin")]
    for n in graph.nodes:
        if _op(n) == "aten.embedding":
            indices = op_args(n)["indices"]
            if isinstance(indices, torch.fx.Node) and not any(a.op == "placeholder" for a in ancestors([indices])):
                roots.append(indices)
    upstream = ancestors(roots)
    return [n for n in graph.nodes if _op(n) == "aten.arange" and n in upstream]


class _Interp(torch.fx.Interpreter):
    def __init__(self, dec: "RecurrentDecoder"):
        super().__init__(dec.program.gm)
        self.dec = dec

    def run_node(self, n: torch.fx.Node) -> Any:
        dec = self.dec
        if n.op != "call_function":
            return super().run_node(n)
        if n in dec._positions and dec._mode == "step":  # shift the positions by the tokens already seen
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            if n.target == ARANGE:
                start, end, step = 0, (args[0] if args else kwargs.pop("end")), 1
            else:  # arange.start / arange.start_step
                start, end = args[0], args[1]
                step = args[2] if len(args) > 2 else kwargs.pop("step", 1)
            kwargs = {k: v for k, v in kwargs.items() if k not in ("start", "end", "step")}
            return torch.ops.aten.arange.start_step(int(start) + dec.pos, int(end) + dec.pos, step, **kwargs)
        if n in dec._la_nodes:
            return dec._linear_attention(n, self._by_name(n))
        if n in dec._ssd_nodes:
            return dec._ssd(n, self._by_name(n))
        if n.target is SDPA:
            return dec._softmax(n, self._by_name(n), super().run_node)
        return super().run_node(n)

    def _by_name(self, n: torch.fx.Node) -> dict[str, Any]:
        """The node's argument values by schema name (the ones given; defaults are the op's)."""
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        return {**dict(zip(schema_names(n), args)), **kwargs}


class RecurrentDecoder(Decoder):
    """Decoding with per-layer recurrent state (module docstring). ``model``: a
    :class:`lowc.CompiledModel` or a :class:`lowc.ir.Program`."""

    strategy = "recurrent"

    def __init__(self, model):
        ensure_registered()
        super().__init__(model)
        self._la_nodes = {n for n in self.program.graph.nodes if is_linear_attention(n)}
        self._ssd_nodes = {n for n in self.program.graph.nodes if is_ssd(n)}
        for n in self._la_nodes:
            if not op_args(n)["causal"]:
                raise GenerationError(f"%{n.name}: the attention is not causal, so it cannot be decoded token by token")
        self._positions = set(position_sources(self.program))
        has_rope = any(_op(n) in ("aten.cos", "aten.sin") for n in self.program.graph.nodes)
        if has_rope and not self._positions:
            raise GenerationError("cannot find the arange that RoPE positions are computed from in this graph")
        self._device = self.program.device
        self.reset()

    # ---- state -------------------------------------------------------------------------------------
    def reset(self) -> None:
        self.states: dict[str, las.LinearAttentionState | SSDState] = {}
        self.kv: dict[str, las.KVCache] = {}
        self.pos = 0
        self._mode = "prefill"
        self._valid: torch.Tensor | None = None  # key validity of the current call, [B, L]

    def state_bytes(self) -> int:
        """Bytes of the linearized and SSD layers' recurrent state (constant while decoding)."""
        return sum(st.nbytes() for st in self.states.values())

    def kv_cache_bytes(self) -> int:
        """Bytes of the KV caches of softmax layers left in a hybrid model (grows per token)."""
        return sum(c.nbytes() for c in self.kv.values())

    # ---- node handlers -------------------------------------------------------------------------------
    def _linear_attention(self, n, a: dict[str, Any]):
        fq, fk, v, q, k, key_mask, window = a["fq"], a["fk"], a["v"], a["q"], a["k"], a["key_mask"], a["window"]
        factors = dict(window_factor=a["window_factor"], linear_factor=a["linear_factor"])
        if self._mode == "prefill":
            st = las.LinearAttentionState.empty(fq.shape[0], fk.shape[1], fq.shape[-1], v.shape[-1],
                                                q.shape[-1] if window else 0, window=window, scale=a["scale"],
                                                eps=a["eps"], device=fq.device)
            self.states[n.name] = st
            return las.prefill(st, fq, fk, v, q, k, key_mask=key_mask, **factors)
        valid = key_mask[:, 0] if key_mask is not None else None
        return las.step(self.states[n.name], fq, fk, v, q, k, key_valid=valid, **factors)

    def _ssd(self, n, a: dict[str, Any]):
        operands = (a["C"], a["B"], a["x"], a["a"])
        extra = {k: a.get(k) for k in ("D", "conv_c", "conv_b", "conv_x")}
        if self._mode == "prefill":
            y, self.states[n.name] = ssd_prefill(*operands, key_mask=a.get("key_mask"), chunk=a.get("chunk", CHUNK), **extra)
            return y
        km = a.get("key_mask")
        return ssd_step(self.states[n.name], *operands, key_valid=km[:, 0] if km is not None else None, **extra)

    def _softmax(self, n, a: dict[str, Any], run):
        if self._mode == "prefill":
            self.kv[n.name] = las.KVCache(a["key"], a["value"], self._valid)
            return run(n)
        c = self.kv[n.name]
        c.append(a["key"], a["value"], self._valid)
        return c.attend(a["query"], scale=a.get("scale"), enable_gqa=bool(a.get("enable_gqa", False)))

    # ---- running ---------------------------------------------------------------------------------------
    def _run(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self._valid = mask.bool()
        with torch.inference_mode():
            out = _Interp(self).run(*self.inputs(ids, mask).values())
        return last_logits(out)

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run the prompt ``[B, L]``; returns the next-token logits ``[B, V]``."""
        self.reset()
        ids, mask = prompt_on(self._device, input_ids, attention_mask)
        logits = self._run(ids, mask)
        self.pos = ids.shape[1]
        self._mode = "step"
        return logits

    def step(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Feed one token per sequence (``[B]`` or ``[B, 1]``; ``attention_mask`` ``[B]`` marks a token
        as padding, never attended); returns the next logits ``[B, V]``."""
        if self._mode != "step":
            raise GenerationError("call prefill(prompt) before step()")
        ids = tokens_on(self._device, tokens)
        mask = torch.ones_like(ids) if attention_mask is None else tokens_on(self._device, attention_mask)
        logits = self._run(ids, mask)
        self.pos += 1
        return logits
