"""GPTQ on one Llama-sized linear on CPU, side by side with RTN in the same run.

    python benchmarks/gptq_speed.py [--n 4096] [--k 4096] [--tokens 2048]

Reports the seconds to accumulate the Hessian from ``tokens`` calibration rows and to quantize
(4-bit, g128, asymmetric, with and without act-order), and each method's output error on held-out
rows relative to RTN. Writes benchmarks/results/gptq_speed.{md,json}.
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

from lowc.ir.dialect import quant
from lowc.passes.quant.gptq import gptq_quantize


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=2048)
    args = ap.parse_args()
    torch.manual_seed(0)
    n, k = args.n, args.k
    # weights with per-input-channel scale spread and correlated activations with outlier channels,
    # so the Hessian is far from identity as in real LLM layers
    w = torch.randn(n, k) * 0.02 * torch.exp(torch.randn(k) * 0.3)
    mix = torch.randn(k, 64) / 8
    def acts(m):
        return torch.randn(m, k) + torch.randn(m, 64) @ mix.t() * 4 + (torch.rand(k) < 0.01) * 20.0
    x, held = acts(args.tokens), acts(512)
    rows = []
    t0 = time.perf_counter()
    H = 2 * x.t() @ x / x.shape[0]
    t_h = time.perf_counter() - t0

    def err(qw):
        wq = quant.dequantize(qw.qweight, qw.scales, qw.zeros, qw.bits, qw.group_size, qw.in_features, torch.float32)
        return ((held @ w.t() - held @ wq.t()) ** 2).mean().item()

    t0 = time.perf_counter()
    qr = quant.rtn_quantize(w, 4, 128, False)
    rows.append({"method": "rtn", "seconds": time.perf_counter() - t0, "err": err(qr)})
    for ao in (False, True):
        t0 = time.perf_counter()
        qg, _ = gptq_quantize(w, H, 4, 128, False, act_order=ao)
        rows.append({"method": "gptq" + (" act_order" if ao else ""), "seconds": time.perf_counter() - t0, "err": err(qg)})
    for r in rows:
        r["err_vs_rtn"] = r["err"] / rows[0]["err"]
    info = {
        "command": "python " + " ".join(sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "load": os.getloadavg(),
        "shape": [n, k], "tokens": args.tokens, "hessian_seconds": t_h, "rows": rows,
    }
    os.makedirs(os.path.join(os.path.dirname(__file__), "results"), exist_ok=True)
    base = os.path.join(os.path.dirname(__file__), "results", "gptq_speed")
    with open(base + ".json", "w") as f:
        json.dump(info, f, indent=2)
    lines = [f"# GPTQ speed on one {n}x{k} linear (CPU)", "",
             f"Command: `{info['command']}`  ", f"Machine: {info['machine']}; date {info['date']}; load {info['load']}", "",
             f"Hessian from {args.tokens} tokens: {t_h:.2f} s", "",
             "| method (W4 g128 asym) | seconds | held-out output MSE vs RTN |", "|---|---:|---:|"]
    lines += [f"| {r['method']} | {r['seconds']:.2f} | {r['err_vs_rtn']:.3f}x |" for r in rows]
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
