"""Continue a prompt with a trained checkpoint or OpenAI's GPT-2 weights, printing as it goes.

    python scripts/generate.py --checkpoint runs/latest --prompt "Every effort moves you"
    python scripts/generate.py --gpt2-dir PATH/TO/gpt2 --prompt "Hello, I'm a language model," --top-p 0.9 --temperature 0.8
    python scripts/generate.py --checkpoint runs/latest --quantize int8 --save-quantized model-int8.safetensors

`--quantize int8|bf16` stores the linear layers' weights in fewer bytes (gptfast.quantize): decoding,
which reads every weight once a token, gets faster. `--save-quantized` writes the quantized model
(safetensors), which `--checkpoint` reads back as it is.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from gptfast.cli import OneLineParser, nonnegative_float, positive_float, positive_int
from gptfast.generate import stream_text
from gptfast.model import QUANTIZATION_MODES, is_llama_folder, load_gpt2, load_llama, quantization_of, quantize
from gptfast.ops import BackendError
from gptfast.tokenizer import HFTokenizer, TokenizerUnavailableError, get_tokenizer, tokenizer_from_spec
from gptfast.training import load_checkpoint
from gptfast.training.checkpoint import save_weights


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="generate.py", description="Generate text from a gptfast checkpoint or GPT-2 weights.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="gptfast checkpoint file or run folder")
    source.add_argument("--gpt2", help="GPT-2 by name (gpt2, gpt2-medium, gpt2-large, gpt2-xl; needs "
                                       "huggingface_hub and a network once)")
    source.add_argument("--gpt2-dir", help="folder with a Hugging Face GPT-2 (config.json + model.safetensors)")
    p.add_argument("--prompt", action="append", help="repeat for several prompts (default: 'Every effort moves you')")
    p.add_argument("--max-new-tokens", type=positive_int, default=50)
    p.add_argument("--temperature", type=nonnegative_float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=positive_int, default=None)
    p.add_argument("--top-p", type=positive_float, default=None, help="nucleus sampling, in (0, 1]")
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    p.add_argument("--stop-at-eos", action="store_true", help="stop at <|endoftext|>")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole window every token (textbook path)")
    p.add_argument("--quantize", default="none", choices=list(QUANTIZATION_MODES),
                   help="weight-only quantization of the linear layers for faster decoding (default: none)")
    p.add_argument("--save-quantized", metavar="PATH", help="also write the quantized model to PATH (.safetensors)")
    p.add_argument("--backend", default=None)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    return p


def weight_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in [*model.parameters(), *model.buffers()]}.values())


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.top_p is not None and args.top_p > 1:
        print("generate.py: error: argument --top-p: must be in (0, 1]", file=sys.stderr)
        return 2
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    try:
        if args.checkpoint and is_llama_folder(args.checkpoint):     # a Hugging Face Llama / Qwen3 folder
            model, tokenizer = load_llama(args.checkpoint, backend=args.backend), HFTokenizer.from_folder(args.checkpoint)
        elif args.checkpoint:
            model, state = load_checkpoint(args.checkpoint, map_location=device, backend=args.backend)
            if not state.get("tokenizer"):
                raise ValueError("the checkpoint does not say which tokenizer it was trained with")
            tokenizer = tokenizer_from_spec(state["tokenizer"])
        else:
            model = load_gpt2(args.gpt2 or args.gpt2_dir, backend=args.backend)
            tokenizer = get_tokenizer("gpt2")
        if model.cfg.vocab_size < tokenizer.n_vocab:
            raise ValueError(f"the model has {model.cfg.vocab_size} tokens but its tokenizer {tokenizer.n_vocab}")
    except (FileNotFoundError, ValueError, BackendError, TokenizerUnavailableError) as err:
        print(f"generate.py: error: {err}", file=sys.stderr)
        return 2
    model.to(device)
    if args.quantize != "none":
        try:
            before = weight_bytes(model)
            t0 = time.perf_counter()
            quantize(model, args.quantize)
            print(f"quantized to {args.quantize} in {time.perf_counter() - t0:.2f} s: {weight_bytes(model) / 1e6:.0f} MB "
                  f"of weights (was {before / 1e6:.0f} MB)", file=sys.stderr)
        except ValueError as err:
            print(f"generate.py: error: {err}", file=sys.stderr)
            return 2
    if args.save_quantized:
        if not quantization_of(model):
            print("generate.py: error: --save-quantized needs --quantize int8|bf16 (or a quantized checkpoint)",
                  file=sys.stderr)
            return 2
        save_weights(args.save_quantized, model, tokenizer)
        print(f"wrote {args.save_quantized}", file=sys.stderr)
    for prompt in args.prompt or ["Every effort moves you"]:
        print(prompt, end="", flush=True)
        stats = {}
        for piece in stream_text(model, tokenizer, prompt, args.max_new_tokens, stats=stats,
                                 temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                                 eos_id=tokenizer.eot_id if args.stop_at_eos else None,
                                 use_cache=False if args.no_cache else None):
            print(piece, end="", flush=True)
        print()
        print(speed_line(stats), file=sys.stderr)
    return 0


def speed_line(stats: dict) -> str:
    """'(N tokens: the first after X s, then Y tokens/s)' - the prompt's forward apart from the decoding rate."""
    n = stats.get("tokens", 0)
    if n == 0:
        return "(no tokens generated)"
    line = f"({n} token{'s' * (n != 1)}: the first after {stats['first_token_s']:.2f} s"
    if n > 1 and stats["decode_s"] > 0:
        line += f", then {(n - 1) / stats['decode_s']:.1f} tokens/s"
    return line + ")"


if __name__ == "__main__":
    sys.exit(main())
