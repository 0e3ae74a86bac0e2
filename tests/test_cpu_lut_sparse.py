"""The cpu-lut backend on group-sparse layers (``lowc::linear_gsq`` -> ``lowc::linear_lut_gs``): the
layout, the generated C (AVX2 and scalar) against the dialect's reference within the documented
bound, ``lut-lower`` on a program mixing dense and sparse layers, unsupported configurations, and
an artifact end to end (compile, save, strict load, the sparse kernel running).

The sparse layers are made here by :class:`SparseRTN` (RTN of the groups a seeded random salience
keeps): the ``gqsa`` pass that produces them in production lives elsewhere."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace

import pytest
import torch
from conftest import TwoLinears, make_llama_dir
from lowc.backends.cpu_lut import layout, runtime
from lowc.backends.cpu_lut import op as lut_op
from lowc.backends.cpu_lut.codegen import KernelConfig, SparseKernelConfig
from lowc.errors import KernelError
from lowc.ir import meta as nodemeta
from lowc.ir.dialect import sparse
from lowc.ir.dialect.args import LinearArgs
from lowc.ir.scheme import Scheme
from lowc.passes.base import Pass, PassContext, PassResult

GSQ = torch.ops.lowc.linear_gsq.default


@pytest.fixture(scope="module", autouse=True)
def lut_cache(tmp_path_factory):
    d = tmp_path_factory.mktemp("lut-gs-cache")
    old = os.environ.get("LOWC_CACHE_DIR")
    os.environ["LOWC_CACHE_DIR"] = str(d)
    yield str(d)
    if old is None:
        del os.environ["LOWC_CACHE_DIR"]
    else:
        os.environ["LOWC_CACHE_DIR"] = old


@pytest.fixture(scope="module", autouse=True)
def kernels(lut_cache):
    """Every kernel configuration of this module in one library (one compiler run)."""
    cfgs = [SparseKernelConfig(b, _sparse_weight(n, k, b, gs, sg, sym, sp).group_size, sg, sym)
            for n, k, b, gs, sg, sym, sp in CASES]
    cfgs += [SparseKernelConfig(4, 32, 16, False), SparseKernelConfig(4, 16, 16, False), SparseKernelConfig(2, 16, 16, False),
             KernelConfig(2, 32, False), KernelConfig(2, 128, False)]
    runtime.ensure(cfgs)


def _salient_idx(n: int, in_features: int, sparse_group: int, sparsity: float, gen: torch.Generator) -> torch.Tensor:
    n_groups = sparse.padded_sparse_width(in_features, sparse_group) // sparse_group
    keep = sparse.kept_groups(in_features, sparse_group, sparsity)
    return torch.rand(n, n_groups, generator=gen).topk(keep, dim=1).indices.sort(dim=1).values.to(torch.int16)


def _sparse_weight(n, k, bits, group_size, sparse_group, symmetric, sparsity=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.exp(torch.randn(k, generator=g) * 0.5)
    idx = _salient_idx(n, k, sparse_group, sparsity, g)
    return sparse.rtn_quantize_sparse(w, idx, bits, group_size, sparse_group, symmetric)


@dataclass(frozen=True)
class SparseRTN(Pass):
    """Test pass: the linears whose layer name contains ``layers`` become ``lowc::linear_gsq``."""

    name = "test-sparse-rtn"
    layers: str = ""
    bits: int = 4
    group_size: int = 32
    sparse_group: int = 16
    sparsity: float = 0.5
    symmetric: bool = False

    def run(self, program, ctx: PassContext) -> PassResult:
        g = torch.Generator().manual_seed(0)
        nodes = [n for n in program.linears() if self.layers in (nodemeta.get(n).layer or "")]
        for node in nodes:
            lin = LinearArgs.of(node)
            w = program.attr(lin.weight.target)
            idx = _salient_idx(w.shape[0], w.shape[1], self.sparse_group, self.sparsity, g)
            sq = sparse.rtn_quantize_sparse(w, idx, self.bits, self.group_size, self.sparse_group, self.symmetric)
            module_path = lin.weight.target.rpartition(".")[0]
            q, s, z, i = program.add_operand_buffers(module_path, node, {"qweight": sq.qweight, "scales": sq.scales,
                                                                         "zeros": sq.zeros, "idx": sq.idx})
            with program.graph.inserting_before(node):
                new = program.graph.call_function(GSQ, (lin.input, q, s, z, lin.bias, sq.bits, sq.group_size,
                                                        sq.in_features, i, sq.sparse_group))
            new.meta = {k: v for k, v in node.meta.items() if k in ("nn_module_stack", "val", "stack_trace")}
            info = nodemeta.get(node)
            scheme = Scheme(self.bits, self.group_size, self.symmetric, sparsity=self.sparsity,
                            sparse_group=self.sparse_group)
            nodemeta.set_info(new, replace(info, layer=info.layer or module_path).compressed(scheme, "rtn"))
            node.replace_all_uses_with(new)
            program.graph.erase_node(node)
        program.remove_dead()
        return PassResult(changed=bool(nodes), stats={"sparse": len(nodes)})


# ---- layout ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n, k, sg, n_keep_sparsity", [(33, 200, 16, 0.5), (40, 136, 32, 0.6), (5, 1100, 16, 0.3)])
def test_sparse_layout_round_trip_is_exact(n, k, sg, n_keep_sparsity):
    for bits, sym in ((4, False), (3, True)):
        sq = _sparse_weight(n, k, bits, sg, sg, sym, n_keep_sparsity)
        lw = layout.from_sparse_reference(sq.qweight, sq.scales, sq.zeros, sq.idx, bits, sq.group_size, sg, k)
        assert lw.weight.shape == (n, layout.sparse_weight_bytes(sq.n_keep, sg)) and lw.weight.dtype == torch.uint8
        assert lw.mask.shape == (n, 8 * layout.mask_words(k, sg))
        popcount = ((lw.mask.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1).sum((1, 2))
        assert (popcount == sq.n_keep).all()
        q2, i2 = layout.to_sparse_reference(lw.weight, lw.mask, bits, sg, sq.n_keep)
        assert torch.equal(q2, sq.qweight) and torch.equal(i2, sq.idx)


def test_sparse_layout_by_hand():
    # one row, 2 of 4 groups of 16 kept (groups 1 and 3): codes 0..15 then 15..0
    codes = torch.cat([torch.arange(16), torch.arange(15, -1, -1)]).reshape(1, 32).to(torch.int32)
    from lowc.ir.dialect import packing

    idx = torch.tensor([[1, 3]], dtype=torch.int16)
    lw = layout.from_sparse_reference(packing.pack(codes, 4), torch.ones(1, 1), None, idx, 4, 32, 16, 64)
    assert lw.weight[0].tolist() == [i | (15 - i) << 4 for i in range(16)]
    assert lw.mask[0].tolist() == [0b1010, 0, 0, 0, 0, 0, 0, 0]


# ---- kernels vs the reference op ---------------------------------------------------------------------
CASES = [  # n, k, bits, group_size, sparse_group, symmetric, sparsity
    (70, 200, 4, 16, 16, False, 0.5),  # group == sparse group; in_features not a multiple of 16
    (70, 200, 4, 16, 16, True, 0.5),
    (45, 264, 4, 64, 16, True, 0.45),  # several kept groups per scale, the last one shorter; odd n_keep (lone block)
    (40, 136, 3, 64, 32, False, 0.5),  # sparse group of 32
    (31, 100, 2, 48, 16, False, 0.9),  # one kept group per row (group 48 > Kc: per channel)
    (33, 300, 1, 32, 16, True, 0.5),
]


@pytest.mark.parametrize("n, k, bits, gs, sg, sym, sparsity", CASES)
def test_sparse_kernel_matches_reference_within_bound(n, k, bits, gs, sg, sym, sparsity):
    sq = _sparse_weight(n, k, bits, gs, sg, sym, sparsity)
    lw = layout.from_sparse_reference(sq.qweight, sq.scales, sq.zeros, sq.idx, bits, sq.group_size, sg, k)
    for m in (1, 4):
        g = torch.Generator().manual_seed(m)
        x = torch.randn(m, k, generator=g)
        bias = torch.randn(n, generator=g)
        ref = sparse.linear_gsq(x, sq.qweight, sq.scales, sq.zeros, bias, bits, sq.group_size, k, sq.idx, sg)
        args = (lw.scales, lw.zeros, bias, bits, sq.group_size, k, n)
        # the op's reference implementation is exactly linear_gsq
        assert torch.equal(lut_op.reference_linear_lut_gs(x, lw.weight, *args, lw.mask, sg, sq.n_keep), ref)
        bound = runtime.sparse_error_bound(x, sq.scales, sq.idx, bits, sq.group_size, sg)
        outs = {}
        for scalar in (False, True):
            y = runtime.run_sparse(x, lw.weight, lw.mask, lw.scales, lw.zeros, bias, bits, sq.group_size, k, n, sg,
                                   sq.n_keep, force_scalar=scalar, threads=2)
            err = (y - ref).abs()
            assert torch.all(err <= bound), f"scalar={scalar}: max err/bound {(err / bound).max():.3f}"
            outs[scalar] = y
        # same integer sums per quantization group; float order differs
        torch.testing.assert_close(outs[False], outs[True], rtol=1e-5, atol=1e-5)
        # int16 activations: an error, but a small one (1-bit symmetric RTN zeroes every weight)
        rel = ((outs[False] - ref).norm() / (ref - bias).norm().clamp(min=1e-6)).item()
        assert 0 < rel < 1e-3 or (bits == 1 and sym), rel


def test_sparse_kernel_threads_do_not_change_results():
    sq = _sparse_weight(100, 512, 4, 32, 16, False)
    lw = layout.from_sparse_reference(sq.qweight, sq.scales, sq.zeros, sq.idx, 4, 32, 16, 512)
    x = torch.randn(3, 512)
    run = lambda x, t: runtime.run_sparse(x, lw.weight, lw.mask, lw.scales, lw.zeros, None, 4, 32, 512, 100, 16,
                                          sq.n_keep, threads=t)
    ys = [run(x, t) for t in (1, 2, 3)]
    assert torch.equal(ys[0], ys[1]) and torch.equal(ys[0], ys[2])


def test_sparse_kernel_config_errors():
    with pytest.raises(ValueError, match="multiples of 16, got 32 and 8"):
        SparseKernelConfig(4, 32, 8, True)
    with pytest.raises(ValueError, match="LUT kernels support 1..4 bits, got 5"):
        SparseKernelConfig(5, 32, 16, True)


# ---- the lowering pass -------------------------------------------------------------------------------
def _mixed_program():
    """TwoLinears: ``a`` dense W2 (linear_wq), ``b`` group-sparse W4 (linear_gsq)."""
    from lowc.ir.capture import trace
    from lowc.passes.quant.rtn import RTN

    torch.manual_seed(0)
    prog = trace(TwoLinears(), (torch.randn(3, 72),))
    SparseRTN(layers="b", group_size=16).run(prog, PassContext())
    RTN(bits=2, group_size=32, ignore=()).run(prog, PassContext())
    return prog


def _run_with_reference_ops(prog, x):
    """Run ``prog`` calling the layout ops' Python reference implementations directly: once another
    test has registered the C kernels (same process), the dispatcher would run those instead."""
    refs = {lut_op.LINEAR_LUT: lut_op.reference_linear_lut, lut_op.LINEAR_LUT_GS: lut_op.reference_linear_lut_gs}

    class Reference(torch.fx.Interpreter):
        def call_function(self, target, args, kwargs):
            return refs.get(target, target)(*args, **kwargs)

    return Reference(prog.gm).run(x)


def test_lut_lower_mixes_dense_and_sparse_layers():
    from lowc.backends.registry import parse_pass
    from lowc.ir import verifier

    prog = _mixed_program()
    torch.testing.FileCheck().check("lowc.linear_wq").check("lowc.linear_gsq").run(prog.gm.code)
    x = torch.randn(4, 72)
    with torch.inference_mode():
        ref = prog.call(x)
    p = parse_pass("lut-lower")
    res = p.run(prog, PassContext())
    assert res.changed and res.stats == {"lowered": 2, "layers_by_bits": {"2": 1}, "sparse": 1}
    verifier.verify(prog)
    torch.testing.FileCheck().check("lowc.linear_lut").check("lowc.linear_lut_gs").check_not("linear_gsq").run(prog.gm.code)
    state = prog.state_tensors()
    assert state["b.lut_gs_mask"].dtype == torch.uint8 and not any(k.endswith(".idx") for k in state)
    assert not p.run(prog, PassContext()).changed  # idempotent
    with torch.inference_mode():
        y_ref_impl = _run_with_reference_ops(prog, x)  # the backend ops' reference implementations
    torch.testing.assert_close(y_ref_impl, ref, rtol=1e-5, atol=1e-5)  # the layouts dequantize to the same weights
    lut_op.register_cpu_kernel()
    with torch.inference_mode():
        y = prog.call(x)
    assert not torch.equal(y, ref)  # the C kernels ran (int8 tables, int16 activations)
    assert ((y - ref).norm() / ref.norm()).item() < 0.03


@pytest.mark.parametrize("sg, gs, why", [(8, 16, "sparse_group=8, group_size=16"), (32, 48, "sparse_group=32, group_size=48")])
def test_lut_lower_refuses_unsupported_sparse_layers(sg, gs, why):
    from lowc.backends.cpu_lut.lower import LutLower
    from lowc.ir.capture import trace

    prog = trace(TwoLinears(), (torch.randn(3, 72),))
    SparseRTN(layers="a", group_size=gs, sparse_group=sg).run(prog, PassContext())
    with pytest.raises(KernelError, match=rf"^layer a: cpu-lut group-sparse kernels need .*got {why}$"):
        LutLower().run(prog, PassContext())


# ---- end to end --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_llama(tmp_path_factory):
    return make_llama_dir(tmp_path_factory.mktemp("lut-gs-llama"), seed=5, hidden_size=96, intermediate_size=200,
                          num_hidden_layers=1, num_attention_heads=3, num_key_value_heads=1)


def test_sparse_artifact_end_to_end(small_llama, tmp_path, monkeypatch):
    import lowc

    passes = [SparseRTN(layers="mlp"), "rtn{bits=2}"]  # MLP group-sparse W4, attention dense W2
    ids = torch.randint(0, 259, (2, 7), generator=torch.Generator().manual_seed(2))
    ref = lowc.compile(small_llama, "ref-w4a16", passes=passes, progress=False)
    cm = lowc.compile(small_llama, "cpu-lut-w4", passes=passes, progress=False)
    # the reference target keeps linear_gsq with its int16 indices; they survive the strict loader
    ref.save(tmp_path / "ref")
    ref2 = lowc.load(tmp_path / "ref")
    assert any(t.dtype == torch.int16 for t in ref2.program.state_tensors().values())
    cm.save(tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "backend" / "kernels.json").read_text())
    sparse_rows = [r for r in meta["layers"] if "sparse_group" in r]
    assert sorted(r["layer"].rsplit(".", 1)[-1] for r in sparse_rows) == ["down_proj", "gate_proj", "up_proj"]
    assert {r["kernel"] for r in sparse_rows} == {"lowc_lut_gs_b4_g32_s16_asym"}
    assert all(0.4 < r["sparsity"] < 0.6 for r in sparse_rows)
    assert {r["kernel"] for r in meta["layers"] if "sparse_group" not in r} == {"lowc_lut_b2_g128_asym"}
    assert "lowc_lut_gs_b4_g32_s16_asym(" in (tmp_path / "a" / "backend" / "kernels.c").read_text()
    loaded = lowc.load(tmp_path / "a")
    assert loaded.target.runtime_on("cpu", str(tmp_path / "a")).implementation.startswith("LUT C kernels")
    calls = []
    real = runtime.run_sparse

    def counting(*a, **k):
        calls.append(a[1].shape)
        return real(*a, **k)

    monkeypatch.setattr(runtime, "run_sparse", counting)
    with torch.inference_mode():
        r = ref2(ids).logits
        y = loaded(ids).logits
    assert len(calls) == 3  # the three MLP projections ran the generated C
    rel = ((y - r).norm() / r.norm()).item()
    assert 0 < rel < 0.03, rel
