"""The level database: every searched linear quantized at every level, once, on disk.

EvoPress searches over assignments of one *level* (here: a weight bit width) per layer; each
(layer, level) is quantized once and reused by every search and budget. A database is a directory::

    levels.json                          the manifest (below)
    calib.safetensors                    the calibration tokens ``[S, L]`` int64 it was built with
    levels/<layer>.w<bits>.safetensors   ``weight`` (dequantized, the model's dtype), ``qweight``
                                         (packed codes), ``scales``, ``zeros`` (asymmetric only)

Searched layers are the linears inside transformer blocks (``lm_head`` and other linears outside
the blocks stay out of the search; a recipe leaves them to its method pass). Each is quantized with
group size ``group_size`` (128) when its input width is at least that, else per output channel.

Methods: ``gptq`` (default): one Hessian per layer from the *float* model's inputs (block by block
through :class:`lowc.passes.blockwise.BlockwiseRunner`; nothing is rewritten, so every block sees
float inputs), reused for every level; ``rtn``: round to nearest. Both are lowc's own quantizers
(:func:`lowc.passes.quant.gptq.gptq_quantize`, :func:`lowc.ir.dialect.quant.rtn_quantize`).

The manifest (``kind: lowc-level-db``, ``version: 1``) records the model fingerprint, the method,
the group size, the calibration (source, shape, sha256 of the tokens), and per layer its shape,
group size and per level: file, size, sha256, stored bits (codes + one fp16 scale and, asymmetric,
one ``bits``-wide zero per group, from the stored tensors' group count, as
:meth:`lowc.ir.scheme.Scheme.bits_per_weight` counts them) and bits per weight.

Building resumes: the manifest is rewritten after every layer, and entries already on disk (hash
checked) are kept; a database built for another model, method, group size or calibration is
refused. Opening is strict (untrusted input: known keys only, names checked, every file's size and
sha256 checked, tensors read with safetensors, never pickle); a mismatch is a one-line
:class:`lowc.errors.ArtifactError` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from lowc import untrusted
from lowc.errors import ArtifactError, PassOptionError
from lowc.ir import meta as nodemeta
from lowc.ir.analysis import linear_layer
from lowc.ir.dialect import quant
from lowc.ir.scheme import Scheme
from lowc.passes.blockwise import BlockwiseRunner
from lowc.passes.calibration import CalibrationData
from lowc.passes.quant.common import linear_weight, matches
from lowc.passes.quant.gptq import gptq_quantize, stage_hessians
from lowc.progress import bar, step
from safetensors import safe_open
from safetensors.torch import save_file

KIND = "lowc-level-db"
VERSION = 1
MANIFEST = "levels.json"
CALIB_FILE = "calib.safetensors"
METHODS = ("gptq", "rtn")
DEFAULT_LEVELS = (2, 3, 4, 5, 6)
DEFAULT_GROUP_SIZE = 128
#: layers never searched (their method pass decides them)
IGNORE = ("lm_head",)
SCALE_BITS = 16


def layer_group_size(in_features: int, group_size: int) -> int:
    """``group_size`` where the layer is at least that wide, else per output channel (-1)."""
    return group_size if group_size != -1 and in_features >= group_size else -1


def stored_bits(out_features: int, in_features: int, bits: int, group_size: int, symmetric: bool,
                n_groups: int | None = None) -> int:
    """Bits a ``[out, in]`` layer stores at ``bits``: codes, plus per group an fp16 scale and
    (asymmetric) a ``bits``-wide zero; ``n_groups`` per row (default: from the group size)."""
    if n_groups is None:  # the Scheme's count (what every report prints)
        return round(Scheme(bits, group_size, symmetric).bits_per_weight(in_features, SCALE_BITS) * in_features) * out_features
    return out_features * (in_features * bits + n_groups * (SCALE_BITS + (0 if symmetric else bits)))


def level_file(layer: str, bits: int) -> str:
    return f"levels/{layer}.w{bits}.safetensors"


def tokens_sha256(tokens: torch.Tensor) -> str:
    return hashlib.sha256(tokens.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


@dataclass(frozen=True)
class LevelEntry:
    file: str
    bytes: int
    sha256: str
    bits: int  # total stored bits of the layer at this level
    bits_per_weight: float

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "bytes": self.bytes, "sha256": self.sha256, "bits": self.bits,
                "bits_per_weight": self.bits_per_weight}


@dataclass(frozen=True)
class LayerEntry:
    name: str
    out_features: int
    in_features: int
    group_size: int
    levels: dict[int, LevelEntry]

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features

    def to_json(self) -> dict[str, Any]:
        return {"out_features": self.out_features, "in_features": self.in_features, "group_size": self.group_size,
                "levels": {str(b): e.to_json() for b, e in sorted(self.levels.items())}}


class LevelDB:
    """An opened level database (module docstring): layers in graph order, their levels, the
    calibration tokens; tensors are read on demand through safetensors' memory map."""

    def __init__(self, path: str, manifest: dict[str, Any], layers: dict[str, LayerEntry]):
        self.path = path
        self.manifest = manifest
        self.layers = layers
        self._handles: dict[str, Any] = {}

    # ---- facts ---------------------------------------------------------------------------------
    @property
    def method(self) -> str:
        return self.manifest["method"]

    @property
    def symmetric(self) -> bool:
        return self.manifest["symmetric"]

    @property
    def model_fingerprint(self) -> str:
        return self.manifest["model"]["fingerprint"]

    @property
    def levels(self) -> tuple[int, ...]:
        """Levels every layer has."""
        sets = [set(e.levels) for e in self.layers.values()]
        return tuple(sorted(set.intersection(*sets))) if sets else ()

    def fingerprint(self) -> str:
        """sha256 of the manifest as stored: names exactly this database's contents."""
        return untrusted.sha256_file(os.path.join(self.path, MANIFEST))

    def bits(self, layer: str, level: int) -> int:
        return self.layers[layer].levels[level].bits

    def calibration_tokens(self) -> torch.Tensor:
        t = self._tensor(CALIB_FILE, "tokens")
        c = self.manifest["calibration"]
        if t.dtype != torch.int64 or list(t.shape) != [c["samples"], c["seq_len"]]:
            raise ArtifactError(f"{self._where(CALIB_FILE)}: tokens are {t.dtype} {list(t.shape)}, the manifest says "
                                f"int64 [{c['samples']}, {c['seq_len']}]")
        return t

    # ---- tensors --------------------------------------------------------------------------------
    def weight(self, layer: str, level: int) -> torch.Tensor:
        """The dequantized ``[N, K]`` weight of ``layer`` at ``level``."""
        e = self.layers[layer]
        w = self._tensor(e.levels[level].file, "weight")
        if list(w.shape) != [e.out_features, e.in_features] or not w.is_floating_point():
            raise ArtifactError(f"{self._where(e.levels[level].file)}: weight is {w.dtype} {list(w.shape)}, expected "
                                f"a float [{e.out_features}, {e.in_features}]")
        return w

    def quantized(self, layer: str, level: int) -> quant.QuantizedWeight:
        """The packed weight of ``layer`` at ``level`` (what ``lowc::linear_wq`` stores)."""
        e = self.layers[layer]
        f = e.levels[level].file
        names = ("qweight", "scales") + (() if self.symmetric else ("zeros",))
        t = {n: self._tensor(f, n) for n in names}
        gs, k_pad = quant.padded_in_features(e.in_features, e.group_size)
        want = {"qweight": [e.out_features, k_pad * level // 8], "scales": [e.out_features, k_pad // gs],
                "zeros": [e.out_features, k_pad // gs]}
        for n, v in t.items():
            if list(v.shape) != want[n]:
                raise ArtifactError(f"{self._where(f)}: {n} has shape {list(v.shape)}, expected {want[n]}")
        return quant.QuantizedWeight(t["qweight"], t["scales"], t.get("zeros"), level, gs, e.in_features)

    def _where(self, rel: str) -> str:
        return os.path.join(self.path, rel)

    def _tensor(self, rel: str, name: str) -> torch.Tensor:
        h = self._handles.get(rel)
        if h is None:
            try:
                h = safe_open(self._where(rel), framework="pt")
            except Exception as e:
                raise ArtifactError(f"{self._where(rel)}: cannot read ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
            self._handles[rel] = h
        if name not in h.keys():
            raise ArtifactError(f"{self._where(rel)}: no tensor {name!r}")
        return h.get_tensor(name)

    # ---- reading --------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str, check_hashes: bool = True) -> LevelDB:
        """Open the database at ``path`` strictly (module docstring)."""
        mpath = os.path.join(path, MANIFEST)
        if not os.path.isfile(mpath):
            raise ArtifactError(f"{mpath}: no level database here (missing {MANIFEST})")
        m = parse_manifest(untrusted.load_json(mpath), mpath)
        layers = {name: _layer_entry(name, d, mpath) for name, d in m["layers"].items()}
        db = cls(path, m, layers)
        files = [(CALIB_FILE, m["calibration"]["file_bytes"], m["calibration"]["file_sha256"])]
        files += [(e.file, e.bytes, e.sha256) for le in layers.values() for e in le.levels.values()]
        for rel, size, sha in files:
            _check_file(path, rel, size, sha, check_hashes)
        return db


def _check_file(root: str, rel: str, size: int, sha: str, check_hash: bool) -> None:
    p = os.path.join(root, rel)
    if not os.path.isfile(p) or os.path.islink(p):
        raise ArtifactError(f"{p}: missing from the level database")
    if os.path.getsize(p) != size:
        raise ArtifactError(f"{p}: size {os.path.getsize(p)} differs from the manifest's {size} (corrupt level database)")
    if check_hash and untrusted.sha256_file(p) != sha:
        raise ArtifactError(f"{p}: sha256 differs from the manifest's (corrupt level database)")


_TOP = ("kind", "version", "model", "method", "group_size", "symmetric", "calibration", "order", "layers")


def parse_manifest(d: Any, what: str) -> dict[str, Any]:
    """The manifest ``d`` checked strictly (keys, types, ranges); ``what`` names the file."""
    untrusted.fields(d, what, _TOP, _TOP)
    if d["kind"] != KIND:
        raise ArtifactError(f"{what}: kind {d['kind']!r} is not {KIND!r}")
    untrusted.int_in(d["version"], VERSION, VERSION, f"{what}: version")
    model = untrusted.fields(d["model"], f"{what}: model", ("fingerprint", "source"), ("fingerprint", "source"))
    untrusted.sha256_hex(model["fingerprint"], f"{what}: model.fingerprint")
    untrusted.typed(model["source"], str, f"{what}: model.source")
    untrusted.choice(d["method"], METHODS, f"{what}: method")
    gs = untrusted.typed(d["group_size"], int, f"{what}: group_size")
    if not (gs == -1 or (gs > 0 and gs % 8 == 0)):
        raise ArtifactError(f"{what}: group_size {gs} is not -1 or a positive multiple of 8")
    untrusted.typed(d["symmetric"], bool, f"{what}: symmetric")
    keys = ("source", "samples", "seq_len", "seed", "sha256", "file_bytes", "file_sha256")
    c = untrusted.fields(d["calibration"], f"{what}: calibration", keys, keys)
    untrusted.typed(c["source"], str, f"{what}: calibration.source")
    for k in ("samples", "seq_len"):
        untrusted.int_in(c[k], 1, 1 << 30, f"{what}: calibration.{k}")
    untrusted.typed(c["seed"], int, f"{what}: calibration.seed")
    untrusted.int_in(c["file_bytes"], 1, 1 << 40, f"{what}: calibration.file_bytes")
    untrusted.sha256_hex(c["sha256"], f"{what}: calibration.sha256")
    untrusted.sha256_hex(c["file_sha256"], f"{what}: calibration.file_sha256")
    order = untrusted.typed(d["order"], list, f"{what}: order")
    untrusted.typed(d["layers"], dict, f"{what}: layers")
    for name in order:
        untrusted.attr_path(name, f"{what}: order")
    if sorted(order) != sorted(d["layers"]) or len(set(order)) != len(order):
        raise ArtifactError(f"{what}: order does not list the layers exactly once each")
    d["layers"] = {name: d["layers"][name] for name in order}
    return d


def _layer_entry(name: str, d: Any, what: str) -> LayerEntry:
    where = f"{what}: layers.{name}"
    untrusted.attr_path(name, f"{what}: layer name")
    untrusted.fields(d, where, ("out_features", "in_features", "group_size", "levels"),
                     ("out_features", "in_features", "group_size", "levels"))
    n = untrusted.int_in(d["out_features"], 1, 1 << 24, f"{where}.out_features")
    k = untrusted.int_in(d["in_features"], 1, 1 << 24, f"{where}.in_features")
    gs = untrusted.typed(d["group_size"], int, f"{where}.group_size")
    if not (gs == -1 or (gs > 0 and gs % 8 == 0)):
        raise ArtifactError(f"{where}.group_size: {gs} is not -1 or a positive multiple of 8")
    levels = {}
    for key, e in untrusted.typed(d["levels"], dict, f"{where}.levels").items():
        if not (isinstance(key, str) and key.isdigit() and 1 <= int(key) <= 8):
            raise ArtifactError(f"{where}.levels: level {key!r} is not a bit width 1..8")
        b = int(key)
        lw = f"{where}.levels.{key}"
        keys = ("file", "bytes", "sha256", "bits", "bits_per_weight")
        untrusted.fields(e, lw, keys, keys)
        if e["file"] != level_file(name, b):
            raise ArtifactError(f"{lw}.file: {e['file']!r} is not {level_file(name, b)!r}")
        untrusted.rel_path(e["file"], f"{lw}.file")
        untrusted.int_in(e["bytes"], 1, 1 << 40, f"{lw}.bytes")
        untrusted.sha256_hex(e["sha256"], f"{lw}.sha256")
        bits = untrusted.int_in(e["bits"], 1, 1 << 50, f"{lw}.bits")
        bpw = untrusted.typed(e["bits_per_weight"], (int, float), f"{lw}.bits_per_weight")
        if abs(bits / (n * k) - bpw) > 1e-6:
            raise ArtifactError(f"{lw}: bits_per_weight {bpw} does not match bits {bits} over {n * k} weights")
        levels[b] = LevelEntry(e["file"], e["bytes"], e["sha256"], bits, float(bpw))
    return LayerEntry(name, n, k, gs, levels)


# ---- building -------------------------------------------------------------------------------------
def searched_linears(program, ignore: Iterable[str] = IGNORE) -> list:
    """The program's linears inside transformer blocks, not ignored, in graph order."""
    return [n for n in program.linears() if nodemeta.get(n).block is not None and not matches(linear_layer(n), tuple(ignore))]


def _write_json_atomic(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=False)
    os.replace(tmp, path)


def _save(root: str, rel: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[int, str]:
    p = os.path.join(root, rel)
    os.makedirs(os.path.dirname(p), exist_ok=True)
    tmp = p + ".tmp"
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
    os.replace(tmp, p)
    return os.path.getsize(p), untrusted.sha256_file(p)


def _quantize(method: str, w: torch.Tensor, hessian: torch.Tensor | None, bits: int, group_size: int,
              symmetric: bool, name: str) -> quant.QuantizedWeight:
    if method == "rtn":
        return quant.rtn_quantize(w, bits, group_size, symmetric)
    qw, _ = gptq_quantize(w, hessian, bits, group_size, symmetric, name=name)
    return qw


def build_level_db(path: str, program, calib: CalibrationData, *, model_fingerprint: str, source: str,
                   calib_seed: int = 0, levels: Iterable[int] = DEFAULT_LEVELS, method: str = "gptq",
                   group_size: int = DEFAULT_GROUP_SIZE, symmetric: bool = False, device: str = "cpu",
                   progress: bool = True) -> LevelDB:
    """Quantize every searched linear of ``program`` at every level into the database at ``path``
    (created, or resumed: entries already there are kept), and open it."""
    levels = tuple(sorted(set(levels)))
    if method not in METHODS:
        raise PassOptionError(f"search: method {method!r} is not one of {', '.join(METHODS)}")
    tokens = torch.cat([s.reshape(1, -1) for s in calib.samples], 0) if calib.samples else None
    if tokens is None or len({s.numel() for s in calib.samples}) != 1:
        raise PassOptionError("search: calibration samples must all have the same length")
    os.makedirs(path, exist_ok=True)
    mpath = os.path.join(path, MANIFEST)
    calib_sha = tokens_sha256(tokens)
    if os.path.isfile(mpath):
        db = LevelDB.open(path)
        m = db.manifest
        for what, have, want in (("model", db.model_fingerprint, model_fingerprint), ("method", db.method, method),
                                 ("group_size", m["group_size"], group_size), ("symmetric", db.symmetric, symmetric),
                                 ("calibration", m["calibration"]["sha256"], calib_sha)):
            if have != want:
                raise ArtifactError(f"{mpath}: this level database was built with another {what} "
                                    f"({str(have)[:16]} vs {str(want)[:16]}); use another --db directory")
        manifest = m
        manifest["layers"] = {k: v.to_json() for k, v in db.layers.items()}
    else:
        nbytes, sha = _save(path, CALIB_FILE, {"tokens": tokens}, {"what": "lowc level database calibration tokens"})
        manifest = {"kind": KIND, "version": VERSION, "model": {"fingerprint": model_fingerprint, "source": source},
                    "method": method, "group_size": group_size, "symmetric": symmetric,
                    "calibration": {"source": calib.source, "samples": int(tokens.shape[0]), "seq_len": int(tokens.shape[1]),
                                    "seed": calib_seed, "sha256": calib_sha, "file_bytes": nbytes, "file_sha256": sha},
                    "order": [], "layers": {}}
        _write_json_atomic(mpath, manifest)

    nodes = searched_linears(program)
    if not nodes:
        raise PassOptionError("search: the model has no linears inside transformer blocks to search over")
    order = [linear_layer(n) for n in nodes]
    known = set(manifest["order"])
    manifest["order"] = manifest["order"] + [n for n in order if n not in known]

    def missing(name: str) -> list[int]:
        have = manifest["layers"].get(name, {}).get("levels", {})
        return [b for b in levels if str(b) not in have]

    todo = {n.name for n in nodes if missing(linear_layer(n))}
    total = sum(len(missing(linear_layer(n))) for n in nodes)
    if todo:
        step(f"building the level database in {path}: {total} (layer, level) entries with {method} "
             f"({len(nodes) * len(levels) - total} kept)")

    def store(node, hessian) -> None:
        name = linear_layer(node)
        w = linear_weight(program, node)
        n, k = (int(s) for s in w.shape)
        gs = layer_group_size(k, group_size)
        entry = manifest["layers"].setdefault(name, {"out_features": n, "in_features": k, "group_size": gs, "levels": {}})
        for b in missing(name):
            qw = _quantize(method, w, hessian, b, gs, symmetric, name)
            deq = quant.dequantize(qw.qweight, qw.scales, qw.zeros, b, qw.group_size, k, w.dtype)
            tensors = {"weight": deq, "qweight": qw.qweight, "scales": qw.scales}
            if qw.zeros is not None:
                tensors["zeros"] = qw.zeros
            rel = level_file(name, b)
            nbytes, sha = _save(path, rel, tensors, {"layer": name, "bits": str(b), "group_size": str(gs), "method": method})
            bits = stored_bits(n, k, b, gs, symmetric, n_groups=int(qw.scales.shape[1]))
            entry["levels"][str(b)] = {"file": rel, "bytes": nbytes, "sha256": sha, "bits": bits,
                                       "bits_per_weight": bits / (n * k)}
        _write_json_atomic(mpath, manifest)

    if todo and method == "rtn":
        for node in bar([n for n in nodes if n.name in todo], desc="level database (rtn)", enabled=progress):
            store(node, None)
    elif todo:
        runner = BlockwiseRunner(program, calib, device=device, progress=progress, desc="level database (gptq)")
        for block in runner:
            mine = [n for n in block.linears() if n.name in todo]
            if not mine:
                continue
            hess = stage_hessians(block, mine)
            for node in mine:
                store(node, hess[node.name])
            hess.clear()
        runner.close()
    return LevelDB.open(path)
