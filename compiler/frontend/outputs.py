"""What a captured model returns: the one tensor a metric, an export or a distillation loss reads
from a Hugging Face ``ModelOutput``, a tuple or a plain tensor."""

from __future__ import annotations

from typing import Any

import torch

from lowc.errors import LowcError


def main_tensor(out: Any) -> torch.Tensor:
    """The tensor a metric compares: logits, last_hidden_state, or the first tensor output."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        v = out.get(key) if hasattr(out, "get") else getattr(out, key, None)
        if isinstance(v, torch.Tensor):
            return v
    if isinstance(out, (tuple, list)) or hasattr(out, "to_tuple"):
        seq = out.to_tuple() if hasattr(out, "to_tuple") else out
        for v in seq:
            if isinstance(v, torch.Tensor):
                return v
    raise LowcError(f"cannot find a tensor in the model output ({type(out).__name__})")
