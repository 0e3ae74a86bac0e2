"""GGUF export (llama.cpp's file format) of a compiled Llama-architecture causal LM.

What is written: the ``llama`` architecture's tensors (``token_embd``, ``blk.N.attn_q`` ...,
``output_norm``, ``output``), its hyper-parameters (context length, heads, RoPE base, RMS epsilon)
and the tokenizer (byte-level BPE as ``tokenizer.ggml.model = gpt2`` with its merges), as llama.cpp's
``convert_hf_to_gguf.py`` writes them for a Hugging Face Llama.

The weights: lowc stores ``w = (q - zero) * scale`` per group. Where the layer's scheme is a GGUF
block type, the integer codes are carried unchanged and only the per-block factors are rounded to
fp16 (the format's type); elsewhere ``requant`` (lossy, stated) dequantizes lowc's weights and
re-quantizes them with gguf's reference quantizer (:mod:`gguf.quants`), and the error it adds is
reported per layer. The exact mappings (groups of 32, the GGUF block):

* 4-bit asymmetric -> ``Q4_1`` (``w = q*d + m``): ``d = scale``, ``m = -zero*scale``;
* 4-bit symmetric -> ``Q4_0`` (``w = (q - 8)*d``): lowc's symmetric zero is ``2^(b-1) = 8`` too;
* 8-bit symmetric -> ``Q8_0`` (``w = q_s*d``, int8 ``q_s``): ``q_s = q - 128``, ``d = scale``;
* float layers, embeddings and norms -> ``F32`` (``F16`` for a float16 model's 2-D tensors; 1-D
  tensors are always ``F32``, as llama.cpp wants them).

Bound of the exact mappings (rounding to fp16 changes a value by at most 2^-11 of it, or 2^-25 in
fp16's subnormal range): per block, ``|w_gguf - w_lowc| <= qmax*(2^-11*|d| + 2^-25) + 2^-11*|m| +
2^-25``, with ``qmax`` the largest code magnitude (15 for Q4_1, 8 for Q4_0, 128 for Q8_0)
(:func:`fp16_bound`); every layer's measured error is checked against it before the file is written.

llama.cpp's RoPE pairs dimensions ``(i, i + d/2)`` differently from Hugging Face's, so the rows of
``attn_q``/``attn_k`` are permuted per head (``convert_hf_to_gguf.py``'s ``LlamaModel.permute``);
codes, scales and zero points are permuted with their rows, which is exact.

Refused, with one line naming the cause: another architecture or model kind, a graph op GGUF cannot
carry (online transforms, linearized attention, quantized activations, backend layouts: export a
``ref-*`` artifact), a parameter with no llama tensor name, RoPE scaling, a scheme with no exact
block type unless ``requant`` is given, an existing output without ``force``. The file is written
to a temporary sibling and renamed into place.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from lowc.api import CompiledModel, load
from lowc.errors import LowcError
from lowc.ir import meta as nodemeta
from lowc.ir.dialect import packing, quant
from lowc.ir.dialect.args import LinearQArgs, is_quantized_linear
from lowc.progress import bar, step

#: the exact block type of (bits, symmetric) at group size 32
EXACT = {(4, False): "Q4_1", (4, True): "Q4_0", (8, True): "Q8_0"}
#: types ``requant`` may name (gguf's reference quantizer implements them)
REQUANT_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "F16", "F32")
BLOCK = 32
#: largest code magnitude multiplying ``d`` in each exact type (for :func:`fp16_bound`)
_QMAX = {"Q4_1": 15, "Q4_0": 8, "Q8_0": 128}
_TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_IN_BLOCK = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
#: buffers llama.cpp recomputes from the hyper-parameters
_DERIVED = re.compile(r"(model\.)?(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq")
_TOKEN_NORMAL, _TOKEN_CONTROL, _TOKEN_USER, _TOKEN_UNUSED = 1, 3, 4, 5


class GgufExportError(LowcError):
    """The model or an option cannot be written as GGUF."""


@dataclass
class GgufResult:
    path: str
    bytes: int
    tensors: int
    types: dict  # GGML type name -> number of tensors
    #: one row per linear layer: layer, gguf name, scheme label (or float), type, how (exact /
    #: requant / float), max_abs_err and rel_err (RMS of the change over RMS of lowc's weight)
    layers: list = field(default_factory=list)
    requant: str | None = None
    tokenizer_pre: str = ""
    vocab_size: int = 0

    def to_json(self) -> dict:
        return asdict(self)


# ---- names -----------------------------------------------------------------------------------------
def gguf_name(hf_name: str) -> str | None:
    """``model.layers.3.mlp.up_proj.weight`` -> ``blk.3.ffn_up.weight``; None for a name llama.cpp's
    ``llama`` architecture has no tensor for."""
    module, _, leaf = hf_name.rpartition(".")
    if leaf not in ("weight", "bias"):
        return None
    if module in _TOP:
        return f"{_TOP[module]}.{leaf}"
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", module)
    if m and m.group(2) in _IN_BLOCK:
        return f"blk.{m.group(1)}.{_IN_BLOCK[m.group(2)]}.{leaf}"
    return None


def rope_permutation(rows: int, n_head: int) -> torch.Tensor:
    """Row order llama.cpp's RoPE wants for a q/k projection with ``n_head`` heads (q: the query
    heads, k: the KV heads): within each head, rows ``[0, d/2)`` and ``[d/2, d)`` interleave.
    ``w_gguf = w_hf[perm]``; ``convert_hf_to_gguf.py``'s ``permute`` on the row indices."""
    idx = torch.arange(rows)
    return idx.reshape(n_head, 2, rows // n_head // 2).transpose(1, 2).reshape(rows)


def fp16_bound(d: np.ndarray, m: np.ndarray | None, gtype: str) -> np.ndarray:
    """Per block, the largest change rounding ``d`` (and ``m``) to fp16 can make to a weight of an
    exact block type (module docstring)."""
    b = _QMAX[gtype] * (np.abs(d.astype(np.float64)) * 2.0 ** -11 + 2.0 ** -25)
    if m is not None:
        b = b + np.abs(m.astype(np.float64)) * 2.0 ** -11 + 2.0 ** -25
    return b


# ---- hyper-parameters and tokenizer ---------------------------------------------------------------
@dataclass(frozen=True)
class LlamaParams:
    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    context: int
    rope_theta: float
    rms_eps: float
    vocab: int

    @staticmethod
    def of(cfg: dict[str, Any], what: str) -> LlamaParams:
        """From a Hugging Face ``LlamaConfig`` dict; GgufExportError for what llama.cpp's ``llama``
        architecture would run differently (another activation, RoPE scaling)."""
        if cfg.get("model_type") != "llama":
            raise GgufExportError(f"{what}: GGUF export supports Llama-architecture causal LMs; this model is "
                                  f"'{cfg.get('model_type')}'")
        if cfg.get("hidden_act", "silu") != "silu":
            raise GgufExportError(f"{what}: hidden_act '{cfg.get('hidden_act')}' (llama.cpp's llama runs silu)")
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise GgufExportError(f"{what}: RoPE scaling {rope.get('rope_type', rope.get('type'))!r} is not exported "
                                  "to GGUF (default RoPE only)")
        theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        heads = int(cfg["num_attention_heads"])
        return LlamaParams(layers=int(cfg["num_hidden_layers"]), hidden=int(cfg["hidden_size"]),
                           ffn=int(cfg["intermediate_size"]), heads=heads,
                           kv_heads=int(cfg.get("num_key_value_heads") or heads),
                           head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
                           context=int(cfg.get("max_position_embeddings", 2048)), rope_theta=float(theta),
                           rms_eps=float(cfg.get("rms_norm_eps", 1e-6)), vocab=int(cfg["vocab_size"]))


def tokenizer_metadata(tok, vocab_size: int, what: str) -> dict[str, Any]:
    """``tokenizer.ggml.*`` for a byte-level BPE tokenizer (Hugging Face fast tokenizer): tokens by
    id (ids the tokenizer lacks up to ``vocab_size`` become unused ``[PADn]``), token types
    (special tokens are control tokens), merges, the pre-tokenizer name, special token ids."""
    if tok is None:
        raise GgufExportError(f"{what}: the model has no tokenizer; GGUF files carry one")
    spec = json.loads(tok.backend_tokenizer.to_str())
    model = spec.get("model") or {}
    pre = spec.get("pre_tokenizer") or {}
    byte_level = [p for p in ([pre] + list(pre.get("pretokenizers") or [])) if p.get("type") == "ByteLevel"]
    if model.get("type") != "BPE" or not byte_level:
        raise GgufExportError(f"{what}: tokenizer is {model.get('type')} without a byte-level pre-tokenizer; "
                              "GGUF export writes byte-level BPE (gpt2) tokenizers")
    vocab = tok.get_vocab()
    if len(vocab) > vocab_size:
        raise GgufExportError(f"{what}: tokenizer has {len(vocab)} tokens, more than the model's vocab_size {vocab_size}")
    by_id = {i: t for t, i in vocab.items()}
    special = set(tok.all_special_tokens)
    added = {t.content for t in tok.added_tokens_decoder.values()}
    tokens, types = [], []
    for i in range(vocab_size):
        t = by_id.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(_TOKEN_UNUSED)
        else:
            tokens.append(t)
            types.append(_TOKEN_CONTROL if t in special else _TOKEN_USER if t in added else _TOKEN_NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    if not merges:
        # llama.cpp requires the merges key and gguf refuses an empty array: one merge of two
        # control tokens, which never stand side by side as symbols of pre-tokenized text, so it never fires
        merges = [f"{tok.bos_token or tokens[0]} {tok.eos_token or tokens[0]}"]
    # GPT-2's split pattern is the ByteLevel pre-tokenizer's own regex; without it (use_regex=false)
    # llama.cpp has no exact match, and its default pattern only differs where merges cross a split
    pretok = "gpt-2" if all(p.get("use_regex", True) for p in byte_level) else "default"
    ids = tok("a", add_special_tokens=True)["input_ids"]
    meta = {"model": "gpt2", "pre": pretok, "tokens": tokens, "types": types, "merges": merges,
            "add_bos": bool(tok.bos_token_id is not None and ids[:1] == [tok.bos_token_id]),
            "add_eos": bool(tok.eos_token_id is not None and ids[-1:] == [tok.eos_token_id] and len(ids) > 1)}
    for key in ("bos", "eos", "unk", "pad"):
        v = getattr(tok, f"{key}_token_id")
        if v is not None:
            meta[f"{key}_id"] = int(v)
    return meta


# ---- weights --------------------------------------------------------------------------------------
@dataclass
class _Quantized:
    """A quantized linear's codes ``[N, K_pad]`` with fp32 ``scales``/``zeros`` ``[N, G]``."""

    layer: str
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    bits: int
    group_size: int
    in_features: int
    label: str
    exact: str | None  # the GGUF type that carries it unchanged, if any
    dtype: torch.dtype

    def permuted(self, perm: torch.Tensor) -> _Quantized:
        z = None if self.zeros is None else self.zeros[perm]
        return _Quantized(self.layer, self.codes[perm], self.scales[perm], z, self.bits, self.group_size,
                          self.in_features, self.label, self.exact, self.dtype)

    def dequantized(self) -> torch.Tensor:
        """lowc's reference weight [N, in_features] in fp32 (quant.dequantize's arithmetic)."""
        qw = packing.pack(self.codes, self.bits)
        z = None if self.zeros is None else self.zeros.to(torch.uint8)
        return quant.dequantize(qw, self.scales, z, self.bits, self.group_size, self.in_features, torch.float32)


def _exact_type(scheme, group_size: int, in_features: int, k_pad: int) -> str | None:
    if scheme is None or scheme.a_bits != 16 or scheme.sparsity or group_size != BLOCK or in_features != k_pad:
        return None
    return EXACT.get((scheme.w_bits, scheme.symmetric))


def encode_exact(q: _Quantized, gtype: str) -> np.ndarray:
    """GGUF blocks (uint8 ``[N, G * type_size]``) holding ``q``'s codes unchanged: Q4_0/Q4_1 put
    value ``j`` of a block in the low nibble of byte ``j`` and value ``j + 16`` in its high nibble."""
    n, g = q.scales.shape
    codes = q.codes.reshape(n, g, BLOCK).numpy()
    d = q.scales.double().numpy().astype(np.float16)
    parts = [d.view(np.uint8).reshape(n, g, 2)]
    if gtype == "Q4_1":
        m = (-q.zeros.double() * q.scales.double()).numpy().astype(np.float16)
        parts.append(m.view(np.uint8).reshape(n, g, 2))
    if gtype == "Q8_0":
        parts.append((codes.astype(np.int16) - 128).astype(np.int8).view(np.uint8))
    else:
        parts.append((codes[..., :16] | (codes[..., 16:] << 4)).astype(np.uint8))
    return np.concatenate(parts, axis=-1).reshape(n, -1)


def _errors(ref: torch.Tensor, got: np.ndarray) -> tuple[float, float]:
    delta = torch.from_numpy(np.asarray(got, dtype=np.float32)).reshape(ref.shape) - ref
    rms = float(ref.pow(2).mean().sqrt())
    return float(delta.abs().max()), float(delta.pow(2).mean().sqrt()) / (rms or 1.0)


# ---- the export -----------------------------------------------------------------------------------
def _collect(cm: CompiledModel, what: str) -> tuple[dict[str, _Quantized], dict[str, torch.Tensor]]:
    """The program's quantized linears (by HF weight name) and float tensors (by HF name), refusing
    ops and parameters that a llama GGUF cannot carry."""
    program = cm.program
    quantized: dict[str, _Quantized] = {}
    floats: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    wq = torch.ops.lowc.linear_wq.default
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        info = nodemeta.get(node)
        if is_quantized_linear(node):
            a = LinearQArgs.of(node)
            if node.target != wq:
                raise GgufExportError(f"{what}: layer {info.layer} runs {a.op_name} (a backend layout or quantized "
                                      "activations); GGUF export reads lowc::linear_wq: export a ref-w* artifact")
            qweight, scales = program.attr(a.weight.target), program.attr(a.scales.target)
            zeros = program.attr(a.zeros.target) if a.zeros is not None else None
            exact = _exact_type(info.scheme, a.group_size, a.in_features, scales.shape[1] * a.group_size)
            quantized[_named(f"{info.layer}.weight", what)] = _Quantized(
                info.layer, packing.unpack(qweight, a.bits), scales.float(), None if zeros is None else zeros.float(),
                a.bits, a.group_size, a.in_features, info.scheme.label if info.scheme else f"W{a.bits}", exact,
                scales.dtype)
            used.update(n.target for n in (a.weight, a.scales, a.zeros) if n is not None)
            if a.bias is not None:
                used.add(a.bias.target)
                floats[_named(f"{info.layer}.bias", what)] = program.attr(a.bias.target)
        elif getattr(node.target, "namespace", None) == "lowc":
            raise GgufExportError(f"{what}: layer {info.layer or node.name} runs lowc::{node.target._opname}, which "
                                  "GGUF's llama architecture cannot carry (online transforms, linearized attention "
                                  "and KV quantization are lowc-only)")
    for node in program.graph.nodes:
        if node.op == "get_attr" and node.target not in used and not _DERIVED.fullmatch(node.target):
            floats[_named(node.target, what)] = program.attr(node.target)
    return quantized, floats


def _named(name: str, what: str) -> str:
    if gguf_name(name) is None:
        raise GgufExportError(f"{what}: tensor {name} has no place in a GGUF llama model (an online transform or "
                              "a module llama.cpp does not have)")
    return name


def export_gguf(model, path: str | os.PathLike, *, requant: str | None = None, force: bool = False) -> GgufResult:
    """Write ``model`` (a :class:`CompiledModel` or an artifact directory) to the GGUF file ``path``
    (module docstring); ``requant``: the GGUF type for layers whose scheme has no exact block type."""
    import gguf  # optional: lowc[export]

    if requant is not None and requant not in REQUANT_TYPES:
        raise GgufExportError(f"--requant {requant}: not a type gguf can quantize to; choose one of "
                              f"{', '.join(REQUANT_TYPES)}")
    path = os.path.abspath(os.fspath(path))
    if os.path.lexists(path) and not force:
        raise GgufExportError(f"output {path} already exists (use --force / force=True to replace it)")
    if isinstance(model, (str, os.PathLike)):
        what = os.fspath(model)
        step(f"loading {what}")
        model = load(what)
    else:
        what = "model"
    info = model.program.info
    if info.kind != "causal-lm" or not info.hf_config:
        raise GgufExportError(f"{what}: GGUF export supports Llama-architecture causal LMs from a Hugging Face "
                              f"model; this model's kind is '{info.kind}'")
    hp = LlamaParams.of(info.hf_config, what)
    quantized, floats = _collect(model, what)
    for name, q in quantized.items():
        if q.exact is None and requant is None:
            raise GgufExportError(f"{what}: layer {q.layer} is {q.label}, which no GGUF block type carries exactly "
                                  f"(exact: 4-bit g32 -> Q4_1/Q4_0, 8-bit sym g32 -> Q8_0); pass --requant TYPE "
                                  "to re-quantize it (lossy)")
        if requant not in (None, "F16", "F32") and q.in_features % BLOCK:
            raise GgufExportError(f"{what}: layer {q.layer} has {q.in_features} inputs, not a multiple of {BLOCK}: "
                                  f"GGUF {requant} blocks cannot hold it")
    tok = tokenizer_metadata(model.tokenizer, hp.vocab, what)

    def permute(name: str) -> torch.Tensor | None:
        g = gguf_name(name)
        if ".attn_q." in g:
            return rope_permutation(hp.heads * hp.head_dim, hp.heads)
        if ".attn_k." in g:
            return rope_permutation(hp.kv_heads * hp.head_dim, hp.kv_heads)
        return None

    tensors: list[tuple[str, np.ndarray, Any]] = []  # (gguf name, data, raw GGML type or None)
    rows = []
    for name, q in bar(sorted(quantized.items()), "gguf: quantized layers"):
        perm = permute(name)
        q = q.permuted(perm) if perm is not None else q
        ref = q.dequantized()
        gtype = q.exact if q.exact is not None else requant
        qtype = gguf.GGMLQuantizationType[gtype]
        if q.exact is not None:
            data = encode_exact(q, gtype)
            d = q.scales.double().numpy().astype(np.float16)
            if not np.isfinite(d).all():
                raise GgufExportError(f"{what}: layer {q.layer} has scales beyond fp16's range; GGUF {gtype} cannot hold them")
            back = gguf.quants.dequantize(data, qtype).reshape(ref.shape)
            m = (-q.zeros.double() * q.scales.double()).numpy() if q.zeros is not None else None
            bound = np.repeat(fp16_bound(q.scales.double().numpy(), m, gtype), BLOCK, axis=1)
            over = np.abs(back.astype(np.float64) - ref.double().numpy()) - bound
            if over.max() > 1e-6 * float(ref.abs().max()):  # fp32 arithmetic on both sides
                raise GgufExportError(f"{what}: layer {q.layer}: {gtype} weights differ from lowc's by more than the "
                                      "fp16 bound (internal error)")
            how = "exact"
        else:
            data = gguf.quants.quantize(ref.numpy(), qtype)
            back = gguf.quants.dequantize(data, qtype).reshape(ref.shape)
            how = "requant"
        mx, rel = _errors(ref, back)
        rows.append({"layer": q.layer, "gguf": gguf_name(name), "scheme": q.label, "type": gtype, "how": how,
                     "max_abs_err": mx, "rel_err": rel})
        tensors.append((gguf_name(name), data, qtype if data.dtype == np.uint8 else None))
    for name, t in sorted(floats.items()):
        perm = permute(name)
        t = t.detach().cpu()
        t = t[perm] if perm is not None else t
        f16 = t.dim() > 1 and t.dtype == torch.float16
        data = t.to(torch.float16 if f16 else torch.float32).numpy()
        tensors.append((gguf_name(name), data, None))
        if name.endswith(".weight") and t.dim() == 2 and gguf_name(name).split(".")[-2] not in ("token_embd",):
            rows.append({"layer": name[: -len(".weight")], "gguf": gguf_name(name), "scheme": "float",
                         "type": "F16" if f16 else "F32", "how": "float", "max_abs_err": 0.0, "rel_err": 0.0})
    names = {n for n, _, _ in tensors}
    missing = [n for n in ("token_embd.weight", "output_norm.weight") if n not in names]
    if missing:
        raise GgufExportError(f"{what}: no tensor for {missing[0]} (is this a LlamaForCausalLM?)")

    types = Counter((t.name if t is not None else ("F16" if d.dtype == np.float16 else "F32")) for _, d, t in tensors)
    two_d = Counter(r["type"] for r in rows)
    main = two_d.most_common(1)[0][0] if two_d else "F32"
    ftype = {"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16}.get(
        main, getattr(gguf.LlamaFileType, f"MOSTLY_{main}", gguf.LlamaFileType.GUESSED))

    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, "llama")
        w.add_name(str(info.source.get("name") or os.path.basename(str(info.source.get("path", "lowc-model")))))
        w.add_description(f"exported by lowc from {what}")
        w.add_context_length(hp.context)
        w.add_embedding_length(hp.hidden)
        w.add_block_count(hp.layers)
        w.add_feed_forward_length(hp.ffn)
        w.add_head_count(hp.heads)
        w.add_head_count_kv(hp.kv_heads)
        w.add_rope_freq_base(hp.rope_theta)
        w.add_layer_norm_rms_eps(hp.rms_eps)
        w.add_rope_dimension_count(hp.head_dim)
        if hp.head_dim * hp.heads != hp.hidden:
            w.add_key_length(hp.head_dim)
            w.add_value_length(hp.head_dim)
        w.add_vocab_size(hp.vocab)
        w.add_file_type(int(ftype))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_tokenizer_model(tok["model"])
        w.add_tokenizer_pre(tok["pre"])
        w.add_token_list(tok["tokens"])
        w.add_token_types(tok["types"])
        w.add_token_merges(tok["merges"])
        for key in ("bos", "eos", "unk", "pad"):
            if f"{key}_id" in tok:
                getattr(w, f"add_{key}_token_id")(tok[f"{key}_id"])
        w.add_add_bos_token(tok["add_bos"])
        w.add_add_eos_token(tok["add_eos"])
        for name, data, raw in tensors:
            w.add_tensor(name, data, raw_dtype=raw)
        step(f"writing {len(tensors)} tensors to {path}")
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    except OSError as e:
        raise GgufExportError(f"cannot write {path}: {e.strerror or e}") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return GgufResult(path=path, bytes=os.path.getsize(path), tensors=len(tensors), types=dict(sorted(types.items())),
                      layers=rows, requant=requant, tokenizer_pre=tok["pre"], vocab_size=hp.vocab)
