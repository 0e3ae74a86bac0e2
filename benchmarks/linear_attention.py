"""Linear attention (``lowc::linear_attention``) vs softmax attention: time against sequence length and
decode memory per generated token.

    python benchmarks/linear_attention.py [--parts cpu,decode,cuda] [--lengths 1024,...,32768] [--threads N]

Parts (each writes its section of benchmarks/results/linear_attention.{json,md}; sections not run
this time are kept from the previous file, so the CPU and GPU runs can be made on different machines):

* ``cpu``: forward time of the chunked plain-PyTorch form (the op's registered implementation; causal,
  window 0 = Hedgehog form, window 64 = LoLCATs hybrid) vs causal ``F.scaled_dot_product_attention``
  (fp32), B=1, H=4, D=Dv=64, F=128 (LoLCATs' 2x64 features), lengths 1k..32k; log-log slopes and
  the crossover length. Also the Mamba-2 SSD mixer ``lowc::ssd`` (its chunked form, chunk 64;
  ``C``, ``B``, ``x`` = the same q, k, v, so N = P = 64, per-token decays ``a``, no convolutions).
* ``cuda``: the Triton kernel vs SDPA (FlashAttention backend), bf16, B=1, H=32, D=Dv=128, F=128,
  ``triton.testing.do_bench``; same lengths, slopes and crossover. Refuses clearly without CUDA. Also
  ``lowc::ssd``'s Triton kernel (N = P = 128) vs SDPA and vs its chunked PyTorch form on CUDA, and the
  peers' SSD kernels when importable (flash-linear-attention's ``chunk_simple_gla``, mamba_ssm's
  ``mamba_chunk_scan_combined``; columns left empty otherwise).
* ``decode``: memory of generating N tokens (N = 1..4096) with the recurrent state
  (:mod:`lowc.runtime.state`) vs a softmax KV cache, one layer, B=1, H=Hk=8,
  D=Dv=64, F=128, window 64, fp32: bytes by tensor sizes, and the live/peak tensor bytes of a real
  decode loop (a dispatch-mode tracker of live tensor storages on CPU; ``torch.cuda`` allocator
  statistics on CUDA).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
import weakref

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "linear_attention")
LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768)


def _features(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    y = x @ w
    return torch.cat([torch.softmax(y, -1), torch.softmax(-y, -1)], -1)


def _operands(length, h, d, f, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(1, h, length, d, generator=g)
    k = torch.randn(1, h, length, d, generator=g)
    v = torch.randn(1, h, length, d, generator=g)
    w = torch.randn(d, f // 2, generator=g) / math.sqrt(d)
    fq, fk = _features(q, w), _features(k, w)
    return [t.to(device=device, dtype=dtype) for t in (q, k, v, fq, fk)]


def _log_decay(length, h, device, seed=1):
    """SSD per-token log-decays ``a = -softplus(dt)`` ``[1, H, L]`` fp32 (Mamba-2's range)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    return (-F.softplus(torch.randn(1, h, length, generator=g) - 2.0)).to(device)


def _median_time(fn, reps: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2]


def _slope(rows, key, lo=None):
    """Least-squares slope of log(time) vs log(length) over rows with length >= lo."""
    pts = [(math.log(r["length"]), math.log(r[key])) for r in rows if r.get(key) and (lo is None or r["length"] >= lo)]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)


def _crossover(rows, ours, theirs):
    """First measured length where ``ours`` is faster than ``theirs`` (and stays so), else None."""
    hit = None
    for r in rows:
        if r.get(ours) is None or r.get(theirs) is None:
            continue
        if r[ours] < r[theirs]:
            hit = hit or r["length"]
        else:
            hit = None
    return hit


# ---------------------------------------------------------------------------------------------- time


def run_cpu(lengths, reps, max_sdpa_seconds):
    from lowc.ir.dialect import ensure_registered

    ensure_registered()
    op = torch.ops.lowc.linear_attention
    ssd = torch.ops.lowc.ssd
    h, d, f = 4, 64, 128
    rows, skipped = [], []
    sdpa_too_slow = False
    for length in lengths:
        q, k, v, fq, fk = _operands(length, h, d, f, torch.float32, "cpu")
        row = {"length": length}
        with torch.inference_mode():
            for w in (0, 64):
                row[f"linear_w{w}_s"] = _median_time(
                    lambda: op(fq, fk, v, q if w else None, k if w else None, None, None, None, True, w, d ** -0.5, 1e-6), reps)
            a, kk = _log_decay(length, h, "cpu"), k * d ** -0.5
            row["ssd_s"] = _median_time(lambda: ssd(q, kk, v, a), reps)
            if sdpa_too_slow:
                skipped.append(f"sdpa at {length}: the previous length took > {max_sdpa_seconds} s (quadratic)")
            else:
                row["sdpa_s"] = _median_time(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), reps)
                sdpa_too_slow = row["sdpa_s"] * 4 > max_sdpa_seconds
        rows.append(row)
        print(f"cpu L={length}: " + ", ".join(f"{k_}={v_ * 1e3:.1f} ms" for k_, v_ in row.items() if k_ != "length"), flush=True)
        del q, k, v, fq, fk
    return {
        "config": f"B=1, H={h}, D=Dv={d}, F={f} (softmax_f features), causal, fp32, {torch.get_num_threads()} threads; "
                  f"SSD: H=G={h}, N=P={d}, chunk 64, no convolutions",
        "rows": rows, "skipped": skipped,
        "slopes": {key: _slope(rows, key) for key in ("linear_w0_s", "linear_w64_s", "ssd_s", "sdpa_s")},
        "slopes_from_4k": {key: _slope(rows, key, 4096) for key in ("linear_w0_s", "linear_w64_s", "ssd_s", "sdpa_s")},
        "crossover": {**{w: _crossover(rows, f"linear_{w}_s", "sdpa_s") for w in ("w0", "w64")},
                      "ssd": _crossover(rows, "ssd_s", "sdpa_s")},
    }


def run_cuda(lengths):
    if not torch.cuda.is_available():
        raise SystemExit("linear_attention benchmark: the 'cuda' part needs an NVIDIA GPU (torch.cuda.is_available() "
                         "is False); run --parts cpu,decode here and --parts cuda on a GPU machine")
    import triton.testing

    from lowc.backends.triton.linear_attention import linear_attention_triton
    from lowc.backends.triton.ssd import ssd_triton
    from lowc.ir.dialect.linear_attention_chunked import chunked_linear_attention
    from lowc.ir.dialect.ssd import chunked_ssd

    h, d, f = 32, 128, 128
    peers = _ssd_peers()
    rows = []
    for length in lengths:
        q, k, v, fq, fk = _operands(length, h, d, f, torch.bfloat16, "cuda")
        row = {"length": length}
        for w in (0, 64):
            args = (fq, fk, v, q if w else None, k if w else None, None, None, None, True, w, d ** -0.5, 1e-6)
            row[f"triton_w{w}_s"] = triton.testing.do_bench(lambda: linear_attention_triton(*args)) / 1e3
            if length <= 8192:
                row[f"chunked_torch_w{w}_s"] = triton.testing.do_bench(lambda: chunked_linear_attention(*args)) / 1e3
        row["sdpa_s"] = triton.testing.do_bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)) / 1e3
        a = _log_decay(length, h, "cuda")
        kk = k * d ** -0.5
        row["ssd_triton_s"] = triton.testing.do_bench(lambda: ssd_triton(q, kk, v, a)) / 1e3
        if length <= 8192:
            row["ssd_chunked_torch_s"] = triton.testing.do_bench(lambda: chunked_ssd(q, kk, v, a)) / 1e3
            ref = chunked_ssd(q, kk, v, a).float()  # the kernel checked on this GPU too: relative max error
            row["ssd_triton_rel_err"] = ((ssd_triton(q, kk, v, a).float() - ref).abs().max() / ref.abs().max()).item()
        for name, fn in peers.items():
            try:
                call = fn(q, kk, v, a)
                row[f"ssd_{name}_s"] = triton.testing.do_bench(call) / 1e3
            except Exception as e:  # a peer's version or shape limits: recorded, not fatal
                row[f"ssd_{name}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        rows.append(row)
        print(f"cuda L={length}: " + ", ".join(f"{k_}={v_ * 1e6:.0f} us" for k_, v_ in row.items() if k_.endswith("_s")), flush=True)
        del q, k, v, fq, fk
        torch.cuda.empty_cache()
    return {
        "config": f"B=1, H={h}, D=Dv={d}, F={f}, causal, bf16, {torch.cuda.get_device_name()}, "
                  f"triton {triton.__version__}, triton.testing.do_bench; SSD: H=G={h}, N=P={d}, chunk 64; "
                  f"peers: {', '.join(peers) or 'none importable'}",
        "rows": rows,
        "slopes": {key: _slope(rows, key) for key in ("triton_w0_s", "triton_w64_s", "ssd_triton_s", "sdpa_s")},
        "slopes_from_4k": {key: _slope(rows, key, 4096) for key in ("triton_w0_s", "triton_w64_s", "ssd_triton_s", "sdpa_s")},
        "crossover": {**{w: _crossover(rows, f"triton_{w}_s", "sdpa_s") for w in ("w0", "w64")},
                      "ssd": _crossover(rows, "ssd_triton_s", "sdpa_s")},
    }


def _ssd_peers() -> dict:
    """The peers' SSD / scalar-decay linear-attention kernels that import here: name -> a function of our
    operands (``C, B, x [1, H, L, D]`` bf16, ``a [1, H, L]``) returning a closure to time (layouts
    converted outside the timing). Same token mixing as ``lowc::ssd`` without D (mamba_ssm scales x by
    dt = -a internally: same work)."""
    peers = {}
    try:
        from fla.ops.simple_gla import chunk_simple_gla  # optional: flash-linear-attention

        def fla(c, b, x, a):
            q, k, v, g = (t.transpose(1, 2).contiguous() for t in (c, b, x, a))
            return lambda: chunk_simple_gla(q, k, v, g=g, scale=1.0)

        peers["fla"] = fla
    except ImportError:
        pass
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined  # optional: mamba_ssm

        def mamba(c, b, x, a):
            cc, bb, xx = (t.transpose(1, 2).contiguous() for t in (c, b, x))
            dt = (-a).transpose(1, 2).contiguous()
            big_a = -torch.ones(a.shape[1], device=a.device)
            return lambda: mamba_chunk_scan_combined(xx, dt, big_a, bb, cc, chunk_size=64)

        peers["mamba_ssm"] = mamba
    except ImportError:
        pass
    return peers


# ---------------------------------------------------------------------------------------------- decode


class LiveBytes(TorchDispatchMode):
    """Live and peak bytes of the tensor storages produced inside the mode (CPU or any device).

    Each op output is keyed by its storage pointer; a storage is live while any Python tensor seen
    holding it is alive (``weakref.finalize`` on the tensors). Counts what tensors hold, not allocator
    slack."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[int, int] = {}
        self._size: dict[int, int] = {}

    def _drop(self, key):
        self._refs[key] -= 1
        if self._refs[key] == 0:
            self.live -= self._size.pop(key)
            del self._refs[key]

    def track(self, t: torch.Tensor):
        st = t.untyped_storage()
        key = st.data_ptr()
        if key == 0:
            return
        if key not in self._refs:
            self._refs[key] = 0
            self._size[key] = st.nbytes()
            self.live += st.nbytes()
            self.peak = max(self.peak, self.live)
        self._refs[key] += 1
        weakref.finalize(t, self._drop, key)

    def reset_peak(self):
        self.peak = self.live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.track(t)
        return out


def run_decode(max_tokens, device):
    from lowc.runtime.state import LinearAttentionState, step

    h, d, f, w = 8, 64, 128, 64
    marks = sorted({1, *[2 ** i for i in range(0, 13) if 2 ** i <= max_tokens], max_tokens})
    per_token_kv = 2 * h * d * 4  # k and v, fp32
    cuda = device == "cuda"
    g = torch.Generator(device="cpu").manual_seed(0)
    tokens = [[t.to(device) for t in (torch.randn(1, h, 1, d, generator=g), torch.randn(1, h, 1, d, generator=g),
                                       torch.randn(1, h, 1, d, generator=g))] for _ in range(64)]
    wmap = torch.randn(d, f // 2, generator=g).to(device) / math.sqrt(d)

    def measure(loop_step, make_state):
        out = {}
        with torch.inference_mode():
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                state = make_state()
                for n in range(1, max_tokens + 1):
                    torch.cuda.reset_peak_memory_stats()
                    loop_step(state, n)
                    if n in marks:
                        out[n] = {"live_bytes": torch.cuda.memory_allocated() - base,
                                  "peak_bytes": torch.cuda.max_memory_allocated() - base, "state_bytes": held(state)}
            else:
                with LiveBytes() as mode:
                    state = make_state()
                    for n in range(1, max_tokens + 1):
                        mode.reset_peak()
                        loop_step(state, n)
                        if n in marks:
                            out[n] = {"live_bytes": mode.live, "peak_bytes": mode.peak, "state_bytes": held(state)}
        return out

    def held(state):
        if isinstance(state, dict):  # KV cache: the used part (capacity is reported as live bytes)
            return state["n"] * per_token_kv
        return state.nbytes()

    # recurrent linear attention (LoLCATs hybrid, window 64)
    def la_make():
        return LinearAttentionState.empty(1, h, f, d, d, window=w, scale=d ** -0.5, eps=1e-6, device=device)

    def la_step(st, n):
        q, k, v = tokens[n % 64]
        step(st, _features(q, wmap), _features(k, wmap), v, q, k)

    # softmax attention with a KV cache that grows by doubling (amortised O(1) appends, like a vector)
    def kv_make():
        return {"k": torch.empty(1, h, 16, d, device=device), "v": torch.empty(1, h, 16, d, device=device), "n": 0}

    def kv_step(c, n):
        q, k, v = tokens[n % 64]
        i = c["n"]
        if i == c["k"].shape[2]:
            for name in ("k", "v"):
                grown = torch.empty(1, h, 2 * i, d, device=device)
                grown[:, :, :i] = c[name]
                c[name] = grown
        c["k"][:, :, i] = k[:, :, 0]
        c["v"][:, :, i] = v[:, :, 0]
        c["n"] = i + 1
        F.scaled_dot_product_attention(q, c["k"][:, :, : i + 1], c["v"][:, :, : i + 1])

    t0 = time.perf_counter()
    la = measure(la_step, la_make)
    t_la = time.perf_counter() - t0
    t0 = time.perf_counter()
    kv = measure(kv_step, kv_make)
    t_kv = time.perf_counter() - t0
    rows = [{"tokens": n,
             "linear_state_bytes": la[n]["state_bytes"], "linear_live_bytes": la[n]["live_bytes"],
             "linear_peak_bytes": la[n]["peak_bytes"],
             "kv_cache_bytes": kv[n]["state_bytes"], "kv_live_bytes": kv[n]["live_bytes"], "kv_peak_bytes": kv[n]["peak_bytes"]}
            for n in marks]
    return {
        "config": f"one layer, B=1, H=Hk={h}, D=Dv={d}, F={f}, window {w}, fp32, {device}; "
                  f"{'torch.cuda allocator statistics' if cuda else 'live tensor storages (dispatch-mode tracker)'}",
        "rows": rows, "seconds": {"linear": t_la, "kv_cache": t_kv},
        "per_token_kv_bytes": per_token_kv,
    }


# ---------------------------------------------------------------------------------------------- report


def _fmt_ms(s):
    return "–" if s is None else (f"{s * 1e3:.1f}" if s >= 0.01 else f"{s * 1e3:.3f}")


def _fmt_slope(x):
    return "–" if x is None else f"{x:.2f}"


def render(res) -> str:
    lines = ["# Linear attention vs softmax attention", ""]
    for key, title in (("cpu", "CPU: chunked plain-PyTorch form vs SDPA"), ("cuda", "GPU: Triton kernel vs SDPA (FlashAttention)"),
                       ("decode", "Decode memory per generated token")):
        sec = res.get(key)
        lines += [f"## {title}", ""]
        if sec is None:
            why = "not run yet (no CUDA on the machine that ran this benchmark)" if key == "cuda" else "not run"
            lines += [f"_{why}; `python benchmarks/linear_attention.py --parts {key}`_", ""]
            continue
        lines += [f"Command: `{sec['command']}`  ", f"Machine: {sec['machine']}; date {sec['date']}; load {sec['load']}  ",
                  f"Config: {sec['config']}", ""]
        if key == "cpu":
            lines += ["| length | linear w=0 ms | linear w=64 ms | SSD (lowc::ssd) ms | SDPA causal ms | SDPA / linear w=64 | SDPA / SSD |",
                      "|---:|---:|---:|---:|---:|---:|---:|"]
            for r in sec["rows"]:
                ratio = f"{r['sdpa_s'] / r['linear_w64_s']:.2f}x" if r.get("sdpa_s") else "–"
                ratio_ssd = f"{r['sdpa_s'] / r['ssd_s']:.2f}x" if r.get("sdpa_s") and r.get("ssd_s") else "–"
                lines.append(f"| {r['length']} | {_fmt_ms(r['linear_w0_s'])} | {_fmt_ms(r['linear_w64_s'])} | {_fmt_ms(r.get('ssd_s'))} "
                             f"| {_fmt_ms(r.get('sdpa_s'))} | {ratio} | {ratio_ssd} |")
        elif key == "cuda":
            lines += ["| length | Triton w=0 µs | Triton w=64 µs | chunked torch w=64 µs | SDPA µs | SDPA / Triton w=64 |", "|---:|---:|---:|---:|---:|---:|"]
            for r in sec["rows"]:
                us = lambda x: "–" if x is None else f"{x * 1e6:.0f}"  # noqa: E731
                lines.append(f"| {r['length']} | {us(r['triton_w0_s'])} | {us(r['triton_w64_s'])} | {us(r.get('chunked_torch_w64_s'))} "
                             f"| {us(r['sdpa_s'])} | {r['sdpa_s'] / r['triton_w64_s']:.2f}x |")
            if any("ssd_triton_s" in r for r in sec["rows"]):
                lines += ["", "SSD mixer (`lowc::ssd`):", "",
                          "| length | SSD Triton µs | SSD chunked torch µs | fla chunk_simple_gla µs | mamba_ssm chunk scan µs "
                          "| SDPA µs | SDPA / SSD Triton |", "|---:|---:|---:|---:|---:|---:|---:|"]
                for r in sec["rows"]:
                    lines.append(f"| {r['length']} | {us(r.get('ssd_triton_s'))} | {us(r.get('ssd_chunked_torch_s'))} "
                                 f"| {us(r.get('ssd_fla_s'))} | {us(r.get('ssd_mamba_ssm_s'))} | {us(r['sdpa_s'])} "
                                 f"| {r['sdpa_s'] / r['ssd_triton_s']:.2f}x |")
                errs = [r["ssd_triton_rel_err"] for r in sec["rows"] if "ssd_triton_rel_err" in r]
                if errs:
                    lines += ["", f"SSD Triton vs the chunked torch form (bf16 outputs), largest max|diff| / max|y|: {max(errs):.2g}."]
        if key in ("cpu", "cuda"):
            lines += ["", "Log-log slope of time vs length (1 = linear, 2 = quadratic): all lengths "
                      + ", ".join(f"{k_.removesuffix('_s')} {_fmt_slope(v_)}" for k_, v_ in sec["slopes"].items())
                      + "; from 4k " + ", ".join(f"{k_.removesuffix('_s')} {_fmt_slope(v_)}" for k_, v_ in sec["slopes_from_4k"].items()) + ".  ",
                      "Crossover (first length from which linear attention / SSD is faster than SDPA, and stays so): "
                      + ", ".join(f"{w} {c if c else 'not within the lengths measured'}" for w, c in sec["crossover"].items()) + "."]
            if sec.get("skipped"):
                lines += ["", "Skipped: " + "; ".join(sec["skipped"]) + "."]
        if key == "decode":
            lines += ["| tokens generated | linear state KiB | linear live KiB | linear peak KiB | KV cache used KiB | KV live KiB | KV peak KiB |",
                      "|---:|---:|---:|---:|---:|---:|---:|"]
            kib = lambda x: f"{x / 1024:.1f}"  # noqa: E731
            for r in sec["rows"]:
                lines.append(f"| {r['tokens']} | {kib(r['linear_state_bytes'])} | {kib(r['linear_live_bytes'])} | {kib(r['linear_peak_bytes'])} "
                             f"| {kib(r['kv_cache_bytes'])} | {kib(r['kv_live_bytes'])} | {kib(r['kv_peak_bytes'])} |")
            first, last = sec["rows"][0], sec["rows"][-1]
            lines += ["", f"From {first['tokens']} to {last['tokens']} tokens the recurrent path's live bytes go "
                      f"{kib(first['linear_live_bytes'])} → {kib(last['linear_live_bytes'])} KiB (constant: S, z and the 64-token window), "
                      f"the KV cache's {kib(first['kv_live_bytes'])} → {kib(last['kv_live_bytes'])} KiB "
                      f"({sec['per_token_kv_bytes']} bytes per token used, capacity doubling)."]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default="cpu,decode" + (",cuda" if torch.cuda.is_available() else ""),
                    help="comma-separated: cpu, decode, cuda")
    ap.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: OMP_NUM_THREADS or torch's)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--max-sdpa-seconds", type=float, default=60.0,
                    help="CPU: skip SDPA at a length whose predicted time (4x the previous) exceeds this")
    ap.add_argument("--decode-tokens", type=int, default=4096)
    ap.add_argument("--decode-device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    bad = set(parts) - {"cpu", "cuda", "decode"}
    if bad:
        raise SystemExit(f"linear_attention benchmark: unknown part(s) {sorted(bad)}; choose from cpu, cuda, decode")
    if "cuda" in parts and not torch.cuda.is_available():
        run_cuda([])  # raises the explanation
    lengths = [int(x) for x in args.lengths.split(",")]
    try:
        with open(RESULTS + ".json") as fh:
            res = json.load(fh)
    except (OSError, ValueError):
        res = {}
    stamp = {
        "command": "python " + " ".join(sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared with other jobs), torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads",
        "load": [round(x, 2) for x in os.getloadavg()],
    }
    torch.manual_seed(0)
    for part in parts:
        if part == "cpu":
            res["cpu"] = {**stamp, **run_cpu(lengths, args.reps, args.max_sdpa_seconds)}
        elif part == "cuda":
            res["cuda"] = {**stamp, **run_cuda(lengths)}
        else:
            res["decode"] = {**stamp, **run_decode(args.decode_tokens, args.decode_device)}
        os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
        with open(RESULTS + ".json", "w") as fh:
            json.dump(res, fh, indent=2)
        with open(RESULTS + ".md", "w") as fh:
            fh.write(render(res))
    print(render(res))


if __name__ == "__main__":
    main()
