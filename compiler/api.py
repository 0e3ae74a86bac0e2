"""The Python API: ``lowc.compile``, ``lowc.load`` and :class:`CompiledModel`."""

from __future__ import annotations

import datetime
import inspect
import os
import platform
from typing import Any, Iterable, Sequence

import torch
from transformers import AutoTokenizer

from lowc import data
from lowc import evaluate as ev
from lowc.artifact import check_files, read_manifest, read_program, write_artifact
from lowc.backends.registry import all_targets, build_pass, get_target, load_recipe, parse_pass
from lowc.backends.target import CompileOptions
from lowc.errors import (
    ArtifactError,
    CalibrationError,
    GenerationError,
    InputError,
    LowcError,
    PassOptionError,
)
from lowc.frontend.presets import random_weights_note
from lowc.frontend.trace import hf_example, resolve_device
from lowc.ir import meta as nodemeta
from lowc.ir import verifier
from lowc.ir.capture import check_finite, trace
from lowc.ir.dialect.args import LinearArgs, LinearQArgs, is_quantized_linear
from lowc.ir.dialect.sparse import padded_sparse_width
from lowc.ir.program import LINEAR
from lowc.passes.base import Pass, PassContext
from lowc.passes.calibration import load_calibration
from lowc.passes.pipeline import Pipeline
from lowc.progress import current, reporting, step, to_stderr
from lowc.runtime import GenerationConfig, generate, make_decoder
from lowc.version import __version__

#: default calibration size (GPTQ's reference uses 128 x 2048; 512 keeps CPU calibration practical)
DEFAULT_CALIB_SAMPLES = 128
DEFAULT_SEQ_LEN = 512


def _as_passes(passes: Iterable[Any] | None) -> list | None:
    if passes is None:
        return None
    if isinstance(passes, (str, Pass)):
        passes = [passes]
    out = []
    for p in passes:
        if isinstance(p, Pass):
            out.append(p)
        elif isinstance(p, str):
            out.append(parse_pass(p))
        elif isinstance(p, dict) and "name" in p:
            out.append(build_pass(p["name"], p.get("options", {k: v for k, v in p.items() if k != "name"})))
        else:
            raise PassOptionError(f"cannot make a pass from {p!r}: give a spelling like 'rtn{{bits=4}}' or a Pass")
    return out


def tokenizer_of(program):
    tok = getattr(program, "tokenizer", None)
    if tok is None and program.info.tokenizer_dir:

        try:
            tok = AutoTokenizer.from_pretrained(program.info.tokenizer_dir, local_files_only=True, trust_remote_code=False)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ArtifactError(f"{program.info.tokenizer_dir}: cannot load the tokenizer: {first}") from None
        program.tokenizer = tok
    return tok


class CompiledModel:
    """A compiled program: call it like the original model, generate with it (causal LMs), save it, inspect it."""

    def __init__(self, program, target, manifest: dict[str, Any]):
        self.program = program
        self.target = target
        self.manifest = manifest
        self._decoders: dict[str, Any] = {}  # strategy -> lowc.runtime.Decoder, made on first use

    # ---- running ---------------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        with torch.inference_mode():
            return self.program.call(*args, **kwargs)

    def to_module(self) -> ProgramModule:
        """The compiled graph as a plain ``nn.Module`` (its dialect ops, its weights as buffers and
        parameters), called like the original model (the same input names); it can be
        ``torch.compile``-d or handed to other tools. It shares its tensors with this model."""
        return program_module(self.program)

    @property
    def device(self) -> torch.device:
        return self.program.device

    @property
    def tokenizer(self):
        return tokenizer_of(self.program)

    @property
    def kind(self) -> str:
        return self.program.info.kind

    # ---- generating (causal LMs) ---------------------------------------------------------------------
    def generate(self, prompt: Any, max_new_tokens: int = 32, *, attention_mask: torch.Tensor | None = None,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None, eos_token_id: Any = "model",
                 pad_token_id: int | None = None, strategy: str = "auto", on_token=None) -> torch.Tensor:
        """Generate tokens after ``prompt``: ``[B, L + n]`` token ids on the host (the prompt, then up to
        ``max_new_tokens`` generated tokens; fewer when every sequence has produced EOS).

        ``prompt``: token ids ``[B, L]`` (``attention_mask`` for left padding) or ``[L]``, a string, or
        a list of strings (left-padded), tokenized with the model's tokenizer. Greedy unless
        ``do_sample``; sampling divides the logits by ``temperature`` (0 = greedy), keeps the
        ``top_k`` most likely tokens and the ``top_p`` nucleus, and draws with ``seed`` (``None``:
        torch's global generator). ``eos_token_id``: ``"model"`` (the tokenizer's or the config's EOS),
        an id, a list of ids, or ``None`` (never stop early). ``strategy``: ``"auto"``,
        ``"recurrent"``, ``"static-kv"``, ``"kv-cache"`` or ``"recompute"`` (:mod:`lowc.runtime.strategy`; the
        decoder is kept for the next call). ``on_token(i, decoder)`` is called after each token.
        """

        ids, mask = self._prompt_ids(prompt, attention_mask)
        model_eos = isinstance(eos_token_id, str)
        if model_eos and eos_token_id != "model":
            raise GenerationError(f"eos_token_id must be 'model', an id, a list of ids or None; got {eos_token_id!r}")
        eos = self._eos_ids() if model_eos else eos_token_id
        if pad_token_id is None and model_eos:
            pad_token_id = self._pad_id()
        config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                                  top_k=top_k, top_p=top_p, seed=seed, eos_token_id=eos, pad_token_id=pad_token_id)
        dec = self.decoder(strategy)
        try:
            return generate(dec, ids, config, attention_mask=mask, on_token=on_token)
        finally:
            dec.reset()  # the decoder is kept, its caches are not

    def generate_text(self, prompt: str, max_new_tokens: int = 32, skip_special_tokens: bool = True,
                      **options) -> str:
        """The text generated after ``prompt`` (options as :meth:`generate`)."""
        tok = self._require_tokenizer()
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        out = self.generate(ids, max_new_tokens, **options)
        return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=skip_special_tokens)

    def decoder(self, strategy: str = "auto"):
        """The :class:`lowc.runtime.Decoder` that :meth:`generate` uses for ``strategy`` (built once and
        kept: a Hugging Face rebuild is checked against the graph when it is made)."""

        if strategy not in self._decoders:
            self._decoders[strategy] = make_decoder(self, strategy)
        return self._decoders[strategy]

    def _require_tokenizer(self):
        tok = self.tokenizer
        if tok is None:
            raise GenerationError("the model has no tokenizer, so a text prompt cannot be encoded; pass token ids")
        return tok

    def _prompt_ids(self, prompt, attention_mask):
        if isinstance(prompt, str) or (isinstance(prompt, (list, tuple)) and prompt and
                                       all(isinstance(p, str) for p in prompt)):
            if attention_mask is not None:
                raise GenerationError("attention_mask goes with token ids, not with a text prompt")
            tok = self._require_tokenizer()
            if isinstance(prompt, str):
                return tok(prompt, return_tensors="pt")["input_ids"], None
            side = tok.padding_side
            tok.padding_side = "left"
            try:
                enc = tok(list(prompt), return_tensors="pt", padding=True)
            finally:
                tok.padding_side = side
            return enc["input_ids"], enc["attention_mask"]
        if isinstance(prompt, torch.Tensor) and prompt.dim() == 1:
            prompt = prompt.unsqueeze(0)
            attention_mask = None if attention_mask is None else attention_mask.reshape(1, -1)
        return prompt, attention_mask

    def _eos_ids(self) -> list[int]:
        """The model's end-of-sequence ids: the config's (one or a list) and the tokenizer's."""
        eos = (self.program.info.hf_config or {}).get("eos_token_id")
        ids = [eos] if _is_token_id(eos) else [e for e in eos if _is_token_id(e)] if isinstance(eos, list) else []
        tok = self.tokenizer
        if tok is not None and _is_token_id(tok.eos_token_id) and tok.eos_token_id not in ids:
            ids.append(tok.eos_token_id)
        return ids

    def _pad_id(self) -> int | None:
        tok = self.tokenizer
        pad = tok.pad_token_id if tok is not None else (self.program.info.hf_config or {}).get("pad_token_id")
        return pad if _is_token_id(pad) else None

    # ---- reporting ---------------------------------------------------------------------------------
    def layers(self) -> list[dict[str, Any]]:
        return layer_table(self.program)

    def size(self) -> dict[str, int]:
        """Bytes of the stored tensors now, and what they were in float before compression."""
        now = self.program.nbytes()
        saved = sum(r["float_bytes"] - r["bytes"] for r in self.layers() if r["scheme"])
        return {"bytes": now, "float_bytes": now + saved}

    def __repr__(self) -> str:
        s = self.size()
        return (f"CompiledModel(target={self.target.name!r}, kind={self.kind!r}, "
                f"{s['bytes'] / 1e6:.2f} MB vs {s['float_bytes'] / 1e6:.2f} MB float)")

    # ---- artifact ------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, force: bool = False) -> str:
        manifest = {**self.manifest, "layers": self.layers(), "size": self.size()}
        emit = None
        if self.target.emit is not None:
            def emit(d, _p=self.program):
                self.target.emit(_p, d)
        src = self.program.info.source
        protect = [src["path"]] if isinstance(src.get("path"), str) else []
        return write_artifact(os.fspath(path), self.program, manifest, force=force, emit=emit, protect=protect)


class ProgramModule(torch.nn.Module):
    """A compiled program as an ``nn.Module``: ``forward`` takes the original model's inputs by
    position or by name (``graph`` is the GraphModule with the dialect ops and the weights); inputs
    with a default (an attention mask of ones) may be left out or passed as None."""

    def __init__(self, program):
        super().__init__()
        self.graph = program.gm
        self.input_names = [s.name for s in program.info.inputs]
        self.input_defaults = {s.name: (s.default.split(":", 1)[1], getattr(torch, s.dtype))
                               for s in program.info.inputs if s.default and s.default.startswith("ones_like:")}
        self.call_by_name = program.info.call_by_name

    def forward(self, *args, **kwargs):
        if not self.call_by_name:
            return self.graph(*args, **kwargs)
        if len(args) > len(self.input_names):
            raise InputError(f"expected at most {len(self.input_names)} inputs ({', '.join(self.input_names)})")
        kw = dict(zip(self.input_names, args))
        for k, v in kwargs.items():
            if k not in self.input_names or k in kw:
                raise InputError(f"input {k!r} is unknown or given twice; this model takes {self.input_names}")
            kw[k] = v
        for name, (source, dtype) in self.input_defaults.items():
            if kw.get(name) is None and kw.get(source) is not None:
                kw[name] = torch.ones_like(kw[source], dtype=dtype)
        missing = [n for n in self.input_names if kw.get(n) is None]
        if missing:
            raise InputError(f"missing input(s) {missing}; this model takes {self.input_names}")
        return self.graph(**{n: kw[n] for n in self.input_names})


def program_module(program) -> ProgramModule:
    """:class:`ProgramModule` of ``program`` whose ``forward`` shows the input names in its signature
    (``inspect.signature``, what tools that map inputs by name read)."""
    m = ProgramModule(program)
    if m.call_by_name:
        params = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                    default=None if n in m.input_defaults else inspect.Parameter.empty)
                  for n in m.input_names]
        m.forward = _with_signature(ProgramModule.forward.__get__(m), inspect.Signature(params))
    return m


def _with_signature(fn, sig: inspect.Signature):
    def forward(*args, **kwargs):
        return fn(*args, **kwargs)
    forward.__signature__ = sig
    forward.__doc__ = ProgramModule.forward.__doc__
    return forward


def _is_token_id(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def layer_table(program) -> list[dict[str, Any]]:
    """One row per linear-like layer: name, role, block, scheme (or None for a float layer), the
    method that chose its values and the transforms folded into it, the op that runs it, shape,
    bytes stored and float bytes (``padded_in_features`` when the input width was padded)."""

    def nbytes(*nodes) -> int:
        return sum(program.attr(n.target).numel() * program.attr(n.target).element_size() for n in nodes if n is not None)

    rows = []
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        info = nodemeta.get(node)
        row = {"layer": info.layer, "role": info.role, "block": info.block, "scheme": None, "method": info.method,
               "transforms": list(info.transforms)}
        if node.target == LINEAR and LinearArgs.of(node).constant:
            w = program.attr(LinearArgs.of(node).weight.target)
            rows.append({**row, "op": "aten::linear", "out_features": int(w.shape[0]), "in_features": int(w.shape[1]),
                         "bytes": nbytes(LinearArgs.of(node).weight), "float_bytes": nbytes(LinearArgs.of(node).weight)})
        elif is_quantized_linear(node) and info.scheme:
            a = LinearQArgs.of(node)
            scales = program.attr(a.scales.target)
            # backend layouts say N (``out_features``): their scales may be stored [G, N]
            n = int(a.out_features) if a.out_features is not None else int(scales.shape[0])
            k = int(a.in_features)
            # a group-sparse layer's groups cover the compact row: its padding is to the sparse group
            k_pad = padded_sparse_width(k, a.sparse_group) if a.sparse else scales.numel() // n * a.group_size
            stored = nbytes(a.weight, a.scales, a.zeros, a.idx)
            rows.append({**row, "scheme": info.scheme.to_json(), "op": a.op_name,
                         "padded_in_features": k_pad if k_pad != k else None, "out_features": n, "in_features": k,
                         "bytes": stored, "float_bytes": n * k * scales.element_size(),
                         "bits_per_weight": round(stored * 8 / max(n * k, 1), 4)})
    return rows


def compile(model: Any, target: str = "ref-fp32", example_inputs: Sequence[Any] | None = None, calib: Any = None,
            passes: Iterable[Any] | None = None, *, recipe: str | None = None, device: str = "cpu",
            dtype: str | torch.dtype | None = None, seed: int = 0, calib_samples: int = DEFAULT_CALIB_SAMPLES,
            seq_len: int = DEFAULT_SEQ_LEN, print_after: Sequence[str] = (), progress: bool = True,
            verify: bool = True, dynamic_shapes=None, tokenizer=None, allow_nonfinite: bool = False) -> CompiledModel:
    """Trace ``model`` and run ``target``'s pipeline on it.

    ``model``: an nn.Module (with ``example_inputs`` unless it is a transformers model), a Hugging
    Face directory, a preset name (``tiny-llama``, ``minilm``) or ``package.module:factory``.
    ``example_inputs`` of a transformers model: token ids, ``(ids, mask)`` or a tokenizer's output
    (any batch and length, 1 included); they seed the output check, and capture keeps batch and
    sequence dynamic. ``calib``: token-id tensors, strings, a text file path, or a built-in text
    name (``wikitext-2-valid``, see :mod:`lowc.data`); text needs a tokenizer: a model given as an
    nn.Module takes it as ``tokenizer`` (directories and presets bring their own). ``passes``: spellings or Pass objects
    replacing the target's default method passes (``recipe``: a YAML/JSON file of them).
    ``device``: ``cpu``, ``cuda`` or ``cuda:N`` (checked before anything runs). Weights with NaN or
    inf fail the compile, naming the tensor, unless ``allow_nonfinite``.
    """

    device = str(resolve_device(device))
    # Everything that depends on the arguments alone is checked here, before the model is loaded or
    # traced (which takes seconds to minutes): the target, the passes and their requirements.
    tgt = get_target(target)
    user = _as_passes(passes)
    if recipe is not None:
        user = (user or []) + load_recipe(os.fspath(recipe))
    _check_calib_argument(calib, calib_samples, seq_len)
    phases = tgt.phases(CompileOptions(user_passes=tuple(user) if user is not None else None,
                                       has_calib=calib is not None, device=device))
    steps = [(ph.name, p) for ph in phases for p in ph.passes]
    for _, p in steps:
        if "calibration" in p.requirements() and calib is None:
            raise CalibrationError(f"pass '{p.name}' needs calibration data: pass calib= (Python) or --calib FILE (CLI)")
        p.check_target(tgt)
        missing = [op for op in p.emits if op not in tgt.runs]
        if missing:
            raise PassOptionError(f"pass '{p.name}' writes lowc::{missing[0]} layers, which target '{tgt.name}' cannot run "
                                  f"(targets that do: {', '.join(_targets_running(missing[0])) or 'none'})")

    def starting(i, phase, p):
        step(f"[{i + 1}/{len(steps)}] {phase} pass {p.spelling()}")

    def done(record):
        step(f"  {record.summary()}")
        if record.phase == "method":
            _check_runs(program, tgt)

    pipeline = Pipeline(steps, verify=verify, print_after=tuple(print_after), on_start=starting, on_end=done)
    pipeline.check()
    # progress=True reports to the reporter already installed (the CLI's) or to stderr
    with reporting((current() or to_stderr) if progress else None):
        step(f"compiling {_model_label(model)} for {tgt.name}")
        torch.manual_seed(seed)
        program = trace(model, example_inputs, device=device, dtype=dtype, dynamic_shapes=dynamic_shapes,
                        tokenizer=tokenizer)
        if not allow_nonfinite:
            check_finite(program)
        calib_data = None
        if calib is not None:
            step(f"reading calibration data ({calib_samples} x {seq_len} tokens)")
            vocab = next((s.vocab_size for s in program.info.inputs if s.vocab_size), None)
            calib_data = load_calibration(calib, tokenizer_of(program), calib_samples, seq_len, seed, vocab_size=vocab)
        ctx = PassContext(target=tgt, scheme=tgt.scheme, calib=calib_data, device=device, seed=seed, progress=progress)
        note = random_weights_note(program.info.source)
        if note:
            ctx.log.append(note)
        check_inputs = _check_inputs(program, example_inputs)
        with torch.inference_mode():
            float_out = program.call(*check_inputs)
        records = pipeline.run(program, ctx)
        check = _output_check(program, check_inputs, float_out)
        if tgt.prepare is not None:
            step(f"preparing the {tgt.backend} backend's kernels for {device}")
            tgt.prepare(program, device)
    manifest = {
        "lowc_version": __version__,
        "torch_version": torch.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.machine(),
        "target": tgt.name,
        "backend": tgt.backend,
        "scheme": tgt.scheme.to_json() if tgt.scheme else None,
        "passes": [r.to_json() for r in records],
        "source": program.info.source,
        "model": program.info.to_json(),
        "calibration": calib_data.describe() if calib_data is not None else None,
        "seed": seed,
        "dtype": next((str(t.dtype).replace("torch.", "") for t in program.state_tensors().values()), None),
        "log": ctx.log,
        "metrics": {"check": check},
    }
    return CompiledModel(program, tgt, manifest)


#: dialect ops a method pass may write that only some targets run (``Target.runs``)
EXTRA_OPS = ("linear_gsq",)


def _targets_running(op: str) -> list[str]:
    return [name for name, t in all_targets().items() if op in t.runs]


def _check_runs(program, tgt) -> None:
    """Every layer the method phase wrote runs on ``tgt``: an op of :data:`EXTRA_OPS`, or a
    group-sparse scheme, needs the op in ``tgt.runs`` (raises naming the layer and the target)."""
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        name = node.target.name().split("::")[-1] if isinstance(node.target, torch._ops.OpOverload) else None
        scheme = nodemeta.get(node).scheme
        op = name if name in EXTRA_OPS else "linear_gsq" if scheme is not None and scheme.sparsity else None
        if op is not None and op not in tgt.runs:
            raise PassOptionError(f"layer {nodemeta.get(node).layer or node.name}: target '{tgt.name}' cannot run "
                                  f"lowc::{op} layers (targets that do: {', '.join(_targets_running(op)) or 'none'})")


def _check_inputs(program, example_inputs) -> list:
    """The inputs of the compile-time output check, in graph-input order: the user's example (a
    batch of 1 included: capture used a size that keeps the dims dynamic, the program runs at any),
    else seeded random ones of the captured shape."""
    if example_inputs is None:
        return program.example_inputs(seed=1)
    if program.info.call_by_name:

        example = hf_example(example_inputs, program.info.source.get("name", "the model"))
        if example is None:
            return program.example_inputs(seed=1)
        return [t.to(program.device) for t in program.bind(**example).values()]
    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    return [a.to(program.device) for a in args]


def _model_label(model: Any) -> str:
    if isinstance(model, (str, os.PathLike)):
        return os.fspath(model)
    return type(model).__name__


def _check_calib_argument(calib: Any, calib_samples: int, seq_len: int) -> None:
    """The calibration checks that need no model: a file path exists, the sizes are positive."""
    if calib_samples < 1 or seq_len < 1:
        raise CalibrationError(f"calibration needs at least one sample of at least one token (got {calib_samples} x {seq_len})")
    if isinstance(calib, (str, os.PathLike)):

        data.resolve(calib, "calibration file", CalibrationError)


def _output_check(program, inputs: list, float_out) -> dict[str, Any]:
    """Compressed vs float output on the (random-token) example inputs: a smoke check recorded in
    the manifest; real quality numbers come from ``lowc eval`` on text."""

    names = [s.name for s in program.info.inputs]
    batch = dict(zip(names, inputs))
    kind = program.info.kind if program.info.call_by_name else "module"
    # Program.call binds positional inputs by name for HF programs, so one call serves both kinds
    return ev.compare(lambda **kw: float_out, lambda **kw: program.call(*inputs), [batch], kind).to_json()


def load(path: str | os.PathLike, device: str = "cpu", check_hashes: bool = True) -> CompiledModel:
    """Load an artifact written by :meth:`CompiledModel.save` (in any process).

    The artifact is untrusted input: nothing in it is executed or imported, every file must be in
    the manifest's hash table (``check_hashes=False`` skips only the sha256 of each file, not the
    listing or the sizes), and any malformed content is an :class:`ArtifactError` naming the file."""

    path = os.fspath(path)
    device = str(resolve_device(device))
    manifest = read_manifest(path)
    check_files(path, manifest, hashes=check_hashes)
    try:
        tgt = get_target(manifest["target"])
    except LowcError as e:
        raise ArtifactError(f"{path}: {e}") from None
    program = read_program(path, manifest, device=device)
    try:
        verifier.verify(program)
    except LowcError as e:
        raise ArtifactError(f"{path}: the stored graph does not verify: {e}") from None
    if tgt.prepare is not None:
        tgt.prepare(program, device)
    return CompiledModel(program, tgt, manifest)
