"""PPO learns, and its invariants hold: first ratio exactly 1, nothing after EOS counts."""
import json
import os
import random
from dataclasses import replace

import pytest
import torch

from configs import ModelConfig, PPOConfig, TrainConfig
from dataset import collate_prompts, collate_sft
from gpt import GPT, Generation, ValueModel
from ppo import AdaptiveKL, PPOModels, ScoreNormalizer, collect_rollout, final_scores, ppo_update
from tokenizer import get_tokenizer
from trainers import PPOStage, SFTStage, Trainer

WORDS = [" cat", " dog", " bird", " fish", " cow", " pig", " hen", " ant"]
TARGET = " cat"
PROMPT = "\n\nHuman: Say some words.\n\nAssistant:"
CONFIG = ModelConfig(n_layer=2, n_head=4, n_embd=64, block_size=64)


def word_examples(n, seed=0):
    """Demonstrations: 6 words drawn uniformly from WORDS, then EOS."""
    tok, rng = get_tokenizer(), random.Random(seed)
    prompt = tok.encode(PROMPT)
    out = []
    for _ in range(n):
        response = tok.encode("".join(rng.choice(WORDS) for _ in range(6))) + [tok.eos_id]
        out.append({"input_ids": torch.tensor(prompt + response),
                    "loss_mask": torch.tensor([0] * len(prompt) + [1] * len(response))})
    return out


@pytest.fixture(scope="module")
def word_policy(tmp_path_factory):
    """A small LM that answers PROMPT with random words from WORDS: P(target word) ~ 1/8."""
    torch.manual_seed(0)
    model = GPT(CONFIG)
    cfg = TrainConfig(batch_size=16, lr=3e-3, max_steps=120, warmup_steps=10, eval_every=0, save_every=0,
                      log_every=120, device="cpu")
    run_dir = str(tmp_path_factory.mktemp("sft"))
    Trainer(SFTStage(model), cfg, run_dir, word_examples(256), collate_sft).fit()
    return model.state_dict()


def target_fraction(gen: Generation, prompts) -> torch.Tensor:
    """The test's reward: fraction of response tokens (EOS excluded) that are the target word."""
    tok = get_tokenizer()
    target = tok.encode(TARGET)[0]
    resp = gen.tokens[:, gen.prompt_len:]
    mask = gen.response_mask[:, gen.prompt_len:].bool() & (resp != tok.eos_id)
    return ((resp == target) & mask).sum(1).float() / mask.sum(1).clamp(min=1)


def prompt_items(n):
    ids = torch.tensor(get_tokenizer().encode(PROMPT))
    return [{"prompt_ids": ids, "prompt": PROMPT} for _ in range(n)]


def make_ppo(state, lora_rank, **ppo_overrides):
    actor_cfg = replace(CONFIG, lora_rank=lora_rank)
    actor = GPT(actor_cfg)
    actor.load_state_dict(state, strict=False)
    ref = None
    if lora_rank:
        from gpt import mark_only_lora_trainable
        mark_only_lora_trainable(actor)
    else:
        ref = GPT(CONFIG)
        ref.load_state_dict(state)
    critic = ValueModel(CONFIG)
    critic.backbone.load_state_dict(state)
    cfg = PPOConfig(**{"rollout_batch_size": 32, "minibatch_size": 8, "ppo_epochs": 4, "max_new_tokens": 10,
                       "kl_coef": 0.05, "actor_lr": 3e-3, "critic_lr": 3e-3, "normalize_reward": False,
                       **ppo_overrides})
    return PPOStage(actor, critic, cfg, reward_fn=target_fraction, ref=ref,
                    eval_scorers={"target": target_fraction})


def run_ppo(stage, run_dir, steps, **train_overrides):
    cfg = TrainConfig(**{"batch_size": stage.cfg.rollout_batch_size, "max_steps": steps, "warmup_steps": 0,
                         "eval_every": 0, "save_every": 0, "log_every": 1, "adam_eps": 1e-5, "device": "cpu",
                         "seed": 1, **train_overrides})
    metrics = Trainer(stage, cfg, run_dir, prompt_items(64), collate_prompts, prompt_items(32)).fit()
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return metrics, [r for r in rows if "score" in r]


@pytest.mark.slow
def test_ppo_raises_the_reward_with_bounded_kl(word_policy, tmp_path):
    torch.manual_seed(0)
    stage = make_ppo(word_policy, lora_rank=0, actor_lr=3e-4, critic_lr=1e-3)
    final, rows = run_ppo(stage, str(tmp_path), steps=12)
    start = sum(r["score"] for r in rows[:2]) / 2
    end = sum(r["score"] for r in rows[-2:]) / 2
    print(f"reward {start:.3f} -> {end:.3f}, KL {rows[0]['kl']:.3f} -> {rows[-1]['kl']:.3f}")
    assert 0.05 < start < 0.25  # about 1/8 before training
    assert end > start + 0.3, (start, end)
    assert final["eval/target"] > start + 0.3  # held-out prompts, fixed sampling seed
    assert rows[0]["kl"] == 0.0 and rows[-1]["kl"] > 0.1  # starts at its reference, then moves away
    # The first minibatch of every rollout reproduces the rollout's log-probs exactly.
    assert all(r["first_ratio_max_dev"] == 0.0 for r in rows)
    assert all(r["eos_rate"] > 0.5 for r in rows)


@pytest.mark.slow
def test_the_kl_penalty_holds_the_policy_near_its_reference(word_policy, tmp_path):
    """Same seed, same data, kl_coef 0 against 0.3: without the penalty the policy drifts far from the
    SFT model (KL ~1.5 nats over steps 6-8 here), with it the KL stays an order of magnitude lower. (A
    fixed bound on the KL would say nothing: how far a policy drifts in a few steps depends on the lr.)"""
    late_kl = {}
    for kl_coef in (0.0, 0.3):
        torch.manual_seed(0)
        stage = make_ppo(word_policy, lora_rank=0, actor_lr=3e-4, critic_lr=1e-3, kl_coef=kl_coef)
        run_dir = tmp_path / f"kl{kl_coef}"
        run_dir.mkdir()
        _, rows = run_ppo(stage, str(run_dir), steps=8)
        assert rows[0]["kl"] == 0.0
        late_kl[kl_coef] = sum(r["kl"] for r in rows[-3:]) / 3
    print(late_kl)
    assert late_kl[0.0] > 0.8, late_kl
    assert late_kl[0.3] < 0.25 * late_kl[0.0], late_kl


def test_full_finetune_keeps_the_frozen_reference(word_policy, tmp_path):
    """Without LoRA the reference is a separate frozen copy: it must stay untouched."""
    torch.manual_seed(0)
    stage = make_ppo(word_policy, lora_rank=0, ppo_epochs=2, actor_lr=3e-4)
    ref_before = {k: v.clone() for k, v in stage.frozen["ref"].state_dict().items()}
    _, rows = run_ppo(stage, str(tmp_path), steps=2)
    assert all(r["first_ratio_max_dev"] == 0.0 for r in rows)
    for k, v in stage.frozen["ref"].state_dict().items():
        assert torch.equal(v, ref_before[k]), k
    assert any(not torch.equal(v, stage.models["model"].state_dict()[k]) for k, v in ref_before.items())
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # the actor starts as the reference
    # Reference log-probs are the reference's own, output layer included (not the trained actor's).
    ref = stage.frozen["ref"]
    models = PPOModels(stage.models["model"], stage.models["critic"], ref)
    items = collate_prompts(prompt_items(4))
    gen = models.generate(items["input_ids"], items["attention_mask"], max_new_tokens=6)
    Tp = gen.prompt_len
    with torch.no_grad():
        got = models.ref_logprobs(gen.tokens, gen.attention_mask, Tp)
        logits = ref.logits(gen.tokens, gen.attention_mask)[:, Tp - 1:-1]
        want = torch.log_softmax(logits.float(), -1).gather(-1, gen.tokens[:, Tp:, None]).squeeze(-1)
        actor_logp = models.logprobs(gen.tokens, gen.attention_mask, Tp)[0]
    mask = gen.response_mask[:, Tp:].bool()
    torch.testing.assert_close(got[mask], want[mask], atol=1e-5, rtol=0)
    assert (actor_logp[mask] - want[mask]).abs().max() > 1e-3  # the actor has moved away from it


def test_lora_actor_uses_its_base_as_reference(word_policy, tmp_path):
    """A LoRA actor needs no second model: the reference is the actor with adapters off."""
    torch.manual_seed(0)
    stage = make_ppo(word_policy, lora_rank=8, ppo_epochs=2, actor_lr=1e-3)
    assert "ref" not in stage.frozen
    base = {k: v.clone() for k, v in stage.models["model"].state_dict().items() if "lora_" not in k}
    _, rows = run_ppo(stage, str(tmp_path), steps=2)
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-4) and rows[1]["kl"] != 0.0
    assert all(r["first_ratio_max_dev"] == 0.0 for r in rows)
    after = stage.models["model"].state_dict()
    assert all(torch.equal(v, after[k]) for k, v in base.items())  # only adapters moved
    assert any(after[k].abs().sum() > 0 for k in after if "lora_B" in k)


def _models_and_cfg(state, **ppo_overrides):
    """The PPO networks of make_ppo, as ppo.py takes them (no Trainer)."""
    stage = make_ppo(state, lora_rank=8, **ppo_overrides)
    models = PPOModels(stage.models["model"], stage.models["critic"], None, stage.cfg.temperature)
    return models, stage.cfg


COMPILE = pytest.mark.skipif(not os.environ.get("RUN_COMPILE_TESTS"),
                             reason="torch.compile takes ~40 s on 2 cores: RUN_COMPILE_TESTS=1 runs it")


@pytest.mark.parametrize("temperature, compile, decode_precision", [
    (0.7, False, "fp32"), (1.3, False, "int8"), (1.0, False, "bf16"), pytest.param(1.0, True, "fp32", marks=COMPILE)])
def test_first_ratio_is_one_at_any_temperature_decode_precision_and_compiled(
        word_policy, tmp_path, monkeypatch, temperature, compile, decode_precision):
    """Rollout and update compute log-probs the same way at a sampling temperature != 1, and when the
    tokens are drawn by a bf16 / int8 copy of the policy (its log-probs are never used), so the first
    minibatch of each rollout has ratio exactly 1 and the update moves the policy. Under torch.compile
    the rollout runs the no-grad graph and the update the training graph, which inductor fuses
    differently: measured 7e-7 on the first step on this CPU, so compiled runs are held to 1e-5."""
    asked = []
    for_decoding = GPT.for_decoding
    monkeypatch.setattr(GPT, "for_decoding",
                        lambda self, p, compile=False: asked.append(p) or for_decoding(self, p, compile))
    torch.manual_seed(0)
    stage = make_ppo(word_policy, lora_rank=8, temperature=temperature, rollout_batch_size=8, minibatch_size=4,
                     ppo_epochs=1, max_new_tokens=6, decode_precision=decode_precision)
    before = {k: v.clone() for k, v in stage.models["model"].state_dict().items() if "lora" in k}
    _, rows = run_ppo(stage, str(tmp_path), steps=2, compile=compile)
    assert len(asked) >= 2 and set(asked) == {decode_precision}  # every rollout sampled through it
    tolerance = 1e-5 if compile else 0.0
    assert all(r["first_ratio_max_dev"] <= tolerance for r in rows), [r["first_ratio_max_dev"] for r in rows]
    after = stage.models["model"].state_dict()
    assert any((after[k] - v).abs().max() > 0 for k, v in before.items())


@COMPILE
def test_a_compiled_rollout_sampler_compiles_once_and_follows_the_policy(word_policy):
    """PPOConfig.decode_compile: the bf16 sampler, a new copy every rollout, is compiled on the
    first; later rollouts, after updates moved the policy, add no graphs (dynamo reuses the code
    for a module of the same shape) and decode with the new weights (the copy's logits are an eager
    copy's within bf16 rounding, and far from the old weights')."""
    from torch._dynamo.utils import counters
    policy = GPT(CONFIG).eval()
    policy.load_state_dict(word_policy)
    models = PPOModels(policy, None, decode_precision="bf16", decode_compile=True)
    items = collate_prompts(prompt_items(8))
    ids, mask = items["input_ids"], items["attention_mask"]
    graphs = []
    for rollout in range(3):
        models.generate(ids, mask, max_new_tokens=6, generator=torch.Generator().manual_seed(rollout))
        with torch.no_grad():
            stale = models.sampler().logits(ids, mask).float()  # no cache: a graph of its own
            graphs.append(counters["stats"]["unique_graphs"])
            for p in policy.parameters():  # an update
                p.add_(torch.randn_like(p) * 0.02)
    with torch.no_grad():
        got = models.sampler().logits(ids, mask).float()
        want = policy.for_decoding("bf16").logits(ids, mask).float()
    assert graphs[0] > 0 and graphs[1] == graphs[2] == graphs[0], graphs
    assert (got - want).abs().max() < 0.1 * (stale - want).abs().max()


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_a_low_precision_sampler_stays_within_1e_3_nats_of_the_trained_policy(word_policy, precision):
    """The tolerance PPOConfig.decode_precision states, on a trained (peaked: ~1.9 nats of entropy
    here) policy rather than a random one: KL(policy || sampler) <= 1e-3 nats at every response
    position (measured at most 2.6e-4 for int8, 6.5e-5 for bf16; means 1.5e-4 and 3e-5)."""
    policy = GPT(CONFIG).eval()
    policy.load_state_dict(word_policy)
    items = collate_prompts(prompt_items(16))
    with torch.no_grad():
        gen = policy.generate(items["input_ids"], items["attention_mask"], max_new_tokens=10,
                              generator=torch.Generator().manual_seed(0))
        Tp, resp = gen.prompt_len, gen.response_mask[:, gen.prompt_len:].bool()
        want = torch.log_softmax(policy.logits(gen.tokens, gen.attention_mask)[:, Tp - 1:-1], -1)
        entropy = -(want.exp() * want).sum(-1)[resp].mean()
        sampler = policy.for_decoding(precision)
        got = torch.log_softmax(sampler.logits(gen.tokens, gen.attention_mask)[:, Tp - 1:-1].float(), -1)
    kl = (want.exp() * (want - got)).sum(-1)[resp]  # (n,) one per response token
    assert entropy < 3.0, entropy  # a peaked policy, where rounding errors matter most
    print(precision, f"entropy {entropy:.2f}, KL mean {kl.mean():.2e} max {kl.max():.2e}")
    assert kl.max() < 1e-3, (kl.mean(), kl.max())


def test_tokens_after_eos_change_nothing(word_policy):
    """Log-probs, values, rewards and advantages of a rollout do not depend on what follows each row's EOS."""
    torch.manual_seed(0)
    models, cfg = _models_and_cfg(word_policy, max_new_tokens=12)
    tok = get_tokenizer()
    prompt = torch.tensor([tok.encode(PROMPT)] * 2)
    Tp = prompt.size(1)
    # Row 0 ends after two words, row 1 runs the whole budget: row 0 has 9 pad positions to overwrite.
    words = tok.encode(" cat dog bird fish cow pig hen ant cat dog bird fish")
    response = torch.tensor([words[:2] + [tok.eos_id] + [tok.eos_id] * 9, words[:12]])
    resp_mask = torch.tensor([[1] * 3 + [0] * 9, [1] * 12])
    tokens = torch.cat([prompt, response], 1)
    attn = torch.cat([torch.ones_like(prompt), resp_mask], 1)
    gen = Generation(tokens, attn, torch.cat([torch.zeros_like(prompt), resp_mask], 1), Tp)
    garbage = tokens.clone()
    garbage[:, Tp:][resp_mask == 0] = 1234
    assert (garbage != tokens).sum() == 9

    def rollout_of(seq):
        models.generate = lambda *args, **kwargs: gen._replace(tokens=seq)
        torch.manual_seed(1)  # the same minibatch order for both
        return collect_rollout(models, prompt, torch.ones_like(prompt), [PROMPT] * 2, target_fraction,
                               ScoreNormalizer(enabled=False), 0.05, replace(cfg, rollout_batch_size=2,
                                                                              minibatch_size=1))

    want, got = rollout_of(tokens), rollout_of(garbage)
    mask = want.response_mask
    assert mask.tolist() == resp_mask.float().tolist()
    for field in ("old_logprobs", "ref_logprobs", "old_values", "kl", "rewards", "advantages", "returns"):
        torch.testing.assert_close(getattr(got, field) * mask, getattr(want, field) * mask, msg=field)
    for field in ("rewards", "advantages", "returns"):  # what the losses use is zero past EOS
        assert (getattr(want, field) * (1 - mask)).abs().max() == 0, field
    torch.testing.assert_close(got.scores, want.scores)
    assert want.ended.tolist() == [True, False]


def test_first_minibatch_ratio_is_one_and_the_update_follows_the_advantages(word_policy):
    """ppo_update called directly: the first minibatch reproduces the rollout's log-probs exactly, and
    after the update the policy puts more probability on tokens with positive advantage than on
    those with negative advantage (the surrogate PPO maximises)."""
    torch.manual_seed(0)
    models, cfg = _models_and_cfg(word_policy, ppo_epochs=2, actor_lr=1e-3)
    cfg = replace(cfg, rollout_batch_size=16, minibatch_size=4)
    items = collate_prompts(prompt_items(16))
    rollout = collect_rollout(models, items["input_ids"], items["attention_mask"], items["prompts"], target_fraction,
                              ScoreNormalizer(enabled=False), cfg.kl_coef, cfg)
    assert rollout.kl.abs().max() == 0  # the actor starts as its reference (LoRA B = 0)
    actor_params = [p for p in models.actor.parameters() if p.requires_grad]
    critic_params = [p for p in models.critic.parameters() if p.requires_grad]
    opt_a, opt_c = torch.optim.Adam(actor_params, lr=1e-3), torch.optim.Adam(critic_params, lr=1e-3)
    steps = []

    def step(opt, name):
        def go(loss):
            steps.append(name)
            opt.zero_grad()
            loss.backward()
            opt.step()
            return 0.0
        return go

    stats = ppo_update(rollout, models, cfg, step(opt_a, "actor"), step(opt_c, "critic"))
    assert stats["first_ratio_max_dev"] == 0.0
    assert steps == ["actor", "critic"] * (cfg.ppo_epochs * 16 // 4)
    with torch.no_grad():
        new_logp = models.logprobs(rollout.tokens, rollout.attention_mask, rollout.prompt_len)[0]
    change = (new_logp - rollout.old_logprobs) * rollout.response_mask  # (B, Tn)
    up = change[(rollout.advantages > 0) & (rollout.response_mask > 0)].mean()
    down = change[(rollout.advantages < 0) & (rollout.response_mask > 0)].mean()
    assert up > 0 > down, (up.item(), down.item())


def test_adaptive_kl_moves_beta_towards_the_target_and_resumes():
    kl = AdaptiveKL(0.1, target=6.0, horizon=100)
    kl.update(12.0, n_samples=10)  # KL above target: beta grows, by at most 20% * n / horizon
    assert kl.value == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
    kl.update(5.4, n_samples=10)  # below: shrinks by (5.4 - 6) / 6 = -10% * n / horizon
    assert kl.value == pytest.approx(0.1 * 1.02 * (1 - 0.1 * 10 / 100))
    fixed = AdaptiveKL(0.1)
    fixed.update(100.0, 10)
    assert fixed.value == 0.1
    again = AdaptiveKL(0.5, target=6.0, horizon=100)
    again.load_state_dict(kl.state_dict())
    assert again.value == kl.value


def test_score_normalizer_fits_once_and_resumes():
    norm = ScoreNormalizer()
    samples = torch.tensor([1.0, 2.0, 3.0, 6.0])
    norm.fit(samples)
    z = norm(samples)
    assert z.mean().abs() < 1e-6 and z.std().item() == pytest.approx(1.0)
    other = ScoreNormalizer()
    other.load_state_dict(norm.state_dict())
    assert other.fitted and torch.equal(other(samples), z)
    assert torch.equal(ScoreNormalizer(enabled=False)(samples), samples) and ScoreNormalizer(enabled=False).fitted


def test_missing_eos_penalty_and_clip():
    cfg = PPOConfig(missing_eos_penalty=3.0, reward_clip=1.5)
    norm = ScoreNormalizer()
    norm.fit(torch.tensor([0.0, 2.0]))  # gain 1/sqrt(2), bias -1/sqrt(2); lowest fitted score -1/sqrt(2)
    assert norm.floor == pytest.approx(-1 / 2 ** 0.5)
    raw, ended = torch.tensor([0.0, 10.0, 10.0]), torch.tensor([True, True, False])
    got = final_scores(raw, ended, norm, cfg)
    assert got.tolist() == pytest.approx([-1 / 2 ** 0.5, 1.5, -1 / 2 ** 0.5 - 3.0])


@pytest.mark.parametrize("seed", range(5))
def test_never_ending_never_pays_more_than_the_worst_ending(seed):
    """Whatever the RM gives finished answers, in this batch or in the normaliser's samples, an answer
    without EOS is rewarded `missing_eos_penalty` below the worst of them (a fixed penalty in
    normalised units would sit above an answer the RM hates more than the SFT samples)."""
    g = torch.Generator().manual_seed(seed)
    norm = ScoreNormalizer()
    norm.fit(torch.randn(64, generator=g))
    raw = torch.randn(32, generator=g) * 5 - 3  # many far below anything the normaliser saw
    ended = torch.rand(32, generator=g) < 0.7
    for cfg in (PPOConfig(), PPOConfig(reward_clip=1.0), PPOConfig(missing_eos_penalty=0.0)):
        got = final_scores(raw, ended, norm, cfg)
        worst = min(got[ended].min().item(), norm.floor)
        assert torch.all(got[~ended] == worst - cfg.missing_eos_penalty)
        assert torch.all(got[~ended] <= got[ended].min())
    off = final_scores(raw, ended, norm, PPOConfig(missing_eos_penalty=None))
    assert torch.equal(off, norm(raw))  # off: every answer scored as it is
    state = ScoreNormalizer()
    state.load_state_dict(norm.state_dict())
    assert state.floor == norm.floor  # resumes with its floor