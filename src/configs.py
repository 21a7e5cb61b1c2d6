"""Configuration dataclasses and named model presets.

Every field has a default and a one-line comment; that comment is its documentation.
Presets are named like the original project's (`gpt2-medium/lora`): a base shape, optionally
followed by `/lora` (LoRA adapters, backbone frozen) or `/dropout` (GPT-2's 0.1 dropout).
"""
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Optional

from common import UserError

GPT2_VOCAB_SIZE = 50257  # 50000 BPE merges + 256 byte tokens + <|endoftext|>
EOS_ID = 50256  # <|endoftext|>

LORA_TARGETS = ("q", "k", "v", "attn_out", "mlp_in", "mlp_out")


@dataclass(frozen=True)
class ModelConfig:
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads per block
    n_embd: int = 768  # width of the residual stream
    block_size: int = 1024  # longest sequence (learned position embeddings)
    vocab_size: int = GPT2_VOCAB_SIZE  # GPT-2 BPE vocabulary, shared by every preset
    dropout: float = 0.0  # embedding, attention and residual dropout (GPT-2 trained with 0.1)
    layer_norm_eps: float = 1e-5  # GPT-2's LayerNorm epsilon
    pretrained: Optional[str] = None  # hub name or local dir of GPT-2 weights; None = random init
    lora_rank: int = 0  # LoRA rank r; 0 = no LoRA, every weight trainable
    lora_alpha: float = 16.0  # LoRA scale is alpha / r
    lora_dropout: float = 0.0  # dropout on the LoRA branch input
    lora_targets: tuple = LORA_TARGETS  # projections that get adapters (subset of LORA_TARGETS)
    gradient_checkpointing: bool = False  # recompute block activations in backward to save memory

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise UserError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        unknown = set(self.lora_targets) - set(LORA_TARGETS)
        if unknown:
            raise UserError(f"unknown LoRA targets {sorted(unknown)}; known: {', '.join(LORA_TARGETS)}")
        # JSON round trips turn tuples into lists; keep the frozen dataclass hashable.
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def architecture(self) -> dict:
        """The fields that decide which weights fit this model (what a checkpoint must match)."""
        d = {k: getattr(self, k) for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")}
        d["lora_rank"] = self.lora_rank
        if self.lora_rank:
            d["lora_targets"] = list(self.lora_targets)
        return d


# Base shapes. The gpt2* shapes load OpenAI's weights from the hub; the others start from
# random weights and exist so that the whole pipeline runs on a CPU in minutes.
_BASES = {
    "gpt2": ModelConfig(n_layer=12, n_head=12, n_embd=768, pretrained="openai-community/gpt2"),
    "gpt2-medium": ModelConfig(n_layer=24, n_head=16, n_embd=1024, pretrained="openai-community/gpt2-medium"),
    "gpt2-large": ModelConfig(n_layer=36, n_head=20, n_embd=1280, pretrained="openai-community/gpt2-large"),
    "gpt2-xl": ModelConfig(n_layer=48, n_head=25, n_embd=1600, pretrained="openai-community/gpt2-xl"),
    # ~7.3M parameters, 6.4M of them the (tied) 50257-word embedding.
    "tiny": ModelConfig(n_layer=4, n_head=4, n_embd=128, block_size=256),
    # ~17M parameters: deeper and wider than tiny, still trainable on a laptop CPU.
    "mini": ModelConfig(n_layer=6, n_head=8, n_embd=256, block_size=512),
}
_VARIANTS = {
    "": {},
    "/lora": {"lora_rank": 8},
    "/dropout": {"dropout": 0.1},
}
PRESETS = {base + suffix: replace(cfg, **over) for base, cfg in _BASES.items() for suffix, over in _VARIANTS.items()}


def get_preset(name: str, **overrides) -> ModelConfig:
    """The named preset, with optional field overrides (e.g. lora_rank=4)."""
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return replace(PRESETS[name], **overrides)
