"""The ``static-kv`` strategy: a Llama-family decode loop written for decoding, with a preallocated KV cache.

The ``kv-cache`` strategy (:mod:`lowc.runtime.hf_rebuild`) runs the rebuilt Hugging Face model: each
step goes through transformers' generic forward (cache objects, mask builders, rotary recomputation,
output dataclasses), Python work that is the same order as the LUT kernels themselves for a small
model. This decoder takes the same rebuilt model (so the same weights, the same compiled linear ops,
and the same one-time check against the compiled graph) and runs it the way a runtime does:

* one KV cache per layer, ``[B, Hk, capacity, D]``, allocated at ``prefill`` (capacity: the prompt
  plus ``reserve`` positions, doubled when full, never above ``max_position_embeddings``); a step
  writes one position in place and attends over the filled prefix with one SDPA call;
* the rotary table (cos, sin) computed once for the capacity, indexed per step;
* RMSNorm as one fused ATen call (``torch.rms_norm``), SiLU·mul as two, residuals in place;
* per step a fixed sequence of ops per layer (no graph interpretation, no per-step allocation that
  grows with the tokens seen), the linear layers through the compiled ops (``lowc::linear_lut`` on
  ``cpu-lut-*``: the generated C; M = batch rows at decode, M = prompt length at prefill).

Positions are cache positions (0, 1, ... including left padding), as in the traced graph and the
``kv-cache`` strategy, so the tokens match ``recompute``. Left padding is masked as key validity.

Applies to models whose ``hf_config`` is a plain Llama layout (:func:`static_blocker` says why not
otherwise): ``model_type`` ``llama``, SiLU MLP, no sliding window, ``pretraining_tp == 1``.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F
from lowc.errors import GenerationError
from lowc.runtime.decoder import Decoder
from lowc.runtime.device import prompt_on, tokens_on
from lowc.runtime.hf_rebuild import rebuild_blocker, rebuild_hf

#: positions allocated beyond the prompt at prefill (the cache doubles when they run out)
RESERVE = 256
MODEL_TYPES = ("llama",)


def static_blocker(program) -> str | None:
    """Why the ``static-kv`` decoder cannot run ``program`` (None when it can be tried)."""
    why = rebuild_blocker(program)
    if why:
        return why
    cfg = program.info.hf_config
    if cfg.get("model_type") not in MODEL_TYPES:
        return f"the static-kv decoder runs {', '.join(MODEL_TYPES)} models, not '{cfg.get('model_type')}'"
    if cfg.get("hidden_act", "silu") != "silu" or cfg.get("pretraining_tp", 1) != 1 or cfg.get("sliding_window"):
        return "the static-kv decoder needs a SiLU MLP, pretraining_tp 1 and no sliding window"
    return None


class _Layer:
    """One decoder layer's modules and its KV cache."""

    def __init__(self, block):
        attn, mlp = block.self_attn, block.mlp
        self.ln1, self.eps1 = block.input_layernorm.weight, block.input_layernorm.variance_epsilon
        self.ln2, self.eps2 = block.post_attention_layernorm.weight, block.post_attention_layernorm.variance_epsilon
        self.q, self.k, self.v, self.o = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        self.gate, self.up, self.down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self.scale = attn.scaling
        self.kc: torch.Tensor | None = None
        self.vc: torch.Tensor | None = None


#: the compiled linear ops that run their own thread pool (the CPU LUT C kernels, sized by
#: ``$LOWC_CPU_LUT_THREADS``, else torch's thread count)
OWN_THREAD_OPS = ("linear_lut", "linear_lut_gs")


def _own_threads(module) -> bool:
    op = getattr(module, "op", None)
    return getattr(op, "namespace", None) == "lowc" and getattr(op, "_opname", None) in OWN_THREAD_OPS


@contextlib.contextmanager
def _small_ops_on_one_thread(active: bool):
    """A decode step of a model whose linears are all LUT C kernels: the kernels keep the thread count
    (passed through ``$LOWC_CPU_LUT_THREADS`` unless it is set), torch's own ops of one token (norms,
    RoPE, attention over the cache, SiLU·mul) run on one thread. Measured on the issue's 4-layer Llama,
    2 threads, cpu-lut-w4: 58 → 78 tokens/s (torch's intra-op threads cost more than they give on
    one-token ops)."""
    n = torch.get_num_threads()
    if not active or n == 1:
        yield
        return
    key = "LOWC_CPU_LUT_THREADS"
    had = key in os.environ
    if not had:
        os.environ[key] = str(n)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
        if not had:
            os.environ.pop(key, None)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm (fp32 statistics, then the weight in the model's dtype) as one fused call in fp32."""
    if x.dtype == torch.float32:
        return torch.rms_norm(x, (x.shape[-1],), w, eps)
    return w * torch.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, Hugging Face's half-split layout: ``x * cos + rotate_half(x) * sin``."""
    h = x.shape[-1] // 2
    rot = torch.cat((x[..., h:].neg(), x[..., :h]), -1)
    return torch.addcmul(x * cos, rot, sin)


class StaticCacheDecoder(Decoder):
    """Decodes a Llama-family compiled model with a preallocated KV cache (module docstring).
    ``hf``: an already rebuilt model (default: :func:`rebuild_hf` of ``model``, checked once)."""

    strategy = "static-kv"

    def __init__(self, model, hf=None, reserve: int = RESERVE):
        super().__init__(model)
        why = static_blocker(self.program)
        if why:
            raise GenerationError(why)
        self.hf = hf if hf is not None else rebuild_hf(self.program)
        cfg = self.hf.config
        core = self.hf.model
        self.embed = core.embed_tokens.weight
        self.norm, self.norm_eps = core.norm.weight, core.norm.variance_epsilon
        self.lm_head = self.hf.lm_head
        self.layers = [_Layer(b) for b in core.layers]
        self.own_threads = all(_own_threads(m) for layer in self.layers
                               for m in (layer.q, layer.k, layer.v, layer.o, layer.gate, layer.up, layer.down))
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.inv_freq = core.rotary_emb.inv_freq.float()
        self.rope_scale = float(core.rotary_emb.attention_scaling)
        self.max_len = int(getattr(cfg, "max_position_embeddings", 0) or 1 << 30)
        self.reserve = reserve
        self.reset()

    def reset(self) -> None:
        self.pos = 0
        self.valid: torch.Tensor | None = None  # [B, capacity] bool: key validity (left padding)
        self.cos = self.sin = None
        for layer in self.layers:
            layer.kc = layer.vc = None

    @property
    def capacity(self) -> int:
        return 0 if self.valid is None else self.valid.shape[1]

    def _allocate(self, batch: int, capacity: int) -> None:
        """(Re)allocate the caches for ``capacity`` positions, keeping the ``pos`` filled ones."""
        capacity = min(capacity, self.max_len)
        if capacity <= self.pos:
            raise GenerationError(f"static-kv: the sequence reached max_position_embeddings={self.max_len}")
        dt, dev = self.embed.dtype, self.embed.device
        shape = (batch, self.kv_heads, capacity, self.head_dim)
        for layer in self.layers:
            kc, vc = torch.zeros(shape, dtype=dt, device=dev), torch.zeros(shape, dtype=dt, device=dev)
            if layer.kc is not None:
                kc[:, :, :self.pos] = layer.kc[:, :, :self.pos]
                vc[:, :, :self.pos] = layer.vc[:, :, :self.pos]
            layer.kc, layer.vc = kc, vc
        valid = torch.zeros(batch, capacity, dtype=torch.bool, device=dev)
        if self.valid is not None:
            valid[:, :self.pos] = self.valid[:, :self.pos]
        self.valid = valid
        freqs = torch.outer(torch.arange(capacity, device=dev, dtype=torch.float32), self.inv_freq.to(dev))
        emb = torch.cat((freqs, freqs), -1)
        self.cos = (emb.cos() * self.rope_scale).to(dt)
        self.sin = (emb.sin() * self.rope_scale).to(dt)

    def _forward(self, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Run positions ``pos .. pos + L - 1`` (``ids [B, L]``, key validity ``valid [B, L]``); the last
        position's logits ``[B, V]`` (fp32)."""
        b, n = ids.shape
        p0, p1 = self.pos, self.pos + n
        if p1 > self.capacity:
            self._allocate(b, max(p1 + self.reserve, 2 * self.capacity))
        self.valid[:, p0:p1] = valid
        cos, sin = self.cos[p0:p1], self.sin[p0:p1]  # [L, D], broadcast over [B, H, L, D]
        keys = self.valid[:, None, None, :p1]  # [B, 1, 1, T]
        if n == 1:
            mask = keys
        else:  # causal over valid keys; a padding query sees itself only (no all-masked row, no NaN in the cache)
            ar = torch.arange(n, device=ids.device)
            diag = torch.zeros(n, p1, dtype=torch.bool, device=ids.device)
            diag[ar, p0 + ar] = True
            mask = (keys & torch.ones(n, p1, dtype=torch.bool, device=ids.device).tril(p0)) | diag
        h, hk, d = self.heads, self.kv_heads, self.head_dim
        x = F.embedding(ids, self.embed)
        for layer in self.layers:
            a = rms_norm(x, layer.ln1, layer.eps1)
            q = rope(layer.q(a).view(b, n, h, d).transpose(1, 2), cos, sin)
            layer.kc[:, :, p0:p1] = rope(layer.k(a).view(b, n, hk, d).transpose(1, 2), cos, sin)
            layer.vc[:, :, p0:p1] = layer.v(a).view(b, n, hk, d).transpose(1, 2)
            o = F.scaled_dot_product_attention(q, layer.kc[:, :, :p1], layer.vc[:, :, :p1], attn_mask=mask,
                                               scale=layer.scale, enable_gqa=h != hk)
            x = x + layer.o(o.transpose(1, 2).reshape(b, n, h * d))
            a = rms_norm(x, layer.ln2, layer.eps2)
            x = x + layer.down(F.silu(layer.gate(a)).mul_(layer.up(a)))
        self.pos = p1
        return self.lm_head(rms_norm(x[:, -1:], self.norm, self.norm_eps))[:, -1].float()

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        self.reset()
        ids, mask = prompt_on(self.device, input_ids, attention_mask)
        self._allocate(ids.shape[0], ids.shape[1] + self.reserve)
        with torch.inference_mode():
            return self._forward(ids, mask.bool())

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.valid is None:
            raise GenerationError("call prefill(prompt) before step()")
        ids = tokens_on(self.device, tokens)
        with torch.inference_mode(), _small_ops_on_one_thread(self.own_threads and self.device.type == "cpu"):
            return self._forward(ids, torch.ones_like(ids, dtype=torch.bool))

    def kv_cache_bytes(self) -> int:
        """Bytes of the cached keys and values of the positions seen (grows per token)."""
        return self.allocated_bytes() * self.pos // max(self.capacity, 1)

    def allocated_bytes(self) -> int:
        """Bytes of the preallocated caches (every position of the capacity)."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in (layer.kc, layer.vc) if t is not None)
