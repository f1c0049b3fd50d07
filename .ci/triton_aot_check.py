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

Which specializations: what each kernel file of gptfast/ops/triton/ lists in its `aot_specializations(full)` -
every launch config (the attention kernels' configs of each tile class, `attention.GPU_TILES`: 16-bit or float32
inputs x head dim up to 64 or 128, what the autotuner may pick; the row widths and block sizes the other
launchers choose); `--full` the whole product of dtypes, head dims and dropout settings. Builds leave out source-line info unless
`--line-info` (see below), ~30% faster: the default run takes 47-85 s on 2 cores with a cold cache
(median 56 s over the six runs of 2026-12-02's third session; this VM's speed moves from hour to hour).

Occupancy: blocks per SM from registers (64K per SM, allocated per warp in units of 256), shared
memory (164 / 228 KB per SM, 1 KB reserved per block) and threads (2048 per SM, 32 blocks).
"""
from __future__ import annotations

import argparse
import concurrent.futures as futures
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

# every Triton kernel file of gptfast (each says, in its aot_specializations, what to compile)
from gptfast.ops.triton import KERNEL_FILES  # noqa: E402

# target -> (compute capability, max shared memory per block, shared memory per SM), bytes
TARGETS = {"sm_80": (80, 164 * 1024, 164 * 1024), "sm_90": (90, 227 * 1024, 228 * 1024)}


class Case:
    """One kernel specialization with one launch config."""

    def __init__(self, kernel, fn, signature, constexprs, num_warps=4, num_stages=3, dot=False, label="",
                 fp_fusion=True):
        self.kernel, self.fn, self.signature, self.constexprs = kernel, fn, signature, constexprs
        self.num_warps, self.num_stages, self.dot, self.label = num_warps, num_stages, dot, label
        self.fp_fusion = fp_fusion

    def options(self) -> dict:
        return {"num_warps": self.num_warps, "num_stages": self.num_stages, "enable_fp_fusion": self.fp_fusion}


def jit_fn(kernel):
    return kernel.fn if hasattr(kernel, "configs") else kernel    # an Autotuner wraps the JITFunction


def signature(fn, types: dict, constexprs: dict) -> dict:
    """Every argument's Triton type, in order."""
    out = {}
    for name in fn.arg_names:
        if name in constexprs:
            out[name] = "constexpr"
        elif name in types:
            out[name] = types[name]
        else:
            raise KeyError(f"{fn.__name__}: no type given for argument {name!r}")
    return out


def all_cases(full: bool) -> list[Case]:
    cases = []
    for module in KERNEL_FILES:
        for sp in module.aot_specializations(full):
            fn = jit_fn(sp.fn)
            cases.append(Case(sp.kernel, fn, signature(fn, sp.types, sp.constexprs), sp.constexprs, sp.num_warps,
                              sp.num_stages, sp.dot, sp.label, sp.fp_fusion))
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
                                  options=case.options())
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
    if not case.fp_fusion and re.search(r"\bfma\.rn\.f32", ptx):
        problems.append("launched without fp fusion, yet its PTX has fma.rn.f32")
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
    case = next(c for c in all_cases(False) if c.kernel == "attn_fwd" and c.label.startswith("bfloat16 D64 drop0")
                and "M128 N64" in c.label)
    for target, (cc, _, _) in TARGETS.items():
        compiled = triton.compile(ASTSource(fn=case.fn, signature=case.signature, constexprs=case.constexprs),
                                  target=GPUTarget("cuda", cc, 32),
                                  options=case.options())
        print(f"{target} {case.kernel} {case.label}: loop bodies (PTX instructions) {loop_bodies(compiled.asm['ptx'])}")
    return 0


def _work(args):
    index, full, target = args
    return compile_case(all_cases(full)[index], target)


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
