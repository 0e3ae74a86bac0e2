"""The ``lowc`` command line (click).

Errors are one line naming the thing at fault, printed without a traceback (``--debug`` anywhere on
the command line, or LOWC_DEBUG=1, shows it), with a non-zero exit: 2 for a user error (LowcError,
bad usage), 3 for an internal error.
"""

from __future__ import annotations

import json
import os
import sys

import click


def _fmt_mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def _scheme_label(row: dict) -> str:
    """``rtn W4A16 g128 asym`` for a layer row of the manifest, ``float`` for a float layer; a pruned
    layer adds ``50% sparse (2:4, sparsegpt)``."""
    from lowc.ir.scheme import Scheme

    from lowc.ir.meta import NodeInfo, pruned

    label = f"{row.get('method') or '?'} {Scheme.from_json(row['scheme']).label}" if row.get("scheme") else "float"
    p = pruned(NodeInfo(transforms=tuple(row.get("transforms", ()))))
    return label + (f" {p[2]:.0%} sparse ({p[1]}, {p[0]})" if p else "")


EXPORT_FORMATS = ("onnx", "compressed-tensors", "gguf")  # lowc.export.FORMATS (not imported: torch)
AGAINST_HELP = ("float model to compare with; default: the artifact's source when it is a preset or an HF "
                "directory that has not changed (a factory is never imported from an artifact: name it here)")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="lowc", prog_name="lowc")
def cli() -> None:
    """lowc: trace a PyTorch model, compress it with passes from the papers, lower it to kernels.

    Add --debug anywhere to see tracebacks.
    """


def _compile_help() -> str:
    from lowc.frontend.presets import PRESETS

    w = max(map(len, PRESETS))
    rows = "\n".join(f"  {name:<{w}}  {desc}" for name, desc in PRESETS.items())
    return ("Compile MODEL for TARGET into the artifact directory OUTPUT.\n\n"
            "MODEL is a Hugging Face model directory, a Hub id (org/name) found in the local Hugging Face cache, "
            "package.module:factory, or a preset (`lowc presets`):\n\n"
            f"\b\n{rows}")


@cli.command(help=_compile_help())
@click.argument("model")
@click.option("--target", "-t", required=True, help="compilation target (see `lowc targets`)")
@click.option("--output", "-o", "output", required=True, type=click.Path(), help="artifact directory to write")
@click.option("--calib", metavar="TEXT", default=None,
              help="calibration text: a file, or a built-in text (wikitext-2-valid; see `lowc data`)")
@click.option("--calib-samples", type=click.IntRange(min=1), default=128, show_default=True, help="calibration sequences")
@click.option("--seq-len", type=click.IntRange(min=1), default=512, show_default=True, help="tokens per calibration sequence")
@click.option("--pass", "passes", multiple=True, metavar="'name{k=v,...}'", help="method pass replacing the target's default (repeatable)")
@click.option("--recipe", type=click.Path(), default=None,
              help="YAML/JSON file: a list of passes, or a per-layer bits recipe written by `lowc search`")
@click.option("--device", default="cpu", show_default=True, help="device to trace and calibrate on (cpu, cuda, cuda:1)")
@click.option("--dtype", default="auto", show_default=True, help="float32, float16, bfloat16, or auto (fp32 on CPU, fp16 on CUDA)")
@click.option("--seed", type=int, default=0, show_default=True, help="seed for calibration sampling and passes")
@click.option("--force", is_flag=True, help="replace an existing output directory (only a previous lowc artifact or an empty directory)")
@click.option("--allow-nonfinite", is_flag=True, help="compile even if the source weights hold NaN or inf")
@click.option("--print-after", "print_after", multiple=True, metavar="PASS", help="print the IR after this pass (repeatable)")
@click.option("--no-verify", is_flag=True, help="skip IR verification between passes")
@click.option("--quiet", "-q", is_flag=True, help="no progress output")
def compile(model, target, output, calib, calib_samples, seq_len, passes, recipe, device, dtype, seed, force,
            allow_nonfinite, print_after, no_verify, quiet):
    from lowc import api, data
    from lowc.artifact import check_output
    from lowc.backends.registry import get_target, load_recipe, parse_pass
    from lowc.errors import ArtifactError, CalibrationError
    from lowc.frontend.trace import resolve_device
    from lowc.progress import reporting, step, to_stderr

    get_target(target)  # fail fast on an unknown target, before loading anything
    resolve_device(device)
    user = [parse_pass(p) for p in passes] if passes else None
    if recipe:
        user = (user or []) + load_recipe(recipe)
    if os.path.lexists(output) and not force:
        raise ArtifactError(f"output {output} already exists (use --force to replace it)")
    check_output(output, protect=[model] if os.path.exists(model) else [])
    if calib is not None:
        data.resolve(calib, "--calib", CalibrationError)
    # lowc.compile checks the passes' requirements (--calib) before it loads or traces the model,
    # and reports each step as it starts (loading, tracing, each pass) on stderr
    with reporting(None if quiet else to_stderr):
        cm = api.compile(model, target=target, calib=calib, passes=user, device=device, dtype=dtype, seed=seed,
                          calib_samples=calib_samples, seq_len=seq_len, print_after=print_after,
                          progress=not quiet, verify=not no_verify,
                          allow_nonfinite=allow_nonfinite)
        for line in cm.manifest.get("log", []):
            step(f"note: {line}")
        step(f"writing {output}" + (f" (the {cm.target.backend} backend writes its files into backend/)"
                                    if cm.target.emit is not None else ""))
        path = cm.save(output, force=force)
    check = cm.manifest.get("metrics", {}).get("check")
    size = cm.size()
    click.echo(f"wrote {path}")
    click.echo(f"size: {_fmt_mb(size['bytes'])} vs {_fmt_mb(size['float_bytes'])} float ({size['bytes'] / max(size['float_bytes'], 1):.3f}x)")
    if check:
        parts = [f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in check.items()]
        click.echo("output vs float on example inputs: " + ", ".join(parts))


@cli.command()
@click.argument("model")
@click.option("--target", "-t", required=True, help="the target the recipe will be compiled for (its kernels' bit widths bound the levels)")
@click.option("--budget", "-b", required=True, type=float, help="average stored bits per weight over the searched layers, scales and zeros included")
@click.option("--levels", default=None, metavar="2,3,4,5,6", help="bit widths to choose from (default: 2..6 within the target's range)")
@click.option("--method", type=click.Choice(["gptq", "rtn"]), default="gptq", show_default=True, help="how each level is quantized")
@click.option("--calib", metavar="TEXT", default="wikitext-2-valid", show_default=True,
              help="calibration text (GPTQ and the KL fitness): a file or a built-in text")
@click.option("--calib-samples", type=click.IntRange(min=1), default=32, show_default=True, help="calibration sequences")
@click.option("--seq-len", type=click.IntRange(min=1), default=512, show_default=True, help="tokens per calibration sequence")
@click.option("--generations", type=click.IntRange(min=0), default=50, show_default=True, help="EvoPress generations")
@click.option("--offspring", type=click.IntRange(min=1), default=16, show_default=True, help="offspring per generation (λ)")
@click.option("--schedule", default="4:512,2:2048,1:8192", show_default=True, metavar="S:T,...",
              help="multi-step selection: survivors:tokens per stage (the last stage's tokens are the fitness)")
@click.option("--seed", type=int, default=0, show_default=True, help="seed of the search and of calibration sampling")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="score offspring on N local Ray workers (lowc[distributed])")
@click.option("--ray", "ray_address", default=None, metavar="ADDRESS", help="score offspring on an existing Ray cluster")
@click.option("--resume", is_flag=True, help="continue from OUTPUT.checkpoint.json")
@click.option("--db", default=None, type=click.Path(),
              help="level database directory (default: $LOWC_CACHE_DIR/levels/<key>, else .lowc-levels/<key> beside OUTPUT)")
@click.option("--device", default="cpu", show_default=True, help="device to quantize and score on")
@click.option("--output", "-o", "output", required=True, type=click.Path(), help="recipe file to write (YAML)")
@click.option("--quiet", "-q", is_flag=True, help="no progress output")
def search(model, target, budget, levels, method, calib, calib_samples, seq_len, generations, offspring, schedule, seed,
           workers, ray_address, resume, db, output, device, quiet):
    """Search per-layer bit widths for MODEL (EvoPress) at an average BUDGET; write a recipe for
    `lowc compile MODEL --target T --recipe OUTPUT`."""
    from lowc.search_api import search as run_search

    lv = None if levels is None else [v.strip() for v in levels.split(",") if v.strip()]
    r = run_search(model, target, budget, levels=lv, method=method, calib=calib, generations=generations,
                   offspring=offspring, seed=seed, workers=workers, ray=ray_address, resume=resume, db=db, output=output,
                   schedule=schedule, calib_samples=calib_samples, seq_len=seq_len, device=device, progress=not quiet)
    u, dp = r.baselines["uniform"], r.baselines["dp"]
    click.echo(f"wrote {output}")
    click.echo(f"KL to float on {r.fitness['tokens']} tokens: evopress {r.fitness['evopress']:.5f} ({r.achieved_bits:.3f} bits), "
               f"uniform {u['bits']}-bit {u['fitness']:.5f} ({u['achieved_bits']:.3f} bits), "
               f"error-sum DP {dp['fitness']:.5f} ({dp['achieved_bits']:.3f} bits)")


@cli.command()
def targets():
    """List compilation targets."""
    from lowc.backends.registry import all_targets

    rows = list(all_targets().values())
    w = max(len(t.name) for t in rows)
    for t in rows:
        click.echo(f"{t.name:<{w}}  {t.backend:<10} {t.description}")


@cli.command()
def presets():
    """List the built-in models MODEL may name (`lowc compile PRESET ...`)."""
    from lowc.frontend.presets import PRESETS

    w = max(map(len, PRESETS))
    for name, desc in PRESETS.items():
        click.echo(f"{name:<{w}}  {desc}")


def _type_label(tp) -> str:
    import typing

    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (tuple, list):
        return f"list of {_type_label(args[0]) if args else 'str'}"
    if args and len(args) < len(typing.get_args(tp)):
        return _type_label(args[0])
    return getattr(tp, "__name__", str(tp))


@cli.command(name="passes")
def list_passes():
    """List passes with their options."""
    import dataclasses
    import typing

    from lowc.backends.registry import all_passes
    from lowc.passes.options import format_value

    for name, cls in all_passes().items():
        req = f"  [requires {', '.join(sorted(cls.requires))}]" if cls.requires else ""
        click.echo(f"{name}: {cls.summary}{req}")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = _type_label(hints[f.name])
            click.echo(f"    {f.name} ({tp}, default {format_value(f.default)}): {f.metadata.get('doc', '')}")


@cli.command()
@click.argument("artifact", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="print the manifest as JSON")
def inspect(artifact, as_json):
    """Show an artifact's manifest, per-layer table and size vs float."""
    from lowc.artifact import read_manifest
    from lowc.frontend.presets import random_weights_note

    m = read_manifest(artifact)
    if as_json:
        click.echo(json.dumps(m, indent=2))
        return
    src = m.get("source", {})
    click.echo(f"artifact:  {os.path.abspath(artifact)}")
    click.echo(f"target:    {m.get('target')} ({m.get('backend')})   lowc {m.get('lowc_version')}, torch {m.get('torch_version')}, {m.get('created')}")
    click.echo(f"source:    {src.get('type')} {src.get('name')}  sha256={str(src.get('sha256', '-'))[:16]}")
    note = random_weights_note(src)
    if note:
        click.echo(f"note:      {note}")
    click.echo(f"model:     {m.get('model', {}).get('kind')}  dtype={m.get('dtype')}")
    if m.get("calibration"):
        c = m["calibration"]
        click.echo(f"calib:     {c.get('samples')} x {c.get('seq_len')} tokens from {c.get('source')}")
    click.echo("passes:    " + (" -> ".join(f"{p['name']}" for p in m.get("passes", [])) or "-"))
    layers = m.get("layers", [])
    if any(r.get("scheme") for r in layers):  # a compressed model: say which linears were left in float
        kept = [r["layer"] or "?" for r in layers if not r.get("scheme")]
        click.echo(f"float:     {', '.join(kept) if kept else 'none'} ({len(kept)} of {len(layers)} linear layers "
                   f"left in float)")
    if layers:
        w = max(len(r["layer"]) for r in layers)
        labels = [_scheme_label(r) + (f" pad->{r['padded_in_features']}" if r.get("padded_in_features") else "")
                  for r in layers]
        sw = max(28, *map(len, labels))
        click.echo(f"\n{'layer':<{w}}  {'role':<7} {'shape (out x in)':<18} {'scheme':<{sw}} {'bpw':>6} {'bytes':>10} {'float':>10}")
        for r, label in zip(layers, labels):
            shape = f"{r['out_features']} x {r['in_features']}"
            bpw = f"{r['bits_per_weight']:.3f}" if r.get("bits_per_weight") else "-"
            click.echo(f"{r['layer']:<{w}}  {r['role'] or '-':<7} {shape:<18} {label:<{sw}} {bpw:>6} "
                       f"{r['bytes']:>10} {r['float_bytes']:>10}")
    size = m.get("size")
    if size:
        click.echo(f"\nsize: {_fmt_mb(size['bytes'])} vs {_fmt_mb(size['float_bytes'])} float ({size['bytes'] / max(size['float_bytes'], 1):.3f}x)")
    if m.get("metrics"):
        click.echo("metrics: " + json.dumps(m["metrics"]))


@cli.command(name="eval")
@click.argument("artifact", type=click.Path())
@click.option("--data", "text", metavar="TEXT", default=None,
              help="a text file or a built-in text (see `lowc data`): perplexity windows (causal LMs, default "
                   "wikitext-2-test) / sentences of five or more words (encoders, default: lowc's built-in sentences)")
@click.option("--against", default=None, help=AGAINST_HELP)
@click.option("--seq-len", type=click.IntRange(min=2), default=256, show_default=True, help="perplexity window")
@click.option("--max-windows", type=click.IntRange(min=1), default=64, show_default=True, help="perplexity windows at most")
@click.option("--max-sentences", type=click.IntRange(min=1), default=256, show_default=True, help="encoder sentences at most")
@click.option("--device", default="cpu", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print results as JSON")
def eval_cmd(artifact, text, against, seq_len, max_windows, max_sentences, device, as_json):
    """Quality of ARTIFACT vs the float model: perplexity, KL, top-1 (causal LMs); cosine (encoders)."""
    from lowc import api, data
    from lowc import evaluate as ev
    from lowc.errors import LowcError
    from lowc.frontend.presets import random_weights_note
    from lowc.progress import reporting, to_stderr

    if text is not None:
        data.resolve(text, "--data")
    cm = api.load(artifact, device=device)
    with reporting(to_stderr):
        ref_fn, ref_tok = ev.float_reference(cm.manifest, against, device)
    note = random_weights_note(cm.manifest.get("source"))
    tok = cm.tokenizer or ref_tok
    if tok is None:
        raise LowcError(f"{artifact}: the model has no tokenizer, so text evaluation is not possible")
    if text is None and cm.kind == "causal-lm":
        text = data.DEFAULT_EVAL_TEXT
    used = _text_label(text)
    click.echo(f"lowc: evaluating {cm.target.name} ({cm.kind}) on {used}", err=True)
    content = data.read(text, "--data") if text is not None else None
    result: dict = {"artifact": os.path.abspath(artifact), "target": cm.target.name, "kind": cm.kind,
                    "data": data.identify(text) if text is not None else "built-in sentences"}
    if cm.kind == "causal-lm":
        windows = ev.token_windows(tok, content, seq_len, max_windows)
        result["tokens"] = int(windows.numel())
        result["ppl_float"] = ev.perplexity(ref_fn, windows, device=device, progress=True)
        result["ppl"] = ev.perplexity(cm, windows, device=device, progress=True)
        batches = [{"input_ids": w.unsqueeze(0).to(device), "attention_mask": torch_ones(w, device)} for w in windows[:8]]
        result.update(ev.compare(ref_fn, cm, batches, "causal-lm").to_json())
    else:
        sentences = [l.strip() for l in content.splitlines() if len(l.split()) >= 5][:max_sentences] if content else ev.SENTENCES
        if not sentences:
            raise LowcError(f"--data {text}: no sentences of five or more words")
        batches = ev.text_batches(tok, sentences, device=device)
        result["sentences"] = len(sentences)
        result.update(ev.compare(ref_fn, cm, batches, cm.kind).to_json())
    size = cm.size()
    result["bytes"], result["float_bytes"] = size["bytes"], size["float_bytes"]
    if note:
        result["note"] = note
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    if note:
        click.echo(f"note: {note}", err=True)
    amount = f"{result['tokens']} tokens" if "tokens" in result else f"{result['sentences']} sentences"
    click.echo(f"{cm.target.name} vs float ({cm.kind}) on {used}, {amount}:")
    for k in ("ppl_float", "ppl", "kl", "top1", "cosine", "min_cosine", "sqnr_db"):
        if k in result:
            v = result[k]
            click.echo(f"  {k:<11} {v:.4f}" if isinstance(v, float) else f"  {k:<11} {v}")
    click.echo(f"  size        {_fmt_mb(size['bytes'])} vs {_fmt_mb(size['float_bytes'])} float ({size['bytes'] / max(size['float_bytes'], 1):.3f}x)")


def _text_label(text: str | None) -> str:
    """How ``lowc eval`` names the text it used: a built-in name with what it is, or the file."""
    from lowc import data

    if text is None:
        return "lowc's built-in sentences (pass --data for another text)"
    name = data.identify(text)
    return f"{name} ({data.TEXTS[name][1].split(':')[0]}, shipped with lowc)" if name in data.TEXTS else name


@cli.command(name="data")
def data_cmd():
    """List the built-in texts (usable wherever a text file is taken: --calib, --data, calib=)."""
    from lowc import data

    w = max(len(n) for n in data.names())
    for name in data.names():
        click.echo(f"{name:<{w}}  {data.TEXTS[name][1]}  ({data.path(name)})")


def torch_ones(w, device):
    import torch

    return torch.ones(1, w.shape[-1], dtype=torch.int64, device=device)


@cli.command()
@click.argument("artifact", type=click.Path())
@click.option("--against", default=None, help=AGAINST_HELP)
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--seq-len", "seq_lens", type=click.IntRange(min=1), multiple=True, default=(),
              help="sequence lengths of whole forwards to time against the float model (repeatable; default 1 and "
                   "128 unless --context/--prefill are given)")
@click.option("--context", type=click.IntRange(min=1), default=None,
              help="causal LMs: decode tokens/s, one token per step after a prompt of N tokens, through the target's "
                   "engine and decoding strategy")
@click.option("--prefill", type=click.IntRange(min=1), default=None, help="causal LMs: prefill tokens/s of an N-token prompt")
@click.option("--steps", type=click.IntRange(min=1), default=16, show_default=True, help="decode steps timed (median)")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="threads (torch, LUT C, onnxruntime, llama.cpp)")
@click.option("--against-llama-cpp", "gguf", type=click.Path(), default=None,
              help="a GGUF file (e.g. from `lowc export --format gguf`) timed by llama.cpp (llama-cpp-python) with "
                   "the same --context/--prefill: the peer column")
@click.option("--repeat", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--json", "as_json", is_flag=True)
def bench(artifact, against, batch, seq_lens, context, prefill, steps, threads, gguf, repeat, device, as_json):
    """Latency and throughput of ARTIFACT vs the float model, side by side in one run, naming the
    implementation that ran (reference oracle, Triton, LUT C, onnxruntime); with --context / --prefill,
    decode and prefill tokens/s of a causal LM through the target's engine (and llama.cpp's with
    --against-llama-cpp)."""
    import torch

    from lowc import api
    from lowc import evaluate as ev
    from lowc.errors import LowcError
    from lowc.progress import reporting, to_stderr

    if threads:
        torch.set_num_threads(threads)
    speed = context is not None or prefill is not None
    if gguf and not speed:
        raise LowcError("--against-llama-cpp times decode/prefill: give --context N and/or --prefill N")
    if not seq_lens and not speed:
        seq_lens = (1, 128)
    cm = api.load(artifact, device=device)
    rt = cm.target.runtime_on(device, artifact)  # which implementation runs the compressed model here
    run = rt.call or cm
    vocab = next((s.vocab_size for s in cm.program.info.inputs if s.vocab_size), 100)
    rows = []
    if seq_lens:
        with reporting(to_stderr):
            ref_fn, _ = ev.float_reference(cm.manifest, against, device)
    for L in seq_lens:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (batch, L), generator=g).to(device)
        kw = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        t_f = ev.median(ev.time_call(ref_fn, kw, repeat))
        t_c = ev.median(ev.time_call(run, kw, repeat))
        rows.append({"batch": batch, "seq_len": L, "implementation": rt.implementation, "float_ms": t_f * 1e3,
                     "lowc_ms": t_c * 1e3, "speedup": t_f / t_c, "lowc_tokens_per_s": batch * L / t_c})
    info = {"artifact": os.path.abspath(artifact), "target": cm.target.name, "device": device,
            "threads": torch.get_num_threads(), **rt.to_json(), "rows": rows}
    if speed:
        if cm.kind != "causal-lm":
            raise LowcError(f"--context/--prefill time token generation; {artifact} is a '{cm.kind}' model")
        dec = ev.EngineRecompute(cm, rt.call) if rt.call else cm.decoder("auto")
        info["strategy"], info["strategy_reason"] = dec.strategy, dec.reason
        if context is not None:
            info["decode"] = ev.decode_speed(dec, context, vocab, steps)
        if prefill is not None:
            info["prefill"] = ev.prefill_speed(dec, prefill, vocab, min(repeat, 3))
        if gguf:
            info["llama_cpp"] = ev.llama_cpp_speed(gguf, context, prefill, vocab, torch.get_num_threads(), steps,
                                                   min(repeat, 3))
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"{cm.target.name} on {device} ({torch.get_num_threads()} threads); lowc ran: {rt.implementation}")
    if rt.note:
        click.echo(f"  note: {rt.note}")
    if rows:
        click.echo(f"  vs float, median of {repeat}:")
        click.echo(f"  {'batch':>5} {'seq':>6} {'float ms':>10} {'lowc ms':>10} {'speedup':>8} {'lowc tok/s':>11}")
    for r in rows:
        click.echo(f"  {r['batch']:>5} {r['seq_len']:>6} {r['float_ms']:>10.2f} {r['lowc_ms']:>10.2f} {r['speedup']:>7.2f}x {r['lowc_tokens_per_s']:>11.0f}")
    if speed:
        click.echo(f"  decoding: {info['strategy']} ({info['strategy_reason']})")
        peer = info.get("llama_cpp", {})
        head = f"  {'':<26} {'lowc tok/s':>11}" + (f" {'llama.cpp tok/s':>16}" if peer else "")
        click.echo(head)
        for key, label in (("decode", f"decode after {context} tokens"), ("prefill", f"prefill {prefill} tokens")):
            if key in info:
                other = f" {peer[key]['tokens_per_s']:>16.1f}" if key in peer else ""
                click.echo(f"  {label:<26} {info[key]['tokens_per_s']:>11.1f}{other}")


@cli.command(name="export")
@click.argument("artifact", type=click.Path())
@click.option("--format", "fmt", default="onnx", show_default=True,
              help="onnx (a file), compressed-tensors (a Hugging Face model directory for transformers / vLLM), "
                   "or gguf (a file for llama.cpp; Llama-architecture causal LMs)")
@click.option("--output", "-o", "output", required=True, type=click.Path(),
              help="file to write, e.g. model.onnx or model.gguf; a directory for compressed-tensors")
@click.option("--matmulnbits", is_flag=True, help="emit com.microsoft::MatMulNBits instead of DequantizeLinear->MatMul")
@click.option("--accuracy-level", type=int, default=0, show_default=True,
              help="onnxruntime arithmetic: 0 = fp32 (matches lowc), 4 = int8 activations (faster; what a default "
                   "session does with DequantizeLinear->MatMul). MatMulNBits carries it in its nodes; the "
                   "DequantizeLinear form records it and the session option that gives it in the model's metadata")
@click.option("--external-data", is_flag=True, help="store weights in OUTPUT.data (automatic past 2 GB)")
@click.option("--print-after", "print_after", multiple=True, metavar="PASS",
              help="print the IR after this pass of the export (onnx-lower)")
@click.option("--densify", is_flag=True, help="onnx: store group-sparse (gqsa) layers as dense quantized layers (exact; "
              "about 1.7x their bytes at 50% sparsity); without it such a layer fails the export")
@click.option("--requant", metavar="TYPE", default=None,
              help="gguf: re-quantize (lossy; error reported) layers whose scheme no GGUF block type carries "
                   "exactly, to Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, F16 or F32; exact: 4-bit g32 -> Q4_1 (asym) / Q4_0 "
                   "(sym), 8-bit sym g32 -> Q8_0")
@click.option("--force", is_flag=True, help="replace an existing output file (directory)")
def export(artifact, fmt, output, matmulnbits, accuracy_level, external_data, print_after, densify, requant, force):
    """Export a compiled ARTIFACT to another runtime's format: ONNX (opset 21), compressed-tensors
    (pack-quantized int weights in a Hugging Face directory, for transformers and vLLM), or GGUF
    (llama.cpp; lowc's integer codes carried unchanged where the scheme is a GGUF block type, only
    the per-block scale and minimum rounded to fp16).

    An artifact compiled for an onnx-* target already holds backend/model.onnx: with the options it
    was written with (no --matmulnbits, --accuracy-level 0, no --external-data) it is copied, not
    exported again."""
    from lowc.errors import ArtifactError, LowcError
    from lowc.progress import reporting, to_stderr

    if fmt not in EXPORT_FORMATS:
        raise LowcError(f"unknown export format '{fmt}'; known formats: {', '.join(EXPORT_FORMATS)}")
    onnx_only = [n for n, v in (("--matmulnbits", matmulnbits), ("--accuracy-level", accuracy_level),
                                ("--external-data", external_data), ("--print-after", print_after),
                                ("--densify", densify)) if v]
    if fmt != "onnx" and onnx_only:
        raise LowcError(f"{onnx_only[0]} is an ONNX export option; --format {fmt} does not take it")
    if fmt != "gguf" and requant is not None:
        raise LowcError(f"--requant is a GGUF export option; --format {fmt} does not take it")
    if os.path.lexists(output) and not force:
        raise ArtifactError(f"output {output} already exists (use --force to replace it)")
    if fmt == "compressed-tensors":
        _export_ct(artifact, output, force)
        return
    from lowc.artifact import check_file_output

    check_file_output(output, protect=[artifact])
    from lowc.export import export as export_to

    if fmt == "gguf":
        with reporting(to_stderr):
            r = export_to(artifact, output, format=fmt, requant=requant, force=True)
        _echo_gguf(r)
        return
    with reporting(to_stderr):
        r = export_to(artifact, output, format=fmt, matmulnbits=matmulnbits, accuracy_level=accuracy_level,
                      external_data=external_data or None, force=True, print_after=print_after, densify=densify)
    from collections import Counter

    forms = ", ".join(f"{k} x{v}" for k, v in sorted(Counter(l["onnx"] for l in r.layers).items()))
    how = f" (copied from {os.path.relpath(r.reused_from)}: same options)" if r.reused_from else ""
    click.echo(f"wrote {r.path}{' (+ .data)' if r.external_data else ''}{how}: {_fmt_mb(r.bytes)}, opset {r.opset}, "
               f"inputs {', '.join(r.inputs)} -> {r.output}" + (f"; {forms}" if forms else ""))
    click.echo(f"onnxruntime: {r.arithmetic} (recorded in the model's metadata_props)")


def _export_ct(artifact: str, output: str, force: bool) -> None:
    from lowc.artifact import check_output, read_manifest
    from lowc.export import export as export_to
    from lowc.formats.compressed_tensors import is_export_dir
    from lowc.progress import reporting, to_stderr

    read_manifest(artifact)  # not an artifact: one line, before anything is loaded
    check_output(output, protect=[artifact], ours=is_export_dir, what="a compressed-tensors model directory")
    with reporting(to_stderr):
        r = export_to(artifact, output, format="compressed-tensors", force=force)
    groups = "; ".join(f"{g['scheme']} x{g['layers']}" for g in r.groups.values()) or "no quantized layers"
    click.echo(f"wrote {r.path}: {_fmt_mb(r.bytes)} in {r.tensors} tensors; {groups}; float linear layers: "
               f"{', '.join(r.ignored) or 'none'}")
    click.echo(f"checked against the compiled graph: relative difference {r.check_rel_diff:.1e}")


def _echo_gguf(r) -> None:
    """What a GGUF export wrote: tensor types, exact layers, and the error re-quantization added."""
    types = ", ".join(f"{k} x{v}" for k, v in r.types.items())
    click.echo(f"wrote {r.path}: {_fmt_mb(r.bytes)}, {r.tensors} tensors ({types}); tokenizer gpt2 (pre {r.tokenizer_pre}), "
               f"vocab {r.vocab_size}")
    for how, what in (("exact", "codes carried unchanged, scales/minimums rounded to fp16"),
                      ("requant", f"re-quantized to {r.requant} by gguf's reference quantizer (lossy)"),
                      ("float", "float")):
        rows = [row for row in r.layers if row["how"] == how]
        if not rows:
            continue
        worst = max(rows, key=lambda row: row["rel_err"])
        line = f"  {how}: {len(rows)} layers ({what})"
        if how != "float":
            line += (f"; max |dw| {max(row['max_abs_err'] for row in rows):.3g}, relative RMS error "
                     f"mean {sum(row['rel_err'] for row in rows) / len(rows):.3g}, worst {worst['rel_err']:.3g} "
                     f"({worst['layer']}, {worst['scheme']} -> {worst['type']})")
        click.echo(line)


STRATEGY_CHOICES = ("auto", "recurrent", "static-kv", "kv-cache", "recompute")  # lowc.runtime.STRATEGIES (not imported: torch)


@cli.command()
@click.argument("artifact", type=click.Path())
@click.option("--prompt", required=True, help="prompt text (tokenized with the artifact's tokenizer)")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--sample", is_flag=True, help="sample the next token instead of taking the most likely one")
@click.option("--temperature", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="with --sample: divide the logits by this (0 = greedy)")
@click.option("--top-k", type=click.IntRange(min=1), default=None, help="with --sample: keep the K most likely tokens")
@click.option("--top-p", type=click.FloatRange(min=0, max=1, min_open=True), default=None,
              help="with --sample: keep the smallest set of likely tokens whose probability reaches P")
@click.option("--seed", type=int, default=None, help="with --sample: seed of the draws (default: a random one, reported)")
@click.option("--ignore-eos", is_flag=True, help="generate exactly --max-new-tokens tokens, past the end-of-sequence token")
@click.option("--strategy", type=click.Choice(STRATEGY_CHOICES), default="auto", show_default=True,
              help="recurrent state (linearized attention), static-kv (a Llama decode loop with a preallocated KV "
                   "cache), kv-cache (Hugging Face rebuild around the compiled ops), "
                   "recompute (rerun the whole sequence), or auto")
@click.option("--check", is_flag=True, help="also decode by re-running the full sequence and compare the tokens")
@click.option("--device", default="cpu", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print results as JSON")
def generate(artifact, prompt, max_new_tokens, sample, temperature, top_k, top_p, seed, ignore_eos, strategy, check,
             device, as_json):
    """Generate text from a compiled causal LM (greedy, or sampled with --sample), stopping at end of sequence.

    Linearized models decode with constant-size recurrent state."""
    import secrets
    import time

    from lowc import api
    from lowc.errors import LowcError
    from lowc.frontend.presets import random_weights_note

    cm = api.load(artifact, device=device)
    tok = cm.tokenizer
    if tok is None:
        raise LowcError(f"{artifact}: the model has no tokenizer, so a text prompt cannot be encoded")
    if not sample and (top_k is not None or top_p is not None or seed is not None or temperature != 1.0):
        raise LowcError("--temperature, --top-k, --top-p and --seed choose how to sample: add --sample")
    if sample and seed is None:  # one seed for the run and its --check, reported so the run can be repeated
        seed = secrets.randbelow(2**31)
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    options = dict(do_sample=sample, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    if ignore_eos:
        options["eos_token_id"] = None
    dec = cm.decoder(strategy)  # made before the clock starts (a kv-cache rebuild is checked once)
    sizes: list[int] = []

    def on_token(i, d):
        sizes.append(d.state_bytes() + d.kv_cache_bytes())

    t0 = time.perf_counter()
    out = cm.generate(ids, max_new_tokens, strategy=strategy, on_token=on_token, **options)
    dt = time.perf_counter() - t0
    new = out.shape[1] - ids.shape[1]
    result = {"text": tok.decode(out[0, ids.shape[1]:]), "prompt_tokens": int(ids.shape[1]),
              "new_tokens": new, "seconds": round(dt, 3), "tokens_per_s": round(new / dt, 2),
              "strategy": dec.strategy, "strategy_reason": dec.reason,
              "linear_layers": dec.linear_layers, "softmax_layers": dec.softmax_layers,
              "state_bytes_first": sizes[0], "state_bytes_last": sizes[-1], "stopped_at_eos": new < max_new_tokens}
    if sample:
        result["sampling"] = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "seed": seed}
    if check:
        ref = cm.generate(ids, max_new_tokens, strategy="recompute", **options)
        result["matches_parallel"] = bool(ref.shape == out.shape and (ref == out).all())
    note = random_weights_note(cm.manifest.get("source"))
    if note:
        result["note"] = note
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    if note:
        click.echo(f"note: {note}", err=True)
    click.echo(prompt + result["text"])
    click.echo(f"{new} tokens in {dt:.2f} s ({result['tokens_per_s']} tok/s), {dec.strategy}; state {sizes[0]} -> "
               f"{sizes[-1]} bytes ({dec.linear_layers} linear, {dec.softmax_layers} softmax layers)"
               + (f"; sampled with seed {seed}" if sample else ""), err=True)
    if check:
        click.echo(f"same tokens as the parallel form: {result['matches_parallel']}", err=True)


def main(argv: list[str] | None = None) -> None:
    for stream in (sys.stdout, sys.stderr):  # each line as it is written, also into a pipe
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True)
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("LOWC_DEBUG") == "1"
    argv = [a for a in argv if a != "--debug"]
    from lowc.errors import LowcError

    try:
        cli.main(args=argv, prog_name="lowc", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("lowc: aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(2)
    except LowcError as e:
        if debug:
            raise
        click.echo(f"lowc: error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("lowc: interrupted", err=True)
        sys.exit(130)
    except Exception as e:
        if debug:
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        click.echo(f"lowc: internal error: {type(e).__name__}: {first} (run again with --debug for the traceback)", err=True)
        sys.exit(3)


if __name__ == "__main__":
    main()
