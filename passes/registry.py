"""The passes layer's pass registry: name -> "module:Class", imported only when the pass is asked for.

Registering a pass of this layer is adding a line here; nothing registers itself on import.
Backends add their own lowering passes in their packages' ``PASSES``; the registry of every pass,
which the API, the CLI and recipes use, is :mod:`lowc.backends.registry` (this layer cannot name
backend modules).
"""

from __future__ import annotations

import difflib
import importlib

from lowc.errors import PassOptionError

PASSES: dict[str, str] = {
    "rtn": "lowc.passes.quant.rtn:RTN",
    "gptq": "lowc.passes.quant.gptq:GPTQ",
    "gqsa": "lowc.passes.quant.gqsa:GQSA",
    "smoothquant": "lowc.passes.quant.smoothquant:SmoothQuant",
    "affinequant": "lowc.passes.quant.affinequant:AffineQuant",
    "flatquant": "lowc.passes.quant.flatquant:FlatQuant",
    "prune": "lowc.passes.quant.prune:Prune",
    "quantize-activations": "lowc.passes.quant.activations:QuantizeActivations",
    "quantize-kv": "lowc.passes.quant.kv:QuantizeKV",
    "remove-dead": "lowc.passes.cleanup:RemoveDead",
    "linearize": "lowc.passes.linearize.linearize:Linearize",
    "distill_ssm": "lowc.passes.distill.distill_ssm:DistillSSM",
}


def get_pass_class(name: str, table: dict[str, str] | None = None):
    """The pass class registered as ``name`` in ``table`` (default: this layer's :data:`PASSES`)."""
    table = PASSES if table is None else table
    try:
        spec = table[name]
    except KeyError:
        close = difflib.get_close_matches(name, table, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise PassOptionError(f"unknown pass '{name}'{hint}; known passes: {', '.join(sorted(table))}") from None
    mod_name, cls_name = spec.split(":")
    return getattr(importlib.import_module(mod_name), cls_name)


def all_passes(table: dict[str, str] | None = None) -> dict[str, type]:
    table = PASSES if table is None else table
    return {name: get_pass_class(name, table) for name in sorted(table)}
