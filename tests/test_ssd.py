"""``lowc::ssd`` (Mamba-2 SSD mixer): the quadratic oracle against a by-hand recurrence, the chunked form
(the op's implementation) against the oracle (GQA, N != P, ragged lengths, masks, convolutions, D,
dtypes, continuation), autograd, memory, the token-mixing matrix, decode, fake kernel and operand checks."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from lowc.ir.dialect.ssd import (  # defines lowc::ssd
    SSDState,
    chunked_ssd,
    reference_ssd,
    segsum,
    ssd_matrix,
    ssd_prefill,
    ssd_step,
)

op = torch.ops.lowc.ssd.default
NAMES = ("C", "B", "x", "a", "D", "conv_c", "conv_b", "conv_x", "key_mask")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def operands(b=2, h=4, g=2, length=70, n=8, p=12, *, k=0, d=True, mask=None, dtype=torch.float32, seed=0):
    """Random operands: decays in Mamba-2's range (``a = -softplus(dt)·exp(A_log)``), ``k`` > 0 adds the
    three convolutions (random around identity), ``mask`` "left" pads the start of row 0."""
    gen = _gen(seed)
    C = torch.randn(b, h, length, n, generator=gen)
    B = torch.randn(b, g, length, n, generator=gen) / n ** 0.5
    x = torch.randn(b, g, length, p, generator=gen)
    dt = torch.randn(b, h, length, generator=gen) - 1.0
    a = -torch.nn.functional.softplus(dt) * torch.exp(torch.rand(h, generator=gen) * 1.5)[None, :, None]
    out = dict(C=C.to(dtype), B=B.to(dtype), x=x.to(dtype), a=a, D=torch.randn(h, generator=gen) if d else None,
               conv_c=None, conv_b=None, conv_x=None, key_mask=None)
    if k:
        for name, lead in (("conv_c", (h, n)), ("conv_b", (g, n)), ("conv_x", (g, p))):
            w = torch.randn(*lead, k, generator=gen) * 0.3
            w[..., -1] += 1.0
            out[name] = w
    if mask == "left":
        km = torch.ones(b, length, dtype=torch.bool)
        km[0, : length // 3] = False
        out["key_mask"] = km
    return out


def close(got, ref, tol=5e-6, msg=""):
    """max |got - ref| <= tol · max(1, max |ref|): fp32 sums in different orders (the chunked form takes
    segment sums as differences of a chunk's cumulative sum, exact to ~1e-6 relative at chunk 64)."""
    err = (got.double() - ref.double()).abs().max().item() if got.numel() else 0.0
    assert err <= tol * max(1.0, ref.abs().max().item()), f"{msg} max error {err:.3g}, max |ref| {ref.abs().max().item():.3g}"


def call(fn, o, **kw):
    return fn(*(o[n] for n in NAMES), **kw)


def by_hand(o):
    """The recurrence ``h_t = exp(a_t) h_{t-1} + x_t ⊗ B_t``, ``y_t = h_t C_t + D x_t`` one token at a time in
    float64 (no masks, no convolutions): an oracle for the oracle."""
    C, B, x, a = (o[n].double() for n in ("C", "B", "x", "a"))
    b, h, length, n = C.shape
    g, p = B.shape[1], x.shape[-1]
    st = torch.zeros(b, h, p, n, dtype=torch.float64)
    ys = []
    for t in range(length):
        for hh in range(h):
            gg = hh // (h // g)
            st[:, hh] = torch.exp(a[:, hh, t])[:, None, None] * st[:, hh] + x[:, gg, t, :, None] * B[:, gg, t, None, :]
        y = torch.einsum("bhpn,bhn->bhp", st, C[:, :, t])
        if o["D"] is not None:
            y = y + o["D"].double()[None, :, None] * x[:, :, t].repeat_interleave(h // g, dim=1)
        ys.append(y)
    return torch.stack(ys, dim=2)


# ---------------------------------------------------------------- the oracle


def test_reference_is_the_recurrence():
    o = operands(b=2, h=4, g=2, length=23, n=5, p=3)
    close(call(reference_ssd, o), by_hand(o))


def test_segsum_and_matrix():
    a = -torch.rand(2, 3, 9, dtype=torch.float64)
    s = segsum(a)
    i, j = 6, 2
    assert s[1, 2, i, j].item() == pytest.approx(a[1, 2, j + 1:i + 1].sum().item())
    assert torch.all(s.diagonal(dim1=-2, dim2=-1) == 0) and torch.isinf(s[..., 2, 5]).all()
    o = operands(b=1, h=4, g=2, length=30, d=False, mask="left")
    T = call(lambda C, B, x, a, D, cc, cb, cx, km: ssd_matrix(C, B, a, km), o)
    assert T.shape == (1, 4, 30, 30) and torch.all(T.triu(1) == 0)
    close(T @ o["x"].repeat_interleave(2, dim=1), call(reference_ssd, o))
    assert torch.all(T[0, :, :10] == 0) and torch.all(T[0, :, :, :10] == 0)  # masked rows and columns
    diag = torch.einsum("bhln,bhln->bhl", o["C"], o["B"].repeat_interleave(2, dim=1))[0, :, 10:]
    torch.testing.assert_close(T[0, :, 10:, 10:].diagonal(dim1=-2, dim2=-1), diag)  # decay 1 on the diagonal


# ---------------------------------------------------------------- chunked form vs the oracle


@pytest.mark.parametrize("h, g, n, p", [(4, 2, 8, 12), (4, 1, 16, 8), (3, 3, 8, 8)])
@pytest.mark.parametrize("length", [1, 37, 64, 130])
@pytest.mark.parametrize("chunk", [16, 64])
def test_chunked_matches_oracle(h, g, n, p, length, chunk):
    for seed, (k, mask) in enumerate([(0, None), (4, "left")]):
        o = operands(h=h, g=g, n=n, p=p, length=length, k=k, mask=mask, seed=seed + length)
        ref = call(reference_ssd, o)
        got = call(chunked_ssd, o, chunk=chunk)
        close(got, ref, msg=f"k={k} mask={mask}:")


def test_op_is_the_chunked_form_and_chunk_only_changes_rounding():
    o = operands(length=150, k=3, mask="left")
    y = call(op, o)
    assert torch.equal(y, call(chunked_ssd, o))
    for chunk in (1, 7, 32, 256):
        close(call(op, o, chunk=chunk), call(reference_ssd, o), msg=f"chunk={chunk}")
    assert torch.equal(op(o["C"], o["B"], o["x"], o["a"]), call(chunked_ssd, {**o, **dict.fromkeys(NAMES[4:])}))


def test_identity_convolutions_are_exactly_the_plain_ssd():
    o = operands(length=90, k=0, mask="left")
    ident = {}
    for name, w in operands(length=90, k=4).items():
        if name.startswith("conv_"):
            ident[name] = torch.zeros_like(w)
            ident[name][..., -1] = 1.0
    torch.testing.assert_close(call(op, {**o, **ident}), call(op, o), rtol=0, atol=0)


def test_convolution_is_causal_depthwise_with_the_last_tap_current():
    """The op with convolutions == the op without them on inputs convolved by hand."""
    o = operands(b=1, h=2, g=1, length=40, k=3)
    conv = {}
    for name, src in (("conv_c", "C"), ("conv_b", "B"), ("conv_x", "x")):
        u, w = o[src], o[name]  # [B, c1, L, c2], [c1, c2, K]
        out = torch.zeros_like(u)
        for t in range(u.shape[2]):
            for tap in range(w.shape[-1]):
                s = t - (w.shape[-1] - 1) + tap
                if s >= 0:
                    out[:, :, t] += w[None, :, :, tap] * u[:, :, s]
        conv[src] = out
    plain = {**o, **conv, "conv_c": None, "conv_b": None, "conv_x": None}
    close(call(op, o), call(reference_ssd, plain))


def test_left_padding_gives_the_unpadded_outputs():
    o = operands(b=1, length=50, k=4)
    pad = 13
    padded = {n: (torch.cat([torch.randn_like(t[:, :, :pad]) * 5, t], dim=2) if n in ("C", "B", "x", "a") else t)
              for n, t in o.items()}
    padded["key_mask"] = torch.arange(50 + pad)[None] >= pad
    y = call(op, padded)
    assert torch.all(y[:, :, :pad] == 0)
    close(y[:, :, pad:], call(op, o))


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_half_precision_inputs(dtype, tol):
    o = operands(length=100, k=4, mask="left", dtype=dtype)
    got = call(op, o)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), call(reference_ssd, o).float(), rtol=tol, atol=tol)


def _slice(o, start, end):
    """The operands of positions ``start:end`` (the per-position tensors cut along L)."""
    return {n: (t[:, :, start:end] if n in ("C", "B", "x", "a") else t[:, start:end] if n == "key_mask" and t is not None
                else t) for n, t in o.items()}


def test_initial_state_continuation():
    o = operands(length=130, k=4, mask="left")
    whole, st_whole = call(chunked_ssd, o, chunk=32, return_state=True)
    cut = 57
    y1, st = call(chunked_ssd, _slice(o, 0, cut), chunk=32, return_state=True)
    assert isinstance(st, SSDState) and st.pos == cut and st.conv_c.shape == (2, 4, 8, 3)
    y2, st2 = call(chunked_ssd, _slice(o, cut, 130), chunk=16, initial_state=st, return_state=True)
    close(torch.cat([y1, y2], dim=2), whole)
    close(st2.ssm, st_whole.ssm)
    assert st2.pos == 130
    # a bare SSM state tensor continues the plain SSD (no convolution history)
    p = {n: (None if n.startswith("conv_") else t) for n, t in o.items()}
    _, s = call(chunked_ssd, _slice(p, 0, cut), return_state=True)
    y2 = call(chunked_ssd, _slice(p, cut, 130), initial_state=s.ssm)
    close(y2, call(chunked_ssd, p)[:, :, cut:])


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


def test_chunked_memory_is_linear_not_quadratic():
    length = 4096
    o = operands(b=1, h=2, g=1, length=length, n=16, p=16, k=4)
    with _PeakTensor() as mode:
        y = call(op, o)
    # the oracle's T is [1, 2, 4096, 4096] = 33.5M elements; chunks keep [H, L, 64] scores and [H, L/64, P, N] states
    assert mode.largest <= 2 * length * 64, mode.largest
    assert torch.isfinite(y).all()


def test_long_sequence_is_stable():
    """L = 8192 with strong and vanishing decays (a in [-20, -1e-4]): finite, and equal to the
    one-chunk-at-a-time continuation (a different split of the same sums)."""
    gen = _gen(3)
    o = operands(b=1, h=2, g=1, length=8192, n=8, p=8, d=False, seed=3)
    o["a"] = -torch.exp(torch.empty(1, 2, 8192).uniform_(-9.2, 3.0, generator=gen))
    y = call(op, o)
    assert torch.isfinite(y).all()
    st, parts = None, []
    for s in range(0, 8192, 2048):
        yy, st = call(chunked_ssd, _slice(o, s, s + 2048), chunk=128, initial_state=st, return_state=True)
        parts.append(yy)
    close(torch.cat(parts, dim=2), y, tol=2e-5)


# ---------------------------------------------------------------- autograd


def test_gradcheck_float64():
    o = operands(b=1, h=2, g=1, length=11, n=3, p=2, k=3, mask="left", seed=5)
    leaves = {n: t.double().requires_grad_(True) for n, t in o.items() if t is not None and n != "key_mask"}

    def f(*ts):
        kw = dict(zip(leaves, ts))
        return op(kw["C"], kw["B"], kw["x"], kw["a"], kw["D"], kw["conv_c"], kw["conv_b"], kw["conv_x"],
                  o["key_mask"], 4)

    assert torch.autograd.gradcheck(f, tuple(leaves.values()), eps=1e-6, atol=1e-6)


def test_op_grads_equal_the_oracle():
    o = operands(b=2, h=4, g=2, length=75, k=4, mask="left", seed=6)
    leaves = {n: t.clone().requires_grad_(True) for n, t in o.items() if t is not None and n != "key_mask"}
    o2 = {**o, **leaves}
    gy = torch.randn(2, 4, 75, 12, generator=_gen(1))
    ga = torch.autograd.grad(call(op, o2, chunk=16), list(leaves.values()), gy)
    gb = torch.autograd.grad(call(reference_ssd, o2), list(leaves.values()), gy)
    for name, x, y in zip(leaves, ga, gb):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4, msg=f"grad {name}")
    # ssd_matrix is differentiable (MOHAWK stage 1 fits it)
    T = ssd_matrix(leaves["C"], leaves["B"], leaves["a"], o["key_mask"])
    gC, ga_ = torch.autograd.grad(T.square().sum(), [leaves["C"], leaves["a"]])
    assert torch.isfinite(gC).all() and torch.isfinite(ga_).all() and ga_.abs().sum() > 0


# ---------------------------------------------------------------- fake kernel and operand checks


def test_fake_kernel_shapes():
    with FakeTensorMode():
        y = op(torch.rand(2, 4, 10, 8), torch.rand(2, 2, 10, 8), torch.rand(2, 2, 10, 5, dtype=torch.bfloat16),
               torch.rand(2, 4, 10), None, torch.rand(4, 8, 4), None, None, None, 32)
        assert y.shape == (2, 4, 10, 5) and y.dtype == torch.bfloat16


@pytest.mark.parametrize("kw, match", [
    (dict(B=torch.rand(2, 3, 10, 8), x=torch.rand(2, 3, 10, 5)), r"heads H=4 must be a multiple of groups G=3"),
    (dict(B=torch.rand(2, 2, 10, 7)), r"B \(2, 2, 10, 7\) must be \[Bt=2, G, L=10, N=8\]"),
    (dict(x=torch.rand(2, 2, 9, 5)), r"x \(2, 2, 9, 5\) must be \[Bt=2, G=2, L=10, P\]"),
    (dict(a=torch.rand(2, 2, 10)), r"a \(2, 2, 10\) must be \[Bt=2, H=4, L=10\]"),
    (dict(D=torch.rand(2)), r"D \(2,\) must be \[H=4\]"),
    (dict(conv_b=torch.rand(4, 8, 4)), r"conv_b \(4, 8, 4\) must be \[2, 8, K\]"),
    (dict(conv_x=torch.rand(2, 5, 0)), r"conv_x \(2, 5, 0\) must be \[2, 5, K\] with K >= 1"),
    (dict(key_mask=torch.ones(2, 10)), r"key_mask must be bool \[Bt=2, L=10\]"),
    (dict(chunk=0), r"chunk must be >= 1"),
    (dict(C=torch.rand(4, 10, 8)), r"must be 4-D"),
])
def test_bad_operands_are_one_line_errors(kw, match):
    o = dict(C=torch.rand(2, 4, 10, 8), B=torch.rand(2, 2, 10, 8), x=torch.rand(2, 2, 10, 5), a=-torch.rand(2, 4, 10),
             D=None, conv_c=None, conv_b=None, conv_x=None, key_mask=None, chunk=64)
    o.update(kw)
    with pytest.raises(ValueError, match=match) as e:
        op(*o.values())
    assert "\n" not in str(e.value) and str(e.value).startswith("lowc::ssd: ")


# ---------------------------------------------------------------- decode


def _decode(o, prompt):
    """``ssd_prefill`` on the first ``prompt`` positions (none: a fresh state), then ``ssd_step`` per token."""
    convs = [o[n] for n in ("conv_c", "conv_b", "conv_x")]
    km = o["key_mask"]
    st, ys = None, []
    if prompt:
        sl = _slice(o, 0, prompt)
        y, st = ssd_prefill(*(sl[n] for n in ("C", "B", "x", "a", "D")), *convs, sl["key_mask"])
        ys.append(y)
    else:
        b, h, _, n = o["C"].shape
        g, p = o["B"].shape[1], o["x"].shape[-1]
        st = SSDState.empty(b, h, g, n, p, tuple(0 if w is None else w.shape[-1] for w in convs))
    for t in range(prompt, o["C"].shape[2]):
        ys.append(ssd_step(st, o["C"][:, :, t:t + 1], o["B"][:, :, t:t + 1], o["x"][:, :, t:t + 1],
                           o["a"][:, :, t:t + 1], o["D"], *convs, key_valid=None if km is None else km[:, t]))
    return torch.cat(ys, dim=2), st


@pytest.mark.parametrize("prompt", [0, 1, 40, 100])
@pytest.mark.parametrize("k, mask", [(0, None), (4, "left")])
def test_decode_matches_the_chunked_form(prompt, k, mask):
    o = operands(b=2, h=4, g=2, length=110, k=k, mask=mask, seed=prompt)
    ys, st = _decode(o, prompt)
    y, st_ref = call(chunked_ssd, o, return_state=True)
    close(ys, y, tol=1e-5)
    close(st.ssm, st_ref.ssm, tol=1e-5)
    assert st.pos == 110


def test_decode_state_is_constant_size():
    o = operands(b=1, h=4, g=2, length=300, k=4, seed=9)
    sizes = []
    for length in (10, 300):
        _, st = ssd_prefill(*(_slice(o, 0, length)[n] for n in NAMES))
        sizes.append(st.nbytes())
    # fp32: ssm [1, 4, 12, 8] + conv histories [1, 4, 8, 3], [1, 2, 8, 3], [1, 2, 12, 3]
    assert sizes[0] == sizes[1] == 4 * (4 * 12 * 8 + 3 * (4 * 8 + 2 * 8 + 2 * 12))
    ptrs = [t.data_ptr() for t in st.tensors()]
    gen = _gen(1)
    convs = [o[n] for n in ("conv_c", "conv_b", "conv_x")]
    for _ in range(500):
        y = ssd_step(st, torch.randn(1, 4, 1, 8, generator=gen), torch.randn(1, 2, 1, 8, generator=gen),
                     torch.randn(1, 2, 1, 12, generator=gen), -torch.rand(1, 4, 1, generator=gen), o["D"], *convs)
        assert torch.isfinite(y).all()
    assert st.pos == 800 and st.nbytes() == sizes[0]
    assert [t.data_ptr() for t in st.tensors()] == ptrs  # updated in place, nothing reallocated
    _, st2 = ssd_prefill(*(_slice(o, 0, 50)[n] for n in NAMES), state=st)  # continuing keeps the storage too
    assert st2 is st and [t.data_ptr() for t in st.tensors()] == ptrs and st.pos == 850


def test_decode_bad_input():
    st = SSDState.empty(1, 4, 2, 8, 12, (4, 0, 0))
    args = (torch.rand(1, 4, 1, 8), torch.rand(1, 2, 1, 8), torch.rand(1, 2, 1, 12), -torch.rand(1, 4, 1))
    with pytest.raises(ValueError, match="conv_c is missing but the state was built with its history"):
        ssd_step(st, *args)
    with pytest.raises(ValueError, match="conv_c has K=3 but the state holds 3 past inputs"):
        ssd_step(st, *args, None, torch.rand(4, 8, 3))
    with pytest.raises(ValueError, match="ssd_step takes one token"):
        ssd_step(st, torch.rand(1, 4, 2, 8), *args[1:])
    with pytest.raises(ValueError, match=r"do not match the state \(Bt=1, H=4, P=12, N=8\)"):
        ssd_step(st, torch.rand(1, 4, 1, 16), *args[1:])
