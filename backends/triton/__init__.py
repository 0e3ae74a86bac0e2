"""The Triton backend: ``cuda-*`` targets whose dialect ops run as Triton kernels on NVIDIA GPUs.

Triton is imported lazily (only when a kernel is built or launched), so listing targets or loading
this package works without it. Every kernel is tested against the reference implementation of its
op under ``TRITON_INTERPRET=1`` on CPU tensors.

``KERNEL_MODULES`` lists the modules of this package that provide kernels; each exposes
``register_cuda()``, which registers its kernels as the CUDA implementation of its dialect op(s)
(``lowc.ir.dialect.ops.register_backend_kernel``). :func:`register_cuda_kernels` calls them all;
the ``cuda-*`` targets' ``prepare`` uses it.
"""

from __future__ import annotations

import importlib

from lowc.backends.triton.targets import targets  # no triton import

#: this backend's passes: name -> "module:Class"
PASSES: dict[str, str] = {"triton-lower": "lowc.backends.triton.lower:TritonLower"}
#: this backend's ops: name (``lowc::<name>``) -> the module that declares it
OPS: dict[str, str] = {"linear_wq_tr": "lowc.backends.triton.op"}

#: kernel modules of this package, each with ``register_cuda()`` (add a line per new module)
KERNEL_MODULES: tuple[str, ...] = ("linear_attention", "wq")


def register_cuda_kernels() -> None:
    """Register every Triton kernel of this backend as the CUDA implementation of its op."""
    for name in KERNEL_MODULES:
        importlib.import_module(f"lowc.backends.triton.{name}").register_cuda()
