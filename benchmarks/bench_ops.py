"""Time each op's backends side by side, with their error against a float64 reference.

    python benchmarks/bench_ops.py --device cpu            # GPT-2 shapes (a few minutes on 2 cores)
    python benchmarks/bench_ops.py --device cpu --quick    # small shapes, well under a minute
    python benchmarks/bench_ops.py --device cuda --sweep   # plus C up to 4096 and T from 128 to 4096

For every op of gptfast.ops with benchmark shapes (each op module's `bench_shapes` and `bench`: its shapes, its
inputs and the bytes or FLOPs of one call - the inference-only linear layers forward only, their weights read
from memory), mode (forward, forward+backward), shape and backend: the median time over repeated runs after
warm-up, the throughput (GB/s for memory-bound ops, GFLOP/s for compute-bound ones), the speed-up against
`reference` and the best PyTorch baseline, the max relative error ||out - ref|| / ||ref|| over outputs and
gradients against float64, and where the op asks for it (attention, the LM head + loss) the peak memory of one
forward+backward. Times are medians with 20th/80th percentiles;
on GPU, CUDA events with the L2 cache flushed before every timed call. Results go to the terminal,
to benchmarks/results/bench_ops_<device>.json (+ .md table; benchmarks/plot.py draws the pictures).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

from gptfast import ops
from gptfast.ops.spec import OPS, computes, op_for_key, table_keys

# triton on CPU runs in the interpreter (correct, ~1000x slower); torch.compile takes ~15 s per case on CPU
DEFAULT_BACKENDS = {"cpu": ["reference", "torch", "extension"],
                    "cuda": ["reference", "torch", "compiled", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn",
                             "extension", "extension-simt", "triton"]}


PYTORCH_BASELINES = ("torch", "compiled", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn")


def optional_backends() -> list[str]:
    """Rows for packages that happen to be installed: flash-attn (attention), Liger-Kernel."""
    import importlib.util

    found = []
    if importlib.util.find_spec("flash_attn") is not None:
        found.append("flash-attn")
    if importlib.util.find_spec("liger_kernel") is not None:
        found.append("liger")
    return found


def rel_error(out, ref):
    out, ref = out.double(), ref.double()
    return (torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref)).item()


_L2_FLUSH = {}


def flush_l2(device) -> None:
    """Overwrite a buffer larger than any L2 (256 MiB), so timed reads come from HBM."""
    if device.type != "cuda":
        return
    if device not in _L2_FLUSH:
        _L2_FLUSH[device] = torch.empty(64 << 20, dtype=torch.int32, device=device)
    _L2_FLUSH[device].zero_()


def timed_interleaved(steps: dict, device, repeats, warmup=2) -> dict:
    """Seconds per step as {name: (median, p20, p80)}; the backends take turns within each
    repeat, so slow drift (allocator state, clocks, other load) hits them all alike."""
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, fn in steps.items():
            if device.type == "cuda":
                flush_l2(device)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times[name].append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return {name: percentiles(t) for name, t in times.items()}


def percentiles(values) -> tuple[float, float, float]:
    v = sorted(values)
    at = lambda q: v[min(len(v) - 1, int(round(q * (len(v) - 1))))]  # noqa: E731
    return statistics.median(v), at(0.2), at(0.8)


def implementation(op, bench, name: str):
    """fn(*args) computing the bench's call the way `name` says: one of gptfast's op backends, "compiled"
    (torch.compile of the reference math), or another implementation the op names (its `peers`: SDPA pinned to
    one kernel, flash-attn, Liger, ...); None where there is none for this op."""
    if name in ops.known_backends():
        return (lambda *a: bench.call(*a, backend=name)) if computes(op, name) else None
    if name == "compiled":
        key = (bench.key, bench.shape)
        if key not in _compiled:
            _compiled[key] = torch.compile(lambda *a: bench.call(*a, backend="reference"))
        return _compiled[key]
    return op.peers(name, bench.key) if op.peers else None


_compiled = {}
WEIGHT_POOL_BYTES = 256 << 20


def bench_args(bench, device, dtype, grads: bool):
    """(the call's arguments at `dtype` - the float64 inputs cast, the extras as built -, the float64 ones)."""
    inputs64, extra = bench.inputs(torch.Generator().manual_seed(0))
    inputs64 = [t.to(device) for t in inputs64]
    extra = [t.to(device) if isinstance(t, torch.Tensor) else t for t in extra]
    args = [t.detach().to(dtype).requires_grad_(grads) for t in inputs64] + extra
    return args, [t.clone().requires_grad_(grads) for t in inputs64] + extra


def weight_pool(args: list, index: int | None):
    """For an op bound by reading one argument (the weights of a decoding layer): copies of it, enough to
    overflow the last-level cache, so each timed call reads the next copy from memory."""
    if index is None:
        return None
    w = args[index]
    copies = max(2, -(-WEIGHT_POOL_BYTES // max(w.numel() * w.element_size(), 1)))
    return [w] + [w.clone() for _ in range(copies - 1)]


def make_step(fn, args, mode, dout, pool, index):
    grads_of = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    turn = [0]

    def step():
        call_args = args
        if pool is not None:
            turn[0] = (turn[0] + 1) % len(pool)
            call_args = list(args)
            call_args[index] = pool[turn[0]]
        out = fn(*call_args)
        return (out, torch.autograd.grad(out, grads_of, dout)) if mode == "fwd+bwd" else (out, [])
    return step


def try_step(step, label):
    try:
        return step()
    except Exception as err:  # e.g. an SDPA kernel this GPU or dtype lacks: say so, go on
        print(f"  {label}: skipped ({type(err).__name__}: {str(err).splitlines()[0][:120]})")
        return None


def run_case(op, bench, mode, device, dtype, repeats, backends):
    """One op's rows at one shape and mode: every implementation's median time, throughput and error against
    the float64 reference (run once; timed too unless its bench says it takes minutes, or 16-bit on a CPU)."""
    grads = mode == "fwd+bwd"
    args, args64 = bench_args(bench, device, dtype, grads)
    with torch.set_grad_enabled(grads):
        ref_out = bench.call(*args64, backend="reference")
    dout64 = torch.ones((), dtype=torch.float64, device=device) if ref_out.dim() == 0 else \
        torch.randn(ref_out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device)
    refs = [ref_out] + list(torch.autograd.grad(ref_out, [a for a in args64 if isinstance(a, torch.Tensor) and
                                                           a.requires_grad], dout64) if grads else [])
    untimed_reference = not bench.time_reference or (device.type == "cpu" and dtype in (torch.bfloat16, torch.float16))
    pool = weight_pool(args, bench.weight_arg)
    steps, rows = {}, []
    for name in backends:
        fn = implementation(op, bench, name)
        if fn is None:
            continue
        row = {"op": bench.key, "mode": mode, "shape": list(bench.shape), "backend": name, "dtype": str(dtype),
               "unit": bench.unit}
        if name == "reference" and device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
            rows.append({**row, "max_rel_error": float("nan")})   # emulated 16-bit matmuls: minutes, not run
            continue
        step = make_step(fn, args, mode, dout64.to(dtype), pool, bench.weight_arg)
        with torch.set_grad_enabled(grads):
            got = try_step(step, f"{bench.key} {mode} {name}")
        if got is None:
            continue
        out, grad_list = got
        err = max(rel_error(a, b) for a, b in zip([out, *grad_list], refs))
        own_rng = name not in ops.known_backends() or not ops.shares_dropout_rng(
            name, device.type, str(dtype).replace("torch.", ""))
        rows.append({**row, "max_rel_error": float("nan") if bench.random and own_rng else err})
        if not (name == "reference" and untimed_reference):     # run once for its error, not timed
            steps[name] = step
    return finish_rows(rows, steps, bench.work(dtype, mode), device, grads, repeats)


def finish_rows(rows, steps, work, device, grads, repeats):
    """Time the steps and complete the rows: medians, throughput, speed-ups."""
    with torch.set_grad_enabled(grads):
        # the reference's large temporaries disturb the allocator and caches for whoever runs next, so it is
        # timed on its own; the fast backends take turns
        reference = steps.pop("reference", None)
        seconds = {"reference": (math.nan,) * 3} if reference is None else \
            timed_interleaved({"reference": reference}, device, repeats)
        seconds.update(timed_interleaved(steps, device, repeats))
    for r in rows:
        median, p20, p80 = seconds[r["backend"]]
        r.update(median_ms=median * 1e3, p20_ms=p20 * 1e3, p80_ms=p80 * 1e3, throughput=work / median / 1e9)
    ref_ms = next((r["median_ms"] for r in rows if r["backend"] == "reference"), math.nan)
    best_torch = min((r["median_ms"] for r in rows if r["backend"] in PYTORCH_BASELINES), default=None)
    for r in rows:
        r["speedup_vs_reference"] = ref_ms / r["median_ms"]
        r["speedup_vs_best_pytorch"] = best_torch / r["median_ms"] if best_torch else None
    return rows


def find_bench(key: str, shape: tuple):
    """(op, its Bench) for a table key at a shape."""
    op = op_for_key(key)
    return op, op.bench(key, tuple(shape))


def peak_memory_mb(backend, key, shape, dtype, device) -> float:
    """Peak memory growth of one forward+backward of the op of `key` at `shape` on `backend`.

    GPU: torch.cuda.max_memory_allocated around the call. CPU: in a fresh process, the kernel's
    high-water mark (VmHWM, reset through /proc/self/clear_refs) - not ru_maxrss, which a child
    inherits from its parent across fork + exec. The inputs exist before the measurement starts.
    """
    if device.type == "cuda":
        run = peak_case(key, shape, dtype, device)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run(backend)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    code = f"""
import sys, torch
sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
from bench_ops import peak_case
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024
run = peak_case({key!r}, {tuple(shape)}, {dtype}, "cpu", {backend!r})
base = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")       # reset the high-water mark to the current RSS
run({backend!r})
print(status("VmHWM") - base)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return float(result.stdout.strip()) if result.returncode == 0 else float("nan")


def peak_case(key, shape, dtype, device, backend=None):
    """run(backend): one forward+backward of the op of `key` at `shape`; its inputs made and the backend loaded
    (its compiled code mapped) before, so neither counts."""
    op, bench = find_bench(key, shape)
    args, _ = bench_args(bench, torch.device(device), dtype, grads=True)
    if backend is not None:
        ops.get_backend(backend)

    def run(backend):
        out = bench.call(*args, backend=backend)
        (out if out.dim() == 0 else out.sum()).backward()
    return run


def measure_ceilings(device, dtype) -> dict:
    """Attainable rates on this machine, measured now: a large copy (bytes read + written per
    second) and a large matmul (FLOP/s; bf16 on GPU, float32 on CPU) - yardsticks for memory- and compute-bound ops."""
    n = 1 << 26                                                  # 64 Mi elements: far beyond caches
    src = torch.randn(n, dtype=dtype, device=device)
    dst = torch.empty_like(src)
    copy_s = timed_interleaved({"copy": lambda: dst.copy_(src)}, device, 10)["copy"][0]
    read_s = timed_interleaved({"read": lambda: src.sum()}, device, 10)["read"][0]   # reading alone (the linear ops)
    m = 8192 if device.type == "cuda" else 2048
    # CPU: the float32 rate even for 16-bit runs - a CPU without bf16 matrix instructions emulates
    # 16-bit matmuls ~50x slower, which is no yardstick (our kernels compute in float32 there)
    mm_dtype = torch.bfloat16 if device.type == "cuda" else torch.float64 if dtype == torch.float64 else torch.float32
    a, b = (torch.randn(m, m, device=device).to(mm_dtype) for _ in range(2))
    mm_s = timed_interleaved({"mm": lambda: a @ b}, device, 5)["mm"][0]
    return {"copy_GBps": 2 * n * src.element_size() / copy_s / 1e9, "read_GBps": n * src.element_size() / read_s / 1e9,
            "matmul_GFLOPps": 2 * m ** 3 / mm_s / 1e9,
            "matmul": f"{m}^3 {mm_dtype}".replace("torch.", "")}


def environment(device, dtype, repeats) -> dict:
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
           "device_type": device.type,
           "cpu_threads": torch.get_num_threads(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "python": platform.python_version(), "dtype": str(dtype).replace("torch.", ""),
           "date": datetime.datetime.now().isoformat(timespec="seconds"), "repeats": repeats,
           "backends": ops.available_backends(), "cpu_isa": cpu_kernels_isa()}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def shapes(quick: bool, sweep: bool, device) -> dict:
    """{table key: [shapes]}: every op's own benchmark shapes (its module's bench_shapes)."""
    table = {}
    for op in OPS.values():
        if op.bench_shapes is not None:
            table.update(op.bench_shapes(device.type, quick, sweep))
    return table


def cpu_kernels_isa() -> str:
    """The instruction set our CPU kernels run with here (GPTFAST_CPU_ISA or the best available)."""
    try:
        return ops.get_backend("extension").build_info()["cpu_isa"]
    except ops.BackendError as err:
        if "GPTFAST_CPU_ISA" in str(err):
            raise SystemExit(f"bench_ops.py: {err}") from None
        return "none (extension unavailable)"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def markdown_table(env: dict, results: list) -> str:
    """The timing rows as a Markdown table, with the run's environment on top."""
    lines = [f"Device: {env['device']} | torch {env['torch']} | triton {env.get('triton')} | {env['dtype']} | "
             f"threads {env['cpu_threads']} | {env['date']} | ceilings: copy {env['ceilings']['copy_GBps']:.1f} GB/s, "
             f"matmul {env['ceilings']['matmul_GFLOPps']:.0f} GFLOP/s", "",
             "| op | mode | shape | backend | median ms (p20–p80) | throughput | % ceiling | vs reference | "
             "vs best PyTorch | rel. error |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "median_ms" not in r:
            continue
        vs_torch = f"{r['speedup_vs_best_pytorch']:.2f}×" if r.get("speedup_vs_best_pytorch") else "–"
        lines.append(f"| {r['op']} | {r['mode']} | {'×'.join(map(str, r['shape']))} | {r['backend']} | "
                     f"{r['median_ms']:.3f} ({r['p20_ms']:.3f}–{r['p80_ms']:.3f}) | {r['throughput']:.2f} {r['unit']} | "
                     f"{r['percent_of_ceiling']:.1f}% | {r['speedup_vs_reference']:.2f}× | {vs_torch} | "
                     f"{r['max_rel_error']:.1e} |")
    memory = [r for r in results if r.get("mode") == "peak_memory"]
    if memory:
        lines += ["", "| peak memory of one fwd+bwd | shape | backend | MB |", "|---|---|---|---|"]
        lines += [f"| {r['op']} | {'×'.join(map(str, r['shape']))} | {r['backend']} | {r['peak_mb']:.0f} |"
                  for r in memory]
    return "\n".join(lines) + "\n"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--quick", action="store_true", help="small shapes, few repeats (a smoke run)")
    p.add_argument("--sweep", action="store_true", help="also C up to 4096 and T from 128 to 4096")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--backends", default=None, help="comma-separated; default: reference,torch,extension on CPU; "
                   "on CUDA also torch.compile (compiled), sdpa-flash/efficient/cudnn and triton; flash-attn and "
                   "liger rows are added when those packages are installed")
    p.add_argument("--shape", action="append", default=[], metavar="OP=AxBxC",
                   help="measure OP at this shape instead of its default shapes (repeatable), e.g. the LM head + "
                        "loss at 128x768x50257 where its default shapes would take hours")
    p.add_argument("--ops", default=None, help="comma-separated subset of: " + ", ".join(table_keys()))
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/bench_ops_<device>.json)")
    p.add_argument("--cpu-isa", default=None, choices=["avx2", "avx512"],
                   help="the instruction set of our CPU kernels (sets GPTFAST_CPU_ISA; default: the best this CPU has)")
    args = p.parse_args(argv)
    keys = table_keys()
    wanted = args.ops.split(",") if args.ops else keys
    for key in wanted + [item.split("=", 1)[0] for item in args.shape]:
        if key not in keys:
            p.error(f"unknown op {key!r}; choose from {', '.join(keys)}")
    return args, wanted


def shape_table(args, device) -> dict:
    table = shapes(args.quick, args.sweep, device)
    given = {}
    for key, text in (item.split("=", 1) for item in args.shape):
        given.setdefault(key, []).append(tuple(int(v) for v in text.split("x")))
    table.update(given)                                          # given shapes replace an op's defaults
    return table


def print_row(r, ceiling):
    r["percent_of_ceiling"] = 100 * r["throughput"] / ceiling
    vs_torch = f"{r['speedup_vs_best_pytorch']:.2f}x" if r["speedup_vs_best_pytorch"] else "-"
    print(f"{r['op']:<18}{r['mode']:<9}{'x'.join(map(str, r['shape'])):<20}{r['backend']:<15}{r['median_ms']:>11.3f}"
          f"{r['p20_ms']:>9.3f}-{r['p80_ms']:<8.3f}{r['throughput']:>11.2f} {r['unit']:<7}"
          f"{r['percent_of_ceiling']:>7.1f}%{r['speedup_vs_reference']:>7.2f}x{vs_torch:>9}{r['max_rel_error']:>10.1e}")


def timing_rows(table, wanted, device, dtype, repeats, backends, ceilings) -> list:
    results = []
    for key, key_shapes in table.items():
        if key not in wanted:
            continue
        for shape in key_shapes:
            op, bench = find_bench(key, shape)
            for mode in ("fwd",) if op.inference_only else ("fwd", "fwd+bwd"):
                # compute-bound ops on a CPU: fewer repeats (seconds a call); a reference taking minutes: 3
                reps = 3 if not bench.time_reference else \
                    max(3, repeats // 3) if bench.unit == "GFLOP/s" and device.type == "cpu" else repeats
                rows = run_case(op, bench, mode, device, dtype, reps, backends)
                ceiling = ceilings["matmul_GFLOPps"] if bench.unit == "GFLOP/s" else \
                    ceilings.get("read_GBps", ceilings["copy_GBps"]) if bench.weight_arg is not None \
                    else ceilings["copy_GBps"]
                for r in rows:
                    print_row(r, ceiling)
                results += rows
    return results


def memory_rows(table, wanted, device, dtype, backends, quick) -> list:
    print("\npeak memory of one forward+backward:")
    results = []
    for key in wanted:
        for shape in table.get(key, []):
            _, bench = find_bench(key, shape)
            if not bench.peak_memory:
                continue
            for backend in [b for b in backends if b in ops.known_backends()]:
                if backend == "reference" and not quick and (
                        not bench.time_reference or (device.type == "cpu" and dtype != torch.float32)):
                    continue                         # as in run_case: not informative, or minutes per call
                mb = peak_memory_mb(backend, key, shape, dtype, device)
                results.append({"op": key, "mode": "peak_memory", "shape": list(shape), "backend": backend,
                                "peak_mb": mb})
                print(f"  {key:<22}{'x'.join(map(str, shape)):<18}{backend:<11}{mb:>9.0f} MB")
    return results


def main(argv=None):
    args, wanted = parse_args(argv)
    if args.cpu_isa:
        os.environ["GPTFAST_CPU_ISA"] = args.cpu_isa      # read when the extension backend first loads
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    backends = args.backends.split(",") if args.backends else DEFAULT_BACKENDS[device.type] + optional_backends()
    if backends[0] != "reference":
        backends = ["reference"] + [b for b in backends if b != "reference"]   # speed-ups are vs reference
    repeats = args.repeats or (5 if args.quick else 10 if device.type == "cpu" else 50)
    env = environment(device, dtype, repeats)
    env["ceilings"] = ceilings = measure_ceilings(device, dtype)
    print(f"device {env['device']} | torch {env['torch']} | triton {env['triton']} | threads {env['cpu_threads']} | "
          f"our CPU kernels {env['cpu_isa']} | {env['dtype']} | median of {repeats} after warm-up")
    print(f"ceilings measured now: copy {ceilings['copy_GBps']:.1f} GB/s, read "
          f"{ceilings.get('read_GBps', math.nan):.1f} GB/s, matmul {ceilings['matmul_GFLOPps']:.0f} GFLOP/s "
          f"({ceilings['matmul']})")
    header = (f"{'op':<18}{'mode':<9}{'shape':<20}{'backend':<15}{'median ms':>11}{'p20-p80 ms':>18}{'throughput':>18}"
              f"{'% ceil':>8}{'vs ref':>8}{'vs torch':>9}{'rel err':>10}")
    print(header + "\n" + "-" * len(header))
    table = shape_table(args, device)
    results = timing_rows(table, wanted, device, dtype, repeats, backends, ceilings)
    results += memory_rows(table, wanted, device, dtype, backends, args.quick)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"bench_ops_{device.type}{'_quick' if args.quick else ''}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"environment": env, "results": results}, f, indent=1)
    with open(out.removesuffix(".json") + ".md", "w") as f:
        f.write(markdown_table(env, results))
    print(f"\nwrote {out} and its .md table (pictures: python benchmarks/plot.py)")


if __name__ == "__main__":
    main()
