"""``Program``: the IR object every pass rewrites.

A Program is the ATen-level FX graph that ``torch.export`` produced, unlifted into a
``GraphModule`` (parameters and buffers are attributes read by ``get_attr`` nodes, inputs and outputs
keep the model's pytree structure), plus :class:`ModelInfo` about where it came from and how it is
called. Nodes carry ``nn_module_stack`` from export and :class:`lowc.ir.meta.NodeInfo`.

Invariants (checked by :func:`lowc.ir.verifier.verify`): the graph lints, every op is known (ATen,
prims, the lowc dialect, or a whitelisted higher-order op), every ``get_attr`` resolves, and every
parameter/buffer is read by some node.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping
from typing import Iterator

import torch
import torch.fx

from lowc.errors import InputError
from lowc.frontend.spec import (  # noqa: F401  (the IR's model description)
    INPUT_DTYPES,
    KINDS,
    InputSpec,
    ModelInfo,
    as_input_tensor,
)
from lowc.ir import meta as nodemeta
from lowc.ir.analysis import is_float_linear

LINEAR = torch.ops.aten.linear.default

class Program:
    """An FX GraphModule (the IR) plus :class:`ModelInfo`."""

    def __init__(self, gm: torch.fx.GraphModule, info: ModelInfo):
        self.gm = gm
        self.info = info

    # ---- graph access -------------------------------------------------------------------------
    @property
    def graph(self) -> torch.fx.Graph:
        return self.gm.graph

    def nodes(self, target=None) -> Iterator[torch.fx.Node]:
        for n in self.gm.graph.nodes:
            if target is None or (n.op == "call_function" and n.target == target):
                yield n

    def linears(self) -> list[torch.fx.Node]:
        """``aten.linear`` nodes whose weight is a constant attribute (the compressible linears)."""
        return [n for n in self.nodes(LINEAR) if is_float_linear(n)]

    def attr(self, target: str) -> torch.Tensor:
        mod_path, _, name = target.rpartition(".")
        mod = self.gm.get_submodule(mod_path) if mod_path else self.gm
        return getattr(mod, name)

    def add_buffer(self, module_path: str, name: str, tensor: torch.Tensor) -> str:
        """Register ``tensor`` as a persistent buffer ``module_path.name`` (creating modules) and
        return its attribute target; an existing attribute of that name is replaced."""
        mod = self.gm
        for part in [p for p in module_path.split(".") if p]:
            if not hasattr(mod, part):
                mod.add_module(part, torch.nn.Module())
            mod = getattr(mod, part)
        if name in mod._parameters:
            del mod._parameters[name]
        if hasattr(mod, name) and name not in mod._buffers:
            delattr(mod, name)
        mod.register_buffer(name, tensor, persistent=True)
        return f"{module_path}.{name}" if module_path else name

    def replace_attr(self, target: str, tensor: torch.Tensor) -> None:
        """Rebind attribute ``target`` to ``tensor`` (a parameter stays a parameter). Passes use this
        instead of writing in place: a traced nn.Module shares its tensors with the program, and
        compiling must never change the user's model."""
        mod_path, _, name = target.rpartition(".")
        mod = self.gm.get_submodule(mod_path) if mod_path else self.gm
        if name in mod._parameters:
            mod._parameters[name] = torch.nn.Parameter(tensor, requires_grad=False)
        elif name in mod._buffers:
            mod._buffers[name] = tensor
        else:
            raise AttributeError(f"no parameter or buffer {target!r}")

    def get_attr_node(self, target: str, before: torch.fx.Node) -> torch.fx.Node:
        """A get_attr node for ``target`` placed before ``before`` (reusing an existing one)."""
        for n in self.gm.graph.nodes:
            if n.op == "get_attr" and n.target == target:
                return n
        with self.gm.graph.inserting_before(before):
            node = self.gm.graph.get_attr(target)
        t = self.attr(target)
        node.meta["val"] = t  # real tensor: fake propagation converts it
        return node

    def add_operand_buffers(self, module_path: str, before: torch.fx.Node,
                            tensors: dict[str, torch.Tensor | None]) -> list[torch.fx.Node | None]:
        """Register each tensor as the buffer ``module_path.<name>`` (:meth:`add_buffer`) and return
        get_attr nodes for them placed before ``before``, in order; a ``None`` tensor (an absent
        optional operand, such as the zeros of a symmetric weight) stays ``None``."""
        targets = {name: self.add_buffer(module_path, name, t) if t is not None else None for name, t in tensors.items()}
        return [self.get_attr_node(t, before) if t else None for t in targets.values()]

    def remove_dead(self) -> int:
        """Erase unused pure nodes and the attributes no node reads any more. Returns count removed."""
        removed = 0
        graph = self.gm.graph
        for node in reversed(list(graph.nodes)):
            if node.op == "get_attr" and not node.users:
                graph.erase_node(node)
                removed += 1
        used = self.used_attrs()
        for name in list(dict(self.gm.named_parameters(remove_duplicate=False))) + list(dict(self.gm.named_buffers(remove_duplicate=False))):
            if name not in used:
                mod_path, _, attr = name.rpartition(".")
                mod = self.gm.get_submodule(mod_path) if mod_path else self.gm
                delattr(mod, attr)
                removed += 1
        self.gm.recompile()
        return removed

    def used_attrs(self) -> set[str]:
        return {n.target for n in self.gm.graph.nodes if n.op == "get_attr"}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Every parameter and buffer, by attribute path (tied tensors appear under each path)."""
        out: dict[str, torch.Tensor] = {}
        for name, p in self.gm.named_parameters(remove_duplicate=False):
            out[name] = p.detach()
        for name, b in self.gm.named_buffers(remove_duplicate=False):
            out[name] = b
        return out

    def nbytes(self) -> int:
        seen: set[int] = set()
        total = 0
        for t in self.state_tensors().values():
            key = t.untyped_storage().data_ptr() if t.device.type != "meta" else id(t)
            if key in seen:
                continue
            seen.add(key)
            total += t.numel() * t.element_size()
        return total

    def example_inputs(self, batch: int | None = None, seq: int | None = None, seed: int = 0) -> list[torch.Tensor]:
        """Flat example inputs in placeholder order (dynamic dims resized if asked), on the program's
        device (a program compiled for CUDA checks and calibrates there)."""
        out, device = [], self.device
        for spec in self.info.inputs:
            shape = list(spec.shape)
            for dim, sym in spec.dynamic.items():
                if sym == "batch" and batch is not None:
                    shape[dim] = batch
                if sym == "seq" and seq is not None:
                    shape[dim] = seq
            out.append(spec.example(shape, seed).to(device))
        return out

    def bind(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """The named graph inputs of a call like the original model's (programs called by name).

        Takes positional inputs in order, keywords, or one mapping such as a tokenizer's
        ``BatchEncoding``; values may be tensors, arrays or (rectangular) lists. Integer inputs are
        cast to the dtype they were captured with (tokenizers may give int32), inputs with a default
        (``ones_like:X``) are filled in, and ``token_type_ids`` that are all zero (what a tokenizer
        returns for single sentences) are dropped when the program was captured without them: they
        are what the model uses when they are absent. Anything else raises :class:`InputError`."""

        names = [s.name for s in self.info.inputs]
        if len(args) == 1 and not kwargs and isinstance(args[0], Mapping):
            args, kwargs = (), dict(args[0])
        if len(args) > len(names):
            raise InputError(f"expected at most {len(names)} positional inputs ({', '.join(names)}), got {len(args)}")
        kw = dict(zip(names, args))
        for k in kwargs:
            if k in kw:
                raise InputError(f"input {k!r} given twice")
        kw.update(kwargs)
        if "token_type_ids" in kw and "token_type_ids" not in names:
            tt = as_input_tensor("token_type_ids", kw.pop("token_type_ids"), InputError)
            if bool((tt != 0).any()):
                raise InputError("input 'token_type_ids' holds segment ids other than 0 (a sentence pair?); this "
                                 "program was captured without token_type_ids, so every token is segment 0: "
                                 "encode one sentence per row")
        unknown = set(kw) - set(names)
        if unknown:
            raise InputError(f"unknown input(s) {sorted(unknown)}; this model takes {names}")
        for spec in self.info.inputs:
            if spec.name in kw:
                kw[spec.name] = as_input_tensor(spec.name, kw[spec.name], InputError, getattr(torch, spec.dtype))
        for spec in self.info.inputs:
            if spec.name not in kw:
                if spec.default and spec.default.startswith("ones_like:") and spec.default.split(":", 1)[1] in kw:
                    kw[spec.name] = torch.ones_like(kw[spec.default.split(":", 1)[1]], dtype=getattr(torch, spec.dtype))
                else:
                    raise InputError(f"missing input {spec.name!r}; this model takes {names}")
        return {n: kw[n] for n in names}

    def call(self, *args, **kwargs):
        """Run the graph like the original model (see :meth:`bind` for what a by-name call accepts)."""
        if self.info.call_by_name:
            return self.gm(**self.bind(*args, **kwargs))
        return self.gm(*args, **kwargs)

    def clone(self) -> "Program":
        with warnings.catch_warnings():
            # deep-copying the graph's pytree specs goes through torch's own LeafSpec deprecation shim,
            # which is torch's business, not the user's
            warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                                    category=FutureWarning)
            return Program(copy.deepcopy(self.gm), copy.deepcopy(self.info))

    def to(self, device: str | torch.device) -> "Program":
        self.gm.to(device)
        return self

    @property
    def device(self) -> torch.device:
        for t in self.state_tensors().values():
            return t.device
        return torch.device("cpu")

    def annotate(self) -> None:
        self.info.block_prefix = nodemeta.annotate(self.gm)
