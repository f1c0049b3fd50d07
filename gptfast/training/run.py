"""One training run, in stages - what `python scripts/train.py` does, top to bottom:

    validate the settings (settings.py)          every flag rule, before any slow work
    start parallelism (parallel.py)              one process, or DDP / FSDP under torchrun
    data (data.py)                               corpus -> tokenizer -> train / validation loaders
    model (here: `build_model`)                  fresh, --init-from weights, or a checkpoint to resume
    state (state.py)                             optimizer, scaler, schedule, history, position, RNG
    banner and metrics log                       what runs, and metrics.jsonl
    the loop (loop.py) under the stop handler    steps, evaluations, checkpoints, samples (stop.py)
    finish                                       checkpoint.pt, model.safetensors, loss.png, summary

Problems a user can fix (bad flag values, missing files, offline without a cache) raise `ConfigError` or
one of the errors in `USER_ERRORS`, which the script prints as one line.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict

import torch

from .. import ops
from ..ops import auto as auto_backend
from ..data import DownloadError, describe_source
from ..model import build_model as model_for
from ..model import config_from_dict, config_from_preset
from ..tokenizer import TokenizerUnavailableError
from .checkpoint import (CHECKPOINT_NAME, WEIGHTS_NAME, find_resume_checkpoint, load_checkpoint, periodic_checkpoints,
                         read_checkpoint)
from .data import TrainingData, load_training_data
from .loop import NonFiniteLoss, train
from .metrics import MetricsLog, plot_losses
from .optim import precision_note, resolve_precision
from .parallel import Parallelism
from .settings import ConfigError, TrainSettings
from .state import Position, TrainingState
from .stop import StopOnSignal, TrainingStopped

USER_ERRORS = (ConfigError, FileNotFoundError, DownloadError, TokenizerUnavailableError, ops.BackendError)


def run_training(s: TrainSettings, echo=print) -> dict:
    """Train as `s` says; writes checkpoint, weights, metrics and plot into `s.out`; returns a summary.

    Launched by torchrun with several processes, each runs this same function as one rank of a
    data-parallel run (parallel.py); rank 0 alone prints and writes files."""
    s.validate()
    parallel = Parallelism.start(s.device, s.fsdp)
    try:
        return _run(s, parallel, parallel.quiet(echo))
    finally:
        parallel.shutdown()


def _run(s: TrainSettings, parallel: Parallelism, echo) -> dict:
    torch.manual_seed(s.seed)
    data = load_training_data(s, parallel, echo)
    model, checkpoint = build_model(s, data, parallel, echo)
    total_steps = s.epochs * -(-len(data.train_loader) // parallel.per_rank_accum(s.grad_accum))
    choices = backend_choices(model.cfg.backend, parallel.device, resolve_precision(s.dtype, parallel.device)[0])
    header = banner(s, model, data, parallel, choices, total_steps)    # before FSDP shards the model
    parameters = model.num_parameters()
    try:
        state = TrainingState.start(s, model, parallel, checkpoint, total_steps)
    except ValueError as err:
        raise ConfigError(f"--resume: {err}") from None
    for line in header:
        echo(line)
    log = parallel.on_main(MetricsLog, os.path.join(s.out, "metrics.jsonl"), append=checkpoint is not None)
    log = log or MetricsLog(None)
    log.write("config", settings=asdict(s), precision=state.precision, model=model.cfg.to_dict(), parameters=parameters,
              device=str(parallel.device), torch=torch.__version__, world_size=parallel.world_size,
              backends={op: name for op, (name, _) in choices.items()})
    try:
        with StopOnSignal(echo) as stop:     # Ctrl-C / SIGTERM: stop at a step boundary, checkpointed
            train(s, state, data, parallel, log, stop)
    except NonFiniteLoss as err:
        kept = periodic_checkpoints(s.out)
        raise NonFiniteLoss(f"{err}; last good checkpoint: {kept[-1] if kept else 'none (use --checkpoint-every)'}") \
            from None
    except TrainingStopped as err:
        log.write("stopped", step=err.step, epoch=err.epoch, signal=err.signum, checkpoint=err.checkpoint)
        raise
    if stop.signum is not None:                  # the signal came after the last step: nothing left to stop
        echo("the stop request came after the last step: the run finished")
    return finish(s, state, data, parallel, log, echo) | {"parameters": parameters}


def build_model(s: TrainSettings, data: TrainingData, parallel: Parallelism, echo) -> tuple[object, dict | None]:
    """The one switch, as nanoGPT's init_from: continue a checkpoint (--resume), start from trained weights
    (--init-from), or a fresh model of the preset. Returns (model on its device, the checkpoint resumed)."""
    backend = ops.resolve_backend_name(s.backend)
    torch.manual_seed(s.seed)  # the same initial weights whatever the tokenizer did before
    checkpoint = None
    if s.resume:
        try:
            checkpoint = read_checkpoint(find_resume_checkpoint(s.resume, s.out), parallel.device)
        except (ValueError, FileNotFoundError) as err:
            raise ConfigError(f"--resume: {err}") from None
        cfg = config_from_dict(checkpoint["config"])
        cfg.backend = backend
        model = model_for(cfg)
        model.load_state_dict(checkpoint["model"])
    elif s.init_from:
        model = pretrained_model(s, backend, data.tokenizer, echo)
    else:
        model = model_for(fresh_config(s, parallel.device, data.tokenizer.n_vocab, backend))
    model.to(parallel.device)
    if data.context_length > model.cfg.context_length:
        raise ConfigError(f"--context-length {data.context_length} exceeds the initial model's context length "
                          f"{model.cfg.context_length}")
    return model, checkpoint


def fresh_config(s: TrainSettings, device: torch.device, vocab_size: int, backend: str):
    """The preset's config (GPT-2 or Llama/Qwen3 family), shaped by the settings: vocabulary (e.g. our own
    BPE's), dropout, tying (--tie-embeddings, or the preset's own: the Qwen3 presets tie), padding."""
    cfg = config_from_preset(s.model_preset(device))
    cfg.vocab_size = vocab_size
    cfg.backend = backend
    if s.drop_rate is not None:
        cfg.drop_rate = s.drop_rate
    cfg.tie_embeddings = s.tie_embeddings or cfg.tie_embeddings
    cfg.vocab_multiple = 64 if s.pad_vocab else 1
    return cfg


def pretrained_model(s: TrainSettings, backend: str, tokenizer, echo):
    """The weights named by --init-from (to fine-tune): a GPT-2, Llama or Qwen3 folder in Hugging Face format, or
    a gptfast checkpoint or weights file."""
    for flag, on in (("--tie-embeddings", s.tie_embeddings), ("--pad-vocab", s.pad_vocab)):
        if on:
            echo(f"note: {flag} shapes fresh models only; the --init-from weights keep their own layout")
    if os.path.isfile(os.path.join(s.init_from, "config.json")):
        from ..model import is_llama_folder, load_gpt2, load_llama

        llama = is_llama_folder(s.init_from)
        model = (load_llama if llama else load_gpt2)(s.init_from, backend=backend)
        echo(f"initialized from {'Llama/Qwen3' if llama else 'GPT-2'} weights in {s.init_from}")
    else:
        model, state = load_checkpoint(s.init_from, backend=backend)
        if state.get("quantization"):
            raise ConfigError(f"--init-from {s.init_from}: its weights are quantized ({state['quantization']}), "
                              "for inference only; train from the float32 weights")
        echo(f"initialized from gptfast checkpoint {s.init_from}")
    if model.cfg.vocab_size < tokenizer.n_vocab:
        raise ConfigError(f"--init-from model has {model.cfg.vocab_size} tokens but the tokenizer has "
                          f"{tokenizer.n_vocab}")
    return model


def backend_choices(backend: str, device: torch.device, dtype: str) -> dict[str, tuple[str, str]]:
    """{op: (backend, why)} for what this run computes each op with. `auto` decides per op from its
    measured table, at float32 and, under autocast, at the autocast dtype (matmul outputs - attention,
    GELU, logits - arrive in it; the residual stream that LayerNorm reads stays float32)."""
    if backend != "auto":
        return {op: (backend, "--backend") for op in auto_backend.TABLE_OPS}
    out = {}
    for op in auto_backend.TABLE_OPS:
        at = "float32" if op == "layer_norm" or dtype == "float32" else dtype
        c = auto_backend.choose(op, device.type, at)
        out[f"{op} ({at})" if at != "float32" else op] = (c.backend, c.reason)
    return out


def banner(s: TrainSettings, model, data: TrainingData, parallel: Parallelism, choices: dict,
           total_steps: int) -> list[str]:
    """What this run is about to do, in a few lines."""
    cfg, tok, backend = model.cfg, data.tokenizer, model.cfg.backend
    padded = f", padded to {cfg.padded_vocab_size}" if cfg.vocab_multiple > 1 else ""
    accum = f" x {s.grad_accum} accumulated" if s.grad_accum > 1 else ""
    lines = [f"config: {json.dumps(cfg.to_dict())}",
             f"parameters: {model.num_parameters():,} | device: {parallel.device} | backend: {backend} | "
             f"tokenizer: {s.tokenizer} ({tok.n_vocab} tokens{padded})"]
    lines += [f"  auto: {op} -> {name}: {why}" for op, (name, why) in choices.items() if backend == "auto"]
    lines += [line for line in [parallel.describe(parallel.per_rank_accum(s.grad_accum), s.batch_size,
                                                  len(data.train_loader))] if line]
    lines.append(f"data: {describe_source(s.data)} | {data.size} | train batches/epoch: "
                 f"{len(data.train_loader) * parallel.world_size} | val batches: {len(data.val_loader)} | tokens/step: "
                 f"{s.batch_size * data.context_length * s.grad_accum:,} ({s.batch_size} x {data.context_length}{accum})")
    precision, why = resolve_precision(s.dtype, parallel.device)
    lines.append(f"precision: {precision} ({why}) | compile: {s.compile} | steps: {total_steps} | lr {s.lr:g}"
                 f"{f' warm-up {s.warmup_steps}' if s.warmup_steps else ''}"
                 f"{f' cosine to {s.min_lr:g}' if s.min_lr is not None else ''}"
                 f"{f' | grad clip {s.grad_clip:g}' if s.grad_clip else ''}")
    return lines + [note for note in [precision_note(precision, parallel.device)] if note]


def finish(s: TrainSettings, state: TrainingState, data: TrainingData, parallel: Parallelism, log: MetricsLog,
           echo) -> dict:
    """The final checkpoint, the weights alone, the loss plot; a summary once every process is done."""
    hist = state.history
    ckpt = state.save(os.path.join(s.out, CHECKPOINT_NAME), Position.end(s.epochs), parallel, data.tokenizer, s,
                      weights=os.path.join(s.out, WEIGHTS_NAME))
    plot = parallel.on_main(plot_losses, hist.eval_steps, hist.eval_tokens, hist.train_losses, hist.val_losses,
                            os.path.join(s.out, "loss.png"))
    parallel.barrier()                                # every process returns once the files exist
    summary = {"steps": hist.step, "tokens_seen": hist.tokens,
               "final_train_loss": hist.train_losses[-1] if hist.train_losses else None,
               "final_val_loss": hist.val_losses[-1] if hist.val_losses else None,
               "checkpoint": ckpt, "weights": os.path.join(s.out, WEIGHTS_NAME), "plot": plot, "metrics": log.path,
               "seconds": round(log.write("done").get("time_s"), 1)}
    echo(f"done in {summary['seconds']} s: {hist.step} steps, {hist.tokens:,} tokens | "
         f"checkpoint {ckpt} | plot {plot} | metrics {log.path}")
    return summary
