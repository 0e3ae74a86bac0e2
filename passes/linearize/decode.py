"""Recurrent (constant-memory) greedy decoding of a causal program whose attention is linearized.

The program's graph was traced for whole sequences. :class:`RecurrentDecoder` runs that same graph
with an FX interpreter in two modes:

* **prefill** (the prompt, ``[B, L]``): every node runs as traced; each ``lowc::linear_attention``
  node runs :func:`lowc.ir.dialect.linear_attention_state.prefill`, which returns the op's output and
  leaves that layer's constant-size state (``S = Σφ(k)vᵀ``, ``z = Σφ(k)`` per key/value head, and a
  ring buffer of the window's last keys/values);
* **step** (one token, ``[B, 1]``): every node runs on the single new position, except

  - *position sources*: the ``aten.arange`` nodes from which RoPE's cos/sin (or a learned position
    embedding's indices) are computed return ``offset .. offset+1`` instead of ``0 .. 1``, so the
    token gets the position it has in the parallel form (Hugging Face graphs compute positions as
    ``arange(seq_len)``);
  - each ``lowc::linear_attention`` node runs :func:`~lowc.ir.dialect.linear_attention_state.step`
    on its layer's state (the new key is padding iff its ``key_mask`` entry is false);
  - each remaining softmax ``scaled_dot_product_attention`` (layers left unlinearized in a hybrid
    model) attends over a KV cache of its past keys/values (this part grows with the sequence; the
    decoder reports it separately).

Every other node (embeddings, norms, projections, MLPs, quantized dialect linears) is position-wise,
so running it on one token equals the last row of the parallel form. The result: the same greedy
tokens as re-running the full sequence each step (:func:`parallel_generate`), with a state whose size
does not depend on the number of tokens when every layer is linearized.

Preconditions: a causal LM program (``kind == "causal-lm"``) with token ids and an optional
``attention_mask`` input; every ``lowc::linear_attention`` node causal; attention is the only op that
mixes positions (true of decoder-only transformers; ``lowc generate --check`` compares with the
parallel form). A program without linearized layers decodes too (all softmax layers, KV caches).
Padding: left padding in ``attention_mask`` is honoured (padded keys never attended, as in the
parallel form).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F

from lowc.errors import LowcError
from lowc.ir.analysis import ancestors

SDPA = torch.ops.aten.scaled_dot_product_attention.default


class DecodeError(LowcError):
    """The program cannot be decoded recurrently (named reason)."""


def _program(model):
    return getattr(model, "program", model)


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
        if _op(n) == "aten.embedding" and len(n.args) > 1 and isinstance(n.args[1], torch.fx.Node):
            anc = ancestors([n.args[1]])
            if not any(a.op == "placeholder" for a in anc):
                roots.append(n.args[1])
    return [n for n in graph.nodes if _op(n) == "aten.arange" and n in ancestors(roots)]


@dataclass
class _KV:
    """KV cache of one softmax attention left in a hybrid model."""

    k: torch.Tensor
    v: torch.Tensor
    valid: torch.Tensor  # [B, T] bool

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.valid))


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
            if n.target == torch.ops.aten.arange.default:
                start, end, step = 0, (args[0] if args else kwargs.pop("end")), 1
            else:  # arange.start / arange.start_step
                start, end = args[0], args[1]
                step = args[2] if len(args) > 2 else kwargs.pop("step", 1)
            kwargs = {k: v for k, v in kwargs.items() if k not in ("start", "end", "step")}
            return torch.ops.aten.arange.start_step(int(start) + dec.pos, int(end) + dec.pos, step, **kwargs)
        if n.target is dec._la:
            return dec._linear_attention(n, *self.fetch_args_kwargs_from_env(n))
        if n.target is SDPA:
            return dec._softmax(n, *self.fetch_args_kwargs_from_env(n), super().run_node)
        return super().run_node(n)


class RecurrentDecoder:
    """Greedy decoding with per-layer recurrent state (module docstring). ``model``: a
    :class:`lowc.CompiledModel` or a :class:`lowc.ir.Program`."""

    def __init__(self, model):
        from lowc.ir.dialect import ensure_registered

        ensure_registered()
        self.program = _program(model)
        info = self.program.info
        if info.kind != "causal-lm":
            raise DecodeError(f"recurrent decoding needs a causal LM; this program is a {info.kind!r} model")
        self._la = torch.ops.lowc.linear_attention.default
        nodes = [n for n in self.program.graph.nodes if n.target is self._la]
        for n in nodes:
            if not n.args[8]:
                raise DecodeError(f"%{n.name}: the attention is not causal, so it cannot be decoded token by token")
        self.linear_layers = len(nodes)
        self.softmax_layers = sum(1 for n in self.program.graph.nodes if n.target is SDPA)
        self._positions = set(position_sources(self.program))
        has_rope = any(_op(n) in ("aten.cos", "aten.sin") for n in self.program.graph.nodes)
        if has_rope and not self._positions:
            raise DecodeError("cannot find the arange that RoPE positions are computed from in this graph")
        names = [s.name for s in info.inputs]
        if not names or info.inputs[0].dtype not in ("int64", "int32"):
            raise DecodeError(f"recurrent decoding needs token ids as the first input (inputs: {', '.join(names)})")
        self._names = names
        self._device = self.program.device
        self.reset()

    # ---- state -------------------------------------------------------------------------------------
    def reset(self) -> None:
        self.states: dict[str, Any] = {}
        self.kv: dict[str, _KV] = {}
        self.pos = 0
        self._mode = "prefill"
        self._valid: torch.Tensor | None = None  # key validity of the current call, [B, L]

    def state_bytes(self) -> int:
        """Bytes of the linearized layers' recurrent state (constant while decoding)."""
        return sum(st.nbytes() for st in self.states.values())

    def kv_cache_bytes(self) -> int:
        """Bytes of the KV caches of softmax layers left in a hybrid model (grows per token)."""
        return sum(c.nbytes() for c in self.kv.values())

    # ---- node handlers -------------------------------------------------------------------------------
    def _linear_attention(self, n, args, kwargs):
        from lowc.ir.dialect import linear_attention_state as las

        fq, fk, v, q, k, wf, lf, key_mask, causal, window, scale, eps = args
        if self._mode == "prefill":
            st = las.LinearAttentionState.empty(fq.shape[0], fk.shape[1], fq.shape[-1], v.shape[-1],
                                                q.shape[-1] if window else 0, window=window, scale=scale,
                                                eps=eps, device=fq.device)
            self.states[n.name] = st
            return las.prefill(st, fq, fk, v, q, k, window_factor=wf, linear_factor=lf, key_mask=key_mask)
        valid = key_mask[:, 0] if key_mask is not None else None
        return las.step(self.states[n.name], fq, fk, v, q, k, window_factor=wf, linear_factor=lf, key_valid=valid)

    def _softmax(self, n, args, kwargs, run):
        q, k, v = args[:3]
        scale = kwargs.get("scale", args[6] if len(args) > 6 else None)
        valid = self._valid
        if self._mode == "prefill":
            self.kv[n.name] = _KV(k, v, valid)
            return run(n)
        c = self.kv[n.name]
        c.k, c.v, c.valid = torch.cat([c.k, k], 2), torch.cat([c.v, v], 2), torch.cat([c.valid, valid], 1)
        return F.scaled_dot_product_attention(q, c.k, c.v, attn_mask=c.valid[:, None, None, :], scale=scale,
                                              enable_gqa=bool(kwargs.get("enable_gqa", False)))

    # ---- running ---------------------------------------------------------------------------------------
    def _inputs(self, ids: torch.Tensor, mask: torch.Tensor | None) -> list[torch.Tensor]:
        mask = torch.ones_like(ids) if mask is None else mask.to(ids.device)
        self._valid = mask.bool()
        vals = {self._names[0]: ids}
        if "attention_mask" in self._names:
            vals["attention_mask"] = mask
        missing = [n for n in self._names if n not in vals]
        if missing:
            raise DecodeError(f"recurrent decoding cannot make input(s) {', '.join(missing)}")
        return [vals[n] for n in self._names]

    def _logits(self, out) -> torch.Tensor:
        from lowc.evaluate import main_tensor

        return main_tensor(out)[:, -1].float()

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run the prompt ``[B, L]``; returns the next-token logits ``[B, V]``."""
        self.reset()
        ids = input_ids.to(self._device)
        with torch.inference_mode():
            out = _Interp(self).run(*self._inputs(ids, attention_mask))
        self.pos = ids.shape[1]
        self._mode = "step"
        return self._logits(out)

    def step(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Feed one token per sequence (``[B]`` or ``[B, 1]``); returns the next logits ``[B, V]``."""
        if self._mode != "step":
            raise DecodeError("call prefill(prompt) before step()")
        ids = tokens.reshape(-1, 1).to(self._device)
        mask = None if attention_mask is None else attention_mask.reshape(-1, 1)
        with torch.inference_mode():
            out = _Interp(self).run(*self._inputs(ids, mask))
        self.pos += 1
        return self._logits(out)


def generate(model, input_ids: torch.Tensor, max_new_tokens: int, attention_mask: torch.Tensor | None = None,
             *, on_token=None) -> torch.Tensor:
    """Greedy decoding with recurrent state: ``[B, L + max_new_tokens]`` token ids.
    ``on_token(i, decoder)`` is called after each generated token (e.g. to record memory)."""
    dec = RecurrentDecoder(model)
    logits = dec.prefill(input_ids, attention_mask)
    out = [input_ids.cpu()]
    for i in range(max_new_tokens):
        tok = logits.argmax(-1)
        out.append(tok.cpu().unsqueeze(1))
        if on_token is not None:
            on_token(i, dec)
        if i + 1 < max_new_tokens:
            logits = dec.step(tok)
    return torch.cat(out, 1)


def parallel_generate(model, input_ids: torch.Tensor, max_new_tokens: int,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy decoding by re-running the whole sequence each step (the parallel form's reference)."""
    program = _program(model)
    dev = program.device
    ids = input_ids.to(dev)
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask.to(dev)
    from lowc.evaluate import main_tensor

    with torch.inference_mode():
        for _ in range(max_new_tokens):
            logits = main_tensor(program.call(input_ids=ids, attention_mask=mask))[:, -1]
            tok = logits.argmax(-1, keepdim=True)
            ids = torch.cat([ids, tok], 1)
            mask = torch.cat([mask, torch.ones_like(tok)], 1)
    return ids.cpu()
