"""The compiled-model artifact: a directory written atomically, loaded without executing its code.

Layout::

    manifest.json        format version, lowc/torch versions, target, passes with options, per-layer
                         schemes, source model identity, model info, metrics, file hashes
    graph.json           the IR graph (lowc.ir.serialize), tensor table (name, dtype, shape)
    weights.safetensors  every parameter/buffer the graph reads (tied tensors stored once)
    tokenizer/           the model's tokenizer, if it has one (Hugging Face files)
    backend/             whatever the target's backend emits (generated code, ONNX, ...)

**Writing.** Everything goes into a temporary sibling directory (``.NAME.tmp-PID-XXXX``) that is
then put at the output path in one step: ``renameat2(RENAME_NOREPLACE)`` for a new output,
``renameat2(RENAME_EXCHANGE)`` to swap with an existing one (Linux), so at every instant the path
holds either the complete old artifact or the complete new one; elsewhere, a rename-aside fallback
that restores the old artifact on any error. An existing output is replaced only with ``force``,
and never when it is (or contains) the current directory or the input model, or is a non-empty
directory that is not a lowc artifact. Leftover ``.tmp-``/``.old-`` siblings of dead lowc processes
are removed. File-system failures (read-only, disk full) are an :class:`ArtifactError` naming the
path.

**Loading** treats the directory as untrusted input (hashes are integrity, not authenticity):
the manifest is parsed strictly (known keys, typed values, :func:`validate_manifest`); every file in
the directory except the manifest must be listed in its hash table with the right size and sha256,
and nothing may be a symlink or a path outside the directory; the graph is rebuilt by
:mod:`lowc.ir.serialize` (strict grammar for every string that reaches generated code, ops through
a whitelist); every tensor's dtype and shape must match the tensor table. No pickle, no import of
anything the artifact names.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
import stat
import tempfile
from typing import Any, Callable, Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lowc import untrusted as U
from lowc.backends.registry import define_op
from lowc.errors import ArtifactError, LowcError
from lowc.ir import serialize
from lowc.ir.canonicalize import retarget_device
from lowc.ir.meta import _scheme_v1
from lowc.ir.program import ModelInfo, Program
from lowc.ir.scheme import Scheme

#: version 2 stores each layer's scheme as a typed :class:`~lowc.ir.scheme.Scheme` with the method
#: and transforms beside it; version 1 (one flat dict of scheme fields and notes) still loads
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
GRAPH = "graph.json"
WEIGHTS = "weights.safetensors"
TOKENIZER = "tokenizer"
BACKEND = "backend"

#: tensor dtypes an artifact may store
DTYPES = {str(d).replace("torch.", ""): d for d in (
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16,
    torch.int8, torch.uint8, torch.bool)}


sha256_file = U.sha256_file  # the manifest's file hashes (re-exported: tests and tools hash with it)


# ---- writing ----------------------------------------------------------------------------------------


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


def _within(inner: str, outer: str) -> bool:
    """Whether real path ``inner`` equals ``outer`` or lies under it."""
    return inner == outer or inner.startswith(outer.rstrip(os.sep) + os.sep)


def is_artifact_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MANIFEST))


def check_output(path: str, protect: Iterable[str] = (), ours: Callable[[str], bool] = is_artifact_dir,
                 what: str = f"a lowc artifact (no {MANIFEST})") -> None:
    """Refuse (ArtifactError) to replace ``path`` when that could destroy what it should not: the
    current directory or a parent of it, an input (``protect``: the source model's directory) or a
    directory holding one, a symlink, a file, or a non-empty directory that lowc did not write
    (``ours(path)`` is false; ``what`` says what it is not)."""
    real = os.path.realpath(path)
    if _within(os.path.realpath(os.getcwd()), real):
        raise ArtifactError(f"output {path} is the current directory or one of its parents; refusing to replace it")
    for p in protect:
        if p and _within(os.path.realpath(p), real):
            raise ArtifactError(f"output {path} would replace the input model {p}; choose another output directory")
    if not os.path.lexists(path):
        return
    if os.path.islink(path):
        raise ArtifactError(f"output {path} is a symbolic link; refusing to replace it")
    if not os.path.isdir(path):
        raise ArtifactError(f"output {path} exists and is not a directory; refusing to replace it")
    if os.listdir(path) and not ours(path):
        raise ArtifactError(f"output {path} is a non-empty directory that is not {what}; refusing to replace it")


def check_file_output(path: str, protect: Iterable[str] = ()) -> None:
    """Refuse (ArtifactError) to write the single file ``path`` over a directory, a symlink, or a
    file inside ``protect`` (the artifact being exported)."""
    if os.path.islink(path):
        raise ArtifactError(f"output {path} is a symbolic link; refusing to replace it")
    if os.path.isdir(path):
        raise ArtifactError(f"output {path} is a directory; give a file name")
    real = os.path.realpath(path)
    for p in protect:
        if p and _within(real, os.path.realpath(p)):
            raise ArtifactError(f"output {path} is inside {p}; write it outside the artifact")


_RENAME_NOREPLACE, _RENAME_EXCHANGE, _AT_FDCWD = 1, 2, -100


class _NoRenameat2(Exception):
    pass


def _renameat2(src: str, dst: str, flags: int) -> None:
    """Linux ``renameat2``; raises OSError from the call, _NoRenameat2 where it does not exist."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        raise _NoRenameat2() from None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) != 0:
        e = ctypes.get_errno()
        if e in (errno.ENOSYS, errno.EINVAL):  # kernel or file system without the flag
            raise _NoRenameat2()
        raise OSError(e, os.strerror(e), dst)


def _swap_in(tmp: str, path: str, aside: str) -> str | None:
    """Put directory ``tmp`` at ``path``. Returns the directory now holding the replaced artifact
    (to delete), or None. Each step leaves either the old or the new artifact at ``path``."""
    for _ in range(16):  # a concurrent writer may create or swap ``path`` between two calls
        try:
            try:
                _renameat2(tmp, path, _RENAME_NOREPLACE)
                return None
            except FileExistsError:
                pass
            try:
                _renameat2(tmp, path, _RENAME_EXCHANGE)
                return tmp  # tmp now holds the old artifact
            except FileNotFoundError:
                continue
        except _NoRenameat2:
            return _swap_in_fallback(tmp, path, aside)
    raise ArtifactError(f"cannot put the new artifact at {path}: it keeps changing (another lowc writing it?)")


def _swap_in_fallback(tmp: str, path: str, aside: str) -> str | None:
    if not os.path.lexists(path):
        os.rename(tmp, path)
        return None
    os.rename(path, aside)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(aside, path)  # put the old artifact back
        raise
    return aside


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_leftovers(path: str) -> list[str]:
    """Remove ``.NAME.tmp-PID-*`` / ``.NAME.old-PID-*`` siblings of ``path`` that lowc processes,
    no longer running, left behind when they were killed; returns what was removed."""
    parent, base = os.path.split(os.path.abspath(path))
    pattern = re.compile(rf"\.{re.escape(base)}\.(tmp|old)-(\d+)-[A-Za-z0-9_]+\Z")
    removed = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for n in names:
        m = pattern.match(n)
        full = os.path.join(parent, n)
        if m and int(m.group(2)) != os.getpid() and not _pid_alive(int(m.group(2))) \
                and os.path.isdir(full) and not os.path.islink(full):
            shutil.rmtree(full, ignore_errors=True)
            removed.append(full)
    return removed


def _env_error(e: BaseException, path: str) -> ArtifactError:
    if isinstance(e, OSError):
        where = e.filename or path
        return ArtifactError(f"cannot write {path}: {e.strerror or e} ({where})")
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return ArtifactError(f"cannot write {path}: {first}")


def write_directory(path: str, fill: Callable[[str], None], force: bool = False, protect: Iterable[str] = (),
                    ours: Callable[[str], bool] = is_artifact_dir, what: str = f"a lowc artifact (no {MANIFEST})") -> str:
    """Write the directory ``path`` atomically: ``fill(tmp)`` writes every file into a temporary
    sibling, which is then swapped into place (module docstring). An existing ``path`` is replaced
    only with ``force`` and when :func:`check_output` allows it (``ours``, ``what``, ``protect``)."""
    path = os.path.abspath(path)
    if os.path.lexists(path) and not force:
        raise ArtifactError(f"output {path} already exists (use --force / force=True to replace it)")
    check_output(path, protect, ours, what)
    parent, base = os.path.split(path)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{base}.tmp-{os.getpid()}-", dir=parent)
    except OSError as e:
        raise _env_error(e, path) from None
    clean_leftovers(path)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o777 & ~umask)
        fill(tmp)
        for root, _, names in os.walk(tmp):  # safetensors writes its files 0600
            for n in names:
                os.chmod(os.path.join(root, n), 0o666 & ~umask)
        old = _swap_in(tmp, path, os.path.join(parent, f".{base}.old-{os.getpid()}-{os.urandom(4).hex()}"))
    except LowcError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except (KeyboardInterrupt, SystemExit):
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) or type(e).__name__ == "SafetensorError":
            raise _env_error(e, path) from None
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return path


def write_artifact(path: str, program, manifest: dict[str, Any], force: bool = False,
                   emit: Callable[[str], None] | None = None, protect: Iterable[str] = ()) -> str:
    """Write ``program`` + ``manifest`` to ``path`` atomically; ``emit(dir)`` adds backend files.
    ``protect``: paths (the input model) the output must never replace."""

    def fill(tmp: str) -> None:
        store, table = _tensor_table(program)
        save_file(store, os.path.join(tmp, WEIGHTS), metadata={"format": "lowc", "format_version": str(FORMAT_VERSION)})
        graph = serialize.graph_to_json(program.gm)
        graph["tensors"] = table
        with open(os.path.join(tmp, GRAPH), "w") as f:
            json.dump(graph, f)
        tok = getattr(program, "tokenizer", None)
        if tok is not None:
            tok.save_pretrained(os.path.join(tmp, TOKENIZER))
        if emit is not None:
            os.makedirs(os.path.join(tmp, BACKEND), exist_ok=True)
            emit(os.path.join(tmp, BACKEND))
        files = {}
        for root, _, names in os.walk(tmp):
            for n in sorted(names):
                full = os.path.join(root, n)
                rel = os.path.relpath(full, tmp).replace(os.sep, "/")
                files[rel] = {"bytes": os.path.getsize(full), "sha256": sha256_file(full)}
        done = {**manifest, "format_version": FORMAT_VERSION, "files": files}
        done["model"] = {**done["model"], "tokenizer_dir": None}  # a path of this machine: never stored
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(done, f, indent=2, default=str)

    return write_directory(path, fill, force=force, protect=protect)


# ---- loading: the manifest --------------------------------------------------------------------------


def _scalars(d: Any, what: str, depth: int = 0) -> Any:
    """Plain JSON (objects, lists, scalars) of bounded depth: fields lowc only displays."""
    if depth > 8:
        raise ArtifactError(f"{what}: nested too deeply")
    if isinstance(d, dict):
        for k, v in d.items():
            _scalars(v, f"{what}.{k}", depth + 1)
    elif isinstance(d, list):
        for v in d:
            _scalars(v, what, depth + 1)
    elif not (d is None or isinstance(d, (str, int, float, bool))):
        raise ArtifactError(f"{what}: unexpected {type(d).__name__}")
    return d


def _str(v, what):
    return U.typed(v, str, what)


def _opt_str(v, what):
    return U.typed(v, (str, type(None)), what)


def _flat(v, what):
    """An object of scalars (scheme, source, calibration), or null."""
    if v is None:
        return v
    for k, x in U.typed(v, dict, what).items():
        U.typed(x, (str, int, float, bool, type(None)), f"{what}.{k}")
    return v


def _passes(v, what):
    for i, p in enumerate(U.typed(v, list, what)):
        w = f"{what}[{i}]"
        U.fields(p, w, ("name", "options", "phase", "changed", "seconds", "stats"), ("name",))
        _str(p["name"], f"{w}.name")
        _scalars(p.get("options", {}), f"{w}.options")
        _scalars(p.get("stats", {}), f"{w}.stats")
        U.typed(p.get("phase", ""), str, f"{w}.phase")
        U.typed(p.get("changed", False), bool, f"{w}.changed")
        U.typed(p.get("seconds", 0), (int, float), f"{w}.seconds")
    return v


_LAYER_KEYS = ("layer", "role", "block", "scheme", "method", "transforms", "op", "padded_in_features",
               "out_features", "in_features", "bytes", "float_bytes", "bits_per_weight")
_LAYER_REQUIRED = ("layer", "role", "block", "scheme", "out_features", "in_features", "bytes", "float_bytes")


def _layers(v, what):
    for i, r in enumerate(U.typed(v, list, what)):
        w = f"{what}[{i}]"
        U.fields(r, w, _LAYER_KEYS, _LAYER_REQUIRED)
        _str(r["layer"], f"{w}.layer")
        U.typed(r["role"], (str, type(None)), f"{w}.role")
        U.typed(r["block"], (int, type(None)), f"{w}.block")
        if r["scheme"] is not None:
            Scheme.from_json(r["scheme"], f"{w}.scheme")
        _str(r.get("method", ""), f"{w}.method")
        for t in U.typed(r.get("transforms", []), list, f"{w}.transforms"):
            _str(t, f"{w}.transforms")
        _opt_str(r.get("op"), f"{w}.op")
        if r.get("padded_in_features") is not None:
            U.int_in(r["padded_in_features"], 0, 1 << 40, f"{w}.padded_in_features")
        for k in ("out_features", "in_features", "bytes", "float_bytes"):
            U.int_in(r[k], 0, 1 << 50, f"{w}.{k}")
        bpw = U.typed(r.get("bits_per_weight", 0.0), (int, float), f"{w}.bits_per_weight")
        if isinstance(bpw, bool) or not 0 <= bpw <= 64:
            raise ArtifactError(f"{w}.bits_per_weight: expected a number in [0, 64], got {bpw!r}")
    return v


def _layers_v1(v: Any, what: str) -> Any:
    """Version-1 layer rows (the scheme dict held the method and the passes' notes) in the
    version-2 form; anything malformed is left for :func:`_layers` to refuse."""

    if not isinstance(v, list):
        return v
    out = []
    for r in v:
        if isinstance(r, dict) and isinstance(r.get("scheme"), dict):
            old = r["scheme"]
            r = {**r, **_scheme_v1(old, what)}
            if isinstance(old.get("padded_in_features"), int):
                r["padded_in_features"] = old["padded_in_features"]
        out.append(r)
    return out


def _size(v, what):
    U.fields(v, what, ("bytes", "float_bytes"), ("bytes", "float_bytes"))
    for k in ("bytes", "float_bytes"):
        U.int_in(v[k], 0, 1 << 50, f"{what}.{k}")
    return v


def _files(v, what):
    for rel, info in U.typed(v, dict, what).items():
        U.rel_path(rel, f"{what} entry")
        U.fields(info, f"{what}[{rel!r}]", ("bytes", "sha256"), ("bytes", "sha256"))
        U.int_in(info["bytes"], 0, 1 << 50, f"{what}[{rel!r}].bytes")
        U.sha256_hex(info["sha256"], f"{what}[{rel!r}].sha256")
    for required in (GRAPH, WEIGHTS):
        if required not in v:
            raise ArtifactError(f"{what}: {required} is not in the hash table")
    return v


def _target_scheme(v, what):
    Scheme.from_json(v, what)
    return v


def _model(v, what):
    ModelInfo.from_json(v, what)
    return v


def _dtype(v, what):
    return v if v is None else U.choice(v, DTYPES, what)


#: every key a manifest may hold, with its check; the manifest is refused on any other key
MANIFEST_FIELDS: dict[str, Callable[[Any, str], Any]] = {
    "format_version": lambda v, w: v,
    "lowc_version": _str,
    "torch_version": _str,
    "created": _str,
    "machine": _str,
    "target": _str,
    "backend": _str,
    "scheme": lambda v, w: v if v is None else _target_scheme(v, w),
    "passes": _passes,
    "source": _flat,
    "model": _model,
    "calibration": _flat,
    "seed": lambda v, w: U.typed(v, int, w),
    "dtype": _dtype,
    "log": lambda v, w: [_str(x, w) for x in U.typed(v, list, w)],
    "metrics": lambda v, w: _scalars(U.typed(v, dict, w), w),
    "layers": _layers,
    "size": _size,
    "files": _files,
}
REQUIRED = ("format_version", "target", "model", "files")


def validate_manifest(manifest: Any, what: str = MANIFEST) -> dict[str, Any]:
    """``manifest`` if every key is known and every value has its type, else an ArtifactError."""
    U.fields(manifest, what, MANIFEST_FIELDS, ())
    version = manifest.get("format_version")
    if type(version) is not int or version not in READABLE_VERSIONS:
        raise ArtifactError(
            f"{what}: format version {version!r} is not supported by this lowc (reads "
            f"{', '.join(map(str, READABLE_VERSIONS))}); recompile the model with this version"
        )
    for k in REQUIRED:
        if k not in manifest:
            raise ArtifactError(f"{what} is corrupt: no {k!r}")
    if version == 1 and "layers" in manifest:
        manifest = {**manifest, "layers": _layers_v1(manifest["layers"], f"{what}: layers")}
    for k, v in manifest.items():
        MANIFEST_FIELDS[k](v, f"{what}: {k}")
    return manifest


def read_manifest(path: str) -> dict[str, Any]:
    if not os.path.exists(path):
        raise ArtifactError(f"artifact {path} does not exist")
    if not os.path.isdir(path):
        raise ArtifactError(f"artifact {path} is not a directory")
    mpath = os.path.join(path, MANIFEST)
    if os.path.islink(mpath):
        raise ArtifactError(f"{mpath} is a symbolic link; an artifact holds only plain files")
    if not os.path.isfile(mpath):
        raise ArtifactError(f"{path} is not a lowc artifact (no {MANIFEST})")
    return validate_manifest(U.load_json(mpath), mpath)


def check_files(path: str, manifest: dict[str, Any], hashes: bool | Iterable[str] = True) -> None:
    """Every file in ``path`` (but the manifest) is in the manifest's hash table with its size and
    sha256, and every listed file exists; no symlinks, nothing but files and folders. ``hashes``:
    True checks every file's sha256, False none, a list of names only those files' (the listing
    and the sizes are always checked)."""
    listed = manifest["files"]
    present = set()
    for root, dirs, names in os.walk(path):
        for n in dirs + names:
            full = os.path.join(root, n)
            rel = os.path.relpath(full, path).replace(os.sep, "/")
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                raise ArtifactError(f"{path}: {rel} is a symbolic link; an artifact holds only plain files")
            if stat.S_ISDIR(st.st_mode):
                continue
            if not stat.S_ISREG(st.st_mode):
                raise ArtifactError(f"{path}: {rel} is not a regular file")
            if rel != MANIFEST:
                present.add(rel)
                if rel not in listed:
                    raise ArtifactError(f"{path}: {rel} is not in the manifest's hash table")
    for rel, info in listed.items():
        full = os.path.join(path, rel)
        if rel not in present:
            raise ArtifactError(f"{path}: {rel} is missing")
        size = os.path.getsize(full)
        if size != info["bytes"]:
            raise ArtifactError(f"{full} is truncated or corrupt: {size} bytes, manifest says {info['bytes']}")
        if (hashes is True or (hashes and rel in hashes)) and sha256_file(full) != info["sha256"]:
            raise ArtifactError(f"{full} is corrupt: sha256 does not match the manifest")


# ---- loading: the program -----------------------------------------------------------------------


def _check_table(table: Any, what: str) -> dict[str, Any]:
    U.typed(table, dict, what)
    for name, entry in table.items():
        w = f"{what}: tensor {U._show(name)}"
        U.attr_path(name, w)
        U.fields(entry, w, ("dtype", "shape", "parameter", "alias_of"), ("dtype", "shape"))
        U.choice(entry["dtype"], DTYPES, f"{w}.dtype")
        for s in U.typed(entry["shape"], list, f"{w}.shape"):
            U.int_in(s, 0, 1 << 40, f"{w}.shape")
        U.typed(entry.get("parameter", False), bool, f"{w}.parameter")
        if "alias_of" in entry:
            src = U.typed(entry["alias_of"], str, f"{w}.alias_of")
            if src not in table or "alias_of" in table[src]:
                raise ArtifactError(f"{what}: tensor {name!r} is an alias of {U._show(src)}, which is not stored")
            if table[src]["dtype"] != entry["dtype"] or table[src]["shape"] != entry["shape"]:
                raise ArtifactError(f"{w}: differs in dtype or shape from {src!r}, which it aliases")
    return table


def _module_tree(table: dict[str, Any], tensors: dict[str, torch.Tensor], what: str) -> torch.nn.Module:
    root = torch.nn.Module()
    for name, entry in table.items():
        t = tensors[entry.get("alias_of", name)]
        mod = root
        *parents, leaf = name.split(".")
        try:
            for part in parents:
                if not hasattr(mod, part):
                    mod.add_module(part, torch.nn.Module())
                mod = getattr(mod, part)
                if not isinstance(mod, torch.nn.Module):
                    raise KeyError(part)
            if entry.get("parameter"):
                mod.register_parameter(leaf, torch.nn.Parameter(t, requires_grad=False))
            else:
                mod.register_buffer(leaf, t)
        except (KeyError, TypeError, AttributeError):
            raise ArtifactError(f"{what}: tensor {name!r} clashes with another tensor or module of that name") from None
    return root


def read_program(path: str, manifest: dict[str, Any], device: str = "cpu"):
    """Rebuild the Program: module tree from the tensor table, graph from graph.json."""


    info = ModelInfo.from_json(manifest["model"], f"{MANIFEST}: model")
    gpath = os.path.join(path, GRAPH)
    graph = U.typed(U.load_json(gpath), dict, gpath)
    table = _check_table(graph.get("tensors"), gpath)
    wpath = os.path.join(path, WEIGHTS)
    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(wpath, framework="pt", device="cpu") as f:
            stored = set(f.keys())
            extra = sorted(stored - set(table))
            if extra:
                raise ArtifactError(f"{wpath}: stored tensor {extra[0]!r} is not in the tensor table")
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
    root = _module_tree(table, tensors, gpath)
    gm = serialize.graph_from_json(graph, root, tensors=set(table), inputs=[s.name for s in info.inputs],
                                   by_name=info.call_by_name, what=gpath, version=manifest["format_version"],
                                   define_op=define_op)
    retarget_device(gm, device)  # device constants baked in at capture (arange(device=...))
    program = Program(gm, info)
    tok_dir = os.path.join(path, TOKENIZER)
    program.tokenizer = None
    info.tokenizer_dir = tok_dir if os.path.isdir(tok_dir) else None  # never a path from the manifest
    return program
