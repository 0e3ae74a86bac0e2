"""Compile generated C with the system compiler into a content-addressed cache and load it (ctypes).

Cache: ``$LOWC_CACHE_DIR/cpu_lut/<sha256(source, flags, machine)[:20]>/liblowc_lut.so`` (default
``~/.cache/lowc``), with ``liblowc_lut.so.sha256`` beside it. A library is compiled once per
distinct source and flags, written under a temporary name and renamed into place, so concurrent
processes never load a half-written file. The cache is untrusted like any file lowc reads: before a
library is loaded (``dlopen`` runs its constructors) it must be a regular file owned by this user,
not writable by others, in a directory that is not writable by others, and its sha256 must match
the digest recorded when lowc built it; an entry that fails is rebuilt, never loaded. A warm cache
needs no compiler. The compiler is ``$CC`` or ``cc``/``gcc``/``clang`` from ``PATH``; a missing or
failing compiler, or a cache directory that cannot be written, is a :class:`CpuLutBuildError`
naming it.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import tempfile

from lowc.errors import LowcError
from lowc.untrusted import sha256_file

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


def library_key(source: str, flags: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    for part in (source, " ".join(flags), platform.machine()):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


def _private(st: os.stat_result) -> bool:
    return st.st_uid == os.geteuid() and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def verified(lib: str) -> bool:
    """Whether the cached ``lib`` may be loaded: a regular file owned by this user and writable by
    no one else, in such a directory, whose sha256 is the one recorded at build time."""
    try:
        st, dst = os.lstat(lib), os.lstat(os.path.dirname(lib))
        if not (stat.S_ISREG(st.st_mode) and _private(st) and stat.S_ISDIR(dst.st_mode) and _private(dst)):
            return False
        with open(lib + ".sha256") as f:
            recorded = f.read().strip()
        return recorded == sha256_file(lib)
    except OSError:
        return False


def build(source: str, flags: tuple[str, ...] = BASE_FLAGS) -> str:
    """Path of the shared library for ``source`` (compiling it unless the cache already has a
    verified copy)."""
    d = os.path.join(cache_root(), library_key(source, flags))
    lib = os.path.join(d, LIB_NAME)
    if verified(lib):
        return lib
    cc = find_compiler()
    try:
        os.makedirs(d, mode=0o700, exist_ok=True)
        os.chmod(d, stat.S_IMODE(os.lstat(d).st_mode) & ~(stat.S_IWGRP | stat.S_IWOTH))
        src = os.path.join(d, "kernels.c")
        # a temporary name of this process: two processes building the same key never share one
        fd, src_tmp = tempfile.mkstemp(prefix=".kernels-", suffix=".c", dir=d)
        with os.fdopen(fd, "w") as f:
            f.write(source)
        os.replace(src_tmp, src)
        fd, tmp = tempfile.mkstemp(prefix=".lib-", suffix=".so", dir=d)
        os.close(fd)
    except OSError as e:
        raise CpuLutBuildError(f"cannot write the kernel cache {e.filename or d}: {e.strerror or e} "
                               "(set LOWC_CACHE_DIR to a writable directory)") from None
    try:
        proc = subprocess.run([cc, *flags, src, "-o", tmp, "-lm"], capture_output=True, text=True, timeout=600)
    except OSError as e:
        os.unlink(tmp)
        raise CpuLutBuildError(f"cannot run C compiler {cc}: {e}") from None
    if proc.returncode != 0:
        os.unlink(tmp)
        first = next((ln for ln in proc.stderr.splitlines() if "error" in ln), proc.stderr.strip()[:300])
        raise CpuLutBuildError(f"C compiler {cc} failed on {src}: {first}")
    try:
        os.chmod(tmp, 0o755)
        with open(tmp + ".sha256", "w") as f:
            f.write(sha256_file(tmp) + "\n")
        os.replace(tmp + ".sha256", lib + ".sha256")
        os.replace(tmp, lib)
    except OSError as e:
        raise CpuLutBuildError(f"cannot write the kernel cache {e.filename or d}: {e.strerror or e}") from None
    return lib


_loaded: dict[str, ctypes.CDLL] = {}


def load(path: str) -> ctypes.CDLL:
    """Load a built library once per process, after checking it is the one lowc built."""
    if path not in _loaded:
        if not verified(path):
            raise CpuLutBuildError(f"{path} is not the library lowc built (its sha256, owner or permissions changed); "
                                   "delete it to rebuild")
        try:
            _loaded[path] = ctypes.CDLL(path)
        except OSError as e:
            raise CpuLutBuildError(f"cannot load {path}: {e}") from None
    return _loaded[path]
