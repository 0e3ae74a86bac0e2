"""CPU LUT kernels (cpu-lut-w1..w4) vs torch on single-token GEMV, and end to end on a Llama-shaped model.

GEMV, M = 1, shapes written ``N x K`` = out_features x in_features (the Llama-3-8B projections:
4096x4096 = q/o-proj, 14336x4096 = gate/up-proj, which the reference doc calls "4096x14336", and
4096x14336 = down-proj). For each shape, in one process and interleaved round-robin so that every
method sees the same machine state:

* ``torch fp32``: ``F.linear(x, W)`` with W float32;
* ``torch dequant W4``/``W2``: unpack the packed codes with shifts, dequantize (groups of 128) to
  float32 and ``F.linear`` on every call -- what plain torch does without low-bit kernels (timed
  separately with ``repeat/8`` calls: it is two orders of magnitude slower);
* ``lowc LUT W1..W4``: ``lowc.backends.cpu_lut.runtime.run`` on the repacked weight (groups of 128,
  asymmetric), tables built inside each call;
* ``lowc LUT W4 S50``: the group-sparse kernel (``runtime.run_sparse``, issue 17): 4-bit codes of the
  kept half of each row's groups of 16 inputs (sparse_group 16, a seeded random salience choosing
  them), quantization groups of 128 kept weights (asymmetric; 128 like the dense rows: per-16 fp32
  scales would add 2 bits per kept weight), a kept-group bitmask per row; activations converted once
  per call (int16, one scale).

Times are medians (and best) of ``--repeat`` calls after warm-up. Every call of a method reads a
different copy of its weight, cycling over enough copies to touch 96 MB, so weights stream from
DRAM as in a real decode step (the 32 MiB L3 would otherwise hold a 2-bit 14336x4096 weight).
GB/s counts the bytes each method's weight occupies (packed codes + fp32 scales + uint8 zeros;
fp32 for torch). Threads: 2 for torch and the kernels.

End to end: a random Llama-shaped model (hidden 2048, intermediate 5632, ``--layers`` layers,
TinyLlama-1.1B widths) compiled to ``ref-fp32``, ``cpu-lut-w4`` and ``cpu-lut-w2``; one forward of
batch 1 x 1 token (the decode-step GEMVs; the exported graph has no KV cache) timed like the GEMVs.

    python benchmarks/cpu_lut.py            # writes benchmarks/results/cpu_lut.{md,json}

Prefill (``--prefill``, issue 21): the large-M GEMM path of ``lowc::linear_lut`` (weight tiles
dequantized in C, ``torch.mm``) against the LUT kernel and torch fp32, M = 1..512 input rows, on the
issue's shapes (2048x2048, 5632x2048, 2048x5632, 32000x2048; groups of 128, asymmetric; hot weights:
prefill is bound by compute), bits 2 and 4, 1 and 2 threads; the crossover M of each row (from which
the GEMM path stays faster than the LUT kernel) sets ``runtime.GEMM_MIN_M``. End to end: 128-token
prefill through the issue's random Llama (hidden 2048, intermediate 5632, 16 heads, 4 KV heads, 4
layers, vocab 32000) compiled to ``ref-fp32`` and ``cpu-lut-w4``/``-w2``, with the GEMM path and
with the LUT kernel only.

    python benchmarks/cpu_lut.py --prefill  # writes benchmarks/results/cpu_lut_prefill.{md,json}
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]  # (N out, K in)
#: llama.cpp figures measured on this machine (reference doc), GEMV 14336x4096 (N x K), 2 threads, us
LLAMA_CPP = {"f32": 10000, "q4_0": 2220, "q4_K": 2200, "q2_K": 1300, "tq2_0": 800}


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            k, _, v = line.partition(":")
            if k.strip() in ("Model name", "CPU(s)", "Thread(s) per core"):
                info[k.strip()] = v.strip()
            if k.strip() == "Flags":
                flags = v.split()
                info["avx2"] = "avx2" in flags
                info["fma"] = "fma" in flags
                info["avx512f"] = "avx512f" in flags
    except OSError:
        pass
    info["uptime"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    return info


def timed(fns: dict, repeat: int, warmup: int = 3) -> tuple[dict, dict]:
    """Median and best seconds of each callable, interleaved round-robin."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    ts = {k: [] for k in fns}
    for _ in range(repeat):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            ts[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in ts.items()}, {k: min(v) for k, v in ts.items()}


def torch_dequant_linear(x, qw, bits: int, n: int, k: int):
    """What plain torch does without low-bit kernels: codes packed ``8/bits`` per byte (low bits
    first, the reference layout for 2 and 4 bits), unpacked with shifts, dequantized per group of 128
    to float32, then ``F.linear`` -- all on every call."""
    per = 8 // bits
    packed = qw.qweight  # [N, K*bits/8]
    shifts = (torch.arange(per, dtype=torch.uint8) * bits).view(1, 1, per)
    mask = (1 << bits) - 1
    s = qw.scales.float().unsqueeze(-1)
    z = qw.zeros.float().unsqueeze(-1)

    def fn():
        q = ((packed.unsqueeze(-1) >> shifts) & mask).reshape(n, k // 128, 128)
        w = q.float().sub_(z).mul_(s)  # one float32 allocation, updated in place
        return F.linear(x, w.reshape(n, k))

    return fn


#: each timed call reads a different copy of its weights until this many bytes were touched, so the
#: weights come from DRAM (the L3 here is 32 MiB: a single 2-bit 14336x4096 weight would sit in it)
COLD_BYTES = 96e6


def rotating(make, nbytes: int):
    """A callable cycling over ``ceil(COLD_BYTES / nbytes)`` independent copies made by ``make()``."""
    fns = [make() for _ in range(max(1, -(-int(COLD_BYTES) // nbytes)))]
    state = {"i": 0}

    def call():
        state["i"] = (state["i"] + 1) % len(fns)
        return fns[state["i"]]()

    return call


#: the group-sparse rows: sparsity, sparse group, quantization group (of kept weights)
SPARSE = (0.5, 16, 128)


def sparse_method(w, x, threads: int = 2):
    """(name, make, nbytes, rel. error vs its dequantized weight) of the W4 S50 group-sparse kernel on ``w``."""
    from lowc.backends.cpu_lut import layout, runtime
    from lowc.ir.dialect import sparse

    sparsity, sg, gs = SPARSE
    n, k = w.shape
    n_groups = sparse.padded_sparse_width(k, sg) // sg
    keep = sparse.kept_groups(k, sg, sparsity)
    g = torch.Generator().manual_seed(1)
    idx = torch.rand(n, n_groups, generator=g).topk(keep, dim=1).indices.sort(dim=1).values.to(torch.int16)
    sq = sparse.rtn_quantize_sparse(w, idx, 4, gs, sg, False)
    lw = layout.from_sparse_reference(sq.qweight, sq.scales, sq.zeros, sq.idx, 4, sq.group_size, sg, k)
    y_ref = F.linear(x, sparse.densify(sq).float())
    nbytes = lw.weight.numel() + lw.mask.numel() + lw.scales.numel() * 4 + lw.zeros.numel()

    def make():
        wt, mt, st, zt = lw.weight.clone(), lw.mask.clone(), lw.scales.clone(), lw.zeros.clone()
        return lambda: runtime.run_sparse(x, wt, mt, st, zt, None, 4, sq.group_size, k, n, sg, keep, threads=threads)

    err = ((make()() - y_ref).norm() / y_ref.norm()).item()
    return f"lowc LUT W4 S{round(sparsity * 100)}", make, nbytes, err


def gemv(repeat: int, bits_list=(1, 2, 3, 4)) -> list[dict]:
    from lowc.backends.cpu_lut import layout, runtime
    from lowc.backends.cpu_lut.codegen import KernelConfig, SparseKernelConfig
    from lowc.ir.dialect import quant

    runtime.ensure([KernelConfig(b, 128, False) for b in bits_list] + [SparseKernelConfig(4, SPARSE[2], SPARSE[1], False)])
    rows = []
    for n, k in SHAPES:
        g = torch.Generator().manual_seed(0)
        w = torch.randn(n, k, generator=g) * 0.02
        x = torch.randn(1, k, generator=g)
        fns, nbytes, err = {}, {}, {}
        nbytes["torch fp32"] = w.numel() * 4
        fns["torch fp32"] = rotating(lambda: (lambda wc=w.clone(): F.linear(x, wc)), nbytes["torch fp32"])
        for b in bits_list:
            qw = quant.rtn_quantize(w, b, 128, False)
            lw = layout.from_reference(qw.qweight, qw.scales, qw.zeros, b, 128, k)
            yq = quant.dequantize(qw.qweight, qw.scales, qw.zeros, b, 128, k)
            y_ref = F.linear(x, yq)
            del yq
            if b in (2, 4):
                name = f"torch dequant W{b}"
                nbytes[name] = qw.qweight.numel() + qw.scales.numel() * 4 + qw.zeros.numel()
                # the torch baseline computes the same thing
                torch.testing.assert_close(torch_dequant_linear(x, qw, b, n, k)(), y_ref, rtol=1e-4, atol=1e-4)
                fns[name] = rotating(lambda qw=qw, b=b: torch_dequant_linear(x, qw, b, n, k), nbytes[name])
            name = f"lowc LUT W{b}"
            nbytes[name] = lw.weight.numel() + lw.scales.numel() * 4 + lw.zeros.numel()

            def make(lw=lw, b=b):
                wt, st, zt = lw.weight.clone(), lw.scales.clone(), lw.zeros.clone()
                return lambda: runtime.run(x, wt, st, zt, None, b, 128, k, n, threads=2)

            y_lut = make()()
            err[name] = ((y_lut - y_ref).norm() / y_ref.norm()).item()
            fns[name] = rotating(make, nbytes[name])
        name, make, nbytes[name], err[name] = sparse_method(w, x)
        fns[name] = rotating(make, nbytes[name])
        # the torch dequantize baseline is ~100x slower: timed on its own with fewer repeats
        slow = {k: fns.pop(k) for k in list(fns) if k.startswith("torch dequant")}
        med, best = timed(fns, repeat)
        med2, best2 = timed(slow, max(3, repeat // 8), warmup=1)
        med.update(med2)
        best.update(best2)
        base = med["torch fp32"]
        for name, s in med.items():
            rows.append({"shape": f"{n}x{k}", "method": name, "us": s * 1e6, "us_best": best[name] * 1e6,
                         "weight_MB": nbytes[name] / 1e6, "GB_s": nbytes[name] / s / 1e9,
                         "speedup_vs_fp32": base / s, "rel_err_vs_dequant": err.get(name)})
        print(f"  {n}x{k}: " + ", ".join(f"{k_}={v * 1e6:.0f}us" for k_, v in med.items()), flush=True)
        del fns
    return rows


def compiled_llama(layers: int, vocab: int, heads: int) -> dict:
    """A random Llama (hidden 2048, intermediate 5632, 4 KV heads) compiled to ref-fp32, cpu-lut-w4 and -w2."""
    import lowc
    from transformers import LlamaConfig, LlamaForCausalLM

    from lowc.frontend.presets import byte_tokenizer

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=4, max_position_embeddings=512,
                      tie_word_embeddings=False, bos_token_id=256, eos_token_id=257)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        byte_tokenizer().save_pretrained(d)
        del model
        return {t: lowc.compile(d, t, progress=False) for t in ("ref-fp32", "cpu-lut-w4", "cpu-lut-w2")}


def end_to_end(repeat: int, layers: int) -> list[dict]:
    progs = compiled_llama(layers, 259, 32)
    ids = torch.randint(0, 259, (1, 1), generator=torch.Generator().manual_seed(0))
    fns = {t: (lambda cm=cm: cm(ids)) for t, cm in progs.items()}
    med, _ = timed(fns, repeat)
    rows = []
    for t, s in med.items():
        rows.append({"target": t, "ms_per_token": s * 1e3, "tokens_per_s": 1 / s, "speedup_vs_fp32": med["ref-fp32"] / s,
                     "model_MB": progs[t].size()["bytes"] / 1e6})
    print("  e2e: " + ", ".join(f"{t}={s * 1e3:.1f}ms" for t, s in med.items()), flush=True)
    return rows


PREFILL_SHAPES = [(2048, 2048), (5632, 2048), (2048, 5632), (32000, 2048)]  # (N out, K in)
PREFILL_M = (1, 2, 4, 8, 16, 32, 64, 128, 512)


def prefill_sweep(repeat: int, threads_list=(1, 2), bits_list=(2, 4), ms=PREFILL_M, shapes=PREFILL_SHAPES) -> list[dict]:
    """Median us per call of torch fp32, the LUT kernel and the GEMM path (bf16 and fp32 tiles) per M."""
    from lowc.backends.cpu_lut import layout, runtime
    from lowc.backends.cpu_lut.codegen import KernelConfig
    from lowc.ir.dialect import quant

    runtime.ensure([KernelConfig(b, 128, False) for b in bits_list])
    rows = []
    for threads in threads_list:
        torch.set_num_threads(threads)
        for n, k in shapes:
            g = torch.Generator().manual_seed(0)
            w = torch.randn(n, k, generator=g) * 0.02
            packed = {}
            for b in bits_list:
                qw = quant.rtn_quantize(w, b, 128, False)
                packed[b] = layout.from_reference(qw.qweight, qw.scales, qw.zeros, b, 128, k)
            for m in ms:
                x = torch.randn(m, k, generator=g)
                fns = {"torch fp32": lambda x=x, w=w: F.linear(x, w)}
                for b, lw in packed.items():
                    args = (lw.weight, lw.scales, lw.zeros, None, b, 128, k, n)
                    fns[f"W{b} LUT"] = lambda x=x, a=args, t=threads: runtime.run(x, *a, threads=t, gemm=False)
                    for name, dt in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
                        fns[f"W{b} GEMM {name}"] = lambda x=x, a=args, t=threads, dt=dt: runtime.run_gemm(x, *a, threads=t,
                                                                                                           dtype=dt)
                reps = repeat if m * n * k <= 64 * 2048 * 5632 else max(3, repeat // 3)
                med, best = timed(fns, reps, warmup=1)
                for name, sec in med.items():
                    rows.append({"threads": threads, "shape": f"{n}x{k}", "M": m, "method": name, "us": sec * 1e6,
                                 "us_best": best[name] * 1e6})
                print(f"  t{threads} {n}x{k} M={m}: " + ", ".join(f"{a}={v * 1e6:.0f}us" for a, v in med.items()), flush=True)
    return rows


def _first(ms, by, key, method, other):
    """The smallest M from which ``method`` is faster than ``other`` at every larger M (None: not at the largest)."""
    threads, shape, _ = key
    cross = None
    for m in reversed(ms):
        if by[(threads, shape, m, method)] >= by[(threads, shape, m, other)]:
            break
        cross = m
    return cross


def crossovers(rows: list[dict], tile: str = "bf16") -> list[dict]:
    """Per threads/shape/bits: the smallest M from which the GEMM path (``tile``) is faster than the LUT
    kernel at every larger M measured, and from which it is faster than torch fp32."""
    by = {(r["threads"], r["shape"], r["M"], r["method"]): r["us"] for r in rows}
    out = []
    for threads, shape in dict.fromkeys((r["threads"], r["shape"]) for r in rows):
        ms = sorted({r["M"] for r in rows if r["threads"] == threads and r["shape"] == shape})
        for b in sorted({int(r["method"][1]) for r in rows if r["method"].startswith("W")}):
            key = (threads, shape, b)
            out.append({"threads": threads, "shape": shape, "bits": b, "tile": tile,
                        "gemm_beats_lut_from_M": _first(ms, by, key, f"W{b} GEMM {tile}", f"W{b} LUT"),
                        "gemm_beats_fp32_from_M": _first(ms, by, key, f"W{b} GEMM {tile}", "torch fp32")})
    return out


def prefill_e2e(repeat: int, layers: int, threads_list=(1, 2), tokens: int = 128) -> list[dict]:
    """Tokens/s of one ``tokens``-token forward (prefill) through the compiled issue-21 model."""
    from lowc.backends.cpu_lut import runtime

    progs = compiled_llama(layers, 32000, 16)
    ids = torch.randint(0, 259, (1, tokens), generator=torch.Generator().manual_seed(0))
    big = str(tokens + 1)

    def lut_only(cm):
        def call():
            os.environ["LOWC_CPU_LUT_GEMM_MIN_M"] = big
            try:
                return cm(ids)
            finally:
                del os.environ["LOWC_CPU_LUT_GEMM_MIN_M"]
        return call

    def logits(o):
        return (o.logits if hasattr(o, "logits") else o[0] if isinstance(o, (tuple, list)) else o).float()

    rows = []
    for threads in threads_list:
        torch.set_num_threads(threads)
        runtime.set_num_threads(threads)
        fns = {}
        for t, cm in progs.items():
            fns[t] = lambda cm=cm: cm(ids)
            if t != "ref-fp32":
                fns[f"{t} (LUT kernel only)"] = lut_only(cm)
        with torch.no_grad():
            y = {k: fns[k]() for k in ("cpu-lut-w4", "cpu-lut-w4 (LUT kernel only)", "ref-fp32")}
            diff = {k: ((logits(y[k]) - logits(y["ref-fp32"])).norm() / logits(y["ref-fp32"]).norm()).item()
                    for k in ("cpu-lut-w4", "cpu-lut-w4 (LUT kernel only)")}
            lut = logits(y["cpu-lut-w4 (LUT kernel only)"])
            path_diff = ((logits(y["cpu-lut-w4"]) - lut).norm() / lut.norm()).item()
            med, best = timed(fns, repeat, warmup=1)
        for name, sec in med.items():
            rows.append({"threads": threads, "target": name, "tokens": tokens, "s": sec, "tokens_per_s": tokens / sec,
                         "tokens_per_s_best": tokens / best[name], "vs_ref_fp32": med["ref-fp32"] / sec,
                         "rel_logit_diff_vs_ref_fp32": diff.get(name),
                         "rel_logit_diff_gemm_vs_lut_only": path_diff if name == "cpu-lut-w4" else None})
        print(f"  prefill t{threads}: " + ", ".join(f"{a}={tokens / v:.1f} tok/s" for a, v in med.items()), flush=True)
        runtime.set_num_threads(None)
    return rows


def prefill_markdown(res: dict) -> str:
    m = res["machine"]
    out = ["# CPU LUT prefill: the GEMM path for large M (issue 21)", "",
           (f"- machine: {m.get('Model name')}, {m.get('CPU(s)')} CPUs, avx2={m.get('avx2')}, avx512f={m.get('avx512f')}; "
            f"torch {m['torch']}; GEMM tile dtype here: {res['gemm_dtype']}"),
           (f"- date: {res['date']}; load before: `{res['uptime_before']}`; after: `{res['uptime_after']}` "
            "(a shared machine: compare within a row, methods are interleaved)"),
           f"- command: `{res['command']}`",
           ("- kernels: W2/W4, groups of 128, asymmetric; `LUT` = the int8-table kernel (`runtime.run(gemm=False)`), "
            "`GEMM bf16`/`GEMM fp32` = `runtime.run_gemm` (weight tiles dequantized in C, "
            f"{res['tile_bytes'] >> 20} MiB, then `torch.mm`), `torch fp32` = `F.linear` on the float weight; "
            "median us per call"), ""]
    rows = res["sweep"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    by = {(r["threads"], r["shape"], r["M"], r["method"]): r["us"] for r in rows}
    for threads in dict.fromkeys(r["threads"] for r in rows):
        out += [f"## Per shape, {threads} thread{'s' if threads > 1 else ''} (us per call)", "",
                "| shape N x K | M | " + " | ".join(methods) + " |", "|---|---:|" + "---:|" * len(methods)]
        for shape, mm in dict.fromkeys((r["shape"], r["M"]) for r in rows if r["threads"] == threads):
            out.append(f"| {shape} | {mm} | " + " | ".join(f"{by[(threads, shape, mm, k)]:.0f}" for k in methods) + " |")
        out.append("")
    out += ["## Crossover M", "",
            ("Smallest M from which the GEMM path (bf16 tiles; fp32 tiles in brackets) is faster than the LUT kernel, "
             "resp. than torch fp32, at every larger M measured (`-`: not within the sweep)."), "",
            "| threads | shape | bits | GEMM < LUT from M | GEMM < torch fp32 from M |", "|---:|---|---:|---:|---:|"]
    fp = {(c["threads"], c["shape"], c["bits"]): c for c in res["crossover_fp32"]}
    for c in res["crossover"]:
        f = fp[(c["threads"], c["shape"], c["bits"])]
        out.append(f"| {c['threads']} | {c['shape']} | {c['bits']} | {c['gemm_beats_lut_from_M'] or '-'} "
                   f"({f['gemm_beats_lut_from_M'] or '-'}) | {c['gemm_beats_fp32_from_M'] or '-'} "
                   f"({f['gemm_beats_fp32_from_M'] or '-'}) |")
    out += ["", f"Threshold in use during the sweep (`runtime.GEMM_MIN_M`): {res['gemm_min_m']}", ""]
    if res.get("e2e"):
        run = res.get("e2e_run")
        out += [(f"## End to end: {res['e2e'][0]['tokens']}-token prefill, the issue's random Llama ({res['layers']} "
                 "layers, vocab 32000; lm_head float, the default)"), ""]
        if run:
            out += [(f"A later run with the committed thresholds and tiles ({run['tile_bytes'] >> 20} MiB, "
                     f"`GEMM_MIN_M` {run['gemm_min_m']}): {run['date']}, `{run['command']}`, load before "
                     f"`{run['uptime_before']}`, after `{run['uptime_after']}`."), ""]
        out += ["| threads | target | tokens/s (median) | tokens/s (best) | x vs ref-fp32 | rel. logit diff vs ref-fp32 |",
                "|---:|---|---:|---:|---:|---:|"]
        for r in res["e2e"]:
            d = "" if r["rel_logit_diff_vs_ref_fp32"] is None else f"{r['rel_logit_diff_vs_ref_fp32']:.4f}"
            if r.get("rel_logit_diff_gemm_vs_lut_only") is not None:
                d += f" (vs LUT only: {r['rel_logit_diff_gemm_vs_lut_only']:.4f})"
            out.append(f"| {r['threads']} | `{r['target']}` | {r['tokens_per_s']:.1f} | {r['tokens_per_s_best']:.1f} | "
                       f"{r['vs_ref_fp32']:.2f} | {d} |")
    return "\n".join(out) + "\n"


def markdown(res: dict) -> str:
    m = res["machine"]
    out = [f"# CPU LUT kernels (cpu-lut-w1..w4) vs torch", "",
           f"- machine: {m.get('Model name')}, {m.get('CPU(s)')} CPUs, avx2={m.get('avx2')}, fma={m.get('fma')}, "
           f"avx512f={m.get('avx512f')}; torch {m['torch']}",
           f"- date: {res['date']}; load before: `{res['uptime_before']}`; after: `{res['uptime_after']}`",
           f"- command: `{res['command']}`",
           "- 2 threads everywhere; median of the repeats, methods interleaved; shapes N x K = out x in "
           "(14336x4096 is the doc's \"4096x14336\" up-proj); groups of 128, asymmetric; weights read from DRAM "
           "(each call reads another copy, 96 MB cycled)",
           "- llama.cpp was not built here: its figures below are the reference doc's, measured on this machine "
           "(14336x4096, 2 threads): " + ", ".join(f"{k} ~{v} us" for k, v in LLAMA_CPP.items()), "",
           "## GEMV, M = 1", "",
           "| shape N x K | method | us (median) | us (best) | weight MB | GB/s | x vs torch fp32 | rel. err vs dequant |",
           "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in res["gemv"]:
        e = f"{r['rel_err_vs_dequant']:.4f}" if r["rel_err_vs_dequant"] is not None else ""
        out.append(f"| {r['shape']} | {r['method']} | {r['us']:.0f} | {r['us_best']:.0f} | {r['weight_MB']:.1f} | {r['GB_s']:.1f} | "
                   f"{r['speedup_vs_fp32']:.1f} | {e} |")
    out += ["", "## Group-sparse W4 S50 vs dense (same run, GEMV M = 1)", "",
            "Goals (issue 17): W4 S50 >= 1.2x faster than dense W2 and >= 1.8x faster than dense W4.", "",
            "Ratios of medians, and in brackets of the best of the repeats (less affected by other processes "
            "taking the cores).", "",
            "| shape N x K | W4 S50 us | vs LUT W2 | vs LUT W4 | vs torch fp32 | S50 MB / W2 MB / W4 MB |",
            "|---|---:|---:|---:|---:|---|"]
    by = {(r["shape"], r["method"]): r for r in res["gemv"]}
    for shape in dict.fromkeys(r["shape"] for r in res["gemv"]):
        s50 = next((r for (sh, m), r in by.items() if sh == shape and " S" in m), None)
        if s50 is None:
            continue
        w2, w4, fp = by[(shape, "lowc LUT W2")], by[(shape, "lowc LUT W4")], by[(shape, "torch fp32")]
        def ratio(r, digits=2):
            return f"{r['us'] / s50['us']:.{digits}f}x ({r['us_best'] / s50['us_best']:.{digits}f}x)"

        out.append(f"| {shape} | {s50['us']:.0f} ({s50['us_best']:.0f}) | {ratio(w2)} | {ratio(w4)} | {ratio(fp, 1)} | "
                   f"{s50['weight_MB']:.1f} / {w2['weight_MB']:.1f} / {w4['weight_MB']:.1f} |")
    if res.get("e2e"):
        out += ["", f"## End to end: random Llama-shaped model (hidden 2048, intermediate 5632, {res['layers']} layers), "
                "batch 1 x 1 token", "",
                "| target | ms/token | tokens/s | x vs fp32 | model MB |", "|---|---:|---:|---:|---:|"]
        for r in res["e2e"]:
            out.append(f"| `{r['target']}` | {r['ms_per_token']:.1f} | {r['tokens_per_s']:.1f} | "
                       f"{r['speedup_vs_fp32']:.2f} | {r['model_MB']:.0f} |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--no-e2e", action="store_true")
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument("--markdown-from", metavar="JSON", help="only rewrite cpu_lut.md from a results JSON")
    ap.add_argument("--prefill", action="store_true", help="the M sweep and 128-token prefill (cpu_lut_prefill.{md,json})")
    ap.add_argument("--e2e-only", action="store_true",
                    help="with --prefill: rerun only the 128-token prefill, keeping the sweep of cpu_lut_prefill.json")
    args = ap.parse_args()
    if args.prefill:
        prefill_main(args)
        return
    if args.markdown_from:
        with open(args.markdown_from) as f:
            md = markdown(json.load(f))
        with open(os.path.join(args.out, "cpu_lut.md"), "w") as f:
            f.write(md)
        print(md)
        return
    torch.set_num_threads(2)
    os.environ.setdefault("LOWC_CPU_LUT_THREADS", "2")
    res = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": shlex.join(["python", *sys.argv]),
           "machine": machine(), "layers": args.layers}
    res["uptime_before"] = res["machine"]["uptime"]
    print(f"load: {res['uptime_before']}", flush=True)
    res["gemv"] = gemv(args.repeat)
    res["e2e"] = None if args.no_e2e else end_to_end(max(10, args.repeat // 2), args.layers)
    res["uptime_after"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    res["llama_cpp_reference_us_14336x4096"] = LLAMA_CPP
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "cpu_lut.json"), "w") as f:
        json.dump(res, f, indent=2)
    md = markdown(res)
    with open(os.path.join(args.out, "cpu_lut.md"), "w") as f:
        f.write(md)
    print(md)


def prefill_main(args) -> None:
    from lowc.backends.cpu_lut import runtime

    if args.e2e_only:
        with open(os.path.join(args.out, "cpu_lut_prefill.json")) as f:
            res = json.load(f)
        res["e2e_run"] = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                          "command": shlex.join(["python", *sys.argv]), "tile_bytes": runtime.GEMM_TILE_BYTES,
                          "gemm_min_m": {str(k): v for k, v in runtime.GEMM_MIN_M.items()},
                          "uptime_before": machine()["uptime"]}
        res["e2e"] = prefill_e2e(max(3, args.repeat // 10), args.layers)
        res["e2e_run"]["uptime_after"] = subprocess.run(["uptime"], check=False, capture_output=True, text=True).stdout.strip()
        _write_prefill(res, args.out)
        return
    res = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": shlex.join(["python", *sys.argv]), "machine": machine(), "layers": args.layers,
           "gemm_dtype": str(runtime.gemm_dtype()), "tile_bytes": runtime.GEMM_TILE_BYTES,
           "gemm_min_m": {str(k): v for k, v in runtime.GEMM_MIN_M.items()}}
    res["uptime_before"] = res["machine"]["uptime"]
    print(f"load: {res['uptime_before']}", flush=True)
    res["sweep"] = prefill_sweep(max(3, args.repeat // 5))
    res["crossover"] = crossovers(res["sweep"], "bf16")
    res["crossover_fp32"] = crossovers(res["sweep"], "fp32")
    res["e2e"] = None if args.no_e2e else prefill_e2e(max(3, args.repeat // 10), args.layers)
    res["uptime_after"] = subprocess.run(["uptime"], check=False, capture_output=True, text=True).stdout.strip()
    _write_prefill(res, args.out)


def _write_prefill(res: dict, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "cpu_lut_prefill.json"), "w") as f:
        json.dump(res, f, indent=2)
    md = prefill_markdown(res)
    with open(os.path.join(out, "cpu_lut_prefill.md"), "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
