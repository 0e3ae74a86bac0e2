"""lowc's compressed-op dialect (custom torch.library ops) and the packing/quantization math behind it."""


def ensure_registered() -> None:
    """Define the dialect ops (idempotent). Call before running or loading a program that uses them."""
    from lowc.ir.dialect import ops  # noqa: F401  (importing defines the ops)
