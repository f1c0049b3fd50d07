"""Generation speed with and without the KV cache: tokens/s of greedy decoding.

    python benchmarks/bench_generate.py --device cpu      # book-124m and gpt2-124m, random weights

Random weights decode as fast as trained ones (same shapes, same work). Each configuration first
checks that cached and uncached decoding give the same tokens, then times one run of each.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time

import torch

from gptfast.generate import generate
from gptfast.model import GPTConfig, GPTModel


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--presets", default="book-124m,gpt2-124m")
    p.add_argument("--backend", default="torch")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=100)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    rows = []
    print(f"{'preset':<12}{'cache':<7}{'tokens/s':>10}{'seconds':>9}")
    for preset in args.presets.split(","):
        torch.manual_seed(0)
        model = GPTModel(GPTConfig.from_preset(preset, backend=args.backend)).to(device).eval()
        prompt = torch.randint(0, model.cfg.vocab_size, (1, args.prompt_tokens), device=device)
        outputs = {}
        for use_cache in (False, True):
            generate(model, prompt, 2, use_cache=use_cache)                 # warm-up
            sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
            sync()
            t0 = time.perf_counter()
            outputs[use_cache] = generate(model, prompt, args.new_tokens, use_cache=use_cache)
            sync()
            seconds = time.perf_counter() - t0
            rows.append({"preset": preset, "cache": use_cache, "backend": args.backend, "new_tokens": args.new_tokens,
                         "prompt_tokens": args.prompt_tokens, "seconds": seconds,
                         "tokens_per_s": args.new_tokens / seconds})
            print(f"{preset:<12}{str(use_cache):<7}{rows[-1]['tokens_per_s']:>10.1f}{seconds:>9.2f}")
        assert torch.equal(outputs[False], outputs[True]), "cached and uncached decoding disagree"
    env = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
           "torch": torch.__version__, "threads": torch.get_num_threads(),
           "date": datetime.datetime.now().isoformat(timespec="seconds")}
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"bench_generate_{device.type}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"environment": env, "results": rows}, f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
