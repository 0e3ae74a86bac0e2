"""The IR: verifier, printer, node metadata, and the pipeline's verify/print/failure reporting."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import pytest
import torch
from torch.testing import FileCheck

from lowc.errors import CalibrationError, PassError, VerificationError
from lowc.ir.capture import trace
from lowc.ir import meta as nodemeta
from lowc.ir import printer, verifier
from lowc.ir.scheme import Scheme
from lowc.passes.base import Pass, PassContext, PassResult
from lowc.passes.cleanup import RemoveDead
from lowc.passes.pipeline import Pipeline, run_passes
from lowc.passes.quant.rtn import RTN


@pytest.fixture(scope="module")
def base():
    return trace("tiny-llama")


@pytest.fixture
def prog(base):
    return base.clone()


def _output(program):
    return next(n for n in program.graph.nodes if n.op == "output")


# ---- verifier ------------------------------------------------------------------------------------


def test_traced_program_verifies(prog):
    verifier.verify(prog)
    assert prog.info.block_prefix == "model.layers"
    assert len(prog.linears()) == 4 * 7 + 1


def test_verifier_catches_unknown_op(prog):
    anchor = prog.linears()[0]
    with prog.graph.inserting_after(anchor):
        bad = prog.graph.create_node("call_function", lambda t: t * 2, (anchor,), name="sneaky")
    anchor.replace_all_uses_with(bad, delete_user_cb=lambda u: u is not bad)
    prog.gm.recompile()
    with pytest.raises(VerificationError, match=r"node sneaky: unknown op <function"):
        verifier.verify(prog)


def test_verifier_rejects_call_module(prog):
    prog.gm.add_module("extra", torch.nn.Identity())
    anchor = prog.linears()[0]
    with prog.graph.inserting_after(anchor):
        prog.graph.create_node("call_module", "extra", (anchor,), name="mod_call")
    with pytest.raises(VerificationError, match=r"node mod_call: call_module is not allowed"):
        verifier.verify(prog)


def test_verifier_catches_orphan_parameter(prog):
    prog.gm.get_submodule("model.layers.1").register_buffer("stray", torch.zeros(3))
    with pytest.raises(VerificationError, match=r"orphan parameter 'model.layers.1.stray'"):
        verifier.verify(prog)
    # and after removing it the program is valid again
    del prog.gm.get_submodule("model.layers.1")._buffers["stray"]
    verifier.verify(prog)


def test_verifier_catches_dangling_get_attr(prog):
    with prog.graph.inserting_before(_output(prog)):
        prog.graph.create_node("get_attr", "model.layers.0.nope", name="dangling")
    with pytest.raises(VerificationError, match=r"dangling.*model\.layers\.0\.nope|nope.*dangling"):
        verifier.verify(prog)


def test_verifier_catches_shape_error(prog):
    q = prog.gm.get_submodule("model.layers.0.self_attn.q_proj")
    q.weight = torch.nn.Parameter(torch.zeros(256, 200), requires_grad=False)  # in_features 256 -> 200
    with pytest.raises(VerificationError, match=r"shape propagation failed at node linear \(aten\.linear\.default\)"):
        verifier.verify(prog)
    # recorded shapes are restored after a failed propagation
    node = prog.linears()[0]
    assert list(node.meta["val"].shape)[-1] == 256


def test_verifier_catches_changed_output_shape(prog):
    # a weight with more rows changes the linear's recorded output width
    q = prog.gm.get_submodule("model.layers.0.self_attn.q_proj")
    q.weight = torch.nn.Parameter(torch.zeros(300, 256), requires_grad=False)
    with pytest.raises(VerificationError, match=r"node (linear|view)\b"):
        verifier.verify(prog)


def test_verifier_checks_dtype_against_recorded(prog):
    node = prog.linears()[0]
    node.meta["val"] = torch.empty(2, 16, 256, dtype=torch.float16)
    with pytest.raises(VerificationError, match=rf"node {node.name}: recorded torch.float16"):
        verifier.verify(prog)


# ---- printer -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_printer_is_stable_across_traces(base):
    again = trace("tiny-llama")
    a, b = printer.format_program(base), printer.format_program(again)
    assert a == b
    assert printer.format_program(base) == a  # printing does not change anything


def test_printer_shows_roles_and_blocks(base):
    text = printer.format_program(base)
    assert text.startswith("program kind=causal-lm blocks=model.layers\n")
    q_lines = [l for l in text.splitlines() if "aten.linear.default" in l and "role=q block=0" in l]
    assert len(q_lines) == 1
    assert re.fullmatch(
        r"%\w+ = aten\.linear\.default\(%\w+, @model\.layers\.0\.self_attn\.q_proj\.weight\) : f32\[\w+, \w+, 256\]"
        r"  # layer=model\.layers\.0\.self_attn\.q_proj role=q block=0",
        q_lines[0],
    ), q_lines[0]
    fc = FileCheck()
    for block in range(4):
        for role in ("q", "k", "v", "o", "gate", "up", "down"):
            fc = fc.check("aten.linear.default").check(f"role={role} block={block}")
    fc.check("@lm_head.weight").check("role=lm_head").check("return ").run(text)
    assert "role=embed" in text
    assert sum(1 for l in text.splitlines() if l.startswith("%") and "= input()" in l) == 2


def test_printer_after_rtn(prog):
    run_passes(prog, [RTN(bits=4, group_size=128)])
    text = printer.format_program(prog)
    float_linears = [l for l in text.splitlines() if "aten.linear.default" in l]
    assert len(float_linears) == 1 and "role=lm_head" in float_linears[0]
    wq = [l for l in text.splitlines() if "lowc.linear_wq.default" in l]
    assert len(wq) == 28
    q = next(n for n in prog.graph.nodes if n.target == torch.ops.lowc.linear_wq.default)
    assert wq[0].startswith(f"%{q.name} = "), wq[0]  # the first linear_wq is q_proj of block 0
    assert q.args[0].target == torch.ops.aten.mul.Tensor  # the RMSNorm output (its name varies by torch version)
    assert wq[0].split(" = ", 1)[1].startswith(
        f"lowc.linear_wq.default(%{q.args[0].name}, @model.layers.0.self_attn.q_proj.qweight, "
        "@model.layers.0.self_attn.q_proj.scales, @model.layers.0.self_attn.q_proj.zeros, None, 4, 128, 256)"
    ), wq[0]
    assert wq[0].endswith(
        "# layer=model.layers.0.self_attn.q_proj role=q block=0 "
        "scheme=W4A16,g128,asym method=rtn"
    ), wq[0]
    lm = [l for l in text.splitlines() if "role=lm_head" in l]
    assert len(lm) == 1 and "aten.linear.default" in lm[0] and "scheme=" not in lm[0]
    assert ".weight" not in "".join(wq)  # float weights of quantized layers are gone


# ---- metadata ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layer, role",
    [
        ("model.layers.3.self_attn.q_proj", "q"),
        ("model.layers.3.mlp.down_proj", "down"),
        ("model.layers.3.mlp.gate_proj", "gate"),
        ("encoder.layer.0.attention.self.query", "q"),
        ("encoder.layer.0.attention.self.value", "v"),
        ("encoder.layer.0.attention.output.dense", "o"),
        ("encoder.layer.0.intermediate.dense", "up"),
        ("encoder.layer.0.output.dense", "down"),
        ("encoder.layer.0.output.LayerNorm", "norm"),
        ("lm_head", "lm_head"),
        ("pooler.dense", ""),
    ],
)
def test_role_of(layer, role):
    assert nodemeta.role_of(layer) == role


def test_node_info_json_round_trip():
    info = nodemeta.NodeInfo(layer="a.b", role="q", block=0, scheme=Scheme(4, 64, True, a_bits=8, a_static="mse"),
                             method="gptq", transforms=("smoothquant(alpha=0.5)",))
    assert nodemeta.NodeInfo.from_json(json.loads(json.dumps(info.to_json()))) == info
    assert nodemeta.NodeInfo().to_json() == {}


# ---- pipeline ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Failing(Pass):
    name = "failing"

    def run(self, program, ctx):
        raise RuntimeError("boom\nsecond line")


@dataclass(frozen=True)
class Breaking(Pass):
    """Leaves an orphan buffer behind: the verifier must catch it after this pass."""

    name = "breaking"

    def run(self, program, ctx):
        program.gm.register_buffer("left_over", torch.ones(2))
        return PassResult(changed=True)


@dataclass(frozen=True)
class NoResult(Pass):
    name = "no-result"

    def run(self, program, ctx):
        return None


@dataclass(frozen=True)
class NeedsCalib(Pass):
    name = "needs-calib"
    requires = frozenset({"calibration"})

    def run(self, program, ctx):  # pragma: no cover - never reached
        return PassResult(changed=False)


def test_pipeline_names_failing_pass_and_those_before(prog):
    pipe = Pipeline([("method", RTN(bits=4)), ("finalize", RemoveDead()), ("user", Failing())])
    with pytest.raises(PassError, match=r"^pass 'failing' failed \(after rtn, remove-dead\): RuntimeError: boom$"):
        pipe.run(prog, PassContext())


def test_pipeline_first_pass_failure(prog):
    with pytest.raises(PassError, match=r"pass 'failing' failed \(first pass\)"):
        Pipeline([("user", Failing()), ("user", RTN())]).run(prog, PassContext())


def test_pipeline_verifies_after_each_pass(prog):
    pipe = Pipeline([("user", RemoveDead()), ("user", Breaking()), ("user", RemoveDead())])
    with pytest.raises(PassError, match=r"IR invalid after pass 'breaking' \(after remove-dead\): orphan parameter 'left_over'"):
        pipe.run(prog, PassContext())
    # without verification the same pipeline runs (remove-dead then drops the buffer)
    records = Pipeline([("user", Breaking()), ("user", RemoveDead())], verify=False).run(prog, PassContext())
    assert [r.result.changed for r in records] == [True, True]
    verifier.verify(prog)


def test_pipeline_rejects_non_result(prog):
    with pytest.raises(PassError, match=r"pass 'no-result' returned NoneType, not PassResult"):
        Pipeline([("user", NoResult())]).run(prog, PassContext())


def test_pipeline_missing_precondition(prog):
    with pytest.raises(CalibrationError, match=r"pass 'needs-calib' needs calibration data"):
        Pipeline([("user", RemoveDead()), ("user", NeedsCalib())]).run(prog, PassContext())


def test_unknown_requirement_raises(prog):
    @dataclass(frozen=True)
    class Misspelt(Pass):
        name = "misspelt"
        requires = frozenset({"calibraton"})

        def run(self, program, ctx):  # pragma: no cover - never reached
            return PassResult(changed=False)

    with pytest.raises(PassError, match=r"pass 'misspelt' requires 'calibraton', which is not a known requirement "
                                        r"\(known: calibration\)"):
        Pipeline([("user", Misspelt())]).run(prog, PassContext(calib=object()))
    with pytest.raises(PassError, match="pass 'x' requires 'calibraton'"):
        PassContext().require("calibraton", "x")


# ---- remove-dead ---------------------------------------------------------------------------------


def test_remove_dead_printed_graph(prog):
    """An unused computation and an attribute no node reads are erased; the rest of the graph prints
    the same; a second run reports changed=False."""
    before = printer.format_program(prog)
    q = prog.linears()[0]
    with prog.graph.inserting_after(q):
        dead = prog.graph.call_function(torch.ops.aten.sigmoid.default, (q,))
    prog.gm.register_buffer("stale", torch.zeros(3))
    getter = prog.get_attr_node("stale", q)
    with prog.graph.inserting_after(getter):
        neg = prog.graph.call_function(torch.ops.aten.neg.default, (getter,))
    prog.gm.recompile()
    text = printer.format_program(prog)
    FileCheck().check(f"%{neg.name} = aten.neg.default(@stale)").check(f"%{q.name} = aten.linear.default(") \
        .check_next(f"%{dead.name} = aten.sigmoid.default(%{q.name})").run(text)

    (rec,) = run_passes(prog, [RemoveDead()], PassContext())
    assert rec.result.changed and rec.result.stats == {"nodes_removed": 3, "removed": 1}  # the buffer
    text = printer.format_program(prog)
    FileCheck().check_not("aten.sigmoid.default").check_not("@stale").check_not(f"%{neg.name} =").run(text)
    assert text == before and "stale" not in dict(prog.gm.named_buffers())
    (again,) = run_passes(prog, [RemoveDead()], PassContext())
    assert again.result.changed is False and again.result.stats == {"nodes_removed": 0, "removed": 0}


def test_pipeline_records(prog):
    import time

    t0 = time.perf_counter()
    records = Pipeline([("method", RTN(bits=8, group_size=-1)), ("finalize", RemoveDead())]).run(prog, PassContext())
    wall = time.perf_counter() - t0
    assert [(r.phase, r.pass_.name, r.result.changed) for r in records] == [("method", "rtn", True), ("finalize", "remove-dead", False)]
    j = records[0].to_json()
    assert j["name"] == "rtn" and j["options"]["bits"] == 8 and j["phase"] == "method" and j["changed"] is True
    assert j["stats"]["quantized"] == 28 and j["seconds"] == round(records[0].seconds, 4)
    assert 0 < records[0].seconds and records[0].seconds + records[1].seconds <= wall  # each pass timed on its own


def test_print_after(prog):
    out: list[str] = []
    pipe = Pipeline([("method", RTN(bits=4)), ("finalize", RemoveDead())], print_after=("rtn",), printer_out=out.append)
    pipe.run(prog, PassContext())
    assert len(out) == 1
    assert out[0].startswith("// ----- IR after rtn{bits=4} -----\nprogram kind=causal-lm")
    assert out[0].endswith(printer.format_program(prog))
    assert "lowc.linear_wq.default" in out[0]


@pytest.mark.slow
def test_print_after_to_stdout(prog, capsys):
    Pipeline([("finalize", RemoveDead())], print_after=("remove-dead",)).run(prog, PassContext())
    assert "// ----- IR after remove-dead -----" in capsys.readouterr().out


def test_print_after_unknown_pass(prog):
    before = printer.format_program(prog)
    pipe = Pipeline([("method", RTN()), ("finalize", RemoveDead())], print_after=("gptq",), printer_out=lambda s: None)
    with pytest.raises(PassError, match=r"--print-after gptq: no such pass in this pipeline \(rtn, remove-dead\)"):
        pipe.run(prog, PassContext())
    assert printer.format_program(prog) == before  # nothing ran
