"""Kernel configurations for the W4A16/W8A16 Triton kernels: the candidate lists, fitting a
candidate to a layer, a heuristic default, and autotuning with an on-disk cache.

Candidates (``DECODE`` for M <= 16, ``PREFILL`` above) are deliberately few: each is timed with
``triton.testing.do_bench`` on first use of a (device, triton version, bits, group, symmetric, dtype,
N, K_pad, M bucket) key, the fastest is kept in memory and in
``$LOWC_CACHE_DIR/triton/autotune.json`` (default ``~/.cache/lowc``), so a model autotunes each of
its layer shapes once per machine. M buckets are powers of two (1, 2, 4, 8, 16, 32, ... 4096), so a
prefill of 300 tokens uses the 512 entry.

* ``gemv`` (decode): ``BLOCK_N`` output columns per program, ``BLOCK_K`` input features per K tile,
  one activation row per program; split-K picked so that the grid fills the GPU (about two programs
  per SM), and its half and double are tried too.
* ``gemm`` with ``BLOCK_M = 16`` (decode, M = 2..16): tensor cores on a 16-row tile, split-K as above.
* ``gemm`` (prefill): the usual tile shapes for fp16 GEMMs on Ampere/Hopper, each with both B-unpack
  variants (repeated-address loads or a reshape).

``fit`` adapts ``BLOCK_K`` to the layer: a K tile must lie inside one group, so for grouped layers
``BLOCK_K`` becomes the largest power of two that divides the group size (and is at most the
candidate's), at least 16 (``tl.dot``'s minimum) and a multiple of the codes per word.

Group-sparse layers (``lowc::linear_gsq_tr``, ``Problem.sparse_group > 0``) use the same candidates,
fitted by :func:`_fit_sparse`: the GEMV tiles the compact row (any ``BLOCK_K``, split-K as above),
the GEMM's ``BLOCK_K`` is at least the sparse group and it does not split K.

Autotuning runs only for CUDA tensors outside CUDA-graph capture and when ``LOWC_TRITON_AUTOTUNE``
is not ``0``; otherwise :func:`heuristic` picks (also what the interpreter uses).
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from dataclasses import asdict, dataclass, fields, replace

from lowc.errors import KernelError

#: SMs assumed when the device cannot be asked (the interpreter)
DEFAULT_SMS = 132


@dataclass(frozen=True)
class Config:
    kernel: str  # "gemv" | "gemm"
    block_n: int
    block_k: int
    block_m: int = 1
    split_k: int = 1
    group_m: int = 8
    unpack: int = 0  # gemm: 0 = repeated-address loads, 1 = load words + reshape
    num_warps: int = 4
    num_stages: int = 2

    def to_json(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_json(d: dict) -> "Config":
        """A config from the autotune cache, which is untrusted like any file lowc reads: exactly the
        known fields, each an int in its range (block sizes powers of two); TypeError otherwise."""
        names = [f.name for f in fields(Config)]
        if not isinstance(d, dict) or set(d) != set(names) or d["kernel"] not in ("gemv", "gemm"):
            raise TypeError("not an autotune config")
        for k in names[1:]:
            v = d[k]
            lo, hi = _RANGES[k]
            if not (type(v) is int and lo <= v <= hi) or (k.startswith("block") and v & (v - 1)):
                raise TypeError(f"autotune config field {k}={v!r} out of range")
        return Config(**d)

    @property
    def label(self) -> str:
        if self.kernel == "gemv":
            return f"gemv n{self.block_n} k{self.block_k} s{self.split_k} w{self.num_warps}"
        return (f"gemm m{self.block_m} n{self.block_n} k{self.block_k} s{self.split_k} u{self.unpack} "
                f"w{self.num_warps} st{self.num_stages}")


#: the range of each integer field a cached config may hold
_RANGES = {"block_n": (16, 1024), "block_k": (16, 1024), "block_m": (1, 256), "split_k": (0, 64), "group_m": (1, 64),
           "unpack": (0, 1), "num_warps": (1, 32), "num_stages": (1, 8)}


# split_k=0 means "pick for the grid" (see split_for)
DECODE: tuple[Config, ...] = (
    Config("gemv", block_n=128, block_k=128, split_k=0, num_warps=4, num_stages=2),
    Config("gemv", block_n=256, block_k=128, split_k=0, num_warps=4, num_stages=2),
    Config("gemv", block_n=64, block_k=256, split_k=0, num_warps=4, num_stages=2),
    Config("gemv", block_n=128, block_k=256, split_k=0, num_warps=8, num_stages=2),
    # wider tiles: more bytes in flight per program (with groups of 128 a K tile holds at most 16 word rows)
    Config("gemv", block_n=256, block_k=128, split_k=0, num_warps=8, num_stages=3),
    Config("gemv", block_n=512, block_k=128, split_k=0, num_warps=8, num_stages=2),
    Config("gemm", block_m=16, block_n=64, block_k=128, split_k=0, unpack=1, num_warps=4, num_stages=3),
    Config("gemm", block_m=16, block_n=128, block_k=128, split_k=0, unpack=1, num_warps=4, num_stages=3),
    Config("gemm", block_m=16, block_n=128, block_k=128, split_k=0, unpack=0, num_warps=4, num_stages=2),
)

# unpack=0 pipelines a [BLOCK_K, BLOCK_N] int32 tile per stage (P times the packed bytes: ~170 KB of
# shared memory at 128x128x64 and 4 stages), so its variants use 2 stages
PREFILL: tuple[Config, ...] = tuple(
    replace(c, unpack=u, num_stages=c.num_stages if u else 2) for c in (
        Config("gemm", block_m=128, block_n=128, block_k=64, num_warps=4, num_stages=4),
        Config("gemm", block_m=128, block_n=256, block_k=64, num_warps=8, num_stages=3),
        Config("gemm", block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=4),
        Config("gemm", block_m=128, block_n=128, block_k=128, num_warps=8, num_stages=3),
        Config("gemm", block_m=64, block_n=64, block_k=128, num_warps=4, num_stages=3),
        Config("gemm", block_m=32, block_n=128, block_k=128, num_warps=4, num_stages=3),
        # dequantizing a B tile costs about as much issue time as its 128-row MMA on Hopper: 256 rows halve it
        Config("gemm", block_m=256, block_n=128, block_k=64, num_warps=8, num_stages=3),
    ) for u in (1, 0)
)

#: M <= this uses the DECODE candidates
DECODE_MAX_M = 16


@dataclass(frozen=True)
class Problem:
    """What a kernel launch depends on besides the data."""

    m: int
    n: int
    k: int  # in_features
    k_pad: int
    bits: int
    group_size: int
    n_groups: int
    symmetric: bool
    dtype: str  # "float16" | "bfloat16" | "float32"
    sparse_group: int = 0  # group-sparse layers (lowc::linear_gsq_tr): inputs per kept group; 0 = dense
    n_keep: int = 0  # group-sparse layers: kept sparse groups per row

    @property
    def pack(self) -> int:
        return 32 // self.bits

    @property
    def k_compact(self) -> int:
        """Compact positions per row of a group-sparse layer (what its GEMV walks)."""
        return self.n_keep * self.sparse_group


def m_bucket(m: int) -> int:
    b = 1
    while b < m and b < 4096:
        b *= 2
    return b


def split_for(blocks: int, num_tiles: int, sms: int) -> int:
    """Smallest power-of-two split-K giving about two programs per SM (at most 16, at most the tiles)."""
    s = 1
    while blocks * s < 2 * sms and s * 2 <= min(16, num_tiles):
        s *= 2
    return s


def fit(cfg: Config, p: Problem, sms: int = DEFAULT_SMS) -> Config | None:
    """``cfg`` adapted to problem ``p`` (block K to the group, split-K resolved), or None if it cannot run."""
    if p.sparse_group:
        return _fit_sparse(cfg, p, sms)
    bk = cfg.block_k
    if p.n_groups > 1:
        while bk > 1 and p.group_size % bk:
            bk //= 2
    min_k = 16 if cfg.kernel == "gemm" else p.pack
    if bk < min_k or bk % p.pack:
        return None
    num_tiles = -(-p.k_pad // bk)
    split = cfg.split_k
    if split == 0:
        m_blocks = p.m if cfg.kernel == "gemv" else -(-p.m // cfg.block_m)
        split = split_for(-(-p.n // cfg.block_n) * m_blocks, num_tiles, sms)
    split = max(1, min(split, num_tiles))
    return replace(cfg, block_k=bk, split_k=split)


def _fit_sparse(cfg: Config, p: Problem, sms: int) -> Config:
    """A group-sparse layer: the GEMV tiles the compact row (per-row scales: any ``BLOCK_K``), split-K
    over it; the GEMM tiles the padded input with ``BLOCK_K`` a multiple of the sparse group (a power
    of two) and walks each column's kept groups in order, so it does not split K."""
    if cfg.kernel == "gemv":
        num_tiles = -(-p.k_compact // cfg.block_k)
        split = cfg.split_k or split_for(-(-p.n // cfg.block_n) * p.m, num_tiles, sms)
        return replace(cfg, split_k=max(1, min(split, num_tiles)))
    return replace(cfg, block_k=max(cfg.block_k, p.sparse_group), split_k=1, unpack=0)


def candidates(p: Problem, sms: int = DEFAULT_SMS) -> list[Config]:
    """The fitted candidate list for ``p`` (decode: each split-K also at half and double)."""
    out: list[Config] = []
    base = DECODE if p.m <= DECODE_MAX_M else PREFILL
    for c in base:
        f = fit(c, p, sms)
        if f is None:
            continue
        variants = [f]
        if c.split_k == 0 and not (p.sparse_group and f.kernel == "gemm"):
            num_tiles = -(-(p.k_compact if p.sparse_group else p.k_pad) // f.block_k)
            variants += [replace(f, split_k=s) for s in (f.split_k // 2, f.split_k * 2) if 1 <= s <= min(32, num_tiles)]
        for v in variants:
            if v not in out:
                out.append(v)
    return out


def heuristic(p: Problem, sms: int = DEFAULT_SMS) -> Config:
    """A reasonable config without timing anything."""
    if p.m == 1:
        base = DECODE[0]
    elif p.m <= DECODE_MAX_M:
        base = next(c for c in DECODE if c.kernel == "gemm")  # BLOCK_M = 16
    elif p.m <= 64:
        base = PREFILL[2 * 5]  # 32 x 128 x 128, unpack 1
    else:
        base = PREFILL[0]
    f = fit(base, p, sms)
    if f is None:  # a group size the preferred tile does not divide: the first candidate that fits
        cs = candidates(p, sms)
        if not cs:

            raise KernelError(f"lowc::linear_wq_tr: no Triton kernel configuration fits N={p.n}, K_pad={p.k_pad}, "
                              f"group_size={p.group_size}, bits={p.bits} (group sizes must be multiples of 16)")
        f = cs[0]
    return f


# ---- cache ---------------------------------------------------------------------------------------------
_lock = threading.Lock()
_memory: dict[str, dict] = {}
_loaded_from: str | None = None


def cache_path() -> str:
    base = os.environ.get("LOWC_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "lowc")
    return os.path.join(base, "triton", "autotune.json")


def key(p: Problem, device_name: str, triton_version: str) -> str:
    g = "pc" if p.n_groups == 1 else f"g{p.group_size}"
    sp = f"|S{p.sparse_group}x{p.n_keep}" if p.sparse_group else ""
    return (f"{device_name}|triton-{triton_version}|w{p.bits}{g}{'s' if p.symmetric else 'a'}|{p.dtype}"
            f"|N{p.n}|K{p.k_pad}{sp}|M{m_bucket(p.m)}")


def _load() -> dict[str, dict]:
    global _loaded_from
    path = cache_path()
    if _loaded_from != path:
        _memory.clear()
        try:
            with open(path) as f:
                data = json.load(f)
            if isinstance(data, dict):
                _memory.update({k: v for k, v in data.items() if isinstance(v, dict) and "config" in v})
        except (OSError, ValueError):
            pass
        _loaded_from = path
    return _memory


def lookup(k: str) -> Config | None:
    with _lock:
        entry = _load().get(k)
    if entry is None:
        return None
    try:
        return Config.from_json(entry["config"])
    except TypeError:  # written by another lowc version
        return None


def store(k: str, cfg: Config, timings_us: dict[str, float]) -> None:
    with _lock:
        mem = _load()
        mem[k] = {"config": cfg.to_json(), "timings_us": timings_us}
        path = cache_path()
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".autotune-", suffix=".json")
            with os.fdopen(fd, "w") as f:
                json.dump(mem, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except OSError:  # a read-only home: keep the in-memory result
            pass


def clear_memory() -> None:
    """Forget the in-memory cache (the file is re-read on next use)."""
    global _loaded_from
    with _lock:
        _memory.clear()
        _loaded_from = None


def tune(p: Problem, run, device_name: str, triton_version: str, sms: int) -> Config:
    """The fastest candidate for ``p`` (cached). ``run(cfg)`` launches the kernel once."""
    k = key(p, device_name, triton_version)
    hit = lookup(k)
    if hit is not None:
        return hit
    from triton.testing import do_bench

    timings: dict[str, float] = {}
    best, best_t = None, float("inf")
    for cfg in candidates(p, sms):
        try:
            t = do_bench(lambda c=cfg: run(c), warmup=5, rep=20) * 1e3
        except Exception:  # a config this GPU cannot compile or run (e.g. out of shared memory)
            continue
        timings[cfg.label] = round(float(t), 2)
        if t < best_t:
            best, best_t = cfg, t
    if best is None:
        best = heuristic(p, sms)
    store(k, best, timings)
    return best
