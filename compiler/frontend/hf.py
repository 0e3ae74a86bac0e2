"""Loading Hugging Face model directories (config.json + safetensors, tokenizer if present)."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re

import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub import snapshot_download
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from lowc.errors import ModelLoadError


def fingerprint_dir(path: str) -> str:
    """sha256 over config.json and each safetensors file's header and size (the tensor table:
    names, dtypes, shapes, offsets) - identifies the checkpoint without reading gigabytes."""
    h = hashlib.sha256()
    with open(os.path.join(path, "config.json"), "rb") as f:
        h.update(f.read())
    for fn in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        with open(fn, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            h.update(os.path.basename(fn).encode())
            h.update(f.read(min(n, 100_000_000)))
        h.update(str(os.path.getsize(fn)).encode())
    return h.hexdigest()


def fingerprint_module(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()[:1 << 20])
    return h.hexdigest()


#: ``org/name``: a Hugging Face Hub model id (one slash, no path syntax)
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def is_hub_id(name: str) -> bool:
    """Whether ``name`` is not a local path and reads as a Hub model id ``org/name``."""
    return bool(HUB_ID.fullmatch(name)) and ".." not in name and not os.path.lexists(name)


def resolve_hub_id(repo_id: str) -> str:
    """The local snapshot directory of Hub model ``repo_id`` in the Hugging Face cache (offline: nothing
    is downloaded); ModelLoadError when it is not cached."""
    cache = os.environ.get("HF_HUB_CACHE") or hub_constants.HF_HUB_CACHE  # read now: tests and tools set it late
    try:
        return snapshot_download(repo_id, cache_dir=cache, local_files_only=True)
    except (OSError, ValueError):  # not cached (LocalEntryNotFoundError), or not a valid id (HFValidationError)
        raise ModelLoadError(f"model {repo_id!r} is neither a local directory nor in the Hugging Face cache "
                             f"({cache}; HF_HOME={os.environ.get('HF_HOME', 'unset')}): download it first, e.g. "
                             f"`hf download {repo_id}`") from None


def is_hf_dir(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))


def load_hf_dir(path: str, dtype: torch.dtype = torch.float32):
    """(model, tokenizer or None, kind) from a local HF directory; errors name the file at fault."""
    if not os.path.exists(path):
        raise ModelLoadError(f"model path {path!r} does not exist")
    if not os.path.isdir(path):
        raise ModelLoadError(f"model path {path!r} is not a directory (expected a Hugging Face model folder)")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise ModelLoadError(f"{path!r} has no config.json: not a Hugging Face model directory")
    try:
        with open(cfg_path) as f:
            json.load(f)
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{cfg_path}: invalid JSON ({e})") from None
    weights = glob.glob(os.path.join(path, "*.safetensors")) + glob.glob(os.path.join(path, "pytorch_model*.bin"))
    if not weights:
        raise ModelLoadError(f"{path!r} has no weights (*.safetensors)")

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception as e:
        raise ModelLoadError(f"{cfg_path}: {str(e).splitlines()[0]}") from None
    archs = getattr(config, "architectures", None) or []
    kind = "causal-lm" if any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs) else "encoder"
    if getattr(config, "is_decoder", False) and kind == "encoder" and not archs:
        kind = "causal-lm"
    cls = AutoModelForCausalLM if kind == "causal-lm" else AutoModel
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # a per-tensor bar for small local loads is noise
    try:
        model = cls.from_pretrained(path, local_files_only=True, dtype=dtype, trust_remote_code=False)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"{path}: cannot load weights: {msg}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    tokenizer = None
    tok_files = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model")
    if any(os.path.isfile(os.path.join(path, f)) for f in tok_files):

        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        except Exception as e:
            raise ModelLoadError(f"{path}: cannot load tokenizer: {str(e).splitlines()[0]}") from None
    return model.eval(), tokenizer, kind
