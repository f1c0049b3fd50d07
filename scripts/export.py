"""Export a gptfast checkpoint as a Hugging Face GPT-2 folder, loadable with no gptfast code (`gptfast-export`
from any folder; the program is gptfast/commands/export.py)."""
import sys

from gptfast.commands.export import main

if __name__ == "__main__":
    sys.exit(main())
