"""The layers point one way (ARCHITECTURE.md): no module imports from a layer above its own, and
function-local imports exist only where an optional dependency demands them.

Layers, lowest first (a module may import its own layer and the ones before it):

    base      lowc.errors, lowc.progress, lowc.version, lowc.untrusted, lowc.data
    frontend  lowc.frontend      (loading models, capturing them with torch.export)
    ir        lowc.ir            (Program, dialect ops, analyses, serialization, the verifier)
    passes    lowc.passes        (compression passes, pipeline, options)
    runtime   lowc.runtime       (generation: decoding loops, KV/recurrent state)
    backends  lowc.backends      (targets, lowering passes, kernels, the registry of everything)
    api       lowc.api, lowc.artifact, lowc.evaluate, lowc.export, lowc.formats (export formats), lowc.search_api,
              lowc.distributed (Ray worker pool)
    cli       lowc.cli

``lowc`` itself (compiler/__init__.py) is a lazy facade: it imports nothing at module level.
"""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")
PACKAGE_DIRS = {"compiler": "lowc", "ir": "lowc.ir", "passes": "lowc.passes", "backends": "lowc.backends"}
LAYERS = ("base", "frontend", "ir", "passes", "runtime", "backends", "api", "cli")
BASE = ("lowc.errors", "lowc.progress", "lowc.version", "lowc.untrusted", "lowc.data")
API = ("lowc.api", "lowc.artifact", "lowc.evaluate", "lowc.export", "lowc.formats", "lowc.search_api", "lowc.distributed")
#: packages a module may import inside a function, with a comment saying why: optional extras
OPTIONAL = ("triton", "onnx", "onnxruntime", "onnxscript", "onnx_ir", "gguf")
#: modules that are lazy on purpose: the package facade (``import lowc`` imports no torch) and the
#: CLI (``lowc --help`` and errors in the arguments answer without importing torch)
LAZY_MODULES = ("lowc", "lowc.cli")


def layer_of(module: str) -> str:
    if module == "lowc":
        return "top"
    for prefix in BASE:
        if module == prefix or module.startswith(prefix + "."):
            return "base"
    for name in ("frontend", "ir", "passes", "runtime", "backends"):
        if module == f"lowc.{name}" or module.startswith(f"lowc.{name}."):
            return name
    if any(module == m or module.startswith(m + ".") for m in API):
        return "api"
    if module == "lowc.cli":
        return "cli"
    raise AssertionError(f"module {module} belongs to no layer: add it to tests/test_layers.py and ARCHITECTURE.md")


def _modules():
    for d, pkg in PACKAGE_DIRS.items():
        for root, _, files in os.walk(os.path.join(ROOT, d)):
            for f in sorted(files):
                if not f.endswith(".py"):
                    continue
                path = os.path.join(root, f)
                rel = os.path.relpath(path, os.path.join(ROOT, d))[:-3].replace(os.sep, ".")
                rel = rel[: -len("__init__")].rstrip(".") if rel.endswith("__init__") else rel
                name = f"{pkg}.{rel}" if rel else pkg
                if pkg == "lowc" and rel.split(".")[0] in ("ir", "passes", "backends"):
                    continue
                yield name, path


def _imports(path: str):
    """(imported lowc module, line, function-local?) for every import of lowc in the file, and the
    function-local imports of other packages as (package, line, source line)."""
    src = open(path).read()
    lines = src.splitlines()
    lowc_imports, local_others = [], []
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            targets = [node.module] if node.module != "lowc" else [f"lowc.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        local = node.col_offset > 0
        text = "\n".join(lines[node.lineno - 1:node.end_lineno])  # the whole statement, comments included
        for t in targets:
            if t == "lowc" or t.startswith("lowc."):
                lowc_imports.append((t, node.lineno, local, text))
            elif local:
                local_others.append((t.split(".")[0], node.lineno, text))
    return lowc_imports, local_others


def _resolve(module: str) -> str:
    """``lowc.ir.meta`` stays; ``lowc.frontend.trace.capture`` (a name, not a module) -> its module."""
    while module.count(".") > 0:
        rel = module.split(".", 1)[1].replace(".", os.sep)
        d = {"ir": "ir", "passes": "passes", "backends": "backends"}.get(module.split(".")[1])
        base = os.path.join(ROOT, d, *rel.split(os.sep)[1:]) if d else os.path.join(ROOT, "compiler", rel)
        if os.path.isfile(base + ".py") or os.path.isdir(base):
            return module
        module = module.rsplit(".", 1)[0]
    return module


MODULES = dict(_modules())


def test_every_module_has_a_layer():
    assert len(MODULES) > 80
    for name in MODULES:
        if name not in LAZY_MODULES:
            layer_of(name)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_import_from_a_layer_above(module):
    if module == "lowc":
        return
    mine = LAYERS.index(layer_of(module))
    lowc_imports, _ = _imports(MODULES[module])
    for target, line, _local, _text in lowc_imports:
        target = _resolve(target)
        assert target != "lowc", f"{module}:{line} imports the lowc facade; import the module that defines the name"
        theirs = layer_of(target)
        assert LAYERS.index(theirs) <= mine, (
            f"{module} (layer {layer_of(module)}) imports {target} (layer {theirs}) at line {line}: "
            f"layers point one way: {' -> '.join(LAYERS)}")


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m not in LAZY_MODULES))
def test_function_local_imports_only_for_optional_dependencies(module):
    """A function-local import hides the module graph; it is allowed for an optional dependency
    (triton, onnx...) or a module that imports one (``# optional: ...``), and for the few imports
    that cost seconds where only one function needs them (transformers' model classes in the
    presets: ``# lazy: ...``), each with a comment saying so."""
    lowc_imports, others = _imports(MODULES[module])
    for target, line, local, text in lowc_imports:
        if local:
            assert "# optional" in text or "# lazy" in text, (
                f"{module}:{line}: function-local import of {target}: import it at the top of the module "
                "(or, if it pulls in an optional dependency, say so in a '# optional: ...' comment)")
    for pkg, line, text in others:
        assert pkg in OPTIONAL or "# optional" in text or "# lazy" in text, (
            f"{module}:{line}: function-local import of {pkg}: import it at the top of the module "
            "(or, for an optional dependency, say so in a '# optional: ...' comment)")


def test_layer_checks_catch_a_violation(tmp_path):
    """The checks above can fail: an ir module importing the API, and a hidden local import."""
    bad = tmp_path / "bad.py"
    bad.write_text("import os\n\ndef f():\n    from lowc.api import compile\n    import json\n    return compile, json\n")
    lowc_imports, others = _imports(str(bad))
    assert [(t, local) for t, _, local, _ in lowc_imports] == [("lowc.api", True)]
    assert LAYERS.index(layer_of("lowc.api")) > LAYERS.index(layer_of("lowc.ir.meta"))
    assert [p for p, _, _ in others] == ["json"] and "json" not in OPTIONAL
