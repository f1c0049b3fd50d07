"""Compile every Triton kernel for real GPUs (sm_80 = A100, sm_90 = H100) with no GPU, and check it.

    python .ci/triton_aot_check.py            # CI: each launch config at its heaviest specialization
    python .ci/triton_aot_check.py --full     # every dtype x head dim x dropout x config (minutes)
    python .ci/triton_aot_check.py --markdown # the table as Markdown (for benchmarks/NOTES.md)

The CPU interpreter checks the kernels' math, not whether they compile for the hardware, fit its
shared memory, spill registers or use tensor cores. Triton compiles ahead of time for a named
target without a driver (`triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`),
giving PTX and a cubin whose resource use `cuobjdump -res-usage` (shipped in the triton wheel)
reports. A kernel fails the check if it does not compile, uses local memory (register spills or a
stack), needs more shared memory than one block may have (A100 164 KB, H100 227 KB), or - for
kernels built on `tl.dot` - shows no tensor-core instruction in its PTX (`mma` on sm_80; `wgmma` on
sm_90, or `mma` where tiles under 64 rows cannot use wgmma - the table says which).

Which specializations: every launch config - the attention kernels' configs of each tile class
(`attention.GPU_TILES`: 16-bit or float32 inputs x head dim up to 64 or 128, what the autotuner
may pick for such a launch), the row widths and block sizes the other launchers choose. In the
default mode each class is compiled with dropout on (usually more registers), bfloat16 at head dim
64 also without it (GPT-2 evaluation and generation: every forward config; the backward kernels'
first config); float16 has bfloat16's resources. `--full` compiles the whole product (float32,
bfloat16, float16 x head dims 64, 128 x dropout off/on). Builds leave out source-line info unless
`--line-info` (see below), ~30% faster: the default run takes 47-85 s on 2 cores with a cold cache
(median 56 s over the six runs of 2026-12-02's third session; this VM's speed moves from hour to hour).

Occupancy: blocks per SM from registers (64K per SM, allocated per warp in units of 256), shared
memory (164 / 228 KB per SM, 1 KB reserved per block) and threads (2048 per SM, 32 blocks).
"""
from __future__ import annotations

import argparse
import concurrent.futures as futures
import importlib
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ["TRITON_INTERPRET"] = "0"     # before gptfast.ops.triton defines its kernels: the GPU configs
# No source-line debug info unless --line-info: each build is ~30% faster without it (LLVM's
# debug-scope pass, ptxas -lineinfo). The runtime on a GPU keeps it; measured 2026-12-02, it moves
# 2 of 92 builds by up to 3 registers and changes no spill, shared memory or tensor-core result.
os.environ.setdefault("TRITON_DISABLE_LINE_INFO", "0" if "--line-info" in sys.argv else "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

# the kernel modules themselves (the package's names `gelu`, `layer_norm`, ... are its backend functions)
attention, cross_entropy, dropout, gelu, layer_norm, linear = (  # noqa: E402
    importlib.import_module(f"gptfast.ops.triton.{name}")
    for name in ("attention", "cross_entropy", "dropout", "gelu", "layer_norm", "linear"))

# target -> (compute capability, max shared memory per block, shared memory per SM), bytes
TARGETS = {"sm_80": (80, 164 * 1024, 164 * 1024), "sm_90": (90, 227 * 1024, 228 * 1024)}
TRITON_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
GPT2_ROWS = (768, 1024, 1600)          # LayerNorm widths: GPT-2 small, medium, xl
VOCAB = 50257


class Case:
    """One kernel specialization with one launch config."""

    def __init__(self, kernel, fn, signature, constexprs, num_warps=4, num_stages=3, dot=False, label=""):
        self.kernel, self.fn, self.signature, self.constexprs = kernel, fn, signature, constexprs
        self.num_warps, self.num_stages, self.dot, self.label = num_warps, num_stages, dot, label


def jit_fn(kernel):
    return kernel.fn if hasattr(kernel, "configs") else kernel    # an Autotuner wraps the JITFunction


def signature(fn, types: dict, constexprs: dict) -> dict:
    """Every argument's Triton type, in order; `types` maps names (or name suffixes) to types."""
    out = {}
    for name in fn.arg_names:
        if name in constexprs:
            out[name] = "constexpr"
        elif name in types:
            out[name] = types[name]
        else:
            raise KeyError(f"{fn.__name__}: no type given for argument {name!r}")
    return out


def attention_cases(full: bool) -> list[Case]:
    """Each kernel's tile classes (attention.GPU_TILES) with every config of the class."""
    variants = ([(dt, d, drop) for dt in TRITON_DTYPES for d in (64, 128) for drop in (False, True)] if full
                else [("bfloat16", 64, True), ("bfloat16", 64, False), ("bfloat16", 128, True),
                      ("float32", 64, True), ("float32", 128, True)])
    cases = []
    for kernel, kind, extra in ((attention._attn_fwd_kernel, "fwd", {"o_ptr": "*{dt}", "lse_ptr": "*fp32"}),
                                (attention._attn_bwd_dkdv_kernel, "dkdv", {"dk_ptr": "*{dt}", "dv_ptr": "*{dt}"}),
                                (attention._attn_bwd_dq_kernel, "dq", {"dq_ptr": "*{dt}"})):
        fn = jit_fn(kernel)
        for dt, d, drop in variants:
            tiles = attention.gpu_tiles(kind, 4 if dt == "float32" else 2, d)
            if not full and not drop and kind != "fwd":
                # dropout off: every config of the forward (evaluation and generation run it), the
                # backward kernels' first config only (training with dropout 0), to keep the run short
                tiles = tiles[:1]
            t = TRITON_DTYPES[dt]
            types = {"q_ptr": f"*{t}", "k_ptr": f"*{t}", "v_ptr": f"*{t}", "do_ptr": f"*{t}", "lse_ptr": "*fp32",
                     "delta_ptr": "*fp32", "seed_ptr": "*i64", "TQ": "i32", "TK": "i32", "D": "i32",
                     "qk_scale": "fp32", "sm_scale": "fp32", "threshold": "i32", "keep_scale": "fp32",
                     **{k: v.format(dt=t) for k, v in extra.items()}}
            for bm, bn, warps, stages in tiles:
                const = {"CAUSAL": True, "DROPOUT": drop, "BLOCK_D": d, "BLOCK_M": bm, "BLOCK_N": bn}
                cases.append(Case(f"attn_{kind}", fn, signature(fn, types, const), const, warps, stages, dot=True,
                                  label=f"{dt} D{d} drop{int(drop)} M{bm} N{bn} w{warps} s{stages}"))
    return cases


def rowwise_cases(full: bool) -> list[Case]:
    dtypes = list(TRITON_DTYPES) if full else ["float32"]   # float32: the widest loads and registers
    cases = []
    for dt in dtypes:
        t = TRITON_DTYPES[dt]
        block_v = cross_entropy._block_v(VOCAB)
        fn = jit_fn(cross_entropy._ce_fwd_kernel)
        const = {"COMPUTE_GRAD": True, "BLOCK_V": block_v}
        types = {"logits_ptr": f"*{t}", "targets_ptr": "*i64", "loss_ptr": "*fp32", "lse_ptr": "*fp32",
                 "dlogits_ptr": f"*{t}", "V": "i32", "ignore_index": "i32"}
        cases.append(Case("ce_fwd", fn, signature(fn, types, const), const, label=f"{dt} V{VOCAB} BV{block_v}"))
        fn = jit_fn(cross_entropy._scale_rows_kernel)
        const = {"BLOCK_V": block_v}
        types = {"dlogits_ptr": f"*{t}", "grad_ptr": "*fp32", "out_ptr": f"*{t}", "V": "i32"}
        cases.append(Case("ce_scale_rows", fn, signature(fn, types, const), const, label=f"{dt} BV{block_v}"))
        for kernel, name in ((gelu._gelu_fwd_kernel, "gelu_fwd"), (gelu._gelu_bwd_kernel, "gelu_bwd")):
            fn = jit_fn(kernel)
            const = {"BLOCK": gelu.BLOCK}
            types = {"x_ptr": f"*{t}", "y_ptr": f"*{t}", "dy_ptr": f"*{t}", "dx_ptr": f"*{t}", "n": "i32"}
            cases.append(Case(name, fn, signature(fn, types, const), const, label=f"{dt} BLOCK{gelu.BLOCK}"))
        fn = jit_fn(dropout._dropout_kernel)
        for out, residual in ((t, True), ("fp32", True), (t, False)):   # a 16-bit branch into a float32 stream
            block_r, block_c = dropout.launch_shape(GPT2_ROWS[0])
            const = {"HAS_RESIDUAL": residual, "BLOCK_R": block_r, "BLOCK_C": block_c}
            types = {"x_ptr": f"*{t}", "res_ptr": f"*{out}", "y_ptr": f"*{out}", "seed_ptr": "*i64", "rows": "i32",
                     "C": "i32", "threshold": "i32", "scale": "fp32"}
            cases.append(Case("dropout_add", fn, signature(fn, types, const), const,
                              label=f"{dt} -> {out}{' + residual' if residual else ''} R{block_r} C{block_c}"))
        for width in sorted({triton.next_power_of_2(c): c for c in GPT2_ROWS}.values()):
            rows, block_c, warps = layer_norm.launch_shape(8192, width)
            const = {"ROWS": rows, "BLOCK_C": block_c}
            types = {"x_ptr": f"*{t}", "w_ptr": f"*{t}", "b_ptr": f"*{t}", "y_ptr": f"*{t}", "dy_ptr": f"*{t}",
                     "dx_ptr": f"*{t}", "mean_ptr": "*fp32", "rstd_ptr": "*fp32", "dw_part_ptr": "*fp32",
                     "db_part_ptr": "*fp32", "n_rows": "i32", "C": "i32", "eps": "fp32"}
            for kernel, name in ((layer_norm._ln_fwd_kernel, "ln_fwd"), (layer_norm._ln_bwd_kernel, "ln_bwd")):
                fn = jit_fn(kernel)
                cases.append(Case(name, fn, signature(fn, types, const), const, num_warps=warps,
                                  label=f"{dt} C{width} ROWS{rows} w{warps}"))
    return cases


def linear_cases(full: bool) -> list[Case]:
    """The decoding linear layer: each weight type at the tile shapes of 1, 4 and 16 rows of x
    (float32 activations; bfloat16 ones in --full)."""
    fn = jit_fn(linear._linear_kernel)
    cases = []
    for xt in (["float32", "bfloat16"] if full else ["float32"]):
        for wt in ("fp32", "bf16", "i8"):
            for rows in (1, 4, 16):
                block_m, block_n, block_k = linear.launch_shape(rows)
                const = {"HAS_SCALES": wt == "i8", "HAS_BIAS": True, "BLOCK_M": block_m, "BLOCK_N": block_n,
                         "BLOCK_K": block_k}
                x = TRITON_DTYPES[xt]
                types = {"x_ptr": f"*{x}", "w_ptr": f"*{wt}", "scales_ptr": "*fp32", "bias_ptr": f"*{x}", "y_ptr": f"*{x}",
                         "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32"}
                cases.append(Case("linear", fn, signature(fn, types, const), const,
                                  label=f"x {xt} w {wt} M{block_m} N{block_n} K{block_k}"))
    return cases


def resource_usage(cubin: bytes) -> dict:
    """REG, STACK, SHARED, LOCAL of the cubin's kernel, from cuobjdump -res-usage."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    return {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text)}


def occupancy(regs: int, smem: int, warps: int, smem_per_sm: int) -> tuple[int, int]:
    """(blocks, warps) resident per SM."""
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = 65536 // (regs_per_warp * warps)
    by_smem = smem_per_sm // (smem + 1024) if smem else 32
    by_threads = 2048 // (32 * warps)
    blocks = max(0, min(32, by_regs, by_smem, by_threads))
    return blocks, blocks * warps


def compile_case(case: Case, target: str) -> dict:
    cc, max_smem, smem_per_sm = TARGETS[target]
    row = {"kernel": case.kernel, "config": case.label, "target": target, "ok": False}
    start = time.perf_counter()
    try:
        compiled = triton.compile(ASTSource(fn=case.fn, signature=case.signature, constexprs=case.constexprs),
                                  target=GPUTarget("cuda", cc, 32),
                                  options={"num_warps": case.num_warps, "num_stages": case.num_stages})
    except Exception as err:                              # noqa: BLE001 - reported as a failure row
        row["problem"] = f"does not compile: {type(err).__name__}: {str(err).splitlines()[0][:160]}"
        return row
    usage = resource_usage(compiled.asm["cubin"])
    ptx = compiled.asm["ptx"]
    smem = int(compiled.metadata.shared)
    # Hopper's warpgroup MMA (wgmma) needs 64-row tiles; smaller ones still run on the tensor cores
    # through the Ampere-style mma.sync, which the table names
    tensor_cores = "wgmma" if cc >= 90 and "wgmma" in ptx else "mma" if re.search(r"\bmma\.sync", ptx) else ""
    row.update(regs=usage.get("REG", 0), smem=smem, spill=usage.get("LOCAL", 0) + usage.get("STACK", 0),
               tensor_cores=tensor_cores, seconds=round(time.perf_counter() - start, 1))
    row["blocks_per_sm"], row["warps_per_sm"] = occupancy(row["regs"], smem, case.num_warps, smem_per_sm)
    problems = []
    if row["spill"]:
        problems.append(f"local memory {row['spill']} B (register spills)")
    if smem > max_smem:
        problems.append(f"needs {smem // 1024} KB shared memory, {target} allows {max_smem // 1024} KB per block")
    if case.dot and not row["tensor_cores"]:
        problems.append("tl.dot kernel without tensor-core instructions")
    row["ok"], row["problem"] = not problems, "; ".join(problems)
    return row


def loop_bodies(ptx: str) -> list[int]:
    """Instructions in each loop body of a PTX function: the lines between a label and a later
    branch back to it (innermost loops, in program order)."""
    lines = [line.strip() for line in ptx.splitlines()]
    labels = {m[1]: i for i, line in enumerate(lines) if (m := re.match(r"(\$L__\w+):", line))}
    bodies = []
    for i, line in enumerate(lines):
        m = re.search(r"\bbra(?:\.uni)?\s+(\$L__\w+);", line)
        if m and labels.get(m[1], i) < i:
            body = lines[labels[m[1]] + 1:i + 1]
            bodies.append(sum(1 for x in body if x.endswith(";") and not x.startswith(("//", "."))))
    return bodies


def loop_profile() -> int:
    """The causal split's effect on the instruction stream: the forward kernel's loop bodies (bf16,
    D 64, BLOCK_M 128, BLOCK_N 64, 8 warps, no dropout) per target; the unmasked loop comes first."""
    case = next(c for c in attention_cases(False) if c.kernel == "attn_fwd" and c.label.startswith("bfloat16 D64 drop0")
                and "M128 N64" in c.label)
    for target, (cc, _, _) in TARGETS.items():
        compiled = triton.compile(ASTSource(fn=case.fn, signature=case.signature, constexprs=case.constexprs),
                                  target=GPUTarget("cuda", cc, 32),
                                  options={"num_warps": case.num_warps, "num_stages": case.num_stages})
        print(f"{target} {case.kernel} {case.label}: loop bodies (PTX instructions) {loop_bodies(compiled.asm['ptx'])}")
    return 0


def _work(args):
    index, full, target = args
    return compile_case(all_cases(full)[index], target)


def all_cases(full: bool) -> list[Case]:
    return attention_cases(full) + rowwise_cases(full) + linear_cases(full)


def table(rows: list[dict], markdown: bool) -> str:
    head = ["kernel", "config", "target", "regs", "smem KB", "spills B", "tensor cores", "blocks/SM", "warps/SM", ""]
    lines = []
    for r in rows:
        if "regs" not in r:
            lines.append([r["kernel"], r["config"], r["target"], "-", "-", "-", "-", "-", "-", "FAIL " + r["problem"]])
            continue
        lines.append([r["kernel"], r["config"], r["target"], str(r["regs"]), f"{r['smem'] / 1024:.0f}", str(r["spill"]),
                      r["tensor_cores"] or "no", str(r["blocks_per_sm"]), str(r["warps_per_sm"]),
                      "ok" if r["ok"] else "FAIL " + r["problem"]])
    if markdown:
        return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] +
                         ["| " + " | ".join(cells) + " |" for cells in lines])
    widths = [max(len(x) for x in col) for col in zip(head, *lines)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip() for cells in [head] + lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--full", action="store_true", help="every dtype, head dim and dropout setting")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--loops", action="store_true", help="print the attention forward's loop-body instruction counts")
    p.add_argument("--line-info", action="store_true",
                   help="build with source-line info, as the runtime on a GPU does (slower; registers may move slightly)")
    args = p.parse_args(argv)
    if args.loops:
        return loop_profile()
    cases = all_cases(args.full)
    work = [(i, args.full, t) for i in range(len(cases)) for t in TARGETS]
    start = time.perf_counter()
    with futures.ProcessPoolExecutor(max_workers=args.jobs) as pool:    # compiling is CPU-bound: one per core
        rows = list(pool.map(_work, work))
    print(table(rows, args.markdown))
    failed = [r for r in rows if not r["ok"]]
    line_info = "without" if os.environ["TRITON_DISABLE_LINE_INFO"] == "1" else "with"
    print(f"\nTriton AOT check (triton {triton.__version__}, {line_info} line info): {len(rows)} kernel builds "
          f"({len(cases)} specializations x {len(TARGETS)} targets) in {time.perf_counter() - start:.0f} s; "
          f"{len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
