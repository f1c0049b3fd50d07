"""Time each op's backends side by side, with their error against a float64 reference.

    python benchmarks/bench_ops.py --device cpu            # GPT-2 shapes (a few minutes on 2 cores)
    python benchmarks/bench_ops.py --device cpu --quick    # small shapes, well under a minute
    python benchmarks/bench_ops.py --device cuda --sweep   # plus C up to 4096 and T from 128 to 4096

For every op (LayerNorm, GELU, causal attention, cross-entropy, the LM head + loss; and the inference-only
linear layers with float32, int8 or bfloat16 weights, forward only, weights read from memory), mode
(forward, forward+backward), shape and
backend: the median time over repeated runs after warm-up, the throughput (GB/s for the memory-bound
LayerNorm/GELU counting each input read once and each output written once; GFLOP/s for attention
counting 4*B*H*T^2*D * 0.5 causal, x3.5 with the backward), the speed-up against `reference`, the
max relative error ||out - ref|| / ||ref|| over outputs and gradients against float64, and for
attention the peak memory of one forward+backward. Times are medians with 20th/80th percentiles;
on GPU, CUDA events with the L2 cache flushed before every timed call. Results go to the terminal,
to benchmarks/results/bench_ops_<device>.json (+ .md table, + .png plots of throughput vs size).
"""
from __future__ import annotations

import argparse
import contextlib
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


DROPOUT_SEED = torch.tensor([1234], dtype=torch.int64)


def attention_with_dropout(q, k, v, backend=None):
    """Training-shaped attention: dropout 0.1 on the weights (the seed fixed, so backends sharing the
    counter-based RNG compute the same function and their error stays meaningful)."""
    return ops.causal_attention(q, k, v, dropout_p=0.1, seed=DROPOUT_SEED, backend=backend)


def dropout_add(x, residual, backend=None):
    """The residual dropout of training: residual + dropout(x), p = 0.1 (the seed fixed, as above)."""
    return ops.dropout_add(x, residual, 0.1, seed=DROPOUT_SEED, backend=backend)


OP_FUNCS = {"attention": ops.causal_attention, "attention_dropout": attention_with_dropout, "dropout_add": dropout_add,
            "layer_norm": ops.layer_norm, "gelu": ops.gelu, "cross_entropy": ops.cross_entropy,
            "linear_cross_entropy": ops.linear_cross_entropy,
            "linear": ops.linear, "linear_int8": ops.linear_int8, "linear_bf16": ops.linear_bf16}
# inference-only (no backward), timed forward only; shapes (M, K, N): M rows of x (a decoding step's
# batch), weight (N, K). Bound by reading the weights, so they are read from memory, not cache: each
# call takes the next of enough copies to overflow the last-level cache (WEIGHT_POOL_BYTES).
LINEAR_OPS = ("linear", "linear_int8", "linear_bf16")
WEIGHT_POOL_BYTES = 256 << 20
UNTIMED_REFERENCE = ("linear_cross_entropy",)   # its float64 reference (3 GEMMs of N x V x C) is run once, for
                                                # the error column, not timed over and over
ATTENTION_OPS = ("attention", "attention_dropout")
FLOP_OPS = ATTENTION_OPS + ("linear_cross_entropy",)          # compute-bound: GFLOP/s, against the matmul rate
SDPA_PINNED = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-efficient": "EFFICIENT_ATTENTION", "sdpa-cudnn": "CUDNN_ATTENTION"}
_compiled = {}


@contextlib.contextmanager
def backend_environment(backend):
    """"extension-simt": our CUDA attention forced onto its plain kernels (v1, attention.cu) instead
    of the tensor-core ones (v2, attention_tc.cu), forward and backward alike."""
    if backend != "extension-simt":
        yield
        return
    old = os.environ.get("GPTFAST_CUDA_ATTENTION")
    os.environ["GPTFAST_CUDA_ATTENTION"] = "simt"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("GPTFAST_CUDA_ATTENTION")
        else:
            os.environ["GPTFAST_CUDA_ATTENTION"] = old


def backend_call(op, backend):
    """fn(*inputs) computing `op` the way `backend` names: one of gptfast's op backends,
    "compiled" (torch.compile of the reference math), or "sdpa-<kernel>" (attention only:
    PyTorch's SDPA pinned to one of its kernels)."""
    if backend == "compiled":
        if op not in _compiled:
            _compiled[op] = torch.compile(lambda *a: OP_FUNCS[op](*a, backend="reference"))
        return _compiled[op]
    if backend == "flash-attn":
        if op != "attention":
            return None
        from flash_attn import flash_attn_func   # (B, T, H, D) layout

        return lambda q, k, v: flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               causal=True).transpose(1, 2)
    if backend == "liger":
        if op == "cross_entropy":
            from liger_kernel.transformers import LigerCrossEntropyLoss

            return LigerCrossEntropyLoss()
        if op == "layer_norm":
            from liger_kernel.transformers.functional import liger_layer_norm

            return lambda x, w, b: liger_layer_norm(x, w, b, 1e-5)
        return None
    if backend == "extension-simt":
        return (lambda *a: OP_FUNCS[op](*a, backend="extension")) if op in ATTENTION_OPS else None
    if backend in SDPA_PINNED:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def pinned(q, k, v):
            with sdpa_kernel(getattr(SDPBackend, SDPA_PINNED[backend])):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return pinned
    return lambda *a: OP_FUNCS[op](*a, backend=backend)


def make_case(op, shape, device, seed=0):
    """float64 master inputs on `device`, plus fixed extra arguments (cross-entropy's targets)."""
    g = torch.Generator().manual_seed(seed)
    extra = ()
    if op in ATTENTION_OPS:
        inputs = [torch.randn(*shape, generator=g, dtype=torch.float64) for _ in range(3)]
    elif op == "cross_entropy":
        N, V = shape
        inputs = [torch.randn(N, V, generator=g, dtype=torch.float64) * 2]
        extra = (torch.randint(0, V, (N,), generator=g).to(device),)
    elif op == "linear_cross_entropy":
        N, C, V = shape                                          # hidden (N, C), weight (V, C): GPT-2's LM head
        inputs = [torch.randn(N, C, generator=g, dtype=torch.float64),
                  torch.randn(V, C, generator=g, dtype=torch.float64) * 0.05]
        extra = (torch.randint(0, min(V, 50257), (N,), generator=g).to(device),)
    elif op in LINEAR_OPS:
        M, K, N = shape                                          # x (M, K), weight (N, K), bias (N,)
        inputs = [torch.randn(M, K, generator=g, dtype=torch.float64),
                  torch.randn(N, K, generator=g, dtype=torch.float64) * 0.05,
                  torch.randn(N, generator=g, dtype=torch.float64)]
    elif op == "dropout_add":
        inputs = [torch.randn(*shape, generator=g, dtype=torch.float64) for _ in range(2)]   # x, residual
    elif op == "layer_norm":
        N, C = shape
        inputs = [torch.randn(N, C, generator=g, dtype=torch.float64) * 2 + 1,
                  torch.randn(C, generator=g, dtype=torch.float64), torch.randn(C, generator=g, dtype=torch.float64)]
    else:
        inputs = [torch.randn(*shape, generator=g, dtype=torch.float64) * 2]
    return [t.to(device) for t in inputs], extra


def forward_work(op, shape, dtype, mode) -> float:
    """Bytes (each input read once, each output written once) or FLOPs (attention) of one call."""
    size = torch.tensor([], dtype=dtype).element_size()
    if op in ATTENTION_OPS:
        B, H, T, D = shape
        work = 4 * B * H * T * T * D * 0.5                       # QK^T and PV, causal half
    elif op == "cross_entropy":
        work = shape[0] * shape[1] * size                        # read the logits
    elif op == "linear_cross_entropy":
        N, C, V = shape
        work = 2 * N * C * V                                     # the logits GEMM; backward: two more
    elif op in LINEAR_OPS:
        M, K, N = shape                                          # the weights, x, bias and y once each
        weight_size = {"linear": size, "linear_int8": 1, "linear_bf16": 2}[op]
        work = N * K * weight_size + (N * 4 if op == "linear_int8" else 0) + (M * K + N + M * N) * size
    elif op == "dropout_add":
        # forward: read x and the residual, write y; backward: read dy, write dx (the residual's gradient is
        # dy itself, no copy; no mask is read - it is regenerated)
        return shape[0] * shape[1] * size * (5 if mode == "fwd+bwd" else 3)
    else:
        work = 2 * shape[0] * shape[1] * size                    # read x, write y
    if mode == "fwd+bwd":
        # attention: the backward is 2.5x the forward's FLOPs; LayerNorm/GELU: it reads dy (and x)
        # and writes dx; cross-entropy: it writes dlogits
        work *= 3.5 if op in ATTENTION_OPS else 3.0 if op == "linear_cross_entropy" else 2.0
    return work


def linear_args(op, inputs64, dtype):
    """(args at `dtype` for `op`, float64 args of the reference on the same - quantized - weights)."""
    from gptfast.model.quantize import quantize_int8_rows

    x, w, b = inputs64
    if op == "linear_int8":
        q, scales = quantize_int8_rows(w)
        return [x.to(dtype), q, scales, b.to(dtype)], [x, q, scales.double(), b]
    if op == "linear_bf16":
        wb = w.to(torch.bfloat16)
        return [x.to(dtype), wb, b.to(dtype)], [x, wb, b]
    return [x.to(dtype), w.to(dtype), b.to(dtype)], [x, w, b]


def run_linear_case(op, shape, device, dtype, repeats, backends):
    """One inference-only linear op at shape (M, K, N): the forward of each backend against the float64
    reference on the same quantized weights, each call reading the next weight copy of a pool larger
    than the caches."""
    from gptfast.ops import reference

    inputs64, _ = make_case(op, shape, device)
    args, ref_args = linear_args(op, inputs64, dtype)
    ref_out = getattr(reference, op)(*ref_args)
    work = forward_work(op, shape, dtype, "fwd")
    weight_bytes = args[1].numel() * args[1].element_size()
    copies = max(2, -(-WEIGHT_POOL_BYTES // max(weight_bytes, 1)))
    pool = [args[1]] + [args[1].clone() for _ in range(copies - 1)]
    steps, rows = {}, []
    for backend in backends:
        if backend not in ops.known_backends():
            continue

        def step(backend=backend, turn=[0]):
            turn[0] = (turn[0] + 1) % copies
            return OP_FUNCS[op](args[0], pool[turn[0]], *args[2:], backend=backend)
        with torch.no_grad():
            try:
                out = step()
            except Exception as err:
                print(f"  {op} {backend}: skipped ({type(err).__name__}: {str(err).splitlines()[0][:120]})")
                continue
        steps[backend] = step
        rows.append({"op": op, "mode": "fwd", "shape": list(shape), "backend": backend, "dtype": str(dtype),
                     "max_rel_error": rel_error(out, ref_out), "unit": "GB/s"})
    with torch.no_grad():
        seconds = timed_interleaved(steps, device, repeats)
    for r in rows:
        median, p20, p80 = seconds[r["backend"]]
        r.update(median_ms=median * 1e3, p20_ms=p20 * 1e3, p80_ms=p80 * 1e3, throughput=work / median / 1e9)
    ref_ms = next((r["median_ms"] for r in rows if r["backend"] == "reference"), math.nan)
    torch_ms = next((r["median_ms"] for r in rows if r["backend"] == "torch"), None)
    for r in rows:
        r["speedup_vs_reference"] = ref_ms / r["median_ms"]
        r["speedup_vs_best_pytorch"] = torch_ms / r["median_ms"] if torch_ms else None
    return rows


def run_case(op, shape, mode, device, dtype, repeats, backends):
    if op in LINEAR_OPS:
        return run_linear_case(op, shape, device, dtype, repeats, backends)
    inputs64, extra = make_case(op, shape, device)
    work = forward_work(op, shape, dtype, mode)
    ref_in = [t.clone().requires_grad_(mode == "fwd+bwd") for t in inputs64]
    ref_out = backend_call(op, "reference")(*ref_in, *extra)
    dout = torch.randn(ref_out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device)
    if ref_out.dim() == 0:                                       # a loss: the upstream gradient is 1
        dout = torch.ones((), dtype=torch.float64, device=device)
    ref_grads = torch.autograd.grad(ref_out, ref_in, dout) if mode == "fwd+bwd" else []
    steps, rows = {}, []
    # 16-bit on CPU: the reference's matmuls are emulated where the CPU has no bf16/fp16 matrix
    # instructions (minutes per call at these shapes) and nobody runs it for speed: row kept, not run
    skip_reference = op in UNTIMED_REFERENCE or (device.type == "cpu" and dtype in (torch.bfloat16, torch.float16))
    for backend in backends:
        if backend in SDPA_PINNED and op != "attention":
            continue
        if backend == "reference" and skip_reference and device.type == "cpu" and dtype != torch.float32:
            steps[backend] = None
            rows.append({"op": op, "mode": mode, "shape": list(shape), "backend": backend, "dtype": str(dtype),
                         "max_rel_error": float("nan"), "unit": "GFLOP/s" if op in FLOP_OPS else "GB/s"})
            continue
        ins = [t.detach().to(dtype).requires_grad_(mode == "fwd+bwd") for t in inputs64]
        try:
            fn = backend_call(op, backend)
        except Exception as err:  # an optional package whose API differs from what we expect
            print(f"  {op} {backend}: skipped ({type(err).__name__}: {err})")
            continue
        if fn is None:                                           # the backend has no such op
            continue

        def step(fn=fn, ins=ins, d=dout.to(dtype), backend=backend):
            with backend_environment(backend):
                out = fn(*ins, *extra)
                if mode == "fwd+bwd":
                    return out, torch.autograd.grad(out, ins, d)
                return out, []

        try:
            with torch.set_grad_enabled(mode == "fwd+bwd"):
                out, grads = step()
        except Exception as err:  # e.g. an SDPA kernel this GPU or dtype lacks: say so, go on
            print(f"  {op} {mode} {backend}: skipped ({type(err).__name__}: {str(err).splitlines()[0][:120]})")
            continue
        err = max([rel_error(out, ref_out)] + [rel_error(a, b) for a, b in zip(grads, ref_grads)])
        own_rng = backend in SDPA_PINNED or (backend in ops.known_backends() and not ops.shares_dropout_rng(
            backend, device.type, str(dtype).replace("torch.", "")))
        if op in ("attention_dropout", "dropout_add") and own_rng:
            err = float("nan")                       # its own dropout RNG: another function, no error to show
        steps[backend] = step
        rows.append({"op": op, "mode": mode, "shape": list(shape), "backend": backend, "dtype": str(dtype),
                     "max_rel_error": err, "unit": "GFLOP/s" if op in FLOP_OPS else "GB/s"})
    with torch.set_grad_enabled(mode == "fwd+bwd"):
        # the reference's large temporaries disturb the allocator and caches for whoever runs
        # next, so it is timed on its own; the fast backends take turns
        reference = steps.pop("reference")
        seconds = {"reference": (math.nan,) * 3} if skip_reference else \
            timed_interleaved({"reference": reference}, device, repeats)
        seconds.update(timed_interleaved(steps, device, repeats))
    for r in rows:
        median, p20, p80 = seconds[r["backend"]]
        r.update(median_ms=median * 1e3, p20_ms=p20 * 1e3, p80_ms=p80 * 1e3, throughput=work / median / 1e9)
    ref_ms = rows[0]["median_ms"]
    best_torch = min((r["median_ms"] for r in rows if r["backend"] in PYTORCH_BASELINES), default=None)
    for r in rows:
        r["speedup_vs_reference"] = ref_ms / r["median_ms"]
        r["speedup_vs_best_pytorch"] = best_torch / r["median_ms"] if best_torch else None
    return rows


PEAK_MEMORY_OPS = ("attention", "linear_cross_entropy")


def _peak_case(op, shape, dtype, device):
    """(inputs, fn) for one forward+backward of `op` at `shape`: attention, or the LM head + loss."""
    if op == "attention":
        ins = [torch.randn(*shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3)]
        return ins, lambda backend: ops.causal_attention(*ins, backend=backend).sum()
    N, C, V = shape
    ins = [torch.randn(N, C, device=device, dtype=dtype, requires_grad=True),
           (torch.randn(V, C, device=device, dtype=dtype) * 0.05).requires_grad_()]
    targets = torch.randint(0, min(V, 50257), (N,), device=device)
    return ins, lambda backend: ops.linear_cross_entropy(*ins, targets, backend=backend)


def peak_memory_mb(backend, shape, dtype, device, op="attention") -> float:
    """Peak memory growth of one forward+backward of `op` (attention or linear_cross_entropy).

    GPU: torch.cuda.max_memory_allocated around the call. CPU: in a fresh process, the kernel's
    high-water mark (VmHWM, reset through /proc/self/clear_refs) - not ru_maxrss, which a child
    inherits from its parent across fork + exec. The inputs exist before the measurement starts.
    """
    if device.type == "cuda":
        _, run = _peak_case(op, shape, dtype, device)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run(backend).backward()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    small = (2, 2, 8, 16) if op == "attention" else (16, 8, 64)
    code = f"""
import sys, torch
sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
from bench_ops import _peak_case
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024
_peak_case({op!r}, {tuple(small)}, {dtype}, "cpu")[1]({backend!r}).backward()     # load, warm
_, run = _peak_case({op!r}, {tuple(shape)}, {dtype}, "cpu")
base = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")       # reset the high-water mark to the current RSS
run({backend!r}).backward()
print(status("VmHWM") - base)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return float(result.stdout.strip()) if result.returncode == 0 else float("nan")


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
    if quick:
        return {"layer_norm": [(8 * 64, 768)], "gelu": [(8 * 64, 768)], "dropout_add": [(8 * 64, 768)],
                "attention": [(2, 4, 128, 64)],
                "attention_dropout": [(2, 4, 128, 64)], "linear_cross_entropy": [(256, 64, 4096)],
                "cross_entropy": [(64, 50257)], **{op: [(1, 256, 512)] for op in LINEAR_OPS}}
    # a GPT-2 decoding step: batch 1 and 8 through the MLP's two layers and the LM head
    decode = [(1, 768, 3072), (1, 3072, 768), (1, 768, 50257), (8, 768, 3072), (8, 768, 50257)]
    rows = [(8 * 256, 768), (8 * 1024, 768)]
    attention = [(2, 12, 256, 64), (8, 12, 256, 64), (2, 12, 1024, 64), (8, 12, 1024, 64)]
    table = {"layer_norm": list(rows), "gelu": list(rows), "dropout_add": list(rows), "attention": list(attention),
             "attention_dropout": list(attention),
             "linear_cross_entropy": [(8 * 1024, 768, 50257), (8 * 1024, 768, 50304), (16 * 1024, 768, 50257)],
             "cross_entropy": [(8 * 128, 50257)] if device.type == "cpu" else [(8 * 1024, 50304)],
             **{op: list(decode) for op in LINEAR_OPS}}
    if sweep:   # throughput against size: C up to 4096 at 8K rows; T from 128 to 4096 at B*H = 12
        for C in (1024, 1600, 2048, 4096):
            table["layer_norm"].append((8 * 1024, C))
            table["gelu"].append((8 * 1024, C))
        table["attention"] += [(1, 12, T, 64) for T in (128, 256, 512, 1024, 2048, 4096)]
    return table


def plot(results: list, path_prefix: str) -> list[str]:
    """One PNG per (op, mode): throughput against problem size, a line per backend."""
    from matplotlib.figure import Figure

    written = []
    keys = sorted({(r["op"], r["mode"]) for r in results if "throughput" in r})
    for op, mode in keys:
        rows = [r for r in results if r["op"] == op and r["mode"] == mode and "throughput" in r]
        fig = Figure(figsize=(6, 3.5), layout="constrained")
        ax = fig.add_subplot()
        for backend in dict.fromkeys(r["backend"] for r in rows):
            pts = sorted((math.prod(r["shape"]), r["throughput"]) for r in rows if r["backend"] == backend)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=backend)
        ax.set_xscale("log")
        ax.set_xlabel("problem size (elements)")
        ax.set_ylabel(rows[0]["unit"])
        ax.set_title(f"{op} {mode}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        path = f"{path_prefix}_{op}_{mode.replace('+', '_')}.png"
        fig.savefig(path, dpi=110)
        written.append(path)
    return written


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


def main(argv=None):
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
                   help="measure OP at this shape instead of its default shapes (repeatable), e.g. "
                        "linear_cross_entropy=128x768x50257 where the default shapes would take hours")
    p.add_argument("--ops", default=None, help="comma-separated subset of: " + ", ".join(OP_FUNCS))
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/bench_ops_<device>.json)")
    p.add_argument("--cpu-isa", default=None, choices=["avx2", "avx512"],
                   help="the instruction set of our CPU kernels (sets GPTFAST_CPU_ISA; default: the best this CPU has)")
    args = p.parse_args(argv)
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
    print(f"ceilings measured now: copy {ceilings['copy_GBps']:.1f} GB/s, read {ceilings.get('read_GBps', math.nan):.1f} GB/s, matmul {ceilings['matmul_GFLOPps']:.0f} "
          f"GFLOP/s ({ceilings['matmul']})")
    header = (f"{'op':<18}{'mode':<9}{'shape':<20}{'backend':<15}{'median ms':>11}{'p20-p80 ms':>18}{'throughput':>18}"
              f"{'% ceil':>8}{'vs ref':>8}{'vs torch':>9}{'rel err':>10}")
    print(header)
    print("-" * len(header))
    results = []
    wanted = args.ops.split(",") if args.ops else list(OP_FUNCS)
    unknown = [op for op in wanted if op not in OP_FUNCS]
    if unknown:
        p.error(f"unknown op {unknown[0]!r}; choose from {', '.join(OP_FUNCS)}")
    table, given = shapes(args.quick, args.sweep, device), {}
    for op, text in (item.split("=", 1) for item in args.shape):
        if op not in OP_FUNCS:
            p.error(f"--shape: unknown op {op!r}; choose from {', '.join(OP_FUNCS)}")
        given.setdefault(op, []).append(tuple(int(v) for v in text.split("x")))
    table.update(given)                                          # given shapes replace an op's defaults
    for op, op_shapes in table.items():
        if op not in wanted:
            continue
        for shape in op_shapes:
            for mode in ("fwd",) if op in LINEAR_OPS else ("fwd", "fwd+bwd"):
                reps = repeats if op not in FLOP_OPS or device.type == "cuda" else \
                    3 if op == "linear_cross_entropy" else max(3, repeats // 3)
                rows = run_case(op, shape, mode, device, dtype, reps, backends)
                for r in rows:
                    ceiling = ceilings["matmul_GFLOPps"] if op in FLOP_OPS else \
                        ceilings.get("read_GBps", ceilings["copy_GBps"]) if op in LINEAR_OPS else ceilings["copy_GBps"]
                    r["percent_of_ceiling"] = 100 * r["throughput"] / ceiling
                    vs_torch = f"{r['speedup_vs_best_pytorch']:.2f}x" if r["speedup_vs_best_pytorch"] else "-"
                    print(f"{op:<18}{mode:<9}{'x'.join(map(str, shape)):<20}{r['backend']:<15}{r['median_ms']:>11.3f}"
                          f"{r['p20_ms']:>9.3f}-{r['p80_ms']:<8.3f}{r['throughput']:>11.2f} {r['unit']:<7}"
                          f"{r['percent_of_ceiling']:>7.1f}%{r['speedup_vs_reference']:>7.2f}x{vs_torch:>9}"
                          f"{r['max_rel_error']:>10.1e}")
                results += rows
    print("\npeak memory of one forward+backward:")
    for op in [op for op in PEAK_MEMORY_OPS if op in wanted]:
        for shape in table[op]:
            for backend in [b for b in backends if b in ops.known_backends()]:
                if backend == "reference" and not args.quick and (
                        op == "linear_cross_entropy" or (device.type == "cpu" and dtype != torch.float32)):
                    continue                         # as in run_case: not informative, or minutes per call                         # like torch's, plus float64-sized temporaries: not informative
                mb = peak_memory_mb(backend, shape, dtype, device, op)
                results.append({"op": op, "mode": "peak_memory", "shape": list(shape), "backend": backend,
                                "peak_mb": mb})
                print(f"  {op:<22}{'x'.join(map(str, shape)):<18}{backend:<11}{mb:>9.0f} MB")
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"bench_ops_{device.type}{'_quick' if args.quick else ''}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"environment": env, "results": results}, f, indent=1)
    with open(out.removesuffix(".json") + ".md", "w") as f:
        f.write(markdown_table(env, results))
    pngs = [] if args.no_plots else plot(results, out.removesuffix(".json"))
    print(f"\nwrote {out}, its .md table and {len(pngs)} plots")


if __name__ == "__main__":
    main()
