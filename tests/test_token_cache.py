"""Large corpora: tokenized once into a memory-mapped uint16 token file."""
import os

import numpy as np
import pytest
import torch

from gptfast.data import GPTDataset, create_token_dataloaders, load_corpus_tokens
from gptfast.training import TrainSettings, run_training


class CountingTokenizer:
    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def encode(self, text):
        self.calls += 1
        return self.inner.encode(text)


@pytest.fixture
def read_only_folder(tmp_path):
    """A data folder shipped read-only (mode 0555). As root, os.access still says writable: the code
    must look at the mode bits too, and this fixture works for root and normal users alike."""
    folder = tmp_path / "read-only-data"
    folder.mkdir()
    yield folder
    folder.chmod(0o755)                                               # let pytest clean it up


def test_read_only_corpus_is_cached_in_the_cache_folder(tmp_path, monkeypatch, gpt2_tokenizer, large_text,
                                                        read_only_folder):
    monkeypatch.setenv("GPTFAST_CACHE_DIR", str(tmp_path / "cache"))
    source = read_only_folder / "corpus.txt"
    source.write_text(large_text, encoding="utf-8")
    read_only_folder.chmod(0o555)
    tok = CountingTokenizer(gpt2_tokenizer)
    tokens = load_corpus_tokens(str(source), tok, progress=False)
    assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16
    assert tokens.tolist() == gpt2_tokenizer.encode(large_text)
    assert os.listdir(read_only_folder) == ["corpus.txt"]             # nothing written beside the corpus
    assert len(os.listdir(tmp_path / "cache")) == 2                 # token file + its JSON sidecar
    again = load_corpus_tokens(str(source), tok, progress=False)
    assert tok.calls == 1 and np.array_equal(again, tokens)         # tokenized once


def test_folder_of_files_joined_with_endoftext_and_rebuilt_when_changed(tmp_path, gpt2_tokenizer):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("Hello world.")
    (folder / "b.txt").write_text("Second file.")
    (folder / "ignored.md").write_text("not a .txt")
    tok = CountingTokenizer(gpt2_tokenizer)
    tokens = load_corpus_tokens(str(folder), tok, cache_dir=str(tmp_path / "c"), progress=False)
    expected = gpt2_tokenizer.encode("Hello world.") + [50256] + gpt2_tokenizer.encode("Second file.")
    assert tokens.tolist() == expected
    (folder / "b.txt").write_text("Changed now, and longer.")
    changed = load_corpus_tokens(str(folder), tok, cache_dir=str(tmp_path / "c"), progress=False)
    assert changed.tolist()[-3:] == gpt2_tokenizer.encode("Changed now, and longer.")[-3:]
    assert tok.calls == 4
    with pytest.raises(FileNotFoundError, match="not found"):
        load_corpus_tokens(str(tmp_path / "nope"), tok)


def test_memmap_windows_and_loaders(tmp_path, gpt2_tokenizer):
    tokens = np.arange(1000, dtype=np.uint16)
    ds = GPTDataset(tokens, context_length=8, stride=8)
    x, y = ds[3]
    assert x.dtype == torch.long and x.tolist() == list(range(24, 32)) and y.tolist() == list(range(25, 33))
    assert ds.tokens is tokens                                      # no copy of the corpus
    train, val = create_token_dataloaders(tokens, batch_size=4, context_length=8, train_ratio=0.9)
    assert len(train.dataset) == len(range(0, 900 - 8, 8)) and len(val.dataset) == len(range(0, 100 - 8, 8))


def test_training_on_a_folder(tmp_path, monkeypatch, large_text):
    monkeypatch.setenv("GPTFAST_CACHE_DIR", str(tmp_path / "cache"))
    folder = tmp_path / "plays"
    folder.mkdir()
    (folder / "1.txt").write_text(large_text[:200_000], encoding="utf-8")
    (folder / "2.txt").write_text(large_text[200_000:400_000], encoding="utf-8")
    lines = []
    summary = run_training(TrainSettings(data=str(folder), preset="tiny", epochs=1, batch_size=4, context_length=32,
                                         eval_freq=2, eval_iter=1, max_steps=4, out=str(tmp_path / "run"),
                                         progress=False), echo=lines.append)
    assert summary["steps"] == 4
    assert any("2 files" in line and "memory-mapped" in line for line in lines)


def test_a_writable_file_gets_its_token_file_next_to_it(tmp_path, gpt2_tokenizer):
    text = tmp_path / "story.txt"
    text.write_text("Once upon a time.")
    load_corpus_tokens(str(text), gpt2_tokenizer, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["story.txt", "story.txt.gpt2.tokens.u16", "story.txt.gpt2.tokens.u16.json"]
