"""ONNX export: file size against the fp32 export, and onnxruntime latency against PyTorch fp32
eager, side by side in one run.

Models:
* ``llama-1024``: a Llama-shaped random model (transformers ``LlamaConfig``: hidden 1024,
  intermediate 2816, 2 layers, 16 heads, vocab 2048, untied lm_head) so that the linears dominate the
  file as in real LLMs; the size table also reports the linears alone (quantized linears' weights,
  scales, zero points vs their fp32 weights).
* ``tiny-llama`` (lowc preset, hidden 256) and ``minilm`` (the real all-MiniLM-L6-v2).

For each model: ``lowc.compile`` to ``onnx-fp32``, ``onnx-w8`` (int8 per channel, symmetric) and
``onnx-w4`` (uint4 g128, asymmetric), export with :func:`lowc.backends.onnx.export_onnx`
(DequantizeLinear->MatMul; for w4 also ``com.microsoft::MatMulNBits`` emitted directly at
accuracy level 0 (fp32 arithmetic, exact) and 4 (int8 activations)), and time onnxruntime (CPU EP, default
session options except busy-waiting turned off (the machine is shared), i.e. what a user gets: the DQ->MatMul pattern fused into MatMulNBits, which computes
with int8 activations at onnxruntime's default accuracy level 4) against the float model in PyTorch
eager, batch 1, median of ``--repeat`` runs after warm-up, the same thread count for both.

    python benchmarks/onnx_export.py            # writes benchmarks/results/onnx_export.{md,json}
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

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
TARGETS = ("onnx-fp32", "onnx-w8", "onnx-w4")


def llama_1024():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=2048, hidden_size=1024, intermediate_size=2816, num_hidden_layers=2,
                      num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=1024,
                      tie_word_embeddings=False, use_cache=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def eager_model(name: str, cm):
    """(callable float model in PyTorch eager, vocab size)."""
    from lowc import evaluate as ev

    if name == "llama-1024":
        return MODELS_CACHE["llama-1024"], 2048
    fn, _ = ev.float_reference(cm.manifest, None, "cpu")
    vocab = next(s.vocab_size for s in cm.program.info.inputs if s.vocab_size)
    return fn, vocab


MODELS_CACHE: dict = {}


def linears_bytes(cm) -> tuple[int, int]:
    rows = [r for r in cm.layers() if r["scheme"]]
    return sum(r["bytes"] for r in rows), sum(r["float_bytes"] for r in rows)


def time_ms(fn, repeat: int) -> float:
    fn()
    fn()
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["llama-1024", "tiny-llama", "minilm"])
    ap.add_argument("--lengths", nargs="+", type=int, default=[16, 128, 512])
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1, help="threads for both runtimes (1: the 2-core machine is shared)")
    ap.add_argument("--out", default=os.path.join(RESULTS, "onnx_export"))
    args = ap.parse_args()

    import numpy as np
    import onnxruntime as ort
    import torch

    import lowc
    from lowc.backends.onnx import export_onnx
    from lowc.evaluate import main_tensor

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    work = tempfile.mkdtemp(prefix="lowc-onnx-bench-")
    sizes, latency = [], []
    for name in args.models:
        source = name
        if name == "llama-1024":
            MODELS_CACHE[name] = source = llama_1024()
        files, compiled = {}, {}
        for target in TARGETS:
            cm = lowc.compile(source, target=target, progress=False)
            compiled[target] = cm
            t = time.perf_counter()
            r = export_onnx(cm, os.path.join(work, f"{name}-{target}.onnx"))
            files[target] = (r, time.perf_counter() - t)
            if target == "onnx-w4":
                for level in (0, 4):
                    t = time.perf_counter()
                    r = export_onnx(cm, os.path.join(work, f"{name}-w4-nbits{level}.onnx"), matmulnbits=True, accuracy_level=level)
                    files[f"onnx-w4 (MatMulNBits acc{level})"] = (r, time.perf_counter() - t)
        fp32 = files["onnx-fp32"][0].bytes
        for label, (r, secs) in files.items():
            cm = compiled[label.split(" ")[0]]
            lin, lin_float = linears_bytes(cm)
            sizes.append({"model": name, "export": label, "bytes": r.bytes, "ratio_vs_fp32": r.bytes / fp32,
                          "linears_bytes": lin if lin else None, "linears_ratio": lin / lin_float if lin else None,
                          "export_s": secs})
        eager, vocab = eager_model(name, compiled["onnx-fp32"])
        inputs, eager_ms, refs = {}, {}, {}
        for L in args.lengths:  # PyTorch first, before any onnxruntime thread pool exists
            g = torch.Generator().manual_seed(L)
            ids = torch.randint(0, vocab, (1, L), generator=g)
            inputs[L] = (ids, torch.ones_like(ids))
            with torch.inference_mode():
                eager_ms[L] = time_ms(lambda: eager(input_ids=ids, attention_mask=inputs[L][1]), args.repeat)
                refs[L] = main_tensor(eager(input_ids=ids, attention_mask=inputs[L][1])).float().numpy()
        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")  # no busy-waiting between runs
        so.log_severity_level = 3
        sessions = {label: ort.InferenceSession(r.path, so, providers=["CPUExecutionProvider"]) for label, (r, _) in files.items()}
        for L in args.lengths:
            ids, mask = inputs[L]
            feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
            row = {"model": name, "batch": 1, "seq_len": L, "torch_eager_fp32_ms": eager_ms[L]}
            for label, s in sessions.items():
                row[f"ort {label} ms"] = time_ms(lambda: s.run(None, feed), args.repeat)
                out = s.run(None, feed)[0]
                row[f"ort {label} rel_err"] = float(np.abs(out - refs[L]).max() / np.abs(refs[L]).max())
            latency.append(row)
            print(json.dumps(row), flush=True)
    info = {
        "command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, os.path.dirname(HERE))] + sys.argv[1:]),
        "date": started,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.processor() or platform.platform()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "threads": args.threads,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "uptime_after": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
        "sizes": sizes,
        "latency": latency,
    }
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(info, f, indent=2)
    with open(args.out + ".md", "w") as f:
        f.write(render(info))
    print(render(info))


def render(info: dict) -> str:
    mb = lambda n: f"{n / 1e6:.2f}"  # noqa: E731
    out = ["# ONNX export: file size and onnxruntime latency", "",
           f"Command: `{info['command']}`", "",
           f"Machine: {info['machine']}, Python {info['python']}, torch {info['torch']}, onnxruntime "
           f"{info['onnxruntime']}, {info['threads']} threads for both runtimes, {info['date']}.", "",
           f"Load (1/5/15 min) before: {', '.join(f'{x:.2f}' for x in info['loadavg_before'])}; after: "
           f"{', '.join(f'{x:.2f}' for x in info['loadavg_after'])} (`{info['uptime_after']}`). The machine is shared: "
           "latencies are medians and may be inflated by other work.", "",
           "## File size", "",
           "| model | export | file MB | × fp32 file | quantized linears MB | × their fp32 | export s |",
           "|---|---|---:|---:|---:|---:|---:|"]
    for r in info["sizes"]:
        lin = f"{mb(r['linears_bytes'])} | {r['linears_ratio']:.3f}" if r["linears_bytes"] else "– | –"
        out.append(f"| {r['model']} | {r['export']} | {mb(r['bytes'])} | {r['ratio_vs_fp32']:.3f} | {lin} | {r['export_s']:.1f} |")
    labels = [k[4:-3] for k in info["latency"][0] if k.startswith("ort ") and k.endswith(" ms")] if info["latency"] else []
    out += ["", "## Latency (batch 1, ms, median)", "",
            "| model | seq | torch eager fp32 | " + " | ".join(f"ort {l}" for l in labels) + " |",
            "|---|---:|---:|" + "---:|" * len(labels)]
    for r in info["latency"]:
        cells = [f"{r[f'ort {l} ms']:.2f} ({r['torch_eager_fp32_ms'] / r[f'ort {l} ms']:.2f}×)" for l in labels]
        out.append(f"| {r['model']} | {r['seq_len']} | {r['torch_eager_fp32_ms']:.2f} | " + " | ".join(cells) + " |")
    out += ["", "(×: speedup over PyTorch eager fp32.) Max relative error of each onnxruntime output against the eager "
            "float model, per row, is in the JSON (`rel_err`): fp32 ≈ 1e-6; w8/w4 carry the quantization error "
            "plus, where onnxruntime fuses DequantizeLinear->MatMul (its default accuracy level 4) or MatMulNBits is "
            "emitted at acc4, int8 activations inside the kernel. The rows are the RTN quantization error "
            "against float, not the backend's parity with lowc's reference (tests/test_onnx.py: ≤ 2e-5 relative).", ""]
    return "\n".join(out)


if __name__ == "__main__":
    main()
