"""Run LUT kernels from Python: find (or build) the function of a configuration and call it.

``ensure(configs)`` builds one library holding every configuration given (what ``prepare`` does for
a program); a configuration asked for later that no loaded library has is built on its own on first
use. Threads: ``set_num_threads(n)``, else ``$LOWC_CPU_LUT_THREADS``, else ``torch.get_num_threads()``.
``$LOWC_CPU_LUT_SCALAR=1`` (or ``force_scalar=True``) selects the portable scalar path.
"""

from __future__ import annotations

import ctypes
import os

import torch

from lowc.backends.cpu_lut import build, codegen
from lowc.backends.cpu_lut.codegen import KernelConfig
from lowc.errors import LowcError

_functions: dict[KernelConfig, ctypes._CFuncPtr] = {}
_libraries: dict[KernelConfig, str] = {}
_threads: int | None = None

_ARGTYPES = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
             ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]


def set_num_threads(n: int | None) -> None:
    """Threads per kernel call (``None``: back to the environment/torch default)."""
    global _threads
    if n is not None and n < 1:
        raise LowcError(f"cpu-lut: thread count must be >= 1, got {n}")
    _threads = n


def num_threads() -> int:
    if _threads is not None:
        return _threads
    env = os.environ.get("LOWC_CPU_LUT_THREADS")
    if env:
        try:
            n = int(env)
        except ValueError:
            raise LowcError(f"LOWC_CPU_LUT_THREADS={env!r} is not an integer") from None
        if n < 1:
            raise LowcError(f"LOWC_CPU_LUT_THREADS={env!r} must be >= 1")
        return n
    return torch.get_num_threads()


def ensure(configs) -> str | None:
    """Build/load one library with every configuration in ``configs`` not loaded yet; its path."""
    missing = sorted({c for c in configs if c not in _functions})
    if not missing:
        return None
    path = build.build(codegen.generate(missing))
    lib = build.load(path)
    for c in missing:
        fn = getattr(lib, c.name)
        fn.argtypes = _ARGTYPES
        fn.restype = None
        _functions[c] = fn
        _libraries[c] = path
    return path


def library_of(cfg: KernelConfig) -> str:
    ensure([cfg])
    return _libraries[cfg]


def has_avx2() -> bool:
    """Whether the kernels take the AVX2 path on this CPU (asks the compiled code)."""
    cfg = KernelConfig(2, 32, True)
    ensure([cfg])
    lib = build.load(_libraries[cfg])
    lib.lowc_lut_has_avx2.restype = ctypes.c_int
    return bool(lib.lowc_lut_has_avx2())


def _ptr(t: torch.Tensor | None):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def run(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
        bias: torch.Tensor | None, bits: int, group_size: int, in_features: int, out_features: int,
        force_scalar: bool | None = None, threads: int | None = None) -> torch.Tensor:
    """``y = x @ W^T + bias`` for a weight in the LUT layout (float32 compute; output in x's dtype)."""
    cfg = KernelConfig(bits, group_size, zeros is None)
    fn = _functions.get(cfg)
    if fn is None:
        ensure([cfg])
        fn = _functions[cfg]
    n_groups = scales.shape[1]
    k_pad = n_groups * group_size
    if x.shape[-1] != in_features:
        raise LowcError(f"lowc::linear_lut: input width {x.shape[-1]} != in_features={in_features}")
    if tuple(weight.shape) != (-(-out_features // 32), k_pad // 8, bits, 32):
        raise LowcError(f"lowc::linear_lut: weight {tuple(weight.shape)} does not match N={out_features}, "
                        f"K_pad={k_pad}, bits={bits} (expected the cpu-lut layout)")
    lead = x.shape[:-1]
    xf = x.reshape(-1, in_features).to(torch.float32).contiguous()
    m = xf.shape[0]
    y = torch.empty((m, out_features), dtype=torch.float32)
    bf = None if bias is None else bias.to(torch.float32).contiguous()
    if force_scalar is None:
        force_scalar = os.environ.get("LOWC_CPU_LUT_SCALAR", "") not in ("", "0")
    if m > 0:
        fn(_ptr(xf), m, in_features, k_pad, out_features, _ptr(weight.contiguous()), _ptr(scales.contiguous()),
           _ptr(None if zeros is None else zeros.contiguous()), _ptr(bf), _ptr(y),
           threads or num_threads(), int(bool(force_scalar)))
    return y.reshape(*lead, out_features).to(x.dtype)


def error_bound(x: torch.Tensor, scales_ref: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Worst-case |y_lut - y_ref| per output ([..., N]) from int8 table rounding (see codegen).

    ``scales_ref``: the reference-layout scales [N, G]. Each entry of a chunk's tables is off by at
    most ``ts/2`` with ``ts = max|T|/127 <= sum_{4 acts}|x|/2 / 127`` per chunk, and a chunk's sum
    adds ``(2^b - 1) * C/4`` such entries (weighted by the bit planes).
    """
    c = codegen.chunk_size(group_size)
    n, g = scales_ref.shape
    k_pad = g * group_size
    xf = torch.nn.functional.pad(x.float(), (0, k_pad - x.shape[-1]))
    quads = xf.reshape(*xf.shape[:-1], k_pad // 4, 4).abs().sum(-1) / 2  # max|T| of each group of 4
    ts = quads.reshape(*xf.shape[:-1], k_pad // c, c // 4).amax(-1) / 127  # [..., chunks]
    per_group = ts.reshape(*xf.shape[:-1], g, group_size // c).sum(-1) * ((1 << bits) - 1) * (c / 4) / 2
    bound = per_group @ scales_ref.float().abs().T  # [..., N]
    return bound * 1.001 + 1e-6  # float rounding of the table build and accumulation
