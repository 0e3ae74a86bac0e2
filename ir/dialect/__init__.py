"""lowc's compressed-op dialect (custom torch.library ops) and the packing/quantization math behind it.

:data:`OPS` is the registry of this layer's ops: op name -> the module that declares it (schema,
fake kernel, plain-PyTorch reference implementation). An op is defined when that module is imported,
and modules are imported on demand by name: :func:`define` for one op, :func:`ensure_registered`
for all of them. Backends keep their own tables of the ops they add (their packages' ``OPS``);
:func:`lowc.backends.registry.define_op` looks a name up in all of them, which is what the artifact
loader uses, so a saved graph resolves its ops whatever was imported before.
"""

import importlib

#: op name (``lowc::<name>``) -> module under ``lowc.ir.dialect`` that declares it (add a line per new op)
OPS: dict[str, str] = {
    "linear_wq": "lowc.ir.dialect.ops",
    "linear_wqaq": "lowc.ir.dialect.ops",
    "linear_gsq": "lowc.ir.dialect.sparse",
    "linear_attention": "lowc.ir.dialect.linear_attention",
    "ssd": "lowc.ir.dialect.ssd",
    "fake_quant_kv": "lowc.ir.dialect.kv",
    "kron_transform": "lowc.ir.dialect.kron",
}


def define(name: str) -> bool:
    """Define the dialect op ``lowc::<name>`` (import its module); False if this layer has no such op."""
    module = OPS.get(name)
    if module is None:
        return False
    importlib.import_module(module)
    return True


def ensure_registered() -> None:
    """Define every op of this layer (idempotent). Call before running or building a program that uses them."""
    for module in dict.fromkeys(OPS.values()):
        importlib.import_module(module)
