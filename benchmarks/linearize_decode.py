"""Memory and speed of recurrent decoding: a linearized model vs the same model with softmax attention.

    OMP_NUM_THREADS=1 python benchmarks/linearize_decode.py [--model models/tiny-llama-wt2] [--new-tokens 1024]

Linearizes the model (LoLCATs hybrid, window 64, step 1 on 16 x 256 tokens of wikitext-2 valid; the
quality is not the point here, see linearize_quality.py), then greedily generates ``--new-tokens``
tokens after a 32-token wikitext-2 test prompt with :class:`lowc.runtime.RecurrentDecoder`,
and does the same for the float model (every layer softmax, KV caches, same decoder). At checkpoints
it records the decode state bytes (recurrent state + KV caches), the process RSS and the time per
token over the last interval. First it checks that the recurrent decode gives the same tokens as
re-running the full sequence (64 tokens). Writes benchmarks/results/linearize_decode.{md,json}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import torch

from lowc import data

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL = os.path.normpath(os.path.join(HERE, "..", "models", "tiny-llama-wt2"))


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run(program, prompt, n_new, checkpoints) -> list[dict]:
    from lowc.runtime import RecurrentDecoder

    dec = RecurrentDecoder(program)
    rows = []
    t0 = time.perf_counter()
    logits = dec.prefill(prompt)
    last_t, last_i = time.perf_counter(), 0
    rows.append({"tokens": 0, "state_bytes": dec.state_bytes(), "kv_bytes": dec.kv_cache_bytes(), "rss_mib": rss_mib(),
                 "ms_per_token": (last_t - t0) * 1e3 / prompt.shape[1]})
    for i in range(1, n_new + 1):
        logits = dec.step(logits.argmax(-1))
        if i in checkpoints:
            now = time.perf_counter()
            rows.append({"tokens": i, "state_bytes": dec.state_bytes(), "kv_bytes": dec.kv_cache_bytes(),
                         "rss_mib": rss_mib(), "ms_per_token": (now - last_t) * 1e3 / (i - last_i)})
            last_t, last_i = now, i
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--new-tokens", type=int, default=1024)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "linearize_decode"))
    args = ap.parse_args()
    import lowc
    from lowc.api import tokenizer_of
    from lowc.passes.base import PassContext
    from lowc.passes.calibration import load_calibration
    from lowc.passes.linearize.linearize import Linearize
    from lowc.passes.pipeline import run_passes
    from lowc.runtime import GenerationConfig, RecomputeDecoder, RecurrentDecoder, generate

    torch.manual_seed(0)
    base = lowc.trace(args.model)
    tok = tokenizer_of(base)
    lin = base.clone()
    calib = load_calibration("wikitext-2-valid", tok, 16, 256, seed=0)
    run_passes(lin, [Linearize(method="lolcats", lora_rank=0, epochs=1)], PassContext(calib=calib, progress=False))
    with open(data.wikitext2("test"), encoding="utf-8") as f:
        prompt = tok(f.read(4000), add_special_tokens=False, return_tensors="pt")["input_ids"][:, :32]
    greedy64 = GenerationConfig(max_new_tokens=64)
    same = bool(torch.equal(generate(RecurrentDecoder(lin), prompt, greedy64), generate(RecomputeDecoder(lin), prompt, greedy64)))
    checkpoints = {c for c in (1, 64, 128, 256, 512, 1024, 2048, 4096) if c <= args.new_tokens} | {args.new_tokens}
    results = {}
    for name, prog in (("linearized (LoLCATs hybrid, window 64)", lin), ("softmax (float model, KV cache)", base)):
        results[name] = run(prog, prompt, args.new_tokens, checkpoints)
        print(name, json.dumps(results[name]), flush=True)
    info = {"command": "python " + " ".join(sys.argv),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads",
            "load": os.getloadavg(), "model": args.model, "prompt_tokens": int(prompt.shape[1]),
            "recurrent_equals_parallel_64": same, "runs": results}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(info, f, indent=2)
    lines = ["# Recurrent decode: memory per generated token", "", f"Command: `{info['command']}`  ",
             f"Machine: {info['machine']}; date {info['date']}; load {tuple(round(x, 2) for x in info['load'])}", "",
             f"Model `{args.model}`, prompt {info['prompt_tokens']} tokens, greedy. Recurrent decode = parallel "
             f"re-run for 64 tokens: **{same}**.", "",
             "| decoder | generated tokens | state + KV bytes | process RSS MiB | ms/token (last interval) |",
             "|---|---:|---:|---:|---:|"]
    for name, rows in results.items():
        for r in rows:
            lines.append(f"| {name} | {r['tokens']} | {r['state_bytes'] + r['kv_bytes']:,} | {r['rss_mib']:.0f} | {r['ms_per_token']:.1f} |")
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
