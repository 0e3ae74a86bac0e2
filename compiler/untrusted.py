"""Strict reading of data that comes from files lowc did not just write (artifacts, recipes, caches).

Everything an artifact holds is untrusted input: hashes prove integrity, not authenticity, so a
manifest or graph may have been written by anyone. The rules here are the grammar every string
from such a file must match before it reaches Python code generation (torch.fx writes placeholder
names, attribute paths and keyword names into the source of ``forward``), attribute lookup, or a
file-system path. A violation is an :class:`ArtifactError` naming the file and the field.

* :func:`identifier` - a Python identifier that is not a keyword and not a dunder name;
* :func:`attr_path` - a dotted path of identifiers or decimal indices (``model.layers.0.weight``)
  none of whose parts is an attribute of ``nn.Module``/``GraphModule`` (``training``, ``forward``);
* :func:`rel_path` - a plain relative file name inside a directory (no ``..``, no absolute path,
  no backslash, no empty part);
* :func:`fields` / :func:`typed` - a JSON object with only known keys, a value of the expected type;
* :func:`load_json` - JSON from a file with a size cap, errors (including deep nesting) as one line.
"""

from __future__ import annotations

import functools
import hashlib
import json
import keyword
import os
import re
from typing import Any, Iterable

import torch
import torch.fx

from lowc.errors import ArtifactError

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_INDEX = re.compile(r"(0|[1-9][0-9]{0,8})\Z")
_HEX64 = re.compile(r"[0-9a-f]{64}\Z")

#: the largest JSON file lowc reads from an artifact (graph.json of a 70B model is ~30 MB)
MAX_JSON_BYTES = 256 << 20


def is_identifier(s: Any) -> bool:
    return (isinstance(s, str) and _IDENT.match(s) is not None and not keyword.iskeyword(s)
            and not (s.startswith("__") and s.endswith("__")))


def identifier(s: Any, what: str) -> str:
    """``s`` if it is a plain Python identifier, else an ArtifactError naming ``what``."""
    if not is_identifier(s):
        raise ArtifactError(f"{what}: {_show(s)} is not a plain identifier")
    return s


@functools.lru_cache(maxsize=1)
def _reserved_attrs() -> frozenset[str]:
    """Names a tensor path must not use: attributes every GraphModule already has."""

    gm = torch.fx.GraphModule(torch.nn.Module(), torch.fx.Graph())
    return frozenset(dir(gm)) | frozenset(vars(gm))


def attr_path(s: Any, what: str) -> str:
    """``s`` if it is a dotted attribute path of identifiers or indices that no built-in attribute
    of a module shadows, else an ArtifactError naming ``what``."""
    if not isinstance(s, str) or not s or len(s) > 1000:
        raise ArtifactError(f"{what}: {_show(s)} is not an attribute path")
    reserved = _reserved_attrs()
    for part in s.split("."):
        if not (is_identifier(part) or _INDEX.match(part)):
            raise ArtifactError(f"{what}: {_show(s)} is not an attribute path (bad part {_show(part)})")
        if part in reserved:
            raise ArtifactError(f"{what}: {_show(s)} uses the reserved module attribute name {part!r}")
    return s


def rel_path(s: Any, what: str) -> str:
    """``s`` if it is a relative path of plain names inside a directory, else an ArtifactError."""
    if not isinstance(s, str) or not s or len(s) > 500 or "\\" in s or "\0" in s or s.startswith("/"):
        raise ArtifactError(f"{what}: {_show(s)} is not a plain relative file name")
    for part in s.split("/"):
        if part in ("", ".", "..") or not re.fullmatch(r"[A-Za-z0-9_.+-]+", part):
            raise ArtifactError(f"{what}: {_show(s)} is not a plain relative file name")
    return s


def sha256_hex(s: Any, what: str) -> str:
    if not isinstance(s, str) or not _HEX64.match(s):
        raise ArtifactError(f"{what}: {_show(s)} is not a sha256 hex digest")
    return s


def typed(value: Any, types: type | tuple[type, ...], what: str) -> Any:
    """``value`` if it is an instance of ``types`` (bool is never an int here), else an ArtifactError."""
    types = types if isinstance(types, tuple) else (types,)
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if not ok:
        names = " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in types)
        raise ArtifactError(f"{what}: expected {names}, got {_type_name(value)}")
    return value


def fields(d: Any, what: str, allowed: Iterable[str], required: Iterable[str] = ()) -> dict[str, Any]:
    """``d`` if it is a JSON object whose keys are all in ``allowed`` and include ``required``."""
    typed(d, dict, what)
    allowed = set(allowed)
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise ArtifactError(f"{what}: unknown key {_show(unknown[0])}")
    for k in required:
        if k not in d:
            raise ArtifactError(f"{what}: missing key {k!r}")
    return d


def int_in(value: Any, lo: int, hi: int, what: str) -> int:
    typed(value, int, what)
    if not lo <= value <= hi:
        raise ArtifactError(f"{what}: {value} is outside [{lo}, {hi}]")
    return value


def choice(value: Any, options, what: str) -> str:
    """``value`` if it is one of the string ``options``, else an ArtifactError listing them."""
    if not isinstance(value, str) or value not in options:
        raise ArtifactError(f"{what}: {_show(value)} is not one of {', '.join(options)}")
    return value


def sha256_file(path: str) -> str:
    """The sha256 of the file at ``path``, never following a symlink (a link is an OSError)."""
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def load_json(path: str, what: str | None = None) -> Any:
    """Parse the JSON file ``path`` (at most :data:`MAX_JSON_BYTES`); errors name the file."""
    what = what or path
    try:
        if os.path.getsize(path) > MAX_JSON_BYTES:
            raise ArtifactError(f"{what} is too large ({os.path.getsize(path)} bytes; at most {MAX_JSON_BYTES})")
        with open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except ArtifactError:
        raise
    except RecursionError:
        raise ArtifactError(f"{what} is corrupt: JSON nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{what} is corrupt: {e}") from None
    except OSError as e:
        raise ArtifactError(f"{what} cannot be read: {e.strerror or e}") from None


_TYPE_NAMES = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
               float: "a number", type(None): "null"}


def _type_name(v: Any) -> str:
    return _TYPE_NAMES.get(type(v), type(v).__name__)


def _show(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 80 else r[:77] + "..."
