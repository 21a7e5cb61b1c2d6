"""report.pdf: typeset from a run's results, read back from the PDF. Its numbers must be the run's,
its sections in a paper's order, its sentences chosen by the numbers, and a directory it cannot use
refused with one line."""
import json
import os
import re
import subprocess
import sys

import pytest

import report
from common import run_cli
from conftest import ROOT, SRC

SECTIONS = ["Abstract", "1 Question", "2 Method", "2.1 The pipeline", "2.2 What the original got wrong, and the fix",
            "3 The task and the gold reward", "4 Results", "4.1 PPO against SFT",
            "4.2 PPO against RLOO, DPO, IPO and best-of-n", "4.3 Tone or correctness", "5 Ablations",
            "5.1 The choices of the original, one at a time", "5.2 A weak KL penalty",
            "5.3 Which parts of the recipe matter", "6 Speed",
            "7 Limitations", "References"]
BENCHMARKS = os.path.join(ROOT, "benchmarks", "results", "latest.md")


def pdf_lines(path):
    from pypdf import PdfReader
    text = "\n".join(page.extract_text() for page in PdfReader(path).pages)
    return [" ".join(line.split()) for line in text.splitlines()]


def pct(x):  # as results.md writes a share, formatted here independently of src/results.py
    return f"{100 * x:.1f}%"


def test_report_of_the_quick_run_states_its_numbers(quick, tmp_path):
    run_dir, results, _ = quick
    out = tmp_path / "report.pdf"
    r = subprocess.run([sys.executable, os.path.join(SRC, "report.py"), "--run", run_dir,
                        "--benchmarks", BENCHMARKS, "-o", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = pdf_lines(str(out))
    # the headline table: every PPO-vs-SFT row, each number as results.json has it
    for judge in ("gold", "gold:correctness", "gold:style", "rm"):
        (row,) = [x for x in results["results"] if (x["a"], x["b"]) == ("ppo", "sft")
                  and (x["judge"] == judge or judge == "rm" and x["judge"].startswith("rm:"))]
        lo, hi = row["ci95"]
        expected = (f"ppo vs sft {judge} {row['wins']} {row['ties']} {row['losses']} {pct(row['win_rate'])} "
                    f"[{pct(lo)}, {pct(hi)}] {row['mean_score_a']:.3f} / {row['mean_score_b']:.3f}")
        assert expected in lines, (expected, [line for line in lines if line.startswith("ppo vs sft")])
    # the sections of a short paper, in order, each heading on a line of its own
    where = [lines.index(title) for title in SECTIONS]
    assert where == sorted(where), list(zip(SECTIONS, where))
    text = " ".join(lines)
    gold = [x for x in results["results"] if (x["a"], x["b"], x["judge"]) == ("ppo", "sft", "gold")][0]
    abstract = text[text.index("Abstract"):text.index("1 Question")]
    assert pct(gold["win_rate"]) in abstract and f"{gold['mean_score_a']:.2f}" in abstract
    # inputs not given: the section says so and names the command that makes them
    assert "No methods study was given" in text and "python src/study.py --base" in text
    assert "No weak-KL PPO run was given" in text and "--kl-coef 0.01" in text
    assert "python src/pipeline.py --seeds 0,1,2" in text and "python src/study_rm.py --sft" in text
    # the speed section is the benchmark file's tables, row by row
    with open(BENCHMARKS) as f:
        rows = [line for line in f if line.startswith("| tiny |") or line.startswith("| ours |")]
    assert len(rows) > 10
    for line in rows:
        assert " ".join(c.strip() for c in line.strip().strip("|").split("|")) in lines, line


@pytest.mark.parametrize("case, message", [
    ("missing", "not found"),
    ("empty", "no results.json"),
    ("stage", "a ppo stage directory"),
    ("eval", "not a pipeline run's"),
    ("seeds", "a --seeds run"),
])
def test_report_refuses_a_directory_it_cannot_use(case, message, tmp_path, capsys):
    path = tmp_path / case
    if case != "missing":
        path.mkdir()
    if case == "stage":  # what train_ppo.py leaves, e.g. RUN/ppo: config.json and no results.json
        (path / "config.json").write_text(json.dumps({"stage": "ppo"}))
    elif case == "eval":  # evaluate.py's results.json: comparisons, but no stages and no reward curve
        (path / "results.json").write_text(json.dumps({"results": [], "models": {}}))
    elif case == "seeds":
        (path / "results.json").write_text(json.dumps({"seeds": [0], "per_seed": {}, "mean": {}}))
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: report.main(["--run", str(path), "-o", str(tmp_path / "out.pdf")]))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and message in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out.pdf").exists()


def test_report_cli_refusal_is_one_line_exit_2(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(SRC, "report.py"), "--run", str(tmp_path / "nothing")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [r.stderr.strip()], r.stderr
    assert "Traceback" not in r.stderr and "--run" in r.stderr


def _comparison(win_rate, lo, hi, judge="gold"):
    return {"a": "ppo", "b": "sft", "judge": judge, "win_rate": win_rate, "ci95": [lo, hi]}


def test_sentences_are_chosen_by_the_numbers():
    """Two made-up results, one where PPO wins and one where it loses: every sentence that holds
    only for some results says the opposite."""
    won = {"results": [_comparison(0.79, 0.73, 0.83), _comparison(0.55, 0.51, 0.58, "gold:correctness"),
                       _comparison(0.81, 0.79, 0.83, "gold:style"), _comparison(0.90, 0.88, 0.92, "rm:x")],
           "rm_gold_accuracy": {"vs_gold_content_pairs": 0.70, "vs_gold_style_pairs": 0.97}}
    lost = {"results": [_comparison(0.40, 0.30, 0.47), _comparison(0.52, 0.45, 0.60, "gold:correctness"),
                        _comparison(0.35, 0.28, 0.42, "gold:style"), _comparison(0.20, 0.15, 0.25, "rm:x")],
            "rm_gold_accuracy": {"vs_gold_content_pairs": 0.95, "vs_gold_style_pairs": 0.96}}
    said = {}
    for name, results in (("won", won), ("lost", lost)):
        rows = results["results"]
        gold, correct, style, rm = (report._row(rows, j) for j in ("gold", "gold:correctness", "gold:style", "rm"))
        said[name] = (report.verdict(gold), report.parts_sentence(correct, style), report.proxy_sentence(gold, rm),
                      report.rm_sentence(results["rm_gold_accuracy"]))
    assert said["won"] == ("PPO beats SFT beyond noise", "PPO gains on both, but most of the win is style, not facts",
                           "the proxy favours PPO more than the truth does",
                           "facts are what it knows least, so what PPO can learn from it is mostly style")
    assert said["lost"][0] == "SFT beats PPO beyond noise"
    assert said["lost"][1] == "PPO is worse than SFT beyond noise on style"
    assert said["lost"][2] == "the proxy favours PPO less than the truth does"
    assert said["lost"][3].startswith("it knows facts about as well as style")
    assert report.verdict(_comparison(0.52, 0.45, 0.60)).startswith("PPO and SFT cannot be told apart")
    # goals: met or missed by how much; the correctness ceiling an SFT policy leaves
    assert report.goal(0.7857, 0.80, "a mean gold win-rate") == \
        "the goal of a mean gold win-rate ≥ 80% is missed by 1.4 points"
    assert report.goal(0.81, 0.80, "a mean gold win-rate").endswith("is met")
    assert report.goal(14.0, 15, "the whole pipeline", higher=False, unit="minutes").endswith("is met")
    assert report.ceiling_sentence(0.80, 0.554).endswith("would win at most 60.0% on correctness")
    assert report.ceiling_sentence(0.30, 0.70) == ("a PPO policy that is always right would win 85.0% on "
                                                   "correctness against this SFT policy, so the goal of a "
                                                   "correctness win-rate ≥ 65% is met")
    # the reward curve: rising together, or the proxy up while the truth falls
    up = [{"step": 0, "kl": 0, "rm_score": 3.0, "gold": 1.2}, {"step": 80, "kl": 2.0, "rm_score": 6.0, "gold": 2.2}]
    hacked = [{"step": 0, "kl": 0, "rm_score": -4.0, "gold": 1.3}, {"step": 60, "kl": 59.5, "rm_score": 1.8,
                                                                     "gold": -2.2}]
    assert report.curve_sentence(up).startswith("the true reward rose with the proxy")
    assert report.curve_sentence(hacked).startswith("over-optimisation")
    assert report.ablation_sentence(up, [{**up[-1], "rm_score": 7.0, "gold": 0.5}], 0.1, 0.01).startswith(
        "over-optimisation")
    assert report.ablation_sentence(up, [{**up[-1], "rm_score": 7.0, "gold": 2.3}], 0.1, 0.01).startswith(
        "no over-optimisation")


def test_text_from_data_is_typeset_as_it_is(tmp_path):
    """Characters Typst markup gives a meaning to (a minus before a digit, //, *, _, #, $, [, @, a
    leading "1.") come out of the PDF exactly as they went in."""
    import typst
    samples = ["-0.289 / -3.150", "a *b* _c_ #d $e$ `f` <g> @h ~i", "[72.7%, 82.7%] http://x.y // not a comment",
               "1. not a list", "= not a heading", "- not a bullet + nor this", "back\\slash... and 'quotes'"]
    source = tmp_path / "t.typ"
    source.write_text("#set page(width: 16cm, height: auto)\n" + "\n\n".join(report.esc(s) for s in samples))
    (tmp_path / "t.pdf").write_bytes(typst.compile(str(source), ignore_system_fonts=True))
    lines = [line.replace("’", "'").replace("‘", "'") for line in pdf_lines(str(tmp_path / "t.pdf"))]
    assert lines == samples
