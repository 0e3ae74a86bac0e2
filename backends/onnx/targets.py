"""``onnx-fp32``, ``onnx-w8``, ``onnx-w4``: targets as data.

Pipeline: ``method`` (RTN at the target's scheme; passes the user gives replace it), ``lower``
(``onnx-check``: every layer's scheme must be expressible in ONNX, failing at compile time with
the layer and scheme named), ``finalize`` (``remove-dead``). The emitter then lowers a copy of the
program to the ONNX layout and writes ``backend/model.onnx`` plus ``backend/onnx.json`` (opset,
inputs/outputs, per-layer ONNX form, op counts). The artifact's own graph stays in the lowc
dialect, so ``lowc.load`` runs it with the reference backend (the oracle the ONNX file is tested
against); ``lowc bench`` runs the ONNX file with onnxruntime (:func:`runtime`). ``onnx.json``
records the export options, so ``lowc export`` with the same options copies the file.
"""

from __future__ import annotations

import json
import os

import torch

from lowc.backends.onnx.check import OnnxCheck
from lowc.backends.onnx.export import (
    META_LEVEL,
    META_SESSION,
    export_program,
    session_options,
    write_sidecar,
)
from lowc.backends.target import CompileOptions, Phase, Runtime, Target, method_passes
from lowc.ir.scheme import Scheme
from lowc.passes.cleanup import RemoveDead


def onnx_pipeline(target: Target, options: CompileOptions) -> list[Phase]:
    return [Phase("method", method_passes(target, options)), Phase("lower", (OnnxCheck(),)),
            Phase("finalize", (RemoveDead(),))]


def emit(program, backend_dir: str) -> None:
    result = export_program(program, os.path.join(backend_dir, "model.onnx"))
    result.path = "model.onnx"
    write_sidecar(result, os.path.join(backend_dir, "onnx.json"))


def runtime(target: Target, device: str, artifact_dir: str | None = None) -> Runtime:
    """onnxruntime (CPU provider, with the session options the file's metadata asks for) on the
    artifact's ``backend/model.onnx``; the reference ops when that cannot run here."""
    path = os.path.join(artifact_dir, "backend", "model.onnx") if artifact_dir else None
    why = None
    if path is None or not os.path.isfile(path):
        why = "the artifact holds no backend/model.onnx"
    elif not device.startswith("cpu"):
        why = f"lowc runs onnxruntime on the CPU only, not on '{device}'"
    else:
        try:
            import onnxruntime as ort
        except ImportError:
            why = "onnxruntime is not installed (pip install -e '.[onnx]')"
    if why:
        return Runtime("reference oracle", False, f"{target.name}: {why}; these are the reference ops' times, "
                       "not onnxruntime's")


    so = session_options(path)
    so.intra_op_num_threads = torch.get_num_threads()
    so.log_severity_level = 3
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]

    def call(**kw):
        return torch.from_numpy(sess.run(None, {k: kw[k].cpu().numpy() for k in names})[0])

    meta = sess.get_modelmeta().custom_metadata_map
    config = ", ".join(f"{k}={v}" for k, v in json.loads(meta.get(META_SESSION, "{}")).items())
    note = "backend/model.onnx, with the session options its metadata records" + (f" ({config})" if config else " (none)")
    if META_LEVEL in meta:
        note += f": accuracy level {meta[META_LEVEL]}" + (" (fp32 arithmetic)" if meta[META_LEVEL] == "0" else "")
    return Runtime("onnxruntime (CPU provider)", True, note, call=call)


def targets() -> list[Target]:
    def t(name, scheme, desc):
        return Target(name, "onnx", desc, scheme, onnx_pipeline, emit=emit, runtime=runtime)

    return [
        t("onnx-fp32", None, "ONNX (opset 21) for onnxruntime, float weights"),
        t("onnx-w8", Scheme(8, -1, True), "ONNX: int8 weights per output channel (symmetric), DequantizeLinear->MatMul"),
        t("onnx-w4", Scheme(4, 128, False), "ONNX: uint4 weights, groups of 128 (asymmetric), blocked DequantizeLinear->MatMul"),
    ]
