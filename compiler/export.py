"""``lowc export``: a compiled model or an artifact directory to another runtime's file format.

Formats: ONNX (:mod:`lowc.backends.onnx`, which exports a program); compressed-tensors, a
Hugging Face model directory that transformers and vLLM load (:mod:`lowc.formats.compressed_tensors`);
and GGUF for llama.cpp (:mod:`lowc.formats.gguf`, which maps an artifact's codes onto GGUF block types).
For ONNX this API-level module adds what needs the artifact: an artifact compiled for an ``onnx-*`` target already holds
``backend/model.onnx`` and, in ``backend/onnx.json``, the options it was written with; given that
artifact and the same options, the file is copied (after checking its sha256 against the
manifest, like every file lowc reads) instead of loading and exporting again. ``onnx.json`` is
untrusted input and parsed strictly.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from typing import Sequence

from lowc import untrusted as U
from lowc.api import load
from lowc.artifact import check_files, read_manifest
from lowc.backends.onnx.errors import OnnxExportError
from lowc.backends.onnx.export import ExportResult, export_onnx, export_options
from lowc.errors import ArtifactError
from lowc.formats.compressed_tensors import CTExport, export_compressed_tensors
from lowc.formats.gguf import GgufExportError, GgufResult, export_gguf
from lowc.progress import step
from lowc.version import __version__

FORMATS = ("onnx", "compressed-tensors", "gguf")


def export(model, path: str | os.PathLike, *, format: str = "onnx", matmulnbits: bool = False, accuracy_level: int = 0,
           external_data: bool | None = None, force: bool = True, print_after: Sequence[str] = (),
           densify: bool = False, requant: str | None = None) -> ExportResult | CTExport | GgufResult:
    """Export a :class:`lowc.api.CompiledModel`, a Program (ONNX) or an artifact directory to ``path``
    (``print_after``: passes of the export whose output graph to print, e.g. ``onnx-lower``;
    ``densify``: store group-sparse layers as dense quantized layers, exactly, instead of failing;
    ``requant``: GGUF only, the type for layers no GGUF block type carries exactly).
    ``format="compressed-tensors"`` writes the directory ``path`` (the ONNX options do not apply)."""
    if format not in FORMATS:
        raise ArtifactError(f"unknown export format '{format}'; known formats: {', '.join(FORMATS)}")
    onnx_only = [n for n, v in (("matmulnbits", matmulnbits), ("accuracy_level", accuracy_level),
                                ("external_data", external_data), ("print_after", print_after),
                                ("densify", densify)) if v]
    if format == "compressed-tensors":
        if onnx_only or requant is not None:
            raise ArtifactError(f"export option {(onnx_only or ['requant'])[0]} does not apply to compressed-tensors")
        return _export_ct(model, path, force)
    if format == "gguf":
        if onnx_only:
            raise GgufExportError(f"export option {onnx_only[0]} is for ONNX, not GGUF")
        return export_gguf(model, path, requant=requant, force=force)
    if requant is not None:
        raise ArtifactError("export option requant is for GGUF, not ONNX")
    if isinstance(model, (str, os.PathLike)):
        if not print_after:  # printing needs the export's passes to run
            reused = reuse_emitted(os.fspath(model), path,
                                   export_options(matmulnbits, accuracy_level, external_data, densify), force=force)
            if reused is not None:
                return reused
        step(f"loading {os.fspath(model)}")
        model = load(os.fspath(model))
    return export_onnx(model, path, matmulnbits=matmulnbits, accuracy_level=accuracy_level,
                       external_data=external_data, force=force, print_after=print_after, densify=densify)


def _export_ct(model, path: str | os.PathLike, force: bool) -> CTExport:
    protect = []
    if isinstance(model, (str, os.PathLike)):
        protect.append(os.fspath(model))
        step(f"loading {os.fspath(model)}")
        model = load(os.fspath(model))
    src = model.program.info.source or {}
    if isinstance(src.get("path"), str):
        protect.append(src["path"])
    return export_compressed_tensors(model, path, force=force, protect=protect)


def reuse_emitted(artifact: str, path: str | os.PathLike, options: dict, force: bool = True) -> ExportResult | None:
    """Copy ``artifact``'s ``backend/model.onnx`` to ``path`` when it was written with ``options``
    by this lowc and holds its weights inline; None when it cannot be reused. Raises ArtifactError
    when the file is not the one the manifest hashes."""
    manifest = read_manifest(artifact)
    files = manifest.get("files", {})
    names = ("backend/model.onnx", "backend/onnx.json")
    if not all(n in files for n in names):
        return None
    check_files(artifact, manifest, hashes=names)
    side = _read_sidecar(os.path.join(artifact, "backend", "onnx.json"))
    if side.get("options") != options or side.get("lowc_version") != __version__ or side.get("external_data"):
        return None
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not force:
        raise OnnxExportError(f"output {path} already exists (use --force / force=True to replace it)")
    if os.path.isdir(path):
        raise OnnxExportError(f"output {path} is a directory; give a file name such as model.onnx")
    src = os.path.join(artifact, "backend", "model.onnx")
    step(f"reusing {src} (written at compile time with the same options; sha256 checked)")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmpdir = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        tmp = os.path.join(tmpdir, os.path.basename(path))
        shutil.copyfile(src, tmp)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    known = {f.name for f in dataclasses.fields(ExportResult)}
    result = ExportResult(**{k: v for k, v in side.items() if k in known})
    result.path, result.reused_from = path, os.path.abspath(src)
    return result


def _read_sidecar(path: str) -> dict:
    """``backend/onnx.json`` of an artifact (untrusted like the rest of it): the fields of
    :class:`ExportResult` with their JSON types, else an ArtifactError naming the file."""
    side = U.fields(U.load_json(path), path, [f.name for f in dataclasses.fields(ExportResult)])
    types = {"path": str, "opset": int, "matmulnbits": bool, "external_data": bool, "inputs": list, "output": str,
             "bytes": int, "layers": list, "ops": dict, "initializer_bytes": dict, "accuracy_level": int,
             "session_config": dict, "arithmetic": str, "options": dict, "lowc_version": str,
             "reused_from": (str, type(None)), "passes": list}
    for k, v in side.items():
        U.typed(v, types[k], f"{path}: {k}")
    for i, row in enumerate(side.get("layers", [])):
        if not (isinstance(row, dict) and isinstance(row.get("onnx"), str)):
            raise ArtifactError(f"{path}: layers[{i}] has no ONNX form")
    return side
