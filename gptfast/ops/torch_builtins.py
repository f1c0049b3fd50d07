"""The `torch` backend: PyTorch's own built-ins for every op, the baselines our kernels must beat.

Each op's twin lives in its module (`torch_twin` in gptfast/ops/<op>.py: F.layer_norm, SDPA - which picks flash /
memory-efficient / math kernels itself -, F.linear then F.cross_entropy for the LM head + loss,
aten._weight_int8pack_mm where its rules allow, ...); this backend gathers them.
"""
from __future__ import annotations

from .spec import OPS

# Dropout comes from SDPA's and F.dropout's own RNG, not the shared counter-based one (dropout_rng.py):
# with dropout this backend computes a different random function than the others (compare skips it).
SHARES_DROPOUT_RNG = False

for _op in OPS.values():
    if _op.torch_twin is not None:
        globals()[_op.name] = _op.torch_twin
