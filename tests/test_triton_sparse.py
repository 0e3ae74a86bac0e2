"""Group-sparse layers on the Triton backend: the ``compact-k-packed-int32`` layout, ``lowc::linear_gsq_tr``
against ``lowc::linear_gsq``, ``triton-lower`` on ``linear_gsq`` nodes, the sparse autotune fitting, and
the GEMV/GEMM kernels against the reference op.

Kernel tests (``test_kernel_*``) run on CUDA when a GPU is present, and on CPU tensors under
``TRITON_INTERPRET=1``: ``test_sparse_kernels_under_interpreter`` reruns them in a subprocess with it set
(as ``tests/test_triton_linear.py`` does for the dense kernels). Sparse layers are made by
:func:`conftest.make_sparse` (seeded random kept groups, RTN over the kept weights).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import make_sparse, triton_interpreter_broken, two_linears_program
from lowc.backends.triton import autotune, gsq_op, layout
from lowc.errors import KernelError
from lowc.ir.dialect import ensure_registered, sparse

ensure_registered()
INTERP = os.environ.get("TRITON_INTERPRET") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None
KDEV = "cpu" if INTERP else ("cuda" if HAS_TRITON and torch.cuda.is_available() else None)
needs_kernels = pytest.mark.skipif(KDEV is None, reason="kernel tests run on a GPU, or on CPU inside "
                                                        "test_sparse_kernels_under_interpreter's subprocess")
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: max |kernel - exact| relative to max |exact|: about one output ulp (as for the dense kernels)
TOL = {torch.float16: 2 * 2**-10, torch.bfloat16: 2 * 2**-7, torch.float32: 1e-5}


pytestmark = pytest.mark.usefixtures("isolated_autotune")  # heuristic configs, a private cache


def _sparse_layer(n, k, sg=16, gs=None, sym=False, bits=4, dtype=torch.float32, bias=True, sparsity=0.5, seed=0):
    """A group-sparse weight (reference layout), its Triton layout and a bias."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.exp(torch.randn(k, generator=g) * 0.5)
    n_groups = sparse.padded_sparse_width(k, sg) // sg
    keep = sparse.kept_groups(k, sg, sparsity)
    idx = torch.stack([torch.randperm(n_groups, generator=g)[:keep].sort().values for _ in range(n)]).to(torch.int16)
    sq = sparse.rtn_quantize_sparse(w.to(dtype), idx, bits, gs or sg, sg, sym)
    tw = layout.sparse_from_reference(sq.qweight, sq.scales, sq.zeros, bits, sq.group_size, k, sq.idx, sg)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    return sq, tw, b


def _on_kdev(*args):
    return [a.to(KDEV) if isinstance(a, torch.Tensor) else a for a in args]


def _tr_args(tw, b):
    return (tw.qweight, tw.scales, tw.zeros, b, tw.bits, tw.group_size, tw.in_features, tw.out_features, tw.idx,
            tw.sparse_group)


# ---- layout and op -------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_layout_round_trip_and_reference_op_bit_for_bit(dtype):
    for n, k, sg, gs, sym, bits in [(33, 200, 16, 16, False, 4), (40, 130, 16, 64, True, 4), (9, 96, 32, None, False, 8),
                                    (20, 256, 16, 1024, False, 4)]:
        sq, tw, b = _sparse_layer(n, k, sg, gs, sym, bits, dtype)
        p = 32 // bits
        assert tw.qweight.dtype == torch.int32 and tuple(tw.qweight.shape) == (sq.compact_width // p, n)
        assert tw.idx.dtype == torch.int16 and tuple(tw.idx.shape) == (sq.n_keep, n)
        q, s, z, i = layout.sparse_to_reference(tw.qweight, tw.scales, tw.zeros, tw.idx, bits)
        assert torch.equal(q, sq.qweight) and torch.equal(s, sq.scales) and torch.equal(i, sq.idx)
        assert (z is None) == sym and (sym or torch.equal(z, sq.zeros))
        x = torch.randn(2, 3, k).to(dtype)
        ref = torch.ops.lowc.linear_gsq(x, sq.qweight, sq.scales, sq.zeros, b, bits, sq.group_size, k, sq.idx, sg)
        y = torch.ops.lowc.linear_gsq_tr(x, *_tr_args(tw, b))
        assert y.dtype == dtype and torch.equal(y, ref)


def test_op_checks_operands():
    _, tw, b = _sparse_layer(24, 64)
    args = [torch.randn(3, 64), *_tr_args(tw, b)]

    def bad(i, v, match):
        a = list(args)
        a[i] = v
        with pytest.raises(ValueError, match=match):
            torch.ops.lowc.linear_gsq_tr(*a)

    bad(1, tw.qweight[:-1], r"not the compact-k-packed-int32 layout .*expected int32\(4, 24\)")
    bad(9, tw.idx.flip(0), "strictly increasing")
    bad(9, tw.idx[:, :-1], r"idx .* must be int16 \[n_keep, out_features=24\]")
    bad(3, tw.zeros[:, :-1], "zeros")
    bad(0, torch.randn(3, 60), "input width 60 does not match in_features=64")
    bad(5, 3, r"bits must be one of \(4, 8\)")
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in args]
        fake[0] = mode.from_tensor(torch.randn(2, 5, 64))
        assert tuple(torch.ops.lowc.linear_gsq_tr(*fake).shape) == (2, 5, 24)


# ---- the lowering pass ---------------------------------------------------------------------------------
def test_triton_lower_sparse_layers():
    from lowc.backends.registry import parse_pass
    from lowc.ir import meta as nodemeta
    from lowc.ir import verifier
    from lowc.passes.base import PassContext

    prog = two_linears_program((4, 8), 32, (False, True))
    assert make_sparse(prog, sparsity=0.5, sparse_group=16, group_size=32, layers=("a",)) == 1
    x = torch.randn(4, 72)
    with torch.inference_mode():
        ref = prog.call(x)
    p = parse_pass("triton-lower")
    res = p.run(prog, PassContext())
    assert res.changed and res.stats == {"lowered": 2, "sparse": 1, "layers_by_bits": {"8": 1}}
    verifier.verify(prog)
    torch.testing.FileCheck().check("lowc.linear_gsq_tr").check("lowc.linear_wq_tr").check_not("linear_gsq.").run(
        prog.gm.code)
    (node,) = [n for n in prog.nodes(gsq_op.LINEAR_GSQ_TR)]
    # 72 inputs = 5 sparse groups of 16 (padded), 2 kept (the 0.5 rounds to whole groups)
    assert nodemeta.get(node).scheme.sparse_group == 16 and nodemeta.get(node).scheme.sparsity == 0.6
    assert prog.attr("a.tr_idx").dtype == torch.int16 and tuple(prog.attr("a.tr_idx").shape) == (2, 50)
    assert prog.attr("a.tr_qweight").shape == (4, 50)  # 2 kept groups x 16 compact codes / 8 per word
    assert not any(k.startswith("a.gsq_") for k in prog.state_tensors())
    assert not p.run(prog, PassContext()).changed  # idempotent
    with torch.inference_mode():
        assert torch.equal(prog.call(x), ref)  # the reference implementation: the same arithmetic


def test_triton_lower_refuses_what_the_sparse_kernels_cannot_take():
    from lowc.backends.triton.lower import TritonLower
    from lowc.passes.base import PassContext

    prog = two_linears_program((4, 4), 32, (False, False))
    make_sparse(prog, sparse_group=24, group_size=48, layers=("b",))
    with pytest.raises(KernelError, match=r"^layer b \(33x50, group-sparse\): .*power of two .*got sparse_group=24"):
        TritonLower().run(prog, PassContext())


def test_cuda_targets_run_group_sparse_layers():
    import lowc

    for name in ("cuda-w4a16", "cuda-w8a16"):
        assert "linear_gsq" in lowc.targets()[name].runs


# ---- autotune fitting (no GPU needed) ----------------------------------------------------------------------
def _problem(m=1, n=4096, k=4096, sg=16, gs=16, keep=0.5):
    n_keep = int(k // sg * keep)
    kc = n_keep * sg
    return autotune.Problem(m=m, n=n, k=k, k_pad=k, bits=4, group_size=gs, n_groups=-(-kc // gs), symmetric=False,
                            dtype="float16", sparse_group=sg, n_keep=n_keep)


def test_sparse_autotune_fit_and_candidates():
    C = autotune.Config
    p = _problem()
    assert p.k_compact == 2048
    f = autotune.fit(C("gemv", 128, 128, split_k=0), p)
    assert f.block_k == 128 and f.split_k == 16  # any block K (per-row scales); split over the compact row
    g = autotune.fit(C("gemm", 64, 16, block_m=64, split_k=4), _problem(sg=32))
    assert g.block_k == 32 and g.split_k == 1 and g.unpack == 0  # whole sparse groups per K tile, no split-K
    for m in (1, 8, 300):
        cs = autotune.candidates(_problem(m=m))
        assert cs and len(set(cs)) == len(cs)
        assert all(c.split_k == 1 for c in cs if c.kernel == "gemm")
        assert {c.kernel for c in cs} == ({"gemv", "gemm"} if m <= 16 else {"gemm"})
    assert autotune.heuristic(_problem(m=1)).kernel == "gemv"
    assert autotune.heuristic(_problem(m=2048)).kernel == "gemm"
    assert autotune.key(p, "H100", "3.6.0") == "H100|triton-3.6.0|w4g16a|float16|N4096|K4096|S16x128|M1"


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_sparse_kernels_compile_for_sm90_without_a_gpu():
    """Ahead-of-time compile for Hopper (triton's bundled ptxas) of the sparse GEMV and GEMM: catches what
    the interpreter cannot (types, layouts, shared memory)."""
    from lowc.backends.triton import wq

    if wq.interpreting():
        pytest.skip("the interpreter replaces triton.jit")
    for m in (1, 2048):
        p = _problem(m=m)
        r = wq.compile_for_gpu(autotune.heuristic(p), p)
        assert r["shared"] < 228 * 1024
        assert "cvt.rn.f32.u32" not in r["ptx_ops"] and "cvt.rn.f32.s32" not in r["ptx_ops"]
        if m > 1:
            assert r["ptx_ops"].get("wgmma.mma_async", 0) + r["ptx_ops"].get("mma.sync", 0) > 0


# ---- kernels vs the reference op (GPU, or interpreter subprocess) -------------------------------------------
def _run_kernel(cfg, m, n=70, k=200, sg=16, gs=None, sym=False, bits=4, dtype=torch.float16, bias=True, seed=0,
                sparsity=0.5):
    from lowc.backends.triton import gsq

    sq, tw, b = _sparse_layer(n, k, sg, gs, sym, bits, dtype, bias, sparsity, seed)
    x = (torch.randn(m, k, generator=torch.Generator().manual_seed(seed + 1)) * 2).to(dtype)
    ref = torch.ops.lowc.linear_gsq(x, sq.qweight, sq.scales, sq.zeros, b, bits, sq.group_size, k, sq.idx, sg)
    w = sparse.densify(sq).to(dtype).double()
    exact = x.double() @ w.T + (b.double() if b is not None else 0)
    p = gsq.problem(x, tw.scales, tw.zeros, tw.idx, bits, sq.group_size, k, n, sg)
    c = autotune.fit(cfg, p) if cfg is not None else None
    y = gsq.linear(*_on_kdev(x, *_tr_args(tw, b)), config=c).cpu()
    assert y.dtype == dtype and y.shape == ref.shape
    scale = exact.abs().max().item()
    err_exact = (y.double() - exact).abs().max().item() / scale
    err_ref = (y.double() - ref.double()).abs().max().item() / scale
    what = f"{c.label if c else 'auto'} M={m} N={n} K={k} sg{sg} g{gs} {'sym' if sym else 'asym'} {dtype}"
    assert err_exact <= TOL[dtype] and err_ref <= 2 * TOL[dtype], f"{what}: {err_exact:.2e} / {err_ref:.2e}"


# (sparse_group, group_size over the compact row (None = the sparse group; 1024 = one group per row), symmetric)
CASES = [(16, None, False), (16, 64, True), (32, None, True), (16, 1024, False)]


@needs_kernels
@pytest.mark.parametrize("sg, gs, sym", CASES)
def test_kernel_sparse_matches_reference(sg, gs, sym):
    """Each layout through the GEMV (M=1 with split-K, M=3) and the GEMM (M=20 in the decode tiling, M=33 over
    two row blocks), dtypes rotating; N=70 and K=200 are not tile multiples (K pads to whole sparse groups)."""
    i = CASES.index((sg, gs, sym))
    C = autotune.Config
    _run_kernel(C("gemv", 32, 64, split_k=2), 1, sg=sg, gs=gs, sym=sym, dtype=DTYPES[i % 3], bias=i % 2 == 0)
    _run_kernel(C("gemv", 64, 32, split_k=1), 3, sg=sg, gs=gs, sym=sym, dtype=DTYPES[(i + 1) % 3])
    _run_kernel(C("gemm", 32, 32, block_m=16), 20, sg=sg, gs=gs, sym=sym, dtype=DTYPES[(i + 2) % 3])
    _run_kernel(C("gemm", 64, 64, block_m=32), 33, sg=sg, gs=gs, sym=sym, dtype=DTYPES[i % 3], bias=i % 2 == 1)


@needs_kernels
def test_kernel_sparse_8bit_edges_and_heuristic():
    C = autotune.Config
    for dtype in (torch.float32, torch.bfloat16):
        _run_kernel(C("gemv", 32, 32, split_k=3), 1, n=17, k=96, bits=8, sym=True, dtype=dtype)
        _run_kernel(C("gemm", 32, 16, block_m=16), 5, n=17, k=96, bits=8, dtype=dtype)
    _run_kernel(None, 1, n=1, k=40, sparsity=0.0)  # every group kept; one output
    _run_kernel(None, 3, n=24, k=160, sparsity=0.9)  # one group of ten kept
    _run_kernel(None, 40, n=64, k=128, gs=32, sym=True)  # the heuristic configs
    _run_kernel(None, 2, n=48, k=256, dtype=torch.float32)


@needs_kernels
def test_kernel_sparse_lowered_program_and_errors():
    """A lowered program runs its sparse layer through the kernels (prepare registers them) and matches the
    reference; bad inputs are clear errors."""
    from lowc.backends.triton import gsq, wq
    from lowc.backends.triton.lower import TritonLower
    from lowc.backends.triton.targets import prepare
    from lowc.passes.base import PassContext

    prog = two_linears_program((4, 4), 32, (False, True))
    make_sparse(prog, sparsity=0.5, sparse_group=16)
    x = torch.randn(5, 72)
    with torch.inference_mode():
        ref = prog.call(x)
    TritonLower().run(prog, PassContext())
    prog.to(KDEV)
    prepare(prog, KDEV)
    before = sum(v for k, v in wq.LAUNCHES.items() if k.startswith("gsq_"))
    with torch.inference_mode():
        y = prog.call(x.to(KDEV)).cpu()
    assert sum(v for k, v in wq.LAUNCHES.items() if k.startswith("gsq_")) - before == 2
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    _, tw, b = _sparse_layer(16, 64, sg=24, gs=48)
    args = _on_kdev(*_tr_args(tw, b))
    with pytest.raises(KernelError, match="power of two .*got sparse_group=24"):
        gsq.linear(torch.randn(2, 64).to(KDEV), *args)
    _, tw, b = _sparse_layer(16, 64)
    args = _on_kdev(*_tr_args(tw, b))
    with pytest.raises(KernelError, match=r"lowc::linear_gsq_tr: the Triton kernels take float16, bfloat16 or float32"):
        gsq.linear(torch.zeros(2, 64, dtype=torch.float64).to(KDEV), *args)
    assert gsq.linear(torch.zeros(0, 64).to(KDEV), *args).shape == (0, 16)


# ---- the interpreter run ---------------------------------------------------------------------------------
@pytest.mark.skipif(INTERP or not HAS_TRITON, reason="this is the parent of the interpreter run (needs triton)")
@pytest.mark.skipif(bool(triton_interpreter_broken()), reason=str(triton_interpreter_broken()))
def test_sparse_kernels_under_interpreter(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1", "LOWC_CACHE_DIR": str(tmp_path), "PYTHONWARNINGS": "ignore",
           "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", os.path.abspath(__file__),
                        "-k", "test_kernel_"], capture_output=True, text=True, timeout=900, env=env,
                       cwd=os.path.dirname(os.path.abspath(__file__)))
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert " passed" in r.stdout and "skipped" not in r.stdout.splitlines()[-1], r.stdout[-2000:]


def test_lowered_sparse_artifact_saves_and_reloads(tmp_path):
    """A cuda-w4a16 program with a lowered group-sparse layer (made by hand: the gqsa pass is not needed
    for the backend's part) is saved (kernels.json describes the sparse layout), reloads through the op
    registry and computes what it computed."""
    import lowc
    from conftest import TwoLinears
    from lowc.api import CompiledModel
    from lowc.backends.registry import get_target
    from lowc.backends.triton.lower import TritonLower
    from lowc.passes.base import PassContext

    x = torch.randn(3, 72)
    cm = lowc.compile(TwoLinears(), "ref-w4a16", example_inputs=(x,), passes=["rtn{group_size=32}"], progress=False)
    make_sparse(cm.program, 0.5, 16, layers=("a",))
    y = cm(x)
    TritonLower().run(cm.program, PassContext())
    tgt = get_target("cuda-w4a16")
    CompiledModel(cm.program, tgt, {**cm.manifest, "target": tgt.name, "backend": tgt.backend}).save(tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "backend" / "kernels.json").read_text())
    (row,) = [r for r in meta["layers"] if r.get("sparse_group")]
    assert row["layer"] == "a" and row["op"] == "lowc::linear_gsq_tr" and row["kept_groups"] == 2
    assert row["default_config_m1"].startswith("gemv") and row["default_config_m2048"].startswith("gemm")
    back = lowc.load(tmp_path / "a")
    assert {r["op"] for r in back.layers() if r["scheme"]} == {"lowc::linear_gsq_tr", "lowc::linear_wq_tr"}
    assert torch.equal(back(x), y)
