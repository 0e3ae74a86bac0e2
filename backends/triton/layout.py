"""The weight layout the Triton W4A16/W8A16 kernels read, and its inverse (offline repacking, torch only).

Input: the dialect's reference layout (:mod:`lowc.ir.dialect.packing`): ``qweight`` uint8
``[N, K_pad*b/8]`` (row-major, low bits first), ``scales`` ``[N, G]``, ``zeros`` uint8 ``[N, G]`` or
``None`` (symmetric, zero point ``2^(b-1)``).

Output (:class:`TritonWeight`), layout name :data:`LAYOUT` (``k-packed-int32``):

* ``qweight`` int32 ``[K_pad / P, N]`` with ``P = 32 / b`` codes per word (8 for int4, 4 for int8):
  word ``[r, n]`` holds the codes of weight ``[n, r*P + j]`` for ``j = 0..P-1`` in bits
  ``[j*b, (j+1)*b)``, low bits first (the GPTQ/AutoGPTQ orientation). ``N`` is the contiguous dim,
  so a tile ``[BLOCK_K/P, BLOCK_N]`` is ``BLOCK_K/P`` rows of ``4*BLOCK_N`` contiguous bytes:
  coalesced loads for both the GEMV (one K slice of many output columns) and the ``tl.dot``
  B operand (``[BLOCK_K, BLOCK_N]``, unpacked in registers).
* ``scales`` ``[G, N]`` (the reference values and dtype, transposed) and ``zeros`` uint8 ``[G, N]``
  (or ``None``): one contiguous row of ``BLOCK_N`` values per K tile, since a tile never spans two
  groups (the kernels' block K divides the group size, or the layer has one group).

The codes are unchanged, so for 4 and 8 bits on a little-endian host the word of row ``n`` is the
reference row's bytes read as int32 (``P`` codes of one row, low bits first): repacking is a
reinterpretation plus a transpose (no per-value arithmetic, cheap even for a 128256x4096 ``lm_head``).
A generic shift-and-or path covers other hosts and is tested to agree. :func:`from_reference` and
:func:`to_reference` are exact inverses (tested), so the reference implementation of
``lowc::linear_wq_tr`` dequantizes to exactly the weight ``lowc::linear_wq`` uses.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from lowc.ir.dialect import packing

#: the name recorded in the manifest/backend json
LAYOUT = "k-packed-int32"
#: weight bits the kernels take (codes per 32-bit word: 8 and 4)
SUPPORTED_BITS = (4, 8)


def codes_per_word(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"the Triton layout packs {' or '.join(map(str, SUPPORTED_BITS))}-bit codes, got bits={bits}")
    return 32 // bits


@dataclass(frozen=True)
class TritonWeight:
    qweight: torch.Tensor  # int32 [K_pad / P, N]
    scales: torch.Tensor  # [G, N], the reference dtype
    zeros: torch.Tensor | None  # uint8 [G, N]; None = symmetric
    bits: int
    group_size: int
    in_features: int
    out_features: int

    @property
    def k_pad(self) -> int:
        return self.scales.shape[0] * self.group_size


def _little_endian() -> bool:
    return sys.byteorder == "little"


def pack_words(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes ``[N, K_pad]`` (integers < 2^bits) -> int32 words ``[K_pad/P, N]`` (generic shift path)."""
    p = codes_per_word(bits)
    n, k = codes.shape
    if k % p:
        raise ValueError(f"K_pad={k} is not a multiple of {p} codes per word")
    c = codes.to(torch.int64).reshape(n, k // p, p)
    shifts = torch.arange(p, dtype=torch.int64, device=codes.device) * bits
    word = (c << shifts).sum(dim=-1)  # [N, K/P] in [0, 2^32)
    word = torch.where(word >= 2**31, word - 2**32, word)
    return word.to(torch.int32).t().contiguous()


def unpack_words(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_words`: int32 ``[K_pad/P, N]`` -> int32 codes ``[N, K_pad]``."""
    p = codes_per_word(bits)
    kw, n = words.shape
    shifts = torch.arange(p, dtype=torch.int32, device=words.device) * bits
    codes = (words.t().unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [N, K/P, P]
    return codes.reshape(n, kw * p)


def from_reference(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
                   group_size: int, in_features: int, generic: bool = False) -> TritonWeight:
    """Repack a ``lowc::linear_wq`` weight into the kernel layout (same device as the input)."""
    n, n_groups = scales.shape
    k_pad = n_groups * group_size
    p = codes_per_word(bits)
    if k_pad % p:
        raise ValueError(f"K_pad={k_pad} is not a multiple of {p} codes per word")
    if generic or not _little_endian():
        words = pack_words(packing.unpack(qweight, bits), bits)
    else:
        # bits 4/8: the reference row's bytes, read 4 at a time as little-endian int32, are the words
        words = qweight.contiguous().view(torch.int32).t().contiguous()
    return TritonWeight(
        qweight=words,
        scales=scales.detach().t().contiguous(),
        zeros=None if zeros is None else zeros.t().contiguous(),
        bits=bits, group_size=group_size, in_features=in_features, out_features=n,
    )


def to_reference(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                 bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Inverse of :func:`from_reference`: (qweight uint8 ``[N, K_pad*b/8]``, scales ``[N, G]``, zeros)."""
    if _little_endian():
        codes_per_word(bits)
        q = qweight.t().contiguous().view(torch.uint8)
    else:  # pragma: no cover - big-endian hosts
        q = packing.pack(unpack_words(qweight, bits), bits)
    return q, scales.t().contiguous(), None if zeros is None else zeros.t().contiguous()


# ---- group-sparse layers (``lowc::linear_gsq`` -> ``lowc::linear_gsq_tr``) ------------------------------
#: the layout name of the group-sparse kernels' weights
SPARSE_LAYOUT = "compact-k-packed-int32"


@dataclass(frozen=True)
class SparseTritonWeight:
    """A group-sparse weight in the kernels' layout: the compact rows (:mod:`lowc.ir.dialect.sparse`)
    repacked like a dense weight over ``Kc`` compact positions, and the kept-group indices transposed.

    * ``qweight`` int32 ``[Kc / P, N]``: word ``[r, n]`` holds compact codes ``r*P .. r*P + P - 1``
      of row ``n`` (compact position ``c`` is input ``idx[c // sg, n] * sg + c % sg``);
    * ``scales`` ``[G, N]``, ``zeros`` uint8 ``[G, N]`` or ``None``: groups of ``group_size``
      compact positions (the last may be shorter), as in the reference layout, transposed;
    * ``idx`` int16 ``[n_keep, N]``: kept sparse group ``j`` of every row in one contiguous row
      (a tile of ``BLOCK_N`` columns reads ``2 * BLOCK_N`` contiguous bytes per kept group).
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    idx: torch.Tensor
    bits: int
    group_size: int
    sparse_group: int
    in_features: int
    out_features: int


def sparse_from_reference(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
                          group_size: int, in_features: int, idx: torch.Tensor, sparse_group: int) -> SparseTritonWeight:
    """Repack a ``lowc::linear_gsq`` weight (the compact rows are packed like a dense row of ``Kc``
    codes, ``Kc`` a multiple of 8, so the dense repacking applies as is)."""
    tw = from_reference(qweight, scales, zeros, bits, group_size, in_features)
    return SparseTritonWeight(qweight=tw.qweight, scales=tw.scales, zeros=tw.zeros, idx=idx.t().contiguous(),
                              bits=bits, group_size=group_size, sparse_group=sparse_group, in_features=in_features,
                              out_features=tw.out_features)


def sparse_to_reference(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, idx: torch.Tensor,
                        bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Inverse of :func:`sparse_from_reference`: (qweight, scales, zeros, idx) in the dialect's layout."""
    q, s, z = to_reference(qweight, scales, zeros, bits)
    return q, s, z, idx.t().contiguous()
