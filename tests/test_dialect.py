"""The lowc dialect ops: reference semantics, fake kernels, operand checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from lowc.ir.dialect import ensure_registered, packing, quant

ensure_registered()
from lowc.ir.dialect import ops  # noqa: E402

linear_wq = torch.ops.lowc.linear_wq.default
linear_wqaq = torch.ops.lowc.linear_wqaq.default


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _operands(n=6, k=40, bits=4, group_size=16, symmetric=False, seed=0):
    """Random codes/scales/zeros and the weight they mean, computed here independently of quant.py."""
    g = _gen(seed)
    gs = group_size
    k_pad = -(-k // gs) * gs
    q = torch.randint(0, 1 << bits, (n, k_pad), generator=g, dtype=torch.int32)
    q[:, k:] = 1 << (bits - 1) if symmetric else 0  # padding (never read)
    scales = torch.rand(n, k_pad // gs, generator=g) * 0.1 + 0.01
    if symmetric:
        zeros = None
        z = torch.full(scales.shape, float(1 << (bits - 1)))
    else:
        zeros = torch.randint(0, 1 << bits, scales.shape, generator=g, dtype=torch.uint8)
        z = zeros.float()
    w = ((q.float().reshape(n, -1, gs) - z[..., None]) * scales[..., None]).reshape(n, k_pad)[:, :k]
    return packing.pack(q, bits), scales, zeros, w


@pytest.mark.parametrize("bits, group_size, symmetric", [(4, 16, False), (3, 8, False), (8, 40, True), (2, 32, True)])
def test_linear_wq_is_linear_with_dequantized_weight(bits, group_size, symmetric):
    n, k = 6, 40
    qweight, scales, zeros, w = _operands(n, k, bits, group_size, symmetric)
    bias = torch.randn(n, generator=_gen(1))
    for x in (torch.randn(5, k, generator=_gen(2)), torch.randn(2, 3, k, generator=_gen(3))):
        y = linear_wq(x, qweight, scales, zeros, bias, bits, group_size, k)
        assert y.shape == (*x.shape[:-1], n)
        torch.testing.assert_close(y, F.linear(x, w, bias), rtol=0, atol=0)
        y0 = linear_wq(x, qweight, scales, zeros, None, bits, group_size, k)
        torch.testing.assert_close(y0, F.linear(x, w), rtol=0, atol=0)


def test_linear_wq_matches_rtn_dequantize():
    w = torch.randn(12, 100, generator=_gen(4))
    qw = quant.rtn_quantize(w, 4, 32, False)
    x = torch.randn(3, 7, 100, generator=_gen(5))
    y = linear_wq(x, qw.qweight, qw.scales, qw.zeros, None, 4, qw.group_size, qw.in_features)
    ref = F.linear(x, quant.dequantize(qw.qweight, qw.scales, qw.zeros, 4, qw.group_size, 100))
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    # and it approximates the float linear (4-bit, g32)
    assert F.cosine_similarity(y.flatten(), F.linear(x, w).flatten(), dim=0) > 0.99


def test_fake_kernels_infer_shapes():
    qweight, scales, zeros, _ = _operands(6, 40, 4, 16)
    mode = FakeTensorMode()
    with mode:
        fq, fs, fz = mode.from_tensor(qweight), mode.from_tensor(scales), mode.from_tensor(zeros)
        x = torch.empty(2, 9, 40, dtype=torch.float32)
        y = linear_wq(x, fq, fs, fz, torch.empty(6), 4, 16, 40)
        assert tuple(y.shape) == (2, 9, 6) and y.dtype == torch.float32
        xh = torch.empty(3, 40, dtype=torch.float16)
        y2 = linear_wqaq(xh, fq, fs, None, None, 4, 16, 40, 8, None)
        assert tuple(y2.shape) == (3, 6) and y2.dtype == torch.float16
        with pytest.raises(ValueError, match="input width 41"):
            linear_wq(torch.empty(2, 41), fq, fs, fz, None, 4, 16, 40)
        with pytest.raises(ValueError, match="act_bits must be in 2..8"):
            linear_wqaq(x, fq, fs, fz, None, 4, 16, 40, 9, None)


def test_bad_operands_raise():
    qweight, scales, zeros, _ = _operands(6, 40, 4, 16)
    x = torch.randn(2, 40)
    with pytest.raises(ValueError, match=r"qweight \(6, 23\) does not match scales \(6, 3\)"):
        linear_wq(x, qweight[:, :23].contiguous(), scales, zeros, None, 4, 16, 40)
    with pytest.raises(ValueError, match=r"does not match scales"):
        linear_wq(x, qweight[:5].contiguous(), scales, zeros, None, 4, 16, 40)
    with pytest.raises(ValueError, match="does not match scales"):
        linear_wq(x, qweight, scales, zeros, None, 3, 16, 40)  # wrong bits for this width
    with pytest.raises(ValueError, match="input width 39 does not match in_features=40"):
        linear_wq(torch.randn(2, 39), qweight, scales, zeros, None, 4, 16, 40)
    with pytest.raises(ValueError, match="in_features=49"):
        linear_wq(torch.randn(2, 49), qweight, scales, zeros, None, 4, 16, 49)  # wider than K_pad=48
    with pytest.raises(ValueError, match="zeros"):
        linear_wq(x, qweight, scales, zeros[:, :2].contiguous(), None, 4, 16, 40)
    with pytest.raises(ValueError, match="bias"):
        linear_wq(x, qweight, scales, zeros, torch.zeros(5), 4, 16, 40)
    with pytest.raises(ValueError, match="uint8"):
        linear_wq(x, qweight.to(torch.int32), scales, zeros, None, 4, 16, 40)
    with pytest.raises(ValueError, match="bits must be in 1..8"):
        linear_wq(x, qweight, scales, zeros, None, 9, 16, 40)


def _sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - out).pow(2).sum()))


def test_linear_wqaq_8bit_activations_close_to_float():
    qweight, scales, zeros, w = _operands(32, 64, 8, 64, symmetric=True, seed=6)
    x = torch.randn(4, 16, 64, generator=_gen(7))
    bias = torch.randn(32, generator=_gen(8))
    y = linear_wqaq(x, qweight, scales, zeros, bias, 8, 64, 64, 8, None)
    ref = F.linear(x, w, bias)
    assert _sqnr_db(ref, y) > 30
    # and activations really are quantized: not identical to the weight-only result, coarser at 4 bits
    assert not torch.equal(y, ref)
    y4 = linear_wqaq(x, qweight, scales, zeros, bias, 8, 64, 64, 4, None)
    assert _sqnr_db(ref, y4) < _sqnr_db(ref, y) - 10


def test_linear_wqaq_dynamic_is_per_token():
    qweight, scales, zeros, w = _operands(8, 16, 4, 16, seed=9)
    x = torch.randn(3, 16, generator=_gen(10))
    x[1] *= 1000.0  # a loud token must not change the quantization of the others
    y = linear_wqaq(x, qweight, scales, zeros, None, 4, 16, 16, 8, None)
    y_alone = linear_wqaq(x[:1], qweight, scales, zeros, None, 4, 16, 16, 8, None)
    torch.testing.assert_close(y[:1], y_alone, rtol=1e-5, atol=1e-5)  # matmul order only


def test_linear_wqaq_static_scale():
    qweight, scales, zeros, w = _operands(8, 16, 4, 16, seed=11)
    x = torch.randn(5, 16, generator=_gen(12))
    s = 0.02
    act_scale = torch.tensor([s])
    y = linear_wqaq(x, qweight, scales, zeros, None, 4, 16, 16, 8, act_scale)
    xq = torch.clamp(torch.round(x / s), -128, 127) * s  # saturates: |x| > 127 * 0.02 for some entries
    assert (x.abs() > 127 * s).any()
    torch.testing.assert_close(y, F.linear(xq, w), rtol=1e-6, atol=1e-6)
    dynamic = linear_wqaq(x, qweight, scales, zeros, None, 4, 16, 16, 8, None)
    assert not torch.allclose(y, dynamic)


def test_register_backend_kernel_rejects_unknown_op():
    with pytest.raises(KeyError, match="lowc::no_such_op"):
        ops.register_backend_kernel("no_such_op", "cpu", lambda *a: None)
    from lowc.ir import dialect

    # the dialect's registry names each op's module, and defining by name defines exactly that op
    assert dialect.OPS["linear_wq"] == dialect.OPS["linear_wqaq"] == "lowc.ir.dialect.ops"
    assert dialect.define("kron_transform") and hasattr(torch.ops.lowc, "kron_transform")
    assert dialect.define("no_such_op") is False
