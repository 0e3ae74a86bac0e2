"""distill_ssm (MOHAWK): the distillation hooks, the graph after the pass (ssd nodes only at the chosen
layers, hybrids keep softmax elsewhere), each stage lowering its own loss, constant-state decoding
(recurrent == parallel), the artifact round trip, composition with GPTQ, options and bad input.

Model: a small Llama with grouped-query attention (4 query heads sharing 2 key/value heads, random
weights, 2 blocks). Calibration: two or three short windows of wikitext-2 valid.txt. Training budgets
are one or two passes: the tests check directions (losses fall), exactness (decode) and structure."""

from __future__ import annotations

import json

import pytest
import torch

import lowc
from conftest import VALID, make_llama_dir, run_lowc
from lowc.errors import CalibrationError, PassError, PassOptionError
from lowc.ir import printer, verifier
from lowc.ir.analysis import attention_subgraphs
from lowc.passes.base import PassContext
from lowc.passes.calibration import load_calibration
from lowc.passes.distill.distill_ssm import DistillSSM
from lowc.passes.distill.hooks import StudentBlock, capture
from lowc.passes.linearize import rewrite
from lowc.passes.options import from_json, parse_pass
from lowc.passes.pipeline import run_passes
from lowc.runtime import GenerationConfig, RecomputeDecoder, RecurrentDecoder, generate

SDPA = torch.ops.aten.scaled_dot_product_attention.default
SSD = "lowc.ssd.default"


def _text(chars: int = 20000) -> str:
    with open(VALID, encoding="utf-8") as f:
        return f.read(chars)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> str:
    return make_llama_dir(tmp_path_factory.mktemp("ssm-llama"), seed=3, hidden_size=64, intermediate_size=128,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def llama(llama_dir):
    return lowc.trace(llama_dir)


def _calib(program, n=2, seq_len=32):
    from lowc.api import tokenizer_of

    return load_calibration([_text()], tokenizer_of(program), n, seq_len, seed=0)


def _run(program, spelling, calib=None):
    p = program.clone()
    c = PassContext(calib=calib if calib is not None else _calib(program), progress=False)
    rec = run_passes(p, [parse_pass(spelling)], c)[0]
    return p, rec.result, c


def _ssd_nodes(p):
    return [n for n in p.graph.nodes if n.op == "call_function" and str(n.target) == SSD]


def _sdpa_layers(p):
    return [n.meta["lowc"].layer for n in p.graph.nodes if n.op == "call_function" and n.target is SDPA]


# ---- hooks --------------------------------------------------------------------------------------------
def test_hooks_capture_and_replay_are_the_teachers(llama):
    """The captured attention matrix reproduces the attention output; a replayed unmodified block gives
    the captured block outputs; only the chosen blocks are yielded, one at a time."""
    calib = _calib(llama)
    sites, _ = rewrite.find_sites(llama, rewrite.select(attention_subgraphs(llama), ("1",)))
    caps = []
    for cap in capture(llama, calib, sites, progress=False):
        caps.append(cap.index)
        assert list(cap.sites) == ["model.layers.1.self_attn"] and len(cap) == 2
        site = cap.sites["model.layers.1.self_attn"]
        a = site.attention(0)
        assert a.shape == (1, 4, 32, 32) and torch.allclose(a.sum(-1), torch.ones(1, 4, 32))
        assert torch.equal(a.triu(1), torch.zeros_like(a))  # causal
        v = site.v[0].repeat_interleave(4 // site.v[0].shape[1], dim=1)
        torch.testing.assert_close(a @ v, site.y[0], rtol=1e-4, atol=1e-5)
        w = "model.layers.1.self_attn.q_proj.weight"
        params = {w: llama.attr(w).detach().clone().requires_grad_(True)}
        replay = StudentBlock(llama, cap.index, params)
        for i in range(len(cap)):
            out = replay(cap, i)
            torch.testing.assert_close(out[0], cap.outputs[i][0], rtol=1e-5, atol=1e-5)
        out[0].square().mean().backward()  # the replay is differentiable in the trainable tensors only
        assert params[w].grad is not None and params[w].grad.abs().sum() > 0
    assert caps == [1]


# ---- the pass: graph, stages, idempotence -----------------------------------------------------------
@pytest.fixture(scope="module")
def hybrid(llama):
    """Layer 1 distilled with all three stages (default kernel 4), layer 0 kept softmax."""
    return _run(llama, "distill_ssm{layers=[1],epochs=[2,2,2]}")


def test_graph_stages_lower_their_losses_and_idempotence(llama, hybrid):
    p, res, ctx = hybrid
    st = res.stats
    assert res.changed and st["distilled"] == 1 and st["layers"] == ["model.layers.1.self_attn"]
    for stage in ("stage1", "stage2", "stage3"):
        assert st[stage]["after"] < st[stage]["before"], (stage, st[stage])
    assert st["stage1"]["loss"] == "frobenius" and st["stage3"]["loss"] == "kl"
    assert any("stage 1 model.layers.1.self_attn" in line for line in ctx.log)
    assert _sdpa_layers(p) == ["model.layers.0.self_attn"]  # the hybrid keeps layer 0's softmax
    (node,) = _ssd_nodes(p)
    assert node.args[1].meta["val"].shape[1] == 2  # B read from the 2 key/value heads (GQA groups)
    text = printer.format_program(p)
    torch.testing.FileCheck() \
        .check("%key_mask = aten.ne.Scalar(%attention_mask, 0)") \
        .check("aten.scaled_dot_product_attention").check("block=0") \
        .check("%ssd_c_mul = aten.mul.Tensor(").check("0.25").check("role=ssd_in block=1") \
        .check("aten.linear.default(").check("@model.layers.1.self_attn.ssd_dt_weight").check("role=ssd_decay") \
        .check("aten.softplus.default").check("aten.exp.default(@model.layers.1.self_attn.ssd_A_log)") \
        .check(f"%ssd = {SSD}(").check("@model.layers.1.self_attn.ssd_D, @model.layers.1.self_attn.ssd_conv_c, ") \
        .check("@model.layers.1.self_attn.ssd_conv_x, %key_mask, 64)").check("role=ssd block=1") \
        .check("self_attn.o_proj.weight").check_not("scaled_dot_product_attention").run(text)
    verifier.verify(p)
    again = run_passes(p, [parse_pass("distill_ssm{layers=[1]}")], PassContext(calib=ctx.calib, progress=False))[0]
    assert again.result.changed is False
    # the trained weights are in the program; the input model is untouched
    q = "model.layers.1.self_attn.q_proj.weight"
    assert not torch.equal(p.attr(q), llama.attr(q))
    assert torch.equal(p.attr("model.layers.0.self_attn.q_proj.weight"), llama.attr("model.layers.0.self_attn.q_proj.weight"))


def test_stage_alone_and_identity_init(llama):
    """Untrained, the student is the decayed linear attention of q·scale, k, v (convs identity, D = 0);
    stage 2 runs alone (no stage-1 capture of q/k/v)."""
    p0, res0, _ = _run(llama, "distill_ssm{layers=[0],stages=[1],epochs=[0,0,0]}")
    assert res0.stats["stage1"]["before"] == res0.stats["stage1"]["after"] and "stage2" not in res0.stats
    w = p0.attr("model.layers.0.self_attn.ssd_conv_x")
    assert w.shape == (2, 16, 4) and torch.equal(w[..., -1], torch.ones(2, 16)) and not w[..., :-1].any()
    assert not p0.attr("model.layers.0.self_attn.ssd_D").any()
    _, res, _ = _run(llama, "distill_ssm{layers=[0],stages=[2],epochs=[0,1,0],kernel=0}")
    assert set(res.stats) >= {"stage2"} and not {"stage1", "stage3"} & set(res.stats)
    assert res.stats["stage2"]["after"] < res.stats["stage2"]["before"]


# ---- decode, artifact, composition ---------------------------------------------------------------------
def test_recurrent_decode_matches_parallel_with_padding(hybrid):
    p = hybrid[0]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (2, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    sizes = []
    rec = generate(RecurrentDecoder(p), ids, GenerationConfig(max_new_tokens=12), attention_mask=mask,
                   on_token=lambda i, d: sizes.append((d.state_bytes(), d.kv_cache_bytes())))
    par = generate(RecomputeDecoder(p), ids, GenerationConfig(max_new_tokens=12), attention_mask=mask)
    assert torch.equal(rec, par)
    # layer 1's state: ssm [2, 4, 16, 16] + conv histories (C [2,4,16,3], B and x [2,2,16,3]), fp32
    assert {s for s, _ in sizes} == {(2 * 4 * 16 * 16 + 2 * 4 * 16 * 3 + 2 * 2 * 2 * 16 * 3) * 4}
    assert sizes[-1][1] > sizes[0][1]  # layer 0 is softmax: its KV cache grows
    dec = RecurrentDecoder(p)
    assert (dec.linear_layers, dec.softmax_layers) == (1, 1)


@pytest.mark.slow
def test_cli_distill_then_gptq_reload_and_generate_check(llama_dir, tmp_path):
    """The issue's done-when: compile (composed with GPTQ afterwards), reload, decode with constant state."""
    out = tmp_path / "ssm"
    res = run_lowc("compile", llama_dir, "--target", "ref-w4a16", "-o", out, "--calib", VALID, "--calib-samples", 2,
                   "--seq-len", 24, "--pass", "distill_ssm{layers=[0,1],epochs=[1,1,1],kernel=2}",
                   "--pass", "gptq{group_size=32}", "-q")
    assert res.returncode == 0, res.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert [p["name"] for p in m["passes"]][:2] == ["distill_ssm", "gptq"]
    assert {"stage1", "stage2", "stage3"} <= set(m["passes"][0]["stats"])
    assert any("stage 3 (end-to-end KL" in line for line in m["log"])
    quantized = {r["layer"] for r in m["layers"] if r.get("scheme")}
    assert {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.ssd_dt"} <= quantized
    res = run_lowc("generate", out, "--prompt", "The river", "--max-new-tokens", 8, "--check", "--json")
    assert res.returncode == 0, res.stderr
    r = json.loads(res.stdout)
    assert r["matches_parallel"] is True and (r["linear_layers"], r["softmax_layers"]) == (2, 0)
    assert r["strategy"] == "recurrent" and r["state_bytes_first"] == r["state_bytes_last"] > 0


# ---- options and bad input ---------------------------------------------------------------------------------
def test_options_round_trip_and_validation():
    p = parse_pass("distill_ssm{layers=[0,model.layers.1*],stages=[1,3],epochs=[1,2,3],lr=[0.01,0.001,0.0001],kernel=2}")
    assert p == DistillSSM(layers=("0", "model.layers.1*"), stages=(1, 3), epochs=(1, 2, 3), lr=(0.01, 0.001, 0.0001),
                           kernel=2)
    assert parse_pass(p.spelling()) == p and from_json(json.loads(json.dumps(p.to_json()))) == p
    for spelling, match in [("distill_ssm{stages=[]}", r"stages=\[\]: give a subset of \[1,2,3\]"),
                            ("distill_ssm{stages=[1,4]}", "unknown stage 4"),
                            ("distill_ssm{stages=[2,2]}", "listed twice"),
                            ("distill_ssm{epochs=[1,1]}", "three counts"), ("distill_ssm{lr=[1,0,1]}", "positive"),
                            ("distill_ssm{kernel=-1}", "kernel=-1"), ("distill_ssm{layers=[-1]}", "block indices"),
                            ("distill_ssm{heads=2}", "unknown option")]:
        with pytest.raises(PassOptionError, match=match):
            parse_pass(spelling)


def test_bad_input(llama, tmp_path):
    with pytest.raises(CalibrationError, match="pass 'distill_ssm' needs calibration data"):
        lowc.compile(str(tmp_path / "no-such-model"), passes=["distill_ssm"], progress=False)  # before loading
    calib = load_calibration([torch.randint(0, 256, (1, 16))])
    with pytest.raises(PassError) as e:
        run_passes(llama.clone(), [parse_pass("distill_ssm{layers=[0,5]}")], PassContext(calib=calib, progress=False))
    assert str(e.value) == ("pass 'distill_ssm': layers=5: no attention at layer index 5 "
                            "(this model's attention layers: 0..1)")


def test_encoder_is_refused_naming_the_layer():
    m = lowc.trace("minilm")
    calib = load_calibration([torch.randint(0, 1000, (1, 16))])
    with pytest.raises(PassError, match=r"layer encoder\.layer\.0\.attention\.self: its attention is bidirectional"):
        run_passes(m, [DistillSSM()], PassContext(calib=calib, progress=False))
