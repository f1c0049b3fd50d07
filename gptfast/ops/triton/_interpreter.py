"""Triton's CPU interpreter (TRITON_INTERPRET=1, set by this package where there is no CUDA GPU) computes
bfloat16 wrongly (a Triton limitation): the launchers run bfloat16 CPU tensors in float32 and round the results
back to the contract's dtypes; on a GPU every dtype goes to the kernels as it is."""
from __future__ import annotations

import torch


def interpreted_bf16(t: torch.Tensor | None) -> bool:
    return t is not None and t.device.type == "cpu" and t.dtype == torch.bfloat16
