"""Stopping a run without losing it: Ctrl-C (SIGINT) and SIGTERM end training at a step boundary.

The first signal only raises a flag. The loop finishes the optimizer step in progress, writes a
resumable checkpoint (the same complete state as `--checkpoint-every`) and raises `TrainingStopped`,
which `scripts/train.py` turns into a message with the command that continues the run and exit
status 128 + signal (130 for SIGINT, 143 for SIGTERM). A second signal stops at once: SIGINT as a
KeyboardInterrupt, SIGTERM with its default action; the last checkpoint stays intact because
checkpoints are written to a temporary file and renamed.

Under torchrun every process gets the signal (torchrun forwards SIGTERM; a terminal's Ctrl-C
reaches the whole process group) but not necessarily between the same two steps, so after each
step the processes agree (`Parallelism.agreed_stop`, an all-reduce of their flags): they stop at the
same step, all take part in gathering a sharded model's state, and rank 0 writes.
"""
from __future__ import annotations

import signal
import sys
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingStopped(Exception):
    """Training stopped on a signal after `step` steps; `checkpoint` continues it (`--resume auto`)."""

    def __init__(self, signum: int, step: int, epoch: int, checkpoint: str | None):
        self.signum, self.step, self.epoch, self.checkpoint = signum, step, epoch, checkpoint
        self.exit_status = 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step} (epoch {epoch}); "
                         f"checkpoint: {checkpoint or 'none written'}")


class StopOnSignal:
    """While active (`with StopOnSignal(): ...`), SIGINT and SIGTERM set `signum` instead of killing
    the process. Installs nothing outside the main thread, where Python cannot take signals."""

    def __init__(self, announce=None):
        self.signum: int | None = None
        self._previous: dict = {}
        self._announce = announce or (lambda text: print(text, file=sys.stderr, flush=True))

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:                  # the second signal: stop now
            self._restore()
            self._announce(f"{name} again: stopping now, without a new checkpoint")
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            signal.raise_signal(signum)              # SIGTERM's default action: terminate
            return
        self.signum = signum
        self._announce(f"{name} received: finishing the step in progress, then writing a checkpoint "
                       f"({'Ctrl-C' if signum == signal.SIGINT else 'SIGTERM'} again stops at once)")
