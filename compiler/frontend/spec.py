"""What lowc knows about a captured model besides its graph: how it is called and where it came from.

:class:`InputSpec` (one graph input: name, dtype, an example shape, dynamic dims) and
:class:`ModelInfo` (kind, source identity, inputs, the Hugging Face config) are produced by the
capture (:mod:`lowc.frontend.trace`), carried by every :class:`lowc.ir.Program`, and stored in the
artifact's manifest; :meth:`ModelInfo.from_json` parses that manifest section strictly (it is
untrusted input). :func:`as_input_tensor` turns what a caller passes for one input into a tensor.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from lowc import untrusted as U
from lowc.errors import ArtifactError

#: dtypes a graph input may have, and the largest example input a stored spec may ask for
INPUT_DTYPES = ("int64", "int32", "int16", "int8", "uint8", "bool", "float32", "float16", "bfloat16", "float64")
MAX_EXAMPLE_DIM = 1 << 16
MAX_EXAMPLE_NUMEL = 1 << 22


def as_input_tensor(name: str, value: Any, error: type[Exception], dtype: torch.dtype | None = None) -> torch.Tensor:
    """``value`` (tensor, array, rectangular list) as a tensor; an integer or bool one is cast to the
    integer ``dtype`` if given (token ids and masks). ``error`` (a LowcError class) names ``name``."""
    if not isinstance(value, torch.Tensor):
        try:
            value = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError) as e:
            raise error(f"input {name!r}: cannot make a tensor of {type(value).__name__} ({str(e).splitlines()[0]}); "
                        "give tensors, e.g. a tokenizer called with padding=True, return_tensors='pt'") from None
    if dtype is not None and value.dtype != dtype and not dtype.is_floating_point:
        if value.is_floating_point() or value.is_complex():
            raise error(f"input {name!r} is {str(value.dtype).replace('torch.', '')}; the model takes integer "
                        f"{str(dtype).replace('torch.', '')} (token ids / masks)")
        value = value.to(dtype)
    return value


@dataclass
class InputSpec:
    """One flat graph input: its name, dtype, an example shape and which dims are dynamic."""

    name: str
    dtype: str
    shape: list[int]
    dynamic: dict[int, str] = field(default_factory=dict)  # dim -> symbol name ("batch", "seq")
    default: str | None = None  # e.g. "ones_like:input_ids" when the caller may omit it
    vocab_size: int | None = None  # for token-id inputs: example values are drawn below this

    @staticmethod
    def from_json(d: Any, what: str = "input") -> "InputSpec":
        """Parse one input strictly (see :meth:`ModelInfo.from_json`)."""
        U.fields(d, what, ("name", "dtype", "shape", "dynamic", "default", "vocab_size"), ("name", "dtype", "shape"))
        name = U.identifier(d["name"], f"{what}.name")
        U.choice(d["dtype"], INPUT_DTYPES, f"{what}.dtype")
        shape = [U.int_in(s, 1, MAX_EXAMPLE_DIM, f"{what}.shape") for s in U.typed(d["shape"], list, f"{what}.shape")]
        if len(shape) > 8 or math.prod(shape) > MAX_EXAMPLE_NUMEL:
            raise ArtifactError(f"{what}.shape: {shape} is too large for an example input")
        dynamic = {}
        for k, v in U.typed(d.get("dynamic", {}), dict, f"{what}.dynamic").items():
            if not (isinstance(k, str) and k.isdigit() and int(k) < len(shape)):
                raise ArtifactError(f"{what}.dynamic: {U._show(k)} is not a dimension of {shape}")
            dynamic[int(k)] = U.identifier(v, f"{what}.dynamic[{k}]")
        default = U.typed(d.get("default"), (str, type(None)), f"{what}.default")
        if default is not None and not (default.startswith("ones_like:") and U.is_identifier(default.split(":", 1)[1])):
            raise ArtifactError(f"{what}.default: {U._show(default)} is not 'ones_like:<input>'")
        vocab = d.get("vocab_size")
        if vocab is not None:
            U.int_in(vocab, 1, 1 << 24, f"{what}.vocab_size")
        return InputSpec(name, d["dtype"], shape, dynamic, default, vocab)

    def example(self, shape: list[int] | None = None, seed: int = 0) -> torch.Tensor:
        dtype = getattr(torch, self.dtype)
        shape = list(shape or self.shape)
        if dtype.is_floating_point:
            g = torch.Generator().manual_seed(seed)
            return torch.randn(shape, generator=g, dtype=dtype)
        if self.vocab_size:
            g = torch.Generator().manual_seed(seed)
            return torch.randint(0, self.vocab_size, shape, generator=g, dtype=dtype)
        return torch.ones(shape, dtype=dtype)


@dataclass
class ModelInfo:
    """How the program was made and how it is called."""

    kind: str = "module"  # "causal-lm" | "encoder" | "module"
    source: dict[str, Any] = field(default_factory=dict)  # type/name/path/sha256 of the source model
    inputs: list[InputSpec] = field(default_factory=list)
    call_by_name: bool = False  # HF models are called with keyword inputs
    block_prefix: str | None = None  # ModuleList path of the transformer blocks
    hf_config: dict[str, Any] | None = None
    tokenizer_dir: str | None = None  # where the tokenizer lives (source dir, or inside an artifact)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["inputs"] = [asdict(i) for i in self.inputs]
        return d

    @staticmethod
    def from_json(d: Any, what: str = "model") -> "ModelInfo":
        """Parse :meth:`to_json` output strictly (it may come from an untrusted artifact): known keys,
        typed values, input names that are identifiers, shapes small enough to build examples from.
        ``tokenizer_dir`` is accepted but never used: a loader sets it to the artifact's own folder."""
        U.fields(d, what, _MODEL_FIELDS, ("kind", "inputs"))
        U.choice(d["kind"], KINDS, f"{what}.kind")
        inputs = [InputSpec.from_json(i, f"{what}.inputs[{n}]") for n, i in enumerate(U.typed(d["inputs"], list, f"{what}.inputs"))]
        if not 1 <= len(inputs) <= 16:
            raise ArtifactError(f"{what}.inputs: {len(inputs)} inputs (expected 1 to 16)")
        names = [i.name for i in inputs]
        if len(set(names)) != len(names):
            raise ArtifactError(f"{what}.inputs: duplicate input names {names}")
        for i in inputs:
            if i.default is not None and i.default.split(":", 1)[1] not in names:
                raise ArtifactError(f"{what}.inputs: {i.name}'s default refers to an unknown input")
        prefix = d.get("block_prefix")
        if prefix is not None:
            U.attr_path(prefix, f"{what}.block_prefix")
        hf_config = d.get("hf_config")
        if hf_config is not None:
            U.typed(hf_config, dict, f"{what}.hf_config")
        U.typed(d.get("tokenizer_dir"), (str, type(None)), f"{what}.tokenizer_dir")
        return ModelInfo(kind=d["kind"], source=dict(U.typed(d.get("source", {}), dict, f"{what}.source")),
                         inputs=inputs, call_by_name=U.typed(d.get("call_by_name", False), bool, f"{what}.call_by_name"),
                         block_prefix=prefix, hf_config=hf_config, tokenizer_dir=None)


_MODEL_FIELDS = ("kind", "source", "inputs", "call_by_name", "block_prefix", "hf_config", "tokenizer_dir")
KINDS = ("causal-lm", "encoder", "module")
