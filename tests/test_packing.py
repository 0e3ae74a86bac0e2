"""The reference packed layout (lowc.ir.dialect.packing) and RTN arithmetic (lowc.ir.dialect.quant)."""

from __future__ import annotations

import pytest
import torch

from lowc.ir.dialect import packing, quant


def _codes(n: int, k: int, bits: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1 << bits, (n, k), generator=g, dtype=torch.int32)


# ---- pack / unpack -----------------------------------------------------------------------------


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 3, 7])
def test_pack_unpack_round_trip(bits, n):
    q = _codes(n, 40, bits, seed=bits * 10 + n)
    packed = packing.pack(q, bits)
    assert packed.dtype == torch.uint8
    assert tuple(packed.shape) == (n, packing.packed_width(40, bits)) == (n, 40 * bits // 8)
    out = packing.unpack(packed, bits)
    assert out.dtype == torch.int32
    torch.testing.assert_close(out, q, rtol=0, atol=0)


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_extreme_codes(bits):
    # all-ones codes set every bit (bit 63 of the 64-bit word for b=8): must survive the round trip
    maxq = (1 << bits) - 1
    q = torch.tensor([[maxq] * 8, [0] * 8, [maxq, 0] * 4], dtype=torch.int32)
    packed = packing.pack(q, bits)
    assert packed[0].tolist() == [255] * bits
    assert packed[1].tolist() == [0] * bits
    torch.testing.assert_close(packing.unpack(packed, bits), q, rtol=0, atol=0)


def test_layout_4bit_low_nibble_first():
    q = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 15]], dtype=torch.int32)
    assert packing.pack(q, 4).tolist() == [[0x21, 0x43, 0x65, 0xF7]]


def test_layout_3bit_eight_values_in_three_bytes():
    # values 1..7,0: bit string (LSB first) 100 010 110 001 101 011 111 000
    # byte0 = v0 | v1<<3 | (v2&3)<<6 = 1 | 16 | 192 = 0xD1
    # byte1 = v2>>2 | v3<<1 | v4<<4 | (v5&1)<<7 = 0 | 8 | 80 | 0 = 0x58
    # byte2 = v5>>1 | v6<<2 | v7<<5 = 3 | 28 | 0 = 0x1F
    q = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0]], dtype=torch.int32)
    packed = packing.pack(q, 3)
    assert packed.shape == (1, 3)
    assert packed.tolist() == [[0xD1, 0x58, 0x1F]]


def test_layout_1bit_and_8bit():
    q1 = torch.tensor([[1, 0, 0, 0, 0, 0, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0]], dtype=torch.int32)
    assert packing.pack(q1, 1).tolist() == [[0x81, 0x02]]
    q8 = torch.tensor([[0, 1, 127, 128, 200, 255, 7, 9]], dtype=torch.int32)
    assert packing.pack(q8, 8).tolist() == q8.tolist()


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="bits must be in 1..8"):
        packing.pack(_codes(2, 8, 4), 9)
    with pytest.raises(ValueError, match="bits must be in 1..8"):
        packing.pack(_codes(2, 8, 4), 0)
    with pytest.raises(ValueError, match="multiple of 8"):
        packing.pack(_codes(2, 12, 4), 4)
    with pytest.raises(ValueError, match="multiple of 8"):
        packing.packed_width(12, 4)
    with pytest.raises(ValueError, match="not a multiple of bits=3"):
        packing.unpack(torch.zeros(2, 4, dtype=torch.uint8), 3)


# ---- RTN quantize / dequantize -----------------------------------------------------------------


def _weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    w[0] += 0.5  # an all-positive-ish row: asymmetric ranges are widened to include 0
    return w


def _group_error(w: torch.Tensor, qw: quant.QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """Max abs error per (row, group) and the matching scales."""
    deq = quant.dequantize(qw.qweight, qw.scales, qw.zeros, qw.bits, qw.group_size, qw.in_features)
    assert deq.shape == w.shape
    err = torch.nn.functional.pad((deq - w).abs(), (0, qw.k_pad - w.shape[1]))
    return err.reshape(w.shape[0], -1, qw.group_size).amax(-1), qw.scales.float()


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
def test_rtn_error_at_most_half_a_step(bits, group_size, symmetric):
    n, k = 5, 200  # K = 200 is not a multiple of 64 or 128: padded
    w = _weight(n, k, seed=bits)
    qw = quant.rtn_quantize(w, bits, group_size, symmetric)
    gs = group_size if group_size != -1 else 200
    k_pad = -(-k // gs) * gs
    assert qw.group_size == gs and qw.k_pad == k_pad and qw.in_features == k
    assert tuple(qw.qweight.shape) == (n, k_pad * bits // 8)
    assert tuple(qw.scales.shape) == (n, k_pad // gs)
    assert qw.scales.dtype == w.dtype
    if symmetric:
        assert qw.zeros is None
    else:
        assert qw.zeros.dtype == torch.uint8 and qw.zeros.shape == qw.scales.shape
        assert int(qw.zeros.max()) <= (1 << bits) - 1
    err, scale = _group_error(w, qw)
    assert torch.all(err <= scale / 2 * (1 + 1e-5) + 1e-7), (err / scale).max()
    # and it really is round-to-nearest, not something coarser: the worst group uses most of the bound
    assert (err / scale).max() > 0.4


@pytest.mark.parametrize("k, group_size, k_pad, gs", [(100, 32, 128, 32), (100, -1, 104, 104), (64, 64, 64, 64), (8, 128, 128, 128)])
def test_padding(k, group_size, k_pad, gs):
    assert quant.padded_in_features(k, group_size) == (gs, k_pad)
    w = _weight(3, k, seed=k)
    qw = quant.rtn_quantize(w, 4, group_size, False)
    assert qw.k_pad == k_pad and qw.group_size == gs
    # padded columns hold the code of 0.0: they dequantize to exactly zero
    full = quant.dequantize(qw.qweight, qw.scales, qw.zeros, 4, gs, k_pad)
    assert torch.all(full[:, k:] == 0)
    assert quant.dequantize(qw.qweight, qw.scales, qw.zeros, 4, gs, k).shape == (3, k)


def test_rtn_rejects_bad_options():
    w = _weight(2, 64)
    with pytest.raises(ValueError, match="bits must be in 1..8"):
        quant.rtn_quantize(w, 0, 32, False)
    with pytest.raises(ValueError, match="bits must be in 1..8"):
        quant.rtn_quantize(w, 9, 32, False)
    with pytest.raises(ValueError, match="group_size must be a multiple of 8"):
        quant.rtn_quantize(w, 4, 100, False)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_symmetric_zero_point_convention(bits):
    w = _weight(4, 64, seed=3)
    w[:, 5] = 0.0
    qw = quant.rtn_quantize(w, bits, 32, True)
    assert qw.zeros is None
    half = 1 << (bits - 1)
    codes = packing.unpack(qw.qweight, bits)
    assert torch.all(codes[:, 5] == half)  # 0.0 is code 2^(b-1)
    # zeros=None means a zero point of 2^(b-1) in every group
    explicit = torch.full(qw.scales.shape, half, dtype=torch.uint8)
    a = quant.dequantize(qw.qweight, qw.scales, None, bits, 32, 64)
    b = quant.dequantize(qw.qweight, qw.scales, explicit, bits, 32, 64)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # absmax scale: scale = 2 * absmax / (2^b - 1) per group
    amax = w.reshape(4, 2, 32).abs().amax(-1)
    torch.testing.assert_close(qw.scales, 2 * amax / ((1 << bits) - 1))


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
def test_all_zero_group_is_exact(symmetric):
    w = _weight(3, 96, seed=5)
    w[1, 32:64] = 0.0  # one whole group of row 1
    w[2] = 0.0  # a whole row
    qw = quant.rtn_quantize(w, 4, 32, symmetric)
    deq = quant.dequantize(qw.qweight, qw.scales, qw.zeros, 4, 32, 96)
    assert torch.all(deq[1, 32:64] == 0) and torch.all(deq[2] == 0)
    assert qw.scales[1, 1] == 1 and torch.all(qw.scales[2] == 1)  # finite, non-zero scale
    assert torch.isfinite(deq).all()


def test_asymmetric_zero_is_representable_exactly():
    # the range always contains 0, so 0.0 weights stay 0.0 after quantization
    w = _weight(4, 64, seed=11).abs() + 0.1  # all positive: min is widened to 0
    w[:, ::7] = 0.0
    qw = quant.rtn_quantize(w, 3, 32, False)
    deq = quant.dequantize(qw.qweight, qw.scales, qw.zeros, 3, 32, 64)
    assert torch.all(deq[:, ::7] == 0)


def test_dequantize_dtype():
    w = _weight(2, 32).to(torch.bfloat16)
    qw = quant.rtn_quantize(w, 4, 32, False)
    assert qw.scales.dtype == torch.bfloat16
    assert quant.dequantize(qw.qweight, qw.scales, qw.zeros, 4, 32, 32).dtype == torch.bfloat16
    assert quant.dequantize(qw.qweight, qw.scales, qw.zeros, 4, 32, 32, dtype=torch.float32).dtype == torch.float32
