"""Configuration dataclasses and named model presets.

Every field has a default and a one-line comment; that comment is its documentation.
Presets are named like the original project's (`gpt2-medium/lora`): a base shape, optionally
followed by `/lora` (LoRA adapters, backbone frozen) or `/dropout` (GPT-2's 0.1 dropout).
"""
from dataclasses import asdict, dataclass, fields, replace
from typing import Optional

from common import UserError

GPT2_VOCAB_SIZE = 50257  # 50000 BPE merges + 256 byte tokens + <|endoftext|>
EOS_ID = 50256  # <|endoftext|>

LORA_TARGETS = ("q", "k", "v", "attn_out", "mlp_in", "mlp_out")


_RANGES = {">= 0": lambda v: v >= 0, ">= 1": lambda v: v >= 1, "> 0": lambda v: v > 0,
           "in [0, 1]": lambda v: 0 <= v <= 1, "in [0, 1)": lambda v: 0 <= v < 1}


def check_ranges(cfg, rules: dict):
    """A UserError naming the flag for the first field of `cfg` outside its range (None = unset, allowed),
    so `--lr -1` is one line and exit 2, not a traceback from deep inside torch."""
    for name, rule in rules.items():
        value = getattr(cfg, name)
        if value is not None and not _RANGES[rule](value):
            raise UserError(f"--{name.replace('_', '-')} must be {rule}, got {value}")


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
    score_mean_with_padding: bool = False  # RM score = head's mean over all positions, pads too (the original's)

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
    # ~3.3M parameters, for tests and smoke runs.
    "nano": ModelConfig(n_layer=2, n_head=4, n_embd=64, block_size=128),
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


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping shared by SFT, RM and PPO."""

    batch_size: int = 8  # sequences per micro-batch on each process (-b)
    grad_accum: int = 1  # micro-batches per optimizer step (effective batch = b * accum * processes)
    lr: float = 1e-4  # peak learning rate
    schedule: str = "cosine"  # lr decay after warmup: cosine | linear | constant
    warmup_steps: int = 50  # linear warmup from 0 to lr
    min_lr_ratio: float = 0.1  # decay ends at lr * min_lr_ratio
    weight_decay: float = 0.0  # AdamW decoupled weight decay on matrices (not biases / LayerNorms)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2 (GPT-3; the original used 0.9)
    adam_eps: float = 1e-8  # AdamW epsilon
    grad_clip: float = 1.0  # max global gradient norm, applied after backward (0 = off)
    epochs: float = 1.0  # passes over the training data (ignored when max_steps is set)
    max_steps: Optional[int] = None  # optimizer steps; overrides epochs
    eval_every: int = 100  # evaluate on the held-out split every N steps (0 = only at the end)
    eval_batches: Optional[int] = None  # limit evaluation to N batches (None = whole split)
    save_every: int = 500  # write a resumable checkpoint every N steps (0 = only at the end)
    keep_last: int = 2  # resumable checkpoints kept
    log_every: int = 10  # metrics.jsonl / wandb every N steps
    seed: int = 0  # seeds init, data order, dropout and sampling
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16 (CUDA + GradScaler)
    compile: bool = False  # torch.compile the model
    wandb: bool = False  # log to Weights & Biases as well (respects WANDB_MODE=offline)
    wandb_project: str = "minchatgpt"  # W&B project name

    def __post_init__(self):
        if self.schedule not in ("cosine", "linear", "constant"):
            raise UserError(f"unknown schedule {self.schedule!r}; use cosine, linear or constant")
        check_ranges(self, {"batch_size": ">= 1", "grad_accum": ">= 1", "lr": "> 0", "warmup_steps": ">= 0",
                            "min_lr_ratio": "in [0, 1]", "weight_decay": ">= 0", "beta1": "in [0, 1)",
                            "beta2": "in [0, 1)", "adam_eps": "> 0", "grad_clip": ">= 0", "epochs": "> 0",
                            "max_steps": ">= 0", "eval_every": ">= 0", "eval_batches": ">= 1", "save_every": ">= 0",
                            "keep_last": ">= 1", "log_every": ">= 1"})

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PPOConfig:
    """PPO for language models (Ziegler et al. 2019; Stiennon et al. 2020; defaults and details as in
    Huang et al. 2024, "The N+ implementation details of RLHF with PPO"); the algorithm is src/ppo.py.

    `advantage` picks what each token is credited with (ppo.advantages): gae, PPO's per-token GAE
    from a critic; rloo (Ahmadian et al. 2024), each of rloo_k samples of a prompt gets its reward
    minus the mean reward of the other k - 1, and no critic is trained; sequence, the original
    project's: one gradient step on the whole rollout, every token of a response credited with its
    reward minus V(prompt). rollout_top_k > 0 is the original's sampling mismatch: rollouts come
    from the top-k tokens, while old, new and reference log-probs are of the full softmax.
    decode_precision bf16 / int8 samples rollouts from a low-precision copy of the policy (faster
    where the CPU's bf16 kernels are, benchmarks/decode.py); old log-probs still come from the
    policy itself, so the first minibatch's ratio stays 1 and only which tokens are drawn changes
    (KL to the fp32 policy <= 1e-3 nats per token, tests/test_ppo.py). decode_compile runs the
    sampler through torch.compile: compiled on the first rollout, reused by every later one
    (benchmarks/gpu.py measures it on CUDA; on a CPU it bought 1-5% at gpt2-small shape for ~40 s
    of compiling, benchmarks/results/decode_compile.md)."""

    rollout_batch_size: int = 32  # prompts per rollout on each process
    minibatch_size: int = 8  # sequences per PPO minibatch (must divide rollout_batch_size)
    ppo_epochs: int = 4  # passes over each rollout batch, in freshly shuffled minibatches
    max_new_tokens: int = 128  # response budget; responses without EOS by then get missing_eos_penalty
    temperature: float = 1.0  # rollout sampling temperature; every log-prob (old, new, reference) uses it too
    kl_coef: float = 0.05  # beta in the per-token reward -beta * KL_t (the initial value when adaptive)
    target_kl: Optional[float] = None  # adapt beta towards this KL per sequence (None = fixed; Ziegler et al.)
    kl_horizon: int = 10000  # adaptive controller horizon, in samples
    gamma: float = 1.0  # GAE discount (1: a response is a short episode with one score at its end)
    lam: float = 0.95  # GAE lambda
    cliprange: float = 0.2  # policy ratio clip epsilon
    cliprange_value: float = 0.2  # value clip around the rollout's values
    actor_lr: float = 1e-5  # actor learning rate (warmup + decay from TrainConfig)
    critic_lr: float = 1e-5  # critic learning rate
    missing_eos_penalty: Optional[float] = 1.0  # no EOS: score this far below the worst finished answer (None: off)
    normalize_reward: bool = True  # gain/bias fitted on the first rollout (SFT samples): mean 0, std 1
    reward_clip: Optional[float] = None  # clip (normalised) scores to +-reward_clip
    whiten_rewards: bool = False  # whiten per-token rewards over the batch, keeping their mean
    eval_samples: int = 64  # held-out prompts scored at every evaluation
    advantage: str = "gae"  # gae (critic + GAE) | rloo (leave-one-out baseline, no critic) | sequence (the original's)
    rloo_k: int = 4  # rloo: samples per prompt; a rollout answers rollout_batch_size / rloo_k prompts
    rollout_top_k: Optional[int] = None  # sample from the top k, log-probs of the full softmax (original: 50)
    decode_precision: str = "fp32"  # rollout sampler's weights: fp32 (the policy) | bf16 | int8 (GPT.for_decoding)
    decode_compile: bool = False  # torch.compile the rollout sampler (compiled on the first rollout only)

    def __post_init__(self):
        if self.advantage not in ADVANTAGES:
            raise UserError(f"--advantage {self.advantage!r}: use one of {', '.join(ADVANTAGES)}")
        if self.decode_precision not in DECODE_PRECISIONS:
            raise UserError(f"--decode-precision {self.decode_precision!r}: use one of {', '.join(DECODE_PRECISIONS)}")
        check_ranges(self, {"rollout_batch_size": ">= 1", "minibatch_size": ">= 1", "ppo_epochs": ">= 1",
                            "max_new_tokens": ">= 1", "temperature": "> 0", "kl_coef": ">= 0", "target_kl": "> 0",
                            "kl_horizon": ">= 1", "gamma": "in [0, 1]", "lam": "in [0, 1]", "cliprange": "> 0",
                            "cliprange_value": "> 0", "actor_lr": "> 0", "critic_lr": "> 0", "reward_clip": "> 0",
                            "missing_eos_penalty": ">= 0",
                            "eval_samples": ">= 1", "rollout_top_k": ">= 1"})
        if self.rollout_batch_size % self.minibatch_size:
            raise UserError(f"--minibatch-size {self.minibatch_size} must divide "
                            f"--rollout-batch-size {self.rollout_batch_size}")
        if self.advantage == "rloo" and (self.rloo_k < 2 or self.rollout_batch_size % self.rloo_k):
            raise UserError(f"--rloo-k {self.rloo_k} must be at least 2 and divide --rollout-batch-size "
                            f"{self.rollout_batch_size}")

    @property
    def prompts_per_rollout(self) -> int:
        """Prompts drawn for one rollout: rollout_batch_size, or for RLOO rollout_batch_size / rloo_k,
        each answered rloo_k times (the same number of samples per step as PPO)."""
        return self.rollout_batch_size // self.rloo_k if self.advantage == "rloo" else self.rollout_batch_size

    def to_dict(self) -> dict:
        return asdict(self)


ADVANTAGES = ("gae", "rloo", "sequence")  # PPOConfig.advantage
DECODE_PRECISIONS = ("fp32", "bf16", "int8")  # GPT.for_decoding: weights a sampler decodes with


@dataclass
class DPOConfig:
    """Preference optimisation without a reward model: the policy's log-ratio to the reference (SFT)
    policy is the implicit reward (src/trainers.py DPOStage). h = [log pi(y_c) - log ref(y_c)] -
    [log pi(y_r) - log ref(y_r)] for a pair's chosen y_c and rejected y_r."""

    loss: str = "dpo"  # dpo: -log sigmoid(beta h) (Rafailov et al. 2023) | ipo: (h - 1/(2 beta))^2 (Azar et al. 2023)
    beta: float = 0.1  # implicit reward = beta * log-ratio (higher: stay nearer the reference); IPO's margin 1/(2 beta)

    def __post_init__(self):
        if self.loss not in ("dpo", "ipo"):
            raise UserError(f"--loss {self.loss!r}: use dpo or ipo")
        check_ranges(self, {"beta": "> 0"})

    def to_dict(self) -> dict:
        return asdict(self)
