"""The command-line programs, installed as console scripts that work from any folder:

    gptfast-train      train.py      train a GPT on a text corpus (the main job)
    gptfast-generate   generate.py   continue a prompt with a trained model
    gptfast-compare    compare.py    every backend's kernels against the float64 textbook ops
    gptfast-export     export.py     a checkpoint as a Hugging Face GPT-2 folder

`python scripts/<name>.py` in a clone runs the same `main`.
"""
