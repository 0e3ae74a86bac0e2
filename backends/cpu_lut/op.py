"""``lowc::linear_lut``: the cpu-lut backend's op (what ``lut-lower`` rewrites ``lowc::linear_wq`` into).

``lowc::linear_lut(x, weight, scales, zeros?, bias?, bits, group_size, in_features, out_features) -> y``
    ``y = x @ W.T + bias`` with ``W`` stored in the LUT layout (:mod:`lowc.backends.cpu_lut.layout`):
    ``weight`` uint8 ``[ceil(N/32), K_pad/8, bits, 32]``, ``scales`` float32 ``[N, G]`` and ``zeros``
    uint8 ``[N, G]`` (or ``None``: symmetric, zero ``2^(bits-1)``), both tile-blocked.

The reference implementation (every device, the oracle) converts back to the reference layout and
runs exactly the arithmetic of ``lowc::linear_wq``. The fast CPU implementation (generated C) is
registered by :func:`register_cpu_kernel`, which the cpu-lut targets' ``prepare`` calls; it differs
from the reference only by the documented int8-table error bound. Importing this module defines
the op; the ``cpu_lut`` backend imports it when its targets are listed, so a saved graph that
contains the op can be read back.
"""

from __future__ import annotations

from typing import Optional

import torch

from lowc.backends.cpu_lut import layout, runtime
from lowc.ir.dialect import quant


def _check(x, weight, scales, zeros, bias, bits, group_size, in_features, out_features) -> None:
    op = "lowc::linear_lut"
    if not 1 <= bits <= 4:
        raise ValueError(f"{op}: bits must be in 1..4, got {bits}")
    n, g = scales.shape
    k_pad = g * group_size
    if n != out_features:
        raise ValueError(f"{op}: scales {tuple(scales.shape)} do not have out_features={out_features} rows")
    if weight.dtype != torch.uint8 or tuple(weight.shape) != (-(-n // layout.TILE), k_pad // 8, bits, layout.TILE):
        raise ValueError(f"{op}: weight {weight.dtype}{tuple(weight.shape)} is not the LUT layout for N={n}, "
                         f"K_pad={k_pad}, bits={bits}")
    quant.check_linear_operands(op, x, zeros, bias, n, (n, g), k_pad, in_features)


def reference_linear_lut(x, weight, scales, zeros, bias, bits, group_size, in_features, out_features):
    """The oracle: the same dequantized weight and ``F.linear`` as ``lowc::linear_wq``."""
    qweight, s, z = layout.to_reference(weight.cpu(), scales.cpu(), None if zeros is None else zeros.cpu(),
                                        bits, group_size, out_features)
    w = quant.dequantize(qweight.to(x.device), s.to(x.device), None if z is None else z.to(x.device),
                         bits, group_size, in_features, dtype=x.dtype)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


@torch.library.custom_op("lowc::linear_lut", mutates_args=())
def linear_lut(
    x: torch.Tensor,
    weight: torch.Tensor,
    scales: torch.Tensor,
    zeros: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    bits: int,
    group_size: int,
    in_features: int,
    out_features: int,
) -> torch.Tensor:
    _check(x, weight, scales, zeros, bias, bits, group_size, in_features, out_features)
    return reference_linear_lut(x, weight, scales, zeros, bias, bits, group_size, in_features, out_features)


@linear_lut.register_fake
def _linear_lut_fake(x, weight, scales, zeros, bias, bits, group_size, in_features, out_features):
    _check(x, weight, scales, zeros, bias, bits, group_size, in_features, out_features)
    return x.new_empty((*x.shape[:-1], out_features))


#: the op, for passes and tables that build or find its nodes
LINEAR_LUT = torch.ops.lowc.linear_lut.default


_cpu_registered = False


def _cpu_kernel(x, weight, scales, zeros, bias, bits, group_size, in_features, out_features):
    _check(x, weight, scales, zeros, bias, bits, group_size, in_features, out_features)
    return runtime.run(x, weight, scales, zeros, bias, bits, group_size, in_features, out_features)


def register_cpu_kernel() -> None:
    """Make the generated C the CPU implementation of ``lowc::linear_lut`` (idempotent)."""
    global _cpu_registered
    if not _cpu_registered:
        torch.library.register_kernel("lowc::linear_lut", "cpu", _cpu_kernel)
        _cpu_registered = True
