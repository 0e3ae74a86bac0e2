"""linearize (Hedgehog, LoLCATs): graph form, training, padding, LoRA merge, recurrent decode, artifact
round trip, composition with GPTQ (Python and CLI), options and bad input.

Models: a small Llama with grouped-query attention (4 query heads sharing 2 key/value heads, random
weights) and the real MiniLM (bidirectional, padded batches). Calibration: a few short windows of
wikitext-2 valid.txt."""

from __future__ import annotations

import json
import os

import pytest
import torch

import lowc
from conftest import VALID, make_llama_dir, run_lowc
from lowc.errors import CalibrationError, GenerationError, PassError, PassOptionError
from lowc.ir import printer, verifier
from lowc.passes.base import PassContext
from lowc.passes.calibration import load_calibration
from lowc.passes.linearize.linearize import Linearize
from lowc.passes.options import parse_pass
from lowc.passes.pipeline import run_passes
from lowc.runtime import GenerationConfig, RecomputeDecoder, RecurrentDecoder, generate

SDPA = torch.ops.aten.scaled_dot_product_attention.default
LA = "lowc.linear_attention.default"


def _text(chars: int = 30000) -> str:
    with open(VALID, encoding="utf-8") as f:
        return f.read(chars)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> str:
    return make_llama_dir(tmp_path_factory.mktemp("lin-llama"), seed=3, hidden_size=64, intermediate_size=128,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def llama(llama_dir):
    return lowc.trace(llama_dir)


@pytest.fixture(scope="module")
def minilm():
    return lowc.trace("minilm")


def _calib(program, n=3, seq_len=48):
    from lowc.api import tokenizer_of

    return load_calibration([_text()], tokenizer_of(program), n, seq_len, seed=0)


def _run(program, spelling, calib=None, **ctx):
    p = program.clone()
    p.tokenizer = getattr(program, "tokenizer", None)
    c = PassContext(calib=calib if calib is not None else _calib(program), progress=False, **ctx)
    rec = run_passes(p, [parse_pass(spelling)], c)[0]
    return p, rec.result, c


def _ops(p, target):
    return [n for n in p.graph.nodes if n.op == "call_function" and n.target == target]


def _recurrent(p, ids, n, mask=None, on_token=None):
    return generate(RecurrentDecoder(p), ids, GenerationConfig(max_new_tokens=n), attention_mask=mask, on_token=on_token)


def _parallel(p, ids, n, mask=None):
    return generate(RecomputeDecoder(p), ids, GenerationConfig(max_new_tokens=n), attention_mask=mask)


def _la_nodes(p):
    return [n for n in p.graph.nodes if n.op == "call_function" and str(n.target) == "lowc.linear_attention.default"]


# ---- graph form, training, idempotence ------------------------------------------------------------
def test_lolcats_llama_graph_training_and_idempotence(llama):
    p, res, ctx = _run(llama, "linearize{window=16,lora_rank=0,epochs=2}")
    assert res.changed and res.stats["linearized"] == 2 and res.stats["causal"] is True
    assert not _ops(p, SDPA)
    text = printer.format_program(p)
    torch.testing.FileCheck() \
        .check("%key_mask = aten.ne.Scalar(%attention_mask, 0)") \
        .check("aten.matmul.default").check("@model.layers.0.self_attn.fq_weight").check("role=fmap_q block=0") \
        .check("aten._softmax.default") \
        .check("@model.layers.0.self_attn.fk_weight").check("role=fmap_k block=0") \
        .check("aten.sigmoid.default(@model.layers.0.self_attn.window_factor)") \
        .check(f"%linear_attention = {LA}(").check("%key_mask, True, 16,").check("role=attn block=0") \
        .check("aten.linear.default(").check("self_attn.o_proj.weight") \
        .check("@model.layers.1.self_attn.fq_weight").check(f"{LA}(") \
        .check_not("scaled_dot_product_attention").run(text)
    # per-query-head maps by default (the reference code): the op reads the repeated 4-head keys
    la = _la_nodes(p)
    assert [n.args[1].meta["val"].shape[1] for n in la] == [4, 4]
    assert p.attr("model.layers.0.self_attn.fq_weight").shape == (4, 16, 64)
    verifier.verify(p)
    for layer in res.stats["layers"]:  # attention transfer lowers the MSE to softmax attention in every layer
        assert layer["loss_after"] < layer["loss_before"] and layer["mse_after"] < layer["mse_before"], layer
    assert any("attention-output MSE" in line for line in ctx.log)
    _, again, _ = _run(p, "linearize{window=16,lora_rank=0}")
    assert not again.changed and again.stats["already"] == 2


def _tap(program, node, sample):
    """Value of ``node`` when the program runs on one calibration sample."""
    from lowc.passes.blockwise import calibration_inputs

    got = {}

    class T(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n is node:
                got["v"] = out
            return out

    with torch.no_grad():
        T(program.gm).run(*calibration_inputs(program, sample))
    return got["v"]


def test_graph_computes_what_was_trained(llama):
    """Layer 0 reads the same input in the float and the linearized model, so the graph's attention
    output must reproduce the MSE that attention transfer reported (maps of the trainer == nodes)."""
    calib = _calib(llama)
    p, res, _ = _run(llama, "linearize{window=16,lora_rank=0,epochs=1}", calib)
    sdpa = _ops(llama, SDPA)[0]
    la = _la_nodes(p)[0]
    mse = sum(torch.nn.functional.mse_loss(_tap(p, la, s), _tap(llama, sdpa, s)).item() for s in calib.samples) / len(calib)
    assert mse == pytest.approx(res.stats["layers"][0]["mse_after"], rel=1e-3)
    # seeded: the same run again gives the same maps
    p2, _, _ = _run(llama, "linearize{window=16,lora_rank=0,epochs=1}", calib)
    for name in ("fq_weight", "fk_weight", "window_factor"):
        t = f"model.layers.1.self_attn.{name}"
        assert torch.equal(p.attr(t), p2.attr(t)), name


def test_hedgehog_llama_identity_init_and_xent(llama):
    p0, res0, _ = _run(llama, "linearize{method=hedgehog,epochs=0}")
    w = p0.attr("model.layers.1.self_attn.fk_weight")
    assert w.shape == (4, 16, 16) and torch.equal(w, torch.eye(16).expand(4, 16, 16))
    assert torch.equal(p0.attr("model.layers.1.self_attn.fk_bias"), torch.zeros(4, 1, 16))
    assert "attn_mse_before" not in res0.stats
    p, res, _ = _run(llama, "linearize{method=hedgehog,epochs=2}")
    assert res.stats["window"] == 0 and res.stats["feature_dim"] == 32 and "lora_layers" not in res.stats
    text = printer.format_program(p)
    # query side: a per-row shift by max|xW+b| (cancels exactly); key side: clamp to ±40
    torch.testing.FileCheck().check("@model.layers.0.self_attn.fq_bias").check("aten.abs.default") \
        .check("aten.amax.default").check("aten.exp.default").check("@model.layers.0.self_attn.fk_bias") \
        .check("aten.clamp.default(%fk_add, -40.0, 40.0)").check("aten.exp.default").check(f"{LA}(").check("None, None, None, None, %key_mask, True, 0,") \
        .run(text)
    assert not _ops(p, SDPA)
    for layer in res.stats["layers"]:
        assert layer["loss"] == "xent" and layer["loss_after"] < layer["loss_before"], layer
    # error floor vs float on held-in text (random-weight model, loose)
    ids = _calib(llama, 2, 64).samples
    ids = torch.cat(ids)
    with torch.no_grad():
        ref, out = llama.call(ids).logits, p.call(ids).logits
    cos = torch.nn.functional.cosine_similarity(ref.flatten(), out.flatten(), dim=0).item()
    assert cos > 0.999, cos  # measured 0.99989 (random weights: attention is nearly uniform)


def test_hedgehog_map_is_the_papers_exactly():
    """The stabilised maps give the attention of the plain φ(x) = [exp(xW+b), exp(−xW−b)] (query shift
    cancels; key clamp inactive below 40), and stay finite where the plain form overflows."""
    from lowc.ir.dialect import ensure_registered
    from lowc.passes.linearize import maps

    ensure_registered()
    op = torch.ops.lowc.linear_attention.default
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 20, 8, generator=g) * 2 for _ in range(3))
    params = {n: torch.randn(4, 8, 8, generator=g) * 0.7 for n in ("fq_weight", "fk_weight")}
    params.update({n: torch.randn(4, 1, 8, generator=g) for n in ("fq_bias", "fk_bias")})
    for causal in (True, False):
        got = maps.linearized_attention("hedgehog", q, k, v, params, None, causal=causal, window=0, scale=0.3, op=op)
        plain = [torch.cat([torch.exp(x @ params[f"f{w}_weight"] + params[f"f{w}_bias"]),
                            torch.exp(-(x @ params[f"f{w}_weight"] + params[f"f{w}_bias"]))], -1) for x, w in ((q, "q"), (k, "k"))]
        want = op(*plain, v, None, None, None, None, None, causal, 0, 0.3, maps.EPS)
        assert (k @ params["fk_weight"] + params["fk_bias"]).abs().max() < 40
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    huge = maps.linearized_attention("hedgehog", q * 100, k * 100, v, params, None, causal=True, window=0, scale=0.3, op=op)
    assert torch.isfinite(huge).all()


def test_layers_selection_keeps_softmax_elsewhere(llama):
    p, res, _ = _run(llama, "linearize{method=hedgehog,layers=[1],epochs=1}")
    assert res.stats["linearized"] == 1
    sdpa = _ops(p, SDPA)
    assert len(sdpa) == 1 and "layers.0." in sdpa[0].meta["lowc"].layer
    assert [n.meta["lowc"].block for n in _la_nodes(p)] == [1]
    # a second run on the hybrid with layers=[0] linearizes the other one; then nothing is left
    p2, res2, _ = _run(p, "linearize{method=hedgehog,layers=[0],epochs=1}")
    assert res2.changed and not _ops(p2, SDPA) and len(_la_nodes(p2)) == 2
    _, res3, _ = _run(p, "linearize{method=hedgehog,layers=[model.layers.1.*],epochs=1}")
    assert not res3.changed  # the same choice again: already linearized
    _, res4, _ = _run(p, "linearize{method=hedgehog,layers=[1],epochs=1}")
    assert not res4.changed
    with pytest.raises(PassError, match=r"layers=7: no attention at layer index 7 \(this model's attention layers: 0\.\.1\)"):
        _run(llama, "linearize{layers=[7]}")
    with pytest.raises(PassError, match="layers=decoder.*matches no attention layer"):
        _run(llama, "linearize{layers=[decoder.*]}")


def test_kv_head_maps_use_grouped_query_form(llama):
    p, res, _ = _run(llama, "linearize{window=8,kv_head_maps=true,lora_rank=0,epochs=1}")
    la = _la_nodes(p)
    assert [n.args[1].meta["val"].shape[1] for n in la] == [2, 2]  # fk, v, k: 2 key/value heads
    assert [n.args[2].meta["val"].shape[1] for n in la] == [2, 2]
    assert p.attr("model.layers.0.self_attn.fk_weight").shape == (2, 16, 64)
    assert p.attr("model.layers.0.self_attn.fq_weight").shape == (4, 16, 64)
    # the repeat_kv expand/reshape feeding SDPA are gone with it
    assert not any(n.op == "call_function" and "expand" in str(n.target) and n.meta["lowc"].block is not None
                   for n in p.graph.nodes)


# ---- LoRA ------------------------------------------------------------------------------------------
def test_lora_merged_into_weights(llama):
    calib = _calib(llama)
    p1, r1, _ = _run(llama, "linearize{window=16,lora_rank=0,epochs=1}", calib)
    p2, r2, _ = _run(llama, "linearize{window=16,lora_rank=4,lora_epochs=2,lora_lr=1e-3,epochs=1}", calib)
    assert r2.stats["lora_layers"] == 8 and r2.stats["lora_loss_after"] < r2.stats["lora_loss_before"]
    # no extra node or weight: the adapters were merged
    assert [str(n.target) for n in p1.graph.nodes] == [str(n.target) for n in p2.graph.nodes]
    assert set(p1.state_tensors()) == set(p2.state_tensors())
    for name, t in p1.state_tensors().items():
        changed = not torch.equal(t, p2.state_tensors()[name])
        assert changed == bool(name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"))), name
    # the merged graph gives the loss the adapters had
    ids = torch.cat(calib.samples)
    with torch.no_grad():
        logits = p2.call(ids).logits
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item()
    assert ce == pytest.approx(r2.stats["lora_loss_after"], rel=1e-4)


def test_lora_distill_objective(llama):
    p, r, _ = _run(llama, "linearize{window=16,lora_rank=2,lora_epochs=2,lora_lr=1e-3,lora_loss=distill,epochs=1,"
                         "lora_batch=2,lora_schedule=cosine}")
    assert r.stats["lora_loss"] == "KL to float"
    assert r.stats["lora_steps"] == 2 * -(-len(_calib(llama).samples) // 2)  # batches of 2 per epoch
    assert 0 < r.stats["lora_loss_after"] < r.stats["lora_loss_before"] < 5  # a KL, not a cross-entropy


# ---- MiniLM: bidirectional, padding ---------------------------------------------------------------
@pytest.mark.slow
def test_minilm_bidirectional_with_padding(minilm):
    from lowc import evaluate as ev

    calib = _calib(minilm, 3, 64)
    p, res, _ = _run(minilm, "linearize{method=hedgehog,epochs=2}", calib)
    assert res.stats["linearized"] == 6 and res.stats["causal"] is False
    assert all(str(n.args[8]) == "False" for n in _la_nodes(p))
    assert all(l["mse_after"] < l["mse_before"] for l in res.stats["layers"])
    tok = minilm.tokenizer
    short, long = ev.SENTENCES[2], ev.SENTENCES[0] + " " + ev.SENTENCES[1]
    alone = {k: v for k, v in tok([short], return_tensors="pt").items() if k != "token_type_ids"}
    both = {k: v for k, v in tok([short, long], padding=True, return_tensors="pt").items() if k != "token_type_ids"}
    assert both["attention_mask"][0].sum() < both["attention_mask"].shape[1]  # the short one is padded
    with torch.no_grad():
        a = p.call(**alone).last_hidden_state[0]
        b = p.call(**both).last_hidden_state[0, : a.shape[0]]
    torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-4)  # padded keys are excluded exactly
    batches = ev.text_batches(tok, ev.SENTENCES)
    c = ev.compare(lambda **kw: minilm.call(**kw), lambda **kw: p.call(**kw), batches, "encoder")
    assert c.cosine > 0.8, c  # measured 0.887 (untrained maps: 0.537); 3 x 64 tokens, 2 epochs


@pytest.mark.slow
def test_minilm_lolcats_lora_self_distillation(minilm):
    p, res, _ = _run(minilm, "linearize{window=16,lora_rank=2,lora_epochs=1,epochs=1}", _calib(minilm, 2, 48))
    assert res.stats["lora_loss"] == "hidden-state mse"
    assert res.stats["lora_loss_after"] < res.stats["lora_loss_before"]
    assert not _ops(p, SDPA)


# ---- recurrent decode --------------------------------------------------------------------------------
@pytest.mark.parametrize("spelling", ["linearize{window=8,lora_rank=0,epochs=1}",
                                      "linearize{method=hedgehog,layers=[1],epochs=1}",
                                      "linearize{window=8,kv_head_maps=true,lora_rank=0,epochs=1}"],
                         ids=["lolcats", "hybrid-softmax-layer0", "kv-head-maps"])
def test_recurrent_decode_matches_parallel(llama, spelling):
    p, _, _ = _run(llama, spelling)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (2, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    sizes = []
    rec = _recurrent(p, ids, 36, mask, on_token=lambda i, d: sizes.append((d.state_bytes(), d.kv_cache_bytes())))
    par = _parallel(p, ids, 36, mask)
    assert torch.equal(rec, par)
    states = {s for s, _ in sizes}
    assert len(states) == 1  # the recurrent state does not grow
    dec = RecurrentDecoder(p)
    if dec.softmax_layers:
        assert sizes[-1][1] > sizes[0][1]  # the softmax layer's KV cache grows
    else:
        assert {kv for _, kv in sizes} == {0}


@pytest.mark.slow
def test_decode_state_size_and_errors(llama, minilm):
    p, _, _ = _run(llama, "linearize{window=8,lora_rank=0,epochs=1}")
    q, _, _ = _run(llama, "linearize{window=8,kv_head_maps=true,lora_rank=0,epochs=1}")
    ids = torch.randint(0, 256, (1, 5))
    d1, d2 = RecurrentDecoder(p), RecurrentDecoder(q)
    d1.prefill(ids), d2.prefill(ids)
    # per layer: S [H, 2F, Dv] + z [H, 2F] + window of 8 (fk, k, v) + valid, fp32; H = 4 (or 2 key heads)
    per_head = (128 * 16 + 128 + 8 * (128 + 16 + 16)) * 4
    assert d1.state_bytes() == 2 * (4 * per_head + 8)
    assert d2.state_bytes() == 2 * (2 * per_head + 8)
    with pytest.raises(GenerationError, match="causal LM"):
        RecurrentDecoder(minilm)
    with pytest.raises(GenerationError, match="prefill"):
        RecurrentDecoder(p).step(ids[:, 0])


# ---- artifact, composition, CLI ------------------------------------------------------------------------
@pytest.mark.slow
def test_compile_linearize_then_gptq_roundtrip(llama_dir, tmp_path):
    cm = lowc.compile(llama_dir, target="ref-w4a16", calib=VALID, calib_samples=2, seq_len=48, progress=False,
                      passes=["linearize{window=16,lora_rank=2,lora_epochs=1,epochs=1}", "gptq{group_size=32}"])
    names = [r["name"] for r in cm.manifest["passes"]]
    assert names[:2] == ["linearize", "gptq"] and cm.manifest["passes"][1]["stats"]["quantized"] == 14
    assert any("LoRA rank 2" in line for line in cm.manifest["log"])
    assert len(_la_nodes(cm.program)) == 2 and not _ops(cm.program, SDPA)
    quantized = [r["layer"] for r in cm.layers() if r["scheme"]]
    assert "model.layers.0.self_attn.q_proj" in quantized
    path = cm.save(tmp_path / "art")
    cm2 = lowc.load(path)
    assert cm2.program.attr("model.layers.0.self_attn.fq_weight").shape == (4, 16, 64)
    ids = torch.randint(0, 256, (2, 24))
    torch.testing.assert_close(cm2(ids).logits, cm(ids).logits, rtol=0, atol=0)
    assert torch.equal(_recurrent(cm2, ids[:, :5], 24), _parallel(cm2, ids[:, :5], 24))


@pytest.mark.slow
def test_cli_compile_and_generate(llama_dir, tmp_path):
    out = tmp_path / "lin"
    res = run_lowc("compile", llama_dir, "--target", "ref-w4a16", "-o", out, "--calib", VALID, "--calib-samples", 2,
                   "--seq-len", 48, "--pass", "linearize{method=hedgehog,epochs=1}", "--pass", "gptq{group_size=32}", "-q")
    assert res.returncode == 0, res.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert [p["name"] for p in m["passes"]][:2] == ["linearize", "gptq"]
    assert any("attention-output MSE" in line for line in m["log"])
    res = run_lowc("generate", out, "--prompt", "The river", "--max-new-tokens", 10, "--check", "--json")
    assert res.returncode == 0, res.stderr
    r = json.loads(res.stdout)
    assert r["matches_parallel"] is True and r["linear_layers"] == 2 and r["softmax_layers"] == 0
    assert r["state_bytes_first"] == r["state_bytes_last"]
    res = run_lowc("compile", llama_dir, "--target", "ref-fp32", "-o", tmp_path / "y", "--pass", "linearize{method=performer}")
    assert res.returncode == 2 and "method='performer': choose one of hedgehog, lolcats" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "y").exists()


# ---- options and bad input ---------------------------------------------------------------------------------
def test_options_round_trip_and_validation():
    from lowc.passes.options import from_json

    p = parse_pass("linearize{method=lolcats,layers=[0,model.layers.1*],window=32,feature_dim=32,lora_rank=0}")
    q = parse_pass("linearize{lora_batch=4,lora_schedule=cosine}")
    assert (q.lora_batch, q.lora_schedule) == (4, "cosine") and parse_pass(q.spelling()) == q
    assert p == Linearize(layers=("0", "model.layers.1*"), window=32, feature_dim=32, lora_rank=0)
    assert parse_pass(p.spelling()) == p and from_json(json.loads(json.dumps(p.to_json()))) == p
    assert Linearize().eff_window == 64 and Linearize().eff_lora_rank == 8 and Linearize().eff_feature_dim(32) == 64
    h = Linearize(method="hedgehog")
    assert h.eff_window == 0 and h.eff_lora_rank == 0 and h.eff_feature_dim(32) == 32
    for spelling, match in [("linearize{method=performer}", "choose one of hedgehog, lolcats"),
                            ("linearize{method=hedgehog,window=64}", "hedgehog is plain linear attention"),
                            ("linearize{window=-1}", "window=-1"), ("linearize{feature_dim=0}", "feature_dim=0"),
                            ("linearize{lr=0}", "learning rates"), ("linearize{lora_rank=-2}", "lora_rank=-2"),
                            ("linearize{layers=[-1]}", "block indices"), ("linearize{lora_epochs=0}", "lora_epochs=0"),
                            ("linearize{lora_batch=0}", "lora_batch=0"),
                            ("linearize{lora_schedule=linear}", "choose one of constant, cosine"),
                            ("linearize{heads=2}", "unknown option")]:
        with pytest.raises(PassOptionError, match=match):
            parse_pass(spelling)


@pytest.mark.slow
def test_bad_input(llama, llama_dir):
    with pytest.raises(CalibrationError, match="pass 'linearize' needs calibration data"):
        lowc.compile(llama_dir, passes=["linearize"], progress=False)
    with pytest.raises(PassError, match=r"window=64 >= calibration length 48"):
        _run(llama, "linearize{epochs=1}")

    class NoAttention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(50, 16)
            self.proj = torch.nn.Linear(16, 50)

        def forward(self, ids):
            return self.proj(self.emb(ids))

    m = lowc.trace(NoAttention(), (torch.randint(0, 50, (1, 8)),))
    calib = load_calibration([torch.randint(0, 50, (1, 16))])
    with pytest.raises(PassError, match="the model has no softmax attention"):
        run_passes(m, [Linearize(method="hedgehog")], PassContext(calib=calib, progress=False))
