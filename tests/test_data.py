"""The texts lowc ships (``lowc.data``): a clone or a plain ``pip install`` needs nothing beside it.

The WikiText-2 splits are package data with their license note; every text argument (``calib=``,
``--calib``, ``--data``) takes a file or a built-in name; no tracked file points outside the
repository for its data; a built wheel carries the texts and finds them where it is installed."""

from __future__ import annotations

import glob
import hashlib
import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

from lowc import data
from lowc.errors import CalibrationError, DataError, LowcError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: WikiText-2 raw word-level splits as pytorch/examples ships them
VALID_SHA256 = "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8"
TEST_SHA256 = "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0"


def test_builtin_texts_are_the_wikitext2_splits_with_their_license():
    assert data.names() == ["wikitext-2-valid", "wikitext-2-test"]
    valid, test = data.wikitext2("valid"), data.wikitext2("test")
    assert valid == data.path("wikitext-2-valid") and test == data.path("wikitext-2-test")
    assert os.path.dirname(valid) == os.path.join(ROOT, "compiler", "data", "wikitext-2")
    for p, digest in ((valid, VALID_SHA256), (test, TEST_SHA256)):  # the unmodified files the license note names
        with open(p, "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == digest, p
    note = open(os.path.join(os.path.dirname(valid), "README.md"), encoding="utf-8").read()
    lic = open(os.path.join(os.path.dirname(valid), "LICENSE"), encoding="utf-8").read()
    assert "Merity" in note and "CC BY-SA" in note and "CC BY-SA 4.0" in lic and "Merity" in lic
    with pytest.raises(DataError, match="'train'"):
        data.wikitext2("train")
    with pytest.raises(DataError, match="built-in texts: wikitext-2-valid, wikitext-2-test"):
        data.path("wikitext-103")


def test_resolve_takes_files_first_then_builtin_names(tmp_path, monkeypatch):
    assert data.resolve("wikitext-2-test") == data.wikitext2("test")
    f = tmp_path / "mine.txt"
    f.write_text("my own text")
    assert data.resolve(str(f)) == str(f) and data.read(f) == "my own text"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "wikitext-2-valid").write_text("a local file of that name")  # an existing file wins
    assert data.read("wikitext-2-valid") == "a local file of that name"
    assert data.identify("wikitext-2-valid") == str(tmp_path / "wikitext-2-valid")
    assert data.identify("wikitext-2-test") == "wikitext-2-test"
    with pytest.raises(DataError, match=r"^--data 'nope.txt' does not exist \(nor is it a built-in text: wikitext-2-valid"):
        data.resolve("nope.txt", "--data")
    with pytest.raises(CalibrationError, match="calibration file 'nope.txt' does not exist"):
        data.resolve("nope.txt", "calibration file", CalibrationError)
    assert issubclass(DataError, LowcError)


@pytest.mark.slow
def test_calibration_takes_a_builtin_name_and_records_it():
    from lowc.frontend.presets import byte_tokenizer
    from lowc.passes.calibration import load_calibration

    c = load_calibration("wikitext-2-valid", byte_tokenizer(), n_samples=2, seq_len=16)
    assert len(c) == 2 and c.describe()["source"] == "wikitext-2-valid"
    by_path = load_calibration(data.wikitext2("valid"), byte_tokenizer(), n_samples=2, seq_len=16)
    assert all(a.equal(b) for a, b in zip(c.samples, by_path.samples))


def _tracked_files() -> list[str]:
    if shutil.which("git") is None or not os.path.isdir(os.path.join(ROOT, ".git")) and not os.path.isfile(os.path.join(ROOT, ".git")):
        pytest.skip("not a git checkout")
    r = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True)
    return [p for p in r.stdout.split("\0") if p and not p.startswith((".ci/", ".git/"))]


#: spellings of a data path outside the repository: the sibling folder beside the clone, its data/
#: subfolder, and the os.path.join form the tests and benchmarks used before lowc.data; the folder's
#: name is assembled so that this file, which is scanned too, holds none of the spellings itself
_SIBLING = "sha" + "red"
OUTSIDE = re.compile(r"\.\./" + _SIBLING + "|" + _SIBLING + r"/data|[\"']" + _SIBLING + r"[\"']\s*,\s*[\"']data[\"']")


def test_no_tracked_file_reads_data_from_outside_the_repository():
    hits = []
    for rel in _tracked_files():
        path = os.path.join(ROOT, rel)
        if not os.path.isfile(path) or rel.startswith("compiler/data/wikitext-2/"):
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            for i, line in enumerate(f, 1):
                if OUTSIDE.search(line):
                    hits.append(f"{rel}:{i}: {line.strip()[:120]}")
    assert not hits, "paths outside the repository (use lowc.data):\n" + "\n".join(hits)


def test_the_outside_path_check_catches_each_spelling():
    for line in (f'calib="../{_SIBLING}/data/wikitext-2/valid.txt"', f"/work/{_SIBLING}/data/wikitext-2/test.txt",
                 f'os.path.join(HERE, "..", "..", "{_SIBLING}", "data", "wikitext-2")'):
        assert OUTSIDE.search(line), line
    assert not OUTSIDE.search("a shared denominator; shared memory; data.wikitext2('valid')")


def test_pyproject_ships_the_texts_as_package_data():
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        pkg_data = tomllib.load(f)["tool"]["setuptools"]["package-data"]["lowc.data"]
    shipped = sorted(os.path.relpath(p, os.path.join(ROOT, "compiler", "data"))
                     for p in glob.glob(os.path.join(ROOT, "compiler", "data", "wikitext-2", "*")))
    assert sorted(pkg_data) == shipped == ["wikitext-2/LICENSE", "wikitext-2/README.md", "wikitext-2/test.txt",
                                           "wikitext-2/valid.txt"]


def test_a_built_wheel_carries_the_texts_and_finds_them_installed(tmp_path):
    """A non-editable build (what `pip install .` installs) holds lowc/data/wikitext-2/*, and
    lowc.data resolves them from the installed location, not from this checkout."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("compiler", "ir", "passes", "backends"):
        shutil.copytree(os.path.join(ROOT, name), src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path / "dist")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = glob.glob(str(tmp_path / "dist" / "lowc-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        assert {"lowc/data/__init__.py", "lowc/data/wikitext-2/valid.txt", "lowc/data/wikitext-2/test.txt",
                "lowc/data/wikitext-2/LICENSE", "lowc/data/wikitext-2/README.md"} <= names
        z.extractall(tmp_path / "site")
    code = "import lowc.data as d; print(d.wikitext2('valid')); print(d.wikitext2('test'))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path / "site")})
    assert r.returncode == 0, r.stderr
    for line in r.stdout.split():
        assert line.startswith(str(tmp_path / "site" / "lowc" / "data")) and os.path.getsize(line) > 1_000_000
