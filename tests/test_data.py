import http.server
import os
import threading

import pytest
import torch

from gptfast.data import (DownloadError, GPTDataset, cache_path_for, create_dataloaders, download,
                          load_text)


# ----------------------------------------------------------------------------- GPTDataset
def test_windows_and_shift():
    ids = list(range(100, 120))                      # 20 tokens
    ds = GPTDataset(ids, context_length=4, stride=3)
    assert len(ds) == len(range(0, 20 - 4, 3)) == 6
    for i in range(len(ds)):
        x, y = ds[i]
        start = 3 * i
        assert x.tolist() == ids[start:start + 4]
        assert y.tolist() == ids[start + 1:start + 5]  # targets = inputs shifted by one
        assert x.dtype == torch.long


def test_last_window_uses_last_target_token():
    ds = GPTDataset(list(range(9)), context_length=4, stride=4)   # starts 0, 4
    assert len(ds) == 2
    assert ds[1][1].tolist() == [5, 6, 7, 8]


def test_too_short_text_names_both_lengths():
    with pytest.raises(ValueError, match=r"5 tokens.*context_length 8.*at least 9"):
        GPTDataset([1, 2, 3, 4, 5], context_length=8, stride=1)


def test_bad_dataset_arguments():
    with pytest.raises(ValueError, match="stride"):
        GPTDataset(list(range(10)), 4, 0)
    with pytest.raises(ValueError, match="1-D"):
        GPTDataset([[1, 2], [3, 4]], 1, 1)


# ----------------------------------------------------------------------------- dataloaders
def test_dataloader_split_sizes(verdict_text, gpt2_tokenizer):
    train, val = create_dataloaders(verdict_text, gpt2_tokenizer, batch_size=2, context_length=256,
                                    stride=256, train_ratio=0.9)
    split = int(0.9 * len(verdict_text))
    n_train = len(gpt2_tokenizer.encode(verdict_text[:split]))
    n_val = len(gpt2_tokenizer.encode(verdict_text[split:]))
    assert len(train.dataset) == len(range(0, n_train - 256, 256))
    assert len(val.dataset) == len(range(0, n_val - 256, 256))
    assert len(train) == len(train.dataset) // 2          # drop_last
    assert len(val) == -(-len(val.dataset) // 2)           # keeps the last partial batch
    x, y = next(iter(train))
    assert x.shape == y.shape == (2, 256)


def test_train_shuffle_is_seeded_and_val_is_ordered(verdict_text, gpt2_tokenizer):
    def first_batches(seed):
        train, val = create_dataloaders(verdict_text, gpt2_tokenizer, batch_size=2,
                                        context_length=32, seed=seed)
        return next(iter(train))[0], next(iter(val))[0]

    a_train, a_val = first_batches(1)
    b_train, b_val = first_batches(1)
    c_train, _ = first_batches(2)
    assert torch.equal(a_train, b_train) and not torch.equal(a_train, c_train)
    assert torch.equal(a_val, b_val)


def test_short_text_error_from_dataloaders(gpt2_tokenizer):
    with pytest.raises(ValueError, match="val split"):
        create_dataloaders("word " * 300, gpt2_tokenizer, batch_size=1, context_length=64)
    with pytest.raises(ValueError, match="fewer than batch_size"):
        create_dataloaders("word " * 3000, gpt2_tokenizer, batch_size=64, context_length=64)


# ----------------------------------------------------------------------------- load_text
def test_load_text_from_path(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("héllo", encoding="utf-8")
    assert load_text(str(p)) == "héllo"
    with pytest.raises(FileNotFoundError, match="data file not found"):
        load_text(str(tmp_path / "missing.txt"))


class _Handler(http.server.BaseHTTPRequestHandler):
    body = b"some corpus text\n" * 100
    truncate = False
    hits = 0

    def do_GET(self):
        type(self).hits += 1
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body[: len(self.body) // 2] if self.truncate else self.body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    _Handler.truncate, _Handler.hits = False, 0
    httpd = http.server.HTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}/corpus.txt"
    httpd.shutdown()
    httpd.server_close()


def test_url_downloaded_once_then_cached(server, tmp_path):
    import hashlib

    sha = hashlib.sha256(_Handler.body).hexdigest()
    text = load_text(server, cache_dir=str(tmp_path), sha256=sha)
    assert text == _Handler.body.decode()
    assert _Handler.hits == 1
    assert os.path.isfile(cache_path_for(server, str(tmp_path)))
    assert load_text(server, cache_dir=str(tmp_path)) == text
    assert _Handler.hits == 1                                  # served from the cache
    assert [f for f in os.listdir(tmp_path) if f.startswith(".part")] == []


def test_sha_mismatch_leaves_no_cache_file(server, tmp_path):
    with pytest.raises(DownloadError, match="sha256 mismatch"):
        load_text(server, cache_dir=str(tmp_path), sha256="0" * 64)
    assert os.listdir(tmp_path) == []


def test_interrupted_download_leaves_no_cache_file(server, tmp_path):
    _Handler.truncate = True
    with pytest.raises(DownloadError):
        load_text(server, cache_dir=str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_offline_without_cache_names_url_and_data_flag(tmp_path):
    url = "http://127.0.0.1:9/unreachable.txt"                 # discard port: nothing listens
    with pytest.raises(DownloadError) as info:
        load_text(url, cache_dir=str(tmp_path), timeout=2)
    assert url in str(info.value) and "--data PATH" in str(info.value)


def test_download_helper_writes_dest(server, tmp_path):
    dest = tmp_path / "sub" / "c.txt"
    assert download(server, str(dest), progress=False) == str(dest)
    assert dest.read_bytes() == _Handler.body
