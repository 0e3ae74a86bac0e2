"""The ``cpu-lut-w1`` … ``cpu-lut-w4`` targets: weight-only b-bit RTN (groups of 128, asymmetric by
default; ``rtn{symmetric=true}`` or any method pass producing 1..4-bit ``linear_wq`` also works, per
layer), lowered by ``lut-lower`` to ``lowc::linear_lut`` and run by generated C (T-MAC style tables).

The default method phase also quantizes the vocabulary projection: ``lut-head`` (W4 g64 asymmetric
whatever the target's width; why and measurements in :mod:`lowc.backends.cpu_lut.head`). Method
passes given by the user replace the whole phase, so ``--pass rtn`` keeps ``lm_head`` float.

Group-sparse layers (``lowc::linear_gsq``, e.g. from ``gqsa``; ``Target.runs``) lower to
``lowc::linear_lut_gs`` and run the group-sparse kernels, mixed freely with dense layers.

``emit`` writes ``backend/kernels.c`` (the C for this model's layer configurations) and
``backend/kernels.json`` (layer -> kernel, shapes; sparse layers with their sparse group, kept groups
per row and sparsity). ``prepare`` builds/loads that
code (system C compiler, cached) and registers it as the CPU kernel of ``lowc::linear_lut``.
"""

from __future__ import annotations

import json
import os

import torch

from lowc.backends.cpu_lut import build, codegen, op
from lowc.backends.cpu_lut import runtime as lut_runtime
from lowc.backends.cpu_lut.codegen import KernelConfig, SparseKernelConfig
from lowc.backends.cpu_lut.head import LutHead
from lowc.backends.cpu_lut.lower import LutLower
from lowc.backends.target import CompileOptions, Phase, Runtime, Target, method_passes
from lowc.errors import KernelError
from lowc.ir import meta as nodemeta
from lowc.ir.dialect.args import LinearQArgs, op_args
from lowc.ir.scheme import Scheme
from lowc.passes.cleanup import RemoveDead


def lut_pipeline(target: Target, options: CompileOptions) -> list[Phase]:
    method = method_passes(target, options)
    if options.user_passes is None:  # the default phase: lm_head quantized too (module docstring)
        method = (*method, LutHead())
    return [Phase("method", method), Phase("lower", (LutLower(),)), Phase("finalize", (RemoveDead(),))]


def layer_kernels(program) -> list[dict]:
    """One row per ``linear_lut`` node: layer, kernel config, shapes."""

    rows = []
    for node in program.nodes(op.LINEAR_LUT):
        a = LinearQArgs.of(node)
        cfg = KernelConfig(a.bits, a.group_size, a.zeros is None)
        g = program.attr(a.scales.target).shape[1]
        rows.append({"layer": nodemeta.get(node).layer or node.name, "kernel": cfg.name, "bits": a.bits,
                     "group_size": a.group_size, "symmetric": a.zeros is None, "in_features": a.in_features,
                     "k_pad": g * a.group_size, "out_features": a.out_features, "_config": cfg})
    for node in program.nodes(op.LINEAR_LUT_GS):
        a = LinearQArgs.of(node)
        n_keep = op_args(node)["n_keep"]
        cfg = SparseKernelConfig(a.bits, a.group_size, a.sparse_group, a.zeros is None)
        k_pad = -(-a.in_features // a.sparse_group) * a.sparse_group
        rows.append({"layer": nodemeta.get(node).layer or node.name, "kernel": cfg.name, "bits": a.bits,
                     "group_size": a.group_size, "symmetric": a.zeros is None, "in_features": a.in_features,
                     "k_pad": k_pad, "out_features": a.out_features, "sparse_group": a.sparse_group,
                     "kept_groups": n_keep, "sparsity": 1 - n_keep * a.sparse_group / k_pad, "_config": cfg})
    return rows


def configs_of(program):
    return sorted({r["_config"] for r in layer_kernels(program)}, key=codegen.config_key)


def emit(program, backend_dir: str) -> None:
    rows = layer_kernels(program)
    source = codegen.generate(r["_config"] for r in rows)
    with open(os.path.join(backend_dir, "kernels.c"), "w") as f:
        f.write(source)
    meta = {
        "backend": "cpu-lut",
        "compile_flags": list(build.BASE_FLAGS),
        "layout": "lowc.backends.cpu_lut.layout (row tiles of 32, bit planes, nibble pairs; group-sparse: "
                  "rows of nibble block pairs, kept-group bitmask)",
        "layers": [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows],
    }
    with open(os.path.join(backend_dir, "kernels.json"), "w") as f:
        json.dump(meta, f, indent=2)


def prepare(program, device: str) -> None:
    if torch.device(device).type != "cpu":
        raise KernelError(f"cpu-lut targets run on the CPU only, not on device '{device}'")
    configs = configs_of(program)
    if configs:
        lut_runtime.ensure(configs)
    op.register_cpu_kernel()


def runtime(target: Target, device: str, artifact_dir: str | None = None) -> Runtime:
    scalar = os.environ.get("LOWC_CPU_LUT_SCALAR", "") not in ("", "0") or not lut_runtime.has_avx2()
    path = "portable scalar C" if scalar else "AVX2"
    return Runtime(f"LUT C kernels ({path}, {lut_runtime.num_threads()} threads)", True)


def targets() -> list[Target]:
    out = []
    for b in (1, 2, 3, 4):
        desc = (f"{b}-bit weights, groups of 128 (asymmetric), float activations; lookup-table GEMM "
                f"(generated C, AVX2 pshufb or portable scalar); group-sparse layers skip dropped groups")
        out.append(Target(f"cpu-lut-w{b}", "cpu-lut", desc, Scheme(b, 128, False), lut_pipeline, emit=emit, prepare=prepare,
                          runtime=runtime, runs=("linear_gsq",), weight_bits=(1, 4)))
    return out
