"""Chunked, O(L)-memory plain-PyTorch form of ``lowc::ssd`` (the op's registered implementation), the
operand preparation every form shares (short causal convolutions, ``key_mask``), and the decode state.

Semantics are the op's (see :mod:`lowc.ir.dialect.ssd`); the quadratic
:func:`~lowc.ir.dialect.ssd.reference_ssd` stays the oracle. The algorithm is the chunked SSD of
Mamba-2 (its ``ssd_minimal_discrete`` listing; flash-linear-attention's chunked simple-GLA), with the
sequence cut into chunks of ``Q`` positions (``chunk``, default 64):

* *intra-chunk*: ``Y_diag = ((C·Bᵀ) ⊙ exp(segsum(a))) x`` inside each chunk (quadratic in ``Q`` only),
  ``segsum`` as differences of the chunk's cumulative sum ``A_i - A_j``, set to ``-inf`` above the
  diagonal *before* ``exp``: since ``a <= 0`` every kept factor is ``exp(<= 0) <= 1`` and the masked
  ones never overflow, even in autograd;
* *chunk states*: the contribution of chunk ``c`` to the state at its end,
  ``Σ_j exp(A_end - A_j) x_j ⊗ B_j`` ``[P, N]`` per query head;
* *inter-chunk*: the state entering chunk ``c``, ``S_c = exp(A_end(c-1)) S_{c-1} + states(c-1)``, a
  sequential scan over chunks (each step multiplies by one chunk's total decay, so no cumulative sum
  spans more than one chunk and nothing loses precision at long lengths), read out as
  ``Y_off_i = exp(A_i) C_i · S_c``.

Memory: per chunk ``[H, Q, Q]`` decays and scores plus one ``[H, P, N]`` state, i.e. ``H·Q`` floats
per token for the scores and ``H·P·N/Q`` for the states (``L`` times a constant: nothing is
``[L, L]``). Autograd works through every step (out-of-place ops only); ``D`` skip and the
convolutions are differentiable too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: default chunk length along the sequence (as Mamba-2's kernels and the linear-attention kernel)
CHUNK = 64


@dataclass
class SSDState:
    """Constant-size decode state of one SSD mixer (per sequence of the batch).

    ``ssm [B, H, P, N]`` fp32 is the recurrent state ``h_t`` of every query head; ``conv_c [B, H, N, Kc-1]``,
    ``conv_b [B, G, N, Kb-1]``, ``conv_x [B, G, P, Kx-1]`` (fp32, ``None`` when that convolution is absent)
    hold the last ``K-1`` raw inputs of each short convolution (zeros before the first token and at
    masked positions); ``pos`` counts the positions seen (padding included). Nothing grows with ``pos``.
    """

    ssm: torch.Tensor
    conv_c: torch.Tensor | None = None
    conv_b: torch.Tensor | None = None
    conv_x: torch.Tensor | None = None
    pos: int = 0

    @classmethod
    def empty(cls, batch: int, heads: int, groups: int, state_dim: int, head_dim: int,
              conv_widths: tuple[int, int, int] = (0, 0, 0), device=None) -> SSDState:
        """A zero state; ``conv_widths`` are the kernel sizes ``K`` of (conv_c, conv_b, conv_x), 0 = none."""
        f32 = dict(dtype=torch.float32, device=device)
        kc, kb, kx = conv_widths

        def buf(k, c1, c2):
            return torch.zeros(batch, c1, c2, k - 1, **f32) if k > 0 else None

        return cls(ssm=torch.zeros(batch, heads, head_dim, state_dim, **f32), conv_c=buf(kc, heads, state_dim),
                   conv_b=buf(kb, groups, state_dim), conv_x=buf(kx, groups, head_dim))

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(t for t in (self.ssm, self.conv_c, self.conv_b, self.conv_x) if t is not None)

    def nbytes(self) -> int:
        """Bytes held by the state (constant over decoding)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())


def causal_conv(u: torch.Tensor, w: torch.Tensor, history: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Short causal depthwise convolution along L, no activation: ``u [B, C1, L, C2]`` (fp32), ``w [C1, C2, K]``
    (tap ``K-1`` multiplies the current token), ``history [B, C1, C2, K-1]`` the raw inputs before ``u``
    (``None``: zeros). Returns ``(out [B, C1, L, C2] fp32, the last K-1 inputs [B, C1, C2, K-1])``."""
    b, c1, length, c2 = u.shape
    k = w.shape[-1]
    # K shifted multiply-adds in u's own layout: several times faster than a depthwise F.conv1d on CPU
    # for these short kernels (no permute/reshape round trip), the same sums up to fp32 rounding order
    hist = u.new_zeros(b, c1, k - 1, c2) if history is None else history.to(u.dtype).permute(0, 1, 3, 2)
    full = torch.cat([hist, u], dim=2)
    wt = w.to(u.dtype)
    out = full[:, :, k - 1:, :] * wt[None, :, None, :, k - 1]
    for j in range(k - 1):
        out = out + full[:, :, j:j + length, :] * wt[None, :, None, :, j]
    return out, full[:, :, length:, :].permute(0, 1, 3, 2).contiguous()


def acc_dtype(t: torch.Tensor) -> torch.dtype:
    """The arithmetic dtype: fp32, or fp64 for fp64 operands (so ``gradcheck`` can check the op)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def prepare(C, B, x, a, conv_c=None, conv_b=None, conv_x=None, key_mask=None, state: SSDState | None = None):
    """The operands as the SSD recurrence sees them, fp32: inputs zeroed at masked positions, then the
    convolutions (continuing ``state``'s histories), then ``B`` zeroed and ``a`` set to 0 at masked
    positions. Returns ``(C, B, x, a, (hist_c, hist_b, hist_x))`` (the new histories, ``None`` per absent conv)."""
    acc = acc_dtype(x)
    cf, bf, xf, af = C.to(acc), B.to(acc), x.to(acc), a.to(acc)
    m = None
    if key_mask is not None:
        m = key_mask[:, None, :, None].to(acc)
        cf, bf, xf = cf * m, bf * m, xf * m
        af = af * m[..., 0]
    hists = []
    for name, w in (("conv_c", conv_c), ("conv_b", conv_b), ("conv_x", conv_x)):
        if w is None:
            hists.append(None)
            continue
        u = {"conv_c": cf, "conv_b": bf, "conv_x": xf}[name]
        out, h = causal_conv(u, w, None if state is None else getattr(state, name))
        hists.append(h)
        if name == "conv_c":
            cf = out
        elif name == "conv_b":
            bf = out
        else:
            xf = out
    if m is not None:
        bf = bf * m
    return cf, bf, xf, af, tuple(hists)


def heads(t: torch.Tensor, h: int) -> torch.Tensor:
    """Repeat group tensors ``[B, G, ...]`` to the ``H`` query heads (query head ``h`` reads group ``h // (H/G)``)."""
    return t if t.shape[1] == h else t.repeat_interleave(h // t.shape[1], dim=1)


def finish(y: torch.Tensor, xf: torch.Tensor, D, key_mask) -> torch.Tensor:
    """Add the ``D`` skip (on the convolved ``x``) and zero the masked positions; fp32 ``[B, H, L, P]``."""
    h = y.shape[1]
    if D is not None:
        y = y + D.to(y.dtype).view(1, h, 1, 1) * heads(xf, h)
    if key_mask is not None:
        y = y * key_mask[:, None, :, None].to(y.dtype)
    return y


def _chunk(t: torch.Tensor, n: int, q: int) -> torch.Tensor:
    """Zero-pad dim 2 (L) to ``n*q`` and split it into ``[n, q]``."""
    pad = n * q - t.shape[2]
    if pad:
        t = torch.cat([t, t.new_zeros(t.shape[:2] + (pad,) + t.shape[3:])], dim=2)
    return t.view(t.shape[:2] + (n, q) + t.shape[3:])


def chunked_ssd(C, B, x, a, D=None, conv_c=None, conv_b=None, conv_x=None, key_mask=None, chunk: int = CHUNK, *,
                initial_state=None, return_state: bool = False):
    """``lowc::ssd`` in chunks (module docstring); operands as the op's, already checked.

    ``initial_state``: an :class:`SSDState` (state and convolution histories of the tokens before these)
    or a tensor ``[B, H, P, N]`` (the SSM state only; convolution histories zero). With ``return_state``
    returns ``(y, SSDState after the last token)``."""
    b, h, length, n = C.shape
    g, p = B.shape[1], x.shape[-1]
    hg = h // g
    if isinstance(initial_state, torch.Tensor):
        initial_state = SSDState(ssm=initial_state)
    cf, bf, xf, af, hists = prepare(C, B, x, a, conv_c, conv_b, conv_x, key_mask, initial_state)
    s = (initial_state.ssm.to(xf.dtype) if initial_state is not None
         else xf.new_zeros(b, h, p, n)).reshape(b, g, hg, p, n)
    if length == 0:
        y = xf.new_zeros(b, h, 0, p)
    else:
        q = max(1, min(chunk, length))
        nc = -(-length // q)
        cc = _chunk(cf, nc, q).view(b, g, hg, nc, q, n)  # query heads grouped by the group they read
        bc, xc = _chunk(bf, nc, q), _chunk(xf, nc, q)  # [B, G, nc, Q, N|P]
        acs = _chunk(af, nc, q).view(b, g, hg, nc, q).cumsum(dim=-1)  # in-chunk cumulative log-decay

        tri = torch.ones(q, q, dtype=torch.bool, device=C.device).tril()
        decay = torch.exp((acs[..., :, None] - acs[..., None, :]).masked_fill(~tri, float("-inf")))
        scores = torch.einsum("bghcin,bgcjn->bghcij", cc, bc) * decay
        y = torch.einsum("bghcij,bgcjp->bghcip", scores, xc)
        del decay, scores

        to_end = torch.exp(acs[..., -1:] - acs)  # [B, G, hg, nc, Q]: decay from position j to the chunk's end
        states = torch.einsum("bghcjp,bgcjn->bghcpn", to_end[..., None] * xc[:, :, None], bc)
        total = torch.exp(acs[..., -1])  # [B, G, hg, nc]
        entering = []
        for c in range(nc):  # the inter-chunk scan: O(nc) small ops
            entering.append(s)
            s = total[..., c, None, None] * s + states[:, :, :, c]
        s_in = torch.stack(entering, dim=3)  # [B, G, hg, nc, P, N]
        y = y + torch.einsum("bghcin,bghcpn->bghcip", cc * torch.exp(acs)[..., None], s_in)
        y = y.reshape(b, h, nc * q, p)[:, :, :length]
    y = finish(y, xf, D, key_mask).to(x.dtype)
    if not return_state:
        return y
    pos = (initial_state.pos if initial_state is not None else 0) + length
    return y, SSDState(ssm=s.reshape(b, h, p, n), conv_c=hists[0], conv_b=hists[1], conv_x=hists[2], pos=pos)


__all__ = ["CHUNK", "SSDState", "causal_conv", "chunked_ssd", "prepare"]
