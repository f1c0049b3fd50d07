"""One training run end to end: corpus -> tokenizer -> loaders -> model -> loop -> plot, checkpoint.

`scripts/train.py` only parses flags into `TrainSettings` and calls `run_training`. Problems a user
can fix (bad flag values, missing files, offline without a cache) raise `ConfigError` or one of
the errors listed in `USER_ERRORS`, which the script prints as one line.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace

import torch

from .. import ops
from ..data import (DEFAULT_CORPUS, DownloadError, corpus_files, create_dataloaders, create_token_dataloaders,
                    describe_source, load_corpus_tokens, load_text)
from ..model import PRESETS, GPTConfig, GPTModel
from ..tokenizer import TOKENIZERS, TokenizerUnavailableError, get_tokenizer
from .distributed import (DistInfo, barrier, init_distributed, load_optimizer_state, main_first, per_rank_accum,
                          shard_fsdp, shutdown_distributed, training_state, wrap_ddp)
from .checkpoint import (CHECKPOINT_NAME, WEIGHTS_NAME, load_checkpoint, read_checkpoint, rng_states,
                         save_checkpoint, save_weights, set_rng_states)
from .loop import History, NonFiniteLoss, train_model
from .metrics import MetricsLog, plot_losses
from .optim import check_precision, grad_scaler, lr_at, make_optimizer, precision_note
from .stop import StopOnSignal, TrainingStopped


class ConfigError(ValueError):
    """A training setting that cannot work, with a message saying which and why."""


USER_ERRORS = (ConfigError, FileNotFoundError, DownloadError, TokenizerUnavailableError,
               ops.BackendError)


@dataclass
class TrainSettings:
    data: str | list = DEFAULT_CORPUS    # the shipped Verdict, a text file or a URL (downloaded once, cached); a folder or
                                         # several files: tokenized once into a memory-mapped token file
    preset: str | None = None            # None -> "cpu-small" on CPU, "book-124m" on CUDA
    backend: str | None = None           # None -> $GPTFAST_BACKEND -> "auto"
    device: str = "auto"                 # auto / cpu / cuda
    epochs: int = 10
    batch_size: int = 2
    context_length: int | None = None    # None -> the preset's
    stride: int | None = None            # None -> context_length (no overlap)
    lr: float = 4e-4
    weight_decay: float = 0.1
    eval_freq: int = 5
    eval_iter: int = 5
    seed: int = 123
    out: str = os.path.join("runs", "latest")
    tokenizer: str = "gpt2"
    bpe_vocab_size: int = 1024           # with tokenizer="bpe": trained on the training split
    start_context: str = "Every effort moves you"
    num_workers: int = 0
    train_ratio: float = 0.9
    progress: bool = True
    init_from: str | None = None         # a GPT-2 folder (Hugging Face format) or a gptfast checkpoint
    dtype: str = "float32"               # autocast precision: float32, bfloat16, float16 (CUDA)
    compile: bool = False                # torch.compile the training forward
    grad_accum: int = 1                  # micro-batches per optimizer step
    grad_clip: float = 0.0               # max global gradient norm; 0 = no clipping
    warmup_steps: int = 0                # linear learning-rate warm-up
    min_lr: float | None = None          # cosine decay to this rate at the last step; None = constant lr
    tie_embeddings: bool = False         # LM head shares the token embedding (fresh models only)
    pad_vocab: bool = False              # embedding / LM-head rows padded to a multiple of 64 (fresh models only)
    checkpoint_every: int = 0            # also checkpoint every N steps (0: only at the end)
    keep_checkpoints: int = 3            # how many of those periodic checkpoints to keep
    resume: str | None = None            # a checkpoint to continue from, or "auto": the latest in `out`
    max_steps: int | None = None         # stop after this many optimizer steps in total
    drop_rate: float | None = None       # override the preset's dropout
    fsdp: bool = False                   # under torchrun: shard the model with FSDP instead of replicating it (DDP)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was requested but no CUDA GPU is available (use --device cpu)")
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"unknown device {name!r}; choose auto, cpu or cuda")
    return torch.device(name)


def build_config(s: TrainSettings, device: torch.device, vocab_size: int) -> GPTConfig:
    preset = s.preset or ("book-124m" if device.type == "cuda" else "cpu-small")
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    cfg = GPTConfig.from_preset(preset)
    if vocab_size != cfg.vocab_size:
        cfg.vocab_size = vocab_size          # e.g. our own BPE with a small vocabulary
    if s.context_length is not None and s.context_length > cfg.context_length:
        raise ConfigError(f"--context-length {s.context_length} exceeds the {preset} model's context "
                          f"length {cfg.context_length}")
    return cfg


def corpus_mode(data) -> bool:
    """Several files, or a folder: tokenize once into a memory-mapped token file."""
    return not isinstance(data, str) and len(data) > 1 or (isinstance(data, str) and os.path.isdir(data))


def periodic_checkpoints(out: str) -> list[str]:
    """The run folder's ckpt-step*.pt files, oldest first."""
    if not os.path.isdir(out):
        return []
    return sorted(os.path.join(out, f) for f in os.listdir(out) if f.startswith("ckpt-step") and f.endswith(".pt"))


def find_resume_checkpoint(resume: str, out: str) -> str:
    if resume != "auto":
        return resume
    found = periodic_checkpoints(out)
    if not found:
        raise ConfigError(f"--resume auto: no ckpt-step*.pt in {out}")
    return found[-1]


def initial_model(s: TrainSettings, cfg: GPTConfig, backend: str, tokenizer, echo) -> GPTModel:
    """A fresh model for `cfg`, or the weights named by --init-from (to fine-tune)."""
    if not s.init_from:
        return GPTModel(cfg)
    if not os.path.exists(s.init_from):
        raise ConfigError(f"--init-from {s.init_from}: no such file or folder")
    for flag, on in (("--tie-embeddings", s.tie_embeddings), ("--pad-vocab", s.pad_vocab)):
        if on:
            echo(f"note: {flag} shapes fresh models only; the --init-from weights keep their own layout")
    if os.path.isfile(os.path.join(s.init_from, "config.json")):
        from ..model import load_gpt2

        model = load_gpt2(s.init_from, backend=backend)
        echo(f"initialized from GPT-2 weights in {s.init_from}")
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
        return {op: (backend, "--backend") for op in ops.auto.OPS}
    out = {}
    for op in ops.auto.OPS:
        at = "float32" if op == "layer_norm" or dtype == "float32" else dtype
        c = ops.auto.choose(op, device.type, at)
        out[f"{op} ({at})" if at != "float32" else op] = (c.backend, c.reason)
    return out


def run_training(s: TrainSettings, echo=print) -> dict:
    """Train as `s` says; writes checkpoint, metrics and plot into `s.out`; returns a summary.

    Launched by torchrun with several processes, each runs this same function as one rank of a
    data-parallel run (see distributed.py); rank 0 alone prints and writes files."""
    device = resolve_device(s.device)
    info = init_distributed(device.type)
    if s.fsdp:
        info = replace(info, fsdp=True)
    try:
        return _run_training(s, echo if info.is_main else (lambda *args, **kwargs: None), device, info)
    finally:
        shutdown_distributed(info)


def _run_training(s: TrainSettings, echo, device: torch.device, info: DistInfo) -> dict:
    if s.tokenizer not in TOKENIZERS:
        raise ConfigError(f"unknown tokenizer {s.tokenizer!r}; choose one of: {', '.join(TOKENIZERS)}")
    if s.preset is not None and s.preset not in PRESETS:  # before any slow work
        raise ConfigError(f"unknown preset {s.preset!r}; choose one of: {', '.join(PRESETS)}")
    if info.enabled and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    backend = ops.resolve_backend_name(s.backend)
    try:
        check_precision(s.dtype, device)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if s.grad_accum < 1:
        raise ConfigError(f"grad_accum must be >= 1, got {s.grad_accum}")
    if s.fsdp and not info.enabled:
        raise ConfigError("--fsdp shards the model across processes: launch with torchrun --nproc_per_node=N (N > 1)")
    if s.fsdp and s.dtype == "float16":
        raise ConfigError("--fsdp with --dtype float16 is not supported (no sharded loss scaling here): use bfloat16")
    try:
        grad_accum = per_rank_accum(s.grad_accum, info)       # this process's micro-batches per step
    except ValueError as err:
        raise ConfigError(str(err)) from None
    torch.manual_seed(s.seed)

    if isinstance(s.data, (list, tuple)) and len(s.data) == 1:
        s = replace(s, data=s.data[0])
    corpus = corpus_mode(s.data)                 # a folder or several files: token-file memmap path
    if corpus:
        files = corpus_files(s.data)
        with open(files[0], encoding="utf-8") as f:
            text = f.read(1 << 20)                   # what a BPE trains on: the first MiB
        split = len(text)
    else:
        with main_first(info):                       # rank 0 downloads; the others read its cache
            text = load_text(s.data)
        if s.data == DEFAULT_CORPUS:
            echo(f"corpus: {describe_source(s.data)} ({len(text):,} characters; --data PATH|URL for your own)")
        split = int(s.train_ratio * len(text))
    if s.tokenizer == "bpe":
        echo(f"training a byte-level BPE tokenizer ({s.bpe_vocab_size} tokens) on the training split")
        tokenizer = get_tokenizer("bpe", text=text[:split], vocab_size=s.bpe_vocab_size)
    else:
        tokenizer = get_tokenizer(s.tokenizer)

    cfg = build_config(s, device, tokenizer.n_vocab)
    cfg.backend = backend
    if s.drop_rate is not None:
        cfg.drop_rate = s.drop_rate
    cfg.tie_embeddings = s.tie_embeddings
    cfg.vocab_multiple = 64 if s.pad_vocab else 1
    context_length = s.context_length or cfg.context_length
    shard = (info.rank, info.world_size)
    try:
        if corpus:
            with main_first(info):                   # rank 0 writes the token file; the others map it
                tokens = load_corpus_tokens(s.data, tokenizer, progress=s.progress and info.is_main)
            size = f"{len(files)} files, {len(tokens):,} tokens (memory-mapped)"
            train_loader, val_loader = create_token_dataloaders(
                tokens, batch_size=s.batch_size, context_length=context_length, stride=s.stride or context_length,
                train_ratio=s.train_ratio, num_workers=s.num_workers, seed=s.seed, shard=shard)
        else:
            size = f"{len(text):,} characters"
            train_loader, val_loader = create_dataloaders(
                text, tokenizer, batch_size=s.batch_size, context_length=context_length,
                stride=s.stride or context_length, train_ratio=s.train_ratio,
                num_workers=s.num_workers, seed=s.seed, shard=shard)
    except ValueError as err:
        raise ConfigError(str(err)) from None

    torch.manual_seed(s.seed)  # the same initial weights whatever the tokenizer did before
    try:
        resume_state = read_checkpoint(find_resume_checkpoint(s.resume, s.out), device) if s.resume else None
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(f"--resume: {err}") from None
    if resume_state is not None:
        cfg = GPTConfig.from_dict(resume_state["config"])
        cfg.backend = backend
        model = GPTModel(cfg)
        model.load_state_dict(resume_state["model"])
        model.to(device)
    else:
        model = initial_model(s, cfg, backend, tokenizer, echo).to(device)
    cfg = model.cfg
    if context_length > cfg.context_length:
        raise ConfigError(f"--context-length {context_length} exceeds the initial model's context length "
                          f"{cfg.context_length}")
    n_params = model.num_parameters()
    if info.fsdp:
        train_forward = shard_fsdp(model)                     # in place: the optimizer must see the shards
    else:
        train_forward = wrap_ddp(model, info, device)         # DDP: averages gradients across processes
    optimizer = make_optimizer(model, s.lr, s.weight_decay, device)
    total_steps = s.epochs * -(-len(train_loader) // grad_accum)
    schedule = None
    if s.warmup_steps or s.min_lr is not None:
        schedule = lambda step: lr_at(step, total_steps, s.lr, s.warmup_steps, s.min_lr)  # noqa: E731
    if s.compile:
        train_forward = torch.compile(train_forward)
    scaler = grad_scaler(s.dtype, device)
    resume = None
    if resume_state is not None:
        if "position" not in resume_state:
            raise ConfigError("--resume: that checkpoint holds no training position (not written by a training run)")
        load_optimizer_state(model, optimizer, resume_state["optimizer"], resume_state.get("optimizer_format", "index"),
                             info)
        scaler.load_state_dict(resume_state["scaler"])
        resume = {"hist": History(**resume_state["history"]), **resume_state["position"]}
        if resume["micro_in_epoch"] % info.world_size:
            raise ConfigError(f"--resume: the checkpoint stopped after {resume['micro_in_epoch']} micro-batches of "
                              f"its epoch, which {info.world_size} processes cannot split evenly")

    echo(f"config: {json.dumps(cfg.to_dict())}")
    echo(f"parameters: {n_params:,} | device: {device} | backend: {backend} | tokenizer: "
         f"{s.tokenizer} ({tokenizer.n_vocab} tokens{f', padded to {cfg.padded_vocab_size}' if cfg.vocab_multiple > 1 else ''})")
    choices = backend_choices(backend, device, s.dtype)
    for op, (name, why) in choices.items() if backend == "auto" else ():
        echo(f"  auto: {op} -> {name}: {why}")
    if info.enabled:
        echo(f"distributed: {info.world_size} processes ({'NCCL' if device.type == 'cuda' else 'Gloo'}, "
             f"{'FSDP: model sharded' if info.fsdp else 'DDP: model replicated'}), "
             f"{grad_accum} micro-batch(es) of {s.batch_size} each per step, {len(train_loader)} per epoch each")
    echo(f"data: {describe_source(s.data)} | {size} | train batches/epoch: {len(train_loader) * info.world_size} | "
         f"val batches: {len(val_loader)} | tokens/step: {s.batch_size * context_length * s.grad_accum:,} "
         f"({s.batch_size} x {context_length}{f' x {s.grad_accum} accumulated' if s.grad_accum > 1 else ''})")
    echo(f"precision: {s.dtype} | compile: {s.compile} | steps: {total_steps} | lr {s.lr:g}"
         f"{f' warm-up {s.warmup_steps}' if s.warmup_steps else ''}"
         f"{f' cosine to {s.min_lr:g}' if s.min_lr is not None else ''}"
         f"{f' | grad clip {s.grad_clip:g}' if s.grad_clip else ''}")
    if (note := precision_note(s.dtype, device)) is not None:
        echo(note)

    if info.is_main:
        os.makedirs(s.out, exist_ok=True)
    log = MetricsLog(os.path.join(s.out, "metrics.jsonl") if info.is_main else None, append=resume is not None)
    log.write("config", settings=asdict(s), model=cfg.to_dict(), parameters=n_params,
              device=str(device), torch=torch.__version__, world_size=info.world_size,
              backends={op: name for op, (name, _) in choices.items()})
    def checkpoint(path, hist, position, weights=None):   # called on every process; rank 0 writes
        model_state, optimizer_state, optimizer_format = training_state(model, optimizer, info)
        if info.is_main:
            save_checkpoint(path, model, tokenizer=tokenizer, model_state=model_state, optimizer_state=optimizer_state,
                            optimizer_format=optimizer_format, step=hist.step, tokens_seen=hist.tokens,
                            scaler=scaler.state_dict(), rng=rng_states(), position=position, history=asdict(hist),
                            settings=asdict(s))
            if weights:
                save_weights(weights, model, tokenizer, model_state)
        return path

    def periodic_checkpoint(hist, position):   # also what a stop on SIGINT/SIGTERM writes
        path = checkpoint(os.path.join(s.out, f"ckpt-step{hist.step:07d}.pt"), hist, position)
        if info.is_main:
            for old in periodic_checkpoints(s.out)[:-max(1, s.keep_checkpoints)]:
                os.remove(old)
        return path

    if resume_state is not None:
        set_rng_states(resume_state["rng"])                     # exactly where the stopped run was
    if info.enabled:   # different dropout masks per process (same data order: the loader has its own generator)
        torch.manual_seed(s.seed + 1_000_003 * info.rank + (resume["hist"].step if resume else 0))
    try:
        with StopOnSignal(echo) as stop:     # Ctrl-C / SIGTERM: stop at a step boundary, checkpointed
            hist: History = train_model(model, train_loader, val_loader, optimizer, device, s.epochs,
                                        s.eval_freq, s.eval_iter, s.start_context, tokenizer, log=log,
                                        progress=s.progress, grad_accum=grad_accum, grad_clip=s.grad_clip,
                                        lr_schedule=schedule, dtype=s.dtype, train_model_fn=train_forward,
                                        scaler=scaler, checkpoint_every=s.checkpoint_every,
                                        on_checkpoint=periodic_checkpoint, max_steps=s.max_steps, resume=resume,
                                        dist_info=info, stop=stop)
    except NonFiniteLoss as err:
        kept = periodic_checkpoints(s.out)
        raise NonFiniteLoss(f"{err}; last good checkpoint: {kept[-1] if kept else 'none (use --checkpoint-every)'}") \
            from None
    except TrainingStopped as err:
        log.write("stopped", step=err.step, epoch=err.epoch, signal=err.signum, checkpoint=err.checkpoint)
        raise
    if stop.signum is not None:                  # the signal came after the last step: nothing left to stop
        echo("the stop request came after the last step: the run finished")

    end = {"epoch": s.epochs + 1, "micro_in_epoch": 0, "epoch_gen_state": None, "gen_state": None}
    ckpt = checkpoint(os.path.join(s.out, CHECKPOINT_NAME), hist, end, weights=os.path.join(s.out, WEIGHTS_NAME))
    plot = None
    if info.is_main:
        plot = plot_losses(hist.steps, hist.tokens_seen, hist.train_losses, hist.val_losses,
                           os.path.join(s.out, "loss.png"))
    barrier(info)                                # every process returns once the files exist
    summary = {"steps": hist.step, "tokens_seen": hist.tokens, "parameters": n_params,
               "final_train_loss": hist.train_losses[-1] if hist.train_losses else None,
               "final_val_loss": hist.val_losses[-1] if hist.val_losses else None,
               "checkpoint": ckpt, "weights": os.path.join(s.out, WEIGHTS_NAME), "plot": plot, "metrics": log.path,
               "seconds": round(log.write("done").get("time_s"), 1)}
    echo(f"done in {summary['seconds']} s: {hist.step} steps, {hist.tokens:,} tokens | "
         f"checkpoint {ckpt} | plot {plot} | metrics {log.path}")
    return summary
