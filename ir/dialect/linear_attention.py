"""``lowc::linear_attention``: (hybrid) linear attention with learned feature maps.

``lowc::linear_attention(fq, fk, v, q?, k?, window_factor?, linear_factor?, key_mask?, causal, window, scale, eps) -> y``

Shapes: ``fq [B, H, Lq, F]`` and ``fk [B, Hk, Lk, F]`` are feature-mapped queries and keys (non-negative,
e.g. Hedgehog's ``[exp(xW+b), exp(-xW-b)]`` or LoLCATs' ``[softmax_f(xW), softmax_f(-xW)]``),
``v [B, Hk, Lk, Dv]``; ``H`` a multiple of ``Hk`` (grouped-query attention: query head ``h`` reads
key/value head ``h // (H / Hk)``). ``q [B, H, Lq, D]`` and ``k [B, Hk, Lk, D]`` are the raw (post-RoPE)
queries and keys of the sliding-window softmax part, required iff ``window > 0``. ``window_factor``
and ``linear_factor`` are per-query-head weights ``[H]`` of the two parts (``None`` = 1).
``key_mask [B, Lk]`` (bool) excludes padded keys from both parts. ``causal`` needs ``Lq == Lk``.

Semantics (LoLCATs' "terraced" hybrid; ``window = 0`` is plain linear attention, Hedgehog's form):
for query ``i`` and key ``j`` (both allowed by ``key_mask``)

* the *window* set ``W_i``: ``i - window < j <= i`` when causal, ``|i - j| < window`` otherwise;
* the *linear* set ``L_i``: ``j <= i`` and ``j`` not in ``W_i`` when causal; ``j`` not in ``W_i`` otherwise;
* ``a_ij = window_factor[h] * exp(scale * q_i·k_j - m_i)`` for ``j`` in ``W_i``, with ``m_i`` the
  maximum of ``scale * q_i·k_j`` over ``W_i`` (as the LoLCATs reference subtracts it);
  ``a_ij = linear_factor[h] * fq_i·fk_j`` for ``j`` in ``L_i``;
* ``y_i = Σ_j a_ij v_j / max(Σ_j a_ij, eps)`` (a query with no admissible key gives 0).

Arithmetic is fp32; ``y`` has ``v``'s dtype and shape ``[B, H, Lq, Dv]``.

The reference implementation below materialises the ``[Lq, Lk]`` weights: simple and obviously right,
the oracle for the chunked and recurrent forms and for backend kernels.

Implementations
---------------
* The op's registered implementation (every device) is the chunked, O(L)-memory plain-PyTorch form
  :func:`lowc.ir.dialect.linear_attention_chunked.chunked_linear_attention` (block 64: intra-chunk
  masked quadratic + inter-chunk prefix state; global sums when non-causal). It equals the oracle up to
  the order of fp32 additions (tested), so it is used at every length.
* ``lowc.backends.triton.linear_attention.register_cuda()`` replaces it on CUDA by a Triton kernel
  (causal, ``window <= 64``; other cases keep the chunked form).
* Decode: :mod:`lowc.runtime.state` (constant-size recurrent state, ``prefill`` /
  ``step``) produces the outputs of the causal op one token at a time.
* The op is differentiable (backward by recomputation through the chunked form), so feature maps can
  be trained through it.

Feature maps: the op takes ``fq``/``fk`` as given; callers keep them finite and non-negative. Bounded
maps need nothing more (LoLCATs' ``softmax_f``: each half sums to 1, so ``fq·fk <= 2`` and
``z = Σ fk <= 2·L``, finite in fp32 at any practical length). Exponential maps (Hedgehog's
``exp(xW+b)``) must be stabilised by the caller: subtract a per-row maximum over the feature dimension
on the *query* side (it cancels exactly when ``window = 0``; with a window it changes the linear/window
balance, so a softmax-over-features map is the stable choice there) and keep the key side bounded (a
softmax over features, or a fixed shift), since a per-key factor changes the weights.
"""

from __future__ import annotations

from typing import Optional

import torch

from lowc.ir.dialect.linear_attention_chunked import (
    chunked_linear_attention,
    head_factor,
    window_weights,
)


def _check(fq, fk, v, q, k, window_factor, linear_factor, key_mask, causal, window, scale, eps) -> None:
    op = "lowc::linear_attention"
    if fq.dim() != 4 or fk.dim() != 4 or v.dim() != 4:
        raise ValueError(f"{op}: fq, fk, v must be 4-D [B, H, L, *], got {tuple(fq.shape)}, {tuple(fk.shape)}, {tuple(v.shape)}")
    b, h, lq, f = fq.shape
    bk, hk, lk, fk_f = fk.shape
    if bk != b or fk_f != f:
        raise ValueError(f"{op}: fk {tuple(fk.shape)} does not match fq {tuple(fq.shape)} (batch, feature dim)")
    if tuple(v.shape[:3]) != (b, hk, lk):
        raise ValueError(f"{op}: v {tuple(v.shape)} must be [B={b}, Hk={hk}, Lk={lk}, Dv]")
    if hk == 0 or h % hk:
        raise ValueError(f"{op}: query heads {h} must be a multiple of key/value heads {hk}")
    if causal and lq != lk:
        raise ValueError(f"{op}: causal attention needs Lq == Lk, got {lq} and {lk}")
    if window < 0:
        raise ValueError(f"{op}: window must be >= 0, got {window}")
    if window > 0:
        if q is None or k is None:
            raise ValueError(f"{op}: window={window} needs the raw q and k")
        if tuple(q.shape[:3]) != (b, h, lq) or tuple(k.shape[:3]) != (b, hk, lk) or q.shape[-1] != k.shape[-1]:
            raise ValueError(f"{op}: q {tuple(q.shape)} / k {tuple(k.shape)} do not match fq {tuple(fq.shape)} / fk {tuple(fk.shape)}")
    for name, t in (("window_factor", window_factor), ("linear_factor", linear_factor)):
        if t is not None and tuple(t.shape) != (h,):
            raise ValueError(f"{op}: {name} {tuple(t.shape)} must be [H={h}]")
    if key_mask is not None and (tuple(key_mask.shape) != (b, lk) or key_mask.dtype != torch.bool):
        raise ValueError(f"{op}: key_mask must be bool [B={b}, Lk={lk}], got {key_mask.dtype} {tuple(key_mask.shape)}")
    if not eps > 0:
        raise ValueError(f"{op}: eps must be positive, got {eps}")


def masks(lq: int, lk: int, causal: bool, window: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(window set, linear set) as bool ``[Lq, Lk]`` matrices (see the module docstring)."""
    i = torch.arange(lq, device=device).unsqueeze(1)
    j = torch.arange(lk, device=device).unsqueeze(0)
    if causal:
        past = j <= i
        win = past & (j > i - window) if window > 0 else torch.zeros_like(past)
        return win, past & ~win
    win = (i - j).abs() < window if window > 0 else torch.zeros(lq, lk, dtype=torch.bool, device=device)
    return win, ~win


def _heads(t: torch.Tensor, h: int) -> torch.Tensor:
    """Repeat key/value heads [B, Hk, ...] to the H query heads (GQA)."""
    return t if t.shape[1] == h else t.repeat_interleave(h // t.shape[1], dim=1)


def reference_linear_attention(fq, fk, v, q, k, window_factor, linear_factor, key_mask, causal, window, scale, eps):
    """The oracle: materialised ``[Lq, Lk]`` weights in fp32 (module docstring)."""
    b, h, lq, _ = fq.shape
    lk = fk.shape[2]
    win, lin = masks(lq, lk, causal, window, fq.device)
    if key_mask is not None:
        keep = key_mask[:, None, None, :]
        win, lin = win & keep, lin & keep  # [B, 1, Lq, Lk]
    fkf, vf = _heads(fk, h).float(), _heads(v, h).float()
    lf = head_factor(linear_factor, h, fq.device).view(1, h, 1, 1)
    a = torch.einsum("bhif,bhjf->bhij", fq.float(), fkf).masked_fill(~lin, 0.0) * lf
    if window > 0:
        s = torch.einsum("bhid,bhjd->bhij", q.float(), _heads(k, h).float()) * scale
        a = a + window_weights(s, win) * head_factor(window_factor, h, fq.device).view(1, h, 1, 1)
    den = a.sum(dim=-1, keepdim=True).clamp_min(eps)
    return (torch.einsum("bhij,bhjd->bhid", a, vf) / den).to(v.dtype)


@torch.library.custom_op("lowc::linear_attention", mutates_args=())
def linear_attention(
    fq: torch.Tensor,
    fk: torch.Tensor,
    v: torch.Tensor,
    q: Optional[torch.Tensor],
    k: Optional[torch.Tensor],
    window_factor: Optional[torch.Tensor],
    linear_factor: Optional[torch.Tensor],
    key_mask: Optional[torch.Tensor],
    causal: bool,
    window: int,
    scale: float,
    eps: float,
) -> torch.Tensor:
    _check(fq, fk, v, q, k, window_factor, linear_factor, key_mask, causal, window, scale, eps)

    return chunked_linear_attention(fq, fk, v, q, k, window_factor, linear_factor, key_mask, causal, window, scale, eps)


@linear_attention.register_fake
def _linear_attention_fake(fq, fk, v, q, k, window_factor, linear_factor, key_mask, causal, window, scale, eps):
    _check(fq, fk, v, q, k, window_factor, linear_factor, key_mask, causal, window, scale, eps)
    return v.new_empty((fq.shape[0], fq.shape[1], fq.shape[2], v.shape[-1]))


def _setup_context(ctx, inputs, output):
    fq, fk, v, q, k, window_factor, linear_factor, key_mask, causal, window, scale, eps = inputs
    ctx.save_for_backward(fq, fk, v, q, k, window_factor, linear_factor, key_mask)
    ctx.config = (causal, window, scale, eps)


def _backward(ctx, grad):
    """Recompute through the chunked form with autograd (O(L) memory like the forward)."""

    *tensors, key_mask = ctx.saved_tensors
    needs = ctx.needs_input_grad[:7]
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(True) if (t is not None and n) else t for t, n in zip(tensors, needs)]
        y = chunked_linear_attention(*leaves, key_mask, *ctx.config)
        wanted = [t for t, n in zip(leaves, needs) if n and t is not None]
        got = iter(torch.autograd.grad(y, wanted, grad, allow_unused=True) if wanted else ())
    grads = [next(got) if (n and t is not None) else None for t, n in zip(tensors, needs)]
    return (*grads, None, None, None, None, None)


linear_attention.register_autograd(_backward, setup_context=_setup_context)
