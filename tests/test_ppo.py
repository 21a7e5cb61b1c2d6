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


def run_ppo(stage, run_dir, steps):
    cfg = TrainConfig(batch_size=stage.cfg.rollout_batch_size, max_steps=steps, warmup_steps=0, eval_every=0,
                      save_every=0, log_every=1, adam_eps=1e-5, device="cpu", seed=1)
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
    assert all(r["kl"] < 5.0 for r in rows)  # the KL penalty keeps the policy near the reference
    # The first minibatch of every rollout reproduces the rollout's log-probs exactly (item 17).
    assert all(r["first_ratio_max_dev"] == 0.0 for r in rows)
    assert all(r["eos_rate"] > 0.5 for r in rows)


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


def test_tokens_after_eos_change_nothing(word_policy):
    """Log-probs, values and rewards of a rollout do not depend on what follows each row's EOS."""
    torch.manual_seed(0)
    stage = make_ppo(word_policy, lora_rank=8)
    tok = get_tokenizer()

    class T:  # the bits of Trainer the stage's forward passes use
        device = torch.device("cpu")
        autocast = staticmethod(lambda: torch.autocast("cpu", enabled=False))

    prompt = torch.tensor([tok.encode(PROMPT)] * 2)
    gen = stage.models["model"].generate(prompt, max_new_tokens=10, temperature=1.0)
    Tp = gen.prompt_len
    mask = gen.response_mask[:, Tp:].float()
    garbage = gen.tokens.clone()
    garbage[:, Tp:][mask == 0] = 1234  # overwrite everything after EOS
    for seq in (gen.tokens, garbage):
        logp = stage.logprobs(T, stage.models["model"], seq, gen.attention_mask, Tp)[0]
        values = stage.values(T, stage.models["critic"], seq, gen.attention_mask, Tp)
        if seq is gen.tokens:
            want_logp, want_values = logp * mask, values * mask
        else:
            torch.testing.assert_close(logp * mask, want_logp)
            torch.testing.assert_close(values * mask, want_values)
