"""Train a GPT on a text corpus (`gptfast-train` from any folder; the program is gptfast/commands/train.py)."""
import sys

from gptfast.commands.train import main

if __name__ == "__main__":
    sys.exit(main())
