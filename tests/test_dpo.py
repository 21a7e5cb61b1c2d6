"""DPO and IPO: the losses against closed forms, the log-probs they read, learning on a small preference set,
exact resume of train_dpo.py, and the checkpoints it accepts and writes."""
import copy
import glob
import json
import math
import os
import random

import pytest
import torch
from conftest import randomize_

from checkpoints import checkpoint_info, load_model, save_model
from configs import DPOConfig, ModelConfig, TrainConfig
from dataset import PreferenceDataset, collate_preference
from gpt import GPT, RewardModel, mark_only_lora_trainable
from loss import dpo_loss, ipo_loss, pair_loss_masks, sequence_logprobs
from tokenizer import get_tokenizer
from trainers import DPOStage, Trainer

WORDS = [" cat", " dog", " bird", " fish", " cow", " pig", " hen", " ant"]
PROMPT = "\n\nHuman: Name some animals.\n\nAssistant:"
CONFIG = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=64)


def test_dpo_loss_closed_form_and_gradient_sign():
    """beta h = ln 3 gives sigmoid = 3/4, so the loss is ln(4/3); its gradient pushes the chosen
    log-prob up and the rejected one down, each by beta (1 - 3/4) = 1/8 at beta = 1/2."""
    beta, h = 0.5, 2 * math.log(3)
    pc = torch.tensor([-1.0], requires_grad=True)
    pr = torch.tensor([-1.0 - h + 0.25], requires_grad=True)  # policy log-ratio of rejected: -h + 0.25 + ...
    rc, rr = torch.tensor([-1.0]), torch.tensor([-0.75])  # ... minus 0.25: h = 0 - (-h) exactly
    loss, r_c, r_r = dpo_loss(pc, pr, rc, rr, beta)
    assert loss.item() == pytest.approx(math.log(4 / 3), abs=1e-6)
    assert r_c.item() == pytest.approx(0.0) and r_r.item() == pytest.approx(-beta * h, abs=1e-6)
    loss.backward()
    assert pc.grad.item() == pytest.approx(-1 / 8, abs=1e-6)  # raising the chosen lowers the loss
    assert pr.grad.item() == pytest.approx(1 / 8, abs=1e-6)
    # h = 0 (policy = reference): loss ln 2, whatever beta; averaged over the pairs of a batch
    zero = torch.zeros(3)
    assert dpo_loss(zero, zero, zero, zero, 7.0)[0].item() == pytest.approx(math.log(2))
    two = dpo_loss(torch.tensor([2 * math.log(3), 0.0]), torch.zeros(2), torch.zeros(2), torch.zeros(2), 0.5)[0]
    assert two.item() == pytest.approx((math.log(4 / 3) + math.log(2)) / 2, abs=1e-6)


def test_ipo_loss_closed_form_and_gradient_sign():
    """(h - 1/(2 beta))^2: at beta 1/4 the target margin is 2; h = 1 gives 1, h = 3 gives 1 too, with
    gradients of opposite sign (IPO pulls h back down past its margin, DPO never does)."""
    beta = 0.25
    for h, want_grad in ((1.0, -2.0), (3.0, 2.0)):
        pc = torch.tensor([h], requires_grad=True)
        loss, r_c, r_r = ipo_loss(pc, torch.zeros(1), torch.zeros(1), torch.zeros(1), beta)
        assert loss.item() == pytest.approx(1.0)
        loss.backward()
        assert pc.grad.item() == pytest.approx(want_grad)  # d/dh (h - 2)^2 = 2 (h - 2)
        assert r_c.item() == pytest.approx(beta * h) and r_r.item() == 0.0
    past = torch.tensor([3.0], requires_grad=True)
    dpo_loss(past, torch.zeros(1), torch.zeros(1), torch.zeros(1), beta)[0].backward()
    assert past.grad.item() < 0  # DPO still pushes h up


def test_sequence_logprobs_and_the_tokens_of_a_pair():
    torch.manual_seed(0)
    V, C = 13, 4
    W = torch.randn(V, C, requires_grad=True)
    hidden = torch.randn(2, 6, C, requires_grad=True)
    ids = torch.randint(0, V, (2, 6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 0, 1, 1, 1]])
    want = torch.zeros(2)
    for b in range(2):  # by hand: token t is predicted from hidden[t - 1]
        for t in range(1, 6):
            if mask[b, t]:
                want[b] = want[b] + torch.log_softmax(hidden[b, t - 1] @ W.T, -1)[ids[b, t]]
    got = sequence_logprobs(W, hidden, ids, mask, chunk_rows=3)
    torch.testing.assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got.sum(), (hidden, W)), torch.autograd.grad(want.sum(), (hidden, W))):
        torch.testing.assert_close(a, b)
    # A pair scores each sequence from the first token where the two differ; padding never counts.
    chosen = torch.tensor([[5, 6, 7, 8, 9, 0], [5, 6, 1, 2, 0, 0]])
    chosen_mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]])
    rejected = torch.tensor([[5, 6, 7, 3, 0, 0], [5, 6, 1, 2, 4, 4]])
    rejected_mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    mc, mr = pair_loss_masks(chosen, chosen_mask, rejected, rejected_mask)
    assert mc.tolist() == [[0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 0]]  # row 1: chosen is a prefix of rejected
    assert mr.tolist() == [[0, 0, 0, 1, 0, 0], [0, 0, 0, 0, 1, 1]]


def pairs(n, seed):
    """Raters prefer the response with more ' cat' in it (never a tie)."""
    rng, rows = random.Random(seed), []
    while len(rows) < n:
        a, b = ([rng.choice(WORDS) for _ in range(5)] for _ in range(2))
        if a.count(" cat") != b.count(" cat"):
            good, bad = (a, b) if a.count(" cat") > b.count(" cat") else (b, a)
            rows.append({"prompt": PROMPT, "chosen": "".join(good), "rejected": "".join(bad)})
    return rows


def _fit(stage, tmp_path, steps, train_rows, eval_rows):
    tok = get_tokenizer()
    cfg = TrainConfig(batch_size=16, lr=3e-3, max_steps=steps, warmup_steps=0, eval_every=steps, save_every=0,
                      log_every=steps, device="cpu")
    metrics = Trainer(stage, cfg, str(tmp_path), PreferenceDataset(train_rows, tok, 64), collate_preference,
                      PreferenceDataset(eval_rows, tok, 64)).fit()
    with open(tmp_path / "metrics.jsonl") as f:
        return metrics, [json.loads(line) for line in f]


@pytest.mark.parametrize("loss, lora_rank", [("dpo", 0), ("ipo", 4)])
def test_dpo_and_ipo_learn_the_preference(loss, lora_rank, tmp_path):
    """From a policy equal to its reference (every implicit reward 0: held-out accuracy exactly 0.5, ties
    counting half), a few steps on the pairs make the policy prefer held-out chosen responses."""
    torch.manual_seed(0)
    policy = GPT(ModelConfig(**{**CONFIG.to_dict(), "lora_rank": lora_rank}))
    ref = None
    if lora_rank:
        mark_only_lora_trainable(policy)
    else:
        ref = copy.deepcopy(policy)
    before = {k: v.clone() for k, v in (ref or policy).state_dict().items() if "lora_" not in k}
    stage = DPOStage(policy, DPOConfig(loss=loss, beta=0.1), ref)
    final, rows = _fit(stage, tmp_path, 25, pairs(400, 0), pairs(64, 1))
    start = rows[0]
    assert start["step"] == 0 and start["eval/accuracy"] == 0.5 and start["eval/margin"] == 0.0
    assert start["eval/loss"] == pytest.approx(math.log(2) if loss == "dpo" else (1 / 0.2) ** 2)
    print(loss, {k: round(v, 3) for k, v in final.items() if k.startswith("eval/")})
    assert final["eval/accuracy"] > 0.8, final
    assert final["eval/margin"] > 0 and final["eval/reward_chosen"] > final["eval/reward_rejected"]
    # The reference did not move: the frozen copy, or a LoRA policy's base weights.
    after = (stage.frozen.get("ref") or policy).state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())


# -----------------------------------------------------------------------------
# train_dpo.py


def _write(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("dpo")
    sft = randomize_(GPT(ModelConfig(n_layer=2, n_head=4, n_embd=64, block_size=128)), std=0.02)
    save_model(sft, str(d / "sft" / "final"), stage="sft", preset="nano")
    save_model(RewardModel(sft.config), str(d / "rm" / "final"), stage="rm", preset="nano")
    return {"dir": d, "sft": str(d / "sft"), "rm": str(d / "rm"), "train": _write(d / "train.jsonl", pairs(96, 2)),
            "dev": _write(d / "dev.jsonl", pairs(32, 3))}


def _args(files, **over):
    flags = {"-p": files["sft"], "--data": files["train"], "--eval-data": files["dev"], "--part": "all", "-b": "8",
             "--lr": "1e-3", "--warmup-steps": "2", "--max-steps": "8", "--save-every": "4", "--eval-every": "4",
             "--log-every": "1", "--device": "cpu", "--beta": "0.2", **over}
    return [str(x) for kv in flags.items() for x in kv]


def test_resume_after_a_crash_is_bit_identical(files, tmp_path, monkeypatch):
    """A run that dies after its step-4 checkpoint and is resumed with --resume ends with the same weights
    and the same metrics as one that never stopped; the result is a policy ("lm", stage "dpo") that
    evaluate.py and sample.py load."""
    import train_dpo
    from evaluate import load_lm
    from sample import load_policy
    train_dpo.main(_args(files, **{"--run-dir": tmp_path / "a"}))

    calls = {"n": 0}
    step = DPOStage.train_step

    def dies_at_step_6(self, trainer, micro):
        calls["n"] += 1
        if calls["n"] == 6:
            raise RuntimeError("killed")
        return step(self, trainer, micro)
    monkeypatch.setattr(DPOStage, "train_step", dies_at_step_6)
    with pytest.raises(RuntimeError, match="killed"):
        train_dpo.main(_args(files, **{"--run-dir": tmp_path / "b"}))
    monkeypatch.setattr(DPOStage, "train_step", step)
    assert not os.path.exists(tmp_path / "b" / "final")
    assert [os.path.basename(c) for c in glob.glob(str(tmp_path / "b" / "checkpoints" / "*"))] == ["step_000004"]
    train_dpo.main(["--resume", str(tmp_path / "b")])

    want, info = load_model(str(tmp_path / "a"), kind="lm")
    got, _ = load_model(str(tmp_path / "b"), kind="lm")
    for (k, a), (_, b) in zip(want.state_dict().items(), got.state_dict().items()):
        assert torch.equal(a, b), k
    strip = lambda rows: [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows]  # noqa: E731
    metrics = [strip(json.load(open(tmp_path / r / "metrics.jsonl")) if False else
                     [json.loads(line) for line in open(tmp_path / r / "metrics.jsonl")]) for r in ("a", "b")]
    assert metrics[0] == metrics[1] and [m["step"] for m in metrics[0] if "loss" in m] == list(range(1, 9))
    assert info["stage"] == "dpo" and info["kind"] == "lm" and checkpoint_info(str(tmp_path / "a"))["preset"] == "nano"
    assert load_lm(str(tmp_path / "a"))[1]["stage"] == "dpo"
    assert isinstance(load_policy(str(tmp_path / "a"), None), GPT)
    # it learned something in 8 steps, and left the SFT model where it was
    assert metrics[0][-1]["eval/accuracy"] > 0.5
    sft, _ = load_model(files["sft"])
    assert any(not torch.equal(a, b) for a, b in zip(sft.state_dict().values(), want.state_dict().values()))


@pytest.mark.parametrize("case", ["rm_as_policy", "no_init", "bad_loss", "zero_beta"])
def test_bad_input_is_one_line_and_exit_2(case, files, tmp_path):
    from conftest import run_script
    over = {"rm_as_policy": {"-p": files["rm"]}, "no_init": {"-p": ""}, "bad_loss": {"--loss": "kto"},
            "zero_beta": {"--beta": "0"}}[case]
    r = run_script("train_dpo.py", *_args(files, **{"--out-dir": tmp_path, **over}))
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert {"rm_as_policy": "is a rm checkpoint (rm model); -p needs an SFT run", "no_init": "DPO needs -p SFT_RUN",
            "bad_loss": "--loss 'kto'", "zero_beta": "--beta must be > 0"}[case] in lines[0]
    assert not glob.glob(str(tmp_path / "dpo_*"))
