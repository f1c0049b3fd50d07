"""Kernels against the textbook: every backend's ops and whole model vs the float64 `reference`.

    from gptfast.compare import CompareSettings, run_compare
    report = run_compare(CompareSettings(backends=["extension"], quick=True))

`scripts/compare.py` is the command-line front door. Modules: `rules` (the tolerance rule), `op_check` (every
op's cases - from its module, gptfast/ops/<op>.py - output and every input gradient), `model_check` (logits,
loss, parameter gradients, a short training run), `report` (table, loss curves, JSON).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from .. import ops
from ..device import resolve_device
from .model_check import compare_model, compare_training_run, seeded_model, verdict_batches
from .op_check import Row, compare_ops, op_cases
from .report import curves_table, environment, table, to_json

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


@dataclass
class CompareSettings:
    backends: list[str] = field(default_factory=list)   # empty: every available backend but reference
    device: str = "auto"
    dtype: str = "float32"
    preset: str | None = None      # model part; None: tiny (quick), cpu-small (CPU), book-124m (GPU)
    seed: int = 0
    quick: bool = False
    ops: bool = True
    model: bool = True
    steps: int | None = None       # training-run steps; None: 4 (quick) or 10
    progress: bool = True          # a progress bar over the op cases (on a terminal)


@dataclass
class CompareReport:
    env: dict
    rows: list[Row]
    curves: dict
    seconds: float

    @property
    def failed(self) -> bool:
        return any(r.status == "FAIL" for r in self.rows)

    def json(self) -> str:
        return to_json({**self.env, "seconds": round(self.seconds, 1)}, self.rows, self.curves)


def default_backends() -> list[str]:
    """Every backend that can run here, except the reference itself."""
    return [name for name, status in ops.available_backends().items()
            if status.startswith("available") and name != "reference"]


def check_backends(names: list[str]) -> list[str]:
    for name in names:
        ops.resolve_backend_name(name)     # BackendError naming the unknown or unavailable backend
    return names


def model_setup(s: CompareSettings, device: torch.device) -> tuple[str, int, int]:
    """(preset, batch size, window length) of the model part."""
    preset = s.preset or ("tiny" if s.quick else "book-124m" if device.type == "cuda" else "cpu-small")
    from ..model import PRESETS

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    T = min(PRESETS[preset].context_length, 32 if s.quick else 128)
    return preset, 2, T


def run_compare(s: CompareSettings, echo=print) -> CompareReport:
    """Run the comparison `s` describes; `echo` gets progress lines and the tables."""
    t0 = time.perf_counter()
    device = resolve_device(s.device)
    dtype = DTYPES[s.dtype]
    backends = check_backends(list(s.backends) or default_backends())
    env = environment(device, asdict(s) | {"backends": backends})
    echo(f"compare: {', '.join(backends)} against float64 reference | device: {env['device']} | "
         f"dtype: {s.dtype} | torch {env['torch']}" + (f" | triton {env['triton']}" if env["triton"] else ""))
    if device.type == "cpu" and "triton" in backends:
        echo("  triton on CPU runs in Triton's interpreter: small shapes only")
    rows, curves = [], {}
    if s.ops:
        cases = op_cases(s.quick)
        echo(f"ops: {len(cases)} cases x {len(backends)} backends, output and every input gradient")
        rows += compare_ops(cases, backends, dtype, device, s.seed, progress=s.progress)
    if s.model:
        preset, batch, T = model_setup(s, device)
        steps = s.steps or (4 if s.quick else 10)
        label = f"{preset} B{batch} T{T}"
        echo(f"model: {label}: logits, loss and every parameter gradient after one backward")
        base = seeded_model(preset, s.seed, drop_rate=0.0)
        batches = verdict_batches(steps, batch, T, s.seed)
        rows += compare_model(base, backends, dtype, device, batches[0], label)
        echo(f"training run: {steps} AdamW steps from the same weights, dropout 0.1")
        run_rows, curves = compare_training_run(seeded_model(preset, s.seed, drop_rate=0.1), backends, dtype, device,
                                                batches, s.seed + 1, f"{label} {steps} steps")
        rows += run_rows
    return CompareReport(env, rows, curves, time.perf_counter() - t0)


__all__ = ["CompareSettings", "CompareReport", "Row", "run_compare", "table", "curves_table", "DTYPES",
           "default_backends"]
