"""lowc's runtime: generating tokens with a compiled causal LM.

Layer: above :mod:`lowc.ir` (it runs programs and calls dialect ops), below the backends and the API;
it imports only ``lowc.ir``, ``lowc.errors`` and ``lowc.frontend``. Backends plug in through the ops,
not through the runtime: a decoder calls the graph's ops, a backend registers their kernels (Triton on
CUDA, generated C for LUT layers).

* :mod:`.generation` - the token loop (greedy; sampling with temperature, top-k, top-p, seed; EOS stop)
  and :class:`GenerationConfig`;
* :mod:`.decoder` - the :class:`Decoder` interface the loop drives (prefill, step, state bytes);
* :mod:`.recurrent` - ``recurrent``: the compiled graph interpreted token by token, recurrent state for
  linearized attention, KV caches for softmax attention;
* :mod:`.hf_rebuild` - ``kv-cache``: the Hugging Face model rebuilt around the compiled ops;
* :mod:`.static_cache` - ``static-kv``: that rebuilt Llama run by a decode loop with a preallocated KV cache;
* :mod:`.recompute` - ``recompute``: the whole sequence rerun per token (the oracle);
* :mod:`.strategy` - ``auto``: which of the three applies;
* :mod:`.state` - the linear-attention recurrent state and the softmax KV cache;
* :mod:`.device` - prompts and tokens to the model's device, results back to the host.

The public entry point is ``CompiledModel.generate`` (``lowc generate`` on the command line)::

    dec = make_decoder(cm, "auto")
    ids = generate(dec, prompt_ids, GenerationConfig(max_new_tokens=32, do_sample=True, top_p=0.9, seed=0))
"""

from lowc.runtime.decoder import Decoder
from lowc.runtime.generation import GenerationConfig, Sampler, filter_logits, generate
from lowc.runtime.hf_rebuild import KVCacheDecoder, hf_generate, rebuild_hf
from lowc.runtime.recompute import RecomputeDecoder
from lowc.runtime.recurrent import RecurrentDecoder
from lowc.runtime.static_cache import StaticCacheDecoder
from lowc.runtime.strategy import STRATEGIES, make_decoder

__all__ = ["Decoder", "GenerationConfig", "KVCacheDecoder", "RecomputeDecoder", "RecurrentDecoder", "STRATEGIES",
           "Sampler", "StaticCacheDecoder", "filter_logits", "generate", "hf_generate", "make_decoder", "rebuild_hf"]
