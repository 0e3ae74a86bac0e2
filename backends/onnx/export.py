"""Export a compiled program (or artifact) to an ONNX file: lower the dialect ops
(:mod:`~lowc.backends.onnx.lower`), ``torch.onnx.export(..., dynamo=True)`` a thin wrapper with named
inputs and one named output through the translation table (:mod:`~lowc.backends.onnx.translate`),
fold the 4-bit weights, check no float copy of a quantized weight is left, record in the model's
metadata how onnxruntime must run it, save, ``onnx.checker``.

The file: opset 21 (plus ``com.microsoft`` 1 with ``matmulnbits=True``); inputs named as the model's
(``input_ids``, ``attention_mask``, int64, dynamic ``batch`` and ``seq`` axes); one output,
``logits`` (causal LMs), ``last_hidden_state`` (encoders) or ``output``. Written to a temporary
name beside ``path`` and renamed into place, so a failure leaves nothing behind.

Arithmetic (``accuracy_level``, recorded in ``metadata_props``, see :func:`arithmetic`):
onnxruntime's CPU provider fuses ``DequantizeLinear -> MatMul`` into its MatMulNBits kernel at the
accuracy level its session option ``session.qdq_matmulnbits_accuracy_level`` names, 4 by default
(int8 activations: about 2e-2 relative error against lowc's reference); level 0 computes in fp32
(about 1e-6). A file in the DequantizeLinear form cannot impose a level: its metadata says which
one it was exported for and the session option that gives it (:func:`session_options` applies it).
The MatMulNBits form (``matmulnbits=True``) carries the level in its nodes, so any session honours it.

Reuse: an artifact compiled for an ``onnx-*`` target already holds ``backend/model.onnx`` and, in
``backend/onnx.json``, the options it was written with (:func:`write_sidecar`); the API's
:func:`lowc.export.export` given that artifact and the same options copies the file instead of
exporting again.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch

from lowc.backends.onnx import lower
from lowc.backends.onnx.densify import DensifySparse
from lowc.backends.onnx.errors import OnnxExportError
from lowc.backends.onnx.lower import dialect_nodes, layer_of
from lowc.frontend.outputs import main_tensor
from lowc.ir.dialect import quant
from lowc.ir.dialect.args import LinearQArgs
from lowc.passes.base import PassContext
from lowc.passes.pipeline import Pipeline
from lowc.progress import step
from lowc.version import __version__

OPSET = 21
#: onnxruntime's session option for the accuracy level of DequantizeLinear->MatMul it fuses into MatMulNBits
ORT_QDQ_LEVEL = "session.qdq_matmulnbits_accuracy_level"
#: onnxruntime's level when the session does not set ORT_QDQ_LEVEL
ORT_DEFAULT_LEVEL = 4
#: metadata_props keys written into every exported model
META_LEVEL, META_SESSION, META_ARITHMETIC, META_FORM = (
    "lowc.accuracy_level", "lowc.onnxruntime_session_config", "lowc.arithmetic", "lowc.form")


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
    accuracy_level: int = 0
    #: onnxruntime session config entries the file's arithmetic needs (also in its metadata)
    session_config: dict = field(default_factory=dict)
    arithmetic: str = ""
    #: the options it was exported with and the lowc that exported it (what reuse compares)
    options: dict = field(default_factory=dict)
    lowc_version: str = ""
    #: the file copied instead of exporting again, if any
    reused_from: str | None = None
    #: the passes run on the way (``onnx-lower`` with its options and time)
    passes: list = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def export_options(matmulnbits: bool, accuracy_level: int, external_data: bool | None, densify: bool = False) -> dict:
    """The options that decide the file's contents, as recorded in ``onnx.json`` (``densify`` only when set)."""
    opts = {"matmulnbits": bool(matmulnbits), "accuracy_level": int(accuracy_level), "external_data": external_data}
    return {**opts, "densify": True} if densify else opts


def arithmetic(matmulnbits: bool, accuracy_level: int, quantized: bool) -> tuple[dict, str]:
    """(onnxruntime session config the file needs, one line saying what onnxruntime computes)."""
    kind = "fp32 arithmetic" if accuracy_level == 0 else f"accuracy level {accuracy_level}" + (
        " (int8 activations)" if accuracy_level == 4 else "")
    if not quantized:
        return {}, "fp32: no quantized weights"
    if matmulnbits:
        return {}, f"{kind} in any onnxruntime session (the MatMulNBits nodes carry accuracy_level={accuracy_level})"
    if accuracy_level == ORT_DEFAULT_LEVEL:
        how = (f"onnxruntime's default when it fuses DequantizeLinear->MatMul into MatMulNBits (about 2e-2 "
               f"relative error against lowc; {ORT_QDQ_LEVEL}=0 gives fp32)")
    else:
        how = (f"when the onnxruntime session sets {ORT_QDQ_LEVEL}={accuracy_level}; a default session fuses "
               f"DequantizeLinear->MatMul at level {ORT_DEFAULT_LEVEL} (int8 activations, about 2e-2 relative error)")
    return {ORT_QDQ_LEVEL: str(accuracy_level)}, f"{kind} {how}"


def _record_metadata(model, form: str, accuracy_level: int, session_config: dict, text: str) -> None:
    model.metadata_props.update({META_FORM: form, META_LEVEL: str(accuracy_level),
                                 META_SESSION: json.dumps(session_config, sort_keys=True), META_ARITHMETIC: text})


def session_options(path: str | os.PathLike):
    """``onnxruntime.SessionOptions`` with the config entries the file's metadata asks for (the
    accuracy level it was exported for; nothing for files without lowc metadata)."""
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    props = {p.key: p.value for p in onnx.load(os.fspath(path), load_external_data=False).metadata_props}
    for k, v in json.loads(props.get(META_SESSION, "{}")).items():
        so.add_session_config_entry(k, str(v))
    return so


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
                   external_data: bool | None = None, force: bool = True, print_after: Sequence[str] = (),
                   densify: bool = False) -> ExportResult:
    """Export ``program`` (a compiled lowc Program) to ``path``; returns what was written.

    ``accuracy_level``: 0 computes in fp32 like the reference; 4 lets onnxruntime quantize
    activations to int8 inside MatMulNBits (faster; what a default session does when it fuses
    DequantizeLinear->MatMul itself). The MatMulNBits form carries it in its nodes; the
    DequantizeLinear form records it, and the session option that gives it, in the metadata.
    The lowering is the ``onnx-lower`` pass, run on a copy through a verifying pipeline
    (``print_after=("onnx-lower",)`` prints the lowered graph). ``densify``: group-sparse layers
    become dense quantized layers first (the ``densify-sparse`` pass: exact, larger); without it they
    fail, naming the layer."""
    from lowc.backends.onnx import (  # optional: they import onnx_ir and onnxscript (lowc[onnx])
        finalize,
        translate,
    )

    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not force:
        raise OnnxExportError(f"output {path} already exists (use --force / force=True to replace it)")
    if os.path.isdir(path):
        raise OnnxExportError(f"output {path} is a directory; give a file name such as model.onnx")
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise OnnxExportError(f"accuracy_level={accuracy_level}: onnxruntime takes 0 (fp32), 1, 2, 3 or 4 (int8 activations)")
    step(f"lowering {len(lower.dialect_nodes(program))} compressed layers to the ONNX form (pass onnx-lower)")
    dens_print = tuple(n for n in print_after if densify and n == DensifySparse.name)
    pipeline = Pipeline([("lower", lower.OnnxLower(matmulnbits=matmulnbits, accuracy_level=accuracy_level))],
                        print_after=tuple(n for n in print_after if n not in dens_print))
    pipeline.check()
    lowered = program.clone()
    records = []
    if densify:
        step("densifying group-sparse layers (pass densify-sparse)")
        records += Pipeline([("densify", DensifySparse())], print_after=dens_print).run(lowered, PassContext(progress=False))
    else:
        lower.check_program(lowered, matmulnbits)  # a sparse layer fails here, naming it, before any copy is lowered
    quantized = _quantized_layers(lowered)
    (record,) = pipeline.run(lowered, PassContext(progress=False))
    records.append(record)
    layers = record.result.stats["layers"]
    names = [s.name for s in program.info.inputs]
    out_name, out_key = output_name(program)
    wrapper = _Wrapper(lowered.gm, names, program.info.call_by_name, out_key)
    example = tuple(lowered.example_inputs())
    step("exporting with torch.onnx.export (traces the model again)")
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
    finalize.check_no_float_copies(model, quantized)
    session_config, text = arithmetic(matmulnbits, accuracy_level, quantized=bool(layers))
    form = "MatMulNBits" if matmulnbits else "DequantizeLinear->MatMul"
    _record_metadata(model, form, accuracy_level, session_config, text)
    summary = finalize.summarize(model)
    step(f"writing {os.path.basename(path)} and checking it with onnx.checker")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmpdir = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    tmp = os.path.join(tmpdir, os.path.basename(path))
    try:
        used_external = finalize.save_and_check(model, tmp, external_data)
        for name in sorted(os.listdir(tmpdir)):
            os.replace(os.path.join(tmpdir, name), os.path.join(parent, name))
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    size = os.path.getsize(path) + (os.path.getsize(path + ".data") if used_external else 0)
    return ExportResult(path=path, opset=OPSET, matmulnbits=matmulnbits, external_data=used_external, inputs=names,
                        output=out_name, bytes=size, layers=layers, ops=summary["ops"],
                        initializer_bytes=summary["initializer_bytes"], accuracy_level=accuracy_level,
                        session_config=session_config, arithmetic=text,
                        options=export_options(matmulnbits, accuracy_level, external_data, densify),
                        lowc_version=__version__,
                        passes=[{k: v for k, v in r.to_json().items() if k != "stats"} for r in records])


def _quantized_layers(program) -> list:
    """Every quantized linear of ``program`` as :class:`~lowc.backends.onnx.finalize.QuantizedLayer`
    (initializer names of the exported file are ``gm.`` + the attribute's name: see ``_Wrapper``)."""
    from lowc.backends.onnx.finalize import (
        QuantizedLayer,  # optional: finalize imports onnx_ir (lowc[onnx])
    )

    out = []
    for node in dialect_nodes(program):
        if node.target.name() not in ("lowc::linear_wq", "lowc::linear_wqaq"):
            continue
        a = LinearQArgs.of(node)
        bits, group_size = a.bits, a.group_size
        qweight, scales = program.attr(a.weight.target), program.attr(a.scales.target)
        zeros = program.attr(a.zeros.target) if a.zeros is not None else None
        k_pad = scales.shape[1] * group_size
        module = a.weight.target.rpartition(".")[0]

        def dequantized(q=qweight, s=scales, z=zeros, b=bits, g=group_size, kp=k_pad):
            return quant.dequantize(q, s, z, b, g, kp, torch.float32).cpu().numpy()

        out.append(QuantizedLayer(name=layer_of(node), prefix=f"gm.{module}." if module else "", n=int(scales.shape[0]),
                                  k=int(a.in_features), k_pad=int(k_pad), dequantized=dequantized))
    return out


def export_onnx(model, path: str | os.PathLike, *, matmulnbits: bool = False, accuracy_level: int = 0,
                external_data: bool | None = None, force: bool = True, print_after: Sequence[str] = (),
                densify: bool = False) -> ExportResult:
    """Export a :class:`lowc.api.CompiledModel` or a Program to ONNX at ``path`` (an artifact
    directory is the API's business: :func:`lowc.export.export`, which also reuses an emitted file)."""
    program = getattr(model, "program", model)
    return export_program(program, os.fspath(path), matmulnbits=matmulnbits, accuracy_level=accuracy_level,
                          external_data=external_data, force=force, print_after=print_after, densify=densify)


def write_sidecar(result: ExportResult, path: str) -> None:
    with open(path, "w") as f:
        json.dump(result.to_json(), f, indent=2)
