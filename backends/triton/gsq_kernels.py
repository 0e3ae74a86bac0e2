"""Triton kernels for group-sparse quantized linears (``lowc::linear_gsq_tr``): ``y = x @ W.T + b`` where
each row of ``W`` keeps ``n_keep`` groups of ``SG`` consecutive inputs and drops the rest.

Imports triton at module level: import it only through :mod:`lowc.backends.triton.gsq`, which does
so lazily. Weights are in the ``compact-k-packed-int32`` layout
(:class:`lowc.backends.triton.layout.SparseTritonWeight`): int32 words ``[Kc/P, N]`` over the compact
rows (``P = 32/BITS`` codes per word; compact position ``c`` of column ``n`` is input
``idx[c // SG, n] * SG + c % SG``), ``scales``/``zeros`` ``[G, N]`` over groups of ``GS`` compact
positions, ``idx`` int16 ``[n_keep, N]``. Accumulation is fp32; codes become floats by the ``2^23``
mantissa trick of :mod:`lowc.backends.triton.wq_kernels` (no int->float conversion).

* :func:`gsq_gemv` (decode, skips dropped groups): one activation row per program, grid
  ``(N/BLOCK_N, SPLIT_K, M)``; each program walks ``BLOCK_K`` compact positions per step, so it
  loads only kept codes, and gathers ``x`` at each column's kept inputs (``SG`` is a multiple of
  ``P``, so a word's codes are consecutive inputs of one kept group). Scales and zeros are read per
  word row (a tile may span quantization groups: any ``BLOCK_K`` works, the last group may be
  short). Per word row it accumulates ``D = sum x q`` and ``X = sum x`` and applies
  ``s * (D - z * X)``, as the dense GEMV does; split-K partials are reduced by
  :func:`lowc.backends.triton.wq_kernels.splitk_reduce`.
* :func:`gsq_gemm` (prefill, M > 16): tiled ``tl.dot`` over the padded input (``BLOCK_K`` a multiple
  of ``SG``, a power of two), densifying each B tile in registers: per column it keeps a cursor
  into its kept groups (``idx`` increases along a row), so the groups of a K tile are found with
  ``BLOCK_K / SG`` index loads per column; only kept codes (and their scales) are loaded, dropped
  positions are zero. Every K tile's MMA runs (the columns of a tile keep different groups): the
  saving is the weight traffic, not the tensor-core work. No split-K (the cursor starts at 0).
"""

from __future__ import annotations

import triton
import triton.language as tl

from lowc.backends.triton.wq_kernels import code_times_x, grouped_pids


@triton.jit
def gsq_gemv(x_ptr, w_ptr, s_ptr, z_ptr, i_ptr, b_ptr, o_ptr,
             M, N, K, KW, GS, stride_xm, stride_om, tiles_per_split, num_tiles,
             BITS: tl.constexpr, PACK: tl.constexpr, SG: tl.constexpr, HAS_ZEROS: tl.constexpr,
             HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.program_id(2)
    BKW: tl.constexpr = BLOCK_K // PACK
    ZP: tl.constexpr = 1 << (BITS - 1)
    MAGIC: tl.constexpr = 0x4B000000  # the bits of 2^23 as fp32: its mantissa ulp is 1
    MAGIC_F: tl.constexpr = 8388608.0

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_w = tl.arange(0, BKW)
    x_row = x_ptr + m * stride_xm
    acc2 = tl.zeros((BKW, BLOCK_N), dtype=tl.float32)

    t_start = pid_k * tiles_per_split
    t_end = tl.minimum(t_start + tiles_per_split, num_tiles)
    for t in range(t_start, t_end):
        rows = t * BKW + offs_w
        c0 = rows * PACK  # the compact position of each word row's first code
        mask = n_mask[None, :] & (rows < KW)[:, None]
        w = tl.load(w_ptr + rows[:, None] * N + offs_n[None, :], mask=mask, other=0)
        kept = tl.load(i_ptr + (c0 // SG)[:, None] * N + offs_n[None, :], mask=mask, other=0).to(tl.int32)
        base = kept * SG + (c0 % SG)[:, None]  # per column: the input of the row's first code
        g = (c0 // GS)[:, None] * N + offs_n[None, :]
        s = tl.load(s_ptr + g, mask=mask, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            # zero points per word row: as floats by the same exact trick (no int->float conversion)
            z = (tl.load(z_ptr + g, mask=mask, other=0).to(tl.int32) | MAGIC).to(tl.float32, bitcast=True) - MAGIC_F
        else:
            z = ZP
        w_hi = w >> 16
        d = tl.zeros((BKW, BLOCK_N), dtype=tl.float32)
        xs = tl.zeros((BKW, BLOCK_N), dtype=tl.float32)
        for j in tl.static_range(PACK):
            k = base + j
            xj = tl.load(x_row + k, mask=mask & (k < K), other=0.0).to(tl.float32)
            xs += xj
            d += code_times_x(w, w_hi, xj, j, BITS)
        acc2 += s * (d - z * xs)

    acc = tl.sum(acc2, axis=0)
    if PARTIAL:
        tl.store(o_ptr + (pid_k * M + m) * N + offs_n, acc, mask=n_mask)
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        tl.store(o_ptr + m * stride_om + offs_n, acc.to(o_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def gsq_gemm(x_ptr, w_ptr, s_ptr, z_ptr, i_ptr, b_ptr, o_ptr,
             M, N, K, NKEEP, GS, stride_xm, stride_om, num_tiles,
             BITS: tl.constexpr, PACK: tl.constexpr, SG: tl.constexpr, HAS_ZEROS: tl.constexpr,
             HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    GPT: tl.constexpr = BLOCK_K // SG  # sparse groups per K tile
    MASK: tl.constexpr = (1 << BITS) - 1
    ZP: tl.constexpr = 1 << (BITS - 1)
    MAGIC: tl.constexpr = 0x4B000000
    MAGIC_F: tl.constexpr = 8388608.0

    pid_m, pid_n = grouped_pids(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_kk = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    cursor = tl.zeros((BLOCK_N,), dtype=tl.int32)  # per column: kept groups before this tile

    for t in range(num_tiles):
        offs_k = t * BLOCK_K + offs_kk
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=m_mask[:, None] & (offs_k < K)[None, :], other=0.0)
        # the tile's sparse groups g0 .. g0 + GPT - 1 kept by a column are among its next GPT kept groups
        grp = (offs_k // SG)[:, None]
        slot = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.int32)
        kept = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.int1)
        n_in = tl.zeros((BLOCK_N,), dtype=tl.int32)
        for u in tl.static_range(GPT):
            j = cursor + u
            g = tl.load(i_ptr + j * N + offs_n, mask=n_mask & (j < NKEEP), other=-1).to(tl.int32)
            hit = g[None, :] == grp
            slot = tl.where(hit, j[None, :], slot)
            kept = kept | hit
            n_in += ((g >= t * GPT) & (g < t * GPT + GPT)).to(tl.int32)
        cursor += n_in
        c = slot * SG + (offs_k % SG)[:, None]  # compact positions of the tile's kept weights
        w = tl.load(w_ptr + (c // PACK) * N + offs_n[None, :], mask=kept, other=0)
        q = (w >> ((c % PACK) * BITS)) & MASK
        gq = (c // GS) * N + offs_n[None, :]
        s = tl.load(s_ptr + gq, mask=kept, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            z = (tl.load(z_ptr + gq, mask=kept, other=0).to(tl.int32) | MAGIC).to(tl.float32, bitcast=True)  # 2^23 + z
        else:
            z = ZP + MAGIC_F
        # (2^23 + q) - (2^23 + z) = q - z exactly; one rounding to the activation dtype: the
        # reference's dequantized weight bit for bit; dropped positions are 0 (their scale loads as 0)
        b = (((q | MAGIC).to(tl.float32, bitcast=True) - z) * s).to(x_ptr.dtype.element_ty)
        if DOT_FP32:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)

    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(o_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(o_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])
