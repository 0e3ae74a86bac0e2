"""The compressed-op dialect: custom ops declared once with ``torch.library``.

Each op has a schema, a fake (meta) kernel that checks shapes and dtypes, and a plain-PyTorch
reference implementation registered for every device (the oracle for all backends). Backends
register faster implementations of the same op for their device with
``torch.library.register_kernel`` (see :func:`register_backend_kernel`).

Ops
---
``lowc::linear_wq(x, qweight, scales, zeros?, bias?, bits, group_size, in_features) -> y``
    Weight-only quantized linear: ``y = x @ W.T + bias`` with ``W`` dequantized from the reference
    packed layout (:mod:`lowc.ir.dialect.packing`): ``qweight`` uint8 ``[N, K_pad*bits/8]``,
    ``scales`` ``[N, K_pad/group_size]`` (float, the model dtype), ``zeros`` uint8 of the same shape
    or ``None`` (symmetric, zero point ``2^(bits-1)``), ``bias`` ``[N]`` or ``None``.
    ``x`` is ``[..., in_features]`` with ``in_features <= K_pad``; the padded columns are zero.

``lowc::linear_wqaq(x, qweight, scales, zeros?, bias?, bits, group_size, in_features, act_bits, act_scale?) -> y``
    As ``linear_wq`` with the input quantized first: symmetric, per token (last dim) and dynamic when
    ``act_scale`` is ``None``, else with that static per-tensor scale (a 1-element tensor). The
    reference simulates integer arithmetic in floating point (quantize-dequantize), which is exact for
    the integer products up to fp32 accumulation order.

Importing this module defines the ops; it is imported by name through the dialect's registry
(:data:`lowc.ir.dialect.OPS`, :func:`lowc.ir.dialect.define`), never for its side effect elsewhere.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from lowc.ir.dialect import define, quant

NAMESPACE = "lowc"


def _check_wq(x, qweight, scales, zeros, bias, bits, group_size, in_features, op: str) -> int:
    if not 1 <= bits <= 8:
        raise ValueError(f"{op}: bits must be in 1..8, got {bits}")
    if qweight.dtype != torch.uint8 or qweight.dim() != 2:
        raise ValueError(f"{op}: qweight must be a 2-D uint8 tensor, got {qweight.dtype} {tuple(qweight.shape)}")
    n, n_groups = scales.shape
    k_pad = n_groups * group_size
    if qweight.shape[0] != n or qweight.shape[1] * 8 != k_pad * bits:
        raise ValueError(
            f"{op}: qweight {tuple(qweight.shape)} does not match scales {tuple(scales.shape)} "
            f"with bits={bits}, group_size={group_size}"
        )
    quant.check_linear_operands(op, x, zeros, bias, n, scales.shape, k_pad, in_features)
    return n


@torch.library.custom_op("lowc::linear_wq", mutates_args=())
def linear_wq(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    bits: int,
    group_size: int,
    in_features: int,
) -> torch.Tensor:
    _check_wq(x, qweight, scales, zeros, bias, bits, group_size, in_features, "lowc::linear_wq")
    w = quant.dequantize(qweight, scales, zeros, bits, group_size, in_features, dtype=x.dtype)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


@linear_wq.register_fake
def _linear_wq_fake(x, qweight, scales, zeros, bias, bits, group_size, in_features):
    n = _check_wq(x, qweight, scales, zeros, bias, bits, group_size, in_features, "lowc::linear_wq")
    return x.new_empty((*x.shape[:-1], n))


@torch.library.custom_op("lowc::linear_wqaq", mutates_args=())
def linear_wqaq(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    bits: int,
    group_size: int,
    in_features: int,
    act_bits: int,
    act_scale: Optional[torch.Tensor],
) -> torch.Tensor:
    _check_wq(x, qweight, scales, zeros, bias, bits, group_size, in_features, "lowc::linear_wqaq")
    xq = quant.fake_quantize_per_token(x, act_bits, act_scale)
    w = quant.dequantize(qweight, scales, zeros, bits, group_size, in_features, dtype=x.dtype)
    return torch.nn.functional.linear(xq, w, None if bias is None else bias.to(x.dtype))


@linear_wqaq.register_fake
def _linear_wqaq_fake(x, qweight, scales, zeros, bias, bits, group_size, in_features, act_bits, act_scale):
    if not 2 <= act_bits <= 8:
        raise ValueError(f"lowc::linear_wqaq: act_bits must be in 2..8, got {act_bits}")
    n = _check_wq(x, qweight, scales, zeros, bias, bits, group_size, in_features, "lowc::linear_wqaq")
    return x.new_empty((*x.shape[:-1], n))


def register_backend_kernel(op_name: str, device_type: str, fn: Callable) -> None:
    """Register ``fn`` as ``lowc::<op_name>``'s implementation on ``device_type`` (e.g. "cuda").

    ``op_name`` is any op of this layer's registry (:data:`lowc.ir.dialect.OPS`), defined here first."""
    if not define(op_name):
        raise KeyError(f"unknown dialect op lowc::{op_name}")
    torch.library.register_kernel(f"{NAMESPACE}::{op_name}", device_type, fn)
