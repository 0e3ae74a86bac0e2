"""Token generation for compiled causal LMs, with a KV cache, through the artifact's kernels.

A lowc graph is traced without a KV cache (``use_cache=False``: the whole sequence in, logits out),
so it cannot decode one token at a time by itself. Two ways to generate:

* :func:`rebuild_hf` + :func:`generate` (KV cache; what the decode benchmark measures): rebuild the
  Hugging Face model from the artifact: the architecture from the stored ``hf_config`` (built on the
  meta device, no random init), every float tensor (embeddings, norms, ``lm_head``, rotary tables)
  from the artifact's weights, and each compressed linear replaced by a module that calls the
  artifact's own op with the artifact's own tensors (``lowc::linear_wq_tr`` -> the Triton kernels on
  CUDA). Transformers then runs its usual decode loop (``generate``) with its own cache: dynamic, or
  static (``cache="static"``: fixed shapes, the one to capture in CUDA graphs with
  ``torch.compile(mode="reduce-overhead")``). Decode steps reach the kernels with M = batch rows (the
  GEMV regime). The rebuild is checked once against the compiled graph (logits on a short prompt) and
  refused when they differ, i.e. when a pass changed more than linear layers (online transforms,
  linearized attention): those graphs need :func:`generate_recompute`.
* :func:`generate_recompute` (no cache, any causal-LM artifact): greedy decoding that reruns the
  compiled graph on the whole sequence each step. Correct but quadratic; a fallback and an oracle.

Greedy (``do_sample=False``) only: what tests and benchmarks need.
"""

from __future__ import annotations

import torch

from lowc.errors import KernelError


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


def _linear_nodes(program):
    for node in program.graph.nodes:
        t = node.target
        if node.op == "call_function" and getattr(t, "namespace", None) == "lowc" and t._opname.startswith("linear"):
            yield node


def _set_module(root: torch.nn.Module, path: str, module: torch.nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)


def rebuild_hf(cm, check: bool = True):
    """A transformers causal LM that runs the compiled model's weights and ops, with a KV cache.

    ``cm``: a :class:`lowc.api.CompiledModel` (from ``lowc.compile`` or ``lowc.load``) of a causal LM."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lowc.ir import meta as nodemeta

    program = cm.program
    info = program.info
    if info.kind != "causal-lm" or not info.hf_config:
        raise KernelError(f"generation needs a compiled Hugging Face causal LM; this artifact is a '{info.kind}' model")
    cfg = dict(info.hf_config)
    model_type = cfg.pop("model_type", None)
    if not model_type:
        raise KernelError("the artifact's hf_config has no model_type; cannot rebuild the model for generation")
    cfg.pop("transformers_version", None)
    config = AutoConfig.for_model(model_type, **cfg)
    config.use_cache = True
    state = program.state_tensors()
    dev = program.device
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.eval()

    replaced: set[str] = set()
    for node in _linear_nodes(program):
        layer = nodemeta.get(node).layer
        try:
            old = model.get_submodule(layer) if layer else None
        except AttributeError:
            old = None
        if not isinstance(old, torch.nn.Linear):
            raise KernelError(f"layer {layer or node.name}: no nn.Linear of that name in the rebuilt "
                              f"{type(model).__name__}; generate with generate_recompute instead")
        args = []
        for a in node.args[1:]:
            if isinstance(a, torch.fx.Node):
                if a.op != "get_attr":
                    raise KernelError(f"layer {layer}: an operand of {node.target} is computed in the graph; "
                                      f"generate with generate_recompute instead")
                args.append(program.attr(a.target))
            else:
                args.append(a)
        _set_module(model, layer, CompiledLinear(node.target, args, layer))
        replaced.add(layer)

    missing = []
    for name, _ in list(model.named_parameters()) + list(model.named_buffers()):
        mod_path, _, attr = name.rpartition(".")
        mod = model.get_submodule(mod_path) if mod_path else model
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
        raise KernelError(f"cannot rebuild {type(model).__name__} for generation: the artifact has no tensor for "
                          f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if model.config.tie_word_embeddings and "lm_head.weight" not in state:
        model.tie_weights()
    if check:
        _check_rebuild(cm, model, dev)
    return model


def _check_rebuild(cm, model, dev) -> None:
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, 8), generator=torch.Generator().manual_seed(0)).to(dev)
    with torch.inference_mode():
        ref = cm(input_ids=ids, attention_mask=torch.ones_like(ids))
        ref = ref.logits if hasattr(ref, "logits") else ref["logits"] if isinstance(ref, dict) else ref
        got = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
    rel = ((got.float() - ref.float()).norm() / ref.float().norm().clamp(min=1e-12)).item()
    tol = 1e-4 if ref.dtype == torch.float32 else 2e-2
    if not rel <= tol:
        raise KernelError(f"the Hugging Face rebuild does not reproduce the compiled graph (relative logit "
                          f"difference {rel:.2e} > {tol:g}): a pass changed more than linear layers; generate "
                          f"with generate_recompute instead")


def generate(model, input_ids: torch.Tensor, max_new_tokens: int, cache: str = "dynamic",
             attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy generation with transformers' decode loop and KV cache (``cache``: "dynamic" or "static")."""
    if cache not in ("dynamic", "static"):
        raise KernelError(f"cache must be 'dynamic' or 'static', got {cache!r}")
    kw = {"cache_implementation": "static"} if cache == "static" else {}
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    with torch.inference_mode():
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                              min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=model.config.pad_token_id
                              if model.config.pad_token_id is not None else 0, **kw)


def generate_recompute(cm, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy generation without a cache: the compiled graph reruns on the whole sequence each step."""
    ids = input_ids
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            out = cm(input_ids=ids, attention_mask=torch.ones_like(ids))
            logits = out.logits if hasattr(out, "logits") else out["logits"] if isinstance(out, dict) else out
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids
