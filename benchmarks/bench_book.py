"""The book experiment end to end, per backend, precision and loss path: wall time and printed losses.

    python benchmarks/bench_book.py                                   # auto backend, default precision, fused loss
    python benchmarks/bench_book.py --backends auto,torch --loss fused,unfused --dtypes float32,bfloat16

The experiment is Raschka's chapter 5 run (README): book-124m (162M parameters), The Verdict,
10 epochs of batch 2 x 256, AdamW lr 4e-4, weight decay 0.1, evaluation every 5 steps on 5 batches,
seed 123 - what `python scripts/train.py --preset book-124m --epochs 10 ...` runs.

`--loss unfused` measures what training cost before the LM head was fused with the loss: the model
computes the (B, T, V) logits, then the backend's cross-entropy. The printed losses of both paths
must agree to 1e-4 (issue 15); the JSON keeps every evaluation so the comparison can be redone.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import sys
import tempfile
import time

import torch

from gptfast import ops
from gptfast.model import GPTModel
from gptfast.training import TrainSettings, run_training

HERE = os.path.dirname(os.path.abspath(__file__))
BOOK = dict(preset="book-124m", epochs=10, batch_size=2, lr=4e-4, weight_decay=0.1, eval_freq=5, eval_iter=5,
            seed=123, progress=False)


@contextlib.contextmanager
def unfused_loss():
    """GPTModel's loss as logits then cross-entropy, on the model's own backend."""
    fused_forward = GPTModel.forward

    def forward(self, idx, targets=None, **kw):
        if targets is None:
            return fused_forward(self, idx, **kw)
        logits = fused_forward(self, idx, **kw)                           # (B, T, V)
        return ops.cross_entropy(logits.flatten(0, 1), targets.flatten(), backend=self.cfg.backend)

    GPTModel.forward = forward
    try:
        yield
    finally:
        GPTModel.forward = fused_forward


def run_book(backend: str, dtype: str, loss: str, epochs: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        settings = TrainSettings(**{**BOOK, "epochs": epochs}, backend=backend, dtype=dtype, out=out)
        lines = []
        start = time.perf_counter()
        with unfused_loss() if loss == "unfused" else contextlib.nullcontext():
            summary = run_training(settings, echo=lines.append)
        seconds = time.perf_counter() - start
        with open(os.path.join(out, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
    evals = [(r["step"], r["train_loss"], r["val_loss"]) for r in rows if r["event"] in ("initial_eval", "eval")]
    precision = next(r.get("precision", dtype) for r in rows if r["event"] == "config")
    return {"backend": backend, "dtype": dtype, "precision": precision, "loss": loss, "epochs": epochs,
            "seconds": round(seconds, 1),
            "steps": summary["steps"], "evals": evals, "samples": [r["text"] for r in rows if r["event"] == "sample"],
            "auto": [line.strip() for line in lines if line.strip().startswith("auto:")]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backends", default="auto")
    p.add_argument("--dtypes", default="auto", help="comma-separated --dtype values (auto: train.py's default)")
    p.add_argument("--loss", default="fused", help="fused, unfused or both (comma-separated)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--out", default=os.path.join(HERE, "results", "bench_book_cpu.json"))
    args = p.parse_args(argv)
    losses = ["fused", "unfused"] if args.loss == "both" else args.loss.split(",")
    runs = []
    for backend in args.backends.split(","):
        for dtype in args.dtypes.split(","):
            for loss in losses:
                print(f"book experiment: backend {backend}, {dtype}, {loss} loss, {args.epochs} epochs ...", flush=True)
                r = run_book(backend, dtype, loss, args.epochs)
                runs.append(r)
                last = r["evals"][-1]
                print(f"  {r['seconds']:.0f} s, {r['steps']} steps, final train {last[1]:.4f} val {last[2]:.4f}",
                      flush=True)
    fused = {(r["backend"], r["dtype"]): r for r in runs if r["loss"] == "fused"}
    for r in runs:                                       # the loss paths side by side: largest difference
        twin = fused.get((r["backend"], r["dtype"]))
        if r["loss"] == "unfused" and twin:
            r["max_loss_diff_vs_fused"] = max(max(abs(a[1] - b[1]), abs(a[2] - b[2]))
                                              for a, b in zip(r["evals"], twin["evals"]))
            print(f"  {r['backend']} {r['dtype']}: largest printed-loss difference fused vs unfused "
                  f"{r['max_loss_diff_vs_fused']:.2e}")
    env = {"device": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
           "torch": torch.__version__, "python": sys.version.split()[0],
           "date": datetime.datetime.now().isoformat(timespec="seconds")}
    try:
        with open("/proc/cpuinfo") as f:
            env["device"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"environment": env, "settings": BOOK, "runs": runs}, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
