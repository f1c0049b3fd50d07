"""GPTConfig: every size knob of the model in one dataclass, plus named presets."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace


@dataclass
class GPTConfig:
    vocab_size: int = 50257      # GPT-2 BPE vocabulary
    context_length: int = 256    # max tokens the model attends over (positional embeddings)
    emb_dim: int = 768           # width of the residual stream, C
    n_heads: int = 12            # attention heads; head size hs = C / n_heads
    n_layers: int = 12           # transformer blocks
    drop_rate: float = 0.1       # dropout on embeddings, attention weights and residual branches
    qkv_bias: bool = False       # biases in the Q/K/V projections (GPT-2's own weights have them)
    tie_embeddings: bool = False # LM head shares the token embedding matrix (GPT-2 does; the book doesn't)
    vocab_multiple: int = 1      # embedding / LM-head rows padded up to a multiple of this (64: 50257 -> 50304,
                                 # friendlier matmul shapes); padded ids are never targets nor generated
    backend: str | None = None   # op backend; None -> $GPTFAST_BACKEND -> "auto"

    def __post_init__(self):
        for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "vocab_multiple"):
            if getattr(self, name) < 1:
                raise ValueError(f"GPTConfig.{name} must be positive, got {getattr(self, name)}")
        if self.emb_dim % self.n_heads:
            raise ValueError(f"GPTConfig.emb_dim ({self.emb_dim}) must be divisible by n_heads ({self.n_heads})")
        if not 0.0 <= self.drop_rate < 1.0:
            raise ValueError(f"GPTConfig.drop_rate must be in [0, 1), got {self.drop_rate}")

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and LM head: vocab_size rounded up to a multiple of vocab_multiple."""
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "GPTConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return replace(PRESETS[name], **overrides)


PRESETS: dict[str, GPTConfig] = {
    # The book's chapter-5 model: GPT-2 small shape with a 256-token context.
    "book-124m": GPTConfig(context_length=256),
    # GPT-2 small (124M) shape as in the book's GPT_CONFIG_124M: 163,009,536 parameters untied.
    "gpt2-124m": GPTConfig(context_length=1024),
    # Small enough that 10 epochs on the-verdict take a few minutes on a 2-core laptop CPU.
    "cpu-small": GPTConfig(context_length=128, emb_dim=256, n_heads=4, n_layers=4),
    # For tests: seconds, not minutes.
    "tiny": GPTConfig(context_length=64, emb_dim=64, n_heads=4, n_layers=2, drop_rate=0.0),
}
