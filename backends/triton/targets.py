"""The ``cuda-w4a16`` and ``cuda-w8a16`` targets: weight-only RTN (or GPTQ with ``--calib``, or any method
giving 4/8-bit ``linear_wq`` layers), lowered by ``triton-lower`` to ``lowc::linear_wq_tr`` and run by
the Triton kernels of :mod:`lowc.backends.triton.wq` on CUDA. Both run group-sparse layers
(``lowc::linear_gsq``, ``runs``), lowered to ``lowc::linear_gsq_tr`` and run by
:mod:`lowc.backends.triton.gsq`.

* ``cuda-w4a16``: 4-bit, groups of 128, asymmetric (the ``ref-w4a16`` scheme).
* ``cuda-w8a16``: 8-bit, per output channel, symmetric (the ``ref-w8a16`` scheme): at 8 bits a
  per-channel scale already keeps the error negligible, it reads no per-group scales (the weight
  stream is all the GEMV moves) and lets any ``BLOCK_K`` tile K; and the artifact matches
  ``ref-w8a16`` exactly, so the reference target is its oracle. ``rtn{group_size=128}`` gives a
  grouped int8 model if wanted.

Compiling is device independent (triton is not imported). ``emit`` writes ``backend/kernels.json``
(layout, kernel families, autotune candidates and cache location, per-layer shapes). ``prepare``:
on ``cuda`` it needs triton and a GPU and registers every kernel module of this backend as the CUDA
implementation of its op; on ``cpu`` the reference implementation runs, unless ``TRITON_INTERPRET=1``
is set, in which case the Triton kernels run on CPU tensors in triton's interpreter (for tests).
"""

from __future__ import annotations

import json
import os

import torch

from lowc.backends.target import CompileOptions, Phase, Runtime, Target, method_passes
from lowc.backends.triton import autotune, gsq, gsq_op, layout, linear_attention, ssd, wq
from lowc.backends.triton import op as tr_op
from lowc.backends.triton.lower import TritonLower
from lowc.errors import KernelError
from lowc.ir import meta as nodemeta
from lowc.ir.dialect.args import LinearQArgs
from lowc.ir.scheme import Scheme
from lowc.passes.cleanup import RemoveDead


def triton_pipeline(target: Target, options: CompileOptions) -> list[Phase]:
    return [Phase("method", method_passes(target, options)), Phase("lower", (TritonLower(),)),
            Phase("finalize", (RemoveDead(),))]


def layer_rows(program) -> list[dict]:
    """One row per ``linear_wq_tr`` / ``linear_gsq_tr`` node: layer, scheme, shapes, the heuristic
    configs at M = 1 and 2048."""

    rows = []
    for node in [n for n in program.nodes() if n.op == "call_function" and n.target in (tr_op.LINEAR_WQ_TR, gsq_op.LINEAR_GSQ_TR)]:
        a = LinearQArgs.of(node)
        bits, gs, k, n, z_n, b_n = a.bits, a.group_size, a.in_features, a.out_features, a.zeros, a.bias
        w, s = program.attr(a.weight.target), program.attr(a.scales.target)
        g = s.shape[0]
        row = {"layer": nodemeta.get(node).layer or node.name, "bits": bits, "group_size": gs if g > 1 else -1,
               "symmetric": z_n is None, "bias": b_n is not None, "in_features": k, "k_pad": g * gs,
               "out_features": n, "qweight": [str(w.dtype).replace("torch.", ""), list(w.shape)],
               "scales": [str(s.dtype).replace("torch.", ""), list(s.shape)]}
        if a.sparse:
            idx = program.attr(a.idx.target)
            row.update(op=gsq_op.OP, layout=layout.SPARSE_LAYOUT, sparse_group=a.sparse_group, kept_groups=idx.shape[0],
                       k_pad=-(-k // a.sparse_group) * a.sparse_group)
        for m in (1, 2048):
            x = torch.empty(m, 0, device="meta", dtype=s.dtype)
            p = (gsq.problem(x, s, z_n, idx, bits, gs, k, n, a.sparse_group) if a.sparse else
                 autotune.Problem(m=m, n=n, k=k, k_pad=g * gs, bits=bits, group_size=gs, n_groups=g,
                                  symmetric=z_n is None, dtype=str(s.dtype).replace("torch.", "")))
            row[f"default_config_m{m}"] = autotune.heuristic(p).label
        rows.append(row)
    return rows


def emit(program, backend_dir: str) -> None:
    meta = {
        "backend": "triton",
        "op": "lowc::linear_wq_tr",
        "layout": {
            "name": layout.LAYOUT,
            "qweight": "int32 [K_pad/P, N], P = 32/bits codes per word; word [r, n] holds weight[n, r*P + j] "
                       "in bits [j*bits, (j+1)*bits), low bits first",
            "scales": "[G, N] (model dtype)",
            "zeros": "uint8 [G, N], or absent for symmetric layers (zero point 2^(bits-1))",
        },
        "sparse_layout": {
            "name": layout.SPARSE_LAYOUT,
            "op": gsq_op.OP,
            "qweight": "int32 [Kc/P, N] over the compact rows (Kc = kept groups x sparse_group), packed as above",
            "idx": "int16 [n_keep, N]: kept sparse group j of column n (strictly increasing along j)",
            "scales": "[G, N] over groups of group_size compact positions (the last may be shorter)",
        },
        "kernels": {
            "decode (M <= 16)": "GEMV (FMA, one row per program, split-K) or tl.dot GEMM with BLOCK_M=16 and split-K",
            "prefill (M > 16)": "tiled tl.dot GEMM, B tile dequantized in registers; fp32 accumulate",
            "group-sparse": "GEMV walking each column's kept groups (only kept codes loaded, x gathered), split-K; "
                            "tl.dot GEMM densifying B tiles in registers from the kept codes (no split-K)",
        },
        "autotune": {
            "cache": "$LOWC_CACHE_DIR/triton/autotune.json (default ~/.cache/lowc)",
            "decode_candidates": [c.label for c in autotune.DECODE],
            "prefill_candidates": [c.label for c in autotune.PREFILL],
            "disable": "LOWC_TRITON_AUTOTUNE=0 (heuristic configs)",
        },
        "runs_on": "cuda (triton >= 3.1); on cpu the reference implementation",
        "layers": layer_rows(program),
    }
    with open(os.path.join(backend_dir, "kernels.json"), "w") as f:
        json.dump(meta, f, indent=2)


def prepare(program, device: str) -> None:
    dev = torch.device(device)
    if dev.type == "cuda":
        wq.require_triton()
        if not torch.cuda.is_available():
            raise KernelError(f"cuda-* targets run their Triton kernels on a CUDA GPU, and none is available for "
                              f"device '{device}'; load with device='cpu' to run the reference implementation")
        wq.register_cuda()
        gsq.register_cuda()
        linear_attention.register_cuda()
        ssd.register_cuda()
    elif dev.type == "cpu":
        if wq.interpreting():
            wq.register_interpreter()
            gsq.register_interpreter()
    else:
        raise KernelError(f"cuda-* targets run on CUDA (Triton kernels) or the CPU (reference implementation), "
                          f"not on device '{device}'")


def runtime(target: Target, device: str, artifact_dir: str | None = None) -> Runtime:
    dev = torch.device(device).type
    if dev == "cuda":
        return Runtime("Triton kernels", True)
    if wq.interpreting():
        return Runtime("Triton kernels in the interpreter (TRITON_INTERPRET=1)", False,
                       f"{target.name} on {device}: the Triton kernels ran in the interpreter; its times say "
                       "nothing about their speed on a GPU")
    return Runtime("reference op", False, f"{target.name} on {device}: the Triton kernels did not run (they need "
                   "a CUDA GPU); these are the reference op's times")


def targets() -> list[Target]:
    kern = "Triton GEMV (M<=16) / tl.dot GEMM kernels on CUDA"
    return [
        Target("cuda-w4a16", "triton", f"int4 weights, groups of 128 (asymmetric), float activations; {kern}",
               Scheme(4, 128, False), triton_pipeline, emit=emit, prepare=prepare, runtime=runtime,
               runs=("linear_gsq",)),
        Target("cuda-w8a16", "triton", f"int8 weights per output channel (symmetric), float activations; {kern}",
               Scheme(8, -1, True), triton_pipeline, emit=emit, prepare=prepare, runtime=runtime,
               runs=("linear_gsq",)),
    ]
