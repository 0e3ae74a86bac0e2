"""The core spine's "done when": a Llama-style HF directory no other test uses, with odd sizes
(hidden 96, intermediate 200, 3 query heads sharing 1 KV head), compiles from the CLI to every
ref-* target, reloads in a fresh process, and matches the float model within each scheme's error
floor; MiniLM (the real pretrained encoder) compiles too."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import make_llama_dir, run_lowc
from lowc import evaluate as ev

#: real-model compiles and fresh-process reloads (~2 min): `-m "not slow"` leaves them to CI
pytestmark = pytest.mark.slow

# (min SQNR dB of logits, max mean KL) vs float, measured on this fixture with margin: see README
FLOORS = {
    "ref-fp32": (float("inf"), 0.0),
    "ref-w8a16": (28.0, 1e-4),
    "ref-w4a16": (8.0, 0.01),
    "ref-w8a8": (26.0, 1e-4),
    "ref-w4a4": (5.0, 0.02),
}

RELOAD = r"""
import sys, torch, lowc
from safetensors.torch import save_file, load_file
inp = load_file(sys.argv[1])
outs = {}
for path in sys.argv[3:]:
    cm = lowc.load(path)
    outs[path.rsplit("/", 1)[-1]] = cm(inp["input_ids"], attention_mask=inp["attention_mask"]).logits.contiguous()
save_file(outs, sys.argv[2])
"""


@pytest.fixture(scope="module")
def unseen_llama(tmp_path_factory):
    return make_llama_dir(tmp_path_factory.mktemp("unseen"), seed=7, hidden_size=96, intermediate_size=200,
                          num_hidden_layers=3, num_attention_heads=3, num_key_value_heads=1)


def test_every_ref_target_from_cli_reloads_in_fresh_process(unseen_llama, tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    outs = {}
    for t in FLOORS:
        out = tmp_path / t
        res = run_lowc("compile", unseen_llama, "--target", t, "-o", out, "-q")
        assert res.returncode == 0, res.stderr
        outs[t] = out
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 259, (3, 37), generator=g)  # batch and length unlike the capture's example
    mask = torch.ones_like(ids)
    mask[1, 25:] = 0  # right padding in one row
    save_file({"input_ids": ids, "attention_mask": mask}, str(tmp_path / "in.safetensors"))
    res = subprocess.run([sys.executable, "-c", RELOAD, tmp_path / "in.safetensors", tmp_path / "out.safetensors",
                          *map(str, outs.values())], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    got = load_file(str(tmp_path / "out.safetensors"))

    model = AutoModelForCausalLM.from_pretrained(unseen_llama).eval()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    valid = mask.bool()
    for t, (min_sqnr, max_kl) in FLOORS.items():
        logits = got[t]
        assert logits.shape == ref.shape
        if t == "ref-fp32":
            assert torch.equal(logits, ref), "ref-fp32 must reproduce the model exactly"
            continue
        c = ev.compare(lambda **k: ref[valid], lambda **k: logits[valid], [{}], "causal-lm")
        assert c.sqnr_db >= min_sqnr, (t, c)
        assert c.kl <= max_kl, (t, c)
        m = json.loads((outs[t] / "manifest.json").read_text())
        down = [r for r in m["layers"] if r["layer"].endswith("down_proj")]
        assert down and all(r["scheme"] for r in down), "every block linear is quantized"
        assert [r for r in m["layers"] if r["layer"] == "lm_head"][0]["scheme"] is None  # ignored by default


@pytest.mark.parametrize("target,floor", [("ref-w8a16", 0.995), ("ref-w4a16", 0.93)])
def test_minilm_compiles_and_keeps_embeddings(tmp_path, target, floor):
    out = tmp_path / "m"
    res = run_lowc("compile", "minilm", "--target", target, "-o", out, "-q")
    assert res.returncode == 0, res.stderr
    res = run_lowc("eval", out, "--json")
    assert res.returncode == 0, res.stderr
    r = json.loads(res.stdout)
    assert r["kind"] == "encoder" and r["sentences"] == len(ev.SENTENCES)
    assert r["cosine"] >= floor, r
    assert r["bytes"] < r["float_bytes"]
