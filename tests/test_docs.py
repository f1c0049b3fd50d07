"""The documentation runs: every Python block of docs/*.md and the README, and the README's commands.

docs/*.md: each file's ```python blocks run in order in one namespace (the snippets check themselves against
`reference`). README: its ```python blocks and the commands of its ```bash blocks run in a temporary folder,
in order (later commands read what earlier ones wrote: runs/latest, my-gpt), with flags appended that make
each run take seconds (argparse: the last flag wins); the few that cannot run here are listed with the reason.
"""
import os
import re
import shlex
import subprocess
import sys

import pytest

from conftest import ROOT

DOCS = sorted((ROOT / "docs").glob("*.md"))
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
# Appended to a command so that it runs in seconds: (program, flags).
SMALL = {
    "scripts/train.py": ["--max-steps", "2", "--batch-size", "2", "--eval-iter", "1", "--sample-tokens", "3",
                         "--no-progress"],
    "scripts/generate.py": ["--max-new-tokens", "3"],
    "scripts/export.py": ["--force"],
    "scripts/compare.py": ["--quick", "--backend", "extension"],         # (Triton's CPU interpreter: no bf16)
    "benchmarks/plot.py": [],
}
# A training command's preset, swapped for the small one of its family (none named: the default's, tiny).
SMALL_PRESET = {"book-124m": "tiny", "gpt2-124m": "tiny", "cpu-small": "tiny", "tiny": "tiny", "qwen3-small": "qwen3-tiny",
                "qwen3-tiny": "qwen3-tiny", "qwen3-0.6b": "qwen3-tiny", "llama3.2-1b": "qwen3-tiny"}
# Commands the test does not run, and why.
NOT_HERE = {
    "pip": "the set-up itself: CI's fresh clone runs the README's first lines",
    "pytest": "the test suite itself",
    "torchrun": "several GPUs or machines (tests/test_distributed.py runs DDP and FSDP with 2 CPU processes)",
    "cmake": "the alternative CMake build: .ci/run builds it",
    "bash": "scripts/gpu_check.sh needs a GPU machine",
    "benchmarks/bench_ops.py": "a benchmark: minutes (tests/test_bench_ops.py runs its quick mode)",
    "benchmarks/bench_train.py": "a benchmark: minutes (tests/test_bench_train.py runs it small)",
    "benchmarks/bench_generate.py": "a benchmark: minutes (tests/test_bench_generate.py runs it small)",
    "benchmarks/bench_book.py": "the book experiment: 10 minutes (benchmarks/results/bench_book_cpu.json)",
}


def blocks(path, language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(path.read_text()) if lang == language]


def commands(block: str) -> list[list[str]]:
    """The commands of a bash block: continuation lines joined, comments dropped, `a && b` split."""
    text = block.replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.split(" #")[0].strip()
        if line and not line.startswith("#"):
            out += [shlex.split(part) for part in line.split("&&")]
    return out


def small(argv: list[str]) -> tuple[list[str] | None, str]:
    """(the command to run, with its small-settings flags) or (None, why it is not run here)."""
    if argv[:2] == ["python", "-c"]:
        return [sys.executable, *argv[1:]], ""
    if argv[:2] == ["python", "-m"]:                             # python -m scripts.train: the program's file
        argv = ["python", argv[2].replace(".", "/") + ".py" if argv[2].startswith("scripts.") else argv[2], *argv[3:]]
    program = argv[1] if argv[0] == "python" and len(argv) > 1 else argv[0]
    if program in NOT_HERE or argv[0] in NOT_HERE:
        return None, NOT_HERE.get(program) or NOT_HERE[argv[0]]
    if program not in SMALL:
        raise AssertionError(f"a README command this test does not know how to run small: {shlex.join(argv)}")
    args = list(argv[2:])
    if program == "scripts/train.py":
        if "--preset" in args:
            i = args.index("--preset") + 1
            args[i] = SMALL_PRESET[args[i]]
        else:
            args += ["--preset", "tiny"]
    return [sys.executable, str(ROOT / program), *args, *SMALL[program]], ""


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_python_block_of_the_docs_runs(doc, monkeypatch):
    code = blocks(doc, "python")
    assert code, f"{doc.name} has no Python block"
    namespace = {"__name__": f"docs_{doc.stem}"}
    for i, block in enumerate(code):
        exec(compile(block, f"{doc.name} block {i + 1}", "exec"), namespace)


def test_the_readme_commands_are_known():
    """Every command of the README either runs in test_the_readme_runs or is listed in NOT_HERE with why."""
    for block in blocks(ROOT / "README.md", "bash"):
        for argv in commands(block):
            small(argv)


@pytest.mark.slow
def test_the_readme_runs(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GPTFAST_CACHE_DIR": str(tmp_path / "cache")}
    ran, skipped = 0, {}
    for lang, body in FENCE.findall((ROOT / "README.md").read_text()):
        if lang == "python":
            argvs = [[sys.executable, "-c", body]]
        elif lang == "bash":
            argvs = []
            for argv in commands(body):
                cmd, why = small(argv)
                if cmd is None:
                    skipped[shlex.join(argv)[:60]] = why
                else:
                    argvs.append(cmd)
        else:
            continue
        for cmd in argvs:
            result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
            assert result.returncode == 0, f"{shlex.join(cmd)[:300]}\n{result.stderr[-3000:]}"
            ran += 1
    print(f"\nREADME: {ran} commands and blocks ran; not here: {skipped}")
    assert ran >= 8
