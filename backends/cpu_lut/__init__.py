"""The CPU lookup-table backend (T-MAC style): ``cpu-lut-w1`` … ``cpu-lut-w4``.

Files: ``layout.py`` (offline weight repacking), ``codegen.py`` (C source), ``build.py`` (system
compiler, cache, ctypes), ``runtime.py`` (calling kernels, threads), ``op.py`` (``lowc::linear_lut``),
``lower.py`` (the ``lut-lower`` pass), ``targets.py`` (targets, emit, prepare).

Importing the backend (which the target registry does when targets are listed) defines
``lowc::linear_lut``, so that reading a cpu-lut artifact's graph, which contains the op, resolves it:
``lowc.load`` asks for the target before it reads the graph.
"""

from __future__ import annotations

from lowc.backends.cpu_lut import op  # noqa: F401  (defines lowc::linear_lut)
from lowc.backends.cpu_lut.targets import targets  # noqa: F401  (the registry's entry point)
