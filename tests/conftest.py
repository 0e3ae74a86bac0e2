"""Shared fixtures and helpers: small Llama-style Hugging Face directories that no other test data
depends on, the wikitext-2 files (shipped in the package, :mod:`lowc.data`), a seeded Llama with real-text calibration and evaluation tokens
(``wt2_llama``), running a target's pipeline with other method passes, logits SQNR, a two-linear
model quantized per layer, and the installed ``lowc`` command."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any, NamedTuple

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

#: under pytest-xdist (the README's ``-n auto``: one worker per core) each worker and every process it
#: starts computes on one thread, so the workers do not oversubscribe the cores
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if XDIST_WORKER:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

from lowc import data  # noqa: E402  (the texts lowc ships: the tests need nothing outside the repository)

VALID, TEST = data.wikitext2("valid"), data.wikitext2("test")
#: ``lowc.compile`` keywords: 4 calibration samples of 64 tokens from wikitext-2 valid
CALIB = dict(calib=VALID, calib_samples=4, seq_len=64, progress=False)


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


@pytest.fixture(scope="session", autouse=True)
def private_kernel_cache(tmp_path_factory):
    """Kernels (CPU-LUT libraries, Triton autotune results) built by the tests go to a cache of this
    session (of this xdist worker), never to the user's ``~/.cache/lowc``, and no two test processes
    share one; tests that need a cache of their own still set ``LOWC_CACHE_DIR`` themselves."""
    old = os.environ.get("LOWC_CACHE_DIR")
    os.environ["LOWC_CACHE_DIR"] = str(tmp_path_factory.mktemp("lowc-cache"))
    yield
    if old is None:
        os.environ.pop("LOWC_CACHE_DIR", None)
    else:
        os.environ["LOWC_CACHE_DIR"] = old


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


# ---- quality on real text ----------------------------------------------------------------------------
def sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of ``out`` against ``ref``, in dB."""
    return float(10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean()))


def logits(prog, ids):
    with torch.no_grad():
        return prog.call(ids).logits


def run_target(prog, target: str, spellings, calib):
    """The target's pipeline (method passes replaced by ``spellings``) on a copy of ``prog``."""
    from lowc.backends.registry import get_target
    from lowc.backends.target import CompileOptions
    from lowc.passes.base import PassContext
    from lowc.passes.options import parse_pass
    from lowc.passes.pipeline import Pipeline

    tgt = get_target(target)
    p = prog.clone()
    phases = tgt.phases(CompileOptions(user_passes=tuple(parse_pass(x) for x in spellings), has_calib=calib is not None))
    ctx = PassContext(target=tgt, scheme=tgt.scheme, calib=calib, progress=False)
    Pipeline([(ph.name, x) for ph in phases for x in ph.passes]).run(p, ctx)
    return p, ctx


def minilm_w8a8(spelling: str):
    """The real MiniLM compiled for ``ref-w8a8`` with the method pass ``spelling`` (2 x 32 calibration
    tokens), checked against the float model: cosine > 0.98 on 16 wikitext-2 test sentences."""
    import lowc
    from lowc import evaluate as ev

    with open(TEST, encoding="utf-8") as fh:
        sentences = [l.strip() for l in fh if len(l.split()) >= 8][:16]
    f = lowc.compile("minilm", target="ref-fp32")
    batches = ev.text_batches(f.tokenizer, sentences)
    cm = lowc.compile("minilm", target="ref-w8a8", passes=[spelling], calib=VALID, calib_samples=2, seq_len=32,
                      progress=False)
    assert ev.compare(f, cm, batches, "encoder").cosine > 0.98  # W8A8
    return cm


class TextLlama(NamedTuple):
    """A seeded Llama (HF directory ``dir``, traced ``program``), 2 x 128 wikitext-2 test tokens
    ``ids``, the float logits ``ref`` on them and 4 x 64-token calibration samples from valid."""

    dir: str
    program: Any
    ids: torch.Tensor
    ref: torch.Tensor
    calib: Any

    def run(self, target: str, spelling: str, calib: bool = True):
        """:func:`run_target` with one method pass, calibrated unless ``calib=False``."""
        return run_target(self.program, target, [spelling], self.calib if calib else None)

    def sqnr(self, prog) -> float:
        """SQNR (dB) of ``prog``'s logits on ``ids`` against the float model's."""
        return sqnr(self.ref, logits(prog, self.ids))


@pytest.fixture(scope="module")
def wt2_llama(tmp_path_factory) -> TextLlama:
    """hidden 128, intermediate 352 (not a multiple of 128), 2 layers, 4 query heads on 2 KV heads."""
    import lowc
    from lowc.frontend.presets import byte_tokenizer
    from lowc.passes.calibration import load_calibration

    d = make_llama_dir(tmp_path_factory.mktemp("wt2-llama"), seed=3, hidden_size=128, intermediate_size=352,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    prog = lowc.trace(d)
    tok = byte_tokenizer()
    with open(TEST, encoding="utf-8") as fh:
        ids = torch.tensor(tok(fh.read()[:4000])["input_ids"][:256]).reshape(2, 128)
    calib = load_calibration(VALID, tok, n_samples=4, seq_len=64)
    return TextLlama(d, prog, ids, logits(prog, ids), calib)


# ---- per-pass checks ----------------------------------------------------------------------------------
def check_idempotent_and_deterministic(prog, p, target: str, seed: int, names) -> None:
    """With 2 random calibration samples on ``target``: ``p`` changes ``prog``, a second run reports
    ``changed=False``, and a run on a copy with the same seed gives the same tensors ``names``."""
    from lowc.backends.registry import get_target
    from lowc.passes.base import PassContext
    from lowc.passes.calibration import load_calibration
    from lowc.passes.pipeline import run_passes

    tgt = get_target(target)
    calib = load_calibration([torch.randint(0, 259, (1, 32), generator=torch.Generator().manual_seed(i)) for i in range(2)])
    ctx = PassContext(target=tgt, scheme=tgt.scheme, calib=calib, progress=False, seed=seed)
    p2 = prog.clone()
    assert run_passes(prog, [p], ctx)[0].result.changed
    assert run_passes(prog, [p], ctx)[0].result.changed is False
    run_passes(p2, [p], PassContext(target=tgt, scheme=tgt.scheme, calib=calib, progress=False, seed=seed))
    for name in names:
        assert torch.equal(prog.attr(name), p2.attr(name))


def check_options_round_trip(p, bad: dict[str, str]) -> None:
    """``p`` survives JSON and its spelling, the bare name parses to the defaults, and each spelling
    of ``bad`` raises PassOptionError matching its message."""
    from lowc.errors import PassOptionError
    from lowc.passes.options import from_json, parse_pass

    assert from_json(p.to_json()) == p
    assert parse_pass(p.spelling()) == p
    assert parse_pass(p.name) == type(p)()
    for spelling, msg in bad.items():
        with pytest.raises(PassOptionError, match=msg):
            parse_pass(spelling)


def check_needs_finite_calibration(p, target: str, poison: float) -> None:
    """``p`` (which trains on calibration data) refuses to run without it, through ``lowc.compile``
    and directly, and names itself when ``poison`` in an embedding row reaches the activations."""
    import lowc
    from lowc.errors import CalibrationError, PassError
    from lowc.frontend.presets import tiny_llama
    from lowc.passes.base import PassContext
    from lowc.passes.calibration import load_calibration
    from lowc.passes.pipeline import run_passes

    m, _ = tiny_llama(num_hidden_layers=1, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(CalibrationError, match=f"pass '{p.name}' needs calibration data"):
        lowc.compile(m, target=target, passes=[p.name])
    with torch.no_grad():
        m.model.embed_tokens.weight[7] = poison
    prog = lowc.trace(m)
    with pytest.raises(CalibrationError, match=f"pass '{p.name}' needs calibration data"):
        type(p)().run(prog, PassContext())
    calib = load_calibration([torch.tensor([[1, 7, 9, 11]])])
    with pytest.raises((CalibrationError, PassError), match=f"{p.name}.*non-finite"):
        run_passes(prog, [p], PassContext(calib=calib, progress=False))


# ---- a two-linear model quantized per layer (the backends' lowering passes) ----------------------------
class TwoLinears(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(72, 50)
        self.b = torch.nn.Linear(50, 33, bias=False)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def two_linears_program(bits: tuple[int, int], group_size: int, symmetric: tuple[bool, bool]):
    """:class:`TwoLinears` (seed 0) traced, its linears ``a`` and ``b`` RTN-quantized into
    ``lowc::linear_wq`` with their own bits and symmetry."""
    from lowc.ir.capture import trace
    from lowc.ir.dialect import quant
    from lowc.ir.scheme import Scheme
    from lowc.passes.quant.common import linear_weight, rewrite_linear

    torch.manual_seed(0)
    prog = trace(TwoLinears(), (torch.randn(3, 72),))
    for node, b, sym in zip(prog.linears(), bits, symmetric):
        qw = quant.rtn_quantize(linear_weight(prog, node), b, group_size, sym)
        rewrite_linear(prog, node, qw, Scheme(b, group_size, sym), "rtn")
    prog.remove_dead()
    return prog


def fold_trained_float(prog, p, target: str, calib) -> list[float]:
    """The learned-transform pass ``p`` (affinequant/flatquant) trained block by block on ``prog``
    with every trained transform folded in and *no* weight quantized: the public steps of
    :func:`lowc.passes.quant.learned.run_blockwise`, with a quantizer that keeps every float weight.
    Float propagation (the folded program is the float model). Returns each block's final loss."""
    import importlib

    from lowc.backends.registry import get_target
    from lowc.ir.analysis import block_groups
    from lowc.passes.base import PassContext
    from lowc.passes.blockwise import BlockwiseRunner
    from lowc.passes.quant.blocktrain import input_absmax, patch_linears, train_block
    from lowc.passes.quant.learned import apply_plan

    tgt = get_target(target)
    setup = p.setup(PassContext(target=tgt, scheme=tgt.scheme, calib=calib, progress=False))
    make_plan = importlib.import_module(f"lowc.passes.quant.{p.name}").make_plan
    targets = {n.name for n in p.select(prog)}
    losses = []
    for block in BlockwiseRunner(prog, calib, progress=False, propagate="float"):
        groups = block_groups(prog, block.index)
        fm = block.module()
        amax = input_absmax(fm, [g.linears[0].name for g in groups], block.inputs, "cpu", p.name)
        plan = make_plan(setup, prog, block.index, groups, amax, targets)
        patch_linears(fm, plan.modules)
        info = train_block(fm, plan.param_groups, block.inputs, block.float_outputs, epochs=p.epochs,
                           batch_size=p.batch_size, device="cpu", refresh=plan.refresh, on_epoch=plan.on_epoch)
        assert apply_plan(prog, plan, lambda node, mod, w: None) == []  # nothing quantized
        losses.append(info["loss"])
    prog.remove_dead()
    return losses


def make_sparse(program, sparsity: float = 0.5, sparse_group: int = 16, group_size: int | None = None,
                layers: tuple[str, ...] | None = None, seed: int = 0) -> int:
    """Turn ``lowc::linear_wq`` layers of ``program`` (all, or those named in ``layers``) into group-sparse
    ``lowc::linear_gsq`` layers, as a GQSA pass would: a seeded random choice of kept sparse groups per
    row (same count per row), the layer's dequantized weight RTN-quantized over the kept groups with
    its bits and symmetry (``group_size``: the quantization group over the compact row, default
    ``sparse_group``). The node's scheme says the sparsity. Returns how many layers changed."""
    from dataclasses import replace

    from lowc.ir import meta as nodemeta
    from lowc.ir.dialect import ensure_registered, quant, sparse
    from lowc.ir.dialect.args import LinearQArgs

    ensure_registered()
    gen = torch.Generator().manual_seed(seed)
    changed = 0
    for node in list(program.nodes(torch.ops.lowc.linear_wq.default)):
        info = nodemeta.get(node)
        if layers is not None and info.layer not in layers:
            continue
        a = LinearQArgs.of(node)
        zeros = program.attr(a.zeros.target) if a.zeros is not None else None
        w = quant.dequantize(program.attr(a.weight.target), program.attr(a.scales.target), zeros, a.bits,
                             a.group_size, a.in_features)
        n, k = w.shape
        n_groups = sparse.padded_sparse_width(k, sparse_group) // sparse_group
        keep = sparse.kept_groups(k, sparse_group, sparsity)
        idx = torch.stack([torch.randperm(n_groups, generator=gen)[:keep].sort().values for _ in range(n)])
        sq = sparse.rtn_quantize_sparse(w, idx.to(torch.int16), a.bits, group_size or sparse_group, sparse_group,
                                        zeros is None)
        module_path = a.weight.target.rpartition(".")[0]
        q_n, s_n, z_n, i_n = program.add_operand_buffers(module_path, node, {
            "gsq_qweight": sq.qweight, "gsq_scales": sq.scales, "gsq_zeros": sq.zeros, "gsq_idx": sq.idx})
        with program.graph.inserting_before(node):
            new = program.graph.call_function(torch.ops.lowc.linear_gsq.default, (
                a.x, q_n, s_n, z_n, a.bias, a.bits, sq.group_size, k, i_n, sparse_group))
        new.meta = dict(node.meta)
        nodemeta.set_info(new, replace(info, scheme=replace(info.scheme, group_size=group_size or sparse_group,
                                                            sparsity=1 - keep / n_groups,
                                                            sparse_group=sparse_group)))
        node.replace_all_uses_with(new)
        program.graph.erase_node(node)
        changed += 1
    program.remove_dead()
    return changed


@pytest.fixture(scope="module")
def isolated_autotune(tmp_path_factory):
    """Heuristic Triton configs and a private autotune cache for a test module (on a GPU, timing every
    candidate of every small test shape would dominate the run)."""
    from lowc.backends.triton import autotune

    old = {k: os.environ.get(k) for k in ("LOWC_TRITON_AUTOTUNE", "LOWC_CACHE_DIR")}
    os.environ["LOWC_TRITON_AUTOTUNE"] = "0"
    os.environ["LOWC_CACHE_DIR"] = str(tmp_path_factory.mktemp("tr-cache"))
    autotune.clear_memory()
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    autotune.clear_memory()


def triton_interpreter_broken() -> str | None:
    """Why triton's interpreter cannot run our kernels in this environment, or None. Triton 3.6's
    interpreter turns 1-element arrays into loop bounds with ``int()``, which numpy >= 2.4 refuses
    ("only 0-dimensional arrays can be converted to Python scalars"); the GPU machine has that pair
    (triton 3.6, numpy 2.5), where the same kernels are tested compiled on CUDA instead."""
    import importlib.metadata as md

    try:
        tv, nv = md.version("triton"), md.version("numpy")
    except md.PackageNotFoundError:
        return None
    t = tuple(int(x) for x in tv.split(".")[:2] if x.isdigit())
    n = tuple(int(x) for x in nv.split(".")[:2] if x.isdigit())
    if t == (3, 6) and n >= (2, 4):
        return f"triton {tv}'s interpreter fails with numpy {nv} (>= 2.4) on loop bounds"
    return None

