"""Triton chunked-scan kernel for ``lowc::ssd`` (the Mamba-2 SSD mixer; semantics in :mod:`lowc.ir.dialect.ssd`).

One program per (batch, query head, block of ``BP`` columns of ``x``) walks the sequence in chunks of
``Q`` rows (the op's ``chunk`` when it is a power of two in 16..128, else 64), carrying the fp32 state
``Sᵀ [N, BP]`` of its head in registers (the linear-attention kernel's structure, with decays). For chunk
``c`` with rows ``i`` and in-chunk cumulative log-decay ``A_i = Σ_{r<=i} a_r``:

* intra-chunk: ``s = (C·Bᵀ) ⊙ exp(A_i - A_j)`` for ``j <= i`` (the difference set to ``-inf`` above the
  diagonal *before* ``exp``, so nothing overflows; ``a <= 0`` keeps every factor ``<= 1``), ``y = s x``;
* inter-chunk: ``y += exp(A_i) · C Sᵀ`` (the state entering the chunk, decayed to row ``i``);
* skip: ``y += D[h] x``; rows masked by ``key_mask`` store 0;
* state: ``Sᵀ = exp(A_last) Sᵀ + Bᵀ (x ⊙ exp(A_last - A_j))`` (masked rows have ``B = 0``, ``a = 0``).

Query head ``h`` reads group ``h // (H / G)`` (GQA). Optional ``initial_state [Bt, H, P, N]`` is loaded
before the first chunk and the final state can be written out (``ssd_triton(..., return_state=True)``,
for prefill on CUDA).

Scope and fallbacks (documented; never a silent precision change): the short convolutions run in
PyTorch before the kernel (:func:`lowc.ir.dialect.ssd_chunked.prepare`, fp32; a depthwise ``K``-tap
convolution is memory-bound and cheap next to the scan), as does ``key_mask`` zeroing of their inputs;
without convolutions the kernel reads ``C``, ``B``, ``x``, ``a`` in their own dtype and applies
``key_mask`` itself. Operands in float16/bfloat16/float32 with ``N, P <= 256`` run the kernel (widths
padded to powers of two >= 16 with masked loads); anything else (float64, wider heads) runs the chunked
plain-PyTorch form (:func:`lowc.ir.dialect.ssd_chunked.chunked_ssd`) on the same device, as does a GPU
whose shared memory is too small for the tiles (Triton ``OutOfResources``, with a warning). fp32
operands use IEEE fp32 dots; fp16/bf16 operands use TF32 dots (their products are exact in TF32; the
decayed fp32 scores lose bits there, below the fp16/bf16 output rounding). Backward: the op's autograd
recomputes through the chunked form.

Triton is imported lazily (first launch). Tested against the oracle under ``TRITON_INTERPRET=1``
(tests/test_triton_ssd.py) and compiled ahead of time for sm_90 there.
"""

from __future__ import annotations

import functools
import warnings

import torch

from lowc.ir.dialect.ops import register_backend_kernel
from lowc.ir.dialect.ssd import _check
from lowc.ir.dialect.ssd_chunked import SSDState, chunked_ssd, prepare

#: chunk length when the op's ``chunk`` is not a power of two in [16, 128]
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
    def _ssd_fwd(
        C, B, X, A, DS, KM, INIT, Y, FINAL,
        L, H, G, N, P,
        Q: tl.constexpr, BN: tl.constexpr, BP: tl.constexpr,
        HAS_D: tl.constexpr, HAS_MASK: tl.constexpr, HAS_INIT: tl.constexpr, STORE_FINAL: tl.constexpr,
        PREC: tl.constexpr,
    ):
        pid = tl.program_id(0)
        pid_p = tl.program_id(1)
        b = pid // H
        h = pid % H
        g = h // (H // G)
        bh = (b * H + h).to(tl.int64)
        row_h = bh * L
        row_g = (b * G + g).to(tl.int64) * L
        rows = tl.arange(0, Q)
        offs_n = tl.arange(0, BN)
        offs_p = pid_p * BP + tl.arange(0, BP)
        nmask = offs_n < N
        pmask = offs_p < P
        causal = rows[:, None] >= rows[None, :]
        d_h = 0.0
        if HAS_D:
            d_h = tl.load(DS + h).to(tl.float32)

        # Sᵀ [N, BP]: state[p, n] of this head, transposed so that C Sᵀ and Bᵀ x are plain dots
        st_ptr = bh * P * N + offs_p[None, :] * N + offs_n[:, None]
        st_mask = nmask[:, None] & pmask[None, :]
        if HAS_INIT:
            S = tl.load(INIT + st_ptr, mask=st_mask, other=0.0).to(tl.float32)
        else:
            S = tl.zeros([BN, BP], dtype=tl.float32)

        for c in range(0, tl.cdiv(L, Q)):
            i = c * Q + rows
            iok = i < L
            kok = iok
            if HAS_MASK:
                kok = kok & (tl.load(KM + b.to(tl.int64) * L + i, mask=iok, other=0) != 0)
            a = tl.load(A + row_h + i, mask=kok, other=0.0).to(tl.float32)
            acs = tl.cumsum(a, axis=0)
            last = tl.sum(a, axis=0)  # rows past L and masked rows have a = 0: the chunk's total decay
            cc = tl.load(C + (row_h + i)[:, None] * N + offs_n[None, :], mask=iok[:, None] & nmask[None, :], other=0.0).to(tl.float32)
            bc = tl.load(B + (row_g + i)[:, None] * N + offs_n[None, :], mask=kok[:, None] & nmask[None, :], other=0.0).to(tl.float32)
            xc = tl.load(X + (row_g + i)[:, None] * P + offs_p[None, :], mask=kok[:, None] & pmask[None, :], other=0.0).to(tl.float32)

            s = tl.dot(cc, tl.trans(bc), input_precision=PREC)
            s = s * tl.exp(tl.where(causal, acs[:, None] - acs[None, :], float("-inf")))
            y = tl.dot(s, xc, input_precision=PREC)
            y += tl.exp(acs)[:, None] * tl.dot(cc, S, input_precision=PREC)
            if HAS_D:
                y += d_h * xc
            y = tl.where(kok[:, None], y, 0.0)  # masked positions output 0
            tl.store(Y + (row_h + i)[:, None] * P + offs_p[None, :], y.to(Y.dtype.element_ty),
                     mask=iok[:, None] & pmask[None, :])

            w = tl.exp(last - acs)
            S = S * tl.exp(last) + tl.dot(tl.trans(bc), xc * w[:, None], input_precision=PREC)

        if STORE_FINAL:
            tl.store(FINAL + st_ptr, S, mask=st_mask)

    return _ssd_fwd


def kernel_supports(C, B, x, a) -> str | None:
    """None if the Triton kernel takes these operands, else why it does not (they run the chunked form)."""
    for name, t in (("C", C), ("B", B), ("x", x), ("a", a)):
        if t.dtype not in _DTYPES:
            return f"{name} has dtype {t.dtype}; the kernel takes float16, bfloat16 or float32"
    if C.shape[-1] > MAX_WIDTH or x.shape[-1] > MAX_WIDTH:
        return f"state width N={C.shape[-1]} or head width P={x.shape[-1]} > {MAX_WIDTH} (the state lives in registers)"
    return None


def _chunk_len(chunk: int) -> int:
    return chunk if chunk in (16, 32, 64, 128) else BLOCK


def ssd_triton(C, B, x, a, D=None, conv_c=None, conv_b=None, conv_x=None, key_mask=None, chunk: int = BLOCK, *,
               initial_state=None, return_state: bool = False):
    """``lowc::ssd`` on the Triton kernel (module docstring for scope and fallbacks).

    ``initial_state``/``return_state`` as :func:`~lowc.ir.dialect.ssd_chunked.chunked_ssd`."""
    _check(C, B, x, a, D, conv_c, conv_b, conv_x, key_mask, chunk)
    why = kernel_supports(C, B, x, a)
    if why is not None:
        return chunked_ssd(C, B, x, a, D, conv_c, conv_b, conv_x, key_mask, chunk, initial_state=initial_state,
                           return_state=return_state)
    if isinstance(initial_state, torch.Tensor):
        initial_state = SSDState(ssm=initial_state)
    ops = (C, B, x, a, D, conv_c, conv_b, conv_x, key_mask, chunk)
    out_dtype = x.dtype
    hists = (None, None, None)
    if conv_c is not None or conv_b is not None or conv_x is not None:  # convolutions in PyTorch (fp32)
        C, B, x, a, hists = prepare(C, B, x, a, conv_c, conv_b, conv_x, key_mask, initial_state)
    bt, h, length, n = C.shape
    g, p = B.shape[1], x.shape[-1]
    y = torch.empty(bt, h, length, p, dtype=out_dtype, device=x.device)
    final = torch.empty(bt, h, p, n, dtype=torch.float32, device=x.device) if return_state else y
    init = None if initial_state is None else initial_state.ssm.float().contiguous()
    if length > 0:
        km = y if key_mask is None else key_mask.to(torch.int8).contiguous()  # placeholders are never read
        bn, bp = _pow2(n), min(64, _pow2(p))
        fp32 = torch.float32 in (C.dtype, B.dtype, x.dtype)
        grid = (bt * h, -(-p // bp))
        from triton.runtime.errors import OutOfResources  # optional: triton is imported on first launch

        try:
            # num_stages=1: the chunk loop is a serial recurrence (pipelining its loads only costs shared memory)
            _kernel()[grid](
                C.contiguous(), B.contiguous(), x.contiguous(), a.contiguous(),
                y if D is None else D.float().contiguous(), km, y if init is None else init, y, final,
                length, h, g, n, p,
                Q=_chunk_len(chunk), BN=bn, BP=bp, HAS_D=D is not None, HAS_MASK=key_mask is not None,
                HAS_INIT=init is not None, STORE_FINAL=return_state, PREC="ieee" if fp32 else "tf32",
                num_warps=8 if bn * bp >= 8192 else 4, num_stages=1,
            )
        except OutOfResources as e:  # a GPU with less shared memory than these tiles need: same result, slower
            warnings.warn(f"lowc::ssd Triton kernel: {e} for N={n}, P={p}, {x.dtype}; running the chunked PyTorch "
                          f"form instead", RuntimeWarning, stacklevel=2)
            return chunked_ssd(*ops, initial_state=initial_state, return_state=return_state)
    elif return_state:
        final = torch.zeros(bt, h, p, n, device=x.device) if init is None else init.clone()
    if not return_state:
        return y
    pos = (initial_state.pos if initial_state is not None else 0) + length
    return y, SSDState(ssm=final, conv_c=hists[0], conv_b=hists[1], conv_x=hists[2], pos=pos)


def _op_impl(C, B, x, a, D=None, conv_c=None, conv_b=None, conv_x=None, key_mask=None, chunk=BLOCK):
    return ssd_triton(C, B, x, a, D, conv_c, conv_b, conv_x, key_mask, chunk)


def register(device_type: str = "cuda") -> None:
    """Register the kernel as ``lowc::ssd``'s implementation on ``device_type``
    (``"cpu"`` only makes sense under ``TRITON_INTERPRET=1``, for tests)."""
    register_backend_kernel("ssd", device_type, _op_impl)


def register_cuda() -> None:
    """Register the kernel as the CUDA implementation of ``lowc::ssd``."""
    register("cuda")
