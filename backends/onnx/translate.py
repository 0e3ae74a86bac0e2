"""The translation table handed to ``torch.onnx.export(custom_translation_table=...)``: one
onnxscript function per ``lowc_onnx`` op (:mod:`lowc.backends.onnx.ops`), emitting opset-21 ONNX.

* ``dq_matmul`` -> ``[Pad] -> MatMul(x, DequantizeLinear(w, scale, zero, axis, block_size)) [-> Add]``.
  4-bit codes are stored as uint8/int8 by PyTorch and reach ONNX through ``Cast(to=UINT4|INT4)``,
  which :func:`lowc.backends.onnx.finalize.fold_weight_casts` folds into a 4-bit initializer, so the
  file holds the codes at 4 bits and DequantizeLinear reads them directly (the pattern
  onnxruntime fuses into MatMulNBits).
* ``matmul_nbits`` -> ``com.microsoft::MatMulNBits(x, B, scales, zero_points)`` (float32 models).
* ``qdq_per_token`` -> ``s = max(ReduceMax(|x|, -1), 1e-8) / qmax``;
  ``DequantizeLinear(QuantizeLinear(x, s, block_size=K, output_dtype=int8|int4), s)``: a QDQ pair per
  token, symmetric, computing exactly the reference's fake quantization (QuantizeLinear rounds half
  to even and saturates, as ``torch.round``/``clamp`` do). onnxruntime's DynamicQuantizeLinear is
  per tensor and asymmetric, so it would not match the scheme.

Imported only by the export (it imports onnxscript).
"""

from __future__ import annotations

import onnx_ir as ir
import onnxscript
from onnxscript import FLOAT, UINT8
from onnxscript import opset21 as op

from lowc.backends.onnx import ops

MS = onnxscript.values.Opset("com.microsoft", 1)
OPSET = 21


def dq_matmul(x, w, scale, zero=None, bias=None, axis: int = 0, block_size: int = 0, bits: int = 8, pad: int = 0):
    if bits == 4:
        to = ir.DataType.UINT4 if zero is not None else ir.DataType.INT4
        w = op.Cast(w, to=to)
        if zero is not None:
            zero = op.Cast(zero, to=to)
    if pad:
        x = op.Pad(x, op.Constant(value_ints=[0, pad]), None, op.Constant(value_ints=[-1]))
    if axis == 1:
        wf = op.DequantizeLinear(w, scale, zero, axis=1)
    else:
        wf = op.DequantizeLinear(w, scale, zero, axis=0, block_size=block_size)
    y = op.MatMul(x, wf)
    return y if bias is None else op.Add(y, bias)


# onnx has no schema for com.microsoft ops, so this one is an onnxscript function (script mode
# builds the node without a schema); the lowering always passes zero points and adds the bias outside.
@onnxscript.script(default_opset=op)
def matmul_nbits(x: FLOAT, b: UINT8, scales: FLOAT, zero_points: UINT8, bits: int, block_size: int, k: int,
                 n: int, accuracy_level: int) -> FLOAT:
    return MS.MatMulNBits(x, b, scales, zero_points, K=k, N=n, bits=bits, block_size=block_size,
                          accuracy_level=accuracy_level)


def qdq_per_token(x, bits: int = 8, scale=None, k: int = 0):
    to = ir.DataType.INT8 if bits == 8 else ir.DataType.INT4
    if scale is None:
        amax = op.ReduceMax(op.Abs(x), op.Constant(value_ints=[-1]), keepdims=1)
        eps = op.CastLike(op.Constant(value_float=1e-8), x)
        qmax = op.CastLike(op.Constant(value_float=float((1 << (bits - 1)) - 1)), x)
        s = op.Div(op.Max(amax, eps), qmax)
        q = op.QuantizeLinear(x, s, axis=-1, block_size=k, output_dtype=to)
        return op.DequantizeLinear(q, s, axis=-1, block_size=k)
    q = op.QuantizeLinear(x, scale, output_dtype=to)
    return op.DequantizeLinear(q, scale)


def table() -> dict:
    """OpOverload -> translation function."""

    return {ops.DQ_MATMUL: dq_matmul, ops.MATMUL_NBITS: matmul_nbits, ops.QDQ_PER_TOKEN: qdq_per_token}
