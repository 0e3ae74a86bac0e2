"""lowc's compressed-op dialect (custom torch.library ops) and the packing/quantization math behind it.

Each dialect module below declares its ops with ``torch.library`` (schema, fake kernel, plain-PyTorch
reference implementation). :func:`ensure_registered` imports all of them; it is the only place that
defines ops, so reading a saved graph (``lowc.ir.known.resolve_op``) always finds every lowc op.
"""

import importlib

#: modules under ``lowc.ir.dialect`` that declare ops (add a line when a new one is written)
OP_MODULES: tuple[str, ...] = ("ops", "linear_attention", "kv", "kron")


def ensure_registered() -> None:
    """Define the dialect ops (idempotent). Call before running or loading a program that uses them."""
    for name in OP_MODULES:
        importlib.import_module(f"lowc.ir.dialect.{name}")
