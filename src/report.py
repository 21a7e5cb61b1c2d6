"""Build report.pdf, the technical report, from measured results (nothing in it is typed in by hand).

Reads a pipeline run (its results.json, and the config.json of its RM and PPO stages for what the
method section states), optionally a --seeds run (every seed's figures), a PPO run made with a weaker
KL penalty (to show over-optimisation) and the latest benchmark table, and writes a few A4 pages with
matplotlib.

Example (after `python src/pipeline.py`, `python src/pipeline.py --seeds 0,1,2` and, for the ablation,
the README's low-KL PPO command):
  python src/report.py --run runs/pipeline_task_<stamp> --seeds runs/seeds_task_<stamp> \\
      --ablation runs/ppo_lowkl_<stamp> --benchmarks benchmarks/results/latest.md -o report.pdf
"""
import json
import os
import textwrap

import torch

import task
from cli import parser
from common import UserError, read_json, run_cli
from configs import ModelConfig
from gpt import GPT
from results import (
    ANSWER_KINDS,
    answers_table,
    judge_label,
    plot_reward_curves,
    ppo_curve,
    seeds_table,
    win_rate_table,
)

PAGE = (8.27, 11.69)  # A4, inches
WRAP = 96  # characters per line of body text


class Page:
    """A page filled top to bottom with headings, paragraphs, monospace blocks and figures."""

    def __init__(self, pdf):
        import matplotlib.pyplot as plt
        self.pdf, self.plt = pdf, plt
        self.fig = plt.figure(figsize=PAGE)
        self.y = 0.95

    def heading(self, text, size=14):
        self.fig.text(0.07, self.y, text, fontsize=size, weight="bold", va="top")
        self.y -= 0.035 if size > 12 else 0.028

    def para(self, text, mono=False, size=None):
        lines = text.splitlines() if mono else textwrap.wrap(" ".join(text.split()), WRAP)
        size = size or (6.8 if mono else 8.5)
        self.fig.text(0.07, self.y, "\n".join(lines), fontsize=size, va="top",
                      family="monospace" if mono else None, linespacing=1.35)
        self.y -= len(lines) * size * 1.35 / 72 / PAGE[1] + 0.012

    def close(self):
        self.pdf.savefig(self.fig)
        self.plt.close(self.fig)


def load_run(run_dir):
    """results.json of a finished pipeline run, and the saved config.json of its RM and PPO stages:
    what the report says about the method and the data is read from them."""
    path = os.path.join(run_dir, "results.json")
    if not os.path.isfile(path):
        raise UserError(f"--run {run_dir}: no results.json (is it a finished pipeline run directory?)")
    with open(path) as f:
        results = json.load(f)
    rm, ppo = (read_json(os.path.join(run_dir, stage, "config.json"), f"{stage} config of --run")
               for stage in ("rm", "ppo"))
    return results, rm, ppo


def _signed(kind: str) -> str:
    """The gold value of an answer kind as the prose writes it: +2, -1, 0."""
    value = ANSWER_KINDS[kind][1]
    return f"{value:+g}" if value else "0"


def _parameters(model: ModelConfig) -> int:
    """The model's parameter count, from shapes alone (no weights are made)."""
    with torch.device("meta"):
        return GPT(model).num_params()


def method_text(ppo_run: dict) -> str:
    """The model and the PPO objective, as configured in the run's PPO stage (its config.json)."""
    model, ppo = ModelConfig.from_dict(ppo_run["model"]), ppo_run["ppo"]
    init = (f"started from {model.pretrained})" if model.pretrained else
            "random initialisation), because no GPT-2 weights can be downloaded here")
    normalised = "reward-model score normalised on the SFT policy's samples, " if ppo["normalize_reward"] else ""
    no_eos = ", responses without EOS penalised" if ppo["missing_eos_penalty"] is not None else ""
    return (f"Model: a hand-written GPT-2 (pre-LayerNorm, tied embeddings, KV-cache generation) with the real "
            f"{model.vocab_size}-token GPT-2 vocabulary; the offline run uses the '{ppo_run['args']['preset']}' "
            f"preset ({_parameters(model) / 1e6:.1f}M parameters, {init}. SFT: cross-entropy on response tokens. "
            f"RM: scalar head on the last token, Bradley-Terry loss, initialised from SFT. PPO: per-token KL "
            f"penalty to the frozen SFT policy, {normalised}GAE (gamma {ppo['gamma']:g}, lambda {ppo['lam']:g}), "
            f"{ppo['ppo_epochs']} clipped epochs per rollout, critic initialised from the RM{no_eos}.")


def task_text() -> str:
    """The synthetic task in a paragraph, its numbers from src/task.py."""
    return (f"Task (src/task.py): questions about {len(task.FACTS)} facts (capitals, colours, animal sounds) in "
            f"the HH format. Gold reward = content ({_signed('correct')} the fact stated as a plain sentence about "
            f"the asked subject, {_signed('wrong')} any entity outside such a sentence, {_signed('no answer')} no "
            f"answer or a qualified one) + tone (polite {_signed('polite')}, rude {_signed('rude')}) "
            f"+ length, repetition, fluency and ending penalties; best answer {task.MAX_GOLD:g}. Demonstrations "
            f"are of mixed quality ({100 * task.DEMO_MIX['good']:.0f}% best, the rest plain, rude, wrong, refusing, "
            f"rambling or repeating). Raters prefer a over b with probability sigmoid((g(a) - g(b)) / "
            f"{task.TAU:g}). Prompts are split into disjoint sets for SFT, RM training, RM dev and test, PPO, dev "
            f"(validation and PPO curves) and test (the final evaluation only, part of it asked with phrasings "
            f"no training file uses).")


def results_page(pdf, run_dir, results, ppo_run):
    """Page 1: the question, the answer in numbers, the method, the result tables."""
    by = {(r["a"], r["b"], judge_label(r["judge"])): r for r in results["results"]}
    gold, rm_row = by[("ppo", "sft", "gold")], by[("ppo", "sft", "rm")]
    parts = [by.get(("ppo", "sft", f"gold:{part}")) for part in ("correctness", "style")]
    acc = results["rm_gold_accuracy"]
    seconds = results["seconds"]
    lo, hi = gold["ci95"]
    device = ppo_run["args"]["device"]
    p = Page(pdf)
    p.heading("minChatGPT: RLHF for GPT-2, measured against a known truth", 13)
    p.para(f"Run: {os.path.basename(run_dir.rstrip('/'))}; whole pipeline {sum(seconds.values()) / 60:.1f} "
           f"minutes on {'a CPU' if device == 'cpu' else device}. All numbers below are read from that run's "
           f"results.json.")
    p.heading("Question", 12)
    p.para("Does RLHF (SFT, then a reward model from preference pairs, then PPO with a KL penalty to the SFT "
           "model) make a GPT-2 policy better? The original CS224N project answered with a ChatGPT judge. "
           "A judge's verdict is itself a proxy, so this report measures the pipeline on a task whose true "
           "preference is known: a deterministic gold reward defines a good answer, simulated raters label "
           "preference pairs from it with noise, and the gold reward judges the final policies.")
    p.heading("Answer", 12)
    resampled = "facts" if gold.get("ci_clusters") else "prompts"
    p.para(f"On this task, on {gold['pairs']} test prompts never used in training or tuning, the PPO policy's "
           f"answer is better than the SFT policy's under the gold reward {100 * gold['win_rate']:.1f}% of the "
           f"time (ties count half; 95% bootstrap CI over {resampled} [{100 * lo:.1f}%, {100 * hi:.1f}%]); "
           f"mean gold reward "
           f"{gold['mean_score_b']:.2f} -> {gold['mean_score_a']:.2f} of a possible {task.MAX_GOLD:g}. The reward "
           f"model prefers PPO's answer {100 * rm_row['win_rate']:.1f}% of the time: the proxy overstates the "
           f"gain. The reward model orders {100 * acc['vs_gold']:.1f}% of {acc['pairs']} held-out pairs as the "
           f"noiseless gold does (its noisy training labels: {100 * acc['labels_vs_gold']:.1f}%).")
    if all(parts):
        correct, styled = (f"{100 * x['win_rate']:.1f}% [{100 * x['ci95'][0]:.1f}%, {100 * x['ci95'][1]:.1f}%]"
                           for x in parts)
        p.para(f"What the win is made of: judged on correctness alone (the gold reward's content term) PPO wins "
               f"{correct}, on style alone (every other term: tone, length, repetition, fluency, ending) {styled}.")
    p.heading("Method", 12)
    p.para(method_text(ppo_run))
    p.para(task_text())
    p.heading("Results", 12)
    p.para("\n".join(win_rate_table(results["results"])), mono=True)
    if results.get("answers"):
        p.para(f"What the {results['prompts']['n']} evaluation answers are made of (share of answers, from the "
               f"gold reward's terms):")
        p.para("\n".join(answers_table(results)), mono=True)
    p.para("Wall time per stage (s): " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()) + ".")
    p.close()


def over_optimisation_page(pdf, results, rm_run, ppo_run, ablation=None):
    """Page 2: RM score and gold reward along PPO (and along a weak-KL ablation), and what limits it."""
    p = Page(pdf)
    p.heading("Over-optimisation: proxy reward against true reward", 12)
    curves = [("main run", results["over_optimisation"], "o")]
    if ablation:
        curves.append(("weak KL penalty", ppo_curve(ablation, "--ablation"), "s"))
    plot_reward_curves(p.fig, curves, rect=(0.1, p.y - 0.33, 0.85, 0.31))
    p.y -= 0.38
    text = (f"Each point is one evaluation during PPO on {ppo_run['data']['eval']['kept']} held-out prompts (fixed "
            f"sampling seed). With the main run's KL coefficient the gold reward rises with the RM score.")
    if ablation:
        last = curves[1][1][-1]
        text += (f" With a much weaker KL penalty (the second curve) the policy drifts to KL {last['kl']:.1f} "
                 f"nats, "
                 f"the RM score keeps rising ({last['rm_score']:.2f}) while the gold reward ends at "
                 f"{last['gold']:.2f}: the policy learned what the reward model over-rates, not what is good.")
    p.para(text)
    acc = results["rm_gold_accuracy"]
    answers = results.get("answers", {})
    p.heading("What limits it", 12)
    content, style = acc["vs_gold_content_pairs"], acc["vs_gold_style_pairs"]
    text = (f"The reward model learns from {rm_run['data']['train']['kept']:,} noisy pairs in "
            f"{results['seconds']['rm'] / 60:.1f} minutes. On the held-out test pairs it orders "
            f"{100 * style:.1f}% of those that differ only in style as gold does, and {100 * content:.1f}% of the "
            f"{acc['content_pairs']} that differ in correctness (right fact, wrong fact, no answer)")
    text += (": facts are what it knows least, so PPO mostly changes style." if content < style - 0.05 else
             ": it knows facts about as well as style, because its training pairs include answer swaps (the "
             "same sentence with another answer).")
    if answers:
        sft, ppo = answers["sft"], answers["ppo"]
        text += (f" Wrong answers go from {100 * sft['wrong']:.1f}% of SFT's samples to {100 * ppo['wrong']:.1f}% "
                 f"of PPO's, correct ones from {100 * sft['correct']:.1f}% to {100 * ppo['correct']:.1f}%. Judged on "
                 f"correctness alone PPO can win at most {100 * (0.5 + (1 - sft['correct']) / 2):.1f}% against "
                 f"this SFT policy (ties count half, and SFT is correct on {100 * sft['correct']:.1f}% of prompts).")
    p.para(text)
    p.close()


def seeds_page(pdf, seeds_dir):
    """The PPO-vs-SFT figures of every seed of a --seeds run, their mean and its interval over facts."""
    summary = read_json(os.path.join(seeds_dir, "results.json"), "--seeds")
    if "per_seed" not in summary:
        raise UserError(f"--seeds {seeds_dir}: not a pipeline.py --seeds run directory (no per-seed results)")
    mean = summary["mean"]["gold"]
    p = Page(pdf)
    p.heading(f"Seeds: the whole pipeline once per seed ({', '.join(map(str, summary['seeds']))})", 12)
    p.para(f"Each seed draws its own data, initialisation, sampling and evaluation prompts. Mean PPO-vs-SFT gold "
           f"win-rate {100 * mean['win_rate']:.1f}%, 95% interval [{100 * mean['ci95'][0]:.1f}%, "
           f"{100 * mean['ci95'][1]:.1f}%] from a bootstrap that draws the {len(task.FACTS)} facts once for all "
           f"seeds (prompts about one fact are not independent evidence); each seed's own interval also "
           f"resamples facts. Correctness only and style only are the gold reward's content term and the "
           f"sum of its other terms.")
    p.para("\n".join(seeds_table(summary).splitlines()[2:]), mono=True, size=5.5)
    p.close()


def benchmarks_page(pdf, benchmarks):
    """Page 3: the benchmark table as it is, wrapped to the page."""
    with open(benchmarks) as f:
        table = f.read()
    p = Page(pdf)
    p.heading("Speed (benchmarks/run.py: ratios measured in one run, one machine)", 12)
    lines = [wrapped for line in table.splitlines()
             for wrapped in (textwrap.wrap(line, 150, subsequent_indent="  ") or [""])]
    p.para("\n".join(lines), mono=True, size=5.0)
    p.close()


def build(run_dir, out, ablation=None, benchmarks=None, seeds=None):
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.backends.backend_pdf import PdfPages

    results, rm_run, ppo_run = load_run(run_dir)
    with PdfPages(out) as pdf:
        results_page(pdf, run_dir, results, ppo_run)
        over_optimisation_page(pdf, results, rm_run, ppo_run, ablation)
        if seeds:
            seeds_page(pdf, seeds)
        if benchmarks:
            benchmarks_page(pdf, benchmarks)
    print(f"wrote {out}")


def main(argv=None):
    ap = parser(__doc__)
    ap.add_argument("--run", required=True, help="a finished pipeline run directory (results.json)")
    ap.add_argument("--ablation", default=None, help="a train_ppo.py run with a weaker KL penalty (optional)")
    ap.add_argument("--benchmarks", default=None, help="benchmarks/results/latest.md (optional)")
    ap.add_argument("--seeds", default=None, help="a pipeline.py --seeds run directory (optional)")
    ap.add_argument("-o", "--out", default="report.pdf")
    args = ap.parse_args(argv)
    for flag, path in (("--benchmarks", args.benchmarks), ("--ablation", args.ablation), ("--seeds", args.seeds)):
        if path and not os.path.exists(path):
            raise UserError(f"{flag} {path}: not found")
    build(args.run, args.out, args.ablation, args.benchmarks, args.seeds)


if __name__ == "__main__":
    run_cli(main)
