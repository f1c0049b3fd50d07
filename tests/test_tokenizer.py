import json
from collections import Counter

import pytest
import tiktoken
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import shared_file
from gptfast.tokenizer import (ByteLevelBPE, TokenizerUnavailableError, get_tokenizer,
                               gpt2_bytes_to_unicode, learn_merges, tokenizer_from_spec)
from gptfast.tokenizer.bpe import _merge_word


@pytest.fixture(scope="module")
def gpt2_bpe():
    return ByteLevelBPE.from_gpt2_files(str(shared_file("gpt2")))


@pytest.fixture(scope="module")
def tiktoken_gpt2():
    shared_file("tiktoken-cache")
    return tiktoken.get_encoding("gpt2")


def test_gpt2_wrapper_matches_documented_ids(gpt2_tokenizer):
    text = "Hello, do you like tea? <|endoftext|> In the sunlit terraces of someunknownPlace."
    ids = gpt2_tokenizer.encode(text)
    assert ids[:7] == [15496, 11, 466, 345, 588, 8887, 30]
    assert ids[8] == gpt2_tokenizer.eot_id == 50256
    assert gpt2_tokenizer.n_vocab == 50257
    assert gpt2_tokenizer.decode(ids) == text


@pytest.mark.parametrize("name", ["the-verdict.txt", "tinyshakespeare.txt"])
def test_our_bpe_on_gpt2_files_matches_tiktoken_exactly(name, gpt2_bpe, tiktoken_gpt2):
    text = shared_file(name).read_text(encoding="utf-8")
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


def test_train_roundtrip_save_load(tmp_path, verdict_text, shakespeare_text):
    tok = ByteLevelBPE.train(verdict_text, vocab_size=512)
    assert tok.n_vocab == 512 and tok.eot_id == 511
    sample = shakespeare_text[:3000] + " naïve café 😀 <|endoftext|> end"
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
    tok = get_tokenizer("bpe", path=str(shared_file("gpt2")))
    assert tok.encode("Hello, world") == [15496, 11, 995]
    with pytest.raises(ValueError, match="unknown tokenizer 'nope'"):
        get_tokenizer("nope")
    with pytest.raises(ValueError, match="needs `text`"):
        get_tokenizer("bpe")
    with pytest.raises(FileNotFoundError, match="vocab.bpe"):
        ByteLevelBPE.from_gpt2_files(str(tmp_path))
    with pytest.raises(ValueError, match="not in this tokenizer's vocabulary"):
        tok.decode([10**6])


def test_offline_gpt2_gives_a_paragraph_not_a_traceback(monkeypatch):
    def offline(name):
        raise ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)
    with pytest.raises(TokenizerUnavailableError) as info:
        get_tokenizer("gpt2")
    msg = str(info.value)
    assert "TIKTOKEN_CACHE_DIR" in msg and "--tokenizer bpe" in msg and "ConnectionError" in msg
