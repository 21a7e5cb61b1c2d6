"""Losses and the small tensor algebra around them (masked statistics, GAE, KL estimators).

Every function takes a mask: 1 on tokens that count, 0 on padding and on everything after a
response's EOS. Nothing here looks at pad ids.

References: language-model cross-entropy; Bradley–Terry pairwise ranking loss and its K-wise form
(Ouyang et al. 2022, eq. 1); PPO-clip (Schulman et al. 2017) with a clipped value loss and GAE
(Schulman et al. 2016) as used for RLHF by Ziegler et al. 2019 and Huang et al. 2023/2024;
KL estimators k1/k3 from Schulman, "Approximating KL divergence" (2020).
"""
import torch
import torch.nn.functional as F


def masked_sum(x, mask, dim=None):
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x, mask, dim=None):
    """Mean of x over positions where mask is 1 (over all of them, or along `dim`)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x, mask, unbiased=True):
    mask = mask.to(x.dtype)
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def masked_whiten(x, mask, shift_mean=True, eps=1e-8):
    """(x - mean) / std over valid positions; padding stays 0. With shift_mean=False the mean is
    added back: used for rewards, whose level carries information (RLHF_DETAILS item 13)."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


# -----------------------------------------------------------------------------
# Supervised fine-tuning


def lm_loss(lm_head, hidden, input_ids, loss_mask, chunk_rows: int = 2048):
    """Mean next-token cross-entropy over the tokens marked in loss_mask.

    hidden (B, T, C) are the model's final hidden states, loss_mask (B, T) marks target tokens
    (position t is predicted from hidden[:, t-1]). Logits are computed only for targets, a chunk
    of rows at a time: the 50257-wide output layer dominates a small model's cost and memory.
    Returns (loss, number of target tokens).
    """
    h = hidden[:, :-1]  # (B, T-1, C) predicts...
    targets = input_ids[:, 1:]  # (B, T-1) ...these
    keep = loss_mask[:, 1:].bool()  # (B, T-1)
    h, targets = h[keep], targets[keep]  # (N, C), (N,)
    n = targets.numel()
    if n == 0:
        return hidden.sum() * 0.0, 0
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, n, chunk_rows):
        logits = lm_head(h[i:i + chunk_rows]).float()  # (n_chunk, V)
        total = total + F.cross_entropy(logits, targets[i:i + chunk_rows], reduction="sum")
    return total / n, n


# -----------------------------------------------------------------------------
# Reward model


def pairwise_loss(r_chosen, r_rejected):
    """-log sigmoid(r_c - r_r), averaged over pairs (Bradley–Terry)."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def kwise_loss(rewards, valid=None):
    """K-wise ranking loss: rewards (B, K) of K responses ordered best first; every pair (i < j)
    contributes -log sigmoid(r_i - r_j) once, and the sum is divided once by the number of pairs
    (InstructGPT eq. 1). valid (B, K) marks real responses when rows have fewer than K."""
    B, K = rewards.shape
    if valid is None:
        valid = torch.ones_like(rewards, dtype=torch.bool)
    valid = valid.bool()
    diff = rewards[:, :, None] - rewards[:, None, :]  # (B, K, K): r_i - r_j
    upper = torch.triu(torch.ones(K, K, dtype=torch.bool, device=rewards.device), diagonal=1)
    pairs = upper[None] & valid[:, :, None] & valid[:, None, :]  # (B, K, K) i better than j
    return -(F.logsigmoid(diff) * pairs).sum() / pairs.sum().clamp(min=1)


def pairwise_accuracy(r_chosen, r_rejected):
    """Fraction of pairs scored in the labelled order; ties count half."""
    return ((r_chosen > r_rejected).float() + 0.5 * (r_chosen == r_rejected).float()).mean()


# -----------------------------------------------------------------------------
# PPO


def kl_estimates(logp, ref_logp):
    """Per-token KL(pi || pi_ref) estimators on tokens sampled from pi:
    k1 = log pi - log pi_ref (unbiased, can be negative; used in the reward),
    k3 = (r - 1) - log r with r = pi_ref / pi (unbiased, always >= 0; logged)."""
    log_ratio = ref_logp - logp
    return -log_ratio, torch.expm1(log_ratio) - log_ratio


def shaped_rewards(scores, kl, mask, kl_coef):
    """Per-token rewards: -beta * KL_t on every response token, plus the sequence score on its
    last valid token (the EOS). scores (B,), kl and mask (B, T). Returns (rewards, non_score)."""
    non_score = -kl_coef * kl * mask  # (B, T)
    last = (mask * torch.arange(mask.size(1), device=mask.device)).argmax(dim=1)  # (B,)
    rewards = non_score.clone()
    rewards[torch.arange(mask.size(0), device=mask.device), last] += scores
    return rewards, non_score


def gae(rewards, values, mask, gamma: float = 1.0, lam: float = 0.95):
    """Generalised advantage estimation over response tokens, vectorised.

    delta_t = r_t + gamma V_{t+1} - V_t, with V after the last valid token = 0 (episode ends);
    A_t = sum_{k >= 0} (gamma lam)^k delta_{t+k}. Since mask is 1 on a prefix of each row, the sum
    is a (T, T) matrix product with the discount matrix D[t, t'] = (gamma lam)^(t' - t), t' >= t.
    rewards, values, mask: (B, T). Returns (advantages, returns), zero on padding.
    """
    mask = mask.to(values.dtype)
    T = values.size(1)
    next_values = torch.cat([values[:, 1:] * mask[:, 1:], values.new_zeros(values.size(0), 1)], dim=1)
    deltas = (rewards + gamma * next_values - values) * mask  # (B, T)
    idx = torch.arange(T, device=values.device)
    power = (idx[None, :] - idx[:, None]).to(values.dtype)  # (T, T): t' - t
    discount = torch.where(power >= 0, (gamma * lam) ** power.clamp(min=0), torch.zeros_like(power))
    advantages = deltas @ discount.T  # (B, T): A[b, t] = sum_t' D[t, t'] delta[b, t']
    return advantages * mask, (advantages + values) * mask


def policy_loss(logp, old_logp, advantages, mask, clip: float = 0.2):
    """PPO's clipped surrogate, averaged over valid tokens. Returns (loss, stats)."""
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip, 1 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),  # k3 of old -> new
            "ratio_mean": masked_mean(ratio, mask),
            "ratio_var": masked_var(ratio, mask),
        }
    return loss, stats


def value_loss(values, old_values, returns, mask, clip: float = 0.2):
    """0.5 * max((V - R)^2, (V_clipped - R)^2), V clipped to old_V +- clip. Returns (loss, clipfrac)."""
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    loss_unclipped, loss_clipped = (values - returns) ** 2, (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(loss_unclipped, loss_clipped), mask)
    return loss, masked_mean((loss_clipped > loss_unclipped).float(), mask).detach()


def explained_variance(values, returns, mask):
    """1 - Var(R - V) / Var(R) over valid tokens: 1 is a perfect critic, 0 no better than a constant."""
    var_r = masked_var(returns, mask)
    return 1 - masked_var(returns - values, mask) / var_r.clamp(min=1e-8)
