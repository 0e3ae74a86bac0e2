"""Quality and speed measurements shared by ``lowc eval``, ``lowc bench``, ``lowc compile``'s
summary, the benchmarks and the tests.

* causal LMs: perplexity on a text (non-overlapping windows), KL(float || compressed) of next-token
  distributions, top-1 agreement;
* encoders: cosine of mean-pooled sentence embeddings to the float model;
* any model: SQNR (dB) of the main output tensor;
* speed: tokens/s of decode after a context of N tokens and of prefill, through a decoder (the
  target's engine) or llama.cpp on a GGUF file (the peer column).
"""

from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from tqdm import tqdm

from lowc.errors import LowcError, ModelLoadError
from lowc.frontend import hf, presets
from lowc.frontend.outputs import main_tensor  # noqa: F401  (callers import it from here too)
from lowc.frontend.trace import load_source, resolve_dtype
from lowc.runtime.decoder import last_logits
from lowc.runtime.recompute import RecomputeDecoder

#: Built-in sentences (written for lowc) used when no --data file is given: enough for an embedding
#: cosine check, not a benchmark.
SENTENCES = [
    "The compiler traces the model into a graph before any pass runs.",
    "A small change in the weights can move the output of every layer.",
    "The river flooded the valley after three days of heavy rain.",
    "She bought fresh bread at the market on her way home.",
    "Quantization stores each weight with fewer bits than a float.",
    "The orchestra rehearsed the symphony for the opening night.",
    "Mountains in the north are covered with snow for most of the year.",
    "He forgot his umbrella and walked home in the storm.",
    "The library keeps old maps of the city in a quiet room.",
    "Engineers measured the bridge before the new trains arrived.",
    "A cat slept in the sun on the warm stone steps.",
    "The museum opened a new wing dedicated to modern painting.",
    "Students discussed the results of the experiment in class.",
    "The ship left the harbour at dawn with a cargo of grain.",
    "Farmers planted wheat in the fields along the old road.",
    "The team won the championship after a long and difficult season.",
]


def sqnr_db(ref: torch.Tensor, x: torch.Tensor) -> float:
    ref, x = ref.double(), x.double()
    noise = (ref - x).pow(2).sum().item()
    sig = ref.pow(2).sum().item()
    return float("inf") if noise == 0 else 10 * math.log10(sig / noise)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1)


@dataclass
class Comparison:
    sqnr_db: float
    cosine: float | None = None  # encoders: mean cosine of mean-pooled embeddings
    min_cosine: float | None = None
    kl: float | None = None  # causal LMs: mean KL(float || compressed) per token (nats)
    top1: float | None = None  # causal LMs: fraction of positions with the same argmax

    def to_json(self) -> dict[str, float | str]:
        return {k: (round(v, 6) if math.isfinite(v) else str(v)) for k, v in self.__dict__.items() if v is not None}


def compare(ref_fn: Callable, test_fn: Callable, batches: list[dict[str, torch.Tensor]], kind: str) -> Comparison:
    """Run both callables on each batch (kwargs) and compare their main outputs."""
    refs, tests, cos, kls, top1 = [], [], [], [], []
    with torch.inference_mode():
        for b in batches:
            r = main_tensor(ref_fn(**b)).float().cpu()
            t = main_tensor(test_fn(**b)).float().cpu()
            refs.append(r.flatten())
            tests.append(t.flatten())
            mask = b.get("attention_mask")
            if kind == "causal-lm":
                lp_r = torch.log_softmax(r, -1)
                lp_t = torch.log_softmax(t, -1)
                kl = (lp_r.exp() * (lp_r - lp_t)).sum(-1)
                valid = mask.bool().cpu() if mask is not None else torch.ones(kl.shape, dtype=torch.bool)
                kls.append(kl[valid])
                top1.append((r.argmax(-1) == t.argmax(-1))[valid].float())
            elif kind == "encoder" and r.dim() == 3:
                m = mask.cpu() if mask is not None else torch.ones(r.shape[:2])
                cos.append(torch.nn.functional.cosine_similarity(mean_pool(r, m), mean_pool(t, m), dim=-1))
    c = Comparison(sqnr_db=sqnr_db(torch.cat(refs), torch.cat(tests)))
    if cos:
        allc = torch.cat(cos)
        c.cosine, c.min_cosine = allc.mean().item(), allc.min().item()
    if kls:
        c.kl, c.top1 = torch.cat(kls).mean().item(), torch.cat(top1).mean().item()
    return c


def text_batches(tokenizer, texts: list[str], batch_size: int = 8, max_len: int = 128, device: str = "cpu") -> list[dict[str, torch.Tensor]]:
    """Padded batches of sentences (encoders / KL checks)."""
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i : i + batch_size], padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        out.append({"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)})
    return out


def token_windows(tokenizer, text: str, seq_len: int, max_windows: int | None) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt", verbose=False)["input_ids"][0]
    n = len(ids) // seq_len
    if n == 0:
        raise LowcError(f"evaluation text has {len(ids)} tokens, fewer than one window of {seq_len}")
    if max_windows:
        n = min(n, max_windows)
    return ids[: n * seq_len].reshape(n, seq_len)


def perplexity(fn: Callable, windows: torch.Tensor, batch_size: int = 4, device: str = "cpu", progress: bool = False) -> float:
    """exp(mean next-token NLL) over non-overlapping windows [n, L]."""
    nll, count = 0.0, 0
    it = range(0, len(windows), batch_size)
    if progress:

        it = tqdm(it, desc="perplexity", unit="batch", leave=False)
    with torch.inference_mode():
        for i in it:
            ids = windows[i : i + batch_size].to(device)
            logits = main_tensor(fn(input_ids=ids, attention_mask=torch.ones_like(ids))).float()
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
            nll += loss.item()
            count += ids[:, 1:].numel()
    return math.exp(nll / count)


def source_spelling(manifest: dict[str, Any]) -> str:
    """The model spelling to rebuild an artifact's float source from, when that is safe.

    The manifest is untrusted, so it may name only what loads without running code from it: a
    built-in preset, or a Hugging Face directory whose fingerprint still matches the one recorded
    at compile time (weights are safetensors; transformers never runs remote code here). A factory
    (``package.module:factory``) or an in-memory module is never rebuilt from the manifest: the user
    names it with ``--against``."""

    src = manifest.get("source") or {}
    kind, name, path = src.get("type"), src.get("name"), src.get("path")
    if kind == "preset" and name in presets.PRESETS:
        return name
    if kind == "hf-dir" and isinstance(path, str) and os.path.isabs(path):
        if not hf.is_hf_dir(path):
            raise ModelLoadError(f"the artifact's source model {path} is not there any more: pass --against MODEL")
        if hf.fingerprint_dir(path) != src.get("sha256"):
            raise ModelLoadError(f"the artifact's source model {path} has changed since it was compiled "
                                 "(fingerprint differs): pass --against MODEL")
        return path
    if kind == "factory":
        raise ModelLoadError(f"the artifact was compiled from the factory {name!r}; lowc never imports code an artifact "
                             f"names: pass --against {name if isinstance(name, str) else 'MODEL'} to rebuild the float model")
    raise ModelLoadError("the artifact's source model cannot be rebuilt here: pass --against MODEL")


def float_reference(manifest: dict[str, Any], against: str | None, device: str = "cpu"):
    """(eager float model callable, tokenizer) for ``against`` (any model spelling the user gives),
    else for the artifact's source when :func:`source_spelling` allows it."""

    dtype = resolve_dtype(manifest.get("dtype"), device) if manifest.get("dtype") else torch.float32
    spec = against if against is not None else source_spelling(manifest)
    try:
        model, tok, _, _ = load_source(spec, dtype)
    except ModelLoadError as e:
        raise ModelLoadError(f"float reference: {e} (pass --against MODEL)") from None
    model = model.to(device).eval()
    cfg = getattr(model, "config", None)
    if hasattr(cfg, "use_cache"):
        cfg.use_cache = False

    def fn(**kw):
        return model(**kw)

    return fn, tok


def time_call(fn: Callable, kwargs: dict, repeat: int = 10, warmup: int = 2) -> list[float]:
    """Wall-clock seconds of ``fn(**kwargs)`` per repetition (after warmup)."""
    with torch.inference_mode():
        for _ in range(warmup):
            fn(**kwargs)
        times = []
        for _ in range(repeat):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn(**kwargs)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


# ---- tokens per second: decode with a context, prefill (lowc bench, benchmarks/e2e_cpu.py) -----------
class EngineRecompute(RecomputeDecoder):
    """Decodes through an engine that runs whole sequences only, ``call(input_ids=, attention_mask=)``
    (onnxruntime on an ``onnx-*`` artifact: the exported graph has no KV cache), so each token reruns
    the sequence: what a user of that file gets."""

    def __init__(self, model, call: Callable):
        super().__init__(model)
        self.call = call
        self.reason = "the engine runs whole sequences (no KV cache in its graph): the sequence rerun per token"

    def _run(self) -> torch.Tensor:
        with torch.inference_mode():
            return last_logits(self.call(**self.inputs(self._ids, self._mask)))


def bench_ids(vocab: int, length: int, seed: int = 0) -> torch.Tensor:
    """``[1, length]`` random token ids (the speed of a forward does not depend on them)."""
    return torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(seed))


def decode_speed(decoder, context: int, vocab: int, steps: int = 16, warmup: int = 2) -> dict[str, Any]:
    """Tokens/s of one-token steps after a prompt of ``context`` tokens (greedy; ``warmup`` untimed
    steps first, so the timed steps see ``context + warmup ...`` positions); median over ``steps``."""
    dec = decoder
    with torch.inference_mode():
        tok = dec.prefill(bench_ids(vocab, context)).argmax(-1)
        for _ in range(warmup):
            tok = dec.step(tok).argmax(-1)
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            tok = dec.step(tok).argmax(-1)
            times.append(time.perf_counter() - t0)
    t = median(times)
    return {"context": context, "steps": steps, "ms_per_token": t * 1e3, "best_ms": min(times) * 1e3,
            "tokens_per_s": 1 / t, "strategy": dec.strategy}


def prefill_speed(decoder, length: int, vocab: int, repeat: int = 3, warmup: int = 1) -> dict[str, Any]:
    """Tokens/s of ``prefill`` on a prompt of ``length`` tokens (median of ``repeat``)."""
    ids = bench_ids(vocab, length)
    times = time_call(lambda: decoder.prefill(ids), {}, repeat, warmup)
    t = median(times)
    return {"tokens": length, "repeat": repeat, "ms": t * 1e3, "best_ms": min(times) * 1e3, "tokens_per_s": length / t,
            "strategy": decoder.strategy}


def llama_cpp_speed(gguf: str, context: int | None, prefill: int | None, vocab: int, threads: int, steps: int = 16,
                    repeat: int = 3) -> dict[str, Any]:
    """The same measurements run by llama.cpp (``llama-cpp-python``) on a GGUF file: decode after
    ``context`` tokens and prefill of ``prefill`` tokens, ``threads`` threads, weights in plain CPU
    buffers (no AMX / repacked extra buffer types: on this machine evaluating Q4_0 through the AMX
    buffer crashed). Raises :class:`LowcError` when llama_cpp cannot be imported."""
    try:
        import llama_cpp  # optional: llama-cpp-python, the peer column of `lowc bench --against-llama-cpp`
    except ImportError as e:
        raise LowcError(f"--against-llama-cpp needs llama-cpp-python (pip install 'lowc[llama-cpp]'): {e}") from None
    if not os.path.isfile(gguf):
        raise LowcError(f"--against-llama-cpp: no file {gguf}")
    n = max(context or 1, prefill or 1)
    default = llama_cpp.llama_cpp.llama_model_default_params

    def plain():
        p = default()
        p.use_extra_bufts = False
        return p

    llama_cpp.llama_cpp.llama_model_default_params = plain
    try:
        llm = llama_cpp.Llama(model_path=gguf, n_ctx=n + steps + 8, n_batch=n, n_ubatch=n, n_threads=threads,
                              n_threads_batch=threads, verbose=False)
    finally:
        llama_cpp.llama_cpp.llama_model_default_params = default
    out: dict[str, Any] = {"gguf": os.path.abspath(gguf), "threads": threads,
                           "llama_cpp_python": getattr(llama_cpp, "__version__", "?")}
    if context:
        llm.reset()
        llm.eval(bench_ids(vocab, context)[0].tolist())
        times = []
        for i in range(steps + 2):
            t0 = time.perf_counter()
            llm.eval([int(i % vocab)])
            times.append(time.perf_counter() - t0)
        t = median(times[2:])
        out["decode"] = {"context": context, "steps": steps, "ms_per_token": t * 1e3, "best_ms": min(times[2:]) * 1e3,
                         "tokens_per_s": 1 / t}
    if prefill:
        ids = bench_ids(vocab, prefill)[0].tolist()
        times = []
        for _ in range(repeat + 1):
            llm.reset()  # the next eval drops the cached positions past 0
            t0 = time.perf_counter()
            llm.eval(ids)
            times.append(time.perf_counter() - t0)
        t = median(times[1:])
        out["prefill"] = {"tokens": prefill, "repeat": repeat, "ms": t * 1e3, "best_ms": min(times[1:]) * 1e3,
                          "tokens_per_s": prefill / t}
    return out
