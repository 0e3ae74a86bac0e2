"""Smoke test of ``benchmarks/quality.py`` (the quality table harness) on a tiny random Llama: two
cells (float, RTN W4A16) with one calibration sample, so the harness cannot silently rot. The numbers
themselves are meaningless here; the real table is run by hand (see the README's Quality section)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

from conftest import make_llama_dir

#: runs the benchmark harness in subprocesses: `-m "not slow"` leaves it to CI
pytestmark = pytest.mark.slow

ROOT = os.path.join(os.path.dirname(__file__), "..")
SCRIPT = os.path.join(ROOT, "benchmarks", "quality.py")


def _load():
    spec = importlib.util.spec_from_file_location("quality_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    llama = make_llama_dir(tmp_path_factory.mktemp("q-llama"), seed=0, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    results = str(tmp_path_factory.mktemp("q-results"))
    args = ["--llama", llama, "--results", results, "--models", "llama", "--schemes", "w4a16", "--calib-samples", "1",
            "--seq-len", "32", "--eval-windows", "2", "--eval-seq-len", "32", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    p = subprocess.run([sys.executable, SCRIPT, *args, "--methods", "float,rtn"], capture_output=True, text=True,
                       env=env, timeout=300)
    return p, args, results, env


def test_cells_and_table(run):
    p, _, results, _ = run
    assert p.returncode == 0, p.stderr[-3000:]
    assert "[2/2] llama rtn w4a16: done" in p.stdout
    data = json.load(open(os.path.join(results, "quality.json")))
    cells = {(c["method"], c["scheme"]): c for c in data["cells"]}
    assert set(cells) == {("float", "-"), ("rtn", "w4a16")}
    assert all(c["status"] == "ok" for c in cells.values())
    rtn = cells["rtn", "w4a16"]
    assert rtn["target"] == "ref-w4a16" and rtn["passes"] == ["rtn"]
    assert rtn["calibration"]["samples"] == 1 and rtn["calibration"]["seq_len"] == 32
    assert math.isfinite(rtn["metrics"]["ppl"]) and rtn["metrics"]["kl"] >= 0 and 0 <= rtn["metrics"]["top1"] <= 1
    assert rtn["metrics"]["tokens"] == 64 and rtn["compile_s"] > 0 and rtn["peak_rss_mib"] > rtn["rss_increase_mib"] > 0
    md = open(os.path.join(results, "quality.md")).read()
    assert f"| float | {cells['float', '-']['metrics']['ppl']:.2f} |" in md
    assert f"| RTN | {rtn['metrics']['ppl']:.2f} ({rtn['metrics']['kl']:.4f}) | not run |" in md
    assert "Commands: `python benchmarks/quality.py --llama" in md and "1 samples × 32 tokens" in md


def test_resume_keeps_cells(run):
    p, args, results, env = run
    again = subprocess.run([sys.executable, SCRIPT, *args, "--methods", "rtn"], capture_output=True, text=True,
                           env=env, timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "[1/1] llama rtn w4a16: kept" in again.stdout


def test_plan_and_not_available(run, monkeypatch):
    _, args, results, _ = run
    q = _load()
    assert q.passes_for("smoothquant-rtn", "w3a16") == ["smoothquant", "rtn{bits=3}"]
    assert q.passes_for("gptq", "w4a4") == ["gptq"]
    assert q.SCHEMES["w3a16"][0] == q.SCHEMES["w4a16"][0] == "ref-w4a16"
    from lowc.passes import registry

    monkeypatch.setattr(registry, "PASSES", {k: v for k, v in registry.PASSES.items() if k != "flatquant"})
    q.render(q.parse_args([*args, "--render-only"]), "test")
    md = open(os.path.join(results, "quality.md")).read()
    assert "| FlatQuant | not available | not available | not available | not available |" in md
    assert "| GPTQ | not run |" in md


def _text(results: str, name: str) -> str:
    with open(os.path.join(results, name), encoding="utf-8") as f:
        return f.read()


def test_sparsity_table(run, monkeypatch):
    """The second table: its own cells (scheme ``sparse``), its own files; the first table's files
    stay as they were; an unregistered pass (GQSA before it lands) is "not available"."""
    _, args, results, env = run
    before = _text(results, "quality.md")
    p = subprocess.run([sys.executable, SCRIPT, *args, "--methods", "", "--sparse", "float,wanda24-gptq"],
                       capture_output=True, text=True, env=env, timeout=300, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "[2/2] llama wanda24-gptq sparse: done" in p.stdout
    assert _text(results, "quality.md") == before
    rows = {r["key"]: r for r in json.loads(_text(results, "quality_sparsity.json"))["rows"]}
    cell = rows["wanda24-gptq"]["llama"]
    assert cell["status"] == "ok" and [s["name"] for s in cell["pass_stats"]][:2] == ["prune", "gptq"]
    assert cell["pass_stats"][0]["sparsity"] == 0.5 and rows["wanda24-gptq"]["bits_per_weight"] == 3.1562
    m = cell["metrics"]
    md = _text(results, "quality_sparsity.md")
    assert (f"| 2:4 + W4 g128: Wanda, then GPTQ | `prune{{method=wanda,pattern=2:4}}` → `gptq` | 3.156 | "
            f"{m['ppl']:.2f} ({m['kl']:.4f}) | not run |") in md
    q = _load()
    from lowc.passes import registry

    monkeypatch.setattr(registry, "PASSES", {k: v for k, v in registry.PASSES.items() if k != "gqsa"})
    q.render_sparsity(q.parse_args([*args, "--render-only", "--methods", ""]), "test")
    md = _text(results, "quality_sparsity.md")
    assert ("| GQSA W4 S50 g128 (sparse groups of 16; `gqsa{sparsity=0.5}`) | `gqsa{sparsity=0.5}` | 2.594 | "
            "not available | not available |") in md
    assert "dense W2 g128 (GPTQ) | `gptq{bits=2}` | 2.141 | not run |" in md
