"""Continue a prompt with a trained checkpoint or OpenAI's GPT-2 weights, printing as it goes (`gptfast-generate`
from any folder; the program is gptfast/commands/generate.py)."""
import sys

from gptfast.commands.generate import main

if __name__ == "__main__":
    sys.exit(main())
