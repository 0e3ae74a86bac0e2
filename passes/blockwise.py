"""Block-by-block execution of a program over calibration data, for calibrating method passes
(GPTQ, AffineQuant, FlatQuant, ...) with peak memory that does not grow with depth.

The graph is cut into segments by ``node.meta["lowc"].block`` (see :func:`segments`): a *prefix*
(inputs, embeddings, rotary tables, attention-mask construction: everything before block 0), one
segment per transformer block, and a *suffix* (final norm, heads, the output node). A node outside any
block that sits between two blocks belongs to the following segment. ``get_attr`` nodes belong to no
segment's computation: every segment that reads a parameter gets its own copy of the read.

:class:`BlockwiseRunner` runs the prefix over every calibration sample (batch 1, one sample at a
time) and keeps, per sample, only the *boundary values*: values a later segment reads, keyed by the
name of the node that defined them in the program's graph. It then yields one :class:`CalibrationBlock` at a
time. A consumer reads ``block.inputs``, runs ``block.run(hook)`` to see the inputs of chosen
linears, and may rewrite the block's nodes in the program's graph. When the consumer asks for the
next block, the runner computes the block's outputs (``propagate="quantized"``: by re-running the
block as it is now in the graph, GPTQ's sequential mode; ``"float"``: the outputs of the block as it
was when it was yielded; ``"both"``: two streams, see below) and drops every value no later segment
reads.

``propagate="both"`` (OmniQuant/AffineQuant-style training) keeps a float stream beside the
quantized one: ``block.inputs`` are the quantized stream's inputs (outputs of the rewritten earlier
blocks), ``block.float_inputs`` the float model's, and ``block.float_outputs`` the float block applied
to ``block.float_inputs`` (the training targets). Only values produced by blocks are held twice;
prefix values (rotary tables, masks) are shared. A consumer that computes the quantized stream itself
(e.g. with activation fake-quantization the graph does not have yet) hands it over with
``block.set_outputs``; otherwise the rewritten block is re-run. So at any time memory holds
the boundary values between two consecutive segments, one block's parameters on ``device`` and one
sample's activations.

Segments are rebuilt from the *current* graph each time one runs (``graph.node_copy`` into a fresh
``GraphModule`` whose attributes are the program's tensors moved to ``device``), so rewrites of the
block being calibrated are seen. A segment that reads a value defined by an already-processed segment
that was rewritten after it ran raises :class:`CalibrationError`.

What calibration runs is cheaper than the graph, with the same values: a run that only feeds hooks
(``block.run(hook)`` without ``outputs``) computes only what the tapped nodes depend on
(:func:`needed_for`); ``lowc::linear_wq`` layers run as ``aten.linear`` of their weight dequantized
once per run (:func:`dequantize_once`) instead of once per sample; and with ``batch`` > 1 samples
of equal length run together (:meth:`BlockwiseRunner._batch_dims` says how each boundary value
stacks, from export's symbolic batch size).

Preconditions: the program was annotated (``Program.annotate``) and has transformer blocks; each
block's nodes are contiguous in topological order (otherwise :class:`CalibrationError` says why).
``device`` is a device the graph runs on: a graph traced for one device may name it in its ops
(``arange(device=cpu)``). Parameters are moved per segment, so a program whose tensors live on the
CPU runs on a GPU with only the current segment's parameters there. Every sample runs under
``torch.no_grad()`` (not inference mode, so stored inputs can feed a later autograd computation).

Typical use (GPTQ-style)::

    runner = BlockwiseRunner(program, calib, device=ctx.device, progress=ctx.progress, desc="gptq")
    for block in runner:
        hessians = {}
        block.run(lambda name, x, y: accumulate(hessians, name, x))
        for node in block.linears():
            ...rewrite node with its quantized weight...
        runner.set_postfix(loss=err)
    logits = runner.run_suffix()   # final outputs of the calibrated model, one per sample
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.fx
from tqdm.auto import tqdm

from lowc.errors import CalibrationError
from lowc.ir import meta as nodemeta
from lowc.ir.analysis import is_float_linear
from lowc.ir.dialect import define, quant
from lowc.ir.dialect.args import LINEAR, LinearQArgs, is_quantized_linear

Hook = Callable[[str, torch.Tensor, torch.Tensor], None]

PROPAGATE_MODES = ("quantized", "float", "both")
STORE_MODES = ("device", "cpu")


# ---- segmentation -------------------------------------------------------------------------------
@dataclass
class Segment:
    """A contiguous run of the program's graph: ``kind`` is "prefix", "block" or "suffix"."""

    kind: str
    index: int | None = None  # the transformer block index (kind == "block")
    nodes: list[torch.fx.Node] = field(default_factory=list)  # computation, topological order
    attrs: list[torch.fx.Node] = field(default_factory=list)  # get_attr nodes first read here

    @property
    def name(self) -> str:
        return f"block {self.index}" if self.kind == "block" else self.kind


def _block(node: torch.fx.Node) -> int | None:
    return nodemeta.get(node).block


def segments(program) -> list[Segment]:
    """Cut the program's graph into ``[prefix, block..., suffix]`` (blocks in topological order).

    Every node lies in exactly one segment: placeholders in the prefix, the output node in the
    suffix, a ``get_attr`` in ``attrs`` of the segment of its first reader (the prefix if unread).
    Raises :class:`CalibrationError` if the program has no blocks or a block's nodes are interleaved
    with another block's."""
    graph = program.graph
    prefix = Segment("prefix")
    blocks: list[Segment] = []
    pending: list[torch.fx.Node] = []  # nodes outside any block, waiting for the next segment
    seen: dict[int, torch.fx.Node] = {}
    output = None
    for node in graph.nodes:
        if node.op == "get_attr":
            continue
        if node.op == "placeholder":
            prefix.nodes.append(node)
            continue
        if node.op == "output":
            output = node
            continue
        b = _block(node)
        if b is None:
            pending.append(node)
            continue
        current = blocks[-1] if blocks else None
        if current is None or current.index != b:
            if b in seen:
                raise CalibrationError(
                    f"block-wise calibration is unavailable: the nodes of block {b} are not contiguous in "
                    f"topological order (%{node.name} of block {b} comes after block {current.index} began, "
                    f"but block {b} already began at %{seen[b].name})"
                )
            seen[b] = node
            current = Segment("block", b)
            blocks.append(current)
            (prefix if len(blocks) == 1 else current).nodes.extend(pending)
        else:
            current.nodes.extend(pending)
        pending = []
        current.nodes.append(node)
    if not blocks:
        where = f"no node is annotated with a block of {program.info.block_prefix!r}" if program.info.block_prefix \
            else "the program has no transformer blocks (block_prefix is unset)"
        raise CalibrationError(f"block-wise calibration is unavailable: {where}")
    suffix = Segment("suffix", nodes=pending + ([output] if output is not None else []))
    segs = [prefix, *blocks, suffix]
    seg_of = {n: i for i, s in enumerate(segs) for n in s.nodes}
    for node in graph.nodes:
        if node.op == "get_attr":
            readers = [seg_of[u] for u in node.users if u in seg_of]
            segs[min(readers) if readers else 0].attrs.append(node)
    return segs


def needed_for(seg: Segment, names: set[str]) -> Segment:
    """``seg`` cut down to the nodes named in ``names`` and the nodes of ``seg`` they depend on."""
    mine = set(seg.nodes)
    keep: set[torch.fx.Node] = set()
    stack = [n for n in seg.nodes if n.name in names]
    while stack:
        n = stack.pop()
        if n in keep:
            continue
        keep.add(n)
        stack.extend(a for a in n.all_input_nodes if a in mine)
    return Segment(seg.kind, seg.index, [n for n in seg.nodes if n in keep], seg.attrs)


@dataclass
class _Interface:
    """What a segment reads from earlier segments and which of its values later segments read."""

    inputs: list[str]
    outputs: list[str]
    live_after: set[str]  # names read by any later segment (what to keep once this one has run)


def _interfaces(segs: list[Segment]) -> list[_Interface]:
    seg_of = {n: i for i, s in enumerate(segs) for n in s.nodes}
    inputs: list[list[str]] = [[] for _ in segs]
    outputs: list[list[str]] = [[] for _ in segs]
    last_use: dict[str, int] = {}
    for i, seg in enumerate(segs):
        seen: set[torch.fx.Node] = set()
        for node in seg.nodes:
            for a in node.all_input_nodes:
                if a.op == "get_attr" or seg_of[a] == i or a in seen:
                    continue
                seen.add(a)
                inputs[i].append(a.name)
                last_use[a.name] = max(last_use.get(a.name, i), i)
                if a.name not in outputs[seg_of[a]]:
                    outputs[seg_of[a]].append(a.name)
    order = {n.name: k for k, n in enumerate(n for s in segs for n in s.nodes)}
    out = []
    for i in range(len(segs)):
        live = {name for name, last in last_use.items() if last > i}
        out.append(_Interface(sorted(inputs[i], key=order.__getitem__), sorted(outputs[i], key=order.__getitem__), live))
    return out


def _resolve(gm: torch.nn.Module, target: str) -> Any:
    mod_path, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(mod_path) if mod_path else gm, name)


def build_segment(program, seg: Segment, inputs: Sequence[str], outputs: Sequence[str],
                  device: str | torch.device = "cpu") -> torch.fx.GraphModule:
    """A GraphModule computing ``seg``: placeholders for ``inputs`` (node names of earlier segments),
    returning the tuple of ``outputs`` (node names in ``seg``; the suffix returns the program's flat
    outputs instead). Parameters are the program's tensors moved to ``device`` (the same tensor
    objects when they are already there). ``gm.source_names`` maps the program's node names to the
    segment's (FX renames a copy whose name shadows a Python builtin)."""
    g = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    by_name = {n.name: n for n in program.graph.nodes}
    root: dict[str, Any] = {}
    for name in inputs:
        env[by_name[name]] = g.placeholder(name)
        env[by_name[name]].meta = dict(by_name[name].meta)
    for node in seg.nodes:
        if node.op == "placeholder":
            env[node] = g.placeholder(node.name)
            env[node].meta = dict(node.meta)
            continue
        for a in node.all_input_nodes:
            if a.op == "get_attr" and a not in env:
                obj = _resolve(program.gm, a.target)
                root[a.target] = obj.to(device) if isinstance(obj, (torch.Tensor, torch.nn.Module)) else obj
                env[a] = g.node_copy(a)
        if node.op == "call_module" and node.target not in root:
            root[node.target] = program.gm.get_submodule(node.target).to(device)
        env[node] = g.node_copy(node, lambda a: env[a])
    if seg.kind != "suffix":
        g.output(tuple(env[by_name[name]] for name in outputs))
    gm = torch.fx.GraphModule(root, g, class_name=seg.name.replace(" ", "_").capitalize())
    gm.source_names = {n.name: c.name for n, c in env.items()}
    return gm


def dequantize_once(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``gm`` with each ``lowc::linear_wq`` of constant operands made an ``aten.linear`` of its weight
    dequantized once (the op's reference dequantizes on every call, i.e. for every sample). The same
    arithmetic as the reference (weight and bias in the input's dtype), so the values are unchanged;
    node names are kept (taps still find them)."""
    if not any(n.op == "call_function" and is_quantized_linear(n) for n in gm.graph.nodes):
        return gm
    define("linear_wq")
    wq = torch.ops.lowc.linear_wq.default
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not wq:
            continue
        a = LinearQArgs.of(node)
        operands = [o for o in (a.weight, a.scales, a.zeros, a.bias) if o is not None]
        if any(not isinstance(o, torch.fx.Node) or o.op != "get_attr" for o in operands) or not isinstance(a.x, torch.fx.Node):
            continue
        def get(o):
            return None if o is None else _resolve(gm, o.target)

        scales, val = get(a.scales), a.x.meta.get("val")
        dtype = val.dtype if isinstance(val, torch.Tensor) else scales.dtype
        w = quant.dequantize(get(a.weight), scales, get(a.zeros), a.bits, a.group_size, a.in_features, dtype=dtype)
        args = [a.x]
        for what, t in (("weight", w), ("bias", None if a.bias is None else get(a.bias).to(dtype))):
            if t is None:
                args.append(None)
                continue
            gm.register_buffer(f"_dequantized_{node.name}_{what}", t)
            with gm.graph.inserting_before(node):
                args.append(gm.graph.get_attr(f"_dequantized_{node.name}_{what}"))
        node.target, node.args, node.kwargs = LINEAR, tuple(args), {}
        for o in operands:
            if not o.users:
                gm.graph.erase_node(o)
    gm.recompile()
    return gm


class Tapping(torch.fx.Interpreter):
    """Runs a segment (or a block copy) built by :func:`build_segment` and calls ``hook(name, x, y)``
    after each tapped node: ``name`` its name in the *program's* graph (``taps`` are program names,
    mapped through ``gm.source_names``), ``x`` the value of its first argument (a linear's input),
    ``y`` its result."""

    def __init__(self, gm: torch.fx.GraphModule, taps: Iterable[str], hook: Hook):
        super().__init__(gm)
        self.taps = {gm.source_names[name]: name for name in taps}  # segment name -> program name
        self.hook = hook

    def run_node(self, n: torch.fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.taps:
            self.hook(self.taps[n.name], self.env[n.args[0]], out)
        return out


# ---- inputs ---------------------------------------------------------------------------------------
def calibration_inputs(program, sample: torch.Tensor) -> list[torch.Tensor]:
    """The program's flat inputs (``program.info.inputs`` order) for one token-id sample: the token
    input is the sample, inputs defaulting to ``ones_like:X`` are ones like X."""
    values: dict[str, torch.Tensor] = {}
    token = next((s for s in program.info.inputs if s.vocab_size), None)
    if token is None and program.info.inputs and program.info.inputs[0].dtype in ("int64", "int32"):
        token = program.info.inputs[0]
    if token is None:
        raise CalibrationError("block-wise calibration needs a token-id input, and this program has none "
                               f"(inputs: {', '.join(s.name for s in program.info.inputs) or 'none'})")
    values[token.name] = sample.to(getattr(torch, token.dtype))
    for spec in program.info.inputs:
        if spec.name in values:
            continue
        if spec.default and spec.default.startswith("ones_like:") and spec.default.split(":", 1)[1] in values:
            values[spec.name] = torch.ones_like(values[spec.default.split(":", 1)[1]])
        else:
            raise CalibrationError(f"block-wise calibration cannot make input {spec.name!r} from token ids")
    return [values[s.name] for s in program.info.inputs]


def _compact(v: Any) -> Any:
    """A stored boundary value that does not keep a larger base tensor alive."""
    if isinstance(v, torch.Tensor) and v.untyped_storage().nbytes() > v.numel() * v.element_size():
        return v.clone()
    return v


def _move(v: Any, device) -> Any:
    return v.to(device) if isinstance(v, torch.Tensor) else v


# ---- the driver ------------------------------------------------------------------------------------
class CalibrationBlock:
    """The block a :class:`BlockwiseRunner` is at: its per-sample input values, a way to run it with
    hooks, a GraphModule copy of it. Valid until the runner advances.

    A live handle on a moving computation, so it is distinct from :class:`lowc.ir.analysis.Block`,
    a frozen snapshot of a block's structure (nodes, linears of every kind, inputs, outputs). Its
    segment is cut by :func:`segments` (nodes outside any block that sit between two blocks belong to
    the following one), and :meth:`linears` lists only float linears, as :meth:`Program.linears`."""

    def __init__(self, runner: "BlockwiseRunner", position: int, index: int):
        self._runner = runner
        self.position = position  # 0-based order among the blocks
        self.index = index  # the block index in the model (``model.layers.<index>``)
        self.float_outputs: list[tuple] | None = None  # per sample, with propagate="float" or "both"
        self._outputs: list[tuple] | None = None  # set_outputs: the consumer's quantized-stream outputs

    def __repr__(self) -> str:
        return f"CalibrationBlock({self.layer_prefix!r}, {len(self.nodes)} nodes, {len(self.linears())} linears)"

    @property
    def layer_prefix(self) -> str:
        prefix = self._runner.program.info.block_prefix
        return f"{prefix}.{self.index}" if prefix else str(self.index)

    def _segment(self) -> tuple[Segment, _Interface]:
        return self._runner._segment(self.position + 1)

    @property
    def nodes(self) -> list[torch.fx.Node]:
        """The block's computation nodes in the program's graph, as the graph is now."""
        return list(self._segment()[0].nodes)

    def linears(self) -> list[torch.fx.Node]:
        """The block's float linears (:func:`lowc.ir.analysis.is_float_linear`: not yet rewritten)."""
        return [n for n in self.nodes if is_float_linear(n)]

    @property
    def input_names(self) -> list[str]:
        """Names (in the program's graph) of the values the block reads from earlier segments."""
        return list(self._segment()[1].inputs)

    @property
    def output_names(self) -> list[str]:
        """Names of the block's values that later segments read (what ``run`` returns, in order)."""
        return list(self._segment()[1].outputs)

    @property
    def inputs(self) -> list[tuple]:
        """Per sample, the block's inputs in ``input_names`` order (on the runner's store device)."""
        self._runner._check_current(self)
        names = self.input_names
        return [tuple(env[name] for name in names) for env in self._runner._env]

    @property
    def float_inputs(self) -> list[tuple]:
        """Per sample, the block's inputs from the float stream (propagate="both"; with "float" the
        stream is float anyway and this equals ``inputs``)."""
        self._runner._check_current(self)
        names = self.input_names
        return [tuple(env[name] for name in names) for env in self._runner._float_envs()]

    def set_outputs(self, outputs: list[tuple]) -> None:
        """Hand over the block's quantized-stream outputs (per sample, ``output_names`` order) instead
        of having the runner re-run the rewritten block (propagate="quantized" or "both")."""
        self._runner._check_current(self)
        if self._runner.propagate == "float":
            raise CalibrationError("set_outputs needs propagate='quantized' or 'both' (with 'float' the next block "
                                   "reads the float outputs)")
        n_out = len(self.output_names)
        if len(outputs) != len(self._runner._env) or any(len(o) != n_out for o in outputs):
            raise CalibrationError(f"{self.layer_prefix}: set_outputs needs {len(self._runner._env)} samples of "
                                   f"{n_out} outputs each")
        self._outputs = [tuple(_compact(_move(v, self._runner.store)) for v in o) for o in outputs]

    def module(self) -> torch.fx.GraphModule:
        """The block as it is now in the graph: a GraphModule on ``device`` called with one sample's
        ``inputs`` and returning its outputs in ``output_names`` order."""
        seg, itf = self._segment()
        return build_segment(self._runner.program, seg, itf.inputs, itf.outputs, self._runner.device)

    def run(self, hook: Hook | None = None, nodes: Iterable[torch.fx.Node | str] | None = None,
            outputs: bool = False) -> list[tuple] | None:
        """Run the block as it is now over every sample. ``hook(name, x, y)`` is called after each
        node of ``nodes`` (default: ``linears()``) with the node's name in the program's graph, the
        value of its first argument (the activation input of a linear) and its result. Returns the
        per-sample outputs (``output_names`` order, on the store device) if ``outputs``."""
        self._runner._check_current(self)
        taps: set[str] = set()
        if hook is not None:
            mine = {n.name: n for n in self.nodes}
            for n in (self.linears() if nodes is None else nodes):
                name = n if isinstance(n, str) else n.name
                if name not in mine:
                    raise ValueError(f"{self.layer_prefix}: cannot tap %{name}: it is not a node of this block")
                if not mine[name].args or not isinstance(mine[name].args[0], torch.fx.Node):
                    raise ValueError(f"{self.layer_prefix}: cannot tap %{name}: its first argument is not a value")
                taps.add(name)
        collected: list[tuple] = []
        self._runner._run_segment(self.position + 1, hook, taps,
                                  (lambda j, out: collected.append(out)) if outputs else None)
        return collected if outputs else None


class BlockwiseRunner:
    """Run ``program`` over calibration samples one transformer block at a time (module docstring).

    ``calib``: a :class:`lowc.passes.calibration.CalibrationData` or a list of ``[1, L]`` token-id
    tensors. ``device``: where each segment runs. ``store``: where boundary values wait between
    segments ("device", or "cpu" to keep only one sample's values on the device). ``propagate``:
    "quantized" feeds block i+1 with the outputs of block i as rewritten by the consumer;
    "float" with its outputs before the rewrite (then also ``block.float_outputs``); "both" keeps the
    two streams (``block.inputs`` quantized, ``block.float_inputs``/``block.float_outputs`` float).
    ``batch``: samples run together (concatenated on the batch dim, where every value the segment
    reads or hands on has export's symbolic batch as dim 0 or no batch at all); hooks then see
    ``batch`` samples at a time. Values are per sample as with 1; sums over samples may differ in
    rounding.
    """

    def __init__(self, program, calib, device: str | torch.device = "cpu", *, progress: bool = True,
                 desc: str = "calibrate", propagate: str = "quantized", store: str = "device", batch: int = 1):
        if propagate not in PROPAGATE_MODES:
            raise CalibrationError(f"propagate={propagate!r}: choose one of {', '.join(PROPAGATE_MODES)}")
        if store not in STORE_MODES:
            raise CalibrationError(f"store={store!r}: choose one of {', '.join(STORE_MODES)}")
        samples = list(getattr(calib, "samples", calib) or [])
        if not samples:
            raise CalibrationError("block-wise calibration needs at least one calibration sample")
        self.program = program
        self.samples = samples
        self.device = torch.device(device)
        self.store = self.device if store == "device" else torch.device("cpu")
        self.progress = progress
        self.desc = desc
        self.propagate = propagate
        if batch < 1:
            raise CalibrationError(f"batch={batch}: must be at least 1")
        self.batch = batch
        token = next((n for n in program.graph.nodes if n.op == "placeholder"), None)
        d0 = token.meta.get("val").shape[0] if token is not None and isinstance(token.meta.get("val"), torch.Tensor) else None
        self._batch_symbol = d0.node.expr if isinstance(d0, torch.SymInt) else None  # export's batch size
        self.n_blocks = len(segments(program)) - 2  # raises early if block-wise is unavailable
        self.log: list[dict[str, Any]] = []  # per block: {"block": i, **set_postfix values}
        self._env: list[dict[str, Any]] = []
        self._fenv: list[dict[str, Any]] = []  # propagate="both": float-stream values produced by blocks
        self._float_names: list[str] = []
        self._block_index: int | None = None
        self._position = -1  # position of the block being yielded; n_blocks once all are done
        self._started = False
        self._bar = None

    # ---- state ----------------------------------------------------------------------------------
    def _segment(self, pos: int) -> tuple[Segment, _Interface]:
        segs = segments(self.program)
        if len(segs) - 2 != self.n_blocks:
            raise CalibrationError(f"the program now has {len(segs) - 2} blocks, it had {self.n_blocks} when "
                                   "block-wise calibration began: passes must not add or remove blocks")
        return segs[pos], _interfaces(segs)[pos]

    def _check_current(self, block: CalibrationBlock) -> None:
        if block._runner is not self or block.position != self._position:
            raise CalibrationError(f"{block.layer_prefix} is no longer the current block: use it inside the loop body")

    def _float_envs(self) -> list[dict[str, Any]]:
        """Per sample, the float stream's values: the quantized stream's with block outputs replaced."""
        if self.propagate != "both":
            return self._env
        return [{**env, **fenv} for env, fenv in zip(self._env, self._fenv)]

    def _run_segment(self, pos: int, hook: Hook | None = None, taps: Iterable[str] = (),
                     on_sample: Callable[[int, tuple], None] | None = None,
                     envs: list[dict[str, Any]] | None = None) -> None:
        """Run segment ``pos`` (as the graph is now) on every sample; ``on_sample(j, outputs)``.
        ``envs``: the per-sample values to read (default: the quantized stream)."""
        seg, itf = self._segment(pos)
        outputs = itf.outputs
        if on_sample is None and taps and seg.kind == "block":
            # only the taps are wanted: run what they depend on (GPTQ's first stages need a fraction
            # of the block), and return nothing
            seg, outputs = needed_for(seg, set(taps)), []
        gm = dequantize_once(build_segment(self.program, seg, itf.inputs, outputs, self.device))
        runner = Tapping(gm, taps, hook) if taps else None
        envs = self._env if envs is None else envs
        for env in envs:
            missing = [name for name in itf.inputs if name not in env]
            if missing:
                raise CalibrationError(
                    f"{seg.name} reads %{missing[0]}, which no earlier segment produced: a segment "
                    "that already ran was rewritten after it ran")
        if seg.kind == "suffix":  # it returns the program's flat outputs
            leaves = torch.utils._pytree.tree_leaves(seg.nodes[-1].args[0])
            outputs = [n.name for n in leaves] if all(isinstance(n, torch.fx.Node) for n in leaves) else None
        self._run_batches((lambda *a: runner.run(*a)) if runner is not None else gm, len(envs),
                          lambda j: [envs[j][name] for name in itf.inputs], itf.inputs, outputs, on_sample)
        del runner, gm  # the segment's parameter copies on ``device`` go with it

    def _batch_dims(self, names: Sequence[str]) -> list[str] | None:
        """Per value, how samples stack: "batch" (a tensor whose dim 0 is export's symbolic batch
        size: concatenated), "count" (the batch size itself, an int: the number of samples) or
        "same" (a tensor with a static dim 0 of 1, or another size: the same for every sample of
        equal shape). None when some value is none of these; samples then run one at a time."""
        if self.batch <= 1 or self._batch_symbol is None:
            return None
        by_name = {n.name: n for n in self.program.graph.nodes}
        dims = []
        for name in names:
            val = by_name[name].meta.get("val")
            if isinstance(val, torch.SymInt):
                dims.append("count" if val.node.expr == self._batch_symbol else "same")
            elif isinstance(val, torch.Tensor) and val.dim() > 0:
                d0 = val.shape[0]
                if isinstance(d0, torch.SymInt) and d0.node.expr == self._batch_symbol:
                    dims.append("batch")
                elif isinstance(d0, int) and d0 == 1:
                    dims.append("same")
                else:
                    return None
            else:
                return None
        return dims

    def _run_batches(self, fn: Callable, n: int, args_of: Callable[[int], list], inputs: Sequence[str],
                     outputs: Sequence[str] | None, on_sample: Callable[[int, tuple], None] | None) -> None:
        """``fn`` over the ``n`` samples (``args_of(j)``: sample j's arguments named ``inputs``), up to
        ``batch`` samples at once when their batched arguments have equal shapes; ``on_sample(j,
        outputs)`` with sample j's slice of each output named ``outputs`` (None: unknown, run one at a time)."""
        in_dims, out_dims = self._batch_dims(inputs), None if outputs is None else self._batch_dims(outputs)
        step = self.batch if in_dims is not None and out_dims is not None else 1
        with torch.no_grad():
            for i in range(0, n, step):
                js = list(range(i, min(i + step, n)))
                per = [args_of(j) for j in js]
                if len(js) > 1 and any(len({tuple(p[k].shape) if d == "batch" else p[k] for p in per}) > 1
                                       for k, d in enumerate(in_dims) if d != "count"):
                    for j, p in zip(js, per):  # samples of different lengths: one at a time
                        self._run_batch(fn, [j], [p], in_dims, out_dims, on_sample)
                else:
                    self._run_batch(fn, js, per, in_dims, out_dims, on_sample)

    def _run_batch(self, fn, js: list[int], per: list[list], in_dims, out_dims, on_sample) -> None:
        if len(js) == 1:
            args = [_move(a, self.device) for a in per[0]]
        else:
            args = [torch.cat([_move(p[k], self.device) for p in per]) if d == "batch" else
                    len(js) if d == "count" else _move(per[0][k], self.device) for k, d in enumerate(in_dims)]
        out = fn(*args)
        del args
        if on_sample is not None:
            for r, j in enumerate(js):
                mine = (v if len(js) == 1 else v[r:r + 1] if out_dims[k] == "batch" else 1 if out_dims[k] == "count"
                        else v for k, v in enumerate(out))
                on_sample(j, tuple(_compact(_move(v, self.store)) for v in mine))
        del out

    def _keep(self, j: int, names: Sequence[str], values: tuple, live: set[str]) -> None:
        env = self._env[j]
        env.update(zip(names, values))
        for name in [k for k in env if k not in live]:
            del env[name]

    def _run_prefix(self) -> None:
        seg, itf = self._segment(0)
        self._env = [{} for _ in self.samples]
        self._fenv = [{} for _ in self.samples]
        gm = build_segment(self.program, seg, [], itf.outputs, self.device)
        placeholders = [n.name for n in seg.nodes if n.op == "placeholder"]
        self._run_batches(gm, len(self.samples), lambda j: calibration_inputs(self.program, self.samples[j]),
                          placeholders, itf.outputs, lambda j, out: self._keep(j, itf.outputs, out, itf.live_after))
        del gm

    def _advance(self, block: CalibrationBlock) -> None:
        pos = block.position + 1
        _, itf = self._segment(pos)
        if self.propagate == "both":
            if list(itf.outputs) != self._float_names:
                raise CalibrationError(f"{block.layer_prefix}: the rewrite changed which values the block hands on "
                                       f"({', '.join(self._float_names)} -> {', '.join(itf.outputs)}); keep its output nodes")
            fouts, block.float_outputs = block.float_outputs, None
            for j, fenv in enumerate(self._fenv):
                fenv.update(zip(self._float_names, fouts[j]))
                fouts[j] = None
                for name in [k for k in fenv if k not in itf.live_after]:
                    del fenv[name]
        if block._outputs is not None:
            outs, block._outputs = block._outputs, None
            for j in range(len(self._env)):
                self._keep(j, itf.outputs, outs[j], itf.live_after)
                outs[j] = None
        elif block.float_outputs is not None:
            outs, block.float_outputs = block.float_outputs, None
            names = self._float_names
            for j in range(len(self._env)):
                self._keep(j, names, outs[j], itf.live_after)
                outs[j] = None
        else:
            self._run_segment(pos, on_sample=lambda j, out: self._keep(j, itf.outputs, out, itf.live_after))

    # ---- public -----------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[CalibrationBlock]:
        if self._started:
            raise CalibrationError("a BlockwiseRunner runs its blocks once: make a new one")
        self._started = True

        self._run_prefix()
        self._bar = tqdm(total=self.n_blocks, desc=self.desc, unit="block", disable=not self.progress)
        try:
            for pos in range(self.n_blocks):
                seg, itf = self._segment(pos + 1)
                self._position, self._block_index = pos, seg.index
                block = CalibrationBlock(self, pos, seg.index)
                if self.propagate in ("float", "both"):
                    outs: list[tuple] = []
                    self._run_segment(pos + 1, on_sample=lambda j, out: outs.append(out), envs=self._float_envs())
                    block.float_outputs, self._float_names = outs, list(itf.outputs)
                yield block
                self._advance(block)
                self._bar.update(1)
            self._position = self.n_blocks
        finally:
            self._bar.close()

    @property
    def held_values(self) -> list[str]:
        """Names of the boundary values stored now (per sample; those of the first sample)."""
        return sorted(self._env[0]) if self._env else []

    def set_postfix(self, **values: Any) -> None:
        """Show ``values`` (e.g. ``loss=``) on the progress bar and record them in ``log`` for the
        current block."""
        if self._bar is not None:
            self._bar.set_postfix(**values)
        if 0 <= self._position < self.n_blocks:
            if not self.log or self.log[-1]["position"] != self._position:
                self.log.append({"position": self._position, "block": self._block_index})
            self.log[-1].update(values)

    def run_suffix(self, flat: bool = False) -> list[Any]:
        """The program's outputs for each sample from the values the last block produced (after the
        consumer's rewrites with propagate="quantized"), structured like ``program.call``'s unless
        ``flat``. May be called more than once; :meth:`close` frees the stored values."""
        if self._position != self.n_blocks:
            raise CalibrationError("run_suffix needs every block processed: finish iterating the runner first")
        results: list[Any] = []
        self._run_segment(self.n_blocks + 1, on_sample=lambda j, out: results.append(out))
        if flat:
            return results
        codegen = self.program.graph._codegen
        return [codegen.process_outputs(list(r)) for r in results]

    def outputs(self, flat: bool = False) -> list[Any]:
        """Run every block unchanged (if iteration has not begun) and return :meth:`run_suffix`."""
        if not self._started:
            for _ in self:
                pass
        return self.run_suffix(flat)

    def close(self) -> None:
        """Free the stored boundary values."""
        self._env = []
        self._fenv = []
