"""The learned feature maps of Hedgehog and LoLCATs and the linearized attention they define.

Every function here is written with ATen ops only (``torch.ops.aten.*``), so one definition serves
twice: called on FX proxies it appends the graph nodes the ``linearize`` pass inserts (see
:func:`lowc.passes.linearize.rewrite.emit_site`), called on tensors it is the differentiable forward
that attention transfer trains. The graph and the trainer therefore cannot disagree.

Shapes: ``x [B, H, L, D]`` (queries or keys after RoPE), ``weight [H, D, F]`` (one map per head),
``bias [H, 1, F]``; the result is ``[B, H, L, 2F]``, non-negative. Maps compute in fp32 (``x`` is cast,
parameters are stored in fp32) whatever the model's dtype: the op computes in fp32 anyway, and an
exponential in fp16 overflows at 11.

* Hedgehog (Zhang et al., 2024): ``φ(x) = [exp(xW + b), exp(−xW − b)]``, ``W`` initialised to the
  identity and ``b`` to zero. Stabilised without changing the attention: on the query side the row's
  ``max |xW + b|`` is subtracted from both halves' exponents, a per-query factor that cancels exactly
  between numerator and denominator of linear attention (Hedgehog has no window); on the key side,
  where a per-key factor would change the weights, ``xW + b`` is clamped to ``±KEY_CLAMP`` (40), which
  leaves every key with ``|xW + b| <= 40`` exact and keeps ``Σ φ(k)`` finite in fp32 at any practical
  length. (HazyResearch's ``Exp`` map instead subtracts each row's max/min from each half, a per-token
  factor per half, which changes the function; on MiniLM it gave a clearly worse fit.)
* LoLCATs (Zhang et al., 2025): ``φ(x) = [softmax_f(xW), softmax_f(−xW)]`` (softmax over the
  feature dimension, which subtracts the row maximum itself), no bias, ``W`` Kaiming-uniform
  initialised as the reference ``untied_head_einsum`` kernel; clamped at 1e-12 as the reference.
"""

from __future__ import annotations

import math

import torch

aten = torch.ops.aten

#: clamp of feature values and the denominator floor of the attention (the reference's eps)
EPS = 1e-12
#: Hedgehog key pre-activations are clamped to this magnitude (exact below it; keeps Σφ(k) finite)
KEY_CLAMP = 40.0
#: LoLCATs' initial window factor: sigmoid(-2.1972) = 0.1 of the window's weight
INIT_WINDOW_FACTOR = -2.1972245773362196
METHODS = ("hedgehog", "lolcats")


def hedgehog_map(x, weight, bias, query: bool):
    y = aten.add.Tensor(aten.matmul.default(aten.to.dtype(x, torch.float32), weight), bias)
    if query:
        m = aten.amax.default(aten.abs.default(y), [-1], True)
        pos, neg = aten.sub.Tensor(y, m), aten.sub.Tensor(aten.neg.default(y), m)
    else:
        pos = aten.clamp.default(y, -KEY_CLAMP, KEY_CLAMP)
        neg = aten.neg.default(pos)
    return aten.cat.default([aten.exp.default(pos), aten.exp.default(neg)], -1)


def lolcats_map(x, weight):
    y = aten.matmul.default(aten.to.dtype(x, torch.float32), weight)
    pos = aten._softmax.default(y, -1, False)
    neg = aten._softmax.default(aten.neg.default(y), -1, False)
    return aten.clamp_min.default(aten.cat.default([pos, neg], -1), EPS)


def feature_map(method: str, x, params: dict, which: str):
    """``φ_q`` (``which="q"``) or ``φ_k`` of ``method`` with the parameters in ``params``
    (``fq_weight``/``fq_bias``/``fk_weight``/``fk_bias``)."""
    if method == "hedgehog":
        return hedgehog_map(x, params[f"f{which}_weight"], params[f"f{which}_bias"], which == "q")
    return lolcats_map(x, params[f"f{which}_weight"])


def init_params(method: str, q_heads: int, k_heads: int, head_dim: int, feature_dim: int, window: int,
                generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Initial (fp32, CPU) parameters of one layer's maps: q maps ``[Hq, D, F]``, k maps ``[Hk, D, F]``
    (Hedgehog: identity + zero bias; LoLCATs: Kaiming-uniform), and LoLCATs' per-head window factor
    ``[Hq]`` when ``window > 0``."""
    out: dict[str, torch.Tensor] = {}
    for which, heads in (("q", q_heads), ("k", k_heads)):
        w = torch.empty(heads, head_dim, feature_dim)
        if method == "hedgehog":
            for h in range(heads):
                torch.nn.init.eye_(w[h])
            out[f"f{which}_bias"] = torch.zeros(heads, 1, feature_dim)
        else:
            # torch.nn.init.kaiming_uniform_ (a=0) on a [H, D, F] tensor: fan_in = D * F
            bound = math.sqrt(2.0) * math.sqrt(3.0 / (head_dim * feature_dim))
            w.uniform_(-bound, bound, generator=generator)
        out[f"f{which}_weight"] = w
    if method == "lolcats" and window > 0:
        out["window_factor"] = torch.full((q_heads,), INIT_WINDOW_FACTOR)
    return out


def linearized_attention(method: str, q, k, v, params: dict, key_mask, *, causal: bool, window: int,
                         scale: float, op):
    """The replacement of ``softmax(q kᵀ·scale) v``: feature maps, then ``op`` with
    ``lowc::linear_attention``'s signature (the op itself on proxies; its differentiable reference
    when training). ``k``/``v`` have the key heads the k maps were made for."""
    fq = feature_map(method, q, params, "q")
    fk = feature_map(method, k, params, "k")
    wf = aten.sigmoid.default(params["window_factor"]) if window > 0 else None
    return op(fq, fk, v, q if window > 0 else None, k if window > 0 else None, wf, None, key_mask,
              causal, window, scale, EPS)
