"""Reference packed layout of b-bit integer weights (1 <= b <= 8), shared by every dialect op.

Layout (``qweight``, dtype uint8, shape ``[N, K_pad * b // 8]``):
  * ``N`` output features (rows), ``K_pad`` input features padded with zeros to a multiple of the
    group size and of 8, so every row is a whole number of bytes for any ``b``;
  * each run of 8 consecutive values of a row is one little-endian bit string of ``8*b`` bits:
    value ``j`` of the run occupies bits ``[j*b, (j+1)*b)``, and the run is stored as ``b`` bytes,
    least significant first. For b = 4 this is the familiar "two nibbles per byte, low nibble
    first"; for b = 8 it is one value per byte; b = 3 packs 8 values into 3 bytes.
  * values are unsigned codes ``q`` in ``[0, 2^b - 1]``; the real weight is ``(q - zero) * scale``.

Backends may repack into the layout their kernels read (recorded in the artifact manifest); this
layout is the one the reference implementation and the artifact use.
"""

from __future__ import annotations

import torch


def packed_width(k_pad: int, bits: int) -> int:
    """Bytes per row for ``k_pad`` values of ``bits`` bits (``k_pad`` a multiple of 8)."""
    if k_pad % 8:
        raise ValueError(f"packed row length must be a multiple of 8, got {k_pad}")
    return k_pad * bits // 8


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes ``q`` ([N, K_pad], integer, values < 2^bits) into the uint8 layout above."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    n, k = q.shape
    if k % 8:
        raise ValueError(f"packed row length must be a multiple of 8, got {k}")
    runs = q.to(torch.int64).reshape(n, k // 8, 8)
    shifts = torch.arange(8, device=q.device, dtype=torch.int64) * bits
    word = (runs << shifts).sum(dim=-1)  # [N, K/8], 8*bits <= 64 bits (bit 63 may act as sign: fine)
    byte_shifts = torch.arange(bits, device=q.device, dtype=torch.int64) * 8
    out = (word.unsqueeze(-1) >> byte_shifts) & 0xFF  # [N, K/8, bits]
    return out.to(torch.uint8).reshape(n, k // 8 * bits)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack`: uint8 [N, K_pad*bits/8] -> int32 codes [N, K_pad]."""
    n, w = packed.shape
    if w % bits:
        raise ValueError(f"packed width {w} is not a multiple of bits={bits}")
    if 8 % bits == 0:  # 1, 2, 4, 8 bits: whole values per byte, low bits first (same layout, cheaper)
        per = 8 // bits
        shifts = torch.arange(per, device=packed.device, dtype=torch.int32) * bits
        codes = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
        return codes.reshape(n, w * per)
    groups = packed.to(torch.int64).reshape(n, w // bits, bits)
    byte_shifts = torch.arange(bits, device=packed.device, dtype=torch.int64) * 8
    word = (groups << byte_shifts).sum(dim=-1)  # [N, K/8]
    shifts = torch.arange(8, device=packed.device, dtype=torch.int64) * bits
    codes = (word.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.to(torch.int32).reshape(n, w // bits * 8)
