"""The tensor math of input transforms shared by SmoothQuant, AffineQuant and FlatQuant: per-channel
input statistics, smoothing scales, Kronecker factor sizes and orthogonal matrices.

Pure functions of tensors (no graph, no program): where a transform goes in the program is
:mod:`lowc.passes.quant.fold`'s job. Scales are computed in fp32 on the CPU, clamped away from 0 as
the papers do, so a scale and its inverse are both finite.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from lowc.errors import CalibrationError

#: smallest activation / weight maximum and smallest scale (SmoothQuant's reference code)
SCALE_FLOOR = 1e-5


def update_absmax(stats: dict[str, torch.Tensor], name: str, x: torch.Tensor, where: str) -> None:
    """Fold the per-channel ``max |x|`` (channels: the last dim) of ``x`` into ``stats[name]`` (fp32,
    CPU). Raises CalibrationError naming ``where`` and ``name`` on non-finite activations."""
    x = x.detach().reshape(-1, x.shape[-1]).abs().float()
    if not torch.isfinite(x).all():
        raise CalibrationError(f"{where}: non-finite activations reach {name} in calibration")
    m = x.amax(dim=0).cpu()
    stats[name] = torch.maximum(stats[name], m) if name in stats else m


def smoothing_scale(act_max: torch.Tensor, weight_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's ``s_j = max|X_j|^α / max|W_j|^(1−α)`` from the per-channel maxima (fp32)."""
    a = act_max.float().clamp(min=SCALE_FLOOR)
    w = weight_max.float().clamp(min=SCALE_FLOOR)
    return (a.pow(alpha) / w.pow(1 - alpha)).clamp(min=SCALE_FLOOR)


def weight_absmax(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per input channel, ``max |W|`` over the rows of every weight (``[out, in]``) reading the input
    (fp32, CPU)."""
    return torch.stack([w.detach().abs().float().amax(dim=0).cpu() for w in weights]).amax(dim=0)


def smooth_scales(act_absmax: torch.Tensor, weights: Sequence[torch.Tensor], alpha: float) -> torch.Tensor:
    """:func:`smoothing_scale` of the linears sharing an input: ``weights`` are their ``[out, in]``
    weights, ``act_absmax`` the input's per-channel maximum."""
    return smoothing_scale(act_absmax, weight_absmax(weights), alpha)


def balanced_factors(n: int) -> tuple[int, int]:
    """``(n1, n2)`` with ``n1·n2 = n``, ``n1 <= n2`` and ``n1`` the largest divisor ``<= sqrt(n)``
    (FlatQuant's most balanced Kronecker factorisation: 4096 -> 64x64, 11008 -> 86x128)."""
    n1 = int(math.isqrt(n))
    while n % n1:
        n1 -= 1
    return n1, n // n1


def cayley(raw: torch.Tensor) -> torch.Tensor:
    """An orthogonal matrix from an unconstrained square one: ``A = tril(raw, -1) − tril(raw, -1)ᵀ``
    (skew-symmetric), ``Q = (I − A/2)⁻¹(I + A/2)`` (the Cayley map ``torch.nn.utils.parametrizations
    .orthogonal`` uses)."""
    low = torch.tril(raw, -1)
    a = low - low.transpose(0, 1)
    eye = torch.eye(raw.shape[0], dtype=raw.dtype, device=raw.device)
    return torch.linalg.solve(eye - a / 2, eye + a / 2)


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-random orthogonal matrix (QR of a Gaussian with the signs of R's diagonal fixed)."""
    h = torch.randn(n, n, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(h)
    return (q * torch.sign(torch.diagonal(r)).unsqueeze(0)).float()
