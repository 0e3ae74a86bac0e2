"""The compiled-model artifact: a directory written atomically, loaded without executing its code.

Layout::

    manifest.json        format version, lowc/torch versions, target, passes with options, per-layer
                         schemes, source model identity, model info, metrics, file hashes
    graph.json           the IR graph (lowc.ir.serialize), tensor table (name, dtype, shape)
    weights.safetensors  every parameter/buffer the graph reads (tied tensors stored once)
    tokenizer/           the model's tokenizer, if it has one (Hugging Face files)
    backend/             whatever the target's backend emits (generated code, ONNX, ...)

Saving writes into a temporary sibling directory and renames it into place, so a failure leaves
nothing half-written; an existing output needs ``force=True``. Loading checks the format version,
each file's sha256, and every tensor's dtype and shape against the tensor table, and fails with an
:class:`ArtifactError` naming the file. No pickle anywhere: JSON + safetensors only, and graph ops
resolve through a whitelist (:mod:`lowc.ir.serialize`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from typing import Any, Callable

import torch

from lowc.errors import ArtifactError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
GRAPH = "graph.json"
WEIGHTS = "weights.safetensors"


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _tensor_table(program) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Unique tensors to store and the table describing every attribute (aliases for tied ones)."""
    params = {n for n, _ in program.gm.named_parameters(remove_duplicate=False)}
    store: dict[str, torch.Tensor] = {}
    table: dict[str, Any] = {}
    seen: dict[tuple, str] = {}
    for name, t in program.state_tensors().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        entry = {"dtype": str(t.dtype).replace("torch.", ""), "shape": list(t.shape), "parameter": name in params}
        if key in seen:
            entry["alias_of"] = seen[key]
        else:
            seen[key] = name
            store[name] = t.detach().to("cpu").contiguous()
        table[name] = entry
    return store, table


def write_artifact(path: str, program, manifest: dict[str, Any], force: bool = False,
                   emit: Callable[[str], None] | None = None) -> str:
    """Write ``program`` + ``manifest`` to ``path`` atomically; ``emit(dir)`` adds backend files."""
    from safetensors.torch import save_file

    from lowc.ir import serialize

    path = os.path.abspath(path)
    if os.path.exists(path) and not force:
        raise ArtifactError(f"output {path} already exists (use --force / force=True to replace it)")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        store, table = _tensor_table(program)
        save_file(store, os.path.join(tmp, WEIGHTS), metadata={"format": "lowc", "format_version": str(FORMAT_VERSION)})
        os.chmod(os.path.join(tmp, WEIGHTS), 0o666 & ~umask)  # safetensors writes it 0600
        graph = serialize.graph_to_json(program.gm)
        graph["tensors"] = table
        with open(os.path.join(tmp, GRAPH), "w") as f:
            json.dump(graph, f)
        tok = getattr(program, "tokenizer", None)
        if tok is not None:
            tok.save_pretrained(os.path.join(tmp, "tokenizer"))
        if emit is not None:
            os.makedirs(os.path.join(tmp, "backend"), exist_ok=True)
            emit(os.path.join(tmp, "backend"))
        files = {}
        for root, _, names in os.walk(tmp):
            for n in sorted(names):
                full = os.path.join(root, n)
                rel = os.path.relpath(full, tmp)
                files[rel] = {"bytes": os.path.getsize(full), "sha256": sha256_file(full)}
        manifest = {**manifest, "format_version": FORMAT_VERSION, "files": files}
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=2, default=str)
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=parent)
            os.rename(path, os.path.join(old, "x"))
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_manifest(path: str) -> dict[str, Any]:
    if not os.path.exists(path):
        raise ArtifactError(f"artifact {path} does not exist")
    if not os.path.isdir(path):
        raise ArtifactError(f"artifact {path} is not a directory")
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isfile(mpath):
        raise ArtifactError(f"{path} is not a lowc artifact (no {MANIFEST})")
    try:
        with open(mpath) as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{mpath} is corrupt: {e}") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{mpath} is corrupt: not a JSON object")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(
            f"{mpath}: format version {version!r} is not supported by this lowc (expects {FORMAT_VERSION}); "
            "recompile the model with this version"
        )
    return manifest


def check_files(path: str, manifest: dict[str, Any]) -> None:
    for rel, info in manifest.get("files", {}).items():
        full = os.path.join(path, rel)
        if not os.path.isfile(full):
            raise ArtifactError(f"{full} is missing")
        if os.path.getsize(full) != info.get("bytes"):
            raise ArtifactError(f"{full} is truncated or corrupt: {os.path.getsize(full)} bytes, manifest says {info.get('bytes')}")
        if info.get("sha256") and sha256_file(full) != info["sha256"]:
            raise ArtifactError(f"{full} is corrupt: sha256 does not match the manifest")


def read_program(path: str, manifest: dict[str, Any], device: str = "cpu"):
    """Rebuild the Program: module tree from the tensor table, graph from graph.json."""
    from safetensors import safe_open

    from lowc.frontend.canonicalize import retarget_device
    from lowc.ir import serialize
    from lowc.ir.program import ModelInfo, Program

    gpath = os.path.join(path, GRAPH)
    try:
        with open(gpath) as f:
            graph = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{gpath} is corrupt: {e}") from None
    table = graph.get("tensors")
    if not isinstance(table, dict):
        raise ArtifactError(f"{gpath} is corrupt: no tensor table")
    wpath = os.path.join(path, WEIGHTS)
    root = torch.nn.Module()
    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(wpath, framework="pt", device="cpu") as f:
            stored = set(f.keys())
            for name, entry in table.items():
                if "alias_of" in entry:
                    continue
                if name not in stored:
                    raise ArtifactError(f"{wpath}: tensor {name!r} is missing")
                t = f.get_tensor(name)
                if str(t.dtype).replace("torch.", "") != entry["dtype"] or list(t.shape) != entry["shape"]:
                    raise ArtifactError(
                        f"{wpath}: tensor {name!r} is {t.dtype}{list(t.shape)}, graph expects {entry['dtype']}{entry['shape']}"
                    )
                tensors[name] = t.to(device)
    except ArtifactError:
        raise
    except Exception as e:
        raise ArtifactError(f"{wpath} is corrupt or truncated: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    for name, entry in table.items():
        src = entry.get("alias_of", name)
        if src not in tensors:
            raise ArtifactError(f"{gpath}: tensor {name!r} is an alias of {src!r}, which is not stored")
        t = tensors[src]
        mod = root
        *parents, leaf = name.split(".")
        for part in parents:
            if not hasattr(mod, part):
                mod.add_module(part, torch.nn.Module())
            mod = getattr(mod, part)
        if entry.get("parameter"):
            mod.register_parameter(leaf, torch.nn.Parameter(t, requires_grad=False))
        else:
            mod.register_buffer(leaf, t)
    gm = serialize.graph_from_json(graph, root)
    retarget_device(gm, device)  # device constants baked in at capture (arange(device=...))
    info = ModelInfo.from_json(manifest["model"])
    program = Program(gm, info)
    tok_dir = os.path.join(path, "tokenizer")
    program.tokenizer = None
    if os.path.isdir(tok_dir):
        info.tokenizer_dir = tok_dir
    return program
