"""lowc.trace and lowc.compile inputs: modules with example inputs, HF model objects, directories,
presets, factories; capture errors; calibration data forms; dynamic shapes after capture."""

from __future__ import annotations

import sys
import types

import pytest
import torch

import lowc
from lowc.errors import CalibrationError, CaptureError, ModelLoadError
from lowc.passes.calibration import load_calibration


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(64, 128)
        self.down = torch.nn.Linear(128, 64)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


class DataDependent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x):
        y = self.proj(x)
        if y.sum() > 0:  # data-dependent control flow: export cannot capture it
            return y
        return -y


def test_module_with_example_inputs_and_dynamic_batch():
    torch.manual_seed(0)
    m = MLP().eval()
    x = torch.randn(4, 64)
    batch = torch.export.Dim("batch", min=1, max=64)
    cm = lowc.compile(m, target="ref-w8a16", example_inputs=(x,), dynamic_shapes=({0: batch},))
    y = torch.randn(9, 64)
    out = cm(y)
    ref = m(y)
    assert out.shape == ref.shape
    assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.999
    assert [r["layer"] for r in cm.layers()] == ["up", "down"]


def test_plain_module_without_inputs_is_an_error():
    with pytest.raises(CaptureError, match="example_inputs"):
        lowc.trace(MLP())


def test_uncapturable_model_names_the_module():
    with pytest.raises(CaptureError) as e:
        lowc.trace(DataDependent(), (torch.randn(2, 8),))
    msg = str(e.value)
    assert "DataDependent" in msg and "\n" not in msg


def test_hf_model_object_and_factory(tmp_path, monkeypatch):
    from lowc.frontend.presets import tiny_llama

    model, _ = tiny_llama(num_hidden_layers=1)
    p = lowc.trace(model)
    assert p.info.kind == "causal-lm" and p.info.block_prefix == "model.layers"
    ids = torch.randint(0, 259, (1, 5))
    torch.testing.assert_close(p.call(ids).logits, model(input_ids=ids, use_cache=False).logits, rtol=0, atol=0)

    mod = types.ModuleType("lowc_test_factory")
    mod.build = lambda: tiny_llama(num_hidden_layers=1)
    monkeypatch.setitem(sys.modules, "lowc_test_factory", mod)
    p2 = lowc.trace("lowc_test_factory:build")
    assert p2.info.source == {"type": "factory", "name": "lowc_test_factory:build"}
    with pytest.raises(ModelLoadError, match="cannot import factory"):
        lowc.trace("lowc_test_nope:build")


def test_unknown_model_spelling():
    with pytest.raises(ModelLoadError, match="unknown model 'not-a-preset'"):
        lowc.trace("not-a-preset")


def test_dynamic_batch_and_sequence_after_capture():
    p = lowc.trace("tiny-llama")
    for b, s in ((1, 1), (3, 33), (2, 100)):
        ids = torch.randint(0, 259, (b, s))
        assert p.call(ids).logits.shape == (b, s, 259)
    with pytest.raises(TypeError, match="unknown input"):
        p.call(ids, bogus=ids)


def test_calibration_forms(tmp_path):
    from lowc.frontend.presets import byte_tokenizer

    tok = byte_tokenizer()
    f = tmp_path / "c.txt"
    f.write_text("calibration text " * 200)
    a = load_calibration(str(f), tok, n_samples=4, seq_len=32, seed=1)
    b = load_calibration(str(f), tok, n_samples=4, seq_len=32, seed=1)
    assert len(a) == 4 and all(s.shape == (1, 32) for s in a.samples)
    assert all(torch.equal(x, y) for x, y in zip(a.samples, b.samples))  # seeded
    s = load_calibration(["hello world " * 50], tok, n_samples=2, seq_len=16)
    assert len(s) == 2
    t = load_calibration([torch.randint(0, 259, (2, 8))], n_samples=10, vocab_size=259)
    assert len(t) == 2 and t.samples[0].shape == (1, 8)
    with pytest.raises(CalibrationError, match="does not exist"):
        load_calibration(str(tmp_path / "nope.txt"), tok)
    with pytest.raises(CalibrationError, match="tokenizer"):
        load_calibration(["text"], None)
    with pytest.raises(CalibrationError, match="integer token ids"):
        load_calibration([torch.randn(2, 8)])
    with pytest.raises(CalibrationError, match=r"\[0, 259\)"):
        load_calibration([torch.tensor([[5, 300]])], vocab_size=259)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(CalibrationError, match="empty"):
        load_calibration(str(empty), tok)


@pytest.mark.slow
def test_compile_records_calibration(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("some calibration text for the tiny model. " * 100)
    cm = lowc.compile("tiny-llama", target="ref-w4a16", calib=str(f), calib_samples=3, seq_len=24)
    assert cm.manifest["calibration"]["samples"] == 3 and cm.manifest["calibration"]["seq_len"] == 24


class FixesSeq(torch.nn.Module):
    def forward(self, input_ids, attention_mask):
        if input_ids.shape[1] == 16:  # specializes the sequence length
            return input_ids * 2
        return input_ids * attention_mask


class ExpandsKV(torch.nn.Module):
    def forward(self, input_ids, attention_mask):
        x = (input_ids * attention_mask).float()
        return x[:, :, None].expand(-1, -1, 3) + x[:, None, :].sum()


def _hf_kwargs(seq=16):
    ids = torch.randint(0, 100, (2, seq), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_dynamic_export_refuses_a_model_that_fixes_a_dim():
    """The Dim.DYNAMIC retry (for torch versions whose solver rejects true guards) must not hide a
    real specialization: it fails naming the dimension and the input."""
    from lowc.frontend.trace import _export_dynamic

    with pytest.raises(CaptureError, match=r"cannot capture FixesSeq: .*seq") as e:
        _export_dynamic(FixesSeq(), _hf_kwargs(), {"batch": (0, 64), "seq": (1, 512)}, "FixesSeq")
    assert "16" in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_dynamic_export_keeps_both_dims_symbolic():
    from lowc.frontend.trace import _export_dynamic

    ep = _export_dynamic(ExpandsKV(), _hf_kwargs(), {"batch": (0, 64), "seq": (1, 512)}, "ExpandsKV")
    gm = ep.module()
    kw = _hf_kwargs(seq=7)
    assert torch.equal(gm(**kw), ExpandsKV()(**kw))


def test_identity_slices_are_canonicalized_away():
    """`x[:, :, None]` exports with full-range aten.slice on some torch versions; lowc drops them."""
    from lowc.ir.canonicalize import canonicalize

    kw = _hf_kwargs()
    # build the slices explicitly, as torch 2.11's export leaves them
    g = torch.fx.Graph()
    ids, mask = g.placeholder("input_ids"), g.placeholder("attention_mask")
    x = g.call_function(torch.ops.aten.mul.Tensor, (ids, mask))
    s0 = g.call_function(torch.ops.aten.slice.Tensor, (x, 0, 0, 2**63 - 1))
    u = g.call_function(torch.ops.aten.unsqueeze.default, (s0, 2))
    s1 = g.call_function(torch.ops.aten.slice.Tensor, (u, 3, 0, 2**63 - 1, 1))
    part = g.call_function(torch.ops.aten.slice.Tensor, (u, 1, 0, 4))  # a real slice stays
    g.output((s1, part))
    m = canonicalize(torch.fx.GraphModule(torch.nn.Module(), g))
    slices = [n for n in m.graph.nodes if n.target == torch.ops.aten.slice.Tensor]
    assert [n.args[1:] for n in slices] == [(1, 0, 4)]
    out, kept = m(**kw)
    assert torch.equal(out, (kw["input_ids"] * kw["attention_mask"])[:, :, None])
    assert torch.equal(kept, (kw["input_ids"] * kw["attention_mask"])[:, :4, None])


# ---- batch 1, one token, tokenizer outputs (issue 15, item 1) ---------------------------------------------
def _float_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits


@pytest.mark.parametrize("example_shape", [(1, 32), pytest.param((1, 1), marks=pytest.mark.slow),
                                           pytest.param((3, 1), marks=pytest.mark.slow)])
def test_hf_example_of_batch_one_or_one_token_compiles_and_runs_at_any_size(example_shape):
    """torch.export specializes dims of size 1: capture must use a size that keeps batch and
    sequence dynamic, and the program must then run batch 1 and one token, matching the model."""
    from lowc.frontend.presets import tiny_llama

    model, _ = tiny_llama(num_hidden_layers=1)
    ids = torch.randint(0, 259, example_shape, generator=torch.Generator().manual_seed(0))
    cm = lowc.compile(model, target="ref-fp32", example_inputs=(ids,), progress=False)
    spec = cm.program.info.inputs[0]
    assert spec.dynamic == {0: "batch", 1: "seq"} and min(spec.shape) >= 2, spec
    assert cm.manifest["metrics"]["check"]["top1"] == 1.0  # checked on the user's example
    for shape in ((1, 1), (1, 9), (4, 1), example_shape):
        x = torch.randint(0, 259, shape, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(cm(x).logits, _float_logits(model, x), rtol=1e-5, atol=1e-5)
    q = lowc.compile(model, target="ref-w8a16", example_inputs=(ids,), progress=False)
    x = torch.randint(0, 259, (1, 1))
    assert torch.nn.functional.cosine_similarity(q(x).logits.flatten(), _float_logits(model, x).flatten(), dim=0) > 0.999


def test_tokenizer_output_as_example_and_as_call_inputs():
    """A BatchEncoding (int32 ids, a bool mask) is accepted by lowc.compile and by the compiled model,
    as keywords and as one mapping."""
    from transformers import BatchEncoding

    from lowc.frontend.presets import tiny_llama

    model, tok = tiny_llama(num_hidden_layers=1)
    enc = tok(["a tokenized sentence"], return_tensors="pt")
    assert isinstance(enc, BatchEncoding) and enc["input_ids"].shape[0] == 1
    enc32 = BatchEncoding({"input_ids": enc["input_ids"].int(), "attention_mask": enc["attention_mask"].bool()})
    cm = lowc.compile(model, target="ref-fp32", example_inputs=enc32, progress=False)
    assert min(cm.program.info.inputs[0].shape) >= 2
    ref = _float_logits(model, enc["input_ids"])
    torch.testing.assert_close(cm(**enc32).logits, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cm(enc32).logits, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cm(dict(enc)).logits, ref, rtol=1e-5, atol=1e-5)
    lists = tok(["a tokenized sentence"])  # no return_tensors: python lists
    torch.testing.assert_close(cm(**lists).logits, ref, rtol=1e-5, atol=1e-5)
    cm2 = lowc.compile(model, target="ref-fp32", example_inputs=(dict(enc),), progress=False)
    torch.testing.assert_close(cm2(**enc).logits, ref, rtol=1e-5, atol=1e-5)


def _small_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, type_vocab_size=2)
    return BertModel(cfg).eval()


def test_bert_token_type_ids_of_single_sentences_are_accepted():
    """What a BERT tokenizer returns for single sentences (token_type_ids all 0) works as example
    and as call input; segment ids other than 0 are refused naming the input, not silently dropped."""
    from lowc.errors import InputError

    bert = _small_bert()
    ids = torch.randint(0, 120, (1, 7), generator=torch.Generator().manual_seed(0))
    enc = {"input_ids": ids, "token_type_ids": torch.zeros_like(ids), "attention_mask": torch.ones_like(ids)}
    cm = lowc.compile(bert, target="ref-fp32", example_inputs=enc, progress=False)
    with torch.no_grad():
        ref = bert(**enc).last_hidden_state
    torch.testing.assert_close(cm(**enc).last_hidden_state, ref, rtol=1e-5, atol=1e-5)
    pair = {**enc, "token_type_ids": torch.tensor([[0, 0, 0, 1, 1, 1, 1]])}
    with pytest.raises(InputError, match="token_type_ids"):
        cm(**pair)
    with pytest.raises(CaptureError, match="token_type_ids"):
        lowc.trace(bert, pair)


def test_bad_example_and_call_inputs_are_one_line_errors():
    from lowc.errors import InputError, LowcError
    from lowc.frontend.presets import tiny_llama

    model, _ = tiny_llama(num_hidden_layers=1)
    ids = torch.randint(0, 259, (1, 4))
    with pytest.raises(CaptureError, match="no 'input_ids'"):
        lowc.trace(model, {"attention_mask": torch.ones(1, 4, dtype=torch.long)})
    with pytest.raises(CaptureError, match=r"attention_mask .*shape \[1, 3\]"):
        lowc.trace(model, (ids, torch.ones(1, 3, dtype=torch.long)))
    with pytest.raises(CaptureError, match="position_ids"):
        lowc.trace(model, {"input_ids": ids, "position_ids": ids})
    p = lowc.trace(model, (ids,))
    with pytest.raises(InputError, match="'input_ids' is float32") as e:
        p.call(ids.float())
    assert isinstance(e.value, LowcError) and isinstance(e.value, TypeError)
    with pytest.raises(InputError, match="'input_ids': cannot make a tensor"):
        p.call(input_ids=[[1, 2], [3]])
    with pytest.raises(InputError, match="missing input 'input_ids'"):
        p.call(attention_mask=torch.ones(1, 4, dtype=torch.long))


@pytest.mark.slow
def test_compile_takes_the_tokenizer_of_a_module_for_text_calibration():
    from lowc.frontend.presets import tiny_llama

    model, tok = tiny_llama(num_hidden_layers=1)
    kw = dict(target="ref-w8a16", calib="wikitext-2-valid", calib_samples=2, seq_len=16, passes=["gptq"], progress=False)
    with pytest.raises(CalibrationError, match="needs the model's tokenizer"):
        lowc.compile(model, **kw)
    cm = lowc.compile(model, tokenizer=tok, **kw)
    assert cm.manifest["calibration"]["source"] == "wikitext-2-valid" and cm.tokenizer is tok
