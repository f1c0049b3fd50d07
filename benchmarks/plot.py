"""The pictures of the README and docs/, drawn from the committed benchmark results (no benchmark runs here).

    python benchmarks/plot.py                 # benchmarks/results/*.json -> docs/images/*.png

    ops_speedup.png      each fused op's forward+backward speed-up over PyTorch, one bar per shape
    decode_linear.png    the decoding step's linear layer (a few rows x a weight): ours over PyTorch per weight type
    lce_memory.png       peak memory of the LM head + loss: fused (chunks of logits) vs PyTorch (all the logits)
    decoding.png         decoding tokens/s per weight type and batch, against the memory-read ceiling
    book_loss.png        the book experiment's train/val loss, with the book's published final losses

Each figure names the device, its instruction set and the date of the run it draws.
"""
from __future__ import annotations

import argparse
import json
import os

from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
# The book's chapter 5 (train_model_simple, 10 epochs, the same settings): its printed last evaluation.
BOOK_FINAL = {"step": 85, "train": 0.391, "val": 6.452}
OPS_FILES = ["bench_ops_cpu.json", "bench_ops_cpu_dropout_add.json", "bench_ops_cpu_lce.json"]


def load(name: str) -> dict:
    with open(os.path.join(RESULTS, name)) as f:
        return json.load(f)


def where(env: dict) -> str:
    isa = (env.get("cpu_isa") or "ISA not recorded").replace("avx", "AVX")
    return f"{env['device']} ({isa}, {env.get('cpu_threads', env.get('threads', '?'))} threads), {env['date'][:10]}"


def shape_label(op: str, shape: list[int]) -> str:
    return f"{op}  {'x'.join(str(s) for s in shape)}"


def speedups(results: list[dict], mode: str, ours: str = "extension", base: str = "torch") -> list[tuple[str, float]]:
    """[(op and shape, base ms / ours ms)] for every (op, shape) measured on both backends in `mode`."""
    ms = {(r["op"], tuple(r["shape"]), r["backend"]): r["median_ms"] for r in results
          if r["mode"] == mode and "median_ms" in r}
    return [(shape_label(op, list(shape)), ms[(op, shape, base)] / ms[(op, shape, b)])
            for (op, shape, b) in ms if b == ours and (op, shape, base) in ms]


def bars(path: str, rows: list[tuple[str, float]], title: str, xlabel: str) -> None:
    fig = Figure(figsize=(7.5, 0.32 * len(rows) + 1.4), layout="constrained")
    ax = fig.add_subplot()
    labels, values = zip(*rows)
    ax.barh(range(len(rows)), values, color=["tab:green" if v >= 1 else "tab:red" for v in values])
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(1.0, color="black", linewidth=0.8)
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.2f}x", va="center", fontsize=7)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=9)
    fig.savefig(path, dpi=110)


def ops_speedup(out: str) -> str:
    rows, env = [], None
    for name in OPS_FILES:
        data = load(name)
        env = env or data["environment"]
        rows += speedups(data["results"], "fwd+bwd")
    path = os.path.join(out, "ops_speedup.png")
    bars(path, rows, f"fused ops, forward + backward, float32: ours (C++) over PyTorch\n{where(env)}",
         "speed-up over PyTorch (log scale; > 1: ours faster)")
    return path


def decode_linear(out: str) -> str:
    data = load("bench_ops_cpu_linear.json")
    path = os.path.join(out, "decode_linear.png")
    bars(path, speedups(data["results"], "fwd"), "decoding's linear layer (rows x out x in), by weight type: "
         f"ours over PyTorch\n{where(data['environment'])}", "speed-up over PyTorch (log scale)")
    return path


def lce_memory(out: str) -> str:
    data = load("bench_ops_cpu_lce.json")
    peak = {(tuple(r["shape"]), r["backend"]): r["peak_mb"] for r in data["results"] if r["mode"] == "peak_memory"}
    shapes = sorted({s for s, _ in peak})
    fig = Figure(figsize=(7, 3.4), layout="constrained")
    ax = fig.add_subplot()
    for j, (backend, label) in enumerate([("torch", "PyTorch: logits, then the loss"),
                                          ("extension", "fused: a chunk of logits at a time")]):
        xs = [i + (j - 0.5) * 0.38 for i in range(len(shapes))]
        ys = [peak[(s, backend)] / 1024 for s in shapes]
        ax.bar(xs, ys, width=0.38, label=label)
        for x, y in zip(xs, ys):
            ax.text(x, y, f"{y:.1f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(shapes)), [f"B*T {s[0]}, C {s[1]}, V {s[2]}" for s in shapes], fontsize=8)
    ax.set_ylabel("peak memory, forward + backward (GB)")
    ax.set_title(f"LM head + cross-entropy: memory\n{where(data['environment'])}", fontsize=9)
    ax.legend(fontsize=8)
    path = os.path.join(out, "lce_memory.png")
    fig.savefig(path, dpi=110)
    return path


def decoding(out: str) -> str:
    data = load("bench_generate_cpu_fused_record.json")
    rows = [r for r in data["results"] if r["preset"] == "gpt2-124m" and not r["compiled"]
            and (r["path"] == "baseline" or r["fused_decoding"])]
    fig = Figure(figsize=(7.5, 3.6), layout="constrained")
    for k, batch in enumerate(sorted({r["batch"] for r in rows})):
        ax = fig.add_subplot(1, 2, k + 1)
        mine = {}                                                # the best of the rounds, per configuration
        for r in rows:
            if r["batch"] == batch:
                key = "PyTorch ops, float32" if r["path"] == "baseline" else f"ours, {r['quantize'].replace('none', 'float32')}"
                mine[key] = max(mine.get(key, (0, 0)), (r["tokens_per_s"], r["floor_tokens_per_s"]))
        labels = list(mine)
        ax.bar(range(len(labels)), [mine[k][0] for k in labels], color="tab:blue", label="measured")
        ax.scatter(range(len(labels)), [mine[k][1] for k in labels], marker="_", s=600, color="tab:red",
                   label="memory-read ceiling", zorder=3)
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"batch {batch}", fontsize=9)
        ax.set_ylabel("tokens/s (all sequences)")
        ax.set_ylim(0, 1.25 * max(max(v) for v in mine.values()))
    ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(f"GPT-2 124M greedy decoding, random weights\n{where(data['environment'])}", fontsize=9)
    path = os.path.join(out, "decoding.png")
    fig.savefig(path, dpi=110)
    return path


def book_loss(out: str) -> str:
    data = load("bench_book_cpu.json")
    run = next(r for r in data["runs"] if r["loss"] == "fused")
    evals = run["evals"][1:]                                     # [0] is the evaluation before training
    fig = Figure(figsize=(6.5, 3.6), layout="constrained")
    ax = fig.add_subplot()
    ax.plot([e[0] for e in evals], [e[1] for e in evals], label="train (gptfast)")
    ax.plot([e[0] for e in evals], [e[2] for e in evals], linestyle="--", label="validation (gptfast)")
    ax.scatter([BOOK_FINAL["step"]] * 2, [BOOK_FINAL["train"], BOOK_FINAL["val"]], color="black", marker="x",
               zorder=3, label=f"the book's final losses ({BOOK_FINAL['train']}, {BOOK_FINAL['val']})")
    ax.set_xlabel("optimizer step (batch 2 x 256 tokens)")
    ax.set_ylabel("cross-entropy")
    ax.set_title(f"The book experiment: book-124m on The Verdict, 10 epochs\n{where(data['environment'])}", fontsize=9)
    ax.legend(fontsize=8)
    path = os.path.join(out, "book_loss.png")
    fig.savefig(path, dpi=110)
    return path


FIGURES = [ops_speedup, decode_linear, lce_memory, decoding, book_loss]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "images"), help="folder for the PNGs")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    for figure in FIGURES:
        print(f"wrote {os.path.relpath(figure(args.out))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
