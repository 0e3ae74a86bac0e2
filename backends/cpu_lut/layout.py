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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowc.ir.dialect import packing

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
