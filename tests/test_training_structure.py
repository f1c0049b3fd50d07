"""The training package's shape, as issue 24 set it: stages a reader follows once, settings declared once."""
import argparse
import ast
import inspect
import pathlib
import re
from dataclasses import fields

import pytest

from conftest import ROOT
from gptfast.training import ConfigError, TrainSettings, train
from gptfast.training.settings import add_arguments, from_flags

TRAINING = sorted((ROOT / "gptfast" / "training").glob("*.py")) + [ROOT / "scripts" / "train.py"]


def functions(path: pathlib.Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.end_lineno - node.lineno + 1


def test_no_function_longer_than_a_screen():
    long = [f"{p.name}:{name} ({n} lines)" for p in TRAINING for name, n in functions(p) if n > 60]
    assert not long, long
    assert sum(1 for p in TRAINING for _ in functions(p)) > 40          # it did look at the functions


def test_the_loop_takes_a_handful_of_arguments():
    assert list(inspect.signature(train).parameters) == ["settings", "state", "data", "parallel", "log", "stop"]


def test_distributed_concerns_live_in_the_parallelism_module_only():
    """Only the settings' own --fsdp flag may be read elsewhere (to start the parallelism, and validated)."""
    asks = re.compile(r"\b(?!s\.|self\.)\w+\.(fsdp|is_main|rank|local_rank)\b|torch\.distributed|\bdist\.|WORLD_SIZE|RANK")
    for path in TRAINING:
        if path.name != "parallel.py":
            assert not asks.search(path.read_text()), (path.name, asks.search(path.read_text()))


def test_every_setting_is_a_flag_with_help_and_the_same_default():
    parser = add_arguments(argparse.ArgumentParser())
    by_dest = {a.dest: a for a in parser._actions}
    for f in fields(TrainSettings):
        assert f.name in by_dest and by_dest[f.name].help, f.name
    assert from_flags(parser.parse_args([])) == TrainSettings()
    s = from_flags(parser.parse_args(["--epochs", "3", "--no-progress", "--compile", "--data", "a.txt", "b.txt",
                                      "--min-lr", "1e-5"]))
    assert (s.epochs, s.progress, s.compile, s.data, s.min_lr) == (3, False, True, ["a.txt", "b.txt"], 1e-5)
    assert from_flags(parser.parse_args(["--data", "a.txt"])).data == "a.txt"       # one file: a path, not a list


@pytest.mark.parametrize("changes,message", [
    ({"epochs": 0}, "--epochs must be a positive integer, got 0"),
    ({"checkpoint_every": -1}, "--checkpoint-every must be >= 0, got -1"),
    ({"lr": -1.0}, "--lr must be a positive number"),
    ({"train_ratio": 1.0}, "--train-ratio must be between 0 and 1"),
    ({"drop_rate": 1.0}, "--drop-rate must be < 1"),
    ({"tokenizer": "chars"}, "unknown tokenizer 'chars'"),
    ({"preset": "tiny", "context_length": 65}, "exceeds the tiny model's context length 64"),
    ({"fsdp": True}, "--fsdp shards the model across processes"),
    ({"dtype": "float16", "device": "cpu"}, "float16 needs a CUDA device"),
    ({"device": "tpu"}, "unknown device 'tpu'"),
    ({"init_from": "no/such/folder"}, "--init-from no/such/folder: no such file or folder"),
])
def test_validate_names_the_flag_for_settings_made_in_python(changes, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        TrainSettings(**changes).validate()
    TrainSettings().validate()                                           # the defaults are valid
