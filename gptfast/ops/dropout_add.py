"""Dropout fused with the residual add: y = residual + dropout(x), the step after every attention and
feed-forward branch of a block in training.

    keep[row, col] = hash(seed, row, col) >= p            (the shared counter-based RNG, dropout_rng.py)
    y = residual + x * keep / (1 - p)                     x seen as rows of its last dim

Kernels: csrc/cpu/dropout.cpp, csrc/cuda/dropout.cu, ops/triton/dropout.py. Why a counter hash and not a stored
mask: the backward regenerates the mask from the seed (dx = dy * keep / (1 - p)), so nothing of the size of x
is saved, and every backend drops exactly the same elements for the same seed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .checks import check_floating
from .dropout_rng import dropout_keep_mask
from .registry import get_backend
from .spec import BadInput, Bench, Case, Kernel, Op, element_size, randn, register, seed_tensor


def dropout_add(x: torch.Tensor, residual: torch.Tensor | None = None, p: float = 0.0,
                seed: torch.Tensor | int | None = None, backend: str | None = None) -> torch.Tensor:
    """residual + dropout(x): each element of x kept with probability 1 - p and scaled by 1 / (1 - p),
    the residual added in the same pass (None: plain dropout). y has residual's dtype - x may be a
    bfloat16/float16 branch output added into a float32 residual stream, as under autocast.

    `seed` keys the shared counter-based RNG (dropout_rng.py) by each element's (row, col) in x's
    (rows, last dim) view: the backward regenerates the mask instead of storing it, and every backend
    but `torch` (F.dropout's own RNG) drops the same elements. None draws a seed from torch's generator
    (so torch.manual_seed makes runs repeatable)."""
    check_floating("x", x)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"p must be in [0, 1), got {p}")
    if x.ndim == 0:
        raise ValueError("x must have at least one dimension, got a 0-dim tensor")
    if residual is not None:
        check_floating("residual", residual)
        if residual.shape != x.shape:
            raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
        if residual.device != x.device:
            raise ValueError(f"residual is on {residual.device} but x is on {x.device}")
        if residual.dtype != x.dtype and not (residual.dtype == torch.float32 and x.dtype in (torch.bfloat16,
                                                                                               torch.float16)):
            raise TypeError(f"residual must have x's dtype {x.dtype} (or float32 for a 16-bit x), got {residual.dtype}")
    if p == 0.0:                       # eval: the plain add, without a kernel call (decoding runs ~25 a token)
        return x if residual is None else residual + x
    return get_backend(backend).dropout_add(x, residual, p, seed_tensor(seed))


# ----------------------------------------------------------------------------- the textbook and PyTorch's
def reference(x: torch.Tensor, residual: torch.Tensor | None, p: float, seed) -> torch.Tensor:
    """residual + dropout(x), spelled out: the keep-mask from the shared counter-based RNG over x's
    (rows, last dim) view - the attention dropout's hash with a single "head" - then x * keep / (1 - p),
    in the output's dtype (residual's, else x's)."""
    C = x.shape[-1]
    keep = dropout_keep_mask(seed, 1, x.numel() // max(C, 1), C, p, device=x.device)[0].view(x.shape)
    out_dtype = residual.dtype if residual is not None else x.dtype
    y = x.to(out_dtype) * keep.to(out_dtype) / (1.0 - p)
    return y if residual is None else y + residual


def torch_twin(x: torch.Tensor, residual: torch.Tensor | None, p: float, seed) -> torch.Tensor:
    """What the model did before the fused op: nn.Dropout's F.dropout (its own RNG: `seed` unused, a
    stored mask), then the add."""
    y = F.dropout(x, p, training=True)
    return y if residual is None else residual + y


# ----------------------------------------------------------------------------- the compiled kernels' contract
def _fake_fwd(x, residual, p, seed):
    return torch.empty(x.shape, dtype=residual.dtype if residual is not None else x.dtype, device=x.device)


def _fake_bwd(dy, p, seed, dtype):
    return torch.empty(dy.shape, dtype=dtype, device=dy.device)


def _autograd(bwd):
    """dx regenerates the mask from the seed (nothing else is saved); dresidual is dy itself."""
    def setup(ctx, inputs, output):
        x, residual, p, seed = inputs
        ctx.save_for_backward(seed)
        ctx.p, ctx.x_dtype, ctx.has_residual = p, x.dtype, residual is not None
        ctx.set_materialize_grads(False)

    def backward(ctx, dy):
        if dy is None:
            return None, None, None, None
        (seed,) = ctx.saved_tensors
        return bwd(dy, ctx.p, seed, ctx.x_dtype), (dy if ctx.has_residual else None), None, None

    return setup, backward


def compiled(k, backend: str):
    def dropout_add(x, residual, p, seed):
        return k.dropout_add_fwd(x, residual, p, seed)
    return dropout_add


# ----------------------------------------------------------------------------- cases
def _case(shape: tuple, residual: bool = True, view: str = "", p: float = 0.1, small: bool = True,
          big: bool = False, found: str = "") -> Case:
    """A fixed seed, so backends sharing the counter-based RNG drop the reference's elements. view
    "transposed": x is a leaf of the reversed shape seen through .t(); "strided residual": the residual is
    every other column of a leaf twice as wide."""
    seed = torch.tensor([4321], dtype=torch.int64)

    def build(g):
        leaves = {"x": randn(g, *(shape[::-1] if view == "transposed" else shape))}
        if residual:
            leaves["residual"] = randn(g, *shape[:-1], shape[-1] * (2 if view == "strided residual" else 1))
        return leaves

    def call(backend, t):
        x = t["x"].t() if view == "transposed" else t["x"]
        r = t.get("residual")
        if r is not None and view == "strided residual":
            r = r[..., ::2]
        return dropout_add(x, r, p, seed=seed, backend=backend)
    label = "x".join(map(str, shape)) + ("" if residual else " no residual") + (f" {view}" if view else "") + \
        f" p {p:g}"
    return Case(label, build, call, small=small, big=big, random=True, found=found)


def cases(quick: bool) -> list[Case]:
    out = [_case((2, 7, 768)), _case((33, 1023), residual=False, found="a partial last vector, no residual"),
           _case((129, 80), view="transposed", p=0.5, found="non-contiguous x"), _case((5,), found="one row"),
           _case((9, 129), view="strided residual", found="a strided residual")]
    if not quick:
        out += [_case((2048, 768), small=False, big=True), _case((2048, 1600), residual=False, small=False, big=True)]
    return out


def bad_inputs() -> list[BadInput]:
    x = torch.randn(2, 8)
    return [BadInput(lambda: dropout_add(x, x, 1.0), ValueError, r"p must be in \[0, 1\)"),
            BadInput(lambda: dropout_add(x, x[:1], 0.1), ValueError, "residual must have x's shape"),
            BadInput(lambda: dropout_add(x, x.double(), 0.1), TypeError, "residual must have x's dtype"),
            BadInput(lambda: dropout_add(x.long(), x, 0.1), TypeError, "x must be a floating-point tensor"),
            BadInput(lambda: dropout_add(torch.tensor(1.0), None, 0.1), ValueError, "x must have at least one"),
            BadInput(lambda: dropout_add(x, x.to("meta"), 0.1), ValueError, "residual is on meta but x is on cpu")]


BENCH_SEED = torch.tensor([1234], dtype=torch.int64)


def bench_shapes(device_type: str, quick: bool, sweep: bool) -> dict:
    return {"dropout_add": [(8 * 64, 768)] if quick else [(8 * 256, 768), (8 * 1024, 768)]}


def bench(key: str, shape: tuple) -> Bench:
    def work(dtype, mode):
        # forward: read x and the residual, write y; backward: read dy, write dx (the residual's gradient is
        # dy itself, no copy; no mask is read - it is regenerated)
        return shape[0] * shape[1] * element_size(dtype) * (5 if mode == "fwd+bwd" else 3)
    return Bench(key, shape, lambda g: ([randn(g, *shape), randn(g, *shape)], ()),
                 lambda x, r, backend: dropout_add(x, r, 0.1, seed=BENCH_SEED, backend=backend), work, random=True)


register(Op("dropout_add", dropout_add, reference, torch_twin, cases, bad_inputs, bench_shapes, bench,
            kernels={"dropout_add_fwd": Kernel(_fake_fwd, _autograd, "dropout_bwd"), "dropout_bwd": Kernel(_fake_bwd)},
            compiled=compiled, drops_out=("dropout_add",), module=__name__))
