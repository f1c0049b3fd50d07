"""Op backends by name: which exist, which can run here, and which one is in use.

A backend is a module holding one function per op it computes, named as the op (`get_backend("torch").<op>`),
made from the op modules' list (spec.OPS): `reference` (reference.py: each op's textbook function), `torch`
(torch_builtins.py: each op's torch twin), `extension` (extension.py: our C++/CUDA kernels), `triton`
(triton/: our Triton kernels) and `auto` (auto.py, which picks one of the others per op). Backends are
loaded lazily, so a missing compiled extension or Triton only matters when that backend is asked for.
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType

DEFAULT_BACKEND = "auto"
ENV_VAR = "GPTFAST_BACKEND"

# name -> (module path, one-line description)
_BACKENDS: dict[str, tuple[str, str]] = {
    "reference": ("gptfast.ops.reference", "explicit PyTorch math (the textbook; the truth in tests)"),
    "torch": ("gptfast.ops.torch_builtins", "PyTorch built-ins (each op module's torch_twin: F.*, SDPA)"),
    "extension": ("gptfast.ops.extension", "our compiled C++ kernels (csrc/) as torch custom ops"),
    "triton": ("gptfast.ops.triton", "our Triton kernels as torch custom ops"),
    "auto": ("gptfast.ops.auto", "per op, the backend measured fastest for this device and dtype (auto_table.json)"),
}
_loaded: dict[str, ModuleType] = {}
_errors: dict[str, str] = {}


class BackendError(ValueError):
    """An unknown backend name, or a known backend that cannot run here."""


def register_backend(name: str, module: str, description: str) -> None:
    """Make `name` selectable; `module` is imported on first use and must define the ops."""
    _BACKENDS[name] = (module, description)
    _loaded.pop(name, None)
    _errors.pop(name, None)


def _load(name: str) -> ModuleType | None:
    if name in _loaded:
        return _loaded[name]
    if name in _errors:
        return None
    try:
        module = importlib.import_module(_BACKENDS[name][0])
    except Exception as err:  # ImportError, a failed build, a missing driver, ...
        _errors[name] = f"{type(err).__name__}: {err}"
        return None
    _loaded[name] = module
    return module


def can_run(name: str) -> bool:
    """Whether backend `name` is known and loads here (loading it if need be)."""
    return name in _BACKENDS and _load(name) is not None


def supports_kv_cache(backend: str | None, device) -> bool:
    """Whether `backend` can attend fewer queries than keys (KV-cache decoding) on `device`."""
    import torch

    check = getattr(get_backend(backend), "supports_kv_cache", None)
    return bool(check(torch.device(device))) if check else True


def unavailable_reason(name: str) -> str | None:
    """Why backend `name` cannot run here (loading it if need be), or None when it can."""
    if name not in _BACKENDS:
        return "unknown backend"
    return None if _load(name) is not None else _errors[name]


def available_backends() -> dict[str, str]:
    """Every known backend -> "available: <description>" or "unavailable: <why>"."""
    status = {}
    for name, (_, description) in _BACKENDS.items():
        module = _load(name)
        if module is None:
            status[name] = f"unavailable: {_errors[name]}"
            continue
        status[name] = f"available: {description}"
        if hasattr(module, "build_info"):           # compiled backends say what they contain
            status[name] += f" {module.build_info()}"
    return status


def known_backends() -> list[str]:
    """Every backend name, without loading (or compiling) any of them."""
    return list(_BACKENDS)


def resolve_backend_name(name: str | None = None) -> str:
    """`name`, else $GPTFAST_BACKEND, else the default; checked to exist and to be loadable."""
    name = name or os.environ.get(ENV_VAR) or DEFAULT_BACKEND
    if name not in _BACKENDS:  # listing names loads nothing (loading may mean compiling)
        raise BackendError(f"unknown op backend {name!r}; known backends: {', '.join(_BACKENDS)} "
                           "(gptfast.ops.available_backends() says which can run here)")
    if _load(name) is None:
        raise BackendError(f"op backend {name!r} is unavailable here ({_errors[name]}); "
                           f"available: {', '.join(_usable())}")
    return name


def get_backend(name: str | None = None) -> ModuleType:
    return _loaded.get(name) or _loaded[resolve_backend_name(name)]


def shares_dropout_rng(name: str, device_type: str = "cpu", dtype: str = "float32") -> bool:
    """Whether `name`'s dropouts (every op's with dropout: spec.Op.drops_out) drop what `reference` drops for the same seed
    (the shared counter-based RNG) on `device_type` at `dtype`. A backend says it does not with
    SHARES_DROPOUT_RNG = False; one that delegates (auto) names its delegates with dropout_backends()."""
    module = get_backend(name)
    delegates = getattr(module, "dropout_backends", None)
    if delegates is not None:
        return all(shares_dropout_rng(d, device_type, dtype) for d in delegates(device_type, dtype))
    return getattr(module, "SHARES_DROPOUT_RNG", True)


def _usable() -> list[str]:
    return [n for n in _BACKENDS if _load(n) is not None]
