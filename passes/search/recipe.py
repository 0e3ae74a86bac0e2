"""The search recipe: what ``lowc search`` writes and ``lowc compile --recipe`` compiles.

A YAML mapping (strict: unknown or missing keys, wrong types, bad names are one-line errors naming
the file)::

    kind: lowc-search-recipe
    version: 1
    model: {source: <spelling>, fingerprint: <sha256>}
    target: cpu-lut-w4
    method: gptq                      # the method pass that compiles it (gptq or rtn)
    symmetric: false
    levels: [2, 3, 4]
    budget: 3.0                       # average stored bits per weight over the searched layers
    achieved_bits: 2.9961             # of the assignment below (≤ budget)
    layers:                           # searched layer -> its level
      model.layers.0.self_attn.q_proj: {bits: 3, group_size: 128}
    fitness: {metric: kl, tokens: 8192, evopress: 0.051}
    baselines:
      uniform: {bits: 2, achieved_bits: 2.14, fitness: 0.21}
      dp: {achieved_bits: 2.99, fitness: 0.07, error_sum: 0.09, layers: {<layer>: <bits>, ...}}
    search: {generations: 50, offspring: 16, schedule: "4:512,2:2048,1:8192", seed: 0, ...}

:meth:`Recipe.passes` turns it into one method pass with per-layer bits
(``gptq{layer_bits=[<layer>=3/128,...]}``, :class:`lowc.passes.quant.common.MixedBitsPass`); the pass
fails naming a layer the model does not have.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import yaml
from lowc import untrusted
from lowc.errors import ArtifactError

KIND = "lowc-search-recipe"
VERSION = 1
METHODS = ("gptq", "rtn")


def is_search_recipe(data: Any) -> bool:
    return isinstance(data, dict) and data.get("kind") == KIND


@dataclass(frozen=True)
class Recipe:
    model: dict[str, str]
    target: str
    method: str
    symmetric: bool
    levels: tuple[int, ...]
    budget: float
    achieved_bits: float
    layers: dict[str, dict[str, int]]
    fitness: dict[str, Any]
    baselines: dict[str, Any] = field(default_factory=dict)
    search: dict[str, Any] = field(default_factory=dict)

    def bits(self) -> dict[str, int]:
        return {k: v["bits"] for k, v in self.layers.items()}

    def passes(self) -> list[str]:
        """The method pass spelling that compiles this assignment (module docstring)."""
        items = ",".join(f"{k}={v['bits']}/{v['group_size']}" for k, v in self.layers.items())
        sym = ",symmetric=true" if self.symmetric else ""
        return [f"{self.method}{{layer_bits=[{items}]{sym}}}"]

    def to_json(self) -> dict[str, Any]:
        return {"kind": KIND, "version": VERSION, "model": dict(self.model), "target": self.target, "method": self.method,
                "symmetric": self.symmetric, "levels": list(self.levels), "budget": self.budget,
                "achieved_bits": self.achieved_bits, "layers": {k: dict(v) for k, v in self.layers.items()},
                "fitness": self.fitness, "baselines": self.baselines, "search": self.search}

    def save(self, path: str) -> str:
        d = os.path.dirname(os.path.abspath(path))
        os.makedirs(d, exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            yaml.safe_dump(self.to_json(), f, sort_keys=False, width=120)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str) -> Recipe:
        if not os.path.isfile(path):
            raise ArtifactError(f"recipe {path!r} does not exist")
        if os.path.getsize(path) > untrusted.MAX_JSON_BYTES:
            raise ArtifactError(f"recipe {path} is too large")
        try:
            with open(path) as f:
                data = yaml.safe_load(f)
        except Exception as e:
            raise ArtifactError(f"recipe {path}: cannot parse ({str(e).splitlines()[0]})") from None
        return cls.from_json(data, f"recipe {path}")

    @classmethod
    def from_json(cls, d: Any, what: str) -> Recipe:
        keys = ("kind", "version", "model", "target", "method", "symmetric", "levels", "budget", "achieved_bits",
                "layers", "fitness", "baselines", "search")
        required = keys[:-2]
        untrusted.fields(d, what, keys, required)
        if d["kind"] != KIND:
            raise ArtifactError(f"{what}: kind {d['kind']!r} is not {KIND!r}")
        untrusted.int_in(d["version"], VERSION, VERSION, f"{what}: version")
        model = untrusted.fields(d["model"], f"{what}: model", ("source", "fingerprint"), ("source", "fingerprint"))
        untrusted.typed(model["source"], str, f"{what}: model.source")
        untrusted.sha256_hex(model["fingerprint"], f"{what}: model.fingerprint")
        target = untrusted.typed(d["target"], str, f"{what}: target")
        method = untrusted.choice(d["method"], METHODS, f"{what}: method")
        symmetric = untrusted.typed(d["symmetric"], bool, f"{what}: symmetric")
        levels = untrusted.typed(d["levels"], list, f"{what}: levels")
        if not levels:
            raise ArtifactError(f"{what}: levels is empty")
        for b in levels:
            untrusted.int_in(b, 1, 8, f"{what}: level")
        budget = float(untrusted.typed(d["budget"], (int, float), f"{what}: budget"))
        achieved = float(untrusted.typed(d["achieved_bits"], (int, float), f"{what}: achieved_bits"))
        layers = {}
        for name, v in untrusted.typed(d["layers"], dict, f"{what}: layers").items():
            untrusted.attr_path(name, f"{what}: layer name")
            where = f"{what}: layers.{name}"
            untrusted.fields(v, where, ("bits", "group_size"), ("bits", "group_size"))
            b = untrusted.typed(v["bits"], int, f"{where}.bits")
            if b not in levels:
                raise ArtifactError(f"{where}: level {b} is not one of the recipe's levels {levels}")
            g = untrusted.typed(v["group_size"], int, f"{where}.group_size")
            if not (g == -1 or (g > 0 and g % 8 == 0)):
                raise ArtifactError(f"{where}.group_size: {g} is not -1 or a positive multiple of 8")
            layers[name] = {"bits": b, "group_size": g}
        if not layers:
            raise ArtifactError(f"{what}: layers is empty")
        fitness = untrusted.typed(d["fitness"], dict, f"{what}: fitness")
        return cls(dict(model), target, method, symmetric, tuple(levels), budget, achieved, layers, fitness,
                   untrusted.typed(d.get("baselines", {}), dict, f"{what}: baselines"),
                   untrusted.typed(d.get("search", {}), dict, f"{what}: search"))
