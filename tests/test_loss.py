"""Losses against hand-computed values and straightforward reference loops."""
import math

import pytest
import torch
import torch.nn.functional as F

from loss import (
    explained_variance,
    gae,
    kl_estimates,
    kwise_loss,
    linear_cross_entropy,
    linear_logprobs,
    lm_loss,
    lm_loss_reference,
    masked_mean,
    masked_var,
    masked_whiten,
    pairwise_accuracy,
    pairwise_loss,
    policy_loss,
    shaped_rewards,
    value_loss,
)


def test_lm_loss_only_on_marked_tokens():
    torch.manual_seed(0)
    V, C = 11, 4
    W = torch.randn(V, C)
    head = lambda h: h @ W.T  # noqa: E731  (logits by hand)
    hidden = torch.randn(2, 5, C)
    ids = torch.randint(0, V, (2, 5))
    loss_mask = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]])
    # By hand: position t is predicted from hidden[t-1].
    terms = []
    for b in range(2):
        for t in range(1, 5):
            if loss_mask[b, t]:
                logits = head(hidden[b, t - 1])
                terms.append(-(logits[ids[b, t]] - torch.logsumexp(logits, 0)))
    want = torch.stack(terms).mean()
    got, n = lm_loss(W, hidden, ids, loss_mask, chunk_rows=2)
    assert n == 6
    torch.testing.assert_close(got, want)
    # Changing a token that carries no loss (as a target) changes nothing.
    ids2 = ids.clone()
    ids2[0, 4] = (ids[0, 4] + 1) % V
    torch.testing.assert_close(lm_loss(W, hidden, ids2, loss_mask)[0], want)
    empty, n0 = lm_loss(W, hidden, ids, torch.zeros_like(loss_mask))
    assert n0 == 0 and empty.item() == 0.0


def _autocast(precision):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fused_linear_cross_entropy_equals_cross_entropy(precision):
    torch.manual_seed(0)
    N, C, V = 37, 16, 1000
    h = torch.randn(N, C, requires_grad=True)
    W = (torch.randn(V, C) * 0.5).requires_grad_()
    t = torch.randint(0, V, (N,))
    with _autocast(precision):
        want = F.cross_entropy(F.linear(h, W).float(), t, reduction="sum") * 0.3
        got = linear_cross_entropy(h, W, t, chunk_rows=10) * 0.3  # uneven chunks; a scaled loss
    want_h, want_w = torch.autograd.grad(want, (h, W))
    got_h, got_w = torch.autograd.grad(got, (h, W))
    tol = dict(atol=1e-5, rtol=1e-5) if precision == "fp32" else dict(atol=0.02, rtol=0.02)  # bf16 matmuls
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(got_h, want_h.float(), **tol)
    torch.testing.assert_close(got_w, want_w.float(), **tol)
    assert got_h.dtype == h.dtype and got_w.dtype == W.dtype
    with torch.no_grad():  # no gradients asked for: the loss alone
        torch.testing.assert_close(linear_cross_entropy(h, W, t), F.cross_entropy(h @ W.T, t, reduction="sum"))


def test_lm_loss_fused_path_equals_reference_path():
    torch.manual_seed(0)
    V, C = 300, 8
    W = torch.randn(V, C, requires_grad=True)
    hidden = torch.randn(3, 9, C, requires_grad=True)
    ids = torch.randint(0, V, (3, 9))
    loss_mask = (torch.rand(3, 9) > 0.3).long()
    fused, n = lm_loss(W, hidden, ids, loss_mask, chunk_rows=4)
    plain, n2 = lm_loss_reference(W, hidden, ids, loss_mask, chunk_rows=4)
    assert n == n2
    torch.testing.assert_close(fused, plain)
    for a, b in zip(torch.autograd.grad(fused, (hidden, W)), torch.autograd.grad(plain, (hidden, W))):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fused_logprobs_equal_log_softmax(precision, temperature):
    torch.manual_seed(0)
    N, C, V = 37, 16, 1000
    h = torch.randn(N, C, requires_grad=True)
    W = (torch.randn(V, C) * 0.5).requires_grad_()
    t = torch.randint(0, V, (N,))
    upstream = torch.randn(N)  # per-token gradients, as the PPO loss gives
    with _autocast(precision):
        z = F.linear(h, W).float() / temperature
        want = z.log_softmax(-1).gather(1, t[:, None]).squeeze(1)
        want_ent = -(z.softmax(-1) * z.log_softmax(-1)).sum(-1)
        got, ent = linear_logprobs(h, W, t, temperature, with_entropy=True, chunk_rows=10)
    assert got.dtype == torch.float32 and not ent.requires_grad
    want_h, want_w = torch.autograd.grad((want * upstream).sum(), (h, W))
    got_h, got_w = torch.autograd.grad((got * upstream).sum(), (h, W))
    tol = dict(atol=1e-5, rtol=1e-5) if precision == "fp32" else dict(atol=0.03, rtol=0.03)
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(ent, want_ent, **tol)
    torch.testing.assert_close(got_h, want_h.float(), **tol)
    torch.testing.assert_close(got_w, want_w.float(), **tol)


def test_pairwise_loss_and_accuracy():
    rc, rr = torch.tensor([2.0, 0.0, 1.0]), torch.tensor([1.0, 0.0, 3.0])
    want = (-math.log(1 / (1 + math.exp(-1))) - math.log(0.5) - math.log(1 / (1 + math.exp(2)))) / 3
    assert abs(pairwise_loss(rc, rr).item() - want) < 1e-6
    assert abs(pairwise_accuracy(rc, rr).item() - (1 + 0.5 + 0) / 3) < 1e-6  # tie counts half


def test_kwise_loss_counts_each_pair_once():
    r = torch.tensor([[3.0, 1.0, 0.0]])  # best first
    pairs = [(3.0, 1.0), (3.0, 0.0), (1.0, 0.0)]
    want = sum(-math.log(1 / (1 + math.exp(-(a - b)))) for a, b in pairs) / 3
    assert abs(kwise_loss(r).item() - want) < 1e-6
    # K = 2 is the pairwise loss.
    r2 = torch.tensor([[2.0, 1.0], [0.0, 3.0]])
    torch.testing.assert_close(kwise_loss(r2), pairwise_loss(r2[:, 0], r2[:, 1]))
    # Rows with fewer responses: invalid entries do not count, normalisation over valid pairs.
    r3 = torch.tensor([[3.0, 1.0, 0.0], [2.0, 1.0, 99.0]])
    valid = torch.tensor([[1, 1, 1], [1, 1, 0]])
    want3 = (sum(-math.log(1 / (1 + math.exp(-(a - b)))) for a, b in pairs)
             - math.log(1 / (1 + math.exp(-1.0)))) / 4
    assert abs(kwise_loss(r3, valid).item() - want3) < 1e-6


def test_masked_statistics_ignore_padding():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -50.0, 7.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]).float()
    vals = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert abs(masked_mean(x, mask).item() - vals.mean().item()) < 1e-6
    assert abs(masked_var(x, mask).item() - vals.var().item()) < 1e-5
    w = masked_whiten(x, mask)
    torch.testing.assert_close(w[mask.bool()], (vals - vals.mean()) / vals.std(), atol=1e-5, rtol=0)
    assert (w[~mask.bool()] == 0).all()
    # Whatever sits in the padding, the result is the same.
    x2 = x.clone()
    x2[~mask.bool()] = 1e6
    torch.testing.assert_close(masked_whiten(x2, mask), w)
    # shift_mean=False keeps the mean (for rewards).
    w_keep = masked_whiten(x, mask, shift_mean=False)
    assert abs(masked_mean(w_keep, mask).item() - vals.mean().item()) < 1e-5


def gae_loop(rewards, values, mask, gamma, lam):
    """GAE the way it is usually written: one row at a time, right to left, stopping at padding."""
    B, T = rewards.shape
    adv = torch.zeros(B, T)
    for b in range(B):
        n = int(mask[b].sum())
        last = 0.0
        for t in reversed(range(n)):
            next_v = values[b, t + 1] if t + 1 < n else 0.0
            delta = rewards[b, t] + gamma * next_v - values[b, t]
            last = delta + gamma * lam * last
            adv[b, t] = last
    return adv, (adv + values) * mask


def test_gae_vectorised_equals_loop():
    torch.manual_seed(0)
    for gamma, lam in [(1.0, 0.95), (0.99, 0.9), (1.0, 1.0), (0.9, 0.0)]:
        rewards, values = torch.randn(4, 9), torch.randn(4, 9)
        lengths = torch.tensor([9, 5, 1, 7])
        mask = (torch.arange(9)[None] < lengths[:, None]).float()
        rewards_padded = rewards.clone()
        rewards_padded[~mask.bool()] = 123.0  # garbage after EOS must not leak in
        values_padded = values.clone()
        values_padded[~mask.bool()] = -77.0
        adv, ret = gae(rewards_padded, values_padded, mask, gamma, lam)
        want_adv, want_ret = gae_loop(rewards * mask, values * mask, mask, gamma, lam)
        torch.testing.assert_close(adv, want_adv, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ret, want_ret, atol=1e-5, rtol=1e-5)


def test_shaped_rewards_put_score_on_last_token():
    kl = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]).float()
    rewards, non_score = shaped_rewards(torch.tensor([1.0, 2.0]), kl, mask, kl_coef=0.1)
    torch.testing.assert_close(rewards, torch.tensor([[-0.01, -0.02, -0.03, -0.04 + 1.0],
                                                      [-0.05, -0.06 + 2.0, 0.0, 0.0]]))
    assert (non_score[1, 2:] == 0).all()  # nothing after EOS


def test_kl_estimators_are_unbiased_for_the_exact_kl():
    """On tokens sampled from pi, the means of k1 and k3 converge to the exact KL(pi || pi_ref) of
    two known distributions (computed here from their probabilities, not from the estimators), and
    k3 is never negative while k1 is, on some tokens. A wrong sign or ratio direction misses."""
    g = torch.Generator().manual_seed(0)
    pi = torch.softmax(torch.randn(6, generator=g) * 1.5, 0)
    ref = torch.softmax(torch.randn(6, generator=g) * 1.5, 0)
    exact = (pi * (pi / ref).log()).sum().item()
    reverse = (ref * (ref / pi).log()).sum().item()  # KL(ref || pi): what a swapped ratio estimates
    tokens = torch.multinomial(pi, 400_000, replacement=True, generator=g)
    k1, k3 = kl_estimates(pi.log()[tokens], ref.log()[tokens])
    assert abs(exact - reverse) > 0.1  # the two directions are distinguishable here
    for k in (k1, k3):
        stderr = k.std().item() / len(k) ** 0.5
        assert abs(k.mean().item() - exact) < 4 * stderr + 1e-4, (k.mean().item(), exact)
    assert (k3 >= 0).all() and (k1 < 0).any()


def test_policy_loss_clipping_and_padding():
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1, 9.0]]))  # ratios 1.5, 0.5, 1.1 | padding
    adv = torch.tensor([[1.0, -1.0, 1.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    loss, stats = policy_loss(logp, old, adv, mask, clip=0.2)
    # token 0: max(-1.5, -1.2) = -1.2 (clipped); token 1: max(0.5, 0.8) = 0.8 (clipped); token 2: -1.1
    assert abs(loss.item() - (-1.2 + 0.8 - 1.1) / 3) < 1e-6
    assert abs(stats["clipfrac"].item() - 2 / 3) < 1e-6
    assert abs(stats["ratio_mean"].item() - (1.5 + 0.5 + 1.1) / 3) < 1e-6
    # At ratio 1 (first minibatch) the loss is -mean(advantages) and nothing is clipped.
    loss1, stats1 = policy_loss(old, old, adv, mask)
    assert abs(loss1.item() + 1 / 3) < 1e-6 and stats1["clipfrac"].item() == 0 and stats1["approx_kl"].item() == 0


def test_value_loss_clipping():
    old = torch.tensor([[0.0, 0.0, 0.0]])
    v = torch.tensor([[1.0, 0.1, 5.0]])
    ret = torch.tensor([[1.0, 1.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, clipfrac = value_loss(v, old, ret, mask, clip=0.2)
    # token 0: max(0, (0.2-1)^2=0.64) = 0.64; token 1: max(0.81, 0.81) = 0.81 (not clipped)
    assert abs(loss.item() - 0.5 * (0.64 + 0.81) / 2) < 1e-6
    assert abs(clipfrac.item() - 0.5) < 1e-6


def test_explained_variance():
    ret = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    mask = torch.ones(1, 4)
    assert abs(explained_variance(ret, ret, mask).item() - 1.0) < 1e-6
    assert abs(explained_variance(torch.full_like(ret, 2.5), ret, mask).item()) < 1e-6
