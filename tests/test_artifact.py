"""The compiled-model artifact: save/load round trips, the manifest, and every kind of bad input."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import lowc
from lowc.artifact import sha256_file
from lowc.errors import ArtifactError
from lowc.ir import serialize

from conftest import run_lowc

IDS = torch.randint(0, 259, (1, 20), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def cm():
    return lowc.compile("tiny-llama", target="ref-w4a16", progress=False)


@pytest.fixture(scope="module")
def ref(cm):
    return cm(IDS).logits


@pytest.fixture(scope="module")
def saved(cm, tmp_path_factory):
    path = tmp_path_factory.mktemp("saved") / "tl-w4"
    assert cm.save(path) == str(path)
    return str(path)


@pytest.fixture
def art(saved, tmp_path):
    """A private copy of the saved artifact to tamper with."""
    dst = tmp_path / "art"
    shutil.copytree(saved, dst)
    return str(dst)


def _read(path, name):
    with open(os.path.join(path, name)) as f:
        return json.load(f)


def _write(path, name, data):
    with open(os.path.join(path, name), "w") as f:
        json.dump(data, f)


def _reseal(path):
    """Recompute the manifest's file table, so a tampered file gets past the hash check and the
    deeper check under test is what fails."""
    m = _read(path, "manifest.json")
    for rel in m["files"]:
        full = os.path.join(path, rel)
        m["files"][rel] = {"bytes": os.path.getsize(full), "sha256": sha256_file(full)}
    _write(path, "manifest.json", m)


def _tamper_graph(path, fn):
    g = _read(path, "graph.json")
    fn(g)
    _write(path, "graph.json", g)
    _reseal(path)


# ---- round trips ---------------------------------------------------------------------------------


def test_round_trip(cm, saved, ref):
    cm2 = lowc.load(saved)
    assert torch.equal(cm2(IDS).logits, ref)
    assert cm2.target.name == "ref-w4a16"
    assert serialize.graph_to_json(cm2.program.gm) == serialize.graph_to_json(cm.program.gm)
    assert cm2.layers() == cm.layers()
    assert cm2.size() == cm.size()
    # dynamic batch/seq survive (the mask may be given or left to its default)
    ids = torch.randint(0, 259, (3, 7), generator=torch.Generator().manual_seed(1))
    assert torch.equal(cm2(ids, torch.ones_like(ids)).logits, cm(ids).logits)
    # the tokenizer travels with the artifact
    assert cm2.tokenizer is not None and cm2.tokenizer("hi")["input_ids"] == cm.tokenizer("hi")["input_ids"]


@pytest.mark.slow
def test_round_trip_in_fresh_process(saved, ref, tmp_path):
    out = tmp_path / "out.safetensors"
    code = textwrap.dedent(f"""
        import sys, torch, lowc
        from safetensors.torch import save_file
        from lowc.passes import pipeline

        def no_pass(*a, **k):
            raise AssertionError("loading ran a pass")

        pipeline.Pipeline.run = pipeline.run_passes = no_pass  # loading runs no passes
        cm = lowc.load({saved!r})
        ids = torch.randint(0, 259, (1, 20), generator=torch.Generator().manual_seed(0))
        save_file({{"logits": cm(ids).logits.contiguous()}}, {str(out)!r})
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert torch.equal(load_file(str(out))["logits"], ref)


def test_manifest(cm, saved):
    m = _read(saved, "manifest.json")
    assert m["format_version"] == 2
    assert m["target"] == "ref-w4a16" and m["backend"] == "reference"
    assert m["scheme"] == {"w_bits": 4, "group_size": 128, "symmetric": False, "a_bits": 16}
    assert [(p["name"], p["phase"]) for p in m["passes"]] == [("rtn", "method"), ("remove-dead", "finalize")]
    assert m["passes"][0]["options"] == {"bits": None, "group_size": None, "symmetric": None, "ignore": ["lm_head"],
                                         "layer_bits": []}
    assert m["passes"][0]["stats"]["quantized"] == 28
    assert len(m["layers"]) == 29 and sum(1 for r in m["layers"] if r["scheme"]) == 28
    q = m["layers"][0]
    assert (q["layer"], q["role"], q["block"], q["in_features"], q["out_features"]) == ("model.layers.0.self_attn.q_proj", "q", 0, 256, 256)
    assert q["scheme"]["w_bits"] == 4 and q["bytes"] < q["float_bytes"] / 4
    assert m["source"] == {"type": "preset", "name": "tiny-llama", "seed": 0}
    assert m["model"]["kind"] == "causal-lm" and [i["name"] for i in m["model"]["inputs"]] == ["input_ids", "attention_mask"]
    assert m["lowc_version"] == lowc.__version__ and m["torch_version"] == torch.__version__
    assert {"graph.json", "weights.safetensors", "tokenizer/tokenizer.json"} <= set(m["files"])
    for rel, info in m["files"].items():
        full = os.path.join(saved, rel)
        assert info["bytes"] == os.path.getsize(full) and info["sha256"] == sha256_file(full), rel
    assert "manifest.json" not in m["files"]
    assert sorted(os.listdir(saved)) == ["graph.json", "manifest.json", "tokenizer", "weights.safetensors"]


def test_weights_file_holds_exactly_what_the_graph_reads(cm, saved):
    with safe_open(os.path.join(saved, "weights.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        assert f.metadata()["format"] == "lowc"
    assert keys == set(cm.program.state_tensors()) == cm.program.used_attrs() & set(cm.program.state_tensors())
    assert "model.layers.0.self_attn.q_proj.weight" not in keys and "model.layers.0.self_attn.q_proj.qweight" in keys


def test_files_follow_umask(saved):
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(saved).st_mode & 0o777 == 0o777 & ~umask
    for root, dirs, files in os.walk(saved):
        for d in dirs:
            assert os.stat(os.path.join(root, d)).st_mode & 0o777 == 0o777 & ~umask, d
        for n in files:
            assert os.stat(os.path.join(root, n)).st_mode & 0o777 == 0o666 & ~umask, n


@pytest.mark.slow
def test_tied_weights_stored_once(tmp_path):
    from lowc.frontend.presets import tiny_llama

    model, _ = tiny_llama(tie_word_embeddings=True)
    cm = lowc.compile(model, target="ref-fp32", progress=False)
    p = cm.program
    # export leaves one attribute for the tied pair; give the embedding its own name for the same
    # tensor (as a graph built by hand or by a pass could), so there are two attributes, one storage
    shared = p.attr("lm_head.weight")
    emb = next(n for n in p.graph.nodes if n.op == "call_function" and "embedding" in str(n.target))
    p.gm.get_submodule("model.embed_tokens").register_parameter("weight", shared)
    with p.graph.inserting_before(emb):
        getter = p.graph.get_attr("model.embed_tokens.weight")
    emb.replace_input_with(emb.args[0], getter)
    p.gm.recompile()
    assert p.used_attrs() >= {"lm_head.weight", "model.embed_tokens.weight"}
    ids = IDS
    want = cm(ids).logits

    cm.save(tmp_path / "tied")
    d = str(tmp_path / "tied")
    table = _read(d, "graph.json")["tensors"]
    aliased = [n for n in ("lm_head.weight", "model.embed_tokens.weight") if "alias_of" in table[n]]
    assert len(aliased) == 1
    with safe_open(os.path.join(d, "weights.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert len(keys & {"lm_head.weight", "model.embed_tokens.weight"}) == 1
    assert os.path.getsize(os.path.join(d, "weights.safetensors")) < p.nbytes() + 2**16  # not twice 259x256 floats
    cm2 = lowc.load(d)
    a, b = cm2.program.attr("lm_head.weight"), cm2.program.attr("model.embed_tokens.weight")
    assert a.data_ptr() == b.data_ptr()
    assert torch.equal(cm2(ids).logits, want)


# ---- bad artifacts -------------------------------------------------------------------------------


def test_missing_dir(tmp_path):
    with pytest.raises(ArtifactError, match=r"artifact .*nope does not exist"):
        lowc.load(tmp_path / "nope")


def test_not_a_directory(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ArtifactError, match=r"is not a directory"):
        lowc.load(tmp_path / "file")


def test_not_a_lowc_artifact(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ArtifactError, match=r"is not a lowc artifact \(no manifest.json\)"):
        lowc.load(tmp_path)


@pytest.mark.parametrize("version", [99, None, "1"])
def test_wrong_format_version(art, version):
    m = _read(art, "manifest.json")
    if version is None:
        del m["format_version"]
    else:
        m["format_version"] = version
    _write(art, "manifest.json", m)
    with pytest.raises(ArtifactError, match=rf"manifest.json: format version {version!r} is not supported by this lowc \(reads 1, 2\)"):
        lowc.load(art)


def test_corrupt_manifest_json(art):
    with open(os.path.join(art, "manifest.json")) as f:
        text = f.read()
    with open(os.path.join(art, "manifest.json"), "w") as f:
        f.write(text[: len(text) // 2])
    with pytest.raises(ArtifactError, match=r"manifest.json is corrupt: "):
        lowc.load(art)


def test_manifest_not_an_object(art):
    _write(art, "manifest.json", [1, 2])
    with pytest.raises(ArtifactError, match=r"manifest.json: expected an object, got a list"):
        lowc.load(art)


def test_unknown_target_in_manifest(art):
    m = _read(art, "manifest.json")
    m["target"] = "ref-w4a17"
    _write(art, "manifest.json", m)
    with pytest.raises(ArtifactError, match=r"unknown target 'ref-w4a17' \(did you mean 'ref-w4a16'\?\)"):
        lowc.load(art)


def test_truncated_weights(art):
    w = os.path.join(art, "weights.safetensors")
    size = os.path.getsize(w)
    with open(w, "r+b") as f:
        f.truncate(size - 1000)
    with pytest.raises(ArtifactError, match=rf"weights.safetensors is truncated or corrupt: {size - 1000} bytes, manifest says {size}"):
        lowc.load(art)
    # without the sha256 check the size check still notices
    with pytest.raises(ArtifactError, match=rf"weights.safetensors is truncated or corrupt: {size - 1000} bytes"):
        lowc.load(art, check_hashes=False)


def test_flipped_byte_in_weights(art):
    w = os.path.join(art, "weights.safetensors")
    with open(w, "r+b") as f:
        f.seek(os.path.getsize(w) - 100)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x01]))
    with pytest.raises(ArtifactError, match=r"weights.safetensors is corrupt: sha256 does not match the manifest"):
        lowc.load(art)


def test_missing_file(art):
    os.remove(os.path.join(art, "graph.json"))
    with pytest.raises(ArtifactError, match=r"graph.json is missing"):
        lowc.load(art)


def test_tensor_shape_mismatch(art):
    name = "model.layers.0.self_attn.q_proj.qweight"

    def fn(g):
        g["tensors"][name]["shape"] = [256, 64]

    _tamper_graph(art, fn)
    with pytest.raises(ArtifactError, match=rf"tensor '{name}' is torch.uint8\[256, 128\], graph expects uint8\[256, 64\]"):
        lowc.load(art)


def test_tensor_missing_from_weights(art):
    def fn(g):
        g["tensors"]["model.extra"] = {"dtype": "float32", "shape": [3], "parameter": False}

    _tamper_graph(art, fn)
    with pytest.raises(ArtifactError, match=r"weights.safetensors: tensor 'model.extra' is missing"):
        lowc.load(art)


def test_alias_of_unknown_tensor(art):
    def fn(g):
        g["tensors"]["model.extra"] = {"dtype": "float32", "shape": [3], "parameter": False, "alias_of": "model.nothing"}

    _tamper_graph(art, fn)
    with pytest.raises(ArtifactError, match=r"tensor 'model.extra' is an alias of 'model.nothing', which is not stored"):
        lowc.load(art)


def test_corrupt_graph_json(art):
    with open(os.path.join(art, "graph.json"), "w") as f:
        f.write('{"nodes": [')
    _reseal(art)
    with pytest.raises(ArtifactError, match=r"graph.json is corrupt"):
        lowc.load(art)


@pytest.mark.parametrize("target", ["evilmod.boom.default", "evilmod:boom", "os.system", "aten.no_such_op.default", "eval"])
def test_unknown_op_in_graph_imports_nothing(art, tmp_path, monkeypatch, target):
    marker = tmp_path / "imported"
    (tmp_path / "evilmod.py").write_text(f"open({str(marker)!r}, 'w').close()\ndef boom(*a): pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    tampered = []

    def fn(g):
        node = next(n for n in g["nodes"] if n.get("target") == "lowc.linear_wq.default")
        node["target"] = target
        tampered.append(node["name"])  # as the stored graph names it (FX's naming varies by torch version)

    _tamper_graph(art, fn)
    with pytest.raises(ArtifactError, match=rf"graph.json: node {tampered[0]}: unknown op '{re.escape(target)}'"):
        lowc.load(art)
    assert "evilmod" not in sys.modules and not marker.exists()


@pytest.mark.parametrize("out_type, match", [
    ("evilmod.Output", r"output type 'evilmod.Output' is not allowed"),
    ("transformers.no_such_module.Output", r"graph.json: .*transformers.no_such_module"),
])
def test_bad_output_type(art, tmp_path, monkeypatch, out_type, match):
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "evilmod.py").write_text("raise SystemExit('imported')\n")

    def fn(g):
        g["pytree"]["out_spec"] = g["pytree"]["out_spec"].replace("transformers.modeling_outputs.CausalLMOutputWithPast", out_type)

    _tamper_graph(art, fn)
    with pytest.raises(ArtifactError, match=match):
        lowc.load(art)
    assert "evilmod" not in sys.modules


def test_stored_graph_must_verify(art):
    tampered = []

    def fn(g):
        node = next(n for n in g["nodes"] if n.get("target") == "lowc.linear_wq.default")
        node["args"]["tuple"][5] = 3  # bits 4 -> 3: qweight no longer matches scales
        tampered.append(node["name"])

    _tamper_graph(art, fn)
    with pytest.raises(ArtifactError, match=rf"the stored graph does not verify: .*\b{tampered[0]}\b"):
        lowc.load(art)


# ---- writing -------------------------------------------------------------------------------------


def _snapshot(path):
    out = {}
    for root, _, files in os.walk(path):
        for n in files:
            full = os.path.join(root, n)
            with open(full, "rb") as f:
                out[os.path.relpath(full, path)] = f.read()
    return out


def test_existing_output_needs_force(cm, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(ArtifactError, match=r"output .*out already exists \(use --force / force=True to replace it\)"):
        cm.save(out)
    assert _snapshot(out) == {"precious.txt": b"keep me"}
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_force_replaces(cm, saved, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(saved, out)  # a previous artifact (a directory that is not one is refused)
    (out / "precious.txt").write_text("old")
    cm.save(out, force=True)
    assert not (out / "precious.txt").exists()
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temp or backup directories left
    assert _read(str(out), "manifest.json")["target"] == "ref-w4a16"
    lowc.load(out)


def test_failed_save_leaves_nothing(cm, tmp_path, monkeypatch):
    import lowc.artifact

    def broken(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(lowc.artifact, "save_file", broken)
    with pytest.raises(ArtifactError, match=r"cannot write .*out: No space left on device"):
        cm.save(tmp_path / "out")
    assert os.listdir(tmp_path) == []


def test_failed_forced_save_keeps_the_old_artifact(cm, saved, tmp_path, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(saved, out)
    before = _snapshot(out)

    def broken_emit(program, d):
        with open(os.path.join(d, "half.bin"), "wb") as f:
            f.write(b"x")
        raise RuntimeError("backend exploded")

    target = cm.target
    monkeypatch.setattr(cm, "target", type(target)(**{**target.__dict__, "emit": broken_emit}))
    with pytest.raises(RuntimeError, match="backend exploded"):
        cm.save(out, force=True)
    assert _snapshot(out) == before
    assert sorted(os.listdir(tmp_path)) == ["out"]


# ---- format version 1 still loads ---------------------------------------------------------------------

V1 = os.path.join(os.path.dirname(__file__), "data", "artifact-v1")


def test_format_version_1_still_loads(tmp_path):
    """An artifact written by lowc before the typed scheme (format 1: one flat scheme dict holding the
    method and the passes' notes) loads, runs as it did, shows in ``inspect``, and saves as format 2.
    It was compiled with smoothquant, gptq{group_size=32} and static W8A8 activations."""
    from safetensors.torch import load_file

    from lowc.ir import meta as nodemeta
    from lowc.ir.dialect.args import is_quantized_linear
    from lowc.ir.scheme import Scheme

    assert _read(V1, "manifest.json")["format_version"] == 1
    cm = lowc.load(V1)
    expected = load_file(os.path.join(os.path.dirname(V1), "artifact-v1-expected.safetensors"))
    torch.testing.assert_close(cm(expected["ids"]).logits, expected["logits"], rtol=0, atol=0)
    infos = [nodemeta.get(n) for n in cm.program.graph.nodes if is_quantized_linear(n)]
    assert len(infos) == 7
    assert all(i.scheme == Scheme(8, 32, True, a_bits=8, a_static="mse") and i.method == "gptq" for i in infos)
    smoothed = {i.layer.rsplit(".", 1)[-1] for i in infos if i.transforms == ("smoothquant(alpha=0.5)",)}
    assert smoothed == {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}
    rows = {r["layer"].rsplit(".", 1)[-1]: r for r in cm.manifest["layers"]}
    assert rows["q_proj"]["method"] == "gptq" and rows["q_proj"]["scheme"]["a_static"] == "mse"
    r = run_lowc("inspect", V1)
    assert r.returncode == 0 and "gptq W8A8 g32 sym static(mse)" in r.stdout, r.stdout + r.stderr
    cm.save(tmp_path / "v2")
    m = _read(str(tmp_path / "v2"), "manifest.json")
    assert m["format_version"] == 2 and m["layers"][0]["transforms"] == ["smoothquant(alpha=0.5)"]
    torch.testing.assert_close(lowc.load(tmp_path / "v2")(expected["ids"]).logits, expected["logits"], rtol=0, atol=0)
