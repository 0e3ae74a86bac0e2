"""Differentiable fake quantization for the learned-transform passes (AffineQuant, FlatQuant), in
exactly the conventions of the ops the trained weights are packed for.

* :class:`WeightFakeQuant` - fake quantization of an ``[N, K]`` weight with a straight-through
  rounding estimator, as :mod:`lowc.ir.dialect.quant` packs it (groups along K, zero-padding to the
  group size, asymmetric min/max widened to include 0 with an integer zero point, symmetric
  ``scale = 2·absmax/(2^b−1)`` with the fixed zero point ``2^(b−1)``), optionally with learnable
  weight clipping (OmniQuant's LWC: the group's max and min are multiplied by ``sigmoid(γ)``,
  ``sigmoid(β)``, logits initialised to :data:`LWC_INIT` = 4.0, so ``sigmoid ≈ 0.982``), one pair of
  logits per (row, group) or per row. :meth:`WeightFakeQuant.quantize` packs the codes the forward
  pass rounds to (same scale, zero and rounding), so ``lowc::linear_wq`` computes with exactly the
  weight the block was trained with.
* :func:`fake_quant_act` - per-token symmetric activation quantization (STE), as
  ``quant.fake_quantize_per_token`` / ``lowc::linear_wqaq`` compute it; :func:`clip_tokens` is the
  learned activation clipping of ``lowc::kron_transform``.
* :class:`QLinear` - a linear whose input passes an optional (learnable) transform and activation
  fake-quant, and whose weight passes an optional transform and weight fake-quant;
  :class:`cached_weights` computes each such weight once per optimizer step.

Invariant (tested): ``WeightFakeQuant(w)`` equals the dequantization of ``WeightFakeQuant.quantize(w)``
bit for bit, and without clipping ``quantize`` is :func:`lowc.ir.dialect.quant.rtn_quantize`.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from lowc.ir.dialect import quant

#: initial clipping logit: ``sigmoid(4.0) ≈ 0.982`` (OmniQuant's LWC, FlatQuant's activation clipping)
LWC_INIT = 4.0


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest in the forward pass, identity in the backward pass."""
    return (x.round() - x).detach() + x


class WeightFakeQuant(torch.nn.Module):
    """Fake quantization of one ``[N, K]`` weight in lowc's packed-layout conventions.

    ``lwc``: ``None`` (plain min/max), ``"group"`` (one clipping pair per row and group, OmniQuant)
    or ``"channel"`` (one pair per row, FlatQuant)."""

    def __init__(self, shape: Sequence[int], bits: int, group_size: int, symmetric: bool, lwc: str | None = None,
                 init: float = LWC_INIT, device: str | torch.device = "cpu"):
        super().__init__()
        if lwc not in (None, "group", "channel"):
            raise ValueError(f"lwc={lwc!r}: choose None, 'group' or 'channel'")
        n, k = int(shape[0]), int(shape[1])
        self.n, self.k = n, k
        self.bits, self.symmetric, self.lwc = bits, symmetric, lwc
        self.gs, self.k_pad = quant.padded_in_features(k, group_size)
        self.n_groups = self.k_pad // self.gs
        self.maxq = (1 << bits) - 1
        if lwc is not None:
            cols = self.n_groups if lwc == "group" else 1
            self.up = torch.nn.Parameter(torch.full((n, cols), float(init), device=device))
            self.low = torch.nn.Parameter(torch.full((n, cols), float(init), device=device))

    def _groups(self, w: torch.Tensor) -> torch.Tensor:
        w = w.float()
        if self.k_pad != self.k:
            w = F.pad(w, (0, self.k_pad - self.k))
        return w.reshape(self.n, self.n_groups, self.gs)

    def qparams(self, wg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero ``[N, G]`` (fp32) of grouped weights ``[N, G, gs]``; differentiable in the
        scale (the zero point is rounded without a gradient, as OmniQuant does)."""
        xmax = wg.amax(dim=-1).clamp(min=0)
        xmin = wg.amin(dim=-1).clamp(max=0)
        if self.lwc is not None:
            xmax = xmax * torch.sigmoid(self.up)
            xmin = xmin * torch.sigmoid(self.low)
        if self.symmetric:
            scale = 2 * torch.maximum(-xmin, xmax) / self.maxq
            zero = torch.full_like(scale, float((self.maxq + 1) // 2))
        else:
            scale = (xmax - xmin) / self.maxq
            safe = torch.where(scale > 0, scale, torch.ones_like(scale))
            zero = torch.round(-xmin / safe).detach()
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return scale, zero

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        wg = self._groups(w)
        scale, zero = self.qparams(wg)
        scale, zero = scale[..., None], zero[..., None]
        q = torch.clamp(round_ste(wg / scale) + zero, 0, self.maxq)
        return ((q - zero) * scale).reshape(self.n, self.k_pad)[:, : self.k].to(w.dtype)

    @torch.no_grad()
    def quantize(self, w: torch.Tensor, dtype: torch.dtype | None = None) -> quant.QuantizedWeight:
        """The packed weight whose dequantization equals :meth:`forward` (codes, scale, zero)."""
        wg = self._groups(w)
        scale, zero = self.qparams(wg)
        codes = quant.quantize_codes(wg, scale[..., None], zero[..., None], self.bits).reshape(self.n, self.k_pad)
        return quant.from_codes(codes, scale, zero, self.bits, self.gs, self.k, self.symmetric, dtype or w.dtype)

    @torch.no_grad()
    def clip_weight(self, w: torch.Tensor) -> torch.Tensor:
        """``w`` clamped, group by group, to the learned clipping range (what a quantizer that sets
        its range from min/max, such as GPTQ's, must see to honour the learned clipping)."""
        if self.lwc is None:
            return w
        wg = self._groups(w)
        hi = wg.amax(dim=-1).clamp(min=0) * torch.sigmoid(self.up)
        lo = wg.amin(dim=-1).clamp(max=0) * torch.sigmoid(self.low)
        out = torch.minimum(torch.maximum(wg, lo[..., None]), hi[..., None])
        return out.reshape(self.n, self.k_pad)[:, : self.k].to(w.dtype)

    def clip_parameters(self) -> list[torch.nn.Parameter]:
        return [self.up, self.low] if self.lwc is not None else []


def clip_tokens(x: torch.Tensor, ratio: torch.Tensor | float | None) -> torch.Tensor:
    """Clamp each token (last dim) to ``±ratio·max|x_token|`` (``lowc::kron_transform``'s ``clip``)."""
    if ratio is None:
        return x
    bound = x.abs().amax(dim=-1, keepdim=True) * ratio
    return torch.minimum(torch.maximum(x, -bound), bound)


def fake_quant_act(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-token (last dim) symmetric dynamic quantization with STE rounding, as
    :func:`lowc.ir.dialect.quant.fake_quantize_per_token` computes it (fp32)."""
    qmax = (1 << (bits - 1)) - 1
    xf = x.float()
    s = xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / qmax
    return (torch.clamp(round_ste(xf / s), -qmax - 1, qmax) * s).to(x.dtype)


class QLinear(torch.nn.Module):
    """``y = fq_a(in_fn(x)) · fq_w(weight_fn(W))ᵀ + bias_fn(b)`` computed in fp32 (cast back to x's
    dtype). ``W``/``b`` are the block's frozen tensors; the callables read shared transform objects
    whose parameters are the ones trained."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, wq: WeightFakeQuant | None, act_bits: int = 16,
                 in_fn: Callable | None = None, weight_fn: Callable | None = None, bias_fn: Callable | None = None):
        super().__init__()
        self.weight = weight.detach()
        self.bias = None if bias is None else bias.detach()
        self.wq = wq
        self.act_bits = act_bits
        self.in_fn, self.weight_fn, self.bias_fn = in_fn, weight_fn, bias_fn
        self.caching = False  # cached_weights turns it on inside a step
        self._cache = None
        self.tap: Callable | None = None  # tap(x): sees the input the quantized weight multiplies

    def effective_weight(self) -> torch.Tensor:
        w = self.weight.float()
        return self.weight_fn(w) if self.weight_fn is not None else w

    def effective_bias(self) -> torch.Tensor | None:
        if self.bias is None:
            return None
        b = self.bias.float()
        return self.bias_fn(b) if self.bias_fn is not None else b

    def begin_step(self) -> None:
        """Forget the cached weight: the transforms changed (:class:`cached_weights` calls it around
        each optimizer step, so the samples of one step share one weight computation)."""
        self._cache = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        if self.in_fn is not None:
            x = self.in_fn(x)
        if self.act_bits < 16:
            x = fake_quant_act(x, self.act_bits)
        if self.tap is not None:
            self.tap(x)
        cache = getattr(self, "_cache", None)
        if cache is None:
            w = self.effective_weight()
            if self.wq is not None:
                w = self.wq(w)
            cache = (w, self.effective_bias())
            if self.caching:
                self._cache = cache
        return F.linear(x, cache[0], cache[1]).to(dtype)


class cached_weights:
    """Within the block, every :class:`QLinear` computes its (transformed, fake-quantized) weight
    once and reuses it for every sample (one optimizer step, or an evaluation pass)."""

    def __init__(self, gm: torch.nn.Module):
        self.qlinears = [m for m in gm.modules() if isinstance(m, QLinear)]

    def __enter__(self):
        for m in self.qlinears:
            m.begin_step()
            m.caching = True
        return self

    def __exit__(self, *exc):
        for m in self.qlinears:
            m.caching = False
            m.begin_step()
        return False
