"""Which device a run computes on: the one place that turns `--device auto|cpu|cuda` into a torch.device."""
from __future__ import annotations

import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda")


class DeviceUnavailable(ValueError):
    """The device named on the command line does not exist here (or is not a device gptfast runs on)."""


def resolve_device(name: str) -> torch.device:
    """`auto`: the CUDA GPU if there is one, else the CPU. A named device must exist here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise DeviceUnavailable(f"unknown device {name!r}; choose one of: {', '.join(DEVICE_CHOICES)}")
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailable("--device cuda: no CUDA device is available here (use --device cpu)")
    return torch.device(name)
