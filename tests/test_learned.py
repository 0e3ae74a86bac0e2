"""The shared machinery of the learned-transform passes: fake quantization that packs to exactly what
it simulates (``fakequant``), activation clipping through ``lowc::kron_transform`` +
``lowc::linear_wqaq``, the Kronecker op against ``torch.kron``, factorisation, Cayley orthogonality,
smoothing scales (``transforms``), block training (``blocktrain``) and the block runner's two-stream
mode (``propagate="both"``)."""

from __future__ import annotations

import pytest
import torch

import lowc
from lowc.errors import CalibrationError
from lowc.ir.dialect import ensure_registered, quant
from lowc.ir.dialect.kron import kron_apply
from lowc.ir.scheme import Scheme
from lowc.passes.quant import fakequant as FQ
from lowc.passes.quant import transforms as T


def _deq(qw):
    return quant.dequantize(qw.qweight, qw.scales, qw.zeros, qw.bits, qw.group_size, qw.in_features, torch.float32)


@pytest.mark.parametrize("bits,gs,sym,lwc", [(4, 32, False, "group"), (3, 32, True, "channel"), (4, -1, True, None),
                                             (2, 16, False, "group"), (8, -1, False, "channel")])
def test_fake_quant_packs_to_what_it_simulates(bits, gs, sym, lwc):
    torch.manual_seed(0)
    w = torch.randn(12, 40) * torch.exp(torch.randn(40))  # K=40: padded for groups of 32 / 16
    wq = FQ.WeightFakeQuant(w.shape, bits, gs, sym, lwc)
    if lwc:
        with torch.no_grad():
            for p in wq.clip_parameters():
                p.uniform_(-1.0, 5.0)  # some real clipping
    fake = wq(w)
    qw = wq.quantize(w)
    assert torch.equal(fake, _deq(qw))  # bit-exact: lowc::linear_wq computes with the trained weight
    assert qw.bits == bits and qw.in_features == 40 and (qw.zeros is None) == sym


def test_fake_quant_without_clipping_is_rtn():
    torch.manual_seed(1)
    w = torch.randn(16, 72)
    for sym in (False, True):
        ref = quant.rtn_quantize(w, 4, 32, sym)
        ours = FQ.WeightFakeQuant(w.shape, 4, 32, sym, None).quantize(w)
        assert torch.equal(ours.qweight, ref.qweight) and torch.equal(ours.scales, ref.scales)


def test_fake_quant_gradients():
    torch.manual_seed(2)
    w = torch.randn(8, 64, requires_grad=True)
    wq = FQ.WeightFakeQuant(w.shape, 3, 32, False, "group")
    wq(w).pow(2).sum().backward()
    assert torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0  # straight-through rounding: not all zero
    assert wq.up.grad.abs().sum() > 0 and wq.low.grad.abs().sum() > 0  # clipping logits are trained


def test_activation_fake_quant_matches_runtime():
    ensure_registered()
    torch.manual_seed(3)
    x = torch.randn(2, 5, 24) * torch.exp(torch.randn(24))
    torch.testing.assert_close(FQ.fake_quant_act(x, 4), quant.fake_quantize_per_token(x, 4), rtol=0, atol=0)
    # learned clipping in training == the online op's clip followed by the dynamic per-token quantizer
    p1, p2, d = torch.linalg.qr(torch.randn(4, 4))[0], torch.linalg.qr(torch.randn(6, 6))[0], torch.rand(24) + 0.5
    ratio = 0.8
    train = FQ.fake_quant_act(FQ.clip_tokens(kron_apply(x, d, p1, p2), ratio), 4)
    y = torch.ops.lowc.kron_transform(x, d, p1, p2, ratio)
    torch.testing.assert_close(train, quant.fake_quantize_per_token(y, 4), rtol=1e-5, atol=1e-5)


def test_kron_transform_reference_and_checks():
    ensure_registered()
    torch.manual_seed(4)
    x = torch.randn(3, 7, 12)
    p1, p2, d = torch.randn(3, 3), torch.randn(4, 4), torch.rand(12) + 0.5
    want = (x * d) @ torch.kron(p1, p2)
    torch.testing.assert_close(torch.ops.lowc.kron_transform(x, d, p1, p2, None), want, rtol=1e-5, atol=1e-5)
    want = x @ torch.kron(p1, torch.eye(4))  # p2 None: identity
    torch.testing.assert_close(torch.ops.lowc.kron_transform(x, None, p1, None, None), want, rtol=1e-5, atol=1e-5)
    y = torch.ops.lowc.kron_transform(x, None, p1, p2, 0.5)
    bound = (x @ torch.kron(p1, p2)).abs().amax(-1, keepdim=True) * 0.5
    assert (y.abs() <= bound + 1e-6).all()
    with pytest.raises(ValueError, match="input width 12 != 3 x 5"):
        torch.ops.lowc.kron_transform(x, None, p1, torch.eye(5), None)
    with pytest.raises(ValueError, match="clip must lie in"):
        torch.ops.lowc.kron_transform(x, None, p1, p2, 1.5)
    with pytest.raises(ValueError, match="scale"):
        torch.ops.lowc.kron_transform(x, torch.ones(5), p1, p2, None)


def test_factorisation_and_cayley():
    assert T.balanced_factors(4096) == (64, 64)
    assert T.balanced_factors(11008) == (86, 128)
    assert T.balanced_factors(384) == (16, 24)
    assert T.balanced_factors(6) == (2, 3)
    assert T.balanced_factors(97) == (1, 97)
    raw = torch.randn(9, 9)
    q = T.cayley(raw)
    torch.testing.assert_close(q @ q.t(), torch.eye(9), rtol=1e-5, atol=1e-5)
    g = torch.Generator().manual_seed(0)
    r = T.random_orthogonal(5, g)
    torch.testing.assert_close(r @ r.t(), torch.eye(5), rtol=1e-5, atol=1e-5)


def test_runner_both_streams():
    from lowc.frontend.presets import tiny_llama
    from lowc.ir.dialect import quant as q
    from lowc.passes.blockwise import BlockwiseRunner
    from lowc.passes.quant.common import rewrite_linear

    model, _ = tiny_llama(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                          num_key_value_heads=2)
    prog = lowc.trace(model)
    float_prog = prog.clone()
    calib = [torch.randint(0, 259, (1, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    flt = BlockwiseRunner(float_prog, calib, progress=False, propagate="float")
    float_inputs = []
    for block in flt:
        float_inputs.append(block.inputs)
    runner = BlockwiseRunner(prog, calib, progress=False, propagate="both")
    for block in runner:
        fin = block.float_inputs
        want = float_inputs[block.position]
        for a, b in zip(fin, want):
            for u, v in zip(a, b):
                if isinstance(u, torch.Tensor):
                    torch.testing.assert_close(u, v)
        if block.position == 1:  # the quantized stream is what the consumer handed over after block 0
            hidden = block.input_names.index(hidden_name)
            assert all(torch.equal(x[hidden], torch.zeros_like(x[hidden])) for x in block.inputs)
            assert all(x[hidden].abs().sum() > 0 for x in fin)
        for node in block.linears():
            rewrite_linear(prog, node, q.rtn_quantize(prog.attr(node.args[1].target), 2, 32, False), Scheme(2, 32), "rtn")
        if block.position == 0:
            (hidden_name,) = block.output_names
            block.set_outputs([tuple(v * 0 for v in o) for o in block.float_outputs])
    with pytest.raises(CalibrationError, match="no longer the current block"):
        block.set_outputs([])


def test_smoothing_scales_and_absmax():
    """``s = max|X|^α / max|W|^(1−α)`` over the linears sharing the input, clamped away from 0;
    the statistic is a running per-channel max and refuses non-finite activations."""
    a = torch.tensor([4.0, 1.0, 0.0, 9.0])
    w1 = torch.tensor([[1.0, -2.0, 0.5, 0.0], [0.25, 1.0, -1.0, 0.0]])
    w2 = torch.tensor([[-4.0, 0.5, 0.25, 0.0]])
    s = T.smooth_scales(a, [w1, w2], 0.5)
    want = torch.tensor([4.0 ** 0.5 / 4.0 ** 0.5, 1.0 / 2.0 ** 0.5, 1e-5 ** 0.5 / 1.0, 9.0 ** 0.5 / 1e-5 ** 0.5])
    torch.testing.assert_close(s, want)
    torch.testing.assert_close(T.smooth_scales(a, [w1], 1.0), a.clamp(min=1e-5))  # alpha=1: all range to weights
    stats: dict = {}
    T.update_absmax(stats, "x", torch.tensor([[[1.0, -3.0], [-2.0, 0.5]]]), "test")
    T.update_absmax(stats, "x", torch.tensor([[0.5, 4.0]]), "test")
    assert torch.equal(stats["x"], torch.tensor([2.0, 4.0]))
    with pytest.raises(CalibrationError, match="test: non-finite activations reach x in calibration"):
        T.update_absmax(stats, "x", torch.tensor([[float("nan"), 0.0]]), "test")


def test_input_absmax_taps_the_block_copy():
    """input_absmax over a block copy (one interpreter, Tapping, with BlockwiseRunner's hooks) sees
    the same linear inputs as the runner's own hooks."""
    from lowc.frontend.presets import tiny_llama
    from lowc.passes.blockwise import BlockwiseRunner
    from lowc.passes.quant.blocktrain import input_absmax

    model, _ = tiny_llama(num_hidden_layers=1, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                          num_key_value_heads=2)
    prog = lowc.trace(model)
    calib = [torch.randint(0, 259, (1, 12), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    for block in BlockwiseRunner(prog, calib, progress=False):
        names = [n.name for n in block.linears()]
        got = input_absmax(block.module(), names, block.inputs, "cpu", "test")
        want: dict = {}
        block.run(lambda name, x, y: T.update_absmax(want, name, x, "runner"))
        assert set(got) == set(want) == set(names)
        for name in names:
            assert torch.equal(got[name], want[name])
