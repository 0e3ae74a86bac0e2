"""The weight layout the LUT kernel reads, and its inverse (offline repacking, plain PyTorch).

Input: the dialect's reference layout (:mod:`lowc.ir.dialect.packing`): ``qweight`` uint8
``[N, K_pad*b/8]``, ``scales`` ``[N, G]``, ``zeros`` uint8 ``[N, G]`` or ``None``.

Output (``LutWeight``):

* ``weight`` uint8 ``[T, K_pad/8, b, 32]`` with ``T = ceil(N/32)`` row tiles of 32 output rows
  (the last tile padded with code 0). Byte ``[t, p, j, i]`` holds bit ``j`` (bit plane ``j``) of the
  codes of activations ``8p..8p+3`` (low nibble, bit ``i`` of the nibble = activation ``8p+i``) and
  ``8p+4..8p+7`` (high nibble) of row ``t*32 + ROW_OF_BYTE[i]``. One 32-byte load therefore feeds
  two ``pshufb`` lookups (two groups of 4 activations) for 32 rows of one bit plane, and a tile's
  bytes are read front to back exactly once per input row.
* ``ROW_OF_BYTE`` interleaves rows so that after ``unpacklo/hi_epi8`` + ``maddubs`` the int16
  accumulators hold rows 0..15 and 16..31 in order (AVX2 unpacks work within 128-bit lanes).
* ``scales`` float32 ``[N, G]`` and ``zeros`` uint8 ``[N, G]`` (or ``None``): the same values as the
  reference, stored tile by tile: full tiles as ``[G, 32]`` blocks (32 rows' scales of one group
  contiguous), the tail tile of ``r = N % 32`` rows as a ``[G, r]`` block. Shapes stay ``[N, G]``.

``from_reference`` and ``to_reference`` are exact inverses (tested), so the reference implementation
of ``lowc::linear_lut`` dequantizes to exactly the weight ``lowc::linear_wq`` uses.

Group-sparse layout (``lowc::linear_lut_gs``, from ``lowc::linear_gsq``; :mod:`lowc.ir.dialect.sparse`)
------------------------------------------------------------------------------------------------------
Rows do not share their kept groups, so a 32-row tile has no common activations to look up: the
sparse kernel walks one row at a time (``LutSparseWeight``, rows in order, no tiles):

* ``weight`` uint8 ``[N, ceil(nb/2)*16]``: the compact row (``Kc = n_keep*sg`` codes, ``sg`` =
  ``sparse_group``, a multiple of 16) cut into ``nb = Kc/16`` *blocks* of 16 compact positions;
  blocks ``2p`` and ``2p+1`` share 16 bytes: byte ``16p+i`` holds code ``i`` of block ``2p`` in its
  low nibble and code ``i`` of block ``2p+1`` in its high nibble (an odd last block has a zero high
  nibble). One 16-byte load gives 32 codes, unpacked with a shift and a mask. Codes take 4 bits
  whatever ``bits`` (1..4) is: the layout is sized for W4.
* ``mask`` uint8 ``[N, 8*ceil(K_pad/sg/64)]``: per row a bitmask of the kept sparse groups (bit
  ``g % 8`` of byte ``g // 8``; little-endian 64-bit words), i.e. ``idx`` as a set: 1 bit per sparse
  group instead of 16 per kept group (at W4 S50 sg 16, int16 indices would add a quarter to the
  codes' bytes). The kept groups in increasing order are the compact order.
* ``scales`` float32 ``[N, G]`` and ``zeros`` uint8 ``[N, G]`` or ``None``: the reference's, row-major
  (a quantization group of ``group_size`` compact positions, a multiple of 16, covers whole blocks).

``from_sparse_reference`` and ``to_sparse_reference`` are exact inverses (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from lowc.ir.dialect import packing
from lowc.ir.dialect.sparse import padded_sparse_width

TILE = 32
#: byte position i of a 32-byte weight vector -> row within the tile
ROW_OF_BYTE = tuple(list(range(0, 8)) + list(range(16, 24)) + list(range(8, 16)) + list(range(24, 32)))


@dataclass(frozen=True)
class LutWeight:
    weight: torch.Tensor  # uint8 [T, K_pad/8, bits, 32]
    scales: torch.Tensor  # float32 [N, G], tile-blocked
    zeros: torch.Tensor | None  # uint8 [N, G], tile-blocked; None = symmetric
    bits: int
    group_size: int
    in_features: int
    out_features: int


def _block_rows(t: torch.Tensor) -> torch.Tensor:
    """[N, G] row-major -> [N, G] tile-blocked (full tiles [G, 32], tail [G, r])."""
    n, g = t.shape
    full = n // TILE * TILE
    parts = [t[:full].reshape(n // TILE, TILE, g).transpose(1, 2).reshape(-1)]
    if full < n:
        parts.append(t[full:].transpose(0, 1).reshape(-1))
    return torch.cat(parts).reshape(n, g)


def _unblock_rows(t: torch.Tensor) -> torch.Tensor:
    n, g = t.shape
    full = n // TILE * TILE
    flat = t.reshape(-1)
    head = flat[: full * g].reshape(n // TILE, g, TILE).transpose(1, 2).reshape(full, g)
    if full == n:
        return head.contiguous()
    tail = flat[full * g:].reshape(g, n - full).transpose(0, 1)
    return torch.cat([head, tail]).contiguous()


def from_reference(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
                   group_size: int, in_features: int) -> LutWeight:
    """Repack a ``lowc::linear_wq`` weight into the LUT layout."""
    n, n_groups = scales.shape
    k_pad = n_groups * group_size
    codes = packing.unpack(qweight.cpu(), bits).to(torch.uint8)  # [N, K_pad]
    tiles = -(-n // TILE)
    if tiles * TILE != n:
        codes = torch.cat([codes, codes.new_zeros(tiles * TILE - n, k_pad)])
    # [T, 32 rows, K_pad/8 pairs, 2 halves, 4 activations]
    c = codes.reshape(tiles, TILE, k_pad // 8, 2, 4).to(torch.int32)
    shifts = torch.arange(bits, dtype=torch.int32)
    planes = (c.unsqueeze(-1) >> shifts) & 1  # [T, 32, P, 2, 4, b]
    nib = (planes << torch.arange(4, dtype=torch.int32).view(4, 1)).sum(dim=-2)  # [T, 32, P, 2, b]
    byte = nib[:, :, :, 0, :] | (nib[:, :, :, 1, :] << 4)  # [T, 32, P, b]
    byte = byte[:, list(ROW_OF_BYTE)]  # byte position order
    weight = byte.permute(0, 2, 3, 1).contiguous().to(torch.uint8)  # [T, P, b, 32]
    return LutWeight(
        weight=weight,
        scales=_block_rows(scales.detach().cpu().float()),
        zeros=None if zeros is None else _block_rows(zeros.cpu()),
        bits=bits, group_size=group_size, in_features=in_features, out_features=n,
    )


def to_reference(weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
                 group_size: int, out_features: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Inverse of :func:`from_reference`: (qweight, scales float32, zeros) in the reference layout."""
    tiles, pairs, b, _ = weight.shape
    byte = weight.to(torch.int32).permute(0, 3, 1, 2)  # [T, 32 positions, P, b]
    inv = [0] * TILE
    for pos, row in enumerate(ROW_OF_BYTE):
        inv[row] = pos
    byte = byte[:, inv]  # [T, 32 rows, P, b]
    nib = torch.stack([byte & 15, byte >> 4], dim=3)  # [T, 32, P, 2, b]
    bitsv = (nib.unsqueeze(-2) >> torch.arange(4, dtype=torch.int32).view(4, 1)) & 1  # [T, 32, P, 2, 4, b]
    codes = (bitsv << torch.arange(b, dtype=torch.int32)).sum(dim=-1)  # [T, 32, P, 2, 4]
    codes = codes.reshape(tiles * TILE, pairs * 8)[:out_features]
    return (packing.pack(codes, bits), _unblock_rows(scales),
            None if zeros is None else _unblock_rows(zeros))


@dataclass(frozen=True)
class LutSparseWeight:
    weight: torch.Tensor  # uint8 [N, ceil(nb/2)*16], block pairs as nibbles
    mask: torch.Tensor  # uint8 [N, 8*words], kept sparse groups
    scales: torch.Tensor  # float32 [N, G]
    zeros: torch.Tensor | None  # uint8 [N, G]; None = symmetric
    bits: int
    group_size: int
    sparse_group: int
    n_keep: int
    in_features: int
    out_features: int


def mask_words(in_features: int, sparse_group: int) -> int:
    """64-bit words of a row's kept-group mask."""
    return -(-(padded_sparse_width(in_features, sparse_group) // sparse_group) // 64)


def sparse_weight_bytes(n_keep: int, sparse_group: int) -> int:
    """Bytes of one row of ``LutSparseWeight.weight``."""
    return -(-(n_keep * sparse_group // 16) // 2) * 16


def from_sparse_reference(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, idx: torch.Tensor,
                          bits: int, group_size: int, sparse_group: int, in_features: int) -> LutSparseWeight:
    """Repack a ``lowc::linear_gsq`` weight into the group-sparse LUT layout (``sparse_group`` and
    ``group_size`` multiples of 16: the caller checks)."""
    n, n_keep = idx.shape
    kc = n_keep * sparse_group
    codes = packing.unpack(qweight.cpu(), bits)[:, :kc].to(torch.uint8)
    row = sparse_weight_bytes(n_keep, sparse_group)
    codes = torch.nn.functional.pad(codes, (0, 2 * row - kc)).reshape(n, row // 16, 2, 16)
    weight = (codes[:, :, 0] | (codes[:, :, 1] << 4)).reshape(n, row).contiguous()
    words = mask_words(in_features, sparse_group)
    kept = torch.zeros(n, words * 64, dtype=torch.uint8)
    kept.scatter_(1, idx.cpu().long(), 1)
    mask = (kept.reshape(n, words * 8, 8) << torch.arange(8, dtype=torch.uint8)).sum(-1).to(torch.uint8)
    return LutSparseWeight(weight=weight, mask=mask, scales=scales.detach().cpu().float().contiguous(),
                           zeros=None if zeros is None else zeros.cpu().contiguous(), bits=bits, group_size=group_size,
                           sparse_group=sparse_group, n_keep=n_keep, in_features=in_features, out_features=n)


def to_sparse_reference(weight: torch.Tensor, mask: torch.Tensor, bits: int, sparse_group: int,
                        n_keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`from_sparse_reference` for the codes and indices: (qweight, idx int16)."""
    n, row = weight.shape
    nib = torch.stack([weight & 15, weight >> 4], dim=2).reshape(n, row // 16, 16, 2).transpose(2, 3)
    codes = nib.reshape(n, 2 * row)[:, : n_keep * sparse_group].to(torch.int32)
    kept = (mask.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1  # [N, bytes, 8]
    idx = kept.reshape(n, -1).nonzero()[:, 1].reshape(n, n_keep).to(torch.int16)
    return packing.pack(codes, bits), idx
