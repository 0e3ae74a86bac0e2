"""prune: the masks (exact per-row sparsity, N:M), SparseGPT vs Wanda vs magnitude on a seeded layer,
the pass on a tiny Llama (printed graph, prune then GPTQ/RTN keeps the zeros, SparseGPT's joint
mode, idempotence), options, missing calibration, and bad options / inspect through the installed CLI."""

from __future__ import annotations

import pytest
import torch

import lowc
from conftest import check_needs_finite_calibration, check_options_round_trip, run_lowc
from lowc.ir import meta as nodemeta
from lowc.ir import printer
from lowc.ir.dialect import quant
from lowc.ir.dialect.args import LinearArgs, LinearQArgs
from lowc.passes.base import PassContext
from lowc.passes.calibration import load_calibration
from lowc.passes.pipeline import run_passes
from lowc.passes.quant.gptq import gptq_quantize, obs_sweep
from lowc.passes.quant.prune import Prune, prune_mask, sparsegpt_select
from test_cli import assert_clean_error


def nm_holds(w: torch.Tensor, n: int, m: int) -> bool:
    """Every group of ``m`` consecutive weights of a row (from column 0) has at most ``n`` nonzeros."""
    k = w.shape[1] // m * m
    return bool(((w[:, :k] != 0).reshape(w.shape[0], -1, m).sum(-1) <= n).all())


def test_prune_mask_exact_per_row_and_nm():
    torch.manual_seed(0)
    score = torch.rand(16, 100)
    m = prune_mask(score, 0.3, None)
    assert (m.sum(1) == 30).all()  # exactly round(0.3·100) per row
    assert all(score[r][m[r]].max() < score[r][~m[r]].min() for r in range(16))  # the lowest scores of each row
    m24 = prune_mask(score, 0.5, (2, 4))
    assert (m24.reshape(16, 25, 4).sum(-1) == 2).all()
    m48 = prune_mask(score[:, :99], 0.5, (4, 8))  # 12 full groups + a trailing 3 columns (2 pruned: round(1.5) halves up)
    assert (m48[:, :96].reshape(16, 12, 8).sum(-1) == 4).all() and (m48[:, 96:].sum(1) == 2).all()


@pytest.fixture(scope="module")
def layer():
    """A seeded [64, 256] weight and calibration inputs with uneven, correlated channels (as real
    activations have: a few channels carry most of the energy)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g)
    x = torch.randn(1024, 256, generator=g) @ (torch.eye(256) + torch.randn(256, 256, generator=g) / 16)
    x = x * torch.exp(torch.randn(256, generator=g))
    H = 2 * x.t() @ x / x.shape[0]
    return w, x, H


def _mse(w, wp, x):
    return ((x @ w.t() - x @ wp.t()) ** 2).mean().item()


@pytest.mark.parametrize("nm", [None, (2, 4), (4, 8)])
def test_sparsegpt_below_wanda_below_magnitude(layer, nm):
    w, x, H = layer
    norms = x.norm(dim=0)
    mag = w.masked_fill(prune_mask(w.abs(), 0.5, nm), 0)
    wanda = w.masked_fill(prune_mask(w.abs() * norms, 0.5, nm), 0)
    sgpt = obs_sweep(w, H, None, -1, False, select=sparsegpt_select(0.5, nm, 256))["Q"]
    for wp in (mag, wanda, sgpt):
        assert ((wp == 0).sum(1) == 128).all()  # exactly half of every row
        if nm:
            assert nm_holds(wp, *nm)
    e_s, e_w, e_m = _mse(w, sgpt, x), _mse(w, wanda, x), _mse(w, mag, x)
    # measured (unstructured / 2:4 / 4:8): sparsegpt 0.76/0.75/0.74x wanda, wanda 0.09/0.21/0.15x magnitude
    assert e_s < 0.85 * e_w and e_w < 0.5 * e_m, (e_s, e_w, e_m)


def test_joint_mode_and_fixed_mask_layer(layer):
    """SparseGPT's joint prune+quantize: pruned weights dequantize to exactly 0, the 2:4 pattern
    holds, and the error is below pruning then RTN; GPTQ with a fixed mask keeps it."""
    w, x, H = layer
    qw, info = gptq_quantize(w, H, 4, 128, False, select=sparsegpt_select(0.5, (2, 4), 256))
    deq = quant.dequantize(qw.qweight, qw.scales, qw.zeros, 4, 128, 256, torch.float32)
    assert bool((deq[info["mask"]] == 0).all())
    assert nm_holds(deq, 2, 4) and int(info["mask"].sum()) == 64 * 128
    pruned = obs_sweep(w, H, None, -1, False, select=sparsegpt_select(0.5, (2, 4), 256))["Q"]
    r = quant.rtn_quantize(pruned, 4, 128, False)
    deq_rtn = quant.dequantize(r.qweight, r.scales, r.zeros, 4, 128, 256, torch.float32)
    assert nm_holds(deq_rtn, 2, 4)  # RTN keeps zeros: 0 rounds to the integer zero point
    assert _mse(w, deq, x) < _mse(w, deq_rtn, x)
    qg, _ = gptq_quantize(pruned, H, 4, 128, False, mask=pruned == 0)
    deq_g = quant.dequantize(qg.qweight, qg.scales, qg.zeros, 4, 128, 256, torch.float32)
    assert bool((deq_g[pruned == 0] == 0).all())
    qfree, _ = gptq_quantize(pruned, H, 4, 128, False)  # without the mask the error feedback refills zeros
    deq_free = quant.dequantize(qfree.qweight, qfree.scales, qfree.zeros, 4, 128, 256, torch.float32)
    assert (deq_free[pruned == 0] != 0).float().mean() > 0.1  # measured: 25% of them


def _tiny():
    from lowc.frontend.presets import tiny_llama

    m, _ = tiny_llama(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    return m


@pytest.fixture(scope="module")
def calib():
    return load_calibration([torch.randint(0, 259, (1, 32), generator=torch.Generator().manual_seed(i)) for i in range(4)])


@pytest.fixture(scope="module")
def tiny_prog():
    return lowc.trace(_tiny())


def _block_linears(prog, kind="aten"):
    out = []
    for n in prog.graph.nodes:
        info = nodemeta.get(n)
        if n.op == "call_function" and info.block is not None and (
                (kind == "aten" and n.target == torch.ops.aten.linear.default) or (kind == "wq" and "linear_wq" in str(n.target))):
            out.append(n)
    return out


def test_pass_sparsegpt_24_then_gptq(tiny_prog, calib):
    prog = tiny_prog.clone()
    ctx = PassContext(calib=calib, progress=False)
    (rec,) = run_passes(prog, [Prune(method="sparsegpt", pattern="2:4")], ctx)
    assert rec.result.changed and rec.result.stats["pruned"] == 14 and rec.result.stats["sparsity"] == 0.5
    lins = _block_linears(prog)
    assert len(lins) == 14
    for n in lins:
        w = prog.attr(LinearArgs.of(n).weight.target)
        assert nm_holds(w, 2, 4) and (w == 0).float().mean() == 0.5
        assert nodemeta.pruned(nodemeta.get(n)) == ("sparsegpt", "2:4", 0.5)
    text = printer.format_program(prog)
    line = [l for l in text.splitlines() if "layer=model.layers.1.mlp.down_proj" in l and "aten.linear" in l]
    assert len(line) == 1 and line[0].endswith("transforms=prune(method=sparsegpt,pattern=2:4,sparsity=0.5)"), line
    assert "lm_head" in text and "prune(" not in text.split("layer=lm_head")[1].splitlines()[0]  # ignored by default
    assert run_passes(prog, [Prune(method="sparsegpt", pattern="2:4")], ctx)[0].result.changed is False

    from lowc.passes.quant.gptq import GPTQ

    run_passes(prog, [GPTQ()], PassContext(calib=calib, progress=False))
    wq = _block_linears(prog, "wq")
    assert len(wq) == 14
    for n in wq:
        a = LinearQArgs.of(n)
        deq = quant.dequantize(prog.attr(a.weight.target), prog.attr(a.scales.target), prog.attr(a.zeros.target),
                               a.bits, a.group_size, a.in_features, torch.float32)
        assert nm_holds(deq, 2, 4)  # GPTQ held the pruned weights at 0
        info = nodemeta.get(n)
        assert info.method == "gptq" and nodemeta.pruned(info) == ("sparsegpt", "2:4", 0.5)


def test_pass_joint_mode_and_wanda_then_rtn(tiny_prog, calib):
    prog = tiny_prog.clone()
    ctx = PassContext(calib=calib, progress=False)
    run_passes(prog, [Prune(method="sparsegpt", sparsity=0.5, bits=4, group_size=32)], ctx)
    wq = _block_linears(prog, "wq")
    assert len(wq) == 14 and not _block_linears(prog)
    for n in wq:
        a = LinearQArgs.of(n)
        deq = quant.dequantize(prog.attr(a.weight.target), prog.attr(a.scales.target), prog.attr(a.zeros.target),
                               a.bits, a.group_size, a.in_features, torch.float32)
        assert a.bits == 4 and a.group_size == 32 and ((deq == 0).sum(1) >= deq.shape[1] // 2).all()
        info = nodemeta.get(n)
        assert info.method == "sparsegpt" and info.scheme.w_bits == 4 and nodemeta.pruned(info)[1:] == ("unstructured", 0.5)
    assert "lowc.linear_wq.default" in printer.format_program(prog)

    from lowc.passes.quant.rtn import RTN

    prog = tiny_prog.clone()
    run_passes(prog, [Prune(method="wanda", pattern="4:8"), RTN()], ctx)
    for n in _block_linears(prog, "wq"):
        a = LinearQArgs.of(n)
        deq = quant.dequantize(prog.attr(a.weight.target), prog.attr(a.scales.target), prog.attr(a.zeros.target),
                               a.bits, a.group_size, a.in_features, torch.float32)
        assert nm_holds(deq, 4, 8) and nodemeta.get(n).method == "rtn"


def test_pass_is_deterministic_and_magnitude_needs_no_calibration(tiny_prog, calib):
    a, b = tiny_prog.clone(), tiny_prog.clone()
    for p in (a, b):
        run_passes(p, [Prune(method="wanda")], PassContext(calib=calib, progress=False, seed=1))
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(a.attr(name), b.attr(name)) and (a.attr(name) == 0).sum(1).eq(32).all()  # half of 64 inputs
    assert Prune(method="magnitude").requirements() == frozenset()
    c = tiny_prog.clone()
    (rec,) = run_passes(c, [Prune(method="magnitude", sparsity=0.25)], PassContext(progress=False))
    assert rec.result.stats["pruned"] == 14 and (c.attr(name) == 0).sum(1).eq(16).all()  # a quarter of 64


def test_options_and_missing_calibration():
    check_options_round_trip(Prune(method="sparsegpt", pattern="4:8", bits=4, group_size=64, damp=0.02), {
        "prune{sparsity=1.0}": "sparsity=1.0",
        "prune{pattern=3:3}": "pattern='3:3'",
        "prune{pattern=2:4,sparsity=0.6}": "pattern=2:4 prunes 0.5",
        "prune{method=obc}": "method='obc'",
        "prune{method=wanda,bits=4}": "joint prune",
    })
    check_needs_finite_calibration(Prune(), "ref-fp32", float("inf"))


@pytest.mark.parametrize("spelling,needle", [
    ("prune{sparsity=1.5}", "sparsity=1.5"),
    pytest.param("prune{pattern=blocky}", "pattern='blocky'", marks=pytest.mark.slow),
    pytest.param("prune{pattern=2:4,sparsity=0.7}", "pattern=2:4 prunes 0.5", marks=pytest.mark.slow),
])
def test_cli_bad_options(spelling, needle, tmp_path):
    assert_clean_error(run_lowc("compile", "tiny-llama", "--target", "ref-fp32", "--pass", spelling, "-o", tmp_path / "a"),
                       "pass 'prune'", needle)


def test_inspect_says_sparse(tmp_path):
    out = tmp_path / "pruned"
    lowc.compile("tiny-llama", target="ref-fp32", passes=["prune{method=magnitude,pattern=2:4}"], progress=False).save(out)
    res = run_lowc("inspect", out)
    assert res.returncode == 0, res.stderr
    row = [l for l in res.stdout.splitlines() if l.startswith("model.layers.0.mlp.down_proj")]
    assert len(row) == 1 and "float 50% sparse (2:4, magnitude)" in row[0], res.stdout
    row = [l for l in res.stdout.splitlines() if l.startswith("lm_head")]
    assert len(row) == 1 and "sparse" not in row[0]
    rows = lowc.load(out).layers()  # the label survives the artifact's strict reading
    assert sum(r["transforms"] == ["prune(method=magnitude,pattern=2:4,sparsity=0.5)"] for r in rows) == 28  # 4 blocks x 7 linears
