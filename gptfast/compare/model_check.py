"""The whole model, backend against backend: one forward and backward, then a short training run.

One seeded `GPTModel` is copied per backend, so every backend starts from the same weights and sees
the same batch (windows of The Verdict). The `reference` backend in float64 is the truth. A backend
runs in float64 where all its ops have float64 kernels (then any difference is a wiring bug, not
rounding); otherwise at the chosen dtype (float32 as is, float16/bfloat16 under autocast, as training
runs them), held to 2x the error of the `reference` math run at that same precision.
"""
from __future__ import annotations

import contextlib
import copy

import torch

from .. import ops
from ..data import VERDICT_PATH
from ..model import GPTConfig, GPTModel
from ..tokenizer import get_tokenizer
from ..training.optim import grad_scaler, make_optimizer
from .op_check import Row, dtype_name
from .rules import HALF, errors, model_tolerance, passes


def supports_float64(backend: str, device: torch.device) -> bool:
    """Whether every op of `backend` takes float64 tensors on `device` (tried on tiny inputs)."""
    x = torch.randn(2, 3, 4, 8, dtype=torch.float64, device=device)
    w = torch.ones(8, dtype=torch.float64, device=device)
    try:
        ops.layer_norm(x, w, w, backend=backend)
        ops.gelu(x, backend=backend)
        ops.causal_attention(x, x, x, backend=backend)
        ops.cross_entropy(x.flatten(0, 2), torch.zeros(24, dtype=torch.int64, device=device), backend=backend)
    except (TypeError, RuntimeError, ValueError):
        return False
    return True


def verdict_batches(n: int, batch: int, T: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """n (inputs, targets) batches of `batch` random windows of T tokens from the shipped Verdict."""
    with open(VERDICT_PATH, encoding="utf-8") as f:
        ids = torch.tensor(get_tokenizer("gpt2").encode(f.read()))
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        starts = torch.randint(0, len(ids) - T - 1, (batch,), generator=g)
        x = torch.stack([ids[s:s + T] for s in starts])
        y = torch.stack([ids[s + 1:s + T + 1] for s in starts])
        out.append((x, y))
    return out


def _precision(dtype: torch.dtype, device: torch.device):
    return torch.autocast(device.type, dtype=dtype) if dtype in HALF else contextlib.nullcontext()


def _copy(base: GPTModel, backend: str, dtype: torch.dtype, device: torch.device) -> GPTModel:
    model = copy.deepcopy(base).to(device)
    if dtype == torch.float64:
        model.double()
    return model.set_backend(backend)


def _loss(model: GPTModel, x, y, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The loss as training computes it: `model(inputs, targets)`, the LM head fused with the loss."""
    with _precision(dtype, device):
        return model(x.to(device), y.to(device))


def forward_backward(base: GPTModel, backend: str, dtype: torch.dtype, device: torch.device, x, y) -> dict:
    """{"logits", "loss", "grad <param>"...} of a copy of `base`: the loss and its gradients through the path
    training runs (`model(x, y)`), the logits from the forward that generation and evaluation run (`model(x)`)."""
    model = _copy(base, backend, dtype, device)
    loss = _loss(model, x, y, dtype, device)
    loss.backward()
    with torch.no_grad(), _precision(dtype, device):
        logits = model(x.to(device))                                        # (B, T, V)
    return {"logits": logits, "loss": loss.detach(), **{f"grad {n}": p.grad for n, p in model.named_parameters()}}


def run_dtype(backend: str, dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """float64 where the backend has float64 kernels; else the chosen dtype (float32 when float64 was chosen)."""
    if backend == "reference" or supports_float64(backend, device):
        return torch.float64
    return torch.float32 if dtype == torch.float64 else dtype


def compare_model(base: GPTModel, backends: list[str], dtype: torch.dtype, device: torch.device,
                  batch: tuple, label: str) -> list[Row]:
    """Logits, loss and every parameter gradient of each backend against float64 `reference`."""
    x, y = batch
    ref = forward_backward(base, "reference", torch.float64, device, x, y)
    baselines = {}
    rows = []
    for backend in backends:
        rd = run_dtype(backend, dtype, device)
        head = dict(part="model", name="model", case=label, backend=backend, dtype=dtype_name(rd))
        if rd != torch.float64 and rd not in baselines:   # the same model with PyTorch's math at rd
            got = forward_backward(base, "reference", rd, device, x, y)
            baselines[rd] = {q: errors(got[q], ref[q])[1] for q in ref}
        try:
            got = forward_backward(base, backend, rd, device, x, y)
        except Exception as err:  # reported in the table, the other backends still run
            rows.append(Row(**head, quantity="all", max_abs=None, rel=None, tol=None, status="FAIL",
                            note=f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"))
            continue
        for q in ref:
            max_abs, rel = errors(got[q], ref[q])
            baseline = baselines.get(rd, {}).get(q)
            tol = model_tolerance(rd, baseline)
            rows.append(Row(**head, quantity=q, max_abs=max_abs, rel=rel, tol=tol,
                            status="PASS" if passes(rel, tol) else "FAIL",
                            note="" if baseline is None else f"reference at {dtype_name(rd)}: {baseline:.1e}"))
    return rows


def training_losses(base: GPTModel, backend: str, dtype: torch.dtype, device: torch.device,
                    batches: list, seed: int, lr: float = 1e-3) -> list[float]:
    """Per-step losses of training steps from `base`'s weights as train.py takes them (the fused loss,
    make_optimizer's AdamW with its decay groups and fused kernel, the loss scaler of the precision),
    dropout on, the same RNG draws for every backend (torch.manual_seed before the first step: dropout
    masks and attention seeds match)."""
    model = _copy(base, backend, dtype, device).train()
    opt = make_optimizer(model, lr, weight_decay=0.1, device=device)      # what training uses
    scaler = grad_scaler(dtype_name(dtype), device)
    torch.manual_seed(seed)
    losses = []
    for x, y in batches:
        loss = _loss(model, x, y, dtype, device)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def compare_training_run(base: GPTModel, backends: list[str], dtype: torch.dtype, device: torch.device,
                         batches: list, seed: int, label: str) -> tuple[list[Row], dict]:
    """Per-step losses of every backend beside float64 `reference`'s; a row per backend names the first
    step whose loss leaves the reference's by more than the tolerance. Returns (rows, curves)."""
    curves = {"reference (float64)": training_losses(base, "reference", torch.float64, device, batches, seed)}
    ref = torch.tensor(curves["reference (float64)"], dtype=torch.float64)
    baseline_dev = {}
    rows = []
    for backend in backends:
        rd = run_dtype(backend, dtype, device)
        head = dict(part="run", name="training run", case=label, backend=backend, dtype=dtype_name(rd))
        try:
            losses = training_losses(base, backend, rd, device, batches, seed)
        except Exception as err:
            rows.append(Row(**head, quantity="losses", max_abs=None, rel=None, tol=None, status="FAIL",
                            note=f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"))
            continue
        curves[f"{backend} ({dtype_name(rd)})"] = losses
        if not ops.shares_dropout_rng(backend, device.type, dtype_name(rd)):
            rows.append(Row(**head, quantity="losses", max_abs=None, rel=None, tol=None, status="SKIP",
                            note="its dropout has its own RNG: its curve is shown, not judged"))
            continue
        if rd != torch.float64 and rd not in baseline_dev:
            own = training_losses(base, "reference", rd, device, batches, seed)
            curves[f"reference ({dtype_name(rd)})"] = own
            baseline_dev[rd] = ((torch.tensor(own, dtype=torch.float64) - ref).abs() / ref.abs()).max().item()
        dev = (torch.tensor(losses, dtype=torch.float64) - ref).abs() / ref.abs()      # per step
        baseline = baseline_dev.get(rd)
        tol = model_tolerance(rd, baseline)
        bad = [i for i, d in enumerate(dev.tolist()) if not passes(d, tol)]
        note = f"leaves the reference at step {bad[0]}" if bad else f"within tolerance for all {len(dev)} steps"
        if baseline is not None:
            note += f"; reference at {dtype_name(rd)}: {baseline:.1e}"
        rows.append(Row(**head, quantity="losses", max_abs=(dev * ref.abs()).max().item(), rel=dev.max().item(),
                        tol=tol, status="FAIL" if bad else "PASS", note=note))
    return rows, curves


def seeded_model(preset: str, seed: int, drop_rate: float) -> GPTModel:
    torch.manual_seed(seed)
    return GPTModel(GPTConfig.from_preset(preset, drop_rate=drop_rate, backend="reference"))
