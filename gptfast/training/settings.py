"""Training settings: one dataclass whose fields carry their defaults and help, and every rule about them.

`scripts/train.py` builds its command line from `TrainSettings` (`add_arguments`), converts the parsed
flags back (`from_flags`) and calls `run_training`, which starts with `validate()`: every rule a
setting must satisfy - alone, together with others, or against this machine (is there a GPU, how many
processes did torchrun start) - is checked there, before any slow work, as a `ConfigError` naming the
flag.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import MISSING, dataclass, field, fields

import torch

from .. import ops
from ..cli import nonnegative_float, nonnegative_int, positive_float, positive_int
from ..data import DEFAULT_CORPUS
from ..device import DEVICE_CHOICES, resolve_device
from ..model import PRESETS, GPTConfig
from ..tokenizer import TOKENIZERS
from .optim import DTYPE_CHOICES, check_precision
from .parallel import launched_world_size


class ConfigError(ValueError):
    """A training setting that cannot work, with a message saying which and why."""


def setting(default, help: str, *, type=None, choices=None, nargs=None):
    """A settings field with its command-line help; `type` converts (and checks) the flag's text."""
    return field(default=default, metadata={"help": help, "type": type, "choices": choices, "nargs": nargs})


def backend_help() -> str:
    from ..ops import auto

    # from the shipped table alone: printing help loads (and compiles) no backend
    picks = ", ".join(f"{op} {backend}" for op, backend in auto.table_picks("cpu", "float32").items())
    return (f"op backend: {', '.join(ops.known_backends())} (default: $GPTFAST_BACKEND or auto, which picks per op "
            f"what measurably wins on this device; on a CPU at float32 its table says: {picks}; a run prints what "
            "it takes)")


@dataclass
class TrainSettings:
    # what to train on and what to train
    data: str | list = setting(DEFAULT_CORPUS, "text file or URL (downloaded once, cached; default: The Verdict, "
                               "shipped with gptfast); a folder or several files are tokenized once into a "
                               "memory-mapped token file", nargs="+")
    preset: str | None = setting(None, f"model size: {', '.join(PRESETS)} (default: cpu-small on CPU, book-124m on "
                                       "CUDA)")
    init_from: str | None = setting(None, "fine-tune from a GPT-2 folder (Hugging Face format) or a gptfast "
                                          "checkpoint")
    resume: str | None = setting(None, "continue from a checkpoint file, or 'auto' for the latest in --out")
    tokenizer: str = setting("gpt2", "tokenizer", choices=TOKENIZERS)
    bpe_vocab_size: int = setting(1024, "vocabulary of the BPE trained with --tokenizer bpe", type=positive_int)
    train_ratio: float = setting(0.9, "fraction of the text that trains (the rest validates)",
                                 type=positive_float)
    tie_embeddings: bool = setting(False, "share the LM head with the token embedding (fresh models only)")
    pad_vocab: bool = setting(False, "pad embedding and LM-head rows to a multiple of 64 (50257 -> 50304: "
                                     "faster matmuls; fresh models only)")
    drop_rate: float | None = setting(None, "dropout rate instead of the preset's", type=nonnegative_float)
    # how it computes
    backend: str | None = setting(None, backend_help)
    device: str = setting("auto", "device", choices=DEVICE_CHOICES)
    dtype: str = setting("auto", "autocast precision of the forward pass: auto = bfloat16 where the hardware has "
                                 "bfloat16 matrix instructions (CUDA sm_80+, CPUs with avx512_bf16 or AMX-BF16), else "
                                 "float32; float16: CUDA only, with loss scaling. Weights, optimizer state and "
                                 "checkpoints stay float32", choices=DTYPE_CHOICES)
    compile: bool = setting(False, "torch.compile the training forward")
    fsdp: bool = setting(False, "under torchrun: shard weights, gradients and optimizer state across processes "
                                "(FSDP) instead of replicating the model (DDP)")
    num_workers: int = setting(0, "DataLoader workers", type=nonnegative_int)
    # the optimization
    epochs: int = setting(10, "passes over the training split", type=positive_int)
    batch_size: int = setting(2, "windows per micro-batch", type=positive_int)
    context_length: int | None = setting(None, "window length (default: the preset's)", type=positive_int)
    stride: int | None = setting(None, "window step (default: the context length)", type=positive_int)
    grad_accum: int = setting(1, "micro-batches per optimizer step", type=positive_int)
    lr: float = setting(4e-4, "peak learning rate", type=positive_float)
    weight_decay: float = setting(0.1, "AdamW weight decay (weight matrices only)", type=nonnegative_float)
    warmup_steps: int = setting(0, "linear learning-rate warm-up", type=nonnegative_int)
    min_lr: float | None = setting(None, "cosine-decay the rate to this at the last step (default: constant)",
                                   type=nonnegative_float)
    grad_clip: float = setting(0.0, "max global gradient norm (0: off)", type=nonnegative_float)
    max_steps: int | None = setting(None, "stop after this many optimizer steps in total", type=positive_int)
    seed: int = setting(123, "seed of the weights, the shuffles and dropout", type=int)
    # what it reports and writes
    eval_freq: int = setting(5, "evaluate every N steps", type=positive_int)
    eval_iter: int = setting(5, "batches per evaluation", type=positive_int)
    start_context: str = setting("Every effort moves you", "prompt of the per-epoch sample")
    sample_tokens: int = setting(50, "tokens of the per-epoch sample (greedy)", type=positive_int)
    out: str = setting(os.path.join("runs", "latest"), "run folder: checkpoint.pt, model.safetensors, metrics.jsonl, "
                                                       "loss.png")
    checkpoint_every: int = setting(0, "also checkpoint every N steps (ckpt-step*.pt; 0: only at the end)",
                                    type=nonnegative_int)
    keep_checkpoints: int = setting(3, "periodic checkpoints kept", type=positive_int)
    progress: bool = setting(True, "progress bars")

    def __post_init__(self):
        if isinstance(self.data, (list, tuple)) and len(self.data) == 1:
            self.data = self.data[0]

    def model_preset(self, device: torch.device) -> str:
        return self.preset or ("book-124m" if device.type == "cuda" else "cpu-small")

    def validate(self) -> None:
        """Every rule on the settings, before any slow work: a ConfigError (or ops.BackendError) naming the flag."""
        checks = [(self.tokenizer in TOKENIZERS, f"unknown tokenizer {self.tokenizer!r}; choose one of: "
                                                 f"{', '.join(TOKENIZERS)}"),
                  (self.preset is None or self.preset in PRESETS,
                   f"unknown preset {self.preset!r}; choose one of: {', '.join(PRESETS)}")]
        for f in fields(self):          # the flag types' rules, for settings not made from flags
            value, kind = getattr(self, f.name), f.metadata.get("type")
            if value is not None and kind in RULES and not RULES[kind][0](value):
                checks.append((False, f"--{flag(f.name)} must be {RULES[kind][1]}, got {value!r}"))
        checks += [(0 < self.train_ratio < 1, f"--train-ratio must be between 0 and 1, got {self.train_ratio}"),
                   (self.drop_rate is None or self.drop_rate < 1, f"--drop-rate must be < 1, got {self.drop_rate}")]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        ops.resolve_backend_name(self.backend)            # BackendError naming an unknown/unavailable backend
        try:
            device = resolve_device(self.device)
            check_precision(self.dtype, device)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        self._validate_against(device, launched_world_size())

    def _validate_against(self, device: torch.device, world: int) -> None:
        """The rules that depend on this machine: the preset's context, processes and FSDP."""
        preset = self.model_preset(device)
        limit = GPTConfig.from_preset(preset).context_length
        if self.context_length is not None and self.context_length > limit:
            raise ConfigError(f"--context-length {self.context_length} exceeds the {preset} model's context "
                              f"length {limit}")
        if self.fsdp and world == 1:
            raise ConfigError("--fsdp shards the model across processes: launch with torchrun --nproc_per_node=N "
                              "(N > 1)")
        if self.fsdp and self.dtype == "float16":
            raise ConfigError("--fsdp with --dtype float16 is not supported (no sharded loss scaling here): use "
                              "bfloat16")
        if self.grad_accum % world:
            raise ConfigError(f"--grad-accum {self.grad_accum} must be a multiple of the number of processes "
                              f"({world}): the global batch is batch_size x grad_accum windows, split evenly "
                              "across processes")
        if self.init_from and not self.resume and not os.path.exists(self.init_from):
            raise ConfigError(f"--init-from {self.init_from}: no such file or folder")


# what each flag type accepts, for settings built in Python rather than parsed
RULES = {positive_int: (lambda v: v > 0, "a positive integer"), positive_float: (lambda v: v > 0, "a positive number"),
         nonnegative_int: (lambda v: v >= 0, ">= 0"), nonnegative_float: (lambda v: v >= 0, "a number >= 0")}


def flag(name: str) -> str:
    return name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """One flag per settings field, with the field's default, help and type; booleans are switches
    (`--compile`; `--no-progress` for those on by default)."""
    for f in fields(TrainSettings):
        meta, default = f.metadata, f.default if f.default is not MISSING else f.default_factory()
        text = meta["help"]() if callable(meta["help"]) else meta["help"]
        if isinstance(default, bool):
            name = f"--no-{flag(f.name)}" if default else f"--{flag(f.name)}"
            parser.add_argument(name, dest=f.name, action="store_false" if default else "store_true",
                                help=f"no {text}" if default else text)
            continue
        extra = {key: meta[key] for key in ("type", "choices", "nargs") if meta[key] is not None}
        parser.add_argument(f"--{flag(f.name)}", dest=f.name, default=default, help=text, **extra)
    return parser


def from_flags(args: argparse.Namespace) -> TrainSettings:
    """The settings the parsed flags describe (nothing copied by hand: one field, one flag)."""
    return TrainSettings(**{f.name: getattr(args, f.name) for f in fields(TrainSettings)})
