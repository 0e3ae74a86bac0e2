"""Triton W4A16 (and W8A16) linears (``cuda-w4a16``/``cuda-w8a16``) vs cuBLAS fp16 and torch's int4 kernel.

Linear mode (default; needs a CUDA GPU): the Llama-3-8B projections, written ``N x K`` = out x in
(4096x4096 q/o, 14336x4096 gate/up, 4096x14336 down, 128256x4096 lm_head), at M = 1, 4, 16, 64, 256,
2048 rows, all in one process:

* ``fp16``: ``F.linear(x, W)`` with W float16 (cuBLAS);
* ``lowc``: ``lowc.backends.triton.wq.linear`` on random codes in the kernels' layout (4 bits, groups
  of 128, asymmetric; ``--bits 8`` per channel, symmetric), fp16 activations; autotuned (and cached,
  ``$LOWC_CACHE_DIR/triton/autotune.json``) before timing, the chosen configuration is reported;
* ``torch int4``: ``torch._weight_int4pack_mm`` (tinygemm, what torchao's int4 weight-only path
  calls), groups of 128, bf16 activations (its CUDA kernel's dtype), the same codes/scales/zeros.

Times are ``triton.testing.do_bench`` medians (the L2 cache is flushed before every call, so weights
come from HBM), in microseconds; ``--cuda-graph`` uses ``do_bench_cudagraph`` instead (no launch
overhead, no flush). ``GB/s`` counts the bytes a kernel must move (packed weights + scales + zeros +
activations + output) over its time; its fraction is given of the device-to-device copy bandwidth
measured in the same run (read + write bytes over time: what is actually reachable) and of the
nominal HBM peak. A correctness check per shape compares lowc and torch int4 with dequantize +
``F.linear``. Goals (issue 5, H100): M=1 >= 3.7x fp16 and >= 85% of the copy bandwidth; M=16 >= 1.5x;
M=2048 >= 0.9x; faster than torch int4 at every M. Writes ``benchmarks/results/triton_linear.{md,json}``.

Decode mode (``--decode``; needs a GPU): a random-weight Llama (``--decode-model``, default the
Llama-3.2-1B shapes) in fp16, compiled with ``cuda-w4a16`` (RTN) on the GPU, rebuilt for generation
with transformers' KV cache (:mod:`lowc.runtime.hf_rebuild`), greedy decode tokens/s vs the fp16
model with the same cache and settings. Writes ``benchmarks/results/triton_decode.{md,json}``.

Sparse mode (``--sparse``; needs a GPU): group-sparse W4 (GQSA layout: 50% of the groups of 16
inputs dropped per row, ``--sparsity``, a scale and zero point per kept group of 16) through
``lowc.backends.triton.gsq.linear`` vs the dense W4 g128 kernel (``wq.linear``) and fp16 ``F.linear``
on the issue-17 shapes (4096x4096, 14336x4096, 4096x14336), M = 1, 4, 16, 256, 2048, one process,
the same timer; random kept groups and codes; a check against the reference op per shape. Writes
``benchmarks/results/triton_sparse.{md,json}``. ``--sparse --interpret-smoke`` checks that harness on
the CPU.

No GPU: ``--interpret-smoke`` runs tiny shapes through the same harness under ``TRITON_INTERPRET=1``
on the CPU (checks the harness and the numbers, labelled NOT PERFORMANCE, writes nothing);
``--compile-check`` compiles every autotune candidate for ``sm_90`` ahead of time (shared memory,
PTX instruction counts).

    python benchmarks/triton_linear.py                    # linear table (GPU)
    python benchmarks/triton_linear.py --decode           # decode tokens/s (GPU)
    python benchmarks/triton_linear.py --interpret-smoke  # harness check on a CPU
    python benchmarks/triton_linear.py --sparse           # group-sparse W4 S50 vs dense W4 vs fp16 (GPU)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (128256, 4096)]  # (N out, K in)
MS = [1, 4, 16, 64, 256, 2048]
SPARSE_SHAPES = SHAPES[:3]  # issue 17: the projections without lm_head
SPARSE_MS = [1, 4, 16, 256, 2048]
#: nominal HBM bandwidth (bytes/s) by a substring of torch.cuda.get_device_name
HBM_PEAK = [("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("A100-SXM4-80GB", 2.04e12),
            ("A100 80GB PCIe", 1.94e12), ("A100", 1.56e12), ("L40S", 0.864e12), ("A10", 0.6e12)]
GOALS = {1: 3.7, 16: 1.5, 2048: 0.9}
DECODE_MODELS = {
    # name: (hidden, intermediate, layers, heads, kv heads, vocab)
    "llama3-8b": (4096, 14336, 32, 32, 8, 128256),
    "llama3.2-1b": (2048, 8192, 16, 32, 8, 128256),
    "tiny": (256, 768, 4, 8, 4, 512),
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=None, help="comma-separated NxK list (default: the Llama-3-8B projections)")
    ap.add_argument("--ms", default=None, help="comma-separated M values (default 1,4,16,64,256,2048)")
    ap.add_argument("--bits", type=int, default=4, choices=(4, 8))
    ap.add_argument("--dtype", default="float16", choices=("float16", "bfloat16"), help="activations of fp16/lowc")
    ap.add_argument("--no-peer", action="store_true", help="skip torch._weight_int4pack_mm")
    ap.add_argument("--cuda-graph", action="store_true", help="time with do_bench_cudagraph (no L2 flush)")
    ap.add_argument("--out", default=RESULTS, help="results directory")
    ap.add_argument("--decode", action="store_true", help="decode tokens/s of a compiled model vs fp16")
    ap.add_argument("--decode-model", default="llama3.2-1b", choices=sorted(DECODE_MODELS))
    ap.add_argument("--prompt", type=int, default=32, help="decode: prompt tokens")
    ap.add_argument("--new-tokens", type=int, default=64, help="decode: generated tokens timed")
    ap.add_argument("--cache", default="static", choices=("static", "dynamic"), help="decode: transformers cache")
    ap.add_argument("--torch-compile", action="store_true",
                    help="decode: let transformers torch.compile the forward (CUDA graphs) for both models")
    ap.add_argument("--sparse", action="store_true", help="group-sparse W4 (GQSA) vs dense W4 and fp16")
    ap.add_argument("--sparsity", type=float, default=0.5, help="sparse: fraction of groups dropped per row")
    ap.add_argument("--sparse-group", type=int, default=16, help="sparse: inputs per kept/dropped group")
    ap.add_argument("--interpret-smoke", action="store_true",
                    help="tiny shapes under TRITON_INTERPRET=1 on the CPU: checks the harness, NOT performance")
    ap.add_argument("--compile-check", type=int, nargs="?", const=90, default=None, metavar="ARCH",
                    help="compile every autotune candidate for sm_ARCH (default 90) without a GPU")
    return ap.parse_args(argv)


def _pairs(text, default):
    if not text:
        return default
    return [tuple(int(v) for v in s.lower().split("x")) for s in text.split(",")]


def _ints(text, default):
    return default if not text else [int(v) for v in text.split(",")]


def command_line() -> str:
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:])


# ---- operands ---------------------------------------------------------------------------------------------
def make_operands(n, k, bits, dtype, device, gs=128, seed=0):
    """Random codes in the kernels' layout (and the same weight for the peer): a dict of tensors."""
    import torch

    from lowc.backends.triton import layout

    g = torch.Generator(device=device).manual_seed(seed)
    p = 32 // bits
    if bits == 8:  # per channel, symmetric
        gs = k
    n_groups = k // gs
    words = torch.randint(-2**31, 2**31 - 1, (k // p, n), generator=g, device=device, dtype=torch.int32)
    scales = (torch.rand(n_groups, n, generator=g, device=device) * 0.01 + 0.001).to(dtype)
    zeros = None if bits == 8 else torch.randint(0, 16, (n_groups, n), generator=g, device=device,
                                                 dtype=torch.int32).to(torch.uint8)
    return {"qweight": words, "scales": scales, "zeros": zeros, "bits": bits, "group_size": gs, "k": k, "n": n,
            "unpack": lambda: layout.unpack_words(words, bits)}


def dequantized(ops, dtype):
    """[N, K] weight the operands stand for (the reference arithmetic)."""
    codes = ops["unpack"]().float()
    n, k, gs = ops["n"], ops["k"], ops["group_size"]
    s = ops["scales"].float().t().repeat_interleave(gs, dim=1)
    z = (ops["zeros"].float().t().repeat_interleave(gs, dim=1) if ops["zeros"] is not None
         else torch_full(codes, float(1 << (ops["bits"] - 1))))
    return ((codes - z) * s).to(dtype)


def torch_full(like, v):
    import torch

    return torch.full_like(like, v)


def peer_operands(ops, cpu=False):
    """torch int4 (tinygemm) operands from the same codes: (packed weight, scales_and_zeros [G, N, 2])."""
    import torch

    codes = ops["unpack"]()  # [N, K] int32
    conv = torch.ops.aten._convert_weight_to_int4pack_for_cpu if cpu else torch.ops.aten._convert_weight_to_int4pack
    try:  # torch >= 2.5: uint8 [N, K/2], even column in the high nibble
        packed = conv((codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8).contiguous(), 8)
    except RuntimeError:  # older torch: int32 codes [N, K]
        packed = conv(codes.contiguous(), 8)
    s = ops["scales"].to(torch.bfloat16).float()
    z = ops["zeros"].float() if ops["zeros"] is not None else torch.full_like(s, 8.0)
    # tinygemm dequantizes (q - 8) * scale + zero: ours is (q - z) * s, so zero = (8 - z) * s
    sz = torch.stack([s, (8.0 - z) * s], dim=-1).to(torch.bfloat16).contiguous()
    return packed, sz


def peer_call(x, packed, sz, gs, cpu=False):
    import torch

    f = torch.ops.aten._weight_int4pack_mm_for_cpu if cpu else torch.ops.aten._weight_int4pack_mm
    return f(x, packed, gs, sz)


def kernel_bytes(m, n, k, bits, gs, dtype_bytes, with_zeros):
    g = k // gs
    return n * k * bits // 8 + g * n * dtype_bytes + (g * n if with_zeros else 0) + m * k * dtype_bytes + m * n * dtype_bytes


def hbm_peak(name):
    for key, v in HBM_PEAK:
        if key in name:
            return v
    return None


# ---- the GPU linear benchmark --------------------------------------------------------------------------------
def run_linear(args) -> int:
    import torch
    import torch.nn.functional as F
    import triton
    from triton.testing import do_bench

    from lowc.backends.triton import autotune, wq

    dev = "cuda"
    dtype = getattr(torch, args.dtype)
    wq.register_cuda()
    props = torch.cuda.get_device_properties(0)
    name = torch.cuda.get_device_name(0)

    def bench(fn):
        if args.cuda_graph:
            from triton.testing import do_bench_cudagraph

            return do_bench_cudagraph(fn, rep=100, return_mode="median") * 1e3
        return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3

    # reachable bandwidth: a 1 GiB device-to-device copy, read + write bytes
    src = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    copy_us = do_bench(lambda: dst.copy_(src), warmup=10, rep=100, return_mode="median") * 1e3
    copy_bw = 2 * src.numel() / (copy_us * 1e-6)
    del src, dst
    peak = hbm_peak(name)
    print(f"{name}: copy {copy_bw / 1e12:.2f} TB/s (read+write), nominal HBM {peak / 1e12 if peak else float('nan'):.2f} TB/s")

    rows = []
    for n, k in _pairs(args.shapes, SHAPES):
        ops = make_operands(n, k, args.bits, dtype, dev)
        w16 = dequantized(ops, dtype)
        peer = None
        if not args.no_peer and args.bits == 4:
            try:
                peer = peer_operands(ops)
            except Exception as e:  # noqa: BLE001 - report, do not stop the run
                print(f"torch int4 peer unavailable: {type(e).__name__}: {e}")
        checked = False
        for m in _ints(args.ms, MS):
            x = torch.randn(m, k, device=dev, dtype=dtype)
            xb = x.to(torch.bfloat16)

            def ours():
                return wq.linear(x, ops["qweight"], ops["scales"], ops["zeros"], None, args.bits, ops["group_size"],
                                 k, n)

            y = ours()  # autotunes (cached) before timing
            p = wq._problem(x, ops["scales"], ops["zeros"], args.bits, ops["group_size"], k, n)
            cfg = autotune.lookup(autotune.key(p, props.name, triton.__version__)) or autotune.heuristic(
                p, props.multi_processor_count)
            row = {"N": n, "K": k, "M": m, "config": cfg.label}
            if not checked or m == 16:
                ref = F.linear(x.float(), w16.float())
                row["lowc_rel_err"] = ((y.float() - ref).norm() / ref.norm()).item()
                if peer is not None:
                    yp = peer_call(xb, *peer, ops["group_size"]).float()
                    row["peer_rel_err"] = ((yp - ref).norm() / ref.norm()).item()
                checked = True
            row["fp16_us"] = bench(lambda: F.linear(x, w16))
            row["lowc_us"] = bench(ours)
            if peer is not None:
                row["peer_us"] = bench(lambda: peer_call(xb, *peer, ops["group_size"]))
            nbytes = kernel_bytes(m, n, k, args.bits, ops["group_size"], x.element_size(), ops["zeros"] is not None)
            row["lowc_GBps"] = nbytes / (row["lowc_us"] * 1e-6) / 1e9
            row["frac_copy"] = row["lowc_GBps"] * 1e9 / copy_bw
            row["frac_peak"] = row["lowc_GBps"] * 1e9 / peak if peak else None
            row["speedup_vs_fp16"] = row["fp16_us"] / row["lowc_us"]
            if "peer_us" in row:
                row["peer_vs_fp16"] = row["fp16_us"] / row["peer_us"]
                row["lowc_vs_peer"] = row["peer_us"] / row["lowc_us"]
            rows.append(row)
            print(f"{n}x{k} M={m}: fp16 {row['fp16_us']:.1f} us, lowc {row['lowc_us']:.1f} us "
                  f"({row['speedup_vs_fp16']:.2f}x, {row['lowc_GBps']:.0f} GB/s = {row['frac_copy']:.0%} of copy)"
                  + (f", torch int4 {row['peer_us']:.1f} us" if "peer_us" in row else "") + f" [{cfg.label}]")
        del ops, w16, peer
        torch.cuda.empty_cache()

    env = {"device": name, "sms": props.multi_processor_count, "torch": torch.__version__, "triton": triton.__version__,
           "python": platform.python_version(), "copy_TBps": copy_bw / 1e12, "hbm_peak_TBps": peak / 1e12 if peak else None,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": command_line(), "bits": args.bits, "dtype": args.dtype,
           "timer": "do_bench_cudagraph" if args.cuda_graph else "do_bench (L2 flushed), median"}
    write_linear(args.out, env, rows)
    return 0


def goals(rows):
    out = []
    for m, target in GOALS.items():
        rs = [r for r in rows if r["M"] == m]
        if rs:
            worst = min(r["speedup_vs_fp16"] for r in rs)
            out.append(f"M={m}: >= {target}x fp16 -> worst {worst:.2f}x ({'met' if worst >= target else 'NOT met'})")
    m1 = [r for r in rows if r["M"] == 1]
    if m1:
        worst = min(r["frac_copy"] for r in m1)
        out.append(f"M=1: >= 85% of copy bandwidth -> worst {worst:.0%} ({'met' if worst >= 0.85 else 'NOT met'})")
    peer = [r for r in rows if "lowc_vs_peer" in r]
    if peer:
        worst = min(r["lowc_vs_peer"] for r in peer)
        out.append(f"faster than torch int4 at every M -> worst {worst:.2f}x ({'met' if worst > 1 else 'NOT met'})")
    return out


def write_linear(out_dir, env, rows):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "triton_linear.json"), "w") as f:
        json.dump({"env": env, "rows": rows, "goals": goals(rows)}, f, indent=1)
    lines = [
        "# Triton W4A16 linear vs cuBLAS fp16 and torch int4 (tinygemm)", "",
        f"{env['device']} ({env['sms']} SMs), torch {env['torch']}, triton {env['triton']}, {env['date']}; "
        f"timer: {env['timer']}; device copy {env['copy_TBps']:.2f} TB/s (read+write), nominal HBM "
        f"{env['hbm_peak_TBps'] or float('nan'):.2f} TB/s.", "",
        f"Command: `{env['command']}`", "",
        f"lowc: W{env['bits']} {'g128 asym' if env['bits'] == 4 else 'per-channel sym'}, {env['dtype']} activations; "
        "torch int4: `torch._weight_int4pack_mm`, g128, bf16. Times in µs (x = fp16 time / time).", "",
        "| N x K | M | fp16 | lowc | x fp16 | GB/s | % copy | % peak | torch int4 | x fp16 | lowc vs int4 | config |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        peer = (f"{r['peer_us']:.1f} | {r['peer_vs_fp16']:.2f} | {r['lowc_vs_peer']:.2f}" if "peer_us" in r
                else "- | - | -")
        fp = f"{r['frac_peak']:.0%}" if r.get("frac_peak") else "-"
        lines.append(f"| {r['N']}x{r['K']} | {r['M']} | {r['fp16_us']:.1f} | {r['lowc_us']:.1f} | "
                     f"{r['speedup_vs_fp16']:.2f} | {r['lowc_GBps']:.0f} | {r['frac_copy']:.0%} | {fp} | {peer} | "
                     f"{r['config']} |")
    lines += ["", "Goals (issue 5):", ""] + [f"- {g}" for g in goals(rows)]
    errs = [r for r in rows if "lowc_rel_err" in r]
    if errs:
        lines += ["", "Check against dequantize + `F.linear` (relative error): " + ", ".join(
            f"{r['N']}x{r['K']} M={r['M']}: lowc {r['lowc_rel_err']:.1e}"
            + (f", int4 {r['peer_rel_err']:.1e}" if "peer_rel_err" in r else "") for r in errs)]
    with open(os.path.join(out_dir, "triton_linear.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {os.path.join(out_dir, 'triton_linear.md')}")


# ---- group-sparse W4 vs dense W4 vs fp16 ------------------------------------------------------------------------
def make_sparse_operands(n, k, dtype, device, sparsity=0.5, sg=16, seed=0):
    """Random group-sparse W4 operands in the kernels' layout: kept groups per row drawn at random,
    a scale and zero point per kept group (group_size = sparse_group, the GQSA layout)."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    n_groups = k // sg
    keep = max(1, round(n_groups * (1 - sparsity)))
    idx = torch.rand(n, n_groups, generator=g, device=device).argsort(dim=1)[:, :keep].sort(dim=1).values
    kc = keep * sg
    return {"qweight": torch.randint(-2**31, 2**31 - 1, (kc // 8, n), generator=g, device=device, dtype=torch.int32),
            "scales": (torch.rand(keep, n, generator=g, device=device) * 0.01 + 0.001).to(dtype),
            "zeros": torch.randint(0, 16, (keep, n), generator=g, device=device, dtype=torch.int32).to(torch.uint8),
            "idx": idx.t().contiguous().to(torch.int16), "bits": 4, "group_size": sg, "sparse_group": sg,
            "k": k, "n": n, "keep": keep}


def sparse_bytes(m, n, k, ops, dtype_bytes):
    keep, sg = ops["keep"], ops["sparse_group"]
    return n * keep * sg // 2 + keep * n * (dtype_bytes + 1 + 2) + m * k * dtype_bytes + m * n * dtype_bytes


def run_sparse(args, smoke: bool = False) -> int:
    """W4 S50 (group-sparse) vs dense W4 g128 vs fp16; ``smoke``: tiny CPU shapes in the interpreter."""
    import torch
    import torch.nn.functional as F

    from lowc.backends.triton import autotune, gsq, gsq_op, wq

    dev = "cpu" if smoke else "cuda"
    dtype = torch.float32 if smoke else getattr(torch, args.dtype)
    if smoke:
        def bench(fn):
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e6
    else:
        from triton.testing import do_bench

        wq.register_cuda()
        gsq.register_cuda()

        def bench(fn):
            return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3
    rows = []
    for n, k in _pairs(args.shapes, [(96, 256)] if smoke else SPARSE_SHAPES):
        dense = make_operands(n, k, 4, dtype, dev)
        sp = make_sparse_operands(n, k, dtype, dev, args.sparsity, args.sparse_group)
        w16 = torch.randn(n, k, device=dev, dtype=dtype) * 0.02
        sargs = (sp["qweight"], sp["scales"], sp["zeros"], None, 4, sp["group_size"], k, n, sp["idx"], sp["sparse_group"])
        for m in _ints(args.ms, [1, 20] if smoke else SPARSE_MS):
            x = torch.randn(m, k, device=dev, dtype=dtype)

            def ours():
                return gsq.linear(x, *sargs)

            y = ours()  # autotunes (cached) before timing
            p = gsq.problem(x, sp["scales"], sp["zeros"], sp["idx"], 4, sp["group_size"], k, n, sp["sparse_group"])
            tuned = None if smoke else autotune.lookup(autotune.key(p, torch.cuda.get_device_properties(0).name,
                                                                    _triton_version()))
            row = {"N": n, "K": k, "M": m, "sparsity": 1 - sp["keep"] * sp["sparse_group"] / k,
                   "config": (tuned or autotune.heuristic(p)).label}
            if m in (1, 16, 20):
                ref = gsq_op.reference_linear_gsq_tr(x.float(), *[t.float() if t is sp["scales"] else t for t in sargs])
                row["rel_err"] = ((y.float() - ref).norm() / ref.norm()).item()
            row["fp16_us"] = bench(lambda: F.linear(x, w16))
            row["dense_w4_us"] = bench(lambda: wq.linear(x, dense["qweight"], dense["scales"], dense["zeros"], None, 4,
                                                         dense["group_size"], k, n))
            row["sparse_us"] = bench(ours)
            row["sparse_GBps"] = sparse_bytes(m, n, k, sp, x.element_size()) / (row["sparse_us"] * 1e-6) / 1e9
            row["vs_dense_w4"] = row["dense_w4_us"] / row["sparse_us"]
            row["vs_fp16"] = row["fp16_us"] / row["sparse_us"]
            rows.append(row)
            print(f"{n}x{k} M={m}: fp16 {row['fp16_us']:.1f} us, dense W4 {row['dense_w4_us']:.1f} us, W4 S"
                  f"{row['sparsity']:.0%} {row['sparse_us']:.1f} us ({row['vs_dense_w4']:.2f}x dense W4, "
                  f"{row['vs_fp16']:.2f}x fp16, {row['sparse_GBps']:.0f} GB/s) [{row['config']}]"
                  + (f" rel err {row['rel_err']:.1e}" if "rel_err" in row else ""))
        if not smoke:
            torch.cuda.empty_cache()
    bad = [r for r in rows if r.get("rel_err", 0) > (1e-5 if smoke else 2e-3)]
    if smoke:
        print("INTERPRETER SMOKE RUN (TRITON_INTERPRET=1 on the CPU): NOT PERFORMANCE")
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            write_sparse(d, {"device": "CPU (interpreter)", "command": command_line(), "date": "-"}, rows)
    else:
        import triton

        env = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__,
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "command": command_line(), "dtype": args.dtype, "timer": "do_bench (L2 flushed), median"}
        write_sparse(args.out, env, rows)
    if bad:
        print(f"FAILED (kernel vs reference): {bad}", file=sys.stderr)
        return 1
    return 0


def _triton_version() -> str:
    import triton

    return triton.__version__


def write_sparse(out_dir, env, rows):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "triton_sparse.json"), "w") as f:
        json.dump({"env": env, "rows": rows}, f, indent=1)
    lines = ["# Group-sparse W4 (GQSA) Triton kernels vs dense W4 g128 and fp16", "",
             f"{env['device']}, {env['date']}; command: `{env['command']}`", "",
             "W4 S: 4-bit codes, groups of 16 inputs kept/dropped per row, a scale and zero point per kept group "
             "(int16 indices); dense W4: the cuda-w4a16 kernel, g128 asym; fp16: `F.linear`. Times in µs; "
             "x = other time / sparse time.", "",
             "| N x K | M | sparsity | fp16 | dense W4 | W4 S | x dense W4 | x fp16 | GB/s | config |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['N']}x{r['K']} | {r['M']} | {r['sparsity']:.0%} | {r['fp16_us']:.1f} | {r['dense_w4_us']:.1f} | "
                     f"{r['sparse_us']:.1f} | {r['vs_dense_w4']:.2f} | {r['vs_fp16']:.2f} | {r['sparse_GBps']:.0f} | "
                     f"{r['config']} |")
    with open(os.path.join(out_dir, "triton_sparse.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {os.path.join(out_dir, 'triton_sparse.md')}")


# ---- decode tokens/s ------------------------------------------------------------------------------------------
def run_decode(args) -> int:
    import torch
    import triton
    from transformers import LlamaConfig, LlamaForCausalLM

    import lowc
    from lowc.runtime import hf_generate, rebuild_hf

    hidden, inter, layers, heads, kv, vocab = DECODE_MODELS[args.decode_model]
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                         max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    with torch.device("cuda"):
        fp16 = LlamaForCausalLM(config).eval()
    torch.set_default_dtype(old)
    t0 = time.perf_counter()
    cm = lowc.compile(fp16, "cuda-w4a16", device="cuda", progress=False)
    compile_s = time.perf_counter() - t0
    q = rebuild_hf(cm)
    for mdl in (fp16, q):
        if hasattr(mdl.generation_config, "disable_compile"):
            mdl.generation_config.disable_compile = not args.torch_compile
    ids = torch.randint(0, vocab, (1, args.prompt), device="cuda", generator=torch.Generator("cuda").manual_seed(1))

    def timed(mdl, new):
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = hf_generate(mdl, ids, new, cache=args.cache)
        torch.cuda.synchronize()
        return time.perf_counter() - t, out

    res = {}
    for label, mdl in (("fp16", fp16), ("lowc cuda-w4a16", q)):
        timed(mdl, 4)  # warm-up: autotune (lowc), compile (with --torch-compile)
        runs = []
        for _ in range(3):
            t1, _ = timed(mdl, 1)
            tn, out = timed(mdl, 1 + args.new_tokens)
            runs.append(args.new_tokens / (tn - t1))
        res[label] = {"tokens_per_s": statistics.median(runs), "runs": runs, "tokens": out[0, args.prompt:].tolist()}
        print(f"{label}: {res[label]['tokens_per_s']:.1f} tokens/s")
    same = res["fp16"]["tokens"][:8] == res["lowc cuda-w4a16"]["tokens"][:8]
    env = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": command_line(), "model": args.decode_model, "shapes": DECODE_MODELS[args.decode_model],
           "prompt": args.prompt, "new_tokens": args.new_tokens, "cache": args.cache,
           "torch_compile": args.torch_compile, "compile_s": compile_s}
    speed = res["lowc cuda-w4a16"]["tokens_per_s"] / res["fp16"]["tokens_per_s"]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "triton_decode.json"), "w") as f:
        json.dump({"env": env, "results": res, "speedup": speed}, f, indent=1)
    lines = ["# Decode tokens/s: cuda-w4a16 (Triton kernels) vs fp16", "",
             f"{env['device']}, torch {env['torch']}, triton {env['triton']}, {env['date']}", "",
             f"Command: `{env['command']}`", "",
             f"Random-weight Llama ({args.decode_model}: hidden {hidden}, intermediate {inter}, {layers} layers, "
             f"{heads}/{kv} heads, vocab {vocab}), fp16, batch 1, prompt {args.prompt}, greedy, {args.new_tokens} "
             f"timed tokens; transformers `generate` with a {args.cache} cache"
             f"{', torch.compile (CUDA graphs)' if args.torch_compile else ', eager'}; lowc: RTN W4 g128, "
             f"`lm_head` fp16, rebuilt by `lowc.runtime.rebuild_hf`. Median of 3.", "",
             "| model | tokens/s |", "|---|---:|"]
    lines += [f"| {k} | {v['tokens_per_s']:.1f} |" for k, v in res.items()]
    lines += ["", f"Speed-up {speed:.2f}x. First 8 greedy tokens identical: {same} (random weights: near-ties "
                  f"make W4 and fp16 diverge early; not a quality measure)."]
    with open(os.path.join(args.out, "triton_decode.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {os.path.join(args.out, 'triton_decode.md')}")
    return 0


# ---- no-GPU modes ---------------------------------------------------------------------------------------------
def run_smoke(args) -> int:
    """The linear harness on tiny CPU shapes in triton's interpreter: every number checked, none is performance."""
    import torch
    import torch.nn.functional as F

    from lowc.backends.triton import autotune, wq

    rows = []
    for n, k in _pairs(args.shapes, [(96, 256)]):
        ops = make_operands(n, k, args.bits, torch.float32, "cpu")
        w = dequantized(ops, torch.float32)
        peer = None
        if args.bits == 4 and not args.no_peer:
            try:
                peer = peer_operands(ops, cpu=True)
            except Exception as e:  # noqa: BLE001
                print(f"torch int4 (cpu variant) unavailable: {type(e).__name__}: {e}")
        for m in _ints(args.ms, [1, 20]):
            x = torch.randn(m, k)
            ref = F.linear(x, w)
            t = time.perf_counter()
            y = wq.linear(x, ops["qweight"], ops["scales"], ops["zeros"], None, args.bits, ops["group_size"], k, n)
            dt = time.perf_counter() - t
            p = wq._problem(x, ops["scales"], ops["zeros"], args.bits, ops["group_size"], k, n)
            row = {"N": n, "K": k, "M": m, "config": autotune.heuristic(p).label, "interp_s": dt,
                   "lowc_rel_err": ((y - ref).norm() / ref.norm()).item()}
            if peer is not None:
                yp = peer_call(x.to(torch.bfloat16), *peer, ops["group_size"], cpu=True).float()
                row["peer_rel_err"] = ((yp - ref).norm() / ref.norm()).item()
            rows.append(row)
    print("INTERPRETER SMOKE RUN (TRITON_INTERPRET=1 on the CPU): NOT PERFORMANCE")
    for r in rows:
        print(f"{r['N']}x{r['K']} M={r['M']} [{r['config']}]: lowc rel err {r['lowc_rel_err']:.1e}"
              + (f", torch int4 (cpu) rel err {r['peer_rel_err']:.1e}" if "peer_rel_err" in r else "")
              + f"; interpreter {r['interp_s']:.2f} s")
    fake = {"device": "CPU (interpreter)", "sms": 0, "torch": torch.__version__, "triton": "-", "copy_TBps": 1.0,
            "hbm_peak_TBps": None, "date": "-", "command": command_line(), "bits": args.bits, "dtype": "float32",
            "timer": "none (smoke)"}
    for r in rows:  # exercise the table writer with placeholder timings, into a scratch directory
        r.update(fp16_us=1.0, lowc_us=1.0, lowc_GBps=1.0, frac_copy=0.001, frac_peak=None, speedup_vs_fp16=1.0)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        write_linear(d, fake, rows)
    bad = [r for r in rows if r["lowc_rel_err"] > 1e-5 or r.get("peer_rel_err", 0) > 2e-2]
    if bad:
        print(f"FAILED: {bad}", file=sys.stderr)
        return 1
    return 0


def run_compile_check(args) -> int:
    from lowc.backends.triton import autotune, wq

    print(f"ahead-of-time compile for sm_{args.compile_check} (no GPU): shared memory and PTX instruction counts")
    for n, k in _pairs(args.shapes, SHAPES[:1]):
        for m in (1, 16, 2048):
            gs = 128 if args.bits == 4 else k
            p = autotune.Problem(m=m, n=n, k=k, k_pad=k, bits=args.bits, group_size=gs, n_groups=k // gs,
                                 symmetric=args.bits == 8, dtype=args.dtype)
            if args.sparse:  # the GQSA layout: groups of sparse_group, a scale per kept group
                sg = args.sparse_group
                keep = max(1, round(k // sg * (1 - args.sparsity)))
                p = autotune.Problem(m=m, n=n, k=k, k_pad=k, bits=4, group_size=sg, n_groups=keep, symmetric=False,
                                     dtype=args.dtype, sparse_group=sg, n_keep=keep)
            for c in autotune.candidates(p):
                try:
                    r = wq.compile_for_gpu(c, p, arch=args.compile_check)
                    print(f"{n}x{k} M={m} {c.label}: shared {r['shared'] // 1024} KiB, {r['ptx_ops']}")
                except Exception as e:  # noqa: BLE001
                    print(f"{n}x{k} M={m} {c.label}: FAILED {type(e).__name__}: {str(e)[:200]}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.interpret_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
        return run_sparse(args, smoke=True) if args.sparse else run_smoke(args)
    if args.compile_check is not None:
        return run_compile_check(args)
    import torch

    if not torch.cuda.is_available():
        print("triton_linear.py needs a CUDA GPU (timings on a CPU would be meaningless); use --interpret-smoke "
              "to check the harness or --compile-check to build the kernels for a GPU", file=sys.stderr)
        return 2
    if args.sparse:
        return run_sparse(args)
    return run_decode(args) if args.decode else run_linear(args)


if __name__ == "__main__":
    sys.exit(main())
