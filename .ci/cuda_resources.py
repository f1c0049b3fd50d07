"""Per-kernel resources of the nvcc objects, from `cuobjdump -res-usage`: one row per kernel and arch.

    python .ci/cuda_resources.py OBJ.o ...      (run by .ci/cuda_check.sh after it compiles csrc/cuda)

Registers, static shared memory, and local memory / stack (spills); the dynamic shared memory the
launchers request comes on top of the static figure.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys


def cuobjdump() -> str:
    found = shutil.which("cuobjdump")
    if found:
        return found
    import triton                                  # the copy shipped in the triton wheel

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def short_name(mangled: str) -> str:
    """`gelu_fwd_kernel<bf16>` from the mangled name (return type, namespaces and parameters dropped)."""
    name = subprocess.run(["c++filt", mangled], capture_output=True, text=True).stdout.strip() or mangled
    name = name.replace("(anonymous namespace)::", "").removeprefix("void ")
    name = name[:name.rfind("(")] if name.endswith(")") else name        # the parameter list
    base, _, template = name.partition("<")
    name = base.split("::")[-1] + ("<" + template if template else "")
    return name.replace("__nv_bfloat16", "bf16").replace("__half", "fp16").replace("float", "fp32")


def rows(obj: str) -> list[tuple]:
    text = subprocess.run([cuobjdump(), "-res-usage", obj], capture_output=True, text=True, check=True).stdout
    out, arch, function = [], "?", None
    for line in text.splitlines():
        if m := re.search(r"arch = (sm_\d+)", line):
            arch = m[1]
        elif m := re.match(r"\s*Function (\S+):", line):
            function = m[1]
        elif function and (m := dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line))):
            out.append((os.path.basename(obj), short_name(function), arch, int(m["REG"]), int(m["SHARED"]),
                        int(m["LOCAL"]) + int(m["STACK"])))
            function = None
    return out


def main(objs: list[str]) -> int:
    table = [r for obj in objs for r in rows(obj)]
    head = ("object", "kernel", "arch", "regs", "static smem B", "local/stack B")
    widths = [max(len(str(x)) for x in col) for col in zip(head, *table)]
    for r in [head, *table]:
        print("  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip())
    spilled = sum(1 for r in table if r[5])
    print(f"CUDA kernels: {len(table)} kernel builds, {spilled} with local memory or stack")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
