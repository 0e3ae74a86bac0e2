"""The target registry: each backend module contributes a ``targets()`` function; looked up lazily
(no backend module, and so no triton/onnx, is imported until a target is asked for)."""

from __future__ import annotations

import importlib

from lowc.errors import UnknownTargetError

#: backend module paths, each exposing ``targets() -> list[Target]``
BACKENDS: tuple[str, ...] = ("lowc.backends.reference", "lowc.backends.cpu_lut", "lowc.backends.onnx",
                             "lowc.backends.triton")


def all_targets() -> dict:
    out = {}
    for mod in BACKENDS:
        for t in importlib.import_module(mod).targets():
            out[t.name] = t
    return out


def get_target(name: str):
    targets = all_targets()
    if name not in targets:
        import difflib

        close = difflib.get_close_matches(name, targets, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UnknownTargetError(f"unknown target '{name}'{hint}; known targets: {', '.join(targets)}")
    return targets[name]
