"""PPO for language models, top to bottom: rollout, rewards, advantages, update.

The algorithm of Ziegler et al. 2019 ("Fine-Tuning Language Models from Human Preferences") as used
by Stiennon et al. 2020 and InstructGPT (Ouyang et al. 2022), with the implementation details that
Huang et al. 2023/2024 ("The N+ implementation details of RLHF with PPO") found to matter:

1. `collect_rollout`: the policy answers a batch of prompts; the reward model scores each answer
   (normalised, with a penalty for an answer that never ends); the policy, the frozen reference
   policy and the critic score every response token; each token is rewarded -beta * KL to the
   reference, and the last one also gets the score; GAE turns rewards and values into advantages
   (`advantages`: or RLOO's leave-one-out baseline, without a critic, or the original project's
   reward - V(prompt)).
2. `ppo_update`: a few epochs over the rollout in shuffled minibatches, each one actor step on the
   clipped policy loss and one critic step on the clipped value loss (`update_schedule`).
3. `rollout_stats` summarises the rollout; `AdaptiveKL` adapts beta, `ScoreNormalizer` holds the
   score scale: the two pieces of state a resumed run must get back.

Everything takes the models and callables it needs as arguments. The Trainer (trainers.PPOStage)
supplies devices, precision, data-parallel processes, optimizers, logging and checkpoints.
Shapes: B rollout sequences, Tp prompt tokens (left padded), Tn response tokens.
"""
import time
from contextlib import nullcontext
from typing import Callable, Dict, List, NamedTuple, Optional

import torch
import torch.nn as nn

from configs import EOS_ID, PPOConfig
from gpt import Generation, lora_disabled
from loss import (
    explained_variance,
    gae,
    kl_estimates,
    logprobs_from_hidden,
    masked_mean,
    masked_sum,
    masked_whiten,
    policy_loss,
    rloo_advantages,
    shaped_rewards,
    value_loss,
)

ScoreFn = Callable[[Generation, List[str]], torch.Tensor]  # (generation, prompts) -> raw scores (B,)


def _unwrap(module: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (torch.compile's wrapper forwards attributes)."""
    return getattr(module, "module", module)


class PPOModels:
    """The networks PPO runs and the forward passes it needs of them.

    actor: the policy (a GPT), trained; critic: a ValueModel giving V(s_t) per position, trained (None
    for RLOO, which has none); ref: the frozen reference policy (the SFT model), or None when the actor
    is LoRA: the reference is then the actor with its adapters switched off, so no second copy is held.
    actor and critic may be wrapped for data parallelism. Every forward runs under `autocast()`, and
    every log-prob divides the logits by the sampling temperature, so old, new and reference log-probs
    are of the policy sampled from. `top_k` (PPOConfig.rollout_top_k) reproduces the original's
    mismatch: samples from the top-k tokens, log-probs of the full softmax. `decode_precision` and
    `decode_compile` (PPOConfig) sample from a bf16 / int8 and / or compiled copy of the actor, made
    afresh for every call; the log-probs are the actor's own whatever it is.
    """

    def __init__(self, actor: nn.Module, critic: Optional[nn.Module], ref: Optional[nn.Module] = None,
                 temperature: float = 1.0, autocast: Callable = nullcontext, top_k: Optional[int] = None,
                 decode_precision: str = "fp32", decode_compile: bool = False):
        self.actor, self.critic, self.ref = actor, critic, ref
        self.temperature, self.autocast, self.top_k = temperature, autocast, top_k
        self.decode_precision, self.decode_compile = decode_precision, decode_compile

    def sampler(self) -> nn.Module:
        """What draws the tokens: the actor itself, or its bf16 / int8 / compiled copy."""
        return _unwrap(self.actor).for_decoding(self.decode_precision, self.decode_compile)

    def generate(self, prompt_ids, prompt_mask, max_new_tokens: int, generator=None) -> Generation:
        """Sample from the plain softmax at the temperature (no top-k / top-p: the log-probs PPO
        uses are of that distribution), unless `top_k` asks for the original's mismatch."""
        sampler = self.sampler()
        with self.autocast():
            return sampler.generate(prompt_ids, prompt_mask, max_new_tokens=max_new_tokens,
                                    temperature=self.temperature, top_k=self.top_k, eos_id=EOS_ID,
                                    generator=generator)

    def logprobs(self, tokens, attention_mask, prompt_len: int, with_entropy: bool = False, policy=None):
        """log pi(a_t | s_t) of the response tokens tokens[:, Tp:] under `policy` (default the actor):
        (b, Tn), and their entropies if asked."""
        policy = self.actor if policy is None else policy
        with self.autocast():
            h = policy(tokens, attention_mask)[:, prompt_len - 1:-1]  # (b, Tn, C): position t-1 predicts t
            return logprobs_from_hidden(_unwrap(policy).lm_head.weight, h, tokens[:, prompt_len:],
                                        self.temperature, with_entropy)

    def ref_logprobs(self, tokens, attention_mask, prompt_len: int):
        """log pi_ref(a_t | s_t) of the response tokens: (b, Tn)."""
        if self.ref is not None:
            return self.logprobs(tokens, attention_mask, prompt_len, policy=self.ref)[0]
        with lora_disabled(_unwrap(self.actor)):
            return self.logprobs(tokens, attention_mask, prompt_len)[0]

    def values(self, tokens, attention_mask, prompt_len: int):
        """V(s_t) for each response token t, read at the position before it: (b, Tn)."""
        with self.autocast():
            return self.critic(tokens, attention_mask)[:, prompt_len - 1:-1].float()


# -----------------------------------------------------------------------------
# Rewards


class ScoreNormalizer:
    """Gain and bias that give the SFT policy's finished answers scores of mean 0 and std 1.

    Fitted once, on the first rollout (the SFT policy's own samples), never on evaluation samples,
    then fixed: a reward scale that drifts with the policy would change the KL trade-off mid-run
    (Ziegler et al. 2019, sec. 2.2). Disabled, it is the identity. It also keeps the lowest
    normalised score of those samples (`floor`), below which an answer without EOS is put."""

    def __init__(self, enabled: bool = True):
        self.gain, self.bias, self.fitted = 1.0, 0.0, not enabled
        self.floor: Optional[float] = None

    def fit(self, samples: torch.Tensor):
        if samples.numel() >= 2:
            std = samples.std().clamp(min=1e-6).item()
            self.gain, self.bias = 1.0 / std, -samples.mean().item() / std
        if samples.numel():
            self.floor = self(samples).min().item()
        self.fitted = True

    def __call__(self, raw: torch.Tensor) -> torch.Tensor:
        return raw * self.gain + self.bias

    def state_dict(self) -> dict:
        return {"score_gain": self.gain, "score_bias": self.bias, "norm_fitted": self.fitted,
                "score_floor": self.floor}

    def load_state_dict(self, state: dict):
        self.gain, self.bias, self.fitted = state["score_gain"], state["score_bias"], state["norm_fitted"]
        self.floor = state.get("score_floor")


class AdaptiveKL:
    """beta, the weight of the per-token KL penalty: fixed, or (with a target) moved towards the
    KL per sequence that the target names, by a proportional controller whose error is clipped to
    +-0.2 and whose step scales with samples seen / horizon (Ziegler et al. 2019, sec. 2.2)."""

    def __init__(self, value: float, target: Optional[float] = None, horizon: int = 10000):
        self.value, self.target, self.horizon = value, target, horizon

    def update(self, kl: float, n_samples: int):
        if self.target is None:
            return
        error = max(-0.2, min(0.2, (kl - self.target) / self.target))
        self.value *= 1 + error * n_samples / self.horizon

    def state_dict(self) -> dict:
        return {"kl_coef": self.value}

    def load_state_dict(self, state: dict):
        self.value = state["kl_coef"]


def ended_with_eos(gen: Generation) -> torch.Tensor:
    """(B,) True where the response contains the EOS token (it stopped by itself)."""
    Tp = gen.prompt_len
    return ((gen.tokens[:, Tp:] == EOS_ID) & gen.response_mask[:, Tp:].bool()).any(dim=1)


def final_scores(raw: torch.Tensor, ended: torch.Tensor, normalizer: ScoreNormalizer, cfg: PPOConfig):
    """What each answer is rewarded at its end: the normalised score, optionally clipped; an answer
    that never emitted EOS gets missing_eos_penalty less than the lowest score of any finished
    answer (of this batch and of the normaliser's samples), so running out of budget never pays
    more than ending, however much the RM dislikes an ending (Huang et al. 2024 penalise a missing
    EOS; a fixed value can sit above the worst finished answers). raw, ended: (B,) -> (B,)."""
    scores = normalizer(raw)
    if cfg.reward_clip is not None:
        scores = scores.clamp(-cfg.reward_clip, cfg.reward_clip)
    if cfg.missing_eos_penalty is not None:
        finished = [scores[ended].min().item()] if ended.any() else []
        floor = min(finished + ([normalizer.floor] if normalizer.floor is not None else []), default=0.0)
        scores = torch.where(ended, scores, torch.full_like(scores, floor - cfg.missing_eos_penalty))
    return scores


# -----------------------------------------------------------------------------
# 1. Rollout


class Rollout(NamedTuple):
    """One batch of sampled responses and everything PPO computes from them before updating."""

    tokens: torch.Tensor  # (B, Tp + Tn) prompt then response ids; pad ids after a row's EOS
    attention_mask: torch.Tensor  # (B, Tp + Tn) 1 on real prompt and response tokens
    prompt_len: int  # Tp: responses start at this column
    response_mask: torch.Tensor  # (B, Tn) float, 1 on response tokens up to and including EOS
    ended: torch.Tensor  # (B,) bool, the response emitted EOS
    raw_scores: torch.Tensor  # (B,) the reward model's scores as it gives them
    scores: torch.Tensor  # (B,) normalised, clipped and EOS-penalised: what the last token is rewarded
    old_logprobs: torch.Tensor  # (B, Tn) log pi_old(a_t | s_t) of the policy that sampled
    ref_logprobs: torch.Tensor  # (B, Tn) log pi_ref(a_t | s_t) of the reference policy
    old_values: torch.Tensor  # (B, Tn) V_old(s_t)
    kl: torch.Tensor  # (B, Tn) k1 = log pi_old - log pi_ref per token (in the reward)
    kl_k3: torch.Tensor  # (B, Tn) k3 estimate of the same KL, never negative (logged only)
    non_score_rewards: torch.Tensor  # (B, Tn) -beta * kl
    rewards: torch.Tensor  # (B, Tn) non-score rewards plus the score on each row's last token
    advantages: torch.Tensor  # (B, Tn) what each token is credited with (see `advantages`)
    returns: torch.Tensor  # (B, Tn) the critic's targets (GAE: advantages + old values)
    value_mask: torch.Tensor  # (B, Tn) where the value loss counts (all of `response_mask`, one column, or none)
    first_order: torch.Tensor  # (B,) the order of the first update epoch, in whose minibatches the
    #                            old log-probs were computed
    generation_seconds: float  # time spent sampling


def update_schedule(cfg: PPOConfig, n: int):
    """(epochs, minibatch size) of the update of a rollout of n sequences: cfg's, or for the original
    project's sequence-level variant one gradient step on the whole rollout."""
    return (1, n) if cfg.advantage == "sequence" else (cfg.ppo_epochs, cfg.minibatch_size)


def advantages(rewards, old_values, mask, cfg: PPOConfig, gather=None):
    """What every response token is credited with, and the critic's targets: (advantages, returns,
    value_mask), each (B, Tn). rewards are the per-token KL-shaped rewards (score on the last token),
    so each row's sum is its sequence reward R = score - beta * sum_t KL_t.
    - gae: GAE over the critic's values, whitened over valid tokens; the critic regresses every
      token's value to advantage + value. `gather` makes the whitening's statistics global under
      DDP (loss.masked_whiten).
    - rloo: every token of a sample gets R minus the mean R of the other rloo_k - 1 samples of its
      prompt (loss.rloo_advantages; the k samples are consecutive rows); no critic, no targets.
    - sequence (the original's): every token gets R - V(prompt), V(prompt) the critic's value at the
      last prompt token (column 0 of old_values); the critic regresses that one value to R.
    """
    if cfg.advantage == "gae":
        adv, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
        return masked_whiten(adv, mask, gather=gather), returns, mask
    total = masked_sum(rewards, mask, dim=1)  # (B,) R
    if cfg.advantage == "rloo":
        zeros = torch.zeros_like(mask)
        return rloo_advantages(total, cfg.rloo_k)[:, None] * mask, zeros, zeros
    first = torch.zeros_like(mask)
    first[:, 0] = mask[:, 0]  # V(prompt): the value read before the first response token
    return (total - old_values[:, 0])[:, None] * mask, total[:, None] * first, first


@torch.no_grad()
def collect_rollout(models: PPOModels, prompt_ids, prompt_mask, prompts: List[str], score_fn: ScoreFn,
                    normalizer: ScoreNormalizer, kl_coef: float, cfg: PPOConfig,
                    gather: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> Rollout:
    """Sample responses to left-padded prompts (B, Tp), score them, and compute rewards and advantages.
    With cfg.advantage "rloo" each prompt is answered cfg.rloo_k times (B * rloo_k sequences).

    `gather(t)` concatenates a 1-D tensor t over data-parallel processes (None: one process): the
    score normaliser is then fitted on every process's finished answers of the first rollout, and
    reward and advantage whitening use the whole batch's statistics."""
    if cfg.advantage == "rloo":  # k consecutive rows per prompt, as rloo_advantages expects
        prompt_ids, prompt_mask = (t.repeat_interleave(cfg.rloo_k, dim=0) for t in (prompt_ids, prompt_mask))
        prompts = [p for p in prompts for _ in range(cfg.rloo_k)]
    t0 = time.time()
    gen = models.generate(prompt_ids, prompt_mask, cfg.max_new_tokens)
    generation_seconds = time.time() - t0
    tokens, attn, Tp = gen.tokens, gen.attention_mask, gen.prompt_len
    mask = gen.response_mask[:, Tp:].float()  # (B, Tn): 1 up to and including EOS
    ended = ended_with_eos(gen)  # (B,)
    raw = score_fn(gen, prompts)  # (B,)
    if not normalizer.fitted:  # the first rollout: the SFT policy's own samples
        normalizer.fit(raw[ended] if gather is None else gather(raw[ended]))
    scores = final_scores(raw, ended, normalizer, cfg)

    # Old log-probs, reference log-probs and values are computed in the same minibatches (same
    # rows, same shapes) as the first update epoch uses, so the first minibatch's ratio is exactly 1:
    # anything else would mean rollout and update disagree (Huang et al. 2024).
    first_order = torch.randperm(tokens.size(0), device=tokens.device)
    old_logp, ref_logp, old_values = (torch.zeros_like(mask) for _ in range(3))  # (B, Tn) each
    for mb in first_order.split(update_schedule(cfg, tokens.size(0))[1]):
        old_logp[mb] = models.logprobs(tokens[mb], attn[mb], Tp)[0]
        ref_logp[mb] = models.ref_logprobs(tokens[mb], attn[mb], Tp)
        if models.critic is not None:
            old_values[mb] = models.values(tokens[mb], attn[mb], Tp)

    kl, kl_k3 = kl_estimates(old_logp, ref_logp)  # (B, Tn) each
    rewards, non_score = shaped_rewards(scores, kl, mask, kl_coef)  # r_t = -beta KL_t, + score at EOS
    if cfg.whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False, gather=gather)
    adv, returns, value_mask = advantages(rewards, old_values, mask, cfg, gather)
    return Rollout(tokens, attn, Tp, mask, ended, raw, scores, old_logp, ref_logp, old_values, kl, kl_k3,
                   non_score, rewards, adv, returns, value_mask, first_order, generation_seconds)


# -----------------------------------------------------------------------------
# 2. Update


def ppo_update(rollout: Rollout, models: PPOModels, cfg: PPOConfig, actor_step: Callable[[torch.Tensor], float],
               critic_step: Optional[Callable[[torch.Tensor], float]] = None) -> dict:
    """cfg.ppo_epochs passes over the rollout in shuffled minibatches of cfg.minibatch_size (see
    update_schedule): each minibatch one actor step on PPO's clipped surrogate and, when there is a
    critic, one critic step on the clipped value loss.

    `actor_step(loss)` / `critic_step(loss)` take the gradient of the loss and step that model's
    optimizer, returning the gradient norm (the Trainer's, which owns precision and data parallelism).
    Returns the statistics averaged over minibatches, and `first_ratio_max_dev`: how far the first
    minibatch's probability ratio is from 1 (0 unless rollout and update compute different things)."""
    r, Tp = rollout, rollout.prompt_len
    sums: Dict[str, float] = {}
    first_ratio_max_dev, n_updates = None, 0
    epochs, minibatch_size = update_schedule(cfg, r.tokens.size(0))
    for epoch in range(epochs):
        order = r.first_order if epoch == 0 else torch.randperm(r.tokens.size(0), device=r.tokens.device)
        for mb in order.split(minibatch_size):
            tokens, attn, mask = r.tokens[mb], r.attention_mask[mb], r.response_mask[mb]  # (b, T), (b, T), (b, Tn)
            logp, entropy = models.logprobs(tokens, attn, Tp, with_entropy=True)  # (b, Tn) each
            pg_loss, pg_stats = policy_loss(logp, r.old_logprobs[mb], r.advantages[mb], mask, cfg.cliprange)
            actor_norm = actor_step(pg_loss)
            if first_ratio_max_dev is None:
                ratio = torch.exp(logp.detach() - r.old_logprobs[mb])
                first_ratio_max_dev = ((ratio - 1).abs() * mask).max().item()
            step = {"policy_loss": pg_loss.item(), "entropy": masked_mean(entropy, mask).item(),
                    "actor_grad_norm": actor_norm, **{k: v.item() for k, v in pg_stats.items()}}
            if models.critic is not None:
                values = models.values(tokens, attn, Tp)  # (b, Tn)
                v_loss, v_clipfrac = value_loss(values, r.old_values[mb], r.returns[mb], r.value_mask[mb],
                                                cfg.cliprange_value)
                step |= {"value_loss": v_loss.item(), "vf_clipfrac": v_clipfrac.item(),
                         "critic_grad_norm": critic_step(v_loss)}
            for k, v in step.items():
                sums[k] = sums.get(k, 0.0) + v
            n_updates += 1
    return {"first_ratio_max_dev": first_ratio_max_dev, **{k: v / n_updates for k, v in sums.items()}}


def rollout_stats(rollout: Rollout) -> dict:
    """Per-rollout means: raw RM score of finished answers, the rewarded score, the KL to the
    reference per sequence (k1, and k3), non-score reward, critic quality, length and EOS rate."""
    r, mask = rollout, rollout.response_mask
    critic = {"explained_variance": explained_variance(r.old_values, r.returns, r.value_mask).item()} \
        if r.value_mask.any() else {}  # RLOO has no critic
    return {
        "score": r.raw_scores[r.ended].mean().item() if r.ended.any() else float("nan"),
        "score_normalized": r.scores.mean().item(),
        "non_score_reward": masked_sum(r.non_score_rewards, mask, dim=1).mean().item(),
        "kl": masked_sum(r.kl, mask, dim=1).mean().item(),
        "kl_k3": masked_sum(r.kl_k3, mask, dim=1).mean().item(),
        **critic,
        "response_length": mask.sum(1).mean().item(),
        "eos_rate": r.ended.float().mean().item(),
    }


# -----------------------------------------------------------------------------
# Held-out evaluation


@torch.no_grad()
def evaluate_policy(models: PPOModels, batches, score_fn: ScoreFn, normalizer: ScoreNormalizer, cfg: PPOConfig,
                    extra_scorers: Dict[str, ScoreFn], generator: torch.Generator) -> dict:
    """Mean RM score, KL to the reference, length, EOS rate and each extra scorer (e.g. the task's
    gold reward) over held-out prompts, sampled with a fixed `generator` so evaluations compare."""
    sums: Dict[str, float] = {}
    n = 0
    for batch in batches:
        gen = models.generate(batch["input_ids"], batch["attention_mask"], cfg.max_new_tokens, generator)
        tokens, attn, Tp = gen.tokens, gen.attention_mask, gen.prompt_len
        mask = gen.response_mask[:, Tp:].float()  # (b, Tn)
        ended = ended_with_eos(gen)
        raw = score_fn(gen, batch["prompts"])
        kl = masked_sum(models.logprobs(tokens, attn, Tp)[0] - models.ref_logprobs(tokens, attn, Tp), mask, dim=1)
        row = {"score": raw, "kl": kl, "response_length": mask.sum(1), "eos_rate": ended.float()}
        if normalizer.fitted:  # not before the first rollout (the evaluation at step 0)
            row["score_normalized"] = final_scores(raw, ended, normalizer, cfg)
        row |= {name: fn(gen, batch["prompts"]) for name, fn in extra_scorers.items()}
        for k, v in row.items():
            sums[k] = sums.get(k, 0.0) + v.sum().item()
        n += tokens.size(0)
    return {k: v / n for k, v in sums.items()} | {"samples": n} if n else {}
