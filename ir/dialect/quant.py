"""Quantization arithmetic shared by the dialect ops and the method passes (RTN, GPTQ, ...).

A quantized weight row is split into groups of ``group_size`` input features; each group has a
``scale`` and an integer ``zero`` and stores codes ``q = clamp(round(w / scale) + zero, 0, 2^b - 1)``.
The real weight is ``(q - zero) * scale``.

* asymmetric: min/max of the group (widened to include 0, as GPTQ does), ``zero`` in ``[0, 2^b-1]``;
* symmetric: absmax of the group, ``scale = 2*absmax / (2^b - 1)``, ``zero = 2^(b-1)`` fixed (the op
  then receives ``zeros=None``). This is GPTQ's convention.

Input widths that are not a multiple of the group size are padded with zero weights up to the next
multiple (and to a multiple of 8 for packing); the op slices the padding off. Zeros never widen a
group's range because the range always includes 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lowc.ir.dialect import packing


@dataclass(frozen=True)
class QuantizedWeight:
    """A packed weight ready for ``lowc::linear_wq`` (tensors on the source weight's device)."""

    qweight: torch.Tensor  # uint8 [N, K_pad*bits/8]
    scales: torch.Tensor  # float [N, G]
    zeros: torch.Tensor | None  # uint8 [N, G]; None for symmetric
    bits: int
    group_size: int  # effective group size (K_pad for per-channel)
    in_features: int  # K before padding

    @property
    def k_pad(self) -> int:
        return self.scales.shape[1] * self.group_size


def padded_in_features(in_features: int, group_size: int) -> tuple[int, int]:
    """(effective group size, padded K) for a requested group size (-1 = per channel)."""
    if group_size == -1:
        gs = int(math.ceil(in_features / 8) * 8)
        return gs, gs
    if group_size % 8:
        raise ValueError(f"group_size must be a multiple of 8 (or -1), got {group_size}")
    return group_size, int(math.ceil(in_features / group_size) * group_size)


def compute_qparams(w: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero for groups along the last dim of ``w`` ([..., gs] -> [...], [...]), fp32."""
    maxq = (1 << bits) - 1
    w = w.float()
    xmin = w.amin(dim=-1).clamp(max=0)
    xmax = w.amax(dim=-1).clamp(min=0)
    if symmetric:
        amax = torch.maximum(xmin.abs(), xmax)
        scale = 2 * amax / maxq
        zero = torch.full_like(scale, float((maxq + 1) // 2))
    else:
        scale = (xmax - xmin) / maxq
        zero = torch.round(-xmin / torch.where(scale > 0, scale, torch.ones_like(scale)))
    # an all-zero group: any scale works; 1 keeps dequantization exact (q == zero everywhere)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes for ``w`` given broadcastable fp32 ``scale``/``zero``."""
    maxq = (1 << bits) - 1
    return torch.clamp(torch.round(w.float() / scale) + zero, 0, maxq)


def from_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int,
               in_features: int, symmetric: bool, dtype: torch.dtype) -> QuantizedWeight:
    """Pack codes ``[N, K_pad]`` with fp32 group ``scale``/``zero`` ``[N, G]`` into a QuantizedWeight
    (scales in ``dtype``; zeros dropped for symmetric schemes, whose zero point is implicit)."""
    return QuantizedWeight(
        qweight=packing.pack(codes.to(torch.int32), bits),
        scales=scale.to(dtype),
        zeros=None if symmetric else zero.to(torch.uint8),
        bits=bits,
        group_size=group_size,
        in_features=in_features,
    )


def rtn_quantize(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> QuantizedWeight:
    """Round-to-nearest quantization of a [N, K] weight into the reference packed layout."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    n, k = weight.shape
    gs, k_pad = padded_in_features(k, group_size)
    w = torch.nn.functional.pad(weight.detach().float(), (0, k_pad - k))
    groups = w.reshape(n, k_pad // gs, gs)
    scale, zero = compute_qparams(groups, bits, symmetric)
    q = quantize_codes(groups, scale[..., None], zero[..., None], bits).reshape(n, k_pad)
    return from_codes(q, scale, zero, bits, gs, k, symmetric, weight.dtype)


def dequantize(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Real weight [N, in_features] from the packed layout (the reference semantics of linear_wq)."""
    n, n_groups = scales.shape
    q = packing.unpack(qweight, bits).reshape(n, n_groups, group_size).float()
    z = zeros.float() if zeros is not None else torch.full_like(scales, float(1 << (bits - 1)), dtype=torch.float32)
    w = (q - z[..., None]) * scales.float()[..., None]
    return w.reshape(n, n_groups * group_size)[:, :in_features].to(dtype or scales.dtype)


def check_linear_operands(op: str, x: torch.Tensor, zeros: torch.Tensor | None, bias: torch.Tensor | None, n: int,
                          scales_shape: tuple, k_pad: int, in_features: int) -> None:
    """The operand checks every quantized linear op shares (``lowc::linear_wq``/``linear_wqaq`` and the
    backends' repacked forms): ``zeros`` has the shape of the scales, ``bias`` is ``[N]``, and ``x`` is
    ``[..., in_features]`` with ``in_features <= K_pad``. Raises ValueError naming ``op``."""
    if zeros is not None and tuple(zeros.shape) != tuple(scales_shape):
        raise ValueError(f"{op}: zeros {tuple(zeros.shape)} must have the shape of scales {tuple(scales_shape)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"{op}: bias {tuple(bias.shape)} must be [{n}]")
    if in_features > k_pad or x.shape[-1] != in_features:
        raise ValueError(f"{op}: input width {x.shape[-1]} does not match in_features={in_features} (K_pad={k_pad})")


def fake_quantize_per_token(x: torch.Tensor, bits: int, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric per-token (last dim) activation quantization, returned dequantized.

    ``scale``: a static per-tensor scale from calibration; ``None`` = dynamic per token.
    Codes lie in ``[-2^(b-1), 2^(b-1) - 1]`` with ``scale = absmax / (2^(b-1) - 1)``.
    """
    qmax = (1 << (bits - 1)) - 1
    xf = x.float()
    if scale is None:
        s = xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / qmax
    else:
        s = scale.float().clamp(min=1e-8)
    return (torch.clamp(torch.round(xf / s), -qmax - 1, qmax) * s).to(x.dtype)
