"""lowc: trace PyTorch models, compress them with passes from the papers, lower them to kernels.

Public API::

    import lowc
    cm = lowc.compile(model, target="ref-w4a16", example_inputs=(ids,), calib=texts)
    out = cm(ids)
    cm.save("out/")
    cm2 = lowc.load("out/")

``import lowc`` is light: torch is imported when an API function is first used; triton and onnx
only by the backends that need them.
"""

from __future__ import annotations

from lowc.version import __version__  # a constant; no heavy import

__all__ = ["compile", "load", "search", "trace", "targets", "LowcError", "__version__"]


def __getattr__(name: str):
    if name == "compile":
        from lowc.api import compile

        return compile
    if name == "load":
        from lowc.api import load

        return load
    if name == "search":
        from lowc.search_api import search

        return search
    if name == "trace":
        from lowc.ir.capture import trace

        return trace
    if name == "targets":
        from lowc.backends.registry import all_targets

        return all_targets
    if name == "LowcError":
        from lowc.errors import LowcError

        return LowcError
    if name == "CompiledModel":
        from lowc.api import CompiledModel

        return CompiledModel
    raise AttributeError(f"module 'lowc' has no attribute {name!r}")
