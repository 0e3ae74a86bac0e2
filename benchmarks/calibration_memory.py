"""Peak memory of calibration: lowc's block-wise driver vs capturing every block's activations at once.

Two Llama-style models of the same width (transformers ``LlamaConfig``, random init) with L and 2L
layers are calibrated on the same token samples. The calibration "method" is the part every
Hessian-based method (GPTQ, ...) shares: accumulate ``H = X^T X`` (fp32) for every linear of every
block.

* ``blockwise``: ``lowc.trace`` the model, then :class:`lowc.passes.blockwise.BlockwiseRunner`
  (sequential propagation); a hook accumulates the Hessians of the current block, which are freed
  before the next block (as GPTQ frees them once the block is quantized).
* ``naive``: forward hooks on every ``nn.Linear`` of the eager model keep each linear's input for
  every sample (inputs shared by q/k/v or gate/up are stored once), the whole model runs over all
  samples, then the Hessians of all linears are computed from the stored activations.

* real passes (``gptq``, and ``affinequant`` / ``flatquant`` when they are registered): ``lowc.trace``
  the model, then run the pass itself (``lowc.passes.pipeline.run_passes``) with the ``ref-w4a16``
  scheme on the same samples: the whole method (block-wise calibration, Hessians or training, the
  rewrite) as a user runs it. ``--pass-spelling affinequant='affinequant{epochs=2}'`` shortens a
  learned method (its memory does not depend on the number of epochs).

Each (method, depth) runs in a fresh subprocess. After the model is loaded (and, for blockwise,
traced) the worker records VmRSS (the baseline), resets the peak-RSS counter (``echo 5 >
/proc/self/clear_refs``), calibrates, and reads VmHWM: the raw peak RSS of the calibration phase.
The increment is raw peak - baseline. glibc's malloc runs with its default settings (what users
get); freed memory that malloc keeps is counted, as it counts for a user's process.

    python benchmarks/calibration_memory.py            # writes benchmarks/results/calibration_memory.{md,json}
    python benchmarks/calibration_memory.py --methods gptq,affinequant   # adds/replaces those rows only

Rows of methods not run this time are kept from the existing results file when its configuration is
the same, so the table can be filled in parts.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import shlex
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def build_model(args, layers: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
                      max_position_embeddings=args.seq_len, tie_word_embeddings=False, use_cache=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def samples(args):
    import torch

    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, args.vocab, (1, args.seq_len), generator=g) for _ in range(args.samples)]


def _accumulate(hessians: dict, key, x) -> None:
    import torch

    x = x.reshape(-1, x.shape[-1]).float()
    h = hessians.get(key)
    if h is None:
        h = hessians[key] = torch.zeros(x.shape[-1], x.shape[-1])
    h.addmm_(x.t(), x)


def run_blockwise(args, layers: int) -> dict:
    import torch

    import lowc
    from lowc.passes.blockwise import BlockwiseRunner

    data = samples(args)
    program = lowc.trace(build_model(args, layers))
    gc.collect()
    baseline = _status_kb("VmRSS")
    _reset_peak()
    t0 = time.perf_counter()
    runner = BlockwiseRunner(program, data, progress=False, desc="blockwise")
    n_linears = 0
    for block in runner:
        hessians: dict = {}
        block.run(lambda name, x, y: _accumulate(hessians, name, x))
        n_linears += len(hessians)
        del hessians  # a method would quantize the block's linears here
    runner.close()
    seconds = time.perf_counter() - t0
    assert n_linears == 7 * layers, n_linears
    return {"baseline_kb": baseline, "peak_kb": _status_kb("VmHWM"), "seconds": seconds, "linears": n_linears,
            "torch": torch.__version__}


def run_naive(args, layers: int) -> dict:
    import torch

    data = samples(args)
    model = build_model(args, layers)
    gc.collect()
    baseline = _status_kb("VmRSS")
    _reset_peak()
    t0 = time.perf_counter()
    captured: dict[str, list] = {}
    handles = [mod.register_forward_hook(lambda m, a, out, _n=name: captured.setdefault(_n, []).append(a[0].detach()))
               for name, mod in model.model.layers.named_modules() if isinstance(mod, torch.nn.Linear)]
    with torch.no_grad():
        for s in data:
            model(input_ids=s, attention_mask=torch.ones_like(s))
    for h in handles:
        h.remove()
    hessians: dict = {}
    for name, xs in captured.items():
        for x in xs:
            _accumulate(hessians, name, x)
    n_linears = len(hessians)
    del captured, hessians
    seconds = time.perf_counter() - t0
    assert n_linears == 7 * layers, n_linears
    return {"baseline_kb": baseline, "peak_kb": _status_kb("VmHWM"), "seconds": seconds, "linears": n_linears,
            "torch": torch.__version__}


def run_pass(args, layers: int) -> dict:
    import torch

    import lowc
    from lowc.backends.registry import get_target
    from lowc.passes.base import PassContext
    from lowc.passes.calibration import CalibrationData
    from lowc.passes.options import parse_pass
    from lowc.passes.pipeline import run_passes

    p = parse_pass(_spellings(args).get(args.worker, args.worker))
    data = CalibrationData(samples(args), source="random tokens")
    program = lowc.trace(build_model(args, layers))
    target = get_target("ref-w4a16")
    ctx = PassContext(target=target, scheme=target.scheme, calib=data, progress=False, seed=0)
    gc.collect()
    baseline = _status_kb("VmRSS")
    _reset_peak()
    t0 = time.perf_counter()
    records = run_passes(program, [p], ctx, verify=False)
    seconds = time.perf_counter() - t0
    stats = records[0].result.stats
    n_linears = sum(1 for n in program.graph.nodes if n.op == "call_function" and getattr(n.target, "namespace", "") == "lowc")
    return {"baseline_kb": baseline, "peak_kb": _status_kb("VmHWM"), "seconds": seconds, "linears": n_linears,
            "torch": torch.__version__, "pass": p.spelling(),
            "stats": {k: v for k, v in stats.items() if isinstance(v, (int, float, str, bool))}}


def _spellings(args) -> dict[str, str]:
    out = {}
    for item in args.pass_spelling or ():
        name, _, spelling = item.partition("=")
        out[name.strip()] = spelling.strip() or name.strip()
    return out


def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    fn = {"blockwise": run_blockwise, "naive": run_naive}.get(args.worker, run_pass)
    res = fn(args, args.layers)
    print("RESULT " + json.dumps(res))


def spawn(args, method: str, layers: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", method, "--layers", str(layers)] + _size_args(args)
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise SystemExit(f"worker {method} L={layers} failed:\n{p.stderr[-3000:]}")
    line = next(l for l in p.stdout.splitlines() if l.startswith("RESULT "))
    res = json.loads(line[len("RESULT "):])
    res.update(method=method, layers=layers, wall_seconds=round(time.perf_counter() - t0, 1),
               increment_kb=res["peak_kb"] - res["baseline_kb"])
    print(f"{method:9s} L={layers:2d}: baseline {res['baseline_kb'] / 1024:7.1f} MiB  peak {res['peak_kb'] / 1024:7.1f} MiB  "
          f"increment {res['increment_kb'] / 1024:7.1f} MiB  ({res['seconds']:.1f} s)", flush=True)
    return res


def _size_args(args) -> list[str]:
    out = ["--threads", str(args.threads), "--hidden", str(args.hidden), "--intermediate", str(args.intermediate), "--heads", str(args.heads),
           "--vocab", str(args.vocab), "--samples", str(args.samples), "--seq-len", str(args.seq_len)]
    for item in args.pass_spelling or ():
        out += ["--pass-spelling", item]
    return out


def _mib(kb: int) -> str:
    return f"{kb / 1024:.1f}"


CORE = ("blockwise", "naive")
PASS_METHODS = ("gptq", "affinequant", "flatquant")


def _config(args) -> dict:
    return {k: getattr(args, k) for k in ("hidden", "intermediate", "heads", "vocab", "samples", "seq_len", "base_layers", "threads")}


def _previous(args) -> list[dict]:
    """Rows of the existing results file, if it was measured with the same configuration."""
    path = os.path.join(args.results, "calibration_memory.json")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        old = json.load(f)
    if old.get("config") != _config(args):
        print("existing results have another configuration: their rows are not kept", flush=True)
        return []
    for r in old.get("rows", []):
        r.setdefault("command", old.get("command"))
        r.setdefault("date", old.get("machine", {}).get("date"))
    return old.get("rows", [])


def report(args, rows: list[dict], command: str) -> None:
    by = {(r["method"], r["layers"]): r for r in rows}
    small, big = args.base_layers, 2 * args.base_layers
    methods = [m for m in (*CORE, *PASS_METHODS) if (m, small) in by and (m, big) in by]
    methods += sorted({r["method"] for r in rows} - set(methods) - {m for m in (*CORE, *PASS_METHODS)})
    ratios = {}
    for m in methods:
        if (m, small) in by and (m, big) in by:
            ratios[m] = {"peak": by[m, big]["peak_kb"] / by[m, small]["peak_kb"],
                         "increment": by[m, big]["increment_kb"] / by[m, small]["increment_kb"]}
    machine = {"uname_m": platform.machine(), "nproc": os.cpu_count(), "python": platform.python_version(),
               "torch": rows[0]["torch"], "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    act_mb = args.samples * args.seq_len * args.hidden * 4 / 2**20
    lowc_methods = [m for m in ratios if m != "naive"]
    goal = {m: ratios[m]["increment"] <= 1.3 and ratios[m]["peak"] <= 1.3 for m in lowc_methods}
    goal_met = bool(goal) and all(goal.values())
    dates = sorted({r["date"] for r in rows if r.get("date")})
    commands = sorted({r["command"] for r in rows if r.get("command")})
    data = {"command": command, "commands": commands, "machine": machine, "config": _config(args), "rows": rows,
            "ratios_2x_layers": ratios, "goal": "lowc (block-wise driver and every pass): 2x layers <= 1.3x peak calibration memory",
            "goal_per_method": goal, "goal_met": goal_met}
    os.makedirs(args.results, exist_ok=True)
    with open(os.path.join(args.results, "calibration_memory.json"), "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    lines = [
        "# Calibration memory: block-wise driver and real passes vs capture-everything",
        "",
        "Commands: " + "; ".join(f"`{c}`" for c in commands),
        "",
        f"Machine: `{machine['uname_m']}`, {machine['nproc']} CPUs, Python {machine['python']}, torch {machine['torch']}; "
        f"rows measured {dates[0] if dates else '?'} … {dates[-1] if dates else '?'} (UTC).",
        "",
        f"Models: Llama (random init), hidden {args.hidden}, intermediate {args.intermediate}, {args.heads} heads, "
        f"vocab {args.vocab}, {small} vs {big} layers, fp32, {args.threads} torch thread(s) per worker. Calibration: {args.samples} samples x {args.seq_len} tokens "
        f"(one hidden state over all samples = {act_mb:.0f} MiB). Work: `blockwise`/`naive`: X^T X (fp32) for each of the 7 linears of every "
        f"block; pass rows: the pass itself (`ref-w4a16` scheme: 4 bits, groups of 128), block-wise calibration and rewrite included. "
        f"Each row is a fresh process; baseline = RSS after loading (and tracing) the model; raw peak = VmHWM "
        f"during calibration (counter reset after loading); increment = raw peak - baseline.",
        "",
        "| method | layers | baseline MiB | raw peak MiB | increment MiB | calibration s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for m in methods:
        for L in (small, big):
            r = by.get((m, L))
            if r is None:
                continue
            label = r.get("pass", m) if m not in CORE else m
            lines.append(f"| {label} | {L} | {_mib(r['baseline_kb'])} | {_mib(r['peak_kb'])} | {_mib(r['increment_kb'])} | {r['seconds']:.1f} |")
    lines += [
        "",
        f"| method | raw peak {big}L / {small}L | increment {big}L / {small}L |",
        "|---|---:|---:|",
    ]
    for m in ratios:
        lines.append(f"| {m} | {ratios[m]['peak']:.2f}x | {ratios[m]['increment']:.2f}x |")
    lines += [
        "",
        "Goal (lowc: block-wise driver and each pass, 2x layers <= 1.3x peak calibration memory): "
        + ", ".join(f"{m} {'met' if ok else 'NOT met'}" for m, ok in goal.items()) + ".",
        "",
        "The block-wise increment is the boundary values between two segments (the residual stream of every "
        "sample, the attention mask, rotary tables), one sample's activations inside a block and one block's "
        "Hessians (or, for a learned method, one block's float targets and training state); none of these grows "
        "with depth. The naive increment holds every linear input of every block for every sample, so it grows "
        "linearly with depth. The raw peak also contains the weights, which do grow with depth in both cases (they "
        "are part of the baseline).",
        "",
    ]
    with open(os.path.join(args.results, "calibration_memory.md"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


def main(argv=None) -> None:
    from lowc.passes.registry import PASSES

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=688)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per worker (1: timings stay stable on a shared machine; memory does not depend on it)")
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--base-layers", type=int, default=4, help="L: models with L and 2L layers are compared")
    ap.add_argument("--methods", default=None,
                    help="comma-separated rows to measure: blockwise, naive, and registered passes among "
                         f"{', '.join(PASS_METHODS)} (default: all of them)")
    ap.add_argument("--pass-spelling", action="append", metavar="NAME=SPELLING",
                    help="how to spell a pass row, e.g. affinequant='affinequant{epochs=2}' (repeatable)")
    ap.add_argument("--results", default=RESULTS, help="where calibration_memory.{md,json} are read and written")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--layers", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return
    known = list(CORE) + [m for m in PASS_METHODS if m in PASSES]
    methods = known if args.methods is None else [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in known]
    if bad:
        raise SystemExit(f"--methods: {', '.join(bad)} not available (choose from {', '.join(known)})")
    command = "python benchmarks/calibration_memory.py" + (" " + shlex.join(sys.argv[1:]) if sys.argv[1:] else "")
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    new = []
    for m in methods:
        for L in (args.base_layers, 2 * args.base_layers):
            r = spawn(args, m, L)
            r.update(command=command, date=date)
            new.append(r)
    keep = [r for r in _previous(args) if r["method"] not in methods]
    report(args, keep + new, command)


if __name__ == "__main__":
    main()
