"""The Triton backend: ``cuda-*`` targets whose dialect ops run as Triton kernels on NVIDIA GPUs.

Triton is imported lazily (only when a kernel is built or launched), so listing targets or loading
this package works without it. Every kernel is tested against the reference implementation of its
op under ``TRITON_INTERPRET=1`` on CPU tensors.

The kernel modules (``wq``, ``linear_attention``) each expose ``register_cuda()``, which registers
their kernels as the CUDA implementation of their dialect op (``lowc.ir.dialect.ops.register_backend_kernel``);
the ``cuda-*`` targets' ``prepare`` calls both.
"""

from __future__ import annotations

from lowc.backends.triton.targets import targets  # no triton import

#: this backend's passes: name -> "module:Class"
PASSES: dict[str, str] = {"triton-lower": "lowc.backends.triton.lower:TritonLower"}
#: this backend's ops: name (``lowc::<name>``) -> the module that declares it
OPS: dict[str, str] = {"linear_wq_tr": "lowc.backends.triton.op", "linear_gsq_tr": "lowc.backends.triton.gsq_op"}

__all__ = ["targets", "PASSES", "OPS"]
