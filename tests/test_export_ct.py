"""``lowc export --format compressed-tensors``: the directory loads in transformers (with the
compressed-tensors package) and runs like lowc's reference backend; the config passes
compressed-tensors' own config model; the packed codes are lowc's codes; bad inputs fail with one
line and write nothing. Also ``CompiledModel.to_module()`` and Hugging Face Hub ids."""

from __future__ import annotations

import inspect
import json
import os
import re

import lowc
import pytest
import torch
from conftest import make_llama_dir, run_lowc
from lowc.errors import ExportError, ModelLoadError
from lowc.export import export as export_model
from lowc.ir.dialect import packing
from safetensors import safe_open
from test_cli import assert_clean_error

pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors.pack_quantized.helpers import (
    pack_to_int32,
    unpack_from_int32,
)
from compressed_tensors.quantization import QuantizationConfig
from lowc.formats.compressed_tensors import pack_int32

LLAMA = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2}
#: attention in 8 bits per channel, the MLP in 4 bits per group of 32 (both symmetric)
MIXED = ["rtn{bits=8,group_size=-1,symmetric=true,ignore=[lm_head,*.mlp.*]}", "rtn{bits=4,group_size=32,symmetric=true}"]
RECIPES = {"w4-g128-asym": ("ref-w4a16", None), "w8-channel-sym": ("ref-w8a16", None), "mixed": ("ref-w4a16", MIXED)}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> str:
    return make_llama_dir(tmp_path_factory.mktemp("ct-llama"), seed=3, **LLAMA)


@pytest.fixture(scope="module")
def artifacts(llama_dir, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("ct-artifacts")
    out = {}
    for name, (target, passes) in RECIPES.items():
        out[name] = lowc.compile(llama_dir, target=target, passes=passes, progress=False).save(root / name)
    return out


def _ids():
    return torch.randint(0, 259, (2, 24), generator=torch.Generator().manual_seed(5))


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def _export(artifact: str, out) -> dict:
    r = export_model(artifact, out, format="compressed-tensors", force=False)
    assert r.check_rel_diff < 1e-5
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    QuantizationConfig.model_validate(cfg["quantization_config"])  # compressed-tensors' own config model
    return cfg


@pytest.mark.parametrize("recipe", ["w8-channel-sym", "mixed"])
def test_symmetric_exports_load_in_transformers(recipe, artifacts, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = _export(artifacts[recipe], tmp_path / "ct")
    qc = cfg["quantization_config"]
    assert qc["format"] == "pack-quantized" and qc["ignore"] == ["lm_head"]
    schemes = sorted((g["weights"]["num_bits"], g["weights"]["strategy"], g["weights"]["group_size"], len(g["targets"]))
                     for g in qc["config_groups"].values())
    assert schemes == ([(8, "channel", None, 14)] if recipe != "mixed" else [(4, "group", 32, 6), (8, "channel", None, 8)])
    cm = lowc.load(artifacts[recipe])
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ct").eval()
    with torch.no_grad():
        got, ref = hf(input_ids=_ids()).logits, cm(input_ids=_ids()).logits
    assert _cosine(got, ref) >= 0.9999
    with safe_open(tmp_path / "ct" / "model.safetensors", "pt") as f:  # symmetric: no zero points stored
        assert not [k for k in f.keys() if k.endswith("zero_point")]  # noqa: SIM118 (a safe_open handle)


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")  # dequantize=True on purpose
def test_asymmetric_g128_codes_and_zero_points_carried_exactly(artifacts, tmp_path):
    """Asymmetric pack-quantized: the installed transformers + compressed-tensors load it dequantized
    (their compressed skeleton expects unpacked zero points while compressed-tensors writes them
    packed, upstream llm-compressor#1618); the codes and zero points are lowc's, bit for bit."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    qc = _export(artifacts["w4-g128-asym"], tmp_path / "ct")["quantization_config"]
    (group,) = qc["config_groups"].values()
    w = group["weights"]
    assert (w["num_bits"], w["strategy"], w["group_size"], w["symmetric"]) == (4, "group", 128, False)
    cm = lowc.load(artifacts["w4-g128-asym"])
    st = load_file(tmp_path / "ct" / "model.safetensors")
    name = "model.layers.1.mlp.down_proj"  # in_features 256: two groups
    state = cm.program.state_tensors()
    codes = unpack_from_int32(st[f"{name}.weight_packed"], 4, torch.Size([128, 256])).to(torch.int32) + 8
    assert torch.equal(codes, packing.unpack(state[f"{name}.qweight"], 4))
    zeros = unpack_from_int32(st[f"{name}.weight_zero_point"], 4, torch.Size([128, 2]), packed_dim=0).to(torch.int32) + 8
    assert torch.equal(zeros, state[f"{name}.zeros"].to(torch.int32))
    assert torch.equal(st[f"{name}.weight_scale"], state[f"{name}.scales"])
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", quantization_config=CompressedTensorsConfig(dequantize=True))
    with torch.no_grad():
        assert _cosine(hf(input_ids=_ids()).logits, cm(input_ids=_ids()).logits) >= 0.9999


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_pack_int32_matches_compressed_tensors(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (5, 72), generator=g)  # 72 values: a partly filled last word
    ours = pack_int32(codes, bits)
    theirs = pack_to_int32((codes - (1 << (bits - 1))).to(torch.int8), bits)
    assert torch.equal(ours, theirs)
    zp = pack_int32(codes[:, :3].t().contiguous(), bits).t()
    assert torch.equal(zp, pack_to_int32((codes[:, :3] - (1 << (bits - 1))).to(torch.int8), bits, packed_dim=0))


def test_minilm_encoder_exports_and_loads_with_automodel(tmp_path):
    from transformers import AutoModel

    cm = lowc.compile("minilm", target="ref-w8a16", progress=False)
    export_model(cm, tmp_path / "ct", format="compressed-tensors")
    hf = AutoModel.from_pretrained(tmp_path / "ct").eval()
    tok = cm.tokenizer
    batch = tok(["a quantized sentence encoder", "runs in transformers after export"], return_tensors="pt", padding=True)
    with torch.no_grad():
        got = hf(**batch).last_hidden_state
        ref = cm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    assert _cosine(got, ref) >= 0.9999
    assert os.path.isfile(tmp_path / "ct" / "tokenizer.json")


def test_unsupported_schemes_fail_naming_the_layer(llama_dir, tmp_path):
    w8a8 = lowc.compile(llama_dir, target="ref-w8a8", progress=False)
    with pytest.raises(ExportError, match=r"layer model\.layers\.0\.self_attn\.q_proj: .*activation quantization"):
        export_model(w8a8, tmp_path / "a", format="compressed-tensors")
    module = torch.nn.Sequential(torch.nn.Linear(16, 16))
    plain = lowc.compile(module, target="ref-w8a16", example_inputs=(torch.randn(2, 16),), progress=False)
    with pytest.raises(ExportError, match="not compiled from a Hugging Face model"):
        export_model(plain, tmp_path / "b", format="compressed-tensors")
    assert not os.listdir(tmp_path)


def test_cli_bad_inputs_one_line_nothing_written(llama_dir, artifacts, tmp_path):
    w3 = lowc.compile(llama_dir, target="ref-w4a16", passes=["rtn{bits=3}"], progress=False).save(tmp_path / "w3")
    out = tmp_path / "out"
    res = run_lowc("export", w3, "--format", "compressed-tensors", "-o", out)
    assert_clean_error(res, "layer model.layers.0.self_attn.q_proj", "3-bit")
    res = run_lowc("export", llama_dir, "--format", "compressed-tensors", "-o", out)
    assert_clean_error(res, "not a lowc artifact")
    assert sorted(os.listdir(tmp_path)) == ["w3"]
    out.mkdir()
    (out / "keep").write_text("x")
    res = run_lowc("export", artifacts["w8-channel-sym"], "--format", "compressed-tensors", "-o", out)
    assert_clean_error(res, "already exists", "--force")
    assert os.listdir(out) == ["keep"] and sorted(os.listdir(tmp_path)) == ["out", "w3"]


def test_force_replaces_only_a_previous_export(artifacts, tmp_path):
    from lowc.errors import ArtifactError

    other = tmp_path / "other"
    other.mkdir()
    (other / "keep").write_text("x")
    with pytest.raises(ArtifactError, match="not a compressed-tensors model directory"):
        export_model(artifacts["w8-channel-sym"], other, format="compressed-tensors", force=True)
    assert os.listdir(other) == ["keep"]
    out = tmp_path / "ct"
    export_model(artifacts["w8-channel-sym"], out, format="compressed-tensors")
    res = run_lowc("export", artifacts["mixed"], "--format", "compressed-tensors", "-o", out, "--force")
    assert res.returncode == 0, res.stderr
    assert "W8A16 per-channel sym x8; W4A16 g32 sym x6" in res.stdout and "float linear layers: lm_head" in res.stdout
    with open(out / "config.json") as f:
        assert len(json.load(f)["quantization_config"]["config_groups"]) == 2
    assert sorted(os.listdir(tmp_path)) == ["ct", "other"]


# ---- the plain-module view ---------------------------------------------------------------------------
def test_to_module_is_a_callable_compilable_module(artifacts):
    cm = lowc.load(artifacts["mixed"])
    m = cm.to_module()
    assert isinstance(m, torch.nn.Module)
    assert list(inspect.signature(m.forward).parameters) == ["input_ids", "attention_mask"]
    assert any(k.endswith("q_proj.qweight") for k, _ in m.named_buffers())
    ids = _ids()
    with torch.no_grad():
        ref = cm(input_ids=ids).logits
        assert torch.equal(m(ids).logits, ref)
        assert torch.equal(m(input_ids=ids, attention_mask=torch.ones_like(ids)).logits, ref)
        compiled = torch.compile(m, backend="aot_eager", fullgraph=True)  # dynamo + AOT tracing of the dialect ops
        torch.testing.assert_close(compiled(input_ids=ids).logits, ref)
    with pytest.raises(TypeError, match="input 'pixel_values' is unknown"):
        m(pixel_values=ids)


# ---- Hugging Face Hub ids ----------------------------------------------------------------------------
def test_hub_id_resolves_through_the_local_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    snap = cache / "models--lowc-test--tiny-llama" / "snapshots" / "0123abcd"
    make_llama_dir(snap, seed=4, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                   num_key_value_heads=1)
    (cache / "models--lowc-test--tiny-llama" / "refs").mkdir()
    (cache / "models--lowc-test--tiny-llama" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    cm = lowc.compile("lowc-test/tiny-llama", target="ref-w8a16", progress=False)
    assert cm.program.info.source["name"] == "lowc-test/tiny-llama"
    assert cm.program.info.source["path"] == str(snap)
    with pytest.raises(ModelLoadError, match=r"'lowc-test/missing' is neither a local directory nor in the Hugging Face "
                                             r"cache " + re.escape(f"({cache};")):
        lowc.compile("lowc-test/missing", target="ref-fp32", progress=False)
