"""``lut-head``: round-to-nearest quantization of the vocabulary projection (``lm_head``) at a width
that keeps its error small, part of the default method phase of every ``cpu-lut-*`` target.

Why: with a vocabulary of 32000 and hidden 2048 the float ``lm_head`` is 262 MB read per decoded
token, more than every quantized layer of a 4-layer model together; on one thread it was 54% of a
decode step (32.6 of 60 ms; the LUT kernels of all other layers 20.7 ms). llama.cpp keeps its output
tensor at 6 bits (Q6_K); the LUT kernels take 1..4 bits, so the width is 4 bits, and the group size is
chosen by measurement (README, "Whole model on the CPU": the trained tiny Llama, WikiText-2 test,
rest of the model float): W4 g32 / g64 / g128 raise perplexity 92.82 -> 93.19 / 93.29 / 93.56
(KL 0.0031 / 0.0040 / 0.0055; the whole body at W4 g128 costs KL 0.0054), and the GEMV 32000 x 2048
takes 3.9 / 2.7 / 2.2 ms vs 63 ms in fp32 (1 thread). Default: W4 g64 asymmetric (4.6 bits per weight
with its fp32 scales and 8-bit zeros), whatever the target's own width (``cpu-lut-w2`` too).

Selects the float linears named by ``layers`` (names, dotted suffixes or globs, as ``ignore``);
layers already quantized by the method pass before it are not ``aten.linear`` any more and are left
alone, so a second run changes nothing. To keep ``lm_head`` float, give the method passes yourself
(they replace the default phase): ``--pass rtn`` (its ``ignore`` keeps ``lm_head`` float), or add
``--pass lut-head`` after your own passes to quantize it.
"""

from __future__ import annotations

from dataclasses import dataclass

from lowc.ir.analysis import linear_layer
from lowc.passes.base import opt
from lowc.passes.quant.common import matches
from lowc.passes.quant.rtn import RTN

HEAD_BITS, HEAD_GROUP_SIZE = 4, 64


@dataclass(frozen=True)
class LutHead(RTN):
    name = "lut-head"
    summary = "RTN of the vocabulary projection at a safe width (cpu-lut default: W4 g64 asymmetric)"

    bits: int | None = opt(HEAD_BITS, "weight bits of the selected layers, 1..4 on cpu-lut")
    group_size: int | None = opt(HEAD_GROUP_SIZE, "input channels per scale (a multiple of 8)")
    symmetric: bool | None = opt(False, "symmetric (absmax) or asymmetric min/max")
    ignore: tuple[str, ...] = opt((), "layers among `layers` left in float")
    layers: tuple[str, ...] = opt(("lm_head",), "the layers to quantize: names, dotted suffixes or globs")

    def select(self, program) -> list:
        return [n for n in super().select(program) if matches(linear_layer(n), self.layers)]
