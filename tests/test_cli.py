"""The CLI through the installed `lowc` entry point: the main job, listings, and bad input
(one-line error, non-zero exit, no traceback, nothing written)."""

from __future__ import annotations

import json
import os

import pytest

from conftest import run_lowc


#: each case runs the CLI in a fresh process (~2.5 s): two stay in the quick subset
SLOW = pytest.mark.slow


def assert_clean_error(res, *needles):
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    lines = [l for l in res.stderr.strip().splitlines() if l.strip()]
    errors = [l for l in lines if l.startswith("lowc: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], res.stderr  # progress lines may precede it
    assert "Traceback" not in res.stderr
    for n in needles:
        assert n in errors[0], (n, errors[0])


def test_targets_and_passes_listing():
    res = run_lowc("targets")
    assert res.returncode == 0
    for t in ("ref-fp32", "ref-w8a16", "ref-w4a16", "ref-w8a8", "ref-w4a4"):
        assert t in res.stdout
    res = run_lowc("passes")
    assert res.returncode == 0
    assert "rtn:" in res.stdout and "group_size" in res.stdout and "ignore" in res.stdout


@pytest.fixture(scope="module")
def compiled(tmp_path_factory, odd_llama_dir):
    out = tmp_path_factory.mktemp("cli") / "w4"
    res = run_lowc("compile", odd_llama_dir, "--target", "ref-w4a16", "-o", out, "--pass", "rtn{group_size=64}",
                   "--print-after", "rtn")
    assert res.returncode == 0, res.stderr
    return out, res


@pytest.mark.slow
def test_compile_writes_artifact_and_prints(compiled):
    out, res = compiled
    assert (out / "manifest.json").is_file() and (out / "weights.safetensors").is_file()
    assert "lowc.linear_wq.default" in res.stdout  # --print-after rtn
    assert "size:" in res.stdout
    m = json.loads((out / "manifest.json").read_text())
    assert m["target"] == "ref-w4a16"
    assert m["passes"][0]["name"] == "rtn" and m["passes"][0]["options"]["group_size"] == 64
    # intermediate 200 is not a multiple of 64: down_proj was padded and says so
    down = [r for r in m["layers"] if r["layer"].endswith("down_proj")]
    assert down and all(r["padded_in_features"] == 256 for r in down)
    assert not any(os.path.basename(p).startswith(".w4") for p in os.listdir(out.parent))  # no temp dirs left


@pytest.mark.slow
def test_inspect(compiled):
    out, _ = compiled
    res = run_lowc("inspect", out)
    assert res.returncode == 0, res.stderr
    assert "model.layers.0.self_attn.q_proj" in res.stdout and "rtn W4A16 g64" in res.stdout
    assert "lm_head" in res.stdout and "float" in res.stdout
    assert "size:" in res.stdout


@pytest.mark.slow
def test_eval_and_bench(compiled, tmp_path):
    out, _ = compiled
    data = tmp_path / "text.txt"
    data.write_text(" ".join(["the quick brown fox jumps over the lazy dog."] * 200))
    res = run_lowc("eval", out, "--data", data, "--seq-len", "64", "--max-windows", "4", "--json")
    assert res.returncode == 0, res.stderr
    r = json.loads(res.stdout)
    assert r["ppl"] > 1 and r["ppl_float"] > 1 and 0 <= r["kl"] < 1 and 0 <= r["top1"] <= 1
    res = run_lowc("bench", out, "--seq-len", "8", "--repeat", "2", "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    (row,) = info["rows"]  # one row per --seq-len
    assert (info["target"], info["device"], row["batch"], row["seq_len"]) == ("ref-w4a16", "cpu", 1, 8)
    assert 0 < row["float_ms"] < 60e3 and 0 < row["lowc_ms"] < 60e3  # real medians, not placeholders
    assert row["speedup"] == pytest.approx(row["float_ms"] / row["lowc_ms"], rel=1e-6)
    assert row["lowc_tokens_per_s"] == pytest.approx(8 * 1e3 / row["lowc_ms"], rel=1e-6)


@pytest.mark.slow
def test_eval_of_a_causal_lm_defaults_to_the_shipped_wikitext2_test_and_says_so(compiled):
    """No --data: perplexity on the WikiText-2 test split lowc ships, named in the report and the
    JSON; the same numbers as naming the split or its file explicitly."""
    from lowc import data

    out, _ = compiled
    args = ("--seq-len", "64", "--max-windows", "2")
    res = run_lowc("eval", out, *args, "--json")
    assert res.returncode == 0, res.stderr
    r = json.loads(res.stdout)
    assert r["data"] == "wikitext-2-test" and r["tokens"] == 128 and r["ppl"] > 1
    assert "evaluating ref-w4a16 (causal-lm) on wikitext-2-test" in res.stderr
    res = run_lowc("eval", out, *args, "--data", data.wikitext2("test"))  # the file itself, plain report
    assert res.returncode == 0, res.stderr
    assert f"on {data.wikitext2('test')}, 128 tokens" in res.stdout
    assert f"ppl         {r['ppl']:.4f}" in res.stdout and f"kl          {r['kl']:.4f}" in res.stdout
    res = run_lowc("eval", out, *args)
    assert "on wikitext-2-test (WikiText-2 test split" in res.stdout and "128 tokens" in res.stdout


@pytest.mark.slow
def test_calib_takes_a_builtin_text_name(tmp_path, odd_llama_dir):
    out = tmp_path / "g"
    res = run_lowc("compile", odd_llama_dir, "-t", "ref-w4a16", "-o", out, "--pass", "gptq{group_size=32}",
                   "--calib", "wikitext-2-valid", "--calib-samples", "2", "--seq-len", "32", "-q")
    assert res.returncode == 0, res.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert m["calibration"] == {"source": "wikitext-2-valid", "samples": 2, "seq_len": 32, "tokens": 64}
    assert_clean_error(run_lowc("compile", odd_llama_dir, "-t", "ref-w4a16", "-o", tmp_path / "o", "--calib", "wikitext-3"),
                       "--calib 'wikitext-3' does not exist", "wikitext-2-valid, wikitext-2-test")
    assert_clean_error(run_lowc("eval", out, "--data", "nope.txt"), "--data 'nope.txt' does not exist", "wikitext-2-test")


def test_data_lists_the_builtin_texts():
    from lowc import data

    res = run_lowc("data")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert [l.split()[0] for l in lines] == ["wikitext-2-valid", "wikitext-2-test"]
    assert data.wikitext2("test") in lines[1]
    assert "wikitext-2-valid" in run_lowc("compile", "--help").stdout and "wikitext-2-test" in run_lowc("eval", "--help").stdout


@pytest.mark.slow
def test_recipe(tmp_path, odd_llama_dir):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("- rtn:\n    bits: 8\n    group_size: -1\n    symmetric: true\n")
    out = tmp_path / "o"
    res = run_lowc("compile", odd_llama_dir, "-t", "ref-w4a16", "-o", out, "--recipe", recipe, "-q")
    assert res.returncode == 0, res.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert {r["scheme"]["w_bits"] for r in m["layers"] if r["scheme"]} == {8}


@pytest.mark.parametrize(
    "args,needles",
    [
        pytest.param(["compile", "/nonexistent/model", "-t", "ref-w4a16", "-o", "{tmp}/o"], ["/nonexistent/model", "does not exist"], marks=SLOW),
        (["compile", "tiny-llama", "-t", "ref-w3a99", "-o", "{tmp}/o"], ["unknown target 'ref-w3a99'"]),
        pytest.param(["compile", "tiny-llama", "-t", "ref-w4a16", "-o", "{tmp}/o", "--pass", "rtn{bitz=4}"], ["rtn", "bitz"], marks=SLOW),
        pytest.param(["compile", "tiny-llama", "-t", "ref-w4a16", "-o", "{tmp}/o", "--pass", "rtn{bits=9}"], ["rtn", "bits=9"], marks=SLOW),
        pytest.param(["compile", "tiny-llama", "-t", "ref-w4a16", "-o", "{tmp}/o", "--pass", "rtn{group_size=100}"], ["group_size=100"], marks=SLOW),
        pytest.param(["compile", "tiny-llama", "-t", "ref-w4a16", "-o", "{tmp}/o", "--pass", "nosuch"], ["unknown pass 'nosuch'"], marks=SLOW),
        (["compile", "tiny-llama", "-t", "ref-w4a16", "-o", "{tmp}/o", "--calib", "{tmp}/missing.txt"], ["missing.txt"]),
        pytest.param(["compile", "{tmp}", "-t", "ref-w4a16", "-o", "{tmp}/o"], ["config.json"], marks=SLOW),
        pytest.param(["inspect", "{tmp}/nothing"], ["does not exist"], marks=SLOW),
        pytest.param(["eval", "{tmp}"], ["not a lowc artifact"], marks=SLOW),
    ],
)
def test_bad_input(tmp_path, args, needles):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    needles = [n.replace("{tmp}", str(tmp_path)) for n in needles]
    res = run_lowc(*args)
    assert_clean_error(res, *needles)
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_existing_output_needs_force(compiled):
    out, _ = compiled
    before = (out / "manifest.json").read_bytes()
    res = run_lowc("compile", "tiny-llama", "-t", "ref-w8a16", "-o", out)
    assert_clean_error(res, "already exists", "--force")
    assert (out / "manifest.json").read_bytes() == before


@pytest.mark.slow
def test_corrupt_artifacts(compiled, tmp_path):
    import shutil

    src, _ = compiled
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    w = bad / "weights.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    assert_clean_error(run_lowc("eval", bad), "weights.safetensors", "truncated")
    shutil.rmtree(bad)
    shutil.copytree(src, bad)
    m = json.loads((bad / "manifest.json").read_text())
    m["format_version"] = 99
    (bad / "manifest.json").write_text(json.dumps(m))
    assert_clean_error(run_lowc("bench", bad), "format version 99")
    assert_clean_error(run_lowc("inspect", bad), "format version 99")


@pytest.mark.slow
def test_debug_shows_traceback(tmp_path):
    res = run_lowc("--debug", "compile", "tiny-llama", "-t", "nope", "-o", tmp_path / "o")
    assert res.returncode != 0 and "Traceback" in res.stderr


# ---- bench says what ran ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bench_artifacts(tmp_path_factory, odd_llama_dir):
    import lowc

    d = tmp_path_factory.mktemp("bench")
    for t in ("cuda-w4a16", "ref-w4a16", "onnx-w4", "cpu-lut-w4"):
        lowc.compile(odd_llama_dir, target=t, progress=False).save(d / t)
    return d


@pytest.mark.parametrize(
    "target,implementation,kernels,note",
    [
        ("cuda-w4a16", "reference op", False,
         "cuda-w4a16 on cpu: the Triton kernels did not run (they need a CUDA GPU); these are the reference op's times"),
        ("ref-w4a16", "reference oracle", True, "they dequantize every weight on every call, so they are slower than float"),
        ("onnx-w4", "onnxruntime (CPU provider)", True, "session.qdq_matmulnbits_accuracy_level=0"),
        ("cpu-lut-w4", "LUT C kernels", True, ""),
    ],
)
def test_bench_names_the_implementation_that_ran(bench_artifacts, target, implementation, kernels, note, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    art = bench_artifacts / target
    res = run_lowc("bench", art, "--seq-len", "4", "--repeat", "1", "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["implementation"].startswith(implementation) and info["target_kernels"] is kernels
    assert note in info["note"] and (note or not info["note"])
    assert [r["implementation"] for r in info["rows"]] == [info["implementation"]]
    res = run_lowc("bench", art, "--seq-len", "4", "--repeat", "1")
    assert res.returncode == 0, res.stderr
    assert f"lowc ran: {info['implementation']}" in res.stdout.splitlines()[0]
    assert note in res.stdout


# ---- presets ---------------------------------------------------------------------------------------
def test_presets_listed_and_random_weights_said_where_used(tmp_path, compiled):
    from lowc.frontend.presets import PRESETS

    res = run_lowc("presets")
    assert res.returncode == 0, res.stderr
    rows = dict(l.split(None, 1) for l in res.stdout.splitlines())
    assert set(rows) == set(PRESETS) == {"tiny-llama", "minilm"}
    assert "random weights" in rows["tiny-llama"] and "noise" in rows["tiny-llama"]
    assert "pretrained" in rows["minilm"]
    helptext = run_lowc("compile", "--help").stdout
    assert all(f"  {name}  " in helptext for name in PRESETS) and "lowc presets" in " ".join(helptext.split())
    out = tmp_path / "tiny"
    res = run_lowc("compile", "tiny-llama", "-t", "ref-fp32", "-o", out)
    assert res.returncode == 0, res.stderr
    assert "note: tiny-llama has random weights (seed 0)" in res.stderr
    assert "tiny-llama has random weights" in run_lowc("inspect", out).stdout
    res = run_lowc("generate", out, "--prompt", "Hello", "--max-new-tokens", "3", "--json")
    assert res.returncode == 0, res.stderr
    assert "generated text included, are noise" in json.loads(res.stdout)["note"]
    res = run_lowc("generate", out, "--prompt", "Hello", "--max-new-tokens", "3")
    assert "are noise" in res.stderr
    # a model of one's own has no such note
    cm_out, _ = compiled
    assert "random weights" not in run_lowc("inspect", cm_out).stdout
