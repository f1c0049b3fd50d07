"""Export a gptfast checkpoint as a Hugging Face folder (GPT-2, or Llama/Qwen3 for that family), loadable with no
gptfast code.

    python scripts/export.py --checkpoint runs/latest --out my-gpt
    python -c "from transformers import AutoModelForCausalLM, AutoTokenizer; \
               m = AutoModelForCausalLM.from_pretrained('my-gpt'); t = AutoTokenizer.from_pretrained('my-gpt')"

The folder holds config.json, model.safetensors and the tokenizer (vocab.json + merges.txt,
tokenizer_config.json). `python scripts/train.py --init-from my-gpt` reads it back.
"""
from __future__ import annotations

import argparse
import os
import sys

from gptfast.cli import OneLineParser
from gptfast.model import LlamaModel, export_hf, export_llama
from gptfast.tokenizer import tokenizer_from_spec
from gptfast.training import load_checkpoint


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="export.py", description="Export a gptfast checkpoint to the Hugging Face format "
                      "(GPT-2, Llama or Qwen3).")
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint.pt, model.safetensors, or a run folder holding them (e.g. runs/latest)")
    p.add_argument("--out", required=True, help="folder to write (must be new or empty)")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out, replacing its files")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        model, state = load_checkpoint(args.checkpoint, backend="reference")
        tokenizer = tokenizer_from_spec(state["tokenizer"]) if state.get("tokenizer") else None
        (export_llama if isinstance(model, LlamaModel) else export_hf)(model, args.out, tokenizer=tokenizer,
                                                                        force=args.force)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"export.py: error: {err}", file=sys.stderr)
        return 2
    cfg = model.cfg
    print(f"exported {model.num_parameters():,} parameters ({cfg.n_layers} layers, {cfg.emb_dim} wide, "
          f"{cfg.vocab_size} tokens, context {cfg.context_length}, "
          f"{'tied' if cfg.tie_embeddings else 'untied'} LM head) to {args.out}: "
          f"{', '.join(sorted(os.listdir(args.out)))}")
    if tokenizer is None:
        print("note: the checkpoint names no tokenizer; the folder has none", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
