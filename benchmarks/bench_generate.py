"""Decoding speed: tokens/s of greedy generation with the KV cache, against the memory it must read.

    python benchmarks/bench_generate.py                      # gpt2-124m and book-124m, batch 1 and 8, 200 tokens
    python benchmarks/bench_generate.py --presets gpt2-124m --batch-sizes 1 --quantize int8 --new-tokens 50

Decoding one token reads every weight once (plus the KV cache so far), so a step is bound by memory
bandwidth: each row reports the bytes a step reads (weights + the average cache), the GB/s that
makes, and its share of the read bandwidth measured in the same run (a sum over 256 MiB). Rows:

- `baseline`: the generation loop as it was before this benchmark's kernels (the whole prompt
  through the LM head, the sequence grown by torch.cat every token), `torch` backend, float32 weights;
- one row per --quantize mode (none, bf16, int8) with --backend (default `auto`): `gptfast.generate`;
- with --compile MODES, those modes again with the one-token step compiled (torch.compile; the
  compilation happens in the warm-up and is reported apart);
- with --per-block MODES, those modes again with one fused op a block (ops.decode_block(_llama)) instead of one
  for the whole token (ops.decode_model): what the whole-model step buys;
- with --op-by-op MODES, those modes again with each block's decoding step run op by op instead of
  as one fused op (ops.decode_block, where the backend has it): what the fusion buys;
- with --peers transformers, transformers' own `generate` (greedy, KV cache, float32, attn_implementation
  "sdpa") on the same weights, exported with gptfast's exporter and loaded by transformers in this process;
- with --peers llama.cpp (where llama-cpp-python and gguf are installed: an optional benchmark extra), llama.cpp
  on the same weights written as GGUF files of each --llama-cpp-types type (f32, q8_0, q4_0, q4_0+q8_0;
  llama_cpp_peer.py), greedy, one token a call, batch 1 only; with --llama-cpp-bin DIR (or GPTFAST_LLAMA_CPP_BIN),
  llama.cpp's own `llama-batched-bench` from a llama.cpp build instead, at every batch size (no Python in its loop;
  its tokens are not compared).

Configurations take turns within each of --rounds rounds (the median is reported), so drift in the
machine's speed hits them alike. Prefill (time to the first token) is timed apart from decoding.
Random weights decode as fast as trained ones (same shapes, same work); the tokens each row picks are
compared with the baseline's (agreement: the share of equal tokens up to the first difference).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass

import tempfile

import torch

from gptfast.generate import generate_tokens
from gptfast.model import LlamaModel, build_model, config_from_preset, export_hf, export_llama, quantization_of, quantize

PEERS = ("transformers", "llama.cpp")
GGUF_DIR = tempfile.TemporaryDirectory(prefix="gptfast-gguf-")   # llama.cpp rows' files, removed at exit


@torch.no_grad()
def baseline_generate_tokens(model, idx, max_new_tokens):
    """The greedy KV-cache loop of gptfast.generate before the decoding work (2026-12-03), kept as the
    yardstick: the prefill computes (B, T, V) logits and keeps the last row; tokens are appended by
    torch.cat."""
    model.eval()
    cache = model.new_kv_cache(idx.shape[0], length=idx.shape[1] + max_new_tokens)
    V = model.cfg.vocab_size
    logits = model(idx, cache=cache, start_pos=0)[:, -1, :V]
    pos = idx.shape[1]
    for step in range(max_new_tokens):
        idx_next = logits.argmax(dim=-1, keepdim=True)
        idx = torch.cat((idx, idx_next), dim=1)
        yield idx_next
        if step + 1 == max_new_tokens:
            break
        logits = model(idx_next, cache=cache, start_pos=pos)[:, -1, :V]
        pos += 1


class StepTimes:
    """A transformers streamer that notes when each step's tokens arrive (the first `put` is the prompt)."""

    def __init__(self):
        self.times, self.tokens = [], []

    def put(self, value):
        self.times.append(time.perf_counter())
        self.tokens.append(value.reshape(-1, 1) if len(self.times) > 1 else value)

    def end(self):
        pass


def transformers_timed_run(model, idx, max_new_tokens) -> tuple[float, float, torch.Tensor]:
    """transformers' generate, greedy with its KV cache, exactly max_new_tokens tokens: (seconds to the first token,
    seconds for the rest, tokens (B, n)), from the streamer's timestamps."""
    steps = StepTimes()
    t0 = time.perf_counter()
    model.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=max_new_tokens,
                   min_new_tokens=max_new_tokens, do_sample=False, use_cache=True, streamer=steps, pad_token_id=0)
    end = time.perf_counter()
    return steps.times[1] - t0, end - steps.times[1], torch.cat(steps.tokens[1:], dim=1)


def transformers_model(model, folder: str):
    """`model`'s float32 weights as transformers' own model (GPT2LMHeadModel, LlamaForCausalLM, Qwen3ForCausalLM),
    attn_implementation "sdpa" - written by gptfast's exporter, read back by transformers."""
    import transformers

    (export_llama if isinstance(model, LlamaModel) else export_hf)(model, folder, force=True)
    # (float32: the dtype the exported config.json names)
    return transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa").eval()


def timed_run(tokens_iter, sync) -> tuple[float, float, torch.Tensor]:
    """(seconds to the first token, seconds for the rest, tokens (B, n))."""
    t0 = time.perf_counter()
    out = []
    first = None
    for tok in tokens_iter:
        sync()
        out.append(tok)
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    return first - t0, end - first, torch.cat(out, dim=1)


def bytes_per_step(model, batch: int, cache_positions: float) -> tuple[int, int]:
    """(bytes of weights a decoding step reads, bytes of KV cache it reads at `cache_positions` positions).
    Weights: every buffer and parameter but the embedding tables, of which a step reads `batch` rows
    (position rows and, unless tied into the quantized head, token rows)."""
    weights = 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if name in ("tok_emb.weight", "pos_emb.weight"):
            weights += batch * t.shape[1] * t.element_size()
        else:
            weights += t.numel() * t.element_size()
    if model.cfg.tie_embeddings and quantization_of(model) is None:
        weights += model.out_head.weight.numel() * model.out_head.weight.element_size()   # counted once above
    cfg = model.cfg
    kv_width = getattr(cfg, "n_kv_heads", cfg.n_heads) * cfg.head_dim        # grouped-query: n_kv_heads heads
    cache = 2 * cfg.n_layers * batch * cache_positions * kv_width * torch.finfo(model.dtype).bits // 8
    return weights, int(cache)


def read_bandwidth(device) -> float:
    """GB/s of summing 256 MiB of float32 (2 GiB on a GPU, whose HBM reads that in under a ms), reading
    alone, median of 10."""
    x = torch.randn(1 << (29 if device.type == "cuda" else 26), device=device)
    times = []
    for _ in range(12):
        t0 = time.perf_counter()
        x.sum().item()
        times.append(time.perf_counter() - t0)
    return x.numel() * 4 / statistics.median(times[2:]) / 1e9


def environment(device) -> dict:
    from gptfast import ops

    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    if device.type == "cpu":
        try:
            with open("/proc/cpuinfo") as f:
                name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
    try:
        isa = ops.get_backend("extension").build_info()["cpu_isa"]
    except ops.BackendError:
        isa = "none (extension unavailable)"
    return {"device": name, "device_type": device.type, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu_isa": isa, "date": datetime.datetime.now().isoformat(timespec="seconds")}


@dataclass(frozen=True)
class Config:
    """One configuration of a row: what runs, said as data (the label is only for display)."""
    label: str
    backend: str                   # op backend ("torch" for the baseline)
    quantize: str                  # none | bf16 | int8
    baseline: bool = False         # the generation loop as it was before the decoding work
    fused: bool | str = True       # the token as one op (ops.decode_model), "blocks": one op a block, False: op by op
    compiled: bool = False         # the one-token step compiled (torch.compile)
    peer: str | None = None        # another tool's generation ("transformers", "llama.cpp")
    gguf_type: str | None = None   # llama.cpp: the GGUF file's weight type
    llama_cpp_bin: str | None = None   # llama.cpp: its build's bin folder (llama-batched-bench), else llama-cpp-python

    def runs_batch(self, batch: int) -> bool:
        return self.peer != "llama.cpp" or batch == 1 or self.llama_cpp_bin is not None

    def timed(self, model, prompt, n, sync) -> tuple[float, float, torch.Tensor]:
        """(seconds to the first token, seconds for the rest, tokens (B, n))."""
        if self.peer == "llama.cpp":
            return model.timed(prompt, n)
        if self.peer == "transformers":
            with torch.no_grad():
                return transformers_timed_run(model, prompt, n)
        return timed_run(self.tokens(model, prompt, n), sync)

    def tokens(self, model, prompt, n):
        if self.baseline:
            return baseline_generate_tokens(model, prompt, n)
        return generate_tokens(model, prompt, n, compile=self.compiled, fused_decoding=self.fused)


def configurations(args) -> list[Config]:
    modes, b = args.quantize.split(","), args.backend
    configs = [] if args.no_baseline else [Config("baseline", "torch", "none", baseline=True)]
    configs += [Config(f"{b} {m}", b, m) for m in modes]
    configs += [Config(f"{b} {m} per-block", b, m, fused="blocks") for m in args.per_block.split(",") if m]
    configs += [Config(f"{b} {m} op-by-op", b, m, fused=False) for m in args.op_by_op.split(",") if m]
    configs += [Config(f"{b} {m} compiled", b, m, compiled=True) for m in args.compile.split(",") if m]
    configs += [Config(f"{p} generate", "torch", "none", peer=p) for p in args.peers.split(",")
                if p and p != "llama.cpp"]
    if "llama.cpp" in args.peers.split(","):
        configs += [Config(f"llama.cpp {t}", "torch", "none", peer="llama.cpp", gguf_type=t,
                           llama_cpp_bin=args.llama_cpp_bin) for t in args.llama_cpp_types.split(",")]
    return configs


def build_models(preset: str, configs: list[Config], device) -> tuple[dict, torch.nn.Module]:
    """({config: its model}, the float32 model): one float32 model, copied and quantized once per mode (compiled
    rows share their mode's model; a peer gets the same weights in its own model)."""
    torch.manual_seed(0)
    ours = next((c.backend for c in configs if not (c.baseline or c.peer)), "torch")   # the gptfast rows' backend
    fp32 = build_model(config_from_preset(preset, backend=ours)).to(device).eval()
    quantized, models = {}, {}
    for c in configs:
        if c.baseline:
            models[c] = copy.deepcopy(fp32).set_backend("torch")
            continue
        if c.peer == "transformers":
            with tempfile.TemporaryDirectory() as folder:
                models[c] = transformers_model(fp32, folder)
            continue
        if c.peer == "llama.cpp":
            from llama_cpp_peer import BatchedBenchRunner, LlamaCppRunner, write_gguf
            path = write_gguf(fp32, os.path.join(GGUF_DIR.name, f"{preset}-{c.gguf_type}.gguf"), c.gguf_type)
            if c.llama_cpp_bin:
                models[c] = BatchedBenchRunner(path, fp32.cfg.context_length, torch.get_num_threads(), c.llama_cpp_bin)
            else:
                models[c] = LlamaCppRunner(path, n_ctx=fp32.cfg.context_length, threads=torch.get_num_threads())
            models[c].file_bytes = os.path.getsize(path)
            continue
        if c.quantize not in quantized:
            t0 = time.perf_counter()
            quantized[c.quantize] = quantize(copy.deepcopy(fp32), c.quantize)
            if c.quantize != "none":
                print(f"  ({preset}: quantize to {c.quantize} took {time.perf_counter() - t0:.2f} s)")
        model = quantized[c.quantize]
        models[c] = model
    return models, fp32


def time_batch(models: dict, prompt, args, sync) -> tuple[dict, dict, dict]:
    """Warm-up (kernels loaded, allocator caches filled, compiled steps compiled), then --rounds interleaved
    rounds: ({config: [(prefill s, decode s)]}, {config: tokens}, {config: compile s})."""
    compile_s = {}
    models = {c: m for c, m in models.items() if c.runs_batch(prompt.shape[0])}
    for c, model in models.items():
        t0 = time.perf_counter()
        c.timed(model, prompt, 4, sync)
        if c.compiled:
            compile_s[c] = time.perf_counter() - t0
            print(f"  (batch {prompt.shape[0]}: {c.label}: compiling and 4 tokens took {compile_s[c]:.1f} s)")
    runs, tokens = {c: [] for c in models}, {}
    for _ in range(args.rounds):
        for c, model in models.items():
            prefill, decode, tokens[c] = c.timed(model, prompt, args.new_tokens, sync)
            runs[c].append((prefill, decode))
    return runs, tokens, compile_s


def result_row(c: Config, model, preset, batch, args, runs, tokens, compile_s, ref, fp32) -> dict:
    prefill, decode = (statistics.median(r[i] for r in runs) for i in (0, 1))
    steps = args.new_tokens - 1
    # a peer's model reads what our float32 model reads (the same weights); llama.cpp: its file's tensors
    w_bytes, c_bytes = bytes_per_step(fp32 if c.peer else model, batch, args.prompt_tokens + args.new_tokens / 2)
    if c.peer == "llama.cpp":
        w_bytes = model.file_bytes
    agree = None
    if ref is not None and tokens is not None:
        same = (tokens == ref).all(dim=0).long()
        agree = int(same.cumprod(0).sum()) / same.numel()
    return {"preset": preset, "batch": batch, "path": c.label, "backend": c.backend, "quantize": c.quantize,
            "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "tokens_per_s": batch * steps / decode,
            "tokens_per_s_rounds": [batch * steps / r[1] for r in runs],
            "prefill_ms": prefill * 1e3, "decode_s": decode, "weight_bytes_per_step": w_bytes,
            "cache_bytes_per_step": c_bytes, "GBps": (w_bytes + c_bytes) * steps / decode / 1e9,
            "agreement_with_baseline": agree, "compiled": c.compiled, "peer": c.peer,
            "fused_decoding": not (c.baseline or c.peer) and (c.fused if c.fused == "blocks" else bool(c.fused)),
            "compile_s": compile_s.get(c)}


def print_rows(rows, ceiling):
    for r in rows:
        r["percent_of_read"] = 100 * r["GBps"] / ceiling
        # the floor: tokens/s if a step took exactly its bytes at the read bandwidth
        r["floor_tokens_per_s"] = r["batch"] * ceiling * 1e9 / (r["weight_bytes_per_step"] + r["cache_bytes_per_step"])
        vs = f"{r['vs_baseline']:.2f}x" if r.get("vs_baseline") else "-"
        agree = f"{r['agreement_with_baseline']:.2f}" if r["agreement_with_baseline"] is not None else "-"
        print(f"{r['preset']:<11}{r['batch']:>6}  {r['path']:<26}{r['tokens_per_s']:>10.1f}{r['prefill_ms']:>11.1f}"
              f"{(r['weight_bytes_per_step'] + r['cache_bytes_per_step']) / 1e6:>9.0f}{r['GBps']:>7.1f}"
              f"{r['percent_of_read']:>7.0f}%{vs:>8}{agree:>7}{r['floor_tokens_per_s']:>8.0f}")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--presets", default="gpt2-124m,book-124m")
    p.add_argument("--backend", default="auto", help="op backend of the gptfast rows (the baseline runs torch)")
    p.add_argument("--quantize", default="none,bf16,int8", help="comma-separated: none, bf16, int8")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=200)
    p.add_argument("--rounds", type=int, default=2, help="turns each configuration takes (median reported)")
    p.add_argument("--per-block", default="", help="comma-separated quantize modes to run again with one fused op a "
                   "block instead of one for the whole token (generate(..., fused_decoding=\"blocks\"))")
    p.add_argument("--op-by-op", default="", help="comma-separated quantize modes to run again with the fused "
                   "decoding block off (generate(..., fused_decoding=False))")
    p.add_argument("--compile", default="", help="comma-separated quantize modes to run again with compile=True "
                   "(the one-token step as a torch.compile graph; its compile time is reported, not timed)")
    p.add_argument("--peers", default="", help=f"comma-separated other tools to run on the same weights: "
                   f"{', '.join(PEERS)}")
    p.add_argument("--llama-cpp-types", default="f32,q8_0,q4_0", help="GGUF weight types of the llama.cpp rows "
                   "(q4_0+q8_0: 4-bit blocks, an 8-bit token embedding / LM head, as gptfast's int4 modes)")
    p.add_argument("--llama-cpp-bin", default=os.environ.get("GPTFAST_LLAMA_CPP_BIN"),
                   help="a llama.cpp build's bin folder: its llama-batched-bench times the llama.cpp rows at every "
                   "batch size (default $GPTFAST_LLAMA_CPP_BIN; unset: llama-cpp-python, batch 1)")
    p.add_argument("--no-baseline", action="store_true", help="leave out the baseline row (not for the record)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    for flag, value in (("--compile", args.compile), ("--op-by-op", args.op_by_op), ("--per-block", args.per_block)):
        extra = [m for m in value.split(",") if m and m not in args.quantize.split(",")]
        if extra:
            p.error(f"{flag} {','.join(extra)}: each mode must also be in --quantize ({args.quantize})")
    unknown = [x for x in args.peers.split(",") if x and x not in PEERS]
    if unknown:
        p.error(f"--peers {','.join(unknown)}: choose from {', '.join(PEERS)}")
    if "llama.cpp" in args.peers.split(","):
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from llama_cpp_peer import GGUF_TYPES, available
        why = available(args.llama_cpp_bin)
        if why is not None:
            p.error(f"--peers llama.cpp: {why}")
        bad = [t for t in args.llama_cpp_types.split(",") if t not in GGUF_TYPES]
        if bad:
            p.error(f"--llama-cpp-types {','.join(bad)}: choose from {', '.join(GGUF_TYPES)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    env = environment(device)
    env["read_GBps_before"] = read_bandwidth(device)
    print(f"{env['device']} | {env['cpu_isa']} kernels | torch {env['torch']} | {env['threads']} threads | "
          f"read ceiling {env['read_GBps_before']:.1f} GB/s | prompt {args.prompt_tokens}, {args.new_tokens} new tokens, "
          f"greedy, median of {args.rounds} interleaved rounds")
    header = (f"{'preset':<11}{'batch':>6}  {'path':<26}{'tokens/s':>10}{'prefill ms':>11}{'MB/step':>9}"
              f"{'GB/s':>7}{'% read':>8}{'vs base':>8}{'agree':>7}{'floor':>8}")
    print(header + "\n" + "-" * len(header))
    configs, rows = configurations(args), []
    for preset in args.presets.split(","):
        models, fp32 = build_models(preset, configs, device)
        for batch in map(int, args.batch_sizes.split(",")):
            prompt = torch.randint(0, min(50257, fp32.cfg.vocab_size), (batch, args.prompt_tokens), device=device)
            runs, tokens, compile_s = time_batch(models, prompt, args, sync)
            ref = next((tokens[c] for c in models if c.baseline), None)
            batch_rows = [result_row(c, m, preset, batch, args, runs[c], tokens[c], compile_s, ref, fp32)
                          for c, m in models.items() if c in runs]
            base = next((r["tokens_per_s"] for r in batch_rows if r["path"] == "baseline"), None)
            for r in batch_rows:
                r["vs_baseline"] = r["tokens_per_s"] / base if base else None
            rows += batch_rows
    env["read_GBps_after"] = read_bandwidth(device)
    print_rows(rows, max(env["read_GBps_before"], env["read_GBps_after"]))
    print(f"read ceiling after: {env['read_GBps_after']:.1f} GB/s (the % column uses the higher of the two)")
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"bench_generate_{device.type}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        # the llama.cpp build by its folder's name, not this machine's path to it
        record = {**vars(args), "llama_cpp_bin": args.llama_cpp_bin and os.path.basename(os.path.normpath(
            args.llama_cpp_bin))}
        json.dump({"environment": env, "args": record, "results": rows}, f, indent=1)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
