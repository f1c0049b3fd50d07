"""What an op module declares, and the list of ops every harness reads.

An op of `gptfast.ops` lives in one module (`gptfast/ops/<op>.py`) that holds, top to bottom:
  1. the public function, with the argument checks (once, for every backend),
  2. `reference`: the textbook math in plain PyTorch (float64 capable; the truth in every test),
  3. `torch_twin`: what a PyTorch user would write (PyTorch's built-ins, the baseline to beat),
  4. the compiled kernels' contract: the fake (shape-only) kernel of each kernel op and the autograd formula
     wiring a forward kernel to its backward kernel - the same for our C++/CUDA kernels
     (`torch.ops.gptfast.*`, csrc/) and our Triton kernels (`torch.ops.gptfast_triton.*`, ops/triton/) -
     and how a backend calls them (`compiled`),
  5. its cases: shapes, odd sizes, strided views, bad inputs, benchmark shapes - read by the generic op tests,
     `compare`, `bench_ops`, the `auto` table and the AOT check.
and ends with `register(Op(...))`. Backends, `auto`, `compare` and the harnesses iterate over `OPS`; adding an
op adds a module (and its kernels and tests), not a line to any of them. benchmarks/NOTES.md has the checklist.

(`gptfast.ops.<op>` is the function, re-exported by the package; its module's other names are reached with
`from gptfast.ops.<op> import reference`, or through OPS[name].)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

BACKEND_FUNCTIONS = ("reference", "torch")      # backends made of the op modules' own Python functions
KERNEL_NAMESPACES = {"extension": "gptfast", "triton": "gptfast_triton"}


@dataclass(frozen=True)
class Case:
    """One set of inputs: fresh random float64 leaves, and how to call the op on them with a backend.

    Views (strided, transposed, sliced) are made inside `call` from contiguous leaves, so gradients flow back
    to the leaves the comparison reads."""
    label: str                                 # shape and variant, as tables show it
    build: Callable[[torch.Generator], dict]   # generator -> {name: float64 CPU leaf}, never all zeros
    call: Callable[[str, dict], torch.Tensor]  # (backend, leaves at the dtype on the device, + extra) -> output
    extra: dict = field(default_factory=dict)  # non-differentiable inputs (targets), used as built
    small: bool = True                         # cheap enough for Triton's CPU interpreter
    big: bool = False                          # GPT-2-sized: compare's full run only
    random: bool = False                       # dropout: only backends sharing the counter-based RNG agree
    found: str = ""                            # what this case is here to catch (a bug it found, a trap)


@dataclass(frozen=True)
class BadInput:
    """A call through the interface that must raise `error` with a message matching `match` (naming the
    argument that is wrong)."""
    call: Callable[[], object]
    error: type
    match: str


@dataclass(frozen=True)
class Bench:
    """One timed shape of bench_ops: float64 inputs, the call, and the work of one call (bytes or FLOPs)."""
    key: str                                    # the auto table's op key ("attention_dropout", ...)
    shape: tuple
    inputs: Callable[[torch.Generator], tuple[list, tuple]]   # -> (differentiable float64 inputs, extras)
    call: Callable                              # (*inputs, *extras, backend=...) -> output
    work: Callable[[torch.dtype, str], float]   # (dtype, "fwd" | "fwd+bwd") -> bytes or FLOPs of one call
    unit: str = "GB/s"                          # "GB/s" (memory-bound) or "GFLOP/s" (compute-bound)
    random: bool = False                        # dropout: implementations with their own RNG show no error
    peak_memory: bool = False                   # also measure the peak memory of one forward+backward
    weight_arg: int | None = None               # bound by reading this argument: time it read from memory
    time_reference: bool = True                 # False: its float64 reference takes minutes; run once, untimed


@dataclass(frozen=True)
class Kernel:
    """A compiled kernel op of the contract (csrc/ schemas; the Triton custom ops have the same signature):
    its fake kernel and, for a forward kernel, the autograd formula and the name of its backward kernel."""
    fake: Callable
    autograd: Callable | None = None           # formula(bwd) -> (setup_context, backward)
    backward: str | None = None                # the kernel op the formula calls (None: the formula needs none)


@dataclass
class Op:
    name: str                                  # the interface function: gptfast.ops.<name>
    function: Callable                         # that function (argument checks, then the backend)
    reference: Callable                        # backend signature, no `backend` argument
    torch_twin: Callable
    cases: Callable[[bool], list[Case]]        # quick -> cases (quick: the edge shapes at small sizes)
    bad_inputs: Callable[[], list[BadInput]]
    bench_shapes: Callable[[str, bool, bool], dict] | None = None   # (device type, quick, sweep) -> {key: shapes}
    bench: Callable[[str, tuple], Bench] | None = None      # (key, shape) -> the timed case
    kernels: dict[str, Kernel] = field(default_factory=dict)    # kernel op name -> its contract
    compiled: Callable | None = None           # (kernel namespace, backend name) -> the backend function
    table_keys: tuple[str, ...] = ()           # the auto table's rows for this op (default: its name)
    table_key: Callable | None = None          # (*args) -> the row a call uses (default: the first key)
    inference_only: bool = False               # no backward: compared and ranked by the forward
    memory_first: bool = False                 # its point is memory: auto ranks it above torch unless much slower
    triton_tf32: bool = False                  # its Triton kernels multiply float32 in tf32 on a GPU (tl.dot)
    native_16bit: bool = False                 # its CPU kernels read 16-bit tensors as they are (no widened copy)
    drops_out: tuple[str, ...] = ()            # its table keys whose calls apply dropout (the RNG matters)
    backends: tuple[str, ...] | None = None    # the backends that compute it (None: every one)
    dtypes: tuple[str, ...] = ("float32", "bfloat16", "float16")   # what it takes below float64
    # results must not depend on where they sit: (backend, x (rows, C)) -> the op on each row of x, its other
    # arguments fixed by C; a row alone must give the bits of that row in a batch (and, elementwise, of any slice)
    rowwise: Callable[[str, torch.Tensor], torch.Tensor] | None = None
    elementwise: bool = False
    peers: Callable[[str, str], Callable | None] | None = None   # (name, key) -> bench_ops' other implementations
    module: str = ""

    def __post_init__(self):
        self.table_keys = self.table_keys or (self.name,)


OPS: dict[str, Op] = {}


def register(op: Op) -> Op:
    """Add an op to the list every backend and harness reads (called at the end of each op module)."""
    if op.name in OPS:
        raise ValueError(f"op {op.name!r} is registered twice ({OPS[op.name].module} and {op.module})")
    OPS[op.name] = op
    return op


def table_keys() -> list[str]:
    """Every row key of the auto table, op by op."""
    return list(dict.fromkeys(key for op in OPS.values() for key in op.table_keys))


def op_for_key(key: str) -> Op:
    """The op whose own row `key` is (the first op naming it)."""
    return next(op for op in OPS.values() if key in op.table_keys)


def computes(op: Op, backend: str) -> bool:
    """Whether `backend` computes `op` (auto computes what the backends it picks compute)."""
    return op.backends is None or backend in op.backends or backend == "auto"


def randn(g: torch.Generator, *shape, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    """float64 normal values (never all zeros) for case inputs."""
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Row statistics kernels return (mean, rstd, lse, per-row losses) are float32, float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def element_size(dtype: torch.dtype) -> int:
    return torch.tensor([], dtype=dtype).element_size()


def seed_tensor(seed: torch.Tensor | int | None) -> torch.Tensor:
    """The dropout seed as the kernels take it: a one-element int64 tensor (drawn from torch's generator when
    None, so torch.manual_seed makes runs repeatable; a tensor, so drawing it stays inside a compiled graph)."""
    if seed is None:
        return torch.randint(0, 2**62, (1,), dtype=torch.int64)
    if not isinstance(seed, torch.Tensor):
        return torch.tensor([seed], dtype=torch.int64)
    return seed


def register_kernel_contracts(namespace: str, backend: str) -> None:
    """Register, for every kernel op of every op `backend` computes, its fake kernel and (forward kernels) its
    autograd formula on `namespace`::<kernel> - the same contract for the C++/CUDA kernels (namespace "gptfast")
    and the Triton ones ("gptfast_triton")."""
    kernels = getattr(torch.ops, namespace)
    for op in OPS.values():
        if not computes(op, backend):
            continue
        for name, kernel in op.kernels.items():
            torch.library.register_fake(f"{namespace}::{name}")(kernel.fake)
            if kernel.autograd is not None:
                setup, backward = kernel.autograd(getattr(kernels, kernel.backward) if kernel.backward else None)
                torch.library.register_autograd(f"{namespace}::{name}", backward, setup_context=setup)


def compiled_functions(namespace: str, backend: str) -> dict[str, Callable]:
    """{op name: the backend function} for every op `backend` computes with kernels on `namespace`."""
    kernels = getattr(torch.ops, namespace)
    return {op.name: op.compiled(kernels, backend) for op in OPS.values()
            if op.compiled is not None and computes(op, backend)}
