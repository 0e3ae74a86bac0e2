"""lowc.runtime: the token loop (greedy, sampling, EOS), the three decoding strategies and ``auto``,
``CompiledModel.generate`` on a quantized and a linearized Llama, ``lowc generate`` through the
installed entry point, and the runtime's place in the layers.

Models: the ``tiny-llama`` preset compiled for ``ref-w4a16`` (random weights, RTN), and a small
Llama linearized cheaply (LoLCATs, window 8, one epoch on 2 x 48 tokens of wikitext-2 valid). The loop
itself is tested with a scripted decoder whose logits name the next token."""

from __future__ import annotations

import ast
import json
import os

import pytest
import torch
import torch.nn.functional as F

import lowc
from conftest import VALID, make_llama_dir, run_lowc
from lowc.errors import GenerationError
from lowc.runtime import (STRATEGIES, GenerationConfig, RecomputeDecoder, RecurrentDecoder, Sampler, filter_logits,
                          generate, make_decoder)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IDS = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(0))
MASK = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])  # the second prompt is left-padded


@pytest.fixture(scope="module")
def w4():
    return lowc.compile("tiny-llama", "ref-w4a16", progress=False)


@pytest.fixture(scope="module")
def linearized(tmp_path_factory):
    d = make_llama_dir(tmp_path_factory.mktemp("rt-llama"), seed=3, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    return lowc.compile(d, "ref-fp32", calib=VALID, calib_samples=2, seq_len=48, progress=False,
                        passes=["linearize{window=8,lora_rank=0,epochs=1}"])


class Scripted:
    """A decoder whose logits make ``script[b, t]`` the most likely token at step ``t``; records what it is fed."""

    def __init__(self, script, vocab: int = 12):
        self.script, self.vocab = torch.tensor(script), vocab

    def prefill(self, ids, mask=None):
        self.t, self.fed = 0, []
        return self._logits()

    def step(self, tokens):
        self.fed.append(tokens.tolist())
        self.t += 1
        return self._logits()

    def _logits(self):
        return F.one_hot(self.script[:, self.t], self.vocab).float() * 5


# ---- the loop: EOS, lengths ----------------------------------------------------------------------------
def test_eos_stops_each_sequence_and_the_loop():
    dec = Scripted([[3, 4, 9, 5, 5, 5], [3, 9, 1, 1, 1, 1]])
    prompt = torch.tensor([[1, 2], [1, 2]])
    out = generate(dec, prompt, GenerationConfig(max_new_tokens=6, eos_token_id=9, pad_token_id=0))
    # the second sequence stops at step 1 and is padded; the loop ends when the first one stops
    assert out.tolist() == [[1, 2, 3, 4, 9], [1, 2, 3, 9, 0]]
    assert dec.fed == [[3, 3], [4, 9]]  # tokens up to the last step are fed (EOS included); the pad only after it
    early = Scripted([[3, 4, 5, 9, 1], [9, 1, 1, 1, 1]])
    out = generate(early, prompt, GenerationConfig(max_new_tokens=6, eos_token_id=9, pad_token_id=0))
    assert out.tolist() == [[1, 2, 3, 4, 5, 9], [1, 2, 9, 0, 0, 0]] and early.fed == [[3, 9], [4, 0], [5, 0]]
    # several EOS ids; the pad defaults to the first
    out = generate(dec, prompt, GenerationConfig(max_new_tokens=6, eos_token_id=[4, 9]))
    assert out.tolist() == [[1, 2, 3, 4], [1, 2, 3, 9]]
    # no EOS: exactly max_new_tokens; max_new_tokens=0: the prompt
    assert generate(dec, prompt, GenerationConfig(max_new_tokens=5)).shape == (2, 7)
    assert torch.equal(generate(dec, prompt, GenerationConfig(max_new_tokens=0)), prompt)
    seen = []
    generate(dec, prompt, GenerationConfig(max_new_tokens=4), on_token=lambda i, d: seen.append((i, d is dec)))
    assert seen == [(0, True), (1, True), (2, True), (3, True)]


def test_eos_on_a_compiled_model(w4):
    full = w4.generate(IDS[:1], 8, eos_token_id=None)
    eos = int(full[0, 6 + 3])  # make the 4th generated token the end of sequence
    first = int((full[0, 6:] == eos).nonzero()[0])
    out = w4.generate(IDS[:1], 8, eos_token_id=eos)
    assert torch.equal(out, full[:, :6 + first + 1])


# ---- sampling -------------------------------------------------------------------------------------------
def test_filter_logits_top_k_and_nucleus():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = lambda **kw: torch.isfinite(filter_logits(logits, **kw)).nonzero()[:, 1].tolist()  # noqa: E731
    assert kept(top_k=2) == [0, 1] and kept(top_k=10) == [0, 1, 2, 3]
    assert kept(top_p=0.5) == [0] and kept(top_p=0.7) == [0, 1] and kept(top_p=0.81) == [0, 1, 2]
    assert kept(top_p=0.01) == [0] and kept(top_p=1.0) == [0, 1, 2, 3]
    assert kept(top_k=3, top_p=0.7) == [0, 1]
    # the order of the vocabulary does not matter
    perm = torch.tensor([2, 0, 3, 1])
    assert torch.isfinite(filter_logits(logits[:, perm], top_p=0.7)).nonzero()[:, 1].tolist() == [1, 3]
    torch.testing.assert_close(filter_logits(logits, temperature=0.5), logits * 2)


def test_sampler_draws_only_from_the_nucleus_and_is_seeded():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().expand(4000, 4)
    draw = lambda **kw: Sampler(GenerationConfig(do_sample=True, **kw))(logits)  # noqa: E731
    assert set(draw(seed=0).tolist()) == {0, 1, 2, 3}
    nucleus = draw(seed=0, top_p=0.7)
    assert set(nucleus.tolist()) == {0, 1}
    assert abs((nucleus == 0).float().mean().item() - 0.5 / 0.8) < 0.03  # renormalised over the nucleus
    assert set(draw(seed=1, top_k=1).tolist()) == {0}
    assert torch.equal(draw(seed=7), draw(seed=7)) and not torch.equal(draw(seed=7), draw(seed=8))
    assert set(draw(seed=0, temperature=0).tolist()) == {0}  # temperature 0 = greedy


def test_sampling_on_a_compiled_model(w4):
    greedy = w4.generate(IDS, 10, attention_mask=MASK, eos_token_id=None)
    sample = lambda **kw: w4.generate(IDS, 10, attention_mask=MASK, eos_token_id=None, do_sample=True, **kw)  # noqa
    assert torch.equal(sample(seed=5), sample(seed=5))  # seeded: deterministic
    assert not torch.equal(sample(seed=5), sample(seed=6))
    assert not torch.equal(sample(seed=5), greedy)
    assert torch.equal(sample(seed=5, temperature=1e-6), greedy)  # temperature -> 0 is greedy
    assert torch.equal(sample(seed=5, temperature=0), greedy)
    assert torch.equal(sample(seed=5, top_k=1), greedy)
    assert torch.equal(sample(seed=5, top_p=1e-6), greedy)  # a nucleus of one token
    # the same seed gives the same tokens whatever the strategy (their logits agree)
    assert torch.equal(sample(seed=9, top_p=0.9, strategy="kv-cache"), sample(seed=9, top_p=0.9, strategy="recompute"))


@pytest.mark.parametrize("bad, msg", [
    (dict(temperature=-1.0), "temperature must be >= 0"), (dict(top_k=0), "top_k must be an integer >= 1"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"), (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(max_new_tokens=-1), "max_new_tokens must be an integer >= 0"), (dict(seed=1.5), "seed must be an integer"),
    (dict(eos_token_id=-3), "token ids must be integers >= 0"),
])
def test_generation_config_validation(bad, msg):
    with pytest.raises(GenerationError, match=msg):
        GenerationConfig(**bad)


# ---- strategies and CompiledModel.generate -------------------------------------------------------------
def test_quantized_model_all_strategies_agree(w4):
    dec = w4.decoder("auto")
    assert dec.strategy == "static-kv" and "only linear layers were replaced in a Llama" in dec.reason
    assert (dec.linear_layers, dec.softmax_layers) == (0, 4)
    outs = {s: w4.generate(IDS, 12, attention_mask=MASK, strategy=s, eos_token_id=None) for s in STRATEGIES}
    assert outs["auto"].shape == (2, 18) and torch.equal(outs["auto"][:, :6], IDS)
    for s, out in outs.items():
        assert torch.equal(out, outs["recompute"]), s
    # the decoder is kept between calls, its caches are not
    assert w4.decoder("kv-cache") is w4.decoder("kv-cache") and w4.decoder("kv-cache").cache is None


def test_compiled_model_generate_text_prompts(w4):
    tok = w4.tokenizer
    ids = tok("The river", return_tensors="pt")["input_ids"]
    out = w4.generate("The river", 6, eos_token_id=None)
    assert torch.equal(out, w4.generate(ids, 6, eos_token_id=None))
    assert torch.equal(w4.generate(ids[0], 6, eos_token_id=None), out)  # [L] is one sequence
    text = w4.generate_text("The river", 6, eos_token_id=None)
    assert isinstance(text, str) and text == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    batch = w4.generate(["The river", "A"], 4, eos_token_id=None)  # left-padded
    assert batch.shape == (2, ids.shape[1] + 4) and torch.equal(batch[:1], out[:, :ids.shape[1] + 4])
    with pytest.raises(GenerationError, match="attention_mask goes with token ids"):
        w4.generate("The river", 2, attention_mask=torch.ones(1, 9))
    with pytest.raises(GenerationError, match=r"input_ids must be integer token ids \[batch, length\]"):
        w4.generate(torch.zeros(1, 4), 2)
    with pytest.raises(GenerationError, match="eos_token_id must be 'model', an id, a list of ids or None"):
        w4.generate(ids, 2, eos_token_id="</s>")
    with pytest.raises(GenerationError, match="unknown decoding strategy 'beam'"):
        w4.generate(ids, 2, strategy="beam")


def test_linearized_model_decodes_recurrently(linearized):
    dec = linearized.decoder("auto")
    assert isinstance(dec, RecurrentDecoder) and "2 linearized attention layer(s)" in dec.reason
    sizes = []
    out = linearized.generate(IDS, 16, attention_mask=MASK, eos_token_id=None,
                              on_token=lambda i, d: sizes.append(d.state_bytes() + d.kv_cache_bytes()))
    assert torch.equal(out, linearized.generate(IDS, 16, attention_mask=MASK, eos_token_id=None, strategy="recompute"))
    assert len(set(sizes)) == 1 and sizes[0] > 0  # constant-size state, no KV cache
    a = linearized.generate(IDS, 16, attention_mask=MASK, do_sample=True, seed=3, top_k=20)
    assert torch.equal(a, linearized.generate(IDS, 16, attention_mask=MASK, do_sample=True, seed=3, top_k=20,
                                              strategy="recompute"))
    with pytest.raises(GenerationError, match="linear_attention.*which a Hugging Face rebuild cannot hold"):
        linearized.decoder("kv-cache")


def test_strategy_choice_and_refusals(w4):
    minilm = lowc.compile("minilm", "ref-fp32", progress=False)
    with pytest.raises(GenerationError, match="needs a causal LM; this program is a 'encoder' model"):
        make_decoder(minilm)
    with pytest.raises(GenerationError, match="needs a causal LM"):
        minilm.generate(torch.tensor([[1, 2]]), 2)
    # a causal LM the rebuild cannot hold (no hf_config): auto says why and decodes recurrently
    p = w4.program.clone()
    p.info.hf_config = None
    dec = make_decoder(p)
    assert dec.strategy == "recurrent" and "no kv-cache: " in dec.reason and "without an hf_config" in dec.reason
    with pytest.raises(GenerationError, match="without an hf_config"):
        make_decoder(p, "kv-cache")
    assert torch.equal(generate(dec, IDS, GenerationConfig(max_new_tokens=5)),
                       generate(RecomputeDecoder(p), IDS, GenerationConfig(max_new_tokens=5)))
    with pytest.raises(GenerationError, match=r"call prefill\(prompt\) before step\(\)"):
        RecomputeDecoder(p).step(torch.tensor([1, 2]))


# ---- the command line --------------------------------------------------------------------------------
def test_cli_generate(w4, tmp_path):
    from lowc.cli import STRATEGY_CHOICES

    assert STRATEGY_CHOICES == STRATEGIES
    art = w4.save(tmp_path / "w4")
    res = run_lowc("generate", art, "--prompt", "The river", "--max-new-tokens", 8, "--check", "--json")
    assert res.returncode == 0, res.stderr
    r = json.loads(res.stdout)
    assert r["strategy"] == "static-kv" and r["matches_parallel"] is True and r["softmax_layers"] == 4
    assert r["new_tokens"] <= 8 and r["prompt_tokens"] == 9 and r["state_bytes_last"] > r["state_bytes_first"]
    assert "sampling" not in r
    sampled = ["generate", art, "--prompt", "The river", "--max-new-tokens", 8, "--sample", "--seed", 3,
               "--top-p", 0.9, "--temperature", 0.8, "--json", "--check", "--ignore-eos", "--strategy", "recurrent"]
    r1 = json.loads(run_lowc(*sampled).stdout)
    # the same seed draws the same tokens in another process: here, through the API on the saved artifact
    cm = lowc.load(art)
    ids = cm.tokenizer("The river", return_tensors="pt")["input_ids"]
    again = cm.generate(ids, 8, strategy="recurrent", do_sample=True, temperature=0.8, top_p=0.9, seed=3, eos_token_id=None)
    assert r1["text"] == cm.tokenizer.decode(again[0, ids.shape[1]:])
    assert r1["new_tokens"] == 8 and r1["matches_parallel"] is True
    assert r1["strategy"] == "recurrent" and r1["sampling"] == {"temperature": 0.8, "top_k": None, "top_p": 0.9, "seed": 3}
    res = run_lowc("generate", art, "--prompt", "The river", "--max-new-tokens", 3)  # plain text out
    assert res.returncode == 0 and res.stdout.startswith("The river") and "static-kv" in res.stderr
    res = run_lowc("generate", art, "--prompt", "x", "--temperature", 0.5)
    assert res.returncode == 2 and "add --sample" in res.stderr and "Traceback" not in res.stderr
    res = run_lowc("generate", art, "--prompt", "x", "--strategy", "beam")
    assert res.returncode == 2 and "'beam' is not one of" in res.stderr


# ---- layering --------------------------------------------------------------------------------------------
def test_runtime_imports_only_lower_layers():
    allowed = ("lowc.ir", "lowc.errors", "lowc.frontend", "lowc.runtime")
    folder = os.path.join(REPO, "compiler", "runtime")
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".py"):
            continue
        tree = ast.parse(open(os.path.join(folder, name), encoding="utf-8").read())
        for node in ast.walk(tree):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            for m in mods:
                if m == "lowc" or m.startswith("lowc."):
                    assert m.startswith(allowed), f"runtime/{name} imports {m}"
    for old in ("passes/linearize/decode.py", "backends/triton/decode.py", "ir/dialect/linear_attention_state.py"):
        assert not os.path.exists(os.path.join(REPO, old)), old
