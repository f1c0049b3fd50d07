"""Training: the loop, losses, checkpoints, metrics and plots, and a whole run from settings."""
from .checkpoint import load_checkpoint, resolve_checkpoint_path, save_checkpoint
from .evaluate import calc_loss_batch, calc_loss_loader, evaluate_model
from .loop import History, NonFiniteLoss, generate_sample, train_model
from .metrics import MetricsLog, plot_losses
from .optim import lr_at, make_optimizer
from .run import USER_ERRORS, ConfigError, TrainSettings, run_training
from .stop import StopOnSignal, TrainingStopped

__all__ = ["train_model", "History", "NonFiniteLoss", "generate_sample", "calc_loss_batch", "calc_loss_loader",
           "evaluate_model", "save_checkpoint", "load_checkpoint", "resolve_checkpoint_path",
           "MetricsLog", "plot_losses", "lr_at", "make_optimizer", "TrainSettings", "run_training", "ConfigError", "USER_ERRORS",
           "StopOnSignal", "TrainingStopped"]
