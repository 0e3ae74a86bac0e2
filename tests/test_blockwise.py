"""lowc.passes.blockwise on tiny-llama (RoPE, GQA, causal mask) and minilm (BERT: biases, LayerNorm,
pooler in the suffix): segmentation, exact block-by-block reproduction of the program's outputs,
linear taps against an eager model, propagation of a block rewritten with rtn, bad graphs."""

from __future__ import annotations

import re

import pytest
import torch
import torch.fx
from torch.testing import FileCheck

import lowc
from lowc.errors import CalibrationError
from lowc.frontend.trace import load_source
from lowc.ir.capture import trace
from lowc.ir import meta as nodemeta
from lowc.ir.analysis import linear_layer, transformer_blocks
from lowc.ir.dialect import quant
from lowc.ir.scheme import Scheme
from lowc.passes.blockwise import BlockwiseRunner, build_segment, dequantize_once, segments
from lowc.passes.calibration import load_calibration
from lowc.passes.quant.common import linear_weight, rewrite_linear

MODELS = ["tiny-llama", "minilm"]
N_BLOCKS = {"tiny-llama": 4, "minilm": 6}


@pytest.fixture(scope="module")
def eager_and_program():
    """name -> (eager HF model, program traced from that very model)."""
    out = {}
    for name in MODELS:
        model, tok, kind, source = load_source(name)
        model = model.eval()
        out[name] = (model, trace(model))
    return out


def calib(n: int = 3, seed: int = 0):
    """Samples of different lengths (16..28 tokens) so dynamic shapes are exercised."""
    g = torch.Generator().manual_seed(seed)
    return load_calibration([torch.randint(0, 250, (1, 16 + 6 * k), generator=g) for k in range(n)])


def rtn_block(program, block, bits: int = 3) -> int:
    """Quantize the block's linears as the rtn pass does, but only this block's."""
    nodes = block.linears()
    for node in nodes:
        qw = quant.rtn_quantize(linear_weight(program, node), bits, 32, False)
        rewrite_linear(program, node, qw, Scheme(bits, 32), "rtn")
    program.remove_dead()
    return len(nodes)


def block_inputs(program, data, **kw) -> list[list[tuple]]:
    """Per block, per sample, the block's inputs (program left unchanged)."""
    return [block.inputs for block in BlockwiseRunner(program, data, progress=False, **kw)]


# ---- segmentation ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MODELS)
def test_segments_cover_every_node_once(eager_and_program, name):
    program = eager_and_program[name][1]
    segs = segments(program)
    assert [s.kind for s in segs] == ["prefix"] + ["block"] * N_BLOCKS[name] + ["suffix"]
    assert [s.index for s in segs[1:-1]] == list(range(N_BLOCKS[name]))
    listed = [n for s in segs for n in s.nodes + s.attrs]
    assert len(listed) == len(set(listed)) == len(program.graph.nodes)
    assert set(listed) == set(program.graph.nodes)
    assert [n for n in program.graph.nodes if n.op == "placeholder"] == segs[0].nodes[:2]
    assert [n.op for n in segs[-1].nodes][-1] == "output"
    for seg in segs[1:-1]:
        assert {nodemeta.get(n).block for n in seg.nodes} <= {seg.index, None}
        # the block's own nodes form one run in topological order
        order = {n: i for i, n in enumerate(program.graph.nodes)}
        pos = [order[n] for n in seg.nodes]
        assert pos == sorted(pos) and pos[-1] - pos[0] + 1 == len(pos)
    # embeddings before block 0, the final norm / pooler after the last block
    assert all(nodemeta.get(n).block is None for s in (segs[0], segs[-1]) for n in s.nodes)
    assert any(nodemeta.get(n).role == "embed" for n in segs[0].nodes)


def test_block_module_printed(eager_and_program):
    """Block 1 of tiny-llama reads the prefix values and block 0's output and returns its residual."""
    program = eager_and_program["tiny-llama"][1]
    runner = BlockwiseRunner(program, calib(1), progress=False)
    outputs = {}
    for block in runner:
        outputs[block.index] = block.output_names
        if block.index == 1:
            # node names vary by torch version: the shape symbols, the mask, cos/sin, then block 0's output
            names = block.input_names
            assert len(names) == 6 and all(re.fullmatch(r"sym_size_int_\d+", n) for n in names[:2]), names
            assert names[-1:] == outputs[0] and len(block.output_names) == 1
            assert block.layer_prefix == "model.layers.1"
            code = block.module().code
            FileCheck().check(f"def forward(self, {', '.join(names)})") \
                .check("torch.ops.aten.scaled_dot_product_attention.default(") \
                .check(f"return ({block.output_names[0]},)").run(code)
            FileCheck().check_count("torch.ops.aten.linear.default(", 7, exactly=True).run(code)
            assert [linear_layer(n) for n in block.linears()] == [
                f"model.layers.1.{m}" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]


# ---- numbers -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MODELS)
def test_prefix_blocks_suffix_reproduce_program(eager_and_program, name):
    program = eager_and_program[name][1]
    data = calib()
    outs = BlockwiseRunner(program, data, progress=False).outputs()
    assert len(outs) == len(data)
    with torch.no_grad():
        for sample, out in zip(data.samples, outs):
            ref = program.call(input_ids=sample)
            assert type(out) is type(ref) and list(out.keys()) == list(ref.keys())
            for key in ref.keys():
                torch.testing.assert_close(out[key], ref[key], rtol=0, atol=0)


@pytest.mark.parametrize("name", MODELS)
def test_hooks_see_linear_inputs(eager_and_program, name):
    """What a block's hook sees equals what forward hooks on the eager model's nn.Linear see, and
    the output it sees is the linear of that input."""
    model, program = eager_and_program[name]
    data = calib(2)
    prefix = program.info.block_prefix
    eager: dict[str, list[torch.Tensor]] = {}
    handles = []
    for mod_name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and mod_name.startswith(prefix + "."):
            handles.append(mod.register_forward_hook(
                lambda m, args, out, _n=mod_name: eager.setdefault(_n, []).append(args[0].detach().clone())))
    try:
        with torch.no_grad():
            for s in data.samples:
                model(input_ids=s, attention_mask=torch.ones_like(s))
    finally:
        for h in handles:
            h.remove()
    seen: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    runner = BlockwiseRunner(program, data, progress=False)
    for block in runner:
        by_name = {n.name: n for n in block.linears()}
        assert by_name and all(linear_layer(n).startswith(block.layer_prefix + ".") for n in by_name.values())
        block.run(lambda node_name, x, y: seen.setdefault(linear_layer(by_name[node_name]), []).append((x.clone(), y.clone())))
        for node in by_name.values():
            w = linear_weight(program, node)
            b = node.args[2] if len(node.args) > 2 else None
            bias = program.attr(b.target) if isinstance(b, torch.fx.Node) else None
            for x, y in seen[linear_layer(node)]:
                torch.testing.assert_close(y, torch.nn.functional.linear(x, w, bias), rtol=0, atol=0)
    assert set(seen) == set(eager)
    for layer, xs in eager.items():
        assert len(seen[layer]) == len(xs) == len(data)
        for (x, _), ref in zip(seen[layer], xs):
            torch.testing.assert_close(x, ref)


def test_hook_taps_only_block_nodes(eager_and_program):
    program = eager_and_program["tiny-llama"][1]
    runner = BlockwiseRunner(program, calib(1), progress=False)
    blocks = iter(runner)
    first = next(blocks)
    other = next(n for n in program.linears() if nodemeta.get(n).block == 1)
    with pytest.raises(ValueError, match="not a node of this block"):
        first.run(lambda *a: None, nodes=[other])
    second = next(blocks)
    with pytest.raises(CalibrationError, match="model.layers.0 is no longer the current block"):
        first.run()
    assert second.index == 1
    blocks.close()


# ---- propagation ---------------------------------------------------------------------------------
def test_next_block_reads_quantized_block(eager_and_program):
    base = eager_and_program["tiny-llama"][1]
    data = calib()
    float_inputs = block_inputs(base, data)

    # reference: block 0 quantized up front, then an unmodified block-wise run
    ref_prog = base.clone()
    ref_runner = BlockwiseRunner(ref_prog, data, progress=False)
    for block in ref_runner:
        if block.index == 0:
            assert rtn_block(ref_prog, block) == 7
        break
    ref_inputs = block_inputs(ref_prog, data)

    prog = base.clone()
    runner = BlockwiseRunner(prog, data, progress=False)  # propagate="quantized"
    for block in runner:
        if block.index == 0:
            rtn_block(prog, block)
            assert block.linears() == []
        if block.index == 1:
            got = block.inputs
            # the residual stream (last input) comes from the quantized block 0 ...
            for g, r, f in zip(got, ref_inputs[1], float_inputs[1]):
                torch.testing.assert_close(g[-1], r[-1], rtol=0, atol=0)
                assert not torch.allclose(g[-1], f[-1])
                # ... and the prefix values are unchanged
                for a, b in zip(g[:-1], f[:-1]):
                    torch.testing.assert_close(a, b, rtol=0, atol=0)
            break


def test_every_block_quantized_in_turn_matches_quantized_program(eager_and_program):
    """Sequential mode: with every block rewritten inside the loop, the suffix outputs are exactly
    the outputs of the fully quantized program (rtn does not depend on the data)."""
    prog = eager_and_program["tiny-llama"][1].clone()
    data = calib()
    with torch.no_grad():
        float_logits = [prog.call(input_ids=s).logits for s in data.samples]
    runner = BlockwiseRunner(prog, data, progress=False)
    for block in runner:
        rtn_block(prog, block)
        runner.set_postfix(loss=float(block.index))
    assert [e["block"] for e in runner.log] == [0, 1, 2, 3] and runner.log[2]["loss"] == 2.0
    outs = runner.run_suffix()
    assert not any(n.op == "call_function" and n.target == torch.ops.aten.linear.default
                   and nodemeta.get(n).block is not None for n in prog.graph.nodes)
    with torch.no_grad():
        for s, out, fl in zip(data.samples, outs, float_logits):
            torch.testing.assert_close(out.logits, prog.call(input_ids=s).logits, rtol=0, atol=0)
            assert not torch.allclose(out.logits, fl)
    flat = runner.run_suffix(flat=True)
    torch.testing.assert_close(flat[0][0], outs[0].logits, rtol=0, atol=0)


def test_float_propagation_ignores_rewrite(eager_and_program):
    base = eager_and_program["tiny-llama"][1]
    data = calib()
    float_inputs = block_inputs(base, data)
    prog = base.clone()
    runner = BlockwiseRunner(prog, data, progress=False, propagate="float", store="cpu")
    for pos, block in enumerate(runner):
        nxt = float_inputs[pos + 1] if pos + 1 < len(float_inputs) else None
        if nxt is not None:  # the block's float outputs are the next block's float residual input
            for out, ref in zip(block.float_outputs, nxt):
                torch.testing.assert_close(out[0], ref[-1], rtol=0, atol=0)
        rtn_block(prog, block)
        for got, ref in zip(block.inputs, float_inputs[pos]):
            for a, b in zip(got, ref):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the suffix sees the float residual stream, so it reproduces the float logits
    with torch.no_grad():
        ref = [base.call(input_ids=s).logits for s in data.samples]
    for out, r in zip(runner.run_suffix(), ref):
        torch.testing.assert_close(out.logits, r, rtol=0, atol=0)


def test_only_needed_values_are_held(eager_and_program):
    program = eager_and_program["tiny-llama"][1]
    by_name = {n.name: n for n in program.graph.nodes}
    runner = BlockwiseRunner(program, calib(2), progress=False)
    for block in runner:
        # embeddings are dropped once block 0 has run; only this block's inputs wait
        assert runner.held_values == sorted(block.input_names)
        roles = {nodemeta.get(by_name[v]).role for v in runner.held_values}
        assert ("embed" in roles) == (block.index == 0)
    assert runner.held_values == [transformer_blocks(program)[-1].output.name]  # the last block's residual
    runner.close()
    assert runner.held_values == []


def test_progress_bar(eager_and_program, capsys):
    program = eager_and_program["tiny-llama"][1]
    BlockwiseRunner(program, calib(1), progress=False).outputs()
    assert "gptq" not in capsys.readouterr().err
    runner = BlockwiseRunner(program, calib(1), progress=True, desc="gptq")
    for block in runner:
        runner.set_postfix(loss=0.5)
    err = capsys.readouterr().err
    assert "gptq" in err and "4/4" in err and "loss=0.5" in err


# ---- bad input ------------------------------------------------------------------------------------------
def test_non_contiguous_block_raises(eager_and_program):
    program = eager_and_program["tiny-llama"][1].clone()
    node = [n for n in program.graph.nodes if nodemeta.get(n).block == 2][5]  # inside block 2
    nodemeta.set_info(node, nodemeta.NodeInfo(layer="model.layers.0.mlp", block=0))
    with pytest.raises(CalibrationError, match=rf"block-wise calibration is unavailable: the nodes of block 0 are not "
                                               rf"contiguous .*%{node.name} of block 0 comes after block 2 began"):
        segments(program)
    with pytest.raises(CalibrationError, match="not contiguous"):
        BlockwiseRunner(program, calib(1), progress=False)


def test_no_blocks_raises():
    mod = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 8))
    program = lowc.trace(mod, (torch.tensor([[1, 2, 3]]),))
    with pytest.raises(CalibrationError, match="block-wise calibration is unavailable: the program has no transformer blocks"):
        BlockwiseRunner(program, calib(1), progress=False)


def test_bad_options(eager_and_program):
    program = eager_and_program["tiny-llama"][1]
    with pytest.raises(CalibrationError, match="propagate='fp16'"):
        BlockwiseRunner(program, calib(1), propagate="fp16")
    with pytest.raises(CalibrationError, match="at least one calibration sample"):
        BlockwiseRunner(program, [])
    runner = BlockwiseRunner(program, calib(1), progress=False)
    with pytest.raises(CalibrationError, match="needs every block processed"):
        runner.run_suffix()


def test_build_segment_is_a_function_of_the_current_graph(eager_and_program):
    """A segment module built after a rewrite computes the rewritten block."""
    prog = eager_and_program["tiny-llama"][1].clone()
    segs = segments(prog)
    runner = BlockwiseRunner(prog, calib(1), progress=False)
    for block in runner:
        x = block.inputs[0]
        before = block.module()(*x)[0]
        rtn_block(prog, block)
        seg = segments(prog)[1]
        after = build_segment(prog, seg, block.input_names, block.output_names)(*x)[0]
        assert len(seg.nodes) == len(segs[1].nodes)
        assert "linear_wq" in block.module().code
        assert not torch.allclose(before, after)
        torch.testing.assert_close(after, block.run(outputs=True)[0][0], rtol=0, atol=0)
        break


# ---- batching, taps-only runs, quantized linears dequantized once ------------------------------------
@pytest.mark.parametrize("name", MODELS)
def test_batched_samples_give_per_sample_outputs(eager_and_program, name):
    """batch=3 over 5 samples (4 of one length, 1 shorter: run alone) gives each sample the outputs
    it gets alone; hooks see the samples 3 at a time, the same rows."""
    program = eager_and_program[name][1]
    g = torch.Generator().manual_seed(1)
    data = load_calibration([torch.randint(0, 250, (4, 20), generator=g), torch.randint(0, 250, (1, 12), generator=g)])
    ref = BlockwiseRunner(program, data, progress=False).outputs(flat=True)
    rows: list[int] = []
    runner = BlockwiseRunner(program, data, progress=False, batch=3)
    for block in runner:
        if block.position == 0:
            first = block.linears()[0].name
            block.run(lambda n, x, y: rows.append(x.shape[0]), nodes=[first])
    out = runner.run_suffix(flat=True)
    assert rows == [3, 1, 1]  # samples 0-2 together, 3 alone (4 is shorter), 4 alone
    for r, o in zip(ref, out):
        for a, b in zip(r, o):
            assert a.shape == b.shape
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_taps_only_run_sees_the_same_inputs(eager_and_program):
    """A run with a hook and no outputs runs only what the taps need (the first linear needs no
    attention): it sees what the whole block's run sees."""
    program = eager_and_program["tiny-llama"][1]
    data = calib(2)
    for block in BlockwiseRunner(program, data, progress=False):
        first = block.linears()[0].name
        alone: list[torch.Tensor] = []
        block.run(lambda n, x, y: alone.append(x.clone()), nodes=[first])
        full: list[torch.Tensor] = []
        outs = block.run(lambda n, x, y: full.append(x.clone()), nodes=[first], outputs=True)
        assert len(outs) == len(alone) == len(full) == 2
        for a, b in zip(alone, full):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        break


def test_quantized_block_runs_dequantized_once(eager_and_program):
    """A block rewritten to lowc::linear_wq runs in calibration as aten.linear of the weight
    dequantized once, with the reference op's values."""
    program = eager_and_program["tiny-llama"][1].clone()
    runner = BlockwiseRunner(program, calib(2), progress=False)
    block = next(iter(runner))
    rtn_block(program, block)
    gm = block.module()
    FileCheck().check("lowc.linear_wq").run(gm.code)
    fast = dequantize_once(block.module())
    FileCheck().check_not("lowc.linear_wq").check("aten.linear").run(fast.code)
    for args in block.inputs:
        for a, b in zip(gm(*args), fast(*args)):
            torch.testing.assert_close(b, a, rtol=0, atol=0)
