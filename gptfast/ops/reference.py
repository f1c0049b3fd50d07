"""The `reference` backend: every op written out as the textbook math, in plain PyTorch.

This is the truth that every fused kernel is tested against (in float64). It is written for reading, not
speed: attention materializes the full (T, T) score matrix. Each op's textbook function lives in its own module,
beside the op's contract and cases (`reference` in gptfast/ops/<op>.py); this backend gathers them under the
ops' names: `reference.<op>` is that module's `reference`.
"""
from __future__ import annotations

from .spec import OPS

for _op in OPS.values():
    globals()[_op.name] = _op.reference
