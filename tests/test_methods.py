"""The added methods and the original project's choices kept as switches: RLOO, the RM's mean over padding,
the sequence-level advantage, top-k rollouts with full-softmax log-probs, the fixed-order judging protocol
with a position-biased judge, and best-of-n."""
import json
import math
import os
import random
from contextlib import nullcontext
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from conftest import randomize_

import best_of_n
from best_of_n import BestOfN, analytic_kl
from common import UserError
from configs import EOS_ID, ModelConfig, PPOConfig, TrainConfig
from dataset import collate_prompts, collate_sft
from evaluate import GenParams, generate_answers, judge_comparisons, summarize
from gpt import GPT, Generation, RewardModel, ValueModel
from judges import PositionBiasedJudge, ScoreJudge, function_judge, make_judge
from loss import rloo_advantages
from ppo import PPOModels, Rollout, ScoreNormalizer, advantages, collect_rollout, ppo_update, update_schedule
from tokenizer import get_tokenizer
from trainers import PPOStage, RMStage, SFTStage, Trainer

FAKE_TRAINER = SimpleNamespace(autocast=nullcontext, device=torch.device("cpu"))


# -----------------------------------------------------------------------------
# RLOO


def leave_one_out_by_hand(rewards, k):
    """Each reward minus the plain mean of the other k - 1 rewards of its group of k consecutive rows."""
    out = []
    for start in range(0, len(rewards), k):
        group = rewards[start:start + k]
        for i, r in enumerate(group):
            others = [x for j, x in enumerate(group) if j != i]
            out.append(r - sum(others) / len(others))
    return out


@pytest.mark.parametrize("k", [2, 3, 4])
def test_rloo_advantages_are_reward_minus_the_mean_of_the_others(k):
    """loss.rloo_advantages: reward minus the mean of the other k - 1 in its group; since
    r_i - (S - r_i)/(k - 1) = k/(k - 1) * (r_i - S/k), that is k/(k-1) times the reward minus the group
    mean, so each group's advantages sum to zero."""
    g = torch.Generator().manual_seed(k)
    rewards = torch.randn(5 * k, generator=g, dtype=torch.float64)
    got = rloo_advantages(rewards, k)
    want = leave_one_out_by_hand(rewards.tolist(), k)
    assert got.shape == rewards.shape
    assert got.tolist() == pytest.approx(want, abs=1e-12)
    groups, adv = rewards.view(-1, k), got.view(-1, k)
    assert adv.sum(dim=1).abs().max() < 1e-12
    scaled = k / (k - 1) * (groups - groups.mean(dim=1, keepdim=True))
    assert adv.flatten().tolist() == pytest.approx(scaled.flatten().tolist(), abs=1e-12)
    # Rewards of one group never leak into another: shifting one group moves nothing else.
    shifted = rewards.clone()
    shifted[:k] += 100.0
    assert rloo_advantages(shifted, k).tolist() == pytest.approx(got.tolist(), abs=1e-9)


def test_rloo_advantage_of_ppo_broadcasts_the_sequence_reward_without_critic_targets():
    """ppo.advantages with advantage="rloo": R = sum of the shaped per-token rewards, every valid token of a row
    gets R minus the mean R of the other rows of its group; no returns and an empty value mask."""
    cfg = PPOConfig(rollout_batch_size=6, minibatch_size=3, advantage="rloo", rloo_k=3)
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(6, 5, generator=g)
    lengths = [5, 2, 3, 1, 4, 5]
    mask = torch.tensor([[1.0] * n + [0.0] * (5 - n) for n in lengths])
    old_values = torch.randn(6, 5, generator=g)  # no critic: must be ignored
    adv, returns, value_mask = advantages(rewards, old_values, mask, cfg)
    totals = [sum(rewards[b, t].item() for t in range(lengths[b])) for b in range(6)]
    per_row = leave_one_out_by_hand(totals, 3)
    for b in range(6):
        for t in range(5):
            want = per_row[b] if t < lengths[b] else 0.0
            assert adv[b, t].item() == pytest.approx(want, abs=1e-5), (b, t)
    assert returns.abs().max() == 0 and value_mask.abs().max() == 0


class StubPolicy:
    """A stand-in for PPOModels without a critic: answers each row with one random token then EOS, and gives
    every token log-prob 0 under policy and reference (so the shaped reward is the score alone)."""

    critic = None

    def __init__(self, seed=0):
        self.g = torch.Generator().manual_seed(seed)
        self.prompt_rows = None

    def generate(self, prompt_ids, prompt_mask, max_new_tokens, generator=None):
        self.prompt_rows = prompt_ids.clone()
        B, Tp = prompt_ids.shape
        first = torch.randint(100, 200, (B, 1), generator=self.g)
        response = torch.cat([first, torch.full((B, 1), EOS_ID)], 1)
        tokens = torch.cat([prompt_ids, response], 1)
        ones = torch.ones_like(response)
        attention = torch.cat([prompt_mask, ones], 1)
        return Generation(tokens, attention, torch.cat([torch.zeros_like(prompt_mask), ones], 1), Tp)

    def logprobs(self, tokens, attention_mask, prompt_len, with_entropy=False, policy=None):
        return torch.zeros(tokens.size(0), tokens.size(1) - prompt_len), None

    def ref_logprobs(self, tokens, attention_mask, prompt_len):
        return torch.zeros(tokens.size(0), tokens.size(1) - prompt_len)


def test_rloo_rollout_answers_each_prompt_k_times_in_consecutive_rows():
    """collect_rollout with RLOO: B prompts become B * k rows, each prompt's k answers consecutive (ids and
    prompt texts alike), and the advantages are leave-one-out within those groups."""
    k, P = 4, 3
    cfg = PPOConfig(rollout_batch_size=P * k, minibatch_size=4, max_new_tokens=2, advantage="rloo", rloo_k=k,
                    normalize_reward=False)
    prompt_ids = torch.tensor([[11, 12], [21, 22], [31, 32]])
    prompts = ["first", "second", "third"]
    seen = {}

    def score(gen, texts):
        seen["texts"] = list(texts)
        # The prompt's own text and the sampled token both count: a mixed-up group would show.
        return torch.tensor([100.0 * prompts.index(p) + float(row[gen.prompt_len])
                             for p, row in zip(texts, gen.tokens)])

    stub = StubPolicy()
    rollout = collect_rollout(stub, prompt_ids, torch.ones_like(prompt_ids), prompts, score,
                              ScoreNormalizer(enabled=False), 0.1, cfg)
    assert rollout.tokens.size(0) == P * k
    assert seen["texts"] == [p for p in prompts for _ in range(k)]
    for row in range(P * k):
        assert rollout.tokens[row, :2].tolist() == prompt_ids[row // k].tolist()
    raw = rollout.raw_scores.tolist()
    want = leave_one_out_by_hand(raw, k)
    assert rollout.advantages[:, 0].tolist() == pytest.approx(want, abs=1e-4)
    assert rollout.advantages[:, 1].tolist() == pytest.approx(want, abs=1e-4)  # the EOS token too
    assert not rollout.value_mask.any()


def test_rloo_stage_has_no_critic_and_other_advantages_need_one(tiny_config):
    """PPOStage: RLOO takes critic=None (and refuses one); gae and sequence refuse a missing critic."""
    actor, ref, critic = GPT(tiny_config), GPT(tiny_config), ValueModel(tiny_config)
    rloo = PPOConfig(rollout_batch_size=8, minibatch_size=4, advantage="rloo", rloo_k=4)
    stage = PPOStage(actor, None, rloo, reward_fn=lambda gen, p: torch.zeros(len(p)), ref=ref)
    assert set(stage.models) == {"model"} and rloo.prompts_per_rollout == 2
    assert stage.ppo_models(FAKE_TRAINER, stage.models).critic is None
    with pytest.raises(ValueError):
        PPOStage(actor, critic, rloo, reward_fn=lambda gen, p: torch.zeros(len(p)), ref=ref)
    for kind in ("gae", "sequence"):
        with pytest.raises(ValueError):
            PPOStage(actor, None, PPOConfig(advantage=kind), reward_fn=lambda gen, p: torch.zeros(len(p)), ref=ref)
    with pytest.raises(UserError):
        PPOConfig(rollout_batch_size=8, minibatch_size=4, advantage="rloo", rloo_k=3)  # 3 does not divide 8


# The toy task of tests/test_ppo.py, rebuilt here: a policy that says random animal words, rewarded for " cat".
WORDS = [" cat", " dog", " bird", " fish", " cow", " pig", " hen", " ant"]
PROMPT = "\n\nHuman: Say some words.\n\nAssistant:"
WORD_CONFIG = ModelConfig(n_layer=2, n_head=4, n_embd=64, block_size=64)


@pytest.fixture(scope="module")
def word_policy(tmp_path_factory):
    """A small LM fine-tuned to answer PROMPT with 6 words drawn uniformly from WORDS, then EOS."""
    tok, rng = get_tokenizer(), random.Random(0)
    prompt = tok.encode(PROMPT)
    examples = []
    for _ in range(256):
        response = tok.encode("".join(rng.choice(WORDS) for _ in range(6))) + [tok.eos_id]
        examples.append({"input_ids": torch.tensor(prompt + response),
                         "loss_mask": torch.tensor([0] * len(prompt) + [1] * len(response))})
    torch.manual_seed(0)
    model = GPT(WORD_CONFIG)
    cfg = TrainConfig(batch_size=16, lr=3e-3, max_steps=120, warmup_steps=10, eval_every=0, save_every=0,
                      log_every=120, device="cpu")
    Trainer(SFTStage(model), cfg, str(tmp_path_factory.mktemp("sft")), examples, collate_sft).fit()
    return model.state_dict()


def cat_fraction(gen, prompts):
    """Share of the response tokens (EOS excluded) that are " cat"."""
    tok = get_tokenizer()
    cat = tok.encode(" cat")[0]
    resp = gen.tokens[:, gen.prompt_len:]
    real = gen.response_mask[:, gen.prompt_len:].bool() & (resp != tok.eos_id)
    return ((resp == cat) & real).sum(1).float() / real.sum(1).clamp(min=1)


def test_rloo_raises_the_toy_reward_without_a_critic(word_policy, tmp_path):
    """End to end through the Trainer: RLOO (k = 4, no critic) raises the share of " cat" from about 1/8,
    on training rollouts and on held-out prompts, with the first minibatch's ratio exactly 1."""
    torch.manual_seed(0)
    actor, ref = GPT(WORD_CONFIG), GPT(WORD_CONFIG)
    actor.load_state_dict(word_policy)
    ref.load_state_dict(word_policy)
    cfg = PPOConfig(rollout_batch_size=32, minibatch_size=8, ppo_epochs=4, max_new_tokens=10, kl_coef=0.05,
                    actor_lr=3e-4, normalize_reward=False, advantage="rloo", rloo_k=4)
    stage = PPOStage(actor, None, cfg, reward_fn=cat_fraction, ref=ref, eval_scorers={"target": cat_fraction})
    ids = torch.tensor(get_tokenizer().encode(PROMPT))
    items = lambda n: [{"prompt_ids": ids, "prompt": PROMPT} for _ in range(n)]  # noqa: E731
    train_cfg = TrainConfig(batch_size=cfg.prompts_per_rollout, max_steps=12, warmup_steps=0, eval_every=0,
                            save_every=0, log_every=1, adam_eps=1e-5, device="cpu", seed=1)
    final = Trainer(stage, train_cfg, str(tmp_path), items(64), collate_prompts, items(16)).fit()
    with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
        rows = [r for r in map(json.loads, f) if "score" in r]
    assert len(rows) == 12
    start = sum(r["score"] for r in rows[:2]) / 2
    end = sum(r["score"] for r in rows[-2:]) / 2
    assert 0.05 < start < 0.25, start
    assert end > start + 0.3, (start, end)
    assert final["eval/target"] > start + 0.3
    assert all(r["first_ratio_max_dev"] == 0.0 for r in rows)
    assert not any("value_loss" in r or "explained_variance" in r for r in rows)  # no critic was trained
    assert all(r["kl"] < 10.0 for r in rows)


# -----------------------------------------------------------------------------
# The reward model's mean over padding


def test_score_mean_with_padding_reads_every_position_and_depends_on_the_batch(tiny_config):
    """score_mean_with_padding: the score is the head's mean over all T positions, pads included, so a
    sequence batched with a longer one scores differently; the default readout (the last real token) is the
    same alone and batched. RMStage trains on the same readout."""
    tok = get_tokenizer()
    short, long = [464, 3290, 318, 257, EOS_ID], [40, 588, 257, 1310, 286, 11, 2272, 13, EOS_ID]
    batch_ids, batch_mask = tok.pad([short, long], padding_side="right")
    alone_ids, alone_mask = tok.pad([short], padding_side="right")
    assert batch_mask[0].tolist() == [1] * 5 + [0] * 4

    mean_rm = randomize_(RewardModel(replace(tiny_config, score_mean_with_padding=True)), seed=3).eval()
    last_rm = RewardModel(tiny_config).eval()
    last_rm.load_state_dict(mean_rm.state_dict())
    with torch.no_grad():
        values = mean_rm(batch_ids, batch_mask)  # (2, 9)
        got = mean_rm.score(batch_ids, batch_mask)
        alone = mean_rm.score(alone_ids, alone_mask)
        default_batched = last_rm.score(batch_ids, batch_mask)
        default_alone = last_rm.score(alone_ids, alone_mask)
    want = [sum(values[b, t].item() for t in range(9)) / 9 for b in range(2)]
    assert got.tolist() == pytest.approx(want, abs=1e-5)
    real_only = (values[0, :5].sum() / 5).item()
    assert abs(got[0].item() - real_only) > 1e-3  # the pads count
    assert abs(got[0].item() - alone[0].item()) > 1e-3  # so the batch changes the score
    assert alone[0].item() == pytest.approx(values[0, :5].mean().item(), abs=1e-5)
    # The default: the head at the last real token, whatever the padding.
    assert default_batched.tolist() == pytest.approx([values[0, 4].item(), values[1, 8].item()], abs=1e-5)
    assert default_alone[0].item() == pytest.approx(default_batched[0].item(), abs=1e-5)

    # RMStage scores a pair's chosen and rejected sides through the same readout.
    batch = {"chosen_ids": batch_ids[:1], "chosen_mask": batch_mask[:1],
             "rejected_ids": batch_ids[1:], "rejected_mask": batch_mask[1:]}
    with torch.no_grad():
        _, r_c, r_r = RMStage(mean_rm).rewards(FAKE_TRAINER, {"model": mean_rm}, batch)
        _, d_c, d_r = RMStage(last_rm).rewards(FAKE_TRAINER, {"model": last_rm}, batch)
        stage_values = mean_rm(torch.cat([batch_ids[:1], batch_ids[1:]]))  # as RMStage runs it: no mask
    assert [r_c.item(), r_r.item()] == pytest.approx(stage_values.mean(1).tolist(), abs=1e-5)
    assert [d_c.item(), d_r.item()] == pytest.approx([stage_values[0, 4].item(), stage_values[1, 8].item()], abs=1e-5)


# -----------------------------------------------------------------------------
# The sequence-level advantage


def test_sequence_advantage_is_reward_minus_prompt_value_with_one_critic_target():
    """advantage="sequence": every valid token gets R - V(prompt) (R = the row's summed shaped rewards,
    V(prompt) = old_values[:, 0]); the critic's target is R in column 0 alone."""
    cfg = PPOConfig(rollout_batch_size=4, minibatch_size=2, advantage="sequence")
    g = torch.Generator().manual_seed(1)
    rewards, old_values = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    lengths = [6, 1, 3, 4]
    mask = torch.tensor([[1.0] * n + [0.0] * (6 - n) for n in lengths])
    adv, returns, value_mask = advantages(rewards, old_values, mask, cfg)
    for b in range(4):
        total = sum(rewards[b, t].item() for t in range(lengths[b]))
        for t in range(6):
            valid = t < lengths[b]
            assert adv[b, t].item() == pytest.approx(total - old_values[b, 0].item() if valid else 0.0, abs=1e-5)
            assert returns[b, t].item() == pytest.approx(total if t == 0 else 0.0, abs=1e-5)
            assert value_mask[b, t].item() == (1.0 if t == 0 else 0.0)


class StubCriticModels:
    """A PPOModels stand-in whose log-probs and values are one learnable number each (so losses have a
    gradient); it records the size of every minibatch it is run on."""

    def __init__(self, Tn, value_offsets):
        self.theta = torch.nn.Parameter(torch.tensor(-1.0))
        self.phi = torch.nn.Parameter(torch.tensor(0.3))
        self.Tn, self.value_offsets, self.batch_sizes = Tn, value_offsets, []
        self.critic = object()

    def logprobs(self, tokens, attention_mask, prompt_len, with_entropy=False, policy=None):
        self.batch_sizes.append(tokens.size(0))
        return self.theta.expand(tokens.size(0), self.Tn) * 1.0, torch.zeros(tokens.size(0), self.Tn)

    def values(self, tokens, attention_mask, prompt_len):
        return self.phi + self.value_offsets[:tokens.size(0)]


def test_sequence_advantage_takes_one_optimizer_step_on_the_whole_rollout(tiny_config):
    """advantage="sequence": one epoch with the whole rollout as its minibatch, so one actor (and one critic)
    step per rollout whatever ppo_epochs and minibatch_size say; the value loss reads column 0 only. The
    default keeps cfg's epochs and minibatches."""
    B, Tp, Tn = 8, 2, 3
    cfg = PPOConfig(rollout_batch_size=B, minibatch_size=2, ppo_epochs=3, advantage="sequence", cliprange_value=10.0)
    assert update_schedule(cfg, B) == (1, B)
    assert update_schedule(replace(cfg, advantage="gae"), B) == (3, 2)

    g = torch.Generator().manual_seed(2)
    mask = torch.ones(B, Tn)
    rewards, old_values = torch.randn(B, Tn, generator=g), torch.zeros(B, Tn)
    adv, returns, value_mask = advantages(rewards, old_values, mask, cfg)
    tokens = torch.randint(100, 200, (B, Tp + Tn), generator=g)
    zeros = torch.zeros(B, Tn)
    rollout = Rollout(tokens, torch.ones_like(tokens), Tp, mask, torch.ones(B, dtype=torch.bool), zeros[:, 0],
                      zeros[:, 0], torch.full((B, Tn), -1.0), zeros, old_values, zeros, zeros, zeros, rewards, adv,
                      returns, value_mask, torch.randperm(B, generator=g), 0.0)
    offsets = torch.zeros(B, Tn)
    offsets[:, 1:] = 50.0  # the critic is far off after column 0: only column 0 may count
    models = StubCriticModels(Tn, offsets)
    calls, critic_losses = [], []

    def actor_step(loss):
        calls.append("actor")
        loss.backward()
        return 0.0

    def critic_step(loss):
        calls.append("critic")
        critic_losses.append(loss.item())
        return 0.0

    ppo_update(rollout, models, cfg, actor_step, critic_step)
    assert calls == ["actor", "critic"] and models.batch_sizes == [B]
    R = rewards.sum(1)
    want = sum(0.5 * (0.3 - R[b].item()) ** 2 for b in range(B)) / B
    assert critic_losses[0] == pytest.approx(want, rel=1e-5)

    # The Trainer is told the same: one optimizer step per rollout batch (cfg's count for the default).
    actor, ref, critic = GPT(tiny_config), GPT(tiny_config), ValueModel(tiny_config)
    reward = lambda gen, p: torch.zeros(len(p))  # noqa: E731
    assert PPOStage(actor, critic, cfg, reward_fn=reward, ref=ref).optimizer_steps_per_batch == 1
    gae_stage = PPOStage(actor, critic, replace(cfg, advantage="gae"), reward_fn=reward, ref=ref)
    assert gae_stage.optimizer_steps_per_batch == 3 * 4
    models.batch_sizes.clear()
    calls.clear()
    ppo_update(rollout._replace(value_mask=mask), models, replace(cfg, advantage="gae"), actor_step, critic_step)
    assert calls.count("actor") == 12 and models.batch_sizes == [2] * 12


# -----------------------------------------------------------------------------
# Top-k rollouts with full-softmax log-probs


def test_top_k_rollouts_sample_the_top_k_and_score_with_the_full_softmax(tiny_config):
    """rollout_top_k: every sampled token is among the policy's k most likely at its step, while the
    rollout's old and reference log-probs are log_softmax of the full logits (at the temperature), not
    renormalised over the top k."""
    K, T = 3, 0.7
    actor = randomize_(GPT(tiny_config), seed=1).eval()
    ref = randomize_(GPT(tiny_config), seed=2).eval()
    cfg = PPOConfig(rollout_batch_size=4, minibatch_size=2, max_new_tokens=6, temperature=T, rollout_top_k=K,
                    normalize_reward=False)
    stage = PPOStage(actor, ValueModel(tiny_config), cfg, reward_fn=lambda gen, p: torch.zeros(len(p)), ref=ref)
    models = stage.ppo_models(FAKE_TRAINER, stage.models)
    assert models.top_k == K
    tok = get_tokenizer()
    prompts = ["Hello there", "A longer prompt than the first", "Why?", "Tell me a story"]
    prompt_ids, prompt_mask = tok.pad(tok.encode_batch(prompts), padding_side="left")
    torch.manual_seed(0)
    r = collect_rollout(models, prompt_ids, prompt_mask, prompts, lambda gen, p: torch.zeros(len(p)),
                        ScoreNormalizer(enabled=False), 0.1, cfg)
    Tp, valid = r.prompt_len, r.response_mask.bool()
    assert valid.sum() >= 12
    with torch.no_grad():
        actor_logits = actor.logits(r.tokens, r.attention_mask)[:, Tp - 1:-1].float() / T  # (B, Tn, V)
        ref_logits = ref.logits(r.tokens, r.attention_mask)[:, Tp - 1:-1].float() / T
    response = r.tokens[:, Tp:]
    top = actor_logits.topk(K, dim=-1).indices  # (B, Tn, K)
    assert (top == response[..., None]).any(-1)[valid].all()
    full = torch.log_softmax(actor_logits, -1).gather(-1, response[..., None]).squeeze(-1)
    full_ref = torch.log_softmax(ref_logits, -1).gather(-1, response[..., None]).squeeze(-1)
    torch.testing.assert_close(r.old_logprobs[valid], full[valid], atol=1e-4, rtol=0)
    torch.testing.assert_close(r.ref_logprobs[valid], full_ref[valid], atol=1e-4, rtol=0)
    kth = actor_logits.topk(K, dim=-1).values[..., -1:]
    renormalised = torch.log_softmax(actor_logits.masked_fill(actor_logits < kth, float("-inf")), -1)
    renormalised = renormalised.gather(-1, response[..., None]).squeeze(-1)
    assert (r.old_logprobs[valid] - renormalised[valid]).abs().min() > 1.0


def test_rollouts_sample_the_full_softmax_by_default(tiny_config):
    """Without rollout_top_k a random policy's samples fall outside its top 3 (the switch is what restricts them)."""
    actor = randomize_(GPT(tiny_config), seed=1).eval()
    models = PPOModels(actor, None, None, 0.7)
    assert models.top_k is None
    prompt = torch.tensor([get_tokenizer().encode("Hello there")] * 4)
    gen = models.generate(prompt, torch.ones_like(prompt), 6, torch.Generator().manual_seed(0))
    Tp = gen.prompt_len
    with torch.no_grad():
        logits = actor.logits(gen.tokens, gen.attention_mask)[:, Tp - 1:-1]
    in_top = (logits.topk(3, dim=-1).indices == gen.tokens[:, Tp:, None]).any(-1)
    assert not in_top[gen.response_mask[:, Tp:].bool()].all()


# -----------------------------------------------------------------------------
# The fixed-order protocol and a position-biased judge


def constant_score(prompt, response):
    """Every answer is as good as every other."""
    return 1.0


def answer_sets(n):
    a = [{"text": f"answer a {i}", "ended": True, "finish": "eos", "tokens": 3} for i in range(n)]
    b = [{"text": f"answer b {i}", "ended": True, "finish": "eos", "tokens": 3} for i in range(n)]
    return {"a": a, "b": b}


def counting(judge):
    """Wrap judge.ask to record every (prompt, first, second) it is asked."""
    asked, ask = [], judge.ask

    def wrapped(prompt, first, second):
        asked.append((prompt, first, second))
        return ask(prompt, first, second)
    judge.ask = wrapped
    return asked


@pytest.mark.parametrize("p_b", [0.3, 0.6])
def test_fixed_order_inflates_the_win_rate_of_the_model_shown_as_b(p_b):
    """Answers of equal quality, a judge that says "B" with probability p_b and else the truth (a tie):
    with a always shown as B, a wins with probability p_b and ties otherwise, so its win-rate (ties half)
    is p_b + (1 - p_b)/2 = 0.5 + p_b/2. Asking both orders, a "B" in one order and a tie or the other "B"
    never agree on a winner: every pair is a tie, 50% exactly. The fixed order asks once per pair, a's
    answer second."""
    n = 400
    prompts = [f"prompt {i}" for i in range(n)]
    answers = answer_sets(n)
    fixed_judge = PositionBiasedJudge(constant_score, p_b)
    asked = counting(fixed_judge)
    fixed = judge_comparisons(prompts, answers, [("a", "b")], fixed_judge, fixed_order=True)["a:b"]
    assert len(asked) == n
    assert all(second == answers["a"][int(p.split()[1])]["text"] for p, _, second in asked)
    s_fixed = summarize(fixed, n_boot=200)
    assert s_fixed["win_rate"] == pytest.approx(0.5 + p_b / 2, abs=0.05)
    assert s_fixed["losses"] == 0 and s_fixed["unparseable_answers"] == 0 and s_fixed["position_a_rate"] == 0.0
    assert all(r["fixed_order"] and r["verdicts"][0] is None for r in fixed)

    both_judge = PositionBiasedJudge(constant_score, p_b)
    asked = counting(both_judge)
    both = judge_comparisons(prompts, answers, [("a", "b")], both_judge)["a:b"]
    assert len(asked) == 2 * n
    s_both = summarize(both, n_boot=200)
    assert s_both["win_rate"] == 0.5 and s_both["ties"] == n
    assert s_both["consistency"] < 1.0  # the bias shows as disagreement between the orders


def test_an_unbiased_judge_agrees_with_the_score_truth_in_both_protocols():
    """p_b = 0: the simulated judge is the score's verdict, so both protocols give the score judge's outcome
    on every pair (a better on two prompts of three, b on the third)."""
    n = 60
    prompts = [f"prompt {i}" for i in range(n)]
    answers = answer_sets(n)
    quality = {x["text"]: (2.0 if i % 3 else 0.0) if name == "a" else 1.0
               for name, xs in answers.items() for i, x in enumerate(xs)}
    truth_fn = lambda prompt, text: quality[text]  # noqa: E731
    truth = judge_comparisons(prompts, answers, [("a", "b")],
                              ScoreJudge("truth", lambda ps, xs: [quality[x["text"]] for x in xs]))["a:b"]
    want = ["win" if i % 3 else "loss" for i in range(n)]
    assert [r["outcome"] for r in truth] == want
    for fixed_order in (True, False):
        got = judge_comparisons(prompts, answers, [("a", "b")], PositionBiasedJudge(truth_fn, 0.0),
                                fixed_order=fixed_order)["a:b"]
        assert [r["outcome"] for r in got] == want, fixed_order
        assert summarize(got, n_boot=100)["win_rate"] == pytest.approx(2 / 3)


def test_position_biased_spec_builds_the_judge_on_a_score_judge():
    """--judge position-biased:P:SPEC: P parsed, SPEC made into the truth (here a function: judge, which
    sees the text with its EOS marker), a bad P refused."""
    judge = make_judge("position-biased:0.25:function:test_methods:constant_score")
    assert isinstance(judge, PositionBiasedJudge) and judge.kind == "pairwise" and judge.p_b == 0.25
    n = 400
    fixed = judge_comparisons([f"q{i}" for i in range(n)], answer_sets(n), [("a", "b")], judge, fixed_order=True)
    assert summarize(fixed["a:b"], n_boot=100)["win_rate"] == pytest.approx(0.5 + 0.25 / 2, abs=0.05)
    unbiased = make_judge("position-biased:0:function:test_methods:record_length")
    RECORDED.clear()
    assert unbiased.ask("q", "short", "a longer one")[0] == "B"
    assert unbiased.ask("q", "a longer one", "short")[0] == "A"
    assert RECORDED[0] == "short<|endoftext|>"
    for bad in ("position-biased:x:gold", "position-biased:1.5:gold"):
        with pytest.raises(UserError):
            make_judge(bad)


RECORDED = []


def record_length(prompt, response):
    """A score judge that keeps what it was shown: longer is better."""
    RECORDED.append(response)
    return float(len(response))


# -----------------------------------------------------------------------------
# Best-of-n


def test_analytic_kl_of_best_of_n():
    """KL(best-of-n || policy) = log n - (n - 1)/n: 0 at n = 1, values worked out by hand, increasing in n,
    and the limit of the exact KL of best-of-n over M equally likely distinct outcomes as M grows."""
    assert analytic_kl(1) == 0.0
    assert analytic_kl(2) == pytest.approx(0.693147 - 0.5, abs=1e-6)
    assert analytic_kl(4) == pytest.approx(1.386294 - 0.75, abs=1e-6)
    assert analytic_kl(16) == pytest.approx(2.772589 - 0.9375, abs=1e-6)
    for n in range(1, 65):
        assert analytic_kl(n) == pytest.approx(math.log(n) - (n - 1) / n, abs=1e-12)
        assert analytic_kl(n + 1) > analytic_kl(n)
    M = 20000
    for n in (2, 4, 16):
        # The best of n uniform draws from M ranked outcomes is outcome i with prob (i/M)^n - ((i-1)/M)^n.
        probs = [(i / M) ** n - ((i - 1) / M) ** n for i in range(1, M + 1)]
        exact = sum(p * math.log(p * M) for p in probs if p > 0)
        assert exact <= analytic_kl(n) + 1e-9
        assert exact == pytest.approx(analytic_kl(n), abs=2e-3)


def text_length(prompt, response):
    """Longer is better: at odds with ending, so the finished-first rule decides."""
    return float(len(response))


def letter_share(prompt, response):
    """Share of the response's characters that are ASCII letters (EOS marker left out)."""
    text = response.replace("<|endoftext|>", "")
    return sum(c.isascii() and c.isalpha() for c in text) / max(1, len(text))


PROMPTS = [f"Question {i}: what is {i} plus {i}?" for i in range(6)]
PARAMS = GenParams(max_new_tokens=8, temperature=1.0, top_k=0, seed=5, batch_size=4)


@pytest.fixture(scope="module")
def random_gpt():
    """A random GPT: its 8-token answers almost never end, so the score alone ranks them."""
    return randomize_(GPT(ModelConfig(n_layer=2, n_head=4, n_embd=64, block_size=128)), seed=4).eval()


@pytest.fixture(scope="module")
def eos_gpt():
    """A random GPT pushed towards EOS (the final LayerNorm's bias along EOS's embedding), so some 8-token
    answers end and some do not."""
    model = randomize_(GPT(ModelConfig(n_layer=2, n_head=4, n_embd=64, block_size=128)), seed=0).eval()
    with torch.no_grad():
        w = model.wte.weight[EOS_ID]
        model.ln_f.bias += 9.5 * w / w.pow(2).sum()
    return model


def recording(monkeypatch):
    """Record the answers of every generate_answers call best_of_n makes: [(seed, answers per prompt)]."""
    calls = []

    def wrapped(models, prompts, params, *args):
        out, info = generate_answers(models, prompts, params, *args)
        calls.append((params.seed, [dict(a) for a in next(iter(out.values()))]))
        return out, info
    monkeypatch.setattr(best_of_n, "generate_answers", wrapped)
    return calls


def strip(answer):
    return {k: v for k, v in answer.items() if k != "best_of"}


def test_best_of_n_picks_the_best_finished_sample(eos_gpt, monkeypatch):
    """The picked answer is one of the n samples, finished answers first, and among those the highest
    score (the earliest on ties); it records its index and its score."""
    judge = function_judge(text_length, "function:length")
    calls = recording(monkeypatch)
    picked, info = BestOfN(eos_gpt, judge, 6).answers(PROMPTS, PARAMS, "cpu", "fp32", None)
    assert len(calls) == 6 and len({seed for seed, _ in calls}) == 6
    samples = [answers for _, answers in calls]  # (n, P)
    scores = [judge.score_fn(PROMPTS, s) for s in samples]
    mixed = 0
    for i, answer in enumerate(picked):
        ended = [samples[k][i]["ended"] for k in range(6)]
        mixed += any(ended) and not all(ended)
        pool = [k for k in range(6) if ended[k]] or list(range(6))
        best = max(scores[k][i] for k in pool)
        index = answer["best_of"]["index"]
        assert index == min(k for k in pool if scores[k][i] == best)
        assert strip(answer) == samples[index][i]
        assert answer["best_of"]["score"] == pytest.approx(scores[index][i]) and answer["best_of"]["n"] == 6
        assert all(answer["best_of"]["score"] >= scores[k][i] for k in pool)
    assert mixed >= 2  # the finished-first rule was exercised
    assert info["kl_analytic"] == pytest.approx(math.log(6) - 5 / 6)
    assert info["score_picked"] == pytest.approx(sum(a["best_of"]["score"] for a in picked) / len(picked))
    # Every score equal: the first finished sample wins (sample 0 when none finished).
    calls.clear()
    flat, _ = BestOfN(eos_gpt, function_judge(constant_score, "function:constant"), 6).answers(
        PROMPTS, PARAMS, "cpu", "fp32", None)
    assert [a for _, a in calls] == samples
    for i, answer in enumerate(flat):
        assert answer["best_of"]["index"] == next((k for k in range(6) if samples[k][i]["ended"]), 0)


def test_best_of_1_is_the_policys_own_evaluation_answer(random_gpt):
    """Sample 0 uses the evaluation's seed: best-of-1 answers exactly as the policy does in evaluate.py,
    directly and as an answer source inside generate_answers."""
    judge = function_judge(letter_share, "function:letters")
    own, _ = generate_answers({"policy": random_gpt}, PROMPTS, PARAMS)
    picked, info = BestOfN(random_gpt, judge, 1).answers(PROMPTS, PARAMS, "cpu", "fp32", None)
    assert [strip(a) for a in picked] == own["policy"]
    assert all(a["best_of"]["index"] == 0 for a in picked) and info["kl_analytic"] == 0.0
    via, infos = generate_answers({"bo1": BestOfN(random_gpt, judge, 1)}, PROMPTS, PARAMS)
    assert [strip(a) for a in via["bo1"]] == own["policy"] and infos["bo1"]["best_of_n"] == 1
    other, _ = generate_answers({"policy": random_gpt}, PROMPTS, replace(PARAMS, seed=PARAMS.seed + 1))
    assert other["policy"] != own["policy"]  # the seed matters, so the match above is not luck


def test_best_of_4_picks_among_the_first_4_samples_of_best_of_16(random_gpt, monkeypatch):
    """Sample k is the same for every n: best-of-16's first 4 samples are best-of-4's, best-of-4's pick is
    the best of those 4, and per prompt the picked score grows with n (16 >= 4 >= 1)."""
    judge = function_judge(letter_share, "function:letters")
    calls = recording(monkeypatch)
    pick4, _ = BestOfN(random_gpt, judge, 4).answers(PROMPTS, PARAMS, "cpu", "fp32", None)
    four = [a for _, a in calls]
    calls.clear()
    pick16, _ = BestOfN(random_gpt, judge, 16).answers(PROMPTS, PARAMS, "cpu", "fp32", None)
    sixteen = [a for _, a in calls]
    calls.clear()
    pick1, _ = BestOfN(random_gpt, judge, 1).answers(PROMPTS, PARAMS, "cpu", "fp32", None)
    assert four == sixteen[:4] and [a for _, a in calls] == sixteen[:1]
    assert all(len({s[i]["text"] for s in sixteen}) > 8 for i in range(len(PROMPTS)))  # the samples differ
    assert not any(a["ended"] for s in sixteen for a in s)
    scores = [judge.score_fn(PROMPTS, s) for s in sixteen]
    for i in range(len(PROMPTS)):
        first4 = [scores[k][i] for k in range(4)]
        assert pick4[i]["best_of"]["index"] == first4.index(max(first4))
        assert pick16[i]["best_of"]["score"] >= pick4[i]["best_of"]["score"] >= pick1[i]["best_of"]["score"]
    mean = lambda xs: sum(a["best_of"]["score"] for a in xs) / len(xs)  # noqa: E731
    assert mean(pick16) >= mean(pick4) >= mean(pick1)


def test_best_of_n_raises_the_mean_toy_score(random_gpt):
    """With a function: score judge given by its spec, best-of-8 of a random GPT scores higher on average than
    best-of-1 (its plain samples), and its info reports both means."""
    bo1 = BestOfN(random_gpt, "function:test_methods:letter_share", 1)
    bo8 = BestOfN(random_gpt, "function:test_methods:letter_share", 8)
    assert bo8.scorer.kind == "score"
    one, info1 = bo1.answers(PROMPTS, PARAMS, "cpu", "fp32", None)
    eight, info8 = bo8.answers(PROMPTS, PARAMS, "cpu", "fp32", None)
    plain = [letter_share(p, a["text"] + ("<|endoftext|>" if a["ended"] else "")) for p, a in zip(PROMPTS, one)]
    assert info1["score_picked"] == pytest.approx(sum(plain) / len(plain))
    assert info8["score_first"] == pytest.approx(info1["score_picked"])
    assert info8["score_picked"] > info1["score_picked"] + 0.02
    with pytest.raises(UserError):
        BestOfN(random_gpt, PositionBiasedJudge(constant_score, 0.5), 2)  # a pairwise judge cannot rank
