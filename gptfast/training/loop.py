"""The training loop: micro-batches -> optimizer steps, with evaluations, checkpoints and a sample per epoch.

The baseline it accelerates is simple.py (`train_step`: logits -> cross-entropy -> backward -> step); this
loop computes the same losses and gradients (tests/test_training.py), with the LM head fused with the loss,
accumulation, clipping, a schedule, mixed precision, several processes, checkpoints and stop signals.

    history = train(settings, state, data, parallel, log, stop)

One optimizer step = `grad_accum` micro-batches (gradients summed, each loss divided by the number of
this process's micro-batches per step; an epoch's last, shorter group is rescaled to a mean too), then
`--grad-clip`, the learning-rate schedule and the AdamW step. Every `--eval-freq` steps (from step 0)
the model is evaluated on `--eval-iter` batches of each split; every `--checkpoint-every` steps, and
when a stop signal arrived (stop.py), a checkpoint is written that continues the run exactly. A
non-finite loss raises NonFiniteLoss before its step is applied. Several processes (parallel.py): each
trains on its share of the micro-batches; losses and token counts are global; rank 0 prints and logs.
"""
from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from ..generate import generate, text_to_token_ids, token_ids_to_text
from .checkpoint import periodic_checkpoint_path, prune_checkpoints
from .data import TrainingData
from .evaluate import calc_loss_batch, evaluate_model
from .metrics import MetricsLog
from .optim import autocast, set_lr
from .parallel import SINGLE, Parallelism
from .settings import TrainSettings
from .state import EpochBatches, History, Position, TrainingState
from .stop import StopOnSignal, TrainingStopped


class NonFiniteLoss(RuntimeError):
    """The loss became inf or NaN; the step that produced it was not applied."""


def generate_sample(model, tokenizer, device, start_context: str, max_new_tokens: int = 50) -> str:
    """Greedy continuation of `start_context`, newlines flattened for a one-line log."""
    idx = text_to_token_ids(start_context, tokenizer).to(device)
    out = generate(model, idx, max_new_tokens=max_new_tokens, context_size=model.cfg.context_length)
    return token_ids_to_text(out, tokenizer).replace("\n", " ")


def train(settings: TrainSettings, state: TrainingState, data: TrainingData, parallel: Parallelism = SINGLE,
          log: MetricsLog | None = None, stop: StopOnSignal | None = None) -> History:
    """Train `state` on `data` for `settings.epochs` (or up to `settings.max_steps`); returns its history.
    A fresh state starts with an evaluation; a resumed one continues at its position as if never stopped."""
    return _Loop(settings, state, data, parallel, log or MetricsLog(None), stop).run()


class _Loop:
    def __init__(self, s: TrainSettings, state: TrainingState, data: TrainingData, parallel: Parallelism,
                 log: MetricsLog, stop: StopOnSignal | None):
        self.s, self.state, self.data, self.parallel, self.log, self.stop = s, state, data, parallel, log, stop
        self.hist = state.history
        self.accum = parallel.per_rank_accum(s.grad_accum)       # this process's micro-batches per step
        self.say = parallel.quiet(tqdm.write)
        self.params = [p for p in state.model.parameters() if p.requires_grad]

    def run(self) -> History:
        resume = self.state.position
        if resume is None:
            # where we start from: an untrained model predicts close to uniformly, loss ~ ln(vocab_size)
            self.evaluate(epoch=None)
        else:
            self.say(f"Resuming at epoch {resume.epoch}, step {self.hist.step} ({self.hist.tokens:,} tokens seen)")
        first = resume.epoch if resume is not None else 1
        for epoch in range(first, self.s.epochs + 1):
            if self.reached_max_steps():
                break
            batches = EpochBatches(self.data.train_loader, epoch, self.parallel.world_size,
                                   resume if epoch == first else None)
            if not self.epoch(batches):
                break                                            # stopped mid-epoch at --max-steps: no sample
            if self.parallel.samples_here:     # a sharded model generates on every process together
                self.sample(epoch)
        return self.hist

    def reached_max_steps(self) -> bool:
        return self.s.max_steps is not None and self.hist.step >= self.s.max_steps

    def epoch(self, batches: EpochBatches) -> bool:
        """One epoch's steps; False if --max-steps ended it early."""
        self.state.model.train()
        n_micro = len(batches)
        bar = tqdm(total=-(-n_micro // self.accum), initial=batches.skip // self.accum, unit="step",
                   desc=f"epoch {batches.epoch}/{self.s.epochs}", disable=not self.parallel.progress(self.s.progress),
                   dynamic_ncols=True)
        losses = []                                              # this step's micro-batch losses so far
        with bar:
            for i, inputs, targets in batches:
                last = len(losses) + 1 == self.accum or i + 1 == n_micro
                losses.append(self.micro_step(inputs, targets, sync=last))
                if not last:
                    continue
                loss = self.optimizer_step(losses, batches.epoch)
                losses = []
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}")
                if self.hist.step % self.s.eval_freq == 0:
                    self.evaluate(batches.epoch, loss)
                self.hist.step += 1
                self.checkpoint_or_stop(batches.position(i))
                if self.reached_max_steps():
                    return i + 1 == n_micro
        return True

    def micro_step(self, inputs: torch.Tensor, targets: torch.Tensor, sync: bool) -> torch.Tensor:
        """Forward and backward of one micro-batch; gradients add up until the optimizer step."""
        forward, device = self.state.forward, self.parallel.device
        with self.parallel.sync_gradients(forward, sync):      # all-reduce once per step
            with autocast(self.state.precision, device):
                loss = calc_loss_batch(inputs, targets, forward, device)
            self.state.scaler.scale(loss / self.accum).backward()
        self.hist.tokens += inputs.numel() * self.parallel.world_size
        return loss.detach()

    def optimizer_step(self, losses: list[torch.Tensor], epoch: int) -> float:
        """Apply the accumulated gradients; returns the step's loss (mean over micro-batches and processes)."""
        opt, scaler, hist = self.state.optimizer, self.state.scaler, self.hist
        loss = self.parallel.mean(torch.stack(losses).float().mean()).item()
        if not math.isfinite(loss):
            raise NonFiniteLoss(f"non-finite loss ({loss}) at step {hist.step} (epoch {epoch}); the step was not applied")
        if len(losses) < self.accum:                             # short last group: make it a mean
            for p in self.params:
                if p.grad is not None:
                    p.grad.mul_(self.accum / len(losses))
        if self.state.schedule is not None:
            set_lr(opt, self.state.schedule(hist.step))
        if self.s.grad_clip > 0:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(self.params, self.s.grad_clip)
        scaler.step(opt)
        scaler.update()
        self.state.after_step()                                  # the 16-bit working copies of the weights
        opt.zero_grad(set_to_none=True)
        hist.batch_losses.append((hist.step, loss))
        self.log.write("step", epoch=epoch, step=hist.step, loss=loss, lr=opt.param_groups[0]["lr"])
        return loss

    def evaluate(self, epoch: int | None, batch_loss: float | None = None) -> None:
        """Train and validation loss now; `epoch` None: before training (not part of the history)."""
        train_loss, val_loss = evaluate_model(self.state.model, self.data.train_loader, self.data.val_loader,
                                              self.parallel.device, self.s.eval_iter, self.parallel)
        if epoch is None:
            self.say(f"Before training: Train loss {train_loss:.3f}, Val loss {val_loss:.3f}")
            self.log.write("initial_eval", step=0, tokens_seen=0, train_loss=train_loss, val_loss=val_loss)
            return
        self.hist.record_eval(train_loss, val_loss)
        self.say(f"Ep {epoch} (Step {self.hist.step:06d}): Train loss {train_loss:.3f}, Val loss {val_loss:.3f}")
        self.log.write("eval", epoch=epoch, step=self.hist.step, tokens_seen=self.hist.tokens,
                       train_loss=train_loss, val_loss=val_loss, batch_loss=batch_loss)

    def sample(self, epoch: int) -> None:
        text = generate_sample(self.state.model, self.data.tokenizer, self.parallel.device, self.s.start_context,
                               self.s.sample_tokens)
        self.hist.samples.append(text)
        self.say(f"Ep {epoch} sample: {text}")
        self.log.write("sample", epoch=epoch, step=self.hist.step, text=text)

    def checkpoint(self, position: Position) -> str:
        """A periodic checkpoint (the oldest beyond --keep-checkpoints removed); every process calls it."""
        path = self.state.save(periodic_checkpoint_path(self.s.out, self.hist.step), position, self.parallel,
                               self.data.tokenizer, self.s)
        self.parallel.on_main(prune_checkpoints, self.s.out, self.s.keep_checkpoints)
        return path

    def checkpoint_or_stop(self, position: Position) -> None:
        """After a step: the periodic checkpoint when due; on an agreed stop signal, a checkpoint (unless this
        step's was just written) and TrainingStopped naming it."""
        written = None
        if self.s.checkpoint_every and self.hist.step % self.s.checkpoint_every == 0:
            written = self.checkpoint(position)
        if self.stop is None or not (signum := self.parallel.agreed_stop(self.stop.signum)):
            return
        raise TrainingStopped(signum, self.hist.step, position.epoch, written or self.checkpoint(position))
