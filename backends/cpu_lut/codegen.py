"""Generate the C source of the LUT GEMM kernels for a set of kernel configurations.

One exported function per :class:`KernelConfig` (bits, group size, symmetric or not), named
``lowc_lut_b{bits}_g{group}_{sym|asym}``, computing ``y[M, N] = x[M, K] . W^T + bias`` from the
layout of :mod:`lowc.backends.cpu_lut.layout`::

    void NAME(const float *x, int64_t M, int64_t k_in, int64_t k_pad, int64_t N,
              const uint8_t *w, const float *scales, const uint8_t *zeros, const float *bias,
              float *y, int nthreads, int force_scalar);

Algorithm (T-MAC): a code ``q = sum_j 2^j q_j`` is split into bit planes ``q_j``. For every group of
4 activations the 16 partial sums ``T[p] = sum_i (bit_i(p) - 1/2) x_i`` are built once per input row
(centred, so ``|T| <= sum|x_i|/2``); tables are quantized to int8 with one scale ``ts`` per chunk
of ``C = chunk_size(group)`` activations (``ts = max|T| / 127``). Then

    sum_k x_k q_k = sum_j 2^j sum_tables T[nibble_j] + (2^b - 1)/2 * sum_k x_k

so a group contributes ``s * (ts * sum_j 2^j acc_j + ((2^b-1)/2 - zero) * sum_k x_k)``.
The AVX2 path does each lookup with ``pshufb`` for 32 rows at once and combines lookups with
``unpack`` + ``maddubs`` into int16: bit planes are taken in pairs (0,1), (2,3), the lookups of
planes j and j+1 interleaved and multiplied by (1, 2), so one int16 accumulator holds
``T[n_j] + 2 T[n_j+1]`` summed over the chunk (bound: 3*127 per lookup, 2 lookups per 8
activations, ``|acc| <= 762*C/8 = 12192`` for C = 128 < 2^15: exact); a lone plane (W1, plane 2 of
W3) adds its two lookups with weights (1, 1) (``|acc| <= 254*C/8``). Each accumulator is widened to
int32 (shifted by j) once per chunk, and the float table scale, weight scales and zero points are
applied once per group. Weights are software-prefetched ``PREFETCH`` bytes ahead. The scalar
path does the same integer arithmetic (bit-identical sums; float rounding differs only by FMA).
Threads: a small pthread pool over runs of ``TILES_PER_TASK`` = 4 row tiles of 32 (so each thread streams
long contiguous runs and the prefetch runs on into its next tile; runs claimed from an atomic counter; at
M = 1 the caller wakes the workers first and builds the tables while they wake up; the caller
works too and never waits for a worker that has not started -- an OpenMP fork-join barrier stalled
for a whole scheduler slice, ~12-16 ms, whenever another process held one of the two cores).

Error bound (table quantization only; the float reference is ``lowc::linear_wq``): each looked-up
entry is off by at most ``ts/2``, so per output

    |y - y_ref| <= sum_groups |s_g| * (2^b - 1) * (C_g/4) * ts_c / 2      (summed over chunks c)

which :func:`lowc.backends.cpu_lut.runtime.error_bound` computes and the tests check. Relative to
``|s| * (2^b-1) * sum|x|/2`` (the largest possible magnitude of a group's code sum) it is about
``1/254`` per chunk, i.e. int8 tables cost ~0.4% of the activation range, below 4-bit weight error.

Tables and integer sums are computed by one shared C builder (compiled with ``-ffp-contract=off``)
so both paths see identical int8 tables. The path is chosen per call: AVX2+FMA when the CPU has
them and ``force_scalar`` is 0, else the portable scalar loop.

Dequantization for the GEMM path (large M): ``NAME_dequant(w, scales, zeros, N, k_in, k_pad, t0,
ntiles, out, ld, bf16, nthreads, force_scalar)`` writes row tiles ``t0 .. t0+ntiles`` of the real weight, exactly
``(q - z) * s`` (then bf16, round to nearest even), row stride ``ld``. The bf16 AVX2 path builds per
group and row a 16-entry table of the bf16 values (low/high bytes, ``pshufb``), gathers the plane bytes
of two positions into 64-bit words and bit-transposes them (8x8, SWAR), which leaves the codes of 8
activations of both rows in nibbles: ~1 instruction per weight against ~3.5 for a per-row
``SPREAD``-table decode (0.20-0.24 ns per weight measured, one thread, CPU time). The float32 path
decodes a row at a time with ``SPREAD``. The group-sparse ``NAME_dequant`` writes whole rows (0 in
dropped groups) walking the kept-group mask.

Group-sparse kernels (``lowc_lut_gs_b{bits}_g{group}_s{sparse_group}_{sym|asym}``, layout
:class:`lowc.backends.cpu_lut.layout.LutSparseWeight`)::

    void NAME(const float *x, int64_t M, int64_t k_in, int64_t k_pad, int64_t N, int64_t n_keep,
              const uint8_t *w, const uint8_t *mask, const float *scales, const uint8_t *zeros,
              const float *bias, float *y, int nthreads, int force_scalar);

A pshufb lookup pays off when the 32 rows of a tile share the table's 4 activations; the rows of a
group-sparse weight keep different groups, so a row's table would serve only its own ``bits``
lookups (a quarter of a pshufb at W4). The sparse kernel therefore uses the degenerate table of one
activation per entry: per input row, once, shared by every weight row, the activations are
converted to int16 with one scale ``xs = max|x| / 32767``. Each weight row walks its kept-group
bitmask (``ctz``; for sparse groups wider than 16 a list of block positions is written first), and
for each kept block of 16 inputs reads its 16 codes (one 16-byte load holds two blocks: low and
high nibbles) and the 16 int16 activations at the block's input position: ``pmaddwd`` of
``(q - z)`` (int16) with them, summed in int32 over the quantization group (exact: |q - z| <= 15,
at most 32768 weights per group), converted to float once per group and scaled by ``s``; the row's
sum is scaled by ``xs`` at the end. Dropped groups cost nothing: neither their codes nor their
activations are read. Error bound (activation rounding only; the float reference is
``lowc::linear_gsq``): ``|y - y_ref| <= xs/2 * sum_kept |s| * max|q - z|``
(:func:`lowc.backends.cpu_lut.runtime.sparse_error_bound`), ~1e-5 of the output here. Threads: the
pool above, over runs of ``ROWS_PER_TASK`` rows. The scalar path does the same integer sums per block.

Speed: a kept block of 16 weights costs ~11 instructions here (mask walk, code unpack, zero point,
gather, pmaddwd, accumulate) against ~3 per 16 weights for the dense kernel, whose tables serve 32
rows per lookup. W4 S50 reads about as many bytes as dense W2 (codes + bitmask + scales: 16.3 vs
17.0 MB at 14336x4096) and fewer than half of dense W4's, but does ~1.7x the work of dense W4
(measured, hot cache, one thread): it beats dense W4 only where that one is bound by memory
bandwidth, and cannot reach 1.2x over W2. Masks shared by the 32 rows of a tile would let the
pshufb kernel itself skip groups (half of dense W4's work and bytes); GQSA's per-row masks do not.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lowc.backends.cpu_lut.layout import ROW_OF_BYTE

#: software prefetch distance of the AVX2 tile loop, bytes ahead in the tile's weight stream (one
#: prefetch per 64-byte line, clamped to the last line of the task's run of tiles). The hardware prefetchers alone left
#: W1/W2 short of DRAM bandwidth (compute between loads delays their requests); 4096 measured best
#: of 0/512/1024/2048/4096/8192 on the 2-core Zen 3 benchmark machine (14336x4096, W2 ~-10..15%).
PREFETCH = 4096

#: activations per table-scale chunk, at most (paired-plane int16 accumulators stay exact up to 343)
MAX_CHUNK = 128


def chunk_size(group_size: int) -> int:
    """Activations sharing one table scale: the group, or its largest divisor <= 128 that is a multiple of 8."""
    if group_size <= MAX_CHUNK:
        return group_size
    return max(c for c in range(8, MAX_CHUNK + 1, 8) if group_size % c == 0)


@dataclass(frozen=True, order=True)
class KernelConfig:
    bits: int
    group_size: int
    symmetric: bool

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 4:
            raise ValueError(f"LUT kernels support 1..4 bits, got {self.bits}")
        if self.group_size <= 0 or self.group_size % 8:
            raise ValueError(f"LUT kernels need a group size that is a positive multiple of 8, got {self.group_size}")

    @property
    def name(self) -> str:
        return f"lowc_lut_b{self.bits}_g{self.group_size}_{'sym' if self.symmetric else 'asym'}"


PRELUDE = r"""/* Generated by lowc.backends.cpu_lut.codegen: LUT (T-MAC style) low-bit GEMM kernels. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define LOWC_X86 1
#endif

#define TILE 32
#define TILES_PER_TASK 4
static const int ROW_OF_BYTE[TILE] = {ROW_OF_BYTE_INIT};
/* sign of activation i in table entry p, times 1/2 */
static const float HALF_SIGN[16][4] = {HALF_SIGN_INIT};

int lowc_lut_has_avx2(void) {
#if defined(LOWC_X86) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return 0;
#endif
}

/* ---- thread pool ------------------------------------------------------------------------------
 * Tasks (row tiles) are claimed one at a time from an atomic counter tagged with the job number.
 * The caller works too and waits only for tiles already claimed: a worker the OS has not scheduled
 * yet (another process busy on the cores) never holds the call up, unlike a fork-join barrier. */
typedef void (*lowc_task_fn)(void *ctx, int64_t t);
#define LOWC_MAX_WORKERS 63
static pthread_mutex_t pool_mu = PTHREAD_MUTEX_INITIALIZER, run_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t pool_cv = PTHREAD_COND_INITIALIZER;
static int pool_workers = 0, pool_active = 0;
static uint32_t pool_gen = 0;
static _Atomic uint64_t pool_claim = 0; /* job << 32 | next task */
static _Atomic int64_t pool_done = 0;
static _Atomic uint32_t pool_ready = 0; /* job number whose shared inputs (tables) are built */
static int64_t pool_ntasks = 0;
static lowc_task_fn pool_fn = 0;
static void *pool_ctx = 0;

static void pool_claims(uint32_t gen) {
    while (atomic_load(&pool_ready) != gen) { /* the caller is still building the tables */
        if ((uint32_t)(atomic_load(&pool_claim) >> 32) != gen) return;
#ifdef LOWC_X86
        _mm_pause();
#endif
    }
    for (;;) {
        uint64_t c = atomic_load(&pool_claim);
        if ((uint32_t)(c >> 32) != gen) return;
        int64_t i = (int64_t)(c & 0xffffffffu);
        if (i >= pool_ntasks) return;
        if (atomic_compare_exchange_weak(&pool_claim, &c, c + 1)) {
            pool_fn(pool_ctx, i); /* stable: the job cannot end while task i is not done */
            atomic_fetch_add(&pool_done, 1);
        }
    }
}

static void *pool_worker(void *arg) {
    const int idx = (int)(intptr_t)arg;
    uint32_t seen = 0;
    for (;;) {
        /* poll briefly for the next job, yielding the core (torch's own threads run between
           kernel calls and must not compete with a spinning worker), then sleep */
        for (int spin = 0; spin < 64 && (uint32_t)(atomic_load(&pool_claim) >> 32) == seen; spin++) sched_yield();
        pthread_mutex_lock(&pool_mu);
        while (pool_gen == seen) pthread_cond_wait(&pool_cv, &pool_mu);
        seen = pool_gen;
        const int active = idx < pool_active;
        pthread_mutex_unlock(&pool_mu);
        if (active) pool_claims(seen);
    }
    return 0;
}

/* prep(prep_ctx), if given, runs on the caller after the workers were woken and before any task:
   the workers' wake-up latency (tens of us when they sleep) overlaps it. */
static void pool_run_prep(int nthreads, int64_t ntasks, lowc_task_fn fn, void *ctx, void (*prep)(void *), void *prep_ctx) {
    if (nthreads > LOWC_MAX_WORKERS + 1) nthreads = LOWC_MAX_WORKERS + 1;
    if (nthreads <= 1 || ntasks <= 1) {
        if (prep) prep(prep_ctx);
        for (int64_t i = 0; i < ntasks; i++) fn(ctx, i);
        return;
    }
    pthread_mutex_lock(&run_mu); /* one job at a time */
    pthread_mutex_lock(&pool_mu);
    while (pool_workers < nthreads - 1) {
        pthread_t th;
        if (pthread_create(&th, 0, pool_worker, (void *)(intptr_t)pool_workers) != 0) break;
        pthread_detach(th);
        pool_workers++;
    }
    pool_active = nthreads - 1;
    pool_fn = fn;
    pool_ctx = ctx;
    pool_ntasks = ntasks;
    atomic_store(&pool_done, 0);
    const uint32_t gen = ++pool_gen;
    atomic_store(&pool_claim, (uint64_t)gen << 32);
    pthread_cond_broadcast(&pool_cv);
    pthread_mutex_unlock(&pool_mu);
    if (prep) prep(prep_ctx);
    atomic_store(&pool_ready, gen);
    pool_claims(gen);
    while (atomic_load(&pool_done) < ntasks) sched_yield();
    pthread_mutex_unlock(&run_mu);
}

static void pool_run(int nthreads, int64_t ntasks, lowc_task_fn fn, void *ctx) {
    pool_run_prep(nthreads, ntasks, fn, ctx, 0, 0);
}

/* Tables for activations [k0, k0+chunk) of one row: 16 int8 entries per group of 4, one scale. */
static void build_chunk(const float *x, int64_t k_in, int64_t k0, int chunk, int8_t *tab, float *ts, float *sx) {
    float t[16 * 32];
    float mx = 0.0f, sum = 0.0f;
    for (int j = 0; j < chunk / 4; j++) {
        float xv[4];
        for (int i = 0; i < 4; i++) {
            int64_t k = k0 + 4 * j + i;
            xv[i] = k < k_in ? x[k] : 0.0f;
            sum += xv[i];
        }
        for (int p = 0; p < 16; p++) {
            float v = ((HALF_SIGN[p][0] * xv[0] + HALF_SIGN[p][1] * xv[1]) + HALF_SIGN[p][2] * xv[2]) + HALF_SIGN[p][3] * xv[3];
            t[16 * j + p] = v;
            float a = v < 0.0f ? -v : v;
            mx = a > mx ? a : mx;
        }
    }
    float inv = mx > 0.0f ? 127.0f / mx : 0.0f;
    for (int e = 0; e < 4 * chunk; e++) {
        /* round to nearest even via the 1.5*2^23 trick (|v| <= 127 + eps), no libm call */
        float v = t[e] * inv;
        float r = (v + 12582912.0f) - 12582912.0f;
        r = r > 127.0f ? 127.0f : (r < -127.0f ? -127.0f : r);
        tab[e] = (int8_t)r;
    }
    *ts = mx / 127.0f;
    *sx = sum;
}

typedef struct { const float *x; int64_t k_in, k_pad, nc; int chunk; int8_t *tab; float *ts, *sx; } lowc_build_job;

static void lowc_build_task(void *arg, int64_t e) {
    const lowc_build_job *b = (const lowc_build_job *)arg;
    const int64_t m = e / b->nc, c = e % b->nc;
    build_chunk(b->x + m * b->k_in, b->k_in, c * b->chunk, b->chunk, b->tab + m * b->k_pad * 4 + c * b->chunk * 4,
                b->ts + e, b->sx + e);
}

typedef struct { const float *x; int64_t M, k_in, k_pad; int chunk; int8_t *tab; float *ts, *sx; int nthreads; } lowc_tables_args;

/* Tables of all M rows: by the caller for one row (a few us), through the pool for many. */
static void lowc_build_tables(const float *x, int64_t M, int64_t k_in, int64_t k_pad, int chunk, int8_t *tab,
                              float *ts, float *sx, int nthreads) {
    lowc_build_job b = {x, k_in, k_pad, k_pad / chunk, chunk, tab, ts, sx};
    if (M == 1) {
        for (int64_t e = 0; e < b.nc; e++) lowc_build_task(&b, e);
    } else {
        pool_run(nthreads, M * b.nc, lowc_build_task, &b);
    }
}

static void lowc_build_tables_prep(void *arg) { /* M == 1: built by the caller while the workers wake */
    const lowc_tables_args *a = (const lowc_tables_args *)arg;
    lowc_build_tables(a->x, 1, a->k_in, a->k_pad, a->chunk, a->tab, a->ts, a->sx, 1);
}
"""

SCALAR = r"""
static void NAME_tile_scalar(const int8_t *tab, const float *ts, const float *sx, const uint8_t *w,
                             const float *st, const uint8_t *zt, int64_t G, const uint8_t *w_last, float *out) {
    float o[TILE] = {0};
    (void)w_last;
    for (int64_t g = 0; g < G; g++) {
        float ga[TILE] = {0};
        float sxg = 0.0f;
        for (int c = 0; c < GS / CH; c++) {
            int32_t ia[TILE] = {0};
            const int8_t *tb = tab + (g * GS + c * CH) * 4;
            for (int p = 0; p < CH / 8; p++) {
                const int8_t *t0 = tb + 32 * p, *t1 = t0 + 16;
                for (int b = 0; b < BITS; b++) {
                    for (int i = 0; i < TILE; i++) {
                        int v = w[i];
                        ia[ROW_OF_BYTE[i]] += (t0[v & 15] + t1[v >> 4]) * (1 << b);
                    }
                    w += TILE;
                }
            }
            float tsc = ts[g * (GS / CH) + c];
            for (int r = 0; r < TILE; r++) ga[r] += (float)ia[r] * tsc;
            sxg += sx[g * (GS / CH) + c];
        }
        for (int r = 0; r < TILE; r++) {
            float zr = ASYM ? (float)zt[g * TILE + r] : (float)(1 << (BITS - 1));
            o[r] += st[g * TILE + r] * (ga[r] + (CEN - zr) * sxg);
        }
    }
    memcpy(out, o, sizeof(o));
}
"""

AVX2_HEAD = r"""
#ifdef LOWC_X86
__attribute__((target("avx2,fma")))
static void NAME_tile_avx2(const int8_t *tab, const float *ts, const float *sx, const uint8_t *w,
                           const float *st, const uint8_t *zt, int64_t G, const uint8_t *w_last, float *out) {
    const __m256i mask = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi8(1), c12 = _mm256_set1_epi16(0x0201);
    (void)ones; (void)c12;
    /* w_last: last line of this task's tiles; prefetches run on into the task's next tile, not past it */
    __m256 o0 = _mm256_setzero_ps(), o1 = o0, o2 = o0, o3 = o0;
    for (int64_t g = 0; g < G; g++) {
        __m256 g0 = _mm256_setzero_ps(), g1 = g0, g2 = g0, g3 = g0;
        float sxg = 0.0f;
        for (int c = 0; c < GS / CH; c++) {
            const int8_t *tb = tab + (g * GS + c * CH) * 4;
ACC_DECL
            for (int p = 0; p < CH / 8; p++) {
                const __m256i t0 = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(tb + 32 * p)));
                const __m256i t1 = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(tb + 32 * p + 16)));
                PREFETCH
PLANES
                w += BITS * TILE;
            }
            __m256i i0 = _mm256_setzero_si256(), i1 = i0, i2 = i0, i3 = i0;
WIDEN
            const __m256 tsc = _mm256_set1_ps(ts[g * (GS / CH) + c]);
            g0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i0), tsc, g0);
            g1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i1), tsc, g1);
            g2 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i2), tsc, g2);
            g3 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i3), tsc, g3);
            sxg += sx[g * (GS / CH) + c];
        }
        const __m256 sxv = _mm256_set1_ps(sxg);
        const float *sg = st + g * TILE;
ZERO_TERM
        o0 = _mm256_fmadd_ps(_mm256_loadu_ps(sg + 0), _mm256_fmadd_ps(f0, sxv, g0), o0);
        o1 = _mm256_fmadd_ps(_mm256_loadu_ps(sg + 8), _mm256_fmadd_ps(f1, sxv, g1), o1);
        o2 = _mm256_fmadd_ps(_mm256_loadu_ps(sg + 16), _mm256_fmadd_ps(f2, sxv, g2), o2);
        o3 = _mm256_fmadd_ps(_mm256_loadu_ps(sg + 24), _mm256_fmadd_ps(f3, sxv, g3), o3);
    }
    _mm256_storeu_ps(out + 0, o0);
    _mm256_storeu_ps(out + 8, o1);
    _mm256_storeu_ps(out + 16, o2);
    _mm256_storeu_ps(out + 24, o3);
}
#endif
"""

PLANE = r"""                {
                    const __m256i wv = _mm256_loadu_si256((const __m256i *)(w + B * TILE));
                    const __m256i r0 = _mm256_shuffle_epi8(t0, _mm256_and_si256(wv, mask));
                    const __m256i r1 = _mm256_shuffle_epi8(t1, _mm256_and_si256(_mm256_srli_epi16(wv, 4), mask));
                    aB_lo = _mm256_add_epi16(aB_lo, _mm256_maddubs_epi16(ones, _mm256_unpacklo_epi8(r0, r1)));
                    aB_hi = _mm256_add_epi16(aB_hi, _mm256_maddubs_epi16(ones, _mm256_unpackhi_epi8(r0, r1)));
                }"""

PAIR = r"""                {
                    const __m256i wa = _mm256_loadu_si256((const __m256i *)(w + B * TILE));
                    const __m256i wb = _mm256_loadu_si256((const __m256i *)(w + (B + 1) * TILE));
                    const __m256i ra0 = _mm256_shuffle_epi8(t0, _mm256_and_si256(wa, mask));
                    const __m256i rb0 = _mm256_shuffle_epi8(t0, _mm256_and_si256(wb, mask));
                    const __m256i ra1 = _mm256_shuffle_epi8(t1, _mm256_and_si256(_mm256_srli_epi16(wa, 4), mask));
                    const __m256i rb1 = _mm256_shuffle_epi8(t1, _mm256_and_si256(_mm256_srli_epi16(wb, 4), mask));
                    aB_lo = _mm256_add_epi16(aB_lo, _mm256_add_epi16(_mm256_maddubs_epi16(c12, _mm256_unpacklo_epi8(ra0, rb0)),
                                                                     _mm256_maddubs_epi16(c12, _mm256_unpacklo_epi8(ra1, rb1))));
                    aB_hi = _mm256_add_epi16(aB_hi, _mm256_add_epi16(_mm256_maddubs_epi16(c12, _mm256_unpackhi_epi8(ra0, rb0)),
                                                                     _mm256_maddubs_epi16(c12, _mm256_unpackhi_epi8(ra1, rb1))));
                }"""

WIDEN_PLANE = r"""            i0 = _mm256_add_epi32(i0, _mm256_slli_epi32(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(aB_lo)), B));
            i1 = _mm256_add_epi32(i1, _mm256_slli_epi32(_mm256_cvtepi16_epi32(_mm256_extracti128_si256(aB_lo, 1)), B));
            i2 = _mm256_add_epi32(i2, _mm256_slli_epi32(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(aB_hi)), B));
            i3 = _mm256_add_epi32(i3, _mm256_slli_epi32(_mm256_cvtepi16_epi32(_mm256_extracti128_si256(aB_hi, 1)), B));"""

ZERO_ASYM = r"""        const __m256 cen = _mm256_set1_ps(CEN);
        const uint8_t *zg = zt + g * TILE;
        const __m256 f0 = _mm256_sub_ps(cen, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(zg + 0)))));
        const __m256 f1 = _mm256_sub_ps(cen, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(zg + 8)))));
        const __m256 f2 = _mm256_sub_ps(cen, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(zg + 16)))));
        const __m256 f3 = _mm256_sub_ps(cen, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(zg + 24)))));"""

ZERO_SYM = r"""        const __m256 f0 = _mm256_set1_ps(CEN - (float)(1 << (BITS - 1))), f1 = f0, f2 = f0, f3 = f0;"""

DRIVER = r"""
typedef struct {
    const int8_t *tab; const float *ts, *sx, *scales, *bias; const uint8_t *w, *zeros; float *y;
    int64_t M, N, G, NC, k_pad, tile_bytes;
    void (*tile)(const int8_t *, const float *, const float *, const uint8_t *, const float *, const uint8_t *, int64_t, const uint8_t *, float *);
} NAME_job;

static void NAME_one_tile(const NAME_job *j, int64_t t, const uint8_t *w_last) {
    const int64_t G = j->G, rows = j->N - t * TILE < TILE ? j->N - t * TILE : TILE;
    const float *st = j->scales + t * TILE * G;
    const uint8_t *zt = j->zeros ? j->zeros + t * TILE * G : NULL;
    float *stmp = NULL;
    uint8_t *ztmp = NULL;
    if (rows < TILE) { /* tail tile: stored as [G, rows]; pad to [G, 32] */
        stmp = (float *)calloc((size_t)(G * TILE), sizeof(float));
        ztmp = (uint8_t *)calloc((size_t)(G * TILE), 1);
        for (int64_t g = 0; g < G; g++)
            for (int64_t r = 0; r < rows; r++) {
                stmp[g * TILE + r] = st[g * rows + r];
                if (zt) ztmp[g * TILE + r] = zt[g * rows + r];
            }
        st = stmp;
        zt = zt ? ztmp : NULL;
    }
    for (int64_t m = 0; m < j->M; m++) {
        float out[TILE];
        j->tile(j->tab + m * j->k_pad * 4, j->ts + m * j->NC, j->sx + m * j->NC, j->w + t * j->tile_bytes, st, zt, G, w_last, out);
        float *yr = j->y + m * j->N + t * TILE;
        for (int64_t r = 0; r < rows; r++) yr[r] = out[r] + (j->bias ? j->bias[t * TILE + r] : 0.0f);
    }
    free(stmp);
    free(ztmp);
}

/* one pool task = TILES_PER_TASK consecutive tiles: each thread streams longer contiguous runs of
   weights and the software prefetch runs on from one tile into the next */
static void NAME_task(void *arg, int64_t task) {
    const NAME_job *j = (const NAME_job *)arg;
    const int64_t T = (j->N + TILE - 1) / TILE, t0 = task * TILES_PER_TASK;
    const int64_t t1 = t0 + TILES_PER_TASK < T ? t0 + TILES_PER_TASK : T;
    const uint8_t *w_last = j->w + t1 * j->tile_bytes - 64;
    for (int64_t t = t0; t < t1; t++) NAME_one_tile(j, t, w_last);
}

void NAME(const float *x, int64_t M, int64_t k_in, int64_t k_pad, int64_t N, const uint8_t *w,
          const float *scales, const uint8_t *zeros, const float *bias, float *y, int nthreads, int force_scalar) {
    NAME_job j;
    j.G = k_pad / GS; j.NC = k_pad / CH; j.M = M; j.N = N; j.k_pad = k_pad;
    j.tile_bytes = (k_pad / 8) * BITS * TILE;
    int8_t *tab = (int8_t *)malloc((size_t)(M * k_pad * 4 + 64));
    float *ts = (float *)malloc((size_t)(M * j.NC) * sizeof(float));
    float *sx = (float *)malloc((size_t)(M * j.NC) * sizeof(float));
    j.tile = NAME_tile_scalar;
#ifdef LOWC_X86
    if (!force_scalar && lowc_lut_has_avx2()) j.tile = NAME_tile_avx2;
#endif
    j.tab = tab; j.ts = ts; j.sx = sx; j.scales = scales; j.zeros = zeros; j.bias = bias; j.w = w; j.y = y;
    /* tables once per input row; at M = 1 the caller builds them after waking the workers */
    lowc_tables_args ta = {x, M, k_in, k_pad, CH, tab, ts, sx, nthreads};
    if (M == 1) {
        pool_run_prep(nthreads, ((N + TILE - 1) / TILE + TILES_PER_TASK - 1) / TILES_PER_TASK, NAME_task, &j, lowc_build_tables_prep, &ta);
    } else {
        lowc_build_tables(x, M, k_in, k_pad, CH, tab, ts, sx, nthreads);
        pool_run(nthreads, ((N + TILE - 1) / TILE + TILES_PER_TASK - 1) / TILES_PER_TASK, NAME_task, &j);
    }
    free(tab);
    free(ts);
    free(sx);
}
"""

DEQUANT_PRELUDE = r"""
/* ---- dequantization for the GEMM path (large M) ------------------------------------------------
 * SPREAD[v]: byte i of the result = bit i of v, so the 8 codes of a byte position and pair are
 * sum_j SPREAD[plane j byte] << j (one lookup per plane for 8 weights). */
static const uint64_t SPREAD[256] = {SPREAD_INIT};

/* fp32 -> bf16, round to nearest even (torch's conversion for finite values) */
static inline uint16_t lowc_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
"""

DEQUANT = r"""
/* Dequantize row tiles [t0, t0 + ntiles) into out: rows (t - t0) * 32 + r, k_in columns, row stride ld,
   float32 (bf16 = 0) or bf16 (bf16 = 1); w = (q - z) * s rounded once, as lowc::linear_wq. One pool task
   per tile; a row at a time (its writes sequential: 32 rows interleaved at a stride of k_in alias in L1),
   the tile's bytes (<= k_pad/2 * 32) stay in cache across its 32 rows. */
typedef struct {
    const uint8_t *w; const float *scales; const uint8_t *zeros; void *out;
    int64_t N, k_in, k_pad, G, t0, tile_bytes, ld; int bf16;
} NAME_dq_job;

static void NAME_dq_task(void *arg, int64_t task) {
    const NAME_dq_job *j = (const NAME_dq_job *)arg;
    const int64_t t = j->t0 + task, G = j->G, rows = j->N - t * TILE < TILE ? j->N - t * TILE : TILE;
    const float *st = j->scales + t * TILE * G; /* [G, rows] block: full tiles and the tail alike */
    const uint8_t *zt = ASYM ? j->zeros + t * TILE * G : NULL;
    const uint8_t *wt = j->w + t * j->tile_bytes;
    (void)zt;
    for (int pos = 0; pos < TILE; pos++) {
        const int r = ROW_OF_BYTE[pos];
        if (r >= rows) continue;
        const int64_t row = (t - j->t0) * TILE + r;
        for (int64_t p = 0; 8 * p < j->k_in; p++) {
            const int64_t k0 = 8 * p, g = k0 / GS, kn = j->k_in - k0 < 8 ? j->k_in - k0 : 8;
            const uint8_t *wp = wt + p * BITS * TILE + pos;
            uint64_t codes = 0;
            for (int b = 0; b < BITS; b++) codes += SPREAD[wp[b * TILE]] << b;
            const float s = st[g * rows + r];
            const float z = ASYM ? (float)zt[g * rows + r] : (float)(1 << (BITS - 1));
            for (int i = 0; i < kn; i++) {
                const float v = ((float)((codes >> (8 * i)) & 0xff) - z) * s;
                if (j->bf16) ((uint16_t *)j->out)[row * j->ld + k0 + i] = lowc_bf16(v);
                else ((float *)j->out)[row * j->ld + k0 + i] = v;
            }
        }
    }
}

#ifdef LOWC_X86
__attribute__((target("avx2,fma")))
static void NAME_dq_task_avx2(void *arg, int64_t task) {
    const NAME_dq_job *j = (const NAME_dq_job *)arg;
    const int64_t t = j->t0 + task, G = j->G, rows = j->N - t * TILE < TILE ? j->N - t * TILE : TILE;
    const float *st = j->scales + t * TILE * G;
    const uint8_t *zt = ASYM ? j->zeros + t * TILE * G : NULL;
    const uint8_t *wt = j->w + t * j->tile_bytes;
    const int64_t full = j->k_in / 8; /* pairs whose 8 columns are all < k_in */
    const __m256i rnd = _mm256_set1_epi32(0x7fff), one = _mm256_set1_epi32(1);
    (void)zt;
    for (int pos = 0; pos < TILE; pos++) {
        const int r = ROW_OF_BYTE[pos];
        if (r >= rows) continue;
        const int64_t row = (t - j->t0) * TILE + r;
        for (int64_t g = 0; g * GS < 8 * full; g++) {
            const __m256 sv = _mm256_set1_ps(st[g * rows + r]);
            const __m256 zv = _mm256_set1_ps(ASYM ? (float)zt[g * rows + r] : (float)(1 << (BITS - 1)));
            const int64_t p1 = (g + 1) * GS / 8 < full ? (g + 1) * GS / 8 : full;
            for (int64_t p = g * GS / 8; p < p1; p++) {
                const uint8_t *wp = wt + p * BITS * TILE + pos;
                uint64_t codes = 0;
                for (int b = 0; b < BITS; b++) codes += SPREAD[wp[b * TILE]] << b;
                const __m256 v = _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(
                    _mm_cvtsi64_si128((long long)codes))), zv), sv);
                if (j->bf16) { /* round to nearest even, keep the high halves */
                    __m256i u = _mm256_castps_si256(v);
                    u = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(rnd, _mm256_and_si256(_mm256_srli_epi32(u, 16), one))), 16);
                    const __m256i h = _mm256_permute4x64_epi64(_mm256_packus_epi32(u, u), 0x08);
                    _mm_storeu_si128((__m128i *)((uint16_t *)j->out + row * j->ld + 8 * p), _mm256_castsi256_si128(h));
                } else {
                    _mm256_storeu_ps((float *)j->out + row * j->ld + 8 * p, v);
                }
            }
        }
        if (full * 8 < j->k_in) { /* the last pair, cut by k_in */
            const int64_t p = full, k0 = 8 * p, g = k0 / GS;
            const uint8_t *wp = wt + p * BITS * TILE + pos;
            uint64_t codes = 0;
            for (int b = 0; b < BITS; b++) codes += SPREAD[wp[b * TILE]] << b;
            const float s = st[g * rows + r], z = ASYM ? (float)zt[g * rows + r] : (float)(1 << (BITS - 1));
            for (int64_t i = 0; k0 + i < j->k_in; i++) {
                const float v = ((float)((codes >> (8 * i)) & 0xff) - z) * s;
                if (j->bf16) ((uint16_t *)j->out)[row * j->ld + k0 + i] = lowc_bf16(v);
                else ((float *)j->out)[row * j->ld + k0 + i] = v;
            }
        }
    }
}

/* bf16 tiles, AVX2: per group and row a 16-entry table of the bf16 values (q - z) * s (low and high
   bytes, looked up with pshufb); the codes of 8 activations x 32 rows (one pair of the layout) are
   gathered per two positions into 64-bit words (plane bytes) and bit-transposed (8x8, SWAR), which
   leaves code i of both positions in the nibbles of byte i. Two pairs are stored at once (16 bf16 of a
   row = 32 bytes); a group's odd last pair and the pairs cut by k_in take the scalar loop. */
__attribute__((target("avx2,fma")))
static inline __m256i NAME_bit_transpose(__m256i x) {
    __m256i t = _mm256_and_si256(_mm256_xor_si256(x, _mm256_srli_epi64(x, 7)), _mm256_set1_epi64x(0x00AA00AA00AA00AALL));
    x = _mm256_xor_si256(_mm256_xor_si256(x, t), _mm256_slli_epi64(t, 7));
    t = _mm256_and_si256(_mm256_xor_si256(x, _mm256_srli_epi64(x, 14)), _mm256_set1_epi64x(0x0000CCCC0000CCCCLL));
    x = _mm256_xor_si256(_mm256_xor_si256(x, t), _mm256_slli_epi64(t, 14));
    t = _mm256_and_si256(_mm256_xor_si256(x, _mm256_srli_epi64(x, 28)), _mm256_set1_epi64x(0x00000000F0F0F0F0LL));
    return _mm256_xor_si256(_mm256_xor_si256(x, t), _mm256_slli_epi64(t, 28));
}

/* q[k], k = 0..3: positions 4k..4k+3 (lane 0) and 16+4k.. (lane 1) of pair p, code i of positions
   (2m, 2m+1) in the low/high nibble of byte i of 64-bit lane m */
__attribute__((target("avx2,fma")))
static inline void NAME_pair_codes(const uint8_t *wp, __m256i q[4]) {
    const __m256i z = _mm256_setzero_si256();
    __m256i b[4];
    for (int j = 0; j < 4; j++) b[j] = j < BITS ? _mm256_loadu_si256((const __m256i *)(wp + j * TILE)) : z;
    const __m256i l01 = _mm256_unpacklo_epi8(b[0], b[1]), h01 = _mm256_unpackhi_epi8(b[0], b[1]);
    const __m256i l23 = _mm256_unpacklo_epi8(b[2], b[3]), h23 = _mm256_unpackhi_epi8(b[2], b[3]);
    q[0] = NAME_bit_transpose(_mm256_unpacklo_epi16(l01, l23));
    q[1] = NAME_bit_transpose(_mm256_unpackhi_epi16(l01, l23));
    q[2] = NAME_bit_transpose(_mm256_unpacklo_epi16(h01, h23));
    q[3] = NAME_bit_transpose(_mm256_unpackhi_epi16(h01, h23));
}

__attribute__((target("avx2,fma")))
static void NAME_dq_bf16_avx2(void *arg, int64_t task) {
    const NAME_dq_job *j = (const NAME_dq_job *)arg;
    const int64_t t = j->t0 + task, G = j->G, rows = j->N - t * TILE < TILE ? j->N - t * TILE : TILE;
    const float *st = j->scales + t * TILE * G;
    const uint8_t *zt = ASYM ? j->zeros + t * TILE * G : NULL;
    const uint8_t *wt = j->w + t * j->tile_bytes;
    uint16_t *out = (uint16_t *)j->out + (t - j->t0) * TILE * j->ld;
    const int64_t full = j->k_in / 8;
    /* tables: slot of position a = (a % 16) * 32 + (a / 16) * 16, so positions a and a + 16 share 32 bytes */
    uint8_t tlo[TILE * 16] __attribute__((aligned(32))), thi[TILE * 16] __attribute__((aligned(32)));
    const __m256 q0 = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7), q8 = _mm256_add_ps(q0, _mm256_set1_ps(8.0f));
    const __m256i rnd = _mm256_set1_epi32(0x7fff), one = _mm256_set1_epi32(1), m0f = _mm256_set1_epi8(0x0f);
    /* bytes 0, 4, 8, 12 then 1, 5, 9, 13 of each lane: low and high bytes of 4 bf16 in dwords */
    const __m256i split = _mm256_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, -1, -1, -1, -1, -1, -1, -1, -1,
                                           0, 4, 8, 12, 1, 5, 9, 13, -1, -1, -1, -1, -1, -1, -1, -1);
    (void)zt;
    for (int64_t g = 0; g * GS < j->k_in; g++) {
        for (int pos = 0; pos < TILE; pos++) {
            const int r = ROW_OF_BYTE[pos] < rows ? ROW_OF_BYTE[pos] : 0; /* tail tile: rows past N are not stored */
            const __m256 sv = _mm256_set1_ps(st[g * rows + r]);
            const __m256 zv = _mm256_set1_ps(ASYM ? (float)zt[g * rows + r] : (float)(1 << (BITS - 1)));
            __m256i u0 = _mm256_castps_si256(_mm256_mul_ps(_mm256_sub_ps(q0, zv), sv));
            __m256i u1 = _mm256_castps_si256(_mm256_mul_ps(_mm256_sub_ps(q8, zv), sv));
            u0 = _mm256_srli_epi32(_mm256_add_epi32(u0, _mm256_add_epi32(rnd, _mm256_and_si256(_mm256_srli_epi32(u0, 16), one))), 16);
            u1 = _mm256_srli_epi32(_mm256_add_epi32(u1, _mm256_add_epi32(rnd, _mm256_and_si256(_mm256_srli_epi32(u1, 16), one))), 16);
            /* u0 lanes: entries 0-3 | 4-7; u1: 8-11 | 12-15 -> lo bytes then hi bytes of each 4 */
            const __m256i s0 = _mm256_shuffle_epi8(u0, split), s1 = _mm256_shuffle_epi8(u1, split);
            const __m256i lo = _mm256_unpacklo_epi32(s0, s1); /* lane 0: lo 0-3, lo 8-11, hi 0-3, hi 8-11 */
            const __m256i all = _mm256_permutevar8x32_epi32(lo, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            /* all: lo 0-3, lo 4-7, lo 8-11, lo 12-15, hi 0-3, hi 4-7, hi 8-11, hi 12-15 */
            const int slot = (pos % 16) * 32 + (pos / 16) * 16;
            _mm_store_si128((__m128i *)(tlo + slot), _mm256_castsi256_si128(all));
            _mm_store_si128((__m128i *)(thi + slot), _mm256_extracti128_si256(all, 1));
        }
        const int64_t p0 = g * GS / 8, pend = (g + 1) * GS / 8 < full ? (g + 1) * GS / 8 : full;
        int64_t p = p0;
        for (; p + 2 <= pend; p += 2) {
            __m256i a[4], b[4];
            NAME_pair_codes(wt + p * BITS * TILE, a);
            NAME_pair_codes(wt + (p + 1) * BITS * TILE, b);
            for (int k = 0; k < 4; k++) {
                const __m256i x01 = _mm256_unpacklo_epi64(a[k], b[k]), x23 = _mm256_unpackhi_epi64(a[k], b[k]);
                const __m256i c[4] = {_mm256_and_si256(x01, m0f), _mm256_and_si256(_mm256_srli_epi16(x01, 4), m0f),
                                      _mm256_and_si256(x23, m0f), _mm256_and_si256(_mm256_srli_epi16(x23, 4), m0f)};
                for (int e = 0; e < 4; e++) {
                    const int pos = 4 * k + e; /* lane 0: pos, lane 1: pos + 16 */
                    const __m256i lo = _mm256_shuffle_epi8(_mm256_load_si256((const __m256i *)(tlo + pos * 32)), c[e]);
                    const __m256i hi = _mm256_shuffle_epi8(_mm256_load_si256((const __m256i *)(thi + pos * 32)), c[e]);
                    const __m256i v0 = _mm256_unpacklo_epi8(lo, hi), v1 = _mm256_unpackhi_epi8(lo, hi);
                    const int ra = ROW_OF_BYTE[pos], rb = ROW_OF_BYTE[pos + 16];
                    if (ra < rows) _mm256_storeu_si256((__m256i *)(out + ra * j->ld + 8 * p), _mm256_permute2x128_si256(v0, v1, 0x20));
                    if (rb < rows) _mm256_storeu_si256((__m256i *)(out + rb * j->ld + 8 * p), _mm256_permute2x128_si256(v0, v1, 0x31));
                }
            }
        }
        for (; p < (g + 1) * GS / 8 && 8 * p < j->k_in; p++) { /* a lone pair: the scalar loop */
            const int64_t k0 = 8 * p;
            for (int pos = 0; pos < TILE; pos++) {
                const int r = ROW_OF_BYTE[pos];
                if (r >= rows) continue;
                const uint8_t *wp = wt + p * BITS * TILE + pos;
                uint64_t codes = 0;
                for (int bb = 0; bb < BITS; bb++) codes += SPREAD[wp[bb * TILE]] << bb;
                const float s = st[g * rows + r], z = ASYM ? (float)zt[g * rows + r] : (float)(1 << (BITS - 1));
                for (int64_t i = 0; i < 8 && k0 + i < j->k_in; i++)
                    out[r * j->ld + k0 + i] = lowc_bf16(((float)((codes >> (8 * i)) & 0xff) - z) * s);
            }
        }
    }
}
#endif

void NAME_dequant(const uint8_t *w, const float *scales, const uint8_t *zeros, int64_t N, int64_t k_in, int64_t k_pad,
                  int64_t t0, int64_t ntiles, void *out, int64_t ld, int bf16, int nthreads, int force_scalar) {
    NAME_dq_job j = {w, scales, zeros, out, N, k_in, k_pad, k_pad / GS, t0, (k_pad / 8) * BITS * TILE, ld, bf16};
    lowc_task_fn fn = NAME_dq_task;
#ifdef LOWC_X86
    if (!force_scalar && lowc_lut_has_avx2()) fn = bf16 ? NAME_dq_bf16_avx2 : NAME_dq_task_avx2;
#endif
    pool_run(nthreads, ntiles, fn, &j);
}
"""


@dataclass(frozen=True, order=True)
class SparseKernelConfig:
    bits: int
    group_size: int
    sparse_group: int
    symmetric: bool

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 4:
            raise ValueError(f"LUT kernels support 1..4 bits, got {self.bits}")
        if (not 0 < self.group_size <= MAX_SPARSE_GROUP_SIZE or self.group_size % 16 or self.sparse_group <= 0
                or self.sparse_group % 16):
            raise ValueError(f"group-sparse LUT kernels need a group size (at most {MAX_SPARSE_GROUP_SIZE}) and a "
                             f"sparse group that are positive multiples of 16, got {self.group_size} and {self.sparse_group}")

    @property
    def name(self) -> str:
        return f"lowc_lut_gs_b{self.bits}_g{self.group_size}_s{self.sparse_group}_{'sym' if self.symmetric else 'asym'}"


#: the widest quantization group of the group-sparse kernels: their int32 lanes hold a group's sums
#: (2 products of at most 15 * 32767 per block and lane, half the blocks per accumulator: exact up to ~69000)
MAX_SPARSE_GROUP_SIZE = 32768

#: weight rows per pool task of the group-sparse kernels
ROWS_PER_TASK = 32

SPARSE_PRELUDE = r"""
/* ---- group-sparse kernels: shared activation tables ----------------------------------------- */
#define ROWS_PER_TASK ROWS_PER_TASK_VALUE
/* int16 activations of one input row, one scale (max|x| / 32767) */
static void gs_build_row(const float *x, int64_t k_in, int64_t k_pad, int16_t *x16, float *xscale) {
    float mx = 0.0f;
    for (int64_t k = 0; k < k_in; k++) {
        const float a = x[k] < 0.0f ? -x[k] : x[k];
        mx = a > mx ? a : mx;
    }
    const float inv = mx > 0.0f ? 32767.0f / mx : 0.0f;
    for (int64_t k = 0; k < k_pad; k++) {
        /* round to nearest even via the 1.5*2^23 trick (|v| <= 32767 + eps), no libm call */
        float r = k < k_in ? (x[k] * inv + 12582912.0f) - 12582912.0f : 0.0f;
        r = r > 32767.0f ? 32767.0f : (r < -32767.0f ? -32767.0f : r);
        x16[k] = (int16_t)r;
    }
    *xscale = mx / 32767.0f;
}

typedef struct { const float *x; int64_t k_in, k_pad; int16_t *x16; float *xscale; } gs_tables;

static void gs_build_task(void *arg, int64_t m) {
    const gs_tables *t = (const gs_tables *)arg;
    gs_build_row(t->x + m * t->k_in, t->k_in, t->k_pad, t->x16 + m * t->k_pad, t->xscale + m);
}

static void gs_build_first(void *arg) { gs_build_task(arg, 0); } /* M == 1: by the caller while the workers wake */

/* The input position of a row's next kept group of 16 (sparse_group 16), walking its bitmask: *wi and
   *m are the current word and its bits not taken yet (start at -1 and 0); last_valid masks the
   groups at or past k_pad / 16 off the last word. An exhausted mask gives position 0 (a malformed
   mask gives wrong numbers, never an access outside the buffers). */
static inline int64_t gs_next16(const uint8_t *mrow, int64_t words, uint64_t last_valid, int64_t *wi, uint64_t *m) {
    while (!*m) {
        if (*wi + 1 >= words) return 0;
        ++*wi;
        memcpy(m, mrow + 8 * *wi, 8);
        if (*wi == words - 1) *m &= last_valid;
    }
    const int64_t pos = (*wi * 64 + __builtin_ctzll(*m)) * 16;
    *m &= *m - 1;
    return pos;
}

/* Input positions of a row's kept blocks of 16, in compact order, from its kept-group bitmask
   (groups at or past k_pad / sg are ignored; at most cap entries, missing ones read block 0: a
   malformed mask gives wrong numbers, never an access outside the buffers). */
static void gs_starts(const uint8_t *mrow, int64_t words, int64_t sg, int64_t k_pad, int64_t *st, int64_t cap) {
    const int64_t n_groups = k_pad / sg;
    int64_t nb = 0;
    for (int64_t wi = 0; wi < words; wi++) {
        uint64_t m;
        memcpy(&m, mrow + 8 * wi, 8);
        if (wi * 64 + 64 > n_groups) m &= n_groups - wi * 64 >= 64 ? ~0ull : ((1ull << (n_groups - wi * 64)) - 1);
        if (sg == 16) {
            for (; m && nb < cap; m &= m - 1) st[nb++] = (wi * 64 + __builtin_ctzll(m)) * 16;
        } else {
            for (; m; m &= m - 1)
                for (int64_t u = 0, base = (wi * 64 + __builtin_ctzll(m)) * sg; u < sg && nb < cap; u += 16) st[nb++] = base + u;
        }
    }
    while (nb < cap) st[nb++] = 0;
}
"""

SPARSE = r"""
static float NAME_row_scalar(const int16_t *x16, const uint8_t *w, const int64_t *st, int64_t nb, const float *s,
                             const uint8_t *z, const uint8_t *mrow, int64_t words, uint64_t last_valid) {
    (void)mrow; (void)words; (void)last_valid;
    float acc = 0.0f;
    for (int64_t b0 = 0, q = 0; b0 < nb; b0 += GS / 16, q++) {
        const int32_t zq = ASYM ? (int32_t)z[q] : (1 << (BITS - 1));
        int64_t d = 0;
        for (int64_t b = b0; b < b0 + GS / 16 && b < nb; b++) {
            const uint8_t *wp = w + 16 * (b >> 1);
            const int sh = (int)(b & 1) * 4;
            for (int i = 0; i < 16; i++) d += ((int32_t)((wp[i] >> sh) & 15) - zq) * (int32_t)x16[st[b] + i];
        }
        acc += (float)d * s[q];
    }
    return acc;
}

#ifdef LOWC_X86
__attribute__((target("avx2,fma")))
static float NAME_row_avx2(const int16_t *x16, const uint8_t *w, const int64_t *st, int64_t nb, const float *s,
                           const uint8_t *z, const uint8_t *mrow, int64_t words, uint64_t last_valid) {
    const __m128i m0f = _mm_set1_epi8(0x0f);
#if SG == 16 /* one input row (st NULL): walk the mask here, no list of positions to write and read back */
    int64_t wi = -1;
    uint64_t mw = 0;
#define POS(b) (st ? st[b] : gs_next16(mrow, words, last_valid, &wi, &mw))
#else
    (void)mrow; (void)words; (void)last_valid;
#define POS(b) st[b]
#endif
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b0 = 0, q = 0; b0 < nb; b0 += GS / 16, q++) {
        const __m256i zq = _mm256_set1_epi16(ASYM ? (int16_t)z[q] : (int16_t)(1 << (BITS - 1)));
        const int64_t end = b0 + GS / 16 < nb ? b0 + GS / 16 : nb;
        __m256i d0 = _mm256_setzero_si256(), d1 = d0;
        int64_t b = b0;
        if (b & 1) { /* a group starting on the high nibbles of a pair (GS / 16 odd) */
            const __m128i wv = _mm_loadu_si128((const __m128i *)(w + 8 * (b - 1)));
            const __m256i c = _mm256_sub_epi16(_mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(wv, 4), m0f)), zq);
            d0 = _mm256_add_epi32(d0, _mm256_madd_epi16(c, _mm256_loadu_si256((const __m256i *)(x16 + POS(b)))));
            b++;
        }
        for (; b + 1 < end; b += 2) { /* a pair: block b in the low nibbles, b + 1 in the high ones */
            PREFETCH_GS
            const __m128i wv = _mm_loadu_si128((const __m128i *)(w + 8 * b));
            const __m256i c0 = _mm256_sub_epi16(_mm256_cvtepu8_epi16(_mm_and_si128(wv, m0f)), zq);
            const __m256i c1 = _mm256_sub_epi16(_mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(wv, 4), m0f)), zq);
            const int64_t p0 = POS(b), p1 = POS(b + 1);
            d0 = _mm256_add_epi32(d0, _mm256_madd_epi16(c0, _mm256_loadu_si256((const __m256i *)(x16 + p0))));
            d1 = _mm256_add_epi32(d1, _mm256_madd_epi16(c1, _mm256_loadu_si256((const __m256i *)(x16 + p1))));
        }
        if (b < end) { /* a lone last block: low nibbles */
            const __m128i wv = _mm_loadu_si128((const __m128i *)(w + 8 * b));
            const __m256i c = _mm256_sub_epi16(_mm256_cvtepu8_epi16(_mm_and_si128(wv, m0f)), zq);
            d0 = _mm256_add_epi32(d0, _mm256_madd_epi16(c, _mm256_loadu_si256((const __m256i *)(x16 + POS(b)))));
        }
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(d0, d1)), _mm256_set1_ps(s[q]), acc);
    }
    __m128 r = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    return _mm_cvtss_f32(r);
#undef POS
}
#endif

typedef struct {
    const int16_t *x16; const float *xscale, *scales, *bias; const uint8_t *w, *mask, *zeros; float *y;
    int64_t M, N, k_pad, G, nb, words, row_bytes;
    float (*row)(const int16_t *, const uint8_t *, const int64_t *, int64_t, const float *, const uint8_t *,
                 const uint8_t *, int64_t, uint64_t);
    int positions; /* whether the row function reads the list of block positions */
} NAME_job;

static void NAME_task(void *arg, int64_t task) {
    const NAME_job *j = (const NAME_job *)arg;
    const int64_t r0 = task * ROWS_PER_TASK, r1 = r0 + ROWS_PER_TASK < j->N ? r0 + ROWS_PER_TASK : j->N;
    int64_t *st = (int64_t *)malloc((size_t)(j->nb + 1) * sizeof(int64_t));
    const int64_t n_groups = j->k_pad / SG, tail = n_groups - (j->words - 1) * 64;
    const uint64_t last_valid = tail >= 64 ? ~0ull : (1ull << tail) - 1;
    for (int64_t n = r0; n < r1; n++) {
        const uint8_t *mrow = j->mask + n * j->words * 8;
        if (j->positions) gs_starts(mrow, j->words, SG, j->k_pad, st, j->nb);
        for (int64_t m = 0; m < j->M; m++) {
            const float v = j->row(j->x16 + m * j->k_pad, j->w + n * j->row_bytes, j->positions ? st : NULL, j->nb, j->scales + n * j->G,
                                   ASYM ? j->zeros + n * j->G : NULL, mrow, j->words, last_valid);
            j->y[m * j->N + n] = v * j->xscale[m] + (j->bias ? j->bias[n] : 0.0f);
        }
    }
    free(st);
}

void NAME(const float *x, int64_t M, int64_t k_in, int64_t k_pad, int64_t N, int64_t n_keep, const uint8_t *w,
          const uint8_t *mask, const float *scales, const uint8_t *zeros, const float *bias, float *y, int nthreads,
          int force_scalar) {
    NAME_job j;
    j.M = M; j.N = N; j.k_pad = k_pad; j.nb = n_keep * SG / 16; j.G = (n_keep * SG + GS - 1) / GS;
    j.words = (k_pad / SG + 63) / 64; j.row_bytes = (j.nb + 1) / 2 * 16;
    int16_t *x16 = (int16_t *)malloc((size_t)(M * k_pad) * sizeof(int16_t) + 64);
    float *xscale = (float *)malloc((size_t)M * sizeof(float));
    j.row = NAME_row_scalar;
    j.positions = 1;
#ifdef LOWC_X86
    if (!force_scalar && lowc_lut_has_avx2()) {
        j.row = NAME_row_avx2;
        j.positions = SG != 16 || M > 1;
    }
#endif
    j.x16 = x16; j.xscale = xscale; j.scales = scales; j.zeros = zeros; j.bias = bias; j.w = w; j.mask = mask; j.y = y;
    gs_tables t = {x, k_in, k_pad, x16, xscale};
    const int64_t tasks = (N + ROWS_PER_TASK - 1) / ROWS_PER_TASK;
    if (M == 1) {
        pool_run_prep(nthreads, tasks, NAME_task, &j, gs_build_first, &t);
    } else {
        pool_run(nthreads, M, gs_build_task, &t);
        pool_run(nthreads, tasks, NAME_task, &j);
    }
    free(x16);
    free(xscale);
}

/* GEMM path: rows [r0, r0 + nrows) of the dense real weight (0 in dropped groups, (q - z) * s rounded once
   as lowc::linear_gsq, then to bf16 if bf16) into out, k_in columns, row stride ld; ROWS_PER_TASK rows a task */
typedef struct {
    const uint8_t *w, *mask, *zeros; const float *scales; void *out;
    int64_t k_in, k_pad, G, nb, words, row_bytes, r0, nrows, ld; int bf16;
} NAME_dq_job;

static void NAME_dq_task(void *arg, int64_t task) {
    const NAME_dq_job *j = (const NAME_dq_job *)arg;
    const int64_t i0 = task * ROWS_PER_TASK, i1 = i0 + ROWS_PER_TASK < j->nrows ? i0 + ROWS_PER_TASK : j->nrows;
    int64_t *st = (int64_t *)malloc((size_t)(j->nb + 1) * sizeof(int64_t));
    for (int64_t i = i0; i < i1; i++) {
        const int64_t n = j->r0 + i;
        gs_starts(j->mask + n * j->words * 8, j->words, SG, j->k_pad, st, j->nb);
        const uint8_t *w = j->w + n * j->row_bytes, *z = ASYM ? j->zeros + n * j->G : NULL;
        const float *s = j->scales + n * j->G;
        float *of = (float *)j->out + i * j->ld;
        uint16_t *ob = (uint16_t *)j->out + i * j->ld;
        if (j->bf16) memset(ob, 0, (size_t)j->k_in * 2); else memset(of, 0, (size_t)j->k_in * 4);
        (void)z;
        for (int64_t b = 0; b < j->nb; b++) {
            const int64_t q = b * 16 / GS;
            const float sq = s[q], zq = ASYM ? (float)z[q] : (float)(1 << (BITS - 1));
            const uint8_t *wp = w + 16 * (b >> 1);
            const int sh = (int)(b & 1) * 4;
            for (int64_t e = 0; e < 16 && st[b] + e < j->k_in; e++) {
                const float v = ((float)((wp[e] >> sh) & 15) - zq) * sq;
                if (j->bf16) ob[st[b] + e] = lowc_bf16(v); else of[st[b] + e] = v;
            }
        }
    }
    free(st);
}

void NAME_dequant(const uint8_t *w, const uint8_t *mask, const float *scales, const uint8_t *zeros, int64_t k_in,
                  int64_t k_pad, int64_t n_keep, int64_t r0, int64_t nrows, void *out, int64_t ld, int bf16, int nthreads) {
    NAME_dq_job j;
    j.w = w; j.mask = mask; j.zeros = zeros; j.scales = scales; j.out = out; j.k_in = k_in; j.k_pad = k_pad;
    j.nb = n_keep * SG / 16; j.G = (n_keep * SG + GS - 1) / GS; j.words = (k_pad / SG + 63) / 64;
    j.row_bytes = (j.nb + 1) / 2 * 16; j.r0 = r0; j.nrows = nrows; j.ld = ld; j.bf16 = bf16;
    pool_run(nthreads, (nrows + ROWS_PER_TASK - 1) / ROWS_PER_TASK, NAME_dq_task, &j);
}
"""


def sparse_kernel_source(cfg: SparseKernelConfig, prefetch: int = PREFETCH) -> str:
    """The C of one group-sparse configuration (scalar row, AVX2 row, driver)."""
    pf = (f"if (!(b & 7)) _mm_prefetch((const char *)(w + 8 * b + {prefetch}), _MM_HINT_T0);" if prefetch else "")
    body = SPARSE.replace("PREFETCH_GS", pf)
    consts = {"BITS": str(cfg.bits), "GS": str(cfg.group_size), "SG": str(cfg.sparse_group),
              "ASYM": "0" if cfg.symmetric else "1"}
    for k, v in consts.items():
        body = _replace_word(body, k, v)
    return body.replace("NAME", cfg.name)


def _half_sign_init() -> str:
    rows = []
    for p in range(16):
        rows.append("{" + ", ".join("0.5f" if (p >> i) & 1 else "-0.5f" for i in range(4)) + "}")
    return ", ".join(rows)


def _spread_init() -> str:
    """SPREAD[v] for v in 0..255: bit i of v moved to bit 0 of byte i."""
    return ", ".join(f"0x{sum(((v >> i) & 1) << (8 * i) for i in range(8)):016x}ull" for v in range(256))


def kernel_source(cfg: KernelConfig, prefetch: int = PREFETCH) -> str:
    """The C of one configuration (scalar tile, AVX2 tile, driver)."""
    b = cfg.bits
    # planes (0,1) and (2,3) are looked up as pairs: unpack(plane j, plane j+1) + maddubs by (1, 2)
    # gives T[n_j] + 2 T[n_j+1] in int16 (<= 381 per lookup, 762 per 8 activations, <= 12192 per
    # chunk of 128: exact), one accumulator and one widening per pair; a lone plane (W1, W3's plane
    # 2) is summed as before. Same integer sums as the scalar path.
    firsts = [j for j in range(0, b, 2)]
    acc_decl = "\n".join(f"            __m256i a{j}_lo = _mm256_setzero_si256(), a{j}_hi = a{j}_lo;" for j in firsts)
    planes = "\n".join((PAIR if j + 1 < b else PLANE).replace("aB_", f"a{j}_").replace("(B + 1) * TILE", f"{j + 1} * TILE")
                       .replace("B * TILE", f"{j} * TILE") for j in firsts)
    widen = "\n".join(WIDEN_PLANE.replace("aB_", f"a{j}_").replace(", B))", f", {j}))") for j in firsts)
    pf = "\n".join(f"                {{ const uint8_t *pa = w + {prefetch + o}; _mm_prefetch((const char *)(pa < w_last ? pa : w_last), _MM_HINT_T0); }}"
                   for o in range(0, max(64, b * 32), 64)) if prefetch else ""
    avx2 = (AVX2_HEAD.replace("ACC_DECL", acc_decl).replace("PLANES", planes).replace("WIDEN", widen)
            .replace("PREFETCH", pf).replace("ZERO_TERM", ZERO_SYM if cfg.symmetric else ZERO_ASYM))
    body = SCALAR + avx2 + DRIVER + DEQUANT
    consts = {
        "BITS": str(b),
        "GS": str(cfg.group_size),
        "CH": str(chunk_size(cfg.group_size)),
        "ASYM": "0" if cfg.symmetric else "1",
        "CEN": f"{((1 << b) - 1) / 2:.1f}f",
    }
    for k, v in consts.items():
        body = _replace_word(body, k, v)
    return body.replace("NAME", cfg.name)


def _replace_word(text: str, word: str, value: str) -> str:
    return re.sub(rf"\b{word}\b", value, text)


def config_key(cfg) -> tuple:
    """A stable order over dense and group-sparse configurations."""
    return (cfg.name,)


def generate(configs, prefetch: int = PREFETCH) -> str:
    """The whole translation unit for ``configs`` (dense :class:`KernelConfig` and group-sparse
    :class:`SparseKernelConfig`; deduplicated, in a stable order)."""

    cfgs = sorted(set(configs), key=config_key)
    head = PRELUDE.replace("ROW_OF_BYTE_INIT", ", ".join(map(str, ROW_OF_BYTE))).replace("HALF_SIGN_INIT", _half_sign_init())
    head += SPARSE_PRELUDE.replace("ROWS_PER_TASK_VALUE", str(ROWS_PER_TASK))
    head += DEQUANT_PRELUDE.replace("SPREAD_INIT", _spread_init())
    listing = "".join(f" *   {c.name}: {c.bits}-bit, group {c.group_size}, {'symmetric' if c.symmetric else 'asymmetric'}"
                      + (f", group-sparse (sparse groups of {c.sparse_group})" if isinstance(c, SparseKernelConfig) else "")
                      + "\n" for c in cfgs)
    return head + "\n/* kernels in this unit:\n" + listing + "*/\n" + "".join(
        sparse_kernel_source(c, prefetch) if isinstance(c, SparseKernelConfig) else kernel_source(c, prefetch) for c in cfgs)
