import pytest
import torch

from gptfast.generate import generate, sample_next, text_to_token_ids, token_ids_to_text
from gptfast.model import GPTConfig, GPTModel


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPTModel(GPTConfig(vocab_size=50, context_length=8, emb_dim=32, n_heads=2, n_layers=2,
                              drop_rate=0.1))


def test_greedy_equals_manual_argmax_loop(model):
    idx = torch.tensor([[1, 2, 3]])
    out = generate(model, idx, max_new_tokens=12, context_size=8)
    model.eval()
    manual = idx
    with torch.no_grad():
        for _ in range(12):
            nxt = model(manual[:, -8:])[:, -1].argmax(-1, keepdim=True)
            manual = torch.cat([manual, nxt], 1)
    assert out.shape == (1, 15)                       # past the context window: cropping works
    assert torch.equal(out, manual)


def test_restores_training_mode(model):
    model.train()
    generate(model, torch.tensor([[1]]), 2)
    assert model.training
    model.eval()
    generate(model, torch.tensor([[1]]), 2)
    assert not model.training


def test_seeded_sampling_is_reproducible(model):
    idx = torch.tensor([[4, 5]])
    a = generate(model, idx, 20, temperature=1.5, top_k=10, seed=7)
    b = generate(model, idx, 20, temperature=1.5, top_k=10, seed=7)
    c = generate(model, idx, 20, temperature=1.5, top_k=10, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_top_k_one_is_greedy(model):
    idx = torch.tensor([[4, 5]])
    assert torch.equal(generate(model, idx, 10, temperature=2.0, top_k=1, seed=0),
                       generate(model, idx, 10))


def test_sample_next_respects_top_k():
    logits = torch.tensor([[0.0, 5.0, 4.0, -1.0, 3.0]])
    g = torch.Generator().manual_seed(0)
    picks = {sample_next(logits, temperature=5.0, top_k=2, generator=g).item() for _ in range(200)}
    assert picks == {1, 2}
    assert sample_next(logits).item() == 1


def test_stops_at_eos_and_pads_finished_rows(model):
    idx = torch.tensor([[1, 2], [3, 4]])
    greedy = generate(model, idx, 6)
    eos = greedy[0, 2].item()                         # row 0's first new token
    out = generate(model, idx, 6, eos_id=eos)
    assert torch.all(out[0, 2:] == eos)
    row1_hits = (greedy[1, 2:] == eos).nonzero()
    if len(row1_hits):                                # both rows finish -> stops early
        assert out.shape[1] == 2 + row1_hits[0].item() + 1
    else:
        assert out.shape[1] == 8 and torch.equal(out[1], greedy[1])
    single = generate(model, idx[:1], 6, eos_id=eos)
    assert single.shape == (1, 3)                     # a single row stops right at eos


def test_invalid_arguments(model):
    with pytest.raises(ValueError, match="temperature"):
        generate(model, torch.tensor([[1]]), 3, temperature=-1.0)
    with pytest.raises(ValueError, match="top_k"):
        generate(model, torch.tensor([[1]]), 3, top_k=0)
    with pytest.raises(ValueError, match="idx must have shape"):
        generate(model, torch.tensor([1]), 3)


def test_text_helpers_round_trip(gpt2_tokenizer):
    ids = text_to_token_ids("Every effort moves you", gpt2_tokenizer)
    assert ids.shape == (1, 4)
    assert token_ids_to_text(ids, gpt2_tokenizer) == "Every effort moves you"


# ----------------------------------------------------------------------------- KV cache, top-p, streaming
@pytest.mark.parametrize("backend", ["reference", "torch", "extension",
                                     pytest.param("triton", marks=pytest.mark.slow)])   # the interpreter: 7 s
def test_kv_cache_gives_identical_tokens_past_the_window(backend):
    from gptfast import ops

    torch.manual_seed(0)
    m = GPTModel(GPTConfig(vocab_size=50, context_length=8, emb_dim=32, n_heads=2, n_layers=2, backend=backend))
    idx = torch.tensor([[1, 2, 3], [4, 5, 6]])
    plain = generate(m, idx, 10, use_cache=False)                  # 3 + 10 > 8: the window slides
    assert plain.shape == (2, 13)
    assert torch.equal(generate(m, idx, 10), plain)                 # default: cache where supported
    if ops.supports_kv_cache(backend, "cpu"):
        assert torch.equal(generate(m, idx, 10, use_cache=True), plain)
        sampled = [generate(m, idx, 8, temperature=1.0, top_p=0.9, seed=4, use_cache=c) for c in (True, False)]
        assert torch.equal(*sampled)


def test_cached_forward_equals_full_forward(model):
    model.eval()
    idx = torch.randint(0, 50, (2, 8))
    full = model(idx)
    cache = model.new_kv_cache(2)
    first = model(idx[:, :5], cache=cache, start_pos=0)
    rest = [model(idx[:, t:t + 1], cache=cache, start_pos=t) for t in range(5, 8)]
    assert torch.allclose(torch.cat([first, *rest], 1), full, atol=1e-5)
    with pytest.raises(ValueError, match="start_pos > 0 needs the cache"):
        model(idx[:, :1], start_pos=3)


def test_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    picks = {sample_next(logits, temperature=1.0, top_p=0.7, generator=g).item() for _ in range(300)}
    assert picks == {0, 1}                                          # 0.5 + 0.3 reaches 0.7
    assert {sample_next(logits, temperature=1.0, top_p=0.4, generator=g).item() for _ in range(50)} == {0}
    with pytest.raises(ValueError, match="top_p"):
        sample_next(logits, temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="top_p"):
        generate(GPTModel(GPTConfig(vocab_size=4, context_length=4, emb_dim=8, n_heads=2, n_layers=1)),
                 torch.tensor([[1]]), 2, top_p=1.5)


def test_stream_text_yields_the_same_text_as_generate(gpt2_tokenizer):
    from gptfast.generate import stream_text

    torch.manual_seed(0)
    m = GPTModel(GPTConfig(vocab_size=50257, context_length=16, emb_dim=16, n_heads=2, n_layers=1))
    stats = {}
    pieces = list(stream_text(m, gpt2_tokenizer, "Hello", 12, stats=stats))
    whole = token_ids_to_text(generate(m, text_to_token_ids("Hello", gpt2_tokenizer), 12), gpt2_tokenizer)
    assert len(pieces) > 1 and "Hello" + "".join(pieces) == whole
    assert stats["tokens"] == 12 and stats["first_token_s"] > 0 and stats["decode_s"] > 0


def test_generate_script_speed_line():
    from gptfast.commands.generate import speed_line

    assert speed_line({}) == "(no tokens generated)"
    assert speed_line({"tokens": 1, "first_token_s": 0.25, "decode_s": 0.0}) == "(1 token: the first after 0.25 s)"
    assert speed_line({"tokens": 11, "first_token_s": 0.5, "decode_s": 0.2}) == \
        "(11 tokens: the first after 0.50 s, then 50.0 tokens/s)"


@pytest.mark.parametrize("backend", ["reference", "extension"])
def test_the_textbook_loop_gives_the_tokens_of_the_fast_one(backend):
    """generate_simple (the whole window through the model for every token) and generate (KV cache, the LM head
    on the last position, fused decoding blocks): the same tokens, greedy and sampled with top-k, also past the
    context window."""
    from gptfast.generate import generate_simple

    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=50, context_length=12, emb_dim=32, n_heads=2, n_layers=2, backend=backend))
    idx = torch.randint(0, 50, (2, 3), generator=torch.Generator().manual_seed(1))
    assert torch.equal(generate_simple(model, idx, 15), generate(model, idx, 15))
    for seed in range(3):
        simple = generate_simple(model, idx, 15, temperature=1.3, top_k=8,
                                 generator=torch.Generator().manual_seed(seed))
        assert torch.equal(simple, generate(model, idx, 15, temperature=1.3, top_k=8, seed=seed))
