"""Train a small Llama-style causal LM on WikiText-2 on a CPU, to measure compression on a real model.

No pretrained causal LM is available offline, and a randomly initialised model shows no ordered
quantization damage (every method looks alike on noise). This script trains one that does:

* tokenizer: a byte-level BPE (Hugging Face ``tokenizers``) learned on the training text, with
  ``<s>``, ``</s>`` and WikiText's own ``<unk>`` as special tokens;
* model: ``transformers.LlamaForCausalLM`` (RMSNorm, RoPE, SwiGLU, grouped-query attention), by default
  hidden 256, 4 layers, 4 query heads sharing 2 key/value heads, intermediate 768, vocabulary 4096
  (about 5.2M parameters, 2.1M of them the two embedding tables);
* data: ``wikitext-2/valid.txt`` only (the last 5% held out to watch overfitting); ``test.txt`` is
  never trained on: it is read once at the end for perplexity;
* training: AdamW (β 0.9/0.95, weight decay 0.1), linear warmup then cosine decay, gradient clipping
  1.0, random windows of ``--seq-len`` tokens, fp32, seeded.

It saves a Hugging Face directory (``config.json``, ``model.safetensors``, tokenizer files) plus
``training.json`` (settings, loss curve, perplexities, wall time), which ``lowc compile DIR`` and
``lowc eval`` read like any other model. Default settings take about 12-15 minutes on 2 CPU cores.

    python examples/train_tiny_llama.py --out models/tiny-llama-wt2
    lowc compile models/tiny-llama-wt2 --target ref-w4a16 -o out/tl-w4 && \\
        lowc eval out/tl-w4 --data wikitext-2-test
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

from lowc import data

#: the WikiText-2 folder lowc ships (lowc.data): valid.txt and test.txt
DATA = os.path.dirname(data.wikitext2("valid"))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="models/tiny-llama-wt2", help="output Hugging Face directory")
    p.add_argument("--data", default=DATA, help="folder holding valid.txt (train) and test.txt (eval), by default lowc's own copy")
    p.add_argument("--vocab", type=int, default=4096, help="BPE vocabulary size")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4, help="query heads")
    p.add_argument("--kv-heads", type=int, default=2, help="key/value heads (grouped-query attention)")
    p.add_argument("--intermediate", type=int, default=768)
    p.add_argument("--seq-len", type=int, default=256, help="training window in tokens")
    p.add_argument("--batch", type=int, default=16, help="windows per step")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--eval-windows", type=int, default=0, help="test.txt windows for the final perplexity (0 = all)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace an existing --out directory")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def read(path: str) -> str:
    if not os.path.isfile(path):
        fail(f"{path} does not exist (pass --data DIR holding valid.txt and test.txt)")
    with open(path, encoding="utf-8") as f:
        return f.read()


def train_tokenizer(text: str, vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(text.splitlines(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>")


def encode(tokenizer, text: str):
    import torch

    return torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.int64)


def stream_loss(model, stream, seq_len: int, max_windows: int = 0, batch: int = 8) -> float:
    """Mean next-token loss over non-overlapping windows of ``stream``."""
    import torch

    n = len(stream) // seq_len
    if max_windows:
        n = min(n, max_windows)
    windows = stream[: n * seq_len].reshape(n, seq_len)
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, n, batch):
            ids = windows[i : i + batch]
            logits = model(input_ids=ids).logits
            total += torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                       reduction="sum").item()
            count += ids[:, 1:].numel()
    model.train()
    return total / count


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from tqdm.auto import tqdm
    from transformers import LlamaConfig, LlamaForCausalLM

    if os.path.exists(args.out) and not args.force:
        fail(f"{args.out} exists: pass --force to replace it")
    if args.hidden % args.heads or args.heads % args.kv_heads:
        fail(f"--hidden {args.hidden} must divide into --heads {args.heads}, and --heads into --kv-heads {args.kv_heads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_start = time.time()

    train_text = read(os.path.join(args.data, "valid.txt"))
    test_text = read(os.path.join(args.data, "test.txt"))
    tokenizer = train_tokenizer(train_text, args.vocab)
    stream = encode(tokenizer, train_text)
    split = int(len(stream) * 0.95)
    train_ids, held_ids = stream[:split], stream[split:]
    if len(train_ids) <= args.seq_len + 1:
        fail(f"training text has {len(train_ids)} tokens, too few for --seq-len {args.seq_len}")

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(1024, args.seq_len), rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        frac = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    g = torch.Generator().manual_seed(args.seed)
    curve = []
    bar = tqdm(range(args.steps), desc="train", unit="step", disable=args.quiet, file=sys.stderr)
    ema = None
    for step in bar:
        starts = torch.randint(0, len(train_ids) - args.seq_len - 1, (args.batch,), generator=g)
        ids = torch.stack([train_ids[s : s + args.seq_len] for s in starts.tolist()])
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        bar.set_postfix(loss=f"{ema:.3f}")
        if (step + 1) % 50 == 0 or step + 1 == args.steps:
            held = stream_loss(model, held_ids, args.seq_len)
            curve.append({"step": step + 1, "train_loss": round(ema, 4), "heldout_loss": round(held, 4),
                          "seconds": round(time.time() - t_start, 1)})
            bar.write(f"step {step + 1}: train loss {ema:.3f}, held-out loss {held:.3f} (ppl {math.exp(held):.1f})",
                      file=sys.stderr)
    bar.close()
    train_seconds = time.time() - t_start

    model.eval()
    test_ids = encode(tokenizer, test_text)
    test_loss = stream_loss(model, test_ids, args.seq_len, args.eval_windows)
    held_loss = stream_loss(model, held_ids, args.seq_len)

    tmp = args.out.rstrip("/") + ".tmp"
    if os.path.exists(tmp):
        import shutil

        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    report = {
        "model": {"parameters": n_params, **{k: getattr(config, k) for k in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads")}},
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "force", "quiet")},
        "tokens": {"train": len(train_ids), "heldout": len(held_ids), "test": len(test_ids)},
        "tokens_seen": args.steps * args.batch * args.seq_len,
        "curve": curve,
        "heldout_ppl": round(math.exp(held_loss), 3),
        "test_ppl": round(math.exp(test_loss), 3),
        "test_eval": f"non-overlapping windows of {args.seq_len} tokens of test.txt"
                     + (f" (first {args.eval_windows})" if args.eval_windows else " (all)"),
        "train_seconds": round(train_seconds, 1),
        "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__,
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]) if argv is None else "main(" + repr(argv) + ")",
    }
    with open(os.path.join(tmp, "training.json"), "w") as f:
        json.dump(report, f, indent=2)
    if os.path.exists(args.out):
        import shutil

        shutil.rmtree(args.out)
    os.replace(tmp, args.out)
    print(f"{args.out}: {n_params / 1e6:.2f}M parameters, {report['tokens_seen'] / 1e6:.2f}M tokens seen in "
          f"{train_seconds / 60:.1f} min; held-out ppl {report['heldout_ppl']}, test ppl {report['test_ppl']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
