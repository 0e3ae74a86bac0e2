"""Export a compiled program (or artifact) to an ONNX file: lower the dialect ops
(:mod:`~lowc.backends.onnx.lower`), ``torch.onnx.export(..., dynamo=True)`` a thin wrapper with named
inputs and one named output through the translation table (:mod:`~lowc.backends.onnx.translate`),
fold the 4-bit weights, save, ``onnx.checker``.

The file: opset 21 (plus ``com.microsoft`` 1 with ``matmulnbits=True``); inputs named as the model's
(``input_ids``, ``attention_mask``, int64, dynamic ``batch`` and ``seq`` axes); one output,
``logits`` (causal LMs), ``last_hidden_state`` (encoders) or ``output``. Written to a temporary
name beside ``path`` and renamed into place, so a failure leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field

import torch

from lowc.backends.onnx.errors import OnnxExportError

OPSET = 21


@dataclass
class ExportResult:
    path: str
    opset: int
    matmulnbits: bool
    external_data: bool
    inputs: list[str]
    output: str
    bytes: int  # the .onnx file plus its external data
    layers: list[dict] = field(default_factory=list)
    ops: dict = field(default_factory=dict)
    initializer_bytes: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


class _Wrapper(torch.nn.Module):
    """Named positional inputs in, the model's main tensor out (HF ModelOutput -> one tensor)."""

    def __init__(self, gm: torch.nn.Module, names: list[str], by_name: bool, out_key: str | None):
        super().__init__()
        self.gm = gm
        self.names = names
        self.by_name = by_name
        self.out_key = out_key

    def forward(self, *args):
        out = self.gm(**dict(zip(self.names, args))) if self.by_name else self.gm(*args)
        if isinstance(out, torch.Tensor):
            return out
        if self.out_key is not None:
            return out[self.out_key]
        from lowc.evaluate import main_tensor

        return main_tensor(out)


def output_name(program) -> tuple[str, str | None]:
    """(ONNX output name, key in the model's output) from the model kind."""
    if program.info.kind == "causal-lm":
        return "logits", "logits"
    if program.info.kind == "encoder":
        return "last_hidden_state", "last_hidden_state"
    return "output", None


def _dynamic_shapes(program) -> tuple:
    dims: dict[str, torch.export.Dim] = {}
    specs = []
    for spec in program.info.inputs:
        d = {}
        for axis, sym in spec.dynamic.items():
            if sym not in dims:
                dims[sym] = torch.export.Dim(sym)
            d[int(axis)] = dims[sym]
        specs.append(d or None)
    return (tuple(specs),)


def export_program(program, path: str, *, matmulnbits: bool = False, accuracy_level: int = 0,
                   external_data: bool | None = None, force: bool = True) -> ExportResult:
    """Export ``program`` (a compiled lowc Program) to ``path``; returns what was written.

    ``accuracy_level`` (MatMulNBits only): 0 computes in fp32 like the reference; 4 lets onnxruntime
    quantize activations to int8 inside the kernel (faster; what it does by default when it fuses
    DequantizeLinear->MatMul itself)."""
    import logging
    import warnings

    from lowc.backends.onnx import finalize, lower, translate

    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not force:
        raise OnnxExportError(f"output {path} already exists (use --force / force=True to replace it)")
    if os.path.isdir(path):
        raise OnnxExportError(f"output {path} is a directory; give a file name such as model.onnx")
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise OnnxExportError(f"accuracy_level={accuracy_level}: MatMulNBits takes 0 (fp32), 1, 2, 3 or 4 (int8 activations)")
    if accuracy_level and not matmulnbits:
        raise OnnxExportError("accuracy_level applies to the MatMulNBits form only: add --matmulnbits / matmulnbits=True")
    lowered, report = lower.lower_program(program, matmulnbits=matmulnbits, accuracy_level=accuracy_level)
    names = [s.name for s in program.info.inputs]
    out_name, out_key = output_name(program)
    wrapper = _Wrapper(lowered.gm, names, program.info.call_by_name, out_key)
    example = tuple(lowered.example_inputs())
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        for name in ("torch.onnx", "torch.export", "onnxscript"):
            logging.getLogger(name).setLevel(logging.ERROR)
        try:
            onnx_program = torch.onnx.export(
                wrapper, example, dynamo=True, dynamic_shapes=_dynamic_shapes(program), input_names=names,
                output_names=[out_name], opset_version=OPSET, custom_translation_table=translate.table(),
                optimize=True, verbose=False, report=False)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise OnnxExportError(f"torch.onnx.export failed for {program.info.source.get('name', 'the model')}: {first}") from None
    model = onnx_program.model
    finalize.fold_weight_casts(model)
    quantized = [(r["n"], r["k"]) for r in _shapes(program)]
    finalize.check_no_float_copies(model, quantized)
    summary = finalize.summarize(model)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmpdir = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    tmp = os.path.join(tmpdir, os.path.basename(path))
    try:
        used_external = finalize.save_and_check(model, tmp, external_data)
        for name in sorted(os.listdir(tmpdir)):
            os.replace(os.path.join(tmpdir, name), os.path.join(parent, name))
    finally:
        import shutil

        shutil.rmtree(tmpdir, ignore_errors=True)
    size = os.path.getsize(path) + (os.path.getsize(path + ".data") if used_external else 0)
    return ExportResult(path=path, opset=OPSET, matmulnbits=matmulnbits, external_data=used_external, inputs=names,
                        output=out_name, bytes=size, layers=report.layers, ops=summary["ops"],
                        initializer_bytes=summary["initializer_bytes"])


def _shapes(program) -> list[dict]:
    """(N, K) of every quantized linear in ``program``."""
    out = []
    for node in program.graph.nodes:
        if node.op == "call_function" and getattr(node.target, "namespace", None) == "lowc":
            scales = program.attr(node.args[2].target)
            out.append({"n": int(scales.shape[0]), "k": int(node.args[7])})
    return out


def export_onnx(model, path: str | os.PathLike, *, matmulnbits: bool = False, accuracy_level: int = 0,
                external_data: bool | None = None, force: bool = True) -> ExportResult:
    """Export a :class:`lowc.api.CompiledModel`, an artifact directory, or a Program to ONNX at ``path``."""
    if isinstance(model, (str, os.PathLike)):
        import lowc

        model = lowc.load(os.fspath(model))
    program = getattr(model, "program", model)
    return export_program(program, os.fspath(path), matmulnbits=matmulnbits, accuracy_level=accuracy_level,
                          external_data=external_data, force=force)


def write_sidecar(result: ExportResult, path: str) -> None:
    with open(path, "w") as f:
        json.dump(result.to_json(), f, indent=2)
