"""Command-line entry points (`python scripts/train.py` or `python -m scripts.train`)."""
