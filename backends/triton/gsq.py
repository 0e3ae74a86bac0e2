"""Running ``lowc::linear_gsq_tr`` with the group-sparse Triton kernels (:mod:`lowc.backends.triton.gsq_kernels`).

:func:`linear` checks the operands and runs them through :func:`lowc.backends.triton.wq.run_rows`
(dtype and device checks, ``x`` flattened to ``[M, K]``, a configuration from
:mod:`lowc.backends.triton.autotune`: timed and cached on CUDA, heuristic otherwise): the GEMV
(decode: skips dropped groups, split-K reduced by the dense backend's ``splitk_reduce``) or the GEMM
(prefill: B tiles densified in registers from the kept codes). :func:`register_cuda` (called by the
``cuda-*`` targets' ``prepare``) makes it the CUDA implementation of the op; :func:`register_interpreter`
the CPU one under ``TRITON_INTERPRET=1`` (tests). Triton is imported on first use.
"""

from __future__ import annotations

import torch

from lowc.backends.triton import autotune, gsq_op, wq
from lowc.errors import KernelError


def _kernels():
    wq.require_triton()
    from lowc.backends.triton import (
        gsq_kernels,  # optional: the kernels' module imports triton
    )

    return gsq_kernels


def unsupported_reason(bits: int, sparse_group: int) -> str | None:
    """Why the group-sparse kernels cannot take a layer, or None (the GEMM's K tile holds whole
    sparse groups, so ``sparse_group`` must be a power of two)."""
    if bits not in (4, 8):
        return f"Triton kernels take 4- or 8-bit weights, got bits={bits}"
    if sparse_group & (sparse_group - 1) or sparse_group > 1024:
        return f"the group-sparse Triton kernels need a sparse group that is a power of two (<= 1024), got sparse_group={sparse_group}"
    return None


def problem(x2: torch.Tensor, scales, zeros, idx, bits, group_size, in_features, out_features,
            sparse_group) -> autotune.Problem:
    k_pad = -(-in_features // sparse_group) * sparse_group
    return autotune.Problem(m=x2.shape[0], n=out_features, k=in_features, k_pad=k_pad, bits=bits,
                            group_size=group_size, n_groups=scales.shape[0], symmetric=zeros is None,
                            dtype=str(x2.dtype).replace("torch.", ""), sparse_group=sparse_group, n_keep=idx.shape[0])


def launch(cfg: autotune.Config, x2, qweight, scales, zeros, idx, bias, out, p: autotune.Problem) -> None:
    """Run one configuration: ``out[M, N] = x2[M, K] @ W.T + bias``."""
    K = _kernels()
    m, n = x2.shape[0], p.n
    dummy = scales
    common = dict(BITS=p.bits, PACK=p.pack, SG=p.sparse_group, HAS_ZEROS=zeros is not None, HAS_BIAS=bias is not None,
                  BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    z = zeros if zeros is not None else dummy
    b = bias if bias is not None else dummy
    if cfg.kernel == "gemv":
        if cfg.block_k % p.pack:
            raise KernelError(f"{gsq_op.OP}: block_k={cfg.block_k} is not a multiple of {p.pack} codes per word")
        num_tiles = -(-p.k_compact // cfg.block_k)
        split = max(1, min(cfg.split_k, num_tiles))
        tiles_per_split = -(-num_tiles // split)
        partial = split > 1
        target = torch.empty((split, m, n), dtype=torch.float32, device=x2.device) if partial else out
        K.gsq_gemv[(-(-n // cfg.block_n), split, m)](
            x2, qweight, scales, z, idx, b, target, m, n, p.k, qweight.shape[0], p.group_size, x2.stride(0),
            out.stride(0), tiles_per_split, num_tiles, PARTIAL=partial, **common)
        if partial:
            rb = 256
            wq._kernels().splitk_reduce[(-(-n // rb), m)](target, b, out, m, n, out.stride(0), SPLIT_K=split,
                                                          HAS_BIAS=bias is not None, BLOCK_N=rb, num_warps=4)
    elif cfg.kernel == "gemm":
        if cfg.block_k % p.sparse_group or cfg.split_k != 1:
            raise KernelError(f"{gsq_op.OP}: the GEMM needs block_k a multiple of sparse_group={p.sparse_group} and "
                              f"no split-K, got {cfg.label}")
        dot_fp32 = x2.dtype == torch.float32 or (x2.dtype == torch.bfloat16 and wq.interpreting())
        grid = (-(-m // cfg.block_m) * -(-n // cfg.block_n),)
        K.gsq_gemm[grid](x2, qweight, scales, z, idx, b, out, m, n, p.k, p.n_keep, p.group_size, x2.stride(0),
                         out.stride(0), -(-p.k_pad // cfg.block_k), DOT_FP32=dot_fp32, BLOCK_M=cfg.block_m,
                         GROUP_M=cfg.group_m, **common)
    else:
        raise KernelError(f"{gsq_op.OP}: unknown kernel {cfg.kernel!r} in configuration {cfg}")
    wq.LAUNCHES[f"gsq_{cfg.kernel}"] += 1


def linear(x, qweight, scales, zeros, bias, bits, group_size, in_features, out_features, idx, sparse_group,
           config: autotune.Config | None = None) -> torch.Tensor:
    """``lowc::linear_gsq_tr`` through the Triton kernels (``config`` forces one configuration)."""
    gsq_op.check(x, qweight, scales, zeros, bias, bits, group_size, in_features, out_features, idx, sparse_group,
                 values=False)
    why = unsupported_reason(bits, sparse_group)
    if why:
        raise KernelError(f"{gsq_op.OP} (N={out_features}, K={in_features}): {why}")
    qweight, scales, idx = qweight.contiguous(), scales.contiguous(), idx.contiguous()
    zeros = zeros.contiguous() if zeros is not None else None
    bias = bias.contiguous() if bias is not None else None

    def prob(xs):
        return problem(xs, scales, zeros, idx, bits, group_size, in_features, out_features, sparse_group)

    def run(cfg, xs, os_, p):
        launch(cfg, xs, qweight, scales, zeros, idx, bias, os_, p)

    return wq.run_rows(gsq_op.OP, x, (qweight, scales, zeros, idx, bias), in_features, out_features, prob, run, config)


def _impl(x, qweight, scales, zeros, bias, bits, group_size, in_features, out_features, idx, sparse_group):
    return linear(x, qweight, scales, zeros, bias, bits, group_size, in_features, out_features, idx, sparse_group)


def register_cuda() -> None:
    """Make the kernels the CUDA implementation of ``lowc::linear_gsq_tr`` (idempotent)."""
    wq.register_kernel(gsq_op.OP, "cuda", _impl)


def register_interpreter() -> None:
    """Make the kernels the CPU implementation of the op, run by triton's interpreter (``TRITON_INTERPRET=1``)."""
    wq.register_kernel(gsq_op.OP, "cpu", _impl)
