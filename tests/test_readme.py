"""README.md and .ci/run stay in agreement: CI runs exactly the README's test command, the quick
subset is that command restricted to `-m "not slow"`, the README's tables name every registered
target and pass, and every ```python block in the README runs (each in a fresh interpreter in an
empty directory; a block whose first line is ``# needs: cuda`` is skipped without a GPU)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")
#: what a README python block may declare on its first line (``# needs: cuda``)
NEEDS = {"cuda"}


def _read(p):
    with open(os.path.join(ROOT, p)) as f:
        return f.read()


def test_ci_runs_the_readme_test_command():
    readme = _read("README.md")
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    test_cmd = [b for b in blocks if "pytest" in b]
    assert len(test_cmd) == 1, "README must hold exactly one test command"
    ci_lines = [l for l in _read(".ci/run").splitlines() if l and not l.startswith("#")]
    assert test_cmd[0].strip() in ci_lines, ".ci/run must run the README's test command verbatim"
    assert any("torch==2.13.0" in l for l in ci_lines)


def test_readme_quick_subset_is_the_ci_pytest_command_without_slow_tests():
    """The quick command (in prose, so the check above still finds one test block) is CI's pytest
    call with `-m "not slow"` before the test path, and that marker is registered."""
    readme = _read("README.md")
    (test_cmd,) = [b for b in re.findall(r"```bash\n(.*?)\n```", readme, re.S) if "pytest" in b]
    pytest_call = test_cmd.split("&&")[-1].strip()
    assert pytest_call.startswith("python -m pytest ") and pytest_call.endswith(" tests"), pytest_call
    quick = pytest_call[: -len(" tests")] + ' -m "not slow" tests'
    assert f"`{quick}`" in readme, f"README must give the quick subset as `{quick}`"
    assert 'markers = ["slow: ' in _read("pyproject.toml")


def test_parallel_test_command_installs_its_plugin():
    """The test command runs one pytest-xdist worker per core (``-n auto``, a whole file per worker:
    module fixtures are built once), and the ``dev`` extra the command installs provides xdist."""
    readme = _read("README.md")
    (test_cmd,) = [b for b in re.findall(r"```bash\n(.*?)\n```", readme, re.S) if "pytest" in b]
    args = test_cmd.split("&&")[-1].split()
    assert args[args.index("-n") + 1] == "auto" and args[args.index("--dist") + 1] == "loadfile", test_cmd
    assert "'.[dev," in test_cmd
    dev = re.search(r"^dev = \[(.*)\]$", _read("pyproject.toml"), re.M)
    assert dev and '"pytest-xdist' in dev.group(1), "pyproject.toml: the dev extra must install pytest-xdist"


def test_readme_tables_list_every_target_and_pass():
    import lowc
    from lowc.backends.registry import pass_table

    readme = _read("README.md")
    for name in lowc.targets():
        assert f"`{name}`" in readme, f"target {name} missing from README"
    for name in pass_table():
        assert f"`{name}`" in readme, f"pass {name} missing from README"


def _python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", _read("README.md"), re.S | re.M)


def _needs(block: str) -> set[str]:
    m = re.match(r"#\s*needs:\s*(.+)", block.splitlines()[0]) if block.strip() else None
    return {n.strip() for n in m.group(1).split(",")} if m else set()


def test_readme_python_blocks_are_found_and_declare_known_needs():
    blocks = _python_blocks()
    assert blocks, "README has no ```python block"
    assert any("lowc.compile(" in b for b in blocks)
    for b in blocks:
        assert _needs(b) <= NEEDS, f"unknown '# needs:' in README block: {b.splitlines()[0]}"
    assert _needs("# needs: cuda\nimport torch\n") == {"cuda"} and _needs("import torch\n") == set()


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(_python_blocks())))
def test_readme_python_block_runs(index, tmp_path):
    """The block runs as written (fresh interpreter, cwd an empty temporary directory, so its
    ``out/...`` paths stay out of the repository)."""
    block = _python_blocks()[index]
    if "cuda" in _needs(block):
        import torch

        if not torch.cuda.is_available():
            pytest.skip("README block needs CUDA")
    script = tmp_path / f"readme_block_{index}.py"
    script.write_text(block)
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=900,
                       env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert r.returncode == 0, f"README python block {index} failed:\n{block}\n--- stderr ---\n{r.stderr[-3000:]}"


def test_readme_cli_block_lists_every_command():
    from lowc.cli import cli

    readme = _read("README.md")
    block = readme[readme.index("## CLI"):]
    block = block[block.index("```") + 3:]
    block = block[: block.index("```")]
    for name in cli.commands:
        assert f"lowc {name}" in block, f"`lowc {name}` missing from the README's CLI block"


def test_readme_says_what_a_default_onnxruntime_session_computes():
    readme = _read("README.md")
    onnx = readme[readme.index("### ONNX export"):]
    onnx = onnx[: onnx.index("\n### ", 1)]
    for needle in ("default", "session.qdq_matmulnbits_accuracy_level=0", "int8 activations", "metadata_props",
                   "session_options"):
        assert needle in onnx, needle
