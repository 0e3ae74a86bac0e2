"""Quality table: quantization methods side by side on a trained causal LM and on the real MiniLM.

Rows (methods): float, RTN, GPTQ, SmoothQuant+RTN, AffineQuant, FlatQuant. Columns (schemes):
W4A16 g128 (``ref-w4a16``), W3A16 g128 (``ref-w4a16`` with ``bits=3`` on the method's weight pass),
W4A4 (``ref-w4a4``: W4 per channel + A4 per token) and W8A8 (``ref-w8a8``). Each cell is
``lowc.compile(model, target, passes=<method>, calib=wikitext-2 valid)``:

* ``llama`` (the tiny Llama trained by ``examples/train_tiny_llama.py``, ``--llama DIR``):
  perplexity on wikitext-2 test (``lowc.evaluate.token_windows`` / ``perplexity``: the first
  ``--eval-windows`` non-overlapping windows of ``--eval-seq-len`` tokens), and KL(float || quantized)
  per token and top-1 agreement on the same windows (``lowc.evaluate.compare``, one window batch at a
  time so memory stays bounded; the means are over all tokens);
* ``minilm`` (the real all-MiniLM-L6-v2): mean cosine of mean-pooled sentence embeddings to the
  float model on the first ``--sentences`` lines of wikitext-2 test with five or more words (as
  ``lowc eval --data test.txt`` picks them).

Every cell runs in a fresh subprocess (``--worker``) and records the compile time (wall seconds of
``lowc.compile``: loading, tracing, calibration, passes) and the compile's peak memory: the process's
VmHWM during ``lowc.compile`` (the counter is reset just before it, after imports and reading the
evaluation text) and its increase over the RSS before it. A method whose pass is not registered is
reported as "not available", never run. Cells are JSON files under ``<results>/quality/`` (the run
is resumable: cells already computed with the same settings are kept; ``--force`` recomputes them),
and every run renders ``<results>/quality.md`` and ``quality.json`` from all cells with the current
settings, so the table can be filled in parts (``--models``, ``--methods``, ``--schemes``)::

    OMP_NUM_THREADS=1 python benchmarks/quality.py                       # the whole table
    OMP_NUM_THREADS=1 python benchmarks/quality.py --methods float,rtn,gptq --schemes w4a16,w3a16
    python benchmarks/quality.py --render-only                           # re-render from the cells

A second table, "Sparsity and quantization at equal size" (``--sparse`` rows, written to
``<results>/quality_sparsity.md`` and ``.json`` so the table above is left as it is), compares GQSA
W4 S50 with pruning baselines followed by W4 and with dense W2/W3 GPTQ, all on ``ref-w4a16`` (the
pruned baselines run as dense weights with zeros on the reference backend), with the bits per weight
each would take stored compressed (:func:`bits_per_weight`). Its rows are self-contained cells
(scheme ``sparse``), float and dense W3 included, so it can be run with another ``--llama`` than the
first table without touching that table's cells::

    OMP_NUM_THREADS=1 python benchmarks/quality.py --llama DIR --methods '' --sparse all
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
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_LLAMA = os.path.join(ROOT, "models", "tiny-llama-wt2")

#: method -> passes (the weight-quantizing pass is the last one; it gets ``bits=`` for W3)
METHODS: dict[str, tuple[str, ...]] = {
    "float": (),
    "rtn": ("rtn",),
    "gptq": ("gptq",),
    "smoothquant-rtn": ("smoothquant", "rtn"),
    "affinequant": ("affinequant",),
    "flatquant": ("flatquant",),
    "flatquant-gptq": ("flatquant{gptq=true}",),
}
METHOD_LABELS = {"float": "float", "rtn": "RTN", "gptq": "GPTQ", "smoothquant-rtn": "SmoothQuant+RTN",
                 "affinequant": "AffineQuant", "flatquant": "FlatQuant",
                 "flatquant-gptq": "FlatQuant (gptq=true)"}
#: scheme -> (target, weight bits override, label)
SCHEMES: dict[str, tuple[str, int | None, str]] = {
    "w4a16": ("ref-w4a16", None, "W4A16 g128"),
    "w3a16": ("ref-w4a16", 3, "W3A16 g128"),
    "w4a4": ("ref-w4a4", None, "W4A4"),
    "w8a8": ("ref-w8a8", None, "W8A8"),
}
MODELS = ("llama", "minilm")
#: the papers' ordering, best first (loss: perplexity / 1 - cosine)
EXPECTED_ORDER = ("flatquant", "affinequant", "gptq", "rtn")

#: the sparsity table's rows: key -> (passes on ``ref-w4a16``, label); cells have scheme ``sparse``
SPARSE: dict[str, tuple[tuple[str, ...], str]] = {
    "gqsa-s50": (("gqsa{sparsity=0.5}",), "GQSA W4 S50 g128 (sparse groups of 16; `gqsa{sparsity=0.5}`)"),
    "gqsa-s50-g16": (("gqsa{sparsity=0.5,group_size=16}",),
                     "GQSA W4 S50 g16 (a scale per kept group of 16: the paper's layout, about 2:4 + W4's size)"),
    "sparsegpt24-gptq": (("prune{method=sparsegpt,pattern=2:4}", "gptq"), "2:4 + W4 g128: SparseGPT, then GPTQ"),
    "sparsegpt24-joint": (("prune{method=sparsegpt,pattern=2:4,bits=4}",), "2:4 + W4 g128: SparseGPT joint prune+quantize"),
    "wanda24-gptq": (("prune{method=wanda,pattern=2:4}", "gptq"), "2:4 + W4 g128: Wanda, then GPTQ"),
    "sparsegpt50-gptq": (("prune{method=sparsegpt}", "gptq"), "unstructured 50% + W4 g128: SparseGPT, then GPTQ"),
    "wanda50-gptq": (("prune{method=wanda}", "gptq"), "unstructured 50% + W4 g128: Wanda, then GPTQ"),
    "gptq-w2": (("gptq{bits=2}",), "dense W2 g128 (GPTQ)"),
    "gptq-w3": (("gptq{bits=3}",), "dense W3 g128 (GPTQ)"),
    "float": ((), "float"),
}
SPARSE_TARGET = "ref-w4a16"


def bits_per_weight(key: str) -> float:
    """Bits per weight of a linear whose input width is a multiple of 128, stored compressed: codes
    of the kept weights, per group of 128 input columns an fp16 scale and a ``bits``-bit zero point
    (asymmetric), and where they are kept: GQSA a 16-bit index per kept group of 16
    (:meth:`Scheme.bits_per_weight`); N:M a 2-bit position per kept weight (2:4's compressed format:
    positions 0..3 of a group of 4); unstructured a 1-bit occupancy bitmap per weight. float: fp16."""
    from lowc.ir.scheme import Scheme

    k = 4096
    if key == "float":
        return 16.0
    if key.startswith("gqsa-s50"):
        return Scheme(4, 16 if key.endswith("g16") else 128, sparsity=0.5, sparse_group=16).bits_per_weight(k)
    if key.startswith("gptq-w"):
        return Scheme(int(key[-1]), 128).bits_per_weight(k)
    dense_w4 = Scheme(4, 128).bits_per_weight(k)
    scales = dense_w4 - 4
    kept = 0.5
    index = kept * 2 if "24" in key else 1.0
    return kept * 4 + scales + index


# ---- plan ------------------------------------------------------------------------------------------
def available(method: str) -> bool:
    from lowc.passes.registry import PASSES

    return all(p.split("{", 1)[0] in PASSES for p in METHODS.get(method, SPARSE.get(method, ((),))[0]))


def target_for(method: str, scheme: str) -> str:
    return SPARSE_TARGET if scheme == "sparse" else SCHEMES[scheme][0]


def passes_for(method: str, scheme: str) -> list[str]:
    if scheme == "sparse":
        return list(SPARSE[method][0])
    bits = SCHEMES[scheme][1]
    out = list(METHODS[method])
    if bits is not None and out:
        last = out[-1]
        out[-1] = f"{last[:-1]},bits={bits}}}" if last.endswith("}") else f"{last}{{bits={bits}}}"
    return out


def cells(models, methods, schemes, sparse=()) -> list[tuple[str, str, str]]:
    out = []
    for model in models:
        out.extend((model, key, "sparse") for key in sparse)
        for method in methods:
            if method == "float":
                out.append((model, "float", "-"))
            else:
                out.extend((model, method, s) for s in schemes)
    return out


def cell_id(model: str, method: str, scheme: str) -> str:
    return f"{model}__{method}__{scheme if scheme != '-' else 'none'}"


def settings(args) -> dict:
    """What a cell's numbers depend on (cells with other settings are stale)."""
    from lowc import data

    # texts by data.identify: a built-in name stays a name, so those cells stay current on any machine
    return {"llama": os.path.abspath(args.llama), "calib": data.identify(args.calib), "eval": data.identify(args.eval),
            "calib_samples": args.calib_samples, "seq_len": args.seq_len, "eval_windows": args.eval_windows,
            "eval_seq_len": args.eval_seq_len, "sentences": args.sentences, "seed": args.seed}


_FINGERPRINTS: dict[str, str | None] = {}


def fingerprint(args, model: str) -> str | None:
    """The trained model's content hash (lowc's source identity): a retrained model makes its cells stale."""
    if model != "llama":
        return None
    path = os.path.abspath(args.llama)
    if path not in _FINGERPRINTS:
        from lowc.frontend.hf import fingerprint_dir

        _FINGERPRINTS[path] = fingerprint_dir(path) if os.path.isfile(os.path.join(path, "config.json")) else None
    return _FINGERPRINTS[path]


def current(args, cell: dict) -> bool:
    """Whether a cell was computed with the current settings (and, if it recorded one, the current model)."""
    if cell.get("settings") != settings(args):
        return False
    sha = cell.get("model_sha256")
    return sha is None or sha == fingerprint(args, cell.get("model", ""))


def model_spec(args, model: str) -> str:
    return os.path.abspath(args.llama) if model == "llama" else "minilm"


# ---- worker: one cell in a fresh process ------------------------------------------------------------
def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _eval_data(args, model: str, tok):
    from lowc import data
    from lowc import evaluate as ev

    text = data.read(args.eval, "--eval")
    if model == "llama":
        return ev.token_windows(tok, text, args.eval_seq_len, args.eval_windows)
    return [l.strip() for l in text.splitlines() if len(l.split()) >= 5][: args.sentences]


def _evaluate(args, model: str, ref_fn, fn, data, tok) -> dict:
    import torch

    from lowc import evaluate as ev

    if model == "llama":
        out = {"ppl": ev.perplexity(fn, data, batch_size=4, progress=args.progress)}
        kls, top1, n = 0.0, 0.0, 0
        for i in range(0, len(data), 4):
            ids = data[i : i + 4]
            c = ev.compare(ref_fn, fn, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}], "causal-lm")
            kls += c.kl * ids.numel()
            top1 += c.top1 * ids.numel()
            n += ids.numel()
        out.update(kl=kls / n, top1=top1 / n, tokens=int(data.numel()))
        return out
    c = ev.compare(ref_fn, fn, ev.text_batches(tok, data), "encoder")
    return {"cosine": c.cosine, "min_cosine": c.min_cosine, "sentences": len(data)}


def _float_model(spec: str):
    from lowc.frontend.trace import load_source

    ref, tok, _, _ = load_source(spec)
    ref = ref.eval()
    if hasattr(ref.config, "use_cache"):
        ref.config.use_cache = False
    return ref, tok


def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    model, method, scheme = args.worker.split("__")
    scheme = "-" if scheme == "none" else scheme
    path = os.path.join(args.cells, args.worker + ".json")
    cell = {"model": model, "method": method, "scheme": scheme, "settings": settings(args),
            "model_sha256": fingerprint(args, model), "threads": args.threads,
            "torch": torch.__version__, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    try:
        import lowc
        from lowc import evaluate as ev

        spec = model_spec(args, model)
        if method == "float":
            ref, tok = _float_model(spec)
            data = _eval_data(args, model, tok)
            if model == "llama":
                cell["metrics"] = {"ppl": ev.perplexity(lambda **kw: ref(**kw), data, batch_size=4, progress=args.progress),
                                   "tokens": int(data.numel())}
            else:  # the float model against itself: cosine 1 by definition
                cell["metrics"] = {"cosine": 1.0, "min_cosine": 1.0, "sentences": len(data)}
            cell["status"] = "ok"
        else:
            target = target_for(method, scheme)
            passes = passes_for(method, scheme)
            cell.update(target=target, passes=passes)
            torch.manual_seed(args.seed)
            baseline = _status_kb("VmRSS")
            reset = _reset_peak()
            t0 = time.perf_counter()
            cm = lowc.compile(spec, target=target, passes=passes, calib=args.calib, calib_samples=args.calib_samples,
                              seq_len=args.seq_len, seed=args.seed, progress=args.progress)
            cell["compile_s"] = time.perf_counter() - t0
            peak = _status_kb("VmHWM")
            if peak is None:  # no /proc: the process's lifetime peak (not reset)
                import resource

                peak, reset = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, False
            cell.update(peak_rss_mib=peak / 1024, baseline_rss_mib=(baseline or 0) / 1024,
                        rss_increase_mib=(peak - (baseline or 0)) / 1024, peak_reset=reset)
            cell["pass_seconds"] = {f"{r['phase']}:{r['name']}": round(r["seconds"], 3) for r in cm.manifest["passes"]}
            cell["pass_stats"] = [{"name": r["name"], "changed": r["changed"], **{k: v for k, v in r["stats"].items()
                                   if not isinstance(v, (list, dict))}} for r in cm.manifest["passes"]]
            cell["log"] = cm.manifest.get("log", [])
            cell["calibration"] = cm.manifest.get("calibration")
            size = cm.size()
            cell["size_ratio"] = size["bytes"] / max(size["float_bytes"], 1)
            ref, tok = _float_model(spec)
            data = _eval_data(args, model, tok)
            cell["metrics"] = _evaluate(args, model, lambda **kw: ref(**kw), cm, data, tok)
            cell["status"] = "ok"
    except Exception as e:  # recorded in the cell; the driver goes on with the next one
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        cell.update(status="error", error=f"{type(e).__name__}: {first}", traceback=traceback.format_exc()[-4000:])
    os.makedirs(args.cells, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(cell, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
    if cell["status"] != "ok":
        print(f"cell {args.worker}: {cell['error']}", file=sys.stderr)
        sys.exit(1)


# ---- driver ---------------------------------------------------------------------------------------
def _worker_args(args) -> list[str]:
    return ["--llama", args.llama, "--calib", args.calib, "--eval", args.eval, "--calib-samples", str(args.calib_samples),
            "--seq-len", str(args.seq_len), "--eval-windows", str(args.eval_windows), "--eval-seq-len",
            str(args.eval_seq_len), "--sentences", str(args.sentences), "--seed", str(args.seed), "--threads",
            str(args.threads), "--results", args.results] + ([] if args.progress else ["--no-progress"])


def read_cell(args, cid: str) -> dict | None:
    path = os.path.join(args.cells, cid + ".json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _summary(cell: dict) -> str:
    m = cell.get("metrics", {})
    parts = [f"{k}={v:.4g}" for k, v in m.items() if isinstance(v, float)]
    if "compile_s" in cell:
        parts.append(f"compile {cell['compile_s']:.1f} s, peak {cell['peak_rss_mib']:.0f} MiB")
    return ", ".join(parts)


def run(args, command: str) -> None:
    todo = cells(args.models, args.methods, args.schemes, args.sparse)
    for i, (model, method, scheme) in enumerate(todo, 1):
        cid = cell_id(model, method, scheme)
        head = f"[{i}/{len(todo)}] {model} {method} {scheme}"
        if not available(method):
            print(f"{head}: not available (pass {', '.join(passes_for(method, scheme))} not registered)", flush=True)
            continue
        old = read_cell(args, cid)
        if model == "llama" and not os.path.isfile(os.path.join(args.llama, "config.json")):
            raise SystemExit(f"--llama {args.llama}: no config.json (train it with examples/train_tiny_llama.py or pass --llama DIR)")
        if old is not None and old.get("status") == "ok" and current(args, old) and not args.force:
            print(f"{head}: kept ({_summary(old)})", flush=True)
            continue
        print(f"{head}: running", flush=True)
        t0 = time.perf_counter()
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", cid] + _worker_args(args)
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
        env.setdefault("OMP_NUM_THREADS", str(args.threads))
        p = subprocess.run(cmd, env=env, timeout=args.cell_timeout)
        cell = read_cell(args, cid) or {}
        if cell.get("status") == "ok":
            cell["command"] = command
            with open(os.path.join(args.cells, cid + ".json"), "w") as f:
                json.dump(cell, f, indent=2)
                f.write("\n")
            print(f"{head}: done in {time.perf_counter() - t0:.0f} s ({_summary(cell)})", flush=True)
        else:
            print(f"{head}: FAILED (exit {p.returncode}): {cell.get('error', 'no cell written')}", flush=True)
    if args.methods:
        render(args, command)
    if args.sparse:
        render_sparsity(args, command)


# ---- report -----------------------------------------------------------------------------------------
def _fmt(v, digits=2):
    return "–" if v is None else f"{v:.{digits}f}"


#: the losses the ordering is checked on: model -> ((name, metric -> loss), ...)
LOSSES = {"llama": (("perplexity", lambda m: m.get("ppl")), ("KL", lambda m: m.get("kl"))),
          "minilm": (("1 − cosine", lambda m: 1 - m["cosine"] if m.get("cosine") is not None else None),)}


def collect(args) -> dict:
    """All cells with the current settings, by (model, method, scheme); and the stale cells' names."""
    found, stale = {}, []
    if os.path.isdir(args.cells):
        for name in sorted(os.listdir(args.cells)):
            if not name.endswith(".json"):
                continue
            with open(os.path.join(args.cells, name)) as f:
                cell = json.load(f)
            if not current(args, cell):
                stale.append(name)
                continue
            found[cell["model"], cell["method"], cell["scheme"]] = cell
    return {"cells": found, "stale": stale}


def ordering(model: str, scheme: str, cells_: dict, loss) -> dict:
    """Whether the measured methods' losses follow the papers' order (FlatQuant <= AffineQuant <= GPTQ <= RTN)."""
    present = [(m, loss(cells_[model, m, scheme].get("metrics") or {})) for m in EXPECTED_ORDER
               if (model, m, scheme) in cells_ and cells_[model, m, scheme].get("status") == "ok"]
    present = [(m, l) for m, l in present if l is not None]
    violations = [f"{METHOD_LABELS[a]} {la:.6g} > {METHOD_LABELS[b]} {lb:.6g} (+{100 * (la - lb) / lb:.2g}%)"
                  for (a, la), (b, lb) in zip(present, present[1:]) if la > lb]
    return {"methods": [m for m, _ in present], "holds": not violations, "violations": violations}


def render(args, command: str) -> None:
    got = collect(args)
    cells_ = got["cells"]
    models = [m for m in MODELS if any(k[0] == m for k in cells_)]
    any_cell = next(iter(cells_.values()), {})
    machine = {"uname_m": platform.machine(), "nproc": os.cpu_count(), "python": platform.python_version(),
               "torch": any_cell.get("torch"), "rendered": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    dates = sorted(c["date"] for c in cells_.values() if "date" in c)
    commands = sorted({c.get("command") for c in cells_.values() if c.get("command")})
    s = settings(args)
    orders = {f"{m}/{sc}/{name}": ordering(m, sc, cells_, fn) for m in models for sc in SCHEMES for name, fn in LOSSES[m]}
    data = {"settings": s, "machine": machine, "cell_dates": [dates[0], dates[-1]] if dates else [], "commands": commands,
            "render_command": command, "available": {m: available(m) for m in METHODS},
            "cells": [cells_[k] for k in sorted(cells_)], "ordering": orders, "stale_cells": got["stale"]}
    os.makedirs(args.results, exist_ok=True)
    with open(os.path.join(args.results, "quality.json"), "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")

    L = ["# Quality: quantization methods side by side", ""]
    L.append(f"Machine: `{machine['uname_m']}`, {machine['nproc']} CPUs, Python {machine['python']}, torch {machine['torch']}. "
             f"Cells computed {dates[0] if dates else '–'} … {dates[-1] if dates else '–'} (UTC), one fresh process each, "
             f"{any_cell.get('threads', args.threads)} torch thread(s).")
    L.append("")
    L.append("Commands: " + ("; ".join(f"`{c}`" for c in commands) if commands else "–") + f". Rendered by `{command}`.")
    L.append("")
    L.append(f"Calibration: {s['calib_samples']} samples × {s['seq_len']} tokens of wikitext-2 valid at seeded random offsets "
             f"(seed {s['seed']}). Evaluation on wikitext-2 test: causal LM, the first {s['eval_windows']} windows of "
             f"{s['eval_seq_len']} tokens (perplexity; KL(float ‖ quantized) in nats per token and top-1 agreement on the "
             f"same tokens); MiniLM, mean cosine of mean-pooled embeddings to float on the first {s['sentences']} lines "
             "with ≥ 5 words. Schemes: W4A16 g128 = `ref-w4a16` (int4, groups of 128, asymmetric); W3A16 g128 = "
             "`ref-w4a16` with `bits=3` on the weight pass; W4A4 = `ref-w4a4` (int4 weights per channel, symmetric, + int4 "
             "per-token dynamic activations); W8A8 = `ref-w8a8` (int8 per channel + int8 per-token dynamic). "
             "`lm_head` stays float (every method's default `ignore`).")
    L.append("")
    cols = list(SCHEMES)
    header = "| method | " + " | ".join(SCHEMES[c][2] for c in cols) + " |"
    sep = "|---|" + "---:|" * len(cols)
    for model in models:
        if model == "llama":
            L.append(f"## Trained tiny Llama (`{os.path.relpath(s['llama'], ROOT) if s['llama'].startswith(ROOT) else s['llama']}`)")
            L += ["", "Perplexity on wikitext-2 test (KL to float, nats/token):", "", header, sep]
        else:
            L += ["## MiniLM (all-MiniLM-L6-v2)", "", "Mean sentence-embedding cosine to float (min over sentences):", "", header, sep]
        for method in METHODS:
            row = []
            for sc in cols:
                c = cells_.get((model, method, "-" if method == "float" else sc))
                if not available(method) and c is None:
                    row.append("not available")
                elif c is None:
                    row.append("not run")
                elif c.get("status") != "ok":
                    row.append("error")
                else:
                    m = c["metrics"]
                    if model == "llama":
                        row.append(_fmt(m["ppl"]) if method == "float" else f"{_fmt(m['ppl'])} ({m['kl']:.4f})")
                    else:
                        row.append(f"{m['cosine']:.4f} ({m['min_cosine']:.3f})")
            L.append(f"| {METHOD_LABELS[method]} | " + " | ".join(row) + " |")
        L += ["", "Compile time (s) / peak RSS of `lowc.compile` (MiB; increase over the process before it):", "", header, sep]
        for method in METHODS:
            if method == "float":
                continue
            row = []
            for sc in cols:
                c = cells_.get((model, method, sc))
                if c is None or c.get("status") != "ok":
                    row.append("not available" if not available(method) and c is None else ("error" if c else "not run"))
                else:
                    row.append(f"{c['compile_s']:.1f} s / {c['peak_rss_mib']:.0f} (+{c['rss_increase_mib']:.0f})")
            L.append(f"| {METHOD_LABELS[method]} | " + " | ".join(row) + " |")
        L += ["", "Expected ordering (the papers: FlatQuant ≤ AffineQuant ≤ GPTQ ≤ RTN in loss):", ""]
        for sc in cols:
            for name, _ in LOSSES[model]:
                o = orders[f"{model}/{sc}/{name}"]
                where = f"{SCHEMES[sc][2]}, {name}"
                if len(o["methods"]) < 2:
                    L.append(f"- {where}: fewer than two of these methods measured")
                elif o["holds"]:
                    L.append(f"- {where}: holds ({' ≤ '.join(METHOD_LABELS[m] for m in o['methods'])})")
                else:
                    L.append(f"- {where}: does NOT hold: {'; '.join(o['violations'])}")
        L.append("")
    errors = [c for c in cells_.values() if c.get("status") != "ok"]
    if errors:
        L += ["Failed cells:", ""] + [f"- {c['model']} {c['method']} {c['scheme']}: {c.get('error')}" for c in errors] + [""]
    L += ["Notes:", "",
          "- SmoothQuant+RTN folds per-channel scales (α = 0.5) into the norms before q/k/v and gate/up, then RTN. It "
          "is meant for activation quantization (W8A8, W4A4); at weight-only it only moves activation range into "
          "the weights, so it is shown there for completeness, not as a method for that scheme. On post-norm "
          "encoders (MiniLM) no group is foldable, so it equals RTN there (the compile log says so).",
          "- GPTQ quantizes linears outside transformer blocks (MiniLM's pooler, not part of the embedding output) "
          "with RTN.",
          "- Perplexity can move by a fraction of a percent either way from quantization noise alone (a quantized "
          "model may even score below float), so where the schemes are nearly lossless (W8A8, W4A16) a perplexity "
          "ordering check is below the metric's resolution; KL to the float model measures the deviation directly "
          "and is the finer check there.",
          "- Peak RSS includes loading and tracing the model; the increase is over the process after imports.",
          ""]
    if got["stale"]:
        L += [f"Cells with other settings were ignored: {', '.join(got['stale'])}.", ""]
    with open(os.path.join(args.results, "quality.md"), "w") as f:
        f.write("\n".join(L))
    print("\n".join(L))


#: how the sparsity table counts bits per weight (:func:`bits_per_weight`)
BITS_NOTE = ("Bits per weight count what a compressed store would hold for a layer whose width is a multiple of 128: "
             "the kept weights' codes, per group of 128 input columns an fp16 scale and a 4-bit (W3: 3, W2: 2) zero point "
             "(0.156 bits per weight at W4), and the positions of the kept weights: GQSA a 16-bit index per kept group of "
             "16 (0.5 bits per weight at S50); 2:4 a 2-bit position per kept weight (1 bit per weight, the compressed "
             "2:4 format); unstructured 50% a 1-bit occupancy bitmap (1 bit per weight). The pruned baselines run here as "
             "dense int4 `lowc::linear_wq` with zeros (4.156 bits per weight as stored by lowc today): their quality is "
             "the point, not their size on disk. Float counts fp16.")


def render_sparsity(args, command: str) -> None:
    """``<results>/quality_sparsity.md`` / ``.json``: the sparsity table from the ``sparse`` cells
    with the current settings (nothing is written when there are none)."""
    got = collect(args)
    cells_ = {k: c for k, c in got["cells"].items() if k[2] == "sparse"}
    if not cells_:
        return
    s = settings(args)
    any_cell = next(iter(cells_.values()))
    dates = sorted(c["date"] for c in cells_.values() if "date" in c)
    commands = sorted({c.get("command") for c in cells_.values() if c.get("command")})
    rows = []
    for key, (passes, label) in SPARSE.items():
        row = {"key": key, "label": label, "passes": list(passes), "target": SPARSE_TARGET,
               "bits_per_weight": round(bits_per_weight(key), 4), "available": available(key)}
        for model in MODELS:
            c = cells_.get((model, key, "sparse"))
            if c is not None:
                row[model] = {"status": c.get("status"), "metrics": c.get("metrics"), "error": c.get("error"),
                              "compile_s": c.get("compile_s"), "pass_stats": c.get("pass_stats")}
        rows.append(row)
    data = {"settings": s, "cell_dates": [dates[0], dates[-1]] if dates else [], "commands": commands,
            "render_command": command, "rows": rows}
    os.makedirs(args.results, exist_ok=True)
    with open(os.path.join(args.results, "quality_sparsity.json"), "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")

    def cell_text(key: str, model: str) -> str:
        c = cells_.get((model, key, "sparse"))
        if c is None:
            return "not available" if not available(key) else "not run"
        if c.get("status") != "ok":
            return "error"
        m = c["metrics"]
        if model == "minilm":
            return f"{m['cosine']:.4f} ({m['min_cosine']:.3f})"
        return _fmt(m["ppl"]) if key == "float" else f"{_fmt(m['ppl'])} ({m['kl']:.4f})"

    llama = os.path.relpath(s["llama"], ROOT) if s["llama"].startswith(ROOT) else s["llama"]
    L = ["# Sparsity and quantization at equal size", ""]
    L.append(f"Cells computed {dates[0] if dates else '–'} … {dates[-1] if dates else '–'} (UTC), one fresh process each, "
             f"{any_cell.get('threads', args.threads)} torch thread(s), torch {any_cell.get('torch')}. Commands: "
             + ("; ".join(f"`{c}`" for c in commands) if commands else "–") + f". Rendered by `{command}`.")
    L.append("")
    L.append(f"Every row compiles on `{SPARSE_TARGET}` with the passes named (calibration: {s['calib_samples']} × {s['seq_len']} "
             f"tokens of wikitext-2 valid, seed {s['seed']}); `lm_head` stays float. Tiny Llama (`{llama}`): perplexity on "
             f"the first {s['eval_windows']} windows of {s['eval_seq_len']} tokens of wikitext-2 test (KL(float ‖ compressed), "
             f"nats/token); MiniLM: mean cosine of mean-pooled embeddings to float on {s['sentences']} sentences (min).")
    L.append("")
    L += ["| row | passes | bits/weight | tiny Llama ppl (KL) | MiniLM cosine (min) |", "|---|---|---:|---:|---:|"]
    for row in rows:
        passes = " → ".join(f"`{p}`" for p in row["passes"]) or "–"
        L.append(f"| {row['label']} | {passes} | {row['bits_per_weight']:.3f} | {cell_text(row['key'], 'llama')} | "
                 f"{cell_text(row['key'], 'minilm')} |")
    L += ["", BITS_NOTE, ""]
    claims = []
    for mine in ("gqsa-s50", "gqsa-s50-g16"):
        for other in ("sparsegpt24-gptq", "gptq-w2"):
            for model, name, loss in (("llama", "perplexity", lambda m: m.get("ppl")),
                                      ("minilm", "1 − cosine", lambda m: 1 - m["cosine"] if m.get("cosine") is not None else None)):
                a, b = cells_.get((model, mine, "sparse")), cells_.get((model, other, "sparse"))
                what = f"{SPARSE[mine][1].split(' (')[0]} vs {SPARSE[other][1]} ({model}, {name})"
                if a is None or b is None or a.get("status") != "ok" or b.get("status") != "ok":
                    claims.append(f"- {what}: not measured")
                    continue
                la, lb = loss(a["metrics"]), loss(b["metrics"])
                claims.append(f"- {what}: {la:.4g} vs {lb:.4g}: " + ("holds" if la < lb else "does NOT hold"))
    L += ["The paper's claim (GQSA W4 S50 beats 2:4 + W4 and dense W2):", ""] + claims + [""]
    errors = [c for c in cells_.values() if c.get("status") != "ok"]
    if errors:
        L += ["Failed cells:", ""] + [f"- {c['model']} {c['method']}: {c.get('error')}" for c in errors] + [""]
    with open(os.path.join(args.results, "quality_sparsity.md"), "w") as f:
        f.write("\n".join(L))
    print("\n".join(L))

# ---- CLI ------------------------------------------------------------------------------------------
def _csv(choices):
    def parse(s: str) -> list[str]:
        if s.strip() == "all":
            return list(choices)
        items = [x.strip() for x in s.split(",") if x.strip()]
        bad = [x for x in items if x not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(bad)} (choose from {', '.join(choices)})")
        return items
    return parse


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--llama", default=DEFAULT_LLAMA, help="trained causal LM (HF directory)")
    ap.add_argument("--models", type=_csv(MODELS), default=list(MODELS), help="comma-separated: " + ", ".join(MODELS))
    ap.add_argument("--methods", type=_csv(tuple(METHODS)), default=list(METHODS), help="comma-separated: " + ", ".join(METHODS))
    ap.add_argument("--sparse", type=_csv(tuple(SPARSE)), default=[],
                    help="rows of the sparsity table, comma-separated ('all' for every one): " + ", ".join(SPARSE))
    ap.add_argument("--schemes", type=_csv(tuple(SCHEMES)), default=list(SCHEMES), help="comma-separated: " + ", ".join(SCHEMES))
    ap.add_argument("--calib", default="wikitext-2-valid", help="calibration text: a file or a built-in text name (lowc.data)")
    ap.add_argument("--eval", default="wikitext-2-test", help="evaluation text: a file or a built-in text name (lowc.data)")
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per calibration sample")
    ap.add_argument("--eval-windows", type=int, default=128, help="perplexity windows (causal LM)")
    ap.add_argument("--eval-seq-len", type=int, default=256, help="tokens per perplexity window")
    ap.add_argument("--sentences", type=int, default=256, help="MiniLM sentences")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per cell")
    ap.add_argument("--results", default=os.path.join(HERE, "results"), help="where quality.md/.json and the cells (quality/) go")
    ap.add_argument("--force", action="store_true", help="recompute cells that already exist")
    ap.add_argument("--render-only", action="store_true", help="only render the table from existing cells")
    ap.add_argument("--cell-timeout", type=float, default=None, help="seconds before a cell is abandoned")
    ap.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.cells = os.path.join(args.results, "quality")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    command = "python benchmarks/quality.py" + (" " + shlex.join(sys.argv[1:] if argv is None else argv) if (argv or sys.argv[1:]) else "")
    if args.render_only:
        if args.methods:  # ``--methods ''``: only the sparsity table
            render(args, command)
        render_sparsity(args, command)
        return
    run(args, command)


if __name__ == "__main__":
    main()
