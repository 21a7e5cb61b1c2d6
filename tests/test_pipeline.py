"""The whole pipeline on the synthetic task: PPO must beat SFT under the gold reward, and the same
seed must give the same numbers."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_pipeline(out_dir, *args, timeout=600):
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "src", "pipeline.py"), "--out-dir", str(out_dir),
                        "--device", "cpu", *args], capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (run_dir,) = [os.path.join(out_dir, d) for d in os.listdir(out_dir) if d.startswith("pipeline_")]
    with open(os.path.join(run_dir, "results.json")) as f:
        return run_dir, json.load(f), r.stdout


def row(results, a, b, judge):
    (r,) = [r for r in results["results"] if (r["a"], r["b"]) == (a, b) and r["judge"].split(":")[0] == judge]
    return r


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    return run_pipeline(tmp_path_factory.mktemp("quick"), "--plan", "quick")


def test_quick_pipeline_ppo_beats_sft_under_the_gold_reward(quick):
    run_dir, results, stdout = quick
    gold = row(results, "ppo", "sft", "gold")
    assert gold["pairs"] == 200
    assert gold["mean_score_a"] > gold["mean_score_b"] + 0.4, gold  # gold reward per answer, max 2.5
    assert gold["ci95"][0] > 0.55, gold  # PPO wins more held-out prompts than it loses, beyond noise
    assert row(results, "sft", "init", "gold")["win_rate"] > 0.9  # SFT learned the task
    assert row(results, "ppo", "sft", "rm")["win_rate"] > 0.6  # and PPO raised the proxy it optimised
    assert results["rm_gold_accuracy"]["vs_gold"] > 0.75


def test_quick_pipeline_writes_its_report(quick):
    run_dir, results, stdout = quick
    curve = results["over_optimisation"]
    assert curve[0]["step"] == 0 and curve[0]["kl"] == pytest.approx(0, abs=1e-3)  # the SFT policy itself
    assert [p["step"] for p in curve] == [0, 5, 10, 15] and all(p["gold"] is not None for p in curve)
    assert os.path.getsize(os.path.join(run_dir, "over_optimisation.png")) > 10_000
    table = open(os.path.join(run_dir, "results.md")).read()
    assert "| ppo vs sft | gold |" in table and table in stdout
    assert set(results["seconds"]) == {"data", "sft", "rm", "ppo", "evaluation"}
    answers = results["answers"]  # what each model's evaluation answers are made of
    assert set(answers) == {"init", "sft", "ppo"} and answers["init"]["correct"] == 0
    assert answers["sft"]["correct"] > 0.5 and "| answers of |" in table
    for stage in ("sft", "rm", "ppo"):
        assert os.path.isfile(os.path.join(run_dir, stage, "final", "model.safetensors"))


def test_same_seed_same_numbers(tmp_path):
    """Bit-for-bit on CPU: data, initialisation, sampling and evaluation all follow --seed."""
    runs = [run_pipeline(tmp_path / name, "--plan", "smoke", "--seed", seed)
            for name, seed in (("a", "3"), ("b", "3"), ("c", "4"))]

    def strip(run):  # the numbers, without wall times and the run's own path
        run_dir, results, _ = run
        return json.dumps({k: v for k, v in results.items() if k != "seconds"}).replace(run_dir, "RUN")
    a, b, c = runs
    assert strip(a) == strip(b)
    assert strip(a) != strip(c)


def test_bad_input_is_one_line_exit_2(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "src", "pipeline.py"), "--out-dir", str(tmp_path),
                        "--data", str(tmp_path / "missing.jsonl")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "missing.jsonl" in r.stderr


def test_report_is_built_from_the_run(quick, tmp_path):
    run_dir, results, _ = quick
    out = tmp_path / "report.pdf"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "src", "report.py"), "--run", run_dir,
                        "--ablation", os.path.join(run_dir, "ppo"), "-o", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[:5] == b"%PDF-" and out.stat().st_size > 20_000
    r = subprocess.run([sys.executable, os.path.join(ROOT, "src", "report.py"), "--run", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no results.json" in r.stderr and "Traceback" not in r.stderr


def test_real_data_mode_runs_every_stage_on_its_own_part(tmp_path):
    """--data drives the same pipeline on HH-style pairs (here a local directory laid out like
    Anthropic/hh-rlhf): the scripts' own defaults, each stage on its own part of the prompts,
    evaluation on the test split, judged by the reward model."""
    import random

    import task
    rng = random.Random(0)
    data = tmp_path / "hh"
    data.mkdir()
    prompts = [p for ps in task.all_prompts().values() for p in ps]
    rng.shuffle(prompts)
    for split, chunk in (("train", prompts[:300]), ("test", prompts[300:340])):
        with open(data / f"{split}.jsonl", "w") as f:
            for p in chunk:
                good, bad = task.demonstration(rng, p, "good")[1], task.demonstration(rng, p, "rude")[1]
                f.write(json.dumps({"chosen": p + good, "rejected": p + bad}) + "\n")
    run_dir, results, _ = run_pipeline(
        tmp_path / "runs", "--data", str(data), "--preset", "nano", "--eval-limit", "6",
        "--sft-args=--max-steps 2 -b 4", "--rm-args=--max-steps 2 -b 4",
        "--ppo-args=--max-steps 1 --rollout-batch-size 4 --minibatch-size 2 --max-new-tokens 8 --eval-samples 4")
    assert {(r["a"], r["b"], r["judge"].split(":")[0]) for r in results["results"]} == {
        ("ppo", "sft", "rm"), ("sft", "init", "rm")}
    assert all(r["pairs"] == 6 for r in results["results"])
    assert "rm_gold_accuracy" not in results
    for stage in ("sft", "rm", "ppo"):
        with open(os.path.join(run_dir, stage, "config.json")) as f:
            config = json.load(f)
        assert json.dumps(config).count(f'"part": "{stage}"') >= 1, config.get("data")
