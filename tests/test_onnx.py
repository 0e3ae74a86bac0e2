"""ONNX backend: onnxruntime (CPU EP) vs the reference backend on the same artifact, for tiny Llama
(causal) and MiniLM (encoder) at fp32 / W8 / W4, several batch sizes and lengths per export; the
int4 graph pattern (blocked DequantizeLinear -> MatMul, no float copy of the weights) and
onnxruntime's fusion of it; MatMulNBits; activation QDQ; external data; the arithmetic recorded in
the model's metadata; reuse of the file an onnx-* target wrote; the CLI and its bad input.

Parity is measured twice: with a *default* ``onnxruntime.InferenceSession`` (what a user gets:
onnxruntime fuses DequantizeLinear->MatMul into MatMulNBits at accuracy level 4, int8 activations)
and with the session options the file's metadata asks for (:func:`lowc.backends.onnx.session_options`:
fp32 arithmetic).

Exports are shared through module fixtures (each costs ~10 s)."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import lowc
from conftest import make_llama_dir, run_lowc
from lowc.backends.onnx import OnnxExportError, export_onnx, session_options
from lowc.export import export
from lowc.evaluate import main_tensor
from test_cli import assert_clean_error

#: every test here exports or compiles a model (~4 min in all): `-m "not slow"` leaves them to CI
pytestmark = pytest.mark.slow

CAUSAL_SHAPES = [(1, 1), (2, 7), (3, 33)]
ENCODER_SHAPES = [(1, 4), (2, 9), (4, 40)]


#: max relative error of a default onnxruntime session on weight-quantized files: it fuses
#: DequantizeLinear->MatMul into MatMulNBits with int8 activations (accuracy level 4). Measured with
#: onnxruntime 1.32 on x86_64: 1.6e-2 (tiny-llama W8), 1.9e-2 (tiny-llama W4), 1.1e-2 (MiniLM W8),
#: 2.4e-2 (MiniLM W4)
DEFAULT_SESSION_RTOL = 5e-2
#: with fp32 arithmetic (float files, MatMulNBits at level 0, or the metadata's session options)
EXACT_RTOL = 2e-5


def session(path: str, optimized: str | None = None) -> ort.InferenceSession:
    """A default session (``optimized`` only saves the graph onnxruntime runs; it changes nothing)."""
    if optimized is None:
        return ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    so = ort.SessionOptions()
    so.optimized_model_filepath = optimized
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def exact_session(path: str) -> ort.InferenceSession:
    """The session options the file's metadata asks for (level 0 records the fp32 setting)."""
    return ort.InferenceSession(path, session_options(path), providers=["CPUExecutionProvider"])


def inputs(b: int, L: int, vocab: int, pad: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 7 * b + L)
    ids = torch.randint(0, vocab, (b, L), generator=g)
    mask = torch.ones_like(ids)
    if pad and b > 1:  # right padding on every other row (encoders)
        mask[1::2, max(1, L // 2):] = 0
    return {"input_ids": ids, "attention_mask": mask}


def assert_parity(sess, ref_model, shapes, vocab: int, pad: bool, rtol: float = EXACT_RTOL) -> float:
    """Max relative error of ``sess`` against the reference over ``shapes`` (asserted below ``rtol``)."""
    worst = 0.0
    for b, L in shapes:
        kw = inputs(b, L, vocab, pad)
        ref = main_tensor(ref_model(**kw)).float().numpy()
        got = sess.run(None, {k: v.numpy() for k, v in kw.items()})[0]
        assert got.shape == ref.shape, (b, L, got.shape, ref.shape)
        err = np.abs(got - ref).max() / np.abs(ref).max()
        assert err < rtol, f"batch {b} seq {L}: max rel error {err:.2e}"
        worst = max(worst, float(err))
    return worst


def assert_parity_both(path: str, ref_model, shapes, vocab: int, pad: bool, quantized: bool) -> None:
    """A default session within its real bound; the metadata's session options within EXACT_RTOL."""
    assert_parity(session(path), ref_model, shapes, vocab, pad, DEFAULT_SESSION_RTOL if quantized else EXACT_RTOL)
    assert_parity(exact_session(path), ref_model, shapes, vocab, pad, EXACT_RTOL)


def compile_save(model, target, path, **kw):
    cm = lowc.compile(model, target=target, progress=False, **kw)
    cm.save(path)
    return lowc.load(path), os.path.join(path, "backend", "model.onnx")


# ---- tiny-llama preset (causal) ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("onnx-tiny")
    return {t: compile_save("tiny-llama", t, str(d / t)) for t in ("onnx-fp32", "onnx-w4")}


@pytest.mark.parametrize("target", ["onnx-fp32", "onnx-w4"])
def test_tiny_llama_parity(tiny, target):
    ref, path = tiny[target]
    assert ref.target.name == target and ref.manifest["files"]["backend/model.onnx"]["bytes"] == os.path.getsize(path)
    assert_parity_both(path, ref, CAUSAL_SHAPES, vocab=259, pad=False, quantized=target != "onnx-fp32")


def test_onnx_check_changes_nothing_and_counts_layers(tiny):
    """onnx-check is a check: on an expressible program it reports changed=False every time, leaves
    the printed graph as it was and counts the compressed layers it checked (28; lm_head is float)."""
    from lowc.backends.onnx.check import OnnxCheck
    from lowc.ir import printer
    from lowc.passes.base import PassContext
    from lowc.passes.pipeline import run_passes

    prog = tiny["onnx-w4"][0].program.clone()
    before = printer.format_program(prog)
    first, second = run_passes(prog, [OnnxCheck(), OnnxCheck()], PassContext(progress=False))
    for rec in (first, second):
        assert rec.result.changed is False and rec.result.stats == {"layers": 28}
    assert printer.format_program(prog) == before


def test_tiny_llama_file_io_names_and_sidecar(tiny):
    ref, path = tiny["onnx-w4"]
    m = onnx.load(path, load_external_data=False)
    assert [i.name for i in m.graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in m.graph.output] == ["logits"]
    for i in m.graph.input:
        assert [d.dim_param for d in i.type.tensor_type.shape.dim] == ["batch", "seq"]
    assert {o.domain: o.version for o in m.opset_import}[""] == 21
    side = json.loads(open(os.path.join(os.path.dirname(path), "onnx.json")).read())
    assert side["opset"] == 21 and side["output"] == "logits" and len(side["layers"]) == 28


def test_int4_graph_is_blocked_dq_matmul_without_float_weights(tiny):
    ref, path = tiny["onnx-w4"]
    m = onnx.load(path)
    inits = {t.name: t for t in m.graph.initializer}
    consumers = {}
    for n in m.graph.node:
        for i, name in enumerate(n.input):
            consumers.setdefault(name, []).append((n, i))
    dq = [n for n in m.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == 28  # every quantized linear; lm_head stays float (rtn's default ignore)
    for n in dq:
        w, zp = inits[n.input[0]], inits[n.input[2]]
        assert w.data_type == onnx.TensorProto.UINT4 and zp.data_type == onnx.TensorProto.UINT4
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        assert attrs == {"axis": 0, "block_size": 128}
        (user, idx), = consumers[n.output[0]]
        assert user.op_type == "MatMul" and idx == 1
    quantized = {(r["out_features"], r["in_features"]) for r in ref.layers() if r["scheme"]}
    shapes = {s for n, k in quantized for s in ((n, k), (k, n))}
    floats = [t for t in m.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and tuple(t.dims) in shapes]
    assert not floats, [t.name for t in floats]
    fp32 = os.path.getsize(tiny["onnx-fp32"][1])
    assert os.path.getsize(path) < 0.25 * fp32  # embeddings and lm_head stay float in this tiny model


def test_onnxruntime_fuses_int4_into_matmulnbits(tiny, tmp_path):
    ref, path = tiny["onnx-w4"]
    opt = str(tmp_path / "opt.onnx")
    sess = session(path, optimized=opt)
    ops = [n.op_type for n in onnx.load(opt).graph.node]
    assert ops.count("MatMulNBits") == 28 and "DequantizeLinear" not in ops
    # a default session quantizes activations to int8 inside the fused kernel (accuracy level 4):
    # close, but not the reference's arithmetic; the metadata's session options give fp32
    default_err = assert_parity(sess, ref, [(2, 16)], vocab=259, pad=False, rtol=DEFAULT_SESSION_RTOL)
    exact_err = assert_parity(exact_session(path), ref, [(2, 16)], vocab=259, pad=False)
    assert default_err > 100 * exact_err, (default_err, exact_err)


# ---- MiniLM (encoder) -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    d = tmp_path_factory.mktemp("onnx-minilm")
    return {t: compile_save("minilm", t, str(d / t)) for t in ("onnx-fp32", "onnx-w8", "onnx-w4")}


@pytest.mark.parametrize("target", ["onnx-fp32", "onnx-w8", "onnx-w4"])
def test_minilm_parity(minilm, target):
    ref, path = minilm[target]
    m = onnx.load(path, load_external_data=False)
    assert [o.name for o in m.graph.output] == ["last_hidden_state"]
    assert_parity_both(path, ref, ENCODER_SHAPES, vocab=30522, pad=True, quantized=target != "onnx-fp32")


def test_minilm_w8_is_per_channel_int8(minilm):
    _, path = minilm["onnx-w8"]
    m = onnx.load(path)
    inits = {t.name: t for t in m.graph.initializer}
    dq = [n for n in m.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == 36
    for n in dq:
        assert inits[n.input[0]].data_type == onnx.TensorProto.INT8 and len(n.input) == 2  # symmetric: no zero point
        attrs = {a.name: a.i for a in n.attribute}
        assert attrs["axis"] == 1 and attrs.get("block_size", 0) == 0  # per output channel, not blocked


# ---- odd Llama: padding, GQA, MatMulNBits, activation QDQ, external data, CLI ---------------------
@pytest.fixture(scope="module")
def odd_dir(tmp_path_factory):
    return make_llama_dir(tmp_path_factory.mktemp("onnx-odd"), seed=3, hidden_size=64, intermediate_size=200,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def odd_w4_g64(odd_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx-odd-art") / "w4g64"
    lowc.compile(odd_dir, target="ref-w4a16", passes=["rtn{group_size=64}"], progress=False).save(out)
    return str(out)


def test_lowering_is_exact(odd_w4_g64):
    from lowc.backends.onnx import lower

    cm = lowc.load(odd_w4_g64)
    kw = inputs(2, 11, 259, False)
    ref = main_tensor(cm(**kw))
    for nbits in (False, True):
        low, report = lower.lower_program(cm.program, matmulnbits=nbits)
        assert len(report.layers) == 14
        with torch.inference_mode():
            got = main_tensor(low.call(**kw))
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        assert not [n for n in low.graph.nodes if getattr(n.target, "namespace", None) == "lowc"]
    # down_proj: intermediate 200 padded to 256 -> the activation is zero-padded before MatMul
    down = [r for r in lower.lower_program(cm.program)[1].layers if r["layer"].endswith("down_proj")]
    assert down and all(r["block_size"] == 64 and r["axis"] == 0 for r in down)


def test_cli_export_matmulnbits(odd_w4_g64, tmp_path):
    out = tmp_path / "m.onnx"
    res = run_lowc("export", odd_w4_g64, "--format", "onnx", "-o", out, "--matmulnbits")
    assert res.returncode == 0, res.stderr
    assert "wrote" in res.stdout and "MatMulNBits x14" in res.stdout
    m = onnx.load(str(out))
    nb = [n for n in m.graph.node if n.op_type == "MatMulNBits"]
    assert len(nb) == 14 and all(n.domain == "com.microsoft" for n in nb)
    assert not [n for n in m.graph.node if n.op_type == "DequantizeLinear"]
    # the nodes carry accuracy_level=0: a default session computes in fp32
    assert all(a.i == 0 for n in nb for a in n.attribute if a.name == "accuracy_level")
    assert_parity(session(str(out)), lowc.load(odd_w4_g64), CAUSAL_SHAPES, vocab=259, pad=False)
    assert "fp32 arithmetic in any onnxruntime session" in res.stdout


def test_cli_compile_onnx_target(odd_dir, tmp_path):
    out = tmp_path / "w8"
    res = run_lowc("compile", odd_dir, "-t", "onnx-w8", "-o", out, "-q")
    assert res.returncode == 0, res.stderr
    path = out / "backend" / "model.onnx"
    assert path.is_file() and (out / "backend" / "onnx.json").is_file()
    assert_parity_both(str(path), lowc.load(out), CAUSAL_SHAPES, vocab=259, pad=False, quantized=True)


def test_activation_qdq_and_external_data(odd_dir, tmp_path):
    cm = lowc.compile(odd_dir, target="ref-w8a8", progress=False)
    r = export_onnx(cm, tmp_path / "a8.onnx", external_data=True)
    assert r.external_data and (tmp_path / "a8.onnx.data").is_file()
    m = onnx.load(r.path, load_external_data=False)
    inline = [t.name for t in m.graph.initializer if len(t.raw_data) > 256]
    assert not inline, inline  # every tensor past onnx_ir's 256-byte threshold is in the .data file
    assert r.ops.get("QuantizeLinear", 0) >= 4 and all("per token" in l["onnx_act"] for l in r.layers)
    # the QDQ pair matches the reference bit for bit on the same input, but fp32 differences of
    # ~1e-7 upstream (attention) flip an activation code where a value sits on a rounding boundary:
    # an error of one int8 step in a few elements, hence a looser bound than the weight-only targets
    assert_parity(exact_session(r.path), cm, CAUSAL_SHAPES, vocab=259, pad=False, rtol=2e-2)
    assert_parity(session(r.path), cm, CAUSAL_SHAPES, vocab=259, pad=False, rtol=DEFAULT_SESSION_RTOL)


def test_inexpressible_scheme_fails_before_writing(odd_dir, tmp_path):
    cm = lowc.compile(odd_dir, target="ref-w4a16", passes=["rtn{bits=3}"], progress=False)
    with pytest.raises(OnnxExportError, match=r"layer model\.layers\.0\.self_attn\.q_proj \(rtn W3A16 g128 asym\): 3-bit"):
        export_onnx(cm, tmp_path / "x.onnx")
    assert not os.listdir(tmp_path)
    cm = lowc.compile(odd_dir, target="ref-w4a16", passes=["rtn{group_size=24}"], progress=False)
    with pytest.raises(OnnxExportError, match="MatMulNBits needs a power-of-two block size"):
        export_onnx(cm, tmp_path / "x.onnx", matmulnbits=True)
    with pytest.raises(OnnxExportError, match=r"accuracy_level=7: onnxruntime takes 0 \(fp32\)"):
        export_onnx(cm, tmp_path / "x.onnx", accuracy_level=7)
    assert not os.listdir(tmp_path)
    # an onnx-* target refuses it at compile time (the lower phase's onnx-check)
    with pytest.raises(OnnxExportError, match=r"q_proj \(rtn W3A16"):
        lowc.compile(odd_dir, target="onnx-w4", passes=["rtn{bits=3}"], progress=False)


@pytest.fixture(scope="module")
def w3_artifact(odd_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx-w3") / "w3"
    lowc.compile(odd_dir, target="ref-w4a16", passes=["rtn{bits=3}"], progress=False).save(out)
    return str(out)


@pytest.mark.parametrize(
    "args,needles",
    [
        (["export", "{w4}", "--format", "tflite", "-o", "{tmp}/o.onnx"], ["unknown export format 'tflite'"]),
        (["export", "{tmp}/missing", "-o", "{tmp}/o.onnx"], ["{tmp}/missing", "does not exist"]),
        (["export", "{w3}", "-o", "{tmp}/o.onnx"], ["model.layers.0.self_attn.q_proj", "W3A16", "3-bit"]),
    ],
)
def test_cli_export_bad_input(args, needles, tmp_path, odd_w4_g64, w3_artifact):
    subst = {"{tmp}": str(tmp_path), "{w4}": odd_w4_g64, "{w3}": w3_artifact}

    def fill(s):
        for k, v in subst.items():
            s = s.replace(k, v)
        return s

    res = run_lowc(*[fill(a) for a in args])
    assert_clean_error(res, *[fill(n) for n in needles])
    assert not os.listdir(tmp_path)


def test_cli_export_existing_output_needs_force(odd_w4_g64, tmp_path):
    out = tmp_path / "m.onnx"
    out.write_bytes(b"keep")
    assert_clean_error(run_lowc("export", odd_w4_g64, "-o", out), "already exists", "--force")
    assert out.read_bytes() == b"keep"


def test_target_registry_does_not_import_onnx():
    import subprocess
    import sys

    code = ("import sys, lowc; t = lowc.targets(); assert {'onnx-fp32', 'onnx-w8', 'onnx-w4'} <= set(t); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('onnx', 'onnxruntime', 'onnxscript', 'onnx_ir')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", r.stdout


# ---- the arithmetic recorded in the file (metadata_props) -------------------------------------------
def metadata(path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def test_metadata_records_the_arithmetic_and_the_session_option(tiny, tmp_path):
    ref, path = tiny["onnx-w4"]
    meta = metadata(path)  # what the onnx-w4 target wrote: accuracy level 0 (fp32), the default
    assert meta["lowc.form"] == "DequantizeLinear->MatMul" and meta["lowc.accuracy_level"] == "0"
    assert json.loads(meta["lowc.onnxruntime_session_config"]) == {"session.qdq_matmulnbits_accuracy_level": "0"}
    assert "a default session fuses DequantizeLinear->MatMul at level 4" in meta["lowc.arithmetic"]
    # exported for level 4 (int8 activations): the metadata's session options give int8 arithmetic
    r = export_onnx(ref, tmp_path / "a4.onnx", accuracy_level=4)
    meta4 = metadata(r.path)
    assert meta4["lowc.accuracy_level"] == "4" and r.accuracy_level == 4
    assert json.loads(meta4["lowc.onnxruntime_session_config"]) == {"session.qdq_matmulnbits_accuracy_level": "4"}
    err4 = assert_parity(exact_session(r.path), ref, [(2, 16)], vocab=259, pad=False, rtol=DEFAULT_SESSION_RTOL)
    assert err4 > 10 * EXACT_RTOL, err4
    # a float file asks for nothing
    meta_fp = metadata(tiny["onnx-fp32"][1])
    assert json.loads(meta_fp["lowc.onnxruntime_session_config"]) == {} and meta_fp["lowc.arithmetic"].startswith("fp32")


# ---- no float copy: by identity, not by shape ---------------------------------------------------------
@pytest.fixture(scope="module")
def square_dir(tmp_path_factory):
    """vocab 512 = hidden 512: the embedding and lm_head have the shape of every attention projection."""
    return make_llama_dir(tmp_path_factory.mktemp("onnx-square"), seed=5, vocab_size=512, hidden_size=512,
                          intermediate_size=1024, num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=8)


def test_float_tensors_shaped_like_quantized_weights_are_not_copies(square_dir, tmp_path):
    # float: the embedding, lm_head (rtn's default ignore) and k_proj (ignored here), all 512 x 512
    cm = lowc.compile(square_dir, target="onnx-w4", passes=["rtn{ignore=[lm_head,k_proj]}"], progress=False)
    cm.save(tmp_path / "sq")
    path = str(tmp_path / "sq" / "backend" / "model.onnx")
    floats = [t.name for t in onnx.load(path).graph.initializer
              if t.data_type == onnx.TensorProto.FLOAT and tuple(t.dims) == (512, 512)]
    # the embedding by its name; lm_head and k_proj as the exporter's folded transposes (val_*)
    assert "gm.model.embed_tokens.weight" in floats and len(floats) == 3, floats
    assert_parity_both(path, lowc.load(tmp_path / "sq"), [(2, 7)], vocab=512, pad=False, quantized=True)

    # a real copy is still found: under a quantized layer's name, or holding its dequantized values
    import onnx_ir as ir

    from lowc.backends.onnx import finalize
    from lowc.backends.onnx.export import _quantized_layers

    rng = np.random.default_rng(0)
    layers = _quantized_layers(cm.program)
    q = next(l for l in layers if l.name.endswith("q_proj"))
    for name, values in [("gm.model.layers.0.self_attn.q_proj.weight", rng.random((512, 512))),
                         ("val_folded", q.dequantized().T)]:
        model = ir.load(path)
        t = ir.Tensor(np.ascontiguousarray(values, dtype=np.float32), name=name)
        model.graph.register_initializer(ir.Value(name=name, shape=ir.Shape(t.shape), type=ir.TensorType(t.dtype),
                                                  const_value=t))
        with pytest.raises(OnnxExportError, match=f"initializer {name}: a float copy .* of layer "
                                                  r"model\.layers\.0\.self_attn\.q_proj"):
            finalize.check_no_float_copies(model, layers)
    model = ir.load(path)  # an unrelated float tensor of that shape is fine
    t = ir.Tensor(rng.random((512, 512), dtype=np.float32), name="val_other")
    model.graph.register_initializer(ir.Value(name="val_other", shape=ir.Shape(t.shape), type=ir.TensorType(t.dtype),
                                              const_value=t))
    finalize.check_no_float_copies(model, layers)


# ---- lowc export reuses the file an onnx-* target wrote ---------------------------------------------
def _artifact_of(path: str) -> str:
    return os.path.dirname(os.path.dirname(path))


def test_export_reuses_the_file_the_target_wrote(tiny, tmp_path, monkeypatch, capsys):
    import lowc.export
    from lowc.backends.onnx import export as onnx_export
    from lowc.cli import main

    _, path = tiny["onnx-w4"]
    real_export = onnx_export.export_program
    calls = []

    def spy(*a, **k):
        calls.append(k)
        return real_export(*a, **k)

    def no_load(*a, **k):
        raise AssertionError("the artifact was loaded to be exported again")

    monkeypatch.setattr(onnx_export, "export_program", spy)
    monkeypatch.setattr(lowc.export, "load", no_load)
    out = tmp_path / "m.onnx"
    main(["export", _artifact_of(path), "-o", str(out)])
    cap = capsys.readouterr()
    assert not calls and out.read_bytes() == open(path, "rb").read()
    assert "copied from" in cap.out and "reusing" in cap.err and "fp32 arithmetic when" in cap.out
    # other options: exported again, and the choice is printed
    monkeypatch.undo()
    monkeypatch.setattr(onnx_export, "export_program", spy)
    main(["export", _artifact_of(path), "-o", str(tmp_path / "a4.onnx"), "--accuracy-level", "4"])
    assert len(calls) == 1 and calls[0]["accuracy_level"] == 4
    assert "accuracy level 4 (int8 activations)" in capsys.readouterr().out


def test_export_reuse_checks_hash_and_recorded_options(tiny, tmp_path, monkeypatch):
    import shutil

    from lowc.artifact import sha256_file
    from lowc.backends.onnx import export as onnx_export
    from lowc.errors import ArtifactError

    _, path = tiny["onnx-w4"]
    art = str(tmp_path / "art")
    shutil.copytree(_artifact_of(path), art)
    calls = []
    real_export = onnx_export.export_program
    monkeypatch.setattr(onnx_export, "export_program", lambda *a, **k: calls.append(k) or real_export(*a, **k))
    # the file was written with other options (recorded, and hashed by the manifest): export again
    side_path = os.path.join(art, "backend", "onnx.json")
    side = json.load(open(side_path))
    side["options"]["matmulnbits"] = True
    json.dump(side, open(side_path, "w"))
    mpath = os.path.join(art, "manifest.json")
    m = json.load(open(mpath))
    m["files"]["backend/onnx.json"] = {"bytes": os.path.getsize(side_path), "sha256": sha256_file(side_path)}
    json.dump(m, open(mpath, "w"))
    r = export(art, tmp_path / "o.onnx")
    assert len(calls) == 1 and r.reused_from is None
    # a file that is not the one the manifest hashes is refused, naming it
    with open(os.path.join(art, "backend", "model.onnx"), "r+b") as f:
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 1]))
    with pytest.raises(ArtifactError, match=r"backend/model\.onnx is corrupt: sha256"):
        export(art, tmp_path / "o2.onnx")
