"""Decode state: the constant-size recurrent state of a causal ``lowc::linear_attention`` layer, and
the KV cache of a softmax attention layer.

**Linear attention.** One :class:`LinearAttentionState` per linearized layer holds, for each
key/value head,

* ``S = Σ φ(k_j) v_jᵀ`` ``[B, Hk, F, Dv]`` and ``z = Σ φ(k_j)`` ``[B, Hk, F]`` (fp32) over the keys in
  the *linear* set of the next query: every earlier key when ``window = 0``, else the keys that have
  left the sliding window (position ``<= t - window`` for the next position ``t``);
* a ring buffer of the last ``window`` keys (raw ``k`` ``[B, Hk, W, D]``, features ``fk``
  ``[B, Hk, W, F]``) and values (``v`` ``[B, Hk, W, Dv]``), slot ``p % window`` for position ``p``,
  with ``valid [B, W]`` (slot filled by a key that ``key_mask`` admits);
* ``pos``: the number of positions seen (prompt padding included).

Sizes depend on the batch, heads, dims and window only, never on the number of tokens: ``step``
updates the tensors in place. A key's feature row enters ``S``/``z`` exactly when it leaves the window
(the step whose query is ``window`` positions later), so each step's output is the causal op's output
for that position (the same sets ``W_i``/``L_i``, the same window maximum ``m_i``, the same shared
denominator) up to fp32 rounding. The op's definition and its reference math (``head_factor``,
``window_weights``, the chunked prefix state ``linear_state``) stay in :mod:`lowc.ir.dialect`; this
module only carries the state across calls.

API (what a model-level decoder calls, per layer; :mod:`lowc.runtime.recurrent` is that decoder)::

    st = LinearAttentionState.empty(batch, kv_heads, feature_dim, value_dim, head_dim,
                                    window=64, scale=d**-0.5, eps=1e-6, device=dev)
    y = prefill(st, fq, fk, v, q, k, window_factor=wf, linear_factor=lf, key_mask=mask)  # [B, H, L, Dv]
    y_t = step(st, fq_t, fk_t, v_t, q_t, k_t, window_factor=wf, linear_factor=lf)       # [B, H, 1, Dv]

Operands are shaped as the op's (``fq [B, H, L, F]``, ``fk [B, Hk, L, F]``, ``v [B, Hk, L, Dv]``,
``q [B, H, L, D]``, ``k [B, Hk, L, D]``, ``L = 1`` for ``step``); ``q``/``k`` only when ``window > 0``.
``prefill`` on a fresh state runs the op (its registered implementation: the chunked form, or the
Triton kernel on CUDA) and builds the state from the prompt in one pass; on a state that has already
seen tokens it continues token by token. ``step(..., key_valid=[B] bool)`` marks a new token as
padding for some sequences (it is then never attended to, as ``key_mask`` in the op).

**Softmax attention.** :class:`KVCache` holds the keys, values and key validity a softmax layer has
seen (layers left unlinearized in a hybrid model); it grows by one position per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from lowc.ir.dialect import ensure_registered
from lowc.ir.dialect.linear_attention import head_factor, window_weights
from lowc.ir.dialect.linear_attention_chunked import linear_state


@dataclass
class LinearAttentionState:
    """Per-layer recurrent state (module docstring); build with :meth:`empty`."""

    window: int
    scale: float
    eps: float
    S: torch.Tensor  # [B, Hk, F, Dv] fp32
    z: torch.Tensor  # [B, Hk, F] fp32
    fk_win: torch.Tensor  # [B, Hk, W, F] fp32 ring buffer
    k_win: torch.Tensor  # [B, Hk, W, D] fp32 ring buffer
    v_win: torch.Tensor  # [B, Hk, W, Dv] fp32 ring buffer
    valid: torch.Tensor  # [B, W] bool
    pos: int = 0

    @classmethod
    def empty(cls, batch: int, kv_heads: int, feature_dim: int, value_dim: int, head_dim: int = 0, *,
              window: int, scale: float, eps: float, device=None) -> "LinearAttentionState":
        """A zero state for ``batch`` sequences (``head_dim`` is the raw q/k width, needed iff ``window > 0``).

        The ring buffer has ``window`` slots: meant for sliding windows (LoLCATs: 64), not for a window
        standing in for full softmax attention."""
        if window < 0:
            raise ValueError(f"LinearAttentionState: window must be >= 0, got {window}")
        if window > 0 and head_dim <= 0:
            raise ValueError(f"LinearAttentionState: window={window} needs head_dim (the raw q/k width)")
        f32 = dict(dtype=torch.float32, device=device)
        return cls(
            window=window, scale=float(scale), eps=float(eps),
            S=torch.zeros(batch, kv_heads, feature_dim, value_dim, **f32),
            z=torch.zeros(batch, kv_heads, feature_dim, **f32),
            fk_win=torch.zeros(batch, kv_heads, window, feature_dim, **f32),
            k_win=torch.zeros(batch, kv_heads, window, head_dim if window else 0, **f32),
            v_win=torch.zeros(batch, kv_heads, window, value_dim, **f32),
            valid=torch.zeros(batch, window, dtype=torch.bool, device=device),
        )

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.S, self.z, self.fk_win, self.k_win, self.v_win, self.valid)

    def nbytes(self) -> int:
        """Bytes held by the state (constant over decoding)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())


def _fail(msg: str):
    raise ValueError(f"lowc::linear_attention decode: {msg}")


def _check_state(st: LinearAttentionState, fq, fk, v, q, k) -> None:
    b, hk, f, dv = st.S.shape
    if fq.dim() != 4 or fk.dim() != 4 or v.dim() != 4:
        _fail(f"fq, fk, v must be 4-D [B, H, L, *], got {tuple(fq.shape)}, {tuple(fk.shape)}, {tuple(v.shape)}")
    if fq.shape[0] != b or fk.shape[:2] != (b, hk) or fq.shape[-1] != f or fk.shape[-1] != f or v.shape[:2] != (b, hk) or v.shape[-1] != dv:
        _fail(f"fq {tuple(fq.shape)} / fk {tuple(fk.shape)} / v {tuple(v.shape)} do not match the state "
              f"(B={b}, Hk={hk}, F={f}, Dv={dv})")
    if fq.shape[1] % hk:
        _fail(f"query heads {fq.shape[1]} must be a multiple of key/value heads {hk}")
    if st.window > 0:
        if q is None or k is None:
            _fail(f"window={st.window} needs the raw q and k")
        d = st.k_win.shape[-1]
        if q.shape[:3] != fq.shape[:3] or k.shape[:3] != fk.shape[:3] or q.shape[-1] != d or k.shape[-1] != d:
            _fail(f"q {tuple(q.shape)} / k {tuple(k.shape)} do not match fq {tuple(fq.shape)} / fk {tuple(fk.shape)} "
                  f"and head_dim={d}")


def prefill(st: LinearAttentionState, fq, fk, v, q=None, k=None, *, window_factor=None, linear_factor=None,
            key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Outputs ``[B, H, L, Dv]`` of the causal op for a prompt of ``L`` tokens; leaves ``st`` after them."""
    _check_state(st, fq, fk, v, q, k)
    length = fq.shape[2]
    if st.pos > 0:  # continue: token by token (exact, the state is already past position 0)
        ys = []
        for t in range(length):
            kv = None if key_mask is None else key_mask[:, t]
            sl = slice(t, t + 1)
            ys.append(step(st, fq[:, :, sl], fk[:, :, sl], v[:, :, sl], None if q is None else q[:, :, sl],
                           None if k is None else k[:, :, sl], window_factor=window_factor,
                           linear_factor=linear_factor, key_valid=kv))
        return torch.cat(ys, dim=2)
    ensure_registered()
    w = st.window
    y = torch.ops.lowc.linear_attention(fq, fk, v, q if w else None, k if w else None, window_factor, linear_factor,
                                        key_mask, True, w, st.scale, st.eps)
    n_lin = max(length - w, 0) if w else length  # keys that have left the window
    s, z = linear_state(fk, v, key_mask, n_lin)
    st.S.copy_(s)
    st.z.copy_(z)
    if w:
        p = torch.arange(n_lin, length, device=fq.device)
        slots = p % w
        fkm = fk[:, :, n_lin:].float()
        ok = torch.ones(fq.shape[0], length - n_lin, dtype=torch.bool, device=fq.device) if key_mask is None else key_mask[:, n_lin:]
        st.fk_win.index_copy_(2, slots, fkm)
        st.k_win.index_copy_(2, slots, k[:, :, n_lin:].float())
        st.v_win.index_copy_(2, slots, v[:, :, n_lin:].float())
        st.valid.index_copy_(1, slots, ok)
    st.pos = length
    return y


def _add_outer(S: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``S[..., F, Dv] += a[..., F] ⊗ b[..., Dv]`` in place, without an ``[F, Dv]`` temporary."""
    f, dv = S.shape[-2:]
    S.view(-1, f, dv).baddbmm_(a.reshape(-1, f, 1), b.reshape(-1, 1, dv))


def step(st: LinearAttentionState, fq, fk, v, q=None, k=None, *, window_factor=None, linear_factor=None,
         key_valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One token: ``fq [B, H, 1, F]`` etc. -> ``y [B, H, 1, Dv]`` (``v``'s dtype); updates ``st`` in place."""
    _check_state(st, fq, fk, v, q, k)
    if fq.shape[2] != 1:
        _fail(f"step takes one token (L = 1), got L = {fq.shape[2]}; use prefill for a prompt")
    b, hk, f, dv = st.S.shape
    h = fq.shape[1]
    g = h // hk
    w, t = st.window, st.pos
    ok = torch.ones(b, dtype=torch.bool, device=fq.device) if key_valid is None else key_valid.to(torch.bool)
    fk_t = fk[:, :, 0].float() * ok[:, None, None]  # [B, Hk, F]
    v_t = v[:, :, 0].float()
    if w == 0:
        _add_outer(st.S, fk_t, v_t)
        st.z.add_(fk_t)
    else:
        slot = t % w
        if t >= w:  # the key at position t - w leaves the window: into the linear state
            old = st.fk_win[:, :, slot] * st.valid[:, slot, None, None]
            _add_outer(st.S, old, st.v_win[:, :, slot])
            st.z.add_(old)
        st.fk_win[:, :, slot] = fk_t
        st.k_win[:, :, slot] = k[:, :, 0].float()
        st.v_win[:, :, slot] = v_t
        st.valid[:, slot] = ok
    fq_t = fq[:, :, 0].float().view(b, hk, g, f)
    lf = head_factor(linear_factor, h, fq_t.device).view(1, hk, g, 1)
    num = torch.einsum("bhgf,bhfd->bhgd", fq_t, st.S) * lf
    den = torch.einsum("bhgf,bhf->bhg", fq_t, st.z).unsqueeze(-1) * lf
    if w:
        q_t = q[:, :, 0].float().view(b, hk, g, -1)
        s = torch.einsum("bhgd,bhwd->bhgw", q_t, st.k_win) * st.scale
        p = window_weights(s, st.valid[:, None, None, :]) * head_factor(window_factor, h, fq_t.device).view(1, hk, g, 1)
        num = num + torch.einsum("bhgw,bhwd->bhgd", p, st.v_win)
        den = den + p.sum(dim=-1, keepdim=True)
    st.pos = t + 1
    return (num / den.clamp_min(st.eps)).view(b, h, 1, dv).to(v.dtype)


@dataclass
class KVCache:
    """Keys ``[B, Hk, T, D]``, values ``[B, Hk, T, Dv]`` and key validity ``[B, T]`` (bool) of one softmax
    attention layer, over the ``T`` positions seen so far."""

    k: torch.Tensor
    v: torch.Tensor
    valid: torch.Tensor

    def append(self, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor) -> None:
        """Add the positions of ``k``/``v`` (``[B, Hk, L, *]``) with their validity ``[B, L]``."""
        self.k, self.v = torch.cat([self.k, k], 2), torch.cat([self.v, v], 2)
        self.valid = torch.cat([self.valid, valid], 1)

    def attend(self, q: torch.Tensor, scale: float | None = None, enable_gqa: bool = False) -> torch.Tensor:
        """Softmax attention of the new queries ``q [B, H, L, D]`` over every valid cached key (the new
        positions are the last ``L`` cached ones: one token per step, so no causal mask is needed)."""
        return F.scaled_dot_product_attention(q, self.k, self.v, attn_mask=self.valid[:, None, None, :], scale=scale,
                                              enable_gqa=enable_gqa)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.valid))
