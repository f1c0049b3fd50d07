"""Continue a prompt with a trained checkpoint.

    python scripts/generate.py --checkpoint runs/latest --prompt "Every effort moves you"
"""
from __future__ import annotations

import argparse
import sys

import torch

from gptfast.cli import OneLineParser, nonnegative_float, positive_int
from gptfast.generate import generate, text_to_token_ids, token_ids_to_text
from gptfast.ops import BackendError
from gptfast.tokenizer import TokenizerUnavailableError, tokenizer_from_spec
from gptfast.training import load_checkpoint


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="generate.py", description="Generate text from a gptfast checkpoint.")
    p.add_argument("--checkpoint", required=True, help="checkpoint file or run folder")
    p.add_argument("--prompt", default="Every effort moves you")
    p.add_argument("--max-new-tokens", type=positive_int, default=50)
    p.add_argument("--temperature", type=nonnegative_float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=positive_int, default=None)
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    p.add_argument("--stop-at-eos", action="store_true", help="stop at <|endoftext|>")
    p.add_argument("--backend", default=None)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    try:
        model, state = load_checkpoint(args.checkpoint, map_location=device, backend=args.backend)
        if not state.get("tokenizer"):
            raise ValueError("the checkpoint does not say which tokenizer it was trained with")
        tokenizer = tokenizer_from_spec(state["tokenizer"])
    except (FileNotFoundError, ValueError, BackendError, TokenizerUnavailableError) as err:
        print(f"generate.py: error: {err}", file=sys.stderr)
        return 2
    model.to(device)
    idx = text_to_token_ids(args.prompt, tokenizer).to(device)
    out = generate(model, idx, args.max_new_tokens, context_size=model.cfg.context_length,
                   temperature=args.temperature, top_k=args.top_k,
                   eos_id=tokenizer.eot_id if args.stop_at_eos else None, seed=args.seed)
    print(token_ids_to_text(out, tokenizer))
    return 0


if __name__ == "__main__":
    sys.exit(main())
