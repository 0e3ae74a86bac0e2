"""The CPU lookup-table backend (T-MAC style): ``cpu-lut-w1`` … ``cpu-lut-w4``.

Files: ``layout.py`` (offline weight repacking), ``codegen.py`` (C source), ``build.py`` (system
compiler, cache, ctypes), ``runtime.py`` (calling kernels, threads), ``op.py`` (``lowc::linear_lut``,
``lowc::linear_lut_gs``),
``lower.py`` (the ``lut-lower`` pass), ``head.py`` (the ``lut-head`` pass: lm_head at W4 g64), ``targets.py`` (targets, emit, prepare).

The registry (:mod:`lowc.backends.registry`) reads this package's :func:`targets`, :data:`PASSES` and
:data:`OPS`; importing the package defines no op (``lowc::linear_lut`` is defined when its module is
imported by name, e.g. by the artifact loader resolving a cpu-lut graph).
"""

from __future__ import annotations

from lowc.backends.cpu_lut.targets import targets

#: this backend's passes: name -> "module:Class"
PASSES: dict[str, str] = {"lut-lower": "lowc.backends.cpu_lut.lower:LutLower", "lut-head": "lowc.backends.cpu_lut.head:LutHead"}
#: this backend's ops: name (``lowc::<name>``) -> the module that declares it
OPS: dict[str, str] = {"linear_lut": "lowc.backends.cpu_lut.op", "linear_lut_gs": "lowc.backends.cpu_lut.op"}

__all__ = ["targets", "PASSES", "OPS"]
