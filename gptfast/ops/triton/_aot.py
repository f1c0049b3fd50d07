"""What each Triton kernel file tells .ci/triton_aot_check.py: the specializations to compile ahead of time for
sm_80/sm_90 (`aot_specializations(full)` in the file), each with its argument types and launch config."""
from __future__ import annotations

from dataclasses import dataclass

TYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}   # torch dtype name -> Triton pointer type
GPT2_ROWS = (768, 1024, 1600)          # LayerNorm/dropout widths: GPT-2 small, medium, xl
VOCAB = 50257


@dataclass(frozen=True)
class Specialization:
    kernel: str                        # a short name for the table
    fn: object                         # the @triton.jit function (or its Autotuner)
    types: dict                        # argument name -> Triton type ("*fp32", "i32", ...); constexprs apart
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 3
    dot: bool = False                  # built on tl.dot: must use the tensor cores
    fp_fusion: bool = True             # False: launched with enable_fp_fusion=False (no multiply-add fused into an FMA)
    label: str = ""
