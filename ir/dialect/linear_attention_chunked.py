"""Chunked, O(L)-memory plain-PyTorch forms of ``lowc::linear_attention`` (the op's registered
implementation; the quadratic :func:`~lowc.ir.dialect.linear_attention.reference_linear_attention`
stays the oracle).

Semantics are exactly those of the op (see :mod:`lowc.ir.dialect.linear_attention`); only the order of
fp32 additions differs from the oracle. The algorithm is the chunked form of linear-attention kernels
(Lightning Attention, flash-linear-attention, LoLCATs' terraced prefill), with block ``C = 64``:

* Queries are cut into chunks of ``C`` rows. For query chunk ``c`` the keys split into an *inside*
  range of whole key chunks, computed quadratically with the exact window/linear masks of the op,
  and *outside* keys, all of which are in the linear set of every query of the chunk, so they enter
  only through the running state ``S = Σ φ(k) vᵀ`` ``[F, Dv]`` and ``z = Σ φ(k)`` ``[F]``.
* Causal: inside = key chunks ``c-P .. c`` with ``P = ceil((window-1)/C)`` (``P = 0`` for window
  0 or 1; ``P = 1`` for any window up to 65, i.e. the previous and the current chunk for LoLCATs'
  window of 64); outside = the prefix of chunks ``< c-P`` (exclusive prefix sums of per-chunk
  ``φ(K)ᵀV``).
* Non-causal: with ``window = 0`` every key is linear: one global ``S``/``z`` (no quadratic term).
  With a band window ``|i-j| < window``: inside = key chunks ``c-P .. c+P``, outside = prefix
  (``< c-P``) plus suffix (``> c+P``) sums, each accumulated separately (no subtraction from a
  global sum, so no cancellation).
* The window part needs no online-softmax rescaling: every query's whole window lies inside its
  chunk's inside range, so the row maximum ``m_i`` over the window scores is taken directly, and the
  linear terms are added unscaled, as the op defines (LoLCATs' shared denominator).

Memory: the per-chunk states ``[n_chunks, F, Dv]`` (``F·Dv/C`` floats per token and key head, less than
the inputs themselves for ``F, Dv <= 128``) and the scores of a bounded group of query chunks at a time
(``_SCORE_BUDGET`` elements); nothing is ``[L, L]`` unless ``window`` itself is ~L (then the window
part is inherently quadratic and is processed group by group).
"""

from __future__ import annotations

from typing import Optional

import torch

#: chunk (block) length along the sequence, as in the kernels
CHUNK = 64
#: upper bound on the elements of one score tensor [B, H, group, C, inside]; sets the query-chunk group size
_SCORE_BUDGET = 1 << 22


def head_factor(t: Optional[torch.Tensor], h: int, device=None) -> torch.Tensor:
    """A per-query-head factor (``window_factor``/``linear_factor``) as fp32 ``[H]``; ``None`` is ones."""
    return t.float() if t is not None else torch.ones(h, dtype=torch.float32, device=device)


def window_weights(s: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """The window part's weights before ``window_factor``: ``exp(s - m)`` where ``allowed`` (a bool
    mask broadcasting to ``s``) and 0 elsewhere, ``m`` the maximum of the scores ``s`` over the allowed
    keys of the row (last dim; 0 for a row with none), as the LoLCATs reference subtracts it."""
    s = s.masked_fill(~allowed, float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return torch.exp(s - m)  # exp(-inf) = 0 outside


def _lookback(window: int, chunk: int) -> int:
    """Number of key chunks on each side of the query chunk that the window can reach."""
    return 0 if window <= 1 else -(-(window - 1) // chunk)


def _chunks(t: torch.Tensor, n: int, chunk: int) -> torch.Tensor:
    """``[B, Hk, L, X]`` -> zero-padded ``[B, Hk, n, chunk, X]``."""
    b, hk, length, x = t.shape
    pad = n * chunk - length
    if pad:
        t = torch.cat([t, t.new_zeros(b, hk, pad, x)], dim=2)
    return t.view(b, hk, n, chunk, x)


def _prefix(x: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    """Exclusive prefix sums along dim 2 with one extra slot: ``out[:, :, n] = Σ_{i < n} x[:, :, i]``
    (``reverse``: ``Σ_{i >= n}``), ``n = 0..N``."""
    n = x.shape[2]
    if torch.is_grad_enabled() and x.requires_grad:  # autograd-friendly (cumsum strides badly on CPU at large N)
        zero = x.new_zeros(x.shape[:2] + (1,) + x.shape[3:])
        if reverse:
            return torch.cat([x.flip(2).cumsum(dim=2).flip(2), zero], dim=2)
        return torch.cat([zero, x.cumsum(dim=2)], dim=2)
    out = x.new_zeros(x.shape[:2] + (n + 1,) + x.shape[3:])
    order = range(n - 1, -1, -1) if reverse else range(n)
    for i in order:  # contiguous [B, Hk, F, Dv] adds: memory-bound and linear in N
        src, dst = (i + 1, i) if reverse else (i, i + 1)
        torch.add(out[:, :, src], x[:, :, i], out=out[:, :, dst])
    return out


def chunked_linear_attention(fq, fk, v, q, k, window_factor, linear_factor, key_mask, causal, window, scale, eps, *,
                             chunk: int = CHUNK) -> torch.Tensor:
    """``lowc::linear_attention`` in chunks (module docstring); operands as the op (its schema declares
    their types), already checked."""
    b, h, lq, f = fq.shape
    hk, lk, dv = fk.shape[1], fk.shape[2], v.shape[-1]
    g = h // hk
    dev = fq.device
    if lq == 0 or lk == 0:
        return v.new_zeros(b, h, lq, dv)
    nq, nk = -(-lq // chunk), -(-lk // chunk)
    use_window = window > 0

    # fp32 operands; queries grouped by key head: [B, Hk, G, nq, C, X]
    fq_c = _chunks(fq.float().reshape(b * hk, g, lq, f), nq, chunk).view(b, hk, g, nq, chunk, f)
    ok = torch.ones(b, lk, dtype=torch.bool, device=dev) if key_mask is None else key_mask
    fk_m = fk.float() * ok[:, None, :, None]  # masked keys contribute nothing to any state
    fk_c = _chunks(fk_m, nk, chunk)  # [B, Hk, nk, C, F]
    v_c = _chunks(v.float(), nk, chunk)  # [B, Hk, nk, C, Dv]
    ok_c = torch.cat([ok, ok.new_zeros(b, nk * chunk - lk)], dim=1).view(b, nk, chunk)
    if use_window:
        dq = q.shape[-1]
        q_c = _chunks(q.float().reshape(b * hk, g, lq, dq), nq, chunk).view(b, hk, g, nq, chunk, dq)
        k_c = _chunks(k.float(), nk, chunk)

    # exclusive prefix sums over key chunks: pre[n] = Σ_{chunks < n}, n = 0..nk
    kv_sum = torch.einsum("bhncf,bhncd->bhnfd", fk_c, v_c)
    z_sum = fk_c.sum(dim=3)
    pre_s, pre_z = _prefix(kv_sum), _prefix(z_sum)
    if not causal and use_window:  # suf[n] = Σ_{chunks >= n}, n = 0..nk
        suf_s, suf_z = _prefix(kv_sum, reverse=True), _prefix(z_sum, reverse=True)
    del kv_sum, z_sum

    lf = head_factor(linear_factor, h, dev).view(1, hk, g, 1, 1, 1)
    wf = head_factor(window_factor, h, dev).view(1, hk, g, 1, 1, 1)

    if not causal and not use_window:  # one global sum, no quadratic term
        s_tot, z_tot = pre_s[:, :, -1], pre_z[:, :, -1]  # [B, Hk, F, Dv], [B, Hk, F]
        num = torch.einsum("bhgncf,bhfd->bhgncd", fq_c, s_tot)
        den = torch.einsum("bhgncf,bhf->bhgnc", fq_c, z_tot).unsqueeze(-1)
        y = (lf * num) / (lf * den).clamp_min(eps)
        return y.reshape(b, h, nq * chunk, dv)[:, :, :lq].to(v.dtype)

    p = min(_lookback(window, chunk), max(nq, nk))  # a window wider than the sequence reaches every chunk
    offs = torch.arange(-p, (0 if causal else p) + 1, device=dev)  # inside key chunks relative to c
    n_in = offs.numel() * chunk
    ar = torch.arange(chunk, device=dev)
    group = max(1, min(nq, _SCORE_BUDGET // max(1, b * h * chunk * n_in)))
    out = []
    for c0 in range(0, nq, group):
        cs = torch.arange(c0, min(nq, c0 + group), device=dev)  # query chunks of this group
        kidx = cs[:, None] + offs[None, :]  # [n, P'] key chunk indices (may be out of range)
        kin = (kidx >= 0) & (kidx < nk)
        kidx_safe = kidx.clamp(0, nk - 1)
        flat = kidx_safe.reshape(-1)
        n = cs.numel()

        def gather(t):  # [B, Hk, nk, C, X] -> [B, Hk, n, P'*C, X]
            return t.index_select(2, flat).view(b, hk, n, n_in, t.shape[-1])

        fk_g, v_g = gather(fk_c), gather(v_c)
        key_ok = (ok_c.index_select(1, flat).view(b, n, -1, chunk) & kin[None, :, :, None]).view(b, n, n_in)
        i = (cs[:, None] * chunk + ar[None, :])[:, :, None]  # [n, C, 1] query positions
        j = (kidx[:, :, None] * chunk + ar[None, None, :]).view(n, 1, n_in)  # [n, 1, n_in] key positions
        d = i - j
        if causal:
            win = (d >= 0) & (d < window)
            lin = d >= max(window, 0)
        else:
            win = d.abs() < window
            lin = ~win
        keep = key_ok[:, None, None, :, None, :]  # [B, 1, 1, n, 1, n_in]
        win = win[None, None, None] & keep
        lin = lin[None, None, None] & keep

        fq_g = fq_c[:, :, :, c0:c0 + n]  # [B, Hk, G, n, C, F]
        # out of place throughout: the op's backward recomputes this function under autograd
        a = torch.einsum("bhgncf,bhnjf->bhgncj", fq_g, fk_g).masked_fill(~lin, 0.0) * lf
        if use_window:
            s = torch.einsum("bhgncd,bhnjd->bhgncj", q_c[:, :, :, c0:c0 + n], gather(k_c)) * scale
            a = a + window_weights(s, win) * wf
            del s

        # outside keys: the state at the edges of the inside range
        lo = (cs - p).clamp(0, nk)
        st_s, st_z = pre_s.index_select(2, lo), pre_z.index_select(2, lo)
        if not causal:
            hi = (cs + p + 1).clamp(0, nk)
            st_s = st_s + suf_s.index_select(2, hi)
            st_z = st_z + suf_z.index_select(2, hi)
        num = torch.einsum("bhgncj,bhnjd->bhgncd", a, v_g) + torch.einsum("bhgncf,bhnfd->bhgncd", fq_g, st_s) * lf
        den = a.sum(dim=-1, keepdim=True) + torch.einsum("bhgncf,bhnf->bhgnc", fq_g, st_z).unsqueeze(-1) * lf
        out.append(num / den.clamp_min(eps))
    y = torch.cat(out, dim=3) if len(out) > 1 else out[0]
    return y.reshape(b, h, nq * chunk, dv)[:, :, :lq].to(v.dtype)


def linear_state(fk: torch.Tensor, v: torch.Tensor, key_mask: Optional[torch.Tensor], upto: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``S = Σ_{j < upto} φ(k_j) v_jᵀ`` ``[B, Hk, F, Dv]`` and ``z = Σ_{j < upto} φ(k_j)`` ``[B, Hk, F]``
    in fp32 over the keys allowed by ``key_mask`` (the recurrent state after a prompt)."""
    fkf = fk[:, :, :upto].float()
    if key_mask is not None:
        fkf = fkf * key_mask[:, None, :upto, None]
    return torch.einsum("bhjf,bhjd->bhfd", fkf, v[:, :, :upto].float()), fkf.sum(dim=2)


__all__ = ["CHUNK", "chunked_linear_attention", "linear_state"]
