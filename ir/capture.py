"""``lowc.trace``: a model captured by the frontend, made into a :class:`~lowc.ir.program.Program`.

:func:`lowc.frontend.trace.capture` exports the model; here its module is canonicalized
(:mod:`lowc.ir.canonicalize`), buffers no node reads are dropped, and every node is annotated with
its layer, role and block (:mod:`lowc.ir.meta`). :func:`check_finite` is the check the API runs on
the captured weights before compressing them.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from lowc.errors import ModelLoadError
from lowc.frontend.trace import Capture, capture
from lowc.ir.canonicalize import canonicalize
from lowc.ir.program import Program


def program_of(c: Capture) -> Program:
    """The Program of a capture: canonicalized, dead attributes removed, nodes annotated."""
    program = Program(canonicalize(c.module), c.info)
    program.tokenizer = c.tokenizer
    program.remove_dead()  # export keeps buffers no node reads (e.g. rotary original_inv_freq)
    program.annotate()
    return program


def trace(model: Any, example_inputs: Sequence[Any] | None = None, *, dynamic_shapes=None, device: str = "cpu",
          dtype: str | torch.dtype | None = None, tokenizer=None, seq_len: int = 16, batch: int = 2) -> Program:
    """Capture ``model`` (module, HF model, directory, preset or factory) into a Program (the
    arguments are :func:`lowc.frontend.trace.capture`'s)."""
    return program_of(capture(model, example_inputs, dynamic_shapes=dynamic_shapes, device=device, dtype=dtype,
                              tokenizer=tokenizer, seq_len=seq_len, batch=batch))


def check_finite(program: Program) -> None:
    """Fail naming the first parameter or buffer that holds NaN or inf: compressing it would only
    give an artifact whose outputs are NaN."""
    for name, t in program.state_tensors().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ModelLoadError(f"weight {name} has {bad} NaN/inf value(s) of {t.numel()}: the source model is broken "
                                 "(pass --allow-nonfinite / allow_nonfinite=True to compile it anyway)")
