"""The whole pipeline on the synthetic task: PPO must beat SFT under the gold reward, and the same
seed must give the same numbers."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, run_pipeline  # and the `quick` fixture: one quick pipeline run per session


def row(results, a, b, judge, phrasing=None):
    rows = results["by_phrasing"] if phrasing else results["results"]
    (r,) = [r for r in rows if (r["a"], r["b"]) == (a, b) and r.get("phrasing") == phrasing
            and (r["judge"] == judge or judge == "rm" and r["judge"].startswith("rm:"))]
    return r


def test_quick_pipeline_ppo_beats_sft_under_the_gold_reward(quick):
    run_dir, results, stdout = quick
    gold = row(results, "ppo", "sft", "gold")
    assert gold["pairs"] == 200
    assert gold["mean_score_a"] > gold["mean_score_b"] + 0.25, gold  # gold reward per answer, max 2.5
    assert gold["win_rate"] > 0.55, gold  # PPO wins more test prompts than it loses
    # beyond noise (resampling the 24 facts) on style; the quick plan's 250-step RM does not learn
    # facts, so its correctness does not improve (the full plan's does: README, Results)
    assert row(results, "ppo", "sft", "gold:style")["ci95"][0] > 0.65
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


def test_quick_pipeline_trains_on_dev_and_tests_on_test(quick):
    """Nothing a training stage reads is a test file; the final evaluation asks the test prompts,
    both phrasings, and reports them apart; the gold reward's two parts add up to it."""
    run_dir, results, _ = quick
    import task
    test_files = [os.path.join(run_dir, "data", name + ".jsonl")
                  for name in set(task.SPLITS) - set(task.TRAINING_FILES)]
    for stage in ("sft", "rm", "ppo"):
        config = open(os.path.join(run_dir, stage, "config.json")).read()
        assert not any(path in config for path in test_files), stage
        assert os.path.join(run_dir, "data", "dev_prompts.jsonl" if stage == "ppo" else f"{stage}_dev.jsonl") in config
    with open(os.path.join(run_dir, "data", "test_prompts.jsonl")) as f:
        test = [json.loads(line)["prompt"] for line in f][:200]
    with open(os.path.join(run_dir, "eval", "generations.jsonl")) as f:
        assert [json.loads(line)["prompt"] for line in f] == test
    seen, unseen = row(results, "ppo", "sft", "gold", "seen"), row(results, "ppo", "sft", "gold", "unseen")
    assert seen["pairs"] + unseen["pairs"] == 200 and min(seen["pairs"], unseen["pairs"]) > 40
    for a, b in (("ppo", "sft"), ("sft", "init")):
        gold, parts = row(results, a, b, "gold"), [row(results, a, b, f"gold:{p}") for p in ("correctness", "style")]
        for side in ("mean_score_a", "mean_score_b"):
            assert gold[side] == pytest.approx(parts[0][side] + parts[1][side])
        assert gold["ci_clusters"] == 24  # the interval resamples facts


def test_same_seed_same_numbers_and_the_seeds_summary(tmp_path):
    """Bit-for-bit on CPU: data, initialisation, sampling and evaluation all follow the seed, whether
    it is given as --seed or as one of --seeds; the seeds summary reports each seed's own run."""
    one = run_pipeline(tmp_path / "one", "--plan", "smoke", "--seed", "3")
    top, summary, stdout = run_pipeline(tmp_path / "many", "--plan", "smoke", "--seeds", "3,4", kind="seeds")

    def strip(run_dir):  # the numbers, without wall times and the run's own path
        with open(os.path.join(run_dir, "results.json")) as f:
            results = json.load(f)
        return json.dumps({k: v for k, v in results.items() if k != "seconds"}).replace(run_dir, "RUN")
    seed3, seed4 = os.path.join(top, "seed_3"), os.path.join(top, "seed_4")
    assert strip(one[0]) == strip(seed3)
    assert strip(seed3) != strip(seed4)
    assert summary["seeds"] == [3, 4] and set(summary["per_seed"]) == {"3", "4"}
    for seed, run_dir in (("3", seed3), ("4", seed4)):
        with open(os.path.join(run_dir, "results.json")) as f:
            results = json.load(f)
        for judge in ("gold", "gold:correctness", "gold:style"):
            assert summary["per_seed"][seed][judge]["win_rate"] == row(results, "ppo", "sft", judge)["win_rate"]
        assert summary["per_seed"][seed]["gold_unseen"]["win_rate"] == \
            row(results, "ppo", "sft", "gold", "unseen")["win_rate"]
    for judge in ("gold", "gold:correctness", "gold:style"):
        rates = [summary["per_seed"][s][judge]["win_rate"] for s in ("3", "4")]
        mean = summary["mean"][judge]
        assert mean["win_rate"] == pytest.approx(sum(rates) / 2)
        assert mean["ci95"][0] <= mean["win_rate"] <= mean["ci95"][1]
    assert "| mean |" in stdout and open(os.path.join(top, "results.md")).read() in stdout
    r = subprocess.run([sys.executable, os.path.join(ROOT, "src", "pipeline.py"), "--seeds", "0,x"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--seeds" in r.stderr


def test_bad_input_is_one_line_exit_2(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "src", "pipeline.py"), "--out-dir", str(tmp_path),
                        "--data", str(tmp_path / "missing.jsonl")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "missing.jsonl" in r.stderr


@pytest.mark.parametrize("args, message", [
    (["--sft", "/no/such/run"], "--sft /no/such/run: not a run directory"),
    (["--sft", ".", "--recipes", "magic"], "unknown recipe 'magic'"),
])
def test_rm_study_refuses_bad_input(args, message, tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "src", "study_rm.py"), "--out-dir", str(tmp_path), *args],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and message in r.stderr


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
