"""What weight-only quantization costs a trained model: logits, validation loss and greedy tokens.

    python scripts/train.py --preset book-124m --epochs 10 --batch-size 2 --lr 4e-4 --weight-decay 0.1 \\
        --eval-freq 5 --eval-iter 5 --seed 123 --out runs/book          # the book experiment (~10 min on 2 cores)
    python benchmarks/quantize_quality.py --checkpoint runs/book

For each mode (bf16, int8, w8a8: int8 weights and activations) against the float32 model: the relative error of the logits over the whole
validation split, the validation loss (the run's own split of its corpus, every batch) and its
relative change, and the agreement of greedy continuations (the share of tokens equal up to the
first difference) for a few prompts. Writes benchmarks/results/quantize_quality.json.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import sys

import torch

from gptfast.data import create_dataloaders, load_text
from gptfast.generate import generate
from gptfast.model import quantize
from gptfast.tokenizer import tokenizer_from_spec
from gptfast.training import load_checkpoint

PROMPTS = ["Every effort moves you", "I had always thought Jack Gisburn", "The picture was", "She glanced at"]


@torch.no_grad()
def measure(model, loader, prompts, new_tokens):
    losses, logits = [], []
    for x, y in loader:
        logits.append(model(x))
        losses.append(model(x, y).item())
    tokens = [generate(model, p, new_tokens) for p in prompts]
    return sum(losses) / len(losses), torch.cat([t.flatten(0, 1) for t in logits]), tokens


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="a run folder or checkpoint of a float32 model")
    p.add_argument("--data", default=None, help="the run's corpus (default: the shipped The Verdict)")
    p.add_argument("--backend", default="auto")
    p.add_argument("--new-tokens", type=int, default=50)
    p.add_argument("--modes", default="bf16,int8,w8a8", help="comma-separated quantization modes to measure")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                 "quantize_quality.json"))
    args = p.parse_args(argv)
    model, state = load_checkpoint(args.checkpoint, backend=args.backend)
    model.eval()
    tokenizer = tokenizer_from_spec(state["tokenizer"])
    text = load_text(args.data) if args.data else load_text()
    _, val = create_dataloaders(text, tokenizer, batch_size=2, context_length=model.cfg.context_length)
    prompts = [torch.tensor([tokenizer.encode(s)]) for s in PROMPTS]
    ref_loss, ref_logits, ref_tokens = measure(model, val, prompts, args.new_tokens)
    rows = {"float32": {"val_loss": ref_loss}}
    print(f"float32: val loss {ref_loss:.4f}")
    for mode in args.modes.split(","):
        q = quantize(copy.deepcopy(model), mode)
        loss, logits, tokens = measure(q, val, prompts, args.new_tokens)
        agree = []
        for t, r, pr in zip(tokens, ref_tokens, prompts):
            same = (t[0, pr.shape[1]:] == r[0, pr.shape[1]:]).long()
            agree.append(float(same.cumprod(0).float().mean()))
        err = (torch.linalg.vector_norm(logits - ref_logits) / torch.linalg.vector_norm(ref_logits)).item()
        rows[mode] = {"val_loss": loss, "val_loss_change": (loss - ref_loss) / ref_loss, "logits_rel_error": err,
                      "greedy_agreement": agree, "continuation": tokenizer.decode(tokens[0][0].tolist())}
        print(f"{mode}: logits rel error {err:.2e} | val loss {loss:.4f} ({100 * (loss - ref_loss) / ref_loss:+.3f}%) | "
              f"greedy agreement over {args.new_tokens} tokens per prompt {[round(a, 2) for a in agree]}")
    env = {"checkpoint": args.checkpoint, "config": model.cfg.to_dict(), "torch": torch.__version__,
           "date": datetime.datetime.now().isoformat(timespec="seconds"), "prompts": PROMPTS}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"environment": env, "results": rows}, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
