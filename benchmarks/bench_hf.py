"""A Hugging Face GPT-2 training step with and without gptfast's kernels (gptfast.integrations.transformers).

    python benchmarks/bench_hf.py                          # GPT2Config() (124M), batch 2 x 1024, CPU float32
    python benchmarks/bench_hf.py --batch 8 --rounds 1     # the same table at batch 8
    python benchmarks/bench_hf.py --device cuda --dtype bfloat16 --batch 8 --configs unpatched,attention,patched,flash_attention_2
    python benchmarks/bench_hf.py --model qwen3-small --batch 8 --seq 128   # Qwen3ForCausalLM of a gptfast preset

Configurations, each a fresh process (so that its peak memory is its own), interleaved round by round:
  unpatched  transformers' GPT2LMHeadModel as it comes: attn_implementation "sdpa", nn.LayerNorm, gelu_new,
             logits (B, T, 50257) then the loss;
  attention  attn_implementation="gptfast" alone;
  patched    apply_gptfast(model, backend): attention, LayerNorm, GELU and the LM head fused with the loss;
  flash_attention_2  (GPU, where the flash-attn package is installed; 16-bit only) transformers' FlashAttention-2.
For --model <a Llama/Qwen3 preset of gptfast> the model is transformers' LlamaForCausalLM / Qwen3ForCausalLM with
the preset's shapes (no dropout, as those models have none), and `patched` means apply_gptfast's Llama patches:
attention, RMSNorm, SwiGLU, RoPE and the fused loss. Same random weights (seeded), random tokens with labels =
input ids, and a step = forward + backward + AdamW (torch.optim, foreach). Reported: median seconds per step over
the timed steps (after warm-up), tokens/s, the process's peak resident memory (VmHWM), and the part of it above
the model's weights, gradients and AdamW state (peak - resident memory once the model is built - 3 x the
parameters' bytes): activations, logits and temporaries. Results: terminal and
benchmarks/results/bench_hf_<device>[_b<batch>].json / .md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

import torch

CONFIGS = ("unpatched", "attention", "patched", "flash_attention_2")
HERE = os.path.dirname(os.path.abspath(__file__))


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM"))


def transformers_model(name: str, layers: int):
    """(transformers' model, its vocabulary size): GPT-2 124M (`layers` blocks) for "gpt2", else the Llama/Qwen3
    model of gptfast's preset `name` (config.json as gptfast's exporter writes it)."""
    import transformers

    torch.manual_seed(0)
    if name == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=layers)), 50257
    from gptfast.model import config_from_preset
    from gptfast.model.llama_weights import hf_llama_config

    cfg = config_from_preset(name)
    hf = hf_llama_config(cfg)
    config = transformers.AutoConfig.for_model(**hf)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa"), cfg.vocab_size


def build(config: str, backend: str, device: str, layers: int = 12, model_name: str = "gpt2"):
    model, vocab = transformers_model(model_name, layers)
    model = model.to(device)
    if config == "flash_attention_2":
        model.set_attn_implementation("flash_attention_2")
    elif config in ("attention", "patched"):
        from gptfast.integrations.transformers import apply_gptfast

        patched = config == "patched"               # attention alone: the other patches off
        if model_name == "gpt2":
            apply_gptfast(model, backend=backend, layer_norm=patched, gelu=patched, loss=patched)
        else:
            apply_gptfast(model, backend=backend, rms_norm=patched, swiglu=patched, rope=patched, loss=patched)
    return model.train(), vocab


def worker(args) -> dict:
    """One configuration in this process: warm-up steps, then the timed ones."""
    device = torch.device(args.device)
    model, vocab = build(args.worker, args.backend, args.device, args.layers, args.model)
    built_mb = peak_rss_mb() if device.type == "cpu" else torch.cuda.memory_allocated() / 2**20
    state_mb = 3 * sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20   # grads + AdamW's two
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, vocab, (args.batch, args.seq), generator=gen).to(device)
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16"):
            loss = model(x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else peak_rss_mb())
    return {"config": args.worker, "step_s": times, "losses": losses, "peak_mb": peak,
            "above_state_mb": peak - built_mb - state_mb}


def environment(args) -> dict:
    import transformers

    sys.path.insert(0, HERE)
    from bench_ops import cpu_name

    from gptfast.compiled import cpu_flags

    flags = cpu_flags() or set()
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"{cpu_name()} ({', '.join(isa)})"
    return {"device": name, "torch": torch.__version__, "transformers": transformers.__version__,
            "threads": torch.get_num_threads(), "dtype": args.dtype, "batch": args.batch, "seq": args.seq, "backend": args.backend,
            "layers": args.layers, "model": args.model, "date": datetime.date.today().isoformat(), "warmup": args.warmup, "steps": args.steps,
            "rounds": args.rounds}


def run_rounds(args) -> dict:
    """Every configuration once per round, each in its own process; the rounds' step times pooled."""
    pooled = {c: {"step_s": [], "peak_mb": [], "above_state_mb": [], "losses": None} for c in args.configs}
    base = [sys.executable, os.path.abspath(__file__), "--batch", str(args.batch), "--seq", str(args.seq),
            "--steps", str(args.steps), "--warmup", str(args.warmup), "--backend", args.backend,
            "--device", args.device, "--dtype", args.dtype, "--layers", str(args.layers), "--model", args.model]
    for r in range(args.rounds):
        for c in args.configs:
            out = subprocess.run(base + ["--worker", c], capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"bench_hf.py: configuration {c} failed:\n{out.stderr[-3000:]}")
            res = json.loads(out.stdout.strip().splitlines()[-1])
            pooled[c]["step_s"] += res["step_s"]
            pooled[c]["peak_mb"].append(res["peak_mb"])
            pooled[c]["above_state_mb"].append(res["above_state_mb"])
            pooled[c]["losses"] = res["losses"]
            print(f"  round {r + 1}/{args.rounds} {c:10s} steps {' '.join(f'{t:.2f}' for t in res['step_s'])} s, "
                  f"peak {res['peak_mb']:.0f} MB", flush=True)
    return pooled


def table(env: dict, pooled: dict) -> tuple[list, str]:
    rows = []
    base = statistics.median(pooled["unpatched"]["step_s"]) if "unpatched" in pooled else None
    for c, p in pooled.items():
        med = statistics.median(p["step_s"])
        rows.append({"config": c, "median_step_s": med, "min_step_s": min(p["step_s"]), "n": len(p["step_s"]),
                     "tokens_per_s": env["batch"] * env["seq"] / med, "peak_mb": max(p["peak_mb"]),
                     "above_state_mb": max(p["above_state_mb"]),
                     "speedup_vs_unpatched": base / med if base else None, "first_losses": p["losses"]})
    above = rows[[r["config"] for r in rows].index("unpatched")]["above_state_mb"] if base else None
    for r in rows:
        r["above_state_vs_unpatched"] = r["above_state_mb"] / above if above else None
    model = (f"GPT2Config({'' if env['layers'] == 12 else 'n_layer=' + str(env['layers'])}), dropout 0.1"
             if env["model"] == "gpt2" else f"transformers' model of gptfast's {env['model']} preset")
    lines = [f"Device: {env['device']} | torch {env['torch']} | transformers {env['transformers']} | threads "
             f"{env['threads']} | {model}, batch {env['batch']} x {env['seq']}, {env['dtype']} | "
             f"backend {env['backend']} | {env['date']}", "",
             "| configuration | median s/step (n) | tokens/s | vs unpatched | peak memory | above weights, grads, AdamW "
             "(vs unpatched) |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['median_step_s']:.2f} ({r['n']}) | {r['tokens_per_s']:.0f} | "
                     + (f"{r['speedup_vs_unpatched']:.2f}x" if r["speedup_vs_unpatched"] else "(not run)")
                     + f" | {r['peak_mb'] / 1024:.2f} GB | {r['above_state_mb']:.0f} MB"
                     + (f" ({r['above_state_vs_unpatched']:.2f}x)" if r["above_state_vs_unpatched"] else "") + " |")
    return rows, "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=3, help="timed steps per process")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2, help="processes per configuration, interleaved")
    p.add_argument("--backend", default="auto", help="gptfast backend of the attention and patched rows")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--model", default="gpt2", help="gpt2, or a Llama/Qwen3 preset of gptfast (qwen3-small, "
                   "qwen3-0.6b, llama3.2-1b, ...): transformers' own model of that shape")
    p.add_argument("--layers", type=int, default=12, help="GPT2Config's n_layer (12: GPT-2 124M; fewer: a smoke run)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="bfloat16: the forward and loss under autocast (weights and AdamW stay float32)")
    p.add_argument("--configs", default=",".join(CONFIGS[:3]), type=lambda s: s.split(","),
                   help=f"comma-separated, from {', '.join(CONFIGS)}")
    p.add_argument("--out", default=None, help="results file stem (default benchmarks/results/bench_hf_<device>...)")
    p.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    unknown = set(args.configs) - set(CONFIGS)
    if unknown:
        p.error(f"--configs: unknown {sorted(unknown)}; choose from {', '.join(CONFIGS)}")
    env = environment(args)
    print(f"bench_hf: {env['device']}, batch {args.batch} x {args.seq}, {args.rounds} round(s) of "
          f"{', '.join(args.configs)}", flush=True)
    rows, md = table(env, run_rounds(args))
    print("\n" + md)
    stem = args.out or os.path.join(HERE, "results", f"bench_hf_{args.device}"
                                    + ("" if args.model == "gpt2" else f"_{args.model}") + ("" if args.batch == 2 else
                                                                                  f"_b{args.batch}")
                                    + ("" if args.dtype == "float32" else "_bf16"))
    with open(stem + ".json", "w") as f:
        json.dump({"env": env, "results": rows}, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(md + "\n")
    print(f"\nwritten: {stem}.json, {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
