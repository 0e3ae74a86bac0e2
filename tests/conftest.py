"""Shared fixtures: small Llama-style Hugging Face directories that no other test data depends on."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def make_llama_dir(path, seed: int = 0, **cfg) -> str:
    """Save a seeded Llama (transformers) with the byte-level tokenizer as an HF directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lowc.frontend.presets import byte_tokenizer

    config = LlamaConfig(**{"vocab_size": 259, "max_position_embeddings": 512, "tie_word_embeddings": False,
                            "bos_token_id": 256, "eos_token_id": 257, **cfg})
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    # give weights some structure beyond the tiny 0.02 init so quantization error is realistic
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.mul_(torch.exp(torch.randn(p.shape[1]) * 0.5))
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def odd_llama_dir(tmp_path_factory) -> str:
    """hidden 96, intermediate 200 (not a multiple of 128), 3 query heads sharing 1 KV head."""
    return make_llama_dir(tmp_path_factory.mktemp("odd-llama"), seed=1, hidden_size=96, intermediate_size=200,
                          num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=1)


def lowc_exe() -> str:
    exe = os.path.join(os.path.dirname(sys.executable), "lowc")
    if not os.path.exists(exe):
        pytest.fail(f"the lowc entry point is not installed next to {sys.executable}")
    return exe


def run_lowc(*args, cwd=None, timeout=600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([lowc_exe(), *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=timeout, env=env)
