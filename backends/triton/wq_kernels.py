"""Triton kernels for weight-only quantized linears (``lowc::linear_wq_tr``): ``y = x @ dequant(W).T + b``.

Imports triton at module level: import it only through :mod:`lowc.backends.triton.wq`, which does
so lazily. Whether kernels run compiled or interpreted (``TRITON_INTERPRET=1``) is fixed when this
module is first imported (triton decides at ``@triton.jit`` decoration).

Weights are in the ``k-packed-int32`` layout (:mod:`lowc.backends.triton.layout`): int32 words
``[K_pad/P, N]``, ``P = 32/BITS`` codes per word, code ``j`` of word ``r`` is input feature
``r*P + j``; ``scales``/``zeros`` ``[G, N]``. A K tile never spans two groups (the host picks
``BLOCK_K`` dividing the group size, or the layer has a single group), so each tile reads one row of
``BLOCK_N`` scales (and zeros). Activations ``x`` are ``[M, K]`` with unit stride along K.
Accumulation is fp32 everywhere.

* Codes become floats without int->float conversions (a quarter-rate instruction on recent GPUs that
  would cap a memory-bound kernel): OR-ing a code into the mantissa of ``2^23`` (bits ``0x4B000000``,
  whose mantissa ulp is 1) gives the float ``2^23 + q`` exactly; subtracting ``2^23`` (folded into
  the zero point in the GEMM) is exact too.
* :func:`wq_gemv` (decode): one activation row per program (grid ``(N/BLOCK_N, SPLIT_K, M)``), pure
  FMA. Per K tile it accumulates ``D[n] = sum_k x[k] q[k, n]`` and ``X = sum_k x[k]`` and applies
  the group's scale once per word row: ``acc[r, n] += s[n] * (D[r, n] - z[n] * X[r])`` over the
  ``P`` codes of word row ``r``, which equals ``sum_k x[k] (q[k, n] - z[n]) s[n]``; the codes are never
  scaled one by one, and the rows are summed once after the K loop. Code ``j`` is masked
  in place within its 16-bit half of the word (one shift per word, not per code), read as
  ``q * 2^off`` and multiplied by ``x * 2^-off`` (both exact): an AND/OR, a subtract and an FMA per code.
* :func:`wq_gemm` (prefill, and decode with ``BLOCK_M = 16``): tiled ``tl.dot``. The B tile is
  unpacked in registers, either by loading each word once per code it holds (``UNPACK=0``: a
  ``[BLOCK_K, BLOCK_N]`` pointer tile with repeated addresses, one shift per row) or by loading
  ``[BLOCK_K/P, BLOCK_N]`` words and reshaping ``[BLOCK_K/P, P, BLOCK_N] -> [BLOCK_K, BLOCK_N]``
  (``UNPACK=1``); both are autotuned. It is dequantized as ``(q - z) * s`` in fp32 and cast to the
  activation dtype, which reproduces the reference's dequantized weight bit for bit, then fed to
  ``tl.dot`` with fp32 accumulation. ``DOT_FP32`` runs the dot in fp32 (``input_precision="ieee"``):
  used for fp32 activations (no TF32 rounding), and for bf16 under the interpreter, whose bf16
  arithmetic is wrong (it stores bf16 as uint16).
* Split-K (``SPLIT_K > 1``): program ``pid_k`` handles a contiguous run of K tiles and stores fp32
  partials ``[SPLIT_K, M, N]``; :func:`splitk_reduce` sums them in a fixed order (deterministic),
  adds the bias and casts. With ``SPLIT_K = 1`` the bias and cast happen in the main kernel.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def code_times_x(w, w_hi, x, J: tl.constexpr, BITS: tl.constexpr):
    """``x * q`` for code ``J`` of each int32 word ``w`` (``w_hi = w >> 16``), exactly and without an
    int->float conversion: the code is masked in place inside its 16-bit half, OR-ed under the exponent
    of ``2^23`` (whose mantissa ulp is 1) to give the float ``2^23 + q * 2^OFF``, and ``x`` is prescaled
    by ``2^-OFF`` (both exact)."""
    MASK: tl.constexpr = (1 << BITS) - 1
    if J * BITS < 16:
        bits_j = w & (MASK << (J * BITS))
        x = x * (1.0 / (1 << (J * BITS)))
    else:
        bits_j = w_hi & (MASK << (J * BITS - 16))
        x = x * (1.0 / (1 << (J * BITS - 16)))
    return x * ((bits_j | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0)


@triton.jit
def grouped_pids(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row block, column block) of GEMM program ``pid`` in grouped order: ``GROUP_M`` row blocks
    share each column block's weights while they are hot in L2."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    return first_pid_m + ((pid % num_pid_in_group) % group_size_m), (pid % num_pid_in_group) // group_size_m


@triton.jit
def wq_gemv(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, o_ptr,
            M, N, K, KW, stride_xm, stride_om, tiles_per_split, num_tiles, tiles_per_group,
            BITS: tl.constexpr, PACK: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr,
            PARTIAL: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.program_id(2)
    BKW: tl.constexpr = BLOCK_K // PACK
    ZP: tl.constexpr = 1 << (BITS - 1)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_w = tl.arange(0, BKW)
    x_row = x_ptr + m * stride_xm
    acc2 = tl.zeros((BKW, BLOCK_N), dtype=tl.float32)

    t_start = pid_k * tiles_per_split
    t_end = tl.minimum(t_start + tiles_per_split, num_tiles)
    for t in range(t_start, t_end):
        rows = t * BKW + offs_w
        w_mask = n_mask[None, :]
        if not EVEN_K:
            w_mask = w_mask & (rows < KW)[:, None]
        w = tl.load(w_ptr + rows[:, None] * N + offs_n[None, :], mask=w_mask, other=0)
        w_hi = w >> 16
        d = tl.zeros((BKW, BLOCK_N), dtype=tl.float32)
        xs = tl.zeros((BKW,), dtype=tl.float32)
        for j in tl.static_range(PACK):
            k = rows * PACK + j
            xj = tl.load(x_row + k, mask=k < K, other=0.0).to(tl.float32)
            xs += xj
            d += code_times_x(w, w_hi, xj[:, None], j, BITS)
        g = t // tiles_per_group
        s = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            z = tl.load(z_ptr + g * N + offs_n, mask=n_mask, other=0).to(tl.float32)[None, :]
        else:
            z = ZP
        # scaled per word row, reduced over rows once after the loop (no cross-warp sum per tile)
        acc2 += s[None, :] * (d - z * xs[:, None])

    acc = tl.sum(acc2, axis=0)
    if PARTIAL:
        tl.store(o_ptr + (pid_k * M + m) * N + offs_n, acc, mask=n_mask)
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        tl.store(o_ptr + m * stride_om + offs_n, acc.to(o_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def wq_gemm(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, o_ptr,
            M, N, K, KW, stride_xm, stride_om, tiles_per_split, num_tiles, tiles_per_group,
            BITS: tl.constexpr, PACK: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr,
            PARTIAL: tl.constexpr, EVEN_K: tl.constexpr, DOT_FP32: tl.constexpr, UNPACK: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    BKW: tl.constexpr = BLOCK_K // PACK
    MASK: tl.constexpr = (1 << BITS) - 1
    ZP: tl.constexpr = 1 << (BITS - 1)
    MAGIC: tl.constexpr = 0x4B000000
    MAGIC_F: tl.constexpr = 8388608.0

    pid_m, pid_n = grouped_pids(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    t_start = pid_k * tiles_per_split
    t_end = tl.minimum(t_start + tiles_per_split, num_tiles)
    for t in range(t_start, t_end):
        offs_k = t * BLOCK_K + tl.arange(0, BLOCK_K)
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=m_mask[:, None] & (offs_k < K)[None, :], other=0.0)
        g = t // tiles_per_group
        s = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            z = tl.load(z_ptr + g * N + offs_n, mask=n_mask, other=0).to(tl.float32) + MAGIC_F
        else:
            z = tl.full((BLOCK_N,), ZP + MAGIC_F, dtype=tl.float32)
        # (2^23 + q) - (2^23 + z) = q - z exactly, without an int->float conversion per code; then one
        # rounding to the activation dtype: the reference's dequantized weight, bit for bit
        if UNPACK == 0:
            rows = offs_k // PACK
            w_mask = n_mask[None, :]
            if not EVEN_K:
                w_mask = w_mask & (rows < KW)[:, None]
            w = tl.load(w_ptr + rows[:, None] * N + offs_n[None, :], mask=w_mask, other=0)
            q = (w >> ((offs_k % PACK) * BITS)[:, None]) & MASK
            b = ((q | MAGIC).to(tl.float32, bitcast=True) - z[None, :]) * s[None, :]
            b = b.to(x_ptr.dtype.element_ty)
        else:
            rows = t * BKW + tl.arange(0, BKW)
            w_mask = n_mask[None, :]
            if not EVEN_K:
                w_mask = w_mask & (rows < KW)[:, None]
            w = tl.load(w_ptr + rows[:, None] * N + offs_n[None, :], mask=w_mask, other=0)
            q = (w[:, None, :] >> (tl.arange(0, PACK) * BITS)[None, :, None]) & MASK
            # dequantized in the load's layout (columns contiguous per thread), reshaped as 16-bit values
            b = ((q | MAGIC).to(tl.float32, bitcast=True) - z[None, None, :]) * s[None, None, :]
            b = tl.reshape(b.to(x_ptr.dtype.element_ty), (BLOCK_K, BLOCK_N))
        if DOT_FP32:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)

    if PARTIAL:
        tl.store(o_ptr + (pid_k * M + offs_m[:, None]) * N + offs_n[None, :], acc,
                 mask=m_mask[:, None] & n_mask[None, :])
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(o_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(o_ptr.dtype.element_ty),
                 mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def splitk_reduce(ws_ptr, b_ptr, o_ptr, M, N, stride_om,
                  SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(ws_ptr + (s * M + m) * N + offs_n, mask=n_mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(o_ptr + m * stride_om + offs_n, acc.to(o_ptr.dtype.element_ty), mask=n_mask)
