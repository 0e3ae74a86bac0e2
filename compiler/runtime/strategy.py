"""Choosing a decoding strategy for a compiled causal LM.

``auto`` picks, in order:

1. ``recurrent`` when the graph has linearized attention (``lowc::linear_attention``): constant-size
   state per linearized layer, KV caches for softmax layers left in a hybrid;
2. ``static-kv`` when only linear layers were replaced and the model is a plain Llama
   (:func:`lowc.runtime.static_cache.static_blocker` finds nothing): the rebuilt model's weights and
   ops run by a decode loop with a preallocated KV cache;
   ``kv-cache`` when only linear layers were replaced and the model has an ``hf_config``
   (:func:`lowc.runtime.hf_rebuild.rebuild_blocker` finds nothing): the Hugging Face model rebuilt
   around the compiled ops; if the rebuild is refused (it does not reproduce the graph), ``recurrent``;
3. ``recurrent`` for any other causal LM (the compiled graph interpreted with KV caches);
4. ``recompute`` when the graph cannot be decoded token by token (e.g. no position source found).

The decoder's ``reason`` says which rule chose it, and why an earlier one did not apply; a strategy
asked for by name either applies or raises :class:`lowc.errors.GenerationError`.
"""

from __future__ import annotations

from lowc.errors import GenerationError
from lowc.runtime.decoder import Decoder, attention_counts, program_of
from lowc.runtime.hf_rebuild import KVCacheDecoder, rebuild_blocker, rebuild_hf
from lowc.runtime.recompute import RecomputeDecoder
from lowc.runtime.recurrent import RecurrentDecoder
from lowc.runtime.static_cache import StaticCacheDecoder, static_blocker

DECODERS: dict[str, type[Decoder]] = {d.strategy: d for d in (RecurrentDecoder, StaticCacheDecoder, KVCacheDecoder,
                                                               RecomputeDecoder)}
STRATEGIES: tuple[str, ...] = ("auto", *DECODERS)


def make_decoder(model, strategy: str = "auto") -> Decoder:
    """A decoder for ``model`` (a ``CompiledModel`` or a Program) by ``strategy`` (module docstring)."""
    if strategy not in STRATEGIES:
        raise GenerationError(f"unknown decoding strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if strategy != "auto":
        dec = DECODERS[strategy](model)
        dec.reason = "asked for"
        return dec
    program = program_of(model)
    linear, _ = attention_counts(program)
    notes = []
    if linear:
        why = f"the graph has {linear} linearized attention layer(s): constant-size state"
    else:
        blocker = rebuild_blocker(program)
        if blocker is None:
            try:
                hf = rebuild_hf(program)
            except GenerationError as e:
                notes.append(f"kv-cache refused: {e}")
            else:
                static = static_blocker(program)
                if static is None:
                    dec = StaticCacheDecoder(program, hf)
                    dec.reason = ("only linear layers were replaced in a Llama: its weights and compiled ops run by a "
                                  "decode loop with a preallocated KV cache")
                    return dec
                dec = KVCacheDecoder(program, hf)
                dec.reason = (f"only linear layers were replaced: the Hugging Face model rebuilt around the compiled "
                              f"ops (no static-kv: {static})")
                return dec
        else:
            notes.append(f"no kv-cache: {blocker}")
        why = "the compiled graph interpreted token by token with KV caches"
    try:
        dec = RecurrentDecoder(program)
    except GenerationError as e:  # the recompute decoder raises the same error if it is not a causal LM
        notes.append(f"recurrent refused: {e}")
        dec, why = RecomputeDecoder(program), "the whole sequence rerun for each token"
    dec.reason = "; ".join([why, *notes])
    return dec
