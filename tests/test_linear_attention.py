"""``lowc::linear_attention``: chunked forms and recurrent decode against the quadratic oracle, the
Triton kernel under ``TRITON_INTERPRET=1`` (in a subprocess, so the interpreter setting cannot leak
into other test files), numerical stability at long lengths, fake kernel and operand checks."""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import triton_interpreter_broken
from lowc.errors import KernelError
from lowc.ir.dialect import ensure_registered

ensure_registered()
from lowc.ir.dialect.linear_attention import reference_linear_attention  # noqa: E402
from lowc.ir.dialect.linear_attention_chunked import chunked_linear_attention  # noqa: E402
from lowc.runtime.state import LinearAttentionState, prefill, step  # noqa: E402

op = torch.ops.lowc.linear_attention.default


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def softmax_f(x, w):
    """LoLCATs' feature map: [softmax(xW), softmax(-xW)] over the feature dim (bounded, stable)."""
    y = x @ w
    return torch.cat([torch.softmax(y, dim=-1), torch.softmax(-y, dim=-1)], dim=-1)


def operands(b=2, h=4, hk=2, lq=70, lk=None, f=16, d=8, dv=12, *, window=0, mask=None, dtype=torch.float32, seed=0):
    """Random operands of the op: learned-looking feature maps (softmax_f of the raw q/k), GQA, a key_mask."""
    g = _gen(seed)
    lk = lq if lk is None else lk
    q = torch.randn(b, h, lq, d, generator=g) * 2
    k = torch.randn(b, hk, lk, d, generator=g) * 2
    w = torch.randn(d, f // 2, generator=g)
    fq, fk = softmax_f(q, w), softmax_f(k, w)
    v = torch.randn(b, hk, lk, dv, generator=g)
    wf, lf = torch.rand(h, generator=g) + 0.1, torch.rand(h, generator=g) + 0.1
    km = None
    if mask is not None:
        km = torch.ones(b, lk, dtype=torch.bool)
        if mask in ("left", "both"):
            km[0, : lk // 3] = False  # left padding of a short prompt
        if mask in ("right", "both"):
            km[-1, lk // 2:] = False  # right padding
    cast = (lambda t: t.to(dtype))
    return dict(fq=cast(fq), fk=cast(fk), v=cast(v), q=cast(q) if window else None, k=cast(k) if window else None,
                window_factor=wf, linear_factor=lf, key_mask=km)


def call(fn, ops_, causal, window, scale=0.35, eps=1e-6):
    o = ops_
    return fn(o["fq"], o["fk"], o["v"], o["q"], o["k"], o["window_factor"], o["linear_factor"], o["key_mask"],
              causal, window, scale, eps)


# ---------------------------------------------------------------- chunked forms vs the oracle


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [0, 1, 5, 64, 65, 300])
def test_chunked_matches_oracle(causal, window):
    cases = itertools.product([1, 63, 64, 130, 200], [(4, 2), (3, 3)], [None, "left", "right", "both"])
    for n, (length, (h, hk), mask) in enumerate(cases):
        lk = length if causal else length + 9  # non-causal: Lq != Lk too
        o = operands(h=h, hk=hk, lq=length, lk=lk, window=window, mask=mask, seed=n)
        ref = call(reference_linear_attention, o, causal, window)
        got = call(chunked_linear_attention, o, causal, window)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=2e-6, msg=lambda m: f"L={length} H={h}/{hk} {mask}: {m}")


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
@pytest.mark.parametrize("causal, window", [(True, 0), (True, 64), (False, 0), (False, 7)])
def test_chunked_half_precision_inputs(dtype, tol, causal, window):
    o = operands(lq=150, window=window, mask="left", dtype=dtype)
    got = call(chunked_linear_attention, o, causal, window)
    assert got.dtype == dtype
    torch.testing.assert_close(got, call(reference_linear_attention, o, causal, window), rtol=tol, atol=tol)


def test_op_runs_chunked_form_and_equals_oracle():
    o = operands(lq=200, window=64, mask="both")
    y = call(op, o, True, 64)
    assert torch.equal(y, call(chunked_linear_attention, o, True, 64))
    torch.testing.assert_close(y, call(reference_linear_attention, o, True, 64), rtol=1e-5, atol=2e-6)


def test_semantics_against_independent_formulas():
    """window >= L is causal softmax attention; window 0 non-causal is one global normalised sum."""
    o = operands(b=1, h=2, hk=2, lq=90, window=1)
    y = op(o["fq"], o["fk"], o["v"], o["q"], o["k"], None, None, None, True, 10**9, 0.35, 1e-6)
    sdpa = F.scaled_dot_product_attention(o["q"], o["k"], o["v"], is_causal=True, scale=0.35)
    torch.testing.assert_close(y, sdpa, rtol=1e-5, atol=1e-5)
    y0 = op(o["fq"], o["fk"], o["v"], None, None, None, None, None, False, 0, 0.35, 1e-6)
    a = o["fq"] @ o["fk"].transpose(-1, -2)
    torch.testing.assert_close(y0, (a @ o["v"]) / a.sum(-1, keepdim=True), rtol=1e-5, atol=1e-6)


def test_fully_masked_query_gives_zero():
    o = operands(b=1, h=2, hk=1, lq=80, window=64)
    o["key_mask"] = torch.zeros(1, 80, dtype=torch.bool)
    o["key_mask"][0, 70:] = True
    y = call(op, o, True, 64)
    assert torch.equal(y[:, :, :70], torch.zeros_like(y[:, :, :70]))
    torch.testing.assert_close(y, call(reference_linear_attention, o, True, 64))


class _PeakTensor(TorchDispatchMode):
    """Largest tensor produced by any op (numel)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("causal, window", [(True, 0), (True, 64), (False, 0), (False, 64)])
def test_chunked_memory_is_linear_not_quadratic(causal, window):
    o = operands(b=1, h=2, hk=1, lq=4096, f=16, d=8, dv=8, window=window)
    with _PeakTensor() as mode:
        call(chunked_linear_attention, o, causal, window)
    # the oracle would build [1, 2, 4096, 4096] = 33.5M-element weights; chunks stay within ~C*3C per row
    assert mode.largest <= 2 * 4096 * 64 * 3, mode.largest


def test_op_is_differentiable_like_the_oracle():
    o = operands(b=1, h=2, hk=1, lq=100, window=5, mask="left")
    leaves = {n: t.clone().requires_grad_(True) for n, t in o.items() if n != "key_mask" and t is not None}
    o2 = {**o, **leaves}
    g = torch.randn(1, 2, 100, 12, generator=_gen(3))
    ga = torch.autograd.grad(call(op, o2, True, 5), list(leaves.values()), g)
    gb = torch.autograd.grad(call(reference_linear_attention, o2, True, 5), list(leaves.values()), g)
    for name, a, b in zip(leaves, ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"grad {name}: {m}")


# ---------------------------------------------------------------- fake kernel and operand checks


def test_fake_kernel_shapes_and_checks():
    with FakeTensorMode():
        y = op(torch.rand(2, 4, 10, 8), torch.rand(2, 2, 10, 8), torch.rand(2, 2, 10, 5, dtype=torch.float16),
               torch.rand(2, 4, 10, 6), torch.rand(2, 2, 10, 6), None, None, None, True, 3, 1.0, 1e-6)
        assert y.shape == (2, 4, 10, 5) and y.dtype == torch.float16
        with pytest.raises(ValueError, match="query heads 4 must be a multiple of key/value heads 3"):
            op(torch.rand(2, 4, 10, 8), torch.rand(2, 3, 10, 8), torch.rand(2, 3, 10, 5), None, None, None, None, None,
               False, 0, 1.0, 1e-6)


@pytest.mark.parametrize("kw, match", [
    (dict(window=3), r"window=3 needs the raw q and k"),
    (dict(fk=torch.rand(2, 2, 11, 8), v=torch.rand(2, 2, 11, 5)), r"causal attention needs Lq == Lk, got 10 and 11"),
    (dict(fk=torch.rand(2, 2, 10, 7)), r"fk \(2, 2, 10, 7\) does not match fq \(2, 4, 10, 8\)"),
    (dict(v=torch.rand(2, 2, 9, 5)), r"v \(2, 2, 9, 5\) must be \[B=2, Hk=2, Lk=10, Dv\]"),
    (dict(key_mask=torch.ones(2, 10)), r"key_mask must be bool \[B=2, Lk=10\]"),
    (dict(linear_factor=torch.ones(3)), r"linear_factor \(3,\) must be \[H=4\]"),
    (dict(window=-1), r"window must be >= 0"),
    (dict(fq=torch.rand(4, 10, 8)), r"must be 4-D"),
])
def test_bad_operands_are_one_line_errors(kw, match):
    a = dict(fq=torch.rand(2, 4, 10, 8), fk=torch.rand(2, 2, 10, 8), v=torch.rand(2, 2, 10, 5), q=None, k=None,
             window_factor=None, linear_factor=None, key_mask=None, causal=True, window=0, scale=1.0, eps=1e-6)
    a.update(kw)
    with pytest.raises(ValueError, match=match) as e:
        op(*a.values())
    assert "\n" not in str(e.value) and str(e.value).startswith("lowc::linear_attention: ")


def test_kernel_shape_errors_name_the_shape():
    from lowc.backends.triton.linear_attention import linear_attention_triton

    o = operands(b=1, h=2, hk=1, lq=10, f=300)
    with pytest.raises(KernelError, match=r"fq \(1, 2, 10, 300\) has width 300 > 256"):
        call(linear_attention_triton, o, True, 0)
    o = {n: (t.double() if n in ("fq", "fk", "v") else t) for n, t in operands(b=1, h=2, hk=1, lq=10).items()}
    with pytest.raises(KernelError, match="fq has dtype torch.float64"):
        call(linear_attention_triton, o, True, 0)


# ---------------------------------------------------------------- recurrent decode


def _decode(o, window, prompt, scale=0.35, eps=1e-6):
    b, hk, _, f = o["fk"].shape
    length, dv = o["fq"].shape[2], o["v"].shape[-1]
    d = o["q"].shape[-1] if window else 0
    st = LinearAttentionState.empty(b, hk, f, dv, d, window=window, scale=scale, eps=eps)
    ys = []
    kw = dict(window_factor=o["window_factor"], linear_factor=o["linear_factor"])
    sl = lambda t, a, z: None if t is None else t[:, :, a:z]  # noqa: E731
    if prompt:
        km = None if o["key_mask"] is None else o["key_mask"][:, :prompt]
        ys.append(prefill(st, *(sl(o[n], 0, prompt) for n in ("fq", "fk", "v", "q", "k")), key_mask=km, **kw))
    for t in range(prompt, length):
        kv = None if o["key_mask"] is None else o["key_mask"][:, t]
        ys.append(step(st, *(sl(o[n], t, t + 1) for n in ("fq", "fk", "v", "q", "k")), key_valid=kv, **kw))
    return torch.cat(ys, dim=2), st


@pytest.mark.parametrize("window", [0, 5, 64])
@pytest.mark.parametrize("prompt", [0, 1, 40, 100])
def test_recurrent_decode_matches_parallel(window, prompt):
    o = operands(b=2, h=4, hk=2, lq=160, window=window, mask="left" if prompt % 2 == 0 else None, seed=prompt)
    ys, st = _decode(o, window, prompt)
    torch.testing.assert_close(ys, call(op, o, True, window), rtol=1e-5, atol=2e-6)
    assert st.pos == 160


def test_prefill_on_a_used_state_continues_token_by_token():
    o = operands(b=1, h=2, hk=1, lq=120, window=64)
    b, hk, _, f = o["fk"].shape
    st = LinearAttentionState.empty(b, hk, f, 12, 8, window=64, scale=0.35, eps=1e-6)
    kw = dict(window_factor=o["window_factor"], linear_factor=o["linear_factor"])
    y1 = prefill(st, *(o[n][:, :, :70] for n in ("fq", "fk", "v", "q", "k")), **kw)
    y2 = prefill(st, *(o[n][:, :, 70:] for n in ("fq", "fk", "v", "q", "k")), **kw)
    torch.testing.assert_close(torch.cat([y1, y2], 2), call(op, o, True, 64), rtol=1e-5, atol=2e-6)


def test_recurrent_state_is_constant_size_over_1000_steps():
    b, h, hk, f, d, dv, w = 1, 4, 2, 16, 8, 8, 64
    st = LinearAttentionState.empty(b, hk, f, dv, d, window=w, scale=0.35, eps=1e-6)
    ptrs = [t.data_ptr() for t in st.tensors()]
    size = st.nbytes()
    assert size == 4 * (b * hk * (f * dv + f + w * (f + d + dv))) + b * w
    g = _gen(0)
    for _ in range(1000):
        q, k = torch.randn(b, h, 1, d, generator=g), torch.randn(b, hk, 1, d, generator=g)
        y = step(st, torch.rand(b, h, 1, f, generator=g), torch.rand(b, hk, 1, f, generator=g),
                 torch.randn(b, hk, 1, dv, generator=g), q, k)
        assert torch.isfinite(y).all()
    assert st.pos == 1000 and st.nbytes() == size
    assert [t.data_ptr() for t in st.tensors()] == ptrs  # updated in place, nothing reallocated


def test_decode_bad_input():
    st = LinearAttentionState.empty(1, 2, 16, 8, 8, window=4, scale=1.0, eps=1e-6)
    with pytest.raises(ValueError, match="window=4 needs the raw q and k"):
        step(st, torch.rand(1, 2, 1, 16), torch.rand(1, 2, 1, 16), torch.rand(1, 2, 1, 8))
    with pytest.raises(ValueError, match="step takes one token"):
        step(st, torch.rand(1, 2, 2, 16), torch.rand(1, 2, 2, 16), torch.rand(1, 2, 2, 8),
             torch.rand(1, 2, 2, 8), torch.rand(1, 2, 2, 8))
    with pytest.raises(ValueError, match=r"do not match the state \(B=1, Hk=2, F=16, Dv=8\)"):
        step(st, torch.rand(1, 2, 1, 32), torch.rand(1, 2, 1, 32), torch.rand(1, 2, 1, 8))
    with pytest.raises(ValueError, match="needs head_dim"):
        LinearAttentionState.empty(1, 2, 16, 8, window=4, scale=1.0, eps=1e-6)


# ---------------------------------------------------------------- numerical stability


def hedgehog_stable(x, w, b):
    """Hedgehog's [exp(xW+b), exp(-xW-b)] with the row max over the 2F' features subtracted."""
    y = x @ w + b
    y = torch.cat([y, -y], dim=-1)
    return torch.exp(y - y.amax(dim=-1, keepdim=True))


@pytest.mark.parametrize("fmap", ["softmax_f", "hedgehog"])
@pytest.mark.parametrize("window", [0, 64])
def test_long_sequence_is_finite(fmap, window):
    """L = 8192, activations with LLM-like outliers (|q·w| up to ~100): stabilised maps stay finite."""
    g = _gen(7)
    length, d = 8192, 16
    q = torch.randn(1, 2, length, d, generator=g) * 4
    k = torch.randn(1, 1, length, d, generator=g) * 4
    q[..., 3] *= 8  # outlier channel
    w = torch.randn(d, 16, generator=g)
    if fmap == "softmax_f":
        fq, fk = softmax_f(q, w), softmax_f(k, w)
    else:
        bias = torch.randn(16, generator=g)
        fq, fk = hedgehog_stable(q, w, bias), hedgehog_stable(k, w, bias)
        assert not torch.isfinite(torch.exp(q @ w + bias)).all()  # the raw map would overflow
    v = torch.randn(1, 1, length, 16, generator=g)
    for dtype in (torch.float32, torch.bfloat16):
        y = op(fq.to(dtype), fk.to(dtype), v.to(dtype), q.to(dtype) if window else None,
               k.to(dtype) if window else None, None, None, None, True, window, d ** -0.5, 1e-6)
        assert torch.isfinite(y).all(), (fmap, window, dtype)
        assert y.abs().max() <= v.abs().max() * 1.01  # outputs are convex combinations of values


# ---------------------------------------------------------------- Triton kernel (interpreter, subprocess)

_KERNEL_SCRIPT = textwrap.dedent(r"""
    import json, sys, torch
    sys.path.insert(0, sys.argv[1])
    from test_linear_attention import operands, call, softmax_f
    from lowc.ir.dialect.linear_attention import reference_linear_attention
    from lowc.backends.triton import linear_attention as tla
    import triton  # noqa: F401  (imported after TRITON_INTERPRET=1 is set by the parent)

    out = {}
    cases = {
        "w0_gqa_L100": dict(kw=dict(h=4, hk=2, lq=100), causal=True, window=0),
        "w64_gqa_L130": dict(kw=dict(h=4, hk=2, lq=130), causal=True, window=64),
        "w64_mha_L200_mask": dict(kw=dict(h=2, hk=2, lq=200, mask="both"), causal=True, window=64),
        "w5_gqa_L70_mask": dict(kw=dict(h=4, hk=1, lq=70, mask="left"), causal=True, window=5),
        "w1_L65": dict(kw=dict(h=2, hk=1, lq=65), causal=True, window=1),
        "w64_odd_dims": dict(kw=dict(h=2, hk=1, lq=90, f=24, d=12, dv=20), causal=True, window=64),
        "w64_bf16": dict(kw=dict(h=2, hk=1, lq=150, mask="left", dtype=torch.bfloat16), causal=True, window=64),
        "w0_fp16": dict(kw=dict(h=2, hk=1, lq=150, mask="right", dtype=torch.float16), causal=True, window=0),
        "noncausal_fallback": dict(kw=dict(h=2, hk=1, lq=80, lk=95), causal=False, window=7),
        "w100_fallback": dict(kw=dict(h=2, hk=1, lq=150), causal=True, window=100),
    }
    for name, c in cases.items():
        o = operands(b=2, window=c["window"], seed=1, **c["kw"])
        ref = call(reference_linear_attention, o, c["causal"], c["window"])
        got = call(tla.linear_attention_triton, o, c["causal"], c["window"])
        out[name] = dict(err=(got.float() - ref.float()).abs().max().item(), dtype=str(got.dtype),
                         shape=list(got.shape))
    # registered as the op's implementation (on CPU here: only under the interpreter)
    tla.register("cpu")
    o = operands(b=1, h=2, hk=1, lq=96, window=64, seed=2)
    got = call(torch.ops.lowc.linear_attention, o, True, 64)
    out["registered_op"] = dict(err=(got - call(reference_linear_attention, o, True, 64)).abs().max().item())
    try:
        call(torch.ops.lowc.linear_attention, operands(b=1, h=2, hk=1, lq=10, f=300), True, 0)
        out["registered_op"]["kernel_error"] = ""
    except Exception as e:
        out["registered_op"]["kernel_error"] = type(e).__name__ + ": " + str(e)
    # stability at a moderate length: softmax_f features, bf16, window 64 and 0
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 1, 1024, 16, generator=g) * 6
    k = torch.randn(1, 1, 1024, 16, generator=g) * 6
    w = torch.randn(16, 16, generator=g)
    v = torch.randn(1, 1, 1024, 16, generator=g)
    bf = lambda t: t.to(torch.bfloat16)
    for win in (0, 64):
        y = tla.linear_attention_triton(bf(softmax_f(q, w)), bf(softmax_f(k, w)), bf(v), bf(q) if win else None,
                                        bf(k) if win else None, None, None, None, True, win, 0.25, 1e-6)
        out[f"stable_L1024_w{win}"] = dict(finite=bool(torch.isfinite(y).all()))
    print("RESULT" + json.dumps(out))
""")


@pytest.fixture(scope="module")
def kernel_results():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (pip install -e '.[triton]')")
    if triton_interpreter_broken():
        pytest.skip(triton_interpreter_broken())
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-c", _KERNEL_SCRIPT, os.path.dirname(__file__)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


@pytest.mark.slow
@pytest.mark.parametrize("case, tol", [
    ("w0_gqa_L100", 2e-6), ("w64_gqa_L130", 2e-6), ("w64_mha_L200_mask", 2e-6), ("w5_gqa_L70_mask", 2e-6),
    ("w1_L65", 2e-6), ("w64_odd_dims", 2e-6), ("w64_bf16", 1.6e-2), ("w0_fp16", 2e-3),
    ("noncausal_fallback", 2e-6), ("w100_fallback", 2e-6),
])
def test_triton_kernel_matches_oracle_interpreted(kernel_results, case, tol):
    r = kernel_results[case]
    assert r["err"] <= tol, (case, r)


@pytest.mark.slow
def test_triton_kernel_dtypes_and_registration(kernel_results):
    assert kernel_results["w64_bf16"]["dtype"] == "torch.bfloat16"
    assert kernel_results["w0_fp16"]["dtype"] == "torch.float16"
    assert kernel_results["w64_odd_dims"]["shape"] == [2, 2, 90, 20]
    reg = kernel_results["registered_op"]
    assert reg["err"] <= 2e-6
    assert reg["kernel_error"].startswith("KernelError: lowc::linear_attention Triton kernel: fq (1, 2, 10, 300)")


@pytest.mark.slow
def test_triton_kernel_stable_interpreted(kernel_results):
    assert kernel_results["stable_L1024_w0"]["finite"] and kernel_results["stable_L1024_w64"]["finite"]


@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
                    reason="runs the compiled kernel on a GPU (CI covers it with the interpreter above)")
@pytest.mark.parametrize("dtype, window, h, hk, length, d", [
    (torch.bfloat16, 64, 8, 2, 1000, 128), (torch.bfloat16, 0, 4, 4, 777, 64), (torch.float16, 64, 4, 1, 300, 64),
    (torch.float32, 64, 4, 2, 500, 128), (torch.float32, 5, 2, 1, 130, 32),
])
def test_triton_kernel_on_gpu(dtype, window, h, hk, length, d):
    from lowc.backends.triton.linear_attention import linear_attention_triton

    o = operands(b=2, h=h, hk=hk, lq=length, f=128, d=d, dv=d, window=window, mask="both", dtype=dtype)
    o = {n: (t.cuda() if t is not None else None) for n, t in o.items()}
    got = call(linear_attention_triton, o, True, window, scale=d ** -0.5).float()
    ref = call(reference_linear_attention, o, True, window, scale=d ** -0.5).float()
    tol = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    assert (got - ref).abs().max().item() <= tol * max(1.0, ref.abs().max().item())


_COMPILE_SCRIPT = textwrap.dedent(r"""
    import sys
    import lowc.backends.triton.linear_attention as tla
    assert "triton" not in sys.modules, "importing the kernel module imported triton"
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = tla._kernel()
    ptr = "*bf16"
    sig = dict(FQ=ptr, FK=ptr, V=ptr, Q=ptr, K=ptr, WF="*fp32", LF="*fp32", KM="*i8", Y=ptr, L="i32", H="i32",
               HK="i32", F="i32", D="i32", DV="i32", scale="fp32", eps="fp32", window="i32")
    const = dict(BLOCK=64, BF=128, BD=128, BV=64, HAS_WINDOW=True, LOOKBACK=True, HAS_MASK=True, PREC="tf32")
    names = list(sig) + list(const)
    sig.update({n: "constexpr" for n in const})
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(n),): v for n, v in const.items()})
    c = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8, "num_stages": 1})
    print("SHARED", c.metadata.shared, "cubin" in c.asm)
""")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_kernel_imports_triton_lazily_and_compiles_for_sm90():
    """No GPU needed: Triton compiles the LoLCATs configuration (bf16, F = D = 128, window 64, key_mask)
    down to an sm_90 cubin, which the interpreter tests cannot check, and it fits in shared memory."""
    env = {**os.environ, "TRITON_DEFAULT_FP_FUSION": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, shared, has_cubin = [x for x in proc.stdout.splitlines() if x.startswith("SHARED")][-1].split()
    assert has_cubin == "True" and int(shared) <= 160 * 1024  # fits an A100 (163 KB) as well as an H100 (227 KB)
