"""``densify-sparse``: group-sparse layers (``lowc::linear_gsq``) rewritten as dense ``lowc::linear_wq``
layers with exactly the same dequantized weight, for runtimes that cannot skip groups (ONNX).

Run by the ONNX export before ``onnx-lower`` only when asked (``lowc export --densify``,
``lowc.export(..., densify=True)``); without it a sparse layer reaching ``onnx-lower`` fails, naming
the layer. The dense layer's group size is ``gcd(group_size, sparse_group)``: the sparse group when
the quantization group is a multiple of it (the GQSA layout, and one group per row), so every dense
group lies inside one sparse group and one quantization group. A kept group's codes, scale and zero
point are copied; a dropped group gets code = zero point (and scale 0), so ``(q - z) * s`` is 0
exactly: asymmetric layers store zero points 0 and codes 0 there, symmetric layers (implicit zero
point ``2^(bits-1)``) codes ``2^(bits-1)``. The dense weight equals ``lowc::linear_gsq``'s
dequantized weight bit for bit (tested), at the cost of storing every group:
``bits + (16 + zero bits) / sparse_group`` bits per weight instead of
``(1 - s) * (bits + (16 + zero bits) / group_size + 16 / sparse_group)`` (5.25 instead of 3.125, 1.7x,
at W4, groups of 16, 50%).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from lowc.backends.lowering import replace_linear
from lowc.ir import meta as nodemeta
from lowc.ir.dialect import ensure_registered, packing, quant, sparse
from lowc.ir.dialect.args import LinearQArgs
from lowc.passes.base import Pass, PassContext, PassResult


def dense_weight(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int, group_size: int,
                 in_features: int, idx: torch.Tensor, sparse_group: int) -> quant.QuantizedWeight:
    """The ``lowc::linear_wq`` weight whose dequantized values equal the group-sparse weight's (module docstring)."""
    kc = idx.shape[1] * sparse_group
    dg = math.gcd(group_size, sparse_group)
    k_pad = -(-in_features // dg) * dg  # linear_wq's padding for groups of dg (<= the sparse padding)
    zp = 1 << (bits - 1)
    g = torch.arange(kc, device=qweight.device) // group_size  # quantization group of each compact position
    codes = packing.unpack(qweight, bits)[:, :kc]
    if zeros is None:  # dropped positions scatter as 0: shift so that 0 is the implicit zero point
        codes = codes - zp
    dense_codes = sparse.scatter_dense(codes, idx, sparse_group, k_pad)
    dense_codes = dense_codes + zp if zeros is None else dense_codes
    first = slice(0, k_pad, dg)  # one value per dense group: the group's first position
    dense_scales = sparse.scatter_dense(scales[:, g], idx, sparse_group, k_pad)[:, first].contiguous()
    dense_zeros = None if zeros is None else sparse.scatter_dense(zeros[:, g], idx, sparse_group, k_pad)[:, first].contiguous()
    return quant.QuantizedWeight(qweight=packing.pack(dense_codes.to(torch.int32), bits), scales=dense_scales,
                                 zeros=dense_zeros, bits=bits, group_size=dg, in_features=in_features)


@dataclass(frozen=True)
class DensifySparse(Pass):
    """Group-sparse layers as dense quantized layers, exactly (module docstring)."""

    name = "densify-sparse"
    summary = "rewrite group-sparse lowc::linear_gsq layers as dense lowc::linear_wq (same dequantized weight)"

    def run(self, program, ctx: PassContext) -> PassResult:
        ensure_registered()
        nodes = list(program.nodes(torch.ops.lowc.linear_gsq.default))
        for node in nodes:
            a = LinearQArgs.of(node)
            zeros = program.attr(a.zeros.target) if a.zeros is not None else None
            qw = dense_weight(program.attr(a.weight.target), program.attr(a.scales.target), zeros, a.bits,
                              a.group_size, a.in_features, program.attr(a.idx.target), a.sparse_group)
            info = nodemeta.get(node)
            new = replace_linear(program, a, torch.ops.lowc.linear_wq.default,
                                 {"dense_qweight": qw.qweight, "dense_scales": qw.scales, "dense_zeros": qw.zeros},
                                 group_size=qw.group_size)
            if info.scheme is not None:
                scheme = replace(info.scheme, group_size=qw.group_size, sparsity=0.0, sparse_group=0)
                nodemeta.set_info(new, replace(info, scheme=scheme))
        if nodes:
            program.remove_dead()
        return PassResult(changed=bool(nodes), stats={"densified": len(nodes)})
