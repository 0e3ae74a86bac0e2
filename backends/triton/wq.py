"""Running ``lowc::linear_wq_tr`` with the Triton kernels (:mod:`lowc.backends.triton.wq_kernels`).

:func:`linear` checks the operands, flattens ``x`` to ``[M, K]``, picks a configuration
(:mod:`lowc.backends.triton.autotune`: timed and cached on CUDA, heuristic otherwise), launches the
GEMV or the ``tl.dot`` GEMM (plus the split-K reduction when split) and returns ``[..., N]`` in the
activation dtype. :func:`register_cuda` (called by the ``cuda-*`` targets' ``prepare``) makes it the CUDA
implementation of the op; :func:`register_interpreter` makes it the CPU implementation when
``TRITON_INTERPRET=1`` (the kernels then run in triton's interpreter on CPU tensors: the tests and
``--interpret-smoke`` benchmarks use this; it is slow and not a performance measurement).

Triton is imported on first use, not when this module is imported.
"""

from __future__ import annotations

import os
import re
from collections import Counter

import torch

from lowc.backends.triton import autotune, op
from lowc.errors import KernelError

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: kernel launches by kernel name in this process (tests check which kernels ran)
LAUNCHES: Counter = Counter()
_registered: set[tuple[str, str]] = set()  # (op, device)
# rows per launch: keeps every element offset below 2^31 (the kernels index with int32)
_MAX_ELEMS = 2**31 - 1


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def require_triton() -> None:
    """Raise a clear KernelError when triton cannot be imported."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        raise KernelError(f"the cuda-* targets run Triton kernels, but triton cannot be imported ({e}); install it "
                          f"with pip install 'lowc[triton]', or load the artifact with device='cpu' to run the "
                          f"reference implementation") from None


def _kernels():
    require_triton()
    from lowc.backends.triton import (
        wq_kernels,  # optional: the kernels' module imports triton
    )

    return wq_kernels


def _problem(x2: torch.Tensor, scales, zeros, bits, group_size, in_features, out_features) -> autotune.Problem:
    return autotune.Problem(m=x2.shape[0], n=out_features, k=in_features, k_pad=scales.shape[0] * group_size,
                            bits=bits, group_size=group_size, n_groups=scales.shape[0], symmetric=zeros is None,
                            dtype=str(x2.dtype).replace("torch.", ""))


#: launch plans by (configuration, problem, operand kinds, strides): decode calls every layer once per
#: token, so the grid and keyword arguments are built once, not per call
_plans: dict = {}


def launch(cfg: autotune.Config, x2, qweight, scales, zeros, bias, out, p: autotune.Problem) -> None:
    """Run one configuration: ``out[M, N] = x2[M, K] @ W.T + bias``."""
    key = (cfg, p, zeros is not None, bias is not None, x2.stride(0), out.stride(0), qweight.shape[0])
    plan = _plans.get(key)
    if plan is None:
        plan = _plans[key] = _plan(cfg, p, zeros is not None, bias is not None, x2, out, qweight.shape[0])
    plan(x2, qweight, scales, zeros, bias, out)
    LAUNCHES[cfg.kernel] += 1


def _plan(cfg: autotune.Config, p: autotune.Problem, has_zeros: bool, has_bias: bool, x2, out, kw: int):
    """A function launching ``cfg`` for ``p`` on given operands (everything else precomputed)."""
    K = _kernels()
    m, n = p.m, p.n
    bk = cfg.block_k
    num_tiles = -(-p.k_pad // bk)
    split = max(1, min(cfg.split_k, num_tiles))
    tiles_per_split = -(-num_tiles // split)
    tiles_per_group = p.group_size // bk if p.n_groups > 1 else num_tiles
    if p.n_groups > 1 and p.group_size % bk:
        raise KernelError(f"lowc::linear_wq_tr: block_k={bk} does not divide group_size={p.group_size}")
    partial = split > 1
    common = dict(BITS=p.bits, PACK=p.pack, HAS_ZEROS=has_zeros, HAS_BIAS=has_bias,
                  PARTIAL=partial, EVEN_K=p.k_pad % bk == 0, BLOCK_N=cfg.block_n, BLOCK_K=bk,
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    tail = (m, n, p.k, kw, x2.stride(0), out.stride(0), tiles_per_split, num_tiles, tiles_per_group)
    if cfg.kernel == "gemv":
        kernel = K.wq_gemv[(-(-n // cfg.block_n), split, m)]
    elif cfg.kernel == "gemm":
        dot_fp32 = x2.dtype == torch.float32 or (x2.dtype == torch.bfloat16 and interpreting())
        common.update(DOT_FP32=dot_fp32, UNPACK=cfg.unpack, BLOCK_M=cfg.block_m, GROUP_M=cfg.group_m)
        kernel = K.wq_gemm[(-(-m // cfg.block_m) * -(-n // cfg.block_n), split)]
    else:
        raise KernelError(f"lowc::linear_wq_tr: unknown kernel {cfg.kernel!r} in configuration {cfg}")
    rb = 256
    reduce = K.splitk_reduce[(-(-n // rb), m)] if partial else None

    def run(x2, qweight, scales, zeros, bias, out):
        dummy = scales
        target = torch.empty((split, m, n), dtype=torch.float32, device=x2.device) if partial else out
        kernel(x2, qweight, scales, dummy if zeros is None else zeros, dummy if bias is None else bias, target,
               *tail, **common)
        if partial:
            reduce(target, dummy if bias is None else bias, out, m, n, out.stride(0),
                   SPLIT_K=split, HAS_BIAS=has_bias, BLOCK_N=rb, num_warps=4)

    return run


def compile_for_gpu(cfg: autotune.Config, p: autotune.Problem, arch: int = 90, has_bias: bool = True) -> dict:
    """Compile one configuration ahead of time for ``sm_<arch>`` without a GPU (triton's ``ASTSource``
    and its bundled ``ptxas``); returns the shared memory and the PTX instruction counts that matter.
    A check that the kernels build for real GPUs where only the interpreter can run them (CI)."""

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    dt = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}[p.dtype]
    partial = cfg.split_k > 1
    consts = dict(BITS=p.bits, PACK=p.pack, HAS_ZEROS=not p.symmetric, HAS_BIAS=has_bias, PARTIAL=partial,
                  EVEN_K=p.k_pad % cfg.block_k == 0, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SG=p.sparse_group,
                  DOT_FP32=p.dtype == "float32", UNPACK=cfg.unpack, BLOCK_M=cfg.block_m, GROUP_M=cfg.group_m)
    if p.sparse_group:
        from lowc.backends.triton import (
            gsq_kernels as K,  # optional: the kernels' module imports triton
        )

        fn = K.gsq_gemm if cfg.kernel == "gemm" else K.gsq_gemv
    else:
        K = _kernels()
        fn = K.wq_gemm if cfg.kernel == "gemm" else K.wq_gemv
    consts = {k: v for k, v in consts.items() if k in fn.arg_names}
    ptrs = {"x_ptr": f"*{dt}", "w_ptr": "*i32", "s_ptr": f"*{dt}", "z_ptr": "*u8", "i_ptr": "*i16", "b_ptr": f"*{dt}",
            "o_ptr": "*fp32" if partial else f"*{dt}"}
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name in ptrs:
            sig[name] = ptrs[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "i32"
            # what the JIT's specialization sees for such shapes (integers divisible by 16)
            if name in ("N", "K", "KW", "stride_xm", "stride_om") and p.n % 16 == 0 and p.k % 128 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()},
                    attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    ptx = kernel.asm["ptx"]
    ops = Counter(re.findall(r"(ld\.global(?:\.v\d)?\.b\d+|cp\.async|cvt\.rn\.f32\.[su]32|fma\.rn\.f32|"
                             r"mma\.sync|wgmma\.mma_async)", ptx))
    return {"shared": int(kernel.metadata.shared), "ptx_ops": dict(ops)}


def _autotune_enabled() -> bool:
    return os.environ.get("LOWC_TRITON_AUTOTUNE", "1") != "0"


_chosen: dict = {}


def choose(p: autotune.Problem, x2, run) -> autotune.Config:
    """The configuration for ``p``: cached/tuned on CUDA, the heuristic elsewhere or while capturing a graph.
    Decisions are memoized per (device, problem) for this process (decode calls each layer every token)."""
    env = os.environ
    memo = (x2.device, p, env.get("LOWC_TRITON_AUTOTUNE"), env.get("LOWC_CACHE_DIR"), env.get("HOME"))
    hit = _chosen.get(memo)
    if hit is not None:
        return hit
    cfg = _choose(p, x2, run)
    if not (x2.is_cuda and torch.cuda.is_current_stream_capturing()):
        _chosen[memo] = cfg
    return cfg


def _choose(p: autotune.Problem, x2, run) -> autotune.Config:
    if x2.is_cuda:
        props = torch.cuda.get_device_properties(x2.device)
        sms = props.multi_processor_count
        if _autotune_enabled() and not torch.cuda.is_current_stream_capturing():
            import triton

            return autotune.tune(p, run, props.name, triton.__version__, sms)
        import triton

        hit = autotune.lookup(autotune.key(p, props.name, triton.__version__))
        return hit if hit is not None else autotune.heuristic(p, sms)
    return autotune.heuristic(p)


def linear(x, qweight, scales, zeros, bias, bits, group_size, in_features, out_features,
           config: autotune.Config | None = None) -> torch.Tensor:
    """``lowc::linear_wq_tr`` through the Triton kernels (``config`` forces one configuration)."""
    op.check(x, qweight, scales, zeros, bias, bits, group_size, in_features, out_features)
    qweight, scales = qweight.contiguous(), scales.contiguous()
    zeros = zeros.contiguous() if zeros is not None else None
    bias = bias.contiguous() if bias is not None else None

    def problem(xs):
        return _problem(xs, scales, zeros, bits, group_size, in_features, out_features)

    def run(cfg, xs, os_, p):
        launch(cfg, xs, qweight, scales, zeros, bias, os_, p)

    return run_rows(op.OP, x, (qweight, scales, zeros, bias), in_features, out_features, problem, run, config)


def run_rows(op_name: str, x, operands, in_features: int, out_features: int, problem, run,
             config: autotune.Config | None = None) -> torch.Tensor:
    """What every Triton linear wrapper shares: check the activation dtype and the devices, flatten
    ``x`` to ``[M, K]`` (unit stride along K), cut M so that offsets fit int32, pick a configuration
    per chunk (``problem(xs)`` -> Problem; ``config`` forces one) and ``run(cfg, xs, out, problem)``;
    returns ``[..., N]`` in the activation dtype."""
    def shape():
        return f"x {str(x.dtype).replace('torch.', '')}{list(x.shape)}, N={out_features}, K={in_features}"

    if x.dtype not in DTYPES:
        raise KernelError(f"{op_name}: the Triton kernels take float16, bfloat16 or float32 activations; "
                          f"got {shape()}")
    dev = x.device
    if any(t is not None and t.device != dev for t in operands):
        devs = {t.device for t in (x, *operands) if t is not None}
        raise KernelError(f"{op_name}: operands on different devices {sorted(map(str, devs))} ({shape()})")
    if not x.is_cuda and not interpreting():
        raise KernelError(f"{op_name}: Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU "
                          f"tensors); got {x.device} ({shape()})")
    x2 = x.reshape(-1, in_features)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    out = torch.empty((m, out_features), dtype=x.dtype, device=x.device)
    if m == 0:
        return out.reshape(*x.shape[:-1], out_features)
    rows = max(1, _MAX_ELEMS // max(out_features, x2.stride(0), 1))
    if m <= rows:  # one chunk (always in decode): no slicing
        p = problem(x2)
        run(config if config is not None else choose(p, x2, lambda cfg: run(cfg, x2, out, p)), x2, out, p)
        return out.reshape(*x.shape[:-1], out_features)
    for r0 in range(0, m, rows):
        xs, os_ = x2[r0:r0 + rows], out[r0:r0 + rows]
        p = problem(xs)

        def run_one(cfg, xs=xs, os_=os_, p=p):
            run(cfg, xs, os_, p)

        cfg = config if config is not None else choose(p, xs, run_one)
        run_one(cfg)
    return out.reshape(*x.shape[:-1], out_features)


def _impl(x, qweight, scales, zeros, bias, bits, group_size, in_features, out_features):
    return linear(x, qweight, scales, zeros, bias, bits, group_size, in_features, out_features)


def register_kernel(op_name: str, device: str, impl) -> None:
    """Register ``impl`` as ``op_name``'s implementation on ``device`` (``cuda``, or ``cpu`` under the
    interpreter), once per process."""
    if device == "cuda":
        require_triton()
    else:
        check_interpreter()
    if (op_name, device) not in _registered:
        torch.library.register_kernel(op_name, device, impl)
        _registered.add((op_name, device))


def check_interpreter() -> None:
    """Raise unless the kernels can run on CPU tensors in triton's interpreter."""
    if not interpreting():
        raise KernelError("running the Triton kernels on CPU tensors needs TRITON_INTERPRET=1 in the environment "
                          "(set before the process imports triton)")
    K = _kernels()
    if type(K.wq_gemv).__name__ != "InterpretedFunction":
        raise KernelError("the Triton kernels were imported before TRITON_INTERPRET=1 was set in this process; "
                          "set it before starting Python")


def register_cuda() -> None:
    """Make the Triton kernels the CUDA implementation of ``lowc::linear_wq_tr`` (idempotent)."""
    register_kernel(op.OP, "cuda", _impl)


def register_interpreter() -> None:
    """Make the Triton kernels the CPU implementation of the op, run by triton's interpreter.

    Needs ``TRITON_INTERPRET=1`` in the environment before this process first imports the kernels."""
    register_kernel(op.OP, "cpu", _impl)


def registered_devices(op_name: str = op.OP) -> frozenset[str]:
    return frozenset(d for o, d in _registered if o == op_name)
