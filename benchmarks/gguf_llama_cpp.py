"""lowc's GPTQ in llama.cpp: WikiText-2 test perplexity of a GGUF export run by llama.cpp itself.

    python benchmarks/gguf_llama_cpp.py [--model /work/models/tiny-llama-wt2] [--seq-len 256]
        [--max-windows 40] [--calib-samples 128] [--threads 2]

Needs ``llama-cpp-python`` (``lowc[llama-cpp]``; builds llama.cpp from source: ``CMAKE_ARGS="-DGGML_NATIVE=ON" pip
install llama-cpp-python``) and ``gguf`` (``lowc[export]``). On the same Llama-architecture causal LM
(a Hugging Face directory) it compares, all run by llama.cpp on the same token windows:

* ``float``: ``lowc export --format gguf`` of the ``ref-fp32`` artifact (F32 tensors);
* ``llama.cpp Q4_1``: llama.cpp's own quantizer (``llama_model_quantize``, ftype Q4_1) of that F32
  file, with ``token_embd``/``output`` kept F32 as lowc keeps them (rtn/gptq ``ignore`` lm_head, and
  lowc never quantizes the embedding), so the two Q4_1 files differ only in how the codes were chosen;
* ``lowc RTN -> Q4_1`` and ``lowc GPTQ -> Q4_1``: ``rtn{group_size=32}`` / ``gptq{group_size=32}``
  (4-bit asymmetric groups of 32, calibrated on wikitext-2-valid) exported exactly (codes unchanged).

Perplexity is computed from llama.cpp's logits (``logits_all``) over non-overlapping windows of
WikiText-2 test tokenized by the model's Hugging Face tokenizer (so every row sees the same tokens as
lowc's own ``lowc eval``, whose perplexity is reported beside it for the lowc artifacts). Each file
must also generate: greedy continuation of a prompt, recorded. Writes
benchmarks/results/gguf.{md,json}.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import math
import os
import platform
import sys
import tempfile
import time

import lowc
import numpy as np
import torch
from lowc import data
from lowc.evaluate import perplexity, token_windows
from lowc.formats.gguf import export_gguf

PROMPT = "The history of the city"


def llama_cpp_quantize(src: str, dst: str, ftype: str) -> None:
    """llama.cpp's own quantizer on a GGUF file, keeping token_embd and output in F32."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.output_tensor_type = llama_cpp.GGML_TYPE_F32
    params.token_embedding_type = llama_cpp.GGML_TYPE_F32
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize({src} -> {ftype}) failed with {rc}")


def plain_cpu_buffers() -> None:
    """Load weights without llama.cpp's extra CPU buffer types (AMX / repacked layouts): on this
    machine the CPU reports AMX, and evaluating a Q4_0/Q4_1/Q8_0 model through the AMX buffer
    crashes (segmentation fault) while F32 runs; plain buffers use the ordinary ggml-cpu kernels."""
    import llama_cpp.llama_cpp as C

    default = C.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p
    C.llama_model_default_params = params


def llama_cpp_eval(path: str, windows: torch.Tensor, threads: int, prompt_ids: list[int]) -> dict:
    """Perplexity of ``windows`` from llama.cpp's logits, and a greedy continuation of the prompt."""
    import llama_cpp

    seq = windows.shape[1]
    llm = llama_cpp.Llama(model_path=path, n_ctx=max(seq, len(prompt_ids) + 32), n_batch=seq, logits_all=True,
                          n_threads=threads, verbose=False)
    nll, count = 0.0, 0
    t0 = time.perf_counter()
    for w in windows.tolist():
        llm.reset()
        llm.eval(w)
        logits = torch.from_numpy(np.array(llm.scores[: len(w)], dtype=np.float32))
        nll += torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(w[1:]), reduction="sum").item()
        count += len(w) - 1
    seconds = time.perf_counter() - t0
    llm.reset()
    out = []
    for tok in llm.generate(prompt_ids, top_k=1, top_p=1.0, temp=0.0, reset=True):
        if tok == llm.token_eos() or len(out) == 24:
            break
        out.append(tok)
    return {"ppl": math.exp(nll / count), "eval_seconds": seconds, "generated_ids": out}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="/work/models/tiny-llama-wt2", help="Hugging Face Llama directory")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--max-windows", type=int, default=40)
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--extra-bufts", action="store_true",
                    help="let llama.cpp use its extra CPU buffer types (AMX, repacking; see plain_cpu_buffers)")
    ap.add_argument("--workdir", default=None, help="where the artifacts and GGUF files go (default: a temp dir)")
    args = ap.parse_args()
    try:
        import llama_cpp
    except ImportError:
        raise SystemExit("needs llama-cpp-python: CMAKE_ARGS='-DGGML_NATIVE=ON' pip install llama-cpp-python") from None
    if not args.extra_bufts:
        plain_cpu_buffers()
    work = args.workdir or tempfile.mkdtemp(prefix="gguf-bench-")
    os.makedirs(work, exist_ok=True)
    calib = {"calib": data.wikitext2("valid"), "calib_samples": args.calib_samples, "seq_len": args.seq_len}
    t0 = time.perf_counter()
    arts = {
        "float": lowc.compile(args.model, target="ref-fp32", progress=False),
        "lowc RTN -> Q4_1": lowc.compile(args.model, target="ref-w4a16", passes=["rtn{group_size=32}"], progress=False),
        "lowc GPTQ -> Q4_1": lowc.compile(args.model, target="ref-w4a16", passes=["gptq{group_size=32}"],
                                          progress=False, **calib),
    }
    compile_s = time.perf_counter() - t0
    tok = arts["float"].tokenizer
    with open(data.wikitext2("test")) as f:
        text = f.read()
    windows = token_windows(tok, text, args.seq_len, args.max_windows)
    files = {"float": "float_f32.gguf", "lowc RTN -> Q4_1": "lowc_rtn_q4_1.gguf", "lowc GPTQ -> Q4_1": "lowc_gptq_q4_1.gguf",
             "llama.cpp Q4_1": "llama_cpp_q4_1.gguf"}
    files = {k: os.path.join(work, v) for k, v in files.items()}
    exports = {}
    for name, cm in arts.items():
        r = export_gguf(cm, files[name], force=True)
        exports[name] = {"types": r.types, "bytes": r.bytes,
                         "max_rel_err": max((row["rel_err"] for row in r.layers if row["how"] != "float"), default=0.0)}
    llama_cpp_quantize(files["float"], files["llama.cpp Q4_1"], "Q4_1")
    prompt_ids = tok(PROMPT, add_special_tokens=False)["input_ids"]
    rows = []
    for name in ("float", "llama.cpp Q4_1", "lowc RTN -> Q4_1", "lowc GPTQ -> Q4_1"):
        r = llama_cpp_eval(files[name], windows, args.threads, prompt_ids)
        r["generated"] = tok.decode(r.pop("generated_ids"))
        r.update(name=name, file_bytes=os.path.getsize(files[name]), **exports.get(name, {}))
        if name in arts:
            r["lowc_ppl"] = perplexity(arts[name], windows)
        rows.append(r)
        print(f"{name}: llama.cpp ppl {r['ppl']:.3f}" + (f", lowc ppl {r['lowc_ppl']:.3f}" if "lowc_ppl" in r else "")
              + f"; generates {r['generated']!r}", flush=True)
    vocab = llama_cpp.Llama(model_path=files["float"], vocab_only=True, verbose=False)
    # special=True: Hugging Face matches added tokens (WikiText's literal "<unk>") in text; so does llama.cpp then
    sample = text[:20000]
    tokens_match = vocab.tokenize(sample.encode(), add_bos=False, special=True) == tok(sample, add_special_tokens=False)["input_ids"]
    info = {
        "command": "python " + " ".join(sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, llama-cpp-python {llama_cpp.__version__}, "
                   f"torch {torch.__version__}, {args.threads} llama.cpp threads",
        "load": os.getloadavg(), "model": os.path.abspath(args.model), "seq_len": args.seq_len,
        "windows": int(windows.shape[0]), "tokens": int(windows.numel()), "calib_samples": args.calib_samples,
        "compile_seconds": compile_s, "llama_cpp_extra_buffer_types": args.extra_bufts, "llama_cpp_tokenizer_matches_hf_on_20000_chars": tokens_match, "rows": rows,
    }
    base = os.path.join(os.path.dirname(__file__), "results", "gguf")
    os.makedirs(os.path.dirname(base), exist_ok=True)
    with open(base + ".json", "w") as f:
        json.dump(info, f, indent=2)
    trained = os.path.basename(os.path.normpath(args.model))
    lines = [f"# lowc GGUF export run by llama.cpp: WikiText-2 test perplexity ({trained})", "",
             f"Command: `{info['command']}`  ",
             f"Machine: {info['machine']}; date {info['date']}; load {tuple(round(x, 1) for x in info['load'])}", "",
             (f"{info['windows']} windows of {args.seq_len} tokens ({info['tokens']} tokens), tokenized by the model's "
              f"Hugging Face tokenizer; GPTQ calibrated on {args.calib_samples} x {args.seq_len} tokens of wikitext-2-valid. "
              f"token_embd and output are F32 in every file; llama.cpp ran with use_extra_bufts={args.extra_bufts}. llama.cpp's tokenizer on the GGUF matches the HF one "
              f"on the first 20000 characters of the test text (special tokens parsed): {tokens_match}."), "",
             ("| model | weights | file MB | llama.cpp ppl | lowc ppl (same artifact) | greedy continuation of "
              f"{PROMPT!r} (llama.cpp) |"), "|---|---|---:|---:|---:|---|"]
    for r in rows:
        kinds = ", ".join(f"{k} x{v}" for k, v in r.get("types", {}).items()) or "llama_model_quantize Q4_1"
        lowc_ppl = f"{r['lowc_ppl']:.3f}" if "lowc_ppl" in r else "-"
        gen = r["generated"].replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {r['name']} | {kinds} | {r['file_bytes'] / 1e6:.2f} | {r['ppl']:.3f} | {lowc_ppl} | {gen} |")
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
