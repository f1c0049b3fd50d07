"""Train a GPT on a text corpus.

    python scripts/train.py                       # cpu-small on the-verdict (shipped with gptfast)
    python scripts/train.py --preset book-124m --epochs 10 --batch-size 2 --lr 4e-4 \
        --weight-decay 0.1 --eval-freq 5 --eval-iter 5 --seed 123
    torchrun --standalone --nproc_per_node=2 scripts/train.py --grad-accum 2 ...   # data-parallel

Every flag is a field of `gptfast.training.TrainSettings` (its default and help live there); what a
run does, stage by stage, is `gptfast/training/run.py`. Ctrl-C (or SIGTERM, e.g. a cluster's time
limit) stops after the step in progress with a checkpoint; the same command with `--resume auto`
continues the run exactly.
"""
from __future__ import annotations

import os
import shlex
import sys

from gptfast.cli import OneLineParser
from gptfast.training import USER_ERRORS, NonFiniteLoss, TrainingStopped, run_training
from gptfast.training.parallel import launched_world_size, let_the_main_process_speak, main_process_echo
from gptfast.training.settings import add_arguments, from_flags


def resume_command(argv: list[str]) -> str:
    """This run's command line with `--resume auto` in place of any --resume it had."""
    args, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--resume":
            skip = True
        elif not a.startswith("--resume="):
            args.append(a)
    world = launched_world_size()
    program = os.path.basename(sys.argv[0])
    if program.startswith("gptfast-") and world == 1:           # the console script: run as it was
        return shlex.join([program, *args, "--resume", "auto"])
    launcher = ["torchrun", f"--nproc_per_node={world}"] if world > 1 else ["python"]
    return shlex.join(launcher + [os.path.relpath(sys.argv[0]), *args, "--resume", "auto"])


def build_parser() -> OneLineParser:
    return add_arguments(OneLineParser(prog="train.py", description="Train a GPT model on a text corpus."))


def main(argv=None) -> int:
    settings = from_flags(build_parser().parse_args(argv))
    say = main_process_echo(print)                     # under torchrun, rank 0 speaks for all
    try:
        run_training(settings)
    except USER_ERRORS as err:
        say(f"train.py: error: {err}", file=sys.stderr)
        let_the_main_process_speak()
        return 2
    except NonFiniteLoss as err:
        say(f"train.py: stopped: {err}", file=sys.stderr)
        return 1
    except TrainingStopped as err:
        say(f"train.py: {err}", file=sys.stderr)
        say(f"train.py: to continue: {resume_command(sys.argv[1:] if argv is None else argv)}", file=sys.stderr)
        return err.exit_status
    except KeyboardInterrupt:
        say("train.py: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
