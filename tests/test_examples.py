"""examples/: the tiny-Llama training script runs end to end (with tiny settings) and its output is a
model lowc compiles; bad input fails with one line and a non-zero exit."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

#: trains a model in a subprocess: `-m "not slow"` leaves it to CI
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "train_tiny_llama.py")
TINY = ["--vocab", "320", "--hidden", "64", "--layers", "2", "--heads", "2", "--kv-heads", "1", "--intermediate", "128",
        "--seq-len", "32", "--batch", "2", "--steps", "60", "--warmup", "5", "--lr", "1e-2", "--eval-windows", "8", "-q"]


def run(*args):
    return subprocess.run([sys.executable, SCRIPT, *map(str, args)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "tl"
    r = run("--out", out, *TINY)
    assert r.returncode == 0, r.stderr[-2000:]
    return str(out), r


def test_training_writes_a_hf_directory_and_learns(trained):
    out, r = trained
    assert f"{out}:" in r.stdout and "test ppl" in r.stdout
    for name in ("config.json", "model.safetensors", "tokenizer.json", "training.json"):
        assert os.path.isfile(os.path.join(out, name)), name
    with open(os.path.join(out, "training.json")) as f:
        report = json.load(f)
    assert report["model"]["num_key_value_heads"] == 1 and report["model"]["num_attention_heads"] == 2
    curve = report["curve"]
    # 60 steps on real text: the held-out loss falls well below a uniform guess over the vocabulary
    assert curve[-1]["heldout_loss"] < math.log(320) - 1.0
    assert math.isfinite(report["test_ppl"]) and report["test_ppl"] < 320
    assert report["tokens"]["test"] > 0  # test.txt is evaluated, never trained on
    assert not os.path.exists(out + ".tmp")


def test_trained_model_compiles_with_lowc(trained):
    import torch

    import lowc

    out, _ = trained
    cm = lowc.compile(out, target="ref-w4a16", progress=False)
    ids = cm.tokenizer("The river flooded the valley .", return_tensors="pt")["input_ids"]
    logits = cm(ids).logits
    assert logits.shape[-1] == 320 and torch.isfinite(logits).all()


def test_existing_output_needs_force(trained):
    out, _ = trained
    r = run("--out", out, *TINY)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == f"error: {out} exists: pass --force to replace it"


def test_missing_data_is_one_clear_line(tmp_path):
    r = run("--out", tmp_path / "x", "--data", tmp_path / "nowhere", *TINY)
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: {tmp_path / 'nowhere' / 'valid.txt'} does not exist (pass --data DIR holding valid.txt and test.txt)"
    assert not os.path.exists(tmp_path / "x")
