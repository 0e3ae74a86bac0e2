"""The cpu-lut backend's GEMM path (large M, prefill): tiles dequantized in C from the LUT layout are
exactly the reference weight, the path is within its documented bound of ``lowc::linear_wq`` (odd
shapes, 1..4 bits, symmetric and not, several group sizes, bf16 and float32 tiles), ``run`` switches
paths at the threshold, the op takes it through the registered kernel, and bad calls are clear errors;
the same for the group-sparse op (``lowc::linear_lut_gs``: rows of its dense weight, 0 in dropped groups)."""

from __future__ import annotations

import itertools
import os

import pytest
import torch

from lowc.backends.cpu_lut import layout, runtime
from lowc.backends.cpu_lut import op as lut_op
from lowc.backends.cpu_lut.codegen import KernelConfig, SparseKernelConfig
from lowc.errors import LowcError
from lowc.ir.dialect import ops, quant, sparse

# (bits, N, K, group size, symmetric): N across tile edges, K not a multiple of 8 or of the group
CASES = [(4, 70, 203, 64, False), (4, 33, 256, 128, True), (2, 97, 130, 32, False), (2, 64, 96, 32, True),
         (3, 45, 200, 40, False), (1, 40, 64, 32, False), (2, 31, 400, -1, False)]
DTYPES = (torch.float32, torch.bfloat16)
# group-sparse (bits, N, K, group size, sparse group, symmetric, sparsity)
SPARSE_CASES = [(4, 70, 203, 32, 16, False, 0.5), (3, 33, 136, 64, 32, True, 0.6), (2, 40, 1100, 16, 16, False, 0.3)]


def _quantized(n, k, bits, group_size, symmetric, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.exp(torch.randn(k, generator=g) * 0.5)
    qw = quant.rtn_quantize(w, bits, group_size, symmetric)
    lw = layout.from_reference(qw.qweight, qw.scales, qw.zeros, bits, qw.group_size, k)
    return qw, lw


@pytest.fixture(scope="module", autouse=True)
def kernels(tmp_path_factory):
    """A private kernel cache, every configuration of this module built in one compiler run."""
    d = tmp_path_factory.mktemp("lut-gemm-cache")
    old = os.environ.get("LOWC_CACHE_DIR")
    os.environ["LOWC_CACHE_DIR"] = str(d)
    runtime.ensure([KernelConfig(b, _quantized(n, k, b, gs, sym)[0].group_size, sym) for b, n, k, gs, sym in CASES]
                   + [SparseKernelConfig(b, gs, sg, sym) for b, _, _, gs, sg, sym, _ in SPARSE_CASES])
    yield
    if old is None:
        del os.environ["LOWC_CACHE_DIR"]
    else:
        os.environ["LOWC_CACHE_DIR"] = old


@pytest.mark.parametrize("bits, n, k, gs, sym", CASES)
def test_dequantized_tiles_are_the_reference_weight(bits, n, k, gs, sym):
    qw, lw = _quantized(n, k, bits, gs, sym)
    ref = quant.dequantize(qw.qweight, qw.scales, qw.zeros, bits, qw.group_size, k)
    tiles = -(-n // 32)
    for dtype, t0, scalar in itertools.product(DTYPES, range(tiles), (False, True)):
        out = torch.full((64, k), float("nan"), dtype=dtype)
        got = runtime.dequantize_tiles(lw.weight, lw.scales, lw.zeros, bits, qw.group_size, k, n, t0, min(2, tiles - t0),
                                       out, threads=2, force_scalar=scalar)
        # bit-exact: (q - z) * s rounded once, then to bf16 exactly as torch rounds (AVX2 and scalar loops)
        assert torch.equal(got, ref[32 * t0: 32 * t0 + got.shape[0]].to(dtype)), (dtype, t0, scalar)
        assert got.shape[0] == min(n, 32 * t0 + 64) - 32 * t0


@pytest.mark.parametrize("bits, n, k, gs, sym", CASES)
def test_gemm_path_matches_reference_within_bound(bits, n, k, gs, sym):
    qw, lw = _quantized(n, k, bits, gs, sym)
    w_ref = quant.dequantize(qw.qweight, qw.scales, qw.zeros, bits, qw.group_size, k)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 9, k, generator=g)
    bias = torch.randn(n, generator=g)
    ref = ops.linear_wq(x, qw.qweight, qw.scales, qw.zeros, bias, bits, qw.group_size, k)
    for dtype in DTYPES:
        bound = runtime.gemm_error_bound(x, w_ref, dtype)
        # tile_bytes=1: the smallest tile (32 rows per thread), several tiles per call
        for tile_bytes in (1, None):
            y = runtime.run_gemm(x, lw.weight, lw.scales, lw.zeros, bias, bits, qw.group_size, k, n, threads=2,
                                 dtype=dtype, tile_bytes=tile_bytes)
            assert y.shape == ref.shape and y.dtype == x.dtype
            err = (y - ref).abs()
            assert torch.all(err <= bound), f"{dtype}: max err/bound {(err / bound).max():.3f}"
        # bf16 rounding shows (not the float32 result), far inside the bound
        rel = ((y - ref).norm() / (ref - bias).norm().clamp(min=1e-6)).item()
        assert (0 < rel < 0.01) if dtype == torch.bfloat16 else rel < 1e-5, rel


def test_gemm_path_is_deterministic_for_odd_k():
    # oneDNN's bf16 GEMM reads past K when K is not a multiple of its block: the padding of the
    # operands must be zero (it was uninitialized: NaN left there by freed tensors made outputs NaN)
    qw, lw = _quantized(70, 203, 4, 64, False)
    x = torch.randn(18, 203)
    ys = []
    for size in (96 * 235, 18 * 235) * 10:
        junk = torch.full((size,), float("nan"), dtype=torch.bfloat16)  # freed NaN memory for the next buffers
        del junk
        ys.append(runtime.run_gemm(x, lw.weight, lw.scales, lw.zeros, None, 4, 64, 203, 70, threads=2))
    assert all(torch.equal(ys[0], y) for y in ys) and not ys[0].isnan().any()


def test_run_switches_to_gemm_at_the_threshold(monkeypatch):
    bits, n, k = 4, 70, 203
    qw, lw = _quantized(n, k, bits, 64, False)
    args = (lw.weight, lw.scales, lw.zeros, None, bits, qw.group_size, k, n)
    monkeypatch.setenv("LOWC_CPU_LUT_GEMM_MIN_M", "6")
    assert runtime.gemm_min_m(bits) == 6
    x = torch.randn(6, k)
    lut = runtime.run(x, *args, threads=2, gemm=False)
    gemm = runtime.run_gemm(x, *args, threads=2)
    assert not torch.equal(lut, gemm)  # int8 tables vs the GEMM: the two paths differ
    assert torch.equal(runtime.run(x, *args, threads=2), gemm)
    assert torch.equal(runtime.run(x[:5], *args, threads=2), lut[:5])
    # a forced scalar path stays on the LUT kernel
    assert torch.equal(runtime.run(x, *args, threads=2, force_scalar=True), runtime.run(x, *args, threads=2, gemm=False,
                                                                                        force_scalar=True))
    monkeypatch.delenv("LOWC_CPU_LUT_GEMM_MIN_M")
    assert runtime.gemm_min_m(bits) == runtime.GEMM_MIN_M[runtime.gemm_dtype()][bits]


def test_op_takes_the_gemm_path_for_a_prefill(monkeypatch):
    bits, n, k = 2, 97, 130
    qw, lw = _quantized(n, k, bits, 32, False)
    lut_op.register_cpu_kernel()
    x = torch.randn(1, runtime.gemm_min_m(bits), k)
    y = torch.ops.lowc.linear_lut(x, lw.weight, lw.scales, lw.zeros, None, bits, qw.group_size, k, n)
    assert torch.equal(y, runtime.run_gemm(x, lw.weight, lw.scales, lw.zeros, None, bits, qw.group_size, k, n))
    w_ref = quant.dequantize(qw.qweight, qw.scales, qw.zeros, bits, qw.group_size, k)
    ref = lut_op.reference_linear_lut(x, lw.weight, lw.scales, lw.zeros, None, bits, qw.group_size, k, n)
    assert torch.all((y - ref).abs() <= runtime.gemm_error_bound(x, w_ref, runtime.gemm_dtype()))


def test_gemm_dtype_option(monkeypatch):
    monkeypatch.setenv("LOWC_CPU_LUT_GEMM_DTYPE", "fp32")
    assert runtime.gemm_dtype() == torch.float32
    monkeypatch.setenv("LOWC_CPU_LUT_GEMM_DTYPE", "bf16")
    assert runtime.gemm_dtype() == torch.bfloat16
    monkeypatch.setenv("LOWC_CPU_LUT_GEMM_DTYPE", "fp16")
    with pytest.raises(LowcError, match="LOWC_CPU_LUT_GEMM_DTYPE='fp16' must be one of bf16, fp32"):
        runtime.gemm_dtype()
    monkeypatch.setenv("LOWC_CPU_LUT_GEMM_MIN_M", "lots")
    with pytest.raises(LowcError, match="LOWC_CPU_LUT_GEMM_MIN_M='lots' is not an integer"):
        runtime.gemm_min_m(4)


def test_bad_tile_ranges_are_clear_errors():
    qw, lw = _quantized(70, 203, 4, 64, False)
    args = (lw.weight, lw.scales, lw.zeros, 4, qw.group_size, 203, 70)
    with pytest.raises(LowcError, match=r"cannot dequantize tiles 2\.\.4 of N=70 into torch.float32\(64, 203\)"):
        runtime.dequantize_tiles(*args, 2, 2, torch.empty(64, 203))
    with pytest.raises(LowcError, match=r"cannot dequantize tiles 0\.\.2 of N=70 into torch.float32\(32, 203\)"):
        runtime.dequantize_tiles(*args, 0, 2, torch.empty(32, 203))
    with pytest.raises(LowcError, match=r"into torch.float16\(64, 203\)"):
        runtime.dequantize_tiles(*args, 0, 2, torch.empty(64, 203, dtype=torch.float16))


def _sparse(n, k, bits, gs, sg, sym, sparsity, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.exp(torch.randn(k, generator=g) * 0.5)
    n_groups = sparse.padded_sparse_width(k, sg) // sg
    keep = sparse.kept_groups(k, sg, sparsity)
    idx = torch.rand(n, n_groups, generator=g).topk(keep, dim=1).indices.sort(dim=1).values.to(torch.int16)
    sq = sparse.rtn_quantize_sparse(w, idx, bits, gs, sg, sym)
    lw = layout.from_sparse_reference(sq.qweight, sq.scales, sq.zeros, sq.idx, bits, sq.group_size, sg, k)
    return sq, lw


@pytest.mark.parametrize("bits, n, k, gs, sg, sym, sparsity", SPARSE_CASES)
def test_sparse_gemm_path(bits, n, k, gs, sg, sym, sparsity):
    sq, lw = _sparse(n, k, bits, gs, sg, sym, sparsity)
    w_ref = sparse.densify(sq).float()
    args = (lw.weight, lw.mask, lw.scales, lw.zeros)
    for dtype in DTYPES:
        out = torch.full((50, k + 8), float("nan"), dtype=dtype)[:, :k]
        got = runtime.dequantize_sparse_rows(*args, bits, sq.group_size, k, n, sg, sq.n_keep, 3, min(n - 3, 50), out,
                                             threads=2)
        assert torch.equal(got, w_ref[3:3 + got.shape[0]].to(dtype)), dtype
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 7, k, generator=g)
    bias = torch.randn(n, generator=g)
    ref = lut_op.reference_linear_lut_gs(x, lw.weight, lw.scales, lw.zeros, bias, bits, sq.group_size, k, n, lw.mask, sg,
                                         sq.n_keep)
    for dtype in DTYPES:
        y = runtime.run_sparse_gemm(x, *args, bias, bits, sq.group_size, k, n, sg, sq.n_keep, threads=2, dtype=dtype,
                                    tile_bytes=1)
        err = (y - ref).abs()
        assert torch.all(err <= runtime.gemm_error_bound(x, w_ref, dtype)), dtype
    # run_sparse takes it from the threshold on, the row kernel below
    rs = (x.reshape(-1, k), *args, bias, bits, sq.group_size, k, n, sg, sq.n_keep)
    gemm = runtime.run_sparse_gemm(*rs, threads=2)
    assert torch.equal(runtime.run_sparse(*rs, threads=2, gemm=True), gemm)
    assert not torch.equal(runtime.run_sparse(*rs, threads=2, gemm=False), gemm)
    m = runtime.gemm_min_m(bits)
    xm = torch.randn(m, k, generator=g)
    assert torch.equal(runtime.run_sparse(xm, *rs[1:], threads=2),
                       runtime.run_sparse_gemm(xm, *rs[1:], threads=2))
    with pytest.raises(LowcError, match=r"cannot dequantize rows 60\.\.80 of N=\d+ into"):
        runtime.dequantize_sparse_rows(*args, bits, sq.group_size, k, n, sg, sq.n_keep, 60, 20, out)


def test_tile_buffer_first_made_under_inference_mode_is_reused_outside():
    """The per-thread tile buffer outlives calls: made under ``inference_mode`` it must still be writable
    by a later call outside it (an inference tensor is not; CI hit this with tests in another order)."""
    runtime._buffers.__dict__.pop("tiles", None)
    with torch.inference_mode():
        a = runtime._tile_buffer(64, torch.float32)
    b = runtime._tile_buffer(32, torch.float32)
    b.zero_()
    assert not a.is_inference() and b.data_ptr() == a.data_ptr()

