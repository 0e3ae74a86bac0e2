"""Calibration data: what method passes calibrate on.

``load_calibration`` accepts a list of token-id tensors, a list of strings (tokenized with the
model's tokenizer), or a text file: a path or a built-in text name such as ``wikitext-2-valid``
(:mod:`lowc.data`), and returns :class:`CalibrationData`: ``n_samples``
sequences of ``seq_len`` tokens. Text is tokenized as one stream and cut into windows at random
offsets drawn from ``seed`` (as GPTQ's reference code samples its calibration set), so the same seed
gives the same samples. Block-by-block execution over these samples lives in
:mod:`lowc.passes.blockwise`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from lowc import data
from lowc.errors import CalibrationError


@dataclass
class CalibrationData:
    """Token-id samples, each ``[1, L]`` int64, plus where they came from."""

    samples: list[torch.Tensor]
    source: str = ""

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def n_tokens(self) -> int:
        return sum(int(s.numel()) for s in self.samples)

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "samples": len(self.samples),
                "seq_len": int(self.samples[0].shape[-1]) if self.samples else 0, "tokens": self.n_tokens}


def _check_tokens(t: torch.Tensor, where: str, vocab_size: int | None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.is_floating_point() or t.is_complex():
        raise CalibrationError(f"calibration {where}: expected integer token ids, got {getattr(t, 'dtype', type(t).__name__)}")
    t = t.to(torch.int64)
    if t.dim() == 1:
        t = t.unsqueeze(0)
    if t.dim() != 2 or t.numel() == 0:
        raise CalibrationError(f"calibration {where}: expected a [seq] or [batch, seq] tensor, got shape {list(t.shape)}")
    if vocab_size and (int(t.min()) < 0 or int(t.max()) >= vocab_size):
        raise CalibrationError(f"calibration {where}: token ids must lie in [0, {vocab_size}), got [{int(t.min())}, {int(t.max())}]")
    return t


def load_calibration(calib: Any, tokenizer=None, n_samples: int = 128, seq_len: int = 512, seed: int = 0,
                     vocab_size: int | None = None) -> CalibrationData:
    """Normalize user calibration input (see module docstring)."""
    if calib is None:
        raise CalibrationError("no calibration data given")
    if n_samples < 1 or seq_len < 1:
        raise CalibrationError(f"calibration needs at least one sample of at least one token (got {n_samples} x {seq_len})")
    if isinstance(calib, CalibrationData):
        return calib
    if isinstance(calib, (str, os.PathLike)):

        text = data.read(calib, "calibration file", CalibrationError)
        if not text.strip():
            raise CalibrationError(f"calibration file {os.fspath(calib)!r} is empty")
        return _from_text([text], tokenizer, n_samples, seq_len, seed, source=os.fspath(calib))
    if isinstance(calib, torch.Tensor):
        calib = [calib]
    if isinstance(calib, Sequence) and calib and all(isinstance(c, str) for c in calib):
        return _from_text(list(calib), tokenizer, n_samples, seq_len, seed, source=f"{len(calib)} strings")
    if isinstance(calib, Sequence) and calib and all(isinstance(c, torch.Tensor) for c in calib):
        samples = []
        for i, t in enumerate(calib):
            t = _check_tokens(t, f"tensor {i}", vocab_size)
            samples.extend(row.unsqueeze(0) for row in t)
        return CalibrationData(samples[:n_samples] if n_samples else samples, source=f"{len(calib)} tensors")
    raise CalibrationError(
        f"calibration data of type {type(calib).__name__} is not supported: give token-id tensors, strings, or a text file path"
    )


def _from_text(texts: list[str], tokenizer, n_samples: int, seq_len: int, seed: int, source: str) -> CalibrationData:
    if tokenizer is None:
        raise CalibrationError(f"calibration from text ({source}) needs the model's tokenizer, and this model has none: pass token-id tensors")
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=False, verbose=False)["input_ids"])
    if not ids:
        raise CalibrationError(f"calibration text ({source}) produced no tokens")
    stream = torch.tensor(ids, dtype=torch.int64)
    if len(stream) <= seq_len:
        return CalibrationData([stream[:seq_len].unsqueeze(0)], source=source)
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - seq_len, (n_samples,), generator=g)
    return CalibrationData([stream[s : s + seq_len].unsqueeze(0) for s in starts.tolist()], source=source)
