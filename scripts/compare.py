"""Compare every backend's kernels, and the whole model, with the float64 textbook math (`gptfast-compare` from
any folder; the program is gptfast/commands/compare.py)."""
import sys

from gptfast.commands.compare import main

if __name__ == "__main__":
    sys.exit(main())
