"""What a pipeline run measured, as tables and plots: shared by pipeline.py (results.md and
over_optimisation.png) and report.py (the PDF), so both show the same numbers the same way.

Nothing here trains or evaluates a model: the inputs are a run's results.json, its evaluation
answers (eval/generations.jsonl) and its PPO metrics (ppo/metrics.jsonl).
"""
import json
import os
from typing import Dict, List

import task
from common import UserError

ANSWER_KINDS = {  # name -> (gold term, value): what the evaluation answers are made of
    "correct": ("content", 2.0), "wrong": ("content", -1.0), "no answer": ("content", 0.0),
    "polite": ("tone", 0.5), "rude": ("tone", -1.0), "too long": ("length", "<0"),
    "repeats": ("repetition", -1.0), "no EOS": ("ending", -1.0)}


def answer_breakdown(generations: str) -> Dict[str, dict]:
    """model -> share of its evaluation answers of each kind (ANSWER_KINDS), from the gold
    reward's terms: where each policy gains and loses reward."""
    with open(generations) as f:
        rows = [json.loads(line) for line in f]
    out = {}
    for name in rows[0]["answers"]:
        terms = [task.gold_breakdown(r["prompt"], r["answers"][name]["text"], r["answers"][name]["ended"])
                 for r in rows]
        out[name] = {kind: sum(t[term] < 0 if value == "<0" else t[term] == value for t in terms) / len(terms)
                     for kind, (term, value) in ANSWER_KINDS.items()}
    return out


# -----------------------------------------------------------------------------
# The PPO curve: reward against KL


def ppo_curve(ppo_dir: str, what: str = "PPO run") -> List[dict]:
    """(step, KL, RM score, gold) at every evaluation of a PPO run, from its metrics.jsonl."""
    path = os.path.join(ppo_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise UserError(f"{what} {ppo_dir}: no metrics.jsonl (is it a train_ppo.py run directory?)")
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    return [{"step": r["step"], "kl": r["eval/kl"], "rm_score": r["eval/score"], "gold": r.get("eval/gold")}
            for r in rows if "eval/kl" in r]


def plot_reward_curves(fig, curves, rect=(0.1, 0.1, 0.85, 0.8)):
    """Gold reward and RM score at each PPO evaluation, against the policy's KL from the SFT model
    (left) and against the PPO step (right). `curves`: [(label, points, marker)], points as in
    results.json's over_optimisation; `rect` (left, bottom, width, height) is the area to fill."""
    x0, y0, w, h = rect
    by_kl = fig.add_axes([x0, y0, w * 0.44, h])
    by_step = fig.add_axes([x0 + w * 0.56, y0, w * 0.44, h], sharey=by_kl)
    for label, points, marker in curves:
        for ax, xs in ((by_kl, [p["kl"] for p in points]), (by_step, [p["step"] for p in points])):
            if points[0]["gold"] is not None:
                ax.plot(xs, [p["gold"] for p in points], marker + "-", label=f"gold ({label})")
            ax.plot(xs, [p["rm_score"] for p in points], marker + "--", alpha=0.6, label=f"RM score ({label})")
    for ax in (by_kl, by_step):
        ax.axhline(task.MAX_GOLD, color="grey", lw=0.8, ls=":")
        ax.grid(alpha=0.3)
    by_kl.set_xlabel("KL(policy || SFT) per response (nats)")
    by_step.set_xlabel("PPO step")
    by_kl.set_ylabel("mean reward on held-out prompts")
    by_kl.legend(fontsize=6)
    by_kl.set_title(f"against KL (dotted: best gold, {task.MAX_GOLD:g})", fontsize=8)
    by_step.set_title("against training", fontsize=8)


def over_optimisation(ppo_dir: str, run_dir: str) -> List[dict]:
    """Gold and RM reward of the policy at each PPO evaluation, against its KL from the SFT model:
    a table in results and a PNG plot in the run directory."""
    points = ppo_curve(ppo_dir)
    if points:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig = plt.figure(figsize=(9, 4))
        plot_reward_curves(fig, [("PPO", points, "o")], rect=(0.08, 0.13, 0.9, 0.78))
        fig.savefig(os.path.join(run_dir, "over_optimisation.png"), dpi=120)
        plt.close(fig)
    return points


# -----------------------------------------------------------------------------
# Markdown tables


def _pct(x):
    return "–" if x is None else f"{100 * x:.1f}%"


def _num(x):
    return "–" if x is None else f"{x:.3f}"


def win_rate_table(results: dict) -> List[str]:
    """One Markdown row per (comparison, judge)."""
    out = ["| comparison | judge | wins | ties | losses | win-rate (ties half) | 95% CI | mean score a / b |",
           "|---|---|---|---|---|---|---|---|"]
    for r in results.get("results", []):
        ci = r["ci95"] or [None, None]
        out.append(f"| {r['a']} vs {r['b']} | {r['judge'].split(':')[0]} | {r['wins']} | {r['ties']} | "
                   f"{r['losses']} | {_pct(r['win_rate'])} | [{_pct(ci[0])}, {_pct(ci[1])}] | "
                   f"{_num(r['mean_score_a'])} / {_num(r['mean_score_b'])} |")
    return out


def answers_table(results: dict) -> List[str]:
    """Share of each model's evaluation answers of each kind (ANSWER_KINDS)."""
    out = ["| answers of | " + " | ".join(ANSWER_KINDS) + " |", "|---" * (len(ANSWER_KINDS) + 1) + "|"]
    for name, shares in results["answers"].items():
        out.append(f"| {name} | " + " | ".join(_pct(shares[k]) for k in ANSWER_KINDS) + " |")
    return out


def results_table(results: dict) -> str:
    """The run's results as Markdown: win-rates per judge, RM accuracy, what the answers are made of,
    over-optimisation, wall times."""
    out = ["## Results", "", *win_rate_table(results)]
    if "rm_gold_accuracy" in results:
        acc = results["rm_gold_accuracy"]
        out += ["", f"Reward model on {acc['pairs']} held-out pairs: agrees with the noiseless gold preference "
                    f"{_pct(acc['vs_gold'])}, with the noisy labels {_pct(acc['vs_noisy_labels'])} "
                    f"(the labels themselves agree with gold {_pct(acc['labels_vs_gold'])}); on the "
                    f"{acc['content_pairs']} pairs that differ in correctness {_pct(acc['vs_gold_content_pairs'])}, "
                    f"on those that differ only in style {_pct(acc['vs_gold_style_pairs'])}."]
    if results.get("answers"):
        out += ["", *answers_table(results)]
    if results.get("over_optimisation"):
        out += ["", "| PPO step | KL to SFT | RM score (raw) | gold |", "|---|---|---|---|"]
        for p in results["over_optimisation"]:
            out.append(f"| {p['step']} | {p['kl']:.2f} | {_num(p['rm_score'])} | {_num(p['gold'])} |")
    out += ["", "| stage | seconds |", "|---|---|"]
    out += [f"| {k} | {v:.0f} |" for k, v in results["seconds"].items()]
    out.append(f"| total | {sum(results['seconds'].values()):.0f} |")
    return "\n".join(out)
