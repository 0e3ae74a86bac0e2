"""Group-sparse layers and the ONNX backend: ONNX cannot skip dropped groups, so an export refuses a
``lowc::linear_gsq`` layer (one line naming it, nothing written), and ``--densify`` (``densify=True``)
first rewrites it as a dense ``lowc::linear_wq`` with exactly the same dequantized weight
(``densify-sparse``, :mod:`lowc.backends.onnx.densify`). Sparse layers are made by
:func:`conftest.make_sparse` on a ``ref-w4a16`` compile."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

import lowc
from conftest import make_llama_dir, make_sparse, run_lowc, two_linears_program
from lowc.backends.onnx import OnnxExportError
from lowc.backends.onnx.densify import DensifySparse, dense_weight
from lowc.export import export
from lowc.ir.dialect import ensure_registered, packing, quant, sparse
from test_cli import assert_clean_error

ensure_registered()


@pytest.mark.parametrize("k, sg, gs, sym, bits", [(200, 16, 16, False, 4), (130, 16, 64, True, 4), (96, 32, None, False, 8),
                                                  (160, 16, 24, False, 4), (64, 16, 1024, True, 8)])
def test_dense_weight_dequantizes_exactly_like_the_sparse_one(k, sg, gs, sym, bits):
    g = torch.Generator().manual_seed(k)
    w = torch.randn(37, k, generator=g)
    n_groups = sparse.padded_sparse_width(k, sg) // sg
    keep = sparse.kept_groups(k, sg, 0.5)
    idx = torch.stack([torch.randperm(n_groups, generator=g)[:keep].sort().values for _ in range(37)]).to(torch.int16)
    sq = sparse.rtn_quantize_sparse(w, idx, bits, gs or sg, sg, sym)
    qw = dense_weight(sq.qweight, sq.scales, sq.zeros, bits, sq.group_size, k, sq.idx, sg)
    assert qw.group_size == (8 if gs == 24 else sg) and (qw.zeros is None) == sym  # gcd(group, sparse group)
    dense = quant.dequantize(qw.qweight, qw.scales, qw.zeros, bits, qw.group_size, k)
    assert torch.equal(dense, sparse.densify(sq))  # bit for bit, zeros in dropped groups
    codes = packing.unpack(qw.qweight, bits)[:, :k]
    drop = ~sparse.group_mask(sq.idx, k, sg)
    z = (torch.full_like(qw.scales, 1 << (bits - 1)) if sym else qw.zeros).repeat_interleave(qw.group_size, dim=1)[:, :k]
    assert drop.any() and torch.equal(codes[drop], z[drop].to(codes.dtype))  # dropped groups: code = zero point


def test_densify_sparse_pass():
    from lowc.backends.registry import parse_pass
    from lowc.ir import meta as nodemeta
    from lowc.ir import verifier
    from lowc.passes.base import PassContext

    prog = two_linears_program((4, 8), 32, (False, True))
    assert make_sparse(prog, sparsity=0.5, sparse_group=16, group_size=32) == 2
    x = torch.randn(4, 72)
    with torch.inference_mode():
        ref = prog.call(x)
    p = parse_pass("densify-sparse")
    assert p == DensifySparse() and type(p)(**json.loads(json.dumps(p.to_json()))["options"]) == p
    res = p.run(prog, PassContext())
    assert res.changed and res.stats == {"densified": 2}
    verifier.verify(prog)
    torch.testing.FileCheck().check("lowc.linear_wq").check("lowc.linear_wq").check_not("linear_gsq").run(prog.gm.code)
    schemes = [nodemeta.get(n).scheme for n in prog.nodes(torch.ops.lowc.linear_wq.default)]
    assert [(s.w_bits, s.group_size, s.sparsity) for s in schemes] == [(4, 16, 0.0), (8, 16, 0.0)]
    assert not p.run(prog, PassContext()).changed
    with torch.inference_mode():
        assert torch.equal(prog.call(x), ref)  # the same dequantized weights, the same F.linear


@pytest.fixture(scope="module")
def sparse_artifact(tmp_path_factory):
    """ref-w4a16 of a small Llama whose MLP layers are group-sparse (groups of 16 with their own scale)
    and whose q/k projections are too (a scale per 4 kept groups); the rest stay dense."""
    d = tmp_path_factory.mktemp("onnx-gsq")
    src = make_llama_dir(d / "llama", seed=5, hidden_size=64, intermediate_size=200, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    cm = lowc.compile(src, target="ref-w4a16", progress=False)
    mlp = tuple(f"model.layers.0.mlp.{p}_proj" for p in ("gate", "up", "down"))
    attn = tuple(f"model.layers.0.self_attn.{p}_proj" for p in ("q", "k"))
    assert make_sparse(cm.program, 0.5, 16, 16, layers=mlp) == 3
    assert make_sparse(cm.program, 0.5, 16, 64, layers=attn, seed=1) == 2
    cm.save(d / "art")
    return str(d / "art")


@pytest.mark.slow
def test_export_refuses_sparse_layers_without_densify(sparse_artifact, tmp_path):
    res = run_lowc("export", sparse_artifact, "--format", "onnx", "-o", tmp_path / "m.onnx")
    assert_clean_error(res, "layer model.layers.0.self_attn.q_proj", "group-sparse", "--densify")
    assert not os.listdir(tmp_path)
    with pytest.raises(OnnxExportError, match=r"^layer model\.layers\.0\.self_attn\.q_proj \(rtn W4A16 g64 asym 50%/16 sparse\): group-sparse"):
        export(lowc.load(sparse_artifact), tmp_path / "m.onnx")
    assert not os.listdir(tmp_path)


@pytest.mark.slow
def test_cli_export_densify_matches_the_reference(sparse_artifact, tmp_path):
    import onnxruntime as ort

    from lowc.backends.onnx import session_options
    from lowc.evaluate import main_tensor

    out = tmp_path / "m.onnx"
    res = run_lowc("export", sparse_artifact, "--format", "onnx", "-o", out, "--densify", "--print-after",
                   "densify-sparse")
    assert res.returncode == 0, res.stderr
    assert "DequantizeLinear->MatMul x7" in res.stdout
    ir = res.stdout.split("IR after densify-sparse", 1)[1]
    assert ir.count("lowc.linear_wq.default(") == 7 and "linear_gsq" not in ir  # the graph after densify-sparse
    sess = ort.InferenceSession(str(out), session_options(str(out)), providers=["CPUExecutionProvider"])
    cm = lowc.load(sparse_artifact)
    down = next(row for row in cm.layers() if row["layer"].endswith("down_proj"))
    assert down["scheme"]["sparse_group"] == 16 and down["op"] == "lowc::linear_gsq"
    for b, L in [(1, 1), (2, 9)]:
        ids = torch.randint(0, 259, (b, L), generator=torch.Generator().manual_seed(b))
        kw = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        ref = main_tensor(cm(**kw)).float().numpy()
        got = sess.run(None, {k: v.numpy() for k, v in kw.items()})[0]
        err = np.abs(got - ref).max() / np.abs(ref).max()
        assert err < 2e-5, f"batch {b} seq {L}: {err:.2e}"  # test_onnx.EXACT_RTOL: fp32 arithmetic


def test_api_export_densify(tmp_path):
    """``lowc.export.export(..., densify=True)`` on a compiled model: the passes and options it records,
    onnxruntime against the sparse reference (fp32 session options)."""
    import onnxruntime as ort

    from conftest import TwoLinears
    from lowc.backends.onnx import session_options

    x = torch.randn(3, 72)
    cm = lowc.compile(TwoLinears(), "ref-w4a16", example_inputs=(x,), passes=["rtn{group_size=32}"], progress=False)
    make_sparse(cm.program, 0.5, 16, 32)
    r = export(cm, tmp_path / "m.onnx", densify=True)
    assert r.options["densify"] is True and [p["name"] for p in r.passes] == ["densify-sparse", "onnx-lower"]
    assert [row["block_size"] for row in r.layers] == [16, 16]
    sess = ort.InferenceSession(r.path, session_options(r.path), providers=["CPUExecutionProvider"])
    ref = cm(x).numpy()
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert np.abs(got - ref).max() / np.abs(ref).max() < 2e-5
