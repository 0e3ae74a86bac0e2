"""Packaging: the setuptools package list is complete, ``import lowc`` is light, targets are described."""

from __future__ import annotations

import json
import os
import subprocess
import sys

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

import lowc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

with open(os.path.join(ROOT, "pyproject.toml"), "rb") as _f:
    PYPROJECT = tomllib.load(_f)


def _folder_packages() -> set[str]:
    """Every folder with an __init__.py under the four top-level folders, as a lowc.* name."""
    package_dir = PYPROJECT["tool"]["setuptools"]["package-dir"]
    found = set()
    for pkg, folder in package_dir.items():
        base = os.path.join(ROOT, folder)
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not d.startswith((".", "__pycache__"))]
            if "__init__.py" in filenames:
                rel = os.path.relpath(dirpath, base)
                found.add(pkg if rel == "." else pkg + "." + rel.replace(os.sep, "."))
    return found


def test_package_dir_covers_the_four_folders():
    assert PYPROJECT["tool"]["setuptools"]["package-dir"] == {
        "lowc": "compiler", "lowc.ir": "ir", "lowc.passes": "passes", "lowc.backends": "backends",
    }


def test_package_list_matches_folders():
    listed = PYPROJECT["tool"]["setuptools"]["packages"]
    assert len(listed) == len(set(listed)), "duplicate entries in [tool.setuptools] packages"
    found = _folder_packages()
    assert {"lowc", "lowc.ir", "lowc.ir.dialect", "lowc.passes.quant", "lowc.passes.search", "lowc.backends.reference", "lowc.frontend"} <= found
    assert sorted(listed) == sorted(found), (
        f"missing from pyproject: {sorted(found - set(listed))}; listed but not a package: {sorted(set(listed) - found)}"
    )


def test_import_lowc_is_light():
    code = (
        "import json, sys, lowc\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'triton', 'onnx', 'onnxruntime', 'transformers', 'safetensors', 'numpy'))))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    heavy = json.loads(r.stdout.strip().splitlines()[-1])
    assert heavy == [], f"import lowc imported {heavy}"


def test_lazy_attributes():
    assert lowc.__version__ == PYPROJECT["project"]["version"]
    from lowc import api, errors, search_api
    from lowc.backends.registry import all_targets
    from lowc.ir.capture import trace

    # each lazy name resolves to the object it stands for, not just to something
    assert {name: getattr(lowc, name) for name in lowc.__all__ if name != "__version__"} == {
        "compile": api.compile, "load": api.load, "search": search_api.search, "trace": trace, "targets": all_targets,
        "LowcError": errors.LowcError}
    try:
        lowc.no_such_thing
    except AttributeError as e:
        assert "no_such_thing" in str(e)
    else:
        raise AssertionError("lowc.no_such_thing did not raise")


def test_every_target_is_described():
    targets = lowc.targets()
    assert {"ref-fp32", "ref-w8a16", "ref-w4a16", "ref-w8a8", "ref-w4a4"} <= set(targets)
    for name, t in targets.items():
        assert t.name == name
        assert isinstance(t.description, str) and len(t.description.strip()) > 10, name
        assert t.backend
        assert callable(t.pipeline)
