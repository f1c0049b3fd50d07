"""Train a GPT on a text corpus.

    python scripts/train.py                       # cpu-small on the-verdict (shipped with gptfast)
    python scripts/train.py --preset book-124m --epochs 10 --batch-size 2 --lr 4e-4 \
        --weight-decay 0.1 --eval-freq 5 --eval-iter 5 --seed 123
    torchrun --standalone --nproc_per_node=2 scripts/train.py --grad-accum 2 ...   # data-parallel

Ctrl-C (or SIGTERM, e.g. a cluster's time limit) stops after the step in progress with a checkpoint;
the same command with `--resume auto` continues the run exactly.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys

from gptfast.cli import OneLineParser, nonnegative_float, positive_float, positive_int
from gptfast.model import PRESETS
from gptfast.ops import known_backends
from gptfast.tokenizer import TOKENIZERS
from gptfast.training import USER_ERRORS, NonFiniteLoss, TrainingStopped, TrainSettings, run_training


def auto_summary() -> str:
    from gptfast.ops import auto

    return ", ".join(f"{op} {c.backend}" for op, c in auto.choices("cpu", "float32").items())


def resume_command(argv: list[str]) -> str:
    """This run's command line with `--resume auto` in place of any --resume it had."""
    args, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--resume":
            skip = True
        elif not a.startswith("--resume="):
            args.append(a)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    launcher = ["torchrun", f"--nproc_per_node={world}"] if world > 1 else ["python"]
    return shlex.join(launcher + [os.path.relpath(sys.argv[0]), *args, "--resume", "auto"])


def build_parser() -> argparse.ArgumentParser:
    d = TrainSettings()
    p = OneLineParser(prog="train.py", description="Train a GPT model on a text corpus.")
    p.add_argument("--data", nargs="+", default=[d.data],
                   help="text file or URL (downloaded once, cached; default: The Verdict, shipped with gptfast); a folder or several files are "
                        "tokenized once into a memory-mapped token file")
    p.add_argument("--preset", help=f"model size: {', '.join(PRESETS)} "
                                    "(default: cpu-small on CPU, book-124m on CUDA)")
    p.add_argument("--backend", help="op backend: " + ", ".join(known_backends()) +
                                     " (default: $GPTFAST_BACKEND or auto, which picks per op what measurably "
                                     f"wins on this device; on this CPU at float32: {auto_summary()})")
    p.add_argument("--device", default=d.device, choices=["auto", "cpu", "cuda"])
    p.add_argument("--epochs", type=positive_int, default=d.epochs)
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size)
    p.add_argument("--context-length", type=positive_int, help="window length (default: the preset's)")
    p.add_argument("--stride", type=positive_int, help="window step (default: the context length)")
    p.add_argument("--lr", type=positive_float, default=d.lr)
    p.add_argument("--weight-decay", type=nonnegative_float, default=d.weight_decay)
    p.add_argument("--eval-freq", type=positive_int, default=d.eval_freq, help="evaluate every N steps")
    p.add_argument("--eval-iter", type=positive_int, default=d.eval_iter, help="batches per evaluation")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", default=d.out, help="run folder: checkpoint.pt, metrics.jsonl, loss.png")
    p.add_argument("--tokenizer", default=d.tokenizer, choices=TOKENIZERS)
    p.add_argument("--bpe-vocab-size", type=positive_int, default=d.bpe_vocab_size,
                   help="vocabulary of the BPE trained with --tokenizer bpe")
    p.add_argument("--start-context", default=d.start_context, help="prompt of the per-epoch sample")
    p.add_argument("--num-workers", type=int, default=d.num_workers, help="DataLoader workers")
    p.add_argument("--dtype", default=d.dtype, choices=["float32", "bfloat16", "float16"],
                   help="autocast precision of the forward pass (float16: CUDA only, with loss scaling)")
    p.add_argument("--compile", action="store_true", help="torch.compile the training forward")
    p.add_argument("--grad-accum", type=positive_int, default=d.grad_accum, help="micro-batches per optimizer step")
    p.add_argument("--grad-clip", type=nonnegative_float, default=d.grad_clip, help="max gradient norm (0: off)")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="linear learning-rate warm-up")
    p.add_argument("--min-lr", type=nonnegative_float, default=None, help="cosine-decay the rate to this")
    p.add_argument("--tie-embeddings", action="store_true", help="share the LM head with the token embedding")
    p.add_argument("--pad-vocab", action="store_true",
                   help="pad embedding and LM-head rows to a multiple of 64 (50257 -> 50304: faster matmuls)")
    p.add_argument("--checkpoint-every", type=int, default=0, help="also checkpoint every N steps (ckpt-step*.pt)")
    p.add_argument("--keep-checkpoints", type=positive_int, default=3, help="periodic checkpoints kept")
    p.add_argument("--resume", help="continue from a checkpoint file, or 'auto' for the latest in --out")
    p.add_argument("--max-steps", type=positive_int, default=None, help="stop after this many steps in total")
    p.add_argument("--drop-rate", type=float, default=None, help="dropout rate instead of the preset's")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard weights, gradients and optimizer state across processes (FSDP) "
                        "instead of replicating the model (DDP)")
    p.add_argument("--init-from", help="fine-tune from a GPT-2 folder (Hugging Face format) or a gptfast checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.checkpoint_every < 0:
        print("train.py: error: argument --checkpoint-every: must be >= 0", file=sys.stderr)
        return 2
    if args.warmup_steps < 0:
        print("train.py: error: argument --warmup-steps: must be >= 0", file=sys.stderr)
        return 2
    settings = TrainSettings(
        data=args.data[0] if len(args.data) == 1 else args.data, preset=args.preset, backend=args.backend, device=args.device,
        epochs=args.epochs, batch_size=args.batch_size, context_length=args.context_length,
        stride=args.stride, lr=args.lr, weight_decay=args.weight_decay, eval_freq=args.eval_freq,
        eval_iter=args.eval_iter, seed=args.seed, out=args.out, tokenizer=args.tokenizer,
        bpe_vocab_size=args.bpe_vocab_size, start_context=args.start_context,
        num_workers=args.num_workers, progress=not args.no_progress, init_from=args.init_from,
        dtype=args.dtype, compile=args.compile, grad_accum=args.grad_accum, grad_clip=args.grad_clip,
        warmup_steps=args.warmup_steps, min_lr=args.min_lr, tie_embeddings=args.tie_embeddings, pad_vocab=args.pad_vocab,
        checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints, resume=args.resume,
        max_steps=args.max_steps, drop_rate=args.drop_rate, fsdp=args.fsdp)
    say = print if int(os.environ.get("RANK", "0")) == 0 else (lambda *a, **k: None)  # torchrun: rank 0 speaks
    try:
        run_training(settings)
    except USER_ERRORS as err:
        say(f"train.py: error: {err}", file=sys.stderr)
        return 2
    except NonFiniteLoss as err:
        say(f"train.py: stopped: {err}", file=sys.stderr)
        return 1
    except TrainingStopped as err:
        say(f"train.py: {err}", file=sys.stderr)
        say(f"train.py: to continue: {resume_command(sys.argv[1:] if argv is None else argv)}", file=sys.stderr)
        return err.exit_status
    except KeyboardInterrupt:
        say("train.py: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
