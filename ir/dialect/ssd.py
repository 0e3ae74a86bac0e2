"""``lowc::ssd``: the discrete Mamba-2 (SSD, state-space duality) token mixer.

``lowc::ssd(C, B, x, a, D?, conv_c?, conv_b?, conv_x?, key_mask?, chunk=64) -> y``

Shapes (heads first, as the attention site it replaces and ``lowc::linear_attention``): ``C [Bt, H, L, N]``
(from the queries), ``B [Bt, G, L, N]`` (from the keys), ``x [Bt, G, L, P]`` (from the values),
``a [Bt, H, L]`` the per-token, per-head log-decay (``<= 0``; computed by the caller, e.g.
``-softplus(dt) * exp(A_log)``), ``D [H]`` the skip; ``H`` a multiple of ``G`` (query head ``h`` reads
group ``h // (H / G)``, as grouped-query attention). Optional short causal depthwise convolutions along
L are applied first, without activation: ``conv_c [H, N, K]``, ``conv_b [G, N, K]``, ``conv_x [G, P, K]``;
tap ``K-1`` multiplies the current token, so the identity (zeros, last tap 1) leaves the plain SSD.
``key_mask [Bt, L]`` (bool, True = real token) marks padding.

Semantics (causal), on the operands after the convolutions::

    y[b,h,t] = Σ_{s<=t} (C[b,h,t]·B[b,g,s]) · exp(Σ_{r=s+1..t} a[b,h,r]) · x[b,g,s] + D[h]·x[b,g,t]

i.e. ``y = T x + D x`` with the token-mixing matrix ``T = (C·Bᵀ) ⊙ exp(segsum(a))`` (lower triangular,
decay 1 on the diagonal), or the recurrence ``h_t = exp(a_t)·h_{t-1} + x_t ⊗ B_t``,
``y_t = h_t·C_t + D·x_t`` with a state ``[P, N]`` per query head. A masked position is zero at the
convolutions' inputs (it feeds no later token's convolution), contributes nothing to the state (its
``B`` is 0) and does not decay it (its ``a`` is 0), and its ``y`` is 0: a left-padded row gives the
outputs of the unpadded prompt (batched generation). Arithmetic is fp32 (fp64 for fp64 ``x``); ``y`` has ``x``'s dtype and
shape ``[Bt, H, L, P]``. ``chunk`` only selects the chunk length of the O(L) form (results equal up
to fp32 rounding). ``a <= 0`` is the caller's contract (not checked: that would read the data); a
positive ``a`` is still computed exactly by the oracle but may overflow the chunked form's decays.

What this module exports
------------------------
* the op (``torch.ops.lowc.ssd``), differentiable (backward by recomputation through the chunked
  form: O(L) memory);
* :func:`reference_ssd`: the oracle, materialising ``T`` ``[Bt, H, L, L]`` (segsum by a masked cumulative
  sum of the repeated ``a``, exact at any length);
* :func:`ssd_matrix`: ``T`` itself (differentiable; what MOHAWK's stage 1 fits to softmax attention);
* :func:`chunked_ssd` (:mod:`lowc.ir.dialect.ssd_chunked`): the registered implementation on every
  device (O(L) memory, autograd, ``initial_state``/``return_state`` for continuation);
* decode: :class:`SSDState`, :func:`ssd_prefill` (a prompt through the chunked form, leaving the state)
  and :func:`ssd_step` (one token, constant-size state updated in place).

``lowc.backends.triton.ssd.register_cuda()`` (called by the triton backend's ``prepare``) replaces the
implementation on CUDA by a Triton chunked-scan kernel.
"""

from __future__ import annotations

import torch
from lowc.ir.dialect.ssd_chunked import (
    CHUNK,
    SSDState,
    acc_dtype,
    chunked_ssd,
    finish,
    heads,
    prepare,
)

OP = "lowc::ssd"


def _check(C, B, x, a, D, conv_c, conv_b, conv_x, key_mask, chunk) -> None:
    if C.dim() != 4 or B.dim() != 4 or x.dim() != 4 or a.dim() != 3:
        raise ValueError(f"{OP}: C, B, x must be 4-D [Bt, H|G, L, *] and a 3-D [Bt, H, L], got "
                         f"{tuple(C.shape)}, {tuple(B.shape)}, {tuple(x.shape)}, {tuple(a.shape)}")
    bt, h, length, n = C.shape
    g = B.shape[1]
    if B.shape[0] != bt or B.shape[2] != length or B.shape[3] != n:
        raise ValueError(f"{OP}: B {tuple(B.shape)} must be [Bt={bt}, G, L={length}, N={n}] like C {tuple(C.shape)}")
    if tuple(x.shape[:3]) != (bt, g, length):
        raise ValueError(f"{OP}: x {tuple(x.shape)} must be [Bt={bt}, G={g}, L={length}, P]")
    if tuple(a.shape) != (bt, h, length):
        raise ValueError(f"{OP}: a {tuple(a.shape)} must be [Bt={bt}, H={h}, L={length}]")
    if g == 0 or h % g:
        raise ValueError(f"{OP}: heads H={h} must be a multiple of groups G={g}")
    if D is not None and tuple(D.shape) != (h,):
        raise ValueError(f"{OP}: D {tuple(D.shape)} must be [H={h}]")
    p = x.shape[-1]
    for name, w, lead in (("conv_c", conv_c, (h, n)), ("conv_b", conv_b, (g, n)), ("conv_x", conv_x, (g, p))):
        if w is not None and (w.dim() != 3 or tuple(w.shape[:2]) != lead or w.shape[2] < 1):
            raise ValueError(f"{OP}: {name} {tuple(w.shape)} must be [{lead[0]}, {lead[1]}, K] with K >= 1")
    if key_mask is not None and (tuple(key_mask.shape) != (bt, length) or key_mask.dtype != torch.bool):
        raise ValueError(f"{OP}: key_mask must be bool [Bt={bt}, L={length}], got {key_mask.dtype} {tuple(key_mask.shape)}")
    if chunk < 1:
        raise ValueError(f"{OP}: chunk must be >= 1, got {chunk}")


def segsum(a: torch.Tensor) -> torch.Tensor:
    """``out[..., i, j] = Σ_{r=j+1..i} a[..., r]`` for ``i >= j`` (0 on the diagonal), ``-inf`` above it:
    ``[..., L] -> [..., L, L]``. A masked cumulative sum of the repeated ``a`` (no differences of long
    cumulative sums, so exact at any length)."""
    length = a.shape[-1]
    rep = a[..., :, None].expand(*a.shape, length)  # rep[..., r, j] = a[r]
    below = torch.ones(length, length, dtype=torch.bool, device=a.device).tril(-1)
    out = rep.masked_fill(~below, 0.0).cumsum(dim=-2)
    return out.masked_fill(~below.logical_or(torch.eye(length, dtype=torch.bool, device=a.device)), float("-inf"))


def _matrix(cf, bf, af) -> torch.Tensor:
    return torch.einsum("bhin,bhjn->bhij", cf, heads(bf, cf.shape[1])) * torch.exp(segsum(af))


def ssd_matrix(C: torch.Tensor, B: torch.Tensor, a: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The token-mixing matrix ``T = (C·Bᵀ) ⊙ exp(segsum(a))`` ``[Bt, H, L, L]`` fp32 (no convolutions: pass
    the convolved ``C``/``B`` if the mixer has them); with ``key_mask``, masked keys' columns and masked
    queries' rows are 0 and masked positions do not decay. Differentiable."""
    acc = acc_dtype(C)
    cf, bf, af = C.to(acc), B.to(acc), a.to(acc)
    if key_mask is not None:
        m = key_mask[:, None, :].to(acc)
        bf, af = bf * m[..., None], af * m
        cf = cf * m[..., None]
    return _matrix(cf, bf, af)


def reference_ssd(C, B, x, a, D=None, conv_c=None, conv_b=None, conv_x=None, key_mask=None, chunk: int = CHUNK):
    """The oracle: materialises ``T`` ``[Bt, H, L, L]`` in fp32 (module docstring); ``chunk`` is ignored."""
    cf, bf, xf, af, _ = prepare(C, B, x, a, conv_c, conv_b, conv_x, key_mask)
    y = _matrix(cf, bf, af) @ heads(xf, C.shape[1])
    return finish(y, xf, D, key_mask).to(x.dtype)


@torch.library.custom_op(OP, mutates_args=())
def ssd(
    C: torch.Tensor,
    B: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    D: torch.Tensor | None = None,
    conv_c: torch.Tensor | None = None,
    conv_b: torch.Tensor | None = None,
    conv_x: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    chunk: int = CHUNK,
) -> torch.Tensor:
    _check(C, B, x, a, D, conv_c, conv_b, conv_x, key_mask, chunk)
    return chunked_ssd(C, B, x, a, D, conv_c, conv_b, conv_x, key_mask, chunk)


@ssd.register_fake
def _ssd_fake(C, B, x, a, D=None, conv_c=None, conv_b=None, conv_x=None, key_mask=None, chunk=CHUNK):
    _check(C, B, x, a, D, conv_c, conv_b, conv_x, key_mask, chunk)
    return x.new_empty((C.shape[0], C.shape[1], C.shape[2], x.shape[-1]))


def _setup_context(ctx, inputs, output):
    *tensors, key_mask, chunk = inputs
    ctx.save_for_backward(*tensors, key_mask)
    ctx.chunk = chunk


def _backward(ctx, grad):
    """Recompute through the chunked form with autograd (O(L) memory like the forward)."""
    *tensors, key_mask = ctx.saved_tensors
    needs = ctx.needs_input_grad[:8]
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(True) if (t is not None and n) else t for t, n in zip(tensors, needs)]
        y = chunked_ssd(*leaves, key_mask, ctx.chunk)
        wanted = [t for t, n in zip(leaves, needs) if n and t is not None]
        got = iter(torch.autograd.grad(y, wanted, grad, allow_unused=True) if wanted else ())
    grads = [next(got) if (n and t is not None) else None for t, n in zip(tensors, needs)]
    return (*grads, None, None)


ssd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------- decode: prefill + one token at a time


def _decode_fail(msg: str):
    raise ValueError(f"{OP} decode: {msg}")


def _check_convs(state: SSDState, conv_c, conv_b, conv_x) -> None:
    for name, w in (("conv_c", conv_c), ("conv_b", conv_b), ("conv_x", conv_x)):
        buf = getattr(state, name)
        if (w is None) != (buf is None):
            _decode_fail(f"{name} is {'given' if w is not None else 'missing'} but the state was built "
                         f"{'without' if buf is None else 'with'} its history")
        if w is not None and buf.shape[-1] != w.shape[-1] - 1:
            _decode_fail(f"{name} has K={w.shape[-1]} but the state holds {buf.shape[-1]} past inputs")


def ssd_prefill(C, B, x, a, D=None, conv_c=None, conv_b=None, conv_x=None, key_mask=None, *,
                state: SSDState | None = None, chunk: int = CHUNK) -> tuple[torch.Tensor, SSDState]:
    """Outputs ``[Bt, H, L, P]`` of the op for a prompt of ``L`` tokens, and the decode state after them.

    Runs the chunked form (plain PyTorch on the operands' device) from ``state`` (``None``: a fresh
    one), which is then updated in place (its tensors keep their storage) and returned."""
    _check(C, B, x, a, D, conv_c, conv_b, conv_x, key_mask, chunk)
    if state is not None:
        _check_convs(state, conv_c, conv_b, conv_x)
    y, new = chunked_ssd(C, B, x, a, D, conv_c, conv_b, conv_x, key_mask, chunk, initial_state=state, return_state=True)
    for name in ("ssm", "conv_c", "conv_b", "conv_x"):  # the state is fp32 whatever the operands
        t = getattr(new, name)
        setattr(new, name, None if t is None else t.float())
    if state is None:
        return y, new
    for t_old, t_new in zip(state.tensors(), new.tensors()):
        t_old.copy_(t_new)
    state.pos = new.pos
    return y, state


def _conv_step(buf: torch.Tensor, w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One token of :func:`causal_conv`: ``u [Bt, C1, C2]``, history ``buf [Bt, C1, C2, K-1]`` (shifted in place)."""
    window = torch.cat([buf, u[..., None]], dim=-1)
    buf.copy_(window[..., 1:])
    return (window * w.float()[None]).sum(dim=-1)


def ssd_step(state: SSDState, C_t, B_t, x_t, a_t, D=None, conv_c=None, conv_b=None, conv_x=None, *,
             key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """One token: ``C_t [Bt, H, 1, N]``, ``B_t [Bt, G, 1, N]``, ``x_t [Bt, G, 1, P]``, ``a_t [Bt, H, 1]`` ->
    ``y_t [Bt, H, 1, P]`` (``x_t``'s dtype): ``h = exp(a)·h + x ⊗ B``, ``y = h·C + D·x``, the convolutions
    continued from the state's histories; ``key_valid [Bt]`` (bool) marks the token as padding for some
    rows (as ``key_mask``). Updates ``state`` in place; its size never changes."""
    b, h, p, n = state.ssm.shape
    if C_t.dim() != 4 or B_t.dim() != 4 or x_t.dim() != 4 or a_t.dim() != 3:
        _decode_fail(f"C_t, B_t, x_t must be 4-D [Bt, H|G, 1, *] and a_t 3-D [Bt, H, 1], got {tuple(C_t.shape)}, "
                     f"{tuple(B_t.shape)}, {tuple(x_t.shape)}, {tuple(a_t.shape)}")
    if C_t.shape[2] != 1:
        _decode_fail(f"ssd_step takes one token (L = 1), got L = {C_t.shape[2]}; use ssd_prefill for a prompt")
    g = B_t.shape[1]
    if (tuple(C_t.shape) != (b, h, 1, n) or tuple(a_t.shape) != (b, h, 1) or tuple(B_t.shape) != (b, g, 1, n)
            or tuple(x_t.shape) != (b, g, 1, p) or h % g):
        _decode_fail(f"C_t {tuple(C_t.shape)} / B_t {tuple(B_t.shape)} / x_t {tuple(x_t.shape)} / a_t {tuple(a_t.shape)} "
                     f"do not match the state (Bt={b}, H={h}, P={p}, N={n})")
    _check_convs(state, conv_c, conv_b, conv_x)
    ok = (torch.ones(b, device=C_t.device) if key_valid is None else key_valid.to(torch.float32))
    c, bb, xx = (t[:, :, 0].float() * ok[:, None, None] for t in (C_t, B_t, x_t))
    if conv_c is not None:
        c = _conv_step(state.conv_c, conv_c, c)
    if conv_b is not None:
        bb = _conv_step(state.conv_b, conv_b, bb)
    if conv_x is not None:
        xx = _conv_step(state.conv_x, conv_x, xx)
    bb = bb * ok[:, None, None]
    a = a_t[:, :, 0].float() * ok[:, None]
    hg = h // g
    ssm = state.ssm.view(b, g, hg, p, n)
    ssm.mul_(torch.exp(a).view(b, g, hg, 1, 1)).add_(xx[:, :, None, :, None] * bb[:, :, None, None, :])
    y = torch.einsum("bghpn,bghn->bghp", ssm, c.view(b, g, hg, n)).reshape(b, h, p)
    if D is not None:
        y = y + D.float()[None, :, None] * heads(xx, h)
    state.pos += 1
    return (y * ok[:, None, None])[:, :, None].to(x_t.dtype)


__all__ = ["OP", "SSDState", "chunked_ssd", "reference_ssd", "segsum", "ssd", "ssd_matrix", "ssd_prefill", "ssd_step"]
