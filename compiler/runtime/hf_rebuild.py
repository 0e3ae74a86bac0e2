"""The ``kv-cache`` strategy: the Hugging Face model rebuilt around the compiled ops, with its KV cache.

A lowc graph is traced without a KV cache (``use_cache=False``: the whole sequence in, logits out),
so it cannot reuse past keys and values by itself. When a pipeline replaced only linear layers, the
model can be rebuilt instead (:func:`rebuild_hf`): the architecture from the stored ``hf_config``
(built on the meta device, no random init), every float tensor (embeddings, norms, ``lm_head``,
rotary tables) from the compiled program's weights, and each compressed linear replaced by a
:class:`CompiledLinear` that calls the graph's own op (``lowc::linear_wq``, ``linear_wqaq``, and the
backend layouts ``linear_wq_tr`` / ``linear_lut``) with the program's own tensors. Backends plug in
through those ops: on CUDA ``lowc::linear_wq_tr`` runs the Triton kernels, with decode steps at M =
batch rows (the GEMV regime).

The rebuild is checked once against the compiled graph (logits on a short prompt) and refused when
they differ, i.e. when a pass changed more than linear layers (online transforms, smoothing folded
into something the rebuild does not hold); graphs with other lowc ops (linearized attention, KV
quantization, Kronecker transforms) are refused before building (:func:`rebuild_blocker`).

* :class:`KVCacheDecoder` drives the rebuilt model for :func:`lowc.runtime.generation.generate`
  (positions are the cache positions, as in the traced graph, so its tokens match ``recompute``);
* :func:`hf_generate` runs transformers' own ``generate`` loop on a rebuilt (or any HF) model, greedy,
  with a dynamic or static cache (``cache="static"``: fixed shapes, the one to capture in CUDA graphs
  with ``torch.compile``): what the decode benchmark times against the fp16 model on the same loop.
"""

from __future__ import annotations

import inspect

import torch
import torch.fx

from lowc.errors import GenerationError
from lowc.ir import meta as nodemeta
from lowc.ir.dialect.args import is_quantized_linear, op_args
from lowc.runtime.decoder import Decoder, last_logits, program_of
from lowc.runtime.device import prompt_on, tokens_on

STATIC_CACHE = "static"
CACHES = ("dynamic", STATIC_CACHE)


class CompiledLinear(torch.nn.Module):
    """Calls a lowc linear-like op (``op(x, *args)``) with its tensors held as buffers."""

    def __init__(self, op, args: list, layer: str):
        super().__init__()
        self.op = op
        self.layer = layer
        self._spec = []
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor):
                self.register_buffer(f"t{i}", a, persistent=False)
                self._spec.append(("t", f"t{i}"))
            else:
                self._spec.append(("c", a))

    def forward(self, x):
        args = [getattr(self, v) if kind == "t" else v for kind, v in self._spec]
        return self.op(x, *args)

    def extra_repr(self) -> str:
        return f"{self.op}, layer={self.layer}"


def _lowc_nodes(program):
    for node in program.graph.nodes:
        if node.op == "call_function" and getattr(node.target, "namespace", None) == "lowc":
            yield node


def rebuild_blocker(program) -> str | None:
    """Why the graph cannot be rebuilt as a Hugging Face model (None when it can be tried): not an HF
    causal LM, a lowc op that is not a linear layer, or a linear whose operands are computed."""
    info = program.info
    if info.kind != "causal-lm" or not info.hf_config:
        return f"generation with a KV cache needs a compiled Hugging Face causal LM; this is a '{info.kind}' model" + \
            (" without an hf_config" if info.kind == "causal-lm" else "")
    for node in _lowc_nodes(program):
        if not is_quantized_linear(node):
            return f"the graph has {node.target.name()} (%{node.name}), which a Hugging Face rebuild cannot hold"
        layer = nodemeta.get(node).layer or node.name
        for a in _operands(node):
            if isinstance(a, torch.fx.Node) and a.op != "get_attr":
                return f"layer {layer}: an operand of {node.target.name()} is computed in the graph"
    return None


def _operands(node: torch.fx.Node) -> list:
    """The arguments after the input ``x``, in schema order (defaults filled in)."""
    return list(op_args(node).values())[1:]


def _set_module(root: torch.nn.Module, path: str, module: torch.nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)


def rebuild_hf(model, check: bool = True):
    """A transformers causal LM that runs the compiled model's weights and ops, with a KV cache.

    ``model``: a ``CompiledModel`` (from ``lowc.compile`` or ``lowc.load``) or a Program of a causal LM.
    ``check``: compare its logits with the compiled graph's once (:func:`check_rebuild`)."""
    from transformers import (  # optional: transformers' model classes are imported when a model is rebuilt
        AutoConfig,
        AutoModelForCausalLM,
    )

    program = program_of(model)
    why = rebuild_blocker(program)
    if why:
        raise GenerationError(why)
    cfg = dict(program.info.hf_config)
    model_type = cfg.pop("model_type", None)
    if not model_type:
        raise GenerationError("the model's hf_config has no model_type; cannot rebuild it for generation")
    cfg.pop("transformers_version", None)
    config = AutoConfig.for_model(model_type, **cfg)
    config.use_cache = True
    state = program.state_tensors()
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(config)
    hf.eval()

    for node in _lowc_nodes(program):
        layer = nodemeta.get(node).layer
        try:
            old = hf.get_submodule(layer) if layer else None
        except AttributeError:
            old = None
        if not isinstance(old, torch.nn.Linear):
            raise GenerationError(f"layer {layer or node.name}: no nn.Linear of that name in the rebuilt "
                                  f"{type(hf).__name__}; use the recurrent or recompute strategy instead")
        args = [program.attr(a.target) if isinstance(a, torch.fx.Node) else a for a in _operands(node)]
        _set_module(hf, layer, CompiledLinear(node.target, args, layer))

    missing = []
    for name, _ in list(hf.named_parameters()) + list(hf.named_buffers()):
        mod_path, _, attr = name.rpartition(".")
        mod = hf.get_submodule(mod_path) if mod_path else hf
        if isinstance(mod, CompiledLinear):
            continue
        t = state.get(name)
        if t is None and attr.startswith("original_"):  # e.g. rotary original_inv_freq: a copy of inv_freq
            t = state.get(f"{mod_path}.{attr[len('original_'):]}" if mod_path else attr[len("original_"):])
        if t is None:
            missing.append(name)
            continue
        if attr in mod._parameters:
            mod._parameters[attr] = torch.nn.Parameter(t, requires_grad=False)
        else:
            mod._buffers[attr] = t
    if missing:
        raise GenerationError(f"cannot rebuild {type(hf).__name__} for generation: the model has no tensor for "
                              f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if hf.config.tie_word_embeddings and "lm_head.weight" not in state:
        hf.tie_weights()
    if check:
        check_rebuild(program, hf)
    return hf


def check_rebuild(model, hf) -> None:
    """Refuse a rebuild whose logits on a fixed 8-token prompt differ from the compiled graph's."""
    program = program_of(model)
    ids = torch.randint(0, hf.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0)).to(program.device)
    with torch.inference_mode():
        ref = program.call(input_ids=ids, attention_mask=torch.ones_like(ids))
        ref = ref.logits if hasattr(ref, "logits") else ref["logits"] if isinstance(ref, dict) else ref
        got = hf(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
    rel = ((got.float() - ref.float()).norm() / ref.float().norm().clamp(min=1e-12)).item()
    tol = 1e-4 if ref.dtype == torch.float32 else 2e-2
    if not rel <= tol:
        raise GenerationError(f"the Hugging Face rebuild does not reproduce the compiled graph (relative logit "
                              f"difference {rel:.2e} > {tol:g}): a pass changed more than linear layers; use the "
                              f"recurrent or recompute strategy instead")


def cache_nbytes(cache) -> int:
    """Bytes of the tensors in a transformers cache object (any version's layout) or legacy tuple."""
    seen: set[int] = set()
    total = 0

    def add(x):
        nonlocal total
        if isinstance(x, torch.Tensor):
            if id(x) not in seen:
                seen.add(id(x))
                total += x.numel() * x.element_size()
        elif isinstance(x, (list, tuple)):
            for y in x:
                add(y)

    if cache is None:
        return 0
    if isinstance(cache, (list, tuple)):
        add(cache)
    elif hasattr(cache, "layers"):  # transformers >= 4.56: one object per layer
        for layer in cache.layers:
            add([getattr(layer, "keys", None), getattr(layer, "values", None)])
    else:
        add([getattr(cache, "key_cache", []), getattr(cache, "value_cache", [])])
    return total


class KVCacheDecoder(Decoder):
    """Decodes with a rebuilt Hugging Face model (``hf``; rebuilt from ``model`` when not given) and
    its dynamic KV cache."""

    strategy = "kv-cache"

    def __init__(self, model, hf=None):
        super().__init__(model)
        self.hf = hf if hf is not None else rebuild_hf(self.program)
        # the cache argument and output field: ``past_key_values`` until transformers 5.x renamed it ``cache``
        self._cache_arg = "cache" if "cache" in inspect.signature(self.hf.forward).parameters else "past_key_values"
        self.reset()

    def reset(self) -> None:
        self.cache = None
        self._mask: torch.Tensor | None = None

    def _run(self, ids: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            out = self.hf(input_ids=ids, attention_mask=self._mask, use_cache=True, **{self._cache_arg: self.cache})
        self.cache = getattr(out, self._cache_arg)
        return last_logits(out)

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        self.reset()
        ids, self._mask = prompt_on(self.device, input_ids, attention_mask)
        return self._run(ids)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        if self._mask is None:
            raise GenerationError("call prefill(prompt) before step()")
        ids = tokens_on(self.device, tokens)
        self._mask = torch.cat([self._mask, torch.ones_like(ids).to(self._mask.dtype)], 1)
        return self._run(ids)

    def kv_cache_bytes(self) -> int:
        return cache_nbytes(self.cache)


def hf_generate(hf, input_ids: torch.Tensor, max_new_tokens: int, cache: str = "dynamic",
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy generation with transformers' own loop and cache (``cache``: "dynamic" or "static"),
    exactly ``max_new_tokens`` tokens: ``[B, L + max_new_tokens]`` on the model's device."""
    if cache not in CACHES:
        raise GenerationError(f"cache must be one of {', '.join(CACHES)}, got {cache!r}")
    kw = {"cache_implementation": STATIC_CACHE} if cache == STATIC_CACHE else {}
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    pad = hf.config.pad_token_id if hf.config.pad_token_id is not None else 0
    with torch.inference_mode():
        return hf.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                           min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad, **kw)
