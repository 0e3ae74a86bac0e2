"""Finish an exported ONNX model (an ``onnx_ir.Model``): fold the 4-bit weight casts into 4-bit
initializers, check the graph holds no float copy of a quantized weight (by identity: names and
values, not shapes), record how onnxruntime should run it in the model's metadata, save (external data past
2 GB) and run ``onnx.checker`` on the file.

Precondition: the model came from :mod:`lowc.backends.onnx.export` (translation table of
:mod:`lowc.backends.onnx.translate`). Invariant: after :func:`fold_weight_casts` no ``Cast`` to a
4-bit type is left and every 4-bit weight is an initializer read by DequantizeLinear.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import ml_dtypes
import numpy as np
import onnx_ir as ir

from lowc.backends.onnx.errors import OnnxExportError

FOUR_BIT = (ir.DataType.UINT4, ir.DataType.INT4)
#: protobuf's hard limit on one message; above it weights must live in an external file
PROTO_LIMIT = 2 * 1024**3


def _nodes(graph: ir.Graph):
    return ir.traversal.RecursiveGraphIterator(graph)


def fold_weight_casts(model: ir.Model) -> int:
    """Replace ``Cast(initializer, to=UINT4|INT4)`` by a 4-bit initializer. Returns how many."""

    graph = model.graph
    folded = 0
    for node in list(graph):
        if node.op_type != "Cast" or node.domain not in ("", "ai.onnx"):
            continue
        to = ir.DataType(node.attributes["to"].as_int())
        src = node.inputs[0]
        if to not in FOUR_BIT or src is None or src.const_value is None:
            continue
        codes = src.const_value.numpy()
        lo, hi = (0, 15) if to == ir.DataType.UINT4 else (-8, 7)
        if codes.size and (codes.min() < lo or codes.max() > hi):
            raise OnnxExportError(f"initializer {src.name}: codes outside the {to.name} range [{lo}, {hi}]")
        arr = codes.astype(ml_dtypes.uint4 if to == ir.DataType.UINT4 else ml_dtypes.int4)
        new = ir.Value(name=src.name, type=ir.TensorType(to), shape=ir.Shape(arr.shape),
                       const_value=ir.Tensor(arr, dtype=to, name=src.name))
        out = node.outputs[0]
        # the output keeps being read under its own name: rename the initializer to it
        if src.is_initializer() and len(src.uses()) == 1:
            del graph.initializers[src.name]
        new.name = out.name if out.name not in graph.initializers else f"{src.name}_4bit"
        new.const_value.name = new.name
        graph.register_initializer(new)
        out.replace_all_uses_with(new)
        graph.remove(node, safe=True)
        folded += 1
    return folded


def summarize(model: ir.Model) -> dict:
    """Op counts and initializer bytes by dtype (4-bit counted at half a byte)."""
    ops = Counter((n.domain or "") + ("::" if n.domain else "") + n.op_type for n in _nodes(model.graph))
    by_dtype: Counter = Counter()
    for v in model.graph.initializers.values():
        t = v.const_value
        if t is not None:
            by_dtype[t.dtype.name] += t.nbytes
    return {"ops": dict(sorted(ops.items())), "initializer_bytes": dict(by_dtype),
            "initializer_total": int(sum(by_dtype.values()))}


@dataclass
class QuantizedLayer:
    """A quantized layer as the check below sees it: its name, the prefix of its tensors'
    initializer names (``gm.<module path>.``; empty for a weight the root module holds), its
    weight's shapes (``[N, K]``, ``[N, K_pad]`` and their transposes) and its dequantized weight
    ``[N, K_pad]`` (computed when first needed)."""

    name: str
    prefix: str
    n: int
    k: int
    k_pad: int
    dequantized: Callable[[], np.ndarray]

    @property
    def shapes(self) -> set[tuple[int, int]]:
        return {(self.n, self.k), (self.k, self.n), (self.n, self.k_pad), (self.k_pad, self.n)}

    def holds(self, values: np.ndarray) -> bool:
        """Whether ``values`` are this layer's dequantized weight, in any of its shapes."""
        w = self.dequantized()
        for cand in (w, w.T, w[:, : self.k], w[:, : self.k].T):
            if cand.shape == values.shape:
                tol = 1e-7 + 1e-5 * float(np.abs(cand).max(initial=0.0))
                if np.allclose(values, cand, rtol=1e-5, atol=tol):
                    return True
        return False


def check_no_float_copies(model: ir.Model, layers: list[QuantizedLayer]) -> None:
    """No float copy of a quantized weight in the graph, and no Cast to 4 bits left.

    By identity, not by shape (a float embedding or an ``ignore``-d layer may have the shape of a
    quantized weight): a float initializer is a copy when its name belongs to a quantized layer
    (``gm.<module>.`` + a weight-shaped tensor: the original weight was kept) or when it holds a
    quantized layer's dequantized values (the exporter folded DequantizeLinear into a constant)."""
    by_shape: dict[tuple, list[QuantizedLayer]] = {}
    for layer in layers:
        for shape in layer.shapes:
            by_shape.setdefault(shape, []).append(layer)
    for v in model.graph.initializers.values():
        t = v.const_value
        if t is None or not t.dtype.is_floating_point():
            continue
        shape = tuple(int(d) for d in t.shape.numpy())
        candidates = by_shape.get(shape, [])
        if not candidates:
            continue
        owner = next((layer for layer in candidates if layer.prefix and v.name.startswith(layer.prefix)), None)
        if owner is None:
            values = np.asarray(t.numpy(), dtype=np.float32)
            owner = next((layer for layer in candidates if layer.holds(values)), None)
        if owner is not None:
            raise OnnxExportError(f"initializer {v.name}: a float copy {shape} of the quantized weight of "
                                  f"layer {owner.name} is in the exported graph (the export would not be smaller)")
    for n in _nodes(model.graph):
        if n.op_type == "Cast" and ir.DataType(n.attributes["to"].as_int()) in FOUR_BIT:
            raise OnnxExportError(f"node {n.name}: a Cast to 4 bits was not folded into an initializer")


def save_and_check(model: ir.Model, path: str, external_data: bool | None = None) -> bool:
    """Save ``model`` to ``path`` (weights in ``<name>.data`` beside it when ``external_data`` or past
    2 GB) and run ``onnx.checker`` on the file. Returns whether external data was used."""
    import onnx

    total = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    use_external = total > PROTO_LIMIT - (64 << 20) if external_data is None else external_data
    if use_external:
        ir.save(model, path, external_data=os.path.basename(path) + ".data")
    else:
        ir.save(model, path)
    try:
        onnx.checker.check_model(path, full_check=True)
    except Exception as e:  # onnx.checker.ValidationError / InferenceError
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OnnxExportError(f"{path}: onnx.checker rejected the exported model: {first}") from None
    return use_external


def numpy_codes(t) -> np.ndarray:
    """Integer codes of a (possibly 4-bit) initializer as int16 (for tests and reports)."""
    return np.asarray(t.numpy()).astype(np.int16)
