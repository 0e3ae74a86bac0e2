"""``onnx-lower``: a compiled program's dialect ops rewritten to the ONNX backend's ops
(:mod:`lowc.backends.onnx.ops`), the step before ``torch.onnx.export`` translates them.

:class:`OnnxLower` is a registered pass: the export runs it through a :class:`~lowc.passes.pipeline.Pipeline`
on a copy of the program, so the lowered graph is verified (fake-tensor propagation through the
``lowc_onnx`` ops' fake kernels), timed, recorded in the export's result and printable
(``lowc export --print-after onnx-lower``). It rewrites:

* ``lowc::linear_wq`` -> ``lowc_onnx::dq_matmul`` (default): the packed codes are unpacked and
  transposed to ``[K_pad, N]`` (the layout onnxruntime fuses into MatMulNBits: DequantizeLinear
  blocked along axis 0 feeding MatMul's B input). Asymmetric layers keep their unsigned codes and
  zero points; symmetric layers store signed codes ``q - 2^(bits-1)`` with no zero point. A layer
  with one group per row is per output channel (``axis=1``), otherwise blocked (``axis=0``,
  ``block_size`` = the group size).
* ``lowc::linear_wq`` -> ``lowc_onnx::matmul_nbits`` (``matmulnbits=True``, float32 models; a bias
  becomes an ``aten.add``): lowc's packed rows are MatMulNBits' ``B`` as they are; per-channel layers whose width is not a power of two are
  re-blocked into blocks of 128 (scale and zero point repeated, so the arithmetic is unchanged).
* ``lowc::linear_wqaq`` -> ``lowc_onnx::qdq_per_token`` (the activation QDQ pair) feeding one of
  the above.

Precondition: the program verifies. Invariant: the lowered program computes what the original
computes (checked by the tests: it still runs in PyTorch). Anything ONNX cannot carry (weights or
activations of other than 4 or 8 bits, a MatMulNBits block size it cannot take, a dialect op with
no ONNX form such as a LUT layout, a group-sparse ``lowc::linear_gsq`` layer unless the export was
asked to densify it first: :mod:`~lowc.backends.onnx.densify`) raises :class:`OnnxExportError` naming
the layer and its scheme, before anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lowc.backends.onnx import ops
from lowc.backends.onnx.errors import OnnxExportError
from lowc.ir import meta as nodemeta
from lowc.ir.dialect import packing
from lowc.ir.dialect.args import LinearQArgs
from lowc.passes.base import Pass, PassContext, PassResult, opt
from lowc.progress import bar

WEIGHT_BITS = (4, 8)
ACT_BITS = (4, 8)
#: block size used when a per-channel layer is re-blocked for MatMulNBits
NBITS_REBLOCK = 128


@dataclass
class LoweringReport:
    """What the lowering did: per layer, the ONNX form chosen."""

    layers: list[dict] = field(default_factory=list)

    def count(self, form: str) -> int:
        return sum(1 for r in self.layers if r["onnx"] == form)


def scheme_label(node: torch.fx.Node) -> str:
    """``rtn W4A16 g128 asym``: the layer's method and scheme (from the op's arguments when a
    graph carries no scheme metadata)."""
    info = nodemeta.get(node)
    scheme = info.scheme or LinearQArgs.of(node).scheme()
    return f"{info.method or '?'} {scheme.label}"


def layer_of(node: torch.fx.Node) -> str:
    info = nodemeta.get(node)
    return info.layer or node.name


def _is_pow2_block(bs: int) -> bool:
    return bs >= 16 and bs & (bs - 1) == 0


def check_node(program, node: torch.fx.Node, matmulnbits: bool = False) -> None:
    """Raise OnnxExportError if ONNX cannot carry this dialect node."""
    op = node.target
    name = op.name() if hasattr(op, "name") else str(op)
    where = f"layer {layer_of(node)} ({scheme_label(node) if name in ('lowc::linear_wq', 'lowc::linear_wqaq') else name})"
    if name == "lowc::fake_quant_kv":
        raise OnnxExportError(f"{where}: KV-cache quantization (pass quantize-kv) has no ONNX form in lowc's export "
                              "(it carries quantized linears only): recompile without quantize-kv to export")
    if name == "lowc::kron_transform":
        raise OnnxExportError(f"{where}: the online activation transform of flatquant (or affinequant's weight-only "
                              "full matrices) has no ONNX form in lowc's export: recompile with rtn or gptq (or, on pre-norm "
                              "models, affinequant{ln_matrix=false}) to export")
    if name == "lowc::linear_gsq":
        a = LinearQArgs.of(node)
        raise OnnxExportError(f"layer {layer_of(node)} ({scheme_label(node)}): group-sparse layers (lowc::linear_gsq) have "
                              "no ONNX form (ONNX cannot skip dropped groups); export with --densify (densify=True) "
                              f"to store it as a dense int{a.bits} layer with groups of its sparse group ({a.sparse_group}), "
                              "about 1.7x its bytes at 50% sparsity")
    if name not in ("lowc::linear_wq", "lowc::linear_wqaq"):
        raise OnnxExportError(f"{where}: the dialect op {name} has no ONNX form (the ONNX backend carries "
                              "lowc::linear_wq and lowc::linear_wqaq: export an artifact compiled for a ref-* or onnx-* target)")
    a = LinearQArgs.of(node)
    bits = a.bits
    if bits not in WEIGHT_BITS:
        raise OnnxExportError(f"{where}: {bits}-bit weights cannot be expressed in ONNX (DequantizeLinear/MatMulNBits "
                              "carry 4- and 8-bit weights); recompile with rtn{bits=4} or rtn{bits=8}")
    if name == "lowc::linear_wqaq":
        act_bits = a.act_bits
        if act_bits not in ACT_BITS:
            raise OnnxExportError(f"{where}: {act_bits}-bit activations cannot be expressed in ONNX (QuantizeLinear "
                                  "carries int4 and int8 activations)")
    if matmulnbits:
        scales_dtype = program.attr(a.scales.target).dtype
        if scales_dtype != torch.float32:
            raise OnnxExportError(f"{where}: the MatMulNBits form is emitted for float32 models, this layer's scales are "
                                  f"{str(scales_dtype).replace('torch.', '')}; export without --matmulnbits")
        group_size = a.group_size
        n_groups = program.attr(a.scales.target).shape[1]
        if not _is_pow2_block(group_size) and n_groups != 1:
            raise OnnxExportError(f"{where}: MatMulNBits needs a power-of-two block size >= 16, this layer has groups "
                                  f"of {group_size}; export without --matmulnbits (DequantizeLinear carries any group size)")


def dialect_nodes(program) -> list[torch.fx.Node]:
    return [n for n in program.graph.nodes if n.op == "call_function" and getattr(n.target, "namespace", None) == "lowc"]


def check_program(program, matmulnbits: bool = False) -> int:
    """Check every dialect node (no rewrite); returns how many there are."""
    nodes = dialect_nodes(program)
    for n in nodes:
        check_node(program, n, matmulnbits)
    return len(nodes)


def _dq_tensors(qweight, scales, zeros, bits: int):
    """(w [K_pad, N], scale, zero or None, axis, block_size) in DequantizeLinear's layout."""
    n, n_groups = scales.shape
    codes = packing.unpack(qweight, bits)  # [N, K_pad] int32
    k_pad = codes.shape[1]
    if zeros is None:
        w = (codes - (1 << (bits - 1))).t().contiguous().to(torch.int8)
    else:
        w = codes.t().contiguous().to(torch.uint8)
    if n_groups == 1:  # per output channel
        scale = scales[:, 0].contiguous()
        zero = zeros[:, 0].contiguous() if zeros is not None else None
        return w, scale, zero, 1, 0
    scale = scales.t().contiguous()
    zero = zeros.t().contiguous() if zeros is not None else None
    return w, scale, zero, 0, k_pad // n_groups


def _pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack [N, M] codes row by row into ceil(M*bits/8) bytes (padding the row to whole runs of 8)."""
    m = values.shape[1]
    padded = torch.nn.functional.pad(values, (0, (-m) % 8))
    return packing.pack(padded.to(torch.int32), bits)[:, : (m * bits + 7) // 8].contiguous()


def _nbits_tensors(qweight, scales, zeros, bits: int, group_size: int, in_features: int):
    """(B [N, n_blocks, blob], scales [N, n_blocks], zero_points or None, block_size) for MatMulNBits."""
    n, n_groups = scales.shape
    if _is_pow2_block(group_size):
        bs = group_size
        b = qweight.reshape(n, n_groups, bs * bits // 8).contiguous()
        sc, zp = scales.contiguous(), zeros
    else:  # per channel: re-block (same scale/zero in every block)
        bs = NBITS_REBLOCK if in_features > NBITS_REBLOCK // 2 else max(16, 1 << (in_features - 1).bit_length())
        nb = -(-in_features // bs)
        codes = packing.unpack(qweight, bits)[:, :in_features]
        zero_code = zeros[:, :1].to(torch.int32) if zeros is not None else torch.full((n, 1), 1 << (bits - 1), dtype=torch.int32)
        codes = torch.cat([codes, zero_code.expand(n, nb * bs - in_features)], dim=1)
        b = packing.pack(codes, bits).reshape(n, nb, bs * bits // 8).contiguous()
        sc = scales.expand(n, nb).contiguous()
        zp = zeros.expand(n, nb).contiguous() if zeros is not None else None
    if zp is None:  # symmetric: MatMulNBits' default zero point, given explicitly (one schema-free form)
        zp = torch.full(sc.shape, 1 << (bits - 1), dtype=torch.uint8)
    return b, sc, _pack_rows(zp, bits), bs


def lower_program(program, matmulnbits: bool = False, accuracy_level: int = 0):
    """A copy of ``program`` with every dialect op rewritten to ``lowc_onnx`` ops; and a report."""
    prog = program.clone()
    return prog, lower_in_place(prog, matmulnbits, accuracy_level)


def lower_in_place(prog, matmulnbits: bool = False, accuracy_level: int = 0, progress: bool = True) -> LoweringReport:
    """Rewrite every dialect op of ``prog`` to ``lowc_onnx`` ops (module docstring); the report
    says which ONNX form each layer took."""
    check_program(prog, matmulnbits)
    report = LoweringReport()
    for node in bar(dialect_nodes(prog), desc="onnx lowering", enabled=progress):
        name = node.target.name()
        a = LinearQArgs.of(node)
        x, bias, bits, group_size, in_features = a.x, a.bias, a.bits, a.group_size, a.in_features
        module_path = a.weight.target.rpartition(".")[0]
        qweight, scales = prog.attr(a.weight.target), prog.attr(a.scales.target)
        zeros = prog.attr(a.zeros.target) if a.zeros is not None else None

        def buf(attr: str, t: torch.Tensor | None):
            if t is None:
                return None
            return prog.get_attr_node(prog.add_buffer(module_path, attr, t), node)

        with prog.graph.inserting_before(node):
            if name == "lowc::linear_wqaq":
                act_bits, act_scale = a.act_bits, a.act_scale
                scale_n = None
                if act_scale is not None:
                    static = prog.attr(act_scale.target).reshape(()).clamp(min=1e-8)
                    scale_n = buf("onnx_act_scale", static)
                with prog.graph.inserting_before(node):
                    x = prog.graph.call_function(ops.QDQ_PER_TOKEN, (x, act_bits, scale_n, in_features))
            row = {"layer": layer_of(node), "scheme": scheme_label(node), "bits": bits}
            if matmulnbits:
                b, sc, zp, bs = _nbits_tensors(qweight, scales, zeros, bits, group_size, in_features)
                args = (x, buf("onnx_b", b), buf("onnx_scales", sc), buf("onnx_zero_points", zp), bits, bs,
                        in_features, scales.shape[0], accuracy_level)
                with prog.graph.inserting_before(node):
                    new = prog.graph.call_function(ops.MATMUL_NBITS, args)
                    if bias is not None:
                        new.meta = dict(node.meta)
                        new = prog.graph.call_function(torch.ops.aten.add.Tensor, (new, bias))
                row.update(onnx="MatMulNBits", block_size=bs, accuracy_level=accuracy_level)
            else:
                w, sc, zp, axis, bs = _dq_tensors(qweight, scales, zeros, bits)
                args = (x, buf("onnx_w", w), buf("onnx_scale", sc), buf("onnx_zero", zp), bias, axis, bs, bits,
                        w.shape[0] - in_features)
                with prog.graph.inserting_before(node):
                    new = prog.graph.call_function(ops.DQ_MATMUL, args)
                row.update(onnx="DequantizeLinear->MatMul", axis=axis, block_size=bs)
            if name == "lowc::linear_wqaq":
                row["onnx_act"] = (f"QuantizeLinear/DequantizeLinear int{a.act_bits} "
                                   + ("per token" if a.act_scale is None else "per tensor (static scale)"))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        prog.graph.erase_node(node)
        report.layers.append(row)
    prog.remove_dead()
    prog.gm.graph.lint()
    prog.gm.recompile()
    return report


@dataclass(frozen=True)
class OnnxLower(Pass):
    """The ONNX export's lowering as a pass (module docstring)."""

    name = "onnx-lower"
    summary = "rewrite compressed linears to the ops the ONNX translation emits (DequantizeLinear->MatMul or MatMulNBits)"

    matmulnbits: bool = opt(False, "emit com.microsoft::MatMulNBits (float32 models) instead of DequantizeLinear->MatMul")
    accuracy_level: int = opt(0, "MatMulNBits accuracy level: 0 = fp32 arithmetic, 4 = int8 activations")

    def validate(self) -> None:
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise self.fail(f"accuracy_level={self.accuracy_level}: onnxruntime takes 0 (fp32), 1, 2, 3 or 4 (int8 activations)")

    def run(self, program, ctx: PassContext) -> PassResult:
        report = lower_in_place(program, self.matmulnbits, self.accuracy_level, progress=ctx.progress)
        forms: dict[str, int] = {}
        for row in report.layers:
            forms[row["onnx"]] = forms.get(row["onnx"], 0) + 1
        return PassResult(changed=bool(report.layers), stats={"lowered": len(report.layers), "forms": forms,
                                                               "layers": report.layers})
