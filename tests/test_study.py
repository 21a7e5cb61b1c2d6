"""The quick study on top of the quick pipeline run: every method and switch gets a row with intervals,
the numbers agree with the pipeline's own evaluation where they measure the same thing, and a rerun
trains and generates nothing."""
import json
import math
import os

import pytest

from conftest import run_script

VALUE = {"win": 1.0, "tie": 0.5, "loss": 0.0}


@pytest.fixture(scope="module")
def study(quick, tmp_path_factory):
    run_dir, _, _ = quick
    study_dir = tmp_path_factory.mktemp("study") / "study"
    args = ("--plan", "quick", "--seeds", "0", "--base", run_dir, "--run-dir", study_dir, "--device", "cpu")
    first = run_script("study.py", *args, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    with open(study_dir / "results.json") as f:
        return run_dir, study_dir, json.load(f), args, first


def test_every_method_and_switch_has_a_row_with_intervals(study):
    _, study_dir, summary, _, first = study
    rows = {r["name"]: r for r in summary["rows"]}
    assert set(rows) == {"sft", "ppo", "rloo", "dpo", "ipo", "ppo_rm_mean_pad", "ppo_sequence", "ppo_top_k",
                         "best_of_1", "best_of_2", "best_of_4"}
    for name, r in rows.items():
        if name == "sft":
            continue
        for judge in ("gold", "gold:correctness", "gold:style"):
            w = r["win"][judge]
            assert w["ci95"][0] <= w["win_rate"] <= w["ci95"][1], (name, judge, w)
            assert w["significant"] == (not w["ci95"][0] <= 0.5 <= w["ci95"][1])
        assert ("vs_ppo" in r["win"]) == (name != "ppo")
    assert rows["sft"]["kl"] == 0 and rows["ppo"]["kl"] > 0 and rows["rloo"]["kl"] > 0
    for n in (1, 2, 4):
        assert rows[f"best_of_{n}"]["kl"] == pytest.approx(math.log(n) - (n - 1) / n)
    assert (study_dir / "frontier.png").stat().st_size > 10_000
    table = (study_dir / "results.md").read_text()
    assert all(r["label"] in table for r in rows.values()) and table in first.stdout


def test_the_study_measures_ppo_as_the_pipeline_did(study):
    """PPO vs SFT on the study's 64 test prompts equals the pipeline's own verdicts on the same 64: the
    same policies answer the same prompts with the same seed, and the gold judge is deterministic."""
    run_dir, study_dir, summary, _, _ = study
    with open(os.path.join(run_dir, "eval", "judgments.jsonl")) as f:
        pipeline = [json.loads(line) for line in f]
    first = [VALUE[r["outcome"]] for r in pipeline
             if (r["judge"], r["a"], r["b"]) == ("gold", "ppo", "sft") and r["i"] < 64]
    assert len(first) == 64
    ppo = next(r for r in summary["rows"] if r["name"] == "ppo")
    assert ppo["win"]["gold"]["win_rate"] == pytest.approx(sum(first) / 64)
    # best-of-1 is SFT's own answer: it ties SFT on every prompt
    best_of_1 = next(r for r in summary["rows"] if r["name"] == "best_of_1")
    assert best_of_1["win"]["gold"]["win_rate"] == 0.5 and best_of_1["gold"] == summary["rows"][0]["gold"]


def test_the_fixed_order_protocol_asks_one_order_with_ppo_as_b(study):
    _, study_dir, summary, _, _ = study
    with open(study_dir / "seed_0" / "eval_fixed_order" / "judgments.jsonl") as f:
        fixed = [json.loads(line) for line in f]
    with open(study_dir / "seed_0" / "eval_both_orders" / "judgments.jsonl") as f:
        both = [json.loads(line) for line in f]
    asked = [r for r in fixed if not r["identical"]]
    assert asked and all(r["verdicts"][0] is None and r["verdicts"][1] is not None for r in asked)
    assert all(None not in r["verdicts"] for r in both if not r["identical"])
    # a fixed-order verdict "B" is a win for PPO, shown second
    assert all(r["outcome"] == {"B": "win", "A": "loss", "tie": "tie"}[r["verdicts"][1]] for r in asked)
    p = summary["judge_protocol"]
    assert p["fixed_order"]["win_rate"] == pytest.approx(sum(VALUE[r["outcome"]] for r in fixed) / len(fixed))


def test_a_rerun_reuses_everything(study):
    _, study_dir, summary, args, _ = study
    again = run_script("study.py", *args, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "train:" not in again.stdout + again.stderr  # no training script read its data
    generated = [line for line in again.stderr.splitlines() if "answers generated" in line]  # evaluate's log
    assert generated and all(": 0 answers generated" in line for line in generated), generated  # all cached
    with open(study_dir / "results.json") as f:
        rerun = json.load(f)
    for d in (summary, rerun):
        d.pop("seconds_this_run")
    assert rerun == summary


def test_the_report_prints_the_study_table_as_results_json_has_it(study, tmp_path):
    from test_report import pdf_lines
    run_dir, study_dir, summary, _, _ = study
    out = tmp_path / "report.pdf"
    r = run_script("report.py", "--run", run_dir, "--methods", study_dir, "-o", out, timeout=300)
    assert r.returncode == 0, r.stderr
    text = " ".join(pdf_lines(str(out)))
    assert "No methods study was given" not in text

    def pct(x):
        return f"{100 * x:.1f}%"

    def cell(w):
        return "–" if not w else f"{pct(w['win_rate'])} [{pct(w['ci95'][0])}, {pct(w['ci95'][1])}]"
    for row in summary["rows"]:  # every table row's numbers, in the table's order
        if row["group"] != "frontier":
            numbers = [f"{row['gold']:.2f}", *(cell(row["win"].get(k)) for k in
                                               ("gold", "gold:correctness", "gold:style", "vs_ppo")), f"{row['kl']:.2f}"]
            assert " ".join(numbers) in text, (row["name"], numbers)
    p = summary["judge_protocol"]
    assert f"gives PPO {pct(p['fixed_order']['win_rate'])} when PPO is always shown as B" in text
