"""The training loop: forward, loss, backward, AdamW step; periodic evaluation; a sample per epoch."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..generate import generate, text_to_token_ids, token_ids_to_text
from .distributed import SINGLE, DistInfo, maybe_no_sync, mean_over_ranks
from .evaluate import calc_loss_batch, evaluate_model
from .metrics import MetricsLog
from .optim import autocast, grad_scaler, set_lr
from .stop import StopOnSignal, TrainingStopped


@dataclass
class History:
    steps: list = field(default_factory=list)
    tokens_seen: list = field(default_factory=list)
    train_losses: list = field(default_factory=list)
    val_losses: list = field(default_factory=list)
    samples: list = field(default_factory=list)
    batch_losses: list = field(default_factory=list)   # (step, mean micro-batch loss) of every step
    step: int = 0            # optimizer steps taken
    tokens: int = 0          # training tokens consumed


class NonFiniteLoss(RuntimeError):
    """The loss became inf or NaN; the step that produced it was not applied."""


def generate_sample(model, tokenizer, device, start_context: str, max_new_tokens: int = 50) -> str:
    """Greedy continuation of `start_context`, newlines flattened for a one-line log."""
    idx = text_to_token_ids(start_context, tokenizer).to(device)
    out = generate(model, idx, max_new_tokens=max_new_tokens, context_size=model.cfg.context_length)
    return token_ids_to_text(out, tokenizer).replace("\n", " ")


def train_model(model, train_loader, val_loader, optimizer, device, num_epochs: int, eval_freq: int,
                eval_iter: int, start_context: str, tokenizer, log: MetricsLog | None = None,
                progress: bool = True, sample_tokens: int = 50, grad_accum: int = 1, grad_clip: float = 0.0,
                lr_schedule=None, dtype: str = "float32", train_model_fn=None, scaler=None,
                checkpoint_every: int = 0, on_checkpoint=None, max_steps: int | None = None,
                resume: dict | None = None, dist_info: DistInfo = SINGLE, stop: StopOnSignal | None = None) -> History:
    """Train for `num_epochs`; evaluate every `eval_freq` optimizer steps (from step 0) on `eval_iter`
    batches.

    One optimizer step = `grad_accum` micro-batches (gradients summed, each loss divided by
    grad_accum; an epoch's last, shorter group is rescaled to a mean too). `grad_clip` > 0 clips the
    global gradient norm. `lr_schedule(step) -> lr` sets the rate before each step. `dtype`:
    autocast precision of the forward pass. `train_model_fn`: what runs the training forward
    (e.g. a torch.compile'd model); evaluation and samples use `model` itself.

    Fault tolerance: every `checkpoint_every` steps `on_checkpoint(hist, position)` is called with
    everything needed to continue exactly (epoch, micro-batches consumed in it, the train loader's
    generator states); `resume` (such a position plus `hist`) continues a run as if never stopped.
    `max_steps` stops after that many steps in total. A non-finite loss raises NonFiniteLoss before
    the step is applied. `stop` (see stop.py): once it has caught SIGINT/SIGTERM, the loop ends after
    the step in progress, calls `on_checkpoint` (unless this step's periodic one was just written) and
    raises TrainingStopped naming the checkpoint that `on_checkpoint` returned.

    Several processes (`dist_info`, see distributed.py): `train_loader` yields this process's share
    of the batches, `grad_accum` is this process's share of the micro-batches, `train_model_fn` is
    the DDP-wrapped (or FSDP-sharded) model; losses and token counts are global (evaluation splits
    its batches across the processes); only rank 0 prints, logs and samples. `on_checkpoint` is
    called on every process (a sharded model gathers its state collectively) and writes on rank 0.
    Positions count micro-batches of all processes, so a run can resume on another number of
    processes that divides --grad-accum.
    """
    world, main = dist_info.world_size, dist_info.is_main
    say = tqdm.write if main else (lambda *args, **kwargs: None)
    log = (log if main else None) or MetricsLog(None)
    progress = progress and main
    forward = model if train_model_fn is None else train_model_fn
    scaler = scaler or grad_scaler(dtype, device)
    params = [p for p in model.parameters() if p.requires_grad]
    gen = getattr(train_loader, "generator", None)
    if resume is None:
        hist, start_epoch, skip = History(), 1, 0
        # Where we start from: an untrained model predicts close to uniformly, loss ~ ln(vocab_size).
        train_loss, val_loss = evaluate_model(model, train_loader, val_loader, device, eval_iter, dist_info)
        say(f"Before training: Train loss {train_loss:.3f}, Val loss {val_loss:.3f}")
        log.write("initial_eval", step=0, tokens_seen=0, train_loss=train_loss, val_loss=val_loss)
    else:
        hist, start_epoch, skip = resume["hist"], resume["epoch"], resume["micro_in_epoch"] // world
        say(f"Resuming at epoch {start_epoch}, step {hist.step} ({hist.tokens:,} tokens seen)")
    for epoch in range(start_epoch, num_epochs + 1):
        if max_steps is not None and hist.step >= max_steps:
            break
        model.train()
        resumed_epoch = resume is not None and epoch == start_epoch
        if resumed_epoch and gen is not None:
            gen.set_state(resume["epoch_gen_state"])             # replay this epoch's shuffle
        epoch_gen_state = gen.get_state() if gen is not None else None
        n_micro = len(train_loader)
        bar = tqdm(total=-(-n_micro // grad_accum), initial=(skip if resumed_epoch else 0) // grad_accum,
                   desc=f"epoch {epoch}/{num_epochs}", unit="step", disable=not progress, dynamic_ncols=True)
        micro_losses = []
        for i, (inputs, targets) in enumerate(train_loader):
            if resumed_epoch and i < skip:                       # consumed before the stop
                if i + 1 == skip and gen is not None:
                    gen.set_state(resume["gen_state"])
                continue
            last_micro = len(micro_losses) + 1 == grad_accum or i + 1 == n_micro
            with maybe_no_sync(forward, sync=last_micro):    # DDP: all-reduce once per step
                with autocast(dtype, device):
                    loss = calc_loss_batch(inputs, targets, forward, device)
                scaler.scale(loss / grad_accum).backward()
            micro_losses.append(loss.detach())
            hist.tokens += inputs.numel() * world
            if len(micro_losses) < grad_accum and i + 1 < n_micro:
                continue
            loss_value = mean_over_ranks(torch.stack(micro_losses).float().mean(), dist_info).item()
            if not math.isfinite(loss_value):
                raise NonFiniteLoss(f"non-finite loss ({loss_value}) at step {hist.step} (epoch {epoch}); "
                                    "the step was not applied")
            if len(micro_losses) < grad_accum:                   # short last group: make it a mean
                for p in params:
                    if p.grad is not None:
                        p.grad.mul_(grad_accum / len(micro_losses))
            if lr_schedule is not None:
                set_lr(optimizer, lr_schedule(hist.step))
            if grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            micro_losses = []
            hist.batch_losses.append((hist.step, loss_value))
            log.write("step", epoch=epoch, step=hist.step, loss=loss_value, lr=optimizer.param_groups[0]["lr"])
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}")
            if hist.step % eval_freq == 0:
                train_loss, val_loss = evaluate_model(model, train_loader, val_loader, device, eval_iter, dist_info)
                hist.steps.append(hist.step)
                hist.tokens_seen.append(hist.tokens)
                hist.train_losses.append(train_loss)
                hist.val_losses.append(val_loss)
                say(f"Ep {epoch} (Step {hist.step:06d}): "
                           f"Train loss {train_loss:.3f}, Val loss {val_loss:.3f}")
                log.write("eval", epoch=epoch, step=hist.step, tokens_seen=hist.tokens,
                          train_loss=train_loss, val_loss=val_loss, batch_loss=loss_value)
            hist.step += 1
            # where we are: enough to continue exactly (positions count every process's micro-batches)
            position = {"epoch": epoch, "micro_in_epoch": (i + 1) * world, "epoch_gen_state": epoch_gen_state,
                        "gen_state": gen.get_state() if gen is not None else None}
            written = None
            if on_checkpoint is not None and checkpoint_every and hist.step % checkpoint_every == 0:
                written = on_checkpoint(hist, position)
            if stop is not None and (signum := stop.agreed(dist_info)):
                if written is None and on_checkpoint is not None:
                    written = on_checkpoint(hist, position)
                bar.close()
                raise TrainingStopped(signum, hist.step, epoch, written)
            if max_steps is not None and hist.step >= max_steps:
                break
        bar.close()
        if max_steps is not None and hist.step >= max_steps and i + 1 < n_micro:
            break                                                # stopped mid-epoch: no sample
        if main or dist_info.fsdp:          # a sharded model generates on every process together
            sample = generate_sample(model, tokenizer, device, start_context, sample_tokens)
            hist.samples.append(sample)
            say(f"Ep {epoch} sample: {sample}")
            log.write("sample", epoch=epoch, step=hist.step, text=sample)
    return hist
