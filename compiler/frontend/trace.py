"""Capture a model with torch.export: the frontend half of ``lowc.trace``.

:func:`capture` accepts an ``nn.Module`` with example inputs, a Hugging Face ``PreTrainedModel``, a Hugging Face
model directory, a preset name (``tiny-llama``, ``minilm``) or ``package.module:factory``. Capture
uses ``torch.export.export(..., strict=False)`` (transformers models are exported with
``use_cache=False``); batch and sequence dims of HF inputs are dynamic. The exported program is
unlifted to a GraphModule and returned as a :class:`Capture` with its :class:`ModelInfo`;
:func:`lowc.ir.capture.trace` canonicalizes and annotates it into the IR. The frontend is the
lowest layer: it imports nothing of lowc but the base modules.

Example inputs of a transformers model (token ids, ``(ids, mask)``, or what a tokenizer returns:
a ``BatchEncoding``/dict with ``input_ids``, ``attention_mask``, ``token_type_ids``) fix only the
capture size, and only where it keeps batch and sequence dynamic: torch.export specializes dims of
size 0 or 1, so an example of batch 1 or one token is captured at size 2 (:data:`MIN_DYNAMIC`), and
the program then runs at any size, 1 included.
"""

from __future__ import annotations

import importlib
import os
import re
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.fx

from lowc.errors import CaptureError, DeviceError, ModelLoadError
from lowc.frontend import hf, presets
from lowc.frontend.spec import InputSpec, ModelInfo, as_input_tensor
from lowc.progress import step

#: the smallest size a dynamic dim is captured at (torch.export specializes sizes 0 and 1)
MIN_DYNAMIC = 2

#: what a transformers model's token inputs are called, in its positional order
HF_TOKEN_INPUTS = ("input_ids", "attention_mask")

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float16 if str(device).startswith("cuda") else torch.float32
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)}, auto)") from None


def resolve_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch.device if this machine can run on it, else a one-line DeviceError."""
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise DeviceError(f"unknown device {device!r} (expected cpu, cuda or cuda:N)") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            why = (f"torch {torch.__version__} is built without CUDA" if torch.version.cuda is None
                   else "no CUDA device is visible")
            raise DeviceError(f"CUDA is not available ({why}): use --device cpu")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise DeviceError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif d.type != "cpu":
        raise DeviceError(f"device {device!r} is not supported (expected cpu, cuda or cuda:N)")
    return d


def _user_frame(e: BaseException) -> str:
    """The deepest traceback frame outside torch: where in the model capture broke."""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if "/torch/" not in f.filename]
    if not frames:
        return ""
    f = frames[-1]
    return f" (at {os.path.basename(f.filename)}:{f.lineno} in {f.name})"


def _capture_error(e: Exception, what: str) -> CaptureError:
    msg = str(e).strip()
    first = next((l.strip() for l in msg.splitlines() if l.strip()), type(e).__name__)
    if first.startswith("Constraints violated"):  # the reason is on the next "- " line
        reason = next((l.strip()[2:] for l in msg.splitlines() if l.strip().startswith("- ")), "")
        first = f"{first.split('!')[0]}: {reason}" if reason else first
    op = re.search(r"(aten\.\w+(\.\w+)?|torch\.ops\.\w+\.\w+)", msg)
    where = f" in op {op.group(1)}" if op else ""
    return CaptureError(f"cannot capture {what}{where}: {type(e).__name__}: {first[:300]}{_user_frame(e)}")


def _export_raw(model: torch.nn.Module, args: tuple, kwargs: dict, dynamic_shapes):
    with torch.no_grad():
        return torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)


def _export(model: torch.nn.Module, args: tuple, kwargs: dict, dynamic_shapes, what: str):
    try:
        return _export_raw(model, args, kwargs, dynamic_shapes)
    except Exception as e:
        raise _capture_error(e, what) from e


def _export_dynamic(model: torch.nn.Module, kwargs: dict, dims: dict[str, tuple[int, int]], what: str):
    """Export ``model(**kwargs)`` with dims ``{name: (axis, max)}`` dynamic on every input.

    Named ``Dim``s come first: export then proves every guard over the whole range, and a model that
    specializes a dim fails here, naming it. Older torch (2.11, with transformers 5.17's mask code)
    cannot prove some true guards (``Min(16*s, 32*s) == 16*s``) and reports them as violations; then
    export is retried with ``Dim.DYNAMIC`` ranges, and every dim must still be symbolic afterwards.
    """
    def spec(make):
        return {k: {axis: make(n, mx) for n, (axis, mx) in dims.items()} for k in kwargs}

    try:
        return _export_raw(model, (), kwargs, spec(lambda n, mx: torch.export.Dim(n, min=1, max=mx)))
    except Exception as e:
        first = e
    hint = getattr(torch.export.Dim, "DYNAMIC", None)
    if hint is None or "Constraints violated" not in str(first):
        raise _capture_error(first, what) from first
    make = (lambda n, mx: hint(min=1, max=mx)) if callable(hint) else (lambda n, mx: hint)
    try:
        ep = _export_raw(model, (), kwargs, spec(make))
    except Exception:
        raise _capture_error(first, what) from first  # the named-Dim error says which guard failed
    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    for name in ep.graph_signature.user_inputs:
        shape = placeholders[name].meta["val"].shape
        for dim, (axis, _) in dims.items():
            if not isinstance(shape[axis], torch.SymInt):
                raise CaptureError(f"cannot capture {what}: the model fixes the {dim} dimension of {name} "
                                   f"to {shape[axis]} (torch {torch.__version__}); first export error: "
                                   f"{str(first).strip().splitlines()[0][:200]}")
    return ep


@dataclass
class Capture:
    """What capture produces: the exported module (unlifted: parameters and buffers are attributes),
    how it is called and where it came from, and the model's tokenizer. :func:`lowc.ir.capture.trace`
    canonicalizes it into a :class:`lowc.ir.Program`."""

    module: torch.fx.GraphModule
    info: ModelInfo
    tokenizer: Any = None


def _captured(ep, info: ModelInfo, tokenizer=None) -> Capture:
    gm = ep.module()
    for h in list(gm._forward_pre_hooks):  # export's input-constraint hooks: Program.call checks inputs
        del gm._forward_pre_hooks[h]
    return Capture(gm, info, tokenizer)


def capture_hf_model(model, tokenizer=None, *, kind: str | None = None, source: dict | None = None,
                   batch: int = 2, seq_len: int = 16, device: str = "cpu") -> Capture:
    """Capture a transformers PreTrainedModel called as ``model(input_ids, attention_mask)``."""
    cfg = model.config
    if kind is None:
        kind = "causal-lm" if type(model).__name__.endswith(("ForCausalLM", "LMHeadModel")) else "encoder"
    if hasattr(cfg, "use_cache"):
        cfg.use_cache = False
    vocab = int(getattr(cfg, "vocab_size", 0) or 0) or 1000
    max_pos = int(getattr(cfg, "max_position_embeddings", 0) or 4096)
    model = model.to(device).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq_len), generator=g).to(device)
    mask = torch.ones_like(ids)
    what = (source or {}).get("name") or type(model).__name__
    step(f"tracing {what} ({type(model).__name__}) with torch.export, batch and sequence dynamic")
    ep = _export_dynamic(model, {"input_ids": ids, "attention_mask": mask},
                         {"batch": (0, 4096), "seq": (1, max_pos)}, what)
    info = ModelInfo(
        kind=kind,
        source=source or {"type": "module", "name": type(model).__name__, "sha256": hf.fingerprint_module(model)},
        inputs=[
            InputSpec("input_ids", "int64", [batch, seq_len], {0: "batch", 1: "seq"}, vocab_size=vocab),
            InputSpec("attention_mask", "int64", [batch, seq_len], {0: "batch", 1: "seq"}, default="ones_like:input_ids"),
        ],
        call_by_name=True,
        hf_config=cfg.to_dict(),
    )
    return _captured(ep, info, tokenizer)


def capture_module(model: torch.nn.Module, example_inputs: Sequence[Any], dynamic_shapes=None) -> Capture:
    """Capture a plain nn.Module called as ``model(*example_inputs)``."""
    args = tuple(example_inputs)
    if not all(isinstance(a, torch.Tensor) for a in args):
        raise CaptureError("example_inputs must be a tuple of tensors for a plain nn.Module")
    step(f"tracing {type(model).__name__} with torch.export")
    ep = _export(model.eval(), args, {}, dynamic_shapes, type(model).__name__)
    dyn: list[dict[int, str]] = [{} for _ in args]
    if dynamic_shapes is not None:
        for i, spec in enumerate(dynamic_shapes):
            for dim, d in (spec or {}).items():
                dyn[i][int(dim)] = getattr(d, "__name__", str(d))
    info = ModelInfo(
        kind="module",
        source={"type": "module", "name": type(model).__name__, "sha256": hf.fingerprint_module(model)},
        inputs=[InputSpec(f"input_{i}", str(a.dtype).replace("torch.", ""), list(a.shape), dyn[i]) for i, a in enumerate(args)],
    )
    return _captured(ep, info)


def load_source(model: Any, dtype: torch.dtype = torch.float32):
    """(nn.Module, tokenizer, kind, source identity) for a preset / path / factory spelling."""
    if isinstance(model, os.PathLike):
        model = os.fspath(model)
    if not isinstance(model, str):
        raise ModelLoadError(f"cannot load a model from {type(model).__name__}")
    step(f"loading {model}")
    if model in presets.PRESETS:
        preset = presets.get(model)
        if model == "tiny-llama":
            m, tok = preset.build()
            return m.to(dtype), tok, "causal-lm", {"type": "preset", "name": model, "seed": 0}
        path = preset.build()
        m, tok, kind = hf.load_hf_dir(path, dtype)
        return m, tok, kind, {"type": "preset", "name": model, "path": path, "sha256": hf.fingerprint_dir(path)}
    if hf.is_hub_id(model):
        path = hf.resolve_hub_id(model)
        m, tok, kind = hf.load_hf_dir(path, dtype)
        return m, tok, kind, {"type": "hf-dir", "name": model, "path": path, "sha256": hf.fingerprint_dir(path)}
    if os.path.exists(model) or os.sep in model or model.startswith("."):
        m, tok, kind = hf.load_hf_dir(model, dtype)
        return m, tok, kind, {"type": "hf-dir", "name": os.path.basename(os.path.abspath(model)),
                              "path": os.path.abspath(model), "sha256": hf.fingerprint_dir(model)}
    if re.fullmatch(r"[\w.]+:\w+", model):
        mod_name, fn_name = model.split(":")
        try:
            fn = getattr(importlib.import_module(mod_name), fn_name)
        except (ImportError, AttributeError) as e:
            raise ModelLoadError(f"cannot import factory {model!r}: {e}") from None
        obj = fn()
        m, tok = (obj if isinstance(obj, tuple) else (obj, None))
        if not isinstance(m, torch.nn.Module):
            raise ModelLoadError(f"factory {model!r} returned {type(m).__name__}, not an nn.Module")
        kind = "causal-lm" if type(m).__name__.endswith(("ForCausalLM", "LMHeadModel")) else "encoder"
        return m.to(dtype).eval(), tok, kind, {"type": "factory", "name": model}
    raise ModelLoadError(
        f"unknown model {model!r}: not a preset ({', '.join(presets.PRESETS)}), an existing directory, a Hugging Face "
        "Hub id (org/name, from the local cache) or package.module:factory"
    )


def _is_hf_model(model: Any) -> bool:
    return isinstance(model, torch.nn.Module) and hasattr(model, "config") and hasattr(model.config, "to_dict")


def capture(model: Any, example_inputs: Sequence[Any] | None = None, *, dynamic_shapes=None,
            device: str = "cpu", dtype: str | torch.dtype | None = None, tokenizer=None,
            seq_len: int = 16, batch: int = 2) -> Capture:
    """Capture ``model`` (module, HF model, directory, preset or factory) with torch.export."""
    torch_dtype = resolve_dtype(dtype, device)
    if isinstance(model, (str, os.PathLike)):
        m, tok, kind, source = load_source(model, torch_dtype)
        if not _is_hf_model(m):
            if example_inputs is None:
                raise CaptureError(f"model {model!r} is not a transformers model: pass example_inputs")
            return capture_module(m.to(device), example_inputs, dynamic_shapes)
        return capture_hf_model(m, tokenizer or tok, kind=kind, source=source, batch=batch, seq_len=seq_len, device=device)
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"cannot trace a {type(model).__name__}: expected an nn.Module, a path or a preset name")
    if example_inputs is None and _is_hf_model(model):
        if dtype is not None:
            model = model.to(torch_dtype)
        return capture_hf_model(model, tokenizer, batch=batch, seq_len=seq_len, device=device)
    if example_inputs is None:
        raise CaptureError(f"{type(model).__name__} is a plain nn.Module: pass example_inputs")
    if _is_hf_model(model) and dynamic_shapes is None:
        example = hf_example(example_inputs, type(model).__name__)
        if example is not None:
            b, s = example["input_ids"].shape
            return capture_hf_model(model, tokenizer, batch=max(b, MIN_DYNAMIC), seq_len=max(s, MIN_DYNAMIC), device=device)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    return capture_module(model, example_inputs, dynamic_shapes)


def hf_example(example_inputs: Any, what: str) -> dict[str, torch.Tensor] | None:
    """A transformers model's example token inputs as ``{name: tensor}`` (``input_ids`` and maybe
    ``attention_mask``, integer ``[batch, seq]``), or None when they are not token inputs (e.g. a
    vision model's float ``pixel_values``, traced as a plain module).

    Accepts ids, ``(ids,)``, ``(ids, mask)``, a mapping such as a tokenizer's ``BatchEncoding`` (or a
    tuple holding one). ``token_type_ids`` must be all zero: lowc captures without them (segment 0),
    which is what a tokenizer gives for single sentences."""
    if isinstance(example_inputs, tuple) and len(example_inputs) == 1 and isinstance(example_inputs[0], Mapping):
        example_inputs = example_inputs[0]
    if isinstance(example_inputs, Mapping):
        given = dict(example_inputs)
        if "input_ids" not in given:
            if any(isinstance(v, torch.Tensor) and v.is_floating_point() for v in given.values()):
                return None
            raise CaptureError(f"example inputs for {what} have no 'input_ids' (keys: {', '.join(map(str, given)) or 'none'})")
    else:
        if isinstance(example_inputs, torch.Tensor):
            example_inputs = (example_inputs,)
        args = tuple(example_inputs)
        if not args or len(args) > len(HF_TOKEN_INPUTS) or not isinstance(args[0], torch.Tensor) or args[0].is_floating_point():
            return None
        given = dict(zip(HF_TOKEN_INPUTS, args))
    tt = given.pop("token_type_ids", None)
    if tt is not None and bool((as_input_tensor("token_type_ids", tt, CaptureError) != 0).any()):
        raise CaptureError(f"example token_type_ids for {what} hold segment ids other than 0; lowc captures "
                           "transformers models without token_type_ids (every token segment 0)")
    extra = sorted(set(given) - set(HF_TOKEN_INPUTS))
    if extra:
        raise CaptureError(f"example inputs for {what}: lowc captures transformers models with "
                           f"{', '.join(HF_TOKEN_INPUTS)} only, not {', '.join(map(str, extra))}")
    out = {k: as_input_tensor(k, v, CaptureError, torch.int64) for k, v in given.items()}
    for k, v in out.items():
        if v.dim() != 2 or v.numel() == 0:
            raise CaptureError(f"example {k} for {what} must be [batch, seq] token ids, got shape {list(v.shape)}")
        if v.shape != out["input_ids"].shape:
            raise CaptureError(f"example {k} for {what} has shape {list(v.shape)}, input_ids {list(out['input_ids'].shape)}")
    return out
