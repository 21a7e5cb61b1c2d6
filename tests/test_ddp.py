"""Data parallelism on 2 CPU processes (gloo): each stage takes the step a single process takes
on the same global batch, metrics are everyone's, and PPO's batch statistics are global.

Processes are spawned in-test (torch.multiprocessing) with the environment torchrun would give
them; the single-process runs happen in this process."""
import json
import math
import os
import random
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from common import leave_process_group
from configs import EOS_ID, ModelConfig, PPOConfig, TrainConfig
from dataset import PreferenceDataset, collate_preference, collate_prompts, collate_sft
from gpt import GPT, Generation, RewardModel, ValueModel
from ppo import PPOModels, ScoreNormalizer, collect_rollout
from tokenizer import get_tokenizer
from trainers import PPOStage, RMStage, SFTStage, Trainer

CONFIG = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=64)
WORDS = [" cat", " dog", " bird", " fish", " cow", " pig", " hen", " ant"]
PROMPT = "\n\nHuman: Say some words.\n\nAssistant:"
STEPS = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, *args):
    """Run fn(rank, *args) in 2 processes of one gloo group, as torchrun would start them."""
    mp.spawn(_in_group, args=(free_port(), fn, args), nprocs=2, join=True)


def _in_group(rank, port, fn, args):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), WANDB_MODE="disabled")
    torch.set_num_threads(1)
    fn(rank, *args)
    leave_process_group()  # as a CLI does: without it about 1 run in 20 aborted at exit


# -----------------------------------------------------------------------------
# SFT and RM: same global batch, same step


def sft_examples(n=64, seed=0):
    """Responses of 1 to 8 words: micro-batches hold different numbers of target tokens, so a mean
    per micro-batch (or per process) would weight tokens unequally and show."""
    tok, rng = get_tokenizer(), random.Random(seed)
    prompt = tok.encode(PROMPT)
    out = []
    for _ in range(n):
        response = tok.encode("".join(rng.choice(WORDS) for _ in range(rng.randint(1, 8)))) + [EOS_ID]
        out.append({"input_ids": torch.tensor(prompt + response),
                    "loss_mask": torch.tensor([0] * len(prompt) + [1] * len(response))})
    return out


def rm_rows(n=64, seed=0):
    rng, rows = random.Random(seed), []
    while len(rows) < n:
        a, b = ([rng.choice(WORDS) for _ in range(rng.randint(2, 6))] for _ in range(2))
        if a.count(" cat") != b.count(" cat"):
            good, bad = (a, b) if a.count(" cat") > b.count(" cat") else (b, a)
            rows.append({"prompt": PROMPT, "chosen": "".join(good), "rejected": "".join(bad)})
    return rows


def train(kind, out_dir, batch_size, grad_accum):
    """STEPS optimizer steps of `kind` ("sft" | "rm") from the same initial weights; the main
    process writes the final weights and the logged metrics to out_dir."""
    torch.manual_seed(0)
    if kind == "sft":
        model, stage_cls = GPT(CONFIG), SFTStage
        data, collate = sft_examples(), collate_sft
    else:
        model, stage_cls = RewardModel(CONFIG), RMStage
        data, collate = PreferenceDataset(rm_rows(), get_tokenizer(), 64), collate_preference
    cfg = TrainConfig(batch_size=batch_size, grad_accum=grad_accum, lr=1e-2, max_steps=STEPS, warmup_steps=0,
                      eval_every=0, save_every=0, log_every=1, device="cpu", seed=3)
    trainer = Trainer(stage_cls(model), cfg, out_dir, data, collate)
    trainer.fit()
    if trainer.dist.is_main:
        torch.save(model.state_dict(), os.path.join(out_dir, "weights.pt"))


def _train_rank(rank, kind, out_dir):
    train(kind, out_dir, batch_size=4, grad_accum=1)


def logged(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# Parameters that only shift every score (a reward model's last bias and the bias before it, through
# the head) get no gradient from a pairwise loss: Adam turns their rounding noise into full steps.
SHIFT_ONLY = {"head.bias", "backbone.ln_f.bias"}


@pytest.mark.parametrize("kind", ["sft", "rm"])
def test_two_processes_take_the_single_process_step(kind, tmp_path):
    """2 processes x batch 4 == 1 process x batch 8 == 1 process x batch 4 with 2 accumulation
    steps: the same weights after STEPS steps and the same logged loss, accuracy and gradient norm."""
    runs = {name: str(tmp_path / name) for name in ("ddp", "one", "accum")}
    for d in runs.values():
        os.makedirs(d)
    spawn(_train_rank, kind, runs["ddp"])
    train(kind, runs["one"], batch_size=8, grad_accum=1)
    train(kind, runs["accum"], batch_size=4, grad_accum=2)
    weights = {name: torch.load(os.path.join(d, "weights.pt")) for name, d in runs.items()}
    start = (GPT if kind == "sft" else RewardModel)(CONFIG)
    moved = 0
    for k, w in weights["one"].items():
        if kind == "rm" and k in SHIFT_ONLY:
            continue
        moved = max(moved, (w - start.state_dict()[k]).abs().max().item())
        for other in ("ddp", "accum"):
            torch.testing.assert_close(weights[other][k], w, atol=1e-4, rtol=0, msg=f"{other}: {k}")
    assert moved > 1e-3  # the runs trained (lr 1e-2): equality is not that of untouched weights
    rows = {name: [r for r in logged(d) if "loss" in r] for name, d in runs.items()}
    assert [r["step"] for r in rows["ddp"]] == list(range(1, STEPS + 1))  # once per step, not per process
    keys = ["loss", "grad_norm"] + (["accuracy", "margin"] if kind == "rm" else [])
    for name in ("ddp", "accum"):
        for got, want in zip(rows[name], rows["one"]):
            for k in keys:
                assert got[k] == pytest.approx(want[k], rel=1e-4, abs=1e-6), (name, got["step"], k)


def test_micro_batches_are_weighted_by_their_target_tokens(tmp_path):
    """One process, two micro-batches of very different sizes: the step's loss is the mean over all
    their target tokens, not the mean of the two micro-batch means."""
    torch.manual_seed(0)
    tok = get_tokenizer()
    prompt = tok.encode(PROMPT)

    def example(n_words):
        ids = prompt + tok.encode(" cat" * n_words) + [EOS_ID]
        return {"input_ids": torch.tensor(ids), "loss_mask": torch.tensor([0] * len(prompt) + [1] * (n_words + 1))}
    short, long = collate_sft([example(1)]), collate_sft([example(12)])
    model = GPT(CONFIG)
    cfg = TrainConfig(batch_size=1, grad_accum=2, lr=1e-9, max_steps=1, warmup_steps=0, eval_every=0, save_every=0,
                      device="cpu")
    trainer = Trainer(SFTStage(model), cfg, str(tmp_path), [example(1), example(2)], collate_sft)
    stage = trainer.stage
    with torch.no_grad():
        l_short, _ = stage.loss(trainer, trainer.wrapped, short)
        l_long, _ = stage.loss(trainer, trainer.wrapped, long)
    metrics = stage.train_step(trainer, [short, long])
    want = (l_short.item() * 2 + l_long.item() * 13) / 15  # 2 and 13 target tokens (words + EOS)
    assert stage.weight(short) == 2 and stage.weight(long) == 13
    assert metrics["loss"] == pytest.approx(want, rel=1e-5)
    assert abs(want - (l_short.item() + l_long.item()) / 2) > 1e-3  # the two means really differ


# -----------------------------------------------------------------------------
# PPO: a rollout split over processes is the single-process rollout


class ScriptedPolicy(PPOModels):
    """A policy whose answers, log-probs and values are fixed functions of the prompt and tokens,
    so that which process computes a row cannot change it: answer lengths differ per prompt, and
    every third prompt is never finished (no EOS)."""

    def __init__(self):
        self.critic = True

    def generate(self, prompt_ids, prompt_mask, max_new_tokens, generator=None):
        B, Tp = prompt_ids.shape
        response = torch.zeros(B, max_new_tokens, dtype=torch.long)
        mask = torch.zeros(B, max_new_tokens, dtype=torch.long)
        for b in range(B):
            p = int(prompt_ids[b, 0])
            n = 1 + p % max_new_tokens
            response[b, :n] = torch.arange(n) + 100 + p
            if p % 3:
                response[b, n - 1] = EOS_ID
            mask[b, :n] = 1
        return Generation(torch.cat([prompt_ids, response], 1), torch.cat([prompt_mask, mask], 1),
                          torch.cat([torch.zeros_like(prompt_mask), mask], 1), Tp)

    def logprobs(self, tokens, attention_mask, prompt_len, with_entropy=False, policy=None):
        return -(tokens[:, prompt_len:] % 7).float() / 10, None

    def ref_logprobs(self, tokens, attention_mask, prompt_len):
        return -(tokens[:, prompt_len:] % 5).float() / 10

    def values(self, tokens, attention_mask, prompt_len):
        return (tokens[:, prompt_len:] % 3).float() / 10


PROMPTS = 8


def scripted_rollout(whiten, rows, gather=None):
    cfg = PPOConfig(rollout_batch_size=len(rows), minibatch_size=2, max_new_tokens=6, whiten_rewards=whiten,
                    kl_coef=0.3, normalize_reward=True)
    ids = torch.tensor([[p, p + 50] for p in rows])
    score = lambda gen, prompts: torch.tensor([float(p) ** 1.5 for p in prompts])  # noqa: E731
    return collect_rollout(ScriptedPolicy(), ids, torch.ones_like(ids), [str(p) for p in rows], score,
                           ScoreNormalizer(enabled=True), cfg.kl_coef, cfg, gather=gather)


def _rollout_rank(rank, whiten, out_dir):
    from trainers import Dist
    d = Dist()
    d.init(torch.device("cpu"))
    rows = list(range(1, PROMPTS + 1))[rank * PROMPTS // 2:(rank + 1) * PROMPTS // 2]
    r = scripted_rollout(whiten, rows, gather=d.concat)
    torch.save({f: getattr(r, f) for f in ("scores", "rewards", "advantages", "returns")},
               os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.parametrize("whiten", [False, True])
def test_a_rollout_split_over_processes_is_the_single_process_rollout(whiten, tmp_path):
    """The score normaliser's fit, reward whitening and advantage whitening see the whole batch:
    each process's rows equal the same rows of one process that sampled every prompt."""
    spawn(_rollout_rank, whiten, str(tmp_path))
    one = scripted_rollout(whiten, list(range(1, PROMPTS + 1)))
    halves = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for field in ("scores", "rewards", "advantages", "returns"):
        got = torch.cat([h[field] for h in halves])
        torch.testing.assert_close(got, getattr(one, field), msg=field)
    # A per-process normaliser would give each half mean 0: the global one does not.
    assert abs(halves[0]["scores"].mean().item()) > 0.1


# -----------------------------------------------------------------------------
# PPO: the trainer under DDP


def target_reward(gen, prompts):
    """Fraction of answer tokens that are ' cat'."""
    cat = get_tokenizer().encode(" cat")[0]
    resp, mask = gen.tokens[:, gen.prompt_len:], gen.response_mask[:, gen.prompt_len:].bool()
    return ((resp == cat) & mask).sum(1).float() / mask.sum(1).clamp(min=1)


def _ppo_rank(rank, out_dir):
    torch.manual_seed(0)
    actor, ref, critic = GPT(CONFIG), GPT(CONFIG), ValueModel(CONFIG)
    ref.load_state_dict(actor.state_dict())
    cfg = PPOConfig(rollout_batch_size=8, minibatch_size=4, ppo_epochs=2, max_new_tokens=6, actor_lr=1e-3,
                    critic_lr=1e-3, normalize_reward=True, whiten_rewards=True)
    stage = PPOStage(actor, critic, cfg, reward_fn=target_reward, ref=ref)
    ids = torch.tensor(get_tokenizer().encode(PROMPT))
    prompts = [{"prompt_ids": ids, "prompt": PROMPT} for _ in range(32)]
    tcfg = TrainConfig(batch_size=8, max_steps=3, warmup_steps=0, eval_every=0, save_every=0, log_every=1,
                       device="cpu", seed=1)
    trainer = Trainer(stage, tcfg, out_dir, prompts, collate_prompts)
    torch.manual_seed(100 + rank)  # each process samples its own answers, as the CLIs seed them
    trainer.fit()
    torch.save({**{f"actor.{k}": v for k, v in actor.state_dict().items()},
                **{f"critic.{k}": v for k, v in critic.state_dict().items()}},
               os.path.join(out_dir, f"rank{rank}.pt"))


def test_ppo_trains_under_two_processes(tmp_path):
    """PPO under DDP: both replicas end equal (gradients were averaged), every step is logged once,
    rollouts differ per process yet the first minibatch of each reproduces its log-probs exactly."""
    spawn(_ppo_rank, str(tmp_path))
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    start = GPT(CONFIG).state_dict()
    assert any((a[f"actor.{k}"] - v).abs().max() > 0 for k, v in start.items())  # it trained
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)
    rows = [r for r in logged(str(tmp_path)) if "score" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["first_ratio_max_dev"] == 0.0 for r in rows)


# -----------------------------------------------------------------------------
# Which device collectives use


def test_collectives_put_their_tensors_where_the_backend_needs_them(monkeypatch):
    """NCCL reduces only GPU tensors: under a CUDA device every reduction (sum, mean, the metric
    average) builds its tensor on that device; under gloo on the CPU. Checked without a GPU by
    recording the device each collective's tensor was asked for."""
    from trainers import Dist
    asked, real_tensor = [], torch.tensor
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", lambda t, op=None: t.mul_(2) if op == dist.ReduceOp.SUM else t)

    def tensor(data, dtype=None, device=None):
        asked.append(torch.device(device) if device is not None else torch.device("cpu"))
        return real_tensor(data, dtype=dtype)  # built on the CPU: there is no GPU here
    monkeypatch.setattr(torch, "tensor", tensor)
    for device, want in ((torch.device("cuda", 1), torch.device("cuda", 1)), (torch.device("cpu"), torch.device("cpu"))):
        d = Dist()
        d.init(device)
        asked.clear()
        assert d.sum(3.0) == 6.0 and d.mean(3.0) == 3.0  # every process held 3
        avg = d.average({"loss": 2.0, "ratio_max": 5.0, "empty": float("nan")})
        assert avg["loss"] == 2.0 and avg["ratio_max"] == 5.0 and math.isnan(avg["empty"])
        assert asked and all(a == want for a in asked), (device, asked)
