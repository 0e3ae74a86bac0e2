"""``rtn``: round-to-nearest weight quantization of linears (the baseline of every paper).

Rewrites each selected ``aten.linear`` into ``lowc::linear_wq`` with min/max (asymmetric) or absmax
(symmetric) per group. Input widths that are not a multiple of the group size are zero-padded to the
next multiple (recorded per layer as ``padded_in_features``). Idempotent: quantized layers are no
longer ``aten.linear`` nodes, so a second run finds nothing to do.
"""

from __future__ import annotations

from dataclasses import dataclass

from lowc.ir.dialect import quant
from lowc.passes.base import PassContext, PassResult
from lowc.passes.quant.common import MixedBitsPass, quantize_linears


@dataclass(frozen=True)
class RTN(MixedBitsPass):
    name = "rtn"
    summary = "round-to-nearest weight quantization (per group min/max or absmax)"

    def run(self, program, ctx: PassContext) -> PassResult:
        def q(w, node, s):
            return quant.rtn_quantize(w, s.w_bits, s.group_size, s.symmetric)

        n, stats = quantize_linears(program, ctx, self, q, "rtn")
        return PassResult(changed=n > 0, stats=stats)
