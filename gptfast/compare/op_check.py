"""Each op of each backend against the float64 `reference`: the forward output and every input gradient.

For a case and a dtype: the reference runs in float64 on the same device (the truth); each backend runs
on the same inputs rounded to the dtype, with the same upstream gradient. For half precision the
`torch` backend (or, where it computes another function, the `reference` math) run at that dtype gives
PyTorch's own error, the baseline of the 2x rule. Outputs of our compiled kernels are poisoned (NaN)
before they are written, so an element a kernel skips fails instead of passing by luck.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from .. import ops
from ..ops.spec import OPS, Case, Op, computes
from .rules import HALF, errors, op_tolerance, passes


@dataclass
class Row:
    part: str                 # "op" | "model" | "run"
    name: str                 # the op, or "model" / "training run"
    case: str                 # shape and variant
    backend: str
    dtype: str                # what the backend computed in
    quantity: str             # "out", "grad q", "logits", "grad blocks.0.att.W_query.weight", "losses", ...
    max_abs: float | None
    rel: float | None
    tol: float | None
    status: str               # PASS | FAIL | SKIP
    note: str = ""

    def to_dict(self) -> dict:
        """JSON-ready: a non-finite error (NaN or inf in the output) becomes the string "inf"."""
        return {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@contextlib.contextmanager
def poisoned_kernel_outputs(backends):
    """NaN-fill the compiled kernels' outputs before they are written (the extension's debug switch)."""
    ext = None
    if "extension" in backends:
        try:
            ext = ops.get_backend("extension")
        except ops.BackendError:
            ext = None
    if ext is not None:
        ext.set_poison_outputs(True)
    try:
        yield
    finally:
        if ext is not None:
            ext.set_poison_outputs(False)


def op_cases(quick: bool) -> list[tuple[Op, Case]]:
    """Every op's cases (its module's `cases`): the edge shapes at small sizes, and unless `quick` GPT-2's."""
    return [(op, case) for op in OPS.values() for case in op.cases(quick) if not quick or not case.big]


def run_case(op: Op, case: Case, backend: str, dtype: torch.dtype, device: torch.device, leaves64: dict,
             dout64: torch.Tensor | None):
    """(output, {input name: gradient}) of `backend` on the case's inputs at `dtype` (no gradients for an
    inference-only op: its forward under no_grad)."""
    grads_wanted = not op.inference_only
    leaves = {n: t.to(device=device, dtype=dtype).requires_grad_(grads_wanted) for n, t in leaves64.items()}
    extra = {n: t.to(device) for n, t in case.extra.items()}
    with torch.set_grad_enabled(grads_wanted):
        out = case.call(backend, {**leaves, **extra})
    if not grads_wanted:
        return out, {}
    upstream = torch.ones_like(out) if dout64 is None else dout64.to(device=device, dtype=out.dtype)
    grads = torch.autograd.grad(out, list(leaves.values()), upstream)
    return out, dict(zip(leaves, grads))


def _quantities(out, grads) -> dict:
    return {"out": out, **{f"grad {n}": g for n, g in grads.items()}}


def uses_tf32(op: Op, backend: str, device: torch.device) -> bool:
    """Triton's tl.dot multiplies float32 in tf32 on a GPU; our CUDA and CPU kernels use plain fp32 FMA."""
    return backend == "triton" and device.type == "cuda" and op.triton_tf32


def _skip(op: Op, case: Case, backend: str, dtype: torch.dtype, device: torch.device) -> str | None:
    """Why `backend` is not compared on this case, or None."""
    if not computes(op, backend):
        return f"{backend} has no {op.name}"
    if dtype != torch.float64 and dtype_name(dtype) not in op.dtypes:
        return f"{op.name} takes {', '.join(op.dtypes)}"
    if case.random and not ops.shares_dropout_rng(backend, device.type, dtype_name(dtype)):
        return "its dropout has its own RNG: a different function, nothing to compare"
    if backend == "triton" and device.type == "cpu" and not case.small:
        return "too large for Triton's CPU interpreter (run on a GPU)"
    return None


def compare_case(op: Op, case: Case, backends: list[str], dtype: torch.dtype, device: torch.device,
                 seed: int) -> list[Row]:
    g = torch.Generator().manual_seed(seed)
    leaves64 = case.build(g)
    ref_out, ref_grads = run_case(op, case, "reference", torch.float64, device, leaves64, None)
    dout64 = None if ref_out.dim() == 0 or op.inference_only else \
        torch.randn(ref_out.shape, generator=g, dtype=torch.float64)
    if dout64 is not None:
        ref_out, ref_grads = run_case(op, case, "reference", torch.float64, device, leaves64, dout64)
    ref = _quantities(ref_out, ref_grads)

    baseline = {}
    if dtype in HALF and dtype_name(dtype) in op.dtypes:   # PyTorch's own error at this precision, per quantity
        who = "reference" if case.random or op.torch_twin is None else "torch"
        got = _quantities(*run_case(op, case, who, dtype, device, leaves64, dout64))
        baseline = {q: errors(got[q], ref[q])[1] for q in ref}

    rows = []
    for backend in backends:
        base = dict(part="op", name=op.name, case=case.label, backend=backend, dtype=dtype_name(dtype))
        why = _skip(op, case, backend, dtype, device)
        if why is not None:
            rows.append(Row(**base, quantity="all", max_abs=None, rel=None, tol=None, status="SKIP", note=why))
            continue
        try:
            got = _quantities(*run_case(op, case, backend, dtype, device, leaves64, dout64))
        except Exception as err:  # a backend that raises is reported, not allowed to stop the others
            unsupported = isinstance(err, TypeError) and dtype == torch.float64
            rows.append(Row(**base, quantity="all", max_abs=None, rel=None, tol=None,
                            status="SKIP" if unsupported else "FAIL",
                            note=f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"))
            continue
        for q in ref:
            max_abs, rel = errors(got[q], ref[q])
            tol = op_tolerance(dtype, baseline.get(q), uses_tf32(op, backend, device))
            note = f"PyTorch at {dtype_name(dtype)}: {baseline[q]:.1e}" if q in baseline else ""
            rows.append(Row(**base, quantity=q, max_abs=max_abs, rel=rel, tol=tol,
                            status="PASS" if passes(rel, tol) else "FAIL", note=note))
    return rows


def compare_ops(cases: list[tuple[Op, Case]], backends: list[str], dtype: torch.dtype, device: torch.device,
                seed: int = 0, progress: bool = True) -> list[Row]:
    rows = []
    with poisoned_kernel_outputs(backends), tqdm(cases, desc="ops", unit="case", leave=False,
                                                 disable=None if progress else True) as bar:
        for i, (op, case) in enumerate(bar):
            bar.set_postfix_str(f"{op.name} {case.label}")
            rows += compare_case(op, case, backends, dtype, device, seed + i)
    return rows
