"""The one form of a compression scheme: how a layer's weights and input activations are stored.

A target fixes a default :class:`Scheme`; a method pass resolves its own options against it
(:meth:`Scheme.resolve`); the result travels on each compressed node as ``NodeInfo.scheme`` (with
the method that produced it in ``NodeInfo.method``); the manifest's layer table and graph.json carry
it as JSON (:meth:`Scheme.to_json` / :meth:`Scheme.from_json`, strict: artifacts are untrusted);
backends read it back, and its :attr:`label` is what every message and table prints.

Fields a sparse or mixed-precision scheme needs fit here too: a per-layer mix is simply a different
Scheme on each node (what a search recipe assigns); group sparsity (GQSA) is ``sparsity`` (fraction
of weight groups dropped per row) and ``sparse_group`` (consecutive input weights kept or dropped
together), both 0 for a dense layer.

The dialect ops' own arguments (``bits``, ``group_size``, whether ``zeros`` is present) are the
storage itself; :func:`lowc.ir.dialect.args.LinearQArgs.scheme` reads the same facts back from a
node, so the two can be checked against each other.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from lowc.errors import ArtifactError

#: observers a static activation scale can come from (``quantize-activations{static=true}``)
OBSERVERS = ("mse", "minmax", "percentile")


@dataclass(frozen=True)
class Scheme:
    """How one layer is stored. ``a_bits=16`` means float activations; ``group_size=-1`` one
    scale per output channel."""

    w_bits: int
    group_size: int = 128
    symmetric: bool = False
    a_bits: int = 16
    a_static: str | None = None  # observer of a static per-tensor activation scale; None = dynamic
    sparsity: float = 0.0  # fraction of weight groups dropped per row (group sparsity); 0 = dense
    sparse_group: int = 0  # input weights per kept/dropped group; 0 when dense

    def __post_init__(self) -> None:
        problems = []
        if type(self.w_bits) is not int or not 1 <= self.w_bits <= 8:
            problems.append(f"w_bits={self.w_bits!r} (1..8)")
        if type(self.group_size) is not int or not (self.group_size == -1 or (self.group_size > 0 and self.group_size % 8 == 0)):
            problems.append(f"group_size={self.group_size!r} (-1 or a positive multiple of 8)")
        if type(self.symmetric) is not bool:
            problems.append(f"symmetric={self.symmetric!r}")
        if type(self.a_bits) is not int or not (self.a_bits == 16 or 2 <= self.a_bits <= 8):
            problems.append(f"a_bits={self.a_bits!r} (2..8, or 16 for float)")
        if self.a_static is not None and (self.a_static not in OBSERVERS or self.a_bits == 16):
            problems.append(f"a_static={self.a_static!r} ({', '.join(OBSERVERS)}, with quantized activations)")
        if not isinstance(self.sparsity, (int, float)) or isinstance(self.sparsity, bool) or not 0 <= self.sparsity < 1:
            problems.append(f"sparsity={self.sparsity!r} (0 <= s < 1)")
        if type(self.sparse_group) is not int or self.sparse_group < 0 or (self.sparsity > 0) != (self.sparse_group > 0):
            problems.append(f"sparse_group={self.sparse_group!r} (> 0 exactly when sparsity > 0)")
        if problems:
            raise ValueError("invalid scheme: " + ", ".join(problems))

    # ---- what people read ---------------------------------------------------------------------------
    @property
    def label(self) -> str:
        """``W4A16 g128 asym`` / ``W8A8 per-channel sym static(mse)`` / ``W4A16 g128 asym 50%/16 sparse``."""
        g = "per-channel" if self.group_size == -1 else f"g{self.group_size}"
        s = f"W{self.w_bits}A{self.a_bits} {g} {'sym' if self.symmetric else 'asym'}"
        if self.a_static:
            s += f" static({self.a_static})"
        if self.sparsity:
            s += f" {self.sparsity:.0%}/{self.sparse_group} sparse"
        return s

    def bits_per_weight(self, in_features: int, scale_bits: int = 16) -> float:
        """Stored bits per weight of an ``[N, in_features]`` layer: codes, plus per group a scale
        and (asymmetric) a ``w_bits`` zero point. A group-sparse layer counts exactly what
        ``lowc::linear_gsq`` stores (:mod:`lowc.ir.dialect.sparse`): the codes of the kept sparse
        groups only (:func:`kept_sparse_groups`, rounded as the pass rounds), one scale and one uint8
        zero point per quantization group of the compact row, one int16 index per kept group."""
        if self.sparsity:
            n_keep = kept_sparse_groups(in_features, self.sparse_group, self.sparsity)
            kc = n_keep * self.sparse_group
            gs = kc if self.group_size == -1 or self.group_size >= kc else self.group_size
            per_row = kc * self.w_bits + -(-kc // gs) * (scale_bits + (0 if self.symmetric else 8)) + n_keep * 16
            return per_row / in_features
        groups = 1 if self.group_size == -1 else -(-in_features // self.group_size)
        per_row = in_features * self.w_bits + groups * (scale_bits + (0 if self.symmetric else self.w_bits))
        return per_row / in_features

    # ---- building ---------------------------------------------------------------------------------------
    def with_(self, **changes: Any) -> "Scheme":
        return replace(self, **changes)

    @staticmethod
    def resolve(default: "Scheme | None", *, w_bits: int | None = None, group_size: int | None = None,
                symmetric: bool | None = None, fallback: "Scheme | None" = None) -> "Scheme":
        """A pass's options (``None`` = not given) over the target's scheme ``default``, over
        ``fallback`` where the target has none (e.g. a method pass on ``ref-fp32``)."""
        base = default or fallback or Scheme(4)
        changes = {k: v for k, v in (("w_bits", w_bits), ("group_size", group_size), ("symmetric", symmetric)) if v is not None}
        return replace(base, **changes)

    # ---- JSON -------------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """The fields, leaving out the optional ones at their defaults (dense, dynamic)."""
        d = asdict(self)
        for k in ("a_static", "sparsity", "sparse_group"):
            if d[k] == _DEFAULTS[k]:
                del d[k]
        return d

    @staticmethod
    def from_json(d: Any, what: str = "scheme") -> "Scheme":
        """Parse :meth:`to_json` output strictly (an unknown key or a bad value is an ArtifactError)."""
        if not isinstance(d, dict):
            raise ArtifactError(f"{what}: expected an object")
        unknown = sorted(set(d) - set(_DEFAULTS) - {"w_bits"})
        if unknown:
            raise ArtifactError(f"{what}: unknown key {unknown[0]!r}")
        if "w_bits" not in d:
            raise ArtifactError(f"{what}: missing key 'w_bits'")
        try:
            return Scheme(**d)
        except (TypeError, ValueError) as e:
            raise ArtifactError(f"{what}: {e}") from None


def kept_sparse_groups(in_features: int, sparse_group: int, sparsity: float) -> int:
    """Sparse groups kept per row of an ``in_features``-wide layer (padded to a multiple of
    ``sparse_group``) at ``sparsity``: the dropped fraction rounded to the nearest group, at least one kept."""
    n_groups = -(-in_features // sparse_group)
    return max(1, min(n_groups, round(n_groups * (1 - sparsity))))


_DEFAULTS = {f.name: f.default for f in fields(Scheme) if f.name != "w_bits"}
