"""End-to-end training throughput: tokens/s, peak memory and MFU of real training steps.

    python benchmarks/bench_train.py --device cpu                       # cpu-small, torch + extension
    python benchmarks/bench_train.py --device cuda --preset gpt2-124m   # bf16 autocast, eager and compiled

Each configuration (op backend x torch.compile on/off) trains the same freshly seeded model on
random token batches: warm-up steps first (compilation, autotuning), then the median step time
over the timed steps, with the device synchronized around every step. Tokens/s = B*T / step time.
MFU = tokens/s * FLOPs per token / the device's peak, FLOPs per token = 6N + 12*L*C*T (N: parameters
without the position embeddings; the second term is attention's QK^T and PV); the peak comes from a
table of vendor dense bf16/tf32 figures looked up by the device's name - no peak is assumed for a
device not in the table (MFU is then left out). Results: terminal, benchmarks/results/bench_train_<device>.json
and .md. The baseline to beat on GPU is the `torch` backend (SDPA) under torch.compile, in the same run.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch

from gptfast import ops
from gptfast.model import build_model, config_from_preset
from gptfast.training import make_optimizer
from gptfast.training.precision import keep_working_copies, refresh_working_copies
from gptfast.training.optim import resolve_precision

# Vendor dense peaks in TFLOP/s (no sparsity): (name substring, bf16/fp16, tf32). First match wins.
PEAKS = [("H100 PCIe", 756.0, 378.0), ("H100", 989.4, 494.7), ("H200", 989.4, 494.7), ("GH200", 989.4, 494.7),
         ("A100", 312.0, 156.0), ("L40S", 362.0, 183.0), ("L4", 121.0, 60.0), ("A10G", 70.0, 35.0),
         ("A10", 125.0, 62.5), ("RTX 4090", 165.2, 82.6), ("V100", 125.0, None)]


def peak_tflops(device_name: str, dtype: torch.dtype) -> float | None:
    for key, half, tf32 in PEAKS:
        if key in device_name:
            return half if dtype in (torch.bfloat16, torch.float16) else tf32
    return None


def flops_per_token(model, T: int) -> float:
    """6 N (the matmuls, forward + backward; position tables excluded) + attention's 12 L H hs T."""
    cfg = model.cfg
    pos = getattr(model, "pos_emb", None)
    n = model.num_parameters() - (pos.weight.numel() if pos is not None else 0)
    return 6 * n + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * T


def cpu_peak_rss_reset() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def cpu_status_mb(key: str) -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def time_steps(step, device, steps: int, warmup: int):
    """(warm-up seconds, step times, the last loss, peak memory growth MB, process peak MB) of `steps` timed steps
    after `warmup` untimed ones."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    for i in range(warmup):
        step(i)
    sync()
    warmup_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        base_mb = cpu_status_mb("VmRSS")
        cpu_peak_rss_reset()
    times = []
    for i in range(steps):
        sync()
        t0 = time.perf_counter()
        loss = step(i)
        sync()
        times.append(time.perf_counter() - t0)
    peak_mb = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
               else cpu_status_mb("VmHWM") - base_mb)
    # what must fit in the machine: everything the process held at its peak (weights, optimizer
    # state, activations; on CUDA what the caching allocator reserved)
    process_peak_mb = (torch.cuda.max_memory_reserved(device) / 2**20 if device.type == "cuda"
                       else cpu_status_mb("VmHWM"))
    return warmup_s, times, loss, peak_mb, process_peak_mb


def run_config(preset: str, backend: str, compile_model: bool, device: torch.device, dtype: torch.dtype,
               batch_size: int, context_length: int | None, steps: int, warmup: int, seed: int = 0,
               vocab_multiple: int = 1, fused_loss: bool = True) -> dict:
    torch.manual_seed(seed)
    cfg = config_from_preset(preset, backend=backend, vocab_multiple=vocab_multiple)   # GPT-2 or Llama/Qwen3
    T = context_length or cfg.context_length
    model = build_model(cfg).to(device).train()
    optimizer = make_optimizer(model, lr=1e-4, weight_decay=0.1, device=device)   # what training uses
    if dtype != torch.float32:                   # as train.py: 16-bit working copies instead of per-forward casts
        keep_working_copies(model, dtype)
    step_model = torch.compile(model) if compile_model else model
    gen = torch.Generator().manual_seed(seed)
    batches = [torch.randint(0, cfg.vocab_size, (batch_size, T + 1), generator=gen).to(device) for _ in range(4)]
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def step(i: int) -> float:
        batch = batches[i % len(batches)]
        with autocast:
            if fused_loss:                       # what training runs: the LM head fused with the loss
                loss = step_model(batch[:, :-1], batch[:, 1:])
            else:                                # the (B, T, V) logits, then the loss
                logits = step_model(batch[:, :-1])
                loss = ops.cross_entropy(logits, batch[:, 1:], backend=backend)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        refresh_working_copies(model)            # (nothing to do in float32)
        return loss

    warmup_s, times, loss, peak_mb, process_peak_mb = time_steps(step, device, steps, warmup)
    step_s = statistics.median(times)
    tokens_per_s = batch_size * T / step_s
    fpt = flops_per_token(model, T)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    peak = peak_tflops(name, dtype) if device.type == "cuda" else None
    return {"preset": preset, "backend": backend, "compile": compile_model, "dtype": str(dtype).replace("torch.", ""),
            "loss": "fused" if fused_loss else "unfused",
            "batch_size": batch_size, "context_length": T, "parameters": model.num_parameters(),
            "vocab_rows": cfg.padded_vocab_size,
            "step_ms": step_s * 1e3, "tokens_per_s": tokens_per_s, "peak_memory_mb": peak_mb,
            "process_peak_mb": process_peak_mb,
            "warmup_s": warmup_s, "flops_per_token": fpt, "achieved_tflops": tokens_per_s * fpt / 1e12,
            "mfu": tokens_per_s * fpt / (peak * 1e12) if peak else None, "final_loss": float(loss.detach())}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--preset", default=None, help="default: gpt2-124m on CUDA, cpu-small on CPU")
    p.add_argument("--backends", default=None, help="comma-separated; default: auto,torch,extension (+triton on CUDA)")
    p.add_argument("--compile", default="both", choices=["off", "on", "both"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="autocast dtype; auto (the default, as train.py): bfloat16 where the hardware has bf16 "
                        "matrix instructions (CUDA sm_80+, avx512_bf16 / AMX CPUs), else float32")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--context-length", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--pad-vocab", action="store_true", help="pad the vocabulary to a multiple of 64 (50257 -> 50304)")
    p.add_argument("--loss", default="fused", choices=["fused", "unfused", "both"],
                   help="the LM head fused with the loss (what training runs), the logits then the loss, or both")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def run_all(backends, modes, losses, preset, device, dtype, batch_size, steps, args) -> list:
    """One row per backend x compile mode x loss that runs; those that cannot say why and are left out."""
    rows = []
    for backend in backends:
        for compile_model in modes:
            for fused_loss in losses:
                loss_name = "fused" if fused_loss else "unfused"
                try:
                    r = run_config(preset, backend, compile_model, device, dtype, batch_size, args.context_length,
                                   steps, args.warmup, vocab_multiple=64 if args.pad_vocab else 1, fused_loss=fused_loss)
                except Exception as err:   # an unavailable backend, out of memory, ...: report, go on
                    print(f"{backend:<11}{str(compile_model):<9}{loss_name:<9} skipped: {type(err).__name__}: "
                          f"{str(err).splitlines()[0][:100]}")
                    continue
                rows.append(r)
                mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
                print(f"{backend:<11}{str(compile_model):<9}{loss_name:<9}{r['step_ms']:>10.1f}{r['tokens_per_s']:>12,.0f}"
                      f"{r['achieved_tflops']:>9.2f}{mfu:>7}{r['peak_memory_mb']:>10.0f}{r['process_peak_mb']:>12.0f}{r['warmup_s']:>11.1f}")
    return rows


def write_results(args, env, rows, device, preset, dtype, batch_size) -> str:
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"bench_train_{device.type}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"environment": env, "results": rows}, f, indent=1)
    with open(out.removesuffix(".json") + ".md", "w") as f:
        f.write(f"Device: {env['device']} | torch {env['torch']} | {env['date']} | preset {preset} | {dtype} | "
                f"batch {batch_size}\n\n| backend | compile | loss | step ms | tokens/s | TFLOP/s | MFU | peak MB | process peak MB | "
                "vs torch baseline |\n|---|---|---|---|---|---|---|---|---|---|\n")
        for r in rows:
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
            vs = f"{r['speedup_vs_torch_baseline']:.2f}×" if r["speedup_vs_torch_baseline"] else "–"
            f.write(f"| {r['backend']} | {r['compile']} | {r['loss']} | {r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | "
                    f"{r['achieved_tflops']:.2f} | {mfu} | {r['peak_memory_mb']:.0f} | {r['process_peak_mb']:.0f} | {vs} |\n")
    return out


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    preset = args.preset or ("gpt2-124m" if cuda else "cpu-small")
    precision, why = resolve_precision(args.dtype, device)
    print(f"precision: {precision} ({why})")
    dtype = getattr(torch, precision)
    backends = args.backends.split(",") if args.backends else (["auto", "torch", "extension", "triton"] if cuda
                                                                else ["auto", "torch", "extension"])
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    batch_size = args.batch_size or (16 if cuda else 4)
    steps = args.steps or (20 if cuda else 5)
    env = {"device": torch.cuda.get_device_name(device) if cuda else (platform.processor() or "cpu"),
           "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "cpu_threads": torch.get_num_threads(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
           "pad_vocab": args.pad_vocab}
    print(f"device {env['device']} | torch {env['torch']} | preset {preset} | {dtype} | batch {batch_size} | "
          f"median of {steps} steps after {args.warmup} warm-up")
    losses = {"fused": [True], "unfused": [False], "both": [True, False]}[args.loss]
    header = f"{'backend':<11}{'compile':<9}{'loss':<9}{'step ms':>10}{'tokens/s':>12}{'TFLOP/s':>9}{'MFU':>7}{'peak MB':>10}{'process MB':>12}{'warm-up s':>11}"
    print(header)
    print("-" * len(header))
    rows = run_all(backends, modes, losses, preset, device, dtype, batch_size, steps, args)
    baseline = next((r for r in rows if r["backend"] == "torch" and r["compile"] and r["loss"] == "unfused"), None) or \
        next((r for r in rows if r["backend"] == "torch" and r["compile"]), None) or \
        next((r for r in rows if r["backend"] == "torch"), None)
    for r in rows:
        r["speedup_vs_torch_baseline"] = r["tokens_per_s"] / baseline["tokens_per_s"] if baseline else None
    out = write_results(args, env, rows, device, preset, dtype, batch_size)
    print(f"\nwrote {out} and its .md table")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
