"""README.md and .ci/run stay in agreement: CI runs exactly the README's test command, and the
README's tables name every registered target and pass."""

from __future__ import annotations

import os
import re

ROOT = os.path.join(os.path.dirname(__file__), "..")


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


def test_readme_tables_list_every_target_and_pass():
    import lowc
    from lowc.passes.registry import PASSES

    readme = _read("README.md")
    for name in lowc.targets():
        assert f"`{name}`" in readme, f"target {name} missing from README"
    for name in PASSES:
        assert f"`{name}`" in readme, f"pass {name} missing from README"


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
