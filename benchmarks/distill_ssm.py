"""Quality of MOHAWK SSM distillation (``distill_ssm``) beside LoLCATs linearization, in one run.

    nice python benchmarks/distill_ssm.py [--model /work/models/tiny-llama-wt2] [--calib-samples 32]
        [--seq-len 256] [--eval-len 256] [--eval-windows 16] [--decode-prompt 256]

Every row is trained on the same calibration budget (wikitext-2 *valid*, ``--calib-samples`` windows of
``--seq-len`` tokens, seed 0) and evaluated on wikitext-2 *test*: perplexity over non-overlapping
``--eval-len`` windows, KL(float || row) and top-1 agreement of the next-token distributions on the
first 8 windows. Rows: float; LoLCATs (the ``linearize`` pass, step 1 + LoRA, its defaults) as a hybrid
(sliding window 64 + linear) and as pure linear attention (window 0); the SSM students after stage 1,
stages 1+2 and 1+2+3 (all layers), and a hybrid distilling half of the layers (0 and 2) with all
stages. Decode: the recurrent decoder's state after a ``--decode-prompt``-token prompt and 16 new
tokens (SSD state, constant) against the KV cache of the float model, and recurrent == parallel tokens.

Writes benchmarks/results/distill_ssm.{md,json} (machine, date, command, training times).
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
MODEL = "/work/models/tiny-llama-wt2"

ROWS = [
    ("float", None),
    ("SSM, stage 1", "distill_ssm{stages=[1]}"),
    ("SSM, stages 1+2", "distill_ssm{stages=[1,2]}"),
    ("SSM, stages 1+2+3", "distill_ssm"),
    ("SSM hybrid (layers 0, 2; 1, 3 softmax), stages 1+2+3", "distill_ssm{layers=[0,2]}"),
    ("LoLCATs hybrid (window 64) + LoRA", "linearize{method=lolcats}"),
    ("LoLCATs linear (window 0) + LoRA", "linearize{method=lolcats,window=0}"),
]


def _run(program, spelling, calib, seed):
    from lowc.passes.base import PassContext
    from lowc.passes.options import parse_pass
    from lowc.passes.pipeline import run_passes

    p = program.clone()
    ctx = PassContext(calib=calib, seed=seed, progress=False)
    t0 = time.perf_counter()
    rec = run_passes(p, [parse_pass(spelling)], ctx)[0]
    return p, rec.result.stats, time.perf_counter() - t0


def _decode(p, prompt):
    from lowc.runtime import GenerationConfig, RecomputeDecoder, RecurrentDecoder, generate

    dec = RecurrentDecoder(p)
    sizes = []
    out = generate(dec, prompt, GenerationConfig(max_new_tokens=16),
                   on_token=lambda i, d: sizes.append((d.state_bytes(), d.kv_cache_bytes())))
    short = prompt[:, :32]
    same = torch.equal(generate(RecurrentDecoder(p), short, GenerationConfig(max_new_tokens=16)),
                       generate(RecomputeDecoder(p), short, GenerationConfig(max_new_tokens=16)))
    return {"state_bytes": sizes[-1][0], "kv_cache_bytes_first": sizes[0][1], "kv_cache_bytes_last": sizes[-1][1],
            "state_constant": len({s for s, _ in sizes}) == 1, "tokens": int(out.shape[1]), "recurrent_eq_parallel": same}


def _stage(stats, key):
    s = stats.get(key)
    return None if s is None else (s["before"], s["after"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=MODEL, help="causal LM (HF directory or preset)")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-len", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--decode-prompt", type=int, default=256)
    ap.add_argument("--rows", default="", help="comma-separated row numbers to run (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "distill_ssm"))
    args = ap.parse_args()
    import lowc
    from lowc import evaluate as ev
    from lowc.api import tokenizer_of
    from lowc.passes.calibration import load_calibration

    torch.manual_seed(args.seed)
    info = {
        "command": "python " + " ".join(sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "load_start": os.getloadavg(),
    }
    program = lowc.trace(args.model)
    tok = tokenizer_of(program)
    calib = load_calibration("wikitext-2-valid", tok, args.calib_samples, args.seq_len, seed=args.seed)
    with open(data.wikitext2("test"), encoding="utf-8") as f:
        windows = ev.token_windows(tok, f.read(), args.eval_len, args.eval_windows)
    batches = [{"input_ids": w.unsqueeze(0), "attention_mask": torch.ones(1, w.shape[0], dtype=torch.int64)} for w in windows[:8]]
    prompt = torch.cat(list(windows))[None, :args.decode_prompt]
    float_fn = lambda **kw: program.call(**kw)  # noqa: E731
    chosen = {int(x) for x in args.rows.split(",") if x.strip()} or set(range(len(ROWS)))
    rows = []
    for i, (label, spelling) in enumerate(ROWS):
        if i not in chosen:
            continue
        p, stats, secs = (program, {}, 0.0) if spelling is None else _run(program, spelling, calib, args.seed)
        fn = p.call
        row = {"method": label, "pass": spelling or "-", "ppl": ev.perplexity(fn, windows, batch_size=4),
               "train_s": round(secs, 1)}
        if spelling is not None:
            c = ev.compare(float_fn, fn, batches, "causal-lm")
            row.update({"kl": c.kl, "top1": c.top1})
            for k in ("stage1", "stage2", "stage3"):
                if _stage(stats, k):
                    row[k] = _stage(stats, k)
        if spelling is None or spelling.startswith("distill_ssm"):
            row["decode"] = _decode(p, prompt)
        rows.append(row)
        print(json.dumps(row), flush=True)
        text = _write(args, info, program, calib, windows, rows)  # after every row: a stopped run keeps its rows
    print(text)


def _write(args, info, program, calib, windows, rows) -> str:
    cfg = program.info.hf_config or {}
    info.update({"rows": rows, "model": args.model, "calibration": calib.describe(), "eval_tokens": int(windows.numel()),
                 "config": {k: cfg.get(k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                     "num_key_value_heads", "head_dim", "vocab_size")},
                 "load_end": os.getloadavg()})
    f = next((r["ppl"] for r in rows if r["pass"] == "-"), None)
    lines = ["# SSM distillation (MOHAWK) vs linearization (LoLCATs)", "", f"Command: `{info['command']}`  ",
             f"Machine: {info['machine']}; date {info['date']}; load at start "
             f"{tuple(round(x, 2) for x in info['load_start'])}, at end {tuple(round(x, 2) for x in info['load_end'])}", "",
             f"Model: `{args.model}` {info['config']}. Training (every row): wikitext-2 valid, "
             f"{calib.describe()['samples']} x {args.seq_len} tokens ({calib.describe()['tokens']} tokens), seed {args.seed}. "
             f"Evaluation: wikitext-2 test, {info['eval_tokens']} tokens in windows of {args.eval_len}; KL and top-1 vs "
             f"float on the first {min(8, len(windows))} windows. Stage losses: stage 1 ‖T − softmax‖_F per head, stage 2 block-output MSE, "
             "stage 3 KL on the calibration samples (mean over layers / blocks, before → after).", "",
             "| method | ppl | Δppl vs float | KL (nats/token) | top-1 | stage 1 | stage 2 | stage 3 | train s |",
             "|---|---:|---:|---:|---:|---|---|---|---:|"]

    def st(r, k):
        v = r.get(k)
        return "–" if v is None else f"{v[0]:.3g} → {v[1]:.3g}"

    for r in rows:
        d = "–" if f is None else f"{r['ppl'] - f:+.2f}"
        kl = "–" if r.get("kl") is None else f"{r['kl']:.4f}"
        top1 = "–" if r.get("top1") is None else f"{r['top1']:.3f}"
        lines.append(f"| {r['method']} | {r['ppl']:.2f} | {d} | {kl} | {top1} | {st(r, 'stage1')} | {st(r, 'stage2')} | "
                     f"{st(r, 'stage3')} | {r['train_s']:.0f} |")
    lines += ["", f"Decode (recurrent strategy, batch 1, {args.decode_prompt}-token prompt + 16 tokens): bytes held "
              "after the last token.", "", "| method | SSD state (constant) | KV cache (grows) | recurrent == parallel |",
              "|---|---:|---:|---|"]
    for r in rows:
        dd = r.get("decode")
        if dd:
            lines.append(f"| {r['method']} | {dd['state_bytes']:,} ({'constant' if dd['state_constant'] else 'GROWS'}) | "
                         f"{dd['kv_cache_bytes_first']:,} → {dd['kv_cache_bytes_last']:,} | {dd['recurrent_eq_parallel']} |")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as fh:
        json.dump(info, fh, indent=2)
    with open(args.out + ".md", "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
