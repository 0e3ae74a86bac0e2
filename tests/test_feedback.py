"""What lowc says while it works, and what it checks before it works.

* Every long step says what it is doing as it starts (loading, tracing, each pass, writing), also
  when the output is piped: checked through the installed entry point with a model that holds the
  process inside tracing until the test has seen the "tracing" line. No third-party warning leaks.
* Argument errors (a pass needing calibration without ``--calib``, ``--print-after`` naming a pass
  the pipeline does not have, a missing calibration file) fail before the model is loaded or traced,
  in the CLI (one line, exit 2) and in ``lowc.compile``.
"""

from __future__ import annotations

import os
import queue
import subprocess
import threading
from dataclasses import dataclass

import pytest

import lowc
from conftest import lowc_exe, run_lowc
from lowc.passes.base import Pass, PassResult
from test_cli import assert_clean_error

GATED_MODEL = '''
"""A small Llama whose forward waits until the file $LOWC_TEST_GATE exists."""
import os
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM


class GatedLlamaForCausalLM(LlamaForCausalLM):
    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        deadline = time.monotonic() + 600
        while not os.path.exists(os.environ["LOWC_TEST_GATE"]):
            if time.monotonic() > deadline:
                raise RuntimeError("the test never opened the gate")
            time.sleep(0.05)
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


def build():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return GatedLlamaForCausalLM(cfg).eval()
'''


def test_cli_says_each_step_as_it_starts_into_a_pipe(tmp_path):
    (tmp_path / "gated_llama.py").write_text(GATED_MODEL)
    gate = tmp_path / "gate"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}  # warnings as a user sees them
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path), env.get("PYTHONPATH")])), LOWC_TEST_GATE=str(gate))
    proc = subprocess.Popen([lowc_exe(), "compile", "gated_llama:build", "-t", "ref-w4a16", "-o", str(tmp_path / "o")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines: queue.Queue = queue.Queue()

    def pump():
        for line in proc.stderr:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    seen: list[str] = []
    try:
        # the model's forward blocks while the gate is closed: the "tracing" line must come through
        # the pipe while lowc is inside torch.export, not when it exits
        while not any("tracing" in l for l in seen):
            try:
                line = lines.get(timeout=300)
            except queue.Empty:
                pytest.fail("no 'tracing' line came through the pipe in 300 s while lowc was tracing:\n" + "".join(seen))
            assert line is not None, "lowc exited before saying it was tracing:\n" + "".join(seen)
            seen.append(line)
        assert proc.poll() is None
        gate.touch()
        stdout = proc.stdout.read()
        assert proc.wait(timeout=300) == 0, "".join(seen)
    finally:
        gate.touch()
        if proc.poll() is None:
            proc.kill()
    while (line := lines.get(timeout=60)) is not None:
        seen.append(line)
    err = "".join(seen)
    order = ["lowc: compiling gated_llama:build for ref-w4a16", "lowc: loading gated_llama:build",
             "lowc: tracing gated_llama:build (GatedLlamaForCausalLM)", "lowc: [1/2] method pass rtn", "rtn done in",
             "lowc: [2/2] finalize pass remove-dead", "remove-dead done in", "lowc: writing"]
    at = [err.find(s) for s in order]
    assert all(i >= 0 for i in at) and at == sorted(at), err
    assert "Warning" not in err, err  # e.g. torch's FutureWarning about LeafSpec when a program is copied
    assert "wrote" in stdout


def test_api_progress_lines_come_before_the_work(capsys):
    seen_err = []

    @dataclass(frozen=True)
    class Reads(Pass):
        """Records what was on stderr when it ran."""

        name = "reads"

        def run(self, program, ctx) -> PassResult:
            seen_err.append(capsys.readouterr().err)
            return PassResult(changed=False)

    lowc.compile("tiny-llama", target="ref-fp32", passes=[Reads()])
    before = seen_err[0]
    for line in ("lowc: compiling tiny-llama for ref-fp32", "lowc: loading tiny-llama", "lowc: tracing tiny-llama",
                 "lowc: [1/2] method pass reads"):
        assert line in before, before
    assert "reads done in" in capsys.readouterr().err
    lowc.compile("tiny-llama", target="ref-fp32", passes=[Reads()], progress=False)
    assert capsys.readouterr().err == ""


# ---- arguments checked before the model is loaded ----------------------------------------------------
@pytest.mark.parametrize(
    "extra,needles",
    [
        (["--pass", "gptq"], ["pass 'gptq' needs calibration data", "--calib"]),
        (["--pass", "rtn", "--pass", "quantize-activations{static=true}"], ["pass 'quantize-activations' needs calibration"]),
        (["--print-after", "gptq"], ["--print-after gptq: no such pass", "rtn"]),
        (["--calib", "{tmp}/missing.txt", "--print-after", "rtn"], ["missing.txt", "does not exist"]),
    ],
)
def test_cli_checks_arguments_before_loading_the_model(tmp_path, extra, needles):
    # the model does not exist: had lowc looked at it first, the error would be about the model
    extra = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    res = run_lowc("compile", tmp_path / "no-such-model", "-t", "ref-w8a8", "-o", tmp_path / "o", *extra)
    assert_clean_error(res, *needles)
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not (tmp_path / "o").exists()


def test_api_checks_arguments_before_tracing(tmp_path, monkeypatch):
    import lowc.api
    from lowc.errors import CalibrationError, PassError

    def no_trace(*a, **k):
        raise AssertionError("the model was traced before the arguments were checked")

    monkeypatch.setattr(lowc.api, "trace", no_trace)
    with pytest.raises(CalibrationError, match="pass 'gptq' needs calibration data"):
        lowc.compile("tiny-llama", target="ref-w4a16", passes=["gptq"])
    with pytest.raises(CalibrationError, match="missing.txt' does not exist"):
        lowc.compile("tiny-llama", target="ref-w4a16", calib=str(tmp_path / "missing.txt"))
    # the target's default method depends on whether calibration is given (GPTQ with, RTN without)
    text = tmp_path / "calib.txt"
    text.write_text("some calibration text " * 50)
    with pytest.raises(PassError, match=r"--print-after rtn: no such pass in this pipeline \(gptq, remove-dead\)"):
        lowc.compile("tiny-llama", target="ref-w4a16", calib=str(text), print_after=["rtn"])
    with pytest.raises(PassError, match=r"--print-after gptq: no such pass in this pipeline \(rtn, remove-dead\)"):
        lowc.compile("tiny-llama", target="ref-w4a16", print_after=["gptq"])
