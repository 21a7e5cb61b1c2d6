"""The SFT and RM command lines end to end: they learn, resume exactly after SIGKILL, run under
torchrun with 2 processes, and refuse bad input with one line and exit code 2."""
import glob
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, SRC, run_script
from safetensors.torch import load_file

WORDS = [" cat", " dog", " bird", " fish", " cow", " pig", " hen", " ant"]


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def sft_rows(n, seed):
    """Questions about a word answered by repeating it: learnable, so held-out loss must fall."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        w = rng.choice(WORDS)
        rows.append({"prompt": f"\n\nHuman: Say{w} {rng.randint(2, 4)} times.\n\nAssistant:",
                     "response": "".join(w for _ in range(rng.randint(2, 4)))})
    return rows


def rm_rows(n, seed):
    """Raters prefer the response with more ' cat' in it."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a = [rng.choice(WORDS) for _ in range(6)]
        b = [rng.choice(WORDS) for _ in range(6)]
        if a.count(" cat") == b.count(" cat"):
            a[rng.randrange(6)] = " cat" if rng.random() < 0.5 else " dog"
            if a.count(" cat") == b.count(" cat"):
                continue
        good, bad = (a, b) if a.count(" cat") > b.count(" cat") else (b, a)
        rows.append({"prompt": "\n\nHuman: Name some animals.\n\nAssistant:", "chosen": "".join(good),
                     "rejected": "".join(bad)})
    return rows


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    return {
        "sft": write_jsonl(d / "sft.jsonl", sft_rows(400, 0)),
        "sft_test": write_jsonl(d / "sft_test.jsonl", sft_rows(64, 1)),
        "rm": write_jsonl(d / "rm.jsonl", rm_rows(600, 2)),
        "rm_test": write_jsonl(d / "rm_test.jsonl", rm_rows(128, 3)),
    }


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def run_dir_of(out_dir, stage):
    (path,) = glob.glob(os.path.join(str(out_dir), f"{stage}_*"))
    return path


SFT_ARGS = ["--preset", "nano", "--part", "all", "-b", "16", "--lr", "3e-3", "--warmup-steps", "5",
            "--device", "cpu", "--log-every", "5"]


@pytest.fixture(scope="module")
def sft_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    r = run_script("train_sft.py", "-n", "t", "--data", data["sft"], "--eval-data", data["sft_test"],
                   "--max-steps", "60", "--eval-every", "20", "--out-dir", out, *SFT_ARGS)
    assert r.returncode == 0, r.stderr
    return run_dir_of(out, "sft")


def test_sft_reduces_held_out_loss(sft_run):
    evals = [(m["step"], m["eval/loss"]) for m in metrics(sft_run) if "eval/loss" in m]
    assert [step for step, _ in evals] == [0, 20, 40, 60]  # the untrained model first
    assert evals[-1][1] < 0.5 * evals[1][1] < 0.5 * evals[0][1], evals
    assert os.path.isfile(os.path.join(sft_run, "final", "model.safetensors"))
    config = json.load(open(os.path.join(sft_run, "config.json")))
    assert config["train"]["lr"] == 3e-3 and config["model"]["n_layer"] == 2
    assert config["data"]["train"]["kept"] == 400


def test_rm_from_sft_learns_preferences(sft_run, data, tmp_path):
    r = run_script("train_rm.py", "-n", "t", "-p", sft_run, "--data", data["rm"], "--eval-data", data["rm_test"],
                   "--preset", "nano/lora", "--lora-rank", "4", "--part", "all", "-b", "16", "--lr", "2e-3",
                   "--max-steps", "60", "--eval-every", "30", "--device", "cpu", "--out-dir", tmp_path)
    assert r.returncode == 0, r.stderr
    evals = [m for m in metrics(run_dir_of(tmp_path, "rm")) if "eval/accuracy" in m]
    assert evals[-1]["eval/accuracy"] > 0.75, evals  # chance is 0.5
    assert evals[-1]["eval/margin"] > 0
    # A full (non-LoRA) SFT checkpoint initialised a LoRA reward model: the original failed here.
    assert "reward model: nano/lora" in r.stdout


def test_sigkill_and_resume_is_bit_identical(data, tmp_path):
    args = ["--data", data["sft"], "--eval-data", data["sft_test"], "--max-steps", "24", "--save-every", "4",
            "--eval-every", "0", *SFT_ARGS, "--preset", "nano/dropout"]  # dropout: the RNG state matters too
    ref = run_script("train_sft.py", "-n", "ref", "--out-dir", tmp_path / "a", *args)
    assert ref.returncode == 0, ref.stderr

    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="disabled")
    proc = subprocess.Popen([sys.executable, os.path.join(SRC, "train_sft.py"), "-n", "kill", "--out-dir",
                             str(tmp_path / "b"), *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:  # kill once a mid-run checkpoint exists
        if glob.glob(str(tmp_path / "b" / "sft_*" / "checkpoints" / "step_000012")):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run = run_dir_of(tmp_path / "b", "sft")
    assert not os.path.exists(os.path.join(run, "final")), "killed too late: the run had finished"
    resumed = run_script("train_sft.py", "--resume", run)
    assert resumed.returncode == 0, resumed.stderr

    want = load_file(os.path.join(run_dir_of(tmp_path / "a", "sft"), "final", "model.safetensors"))
    got = load_file(os.path.join(run, "final", "model.safetensors"))
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    steps = [m["step"] for m in metrics(run) if "loss" in m]
    assert steps == sorted(set(steps)), "metrics.jsonl repeats steps after the resume"


def test_two_processes_with_torchrun(data, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
           os.path.join(SRC, "train_sft.py"), "-n", "ddp", "--data", data["sft"], "--eval-data", data["sft_test"],
           "--max-steps", "6", "--save-every", "3", "--eval-every", "3", "--out-dir", str(tmp_path), *SFT_ARGS]
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    run = run_dir_of(tmp_path, "sft")  # exactly one run directory: only rank 0 made one
    rows = metrics(run)
    assert [m["step"] for m in rows if "loss" in m] == [5, 6]  # logged once per step, not per rank
    assert os.path.isfile(os.path.join(run, "final", "model.safetensors"))
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["step_000003"]
    assert r.stdout.count("done:") == 1


def test_resume_fills_flags_added_since_and_refuses_another_scripts_run(tmp_path):
    """--resume restores the saved flags; a flag the script gained after the run was made (e.g.
    --decode-compile) takes its default instead of refusing the run, while a run with flags the
    script does not have (another stage's) is still refused with one line."""
    import argparse

    from cli import resumed_args
    from common import UserError
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"stage": "sft", "args": {"lr": 0.5, "pack": True, "resume": None}}))
    now = argparse.Namespace(resume=str(tmp_path), lr=1e-4, pack=False, decode_compile=False)
    got = resumed_args(now)
    assert vars(got) == {"resume": str(tmp_path), "lr": 0.5, "pack": True, "decode_compile": False}
    config.write_text(json.dumps({"stage": "rm", "args": {"lr": 0.5, "score_mean_with_padding": True}}))
    with pytest.raises(UserError, match="another script.*--score-mean-with-padding"):
        resumed_args(now)


def rm_checkpoint(tmp_path):
    """A reward-model run directory of the nano preset (random weights)."""
    from checkpoints import save_model
    from configs import get_preset
    from gpt import RewardModel
    out = tmp_path / "rm_run" / "final"
    save_model(RewardModel(get_preset("nano")), str(out), stage="rm", preset="nano")
    return tmp_path / "rm_run"


@pytest.mark.parametrize("case", ["missing_data", "missing_init", "wrong_preset", "empty_data", "rm_as_actor_init",
                                  "bad_json", "negative_lr", "zero_minibatch", "unknown_decode_precision",
                                  "name_escapes_runs", "rm_as_policy"])
def test_bad_input_is_one_line_and_exit_2(case, sft_run, data, tmp_path):
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"prompt": "x", "response": ""}])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": oops}\n')
    base = ["--eval-data", data["sft_test"], "--max-steps", "2", "--device", "cpu", "--out-dir", tmp_path,
            "--part", "all"]
    args = {
        "missing_data": ["train_sft.py", "--preset", "nano", "--data", tmp_path / "nope.jsonl", *base],
        "missing_init": ["train_rm.py", "--preset", "nano", "-p", tmp_path / "no_run", "--data", data["rm"],
                         "--eval-data", data["rm_test"], "--max-steps", "2", "--part", "all", "--out-dir", tmp_path],
        "wrong_preset": ["train_rm.py", "--preset", "tiny", "-p", sft_run, "--data", data["rm"],
                         "--eval-data", data["rm_test"], "--max-steps", "2", "--part", "all", "--out-dir", tmp_path],
        "empty_data": ["train_sft.py", "--preset", "nano", "--data", empty, *base],
        "rm_as_actor_init": ["train_ppo.py", "-a", sft_run, "-c", sft_run, "--prompts", data["sft"], "--part", "all"],
        "bad_json": ["train_sft.py", "--preset", "nano", "--data", bad, *base],
        "negative_lr": ["train_sft.py", "--preset", "nano", "--data", data["sft"], "--lr", "-1", *base],
        "zero_minibatch": ["train_ppo.py", "-a", sft_run, "-c", sft_run, "--prompts", data["sft"], "--part", "all",
                           "--minibatch-size", "0"],
        "unknown_decode_precision": ["train_ppo.py", "-a", sft_run, "-c", sft_run, "--prompts", data["sft"],
                                     "--part", "all", "--decode-precision", "int4"],
        "name_escapes_runs": ["train_sft.py", "--preset", "nano", "--data", data["sft"], "-n", "../../x", *base],
        "rm_as_policy": ["evaluate.py", "-s", rm_checkpoint(tmp_path), "-p", sft_run, "--prompts", data["sft"],
                         "--judge", "gold", "--out-dir", tmp_path / "eval"],
    }[case]
    r = run_script(*args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr
    expected = {"missing_data": "not found", "missing_init": "not found", "wrong_preset": "does not fit the preset",
                "empty_data": "no usable examples", "rm_as_actor_init": "expected a rm checkpoint",
                "bad_json": "line 2", "negative_lr": "--lr must be > 0, got -1.0",
                "zero_minibatch": "--minibatch-size must be >= 1",
                "unknown_decode_precision": "--decode-precision 'int4': use one of fp32, bf16, int8",
                "name_escapes_runs": "no path separators",
                "rm_as_policy": "holds a rm model"}[case]
    assert expected in lines[0], lines[0]
    assert not glob.glob(str(tmp_path / "sft_*" / "final")), "a run trained despite bad input"


def test_grad_scaler_state_survives_a_checkpoint(tmp_path):
    """fp16 training keeps a loss scale that moves with overflows; a resume must continue from it."""
    import torch

    from checkpoints import load_training_checkpoint, rng_state, save_training_checkpoint, set_rng_state
    from configs import ModelConfig
    from gpt import GPT
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=16))
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=7)
    scaler.scale(torch.ones(1))
    scaler.update(new_scale=96.0)
    ckpt = save_training_checkpoint(str(tmp_path), 3, {"model": model}, "sft", None, {"model": opt},
                                    {"model": sched}, {"step": 3}, [rng_state()], keep_last=1, scaler=scaler)
    fresh = torch.amp.GradScaler("cpu", init_scale=1024.0)
    state, rngs = load_training_checkpoint(ckpt, {"model": model}, {"model": opt}, {"model": sched}, fresh)
    set_rng_state(rngs[0])
    assert state["step"] == 3
    assert fresh.get_scale() == 96.0 and fresh.get_growth_interval() == 7
