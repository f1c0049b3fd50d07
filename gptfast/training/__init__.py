"""Training: a whole run from settings, in stages (run.py), each in the module that owns its concept.

    settings.py   TrainSettings: every flag's default, help and rules (`validate`)
    parallel.py   Parallelism: one process, DDP or FSDP - every distributed decision
    data.py       corpus -> tokenizer -> loaders
    state.py      TrainingState (model, optimizer, scaler, history, data position), fresh or resumed
    loop.py       train(): steps, evaluations, checkpoints, samples
    evaluate.py   losses of a batch and of a loader     optim.py    AdamW, schedule, precision
    checkpoint.py checkpoint and weights files            stop.py     Ctrl-C / SIGTERM at a step boundary
    metrics.py    metrics.jsonl and the loss plot         run.py      the stages in order: run_training()
    precision.py  bf16 working copies of the weights      simple.py   the textbook loop: train_step, train_simple
"""
from .checkpoint import load_checkpoint, resolve_checkpoint_path, save_checkpoint
from .evaluate import calc_loss_batch, calc_loss_loader, evaluate_model
from .loop import NonFiniteLoss, generate_sample, train
from .metrics import MetricsLog, plot_losses
from .optim import lr_at, make_optimizer
from .parallel import Parallelism
from .run import USER_ERRORS, run_training
from .settings import ConfigError, TrainSettings
from .simple import train_simple, train_step
from .state import History, Position, TrainingState
from .stop import StopOnSignal, TrainingStopped

__all__ = ["run_training", "TrainSettings", "ConfigError", "USER_ERRORS", "Parallelism", "TrainingState", "History",
           "Position", "train", "NonFiniteLoss", "generate_sample", "calc_loss_batch", "calc_loss_loader",
           "evaluate_model", "save_checkpoint", "load_checkpoint", "resolve_checkpoint_path", "MetricsLog",
           "plot_losses", "lr_at", "make_optimizer", "StopOnSignal", "TrainingStopped", "train_step", "train_simple"]
