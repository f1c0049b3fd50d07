import hashlib
import json
import os
import pathlib
import subprocess
import sys
from collections import Counter

import pytest
import tiktoken
from hypothesis import given, settings
from hypothesis import strategies as st

from gptfast.tokenizer import (GPT2_FILES_DIR, ByteLevelBPE, TokenizerUnavailableError, get_tokenizer,
                               gpt2_bytes_to_unicode, learn_merges, tokenizer_from_spec)
from gptfast.tokenizer import tiktoken_gpt2 as shipped
from gptfast.tokenizer.bpe import _merge_word

# tiktoken's own download URLs for GPT-2's files: its cache names each file by the URL's sha1.
TIKTOKEN_URLS = {"vocab.bpe": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
                 "encoder.json": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json"}
EDGE_CASES = ["", " ", "  \n\n\t ", "Hello, world", "hello   world  ", "trailing spaces   ", "\n\n\nnew lines\r\n",
              "I'm you're we'll they've he'd she's it'll I'M YOU'RE", "don't  'quote' '' \"double\"",
              "naïve café Zürich façade", "東京タワー 北京", "Москва ёж", "emoji 😀👍🏽 and 🇫🇷 flags", "a\u200bb\u00a0c",
              "12345 3.14159 1,000,000 0x1F", "tabs\tand\u3000ideographic space", "<|endoftext|>",
              "before<|endoftext|>after", "Every effort moves you<|endoftext|> In the sunlit terraces",
              "<|endoftext|><|endoftext|>", " <|endoftext|> ", "<|endoftext", "endoftext|>", "\x00\x01\x7f",
              " " * 300 + "x", "a" + "\n" * 200]


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="module")
def gpt2_bpe():
    return ByteLevelBPE.from_gpt2_files()


@pytest.fixture(scope="module")
def tiktoken_gpt2(tmp_path_factory, monkeypatch_module):
    """tiktoken's own `get_encoding("gpt2")` -- its download path, hash checks and parser -- served from a
    cache folder this test fills with the shipped files instead of the network."""
    cache = tmp_path_factory.mktemp("tiktoken-cache")
    for name, url in TIKTOKEN_URLS.items():
        (cache / hashlib.sha1(url.encode()).hexdigest()).write_bytes((pathlib.Path(GPT2_FILES_DIR) / name).read_bytes())
    monkeypatch_module.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    monkeypatch_module.setattr(tiktoken.registry, "ENCODINGS", {})     # not one built earlier in this process
    enc = tiktoken.get_encoding("gpt2")
    assert enc is not shipped.gpt2_encoding()
    return enc


def test_shipped_gpt2_encoding_equals_tiktokens_own(gpt2_tokenizer, tiktoken_gpt2, verdict_text, large_text):
    """get_tokenizer("gpt2") builds tiktoken's encoding from the shipped files: the same ids as the
    encoding tiktoken downloads, on the verdict, a megabyte of generated text and the edge cases."""
    assert gpt2_tokenizer.n_vocab == tiktoken_gpt2.n_vocab == 50257
    assert gpt2_tokenizer.eot_id == tiktoken_gpt2.eot_token == 50256
    for text in [verdict_text, large_text, *EDGE_CASES]:
        ids = gpt2_tokenizer.encode(text)
        assert ids == tiktoken_gpt2.encode(text, allowed_special={"<|endoftext|>"}), text[:80]
        assert gpt2_tokenizer.decode(ids) == text
    assert len(gpt2_tokenizer.encode(verdict_text)) == 5145             # the book's count


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=0, max_size=80))
def test_shipped_gpt2_encoding_matches_tiktoken_on_arbitrary_unicode(gpt2_tokenizer, tiktoken_gpt2, text):
    assert gpt2_tokenizer.encode(text) == tiktoken_gpt2.encode(text, allowed_special={"<|endoftext|>"})


def test_gpt2_needs_no_network_or_cache(tmp_path):
    """A fresh process, with tiktoken's file reading made impossible and an empty home, still tokenizes
    and writes nothing anywhere."""
    code = ("import tiktoken.load as l\n"
            "def no_files(*a, **k): raise AssertionError('tiktoken tried to fetch a file')\n"
            "l.read_file = l.read_file_cached = no_files\n"
            "from gptfast.tokenizer import get_tokenizer\n"
            "print(get_tokenizer('gpt2').encode('Hello, do you like tea? <|endoftext|>'))")
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR")}
    env.update(HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[15496, 11, 466, 345, 588, 8887, 30, 220, 50256]"
    assert list(home.iterdir()) == []                                  # nothing cached


def test_damaged_or_missing_gpt2_files_are_named(tmp_path, monkeypatch):
    monkeypatch.setattr(shipped, "GPT2_FILES_DIR", str(tmp_path))
    with pytest.raises(TokenizerUnavailableError, match="encoder.json is missing.*--tokenizer bpe"):
        shipped.gpt2_mergeable_ranks()
    (tmp_path / "encoder.json").write_text("{}")
    with pytest.raises(TokenizerUnavailableError, match="encoder.json in the gptfast package is damaged"):
        shipped.gpt2_mergeable_ranks()


def test_gpt2_wrapper_matches_documented_ids(gpt2_tokenizer):
    text = "Hello, do you like tea? <|endoftext|> In the sunlit terraces of someunknownPlace."
    ids = gpt2_tokenizer.encode(text)
    assert ids[:7] == [15496, 11, 466, 345, 588, 8887, 30]
    assert ids[8] == gpt2_tokenizer.eot_id == 50256
    assert gpt2_tokenizer.n_vocab == 50257
    assert gpt2_tokenizer.decode(ids) == text


@pytest.mark.parametrize("corpus", ["verdict_text", "large_text"])
def test_our_bpe_on_gpt2_files_matches_tiktoken_exactly(corpus, gpt2_bpe, tiktoken_gpt2, request):
    text = request.getfixturevalue(corpus)
    ours = gpt2_bpe.encode(text)
    theirs = tiktoken_gpt2.encode(text, allowed_special={"<|endoftext|>"})
    assert len(ours) == len(theirs)
    assert ours == theirs
    assert gpt2_bpe.decode(ours) == text


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=0, max_size=80))
def test_our_bpe_matches_tiktoken_on_arbitrary_unicode(gpt2_bpe, tiktoken_gpt2, text):
    assert gpt2_bpe.encode_ordinary(text) == tiktoken_gpt2.encode_ordinary(text)


def test_special_tokens_and_allowed_special(gpt2_bpe):
    text = "a<|endoftext|>b"
    assert gpt2_bpe.encode(text) == [64, 50256, 65]
    assert 50256 not in gpt2_bpe.encode(text, allowed_special=set())
    assert gpt2_bpe.eot_id == 50256 and gpt2_bpe.n_vocab == 50257


def test_bytes_to_unicode_is_a_bijection_onto_printables():
    mapping = gpt2_bytes_to_unicode()
    assert sorted(mapping) == list(range(256))
    assert len(set(mapping.values())) == 256
    assert all(ch.isprintable() and not ch.isspace() for ch in mapping.values())
    assert mapping[ord("A")] == "A" and mapping[ord(" ")] == "\u0120"  # GPT-2's 'Ġ'


def naive_learn_merges(word_counts, num_merges):
    """Twin of learn_merges that recounts every pair from scratch each round."""
    words = dict(word_counts)
    merges = []
    for k in range(num_merges):
        counts = Counter()
        for w, c in words.items():
            for p in zip(w, w[1:]):
                counts[p] += c
        if not counts:
            break
        best = max(counts, key=lambda p: (counts[p], -p[0], -p[1]))
        merges.append((best[0], best[1], 256 + k))
        merged = Counter()
        for w, c in words.items():
            merged[_merge_word(w, best, 256 + k)] += c
        words = merged
    return merges


def test_incremental_training_equals_naive_recount(verdict_text):
    import regex

    from gptfast.tokenizer import GPT2_SPLIT_PATTERN

    counts = Counter(tuple(c.encode()) for c in regex.findall(GPT2_SPLIT_PATTERN, verdict_text[:8000]))
    assert learn_merges(counts, 300) == naive_learn_merges(counts, 300)


def test_train_roundtrip_save_load(tmp_path, verdict_text, large_text):
    tok = ByteLevelBPE.train(verdict_text, vocab_size=512)
    assert tok.n_vocab == 512 and tok.eot_id == 511
    sample = large_text[:3000] + " naïve café 😀 <|endoftext|> end"
    ids = tok.encode(sample)
    assert tok.decode(ids) == sample
    assert len(ids) < len(sample.encode())          # merges actually compress
    assert max(ids) < tok.n_vocab
    path = tmp_path / "tok.json"
    tok.save(str(path))
    json.loads(path.read_text())                     # plain JSON on disk
    loaded = get_tokenizer("bpe", path=str(path))
    assert loaded.encode(sample) == ids
    assert tokenizer_from_spec(tok.spec()).encode(sample) == ids


def test_training_is_deterministic_and_first_merge_is_the_most_frequent_pair(verdict_text):
    import regex

    from gptfast.tokenizer import GPT2_SPLIT_PATTERN

    a = ByteLevelBPE.train(verdict_text, 300)
    b = ByteLevelBPE.train(verdict_text, 300)
    assert a.merges == b.merges and len(a.merges) == 300 - 257
    pairs = Counter()
    for chunk in regex.findall(GPT2_SPLIT_PATTERN, verdict_text):
        pairs.update(zip(chunk.encode(), chunk.encode()[1:]))
    assert a.merges[0][:2] == max(pairs, key=lambda p: (pairs[p], -p[0], -p[1]))


def test_train_rejects_too_small_vocab():
    with pytest.raises(ValueError, match="vocab_size must be at least 257"):
        ByteLevelBPE.train("hello", 100)


def test_get_tokenizer_bpe_from_gpt2_folder_and_errors(tmp_path):
    tok = get_tokenizer("bpe", path=GPT2_FILES_DIR)
    assert tok.encode("Hello, world") == [15496, 11, 995]
    with pytest.raises(ValueError, match="unknown tokenizer 'nope'"):
        get_tokenizer("nope")
    with pytest.raises(ValueError, match="needs `text`"):
        get_tokenizer("bpe")
    with pytest.raises(FileNotFoundError, match="vocab.bpe"):
        ByteLevelBPE.from_gpt2_files(str(tmp_path))
    with pytest.raises(ValueError, match="not in this tokenizer's vocabulary"):
        tok.decode([10**6])
