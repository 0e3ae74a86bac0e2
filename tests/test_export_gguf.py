"""``lowc export --format gguf``: read back with llama.cpp's own ``gguf`` package, the integer codes
are lowc's (rows of q/k in llama.cpp's RoPE order), the weights within the documented fp16 bound,
and a Llama rebuilt from the file alone (dequantized, un-permuted) gives lowc's logits; bad inputs
fail with one line and write nothing."""

from __future__ import annotations

import json
import os

import gguf
import lowc
import numpy as np
import pytest
import torch
from conftest import CALIB, make_llama_dir, run_lowc
from lowc import data
from lowc.formats.gguf import (
    GgufExportError,
    export_gguf,
    fp16_bound,
    gguf_name,
    rope_permutation,
)
from lowc.ir import meta
from lowc.ir.dialect import packing, quant
from lowc.ir.dialect.args import LinearQArgs

CFG = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
       "num_key_value_heads": 2}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> str:
    return make_llama_dir(tmp_path_factory.mktemp("gguf-llama"), seed=3, **CFG)


@pytest.fixture(scope="module")
def compiled(llama_dir):
    """Compiled models by name, built once."""
    cache = {}

    def get(name, target, passes=None, **kw):
        if name not in cache:
            cache[name] = lowc.compile(llama_dir, target=target, passes=passes, progress=False, **kw)
        return cache[name]
    return get


def tensors(path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def gguf_codes(t) -> np.ndarray:
    """Integer codes ``[N, K]`` of a Q4_0/Q4_1/Q8_0 tensor, read from its blocks (Q8_0 shifted by +128
    to lowc's unsigned codes)."""
    n = int(t.shape[1])
    size = gguf.GGML_QUANT_SIZES[t.tensor_type][1]
    blocks = np.asarray(t.data).reshape(n, -1, size)
    if t.tensor_type == gguf.GGMLQuantizationType.Q8_0:
        return blocks[..., 2:].view(np.int8).astype(np.int32).reshape(n, -1) + 128
    qs = blocks[..., 4 if t.tensor_type == gguf.GGMLQuantizationType.Q4_1 else 2:]
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.int32).reshape(n, -1)


def dequantized(t) -> torch.Tensor:
    n = int(t.shape[1]) if len(t.shape) > 1 else None
    w = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
    return torch.from_numpy(np.array(w, dtype=np.float32)).reshape((n, -1) if n else (-1,))


def hf_from_gguf(path, llama_dir):
    """A transformers Llama whose every weight comes from the GGUF file (dequantized with gguf's
    reference code, q/k rows put back in Hugging Face's order): a wrong name or permutation breaks it."""
    from transformers import AutoConfig, LlamaForCausalLM

    config = AutoConfig.from_pretrained(llama_dir)
    model = LlamaForCausalLM(config).eval()
    ts = tensors(path)
    heads, kv, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    state = {}
    for name in model.state_dict():
        w = dequantized(ts.pop(gguf_name(name)))
        if ".q_proj." in name or ".k_proj." in name:
            h = heads if ".q_proj." in name else kv
            w[rope_permutation(h * hd, h)] = w.clone()
        state[name] = w
    assert not ts, f"tensors nobody reads: {sorted(ts)}"
    model.load_state_dict(state)
    return model


def cosine(a, b) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def check_exact(cm, path, gtype):
    """Codes identical to lowc's (q/k rows permuted), d/m lowc's scale and -zero*scale in fp16,
    weights within :func:`fp16_bound` of lowc's reference dequantization."""
    ts = tensors(path)
    checked = 0
    for node in cm.program.graph.nodes:
        if node.op != "call_function" or node.target != torch.ops.lowc.linear_wq.default:
            continue
        a, layer = LinearQArgs.of(node), meta.get(node).layer
        t = ts[gguf_name(layer + ".weight")]
        assert t.tensor_type.name == gtype
        codes = packing.unpack(cm.program.attr(a.weight.target), a.bits)
        scales = cm.program.attr(a.scales.target).double()
        zeros = cm.program.attr(a.zeros.target).double() if a.zeros is not None else None
        ref = quant.dequantize(cm.program.attr(a.weight.target), cm.program.attr(a.scales.target),
                                               cm.program.attr(a.zeros.target) if a.zeros is not None else None,
                                               a.bits, a.group_size, a.in_features, torch.float32)
        if "q_proj" in layer or "k_proj" in layer:
            h = CFG["num_attention_heads"] if "q_proj" in layer else CFG["num_key_value_heads"]
            perm = rope_permutation(codes.shape[0], h)
            codes, scales, ref = codes[perm], scales[perm], ref[perm]
            zeros = zeros[perm] if zeros is not None else None
        np.testing.assert_array_equal(gguf_codes(t), codes.numpy())
        blocks = np.asarray(t.data).reshape(codes.shape[0], -1, gguf.GGML_QUANT_SIZES[t.tensor_type][1])
        np.testing.assert_array_equal(blocks[..., :2].view(np.float16)[..., 0], scales.numpy().astype(np.float16))
        m = None
        if gtype == "Q4_1":
            m = (-zeros * scales).numpy()
            np.testing.assert_array_equal(blocks[..., 2:4].view(np.float16)[..., 0], m.astype(np.float16))
        err = (dequantized(t) - ref).abs().double().numpy()
        bound = np.repeat(fp16_bound(scales.numpy(), m, gtype), 32, axis=1)
        assert (err <= bound * (1 + 1e-6)).all(), f"{layer}: {err.max()} over the fp16 bound"
        assert err.max() > 0 or gtype != "Q4_1"  # fp16 rounding of m does change some weights
        checked += 1
    assert checked == 7 * CFG["num_hidden_layers"]


IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))


def check_logits(cm, path, llama_dir, floor=0.9999):
    ref = cm(input_ids=IDS).logits
    with torch.no_grad():
        got = hf_from_gguf(path, llama_dir)(input_ids=IDS).logits
    c = cosine(ref, got)
    assert c >= floor, c
    return c


def test_gptq_g32_asym_is_q4_1_with_lowc_codes(compiled, llama_dir, tmp_path):
    cm = compiled("gptq", "ref-w4a16", ["gptq{group_size=32}"], **{k: v for k, v in CALIB.items() if k != "progress"})
    r = export_gguf(cm, tmp_path / "m.gguf")
    assert r.types == {"F32": 7, "Q4_1": 14} and {row["how"] for row in r.layers} == {"exact", "float"}
    check_exact(cm, r.path, "Q4_1")
    check_logits(cm, r.path, llama_dir)
    fields = gguf.GGUFReader(r.path).fields
    assert fields["general.architecture"].contents() == "llama"
    assert fields["llama.attention.head_count_kv"].contents() == 2
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_Q4_1)


@pytest.mark.parametrize("bits,gtype", [(8, "Q8_0"), (4, "Q4_0")])
def test_symmetric_g32_is_q8_0_or_q4_0(compiled, llama_dir, tmp_path, bits, gtype):
    cm = compiled(f"rtn{bits}s", "ref-w4a16", [f"rtn{{bits={bits},group_size=32,symmetric=true}}"])
    r = export_gguf(cm, tmp_path / "m.gguf")
    assert r.types == {"F32": 7, gtype: 14}
    check_exact(cm, r.path, gtype)
    check_logits(cm, r.path, llama_dir)


def test_float_model_is_f32_and_exact(compiled, llama_dir, tmp_path):
    cm = compiled("float", "ref-fp32")
    r = export_gguf(cm, tmp_path / "m.gguf")
    assert r.types == {"F32": 21}
    assert check_logits(cm, r.path, llama_dir) > 0.999999


def test_requant_g128_reports_its_error(compiled, llama_dir, tmp_path):
    cm = compiled("g128", "ref-w4a16", ["rtn{bits=4}"])  # g128 asym: no GGUF block holds it
    with pytest.raises(GgufExportError, match=r"layer model\.layers\.0\.self_attn\.q_proj is W4A16 g128 asym.*--requant"):
        export_gguf(cm, tmp_path / "no.gguf")
    assert not os.listdir(tmp_path)
    r = export_gguf(cm, tmp_path / "m.gguf", requant="Q8_0")
    rows = [row for row in r.layers if row["how"] == "requant"]
    assert len(rows) == 14 and all(row["type"] == "Q8_0" for row in rows)
    # Q8_0 of a 4-bit weight: small but real error, reported per layer
    assert all(0 < row["rel_err"] < 0.02 for row in rows), rows
    check_logits(cm, r.path, llama_dir, floor=0.999)
    r4 = export_gguf(cm, tmp_path / "m4.gguf", requant="Q4_0")  # 4 bits again, other grid: larger error
    assert min(row["rel_err"] for row in r4.layers if row["how"] == "requant") > max(row["rel_err"] for row in rows)


def errors(p) -> list[str]:
    """The error lines of a lowc run (its stderr also says each step it starts)."""
    return [line for line in p.stderr.splitlines() if not line.startswith("lowc: ") or line.startswith("lowc: error")]


def test_cli_exports_and_refuses_bad_inputs(compiled, tmp_path, capsys):
    """Through the installed entry point: exit 2, one error line, nothing written (the option checks
    answer before torch is imported); an export and its summary in-process through the same CLI."""
    from lowc.cli import main

    art = str(tmp_path / "art")
    compiled("g128", "ref-w4a16", ["rtn{bits=4}"]).save(art)
    out = tmp_path / "m.gguf"
    cases = [
        (["--format", "gguf", "-o", out], "layer model.layers.0.self_attn.q_proj is W4A16 g128 asym"),
        (["--format", "gguf", "-o", out, "--matmulnbits"], "--matmulnbits is an ONNX export option"),
        (["--format", "onnx", "-o", out, "--requant", "Q8_0"], "--requant is a GGUF export option"),
    ]
    for args, msg in cases:
        p = run_lowc("export", art, *args)
        assert p.returncode == 2 and msg in p.stderr and len(errors(p)) == 1, p.stderr
        assert os.listdir(tmp_path) == ["art"]
    with pytest.raises(SystemExit) as e:
        main(["export", art, "--format", "gguf", "-o", str(out), "--requant", "Q3_K"])
    assert e.value.code == 2 and "--requant Q3_K: not a type gguf can quantize to" in capsys.readouterr().err
    main(["export", art, "--format", "gguf", "-o", str(out), "--requant", "Q4_1"])
    printed = capsys.readouterr().out
    assert "requant: 14 layers (re-quantized to Q4_1" in printed and "relative RMS error" in printed, printed
    before = out.read_bytes()
    p = run_lowc("export", art, "--format", "gguf", "-o", out, "--requant", "Q8_0")
    assert p.returncode == 2 and "already exists" in p.stderr and len(errors(p)) == 1
    assert out.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["art", "m.gguf"]


def test_non_llama_and_online_transforms_are_refused(llama_dir, tmp_path):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(tmp_path / "bert")
    bert = lowc.compile(str(tmp_path / "bert"), target="ref-fp32", progress=False)
    with pytest.raises(GgufExportError, match="Llama-architecture causal LMs"):
        export_gguf(bert, tmp_path / "m.gguf")
    kv = lowc.compile(llama_dir, target="ref-w4a16", passes=["rtn{group_size=32}", "quantize-kv{bits=8}"], progress=False)
    with pytest.raises(GgufExportError, match=r"layer model\.layers\.0\.self_attn.* runs lowc::fake_quant_kv"):
        export_gguf(kv, tmp_path / "m.gguf")
    assert not os.path.exists(tmp_path / "m.gguf")


def test_tokenizer_metadata_of_a_trained_byte_level_bpe():
    """What the trained tiny Llama's tokenizer looks like (examples/train_tiny_llama.py): ByteLevel
    with GPT-2's regex -> pre ``gpt-2``; tokens by id, merges in order, special tokens as control;
    ids past the tokenizer up to vocab_size are unused ``[PADn]``."""
    from lowc.formats.gguf import tokenizer_metadata
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    with open(data.wikitext2("valid")) as f:
        text = f.read(20000)
    tok.train_from_iterator([text], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>", "<unk>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    meta = tokenizer_metadata(hf, 304, "m")
    vocab = hf.get_vocab()
    assert meta["pre"] == "gpt-2" and meta["model"] == "gpt2" and len(meta["tokens"]) == 304
    assert all(meta["tokens"][i] == t for t, i in vocab.items())
    assert meta["tokens"][300:] == [f"[PAD{i}]" for i in range(300, 304)] and meta["types"][300:] == [5] * 4
    assert [meta["types"][vocab[t]] for t in ("<s>", "</s>", "<unk>", "a")] == [3, 3, 3, 1]
    merges = [" ".join(m) if not isinstance(m, str) else m for m in json.loads(tok.to_str())["model"]["merges"]]
    assert meta["merges"] == merges and len(merges) > 0
    assert (meta["bos_id"], meta["eos_id"], meta["add_bos"]) == (vocab["<s>"], vocab["</s>"], False)
    with pytest.raises(GgufExportError, match="tokenizer has 300 tokens, more than the model's vocab_size 200"):
        tokenizer_metadata(hf, 200, "m")
