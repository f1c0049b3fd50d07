"""What `compare` prints and saves: a table to read at a glance, the loss curves side by side, JSON."""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import subprocess
import sys
from itertools import groupby

import torch

from .op_check import Row

COLOURS = {"PASS": "32", "FAIL": "31;1", "SKIP": "33"}


def use_colour(stream=sys.stdout) -> bool:
    return hasattr(stream, "isatty") and stream.isatty() and not os.environ.get("NO_COLOR") \
        and os.environ.get("TERM") != "dumb"


def _ratio(row: Row) -> float:
    """How close a row is to failing (error / tolerance); failures and errors first."""
    if row.status == "FAIL":
        return math.inf if row.rel is None or not math.isfinite(row.rel) else 1e6 + row.rel / row.tol
    if row.rel is None or not row.tol:
        return -1.0
    return row.rel / row.tol


def summarize(rows: list[Row]) -> list[dict]:
    """One line per (part, op, case, backend): its worst quantity (by error / tolerance), how many
    quantities were checked, and the status (FAIL if any quantity fails)."""
    key = lambda r: (r.part, r.name, r.case, r.backend)  # noqa: E731
    lines = []
    for (part, name, case, backend), group in groupby(rows, key=key):
        group = list(group)
        worst = max(group, key=_ratio)
        status = "FAIL" if any(r.status == "FAIL" for r in group) else worst.status
        lines.append(dict(part=part, name=name, case=case, backend=backend, dtype=worst.dtype,
                          worst=worst.quantity, n=len(group), max_abs=worst.max_abs, rel=worst.rel, tol=worst.tol,
                          status=status, note=worst.note, ratio=_ratio(worst)))
    return lines


def _num(v) -> str:
    if v is None:
        return "-"
    if not math.isfinite(v):
        return "NaN/inf"
    return f"{v:.1e}"


def table(rows: list[Row], colour: bool = False, verbose: bool = False) -> str:
    """The table: one line per op case and backend (every quantity with `verbose`); on failure the
    worst lines first."""
    lines = [dict(part=r.part, name=r.name, case=r.case, backend=r.backend, dtype=r.dtype, worst=r.quantity, n=1,
                  max_abs=r.max_abs, rel=r.rel, tol=r.tol, status=r.status, note=r.note, ratio=_ratio(r))
             for r in rows] if verbose else summarize(rows)
    if any(line["status"] == "FAIL" for line in lines):
        lines.sort(key=lambda line: -line["ratio"])
    head = ["part", "op", "case", "backend", "dtype", "worst of", "max abs", "rel err", "tol", "status", "note"]
    body = [[line["part"], line["name"], line["case"], line["backend"], line["dtype"],
             line["worst"] + (f" ({line['n']})" if line["n"] > 1 else ""), _num(line["max_abs"]), _num(line["rel"]),
             _num(line["tol"]), line["status"], line["note"]] for line in lines]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    widths[-1] = 0                                              # the note runs to the end of the line

    def fmt(cells, status=None):
        text = "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
        if colour and status:
            text = text.replace(f" {status} ", f" \033[{COLOURS[status]}m{status}\033[0m ", 1)
        return text
    out = [fmt(head), fmt(["-" * w for w in widths[:-1]] + ["----"])]
    out += [fmt(cells, cells[9]) for cells in body]
    return "\n".join(out)


def curves_table(curves: dict) -> str:
    """Per-step losses of every backend side by side."""
    names = list(curves)
    steps = max(len(v) for v in curves.values())
    widths = [max(len(n), 8) for n in names]
    out = ["step  " + "  ".join(n.rjust(w) for n, w in zip(names, widths))]
    for i in range(steps):
        out.append(f"{i:>4}  " + "  ".join((f"{curves[n][i]:.6f}" if i < len(curves[n]) else "-").rjust(w)
                                          for n, w in zip(names, widths)))
    return "\n".join(out)


def git_commit() -> str | None:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        out = subprocess.run(["git", "-C", root, "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} logical cores)"
    except OSError:
        pass
    return platform.processor() or "CPU"


def environment(device: torch.device, settings: dict) -> dict:
    from .. import ops

    env = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "device": device_name(device),
           "device_type": device.type, "python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "git_commit": git_commit(), "settings": settings,
           "backends": ops.available_backends()}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def to_json(env: dict, rows: list[Row], curves: dict) -> str:
    counts = {s: sum(r.status == s for r in rows) for s in ("PASS", "FAIL", "SKIP")}
    return json.dumps({**env, "summary": counts, "rows": [r.to_dict() for r in rows], "loss_curves": curves},
                      indent=1)
