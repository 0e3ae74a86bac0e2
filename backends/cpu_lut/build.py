"""Compile generated C with the system compiler into a content-addressed cache and load it (ctypes).

Cache: ``$LOWC_CACHE_DIR/cpu_lut/<sha256(source, compiler, flags)[:20]>/liblowc_lut.so`` (default
``~/.cache/lowc``). A library is compiled once per distinct source and flags, written under a
temporary name and renamed into place, so concurrent processes never load a half-written file.
The compiler is ``$CC`` or ``cc``/``gcc``/``clang`` from ``PATH``; a missing or failing compiler is a
:class:`CpuLutBuildError` naming it.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile

from lowc.errors import LowcError

#: portable base flags: the AVX2 path is enabled per function (target attribute) and picked at run time
BASE_FLAGS = ("-O3", "-fPIC", "-shared", "-pthread", "-ffp-contract=off", "-fno-math-errno", "-std=c11")
LIB_NAME = "liblowc_lut.so"


class CpuLutBuildError(LowcError):
    """The C compiler is missing or failed on generated code."""


def cache_root() -> str:
    base = os.environ.get("LOWC_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "lowc")
    return os.path.join(base, "cpu_lut")


def find_compiler() -> str:
    cc = os.environ.get("CC")
    if cc:
        path = shutil.which(cc)
        if path is None:
            raise CpuLutBuildError(f"C compiler CC={cc!r} not found: install gcc/clang or point CC at one")
        return path
    for name in ("cc", "gcc", "clang"):
        path = shutil.which(name)
        if path:
            return path
    raise CpuLutBuildError("no C compiler found (tried $CC, cc, gcc, clang): the cpu-lut backend needs one to build its kernels")


def _compiler_id(cc: str) -> str:
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60)
        return out.stdout.splitlines()[0] if out.stdout else cc
    except (OSError, subprocess.SubprocessError):
        return cc


def library_key(source: str, cc: str, flags: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    for part in (source, _compiler_id(cc), " ".join(flags)):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


def build(source: str, flags: tuple[str, ...] = BASE_FLAGS) -> str:
    """Path of the shared library for ``source`` (compiling it unless the cache already has it)."""
    cc = find_compiler()
    d = os.path.join(cache_root(), library_key(source, cc, flags))
    lib = os.path.join(d, LIB_NAME)
    if os.path.exists(lib):
        return lib
    os.makedirs(d, exist_ok=True)
    src = os.path.join(d, "kernels.c")
    with open(src + ".tmp", "w") as f:
        f.write(source)
    os.replace(src + ".tmp", src)
    fd, tmp = tempfile.mkstemp(prefix=".lib-", suffix=".so", dir=d)
    os.close(fd)
    try:
        proc = subprocess.run([cc, *flags, src, "-o", tmp, "-lm"], capture_output=True, text=True, timeout=600)
    except OSError as e:
        os.unlink(tmp)
        raise CpuLutBuildError(f"cannot run C compiler {cc}: {e}") from None
    if proc.returncode != 0:
        os.unlink(tmp)
        first = next((ln for ln in proc.stderr.splitlines() if "error" in ln), proc.stderr.strip()[:300])
        raise CpuLutBuildError(f"C compiler {cc} failed on {src}: {first}")
    os.replace(tmp, lib)
    return lib


_loaded: dict[str, ctypes.CDLL] = {}


def load(path: str) -> ctypes.CDLL:
    """Load a built library once per process."""
    if path not in _loaded:
        try:
            _loaded[path] = ctypes.CDLL(path)
        except OSError as e:
            raise CpuLutBuildError(f"cannot load {path}: {e}") from None
    return _loaded[path]
