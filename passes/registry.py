"""The one pass registry: name -> "module:Class", imported only when the pass is asked for.

Registering a pass is adding a line here; nothing registers itself on import.
"""

from __future__ import annotations

import importlib

from lowc.errors import PassOptionError

PASSES: dict[str, str] = {
    "rtn": "lowc.passes.quant.rtn:RTN",
    "gptq": "lowc.passes.quant.gptq:GPTQ",
    "smoothquant": "lowc.passes.quant.smoothquant:SmoothQuant",
    "affinequant": "lowc.passes.quant.affinequant:AffineQuant",
    "flatquant": "lowc.passes.quant.flatquant:FlatQuant",
    "quantize-activations": "lowc.passes.quant.activations:QuantizeActivations",
    "quantize-kv": "lowc.passes.quant.kv:QuantizeKV",
    "remove-dead": "lowc.passes.cleanup:RemoveDead",
    "onnx-check": "lowc.backends.onnx.check:OnnxCheck",
    "lut-lower": "lowc.backends.cpu_lut.lower:LutLower",
    "linearize": "lowc.passes.linearize.linearize:Linearize",
    "triton-lower": "lowc.backends.triton.lower:TritonLower",
}


def get_pass_class(name: str):
    try:
        spec = PASSES[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, PASSES, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise PassOptionError(f"unknown pass '{name}'{hint}; known passes: {', '.join(sorted(PASSES))}") from None
    mod_name, cls_name = spec.split(":")
    return getattr(importlib.import_module(mod_name), cls_name)


def all_passes() -> dict[str, type]:
    return {name: get_pass_class(name) for name in sorted(PASSES)}
