"""The Triton ``lowc::ssd`` kernel (``lowc.backends.triton.ssd``) against the quadratic oracle, under
``TRITON_INTERPRET=1`` on CPU tensors in a subprocess (the interpreter must be on before triton is
imported, and must not leak into other test files); on a GPU when one is present; compiled ahead of
time for sm_90 without one; its fallbacks; on a GPU, its registration by the ``cuda-*`` targets' prepare."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from lowc.backends.triton import ssd as tss

HAS_TRITON = importlib.util.find_spec("triton") is not None

_KERNEL_SCRIPT = textwrap.dedent(r"""
    import json, sys, torch
    sys.path.insert(0, sys.argv[1])
    from test_ssd import operands, call, _slice
    from lowc.ir.dialect.ssd import reference_ssd, chunked_ssd
    from lowc.backends.triton import ssd as tss
    import triton  # noqa: F401  (imported after TRITON_INTERPRET=1 is set by the parent)

    def err(got, ref):
        return dict(err=(got.double() - ref.double()).abs().max().item(), scale=max(1.0, ref.abs().max().item()),
                    dtype=str(got.dtype), shape=list(got.shape))

    out = {}
    cases = {
        "L1_chunk16": (dict(length=1), 16),
        "L37_gqa4to1_chunk16": (dict(h=4, g=1, length=37, n=16, p=8), 16),
        "L130_gqa_conv_mask_chunk32": (dict(length=130, k=4, mask="left"), 32),
        "L130_mha_mask_noD_chunk16": (dict(h=2, g=2, length=130, d=False, mask="left"), 16),
        "L130_odd_dims_P80": (dict(h=2, g=1, length=130, n=24, p=80), 64),
        "L130_fp16_mask": (dict(length=130, mask="left", dtype=torch.float16), 32),
        "L100_bf16_conv": (dict(length=100, k=3, dtype=torch.bfloat16), 64),
        "chunk_7_runs_64": (dict(length=70), 7),
        "fp64_fallback": (dict(length=40, dtype=torch.float64), 16),
        "P300_fallback": (dict(b=1, h=2, g=1, length=20, p=300), 16),
    }
    for name, (kw, chunk) in cases.items():
        o = operands(seed=1, **kw)
        out[name] = err(call(tss.ssd_triton, o, chunk=chunk), call(reference_ssd, o))
    # continuation: initial state in, final state out (prefill on CUDA)
    o = operands(length=130, k=4, mask="left", seed=2)
    y1, st = call(tss.ssd_triton, _slice(o, 0, 50), chunk=32, return_state=True)
    y2, st2 = call(tss.ssd_triton, _slice(o, 50, 130), chunk=32, initial_state=st, return_state=True)
    _, st_ref = call(chunked_ssd, o, return_state=True)
    out["continuation"] = err(torch.cat([y1, y2], 2), call(reference_ssd, o))
    out["final_state"] = err(st2.ssm, st_ref.ssm)
    out["final_state"]["pos"] = st2.pos
    # registered as the op's implementation (on CPU here: only under the interpreter)
    tss.register("cpu")
    o = operands(length=96, k=2, seed=3)
    out["registered_op"] = err(call(torch.ops.lowc.ssd, o, chunk=32), call(reference_ssd, o))
    print("RESULT" + json.dumps(out))
""")


@pytest.fixture(scope="module")
def kernel_results():
    if not HAS_TRITON:
        pytest.skip("triton is not installed (pip install -e '.[triton]')")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-c", _KERNEL_SCRIPT, os.path.dirname(__file__)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


#: max |kernel - oracle| / max(1, max |oracle|): fp32 sums in another order; fp16/bf16 one output rounding
TOL = {"torch.float32": 5e-6, "torch.float64": 1e-12, "torch.float16": 2e-3, "torch.bfloat16": 1.6e-2}


@pytest.mark.slow
@pytest.mark.parametrize("case", [
    "L1_chunk16", "L37_gqa4to1_chunk16", "L130_gqa_conv_mask_chunk32", "L130_mha_mask_noD_chunk16",
    "L130_odd_dims_P80", "L130_fp16_mask", "L100_bf16_conv", "chunk_7_runs_64", "fp64_fallback", "P300_fallback",
    "continuation", "final_state", "registered_op",
])
def test_kernel_matches_oracle_interpreted(kernel_results, case):
    r = kernel_results[case]
    assert r["err"] <= TOL[r["dtype"]] * r["scale"], (case, r)


@pytest.mark.slow
def test_kernel_dtypes_shapes_and_state_interpreted(kernel_results):
    assert kernel_results["L130_fp16_mask"]["dtype"] == "torch.float16"
    assert kernel_results["L100_bf16_conv"]["dtype"] == "torch.bfloat16"
    assert kernel_results["L130_odd_dims_P80"]["shape"] == [2, 2, 130, 80]  # two P blocks of 64
    assert kernel_results["final_state"]["shape"] == [2, 4, 12, 8] and kernel_results["final_state"]["pos"] == 130


def test_fallback_reasons():
    from lowc.ir.dialect.ssd import chunked_ssd

    c, b, x, a = torch.rand(1, 2, 5, 8), torch.rand(1, 1, 5, 8), torch.rand(1, 1, 5, 4), -torch.rand(1, 2, 5)
    assert tss.kernel_supports(c, b, x, a) is None
    assert "x has dtype torch.float64" in tss.kernel_supports(c, b, x.double(), a)
    assert "head width P=300 > 256" in tss.kernel_supports(c, b, torch.rand(1, 1, 5, 300), a)
    # a fallback never imports triton: it is the chunked form
    y = tss.ssd_triton(c.double(), b.double(), x.double(), a.double())
    assert torch.equal(y, chunked_ssd(c.double(), b.double(), x.double(), a.double()))


@pytest.mark.skipif(not torch.cuda.is_available() or not HAS_TRITON,
                    reason="runs the compiled kernel on a GPU (CI covers it with the interpreter above)")
@pytest.mark.parametrize("dtype, h, g, length, n, p, k", [
    (torch.bfloat16, 8, 2, 1000, 128, 64, 0), (torch.float16, 4, 4, 777, 64, 64, 4), (torch.float32, 4, 1, 500, 64, 128, 0),
    (torch.float32, 2, 1, 130, 16, 32, 4),
])
def test_kernel_on_gpu(dtype, h, g, length, n, p, k):
    import test_ssd

    from lowc.backends.triton import targets
    from lowc.ir.dialect.ssd import reference_ssd

    o = test_ssd.operands(b=2, h=h, g=g, length=length, n=n, p=p, k=k, mask="left", dtype=dtype)
    o = {name: (t.cuda() if t is not None else None) for name, t in o.items()}
    targets.prepare(None, "cuda")  # what loading a cuda-* artifact does: registers every kernel, this one too
    got = test_ssd.call(torch.ops.lowc.ssd, o).float()
    ref = test_ssd.call(reference_ssd, o).float()
    tol = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    assert (got - ref).abs().max().item() <= tol * max(1.0, ref.abs().max().item())
    assert torch.equal(got, test_ssd.call(tss.ssd_triton, o).float())  # the op ran the kernel


_COMPILE_SCRIPT = textwrap.dedent(r"""
    import sys
    import lowc.backends.triton.ssd as tss
    assert "triton" not in sys.modules, "importing the kernel module imported triton"
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = tss._kernel()
    ptr = "*bf16"
    sig = dict(C=ptr, B=ptr, X=ptr, A="*fp32", DS="*fp32", KM="*i8", INIT="*fp32", Y=ptr, FINAL="*fp32",
               L="i32", H="i32", G="i32", N="i32", P="i32")
    const = dict(Q=64, BN=128, BP=64, HAS_D=True, HAS_MASK=True, HAS_INIT=True, STORE_FINAL=True, PREC="tf32")
    names = list(sig) + list(const)
    sig.update({n: "constexpr" for n in const})
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(n),): v for n, v in const.items()})
    c = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8, "num_stages": 1})
    print("SHARED", c.metadata.shared, "cubin" in c.asm)
""")


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_kernel_imports_triton_lazily_and_compiles_for_sm90():
    """No GPU needed: Triton compiles the Mamba-2 configuration (bf16, N = 128, P block 64, chunk 64,
    key_mask, D, initial and final state) to an sm_90 cubin, which the interpreter cannot check."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, shared, has_cubin = [x for x in proc.stdout.splitlines() if x.startswith("SHARED")][-1].split()
    assert has_cubin == "True" and int(shared) <= 160 * 1024  # fits an A100 (163 KB) as well as an H100 (227 KB)
