"""Canonicalize an exported graph into lowc's IR form.

* inline the ``wrap_with_set_grad_enabled`` / ``wrap_with_autocast`` higher-order ops (export keeps
  ``torch.no_grad()`` / ``autocast(enabled=False)`` regions such as rotary embeddings as
  submodules). lowc graphs are inference graphs, run without autograd and without autocast, so the
  regions compute the same values inline, and every op becomes visible to passes and to block
  segmentation;
* drop ``aten._assert_tensor_metadata`` checks (they pin the capture device and dtype) and export's
  ``_guards_fn`` input-guard module (a Python callable; lowc validates inputs in ``Program.call``);
* drop identity slices (``aten.slice(x, dim, 0, INT64_MAX)``, from ``x[:, :, None]``: some torch
  versions keep them in exported graphs, others do not), so passes see the same graph either way;
* :func:`retarget_device` rewrites device constants baked in by export (``arange(device=cpu)``)
  so a program captured on one device runs on another.
"""

from __future__ import annotations

import torch
import torch.fx

from lowc.ir import known

_ASSERT = torch.ops.aten._assert_tensor_metadata.default
_SLICE = torch.ops.aten.slice.Tensor
_INT64_MAX = 2**63 - 1


def _is_identity_slice(node: torch.fx.Node) -> bool:
    if node.op != "call_function" or node.target != _SLICE:
        return False
    args = list(node.args) + [None] * (5 - len(node.args))
    start = node.kwargs.get("start", args[2])
    end = node.kwargs.get("end", args[3])
    step = node.kwargs.get("step", args[4])
    return start in (None, 0) and (end is None or (isinstance(end, int) and end >= _INT64_MAX)) and step in (None, 1)


def _inline_hops(gm: torch.fx.GraphModule) -> int:
    hops = {known.python_callables().get(n) for n in ("wrap_with_set_grad_enabled", "wrap_with_autocast")} - {None}
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in hops:
            continue
        # args: set_grad: (enabled, submod, *operands); autocast: (device, dtype, enabled, cache, submod, *operands)
        sub_idx = next(i for i, a in enumerate(node.args) if isinstance(a, torch.fx.Node) and a.op == "get_attr")
        sub = getattr(gm, node.args[sub_idx].target)
        operands = node.args[sub_idx + 1 :]
        env: dict[torch.fx.Node, object] = {}
        placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
        for ph, val in zip(placeholders, operands):
            env[ph] = val
        outputs = None
        with gm.graph.inserting_before(node):
            for sn in sub.graph.nodes:
                if sn.op == "placeholder":
                    continue
                if sn.op == "output":
                    outputs = torch.fx.node.map_arg(sn.args[0], lambda x: env[x])
                    continue
                if sn.op == "get_attr":
                    raise NotImplementedError("attributes inside a higher-order op region")
                new = gm.graph.node_copy(sn, lambda x: env[x])
                new.meta = dict(sn.meta)
                if "nn_module_stack" not in new.meta and "nn_module_stack" in node.meta:
                    new.meta["nn_module_stack"] = dict(node.meta["nn_module_stack"])
                env[sn] = new
        for user in list(node.users):
            if user.op == "call_function" and known.callable_name(user.target) == "getitem":
                user.replace_all_uses_with(outputs[user.args[1]])
                gm.graph.erase_node(user)
            else:
                raise NotImplementedError(f"higher-order op {node.name} used as a whole by {user.name}")
        sub_node = node.args[sub_idx]
        gm.graph.erase_node(node)
        if not sub_node.users:
            gm.graph.erase_node(sub_node)
            delattr(gm, sub_node.target)
        count += 1
    return count


def canonicalize(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    _inline_hops(gm)
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target == _ASSERT:
            gm.graph.erase_node(node)
        elif node.op == "call_module" and node.target == "_guards_fn":
            # export's input guard module; lowc checks inputs itself (Program.call)
            gm.graph.erase_node(node)
            delattr(gm, "_guards_fn")
        elif _is_identity_slice(node):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def retarget_device(gm: torch.fx.GraphModule, device: torch.device | str) -> int:
    """Replace ``torch.device`` constants in node args/kwargs with ``device``; returns nodes changed."""
    device = torch.device(device)
    changed = 0

    def fix(a):
        return device if isinstance(a, torch.device) else a

    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        args = torch.fx.node.map_aggregate(node.args, fix)
        kwargs = torch.fx.node.map_aggregate(node.kwargs, fix)
        if args != node.args or kwargs != node.kwargs:
            node.args, node.kwargs = args, kwargs
            changed += 1
    if changed:
        gm.recompile()
    return changed
