"""bfloat16 training against float32, step by step: the numerics check behind `--dtype auto`.

    python benchmarks/bf16_curve.py                  # 50 steps, a gpt2-124m-shaped model of 2 blocks

A model with GPT-2 small's widths (C 768, 12 heads, the 50,257-token vocabulary; 2 blocks instead of 12,
so a CPU without bf16 matrix instructions gets through it) trains on The Verdict from the same weights,
the same batches and the same dropout masks, once in float32 and once under bfloat16 autocast with the
16-bit working copies of the weights (what train.py runs at --dtype bfloat16 / auto on bf16 hardware).
Tolerance: every step's loss within 2% of float32's. Why 2%: bfloat16 keeps 8 significant bits (a
rounding of 2^-9 = 0.2% per product), but a loss averages 128 tokens' log-softmax over 50,257 logits
with float32 statistics, so those roundings mostly cancel (measured on the 2-core EPYC: worst step 0.02%
over 50 steps); 2% leaves room for longer runs whose weights drift apart, while an error a precision
change can bring in - a wrong scale, a mask or cast out of step, a gradient lost - moves the loss by far
more. Writes results/bf16_curve_<device>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from gptfast.data import VERDICT_PATH, create_dataloaders
from gptfast.model import GPTConfig, GPTModel
from gptfast.tokenizer import get_tokenizer
from gptfast.training import TrainSettings, TrainingState, train
from gptfast.training.data import TrainingData
from gptfast.training.parallel import SINGLE
from gptfast.training.optim import bf16_matmul_hardware

TOLERANCE = 0.02


def verdict_data() -> TrainingData:
    """Fresh loaders (the shuffle generator starts over): both runs see the same batches in the same order."""
    tok = get_tokenizer("gpt2")
    with open(VERDICT_PATH, encoding="utf-8") as f:
        train_loader, val_loader = create_dataloaders(f.read(), tok, batch_size=2, context_length=64, seed=3)
    return TrainingData(tok, train_loader, val_loader, 64, "")


def curve(dtype: str, steps: int, layers: int) -> tuple[list[float], float]:
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(n_layers=layers, context_length=64, drop_rate=0.1, backend="auto"))
    s = TrainSettings(dtype=dtype, max_steps=steps, epochs=100, eval_freq=10**9, eval_iter=1, progress=False,
                      sample_tokens=1, lr=4e-4)
    state = TrainingState.start(s, model, SINGLE, None, total_steps=steps)
    torch.manual_seed(1)                                           # the same dropout draws in both runs
    t0 = time.perf_counter()
    hist = train(s, state, verdict_data())
    return [loss for _, loss in hist.batch_losses], (time.perf_counter() - t0) / steps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    fp32, fp32_s = curve("float32", args.steps, args.layers)
    bf16, bf16_s = curve("bfloat16", args.steps, args.layers)
    rel = [abs(b - a) / a for a, b in zip(fp32, bf16)]
    print(f"{'step':>4} {'float32':>9} {'bfloat16':>9} {'rel diff':>9}")
    for i, (a, b, r) in enumerate(zip(fp32, bf16, rel)):
        print(f"{i:4d} {a:9.4f} {b:9.4f} {r:9.2%}")
    ok = max(rel) <= TOLERANCE
    hw = bf16_matmul_hardware("cpu") or "no bf16 matrix instructions (bf16 matmuls emulated)"
    print(f"worst step {max(rel):.2%} (tolerance {TOLERANCE:.0%}): {'PASS' if ok else 'FAIL'} | "
          f"{fp32_s:.2f} s/step float32, {bf16_s:.2f} s/step bfloat16 | CPU: {platform.processor() or 'cpu'}, {hw}")
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "bf16_curve_cpu.json")
    with open(out, "w") as f:
        json.dump({"float32": fp32, "bfloat16": bf16, "rel_diff": rel, "tolerance": TOLERANCE, "pass": ok,
                   "s_per_step": {"float32": fp32_s, "bfloat16": bf16_s}, "layers": args.layers, "cpu_bf16": hw,
                   "torch": torch.__version__}, f, indent=1)
    print(f"wrote {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
