"""The IR verifier, run after every pass.

Checks, in order (the first failure raises :class:`VerificationError` naming the node or attribute):
  1. the FX graph lints (topological order, defined uses, one output);
  2. every ``call_function`` target is known: an ATen/prims/lowc OpOverload or a whitelisted
     callable (:mod:`lowc.ir.known`);
  3. every ``get_attr`` resolves to a tensor or submodule, and every parameter/buffer is read by a
     node (no orphan parameters);
  4. shapes and dtypes: fake-tensor propagation of the example inputs through the graph succeeds
     (dialect ops' fake kernels check their operands), and each node that already records a ``val``
     keeps its dtype and rank (and static sizes). Nodes created by passes get their ``val`` here.
"""

from __future__ import annotations

import logging

import torch
import torch.fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from lowc.errors import VerificationError
from lowc.ir import known


def _check_ops(gm: torch.fx.GraphModule, where: str) -> None:
    for node in gm.graph.nodes:
        if node.op == "call_function":
            if known.op_qualname(node.target) is None and known.callable_name(node.target) is None:
                raise VerificationError(f"{where}node {node.name}: unknown op {node.target!r}")
        elif node.op in ("call_module", "call_method"):
            raise VerificationError(f"{where}node {node.name}: {node.op} is not allowed in a lowc graph")
        elif node.op == "get_attr":
            try:
                mod_path, _, name = node.target.rpartition(".")
                obj = getattr(gm.get_submodule(mod_path) if mod_path else gm, name)
            except AttributeError:
                raise VerificationError(f"{where}node {node.name}: get_attr {node.target!r} does not resolve") from None
            if isinstance(obj, torch.fx.GraphModule):
                _check_ops(obj, f"{where}{node.target}: ")


def _check_attrs(gm: torch.fx.GraphModule) -> None:
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        if name not in used and not any(name.startswith(u + ".") for u in used):
            raise VerificationError(f"orphan parameter {name!r}: no node reads it")


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.dim() != b.dim():
        return False
    for x, y in zip(a.shape, b.shape):
        if isinstance(x, int) and isinstance(y, int) and not isinstance(x, torch.SymInt) and not isinstance(y, torch.SymInt) and x != y:
            return False
    return True


def verify(program, shapes: bool = True) -> None:
    """Raise :class:`VerificationError` if ``program`` breaks an IR invariant."""
    gm = program.gm
    try:
        gm.graph.lint()
    except Exception as e:
        raise VerificationError(f"graph does not lint: {e}") from e
    _check_ops(gm, "")
    _check_attrs(gm)
    if shapes:
        _propagate(program)


class _TrackingProp(FakeTensorProp):
    """FakeTensorProp that remembers the node it is running, to name it when propagation fails."""

    current = None

    def run_node(self, n):
        self.current = n
        return super().run_node(n)


def _propagate(program) -> None:
    gm = program.gm
    saved = {n: n.meta.pop("val", None) for n in gm.graph.nodes}
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        fake_inputs = [mode.from_tensor(t) for t in program.example_inputs()]
    prop = _TrackingProp(gm, mode)
    log = logging.getLogger("torch._subclasses.fake_tensor")
    level = log.level
    log.setLevel(logging.CRITICAL)  # it logs each failing meta kernel; the error below names it in one line
    try:
        prop.propagate_dont_convert_inputs(*fake_inputs)
    except Exception as e:
        failing = prop.current if prop.current is not None and prop.current.op not in ("placeholder", "get_attr", "output") else None
        for n, v in saved.items():  # restore what was recorded before this run
            if v is not None:
                n.meta["val"] = v
        name = f"node {failing.name} ({known.op_qualname(failing.target) or failing.target})" if failing is not None else "graph"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise VerificationError(f"shape propagation failed at {name}: {first}") from e
    finally:
        log.setLevel(level)
    for node in gm.graph.nodes:
        old, new = saved.get(node), node.meta.get("val")
        if isinstance(old, torch.Tensor) and isinstance(new, torch.Tensor) and not _same(old, new):
            raise VerificationError(
                f"node {node.name}: recorded {old.dtype}{list(old.shape)} but propagation gives {new.dtype}{list(new.shape)}"
            )
        if old is not None:
            node.meta["val"] = old  # keep export's symbolic value; new nodes keep the fresh one
