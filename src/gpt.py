"""GPT-2 with LoRA, written out by hand, and the three heads RLHF puts on it.

References
- GPT-2: Radford et al. 2019, "Language Models are Unsupervised Multitask Learners", sec. 2.3:
  the GPT-1 decoder with LayerNorm moved to the input of each sub-block, a final LayerNorm,
  residual projections initialised with std 0.02/sqrt(2 * n_layer), learned positions,
  tanh-approximated GELU, input and output embeddings tied.
- LoRA: Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models": W x + (alpha/r) B A x
  with B = 0 at init; adapters come from Microsoft's `loralib`.
- KV cache: keys and values of past positions are kept, so each new token costs one position's
  forward instead of the whole prefix (the original minChatGPT recomputed the prefix every token).
- Reward model: Ouyang et al. 2022 (InstructGPT) sec. 3.5 / Ziegler et al. 2019 — a scalar head on
  the hidden state of the final token; the critic is the same head applied at every position.

Conventions: B batch, T new positions, S all key positions (past + new), C = n_embd,
nh heads of size hs = C / nh, V = vocab size. `GPT.forward` returns hidden states, not logits:
the 50257-wide output layer is the most expensive matmul on a small model, so each head asks for
logits only where it needs them (`lm_head`).
Padding: an attention mask (1 = real token) goes with every batch; positions are counted from it,
so a left-padded row gives the same outputs as the same row without padding.
"""
import copy
import json
import math
from contextlib import contextmanager
from dataclasses import replace
from typing import Callable, NamedTuple, Optional, Sequence

import loralib as lora
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from common import UserError
from configs import DECODE_PRECISIONS, EOS_ID, ModelConfig

# -----------------------------------------------------------------------------
# Building blocks


def _linear(config: ModelConfig, n_in: int, n_out: int, target: str) -> nn.Linear:
    """nn.Linear, or loralib's LoRA Linear when `target` is one of the configured LoRA targets.

    merge_weights=False: loralib would otherwise fold the adapters into W on every .eval() and
    out again on .train(), changing W under our feet; merging is explicit here (merge_lora).
    """
    if config.lora_rank and target in config.lora_targets:
        return lora.Linear(n_in, n_out, r=config.lora_rank, lora_alpha=config.lora_alpha,
                           lora_dropout=config.lora_dropout, merge_weights=False)
    return nn.Linear(n_in, n_out)


def _qkv_linear(config: ModelConfig) -> nn.Linear:
    """The fused query/key/value projection, with LoRA on the chosen ones of q, k, v."""
    C = config.n_embd
    enable = [t in config.lora_targets for t in ("q", "k", "v")]
    if config.lora_rank and any(enable):
        return lora.MergedLinear(C, 3 * C, r=config.lora_rank, lora_alpha=config.lora_alpha,
                                 lora_dropout=config.lora_dropout, enable_lora=enable, merge_weights=False)
    return nn.Linear(C, 3 * C)


class KVCache:
    """Keys and values of every layer for positions already processed: (B, nh, S_max, hs) each,
    stored in `dtype` (default: the keys' own); attention runs in that dtype."""

    def __init__(self, n_layer: int, max_len: int, dtype: Optional[torch.dtype] = None):
        self.max_len = max_len
        self.dtype = dtype
        self.k = [None] * n_layer
        self.v = [None] * n_layer
        self.length = 0  # positions filled so far (same for every row: rows are padded alike)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store the new (B, nh, T, hs) keys/values; return all of them so far, (B, nh, S, hs)."""
        B, nh, T, hs = k.shape
        if self.k[layer] is None:
            self.k[layer] = k.new_empty(B, nh, self.max_len, hs, dtype=self.dtype or k.dtype)
            self.v[layer] = v.new_empty(B, nh, self.max_len, hs, dtype=self.dtype or v.dtype)
        end = self.length + T
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, asked for {end}")
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = _qkv_linear(config)
        self.c_proj = _linear(config, config.n_embd, config.n_embd, "attn_out")
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, attn_mask, kv_cache: Optional[KVCache] = None, layer: int = 0):
        B, T, C = x.shape
        nh, hs = self.n_head, C // self.n_head
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)  # (B, nh, S, hs)
            q = q.to(k.dtype)
        # attn_mask is None only for an unpadded batch without past keys: plain causal attention.
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None and T > 1,
            dropout_p=self.dropout if self.training else 0.0,
        )  # (B, nh, T, hs)
        y = y.to(x.dtype).transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.c_fc = _linear(config, config.n_embd, 4 * config.n_embd, "mlp_in")
        self.c_proj = _linear(config, 4 * config.n_embd, config.n_embd, "mlp_out")
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):  # (B, T, C) -> (B, T, C)
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-LayerNorm transformer block (GPT-2 sec. 2.3)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, attn_mask, kv_cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), attn_mask, kv_cache, layer)
        return x + self.mlp(self.ln_2(x))


def attention_mask_4d(attention_mask: Optional[torch.Tensor], T: int, past: int, device) -> Optional[torch.Tensor]:
    """Boolean (B or 1, 1, T, S) mask, True where a query may attend; None = plain causal.

    Queries are the T newest of S = past + T positions. A key is visible if it is not after the
    query and not padding. Every query also sees itself, so a padding query never has an empty
    softmax row (which would produce NaNs); its output is ignored anyway.
    """
    if attention_mask is None and past == 0:
        return None
    S = past + T
    q_pos = torch.arange(past, S, device=device)[:, None]  # (T, 1)
    k_pos = torch.arange(S, device=device)[None, :]  # (1, S)
    allowed = (k_pos <= q_pos)[None, None]  # (1, 1, T, S)
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :].bool()  # (B, 1, T, S)
        allowed = allowed | (k_pos == q_pos)
    return allowed


def position_ids(attention_mask: Optional[torch.Tensor], T: int, past: int, device) -> torch.Tensor:
    """Positions of the T newest tokens: counted over real tokens only, so left padding is free."""
    if attention_mask is None:
        return torch.arange(past, past + T, device=device)[None]  # (1, T)
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]  # (B, T)


@contextmanager
def _decoding_layout(model: nn.Module):
    """Lay every weight matrix out input-major in memory while decoding in fp32 on a CPU.

    Decoding multiplies a handful of rows (one new token per sequence) by each weight; CPU GEMM
    kernels do that faster when an (out, in) weight is stored as (in, out) in memory, the layout
    of transformers' Conv1D (benchmarks/run.py measures the gain, "decoding layout"). Shapes and
    values stay the same, only the strides change, and the original tensors come back after. The price is a
    second copy of the weight matrices while it lasts. Elsewhere (GPU, bf16) it does nothing:
    there the layout makes no such difference.
    """
    first = next(model.parameters())
    if first.device.type != "cpu" or first.dtype != torch.float32 or torch.is_autocast_enabled("cpu"):
        yield
        return
    params = [p for p in model.parameters() if p.dim() == 2]
    saved = [p.data for p in params]
    try:
        for p in params:
            p.data = p.data.t().contiguous().t()  # same (out, in) tensor, stored column by column
        yield
    finally:
        for p, data in zip(params, saved):
            p.data = data


class Int8Linear(nn.Module):
    """y = x (s * W8)^T + b for decoding: int8 weights W8 with one scale s per output row.

    Weight-only quantisation (as in LLM.int8's absmax scheme, Dettmers et al. 2022, per row and
    without outliers kept apart): a decode step reads each weight once, so a quarter of fp32's
    bytes is up to 4x less time where memory is the limit. Activations stay in bf16. On the CPU,
    for up to `fused_max_rows` rows (a decode step), this is torch's fused int8 x bf16 kernel; for
    more rows (a prompt, a large batch), and off the CPU, the weight is widened to bf16 and the
    scale applied to the product, which beats the fused kernel there (on this project's CPU from
    ~32 rows for a block's layers, ~300 for the 50257-row output layer).
    """

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], dtype=torch.bfloat16,
                 fused_max_rows: int = 32):
        super().__init__()
        weight = weight.detach().float()  # (out, in)
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127  # (out,)
        self.register_buffer("weight", torch.round(weight / scale[:, None]).to(torch.int8))
        self.register_buffer("scale", scale.to(dtype))
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype))
        self.fused_max_rows = fused_max_rows

    def forward(self, x):  # (..., in) -> (..., out)
        x2 = x.reshape(-1, x.size(-1)).to(self.scale.dtype)  # (N, in)
        fused = (x2.device.type == "cpu" and x2.size(0) <= self.fused_max_rows
                 and hasattr(torch, "_weight_int8pack_mm"))  # a private op: may go away
        if fused:
            y = torch._weight_int8pack_mm(x2.contiguous(), self.weight, self.scale)  # (N, out)
        else:
            y = F.linear(x2, self.weight.to(x2.dtype)) * self.scale  # (N, out)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], -1)


# -----------------------------------------------------------------------------
# The language model (the policy / actor in RLHF)


class OutputLayer(NamedTuple):
    """logits = h W^T with W (V, C) the token embedding (GPT-2 ties them). A plain object, not a
    module: the weight belongs to `wte`, so state dicts and optimizers see it once."""

    weight: torch.Tensor

    def __call__(self, h):
        return F.linear(h, self.weight)


class Generation(NamedTuple):
    tokens: torch.Tensor  # (B, Tp + Tn) prompt then response ids; pad id after a row finished
    attention_mask: torch.Tensor  # (B, Tp + Tn) 1 on real prompt tokens and response tokens
    response_mask: torch.Tensor  # (B, Tp + Tn) 1 on response tokens, up to and including EOS
    prompt_len: int  # Tp: responses start at this column


class GPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self._init_weights()

    def _init_weights(self):
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                # GPT-2 scales the residual projections by 1/sqrt(number of residual layers).
                std = 0.02 / math.sqrt(2 * self.config.n_layer) if name.endswith("c_proj") else 0.02
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def num_params(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def forward(self, idx, attention_mask=None, kv_cache: Optional[KVCache] = None):
        """Token ids (B, T) -> final hidden states (B, T, C).

        attention_mask (B, S) covers the past positions in kv_cache and the T new ones.
        """
        B, T = idx.shape
        past = kv_cache.length if kv_cache is not None else 0
        if past + T > self.config.block_size:
            raise ValueError(f"sequence of {past + T} tokens is longer than block_size {self.config.block_size}")
        pos = position_ids(attention_mask, T, past, idx.device)  # (B or 1, T)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        mask = attention_mask_4d(attention_mask, T, past, idx.device)
        for i, block in enumerate(self.h):
            if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, mask, use_reentrant=False)
            else:
                x = block(x, mask, kv_cache, i)
        if kv_cache is not None:
            kv_cache.length = past + T
        return self.ln_f(x)  # (B, T, C)

    @property
    def lm_head(self) -> "OutputLayer":
        """The output layer: lm_head(h) maps hidden states (..., C) to logits (..., V) through the
        tied token embedding, and lm_head.weight is that embedding (for the fused losses)."""
        return getattr(self, "int8_head", None) or OutputLayer(self.wte.weight)

    def for_decoding(self, precision: str = "fp32", compile: bool = False) -> "GPT":
        """This model as a sampler with weights in `precision`: itself for fp32, else a frozen copy
        (LoRA merged) in bf16, or with int8 weight-only linear layers and output layer (Int8Linear)
        and bf16 for the rest. A decode step reads every weight once, so fewer bytes per weight
        is faster where the CPU's bf16 kernels are (benchmarks/decode.py measures which wins). The
        copy is for choosing tokens only: log-probs that a loss uses come from the model itself.
        compile=True runs its forward through torch.compile (dynamic=True, so growing cache lengths
        do not each compile anew; benchmarks/gpu.py measures what it buys). A new copy of the same
        shape reuses the code compiled for the first (dynamo guards on shapes, not on which module),
        so PPO can make one per rollout without compiling again (tests/test_ppo.py).
        """
        if precision not in DECODE_PRECISIONS:
            raise UserError(f"decode precision must be one of {', '.join(DECODE_PRECISIONS)}, got {precision!r}")
        sampler = self if precision == "fp32" else self._low_precision_copy(precision)
        if compile:
            sampler = copy.copy(sampler)  # same weights and modules, its own forward
            sampler.forward = torch.compile(sampler.forward, dynamic=True)
        return sampler

    def _low_precision_copy(self, precision: str) -> "GPT":
        with torch.device("meta"):  # no memory and no init for weights that are replaced at once
            low = GPT(replace(self.config, lora_rank=0, dropout=0.0))
        low.load_state_dict(self.merged_state_dict(), assign=True)
        if precision == "int8":
            for block in low.h:
                for parent, name in ((block.attn, "c_attn"), (block.attn, "c_proj"),
                                     (block.mlp, "c_fc"), (block.mlp, "c_proj")):
                    linear = getattr(parent, name)
                    setattr(parent, name, Int8Linear(linear.weight, linear.bias))
            low.int8_head = Int8Linear(low.wte.weight, None, fused_max_rows=256)
        return low.to(torch.bfloat16).eval().requires_grad_(False)

    def logits(self, idx, attention_mask=None):
        """Full logits (B, T, V), as GPT2LMHeadModel returns them."""
        return self.lm_head(self(idx, attention_mask))

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: Optional[torch.Tensor] = None,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        eos_id: Optional[int] = EOS_ID,
        stop_strings: Sequence[str] = (),
        tokenizer=None,
        generator: Optional[torch.Generator] = None,
        use_cache: bool = True,
        on_step: Optional[Callable[[torch.Tensor], None]] = None,
    ) -> Generation:
        """Sample (or, with temperature=0, greedily decode) continuations of left-padded prompts.

        A row stops at its first EOS (kept as the last response token) or when its response text
        contains one of `stop_strings` (needs `tokenizer`; the caller strips the stop string from
        the decoded text). Finished rows get pad ids and mask 0 after that point, and the output
        layer is only run for rows still going. use_cache=False recomputes the whole prefix at every
        step, as the original project did (kept for tests and benchmarks). on_step, if given, is
        called once per decoding step with the (B,) tokens of that step, in order (a row that had
        already finished shows the pad id): a view to read, e.g. to stream text as it is written.
        """
        B, Tp = prompt_ids.shape
        device = prompt_ids.device
        if prompt_mask is None:
            prompt_mask = torch.ones_like(prompt_ids)
        if Tp + max_new_tokens > self.config.block_size:
            raise ValueError(f"prompt of {Tp} tokens + {max_new_tokens} new tokens exceeds block_size "
                             f"{self.config.block_size}")
        if stop_strings and tokenizer is None:
            raise ValueError("stop_strings needs a tokenizer to read the text")
        stop_window = max((len(s.encode()) for s in stop_strings), default=0) + 1  # tokens >= 1 byte
        # A CPU attends one query to an fp32 cache faster than to a bf16 one (int8 sampler, gpt2-small
        # shape, batch 8: 453 -> 484 tokens/s, measured), so there the cache is always fp32.
        cache_dtype = torch.float32 if device.type == "cpu" else None
        cache = KVCache(self.config.n_layer, Tp + max_new_tokens, cache_dtype) if use_cache else None
        new = prompt_ids.new_full((B, max_new_tokens), EOS_ID if eos_id is None else eos_id)  # (B, Tn)
        new_mask = torch.zeros_like(new)  # (B, Tn)
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        mask = prompt_mask
        n = 0
        with _decoding_layout(self):
            h_last = self(prompt_ids, prompt_mask, kv_cache=cache)[:, -1]  # (B, C)
            for t in range(max_new_tokens):
                alive = (~finished).nonzero().squeeze(1)  # rows still generating
                logits = self.lm_head(h_last[alive]).float()  # (b, V)
                nxt = sample_from_logits(logits, temperature, top_k, top_p, generator)  # (b,)
                new[alive, t] = nxt
                new_mask[alive, t] = 1
                n = t + 1
                if on_step is not None:
                    on_step(new[:, t])
                if eos_id is not None:
                    finished[alive] |= nxt == eos_id
                for row in alive.tolist() if stop_strings else ():
                    tail = tokenizer.decode(new[row, max(0, t + 1 - stop_window):t + 1])
                    if any(s in tail for s in stop_strings):
                        finished[row] = True
                if finished.all() or t == max_new_tokens - 1:
                    break
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)  # (B, Tp + t + 1)
                if use_cache:
                    h_last = self(new[:, t:t + 1], mask, kv_cache=cache)[:, -1]
                else:
                    h_last = self(torch.cat([prompt_ids, new[:, :t + 1]], 1), mask)[:, -1]
        response_mask = torch.cat([torch.zeros_like(prompt_mask), new_mask[:, :n]], dim=1)
        return Generation(
            tokens=torch.cat([prompt_ids, new[:, :n]], dim=1),
            attention_mask=torch.cat([prompt_mask, new_mask[:, :n]], dim=1),
            response_mask=response_mask,
            prompt_len=Tp,
        )

    # --- weights in and out (Hugging Face GPT2LMHeadModel layout) ---

    @classmethod
    def from_pretrained(cls, name_or_dir: str, config: Optional[ModelConfig] = None) -> "GPT":
        """Load GPT-2 weights from a hub name or a directory written by transformers.

        `config` (optional) must have the checkpoint's shape; its LoRA and dropout settings are
        kept. Without it the shape is read from the checkpoint.
        """
        hf = load_hf_gpt2(name_or_dir)
        hc = hf.config
        shape = dict(n_layer=hc.n_layer, n_head=hc.n_head, n_embd=hc.n_embd, block_size=hc.n_positions,
                     vocab_size=hc.vocab_size)
        if config is None:
            config = ModelConfig(**shape, layer_norm_eps=hc.layer_norm_epsilon, pretrained=name_or_dir)
        mismatch = {k: (getattr(config, k), v) for k, v in shape.items() if getattr(config, k) != v}
        if mismatch:
            diff = ", ".join(f"{k} {want} (preset) vs {got} (checkpoint)" for k, (want, got) in mismatch.items())
            raise UserError(f"weights in {name_or_dir} do not fit the preset: {diff}")
        model = cls(config)
        model.load_hf_state_dict(hf.state_dict(), source=name_or_dir)
        return model

    def load_hf_state_dict(self, hf_sd: dict, source: str = "checkpoint"):
        ours = {}
        for name, tensor in hf_sd.items():
            if name == "lm_head.weight" or name.endswith((".attn.bias", ".attn.masked_bias")):
                continue  # tied to wte / causal-mask buffers of old transformers versions
            key = name.removeprefix("transformer.")
            ours[key] = tensor.t() if key.endswith(_HF_TRANSPOSED) else tensor
        missing, unexpected = self.load_state_dict(ours, strict=False)
        missing = [k for k in missing if "lora_" not in k]  # adapters start at B = 0
        if missing or unexpected:
            raise UserError(f"{source} does not fit this GPT-2: missing {missing[:4]}, unexpected {unexpected[:4]}")

    def merged_state_dict(self) -> dict:
        """Plain GPT-2 weights with every LoRA update folded in (W + alpha/r * B A); W untouched."""
        sd = {k: v for k, v in self.state_dict().items() if "lora_" not in k}
        for name, m in self.named_modules():
            if isinstance(m, lora.LoRALayer) and m.r > 0 and not m.merged:
                delta = m.merge_AB() if isinstance(m, lora.MergedLinear) else m.lora_B @ m.lora_A
                sd[f"{name}.weight"] = m.weight.detach() + delta.detach() * m.scaling
        return sd

    def export_hf(self, out_dir: str):
        """Write a directory that transformers.GPT2LMHeadModel.from_pretrained loads (LoRA merged),
        together with the GPT-2 tokenizer files."""
        from transformers import GPT2Config, GPT2LMHeadModel

        c = self.config
        hf = GPT2LMHeadModel(GPT2Config(
            vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
            n_head=c.n_head, layer_norm_epsilon=c.layer_norm_eps, activation_function="gelu_new",
            resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=c.dropout,
            bos_token_id=EOS_ID, eos_token_id=EOS_ID, tie_word_embeddings=True,
        ))
        hf_sd = {}
        for key, tensor in self.merged_state_dict().items():
            hf_sd["transformer." + key] = (tensor.t() if key.endswith(_HF_TRANSPOSED) else tensor).contiguous()
        hf_sd["lm_head.weight"] = hf_sd["transformer.wte.weight"]
        hf.load_state_dict(hf_sd, strict=True)
        hf.save_pretrained(out_dir)
        hf_tokenizer().save_pretrained(out_dir)


# transformers stores these as Conv1D weights, (in, out); ours are nn.Linear, (out, in).
_HF_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def load_hf_gpt2(name_or_dir: str):
    """transformers' GPT2LMHeadModel from a hub name or local dir, with a one-line error on failure."""
    import os

    from transformers import GPT2LMHeadModel
    try:
        return GPT2LMHeadModel.from_pretrained(name_or_dir, dtype=torch.float32)
    except (OSError, ValueError) as e:
        hint = ("" if os.path.isdir(name_or_dir) else
                "; the Hugging Face hub may be unreachable: pass a local directory written by save_pretrained")
        raise UserError(f"cannot load GPT-2 weights from {name_or_dir!r}: {str(e).splitlines()[0]}{hint}") from None


def hf_tokenizer():
    """transformers' GPT2TokenizerFast from the same offline BPE files our tokenizer uses."""
    from transformers import GPT2TokenizerFast

    from tokenizer import gpt2_bpe_files
    vocab_bpe, encoder_json = gpt2_bpe_files()
    with open(encoder_json) as f:
        vocab = json.load(f)
    with open(vocab_bpe, encoding="utf-8") as f:
        merges = [tuple(line.split()) for line in f.read().split("\n")[1:] if line]
    tok = GPT2TokenizerFast(vocab=vocab, merges=merges)
    assert len(tok) == 50257, f"reference tokenizer has {len(tok)} entries, not 50257"
    return tok


def sample_from_logits(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Next token per row from logits (b, V): argmax when temperature == 0, else a sample from
    softmax(logits / temperature), optionally restricted to the top-k / nucleus top-p tokens.

    Sampling inverts the CDF with one uniform number per row (searchsorted on the cumulative sum),
    which is the same distribution as torch.multinomial and much cheaper over 50257 tokens. The
    CDF is left unnormalised (the uniform number is scaled to its total instead), saving a pass.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    if temperature != 1.0:
        logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (b, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # mass before this token already >= p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    cdf = (logits - logits.amax(dim=-1, keepdim=True)).exp_().cumsum_(dim=-1)  # (b, V), unnormalised
    u = torch.rand(cdf.size(0), 1, device=cdf.device, generator=generator) * cdf[:, -1:]  # (b, 1)
    return torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.size(-1) - 1).squeeze(1)


# -----------------------------------------------------------------------------
# Scalar heads: reward model and critic


class ValueModel(nn.Module):
    """GPT-2 backbone + linear head giving one scalar per position: the PPO critic's V(s_t)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.backbone = GPT(config)
        self.head = nn.Linear(config.n_embd, 1)
        # Small init so initial scores are near 0 whatever the backbone (Stiennon et al. 2020).
        nn.init.normal_(self.head.weight, std=1 / math.sqrt(config.n_embd + 1))
        nn.init.zeros_(self.head.bias)

    def forward(self, idx, attention_mask=None):
        """(B, T) ids -> (B, T) values."""
        return self.head(self.backbone(idx, attention_mask)).squeeze(-1).float()


class RewardModel(ValueModel):
    """The reward model: the head read at the last real token of each sequence (its EOS), or, with
    config.score_mean_with_padding, the original project's score: the head's mean over every position
    of the padded batch, padding included (so a sequence's score depends on its batch's padding)."""

    def score(self, idx, attention_mask):
        """(B, T) ids with left or right padding -> (B,) rewards."""
        return self.readout(self(idx, attention_mask), attention_mask)

    def readout(self, values, attention_mask):
        """The per-position head values (B, T) -> the (B,) scores (training and scoring both read them here)."""
        if self.config.score_mean_with_padding:
            return values.mean(dim=1)
        return gather_last(values, attention_mask)


def gather_last(values, attention_mask):
    """values (B, T) read at the last real token of each row (left or right padding): (B,)."""
    cols = torch.arange(attention_mask.size(1), device=attention_mask.device)
    last = (attention_mask.long() * (cols + 1)).argmax(dim=-1)  # (B,) column of the last 1
    return values[torch.arange(values.size(0), device=values.device), last]


# -----------------------------------------------------------------------------
# LoRA helpers


def mark_only_lora_trainable(model: nn.Module, also: Sequence[str] = ()):
    """Freeze everything but the LoRA adapters and the parameters whose name starts with a prefix
    in `also` (e.g. ('head',) keeps a reward model's head trainable, as it must be)."""
    lora.mark_only_lora_as_trainable(model)
    for name, p in model.named_parameters():
        if any(name.startswith(prefix) for prefix in also):
            p.requires_grad = True


def _lora_layers(model):
    return [m for m in model.modules() if isinstance(m, lora.LoRALayer) and m.r > 0]


def merge_lora(model: nn.Module):
    """Fold B A into W in place (faster inference; training the adapters needs unmerge_lora)."""
    for m in _lora_layers(model):
        mode = m.training
        m.merge_weights = True
        m.train(False)  # loralib merges on the switch to eval mode
        m.merge_weights = False
        nn.Module.train(m, mode)


def unmerge_lora(model: nn.Module):
    """Undo merge_lora (W - B A: equal to the original W up to rounding)."""
    for m in _lora_layers(model):
        mode = m.training
        m.merge_weights = True
        m.train(True)  # loralib un-merges on the switch to train mode
        m.merge_weights = False
        nn.Module.train(m, mode)


@contextmanager
def lora_disabled(model: nn.Module):
    """Run the frozen base weights only: the PPO reference policy is the actor minus its adapters,
    so no second copy of the model is needed. loralib skips the adapter branch of a layer marked
    merged; we set that flag for the duration (adapters must not really be merged)."""
    layers = _lora_layers(model)
    if any(m.merged for m in layers):
        raise RuntimeError("lora_disabled needs un-merged adapters")
    for m in layers:
        m.merged = True
    try:
        yield model
    finally:
        for m in layers:
            m.merged = False
