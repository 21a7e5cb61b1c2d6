"""Memory plan: will a stage fit a card, before a minute of it runs?

Prints, for a preset, stage, batch, sequence length, precision, LoRA rank and activation
checkpointing, the bytes of parameters, gradients, optimizer state, activations, KV cache and the
output layer's buffers, their peak sum, whether that fits --gpu-mem, and if not, the largest
micro-batch (with gradient accumulation for the same global batch) that does.

Examples:
  # the README's SFT command on a 16 GB T4 (fp16 there: compute capability 7.5)
  python src/memory.py gpt2-medium sft -b 8 --seq-len 1024 --precision fp16 --gpu-mem 16GB

  # PPO with LoRA actor and critic, 32 prompts per rollout, 128 new tokens
  python src/memory.py gpt2-medium/lora ppo -b 32 --minibatch-size 8 --seq-len 384 --max-new-tokens 128 \\
      --precision fp16 --gpu-mem 16GB

How it counts (every model keeps fp32 weights; autocast computes in bf16/fp16):
- weights 4 bytes per parameter of every model the stage holds (PPO: actor, critic, reward model, and
  a frozen reference unless the actor is LoRA); gradients 4 and AdamW's two moments 8 bytes per
  trainable parameter; under autocast, a low-precision copy (2 bytes) of every projection matrix of the
  model being trained, kept for backward (cached for trainable weights, saved per use for frozen ones).
- activations: what one block keeps for backward, per token: its input, the two LayerNorm outputs,
  q, k, v, the attention output (twice: SDPA's and its contiguous copy), the MLP's 4C pre- and
  post-GELU: 68 C bytes in fp32, 38 C under autocast (the residual stream and LayerNorms stay fp32).
  Fused attention keeps no T x T matrix (SDPA flash / memory-efficient kernels). With activation
  checkpointing each block keeps only its fp32 input, and one block's activations are rebuilt at a time.
- output layer: the fused cross-entropy (loss.linear_cross_entropy) makes its gradients in the forward
  pass: a (V, C) fp32 weight gradient when the embedding trains, the (N, C) hidden gradient, and one
  (rows, V) fp32 chunk of logits (two for log-probs, which rebuild a chunk and its gradient in backward).
- KV cache (PPO rollouts): keys and values of every layer for the whole rollout batch and sequence.
- On a GPU, the CUDA context and allocator slack are not in torch's count: --reserve (default 1 GiB)
  is kept free.
--measure runs 2 steps of the stage on this CPU (random weights and tokens, same shapes) and prints
the peak it added: the estimate is checked against it in tests/test_memory.py (within 20%).
"""
import argparse
import os
import re
import sys
from dataclasses import dataclass, replace
from typing import Dict, Optional

import torch

from common import UserError, run_cli
from configs import get_preset

STAGES = ("sft", "rm", "dpo", "ppo")
GiB = 1024 ** 3


@dataclass
class Shape:
    """What decides memory: the model shape and how a step uses it."""

    preset: str
    stage: str  # sft | rm | dpo | ppo
    batch_size: int  # sequences (sft), pairs (rm, dpo) or rollout sequences (ppo) per step
    seq_len: int  # longest sequence; for ppo prompt + new tokens
    precision: str = "fp32"  # fp32 | bf16 | fp16
    lora_rank: Optional[int] = None  # None = the preset's
    checkpointing: bool = False  # activation (gradient) checkpointing
    minibatch_size: Optional[int] = None  # ppo: sequences per update minibatch (default min(8, batch))
    max_new_tokens: int = 128  # ppo: response budget (part of seq_len)

    @property
    def update_minibatch(self) -> int:
        """ppo: sequences per update minibatch, as PPOConfig would get it."""
        return self.minibatch_size or min(8, self.batch_size)


def parameter_counts(cfg, kind: str = "lm") -> Dict[str, int]:
    """Exact counts of a model built on the meta device (no memory): total, trainable (LoRA:
    adapters, plus a value/reward head), and the projection matrices (what autocast copies)."""
    from gpt import GPT, RewardModel, ValueModel, mark_only_lora_trainable
    with torch.device("meta"):
        model = {"lm": GPT, "value": ValueModel, "rm": RewardModel}[kind](cfg)
    if cfg.lora_rank:
        mark_only_lora_trainable(model, also=("head",) if kind != "lm" else ())
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    matrices = [p for name, p in model.named_parameters() if p.dim() == 2 and not name.endswith(("wte.weight", "wpe.weight"))]
    return {"total": sum(p.numel() for p in params), "trainable": sum(p.numel() for p in trainable),
            "matrices": sum(p.numel() for p in matrices)}


def activation_bytes(cfg, tokens: int, half: bool, checkpointing: bool) -> int:
    """Bytes kept for backward by a forward over `tokens` tokens (see the module docstring)."""
    C, L = cfg.n_embd, cfg.n_layer
    per_layer = (38 if half else 68) * C  # bytes per token
    if checkpointing:
        blocks = L * 4 * C + per_layer  # every block's fp32 input, one block rebuilt
    else:
        blocks = L * per_layer
    final = 4 * C + 4 * C  # ln_f's input and output (fp32)
    lora = 0
    if cfg.lora_rank:  # x A^T of each adapted projection, rank r, fp32 or half
        lora = len(cfg.lora_targets) * L * cfg.lora_rank * (2 if half else 4)
    return tokens * (blocks + final + lora)


def plan(shape: Shape) -> Dict[str, int]:
    """Bytes per component at the step's peak, and their sum ('total')."""
    if shape.stage not in STAGES:
        raise UserError(f"unknown stage {shape.stage!r} (use {', '.join(STAGES)})")
    cfg = get_preset(shape.preset, lora_rank=shape.lora_rank)
    half = shape.precision in ("bf16", "fp16")
    C, V, L = cfg.n_embd, cfg.vocab_size, cfg.n_layer
    B, T = shape.batch_size, shape.seq_len
    if T > cfg.block_size:
        raise UserError(f"--seq-len {T} is longer than {shape.preset}'s block size {cfg.block_size}")
    lm = parameter_counts(cfg, "lm")

    # Which models the stage holds, which of them train, and how many sequences one forward sees.
    if shape.stage == "ppo":
        critic = parameter_counts(cfg, "value")
        rm = parameter_counts(replace(cfg, lora_rank=0), "rm")  # the frozen reward model (RM run, merged)
        held = lm["total"] + critic["total"] + rm["total"] + (0 if cfg.lora_rank else lm["total"])
        trained = [lm, critic]
        forward_seqs = shape.update_minibatch  # one minibatch forward with gradients at a time (actor, then critic)
    else:
        model = parameter_counts(cfg, "rm" if shape.stage == "rm" else "lm")
        held = model["total"] + (lm["total"] if shape.stage == "dpo" and not cfg.lora_rank else 0)  # DPO's reference
        trained = [model]
        forward_seqs = B * (2 if shape.stage in ("rm", "dpo") else 1)  # chosen and rejected in one forward
    trainable = sum(m["trainable"] for m in trained)
    out = {
        "weights": 4 * held,
        "gradients": 4 * trainable,
        "optimizer": 8 * trainable,
        "autocast copies": 2 * max(m["matrices"] for m in trained) if half else 0,
    }
    tokens = forward_seqs * T
    out["activations"] = activation_bytes(cfg, tokens, half, shape.checkpointing)
    # The output layer (sft, dpo: cross-entropy / log-probs of every position; ppo: of the response).
    if shape.stage == "rm":
        out["output layer"] = 0
    else:
        embedding_trains = not cfg.lora_rank
        rows = 1024 if half else 128  # loss._chunk_rows
        n = tokens if shape.stage != "ppo" else forward_seqs * shape.max_new_tokens
        chunks = 1 if shape.stage == "sft" else 2  # log-probs (dpo, ppo) rebuild a chunk and its gradient in backward
        out["output layer"] = (4 * V * C if embedding_trains else 0) + 4 * n * C + chunks * 4 * min(rows, n) * V \
            + (2 * V * C if half else 0)  # the low-precision copy of the embedding for the matmuls
    if shape.stage == "ppo":  # rollouts: every sequence's keys and values, last-position logits
        kv = 2 * L * B * T * C * (2 if half else 4)
        out["kv cache"] = kv + 4 * B * V
        # Rollout and update are not at the same time: the peak counts the larger of the two.
        smaller = min(out["kv cache"], out["activations"] + out["output layer"])
        out["total"] = sum(out.values()) - smaller
    else:
        out["total"] = sum(out.values())
    return out


def parse_size(text: str) -> int:
    """'16GB', '16G', '16GiB' or '15.5' (GiB) -> bytes; card makers' GB are taken as GiB, as nvidia-smi shows."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(g|gb|gib|m|mb|mib)?\s*", text.lower())
    if not m:
        raise UserError(f"--gpu-mem {text!r} is not a size like 16GB or 40GiB")
    value, unit = float(m.group(1)), (m.group(2) or "g")
    return int(value * (GiB if unit.startswith("g") else 1024 ** 2))


def largest_fitting_batch(shape: Shape, budget: int) -> Optional[int]:
    """The largest micro-batch whose plan fits `budget` bytes (None: not even 1): a divisor of -b for
    sft, rm and dpo (gradient accumulation then keeps the global batch), the update minibatch for ppo
    (the rollout batch stays)."""
    if shape.stage == "ppo":
        trials = {b: replace(shape, minibatch_size=b) for b in range(1, (shape.minibatch_size or 8) + 1)}
    else:
        trials = {b: replace(shape, batch_size=b) for b in range(1, shape.batch_size + 1) if shape.batch_size % b == 0}
    fitting = [b for b, trial in trials.items() if plan(trial)["total"] <= budget]
    return max(fitting) if fitting else None


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    """This process's peak resident memory (VmHWM). Not getrusage's ru_maxrss: Linux carries that
    over from the process that forked and exec'd us (a 3 GiB pytest run made every peak 3 GiB)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def measure_cpu(shape: Shape, steps: int = 2) -> int:
    """Run `steps` training steps of the stage on the CPU with random tokens of exactly seq_len and
    return the peak resident memory it added (bytes): the check of `plan` on a machine without a
    GPU. Call in a fresh process (the peak only grows). bf16 only: fp16 is not run on CPUs."""
    import tempfile

    from configs import PPOConfig, TrainConfig
    from dataset import collate_preference, collate_prompts, collate_sft
    from gpt import GPT, RewardModel, ValueModel, mark_only_lora_trainable
    from trainers import DPOStage, PPOStage, RMStage, SFTStage, Trainer
    if shape.precision == "fp16":
        raise UserError("--measure runs on the CPU: use --precision fp32 or bf16")
    torch.manual_seed(0)
    cfg = get_preset(shape.preset, lora_rank=shape.lora_rank, pretrained=None)
    cfg = replace(cfg, gradient_checkpointing=shape.checkpointing, dropout=0.0)
    B, T, V = shape.batch_size, shape.seq_len, cfg.vocab_size
    seq = lambda n: torch.randint(0, V - 1, (n,))  # noqa: E731
    base = _rss()
    if shape.stage == "ppo":
        prompt_len = T - shape.max_new_tokens
        items = [{"prompt_ids": seq(prompt_len), "prompt": ""} for _ in range(B)]
        collate = collate_prompts
    elif shape.stage == "sft":
        items = [{"input_ids": seq(T), "loss_mask": torch.ones(T, dtype=torch.long)} for _ in range(B)]
        collate = collate_sft
    else:
        items = [{"chosen_ids": seq(T), "rejected_ids": seq(T)} for _ in range(B)]
        collate = collate_preference
    lora = bool(cfg.lora_rank)
    if shape.stage == "rm":
        model = RewardModel(cfg)
        if lora:
            mark_only_lora_trainable(model, also=("head",))
        stage = RMStage(model)
    elif shape.stage == "ppo":
        actor, critic = GPT(cfg), ValueModel(cfg)
        if lora:
            mark_only_lora_trainable(actor)
            mark_only_lora_trainable(critic, also=("head",))
        rm = RewardModel(replace(cfg, lora_rank=0))
        ppo = PPOConfig(rollout_batch_size=B, minibatch_size=shape.update_minibatch, ppo_epochs=1,
                        max_new_tokens=shape.max_new_tokens)  # random weights: EOS is rare, answers run full length
        stage = PPOStage(actor, critic, ppo, reward_model=rm, ref=None if lora else GPT(cfg))
    else:
        model = GPT(cfg)
        if lora:
            mark_only_lora_trainable(model)
        from configs import DPOConfig
        stage = SFTStage(model) if shape.stage == "sft" else DPOStage(model, DPOConfig(), None if lora else GPT(cfg))
    train = TrainConfig(batch_size=B, max_steps=steps, warmup_steps=0, eval_every=0, save_every=0, log_every=steps,
                        device="cpu", precision=shape.precision)
    with tempfile.TemporaryDirectory() as run_dir:
        Trainer(stage, train, run_dir, items, collate).fit()
    return _peak_rss() - base


def report(shape: Shape, gpu_mem: Optional[int], reserve: int) -> str:
    p = plan(shape)
    lines = [f"{shape.preset} {shape.stage}: batch {shape.batch_size} x {shape.seq_len} tokens, {shape.precision}, "
             f"LoRA rank {get_preset(shape.preset, lora_rank=shape.lora_rank).lora_rank}, "
             f"activation checkpointing {'on' if shape.checkpointing else 'off'}"
             + (f", PPO minibatch {shape.update_minibatch}" if shape.stage == "ppo" else "")]
    rollout_peak = shape.stage == "ppo" and p["kv cache"] > p["activations"] + p["output layer"]
    for k, v in p.items():
        if k != "total":
            note = ""
            if shape.stage == "ppo":  # the two phases: only the larger one counts in the peak
                in_rollout = k == "kv cache"
                note = (" (rollout)" if in_rollout else " (update)") if k in ("kv cache", "activations", "output layer") else ""
                note += "" if not note or in_rollout == rollout_peak else ", not at the peak"
            lines.append(f"  {k:<16} {v / GiB:8.2f} GiB{note}")
    lines.append(f"  {'peak':<16} {p['total'] / GiB:8.2f} GiB")
    if gpu_mem is not None:
        budget = gpu_mem - reserve
        if p["total"] <= budget:
            lines.append(f"fits {gpu_mem / GiB:.0f} GiB ({(budget - p['total']) / GiB:.1f} GiB to spare after "
                         f"{reserve / GiB:.1f} GiB for the CUDA context)")
        else:
            lines.append(f"does NOT fit {gpu_mem / GiB:.0f} GiB ({reserve / GiB:.1f} GiB kept for the CUDA context)")
            b = largest_fitting_batch(shape, budget)
            if b is None:
                lines.append("  not even a batch of 1 fits: try --grad-checkpointing, a LoRA preset, or a shorter --seq-len")
            elif shape.stage == "ppo":
                lines.append(f"  suggestion: --minibatch-size {b} (divisor of the rollout batch; smaller fits too)")
            else:
                lines.append(f"  suggestion: -b {b} --grad-accum {shape.batch_size // b} (the same global batch)")
    return "\n".join(lines)


def main(argv=None):
    doc = __doc__.split("\n\n", 1)
    ap = argparse.ArgumentParser(description=doc[0], epilog=doc[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("preset", help="model preset, e.g. gpt2-medium or gpt2-medium/lora")
    ap.add_argument("stage", choices=STAGES)
    ap.add_argument("-b", "--batch-size", type=int, default=8, help="sequences / pairs / rollout sequences per step")
    ap.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence (ppo: prompt + new tokens)")
    ap.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="bf16")
    ap.add_argument("--lora-rank", type=int, default=None, help="override the preset's LoRA rank")
    ap.add_argument("--grad-checkpointing", action="store_true", help="activation checkpointing")
    ap.add_argument("--minibatch-size", type=int, default=None, help="ppo: sequences per update minibatch")
    ap.add_argument("--max-new-tokens", type=int, default=128, help="ppo: response budget")
    ap.add_argument("--gpu-mem", default=None, help="card memory, e.g. 16GB (T4), 40GB, 80GB")
    ap.add_argument("--reserve", type=float, default=1.0, help="GiB kept free for the CUDA context (default 1)")
    ap.add_argument("--measure", action="store_true",
                    help="also run 2 steps on the CPU (random weights and tokens) and print the measured peak")
    args = ap.parse_args(argv)
    for name in ("batch_size", "seq_len", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.minibatch_size is not None and not 1 <= args.minibatch_size <= args.batch_size:
        raise UserError(f"--minibatch-size must be in [1, -b], got {args.minibatch_size}")
    shape = Shape(args.preset, args.stage, args.batch_size, args.seq_len, args.precision, args.lora_rank,
                  args.grad_checkpointing, args.minibatch_size, args.max_new_tokens)
    gpu_mem = parse_size(args.gpu_mem) if args.gpu_mem else None
    if args.measure and os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        # glibc keeps freed blocks below its (self-raising) mmap threshold in its heap, so resident
        # memory would still count tensors torch has freed; a fixed threshold returns every large
        # tensor to the system when freed, and the resident peak follows torch's live tensors, as a
        # GPU allocator's max_memory_allocated does. It is read at process start: run again with it.
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *(argv or sys.argv[1:])], env)
    print(report(shape, gpu_mem, int(args.reserve * GiB)), flush=True)
    if args.measure:
        measured, estimate = measure_cpu(shape), plan(shape)["total"]
        print(f"measured on this CPU: {measured / GiB:.3f} GiB peak added by {shape.stage} steps; "
              f"estimate / measured = {estimate / measured:.2f}")


if __name__ == "__main__":
    run_cli(main)
