"""The scripts as a user runs them: subprocesses, exit codes, what they print."""
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, verdict_path


def run(*args, cwd=ROOT, **env_changes):
    env = {**os.environ, "PYTHONPATH": str(ROOT), **env_changes}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def verdict():
    return str(verdict_path())


@pytest.mark.parametrize("flags,message", [
    (["--data", "no/such/file.txt"], "data file not found: no/such/file.txt"),
    (["--preset", "giant"], "unknown preset 'giant'"),
    (["--preset", "tiny", "--context-length", "65"], "exceeds the tiny model's context length 64"),
    (["--epochs", "-1"], "argument --epochs: must be a positive integer, got '-1'"),
    (["--batch-size", "0"], "argument --batch-size: must be a positive integer, got '0'"),
    (["--lr", "0"], "argument --lr: must be a positive number, got '0'"),
    (["--weight-decay", "-0.1"], "argument --weight-decay: must be a number >= 0"),
    (["--eval-freq", "abc"], "argument --eval-freq: must be a positive integer"),
    (["--backend", "warp-drive"], "unknown op backend 'warp-drive'"),
    (["--grad-accum", "0"], "argument --grad-accum: must be a positive integer"),
    (["--dtype", "float16", "--device", "cpu", "--preset", "tiny"], "float16 needs a CUDA device"),
    (["--warmup-steps", "-3"], "argument --warmup-steps: must be >= 0"),
])
def test_bad_input_is_one_line_and_exit_2(flags, message, verdict, capsys):
    """In-process (main(argv)), so the dozen cases cost no interpreter start-ups; the subprocess test
    below checks the same path end to end."""
    from gptfast.commands.train import main

    args = ["--data", verdict, *flags] if "--data" not in flags else flags
    try:
        code = main(args)
    except SystemExit as exit_:                       # argparse's errors
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err


@pytest.mark.parametrize("flags,message", [(["--epochs", "-1"], "argument --epochs: must be a positive integer"),
                                           (["--preset", "giant"], "unknown preset 'giant'")])
def test_bad_input_from_a_shell(flags, message):
    result = run("scripts/train.py", *flags)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_train_then_generate(tmp_path):
    """The main job's path: no --data (the shipped corpus), an empty home, no tokenizer cache."""
    out, home = tmp_path / "run", tmp_path / "home"
    home.mkdir()
    result = run("scripts/train.py", "--preset", "tiny", "--epochs", "1",
                 "--batch-size", "8", "--context-length", "64", "--eval-freq", "10", "--eval-iter", "1",
                 "--out", str(out), "--no-progress", HOME=str(home), TIKTOKEN_CACHE_DIR="", GPTFAST_CACHE_DIR="")
    assert result.returncode == 0, result.stderr
    stdout = result.stdout
    assert stdout.splitlines()[0].startswith("corpus: The Verdict (Edith Wharton, 1908; public domain), shipped")
    assert "data: The Verdict" in stdout and "20,479 characters" in stdout
    assert not (home / ".cache" / "gptfast").exists()                # nothing downloaded
    assert "parameters: 6,536,704 | device: cpu | backend: auto" in stdout
    # what auto picked, and why (at the run's precision: "(bfloat16)" follows the op on a bf16-capable CPU)
    assert re.search(r"^  auto: attention_dropout( \(bfloat16\))? -> ", stdout, re.M), stdout
    assert "Ep 1 (Step 000000): Train loss" in stdout and "Ep 1 sample: Every effort moves you" in stdout
    assert (out / "checkpoint.pt").is_file() and (out / "loss.png").is_file()

    gen = run("-m", "scripts.generate", "--checkpoint", str(out), "--prompt", "I had always",
              "--max-new-tokens", "8", "--temperature", "0.8", "--top-k", "20", "--seed", "3")
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.startswith("I had always") and len(gen.stdout) > len("I had always")
    assert re.search(r"\(8 tokens: the first after \d+\.\d\d s, then \d+\.\d tokens/s\)", gen.stderr), gen.stderr
    again = run("scripts/generate.py", "--checkpoint", str(out / "model.safetensors"), "--prompt",
                "I had always", "--max-new-tokens", "8", "--temperature", "0.8", "--top-k", "20",
                "--seed", "3")
    assert again.returncode == 0, again.stderr
    assert again.stdout == gen.stdout        # the weights-only file is the same model; seeded sampling repeats


def test_generate_bad_input(tmp_path):
    result = run("scripts/generate.py", "--checkpoint", str(tmp_path / "none.pt"))
    assert result.returncode == 2 and "checkpoint not found" in result.stderr
    assert "Traceback" not in result.stderr
    result = run("scripts/generate.py", "--checkpoint", "x", "--temperature", "-1")
    assert result.returncode == 2 and "must be a number >= 0" in result.stderr


def test_module_invocation_and_help():
    result = run("-m", "scripts.train", "--help")
    assert result.returncode == 0 and "--backend" in result.stdout and "reference" in result.stdout


@pytest.mark.parametrize("script", ["scripts/train.py", "scripts/compare.py"])
def test_help_loads_no_compiled_code(script):
    """Printing help must not load (or compile) our C++ extension nor import Triton."""
    code = (f"import runpy, sys; sys.argv = [{script!r}, '--help']\n"
            f"try:\n    runpy.run_path({script!r}, run_name='__main__')\nexcept SystemExit as e:\n    assert e.code == 0\n"
            "loaded = [m for m in sys.modules if m.startswith(('gptfast._C', 'triton'))]\n"
            "assert not loaded, loaded\nprint('no compiled code')")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "no compiled code" in result.stdout, result.stderr
    assert "usage:" in result.stdout


def console_script(name: str) -> str:
    path = os.path.join(os.path.dirname(sys.executable), name)
    assert os.path.exists(path), f"{name} is not installed beside {sys.executable}: pip install -e . installs it"
    return path


def test_console_scripts_work_from_any_folder(tmp_path):
    """gptfast-train, -generate, -export and -compare run from a folder outside the repository, with no
    PYTHONPATH: the programs live in the package, not in the clone's scripts/."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["GPTFAST_CACHE_DIR"] = str(tmp_path / "cache")

    def go(name, *args):
        result = subprocess.run([console_script(name), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stderr
        return result

    go("gptfast-train", "--preset", "tiny", "--max-steps", "2", "--batch-size", "2", "--eval-iter", "1",
       "--sample-tokens", "3", "--out", "run", "--backend", "reference")
    assert (tmp_path / "run" / "model.safetensors").exists()
    gen = go("gptfast-generate", "--checkpoint", "run", "--prompt", "Every effort", "--max-new-tokens", "4")
    assert gen.stdout.startswith("Every effort")
    go("gptfast-export", "--checkpoint", "run", "--out", "hf")
    assert (tmp_path / "hf" / "config.json").exists()
    assert "--backend" in go("gptfast-compare", "--help").stdout


def test_the_textbook_mode_never_loads_compiled_code(tmp_path):
    """`--backend reference` trains and generates with the plain PyTorch math of gptfast/ops/<op>.py alone: our
    C++ extension is never loaded (nor compiled), our Triton kernels never imported, torch.compile never run."""
    out = str(tmp_path / "run")
    code = ("import runpy, sys\n"
            "def main(argv):\n"
            "    sys.argv = argv\n"
            "    try:\n        runpy.run_path(argv[0], run_name='__main__')\n"
            "    except SystemExit as e:\n        assert not e.code, e.code\n"
            f"main(['scripts/train.py', '--backend', 'reference', '--preset', 'tiny', '--max-steps', '2', "
            f"'--eval-iter', '1', '--sample-tokens', '3', '--no-progress', '--out', {out!r}])\n"
            f"main(['scripts/generate.py', '--checkpoint', {out!r}, '--backend', 'reference', '--prompt', 'Every', "
            "'--max-new-tokens', '3'])\n"
            "loaded = [m for m in sys.modules if m.startswith(('gptfast._C', 'gptfast.ops.triton'))]\n"
            "assert not loaded, loaded\n"
            "from torch._dynamo.utils import counters\n"          # (torch's AdamW imports dynamo; nothing compiles)
            "assert not counters['stats'].get('unique_graphs'), dict(counters['stats'])\nprint('textbook only')")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0 and "textbook only" in result.stdout, result.stderr[-3000:]
