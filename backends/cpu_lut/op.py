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

``lowc::linear_lut_gs(x, weight, scales, zeros?, bias?, bits, group_size, in_features, out_features, mask, sparse_group, n_keep) -> y``
    the group-sparse linear (what ``lut-lower`` rewrites ``lowc::linear_gsq`` into), weight in the
    group-sparse LUT layout (:class:`lowc.backends.cpu_lut.layout.LutSparseWeight`: nibble block
    pairs, a kept-group bitmask per row). Its reference implementation converts back and runs
    exactly the arithmetic of ``lowc::linear_gsq``; the generated C (registered with the dense one)
    reads only the kept groups and differs by the int8-activation bound of
    :func:`lowc.backends.cpu_lut.runtime.sparse_error_bound`.

Large M (prefill): from ``runtime.gemm_min_m(bits)`` input rows on (``runtime.GEMM_MIN_M``, the crossover
measured at one thread on 2048x2048, 5632x2048, 2048x5632 and 32000x2048 in
``benchmarks/results/cpu_lut_prefill.md``: bf16 tiles 64 rows for W1/W2, 32 for W3/W4 (W2 crossed at 64
on every shape, W4 at 4-32); float32 tiles 512 and 128; at M = 128 the bf16 GEMM path was 1.9-3.9x
faster than the LUT kernel and 2.5-3.7x faster than torch fp32),
both CPU implementations switch to a GEMM path (:func:`lowc.backends.cpu_lut.runtime.run_gemm`,
``run_sparse_gemm``): the weight is dequantized from the LUT layout in C, a tile of rows at a time
(``runtime.GEMM_TILE_BYTES`` = 4 MiB, one buffer reused within the call: no dequantized copy is
kept), exactly the reference's ``(q - z) * s``, and multiplied with ``torch.mm``: in bf16 where oneDNN
has a native bf16 GEMM (AVX-512 BF16 / AMX), else float32 (``$LOWC_CPU_LUT_GEMM_DTYPE``). The LUT
kernel's cost grows with M (tables and lookups per input row) while the GEMM's fixed cost, the
dequantization, is paid once per call. Error: float32 tiles differ from the reference by summation
order only; bf16 tiles round x, W and y once each, bounded by
:func:`lowc.backends.cpu_lut.runtime.gemm_error_bound` (``~3 * 2^-8 * |x| @ |W|^T``; about 0.3% relative
error on a random 1024x2048 layer at W2 and W4, against 0.9-1% for the int8-table kernel).
"""

from __future__ import annotations

from typing import Optional

import torch

from lowc.backends.cpu_lut import layout, runtime
from lowc.ir.dialect import quant, sparse


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


def _check_gs(x, weight, mask, scales, zeros, bias, bits, group_size, in_features, out_features, sparse_group, n_keep):
    op = "lowc::linear_lut_gs"
    if not 1 <= bits <= 4:
        raise ValueError(f"{op}: bits must be in 1..4, got {bits}")
    if sparse_group <= 0 or sparse_group % 16 or group_size <= 0 or group_size % 16:
        raise ValueError(f"{op}: sparse_group and group_size must be positive multiples of 16, got "
                         f"{sparse_group} and {group_size}")
    n_groups = sparse.padded_sparse_width(in_features, sparse_group) // sparse_group
    if not 1 <= n_keep <= n_groups:
        raise ValueError(f"{op}: n_keep={n_keep} is not in 1..{n_groups}")
    kc = n_keep * sparse_group
    n, g = scales.shape
    want_w = (out_features, layout.sparse_weight_bytes(n_keep, sparse_group))
    want_m = (out_features, 8 * layout.mask_words(in_features, sparse_group))
    if n != out_features or g != -(-kc // group_size):
        raise ValueError(f"{op}: scales {tuple(scales.shape)} do not match out_features={out_features}, "
                         f"n_keep={n_keep}, sparse_group={sparse_group}, group_size={group_size}")
    for name, t, want in (("weight", weight, want_w), ("mask", mask, want_m)):
        if t.dtype != torch.uint8 or tuple(t.shape) != want:
            raise ValueError(f"{op}: {name} {t.dtype}{tuple(t.shape)} is not the group-sparse LUT layout {want}")
    quant.check_linear_operands(op, x, zeros, bias, n, (n, g), sparse.padded_sparse_width(in_features, sparse_group),
                                in_features)


def reference_linear_lut_gs(x, weight, scales, zeros, bias, bits, group_size, in_features, out_features, mask,
                            sparse_group, n_keep):
    """The oracle: the dequantized weight and ``F.linear`` of ``lowc::linear_gsq``."""
    qweight, idx = layout.to_sparse_reference(weight.cpu(), mask.cpu(), bits, sparse_group, n_keep)
    w = sparse.dequantize(qweight.to(x.device), scales, zeros, bits, group_size, in_features, idx.to(x.device),
                          sparse_group, dtype=x.dtype)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


@torch.library.custom_op("lowc::linear_lut_gs", mutates_args=())
def linear_lut_gs(
    x: torch.Tensor,
    weight: torch.Tensor,
    scales: torch.Tensor,
    zeros: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    bits: int,
    group_size: int,
    in_features: int,
    out_features: int,
    mask: torch.Tensor,
    sparse_group: int,
    n_keep: int,
) -> torch.Tensor:
    _check_gs(x, weight, mask, scales, zeros, bias, bits, group_size, in_features, out_features, sparse_group, n_keep)
    return reference_linear_lut_gs(x, weight, scales, zeros, bias, bits, group_size, in_features, out_features, mask,
                                   sparse_group, n_keep)


@linear_lut_gs.register_fake
def _linear_lut_gs_fake(x, weight, scales, zeros, bias, bits, group_size, in_features, out_features, mask,
                        sparse_group, n_keep):
    _check_gs(x, weight, mask, scales, zeros, bias, bits, group_size, in_features, out_features, sparse_group, n_keep)
    return x.new_empty((*x.shape[:-1], out_features))


#: the group-sparse op
LINEAR_LUT_GS = torch.ops.lowc.linear_lut_gs.default

_cpu_registered = False


def _cpu_kernel(x, weight, scales, zeros, bias, bits, group_size, in_features, out_features):
    _check(x, weight, scales, zeros, bias, bits, group_size, in_features, out_features)
    return runtime.run(x, weight, scales, zeros, bias, bits, group_size, in_features, out_features)


def _cpu_kernel_gs(x, weight, scales, zeros, bias, bits, group_size, in_features, out_features, mask, sparse_group,
                   n_keep):
    _check_gs(x, weight, mask, scales, zeros, bias, bits, group_size, in_features, out_features, sparse_group, n_keep)
    return runtime.run_sparse(x, weight, mask, scales, zeros, bias, bits, group_size, in_features, out_features,
                              sparse_group, n_keep)


def register_cpu_kernel() -> None:
    """Make the generated C the CPU implementation of ``lowc::linear_lut`` and ``lowc::linear_lut_gs`` (idempotent)."""
    global _cpu_registered
    if not _cpu_registered:
        torch.library.register_kernel("lowc::linear_lut", "cpu", _cpu_kernel)
        torch.library.register_kernel("lowc::linear_lut_gs", "cpu", _cpu_kernel_gs)
        _cpu_registered = True
