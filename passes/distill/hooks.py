"""Distillation hooks: capture a teacher's tensors block by block, and replay blocks of a student on them.

Cross-architecture distillation (MOHAWK and its relatives) matches a student to a frozen teacher at
three granularities: the token-mixing matrices of chosen attention layers, the outputs of chosen
blocks given the teacher's block inputs (teacher forcing), and the end-to-end predictions. This module
gives a recipe the first two without holding the whole model's activations:

* :func:`capture` runs the *teacher* program (unmodified, float) over calibration samples one
  transformer block at a time (:class:`lowc.passes.blockwise.BlockwiseRunner`, ``propagate="float"``)
  and yields a :class:`BlockCapture` per chosen block: the block's inputs and outputs per sample and,
  per chosen attention site (:class:`lowc.passes.linearize.rewrite.Site`), what the attention read and
  gave (post-RoPE ``q``, ``k``/``v`` before ``repeat_kv`` when the graph has it, the attention output
  ``y``); :meth:`SiteCapture.attention` computes the softmax attention matrix of a sample on demand.
  Only the current block's tensors are held: when the loop body asks for the next block, the previous
  capture is dropped (do not keep references to it).
* :class:`StudentBlock` replays one block of a *student* program (the teacher rewritten by a pass,
  with the same block structure and node names outside the rewritten parts) on a capture's inputs,
  with autograd through the trainable tensors given in ``params`` (attribute target -> tensor with
  ``requires_grad``; every other attribute is read detached). ``outputs`` may name any nodes of the
  block (e.g. the operands of a new op, for a matrix-level loss). Values the student's blocks read
  that the teacher never produced (a node a rewrite added before the blocks, e.g. ``key_mask``) are
  computed from the sample's token ids by the student's own prefix.
* :class:`Replay` runs a whole student program with the same ``params`` (end-to-end distillation).

Typical use (see :mod:`lowc.passes.distill.train`)::

    teacher = rewrite.shallow_copy(program)            # before rewriting ``program`` into the student
    ...rewrite program...
    for cap in capture(teacher, calib, sites, device=dev):
        student = StudentBlock(program, cap.index, params, device=dev)
        for i in range(len(cap)):
            loss = mse(student(cap, i), cap.outputs[i])    # teacher-forced block alignment
            for site in cap.sites.values():
                a = site.attention(i)                       # [1, H, L, L] softmax matrix

Preconditions: the teacher has transformer blocks whose nodes are contiguous (block-wise calibration,
see :mod:`lowc.passes.blockwise`); the student keeps the teacher's block boundaries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
import torch.fx

from lowc.errors import CalibrationError
from lowc.ir import meta as nodemeta
from lowc.ir.analysis import ancestors
from lowc.passes.blockwise import BlockwiseRunner, _interfaces, build_segment, calibration_inputs, segments
from lowc.passes.linearize.rewrite import Site
from lowc.passes.linearize.train import softmax_weights, tap_sites


@dataclass
class SiteCapture:
    """One attention site's teacher tensors, per sample: ``q`` (post-RoPE queries ``[1, H, L, D]``),
    ``k``/``v`` (``[1, Hk, L, *]`` before ``repeat_kv`` when the graph has it, else as the attention
    read them) and ``y`` (the attention output per head, ``[1, H, L, Dv]``)."""

    site: Site
    q: list[torch.Tensor] = field(default_factory=list)
    k: list[torch.Tensor] = field(default_factory=list)
    v: list[torch.Tensor] = field(default_factory=list)
    y: list[torch.Tensor] = field(default_factory=list)

    def attention(self, i: int, device=None) -> torch.Tensor:
        """Sample ``i``'s softmax attention matrix ``[1, H, L, L]`` (fp32), as the teacher applies it."""
        q = self.q[i].to(device=device, dtype=torch.float32)
        k = self.k[i].to(device=device, dtype=torch.float32)
        return softmax_weights(q, k, self.site.scale, self.site.causal)


@dataclass
class BlockCapture:
    """The teacher's tensors for one block (module docstring); valid until the next block is asked for."""

    index: int  # the transformer block index
    samples: list[torch.Tensor]  # the calibration token ids, [1, L] each
    input_names: list[str]
    output_names: list[str]
    inputs: list[tuple]  # per sample, the block's inputs (float stream, teacher forcing)
    outputs: list[tuple]  # per sample, the teacher block's outputs for those inputs
    sites: dict[str, SiteCapture]  # attention layer -> its tensors

    def __len__(self) -> int:
        return len(self.samples)

    def input_env(self, i: int) -> dict[str, Any]:
        return dict(zip(self.input_names, self.inputs[i]))


def capture(teacher, calib, sites: Sequence[Site] = (), *, blocks: Sequence[int] | None = None,
            qkv: bool = True, device="cpu", progress: bool = True, desc: str = "teacher") -> Iterator[BlockCapture]:
    """Yield a :class:`BlockCapture` per block of ``teacher`` that holds one of ``sites`` or is listed in
    ``blocks`` (module docstring). ``qkv=False`` captures only the block inputs/outputs."""
    by_block: dict[int, list[Site]] = {}
    for s in sites:
        if s.block is None:
            raise CalibrationError(f"layer {s.layer} lies outside the model's transformer blocks: hooks run block by block")
        by_block.setdefault(s.block, []).append(s)
    wanted = set(by_block) | set(blocks or ())
    runner = BlockwiseRunner(teacher, calib, device=device, progress=progress, desc=desc, propagate="float")
    try:
        for block in runner:
            if block.index not in wanted:
                continue
            mine = by_block.get(block.index, []) if qkv else []
            caps = {s.layer: SiteCapture(s) for s in mine}
            tap_sites(block, [(s, caps[s.layer]) for s in mine])
            yield BlockCapture(block.index, runner.samples, block.input_names, block.output_names,
                               block.float_inputs, block.float_outputs, caps)
    finally:
        runner.close()


class Replay(torch.fx.Interpreter):
    """Runs a GraphModule with autograd through ``params`` (attribute target -> tensor): every other
    attribute is read detached. A parameter is cast to the attribute's dtype and device."""

    def __init__(self, gm: torch.fx.GraphModule, params: dict[str, torch.Tensor]):
        super().__init__(gm)
        self.params = params

    def get_attr(self, target, args, kwargs):
        v = super().get_attr(target, args, kwargs)
        p = self.params.get(target)
        if p is not None:
            return p.to(device=v.device, dtype=v.dtype)
        return v.detach() if isinstance(v, torch.Tensor) else v


class StudentBlock:
    """One block of ``student`` (block ``index``) replayed on a :class:`BlockCapture` (module docstring).
    ``outputs``: node names of the block to return (default: the block's outputs, in the capture's
    ``output_names`` order)."""

    def __init__(self, student, index: int, params: dict[str, torch.Tensor], *, outputs: Sequence[str] | None = None,
                 device="cpu"):
        segs = segments(student)
        pos = next((i for i, s in enumerate(segs) if s.kind == "block" and s.index == index), None)
        if pos is None:
            raise CalibrationError(f"the student has no block {index}")
        itf = _interfaces(segs)[pos]
        self.student, self.device = student, torch.device(device)
        self.outputs = list(itf.outputs if outputs is None else outputs)
        gm = build_segment(student, segs[pos], itf.inputs, self.outputs, device)
        gm.graph.eliminate_dead_code()
        for n in [n for n in gm.graph.nodes if n.op == "placeholder" and not n.users]:
            gm.graph.erase_node(n)
        gm.recompile()
        self.input_names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
        self.interp = Replay(gm, params)
        self._extra_cache: dict[tuple[int, int], dict[str, Any]] = {}

    def _student_only(self, cap: BlockCapture, i: int) -> dict[str, Any]:
        """Values the student reads that the teacher capture lacks, computed by the student's prefix."""
        missing = [n for n in self.input_names if n not in cap.input_names]
        if not missing:
            return {}
        key = (id(cap), i)
        if key not in self._extra_cache:
            gm = self._prefix_module(missing)
            ids = cap.samples[i]
            args = [t.to(self.device) for t in calibration_inputs(self.student, ids)]
            with torch.no_grad():
                self._extra_cache = {key: dict(zip(missing, gm(*args)))}  # one sample at a time
        return self._extra_cache[key]

    def _prefix_module(self, names: list[str]) -> torch.fx.GraphModule:
        graph = self.student.graph
        by_name = {n.name: n for n in graph.nodes}
        nodes = [by_name[n] for n in names]
        need = ancestors(nodes) | set(nodes)
        blocked = next((n for n in need if nodemeta.get(n).block is not None), None)
        if blocked is not None:
            raise CalibrationError(f"the student's block reads %{names[0]}, computed from block {nodemeta.get(blocked).block} "
                                   "of the student, which the teacher does not have")
        g = torch.fx.Graph()
        env: dict[torch.fx.Node, torch.fx.Node] = {}
        for n in graph.nodes:
            if n.op == "placeholder" or n in need:
                env[n] = g.node_copy(n, lambda a: env[a])
        g.output(tuple(env[n] for n in nodes))
        return torch.fx.GraphModule(self.student.gm, g).to(self.device)

    def __call__(self, cap: BlockCapture, i: int) -> tuple:
        env = cap.input_env(i)
        env.update(self._student_only(cap, i))
        args = [env[name].to(self.device) if isinstance(env[name], torch.Tensor) else env[name]
                for name in self.input_names]
        out = self.interp.run(*args)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)
