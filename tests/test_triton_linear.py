"""The Triton backend (``cuda-w4a16``, ``cuda-w8a16``): layout, ``lowc::linear_wq_tr``, the ``triton-lower``
pass, autotune logic, targets/CLI/artifact, generation, and the kernels against the reference op.

Kernel tests (``test_kernel_*``) run wherever kernels can run: on CUDA when a GPU is present, and on
CPU tensors under ``TRITON_INTERPRET=1``. The interpreter must be on before triton is imported, so
``test_kernels_under_interpreter`` reruns this file's kernel tests in a subprocess with it set (the
variable never leaks into this process or other test files); in the parent process they are skipped
unless a GPU is present. Interpreter shapes are small; bf16 dots run in fp32 there (triton's
interpreter stores bf16 as uint16 and its bf16 arithmetic is wrong), bf16 loads, stores and casts
are exercised as on the GPU.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import TwoLinears, make_llama_dir, run_lowc, triton_interpreter_broken, two_linears_program
from lowc.backends.triton import autotune, layout, op
from lowc.errors import KernelError
from lowc.ir.dialect import ops, packing, quant

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None
KDEV = "cpu" if INTERP else ("cuda" if HAS_TRITON and torch.cuda.is_available() else None)
needs_kernels = pytest.mark.skipif(KDEV is None, reason="kernel tests run on a GPU, or on CPU inside "
                                                        "test_kernels_under_interpreter's TRITON_INTERPRET=1 subprocess")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: max |kernel - reference| allowed, relative to max |reference|: about one output ulp at the top of
#: the range (both round a fp32 sum once; the accumulation orders differ)
TOL = {torch.float16: 2 * 2**-10, torch.bfloat16: 2 * 2**-7, torch.float32: 1e-5}


#: heuristic configs and a private autotune cache (``test_gpu_autotune`` turns tuning back on)
pytestmark = pytest.mark.usefixtures("isolated_autotune")


def _layer(n, k, bits, gs, sym, dtype=torch.float32, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.exp(torch.randn(k, generator=g) * 0.5)
    qw = quant.rtn_quantize(w.to(dtype), bits, gs, sym)
    tw = layout.from_reference(qw.qweight, qw.scales, qw.zeros, bits, qw.group_size, k)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    return qw, tw, b


# ---- layout ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits, n, k, gs", [(4, 33, 200, 64), (4, 8, 256, 128), (8, 70, 200, -1), (8, 5, 96, 32)])
def test_layout_round_trip_is_exact(bits, n, k, gs):
    for sym in (False, True):
        qw, tw, _ = _layer(n, k, bits, gs, sym)
        p = 32 // bits
        assert tw.qweight.dtype == torch.int32 and tuple(tw.qweight.shape) == (qw.k_pad // p, n)
        assert tuple(tw.scales.shape) == (qw.k_pad // qw.group_size, n) and tw.scales.dtype == qw.scales.dtype
        generic = layout.from_reference(qw.qweight, qw.scales, qw.zeros, bits, qw.group_size, k, generic=True)
        assert torch.equal(generic.qweight, tw.qweight)  # the byte reinterpretation = the shift-and-or packing
        q2, s2, z2 = layout.to_reference(tw.qweight, tw.scales, tw.zeros, bits)
        assert torch.equal(q2, qw.qweight) and torch.equal(s2, qw.scales)
        assert (z2 is None) == sym and (sym or torch.equal(z2, qw.zeros))
        assert torch.equal(layout.unpack_words(tw.qweight, bits), packing.unpack(qw.qweight, bits))


def test_layout_by_hand():
    # row 0 codes 0..15 (4 bits): word 0 = codes 0..7 low nibble first, word 1 = codes 8..15
    codes = torch.arange(16, dtype=torch.int32).reshape(1, 16)
    tw = layout.from_reference(packing.pack(codes, 4), torch.ones(1, 1), None, 4, 16, 16)
    assert tw.qweight.flatten().tolist() == [0x76543210, 0xFEDCBA98 - 2**32]
    tw8 = layout.from_reference(packing.pack(torch.tensor([[1, 2, 3, 250, 5, 6, 7, 8]]), 8), torch.ones(1, 1), None,
                                8, 8, 8)
    assert tw8.qweight.flatten().tolist() == [0xFA030201 - 2**32, 0x08070605]
    with pytest.raises(ValueError, match="packs 4 or 8-bit codes, got bits=3"):
        layout.codes_per_word(3)


# ---- the op ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_op_is_linear_wq_bit_for_bit(dtype):
    for bits, gs, sym, bias in [(4, 128, False, True), (8, -1, True, False), (4, 32, True, True)]:
        qw, tw, b = _layer(40, 200, bits, gs, sym, dtype, bias)
        x = torch.randn(2, 3, 200).to(dtype)
        ref = ops.linear_wq(x, qw.qweight, qw.scales, qw.zeros, b, bits, qw.group_size, 200)
        y = torch.ops.lowc.linear_wq_tr(x, tw.qweight, tw.scales, tw.zeros, b, bits, qw.group_size, 200, 40)
        assert y.dtype == dtype and torch.equal(y, ref)


def test_op_checks_operands():
    qw, tw, b = _layer(40, 64, 4, 32, False)
    x = torch.randn(3, 64)
    args = [x, tw.qweight, tw.scales, tw.zeros, b, 4, 32, 64, 40]

    def bad(i, v, match):
        a = list(args)
        a[i] = v
        with pytest.raises(ValueError, match=match):
            torch.ops.lowc.linear_wq_tr(*a)

    bad(1, tw.qweight.to(torch.uint8), "not the k-packed-int32 layout")
    bad(1, tw.qweight[:-1], r"expected int32\(8, 40\)")
    bad(3, tw.zeros[:, :-1], "zeros")
    bad(4, b[:-1], r"bias \(39,\) must be \[40\]")
    bad(0, torch.randn(3, 60), "input width 60 does not match in_features=64")
    bad(5, 3, r"bits must be one of \(4, 8\)")
    bad(8, 41, "out_features=41")
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fx = mode.from_tensor(torch.randn(2, 5, 64))
        out = torch.ops.lowc.linear_wq_tr(fx, *[mode.from_tensor(t) for t in (tw.qweight, tw.scales, tw.zeros, b)],
                                          4, 32, 64, 40)
        assert tuple(out.shape) == (2, 5, 40)


# ---- the lowering pass ---------------------------------------------------------------------------------
def _program(bits=(4, 8), group_size=32):
    return two_linears_program(bits, group_size, symmetric=tuple(b == 8 for b in bits))


def test_triton_lower_pass():
    from lowc.ir import meta as nodemeta
    from lowc.ir import verifier
    from lowc.passes.base import PassContext
    from lowc.backends.registry import parse_pass

    prog = _program()
    x = torch.randn(4, 72)
    with torch.inference_mode():
        ref = prog.call(x)
    p = parse_pass("triton-lower")
    assert p.to_json() == {"name": "triton-lower", "options": {}}
    assert type(p)(**json.loads(json.dumps(p.to_json()))["options"]) == p
    res = p.run(prog, PassContext())
    assert res.changed and res.stats == {"lowered": 2, "layers_by_bits": {"4": 1, "8": 1}}
    verifier.verify(prog)
    torch.testing.FileCheck().check("lowc.linear_wq_tr").check("lowc.linear_wq_tr").check_not("linear_wq.").run(
        prog.gm.code)
    nodes = list(prog.nodes(torch.ops.lowc.linear_wq_tr.default))
    assert [n.args[5] for n in nodes] == [4, 8] and [n.args[8] for n in nodes] == [50, 33]
    assert [nodemeta.get(n).scheme.w_bits for n in nodes] == [4, 8]  # the layers keep their schemes; the op is the layout
    assert not any(k.endswith(".qweight") for k in prog.state_tensors())
    assert prog.attr("a.tr_qweight").dtype == torch.int32
    assert not p.run(prog, PassContext()).changed  # idempotent
    with torch.inference_mode():
        assert torch.equal(prog.call(x), ref)  # the reference implementation: same arithmetic


def test_triton_lower_rejects_what_the_kernels_cannot_take():
    from lowc.backends.triton.lower import TritonLower
    from lowc.ir.capture import trace
    from lowc.passes.base import PassContext
    from lowc.passes.quant.activations import QuantizeActivations
    from lowc.passes.quant.rtn import RTN

    with pytest.raises(KernelError, match=r"layer a \(50x72\): Triton kernels take 4- or 8-bit weights, got bits=3"):
        TritonLower().run(_program(bits=(3, 4)), PassContext())
    with pytest.raises(KernelError, match="layer a .*multiple of 16 .*got group_size=24"):
        TritonLower().run(_program(group_size=24), PassContext())
    prog = trace(TwoLinears(), (torch.randn(3, 72),))
    RTN(bits=8, group_size=-1, symmetric=True, ignore=()).run(prog, PassContext())
    QuantizeActivations(bits=8).run(prog, PassContext())
    with pytest.raises(KernelError, match="layer a: cuda-\\* Triton kernels take float activations"):
        TritonLower().run(prog, PassContext())


# ---- autotune logic (no GPU needed) --------------------------------------------------------------------
def _problem(m=1, n=4096, k=4096, bits=4, gs=128, sym=False, dtype="float16"):
    g, k_pad = (1, -(-k // 8) * 8) if gs == -1 else (-(-k // gs), -(-k // gs) * gs)
    return autotune.Problem(m=m, n=n, k=k, k_pad=k_pad, bits=bits, group_size=k_pad if gs == -1 else gs,
                            n_groups=g, symmetric=sym, dtype=dtype)


def test_autotune_fit_and_candidates():
    C = autotune.Config
    assert autotune.fit(C("gemm", 64, 128, block_m=16), _problem(gs=32)).block_k == 32  # inside one group
    assert autotune.fit(C("gemm", 64, 128, block_m=16), _problem(gs=48)).block_k == 16
    assert autotune.fit(C("gemv", 64, 256), _problem(gs=-1, k=200)).block_k == 256  # one group: any tile
    assert autotune.fit(C("gemm", 64, 64), _problem(gs=8, bits=8)) is None  # tl.dot needs K >= 16
    assert autotune.fit(C("gemv", 64, 64), _problem(gs=8, bits=4)).block_k == 8
    assert autotune.split_for(32, 32, 132) == 16 and autotune.split_for(1002, 32, 132) == 1
    assert autotune.split_for(4, 2, 132) == 2
    f = autotune.fit(C("gemv", 128, 128, split_k=0), _problem())
    assert f.split_k == 16  # 32 column blocks x 16 splits >= 2 programs per SM on 132 SMs
    assert [autotune.m_bucket(m) for m in (1, 3, 16, 17, 300, 2048, 10**5)] == [1, 4, 16, 32, 512, 2048, 4096]
    for m in (1, 16, 64, 2048):
        cs = autotune.candidates(_problem(m=m))
        assert cs and len(set(cs)) == len(cs)
        assert {c.kernel for c in cs} == ({"gemv", "gemm"} if m <= 16 else {"gemm"})
        assert all(c.split_k >= 1 and 128 % c.block_k == 0 for c in cs)
    assert autotune.heuristic(_problem(m=1)).kernel == "gemv"
    assert autotune.heuristic(_problem(m=7)).block_m == 16
    assert autotune.heuristic(_problem(m=2048)).block_m == 128
    assert autotune.heuristic(_problem(m=2048, gs=32)).block_k == 32


def test_autotune_cache_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWC_CACHE_DIR", str(tmp_path))
    autotune.clear_memory()
    try:
        p = _problem(m=5)
        k = autotune.key(p, "NVIDIA H100 80GB HBM3", "3.6.0")
        assert k == "NVIDIA H100 80GB HBM3|triton-3.6.0|w4g128a|float16|N4096|K4096|M8"
        assert autotune.lookup(k) is None
        cfg = autotune.heuristic(p)
        autotune.store(k, cfg, {cfg.label: 12.5})
        data = json.loads((tmp_path / "triton" / "autotune.json").read_text())
        assert data[k]["config"] == cfg.to_json()
        autotune.clear_memory()
        assert autotune.lookup(k) == cfg  # read back from the file
        calls = []
        assert autotune.tune(p, calls.append, "NVIDIA H100 80GB HBM3", "3.6.0", 132) == cfg and not calls
    finally:
        autotune.clear_memory()


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_kernels_compile_for_sm90_without_a_gpu():
    """Ahead-of-time compile (triton's bundled ptxas) of one GEMV and one tl.dot GEMM for Hopper: catches
    what the interpreter cannot (types, layouts, shared memory)."""
    from lowc.backends.triton import wq

    if wq.interpreting():
        pytest.skip("the interpreter replaces triton.jit")
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError:
        pytest.skip("this triton has no ASTSource/GPUTarget")
    p = _problem(m=1)
    r = wq.compile_for_gpu(autotune.heuristic(p), p)
    assert r["ptx_ops"].get("ld.global.v4.b32", 0) > 0  # the packed weights load 16 bytes at a time
    assert "cvt.rn.f32.u32" not in r["ptx_ops"] and "cvt.rn.f32.s32" not in r["ptx_ops"]  # no int->float per code
    p = _problem(m=2048, dtype="bfloat16")
    r = wq.compile_for_gpu(autotune.heuristic(p), p)
    assert r["ptx_ops"].get("wgmma.mma_async", 0) > 0 and r["shared"] < 228 * 1024


# ---- targets, CLI, artifact, devices ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_llama(tmp_path_factory):
    # one layer keeps the interpreter end to end fast; intermediate 160 pads down_proj's K to 256 (g128)
    return make_llama_dir(tmp_path_factory.mktemp("tr-llama"), seed=4, hidden_size=64, intermediate_size=160,
                          num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)


@pytest.fixture(scope="module")
def w4(small_llama, tmp_path_factory):
    """``cuda-w4a16`` compiled through the CLI, and ``ref-w4a16`` saved next to it. The interpreter
    subprocess reuses the parent's (``LOWC_TRITON_TEST_ARTIFACTS``) instead of compiling again."""
    d = os.environ.get("LOWC_TRITON_TEST_ARTIFACTS")
    if d and os.path.isdir(os.path.join(d, "w4")):
        return d
    d = str(tmp_path_factory.mktemp("tr-artifacts"))
    res = run_lowc("compile", small_llama, "--target", "cuda-w4a16", "-o", os.path.join(d, "w4"), "-q")
    assert res.returncode == 0, res.stderr
    import lowc

    lowc.compile(small_llama, "ref-w4a16", progress=False).save(os.path.join(d, "ref"))
    return d


IDS = torch.randint(0, 259, (2, 7), generator=torch.Generator().manual_seed(3))


@pytest.mark.slow
def test_targets_and_cli_compile(w4):
    import lowc

    targets = lowc.targets()
    assert targets["cuda-w4a16"].backend == "triton" and targets["cuda-w8a16"].scheme.w_bits == 8
    meta = json.loads(open(os.path.join(w4, "w4", "backend", "kernels.json")).read())
    assert meta["layout"]["name"] == "k-packed-int32" and meta["op"] == "lowc::linear_wq_tr"
    assert len(meta["layers"]) == 7 and {r["bits"] for r in meta["layers"]} == {4}
    down = next(r for r in meta["layers"] if r["layer"].endswith("down_proj"))
    assert down["k_pad"] == 256 and down["qweight"] == ["int32", [32, 64]] and down["scales"][1] == [2, 64]
    manifest = json.loads(open(os.path.join(w4, "w4", "manifest.json")).read())
    assert manifest["backend"] == "triton"
    assert [p["name"] for p in manifest["passes"]] == ["rtn", "triton-lower", "remove-dead"]
    assert {r["op"] for r in manifest["layers"] if r["scheme"]} == {"lowc::linear_wq_tr"}
    assert [(r["out_features"], r["in_features"]) for r in manifest["layers"] if r["layer"].endswith("down_proj")] == [(64, 160)]
    # on the CPU the reference implementation runs: exactly ref-w4a16 (same RTN, same arithmetic)
    cm, ref = lowc.load(os.path.join(w4, "w4")), lowc.load(os.path.join(w4, "ref"))
    assert cm.size()["bytes"] == ref.size()["bytes"]
    with torch.inference_mode():
        assert torch.equal(cm(IDS).logits, ref(IDS).logits)


def test_cuda_w8a16_is_ref_w8a16():
    import lowc

    x, model = torch.randn(5, 72), TwoLinears()
    w8 = lowc.compile(model, "cuda-w8a16", example_inputs=(x,), progress=False)
    ref8 = lowc.compile(model, "ref-w8a16", example_inputs=(x,), progress=False)
    assert [(r["scheme"]["w_bits"], r["op"]) for r in w8.layers()] == [(8, "lowc::linear_wq_tr")] * 2
    assert w8.size()["bytes"] == ref8.size()["bytes"]
    with torch.inference_mode():
        assert torch.equal(w8(x), ref8(x))


def test_devices_and_missing_triton_are_clear_errors(tmp_path, monkeypatch):
    from lowc.backends.triton import wq
    from lowc.backends.triton.targets import prepare

    if not torch.cuda.is_available():
        with pytest.raises(KernelError, match="none is available for device 'cuda'"):
            prepare(None, "cuda")
    with pytest.raises(KernelError, match="not on device 'mps'"):
        prepare(None, "mps")
    if not wq.interpreting():
        _, tw, b = _layer(16, 64, 4, 32, False)
        with pytest.raises(KernelError, match=r"need CUDA tensors \(or TRITON_INTERPRET=1.*x float32\[2, 64\], N=16"):
            wq.linear(torch.randn(2, 64), tw.qweight, tw.scales, tw.zeros, b, 4, 32, 64, 16)
        with pytest.raises(KernelError, match="needs TRITON_INTERPRET=1"):
            wq.register_interpreter()
    # compiling, saving and loading for the CPU need no triton; running the kernels without it says so
    monkeypatch.setitem(sys.modules, "triton", None)  # any `import triton` now raises ImportError
    import lowc

    cm = lowc.compile(torch.nn.Sequential(torch.nn.Linear(64, 32)), "cuda-w4a16",
                      example_inputs=(torch.randn(2, 64),), progress=False)
    cm.save(tmp_path / "a")
    assert lowc.load(tmp_path / "a")(torch.randn(1, 64)).shape == (1, 32)
    with pytest.raises(KernelError, match="the cuda-\\* targets run Triton kernels, but triton cannot be imported"):
        wq.require_triton()


@pytest.mark.slow
def test_generation_rebuild_matches_recompute(w4):
    import lowc
    from lowc.errors import GenerationError
    from lowc.runtime import GenerationConfig, KVCacheDecoder, RecomputeDecoder, generate, hf_generate, rebuild_hf
    from lowc.runtime.hf_rebuild import CompiledLinear, check_rebuild

    cm = lowc.load(os.path.join(w4, "w4"))
    model = rebuild_hf(cm)
    assert sum(isinstance(m, CompiledLinear) for m in model.modules()) == 7
    ids = IDS[:1, :5]
    a = hf_generate(model, ids, 6)
    recompute = generate(RecomputeDecoder(cm), ids, GenerationConfig(max_new_tokens=6))
    assert a.shape == (1, 11) and torch.equal(a, recompute)
    assert torch.equal(hf_generate(model, ids, 6, cache="static"), a)
    # the runtime's own loop over the rebuilt model (KV cache), with left padding in a batch
    mask = torch.ones_like(IDS[:, :5])
    mask[1, :2] = 0
    cfg = GenerationConfig(max_new_tokens=6)
    kv = generate(KVCacheDecoder(cm, model), IDS[:, :5], cfg, attention_mask=mask)
    assert torch.equal(kv, generate(RecomputeDecoder(cm), IDS[:, :5], cfg, attention_mask=mask))
    with pytest.raises(GenerationError, match="generation with a KV cache needs a compiled Hugging Face causal LM"):
        rebuild_hf(lowc.compile(TwoLinears(), "cuda-w4a16", example_inputs=(torch.randn(2, 72),), progress=False))
    # a rebuild that does not reproduce the graph (as after an online transform) is refused, not silently wrong
    bad = rebuild_hf(cm, check=False)
    bad.model.norm.weight = torch.nn.Parameter(bad.model.norm.weight * 2, requires_grad=False)
    with pytest.raises(GenerationError, match="does not reproduce the compiled graph"):
        check_rebuild(cm, bad)


# ---- kernels vs the reference op (GPU, or interpreter subprocess) -------------------------------------------
def _run_kernel(cfg, m, n=70, k=200, bits=4, gs=128, sym=False, dtype=torch.float16, bias=True, seed=0):
    from lowc.backends.triton import wq

    qw, tw, b = _layer(n, k, bits, gs, sym, dtype, bias, seed)
    x = (torch.randn(m, k, generator=torch.Generator().manual_seed(seed + 1)) * 2).to(dtype)
    ref = ops.linear_wq(x, qw.qweight, qw.scales, qw.zeros, b, bits, qw.group_size, k)
    exact = x.double() @ quant.dequantize(qw.qweight, qw.scales, qw.zeros, bits, qw.group_size, k, dtype).double().T
    if b is not None:
        exact = exact + b.double()
    p = wq._problem(x, tw.scales, tw.zeros, bits, qw.group_size, k, n)
    c = autotune.fit(cfg, p) if cfg is not None else None
    dev = lambda t: None if t is None else t.to(KDEV)  # noqa: E731
    y = wq.linear(dev(x), dev(tw.qweight), dev(tw.scales), dev(tw.zeros), dev(b), bits, qw.group_size, k, n,
                  config=c).cpu()
    assert y.dtype == dtype and y.shape == ref.shape
    scale = exact.abs().max().item()
    err_exact = (y.double() - exact).abs().max().item() / scale
    err_ref = (y.double() - ref.double()).abs().max().item() / scale
    what = f"{c.label if c else 'auto'} M={m} N={n} K={k} b{bits} g{gs} {'sym' if sym else 'asym'} {dtype}"
    assert err_exact <= TOL[dtype] and err_ref <= 2 * TOL[dtype], f"{what}: {err_exact:.2e} / {err_ref:.2e}"
    return y


CASES = list(itertools.product((4, 8), (32, 64, 128, -1), (False, True)))


@needs_kernels
@pytest.mark.parametrize("bits, gs, sym", CASES)
def test_kernel_matches_reference(bits, gs, sym):
    """Each scheme through the three kernel paths, dtypes rotating so that every path meets every dtype:
    GEMV at M=1 with split-K, the tl.dot GEMM in the decode tiling (BLOCK_M=16, odd M, split-K) and in a
    prefill tiling (odd M over two row blocks); N=70 and K=200 are not tile multiples."""
    i = CASES.index((bits, gs, sym))
    C = autotune.Config
    _run_kernel(C("gemv", 64, 128, split_k=2), 1, bits=bits, gs=gs, sym=sym, dtype=DTYPES[i % 3], bias=i % 2 == 0)
    _run_kernel(C("gemm", 64, 128, block_m=16, split_k=2, unpack=i % 2), 3, bits=bits, gs=gs, sym=sym,
                dtype=DTYPES[(i + 1) % 3])
    _run_kernel(C("gemm", 64, 64, block_m=32, unpack=(i + 1) % 2), 33, bits=bits, gs=gs, sym=sym,
                dtype=DTYPES[(i + 2) % 3], bias=i % 2 == 1)


@needs_kernels
def test_kernel_tile_edges():
    C = autotune.Config
    # N below, at and above a tile; K inside one tile, at tile multiples, over several; odd M (the GEMV
    # runs one program per row, so it gets the small M: the interpreter is slow per program)
    for n, k, m in [(16, 128, 2), (1, 64, 1), (130, 96, 17), (64, 384, 5)]:
        if m <= 2:
            _run_kernel(C("gemv", 32, 64, split_k=3), m, n=n, k=k, gs=32, dtype=torch.float32)
        _run_kernel(C("gemm", 32, 64, block_m=16, unpack=1), m, n=n, k=k, gs=32, bits=8, sym=True)


@needs_kernels
def test_kernel_every_candidate_runs():
    """Every autotune candidate (as fitted to a small layer) compiles/runs and is right."""
    for m in (1, 20):
        p = _problem(m=m, n=64, k=256, gs=64)
        cs = autotune.candidates(p, sms=4)
        assert len(cs) >= (7 if m == 1 else 12)
        for c in cs:
            _run_kernel(c, m, n=64, k=256, gs=64, dtype=torch.bfloat16 if m == 1 else torch.float16, bias=False)


@needs_kernels
def test_kernel_shapes_and_heuristic_config():
    from lowc.backends.triton import wq

    _run_kernel(None, 1, dtype=torch.float32)  # heuristic configs (what the interpreter and graphs use)
    _run_kernel(None, 6, bits=8, gs=-1, sym=True)
    _run_kernel(None, 40, gs=64, dtype=torch.bfloat16)
    _, tw, b = _layer(24, 64, 4, 32, False)
    args = [t.to(KDEV) for t in (tw.qweight, tw.scales, tw.zeros, b)]
    x = torch.randn(2, 3, 128).to(KDEV)[..., ::2]  # 3-D and not contiguous
    y = wq.linear(x, *args, 4, 32, 64, 24)
    ref = op.reference_linear_wq_tr(x.cpu(), tw.qweight, tw.scales, tw.zeros, b, 4, 32, 64, 24)
    assert y.shape == (2, 3, 24)
    torch.testing.assert_close(y.cpu(), ref, rtol=1e-5, atol=1e-5)
    assert wq.linear(torch.zeros(0, 64).to(KDEV), *args, 4, 32, 64, 24).shape == (0, 24)
    with pytest.raises(KernelError, match=r"float16, bfloat16 or float32 activations; got x float64\[2, 64\]"):
        wq.linear(torch.zeros(2, 64, dtype=torch.float64).to(KDEV), *args, 4, 32, 64, 24)


@pytest.mark.slow
@needs_kernels
def test_kernel_end_to_end_model(small_llama, w4, tmp_path):
    """A compiled cuda-w4a16 model loaded on the kernel device runs every linear through the kernels and
    matches ref-w4a16; generation with the KV cache (decode steps in the GEMV) gives the recompute tokens.
    On a GPU, cuda-w8a16 against ref-w8a16 too (under the interpreter the kernel tests cover 8 bits)."""
    import lowc
    from lowc.backends.triton import wq
    from lowc.runtime import GenerationConfig, RecomputeDecoder, generate, hf_generate, rebuild_hf

    pairs = [(os.path.join(w4, "w4"), os.path.join(w4, "ref"))]
    if KDEV == "cuda":
        lowc.compile(small_llama, "cuda-w8a16", progress=False).save(tmp_path / "w8")
        lowc.compile(small_llama, "ref-w8a16", progress=False).save(tmp_path / "r8")
        pairs.append((tmp_path / "w8", tmp_path / "r8"))
    for path, ref_path in pairs:
        cm = lowc.load(path, device=KDEV)
        before = sum(wq.LAUNCHES.values())
        with torch.inference_mode():
            y = cm(IDS.to(KDEV)).logits.cpu()
            r = lowc.load(ref_path)(IDS).logits
        assert sum(wq.LAUNCHES.values()) - before >= 7  # every linear ran a kernel
        rel = ((y - r).norm() / r.norm()).item()
        assert rel < 1e-5, f"{path}: {rel}"
    cm = lowc.load(os.path.join(w4, "w4"), device=KDEV)
    model = rebuild_hf(cm)
    before = wq.LAUNCHES["gemv"]
    prompt = IDS[:1, :4].to(KDEV)
    out = hf_generate(model, prompt, 2)
    assert wq.LAUNCHES["gemv"] > before  # decode steps (M=1) took the GEMV
    ref = generate(RecomputeDecoder(lowc.load(os.path.join(w4, "w4"))), prompt.cpu(), GenerationConfig(max_new_tokens=2))
    assert torch.equal(out.cpu(), ref)
    # the runtime's loop (kv-cache strategy) calls the same ops, so the Triton kernels, on the kernel device
    before = wq.LAUNCHES["gemv"]
    assert torch.equal(cm.generate(prompt, 2, strategy="kv-cache", eos_token_id=None), ref)
    assert wq.LAUNCHES["gemv"] > before


@pytest.mark.skipif(KDEV != "cuda", reason="autotuning times kernels on a GPU")
def test_gpu_autotune(monkeypatch):
    monkeypatch.setenv("LOWC_TRITON_AUTOTUNE", "1")
    autotune.clear_memory()
    _run_kernel(None, 4, n=256, k=512)
    _run_kernel(None, 100, n=256, k=512)
    data = json.loads(open(autotune.cache_path()).read())
    assert {k.rsplit("|", 1)[1] for k in data} >= {"M4", "M128"}
    assert all(len(v["timings_us"]) >= 2 for v in data.values())


# ---- the interpreter run ---------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(INTERP or not HAS_TRITON, reason="this is the parent of the interpreter run (needs triton)")
@pytest.mark.skipif(bool(triton_interpreter_broken()), reason=str(triton_interpreter_broken()))
def test_kernels_under_interpreter(w4, tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1", "LOWC_CACHE_DIR": str(tmp_path), "PYTHONWARNINGS": "ignore",
           "OMP_NUM_THREADS": "1", "LOWC_TRITON_TEST_ARTIFACTS": w4}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", os.path.abspath(__file__),
                        "-k", "test_kernel_"], capture_output=True, text=True, timeout=900, env=env,
                       cwd=os.path.dirname(os.path.abspath(__file__)))
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert " passed" in r.stdout and "skipped" not in r.stdout.splitlines()[-1], r.stdout[-2000:]


# ---- benchmark harness --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_benchmark_script_parses_and_refuses_without_cuda(tmp_path):
    script = os.path.join(REPO, "benchmarks", "triton_linear.py")
    r = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--interpret-smoke" in r.stdout
    if not torch.cuda.is_available():
        r = subprocess.run([sys.executable, script, "--out", str(tmp_path)], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 2 and "needs a CUDA GPU" in r.stderr
