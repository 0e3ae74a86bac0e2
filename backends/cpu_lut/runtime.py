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

from lowc.backends.cpu_lut import build, codegen, layout
from lowc.backends.cpu_lut.codegen import KernelConfig, SparseKernelConfig
from lowc.errors import LowcError

_functions: dict[KernelConfig, ctypes._CFuncPtr] = {}
_libraries: dict[KernelConfig, str] = {}
_threads: int | None = None

_ARGTYPES = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
             ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
#: the group-sparse kernels take n_keep after N and the mask after the weight
_SPARSE_ARGTYPES = _ARGTYPES[:5] + [ctypes.c_int64, ctypes.c_void_p] + _ARGTYPES[5:]


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
    missing = sorted({c for c in configs if c not in _functions}, key=codegen.config_key)
    if not missing:
        return None
    path = build.build(codegen.generate(missing))
    lib = build.load(path)
    for c in missing:
        fn = getattr(lib, c.name)
        fn.argtypes = _SPARSE_ARGTYPES if isinstance(c, SparseKernelConfig) else _ARGTYPES
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


def run_sparse(x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, scales: torch.Tensor,
               zeros: torch.Tensor | None, bias: torch.Tensor | None, bits: int, group_size: int, in_features: int,
               out_features: int, sparse_group: int, n_keep: int, force_scalar: bool | None = None,
               threads: int | None = None) -> torch.Tensor:
    """``y = x @ W^T + bias`` for a group-sparse weight in the LUT layout (float32 compute; x's dtype out)."""
    cfg = SparseKernelConfig(bits, group_size, sparse_group, zeros is None)
    fn = _functions.get(cfg)
    if fn is None:
        ensure([cfg])
        fn = _functions[cfg]
    k_pad = -(-in_features // sparse_group) * sparse_group
    if x.shape[-1] != in_features:
        raise LowcError(f"lowc::linear_lut_gs: input width {x.shape[-1]} != in_features={in_features}")
    want = (out_features, layout.sparse_weight_bytes(n_keep, sparse_group))
    if tuple(weight.shape) != want or tuple(mask.shape) != (out_features, 8 * layout.mask_words(in_features, sparse_group)):
        raise LowcError(f"lowc::linear_lut_gs: weight {tuple(weight.shape)} / mask {tuple(mask.shape)} do not match "
                        f"N={out_features}, n_keep={n_keep}, sparse_group={sparse_group} (expected the cpu-lut layout)")
    lead = x.shape[:-1]
    xf = x.reshape(-1, in_features).to(torch.float32).contiguous()
    m = xf.shape[0]
    y = torch.empty((m, out_features), dtype=torch.float32)
    bf = None if bias is None else bias.to(torch.float32).contiguous()
    if force_scalar is None:
        force_scalar = os.environ.get("LOWC_CPU_LUT_SCALAR", "") not in ("", "0")
    if m > 0:
        fn(_ptr(xf), m, in_features, k_pad, out_features, n_keep, _ptr(weight.contiguous()), _ptr(mask.contiguous()),
           _ptr(scales.to(torch.float32).contiguous()), _ptr(None if zeros is None else zeros.contiguous()), _ptr(bf),
           _ptr(y), threads or num_threads(), int(bool(force_scalar)))
    return y.reshape(*lead, out_features).to(x.dtype)


def sparse_error_bound(x: torch.Tensor, scales_ref: torch.Tensor, idx: torch.Tensor, bits: int, group_size: int,
                       sparse_group: int) -> torch.Tensor:
    """Worst-case |y_lut - y_ref| per output ([..., N]) of the group-sparse kernels (see codegen).

    Each activation is off by at most ``xs/2`` (``xs = max|x| / 32767`` of its input row) and
    multiplies ``q - z`` (at most ``2^b - 1`` in size) times its group's scale; summed over the
    ``n_keep * sparse_group`` kept weights of the row.
    """
    n_keep = idx.shape[1]
    xs = x.float().abs().amax(-1, keepdim=True) / 32767  # [..., 1]
    q = torch.arange(n_keep * sparse_group) // group_size
    per_row = scales_ref.float().abs()[:, q].sum(-1)  # [N]: sum over kept weights of |s|
    bound = xs * per_row * ((1 << bits) - 1) / 2
    return bound * 1.001 + 1e-6  # float rounding of the int16 conversion and the accumulation


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
