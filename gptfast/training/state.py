"""Training state: what a run carries from step to step, and what a checkpoint must hold to continue it.

`TrainingState` = model (and what runs its training forward) + optimizer + loss scaler + learning-rate
schedule + `History` + where a resumed run continues (`Position`). Under bfloat16/float16 autocast the
model keeps 16-bit working copies of its linear weights, refreshed after each optimizer step
(`after_step`), so no forward casts the float32 master weights again. `TrainingState.start` makes it
fresh or from a checkpoint, in one place and in the order bitwise resume depends on; `save` writes it.
`EpochBatches` is one epoch's micro-batches; on the epoch a run was stopped in, it replays the shuffle and
skips what was already consumed.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from .checkpoint import rng_states, save_checkpoint, save_weights, set_rng_states
from .optim import grad_scaler, lr_at, make_optimizer, resolve_precision
from .parallel import Parallelism
from .precision import keep_working_copies, refresh_working_copies


@dataclass
class History:
    eval_steps: list = field(default_factory=list)     # steps at which the model was evaluated
    eval_tokens: list = field(default_factory=list)    # training tokens seen at those steps
    train_losses: list = field(default_factory=list)   # the evaluations' train and validation losses
    val_losses: list = field(default_factory=list)
    samples: list = field(default_factory=list)        # one generated sample per epoch
    batch_losses: list = field(default_factory=list)   # (step, mean micro-batch loss) of every step
    step: int = 0            # optimizer steps taken
    tokens: int = 0          # training tokens consumed

    OLD_NAMES = {"steps": "eval_steps", "tokens_seen": "eval_tokens"}    # checkpoints written before 2026-12

    @classmethod
    def from_dict(cls, saved: dict) -> "History":
        return cls(**{cls.OLD_NAMES.get(k, k): v for k, v in saved.items()})

    def record_eval(self, train_loss: float, val_loss: float) -> None:
        self.eval_steps.append(self.step)
        self.eval_tokens.append(self.tokens)
        self.train_losses.append(train_loss)
        self.val_losses.append(val_loss)


@dataclass
class Position:
    """Where a run stands in its data: enough to continue exactly."""
    epoch: int = 1
    micro_in_epoch: int = 0                        # micro-batches of all processes consumed in this epoch
    epoch_gen_state: torch.Tensor | None = None    # the train loader's generator when the epoch began
    gen_state: torch.Tensor | None = None          # ... and now (evaluation draws from it too)

    def to_dict(self) -> dict:
        return dict(vars(self))

    @classmethod
    def end(cls, epochs: int) -> "Position":
        """A finished run's position: past its last epoch."""
        return cls(epoch=epochs + 1)


class EpochBatches:
    """One epoch of this process's micro-batches: iterating yields (i, inputs, targets), i counting this
    process's micro-batches from the epoch's start. `resume`: the position of a run stopped in this epoch -
    the shuffle is replayed and the micro-batches consumed before the stop are skipped."""

    def __init__(self, loader, epoch: int, world_size: int, resume: Position | None = None):
        self.loader, self.epoch, self.world_size = loader, epoch, world_size
        self.gen = getattr(loader, "generator", None)          # the loader's shuffle generator
        self.resume = resume
        if resume is not None and self.gen is not None:
            self.gen.set_state(resume.epoch_gen_state)
        self.start_state = self.gen.get_state() if self.gen is not None else None
        self.skip = resume.micro_in_epoch // world_size if resume is not None else 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for i, (inputs, targets) in enumerate(self.loader):
            if i < self.skip:                                   # consumed before the stop
                if i + 1 == self.skip and self.gen is not None:
                    self.gen.set_state(self.resume.gen_state)
                continue
            yield i, inputs, targets

    def position(self, i: int) -> Position:
        """Where the run stands once micro-batch `i` (and everything it led to) is done."""
        return Position(self.epoch, (i + 1) * self.world_size, self.start_state,
                        self.gen.get_state() if self.gen is not None else None)


@dataclass
class TrainingState:
    model: torch.nn.Module
    forward: torch.nn.Module            # what runs the training forward: the model, wrapped or compiled
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    schedule: object                    # step -> learning rate, or None (constant)
    history: History
    position: Position | None           # where a resumed run continues; None: a fresh run
    precision: str = "float32"          # the forward's autocast dtype (--dtype, `auto` resolved for the device)

    @classmethod
    def start(cls, s, model, parallel: Parallelism, checkpoint: dict | None, total_steps: int) -> "TrainingState":
        """Optimizer, scaler and schedule for `model` (already on its device), fresh or restored from
        `checkpoint`; then the random streams, restored exactly and reseeded per process."""
        forward = parallel.wrap(model)
        optimizer = make_optimizer(model, s.lr, s.weight_decay, parallel.device)
        schedule = None
        if s.warmup_steps or s.min_lr is not None:
            schedule = lambda step: lr_at(step, total_steps, s.lr, s.warmup_steps, s.min_lr)  # noqa: E731
        if s.compile:
            forward = torch.compile(forward)
        precision, _ = resolve_precision(s.dtype, parallel.device)
        state = cls(model, forward, optimizer, grad_scaler(precision, parallel.device), schedule, History(), None,
                    precision)
        if precision != "float32" and parallel.keeps_weight_copies:
            keep_working_copies(model, getattr(torch, precision))   # instead of autocast casting every forward
        if checkpoint is not None:
            state.restore(checkpoint, parallel)
            set_rng_states(checkpoint["rng"])              # exactly where the stopped run was
        parallel.seed_dropout(s.seed, state.history.step)
        return state

    def after_step(self) -> None:
        """What follows each optimizer step: the 16-bit working copies of the weights catch up (one pass)."""
        refresh_working_copies(self.model)

    def restore(self, checkpoint: dict, parallel: Parallelism) -> None:
        """Optimizer, scaler, history and position from a training checkpoint (ValueError if it has none)."""
        if "position" not in checkpoint:
            raise ValueError("that checkpoint holds no training position (not written by a training run)")
        parallel.load_optimizer_state(self.model, self.optimizer, checkpoint["optimizer"],
                                      checkpoint.get("optimizer_format", "index"))
        self.scaler.load_state_dict(checkpoint["scaler"])
        self.history = History.from_dict(checkpoint["history"])
        self.position = Position(**checkpoint["position"])
        parallel.check_resume_position(self.position.micro_in_epoch)

    def save(self, path: str, position: Position, parallel: Parallelism, tokenizer, settings,
             weights: str | None = None) -> str:
        """A checkpoint at `path` that continues the run from `position` (and, with `weights`, the weights
        alone as safetensors). Every process calls it (a sharded model gathers collectively); rank 0 writes."""
        model_state, optimizer_state, optimizer_format = parallel.full_state(self.model, self.optimizer)
        parallel.on_main(save_checkpoint, path, self.model, tokenizer=tokenizer, model_state=model_state,
                         optimizer_state=optimizer_state, optimizer_format=optimizer_format,
                         step=self.history.step, tokens_seen=self.history.tokens, scaler=self.scaler.state_dict(),
                         rng=rng_states(), position=position.to_dict(), history=asdict(self.history),
                         settings=asdict(settings))
        if weights:
            parallel.on_main(save_weights, weights, self.model, tokenizer, model_state)
        return path
