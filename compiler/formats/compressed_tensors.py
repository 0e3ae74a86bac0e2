"""``lowc export --format compressed-tensors``: a compiled Hugging Face model as a Hugging Face model
directory in the compressed-tensors ``pack-quantized`` format, which transformers (with the
``compressed-tensors`` package) and vLLM load.

What is written: ``config.json`` (the source model's config with a ``quantization_config``: one
config group per distinct scheme, its ``targets`` the layer names, float linear layers in
``ignore``), ``model.safetensors`` and the tokenizer. Each quantized linear ``L`` becomes
``L.weight_packed`` (int32), ``L.weight_scale`` (the model dtype), ``L.weight_zero_point``
(asymmetric schemes only, int32) and ``L.weight_shape``; every other tensor (embeddings, norms,
float linears such as ``lm_head``, biases) is written as it is in the compiled model.

The codes are carried exactly. compressed-tensors dequantizes ``(q - z) * s`` with signed ``q`` and
``z`` in ``[-2^(b-1), 2^(b-1) - 1]`` and packs ``q + 2^(b-1)``; lowc stores unsigned codes ``q`` and
zero points ``z`` in ``[0, 2^b - 1]`` (symmetric: ``z = 2^(b-1)`` implicit). Subtracting
``2^(b-1)`` from both leaves ``q - z`` unchanged, and the packed values are then lowc's own codes:
a row's codes as a little-endian bit string (value ``i`` at bit ``i*b``, lowc's packing too),
read as int32 words. Zero points are packed the same way along the output dimension. Symmetric
schemes store no zero point in either convention.

Refused, with one line naming the layer: ops other than the reference layout ``lowc::linear_wq``
(online transforms such as FlatQuant's ``kron_transform``, linearized attention, KV-cache or
activation quantization: compressed-tensors' int8 per-token activations round with another scale,
group-sparse layers, backend layouts: compile for a ``ref-*`` target), widths of 3, 5, 6 or 7 bits
(their codes straddle int32 words, and compressed-tensors versions disagree on how), a model with
no Hugging Face config. Last, the model that the directory describes (dequantized on the CPU) is
compared with the compiled graph on a short input: a pass that changed the model elsewhere than in
its tensors (an op the export cannot see) fails the export instead of writing a different model.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from lowc.artifact import write_directory
from lowc.errors import ExportError
from lowc.frontend.outputs import main_tensor
from lowc.ir import meta as nodemeta
from lowc.ir.dialect import packing
from lowc.ir.dialect.args import LinearQArgs, is_quantized_linear
from lowc.ir.dialect.quant import dequantize
from lowc.progress import step
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

FORMAT = "compressed-tensors"
PACKED = "pack-quantized"
#: widths whose codes never straddle an int32 word: every compressed-tensors version packs them alike
BITS = (1, 2, 4, 8)
#: the one dialect op carried: the reference packed layout
CARRIED = "linear_wq"
#: why the other dialect ops cannot be carried
REFUSED = {
    "kron_transform": "an online transform (lowc::kron_transform, from FlatQuant or AffineQuant) that "
                      "compressed-tensors has no entry for",
    "linear_attention": "linearized attention, which compressed-tensors cannot express",
    "fake_quant_kv": "KV-cache quantization, which this export does not write",
    "linear_wqaq": "activation quantization: lowc's per-token scale (absmax/127) is not compressed-tensors' "
                   "(absmax/127.5), so the outputs would change; export a weight-only (A16) compile",
    "linear_gsq": "a group-sparse layer (GQSA), which compressed-tensors' dense packing cannot carry",
}


@dataclass
class CTExport:
    """What :func:`export_compressed_tensors` wrote."""

    path: str
    groups: dict[str, dict[str, Any]]  # config group name -> {"scheme": label, "layers": count}
    ignored: list[str] = field(default_factory=list)  # float linear layers
    tensors: int = 0
    bytes: int = 0
    check_rel_diff: float = 0.0  # the described model vs the compiled graph on the check input


def is_export_dir(path: str) -> bool:
    """Whether ``path`` holds a compressed-tensors model directory (one this export may replace)."""
    try:
        with open(os.path.join(path, "config.json")) as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and isinstance(cfg.get("quantization_config"), dict) and \
        cfg["quantization_config"].get("quant_method") == FORMAT


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes ``[R, C]`` as compressed-tensors' int32 words ``[R, ceil(C*b/32)]``: each row a
    little-endian bit string, value ``i`` at bit ``i*b`` (lowc's packing, padded to whole words)."""
    rows, cols = codes.shape
    words = math.ceil(cols * bits / 32)
    padded = torch.nn.functional.pad(codes.to(torch.int32), (0, -cols % 32))
    raw = packing.pack(padded, bits)[:, :words * 4].contiguous()  # bytes, least significant first
    b = raw.to(torch.int64).reshape(rows, words, 4)
    word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)
    return torch.where(word >= 1 << 31, word - (1 << 32), word).to(torch.int32)  # two's complement


@dataclass(frozen=True)
class _Layer:
    name: str
    args: LinearQArgs
    strategy: str  # "group" / "channel"
    group_size: int | None
    symmetric: bool

    @property
    def key(self) -> tuple:
        return (self.args.bits, self.strategy, self.group_size, self.symmetric)

    @property
    def label(self) -> str:
        g = "per-channel" if self.strategy == "channel" else f"g{self.group_size}"
        return f"W{self.args.bits}A16 {g} {'sym' if self.symmetric else 'asym'}"


def _lowc_nodes(program) -> Iterable[torch.fx.Node]:
    for node in program.graph.nodes:
        if node.op == "call_function" and getattr(node.target, "namespace", None) == "lowc":
            yield node


def quantized_layers(program) -> list[_Layer]:
    """The quantized linears, each checked to be one compressed-tensors can carry (else ExportError)."""
    out = []
    for node in _lowc_nodes(program):
        info = nodemeta.get(node)
        layer = info.layer or node.name
        op = node.target.name().split("::")[-1]
        if op != CARRIED:
            why = REFUSED.get(op) or (f"lowc::{op}, a layout the export does not know (compile for a ref-* target)"
                                      if is_quantized_linear(node) else f"lowc::{op}, which the export does not know")
            raise ExportError(f"layer {layer}: cannot export to {FORMAT}: {why}")
        a = LinearQArgs.of(node)
        for operand in (a.weight, a.scales, a.zeros, a.bias):
            if operand is not None and not (isinstance(operand, torch.fx.Node) and operand.op == "get_attr"):
                raise ExportError(f"layer {layer}: cannot export to {FORMAT}: an operand is computed in the graph")
        if a.bits not in BITS:
            raise ExportError(f"layer {layer}: cannot export {a.bits}-bit weights to {FORMAT}: only "
                              f"{', '.join(map(str, BITS))} bits pack into whole int32 words alike in every version")
        if info.scheme is not None and info.scheme.a_bits != 16:
            raise ExportError(f"layer {layer}: cannot export to {FORMAT}: {REFUSED['linear_wqaq']}")
        k_pad = program.attr(a.scales.target).shape[1] * a.group_size
        per_channel = (info.scheme or a.scheme(k_pad)).group_size == -1
        out.append(_Layer(layer, a, "channel" if per_channel else "group", None if per_channel else a.group_size,
                          a.zeros is None))
    return out


def _weights_json(layer: _Layer) -> dict[str, Any]:
    return {"num_bits": layer.args.bits, "type": "int", "symmetric": layer.symmetric, "strategy": layer.strategy,
            "group_size": layer.group_size, "dynamic": False, "actorder": None, "observer": "minmax"}


def quantization_config(layers: list[_Layer], ignore: list[str]) -> dict[str, Any]:
    """``quantization_config`` of config.json: one group per distinct scheme, its layers by name."""
    by_key: dict[tuple, list[_Layer]] = {}
    for l in layers:
        by_key.setdefault(l.key, []).append(l)
    groups = {f"group_{i}": {"targets": [l.name for l in ls], "weights": _weights_json(ls[0]),
                             "input_activations": None, "output_activations": None, "format": PACKED}
              for i, ls in enumerate(by_key.values())}
    return {"quant_method": FORMAT, "format": PACKED, "quantization_status": "compressed", "config_groups": groups,
            "ignore": ignore, "kv_cache_scheme": None, "global_compression_ratio": None}


def _layer_tensors(program, layer: _Layer) -> dict[str, torch.Tensor]:
    a, b = layer.args, layer.args.bits
    scales = program.attr(a.scales.target)
    n, k = scales.shape[0], int(a.in_features)
    codes = packing.unpack(program.attr(a.weight.target), b)[:, :k]
    out = {"weight_packed": pack_int32(codes, b), "weight_scale": scales.clone(),
           "weight_shape": torch.tensor([n, k], dtype=torch.int64)}
    if a.zeros is not None:
        out["weight_zero_point"] = pack_int32(program.attr(a.zeros.target).t().contiguous(), b).t().contiguous()
    if a.bias is not None:
        out["bias"] = program.attr(a.bias.target).clone()
    return {f"{layer.name}.{k}": v.contiguous() for k, v in out.items()}


def _hf_config(program):
    cfg = dict(program.info.hf_config or {})
    model_type = cfg.pop("model_type", None)
    if not model_type:
        src = program.info.source or {}
        raise ExportError(f"{src.get('name', 'the model')} ({src.get('type', 'module')}) was not compiled from a "
                          f"Hugging Face model with a config: {FORMAT} needs one")
    cfg.pop("transformers_version", None)
    cfg.pop("quantization_config", None)
    return AutoConfig.for_model(model_type, **cfg)


def _model_class(program):
    return AutoModelForCausalLM if program.info.kind == "causal-lm" else AutoModel


def _dequantized_model(program, config, layers: list[_Layer], floats: dict[str, torch.Tensor]):
    """The model the directory describes, dequantized (float linears), on the CPU."""
    with torch.device("meta"):
        hf = _model_class(program).from_config(config)
    state = dict(floats)
    for l in layers:
        a = l.args
        state[f"{l.name}.weight"] = dequantize(program.attr(a.weight.target), program.attr(a.scales.target),
                                               None if a.zeros is None else program.attr(a.zeros.target), a.bits,
                                               a.group_size, a.in_features).to(program.attr(a.scales.target).dtype)
    hf.load_state_dict({k: v.cpu() for k, v in state.items()}, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        hf.tie_weights()
    for name, buf in list(hf.named_buffers()):
        if buf.device.type == "meta":  # non-persistent buffers (rotary tables, position ids): from the graph
            t = _state_tensor(program.state_tensors(), name)
            if t is None:
                raise ExportError(f"cannot check the export: the compiled model has no tensor for {name}")
            mod, _, attr = name.rpartition(".")
            (hf.get_submodule(mod) if mod else hf)._buffers[attr] = t.cpu()
    return hf.eval()


def _state_tensor(state: dict[str, torch.Tensor], name: str) -> torch.Tensor | None:
    t = state.get(name)
    mod, _, attr = name.rpartition(".")
    if t is None and attr.startswith("original_"):  # e.g. rotary original_inv_freq: a copy of inv_freq
        t = state.get(f"{mod}.{attr[len('original_'):]}" if mod else attr[len("original_"):])
    return t


def check_described(program, hf) -> float:
    """Relative difference of the described model's main output vs the compiled graph's on a fixed
    8-token input; an ExportError when it is not within float rounding."""
    vocab = next((s.vocab_size for s in program.info.inputs if s.vocab_size), 100)
    ids = torch.randint(0, vocab, (1, 8), generator=torch.Generator().manual_seed(0))
    kw = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.inference_mode():
        ref = main_tensor(program.call(**{k: v.to(program.device) for k, v in kw.items()})).float().cpu()
        got = main_tensor(hf(**kw)).float()
    rel = ((got - ref).norm() / ref.norm().clamp(min=1e-12)).item()
    tol = 1e-4 if main_tensor(hf(**kw)).dtype == torch.float32 else 2e-2
    if not rel <= tol:
        raise ExportError(f"cannot export to {FORMAT}: the {type(hf).__name__} it describes does not reproduce the "
                          f"compiled graph (relative difference {rel:.2e} > {tol:g}): a pass changed the model "
                          "outside its weights")
    return rel


def export_compressed_tensors(model, path: str | os.PathLike, *, force: bool = False,
                              protect: Iterable[str] = ()) -> CTExport:
    """Write the compiled model ``model`` (a ``CompiledModel``) as a compressed-tensors model directory
    at ``path``, atomically (module docstring). ``protect``: paths the output must never replace."""
    program = model.program
    config = _hf_config(program)
    layers = quantized_layers(program)
    names = {l.name for l in layers}
    with torch.device("meta"):
        skeleton = _model_class(program).from_config(config)
    modules = dict(skeleton.named_modules())
    for l in layers:
        if not isinstance(modules.get(l.name), torch.nn.Linear):
            raise ExportError(f"layer {l.name}: no nn.Linear of that name in {type(skeleton).__name__}; cannot "
                              f"export to {FORMAT}")
    ignore = [n for n, m in modules.items() if isinstance(m, torch.nn.Linear) and n not in names]
    step(f"packing {len(layers)} quantized layers ({len(ignore)} float linear layers)")
    state = program.state_tensors()
    tensors: dict[str, torch.Tensor] = {}
    floats: dict[str, torch.Tensor] = {}
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for name, ref in skeleton.state_dict().items():
        if name.rpartition(".")[0] in names:
            continue
        t = _state_tensor(state, name)
        if t is None and tied and name == "lm_head.weight":
            continue  # tied to the input embedding: transformers ties it again on loading
        if t is None:
            raise ExportError(f"cannot export to {FORMAT}: the compiled model has no tensor for {name}")
        if tuple(t.shape) != tuple(ref.shape):
            raise ExportError(f"cannot export to {FORMAT}: {name} is {tuple(t.shape)} in the compiled model, "
                              f"{tuple(ref.shape)} in {type(skeleton).__name__}")
        floats[name] = t
    for l in layers:
        tensors.update(_layer_tensors(program, l))
        if l.args.bias is not None:
            floats[f"{l.name}.bias"] = program.attr(l.args.bias.target)
    if tied and any(n.startswith("lm_head") for n in names):
        config.tie_word_embeddings = False  # a quantized head cannot share the float embedding
    for name, t in floats.items():
        tensors.setdefault(name, t.detach().cpu().clone().contiguous())
    step("checking the exported model against the compiled graph")
    rel = check_described(program, _dequantized_model(program, config, layers, floats))
    qc = quantization_config(layers, ignore)
    cfg = config.to_dict()
    cfg["quantization_config"] = qc
    tok = model.tokenizer

    def fill(tmp: str) -> None:
        save_file({k: v.cpu() for k, v in tensors.items()}, os.path.join(tmp, "model.safetensors"),
                  metadata={"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
        if tok is not None:
            tok.save_pretrained(tmp)

    step(f"writing {path}")
    out = write_directory(os.fspath(path), fill, force=force, protect=protect, ours=is_export_dir,
                          what="a compressed-tensors model directory (config.json with its quantization_config)")
    groups = {g: {"scheme": next(l.label for l in layers if l.name == v["targets"][0]), "layers": len(v["targets"])}
              for g, v in qc["config_groups"].items()}
    return CTExport(path=out, groups=groups, ignored=ignore, tensors=len(tensors),
                    bytes=sum(t.numel() * t.element_size() for t in tensors.values()), check_rel_diff=rel)
