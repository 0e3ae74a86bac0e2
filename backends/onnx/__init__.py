"""The ONNX backend: compiled programs to ``.onnx`` files for onnxruntime on phones, browsers, edge boxes.

Targets (:mod:`~lowc.backends.onnx.targets`): ``onnx-fp32`` (no compression), ``onnx-w8`` (int8
weights per output channel, symmetric), ``onnx-w4`` (int4 weights, groups of 128, asymmetric); each
compiles like the reference targets and emits ``backend/model.onnx`` into the artifact. Any artifact
whose scheme ONNX can carry exports with ``lowc export OUT --format onnx -o model.onnx`` or
:func:`export_onnx`.

ONNX form (opset 21): weight-only layers are ``DequantizeLinear`` (4-bit or 8-bit codes, blocked
along K with ``block_size`` = the group size, or per output channel) feeding ``MatMul``, which
onnxruntime fuses into its MatMulNBits kernel; ``matmulnbits=True`` emits ``com.microsoft::MatMulNBits``
directly. Activation-quantized layers add a per-token symmetric QuantizeLinear/DequantizeLinear pair.

Arithmetic: a default onnxruntime session fuses DequantizeLinear->MatMul into MatMulNBits at
accuracy level 4 (int8 activations, about 2e-2 relative error against lowc); the session option
``session.qdq_matmulnbits_accuracy_level=0`` gives fp32 arithmetic (about 1e-6). Every exported
file records the level it was exported for (``accuracy_level``, default 0) and the session option
that gives it in its ``metadata_props``; :func:`session_options` reads them back.

Only :func:`targets` is imported with the registry; onnx, onnxscript and onnxruntime are imported
when something is exported or run.
"""

from __future__ import annotations

from lowc.backends.onnx.errors import OnnxExportError
from lowc.backends.onnx.export import export_onnx as _export
from lowc.backends.onnx.export import session_options as _options
from lowc.backends.onnx.targets import targets

__all__ = ["targets", "export_onnx", "session_options", "OnnxExportError", "PASSES", "OPS"]

#: this backend's passes: name -> "module:Class"
PASSES: dict[str, str] = {"densify-sparse": "lowc.backends.onnx.densify:DensifySparse",
                          "onnx-check": "lowc.backends.onnx.check:OnnxCheck",
                          "onnx-lower": "lowc.backends.onnx.lower:OnnxLower"}
#: ``lowc::`` ops this backend adds to saved graphs: none (its ``lowc_onnx`` ops exist only while exporting)
OPS: dict[str, str] = {}


def export_onnx(model, path, **kw):
    """Export a CompiledModel, an artifact directory or a Program to ``path`` (see
    :func:`lowc.backends.onnx.export.export_onnx`)."""

    return _export(model, path, **kw)


def session_options(path):
    """``onnxruntime.SessionOptions`` giving the arithmetic the file at ``path`` was exported for
    (see :func:`lowc.backends.onnx.export.session_options`)."""

    return _options(path)
