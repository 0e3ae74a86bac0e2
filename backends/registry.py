"""The registry of every target, pass and dialect op, built from the tables each layer keeps.

* targets: each backend package (:data:`BACKENDS`) exposes ``targets() -> list[Target]``;
* passes: the passes layer's :data:`lowc.passes.registry.PASSES` plus each backend package's
  ``PASSES`` (its lowering and check passes), name -> ``"module:Class"``;
* ops: the IR dialect's :data:`lowc.ir.dialect.OPS` plus each backend package's ``OPS`` (the ops of
  its layouts), op name -> the module that declares it.

Everything is data, looked up by name and imported on demand: no backend module (so no triton or
onnx) is imported until one of its targets, passes or ops is asked for, and nothing registers
itself by being imported. The API, the CLI, recipes and the artifact loader go through here
(:func:`parse_pass`, :func:`load_recipe`, :func:`define_op`); lower layers never do.
"""

from __future__ import annotations

import difflib
import importlib
from types import ModuleType

from lowc.errors import UnknownTargetError
from lowc.ir import dialect
from lowc.passes import options
from lowc.passes import registry as pass_registry

#: backend packages, each exposing ``targets()``, ``PASSES`` and ``OPS``
BACKENDS: tuple[str, ...] = ("lowc.backends.reference", "lowc.backends.cpu_lut", "lowc.backends.onnx",
                             "lowc.backends.triton")


def _packages() -> list[ModuleType]:
    return [importlib.import_module(mod) for mod in BACKENDS]


# ---- targets ------------------------------------------------------------------------------------------


def all_targets() -> dict:
    return {t.name: t for pkg in _packages() for t in pkg.targets()}


def get_target(name: str):
    targets = all_targets()
    if name not in targets:
        close = difflib.get_close_matches(name, targets, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UnknownTargetError(f"unknown target '{name}'{hint}; known targets: {', '.join(targets)}")
    return targets[name]


# ---- passes -------------------------------------------------------------------------------------------


def pass_table() -> dict[str, str]:
    """Every pass: name -> ``"module:Class"`` (the passes layer's, then each backend's)."""
    table = dict(pass_registry.PASSES)
    for pkg in _packages():
        for name, spec in pkg.PASSES.items():
            if name in table:
                raise RuntimeError(f"pass {name!r} is registered twice ({table[name]}, {spec})")
            table[name] = spec
    return table


def get_pass_class(name: str):
    return pass_registry.get_pass_class(name, pass_table())


def all_passes() -> dict[str, type]:
    return pass_registry.all_passes(pass_table())


def parse_pass(spelling: str):
    """A pass from its spelling ``name{k=v}``, any registered pass (see :mod:`lowc.passes.options`)."""
    return options.parse_pass(spelling, get_pass_class)


def build_pass(name: str, opts: dict | None = None):
    return options.build_pass(name, opts, get_pass_class)


def load_recipe(path: str) -> list:
    return options.load_recipe(path, get_pass_class)


def pass_from_json(d: dict):
    """A pass from its ``to_json()`` form, any registered pass."""
    return options.from_json(d, get_pass_class)


# ---- ops ----------------------------------------------------------------------------------------------


def op_table() -> dict[str, str]:
    """Every ``lowc::`` op: name -> the module that declares it."""
    table = dict(dialect.OPS)
    for pkg in _packages():
        table.update(pkg.OPS)
    return table


def define_op(name: str) -> bool:
    """Define the op ``lowc::<name>`` by importing its module; False for a name no layer declares."""
    module = op_table().get(name)
    if module is None:
        return False
    importlib.import_module(module)
    return True
