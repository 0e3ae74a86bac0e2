"""EvoPress vs uniform vs the error-sum DP heuristic on the trained tiny Llama (not run in CI).

For each budget (average stored bits per weight over the searched layers, scales and zeros
included): ``lowc.search`` (one shared level database, GPTQ g128 on wikitext-2 valid, same
calibration for every row), then each assignment (EvoPress, the DP heuristic, uniform at the budget,
and uniform one level up, which is over the budget, for reference) is compiled with
``lowc.compile(..., recipe=...)`` for ``--target`` (GPTQ with per-layer bits, sequential, on the same
calibration) and measured on wikitext-2 test: perplexity and KL(float ‖ compressed) per token
(``lowc.evaluate``), the artifact's size, and for EvoPress tokens/s with ``lowc bench``. The search
wall time and the number of scored assignments are reported per budget.

    nice python benchmarks/search.py                        # budgets 3.0 and 2.5
    nice python benchmarks/search.py --budgets 3.0 --generations 5

Writes ``benchmarks/results/search.md`` and ``search.json`` (machine, date, command).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")


def measure(model: str, target: str, recipe_path: str, args, windows, float_fn, out_dir: str) -> dict:
    import torch

    import lowc
    from lowc import evaluate as ev

    t0 = time.perf_counter()
    calib = "wikitext-2-valid" if args.method == "gptq" else None
    cm = lowc.compile(model, target=target, recipe=recipe_path, calib=calib, calib_samples=args.calib_samples,
                      seq_len=args.seq_len, progress=False)
    compile_s = time.perf_counter() - t0
    ppl = ev.perplexity(cm, windows, batch_size=8)
    kl_sum, n = 0.0, 0
    with torch.inference_mode():
        for i in range(0, len(windows), 8):
            ids = windows[i:i + 8]
            p = torch.log_softmax(ev.main_tensor(float_fn(input_ids=ids)).float(), -1)
            q = torch.log_softmax(ev.main_tensor(cm(input_ids=ids, attention_mask=torch.ones_like(ids))).float(), -1)
            kl_sum += float((p.exp() * (p - q)).sum())
            n += ids.numel()
    cm.save(out_dir, force=True)
    layers = [r for r in cm.layers() if r["scheme"] and r["layer"] != "lm_head"]
    bits = sum(r["bytes"] * 8 for r in layers) / sum(r["out_features"] * r["in_features"] for r in layers)
    return {"ppl": ppl, "kl": kl_sum / n, "size_bytes": cm.size()["bytes"], "stored_bits_per_weight": bits,
            "compile_s": round(compile_s, 1)}


def variant(recipe, bits: dict[str, int], path: str) -> str:
    from lowc.passes.search.recipe import Recipe

    layers = {k: {"bits": bits[k], "group_size": v["group_size"]} for k, v in recipe.layers.items()}
    Recipe(**{**recipe.__dict__, "layers": layers}).save(path)
    return path


def bench_tokens(artifact: str) -> dict:
    exe = os.path.join(os.path.dirname(sys.executable), "lowc")
    r = subprocess.run([exe, "bench", artifact, "--json", "--repeat", "5", "--seq-len", "1", "--seq-len", "128"],
                       capture_output=True, text=True, check=True)
    rows = json.loads(r.stdout)["rows"]
    return {f"seq{x['seq_len']}": {"lowc_tok_s": round(x["lowc_tokens_per_s"]), "float_tok_s":
            round(x["seq_len"] * x["batch"] / (x["float_ms"] / 1e3))} for x in rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama", default="/work/models/tiny-llama-wt2")
    ap.add_argument("--budgets", default="3.0,2.5")
    ap.add_argument("--target", default="cpu-lut-w4")
    ap.add_argument("--method", default="gptq", choices=("gptq", "rtn"))
    ap.add_argument("--generations", type=int, default=20)
    ap.add_argument("--offspring", type=int, default=16)
    ap.add_argument("--schedule", default="4:256,2:1024,1:4096")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--eval-seq-len", type=int, default=256)
    ap.add_argument("--db", default=os.path.join(tempfile.gettempdir(), "lowc-search-bench-db"))
    ap.add_argument("--no-bench", action="store_true", help="skip lowc bench (tokens/s)")
    args = ap.parse_args()

    import lowc
    from lowc import data
    from lowc import evaluate as ev
    from lowc.frontend.trace import load_source

    float_model, tok, _, _ = load_source(args.llama)
    windows = ev.token_windows(tok, data.read("wikitext-2-test", "text", RuntimeError), args.eval_seq_len, args.eval_windows)
    float_ppl = ev.perplexity(float_model, windows, batch_size=8)
    work = tempfile.mkdtemp(prefix="lowc-search-bench-")
    rows, runs, measured = [], [], {}
    for budget in (float(b) for b in args.budgets.split(",")):
        out = os.path.join(work, f"recipe-{budget}.yaml")
        t0 = time.perf_counter()
        r = lowc.search(args.llama, target=args.target, budget=budget, method=args.method, generations=args.generations,
                        offspring=args.offspring, schedule=args.schedule, calib_samples=args.calib_samples,
                        seq_len=args.seq_len, db=args.db, output=out, progress=True)
        wall = time.perf_counter() - t0
        runs.append({"budget": budget, "wall_s": round(wall, 1), "phases_s": r.search["wall_s"],
                     "evaluations": r.search["evaluations"], "history": r.search["history"],
                     "recipe": r.to_json()})
        levels = list(r.levels)
        u = r.baselines["uniform"]["bits"]
        cands = [("EvoPress", r.bits(), r.achieved_bits, r.fitness["evopress"]),
                 ("error-sum DP", r.baselines["dp"]["layers"], r.baselines["dp"]["achieved_bits"], r.baselines["dp"]["fitness"]),
                 (f"uniform {u}-bit", dict.fromkeys(r.layers, u), r.baselines["uniform"]["achieved_bits"],
                  r.baselines["uniform"]["fitness"])]
        if levels.index(u) + 1 < len(levels):
            up = levels[levels.index(u) + 1]
            cands.append((f"uniform {up}-bit (over budget)", dict.fromkeys(r.layers, up), None, None))
        for name, bits, achieved, fit in cands:
            key = tuple(sorted(bits.items()))
            if key not in measured:  # the uniform rows are the same at every budget: measured once
                path = variant(r, bits, os.path.join(work, f"{name.split()[0]}-{budget}.yaml"))
                art = os.path.join(work, f"art-{name.split()[0]}-{budget}")
                measured[key] = (measure(args.llama, args.target, path, args, windows, float_model, art), art)
            m, art = measured[key]
            row = {"budget": budget, "assignment": name, "search_bits": achieved, "search_kl": fit, **m}
            if name == "EvoPress" and not args.no_bench:
                row["bench"] = bench_tokens(art)
            rows.append(row)
            print(json.dumps(row), flush=True)
            write(args, float_ppl, rows, runs)
    write(args, float_ppl, rows, runs)


def write(args, float_ppl: float, rows: list, runs: list) -> None:
    """Write the results so far (after every row: a long run leaves what it measured)."""
    import torch

    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                          "torch": torch.__version__, "threads": torch.get_num_threads()},
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": "python benchmarks/search.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
              "settings": {k: v for k, v in vars(args).items() if k != "db"}, "float_ppl": float_ppl,
              "rows": rows, "runs": runs}
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "search.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(RESULTS, "search.md"), "w") as f:
        f.write(render(result))


def render(res: dict) -> str:
    s = res["settings"]
    lines = ["# Search (EvoPress) on the trained tiny Llama", "",
             f"Machine: {res['machine']['platform']}, {res['machine']['cpus']} CPUs (shared), torch {res['machine']['torch']}, "
             f"{res['machine']['threads']} threads. Date {res['date']}. Command: `{res['command']}`.", "",
             f"Search: target {s['target']}, {s['method'].upper()} g128 levels from the level database, calibration {s['calib_samples']} x "
             f"{s['seq_len']} tokens of wikitext-2 valid (the same for the database, the fitness and every compile), "
             f"{s['generations']} generations of {s['offspring']} offspring, selection {s['schedule']} (survivors:tokens); "
             f"the search KL is on the last stage's tokens. Evaluation: wikitext-2 test, {s['eval_windows']} windows of "
             f"{s['eval_seq_len']} tokens; each assignment compiled with `lowc.compile(..., recipe=...)` ({s['method'].upper()} with "
             f"per-layer bits) for {s['target']}. Float perplexity {res['float_ppl']:.2f}.", "",
             "| budget | assignment | bits/weight (search) | bits/weight (artifact) | search KL | wikitext-2 ppl | KL to float | size (MB) |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        sk = "" if r["search_kl"] is None else f"{r['search_kl']:.4f}"
        sb = "" if r["search_bits"] is None else f"{r['search_bits']:.3f}"
        lines.append(f"| {r['budget']} | {r['assignment']} | {sb} | {r['stored_bits_per_weight']:.3f} | {sk} | {r['ppl']:.2f} | "
                     f"{r['kl']:.4f} | {r['size_bytes'] / 1e6:.2f} |")
    lines += ["", "The search's bits/weight count codes + fp16 scale + zero per group of 128 (the budget's unit); the "
              "artifact's are the bytes the cpu-lut layout stores for the same layers (its scales are float32).", "",
              "| budget | search wall (s): database / baselines / evopress | scored assignments | EvoPress tokens/s "
              "(cpu-lut, seq 1 / 128) |", "|---:|---|---:|---|"]
    for run in res["runs"]:
        ph = run["phases_s"]
        evo = next((r for r in res["rows"] if r["budget"] == run["budget"] and r["assignment"] == "EvoPress"), {})
        b = evo.get("bench", {})
        tps = " / ".join(f"{b[k]['lowc_tok_s']} (float {b[k]['float_tok_s']})" for k in ("seq1", "seq128") if k in b)
        lines.append(f"| {run['budget']} | {run['wall_s']} total: {ph['database']} / {ph['baselines']} / {ph['evopress']} | "
                     f"{run['evaluations']} | {tps} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
