"""Training metrics: one JSON object per line, and a PNG of the loss curves."""
from __future__ import annotations

import json
import os
import time


class MetricsLog:
    """Append-only JSON-lines file; every record gets the seconds since the log was opened."""

    def __init__(self, path: str | None, append: bool = False):
        self.path = path
        self.start = time.perf_counter()
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            if not append:
                open(path, "w").close()

    def write(self, event: str, **fields) -> dict:
        record = {"event": event, "time_s": round(time.perf_counter() - self.start, 3), **fields}
        if self.path:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        return record


def plot_losses(steps, tokens_seen, train_losses, val_losses, path: str) -> str:
    """Train/val loss against optimizer steps (bottom axis) and tokens seen (top axis)."""
    from matplotlib.figure import Figure  # no pyplot: works headless, no global state

    fig = Figure(figsize=(6, 3.5), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(steps, train_losses, label="train loss")
    ax.plot(steps, val_losses, linestyle="-.", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss")
    ax.legend(loc="upper right")
    ax.grid(alpha=0.3)
    if len(steps) >= 2 and steps[-1] != steps[0]:
        # a secondary x-axis in tokens, linear in steps (constant tokens per step)
        per_step = (tokens_seen[-1] - tokens_seen[0]) / (steps[-1] - steps[0])
        offset = tokens_seen[0] - per_step * steps[0]
        top = ax.secondary_xaxis("top", functions=(lambda s: s * per_step + offset,
                                                   lambda t: (t - offset) / per_step))
        top.set_xlabel("tokens seen")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
