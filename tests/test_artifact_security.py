"""Artifacts and outputs are untrusted and precious (issue 14).

An attacker edits an artifact and recomputes the manifest's hashes (hashes are integrity, not
authenticity); a careless user points ``--force`` at the wrong directory or the machine fails
mid-write. Loading must never run code or import a module the artifact names, every file read must
be hashed, malformed data is a one-line ArtifactError (CLI exit 2), and replacing an output always
leaves either the old or the new artifact in place."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import threading

import pytest
import torch

import lowc
from lowc import artifact as A
from lowc.errors import ArtifactError, DeviceError, LowcError, ModelLoadError
from lowc.ir import serialize

from conftest import make_llama_dir, run_lowc

SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)


def _small_llama(seed=0):
    from lowc.frontend.presets import tiny_llama

    return tiny_llama(seed, **SMALL)


@pytest.fixture(scope="module")
def small_cm():
    model, tok = _small_llama()
    return lowc.compile(model, target="ref-w4a16", progress=False)


@pytest.fixture(scope="module")
def saved(small_cm, tmp_path_factory):
    path = tmp_path_factory.mktemp("sec") / "art"
    small_cm.save(path)
    return str(path)


@pytest.fixture
def art(saved, tmp_path):
    dst = tmp_path / "art"
    shutil.copytree(saved, dst)
    return str(dst)


def _read(path, name):
    with open(os.path.join(path, name)) as f:
        return json.load(f)


def _write(path, name, data):
    with open(os.path.join(path, name), "w") as f:
        json.dump(data, f) if not isinstance(data, str) else f.write(data)


def _reseal(path, manifest=None):
    """Recompute the hash table for every listed file, as an attacker would."""
    m = manifest if manifest is not None else _read(path, "manifest.json")
    files = m.get("files") if isinstance(m, dict) else None
    if isinstance(files, dict):
        for rel in list(files):
            full = os.path.join(path, rel)
            if isinstance(rel, str) and os.path.isfile(full) and isinstance(files[rel], dict):
                with open(full, "rb") as f:  # follows symlinks, as an attacker's tool would
                    files[rel] = {"bytes": os.path.getsize(full), "sha256": hashlib.sha256(f.read()).hexdigest()}
    _write(path, "manifest.json", m)


def _tamper_graph(path, fn):
    g = _read(path, "graph.json")
    fn(g)
    _write(path, "graph.json", g)
    _reseal(path)


def _tamper_manifest(path, fn):
    m = _read(path, "manifest.json")
    fn(m)
    _reseal(path, m)


@pytest.fixture
def canary(tmp_path, monkeypatch):
    """A module ``lowc_canary`` on sys.path that writes ``marker`` if anything imports it, and a
    shell command that writes ``marker`` too."""
    marker = tmp_path / "pwned"
    d = tmp_path / "canary"
    d.mkdir()
    (d / "lowc_canary.py").write_text(f"open({str(marker)!r}, 'w').close()\ndef boom(*a, **k):\n    return None\n")
    monkeypatch.syspath_prepend(str(d))
    yield marker
    assert not marker.exists(), "artifact content was executed"
    assert "lowc_canary" not in sys.modules, "a module named by the artifact was imported"


# ---- 1. nothing from graph.json reaches generated code unchecked ---------------------------------------


def _cmd(marker):
    return f"touch {marker}"


def test_placeholder_target_cannot_inject_code(art, canary):
    def fn(g):
        ph = next(n for n in g["nodes"] if n["op"] == "placeholder" and n["name"] == "attention_mask")
        ph["target"] = f"attention_mask=__import__('os').system('{_cmd(canary)}')"
        del g["pytree"]

    _tamper_graph(art, fn)
    with pytest.raises(ArtifactError, match=r"graph.json: node attention_mask target: .* is not a plain identifier"):
        lowc.load(art)


def test_pytree_orig_args_cannot_inject_code(art, canary):
    def fn(g):
        g["pytree"]["orig_args"][1] = f"attention_mask=__import__('os').system('{_cmd(canary)}')"

    _tamper_graph(art, fn)
    with pytest.raises(ArtifactError, match=r"pytree.orig_args: .* is not a plain identifier"):
        lowc.load(art)


def test_in_spec_keys_cannot_inject_code(art, canary):
    def fn(g):
        spec = json.loads(g["pytree"]["in_spec"])
        d = spec[1]["children_spec"][1]
        d["context"] = json.dumps(["input_ids", f"x':__import__('lowc_canary'), 'y"])
        g["pytree"]["in_spec"] = json.dumps(spec)

    _tamper_graph(art, fn)
    with pytest.raises(ArtifactError, match=r"pytree.in_spec: key of builtins.dict: .* is not a plain identifier"):
        lowc.load(art)


def test_tensor_name_cannot_inject_code(art, canary):
    evil = f'weight") if not getattr(__import__("os"),"system")("{_cmd(canary)}") else getattr(self, "x'

    def fn(g):
        node = next(n for n in g["nodes"] if n["op"] == "get_attr")
        old = node["target"]
        node["target"] = evil
        g["tensors"][evil] = g["tensors"].pop(old)

    _tamper_graph(art, fn)
    with pytest.raises(ArtifactError, match=r"graph.json: tensor .* is not an attribute path"):
        lowc.load(art)


def test_get_attr_must_read_a_tensor_of_the_table(art, canary):
    def fn(g):
        node = next(n for n in g["nodes"] if n["op"] == "get_attr")
        node["target"] = "lm_head.not_stored"

    _tamper_graph(art, fn)
    with pytest.raises(ArtifactError, match=r"reads 'lm_head.not_stored', which is not in the tensor table"):
        lowc.load(art)


def test_keyword_names_cannot_inject_code(art, canary):
    def fn(g):
        node = next(n for n in g["nodes"] if n.get("target") == "aten.linear.default")
        node["kwargs"] = {"dict": {"bias=__import__('lowc_canary'),x": None}}

    _tamper_graph(art, fn)
    with pytest.raises(ArtifactError, match=r"dict key: .* is not a plain identifier"):
        lowc.load(art)


def test_keyword_must_be_an_argument_of_the_op(art):
    def fn(g):
        node = next(n for n in g["nodes"] if n.get("target") == "aten.linear.default")
        node["kwargs"] = {"dict": {"surprise": 1}}

    _tamper_graph(art, fn)
    with pytest.raises(ArtifactError, match=r"keyword argument 'surprise' is not an argument of"):
        lowc.load(art)


@pytest.mark.parametrize("target", ["aten.__class__.__init__", "aten.from_file.default", "aten._print.default",
                                    "aten.save.default", "prims.__dict__.x", "lowc.__loader__.exec_module"])
def test_dangerous_or_fake_ops_are_refused(art, target):
    def fn(g):
        node = next(n for n in g["nodes"] if n.get("target") == "aten.linear.default")
        node["target"] = target

    _tamper_graph(art, fn)
    with pytest.raises(ArtifactError, match=r"unknown op"):
        lowc.load(art)


def test_node_names_are_identifiers(art):
    def fn(g):
        g["nodes"][-2]["name"] = "x = 1; import os"

    _tamper_graph(art, fn)
    with pytest.raises(ArtifactError, match=r"name: .* is not a plain identifier"):
        lowc.load(art)


def test_generated_source_check_catches_what_the_grammar_would_miss():
    """Defence in depth: a graph built directly (bypassing the JSON checks) whose generated code
    has a default argument expression is refused before anything is compiled."""
    g = torch.fx.Graph()
    x = g.placeholder("x", default_value=1)
    g.output(x)
    with pytest.raises(ArtifactError, match=r"unexpected function signature"):
        serialize.check_generated_source(g)
    g2 = torch.fx.Graph()
    y = g2.placeholder("y")
    a = g2.get_attr("__class__")
    g2.output((y, a))
    with pytest.raises(ArtifactError, match=r"attribute '__class__'"):
        serialize.check_generated_source(g2)


@pytest.mark.slow
def test_cli_eval_of_injected_artifact_exits_2(art, tmp_path):
    marker = tmp_path / "cli-pwned"

    def fn(g):
        g["pytree"]["orig_args"][1] = f"attention_mask=__import__('os').system('touch {marker}')"

    _tamper_graph(art, fn)
    for cmd in (["eval", art, "--against", "tiny-llama"], ["bench", art, "--seq-len", "2", "--repeat", "1"]):
        r = run_lowc(*cmd, cwd=tmp_path)
        assert r.returncode == 2, r.stderr
        assert r.stderr.count("\n") == 1 and "lowc: error:" in r.stderr
    assert not marker.exists()


# ---- 2. the float reference is never rebuilt by importing what the manifest names ---------------------


@pytest.mark.slow
def test_factory_source_is_never_imported(art, tmp_path, canary):
    _tamper_manifest(art, lambda m: m.__setitem__("source", {"type": "factory", "name": "lowc_canary:boom"}))
    r = run_lowc("eval", art, cwd=str(canary.parent / "canary"))  # the factory module is in the cwd
    assert r.returncode == 2, r.stderr
    assert "lowc never imports code an artifact names: pass --against lowc_canary:boom" in r.stderr
    _tamper_manifest(art, lambda m: m.__setitem__("source", {"type": "factory", "name": "os:abort"}))
    r = run_lowc("bench", art, "--seq-len", "2", "--repeat", "1")
    assert r.returncode == 2 and "pass --against os:abort" in r.stderr, r.stderr


def test_hf_dir_source_must_be_unchanged(tmp_path):
    from lowc.evaluate import source_spelling
    from lowc.frontend import hf

    d = make_llama_dir(tmp_path / "m", **SMALL)
    m = {"source": {"type": "hf-dir", "name": "m", "path": d, "sha256": hf.fingerprint_dir(d)}}
    assert source_spelling(m) == d
    m["source"]["sha256"] = "0" * 64
    with pytest.raises(ModelLoadError, match=r"has changed since it was compiled"):
        source_spelling(m)
    with pytest.raises(ModelLoadError, match=r"cannot be rebuilt here: pass --against"):
        source_spelling({"source": {"type": "module", "name": "Net"}})


# ---- 3, 4. every file is hashed; only plain names inside the artifact ------------------------------


def test_files_table_must_be_present(art):
    _tamper_manifest(art, lambda m: m.pop("files"))
    with pytest.raises(ArtifactError, match=r"manifest.json is corrupt: no 'files'"):
        lowc.load(art)


def test_every_file_read_must_be_listed(art):
    def edit(m):
        del m["files"]["graph.json"]

    _tamper_manifest(art, edit)
    with pytest.raises(ArtifactError, match=r"files: graph.json is not in the hash table"):
        lowc.load(art)


def test_unlisted_file_is_refused(art):
    os.makedirs(os.path.join(art, "tokenizer"), exist_ok=True)
    with open(os.path.join(art, "tokenizer", "tokenizer_config.json"), "w") as f:
        f.write("{}")
    with pytest.raises(ArtifactError, match=r"tokenizer/tokenizer_config.json is not in the manifest's hash table"):
        lowc.load(art)


@pytest.mark.parametrize("rel", ["../outside.bin", "/root/.ssh/id_rsa", "backend/../../x", "a//b", "c:\\x"])
def test_paths_outside_the_artifact_are_refused_without_probing(art, rel):
    def edit(m):
        m["files"][rel] = {"bytes": 1, "sha256": "0" * 64}

    _tamper_manifest(art, edit)
    with pytest.raises(ArtifactError) as e:
        lowc.load(art)
    msg = str(e.value)
    assert "is not a plain relative file name" in msg
    assert "missing" not in msg and "bytes" not in msg  # says nothing about the file's existence or size


def test_symlinks_are_refused(art, tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy(os.path.join(art, "weights.safetensors"), outside)
    os.unlink(os.path.join(art, "weights.safetensors"))
    os.symlink(outside, os.path.join(art, "weights.safetensors"))
    _reseal(art)
    with pytest.raises(ArtifactError, match=r"weights.safetensors is a symbolic link"):
        lowc.load(art)


def test_manifest_symlink_is_refused(art, tmp_path):
    real = tmp_path / "m.json"
    shutil.move(os.path.join(art, "manifest.json"), real)
    os.symlink(real, os.path.join(art, "manifest.json"))
    with pytest.raises(ArtifactError, match=r"manifest.json is a symbolic link"):
        lowc.load(art)


# ---- 5. malformed but parseable data ---------------------------------------------------------------


def _manifest_unknown_model_key(art):
    _tamper_manifest(art, lambda m: m["model"].__setitem__("surprise", 1))


def _graph_is_a_list(art):
    _write(art, "graph.json", [1, 2])
    _reseal(art)


def _files_is_a_list(art):
    m = _read(art, "manifest.json")
    m["files"] = list(m["files"])
    _write(art, "manifest.json", m)


def _tensor_named_training(art):
    def fn(g):
        node = next(n for n in g["nodes"] if n["op"] == "get_attr" and n["target"] == "model.norm.weight")
        node["target"] = "model.norm.training"
        g["tensors"]["model.norm.training"] = g["tensors"].pop("model.norm.weight")

    _tamper_graph(art, fn)


def _input_dtype_load(art):
    _tamper_manifest(art, lambda m: m["model"]["inputs"][0].__setitem__("dtype", "load"))


def _deep_json(art):
    _write(art, "graph.json", "[" * 200_000 + "]" * 200_000)
    _reseal(art)


def _huge_example_shape(art):
    _tamper_manifest(art, lambda m: m["model"]["inputs"][0].__setitem__("shape", [100000, 100000]))


def _bool_as_int(art):
    m = _read(art, "manifest.json")
    m["files"]["graph.json"]["bytes"] = True
    _write(art, "manifest.json", m)


@pytest.mark.parametrize("tamper, match", [
    (_manifest_unknown_model_key, r"model: unknown key 'surprise'"),
    (_graph_is_a_list, r"graph.json: expected an object, got a list"),
    (_files_is_a_list, r"files: expected an object, got a list"),
    (_tensor_named_training, r"reserved module attribute name 'training'"),
    (_input_dtype_load, r"inputs\[0\].dtype: 'load' is not one of"),
    (_deep_json, r"graph.json is corrupt: JSON nested too deeply"),
    (_huge_example_shape, r"inputs\[0\].shape: 100000 is outside"),
    (_bool_as_int, r"bytes: expected an integer, got a boolean"),
])
def test_malformed_artifacts_are_one_line_errors(art, tamper, match):
    tamper(art)
    with pytest.raises(ArtifactError, match=match) as e:
        lowc.load(art)
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_malformed_artifact_cli_exit_2(art):
    _tensor_named_training(art)
    for cmd in (["eval", art, "--against", "tiny-llama"], ["bench", art, "--seq-len", "2", "--repeat", "1"]):
        r = run_lowc(*cmd)
        assert r.returncode == 2 and r.stderr.startswith("lowc: error:"), (cmd, r.stderr)
    _manifest_unknown_model_key(art)
    r = run_lowc("inspect", art)
    assert r.returncode == 2 and "unknown key 'surprise'" in r.stderr


# ---- 5. fuzzing the loader ----------------------------------------------------------------------------

PAYLOADS = ["__import__('lowc_canary')", 'x") or __import__("lowc_canary") or ("', "lowc_canary:boom", "../../etc/passwd",
            "/etc/passwd", "model.norm.training", "a'b\"c\n", "\u00e9\u2603", "", "x" * 3000, "aten.from_file.default",
            "transformers.lowc_canary.X", "lowc_canary.boom.default", "getitem", "ones_like:lowc_canary"]
VALUES = [None, 0, -1, 2 ** 70, 1e308, float("nan"), True, "", [], {}, [[[]]], {"tuple": []}, {"node": "nope"},
          {"dtype": "load"}, {"device": "cuda:99"}, {"float": "1e9999"}]
TAGS = ["tuple", "list", "dict", "node", "dtype", "device", "layout", "memory_format", "float", "evil"]


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def _mutate(doc, rng: random.Random) -> tuple[object, str | None]:
    """One random edit of a JSON document; returns (document, raw text override or None)."""
    doc = copy.deepcopy(doc)
    paths = [p for p in _paths(doc) if p]
    path = rng.choice(paths)
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    key = path[-1]
    op = rng.randrange(7)
    if op == 0:  # drop
        del parent[key]
    elif op == 1:  # change type / value
        parent[key] = copy.deepcopy(rng.choice(VALUES))
    elif op == 2:  # inject a string
        parent[key] = rng.choice(PAYLOADS)
    elif op == 3 and isinstance(parent, dict):  # rename the key (retag)
        parent[rng.choice(PAYLOADS + TAGS)] = parent.pop(key)
    elif op == 4 and isinstance(parent[key], dict) and len(parent[key]) == 1:  # retag an argument
        (_, v), = parent[key].items()
        parent[key] = {rng.choice(TAGS): v}
    elif op == 5 and isinstance(parent, list) and len(parent) > 1:  # duplicate / reorder
        parent.insert(rng.randrange(len(parent)), copy.deepcopy(parent[key]))
    elif op == 6 and isinstance(parent, dict):  # a duplicated key in the raw text: the last one wins
        text = json.dumps(doc)
        k = json.dumps(key)
        return doc, text.replace(f"{k}:", f"{k}: {json.dumps(rng.choice(PAYLOADS))}, {k}:", 1)
    else:
        parent[key] = rng.choice(PAYLOADS)
    return doc, None


ALLOWED_NEW_MODULES = ("lowc", "torch", "transformers.modeling_outputs", "transformers.models.", "sympy", "numpy")


@pytest.mark.slow
def test_fuzz_loader(saved, tmp_path, canary, monkeypatch):
    """A seeded mutation loop over a real artifact's manifest.json and graph.json (hashes resealed
    each time): every case loads or fails with a one-line LowcError (CLI exit 0 or 2); nothing named
    by the artifact is imported, no file is created outside the temp dir."""
    from lowc.cli import main as cli_main

    monkeypatch.chdir(tmp_path)
    art = str(tmp_path / "fz")
    shutil.copytree(saved, art)
    base = {n: _read(saved, n) for n in ("manifest.json", "graph.json")}
    lowc.load(saved)  # import what a legitimate load imports
    before = set(sys.modules)
    cwd_before = set(os.listdir(tmp_path))
    rng = random.Random(14)
    outcomes = {"loaded": 0, "refused": 0}
    for i in range(int(os.environ.get("LOWC_FUZZ_CASES", "300"))):
        name = rng.choice(["manifest.json", "graph.json", "graph.json"])
        doc, raw = _mutate(base[name], rng)
        shutil.copy(os.path.join(saved, "graph.json"), os.path.join(art, "graph.json"))
        _write(art, "manifest.json", base["manifest.json"])
        _write(art, name, raw if raw is not None else doc)
        if name == "graph.json" or rng.random() < 0.5:
            try:
                _reseal(art, doc if name == "manifest.json" and raw is None else None)
            except (TypeError, ValueError, AttributeError):
                pass
        try:
            lowc.load(art)
            outcomes["loaded"] += 1
        except LowcError as e:
            assert "\n" not in str(e), f"case {i}: multi-line error"
            outcomes["refused"] += 1
        except Exception as e:  # an internal error: CLI exit 3
            pytest.fail(f"case {i} ({name}): {type(e).__name__}: {e}")
        if i % 10 == 0:
            try:
                cli_main(["inspect", art])
            except SystemExit as ex:
                assert ex.code == 2, f"case {i}: lowc inspect exit {ex.code}"
    new = {m for m in set(sys.modules) - before if not m.startswith(ALLOWED_NEW_MODULES)}
    assert not new, f"imported: {sorted(new)[:10]}"
    assert set(os.listdir(tmp_path)) == cwd_before
    print("fuzz outcomes", outcomes)
    assert outcomes["refused"] > 0 and outcomes["loaded"] > 0  # both paths exercised


# ---- 6. the CPU LUT kernel cache --------------------------------------------------------------------------


def test_lut_cache_checks_the_library_before_loading(tmp_path, monkeypatch):
    from lowc.backends.cpu_lut import build, codegen
    from lowc.backends.cpu_lut.codegen import KernelConfig

    monkeypatch.setenv("LOWC_CACHE_DIR", str(tmp_path))
    src = codegen.generate([KernelConfig(2, 32, True)])
    lib = build.build(src)
    assert os.path.isfile(lib + ".sha256") and build.verified(lib)
    # a warm cache needs no compiler
    monkeypatch.setenv("CC", "/nonexistent/cc")
    assert build.build(src) == lib
    # a library replaced at the predictable key is not loaded, and without a compiler it is an error
    with open(lib, "ab") as f:
        f.write(b"\0")
    assert not build.verified(lib)
    with pytest.raises(build.CpuLutBuildError, match=r"is not the library lowc built"):
        build.load(lib)
    with pytest.raises(build.CpuLutBuildError, match=r"CC='/nonexistent/cc' not found"):
        build.build(src)
    # with a compiler it is rebuilt
    monkeypatch.delenv("CC")
    assert build.build(src) == lib and build.verified(lib)
    # a world-writable library is not trusted either
    os.chmod(lib, 0o777)
    assert not build.verified(lib)


def test_lut_cache_unwritable_is_a_user_error(tmp_path, monkeypatch):
    from lowc.backends.cpu_lut import build, codegen
    from lowc.backends.cpu_lut.codegen import KernelConfig

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("LOWC_CACHE_DIR", str(blocker))
    with pytest.raises(build.CpuLutBuildError, match=r"cannot write the kernel cache .*set LOWC_CACHE_DIR"):
        build.build(codegen.generate([KernelConfig(3, 32, False)]))


# ---- 7. --force never destroys what it should not -------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_llama_dir(tmp_path_factory.mktemp("src") / "llama", **SMALL)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["model", "parent", "cwd", "not-artifact"])
def test_force_refuses_dangerous_outputs(model_dir, tmp_path, where):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("keep me")
    out = {"model": model_dir, "parent": os.path.dirname(model_dir), "cwd": ".", "not-artifact": str(work)}[where]
    before = sorted(os.listdir(model_dir))
    r = run_lowc("compile", model_dir, "--target", "ref-w4a16", "-o", out, "--force", cwd=work)
    assert r.returncode == 2, r.stderr
    assert "refusing" in r.stderr or "would replace the input model" in r.stderr, r.stderr
    assert sorted(os.listdir(model_dir)) == before and (work / "notes.txt").exists()


def test_force_replaces_artifacts_and_empty_dirs(small_cm, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    small_cm.save(empty, force=True)
    assert os.path.isfile(empty / "manifest.json")
    small_cm.save(empty, force=True)  # a previous artifact
    lowc.load(empty)
    with pytest.raises(ArtifactError, match=r"refusing to replace it"):
        small_cm.save(tmp_path / "empty" / "graph.json", force=True)  # a file


def test_save_refuses_to_replace_the_source_model(model_dir, tmp_path):
    cm = lowc.compile(model_dir, target="ref-fp32", progress=False)
    with pytest.raises(ArtifactError, match=r"would replace the input model"):
        cm.save(model_dir, force=True)
    with pytest.raises(ArtifactError, match=r"would replace the input model"):
        cm.save(os.path.dirname(model_dir), force=True)
    assert os.path.isfile(os.path.join(model_dir, "config.json"))


@pytest.mark.slow
def test_export_refuses_to_write_into_the_artifact(saved, tmp_path):
    r = run_lowc("export", saved, "--format", "onnx", "-o", os.path.join(saved, "weights.safetensors"), "--force")
    assert r.returncode == 2 and "inside" in r.stderr, r.stderr
    r = run_lowc("export", saved, "--format", "onnx", "-o", saved, "--force")
    assert r.returncode == 2 and "is a directory" in r.stderr, r.stderr
    lowc.load(saved)


# ---- 8. replacing is atomic -------------------------------------------------------------------------


def _loads_and_is(path, cm):
    m = _read(path, "manifest.json")
    lowc.load(path)
    return m["created"] == cm.manifest["created"]


def test_failed_exchange_keeps_the_old_artifact(small_cm, tmp_path, monkeypatch):
    out = tmp_path / "out"
    small_cm.save(out)
    real = A._renameat2

    def failing(src, dst, flags):
        if flags == A._RENAME_EXCHANGE:
            raise OSError(5, "Input/output error", dst)
        return real(src, dst, flags)

    monkeypatch.setattr(A, "_renameat2", failing)
    with pytest.raises(ArtifactError, match=r"cannot write .*Input/output error"):
        small_cm.save(out, force=True)
    lowc.load(out)
    assert [n for n in os.listdir(tmp_path) if n != "out"] == []  # nothing half-written beside it


def test_fallback_restores_the_old_artifact_when_the_second_rename_fails(small_cm, tmp_path, monkeypatch):
    out = tmp_path / "out"
    small_cm.save(out)
    stamp = A.sha256_file(str(out / "graph.json"))

    def no_renameat2(src, dst, flags):
        raise A._NoRenameat2()

    calls = []
    real_rename = os.rename

    def rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError(5, "Input/output error", dst)
        return real_rename(src, dst)

    monkeypatch.setattr(A, "_renameat2", no_renameat2)
    monkeypatch.setattr(A.os, "rename", rename)
    with pytest.raises(ArtifactError):
        small_cm.save(out, force=True)
    monkeypatch.undo()
    assert A.sha256_file(str(out / "graph.json")) == stamp
    lowc.load(out)
    assert [n for n in os.listdir(tmp_path) if n != "out"] == []


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_injected_rename_failure_keeps_the_old_artifact(saved, tmp_path):
    """The issue's reproduction with real syscall fault injection: fail the swap syscall."""
    out = tmp_path / "out"
    shutil.copytree(saved, out)
    before = A.sha256_file(str(out / "manifest.json"))
    script = ("import lowc, torch; from lowc.frontend.presets import tiny_llama; "
              f"m, _ = tiny_llama(0, **{SMALL!r}); cm = lowc.compile(m, target='ref-fp32', progress=False); "
              f"cm.save({str(out)!r}, force=True)")
    probe = subprocess.run(["strace", "-f", "-o", "/dev/null", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("strace cannot trace here (no ptrace)")
    r = subprocess.run(["strace", "-f", "-o", "/dev/null", "-e", "trace=rename,renameat,renameat2",
                        "-e", "inject=rename,renameat,renameat2:error=EIO:when=2+",
                        sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert r.returncode != 0
    assert "ArtifactError" in r.stderr and "Input/output error" in r.stderr, r.stderr[-2000:]
    assert A.sha256_file(str(out / "manifest.json")) == before
    lowc.load(out)


def test_leftovers_of_dead_runs_are_cleaned(small_cm, tmp_path):
    out = tmp_path / "out"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = [tmp_path / f".out.tmp-{dead.pid}-abc123", tmp_path / f".out.old-{dead.pid}-x9"]
    live = tmp_path / f".out.tmp-{os.getppid()}-keep"
    other = tmp_path / ".out.tmp-notmine"
    for d in stale + [live, other]:
        d.mkdir()
        (d / "f").write_text("x")
    small_cm.save(out)
    assert not any(d.exists() for d in stale)
    assert live.exists() and other.exists()


def test_concurrent_forced_saves(small_cm, tmp_path, monkeypatch):
    """Several writers replacing one output at once (renames slowed down to widen any window
    between two steps of a non-atomic replace) all succeed, and a complete artifact remains."""
    import time

    out = tmp_path / "out"
    errors = []
    real_rename = os.rename

    def slow_rename(src, dst):
        time.sleep(0.02)
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", slow_rename)

    def worker():
        try:
            for _ in range(3):
                small_cm.save(out, force=True)
        except Exception as e:  # pragma: no cover - the failure being tested
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    lowc.load(out)
    assert [n for n in os.listdir(tmp_path) if n != "out"] == []


# ---- 9. environment failures are user errors -------------------------------------------------------------


def test_disk_full_is_a_user_error(small_cm, tmp_path):
    """A real write failure: a file-size limit makes the weights write fail with EFBIG."""
    out = tmp_path / "out"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, hard))
    try:
        with pytest.raises(ArtifactError, match=rf"cannot write {out}"):
            small_cm.save(out)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)
    assert os.listdir(tmp_path) == []


def test_read_only_output_is_a_user_error(small_cm, tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() != 0:
        os.chmod(ro, 0o555)
    else:  # root ignores permission bits: make the temporary directory creation fail as EACCES would
        import tempfile

        def denied(*a, **k):
            raise PermissionError(13, "Permission denied", str(ro))

        monkeypatch.setattr(tempfile, "mkdtemp", denied)
    try:
        with pytest.raises(ArtifactError, match=r"cannot write .*Permission denied"):
            small_cm.save(ro / "out")
    finally:
        os.chmod(ro, 0o755)


# ---- 10. devices ---------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda(saved):
    with pytest.raises(DeviceError, match=r"CUDA is not available \(torch .* without CUDA|no CUDA device"):
        lowc.load(saved, device="cuda")
    r = run_lowc("compile", "tiny-llama", "--target", "ref-fp32", "-o", "unused", "--device", "cuda")
    assert r.returncode == 2 and "CUDA is not available" in r.stderr, r.stderr


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "gpu0", ""])
def test_unknown_device(saved, device):
    with pytest.raises(DeviceError, match=r"device"):
        lowc.load(saved, device=device)


# ---- 11. non-finite weights ---------------------------------------------------------------------------


def test_nonfinite_weights_fail_naming_the_tensor(tmp_path):
    model, _ = _small_llama()
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[3, 5] = float("nan")
        model.model.layers[0].mlp.down_proj.weight[1, 1] = float("inf")
    with pytest.raises(ModelLoadError, match=r"weight model.layers.0.mlp.down_proj.weight has 2 NaN/inf"):
        lowc.compile(model, target="ref-w4a16", progress=False)
    cm = lowc.compile(model, target="ref-fp32", progress=False, allow_nonfinite=True)
    assert cm is not None and cm.manifest["target"] == "ref-fp32"


@pytest.mark.slow
def test_nonfinite_cli(tmp_path):
    model, tok = _small_llama()
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("-inf")
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    r = run_lowc("compile", tmp_path / "m", "--target", "ref-w8a16", "-o", tmp_path / "o")
    assert r.returncode == 2 and "lm_head.weight has 1 NaN/inf" in r.stderr and "--allow-nonfinite" in r.stderr
    assert not (tmp_path / "o").exists()
    r = run_lowc("compile", tmp_path / "m", "--target", "ref-fp32", "-o", tmp_path / "o", "--allow-nonfinite", "-q")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("bad", [{"kernel": "gemv", "block_n": "__import__('os')"}, "x", {"kernel": "evil"},
                                 {"kernel": "gemv", "block_n": 100, "block_k": 128, "block_m": 1, "split_k": 0,
                                  "group_m": 8, "unpack": 0, "num_warps": 4, "num_stages": 2},
                                 {"kernel": "gemv", "block_n": 1 << 20, "block_k": 128, "block_m": 1, "split_k": 0,
                                  "group_m": 8, "unpack": 0, "num_warps": 4, "num_stages": 2}])
def test_triton_autotune_cache_is_parsed_strictly(tmp_path, monkeypatch, bad):
    """The autotune cache is a file anyone with access to the cache dir may edit: a malformed entry
    is ignored (the config is tuned again), never passed to a kernel launch."""
    from lowc.backends.triton import autotune

    monkeypatch.setenv("LOWC_CACHE_DIR", str(tmp_path))
    (tmp_path / "triton").mkdir()
    (tmp_path / "triton" / "autotune.json").write_text(json.dumps({"k": {"config": bad}}))
    autotune.clear_memory()
    try:
        assert autotune.lookup("k") is None
    finally:
        autotune.clear_memory()


def test_plain_module_artifact_round_trips(tmp_path):
    """A plain nn.Module's graph inputs are named by its forward (``input``), its specs ``input_0``:
    the strict loader checks the count, and names only for models called with keyword inputs."""
    net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    x = torch.randn(3, 64)
    cm = lowc.compile(net, target="ref-w8a16", example_inputs=(x,), progress=False)
    cm.save(tmp_path / "m")
    torch.testing.assert_close(lowc.load(tmp_path / "m")(x), cm(x))
