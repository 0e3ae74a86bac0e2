"""The three MOHAWK stages of ``distill_ssm`` (Bick et al., 2024, arXiv 2408.10189), on the hooks of
:mod:`lowc.passes.distill.hooks`.

* **Stage 1, matrix orientation** (per layer, teacher-forced): the student's token-mixing matrix
  ``T = (C·Bᵀ) ⊙ exp(segsum(a))`` (``lowc.ir.dialect.ssd.ssd_matrix``, after the C/B convolutions)
  is fitted to the teacher's softmax attention matrix; loss: the Frobenius norm ``‖T − A‖_F`` per head,
  averaged over heads and samples. Inputs: the teacher's block inputs; trained: the q/k projections
  (weights and biases, which produce C and B), the decay (``W_dt``, ``b_dt``, ``A_log``) and the C/B
  convolutions.
* **Stage 2, hidden-state alignment** (per block, teacher-forced): the student block's outputs on the
  teacher's block inputs are fitted to the teacher block's outputs (mean squared error). Trained:
  every student parameter of the block's distilled layers (q/k/v/o projections, decay, D, convolutions).
* **Stage 3, end-to-end distillation**: KL(teacher ‖ student) of the next-token distributions over the
  calibration samples, every student of the model jointly; trained: the same parameters for every
  distilled layer (the rest of the model, MLPs and norms included, stays frozen).

Each stage: AdamW (no weight decay), one sample per step, ``epochs`` passes in a seeded random order,
gradient norm clipped at 1; the stage's loss is measured on the samples before and after (stage 3 on
at most :data:`STATS_SAMPLES` of them). Parameters are trained as fp32 copies and written back into
the program with their dtype (``Program.replace_attr``; the teacher, a shallow copy, keeps the old
tensors). Projections a pass before already compressed (not float linears) are not trained.
"""

from __future__ import annotations

from typing import Callable

import torch

from lowc.errors import PassError
from lowc.frontend.outputs import main_tensor
from lowc.ir.analysis import is_float_linear
from lowc.ir.dialect import ensure_registered
from lowc.ir.dialect.ssd import ssd_matrix
from lowc.ir.dialect.ssd_chunked import causal_conv
from lowc.passes.blockwise import calibration_inputs
from lowc.passes.distill.hooks import BlockCapture, Replay, StudentBlock
from lowc.passes.distill.ssm import MATRIX_PARAMS, PREFIX
from lowc.passes.linearize.rewrite import Site
from lowc.passes.quant.blocktrain import mse

STATS_SAMPLES = 16
CLIP = 1.0


def projection_attrs(program, linears: dict[str, str], which: tuple[str, ...]) -> list[str]:
    """Attribute targets (weight, bias) of the float projections ``which`` (of q/k/v/o) of one layer."""
    by_name = {n.name: n for n in program.graph.nodes}
    out: list[str] = []
    for role in which:
        n = by_name.get(linears.get(role, ""))
        if n is None or not is_float_linear(n):
            continue
        for a in n.args[1:3]:
            if isinstance(a, torch.fx.Node) and a.op == "get_attr" and a.target not in out:
                out.append(a.target)
    return out


def student_attrs(program, site: Site, linears: dict[str, str], matrix_only: bool) -> list[str]:
    """What a stage trains for ``site`` (module docstring)."""
    proj = projection_attrs(program, linears, ("q", "k") if matrix_only else ("q", "k", "v", "o"))
    own = [f"{site.layer}.{PREFIX}{n}" for n in (MATRIX_PARAMS if matrix_only else
                                                 (*MATRIX_PARAMS, "D", "conv_x"))]
    return proj + [t for t in own if _has(program, t)]


def _has(program, target: str) -> bool:
    try:
        program.attr(target)
    except AttributeError:
        return False
    return True


def leaves(program, targets: list[str], device) -> dict[str, torch.Tensor]:
    return {t: program.attr(t).detach().to(device=device, dtype=torch.float32).clone().requires_grad_(True)
            for t in targets}


def write_back(program, params: dict[str, torch.Tensor]) -> None:
    for t, p in params.items():
        old = program.attr(t)
        program.replace_attr(t, p.detach().to(device=old.device, dtype=old.dtype))


def fit(params: dict[str, torch.Tensor], loss_of: Callable[[int], torch.Tensor], n: int, *, epochs: int, lr: float,
        seed: int, where: str, stats_n: int | None = None,
        on_step: Callable[[float], None] | None = None) -> tuple[float, float]:
    """Train ``params`` on ``loss_of(sample index)``; returns the mean loss before and after."""
    def evaluate() -> float:
        m = n if stats_n is None else min(n, stats_n)
        with torch.no_grad():
            return sum(float(loss_of(i)) for i in range(m)) / m

    before = evaluate()
    if epochs == 0:
        return before, before
    opt = torch.optim.AdamW(list(params.values()), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for i in torch.randperm(n, generator=g).tolist():
            loss = loss_of(i)
            if not torch.isfinite(loss):
                raise PassError(f"pass 'distill_ssm': {where}: the loss became {loss.item()} (try a lower lr)")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(params.values()), CLIP)
            opt.step()
            if on_step is not None:
                on_step(loss.item())
    return before, evaluate()


def _conv(u: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """The op's short causal convolution of ``u [B, C1, L, C2]`` (identity when the mixer has none)."""
    return u.float() if w is None else causal_conv(u.float(), w)[0]


def stage1(program, cap: BlockCapture, site: Site, linears: dict[str, str], ssd_node: torch.fx.Node, *,
           epochs: int, lr: float, device, seed: int, on_step=None) -> dict:
    """Matrix orientation for one layer (module docstring); returns its stats."""
    ensure_registered()
    params = leaves(program, student_attrs(program, site, linears, matrix_only=True), device)
    c_in, b_in, a_in = (ssd_node.args[i] for i in (0, 1, 3))
    replay = StudentBlock(program, cap.index, params, outputs=[c_in.name, b_in.name, a_in.name], device=device)
    conv_c, conv_b = params.get(f"{site.layer}.{PREFIX}conv_c"), params.get(f"{site.layer}.{PREFIX}conv_b")
    teacher = cap.sites[site.layer]

    def loss_of(i: int) -> torch.Tensor:
        c, b, a = replay(cap, i)
        t = ssd_matrix(_conv(c, conv_c), _conv(b, conv_b), a.float())
        target = teacher.attention(i, device)
        return torch.linalg.matrix_norm(t - target).mean()

    before, after = fit(params, loss_of, len(cap), epochs=epochs, lr=lr, seed=seed, where=f"stage 1, {site.layer}",
                        on_step=on_step)
    write_back(program, params)
    return {"layer": site.layer, "stage1_before": before, "stage1_after": after}


def stage2(program, cap: BlockCapture, sites: list[Site], linears: dict[str, dict[str, str]], *, epochs: int,
           lr: float, device, seed: int, on_step=None) -> dict:
    """Hidden-state alignment for one block (module docstring); returns its stats."""
    targets: list[str] = []
    for s in sites:
        targets += [t for t in student_attrs(program, s, linears[s.layer], matrix_only=False) if t not in targets]
    params = leaves(program, targets, device)
    replay = StudentBlock(program, cap.index, params, outputs=cap.output_names, device=device)

    def loss_of(i: int) -> torch.Tensor:
        return mse(replay(cap, i), tuple(t.to(device) for t in cap.outputs[i]))

    before, after = fit(params, loss_of, len(cap), epochs=epochs, lr=lr, seed=seed, where=f"stage 2, block {cap.index}",
                        on_step=on_step)
    write_back(program, params)
    return {"block": cap.index, "stage2_before": before, "stage2_after": after}


def stage3(program, teacher, sites: list[Site], linears: dict[str, dict[str, str]], calib, *, epochs: int, lr: float,
           device, seed: int, on_step=None) -> dict:
    """End-to-end distillation of every student jointly (module docstring); returns its stats."""
    if program.info.kind != "causal-lm":
        raise PassError(f"pass 'distill_ssm': stage 3 distils next-token logits; this program is a {program.info.kind!r} model")
    targets: list[str] = []
    for s in sites:
        targets += [t for t in student_attrs(program, s, linears[s.layer], matrix_only=False) if t not in targets]
    params = leaves(program, targets, device)
    replay, tgm = Replay(program.gm, params), teacher.gm
    samples = list(calib.samples)

    def loss_of(i: int) -> torch.Tensor:
        x = [t.to(device) for t in calibration_inputs(program, samples[i])]
        out = torch.log_softmax(main_tensor(replay.run(*x)).float(), -1)
        with torch.no_grad():
            ref = torch.log_softmax(main_tensor(tgm(*x)).float(), -1)
        return (ref.exp() * (ref - out)).sum(-1).mean()

    before, after = fit(params, loss_of, len(samples), epochs=epochs, lr=lr, seed=seed, where="stage 3",
                        stats_n=STATS_SAMPLES, on_step=on_step)
    write_back(program, params)
    return {"stage3_before": before, "stage3_after": after}
