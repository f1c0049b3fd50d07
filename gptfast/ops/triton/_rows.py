"""The launch shape shared by the Triton kernels that give each program a block of whole rows (the norms)."""
from __future__ import annotations

import os

import triton

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def launch_shape(n_rows: int, C: int) -> tuple[int, int, int]:
    """(rows per program, BLOCK_C, num_warps) of a forward and its backward. The interpreter's cost is per program:
    few programs; on a GPU a handful of rows each, and 8 warps from 2048-wide blocks (GPT-2 xl's
    1600), where 4 warps need more than 255 registers a thread in the backward and spill on sm_80
    (.ci/triton_aot_check.py)."""
    block_c = triton.next_power_of_2(C)
    rows = min(64 if INTERPRET else 4, triton.next_power_of_2(max(n_rows, 1)))
    return rows, block_c, 8 if block_c >= 2048 else 4
