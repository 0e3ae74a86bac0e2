"""Device moves of generation: prompts and tokens go to the model's device, generated tokens come back
to the host.

Token ids and masks are checked here, once, for every strategy: a prompt is ``[B, L]`` integer ids with
``L >= 1`` and an optional ``attention_mask`` of the same shape (1 = token, 0 = left padding).
Logits stay on the model's device; the sampler (:mod:`lowc.runtime.generation`) reads them on the host.
"""

from __future__ import annotations

import torch

from lowc.errors import GenerationError


def check_prompt(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> None:
    """Raise a one-line GenerationError unless the prompt is well formed (module docstring)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype.is_floating_point \
            or input_ids.dtype == torch.bool:
        what = f"a {input_ids.dtype} tensor of shape {tuple(input_ids.shape)}" if isinstance(input_ids, torch.Tensor) \
            else type(input_ids).__name__
        raise GenerationError(f"input_ids must be integer token ids [batch, length]; got {what}")
    if input_ids.shape[0] < 1 or input_ids.shape[1] < 1:
        raise GenerationError(f"input_ids must hold at least one token per sequence; got shape {tuple(input_ids.shape)}")
    if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor)
                                       or tuple(attention_mask.shape) != tuple(input_ids.shape)):
        what = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise GenerationError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}; got {what}")


def prompt_on(device: torch.device, input_ids: torch.Tensor,
              attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)`` checked and on ``device``; the mask defaults to all ones."""
    check_prompt(input_ids, attention_mask)
    ids = input_ids.to(device)
    return ids, torch.ones_like(ids) if attention_mask is None else attention_mask.to(device)


def tokens_on(device: torch.device, tokens: torch.Tensor) -> torch.Tensor:
    """One token per sequence as ``[B, 1]`` ids on ``device``."""
    return tokens.reshape(-1, 1).to(device)


def to_host(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu()
