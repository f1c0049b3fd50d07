"""Flag types and the one-line-error argument parser that the scripts share."""
from __future__ import annotations

import argparse


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr and exit status 2 (no usage dump)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def positive_int(text: str) -> int:
    value = int(text) if text.lstrip("-").isdigit() else None
    if value is None or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def nonnegative_int(text: str) -> int:
    if not text.lstrip("-").isdigit():
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    if int(text) < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return int(text)


def _float_flag(text: str, requirement: str, ok) -> float:
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not ok(value):
        raise argparse.ArgumentTypeError(f"must be {requirement}, got {text!r}")
    return value


def positive_float(text: str) -> float:
    return _float_flag(text, "a positive number", lambda v: v > 0)


def nonnegative_float(text: str) -> float:
    return _float_flag(text, "a number >= 0", lambda v: v >= 0)
