"""Triton kernel for causal ``lowc::linear_attention`` (chunked linear attention + LoLCATs sliding window).

One program per (batch, query head, block of ``BV`` value columns) walks the sequence in chunks of
``BLOCK = 64`` rows (Lightning-Attention-2 style: intra-chunk quadratic, inter-chunk state carried in
registers, one kernel, linear in the length). For chunk ``c`` with query rows ``i``:

* *linear, outside*: ``lf·φ(q_i)·S`` and ``lf·φ(q_i)·z`` with the fp32 state ``S [F, BV]``, ``z [F]``
  summed over earlier chunks;
* *inside*: the current chunk (and, when ``window > 1``, the previous one) computed quadratically with
  the op's masks: key ``j`` is in the window if ``0 <= i - j < window`` (weight
  ``wf·exp(scale·q_i·k_j - m_i)``, ``m_i`` = the row maximum over the window scores only), linear if
  ``i - j >= window`` (weight ``lf·φ(q_i)·φ(k_j)``, not rescaled by ``m_i``), else masked;
* ``y_i = Σ a_ij v_j / max(Σ a_ij, eps)`` (shared denominator), stored in ``v``'s dtype.

With a window the state lags one chunk (it holds chunks ``< c - 1``; chunk ``c - 1`` is inside), so a
window of up to ``BLOCK`` keys always lies in the previous and current chunk.

Scope and fallbacks (documented, not silent about precision): the kernel takes causal attention with
``0 <= window <= 64``, GQA (query head ``h`` reads key head ``h // (H / Hk)``), ``key_mask``, and
fp16/bf16/fp32 operands with fp32 accumulation (fp32 inputs use IEEE fp32 dots; fp16/bf16 inputs use
TF32 dots, which hold their products exactly; the computed fp32 weights and state lose bits in those
dots, below the bf16/fp16 output rounding). Non-causal attention (global sums) and ``window > 64``
run the chunked plain-PyTorch form (:mod:`lowc.ir.dialect.linear_attention_chunked`) on the same
device. Feature/head/value widths are padded to powers of two (>= 16) with masked loads; widths above
256 or other dtypes raise :class:`lowc.errors.KernelError` naming the shape; a GPU whose shared memory
is too small for the tiles (Triton ``OutOfResources``) warns and runs the chunked form. Compiles for
sm_90 with 96 KB of shared memory at F = D = 128, Dv = 128 (bf16 and fp32).

Triton is imported lazily (first launch). Tested against the oracle under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import functools
import warnings

import torch

from lowc.errors import KernelError
from lowc.ir.dialect.linear_attention import _check
from lowc.ir.dialect.linear_attention_chunked import chunked_linear_attention
from lowc.ir.dialect.ops import register_backend_kernel

BLOCK = 64
MAX_WIDTH = 256
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _pow2(n: int) -> int:
    return max(16, 1 << (max(1, n) - 1).bit_length())


@functools.lru_cache(maxsize=None)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def _linear_attention_fwd(
        FQ, FK, V, Q, K, WF, LF, KM, Y,
        L, H, HK, F, D, DV, scale, eps, window,
        BLOCK: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
        HAS_WINDOW: tl.constexpr, LOOKBACK: tl.constexpr, HAS_MASK: tl.constexpr, PREC: tl.constexpr,
    ):
        pid = tl.program_id(0)
        pid_v = tl.program_id(1)
        b = pid // H
        h = pid % H
        hk = h // (H // HK)
        bh_q = (b * H + h).to(tl.int64) * L
        bh_k = (b * HK + hk).to(tl.int64) * L
        rows = tl.arange(0, BLOCK)
        offs_f = tl.arange(0, BF)
        offs_d = tl.arange(0, BD)
        offs_v = pid_v * BV + tl.arange(0, BV)
        fmask = offs_f < F
        dmask = offs_d < D
        vmask = offs_v < DV
        lf = tl.load(LF + h).to(tl.float32)
        wf = tl.load(WF + h).to(tl.float32)

        S = tl.zeros([BF, BV], dtype=tl.float32)
        z = tl.zeros([BF], dtype=tl.float32)
        n_chunks = tl.cdiv(L, BLOCK)
        for c in range(0, n_chunks):
            i = c * BLOCK + rows
            iok = i < L
            fq = tl.load(FQ + (bh_q + i)[:, None] * F + offs_f[None, :], mask=iok[:, None] & fmask[None, :], other=0.0).to(tl.float32)
            kok = iok
            if HAS_MASK:
                kok = kok & (tl.load(KM + b.to(tl.int64) * L + i, mask=iok, other=0) != 0)
            fk = tl.load(FK + (bh_k + i)[:, None] * F + offs_f[None, :], mask=kok[:, None] & fmask[None, :], other=0.0).to(tl.float32)
            vc = tl.load(V + (bh_k + i)[:, None] * DV + offs_v[None, :], mask=iok[:, None] & vmask[None, :], other=0.0).to(tl.float32)
            d = i[:, None] - i[None, :]

            # linear, outside: the carried state
            num = tl.dot(fq, S, input_precision=PREC) * lf
            den = tl.sum(fq * z[None, :], axis=1) * lf
            # linear, current chunk: i - j >= window
            a = tl.dot(fq, tl.trans(fk), input_precision=PREC)
            a = tl.where((d >= window) & kok[None, :], a, 0.0) * lf
            if HAS_WINDOW:
                q = tl.load(Q + (bh_q + i)[:, None] * D + offs_d[None, :], mask=iok[:, None] & dmask[None, :], other=0.0).to(tl.float32)
                kc = tl.load(K + (bh_k + i)[:, None] * D + offs_d[None, :], mask=iok[:, None] & dmask[None, :], other=0.0).to(tl.float32)
                s = tl.dot(q, tl.trans(kc), input_precision=PREC) * scale
                s = tl.where((d >= 0) & (d < window) & kok[None, :], s, float("-inf"))
                m = tl.max(s, axis=1)
                if LOOKBACK:
                    j = i - BLOCK
                    jok = j >= 0
                    pok = jok
                    if HAS_MASK:
                        pok = pok & (tl.load(KM + b.to(tl.int64) * L + j, mask=jok, other=0) != 0)
                    fkp = tl.load(FK + (bh_k + j)[:, None] * F + offs_f[None, :], mask=pok[:, None] & fmask[None, :], other=0.0).to(tl.float32)
                    kp = tl.load(K + (bh_k + j)[:, None] * D + offs_d[None, :], mask=jok[:, None] & dmask[None, :], other=0.0).to(tl.float32)
                    vp = tl.load(V + (bh_k + j)[:, None] * DV + offs_v[None, :], mask=jok[:, None] & vmask[None, :], other=0.0).to(tl.float32)
                    dp = i[:, None] - j[None, :]  # in [1, 2*BLOCK - 1]
                    sp = tl.dot(q, tl.trans(kp), input_precision=PREC) * scale
                    sp = tl.where((dp < window) & pok[None, :], sp, float("-inf"))
                    m = tl.maximum(m, tl.max(sp, axis=1))
                m = tl.where(m == float("-inf"), 0.0, m)  # a row with no window key
                a = a + tl.exp(s - m[:, None]) * wf
                if LOOKBACK:
                    ap = tl.dot(fq, tl.trans(fkp), input_precision=PREC)
                    ap = tl.where((dp >= window) & pok[None, :], ap, 0.0) * lf
                    ap = ap + tl.exp(sp - m[:, None]) * wf
                    num += tl.dot(ap, vp, input_precision=PREC)
                    den += tl.sum(ap, axis=1)
            num += tl.dot(a, vc, input_precision=PREC)
            den += tl.sum(a, axis=1)
            y = num / tl.maximum(den, eps)[:, None]
            tl.store(Y + (bh_q + i)[:, None] * DV + offs_v[None, :], y.to(Y.dtype.element_ty), mask=iok[:, None] & vmask[None, :])

            # advance the state: chunk c (no lookback) or chunk c - 1 (lookback) leaves the inside range
            if HAS_WINDOW and LOOKBACK:
                S += tl.dot(tl.trans(fkp), vp, input_precision=PREC)
                z += tl.sum(fkp, axis=0)
            else:
                S += tl.dot(tl.trans(fk), vc, input_precision=PREC)
                z += tl.sum(fk, axis=0)

    return _linear_attention_fwd


def kernel_supports(fq, fk, v, q, k, causal: bool, window: int) -> str | None:
    """None if the Triton kernel takes these operands, else why it does not (a fallback case)."""
    if not causal:
        return "non-causal attention runs the chunked form (global sums)"
    if window > BLOCK:
        return f"window={window} > {BLOCK} runs the chunked form"
    return None


def _check_kernel_shapes(fq, fk, v, q, k) -> None:
    op = "lowc::linear_attention Triton kernel"
    for name, t in (("fq", fq), ("fk", fk), ("v", v), ("q", q), ("k", k)):
        if t is None:
            continue
        if t.dtype not in _DTYPES:
            raise KernelError(f"{op}: {name} has dtype {t.dtype}; the kernel takes float16, bfloat16 or float32")
        if t.shape[-1] > MAX_WIDTH:
            raise KernelError(f"{op}: {name} {tuple(t.shape)} has width {t.shape[-1]} > {MAX_WIDTH} "
                              f"(the fp32 state and tiles live in registers)")


def linear_attention_triton(fq, fk, v, q, k, window_factor, linear_factor, key_mask, causal, window, scale, eps):
    """``lowc::linear_attention`` on the Triton kernel (module docstring for scope and fallbacks)."""

    _check(fq, fk, v, q, k, window_factor, linear_factor, key_mask, causal, window, scale, eps)
    if kernel_supports(fq, fk, v, q, k, causal, window) is not None:
        return chunked_linear_attention(fq, fk, v, q, k, window_factor, linear_factor, key_mask, causal, window, scale, eps)
    _check_kernel_shapes(fq, fk, v, q, k)
    b, h, length, f = fq.shape
    hk, dv = fk.shape[1], v.shape[-1]
    y = torch.empty(b, h, length, dv, dtype=v.dtype, device=v.device)
    if y.numel() == 0:
        return y
    use_window = window > 0
    ones = torch.ones(h, dtype=torch.float32, device=fq.device)
    wf = ones if window_factor is None else window_factor.float().contiguous()
    lf = ones if linear_factor is None else linear_factor.float().contiguous()
    km = torch.empty(1, dtype=torch.int8, device=fq.device) if key_mask is None else key_mask.to(torch.int8).contiguous()
    qq = q.contiguous() if use_window else fq  # placeholders are never read when HAS_WINDOW is false
    kk = k.contiguous() if use_window else fk
    d = q.shape[-1] if use_window else 16
    bf, bd = _pow2(f), _pow2(d)
    bv = min(64, _pow2(dv))
    prec = "ieee" if torch.float32 in (fq.dtype, fk.dtype, v.dtype) or (use_window and torch.float32 in (q.dtype, k.dtype)) else "tf32"
    grid = (b * h, -(-dv // bv))
    from triton.runtime.errors import OutOfResources

    try:
        # num_stages=1: the chunk loop is a serial recurrence; software pipelining of its loads
        # would multiply the shared memory (fp32 tiles, F = D = 128: ~490 KB with 3 stages, 96 KB with 1)
        _kernel()[grid](
            fq.contiguous(), fk.contiguous(), v.contiguous(), qq, kk, wf, lf, km, y,
            length, h, hk, f, d, dv, float(scale), float(eps), int(window),
            BLOCK=BLOCK, BF=bf, BD=bd, BV=bv, HAS_WINDOW=use_window, LOOKBACK=window > 1,
            HAS_MASK=key_mask is not None, PREC=prec, num_warps=8 if bf * bv >= 8192 else 4, num_stages=1,
        )
    except OutOfResources as e:  # a GPU with less shared memory than these tiles need: same result, slower
        warnings.warn(f"lowc::linear_attention Triton kernel: {e} for F={f}, D={d}, Dv={dv}, {fq.dtype}; "
                      f"running the chunked PyTorch form instead", RuntimeWarning, stacklevel=2)
        return chunked_linear_attention(fq, fk, v, q, k, window_factor, linear_factor, key_mask, causal, window, scale, eps)
    return y


def register(device_type: str = "cuda") -> None:
    """Register the kernel as ``lowc::linear_attention``'s implementation on ``device_type``
    (``"cpu"`` only makes sense under ``TRITON_INTERPRET=1``, for tests)."""

    register_backend_kernel("linear_attention", device_type, linear_attention_triton)


def register_cuda() -> None:
    """Register the kernel as the CUDA implementation of ``lowc::linear_attention``."""
    register("cuda")
