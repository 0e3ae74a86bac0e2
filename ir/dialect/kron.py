"""``lowc::kron_transform``: the online activation transform of FlatQuant (and of AffineQuant's
full-matrix mode), declared with ``torch.library``.

``lowc::kron_transform(x, scale?, p1, p2?, clip?) -> y``
    ``y = clip_c((x ⊙ scale) · (p1 ⊗ p2))`` over the last dim of ``x``:

    * ``scale``: ``[K]`` per-channel smoothing vector, or ``None`` (folded elsewhere);
    * ``p1``: ``[n1, n1]``; ``p2``: ``[n2, n2]`` or ``None`` (the identity), with ``n1·n2 = K``.
      The Kronecker product is never formed: a row viewed as an ``[n1, n2]`` matrix ``X`` becomes
      ``p1ᵀ · X · p2`` (equal to ``x · kron(p1, p2)`` for row-major ``X``), which costs
      ``K·(n1 + n2)`` multiply-adds per token instead of ``K²``;
    * ``clip``: ``None``, or a ratio ``c`` in ``(0, 1]``: each token is clamped to
      ``±c·max|y_token|``. A per-token dynamic symmetric quantizer that follows
      (``lowc::linear_wqaq``) then sees ``max|y| = c·max|y_token|``, i.e. it quantizes with
      FlatQuant's learned activation clipping; with float activations ``clip`` is ``None``.

    The computation runs in fp32 and returns ``x``'s dtype. The transform is what a quantized linear
    reads; its inverse is folded into that linear's weight, so in exact arithmetic the program
    computes what it computed before the transform was inserted (up to the clipping).

The op carries no ``scheme`` metadata (it is not a linear-like layer); backends without a form for it
(ONNX) refuse it naming the layer. A fused Triton kernel (transform + per-token quantization) can
register itself for CUDA through :func:`lowc.ir.dialect.ops.register_backend_kernel`-style
``torch.library.register_kernel``.
"""

from __future__ import annotations

from typing import Optional

import torch

OP = "lowc::kron_transform"


def _check(x, scale, p1, p2, clip) -> None:
    if p1.dim() != 2 or p1.shape[0] != p1.shape[1]:
        raise ValueError(f"{OP}: p1 must be a square matrix, got {tuple(p1.shape)}")
    n1 = p1.shape[0]
    width = x.shape[-1]
    if p2 is not None:
        if p2.dim() != 2 or p2.shape[0] != p2.shape[1]:
            raise ValueError(f"{OP}: p2 must be a square matrix, got {tuple(p2.shape)}")
        if n1 * p2.shape[0] != width:
            raise ValueError(f"{OP}: input width {width} != {n1} x {p2.shape[0]} (p1 x p2)")
    elif width % n1:
        raise ValueError(f"{OP}: input width {width} is not a multiple of p1's size {n1}")
    if scale is not None and tuple(scale.shape) != (width,):
        raise ValueError(f"{OP}: scale {tuple(scale.shape)} must be [{width}]")
    if clip is not None and not 0.0 < clip <= 1.0:
        raise ValueError(f"{OP}: clip must lie in (0, 1], got {clip}")


def kron_apply(x: torch.Tensor, scale: Optional[torch.Tensor], p1: torch.Tensor, p2: Optional[torch.Tensor]) -> torch.Tensor:
    """``(x ⊙ scale) · kron(p1, p2)`` over the last dim, in ``x``'s dtype and differentiable (the
    training passes use it on fp32 tensors with learnable ``p1``/``p2``/``scale``)."""
    if scale is not None:
        x = x * scale
    n1 = p1.shape[0]
    n2 = x.shape[-1] // n1
    y = x.reshape(*x.shape[:-1], n1, n2)
    if p2 is not None:
        y = torch.matmul(y, p2)
    y = torch.matmul(p1.transpose(0, 1), y)
    return y.reshape(x.shape)


@torch.library.custom_op(OP, mutates_args=())
def kron_transform(
    x: torch.Tensor,
    scale: Optional[torch.Tensor],
    p1: torch.Tensor,
    p2: Optional[torch.Tensor],
    clip: Optional[float],
) -> torch.Tensor:
    _check(x, scale, p1, p2, clip)
    xf = x.float()
    y = kron_apply(xf, None if scale is None else scale.float(), p1.float(), None if p2 is None else p2.float())
    if clip is not None and clip < 1.0:
        bound = y.abs().amax(dim=-1, keepdim=True) * clip
        y = torch.minimum(torch.maximum(y, -bound), bound)
    return y.to(x.dtype)


@kron_transform.register_fake
def _kron_transform_fake(x, scale, p1, p2, clip):
    _check(x, scale, p1, p2, clip)
    return torch.empty_like(x)

