"""The SSM student mixer of ``distill_ssm``: its parameters, their initialisation from attention, and
the graph rewrite of one attention site into ``lowc::ssd``.

The student replaces ``softmax(q kᵀ·scale) v`` of a causal attention site by a discrete Mamba-2 (SSD)
mixer that reads the same projections (MambaInLlama's initialisation: Q→C, K→B, V→x; the output
projection ``o_proj`` after the site is kept and trained as the mixer's output projection):

* ``C = q · scale`` (post-RoPE queries, ``[B, H, L, D]``, the softmax scale folded in), ``B = k`` and
  ``x = v`` (``[B, G, L, *]``: the key/value heads before ``repeat_kv`` when the graph has them, so a
  query head ``h`` reads group ``h // (H/G)`` as grouped-query attention does); so the state size
  ``N`` is the attention's head size;
* a new per-token, per-head log-decay from the attention's input hidden state ``u`` (the input of the
  q projection): ``a = −softplus(u·W_dtᵀ + b_dt) · exp(A_log)`` (``[B, H, L]``), with ``W_dt = 0``,
  ``b_dt = softplus⁻¹(dt)``, ``dt`` log-uniform in [1e-3, 1e-1] and ``A = exp(A_log)`` uniform in
  [1, 16] (Mamba-2's initialisation), seeded;
* the skip ``D = 0`` and short causal depthwise convolutions on C, B and x initialised to the identity
  (zeros, last tap 1), so at initialisation the mixer is exactly the decayed, unnormalised linear
  attention ``(C·Bᵀ ⊙ exp(segsum(a))) x``.

Parameters live as fp32 buffers of the attention module (``<layer>.ssd_dt_weight``, ``ssd_dt_bias``,
``ssd_A_log``, ``ssd_D``, ``ssd_conv_c``, ``ssd_conv_b``, ``ssd_conv_x``); the decay projection is an
``aten.linear`` (layer ``<layer>.ssd_dt``), so quantizing passes after ``distill_ssm`` treat it as
any linear. Every node is an ATen op or ``lowc::ssd``, with the site's layer, block and
``nn_module_stack`` (role ``ssd`` for the op, ``ssd_decay`` for the decay, ``ssd_in`` for C).
"""

from __future__ import annotations

import math

import torch
import torch.fx
from torch.fx.proxy import GraphAppendingTracer

from lowc.errors import PassError
from lowc.ir import meta as nodemeta
from lowc.ir.analysis import ancestors, linear_input
from lowc.ir.dialect import ensure_registered
from lowc.passes.linearize.rewrite import Site, _erase_dead

aten = torch.ops.aten
SSD = "lowc.ssd"
PREFIX = "ssd_"
DT_RANGE = (1e-3, 1e-1)
A_RANGE = (1.0, 16.0)
#: parameters that shape the token-mixing matrix (MOHAWK stage 1 trains these, with the q/k projections)
MATRIX_PARAMS = ("dt_weight", "dt_bias", "A_log", "conv_c", "conv_b")


def is_ssd(node: torch.fx.Node) -> bool:
    t = node.target
    return node.op == "call_function" and getattr(t, "namespace", None) == "lowc" and t._opname == "ssd"


def groups(site: Site) -> int:
    """Key/value groups ``G`` the student reads (``Hk`` when the un-repeated heads are in the graph)."""
    return site.kv_heads if (site.k_kv is not None or site.sdpa_kv_heads != site.heads) else site.heads


def init_params(site: Site, hidden: int, kernel: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """The new parameters of one student (module docstring), fp32, seeded by ``g``."""
    h, gr, n, p = site.heads, groups(site), site.head_dim, site.v_dim
    lo, hi = math.log(DT_RANGE[0]), math.log(DT_RANGE[1])
    dt = torch.exp(torch.rand(h, generator=g) * (hi - lo) + lo)
    out = {
        "dt_weight": torch.zeros(h, hidden),
        "dt_bias": dt + torch.log(-torch.expm1(-dt)),  # softplus⁻¹(dt)
        "A_log": torch.log(torch.rand(h, generator=g) * (A_RANGE[1] - A_RANGE[0]) + A_RANGE[0]),
        "D": torch.zeros(h),
    }
    if kernel > 0:
        for name, shape in (("conv_c", (h, n)), ("conv_b", (gr, n)), ("conv_x", (gr, p))):
            w = torch.zeros(*shape, kernel)
            w[..., -1] = 1.0
            out[name] = w
    return out


def decay(u, weight, bias, a_log):
    """``a = −softplus(u·Wᵀ + b)·exp(A_log)`` ``[B, H, L]`` from the hidden state ``u`` ``[B, L, hidden]``
    (ATen ops only: runs on tensors and on FX proxies alike)."""
    dt = aten.softplus.default(aten.linear.default(u, weight, bias))
    return aten.transpose.int(aten.mul.Tensor(dt, aten.neg.default(aten.exp.default(a_log))), 1, 2)


def hidden_input(program, site: Site) -> torch.fx.Node:
    """The attention's input hidden state: what its q projection reads."""
    by_name = {n.name: n for n in program.graph.nodes}
    if not site.linears:
        raise PassError(f"pass 'distill_ssm': layer {site.layer}: no q projection found before its attention")
    return linear_input(by_name[site.linears[0]])


def emit_site(program, site: Site, params: dict[str, torch.Tensor], key_mask: torch.fx.Node | None,
              chunk: int) -> torch.fx.Node:
    """Replace ``site``'s SDPA node by the student mixer (module docstring); returns the ``lowc::ssd`` node."""
    ensure_registered()
    graph = program.graph
    by_name = {n.name: n for n in graph.nodes}
    sdpa = by_name[site.sdpa]
    u = hidden_input(program, site)
    for name, t in params.items():
        program.add_buffer(site.layer, PREFIX + name, t.detach().to(device=program.device, dtype=torch.float32))
    before = set(graph.nodes)
    tracer = GraphAppendingTracer(graph)
    P = lambda n: torch.fx.Proxy(n, tracer)  # noqa: E731
    with graph.inserting_before(sdpa):
        w = {name: P(program.get_attr_node(f"{site.layer}.{PREFIX}{name}", sdpa)) for name in params}
    with graph.inserting_before(sdpa):
        grouped = groups(site) != site.heads and site.k_kv is not None
        k = P(by_name[site.k_kv if grouped else site.k])
        v = P(by_name[site.v_kv if grouped else site.v])
        c = aten.mul.Tensor(P(by_name[site.q]), site.scale)
        a = decay(aten.to.dtype(P(u), torch.float32), w["dt_weight"], w["dt_bias"], w["A_log"])
        y = torch.ops.lowc.ssd.default(c, k, v, a, w["D"], w.get("conv_c"), w.get("conv_b"), w.get("conv_x"),
                                       P(key_mask) if key_mask is not None else None, chunk)
    new = y.node
    info = nodemeta.get(sdpa)
    added = [n for n in graph.nodes if n not in before and n.op != "get_attr"]
    decay_nodes = ancestors([a.node], set(added))
    for n in added:
        role = "ssd" if n is new else ("ssd_decay" if n in decay_nodes else "ssd_in")
        layer = f"{info.layer}.{PREFIX}dt" if n.target is aten.linear.default else info.layer
        nodemeta.set_info(n, nodemeta.NodeInfo(layer=layer, role=role, block=info.block))
        if site.meta.get("nn_module_stack"):
            n.meta["nn_module_stack"] = dict(site.meta["nn_module_stack"])
        if n is not new:
            n._rename({"ssd_decay": "ssd_dt_", "ssd_in": "ssd_c_"}.get(role, "ssd_") + n.target._opname)
    new._rename("ssd")
    sdpa.replace_all_uses_with(new)
    inputs = list(sdpa.all_input_nodes)
    graph.erase_node(sdpa)
    _erase_dead(graph, inputs)
    return new
