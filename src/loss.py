"""Losses and the small tensor algebra around them (masked statistics, GAE, KL estimators).

Every function takes a mask: 1 on tokens that count, 0 on padding and on everything after a
response's EOS. Nothing here looks at pad ids.

References: language-model cross-entropy; Bradley–Terry pairwise ranking loss and its K-wise form
(Ouyang et al. 2022, eq. 1); DPO (Rafailov et al. 2023) and IPO (Azar et al. 2023); PPO-clip
(Schulman et al. 2017) with a clipped value loss and GAE (Schulman et al. 2016) as used for RLHF by
Ziegler et al. 2019 and Huang et al. 2023/2024; the leave-one-out baseline of RLOO (Kool et al. 2019,
Ahmadian et al. 2024); KL estimators k1/k3 from Schulman, "Approximating KL divergence" (2020).
"""
from typing import Optional

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


def masked_whiten(x, mask, shift_mean=True, eps=1e-8, gather=None):
    """(x - mean) / std over valid positions; padding stays 0. With shift_mean=False the mean is
    added back: used for rewards, whose level carries information (whitening that shifts the mean
    changes what the policy is rewarded for; Huang et al. 2024).

    `gather(t)`, when given, concatenates a 1-D tensor over data-parallel processes: the mean and
    std are then those of every process's valid positions, as one process with the whole batch has."""
    if gather is None:
        mean, var = masked_mean(x, mask), masked_var(x, mask)
    else:
        valid = gather(x[mask.bool()])  # (N_all,)
        mean, var = valid.mean(), valid.var() if valid.numel() > 1 else valid.new_zeros(())
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


# -----------------------------------------------------------------------------
# Supervised fine-tuning


def lm_loss(weight, hidden, input_ids, loss_mask, chunk_rows: Optional[int] = None):
    """Mean next-token cross-entropy over the tokens marked in loss_mask, through the fused output layer.

    hidden (B, T, C) are the model's final hidden states, weight (V, C) the output layer
    (logits = h W^T; GPT-2's tied embedding, `GPT.lm_head.weight`), loss_mask (B, T) marks target
    tokens (position t is predicted from hidden[:, t-1]). Logits are made only for targets and never
    kept (linear_cross_entropy): the 50257-wide output layer dominates a small model's cost and memory.
    Returns (loss, number of target tokens).
    """
    h, targets = _targets(hidden, input_ids, loss_mask)  # (N, C), (N,)
    n = targets.numel()
    if n == 0:
        return hidden.sum() * 0.0, 0
    return linear_cross_entropy(h, weight, targets, chunk_rows) / n, n


def lm_loss_reference(weight, hidden, input_ids, loss_mask, chunk_rows: int = 128):
    """lm_loss the plain way: logits of `chunk_rows` targets at a time through F.linear and
    F.cross_entropy, kept by autograd for backward. What the fused path is tested and benchmarked against."""
    h, targets = _targets(hidden, input_ids, loss_mask)
    n = targets.numel()
    if n == 0:
        return hidden.sum() * 0.0, 0
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, n, chunk_rows):
        logits = F.linear(h[i:i + chunk_rows], weight).float()  # (n_chunk, V)
        total = total + F.cross_entropy(logits, targets[i:i + chunk_rows], reduction="sum")
    return total / n, n


def _targets(hidden, input_ids, loss_mask):
    """The hidden states that predict each marked token, and those tokens: (N, C), (N,)."""
    keep = loss_mask[:, 1:].bool()  # (B, T-1): hidden[:, t-1] predicts input_ids[:, t]
    return hidden[:, :-1][keep], input_ids[:, 1:][keep]


def linear_cross_entropy(h, weight, targets, chunk_rows: Optional[int] = None):
    """sum_i cross_entropy(h_i W^T, targets_i) for h (N, C), W (V, C), without keeping the logits.

    The gradient of this sum with respect to the logits is softmax - onehot, so the forward pass
    turns each chunk of logits into its share of the gradients of h and W right away and lets the
    chunk go; backward only scales them by the incoming gradient. Against F.cross_entropy on full
    logits this saves the (N, V) tensors autograd would keep and most passes over them: one exp
    per logit, everything in place in one reused buffer (the idea of Liger-Kernel's fused linear
    cross-entropy). Under autocast the matmuls run in the autocast dtype and the softmax in fp32,
    as F.linear + F.cross_entropy would.
    """
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(h, weight, targets, chunk_rows)
    return _linear_cross_entropy(h, weight, targets, chunk_rows, False, False)[0]


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, chunk_rows):
        loss, grad_h, grad_w = _linear_cross_entropy(h, weight, targets, chunk_rows, *ctx.needs_input_grad[:2])
        ctx.save_for_backward(grad_h, grad_w)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        return (None if grad_h is None else grad_h * grad_loss.to(grad_h.dtype),
                None if grad_w is None else grad_w * grad_loss, None, None)


def _linear_cross_entropy(h, weight, targets, chunk_rows, need_grad_h, need_grad_w):
    """-> (summed loss, d loss / d h or None, d loss / d W or None); see linear_cross_entropy."""
    device = h.device.type
    dtype = _compute_dtype(device, weight.dtype)
    chunk_rows = _chunk_rows(chunk_rows, dtype)
    grad_h = torch.empty_like(h) if need_grad_h else None  # (N, C)
    grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_grad_w else None  # (V, C)
    loss = h.new_zeros((), dtype=torch.float32)
    with torch.autocast(device, enabled=False):
        w = weight.to(dtype)  # (V, C)
        buf = h.new_empty(min(chunk_rows, h.size(0)), w.size(0), dtype=torch.float32)  # reused by every chunk
        for i in range(0, h.size(0), chunk_rows):
            rows = slice(i, i + chunk_rows)
            tc = targets[rows, None]  # (n, 1)
            logits = _chunk_logits(h[rows], w, buf)  # (n, V)
            top = logits.amax(dim=1, keepdim=True)  # (n, 1)
            target_logit = logits.gather(1, tc)  # (n, 1)
            probs = logits.sub_(top).exp_()  # unnormalised, in place
            norm = probs.sum(dim=1, keepdim=True)  # (n, 1)
            loss += (top + norm.log() - target_logit).sum()  # logsumexp - target logit
            if need_grad_h or need_grad_w:
                g = probs.div_(norm).scatter_add_(1, tc, probs.new_full(tc.shape, -1.0))  # softmax - onehot
                _linear_backward(g, h[rows], w, grad_h, rows, grad_w)
    return loss, grad_h, None if grad_w is None else grad_w.to(weight.dtype)


def logprobs_from_hidden(weight, h, targets, temperature: float = 1.0, with_entropy: bool = False,
                         chunk_rows: Optional[int] = None):
    """Log-probs of `targets` (B, Tr) under softmax(h W^T / temperature), h (B, Tr, C), W (V, C).

    With temperature T the policy is softmax(logits / T), the distribution sampled from; old, new
    and reference log-probs must all use the same T, or the PPO ratio compares two different
    policies (Huang et al. 2024, "The N+ implementation details of RLHF with PPO"). No logits are
    kept for backward (linear_logprobs recomputes them chunk by chunk).
    Returns (logprobs (B, Tr), entropy (B, Tr) or None); the entropy carries no gradient.
    """
    B, Tr, C = h.shape
    logp, ent = linear_logprobs(h.reshape(B * Tr, C), weight, targets.reshape(B * Tr), temperature, with_entropy,
                                chunk_rows)
    return logp.view(B, Tr), (ent.view(B, Tr) if with_entropy else None)


def logprobs_from_hidden_reference(weight, h, targets, temperature: float = 1.0, with_entropy: bool = False,
                                   chunk_rows: int = 4096):
    """logprobs_from_hidden the plain way (log_softmax of full logits, autograd keeps them): the
    reference the fused path is tested against."""
    B, Tr, C = h.shape
    h, targets = h.reshape(B * Tr, C), targets.reshape(B * Tr)
    logps, ents = [], []
    for i in range(0, B * Tr, chunk_rows):
        logits = F.linear(h[i:i + chunk_rows], weight).float() / temperature  # (n, V)
        lse = torch.logsumexp(logits, dim=-1)  # (n,)
        logps.append(logits.gather(-1, targets[i:i + chunk_rows, None]).squeeze(-1) - lse)
        if with_entropy:
            with torch.no_grad():
                ents.append(lse - (F.softmax(logits, dim=-1) * logits).sum(-1))
    logp = torch.cat(logps).view(B, Tr)
    return logp, (torch.cat(ents).view(B, Tr) if with_entropy else None)


def linear_logprobs(h, weight, targets, temperature: float = 1.0, with_entropy: bool = False,
                    chunk_rows: Optional[int] = None):
    """log softmax(h W^T / temperature)[targets] for h (N, C), W (V, C), targets (N,): (N,) fp32,
    and the entropies of those distributions (N,) if asked (no gradient), without keeping logits.

    Forward keeps only each row's log-normaliser; backward makes every chunk's logits again (one
    more matmul) and turns them in place into the gradient g (onehot - softmax) / temperature.
    Against autograd through logsumexp and gather this saves the (N, V) tensors held between
    forward and backward and most passes over them: on a small model that is most of a PPO step.
    """
    return _LinearLogProbs.apply(h, weight, targets, temperature, with_entropy, chunk_rows)


class _LinearLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, temperature, with_entropy, chunk_rows):
        device = h.device.type
        dtype = _compute_dtype(device, weight.dtype)
        chunk_rows = _chunk_rows(chunk_rows, dtype)
        N, V = h.size(0), weight.size(0)
        logp, lse = (h.new_empty(N, dtype=torch.float32) for _ in range(2))
        ent = h.new_empty(N, dtype=torch.float32) if with_entropy else None
        with torch.autocast(device, enabled=False):
            w = weight.to(dtype)  # (V, C)
            z_buf = h.new_empty(min(chunk_rows, N), V, dtype=torch.float32)
            e_buf = torch.empty_like(z_buf) if with_entropy else None
            for i in range(0, N, chunk_rows):
                rows = slice(i, i + chunk_rows)
                z = _chunk_logits(h[rows], w, z_buf, temperature)  # (n, V)
                top = z.amax(dim=1, keepdim=True)  # (n, 1)
                z.sub_(top)  # shifted: the largest is 0
                target_z = z.gather(1, targets[rows, None]).squeeze(1)  # (n,)
                if with_entropy:  # H = log s - sum(e z) / s with e = exp(z), s = sum(e)
                    e = torch.exp(z, out=e_buf[:z.size(0)])
                    s = e.sum(dim=1)
                    ent[rows] = s.log() - e.mul_(z).sum(dim=1) / s
                else:
                    s = z.exp_().sum(dim=1)
                logp[rows] = target_z - s.log()
                lse[rows] = top.squeeze(1) + s.log()  # log-normaliser of logits / temperature
        ctx.save_for_backward(h, weight, targets, lse)
        ctx.temperature, ctx.chunk_rows, ctx.dtype = temperature, chunk_rows, dtype
        ctx.mark_non_differentiable(*([ent] if with_entropy else []))
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, grad_ent):
        h, weight, targets, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        with torch.autocast(h.device.type, enabled=False):
            w = weight.to(ctx.dtype)
            buf = h.new_empty(min(ctx.chunk_rows, h.size(0)), w.size(0), dtype=torch.float32)
            for i in range(0, h.size(0), ctx.chunk_rows):
                rows = slice(i, i + ctx.chunk_rows)
                g = grad_logp[rows, None].float() / ctx.temperature  # (n, 1)
                z = _chunk_logits(h[rows], w, buf, ctx.temperature)  # (n, V), again
                grad_z = z.sub_(lse[rows, None]).exp_().mul_(-g)  # -g softmax ...
                grad_z.scatter_add_(1, targets[rows, None], g)  # ... + g onehot
                _linear_backward(grad_z, h[rows], w, grad_h, rows, grad_w)
        return grad_h, None if grad_w is None else grad_w.to(weight.dtype), None, None, None, None


def _compute_dtype(device_type: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype F.linear would compute in: autocast's when autocast is on, else the weight's."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else dtype


def _chunk_rows(chunk_rows: Optional[int], dtype: torch.dtype) -> int:
    """Rows of logits made at a time, unless given: 128 in fp32 (a 26 MB buffer at V = 50257, the
    fastest on CPU); at least 1024 in lower precision, where each chunk's weight gradient is a
    separate low-precision matmul added into the fp32 accumulator, a (V, C)-sized addition."""
    if chunk_rows is not None:
        return chunk_rows
    return 128 if dtype == torch.float32 else 1024


def _chunk_logits(h, w, buf, temperature: float = 1.0):
    """(h W^T) / temperature in fp32, written into the first rows of `buf`; w (V, C) is already
    in the compute dtype."""
    z = buf[:h.size(0)]
    if w.dtype == z.dtype:
        torch.mm(h.to(w.dtype), w.t(), out=z)
    else:
        z.copy_(h.to(w.dtype) @ w.t())
    if temperature != 1.0:
        z.div_(temperature)
    return z


def _linear_backward(grad_z, h, w, grad_h, rows, grad_w):
    """Given d/d(logits) of a chunk (n, V): grad_h[rows] = grad_z W, grad_w += grad_z^T h."""
    grad_z = grad_z.to(w.dtype)
    if grad_h is not None:
        grad_h[rows] = grad_z @ w
    if grad_w is not None:
        if w.dtype == grad_w.dtype:
            grad_w.addmm_(grad_z.t(), h)
        else:  # (h^T grad_z)^T: the faster order for bf16 matmuls on CPU
            grad_w += (h.to(w.dtype).t() @ grad_z).t()


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
# Direct preference optimisation


def sequence_logprobs(weight, hidden, input_ids, loss_mask, chunk_rows: Optional[int] = None):
    """sum_t log p(input_ids[b, t] | input_ids[b, :t]) over the tokens marked in loss_mask, per row: (B,) fp32.

    hidden (B, T, C), weight (V, C) and loss_mask (B, T) as for lm_loss (position t is predicted from
    hidden[:, t-1]); the log-probs come from the fused linear_logprobs, so no (N, V) logits are kept."""
    h, targets = _targets(hidden, input_ids, loss_mask)  # (N, C), (N,)
    rows = loss_mask[:, 1:].bool().nonzero()[:, 0]  # (N,) the row of each target, in the same order
    out = hidden.new_zeros(hidden.size(0), dtype=torch.float32)
    if targets.numel() == 0:
        return out + hidden.sum() * 0.0
    logp, _ = linear_logprobs(h, weight, targets, 1.0, False, chunk_rows)  # (N,)
    return out.index_add(0, rows, logp)


def pair_loss_masks(chosen_ids, chosen_mask, rejected_ids, rejected_mask):
    """The tokens of a preference pair that DPO scores: in each sequence, every real token from the
    first position where chosen and rejected differ. Both share the prompt (and often the start of
    the answer); those shared tokens have the same log-ratio in both sequences, so they cancel from
    every DPO / IPO quantity, and leaving them out saves their output-layer work. All (B, T)."""
    same = (chosen_ids == rejected_ids) & chosen_mask.bool() & rejected_mask.bool()  # (B, T)
    shared = same.long().cumprod(dim=1).sum(dim=1, keepdim=True)  # (B, 1) length of the common prefix
    after = torch.arange(chosen_ids.size(1), device=chosen_ids.device)[None] >= shared  # (B, T)
    return (after & chosen_mask.bool()).long(), (after & rejected_mask.bool()).long()


def _log_ratio_difference(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    """h = [log pi(y_c) - log ref(y_c)] - [log pi(y_r) - log ref(y_r)] (B,), and the implicit rewards
    beta * log-ratio of each side, detached: (h, r_chosen, r_rejected)."""
    chosen, rejected = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    return chosen - rejected, beta * chosen.detach(), beta * rejected.detach()


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float):
    """DPO (Rafailov et al. 2023, eq. 7): -log sigmoid(beta h), averaged over pairs, where h is the
    pair's log-ratio difference (_log_ratio_difference); inputs are sequence log-probs (B,).
    Returns (loss, implicit reward of chosen (B,), of rejected (B,))."""
    h, r_chosen, r_rejected = _log_ratio_difference(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    return -F.logsigmoid(beta * h).mean(), r_chosen, r_rejected


def ipo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float):
    """IPO (Azar et al. 2023, with their tau = beta): (h - 1/(2 beta))^2, averaged over pairs. Unlike
    DPO's, whose minimum lies at h = infinity, this pulls h to a finite margin, so a deterministic
    preference cannot drive the policy arbitrarily far from the reference. Sequence log-probs are
    summed over tokens, as in the paper (some implementations average them). Returns as dpo_loss."""
    h, r_chosen, r_rejected = _log_ratio_difference(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    return ((h - 1 / (2 * beta)) ** 2).mean(), r_chosen, r_rejected


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


def rloo_advantages(rewards, k: int):
    """REINFORCE leave-one-out (Kool et al. 2019; Ahmadian et al. 2024): rewards (B,) of B / k prompts,
    each answered k times in consecutive rows -> each reward minus the mean reward of the other k - 1
    answers to its prompt (B,). The baseline does not depend on the answer it is subtracted from, so
    the policy gradient stays unbiased, and no critic is needed."""
    r = rewards.view(-1, k)  # (B / k, k)
    others = (r.sum(dim=1, keepdim=True) - r) / (k - 1)
    return (r - others).view(-1)


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
