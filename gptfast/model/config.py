"""The model configs: every size knob in one dataclass per family, and named presets of both.

GPTConfig is GPT-2's (the book's); LlamaConfig is the Llama 3 / Qwen3 family's (llama.py). Their common knobs
have the same names (vocab_size, context_length, emb_dim, n_heads, n_layers, drop_rate, tie_embeddings,
vocab_multiple, backend), so training, checkpoints and generation treat them alike; `family` says which model a
config builds, and `config_from_dict` / `config_from_preset` return the right class.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace


class ModelConfig:
    """What both families' configs share: the padded vocabulary, and to/from a dict (a checkpoint's) or a preset."""
    family = ""

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and LM head: vocab_size rounded up to a multiple of vocab_multiple."""
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

    def to_dict(self) -> dict:
        return {**asdict(self), "family": self.family}

    @classmethod
    def from_dict(cls, d: dict):
        return config_from_dict(d)

    @classmethod
    def from_preset(cls, name: str, **overrides):
        return config_from_preset(name, **overrides)


@dataclass
class GPTConfig(ModelConfig):
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

    family = "gpt2"


@dataclass
class LlamaConfig(ModelConfig):
    """Llama 3.x and Qwen3 (llama.py): RMSNorm, rotary positions, SwiGLU, grouped-query attention; Qwen3 adds an
    RMSNorm of each head's queries and keys (qk_norm). Field names follow GPTConfig where the knob is the same;
    Hugging Face's names in the comments (llama_weights.py converts config.json both ways)."""
    vocab_size: int = 151936     # vocab_size
    context_length: int = 40960  # max_position_embeddings
    emb_dim: int = 1024          # hidden_size, C
    hidden_dim: int = 3072       # intermediate_size: the SwiGLU's width
    n_heads: int = 16            # num_attention_heads
    n_kv_heads: int = 8          # num_key_value_heads: n_heads / n_kv_heads query heads share each K/V head
    head_dim: int = 0            # head_dim (0: emb_dim // n_heads); Qwen3-0.6B: 128 with emb_dim 1024, 16 heads
    n_layers: int = 28           # num_hidden_layers
    rope_theta: float = 1e6      # rope_theta: the rotary base (Llama 3: 500000)
    rope_scaling: dict | None = None   # rope_scaling: Llama 3.1/3.2's long-context frequency scaling
    norm_eps: float = 1e-6       # rms_norm_eps
    qk_norm: bool = True         # Qwen3: RMSNorm of each head's q and k before the rotation; Llama: False
    qkv_bias: bool = False       # attention_bias
    tie_embeddings: bool = True  # tie_word_embeddings
    drop_rate: float = 0.0       # dropout on attention weights and residual branches (the released models: 0)
    vocab_multiple: int = 1
    backend: str | None = None

    family = "llama"

    def __post_init__(self):
        for name in ("vocab_size", "context_length", "emb_dim", "hidden_dim", "n_heads", "n_kv_heads", "n_layers",
                     "vocab_multiple"):
            if getattr(self, name) < 1:
                raise ValueError(f"LlamaConfig.{name} must be positive, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"LlamaConfig.n_kv_heads ({self.n_kv_heads}) must divide n_heads ({self.n_heads})")
        if not self.head_dim:
            if self.emb_dim % self.n_heads:
                raise ValueError(f"LlamaConfig.emb_dim ({self.emb_dim}) must be divisible by n_heads ({self.n_heads}) "
                                 "unless head_dim is given")
            self.head_dim = self.emb_dim // self.n_heads
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig.head_dim must be even (rotary halves), got {self.head_dim}")
        if not 0.0 <= self.drop_rate < 1.0:
            raise ValueError(f"LlamaConfig.drop_rate must be in [0, 1), got {self.drop_rate}")



FAMILIES = {"gpt2": GPTConfig, "llama": LlamaConfig}


def config_from_dict(d: dict):
    """The config a to_dict() (a checkpoint's) describes: its family's class (GPT-2 when it names none)."""
    cls = FAMILIES.get(d.get("family", "gpt2"))
    if cls is None:
        raise ValueError(f"unknown model family {d.get('family')!r}; known: {', '.join(FAMILIES)}")
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in known})


def config_from_preset(name: str, **overrides):
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides)


PRESETS: dict[str, GPTConfig | LlamaConfig] = {
    # The book's chapter-5 model: GPT-2 small shape with a 256-token context.
    "book-124m": GPTConfig(context_length=256),
    # GPT-2 small (124M) shape as in the book's GPT_CONFIG_124M: 163,009,536 parameters untied.
    "gpt2-124m": GPTConfig(context_length=1024),
    # Small enough that 10 epochs on the-verdict take a few minutes on a 2-core laptop CPU.
    "cpu-small": GPTConfig(context_length=128, emb_dim=256, n_heads=4, n_layers=4),
    # For tests: seconds, not minutes.
    "tiny": GPTConfig(context_length=64, emb_dim=64, n_heads=4, n_layers=2, drop_rate=0.0),
    # The Llama 3 / Qwen3 family (llama.py), with the released models' shapes (random weights unless loaded):
    "qwen3-0.6b": LlamaConfig(head_dim=128),                     # 596M parameters (440M without the embedding)
    "llama3.2-1b": LlamaConfig(vocab_size=128256, context_length=131072, emb_dim=2048, hidden_dim=8192,
                               n_heads=32, n_kv_heads=8, n_layers=16, rope_theta=500000.0, norm_eps=1e-5,
                               qk_norm=False, rope_scaling={"rope_type": "llama3", "factor": 32.0,
                                                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                            "original_max_position_embeddings": 8192}),
    # Qwen3's block at cpu-small's size: trains on The Verdict on a 2-core CPU in minutes.
    "qwen3-small": LlamaConfig(context_length=128, emb_dim=256, hidden_dim=768, n_heads=8, n_kv_heads=4,
                               head_dim=32, n_layers=4),
    # For tests: seconds, not minutes.
    "qwen3-tiny": LlamaConfig(context_length=64, emb_dim=64, hidden_dim=128, n_heads=4, n_kv_heads=2, head_dim=16,
                              n_layers=2),
}
