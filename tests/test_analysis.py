"""lowc.ir.analysis on tiny-llama (RMSNorm, RoPE, GQA), minilm (BERT: LayerNorm, biases, no RoPE),
an odd-sized Llama (3 query heads sharing 1 KV head), and after rtn (dialect linears). Nodes are
found by layer and role (NodeInfo), never by the names torch.export gives them."""

from __future__ import annotations

import networkx as nx
import pytest
import torch
import torch.fx

import lowc
from lowc.ir import analysis, printer
from lowc.ir import meta as nodemeta
from lowc.passes.options import parse_pass
from lowc.passes.pipeline import run_passes

LLAMA_ROLES = {"q", "k", "v", "o", "gate", "up", "down"}


@pytest.fixture(scope="module")
def llama():
    return lowc.trace("tiny-llama")


@pytest.fixture(scope="module")
def minilm():
    return lowc.trace("minilm")


@pytest.fixture(scope="module")
def odd_llama(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=100, hidden_size=96, intermediate_size=200, num_hidden_layers=2,
                      num_attention_heads=3, num_key_value_heads=1, max_position_embeddings=128)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("odd-llama")
    LlamaForCausalLM(cfg).save_pretrained(path)
    return lowc.trace(str(path))


@pytest.fixture(scope="module")
def llama_rtn(llama):
    p = llama.clone()
    run_passes(p, [parse_pass("rtn")])
    return p


def _layers(nodes):
    return [analysis.linear_layer(n) if n is not None else None for n in nodes]


def _q0(program) -> torch.fx.Node:
    """Block 0's q projection."""
    return analysis.transformer_blocks(program)[0].linear("q")


def _op_and_layer(node: torch.fx.Node) -> tuple[str, str]:
    return printer.target_name(node), nodemeta.get(node).layer


def _values(program) -> dict[torch.fx.Node, object]:
    """Every node's value when the program runs on its example inputs."""
    values = {}

    class Record(torch.fx.Interpreter):
        def run_node(self, n):
            values[n] = super().run_node(n)
            return values[n]

    with torch.no_grad():
        Record(program.gm).run(*program.example_inputs())
    return values


def _block_module(program, block) -> torch.fx.GraphModule:
    """The block cut out as its own graph: placeholders for ``block.inputs``, returns ``block.output``."""
    graph = torch.fx.Graph()
    env = {n: graph.placeholder(n.name) for n in block.inputs}

    def lookup(n):
        if n not in env:
            assert n.op == "get_attr", f"{n.name} is read by block {block.index} but not among its inputs"
            env[n] = graph.get_attr(n.target)
        return env[n]

    for node in block.nodes:
        env[node] = graph.node_copy(node, lookup)
    graph.output(env[block.output])
    return torch.fx.GraphModule(program.gm, graph)


# ---- networkx view -------------------------------------------------------------------------------
def test_networkx_view_mirrors_the_fx_graph(llama):
    g = analysis.to_networkx(llama)
    nodes = list(llama.graph.nodes)
    assert set(g.nodes) == {n.name for n in nodes}
    assert set(g.edges) == {(i.name, n.name) for n in nodes for i in n.all_input_nodes}
    assert nx.is_directed_acyclic_graph(g)
    q_node = _q0(llama)
    q = g.nodes[q_node.name]
    assert (q["op"], q["target"], q["layer"], q["role"], q["block"]) == (
        "call_function", "aten.linear.default", "model.layers.0.self_attn.q_proj", "q", 0)
    weight = next(a for a in g.predecessors(q_node.name) if g.nodes[a]["op"] == "get_attr")
    assert g.nodes[weight]["target"] == "model.layers.0.self_attn.q_proj.weight"
    assert g.nodes["input_ids"]["op"] == "placeholder"
    assert q["node"] is q_node


def test_analyses_do_not_change_the_graph(llama):
    before = printer.format_program(llama)
    analysis.to_networkx(llama)
    analysis.transformer_blocks(llama)
    analysis.norm_before_linears(llama, include_unnormalized=True)
    analysis.attention_subgraphs(llama)
    assert printer.format_program(llama) == before


def test_linear_predicates(llama, llama_rtn):
    q = _q0(llama)
    assert analysis.is_linear(q) and analysis.is_float_linear(q)
    q_rtn = _q0(llama_rtn)
    assert analysis.is_linear(q_rtn) and not analysis.is_float_linear(q_rtn)  # compressed: lowc::linear_wq
    assert llama.linears() == [n for n in llama.graph.nodes if analysis.is_float_linear(n)]
    assert [analysis.linear_layer(n) for n in llama_rtn.linears()] == ["lm_head"]
    norm_out = analysis.linear_input(q)  # the RMSNorm's weight product (node names vary by torch version)
    assert norm_out.target == torch.ops.aten.mul.Tensor
    assert norm_out.args[0].op == "get_attr" and norm_out.args[0].target == "model.layers.0.input_layernorm.weight"
    sdpa = analysis.attention_subgraphs(llama)[0].sdpa
    assert not analysis.is_linear(sdpa)
    with pytest.raises(ValueError, match="scaled_dot_product_attention.*not a linear"):
        analysis.linear_input(sdpa)


# ---- tiny-llama ----------------------------------------------------------------------------------
def _check_llama(program, n_blocks=4):
    blocks = analysis.transformer_blocks(program)
    where = analysis.node_blocks(program)
    assert [b.index for b in blocks] == list(range(n_blocks))
    for b in blocks:
        assert b.prefix == f"model.layers.{b.index}"
        assert set(b.by_role()) == LLAMA_ROLES
        for role in LLAMA_ROLES:
            layer = analysis.linear_layer(b.linear(role))
            assert layer.startswith(b.prefix + ".") and layer.endswith(
                {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
                 "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}[role])
        assert b.nodes and all(where[n] == b.index for n in b.nodes)
        assert b.output is not None and len(b.outputs) == 1
        if b.index:
            assert b.hidden_input is blocks[b.index - 1].output
        assert f"{b.prefix}.input_layernorm.weight" in b.attrs
    assert _op_and_layer(blocks[0].hidden_input) == ("aten.embedding.default", "model.embed_tokens")

    groups = analysis.shared_input_groups(program, min_size=2)
    assert [(g.block, g.roles) for g in groups] == [
        (i, roles) for i in range(n_blocks) for roles in (("q", "k", "v"), ("gate", "up"))]
    every = analysis.shared_input_groups(program)
    assert [g.roles for g in every if g.block == 0] == [("q", "k", "v"), ("o",), ("gate", "up"), ("down",)]
    assert every[-1].layers == ("lm_head",) and every[-1].block is None

    links = analysis.norm_before_linears(program)
    assert [(l.group.block, l.group.roles, l.kind, l.weight) for l in links] == [
        x for i in range(n_blocks) for x in (
            (i, ("q", "k", "v"), "rmsnorm", f"model.layers.{i}.input_layernorm.weight"),
            (i, ("gate", "up"), "rmsnorm", f"model.layers.{i}.post_attention_layernorm.weight"))
    ] + [(None, ("lm_head",), "rmsnorm", "model.norm.weight")]
    assert links[0].layer == "model.layers.0.input_layernorm" and links[0].bias is None
    assert [l.eps for l in links] == pytest.approx([program.info.hf_config["rms_norm_eps"]] * len(links))
    assert all(l.norm is l.group.input for l in links)
    # o_proj and down_proj read no norm
    unnormalized = [l for l in analysis.norm_before_linears(program, include_unnormalized=True) if l.kind is None]
    assert sorted({r for l in unnormalized for r in l.group.roles}) == ["down", "o"]
    assert all(l.norm is None and l.weight is None for l in unnormalized)

    attns = analysis.attention_subgraphs(program)
    assert len(attns) == n_blocks
    for i, a in enumerate(attns):
        base = f"model.layers.{i}.self_attn"
        assert (a.block, a.layer) == (i, base)
        assert _layers([a.q, a.k, a.v, a.o]) == [f"{base}.{p}_proj" for p in "qkvo"]
        for rope in (a.q_rope, a.k_rope):
            ops = {printer.target_name(n) for n in rope}
            assert {"aten.mul.Tensor", "aten.neg.default", "aten.cat.default", "aten.add.Tensor"} <= ops
            assert ops <= {"aten.mul.Tensor", "aten.neg.default", "aten.cat.default", "aten.add.Tensor", "aten.slice.Tensor"}
            assert all(blocks[i].index == where[n] for n in rope)
        assert set(a.q_rope).isdisjoint(a.k_rope)
        assert a.mask is not None and a.mask.meta["val"].dtype == torch.bool and not a.is_causal
        assert a.mask is attns[0].mask  # one mask shared by every layer
    return blocks, attns


def test_tiny_llama(llama):
    _, attns = _check_llama(llama)
    assert {(a.num_heads, a.num_kv_heads, a.head_dim) for a in attns} == {(8, 4, 32)}


def test_rope_nodes_lie_between_linear_and_sdpa(llama):
    g = analysis.to_networkx(llama)
    for a in analysis.attention_subgraphs(llama):
        for rope, linear, arg in ((a.q_rope, a.q, a.sdpa.args[0]), (a.k_rope, a.k, a.sdpa.args[1])):
            for n in rope:
                assert nx.has_path(g, linear.name, n.name) and nx.has_path(g, n.name, arg.name)
        # v is not rotated: nothing between v_proj and the attention is a RoPE op
        between = nx.descendants(g, a.v.name) & nx.ancestors(g, a.sdpa.name)
        assert not {g.nodes[n]["target"] for n in between} & {"aten.neg.default", "aten.cat.default"}


def test_blocks_are_a_complete_cut(llama):
    """Each block, cut out with its inputs as placeholders, recomputes its output exactly."""
    values = _values(llama)
    for block in analysis.transformer_blocks(llama):
        sub = _block_module(llama, block)
        with torch.no_grad():
            out = sub(*[values[n] for n in block.inputs])
        torch.testing.assert_close(out, values[block.output], rtol=0, atol=0)


def test_nodes_without_lowc_metadata_join_their_users_block(llama):
    p = llama.clone()
    q = _q0(p)
    norm = q.args[0]
    with p.graph.inserting_after(norm):
        scaled = p.graph.call_function(torch.ops.aten.mul.Tensor, (norm, 0.5))
    for user in [u for u in norm.users if analysis.is_linear(u)]:
        user.replace_input_with(norm, scaled)
    assert analysis.node_blocks(p)[scaled] == 0
    assert scaled in analysis.transformer_blocks(p)[0].nodes
    qkv = analysis.shared_input_groups(p, min_size=2)[0]
    assert qkv.input is scaled and qkv.roles == ("q", "k", "v")
    # the scale is not a norm: the qkv group of block 0 loses its link, the others keep theirs
    links = analysis.norm_before_linears(p)
    assert [(l.group.block, l.group.roles) for l in links][:2] == [(0, ("gate", "up")), (1, ("q", "k", "v"))]


# ---- after quantization (dialect linears) --------------------------------------------------------
def test_analyses_see_dialect_linears(llama_rtn):
    dialect = [n for n in llama_rtn.graph.nodes if n.op == "call_function" and n.target == torch.ops.lowc.linear_wq.default]
    assert len(dialect) == 4 * len(LLAMA_ROLES)
    assert all(analysis.is_linear(n) for n in dialect)
    blocks, attns = _check_llama(llama_rtn)
    assert all(n.target == torch.ops.lowc.linear_wq.default for b in blocks for n in b.linears)
    assert all(n.target == torch.ops.lowc.linear_wq.default for a in attns for n in (a.q, a.k, a.v, a.o))
    assert {(a.num_heads, a.num_kv_heads, a.head_dim) for a in attns} == {(8, 4, 32)}


# ---- odd-sized Llama -----------------------------------------------------------------------------
def test_odd_sized_llama(odd_llama):
    _, attns = _check_llama(odd_llama, n_blocks=2)
    assert {(a.num_heads, a.num_kv_heads, a.head_dim) for a in attns} == {(3, 1, 32)}
    gate_up = analysis.shared_input_groups(odd_llama, min_size=2)[1]
    assert [n.meta["val"].shape[-1] for n in gate_up.linears] == [200, 200]


# ---- minilm (BERT) -------------------------------------------------------------------------------
def test_minilm(minilm):
    blocks = analysis.transformer_blocks(minilm)
    assert [b.prefix for b in blocks] == [f"encoder.layer.{i}" for i in range(6)]
    for b in blocks:
        assert {r: _layers(ns) for r, ns in b.by_role().items()} == {
            "q": [f"{b.prefix}.attention.self.query"], "k": [f"{b.prefix}.attention.self.key"],
            "v": [f"{b.prefix}.attention.self.value"], "o": [f"{b.prefix}.attention.output.dense"],
            "up": [f"{b.prefix}.intermediate.dense"], "down": [f"{b.prefix}.output.dense"]}
        assert _op_and_layer(b.output) == ("aten.layer_norm.default", f"{b.prefix}.output.LayerNorm")
        if b.index:
            assert b.hidden_input is blocks[b.index - 1].output
    assert _op_and_layer(blocks[0].hidden_input) == ("aten.dropout.default", "embeddings.dropout")  # eval: identity

    qkv = analysis.shared_input_groups(minilm, min_size=2)
    assert [g.roles for g in qkv] == [("q", "k", "v")] * 6
    # block 0's q/k/v read the embeddings' dropout, which is the identity in eval: the group's input is the norm
    assert _op_and_layer(qkv[0].input) == ("aten.layer_norm.default", "embeddings.LayerNorm")

    links = analysis.norm_before_linears(minilm)
    assert [(l.group.roles, l.layer) for l in links] == [
        x for i in range(6) for x in (
            (("q", "k", "v"), f"encoder.layer.{i - 1}.output.LayerNorm" if i else "embeddings.LayerNorm"),
            (("up",), f"encoder.layer.{i}.attention.output.LayerNorm"))]
    assert all(l.kind == "layernorm" and l.weight == f"{l.layer}.weight" and l.bias == f"{l.layer}.bias" for l in links)
    assert links[0].eps == pytest.approx(1e-12)

    attns = analysis.attention_subgraphs(minilm)
    assert len(attns) == 6
    for i, a in enumerate(attns):
        base = f"encoder.layer.{i}.attention"
        assert _layers([a.q, a.k, a.v, a.o]) == [f"{base}.self.query", f"{base}.self.key", f"{base}.self.value",
                                                 f"{base}.output.dense"]
        assert a.q_rope == () and a.k_rope == ()
        assert a.mask is not None and not a.is_causal
        assert (a.num_heads, a.num_kv_heads, a.head_dim) == (12, 12, 32)


# ---- block groups (where the learned passes put their transforms) ---------------------------------
def _groups(program, index):
    return [(g.kind, tuple(nodemeta.get(n).role for n in g.linears)) for g in analysis.block_groups(program, index)]


def test_block_groups_llama(llama, llama_rtn):
    for index in range(4):
        groups = analysis.block_groups(llama, index)
        assert _groups(llama, index) == [("norm", ("q", "k", "v")), ("o", ("o",)), ("norm", ("gate", "up")), ("other", ("down",))]
        qkv, o, gate_up, down = groups
        prefix = f"model.layers.{index}"
        assert (qkv.link.layer, gate_up.link.layer) == (f"{prefix}.input_layernorm", f"{prefix}.post_attention_layernorm")
        assert qkv.norm_foldable and gate_up.norm_foldable  # pre-norm: the norm output feeds only the group
        assert analysis.linear_layer(o.v) == f"{prefix}.self_attn.v_proj" and o.attn.o is o.linears[0]
        assert analysis.linear_layer(down.up) == f"{prefix}.mlp.up_proj"  # down reads silu(gate) * up
        assert all(g.input is g.linears[0].args[0] for g in groups)
    assert analysis.block_groups(llama_rtn, 0) == []  # compressed linears are no longer candidates


def test_block_groups_post_norm_minilm(minilm):
    """BERT: the LayerNorm outputs are also the residual stream, so no scale folds into them exactly;
    the MLP is GELU (no multiplicative up factor)."""
    for index in range(6):
        groups = analysis.block_groups(minilm, index)
        assert _groups(minilm, index) == [("norm", ("q", "k", "v")), ("o", ("o",)), ("norm", ("up",)), ("other", ("down",))]
        assert not any(g.norm_foldable for g in groups) and groups[3].up is None
        assert groups[0].link.layer == (f"encoder.layer.{index - 1}.output.LayerNorm" if index else "embeddings.LayerNorm")


def test_block_groups_after_partial_rewrite(llama):
    """A group with one compressed linear is left out; the other groups of the block stay."""
    p = llama.clone()
    run_passes(p, [parse_pass("rtn{ignore=[lm_head,q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj]}")])
    assert not analysis.is_float_linear(analysis.transformer_blocks(p)[1].linear("down"))
    assert _groups(p, 1) == [("norm", ("q", "k", "v")), ("o", ("o",)), ("norm", ("gate", "up"))]
