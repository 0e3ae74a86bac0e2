"""Run LUT kernels from Python: find (or build) the function of a configuration and call it.

``ensure(configs)`` builds one library holding every configuration given (what ``prepare`` does for
a program); a configuration asked for later that no loaded library has is built on its own on first
use. Threads: ``set_num_threads(n)``, else ``$LOWC_CPU_LUT_THREADS``, else ``torch.get_num_threads()``.
``$LOWC_CPU_LUT_SCALAR=1`` (or ``force_scalar=True``) selects the portable scalar path.

Large M: :func:`run` and :func:`run_sparse` take the GEMM path (:func:`run_gemm`, :func:`run_sparse_gemm`:
weight tiles dequantized in C, ``torch.mm`` on torch's intra-op threads) from :func:`gemm_min_m` input
rows on (``$LOWC_CPU_LUT_GEMM_MIN_M`` overrides :data:`GEMM_MIN_M`); tile dtype :func:`gemm_dtype`
(``$LOWC_CPU_LUT_GEMM_DTYPE`` = ``bf16``/``fp32``).
"""

from __future__ import annotations

import ctypes
import os
import threading

import torch

from lowc.backends.cpu_lut import build, codegen, layout
from lowc.backends.cpu_lut.codegen import KernelConfig, SparseKernelConfig
from lowc.errors import LowcError

_functions: dict[KernelConfig, ctypes._CFuncPtr] = {}
_dequant_functions: dict[KernelConfig | SparseKernelConfig, ctypes._CFuncPtr] = {}
_libraries: dict[KernelConfig, str] = {}
_threads: int | None = None

#: M (input rows per call) from which :func:`run` takes the GEMM path, per tile dtype and bits: the
#: crossover against the LUT kernel measured at one thread on the issue's four shapes, the largest of
#: them (benchmarks/results/cpu_lut_prefill.md; W2: 64 on every shape, W4: 4-32; fp32 tiles: W4 128,
#: W2 512 or never). W1 takes W2's value (its kernel is as fast), W3 W4's (not measured).
GEMM_MIN_M = {torch.bfloat16: {1: 64, 2: 64, 3: 32, 4: 32}, torch.float32: {1: 512, 2: 512, 3: 128, 4: 128}}
#: bytes of the GEMM path's dequantized weight tile (one buffer per thread, reused tile after tile and call
#: after call). Measured (benchmarks/results/cpu_lut_prefill.md): one thread, 5632x2048 M=128, CPU time,
#: 1 MiB 10.9 ms, 2 MiB 8.7, whole weight 7.9; two threads on the loaded 2-core machine, 4 MiB 543 ms vs
#: 32 MiB 172 (each torch.mm waits for its OpenMP team, a scheduler slice when a core is taken: fewer,
#: larger calls)
GEMM_TILE_BYTES = 32 << 20

_ARGTYPES = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
             ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
#: ``NAME_dequant(w, scales, zeros, N, k_in, k_pad, t0, ntiles, out, ld, bf16, nthreads, force_scalar)``
_DEQUANT_ARGTYPES = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                     ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_int,
                     ctypes.c_int]
#: ``NAME_dequant(w, mask, scales, zeros, k_in, k_pad, n_keep, r0, nrows, out, ld, bf16, nthreads)`` (group-sparse)
_SPARSE_DEQUANT_ARGTYPES = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 5 + [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int,
                                                                             ctypes.c_int]
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
        dq = getattr(lib, c.name + "_dequant")
        dq.argtypes = _SPARSE_DEQUANT_ARGTYPES if isinstance(c, SparseKernelConfig) else _DEQUANT_ARGTYPES
        dq.restype = None
        _dequant_functions[c] = dq
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
        force_scalar: bool | None = None, threads: int | None = None, gemm: bool | None = None) -> torch.Tensor:
    """``y = x @ W^T + bias`` for a weight in the LUT layout (output in x's dtype).

    ``gemm``: ``None`` takes :func:`run_gemm` when x has at least :func:`gemm_min_m` rows (and the
    scalar path is not forced), ``True``/``False`` force it on/off; else the LUT kernel (float32 compute).
    """
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
    if force_scalar is None:
        force_scalar = os.environ.get("LOWC_CPU_LUT_SCALAR", "") not in ("", "0")
    if gemm is None:
        gemm = not force_scalar and x.numel() // max(in_features, 1) >= gemm_min_m(bits)
    if gemm:
        return run_gemm(x, weight, scales, zeros, bias, bits, group_size, in_features, out_features, threads)
    lead = x.shape[:-1]
    xf = x.reshape(-1, in_features).to(torch.float32).contiguous()
    m = xf.shape[0]
    y = torch.empty((m, out_features), dtype=torch.float32)
    bf = None if bias is None else bias.to(torch.float32).contiguous()
    if m > 0:
        fn(_ptr(xf), m, in_features, k_pad, out_features, _ptr(weight.contiguous()), _ptr(scales.contiguous()),
           _ptr(None if zeros is None else zeros.contiguous()), _ptr(bf), _ptr(y),
           threads or num_threads(), int(bool(force_scalar)))
    return y.reshape(*lead, out_features).to(x.dtype)


def gemm_dtype() -> torch.dtype:
    """The element type of the GEMM path's weight tiles: ``$LOWC_CPU_LUT_GEMM_DTYPE`` (``bf16``/``fp32``), else
    bf16 where oneDNN has a native bf16 GEMM on this CPU (AVX-512 BF16/AMX), else float32."""
    env = os.environ.get("LOWC_CPU_LUT_GEMM_DTYPE", "")
    if env:
        if env not in _GEMM_DTYPES:
            raise LowcError(f"LOWC_CPU_LUT_GEMM_DTYPE={env!r} must be one of {', '.join(_GEMM_DTYPES)}")
        return _GEMM_DTYPES[env]
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32


_GEMM_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def gemm_min_m(bits: int) -> int:
    """Input rows from which :func:`run` takes the GEMM path (``$LOWC_CPU_LUT_GEMM_MIN_M`` overrides)."""
    env = os.environ.get("LOWC_CPU_LUT_GEMM_MIN_M", "")
    if env:
        try:
            return int(env)
        except ValueError:
            raise LowcError(f"LOWC_CPU_LUT_GEMM_MIN_M={env!r} is not an integer") from None
    return GEMM_MIN_M[gemm_dtype()][bits]


def dequantize_tiles(weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
                     group_size: int, in_features: int, out_features: int, t0: int, ntiles: int, out: torch.Tensor,
                     threads: int | None = None, force_scalar: bool = False) -> torch.Tensor:
    """Write rows ``32*t0 .. 32*(t0+ntiles)`` (clipped to N) of the real weight into ``out`` (float32 or
    bf16, ``[>= rows, in_features]``, unit column stride, any row stride): exactly ``lowc::linear_wq``'s
    ``(q - z) * s`` (then rounded to bf16 if ``out`` is bf16). Returns the written rows of ``out``."""
    cfg = KernelConfig(bits, group_size, zeros is None)
    fn = _dequant_functions.get(cfg)
    if fn is None:
        ensure([cfg])
        fn = _dequant_functions[cfg]
    k_pad = scales.shape[1] * group_size
    n_tiles = -(-out_features // layout.TILE)
    rows = min(out_features, (t0 + ntiles) * layout.TILE) - t0 * layout.TILE
    if not (0 <= t0 and t0 + ntiles <= n_tiles and out.dtype in (torch.float32, torch.bfloat16) and out.dim() == 2
            and out.shape[1] == in_features and out.shape[0] >= rows and out.stride(1) == 1
            and out.stride(0) >= in_features):
        raise LowcError(f"lowc::linear_lut: cannot dequantize tiles {t0}..{t0 + ntiles} of N={out_features} into "
                        f"{out.dtype}{tuple(out.shape)}")
    fn(_ptr(weight), _ptr(scales), _ptr(zeros), out_features, in_features, k_pad, t0, ntiles, _ptr(out), out.stride(0),
       int(out.dtype == torch.bfloat16), threads or num_threads(), int(force_scalar))
    return out[:rows]


_buffers = threading.local()


def _tile_buffer(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """This thread's tile buffer (flat, at least ``numel``): kept between calls, at most one tile
    (:data:`GEMM_TILE_BYTES` plus row padding) per dtype: a fresh 32 MiB allocation would be page-faulted
    in on every call."""
    have = getattr(_buffers, "tiles", None)
    if have is None:
        have = _buffers.tiles = {}
    buf = have.get(dtype)
    if buf is None or buf.numel() < numel:
        # a normal tensor even when the first call runs under inference_mode: an inference tensor could not
        # be written by a later call outside it
        with torch.inference_mode(False):
            buf = have[dtype] = torch.empty(numel, dtype=dtype)
    return buf[:numel]


def _tiled_gemm(x: torch.Tensor, fill, bias: torch.Tensor | None, in_features: int, out_features: int, threads: int,
                dtype: torch.dtype, tile_bytes: int | None) -> torch.Tensor:
    """``x @ W^T + bias`` with ``W`` written a tile of rows at a time by ``fill(n0, rows, buf) -> buf[:rows]``."""
    lead = x.shape[:-1]
    elt = torch.finfo(dtype).bits // 8
    pad = 64 // elt
    per = max(layout.TILE * threads, (tile_bytes or GEMM_TILE_BYTES) // (in_features * elt) // layout.TILE * layout.TILE)
    per = min(per, -(-out_features // layout.TILE) * layout.TILE)
    # Rows padded by 64 bytes: the dense kernel writes a tile's 32 rows interleaved, and a row stride
    # that is a multiple of 4 KiB would put them all in one L1 set. The padding is zero in both operands:
    # oneDNN's bf16 GEMM reads a row past K when K is not a multiple of its block (measured: NaN there
    # makes the row's outputs NaN, finite values are multiplied by zero).
    buf = _tile_buffer(per * (in_features + pad), dtype).view(per, in_features + pad)
    buf[:, in_features:] = 0
    buf = buf[:, :in_features]
    xd = torch.empty((x.numel() // max(in_features, 1), in_features + pad), dtype=dtype)
    xd[:, in_features:] = 0
    xd = xd[:, :in_features]
    xd.copy_(x.reshape(-1, in_features))
    yt = torch.empty((out_features, xd.shape[0]), dtype=dtype)  # y^T: a tile's rows are contiguous rows of it
    for n0 in range(0, out_features, per):
        wt = fill(n0, min(per, out_features - n0), buf)
        torch.mm(wt, xd.T, out=yt[n0:n0 + wt.shape[0]])
    y = yt.T.to(torch.float32)
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.reshape(*lead, out_features).to(x.dtype)


def run_gemm(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
             bias: torch.Tensor | None, bits: int, group_size: int, in_features: int, out_features: int,
             threads: int | None = None, dtype: torch.dtype | None = None,
             tile_bytes: int | None = None) -> torch.Tensor:
    """``y = x @ W^T + bias`` through dequantized weight tiles and ``torch.mm`` (the large-M path).

    The weight is dequantized ``tile_bytes`` (default :data:`GEMM_TILE_BYTES`) at a time into one
    reused buffer (C, ``threads`` threads) and multiplied by torch's GEMM (its intra-op threads); no
    dequantized copy outlives the call. ``dtype`` (default :func:`gemm_dtype`): bf16 rounds the
    weight, the activations and the output to bf16 (fp32 accumulation), see :func:`gemm_error_bound`.
    """
    threads = threads or num_threads()
    weight, scales = weight.contiguous(), scales.contiguous()
    zeros = None if zeros is None else zeros.contiguous()

    def fill(n0, rows, buf):
        return dequantize_tiles(weight, scales, zeros, bits, group_size, in_features, out_features, n0 // layout.TILE,
                                -(-rows // layout.TILE), buf, threads)

    return _tiled_gemm(x, fill, bias, in_features, out_features, threads, dtype or gemm_dtype(), tile_bytes)


def dequantize_sparse_rows(weight: torch.Tensor, mask: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                           bits: int, group_size: int, in_features: int, out_features: int, sparse_group: int,
                           n_keep: int, r0: int, rows: int, out: torch.Tensor, threads: int | None = None) -> torch.Tensor:
    """Rows ``r0 .. r0+rows`` of a group-sparse weight's dense real weight (0 in dropped groups) into
    ``out`` (float32 or bf16, unit column stride): exactly ``lowc::linear_gsq``'s. Returns ``out[:rows]``."""
    cfg = SparseKernelConfig(bits, group_size, sparse_group, zeros is None)
    fn = _dequant_functions.get(cfg)
    if fn is None:
        ensure([cfg])
        fn = _dequant_functions[cfg]
    if not (0 <= r0 and r0 + rows <= out_features and out.dtype in (torch.float32, torch.bfloat16) and out.dim() == 2
            and out.shape[1] == in_features and out.shape[0] >= rows and out.stride(1) == 1
            and out.stride(0) >= in_features):
        raise LowcError(f"lowc::linear_lut_gs: cannot dequantize rows {r0}..{r0 + rows} of N={out_features} into "
                        f"{out.dtype}{tuple(out.shape)}")
    k_pad = -(-in_features // sparse_group) * sparse_group
    fn(_ptr(weight), _ptr(mask), _ptr(scales), _ptr(zeros), in_features, k_pad, n_keep, r0, rows, _ptr(out), out.stride(0),
       int(out.dtype == torch.bfloat16), threads or num_threads())
    return out[:rows]


def run_sparse_gemm(x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, scales: torch.Tensor,
                    zeros: torch.Tensor | None, bias: torch.Tensor | None, bits: int, group_size: int, in_features: int,
                    out_features: int, sparse_group: int, n_keep: int, threads: int | None = None,
                    dtype: torch.dtype | None = None, tile_bytes: int | None = None) -> torch.Tensor:
    """:func:`run_gemm` for a group-sparse weight (tiles of its dense real weight; the same bound)."""
    threads = threads or num_threads()
    weight, mask = weight.contiguous(), mask.contiguous()
    scales = scales.to(torch.float32).contiguous()
    zeros = None if zeros is None else zeros.contiguous()

    def fill(n0, rows, buf):
        return dequantize_sparse_rows(weight, mask, scales, zeros, bits, group_size, in_features, out_features,
                                      sparse_group, n_keep, n0, rows, buf, threads)

    return _tiled_gemm(x, fill, bias, in_features, out_features, threads, dtype or gemm_dtype(), tile_bytes)


def gemm_error_bound(x: torch.Tensor, weight_ref: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Worst-case |y_gemm - y_ref| per output ([..., N]) of :func:`run_gemm` against ``lowc::linear_wq``.

    ``weight_ref``: the real weight [N, K] (the dequantized tiles are exactly it, or its bf16 rounding).
    With ``S = |x| @ |W|^T``, ``g = K u32 / (1 - K u32)`` (``u32 = 2^-24``, float32 sums in any order,
    both sides) and ``u = 2^-8`` for bf16 tiles (x, W and the output each rounded once; products exact
    in float32) or 0 for float32 ones: ``|y - y_ref| <= ((1 + u)^3 (1 + g) - 1 + g) * S``.
    """
    k = weight_ref.shape[1]
    g = k * 2.0 ** -24 / (1 - k * 2.0 ** -24)
    u = 2.0 ** -8 if dtype == torch.bfloat16 else 0.0
    s = x.float().abs() @ weight_ref.float().abs().T
    return s * (((1 + u) ** 3 * (1 + g) - 1 + g) * 1.001) + 1e-6


def run_sparse(x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, scales: torch.Tensor,
               zeros: torch.Tensor | None, bias: torch.Tensor | None, bits: int, group_size: int, in_features: int,
               out_features: int, sparse_group: int, n_keep: int, force_scalar: bool | None = None,
               threads: int | None = None, gemm: bool | None = None) -> torch.Tensor:
    """``y = x @ W^T + bias`` for a group-sparse weight in the LUT layout (x's dtype out); ``gemm`` as in
    :func:`run` (:func:`run_sparse_gemm` from :func:`gemm_min_m` rows), else the row kernel (float32 compute)."""
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
    if force_scalar is None:
        force_scalar = os.environ.get("LOWC_CPU_LUT_SCALAR", "") not in ("", "0")
    if gemm is None:
        gemm = not force_scalar and x.numel() // max(in_features, 1) >= gemm_min_m(bits)
    if gemm:
        return run_sparse_gemm(x, weight, mask, scales, zeros, bias, bits, group_size, in_features, out_features,
                               sparse_group, n_keep, threads)
    lead = x.shape[:-1]
    xf = x.reshape(-1, in_features).to(torch.float32).contiguous()
    m = xf.shape[0]
    y = torch.empty((m, out_features), dtype=torch.float32)
    bf = None if bias is None else bias.to(torch.float32).contiguous()
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
