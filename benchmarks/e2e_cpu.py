"""Whole-model CPU speed, side by side in one run: lowc's engines vs llama.cpp at equal bits (issue 21).

    python benchmarks/e2e_cpu.py [--quick] [--threads 1 2] [--contexts 1 512] [--prefill 128] [--steps 16]
        [--work /tmp/lowc_e2e_cpu] [--reuse] [--no-llama-cpp] [--out benchmarks/results/e2e_cpu]

Model: the issue's random-weight Hugging Face Llama (hidden 2048, intermediate 5632, 16 heads, 4 KV
heads, 4 layers, vocab 32000; seed 0), written to ``--work``. Contenders, each timed for decode (one
token per step after a prompt of each ``--contexts`` length; median of ``--steps`` steps) and prefill
(``--prefill`` tokens; median of 3) at each ``--threads`` count:

* lowc ``cpu-lut-w4`` / ``cpu-lut-w2`` (default: ``lm_head`` at W4 g64 by ``lut-head``) and the same with
  ``lm_head`` float (``--pass rtn``), decoded by ``auto`` (``static-kv``: preallocated KV cache, the
  LUT C kernels); ``ref-fp32`` (the same decoder, torch); ``onnx-w4`` run by onnxruntime (its graph has
  no KV cache: a decode step reruns the whole sequence, as a user of that file would);
* llama.cpp (``llama-cpp-python``; weights in plain CPU buffers) on GGUF files made from lowc's
  ``ref-fp32`` export (``lowc export --format gguf``, F32) by llama.cpp's own quantizer: Q4_0 and Q2_K
  with llama.cpp's defaults (output tensor Q6_K) and ``--pure`` (every tensor at the type). Without
  llama_cpp (or with ``--no-llama-cpp``) only the lowc rows are written.

Bits per weight count every linear layer with its scales and zeros (lowc: the artifact's bytes;
GGUF: the block types' bytes, ``lm_head`` = ``output.weight`` included). The goals table compares
lowc decode with llama.cpp at the nearest bits (W4 vs Q4_0, W2 vs Q2_K), and for each lowc row the
decode step's time is split by torch.profiler into LUT kernels, float matmuls, other ATen ops and the
rest (Python): the measured cause of a gap.

The machine is shared: ratios within this run are what the results support, not absolute rates.
``--quick`` (contexts 1 and 128, 6 steps, threads 1 only) finishes in a few minutes.
llama.cpp here: ``pip install 'lowc[llama-cpp]'`` builds it from source; the runs recorded in
``benchmarks/results/e2e_cpu.md`` used a prebuilt llama-cpp-python 0.3.36 (``PYTHONPATH`` = its
package, ``LLAMA_CPP_LIB_PATH`` = its libraries).
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import os
import platform
import subprocess
import sys
import time

import lowc
import torch
from lowc import evaluate as ev
from lowc.formats.gguf import export_gguf

CONFIG = {"vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 4,
          "num_attention_heads": 16, "num_key_value_heads": 4, "max_position_embeddings": 2048,
          "tie_word_embeddings": False, "bos_token_id": 256, "eos_token_id": 257}
VOCAB = CONFIG["vocab_size"]
#: lowc contenders: label -> (target, method passes or None for the target's default)
LOWC = {
    "lowc cpu-lut-w4": ("cpu-lut-w4", None),
    "lowc cpu-lut-w4, lm_head float": ("cpu-lut-w4", ["rtn"]),
    "lowc cpu-lut-w2": ("cpu-lut-w2", None),
    "lowc cpu-lut-w2, lm_head float": ("cpu-lut-w2", ["rtn"]),
    "lowc ref-fp32 (torch)": ("ref-fp32", None),
    "onnxruntime, lowc onnx-w4": ("onnx-w4", None),
}
#: llama.cpp contenders: label -> (ftype, pure)
LLAMA = {"llama.cpp Q4_0 (output Q6_K)": ("Q4_0", False), "llama.cpp Q4_0 --pure": ("Q4_0", True),
         "llama.cpp Q2_K (output Q6_K)": ("Q2_K", False), "llama.cpp Q2_K --pure": ("Q2_K", True)}
ORDER = ("lowc cpu-lut-w4", "llama.cpp Q4_0 (output Q6_K)", "lowc cpu-lut-w2", "llama.cpp Q2_K (output Q6_K)",
         "lowc ref-fp32 (torch)", "llama.cpp Q4_0 --pure", "llama.cpp Q2_K --pure", "lowc cpu-lut-w4, lm_head float",
         "lowc cpu-lut-w2, lm_head float", "onnxruntime, lowc onnx-w4")
GOALS = (("lowc cpu-lut-w4", "llama.cpp Q4_0 (output Q6_K)"), ("lowc cpu-lut-w4", "llama.cpp Q4_0 --pure"),
         ("lowc cpu-lut-w2", "llama.cpp Q2_K (output Q6_K)"), ("lowc cpu-lut-w2", "llama.cpp Q2_K --pure"))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def make_model(path: str) -> str:
    from lowc.frontend.presets import byte_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    if not os.path.isfile(os.path.join(path, "config.json")):
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**CONFIG)).save_pretrained(path)
        byte_tokenizer().save_pretrained(path)  # GGUF files carry a tokenizer; the ids are random anyway
    return path


def compile_all(model: str, work: str, reuse: bool) -> dict[str, str]:
    arts = {}
    for label, (target, passes) in LOWC.items():
        out = os.path.join(work, label.split(" ", 1)[1].replace(" ", "_").replace(",", "").replace("(", "").replace(")", ""))
        if not (reuse and os.path.isfile(os.path.join(out, "manifest.json"))):
            log(f"compiling {label}")
            t0 = time.perf_counter()
            lowc.compile(model, target, passes=passes, progress=False).save(out, force=True)
            log(f"  {time.perf_counter() - t0:.0f} s")
            gc.collect()
        arts[label] = out
    return arts


def lowc_bpw(art: str) -> float:
    with open(os.path.join(art, "manifest.json")) as f:
        m = json.load(f)
    rows = m["layers"]
    return sum(r["bytes"] for r in rows) * 8 / sum(r["out_features"] * r["in_features"] for r in rows)


def gguf_bpw(path: str) -> float:
    from gguf import GGUFReader

    bits = n = 0
    for t in GGUFReader(path).tensors:
        if t.name == "output.weight" or (t.name.startswith("blk.") and t.name.endswith(".weight") and "norm" not in t.name):
            bits += int(t.n_bytes) * 8
            n += int(t.n_elements)
    return bits / n


def make_gguf(work: str, fp32_art: str, reuse: bool) -> dict[str, str]:
    import llama_cpp

    f32 = os.path.join(work, "f32.gguf")
    if not (reuse and os.path.isfile(f32)):
        log("exporting ref-fp32 to GGUF (F32)")
        export_gguf(fp32_art, f32, force=True)
    files = {}
    for label, (ftype, pure) in LLAMA.items():
        dst = os.path.join(work, f"{ftype}{'_pure' if pure else ''}.gguf")
        if not (reuse and os.path.isfile(dst)):
            log(f"llama.cpp quantize -> {label}")
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
            params.pure = pure
            params.nthread = 2
            if llama_cpp.llama_model_quantize(f32.encode(), dst.encode(), ctypes.byref(params)) != 0:
                raise SystemExit(f"llama_model_quantize -> {ftype} failed")
        files[label] = dst
    return files


def step_breakdown(dec, steps: int = 4) -> dict[str, float]:
    """ms per decode step: LUT kernels, float matmuls, other ATen ops, and the rest (Python, ctypes)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        tok = dec.step(torch.tensor([1])).argmax(-1)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for _ in range(steps):
                tok = dec.step(tok).argmax(-1)
            wall = (time.perf_counter() - t0) / steps * 1e3
    ka = prof.key_averages()
    tot = sum(e.self_cpu_time_total for e in ka) / steps / 1e3
    lut = sum(e.self_cpu_time_total for e in ka if "linear_lut" in e.key) / steps / 1e3
    mm = sum(e.self_cpu_time_total for e in ka if e.key in ("aten::mm", "aten::addmm", "aten::bmm")) / steps / 1e3
    return {"step_ms_profiled": wall, "lut_kernels_ms": lut, "float_matmul_ms": mm, "other_aten_ms": tot - lut - mm,
            "python_ms": max(wall - tot, 0.0)}


def time_lowc(label: str, art: str, threads: int, contexts, prefill: int, steps: int) -> dict:
    torch.set_num_threads(threads)
    cm = lowc.load(art)
    rt = cm.target.runtime_on("cpu", art)
    dec = ev.EngineRecompute(cm, rt.call) if rt.call else cm.decoder("auto")
    row = {"contender": label, "threads": threads, "engine": rt.implementation, "strategy": dec.strategy,
           "bits_per_weight": lowc_bpw(art)}
    for c in contexts:
        n = steps if rt.call is None else max(2, steps // 4)  # onnx reruns the sequence: fewer steps
        row[f"decode_{c}"] = ev.decode_speed(dec, c, VOCAB, n)["tokens_per_s"]
        log(f"  {label} t={threads} decode@{c}: {row[f'decode_{c}']:.2f} tok/s")
    row["prefill"] = ev.prefill_speed(dec, prefill, VOCAB, 3)["tokens_per_s"]
    log(f"  {label} t={threads} prefill {prefill}: {row['prefill']:.1f} tok/s")
    if rt.call is None:
        dec.prefill(ev.bench_ids(VOCAB, contexts[0]))
        row["breakdown"] = step_breakdown(dec)
    del dec, cm
    gc.collect()
    return row


def time_llama(label: str, path: str, threads: int, contexts, prefill: int, steps: int) -> dict:
    row = {"contender": label, "threads": threads, "engine": "llama.cpp (llama-cpp-python)", "strategy": "llama.cpp",
           "bits_per_weight": gguf_bpw(path)}
    for c in contexts:
        row[f"decode_{c}"] = ev.llama_cpp_speed(path, c, None, VOCAB, threads, steps)["decode"]["tokens_per_s"]
        log(f"  {label} t={threads} decode@{c}: {row[f'decode_{c}']:.2f} tok/s")
    row["prefill"] = ev.llama_cpp_speed(path, None, prefill, VOCAB, threads, steps)["prefill"]["tokens_per_s"]
    log(f"  {label} t={threads} prefill {prefill}: {row['prefill']:.1f} tok/s")
    gc.collect()
    return row


def write(out: str, meta: dict, rows: list[dict], contexts, prefill: int) -> None:
    with open(out + ".json", "w") as f:
        json.dump({**meta, "rows": rows}, f, indent=2)
    cols = [f"decode ctx {c}" for c in contexts] + [f"prefill {prefill}"]
    lines = ["# Whole-model CPU speed: lowc vs llama.cpp (issue 21)", "",
             f"- date: {meta['date']}", (f"- machine: {meta['machine']} (load average {meta['load_average']:.1f} after "
             f"the last row: the machine is shared)"), f"- command: `{meta['command']}`",
             f"- lowc commit: {meta['commit']}", f"- model: {meta['model']}",
             ("- tokens/s; decode = one token per step after a prompt of ctx tokens (median of the steps), "
             "prefill = one prompt (median of 3). One run on a shared machine: compare ratios, not absolute rates."), ""]
    for t in meta["threads"]:
        lines += [f"## {t} thread{'s' if t > 1 else ''}", "",
                  "| contender | engine / decoding | bits/weight (linears) | " + " | ".join(cols) + " |",
                  "|---|---|---:|" + "---:|" * len(cols)]
        for r in (r for r in rows if r["threads"] == t):
            vals = [r.get(f"decode_{c}") for c in contexts] + [r.get("prefill")]
            lines.append(f"| {r['contender']} | {r['engine']} / {r['strategy']} | {r['bits_per_weight']:.2f} | "
                         + " | ".join(f"{v:.1f}" if v is not None else "-" for v in vals) + " |")
        lines.append("")
    by = {(r["contender"], r["threads"]): r for r in rows}
    goal_lines = []
    for t in meta["threads"]:
        for ours, peer in GOALS:
            a, b = by.get((ours, t)), by.get((peer, t))
            if not a or not b:
                continue
            for c in contexts:
                x, y = a[f"decode_{c}"], b[f"decode_{c}"]
                goal_lines.append(f"| {ours} ({a['bits_per_weight']:.2f} b/w) vs {peer} ({b['bits_per_weight']:.2f} b/w) "
                                  f"| {t} | {c} | {x:.1f} / {y:.1f} = {x / y:.2f}x | {'met' if x >= y else 'missed'} |")
    if goal_lines:
        lines += ["## Goals: lowc decode >= llama.cpp at the same bits per weight", "",
                  "| pair | threads | ctx | tokens/s lowc / llama.cpp | goal |", "|---|---:|---:|---|---|", *goal_lines, ""]
    fp32 = {t: by.get(("lowc ref-fp32 (torch)", t)) for t in meta["threads"]}
    pre = []
    for r in rows:
        if r["contender"].startswith("lowc cpu-lut") and fp32.get(r["threads"]):
            f = fp32[r["threads"]]["prefill"]
            pre.append(f"| {r['contender']} | {r['threads']} | {r['prefill']:.1f} / {f:.1f} = {r['prefill'] / f:.2f}x | "
                       f"{'met' if r['prefill'] >= f else 'missed'} |")
    if pre:
        lines += [f"## Goal: prefill {prefill} >= ref-fp32", "", "| contender | threads | tokens/s lowc / ref-fp32 | goal |", "|---|---:|---|---|",
                  *pre, ""]
    bd = [r for r in rows if r.get("breakdown")]
    if bd:
        lines += [f"## Where a decode step goes (torch.profiler, ctx {contexts[0]}, ms per step)", "",
                  "| contender | threads | step | LUT C kernels | float matmul | other ATen ops | Python/rest |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in bd:
            b = r["breakdown"]
            lines.append(f"| {r['contender']} | {r['threads']} | {b['step_ms_profiled']:.1f} | {b['lut_kernels_ms']:.1f} | "
                         f"{b['float_matmul_ms']:.1f} | {b['other_aten_ms']:.1f} | {b['python_ms']:.1f} |")
        lines.append("")
    with open(out + ".md", "w") as f:
        f.write("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="contexts 1 and 128, 6 steps, 1 thread")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--contexts", type=int, nargs="+", default=[1, 512])
    ap.add_argument("--prefill", type=int, default=128)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--work", default="/tmp/lowc_e2e_cpu", help="model, artifacts and GGUF files")
    ap.add_argument("--reuse", action="store_true", help="reuse artifacts and GGUF files already in --work")
    ap.add_argument("--no-llama-cpp", action="store_true")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "e2e_cpu"))
    args = ap.parse_args()
    if args.quick:
        args.contexts, args.steps, args.threads = [1, 128], 6, [1]
    os.makedirs(args.work, exist_ok=True)
    model = make_model(os.path.join(args.work, "llama-2048"))
    arts = compile_all(model, args.work, args.reuse)
    ggufs = {}
    llama_version = None
    if not args.no_llama_cpp:
        try:
            import llama_cpp

            llama_version = llama_cpp.__version__
        except ImportError as e:
            log(f"llama.cpp rows skipped: {e}")
        else:
            ggufs = make_gguf(args.work, arts["lowc ref-fp32 (torch)"], args.reuse)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False, capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
                       + (f", llama-cpp-python {llama_version}" if llama_version else ""),
            "command": "python benchmarks/e2e_cpu.py " + " ".join(sys.argv[1:]), "commit": commit,
            "model": "random-weight HF Llama, " + ", ".join(f"{k}={v}" for k, v in CONFIG.items()),
            "threads": args.threads, "contexts": args.contexts, "prefill": args.prefill, "steps": args.steps}
    rows = []
    for t in args.threads:
        jobs = {**{label: (time_lowc, label, art) for label, art in arts.items()},
                **{label: (time_llama, label, path) for label, path in ggufs.items()}}
        jobs = [jobs[k] for k in ORDER if k in jobs]  # the goal pairs first: a partial run is still useful
        for fn, label, where in jobs:
            rows.append(fn(label, where, t, args.contexts, args.prefill, args.steps))
            meta["load_average"] = os.getloadavg()[0]
            write(args.out, meta, rows, args.contexts, args.prefill)  # after every row: a partial run is kept
    log(f"wrote {args.out}.md and .json")


if __name__ == "__main__":
    main()
