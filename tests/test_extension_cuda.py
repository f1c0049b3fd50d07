"""The `extension` backend on a GPU as a whole: built with its CUDA kernels, a model generates, trains and compiles
on it. Each op's CUDA kernels are tested in its own file (tests/test_<op>.py). GPU only."""
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA kernels need an NVIDIA GPU")

from conftest import rel_error  # noqa: E402


def test_extension_was_built_with_cuda():
    from gptfast.compiled import load_extension

    info = load_extension().build_info()
    assert "cuda" in info["compiled_backends"], f"gptfast._C has no CUDA kernels: {info}"


def test_generation_with_the_kv_cache_gives_the_same_tokens():
    from gptfast.generate import generate

    model = small_model("extension").eval()
    idx = torch.randint(0, 101, (2, 5), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    plain = generate(model, idx, 70, use_cache=False)                 # 5 + 70 > 64: the window slides too
    assert torch.equal(generate(model, idx, 70, use_cache=True), plain)


def small_model(backend, drop_rate=0.0):
    from gptfast.model import GPTConfig, GPTModel

    torch.manual_seed(0)
    return GPTModel(GPTConfig(vocab_size=101, context_length=64, emb_dim=128, n_heads=4, n_layers=2,
                              drop_rate=drop_rate, backend=backend)).cuda()


def test_torch_compile_fullgraph():
    model = small_model("extension").eval()
    idx = torch.randint(0, 101, (2, 64), device="cuda")
    assert rel_error(torch.compile(model, fullgraph=True)(idx), model(idx)) < 1e-5


def test_short_training_run_matches_reference():
    idx = torch.randint(0, 101, (4, 65), generator=torch.Generator().manual_seed(1)).cuda()

    def losses(backend):
        model = small_model(backend, drop_rate=0.1)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        torch.manual_seed(1)
        out = []
        for _ in range(10):
            loss = model(idx[:, :-1], idx[:, 1:])           # the model's loss, on the backend's ops
            opt.zero_grad()
            loss.backward()
            opt.step()
            out.append(loss.item())
        return torch.tensor(out)

    assert (losses("reference") - losses("extension")).abs().max() < 1e-4


