"""Time each op's backends side by side, with their error against a float64 reference.

    python benchmarks/bench_ops.py --device cpu            # GPT-2 shapes (a few minutes on 2 cores)
    python benchmarks/bench_ops.py --device cpu --quick    # small shapes, well under a minute

For every op (LayerNorm, GELU, causal attention), mode (forward, forward+backward), shape and
backend: the median time over repeated runs after warm-up, the throughput (GB/s for the memory-bound
LayerNorm/GELU counting each input read once and each output written once; GFLOP/s for attention
counting 4*B*H*T^2*D * 0.5 causal, x3.5 with the backward), the speed-up against `reference`, the
max relative error ||out - ref|| / ||ref|| over outputs and gradients against float64, and for
attention the peak memory of one forward+backward (resident-set growth, measured in a fresh
process). Results go to the terminal and to benchmarks/results/bench_ops_<device>.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

from gptfast import ops

BACKENDS = ["reference", "torch", "extension"]


def rel_error(out, ref):
    out, ref = out.double(), ref.double()
    return (torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref)).item()


def timed_interleaved(steps: dict, device, repeats, warmup=2) -> dict:
    """Median seconds per step; the backends take turns within each repeat, so slow drift
    (allocator state, clock, other load) hits them all alike."""
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, fn in steps.items():
            if device.type == "cuda":
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
    return {name: statistics.median(t) for name, t in times.items()}


def make_case(op, shape, device, dtype, seed=0):
    """Inputs (float64 masters on `device`) and the op call for one benchmark case."""
    g = torch.Generator().manual_seed(seed)
    if op == "attention":
        B, H, T, D = shape
        inputs = [torch.randn(B, H, T, D, generator=g, dtype=torch.float64) for _ in range(3)]
        call = lambda backend, *a: ops.causal_attention(*a, backend=backend)  # noqa: E731
        work = 4 * B * H * T * T * D * 0.5                      # causal forward FLOPs
    elif op == "layer_norm":
        N, C = shape
        inputs = [torch.randn(N, C, generator=g, dtype=torch.float64) * 2 + 1,
                  torch.randn(C, generator=g, dtype=torch.float64), torch.randn(C, generator=g, dtype=torch.float64)]
        call = lambda backend, *a: ops.layer_norm(*a, backend=backend)  # noqa: E731
        work = 2 * N * C * torch.tensor([], dtype=dtype).element_size()  # bytes: read x, write y
    else:
        N, C = shape
        inputs = [torch.randn(N, C, generator=g, dtype=torch.float64) * 2]
        call = lambda backend, *a: ops.gelu(*a, backend=backend)  # noqa: E731
        work = 2 * N * C * torch.tensor([], dtype=dtype).element_size()
    return [t.to(device) for t in inputs], call, work


def run_case(op, shape, mode, device, dtype, repeats):
    inputs64, call, work = make_case(op, shape, device, dtype)
    if mode == "fwd+bwd":
        work *= 3.5 if op == "attention" else 2.0               # bwd: 2.5x FLOPs / reads dy, x; writes dx
    ref_in = [t.clone().requires_grad_(mode == "fwd+bwd") for t in inputs64]
    ref_out = call("reference", *ref_in)
    dout = torch.randn(ref_out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device)
    ref_grads = torch.autograd.grad(ref_out, ref_in, dout) if mode == "fwd+bwd" else []
    steps, rows = {}, []
    for backend in BACKENDS:
        ins = [t.detach().to(dtype).requires_grad_(mode == "fwd+bwd") for t in inputs64]

        def step(backend=backend, ins=ins, d=dout.to(dtype)):
            out = call(backend, *ins)
            if mode == "fwd+bwd":
                return out, torch.autograd.grad(out, ins, d)
            return out, []

        with torch.set_grad_enabled(mode == "fwd+bwd"):
            out, grads = step()
        err = max([rel_error(out, ref_out)] + [rel_error(a, b) for a, b in zip(grads, ref_grads)])
        steps[backend] = step
        rows.append({"op": op, "mode": mode, "shape": list(shape), "backend": backend, "dtype": str(dtype),
                     "max_rel_error": err, "unit": "GFLOP/s" if op == "attention" else "GB/s"})
    with torch.set_grad_enabled(mode == "fwd+bwd"):
        # the reference's large temporaries disturb the allocator and caches for whoever runs
        # next, so it is timed on its own; the fast backends take turns
        seconds = timed_interleaved({"reference": steps.pop("reference")}, device, repeats)
        seconds.update(timed_interleaved(steps, device, repeats))
    for r in rows:
        r["median_ms"] = seconds[r["backend"]] * 1e3
        r["throughput"] = work / seconds[r["backend"]] / 1e9
    ref_ms = rows[0]["median_ms"]
    for r in rows:
        r["speedup_vs_reference"] = ref_ms / r["median_ms"]
    return rows


def peak_memory_mb(backend, shape, dtype):
    """Peak resident-set growth of one attention forward+backward, in a fresh process.

    Reads the kernel's high-water mark (VmHWM, reset through /proc/self/clear_refs) rather than
    ru_maxrss, which a child inherits from its parent across fork + exec.
    """
    code = f"""
import torch
from gptfast import ops
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024
B, H, T, D = {list(shape)}
q, k, v = [torch.randn(B, H, T, D, dtype={dtype}, requires_grad=True) for _ in range(3)]
ops.causal_attention(q[:, :, :8], k[:, :, :8], v[:, :, :8], backend="{backend}").sum().backward()  # load, warm
base = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")       # reset the high-water mark to the current RSS
out = ops.causal_attention(q, k, v, backend="{backend}")
out.backward(torch.ones_like(out))
print(status("VmHWM") - base)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return float(result.stdout.strip()) if result.returncode == 0 else float("nan")


def measure_ceilings(device, dtype) -> dict:
    """Attainable rates on this machine, measured now: a large copy (bytes read + written per
    second) and a large matmul (FLOP/s) - the yardsticks for memory- and compute-bound ops."""
    n = 1 << 26                                                  # 64 Mi elements: far beyond caches
    src = torch.randn(n, dtype=dtype, device=device)
    dst = torch.empty_like(src)
    copy_s = timed_interleaved({"copy": lambda: dst.copy_(src)}, device, 10)["copy"]
    m = 2048
    a, b = torch.randn(m, m, dtype=dtype, device=device), torch.randn(m, m, dtype=dtype, device=device)
    mm_s = timed_interleaved({"mm": lambda: a @ b}, device, 5)["mm"]
    return {"copy_GBps": 2 * n * src.element_size() / copy_s / 1e9, "matmul_GFLOPps": 2 * m ** 3 / mm_s / 1e9}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="small shapes, few repeats (a smoke run)")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/bench_ops_<device>.json)")
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), torch.float32
    if args.quick:
        rows_shapes, attn_shapes, repeats = [(8 * 64, 768)], [(2, 4, 128, 64)], args.repeats or 5
    else:
        rows_shapes, attn_shapes, repeats = [(8 * 256, 768), (8 * 1024, 768)], \
            [(8, 12, 256, 64), (8, 12, 1024, 64)], args.repeats or 10
    env = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine(),
           "cpu_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
           "dtype": str(dtype), "date": datetime.datetime.now().isoformat(timespec="seconds"),
           "backends": ops.available_backends(), "repeats": repeats}
    env["ceilings"] = ceilings = measure_ceilings(device, dtype)
    print(f"device {env['device']} | torch {env['torch']} | threads {env['cpu_threads']} | {dtype} | "
          f"median of {repeats} after warm-up")
    print(f"ceilings measured now: copy {ceilings['copy_GBps']:.1f} GB/s, {dtype} matmul "
          f"{ceilings['matmul_GFLOPps']:.0f} GFLOP/s (2048^3)")
    results = []
    header = (f"{'op':<11}{'mode':<9}{'shape':<20}{'backend':<11}{'median ms':>11}{'throughput':>18}"
              f"{'% ceil':>8}{'vs ref':>8}{'rel err':>10}")
    print(header)
    print("-" * len(header))
    cases = [("layer_norm", s) for s in rows_shapes] + [("gelu", s) for s in rows_shapes] + \
            [("attention", s) for s in attn_shapes]
    for op, shape in cases:
        for mode in ("fwd", "fwd+bwd"):
            rows = run_case(op, shape, mode, device, dtype, repeats if op != "attention" else max(3, repeats // 3))
            for r in rows:
                ceiling = ceilings["matmul_GFLOPps"] if op == "attention" else ceilings["copy_GBps"]
                r["percent_of_ceiling"] = 100 * r["throughput"] / ceiling
                print(f"{op:<11}{mode:<9}{'x'.join(map(str, shape)):<20}{r['backend']:<11}{r['median_ms']:>11.3f}"
                      f"{r['throughput']:>11.2f} {r['unit']:<7}{r['percent_of_ceiling']:>7.1f}%"
                      f"{r['speedup_vs_reference']:>7.2f}x{r['max_rel_error']:>10.1e}")
            results += rows
    if device.type == "cpu":
        print("\npeak memory of one attention forward+backward (RSS growth, fresh process):")
        for shape in attn_shapes:
            for backend in BACKENDS:
                mb = peak_memory_mb(backend, shape, "torch.float32")
                results.append({"op": "attention", "mode": "peak_memory", "shape": list(shape), "backend": backend,
                                "peak_mb": mb})
                print(f"  {'x'.join(map(str, shape)):<16}{backend:<11}{mb:>9.0f} MB")
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"bench_ops_{device.type}{'_quick' if args.quick else ''}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"environment": env, "results": results}, f, indent=1)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
