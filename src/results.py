"""What a pipeline run measured, as tables and plots: shared by pipeline.py (results.md and
over_optimisation.png) and report.py (the PDF), so both show the same numbers the same way.

Nothing here trains or evaluates a model: the inputs are a run's results.json, its evaluation
answers (eval/generations.jsonl) and its PPO metrics (ppo/metrics.jsonl).
"""
import json
import os
from typing import Dict, List, Optional

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


def _read_jsonl(path: str) -> List[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def phrasing_results(eval_dir: str, seed: int = 0, n_boot: int = 10000) -> List[dict]:
    """Every comparison under every judge again, on the test prompts asked with a phrasing the
    training files use ("seen") and on those asked with one they never use ("unseen"), from the
    evaluation's judgments.jsonl and generations.jsonl (intervals resample facts)."""
    from evaluate import summarize
    gens = _read_jsonl(os.path.join(eval_dir, "generations.jsonl"))
    judgments = _read_jsonl(os.path.join(eval_dir, "judgments.jsonl"))
    facts = [task.parse_prompt(g["prompt"])[1] for g in gens]
    kind = [task.phrasing(g["prompt"]) for g in gens]
    groups: Dict[tuple, List[dict]] = {}
    for r in judgments:
        groups.setdefault((r["judge"], r["a"], r["b"]), []).append(r)
    out = []
    for (judge, a, b), records in groups.items():
        for phrasing in ("seen", "unseen"):
            part = [r for r in records if kind[r["i"]] == phrasing]
            if part:
                answers = [[gens[r["i"]]["answers"][m] for r in part] for m in (a, b)]
                out.append({"judge": judge, "a": a, "b": b, "phrasing": phrasing,
                            **summarize(part, answers[0], answers[1], n_boot, seed, facts)})
    return out


# -----------------------------------------------------------------------------
# Several seeds


HEADLINE = [("gold", "win-rate"), ("gold:correctness", "correctness only"), ("gold:style", "style only")]


def _row(results: dict, judge: str, a: str = "ppo", b: str = "sft", phrasing: Optional[str] = None) -> dict:
    rows = results.get("by_phrasing", []) if phrasing else results["results"]
    for r in rows:
        if r["judge"] == judge and r["a"] == a and r["b"] == b and r.get("phrasing") == phrasing:
            return r
    raise UserError(f"no {a} vs {b} result under judge {judge!r}" + (f" ({phrasing})" if phrasing else ""))


def seeds_summary(runs: Dict[int, str], n_boot: int = 10000) -> dict:
    """PPO vs SFT over several pipeline runs (one per seed, `runs`: seed -> run directory): each
    seed's gold, correctness-only and style-only win-rates with their intervals, the seen / unseen
    phrasing split and the RM's accuracy; their mean over seeds; and a 95% interval of that mean
    that resamples facts, one draw for all seeds (the facts are the same in every seed, the prompts
    are not)."""
    from evaluate import runs_bootstrap_ci
    value = {"win": 1.0, "tie": 0.5, "loss": 0.0}
    per_seed, samples = {}, {judge: [] for judge, _ in HEADLINE}
    for seed, run_dir in runs.items():
        with open(os.path.join(run_dir, "results.json")) as f:
            results = json.load(f)
        gens = _read_jsonl(os.path.join(run_dir, "eval", "generations.jsonl"))
        facts = [task.parse_prompt(g["prompt"])[1] for g in gens]
        for r in _read_jsonl(os.path.join(run_dir, "eval", "judgments.jsonl")):
            if (r["a"], r["b"]) == ("ppo", "sft") and r["judge"] in samples and r["outcome"] is not None:
                samples[r["judge"]].append((seed, value[r["outcome"]], facts[r["i"]]))
        acc = results["rm_gold_accuracy"]
        per_seed[seed] = {
            **{judge: {k: _row(results, judge)[k] for k in ("win_rate", "ci95", "mean_score_a", "mean_score_b")}
               for judge, _ in HEADLINE},
            **{f"gold_{p}": {k: _row(results, "gold", phrasing=p)[k] for k in ("win_rate", "ci95", "pairs")}
               for p in ("seen", "unseen")},
            "rm_vs_gold": acc["vs_gold"], "rm_content_pairs": acc["vs_gold_content_pairs"],
            "rm_style_pairs": acc["vs_gold_style_pairs"], "run_dir": run_dir,
            "seconds": sum(results["seconds"].values())}
    mean = {}
    for judge, _ in HEADLINE:
        rates = [s[judge]["win_rate"] for s in per_seed.values()]
        runs_ = [([v for s, v, _ in samples[judge] if s == seed], [c for s, _, c in samples[judge] if s == seed])
                 for seed in runs]
        mean[judge] = {"win_rate": sum(rates) / len(rates), "ci95": list(runs_bootstrap_ci(runs_, n_boot)),
                       "min_lower": min(s[judge]["ci95"][0] for s in per_seed.values())}
    for key in ("rm_vs_gold", "rm_content_pairs", "rm_style_pairs"):
        mean[key] = sum(s[key] for s in per_seed.values()) / len(per_seed)
    for p in ("seen", "unseen"):
        mean[f"gold_{p}"] = {"win_rate": sum(s[f"gold_{p}"]["win_rate"] for s in per_seed.values()) / len(per_seed)}
    return {"seeds": list(runs), "per_seed": {str(k): v for k, v in per_seed.items()}, "mean": mean}


def seeds_table(summary: dict) -> str:
    """A seeds summary (seeds_summary) as Markdown: one row per seed, then the mean."""
    head = ["| seed | PPO vs SFT, gold | correctness only | style only | seen phrasing | unseen phrasing | "
            "RM vs gold: all / correctness / style pairs |", "|---|---|---|---|---|---|---|"]

    def cell(x):
        ci = x.get("ci95")
        return _pct(x["win_rate"]) + (f" [{_pct(ci[0])}, {_pct(ci[1])}]" if ci else "")

    out = ["## PPO vs SFT over seeds (test split; ties count half; intervals resample facts)", "", *head]
    rows = list(summary["per_seed"].items()) + [("mean", summary["mean"])]
    for seed, s in rows:
        out.append(f"| {seed} | " + " | ".join(cell(s[j]) for j, _ in HEADLINE) + " | "
                   + " | ".join(cell(s[f"gold_{p}"]) for p in ("seen", "unseen"))
                   + f" | {_pct(s['rm_vs_gold'])} / {_pct(s['rm_content_pairs'])} / {_pct(s['rm_style_pairs'])} |")
    return "\n".join(out)


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


def gold_terms(results: dict) -> Dict[str, Dict[str, float]]:
    """policy -> mean content term and mean style term (every other term) of its evaluation answers,
    read from the gold:correctness and gold:style comparisons (init, sft, ppo where compared)."""
    out: Dict[str, Dict[str, float]] = {}
    for r in results["results"]:
        part = {"gold:correctness": "content", "gold:style": "style"}.get(r["judge"])
        if part:
            for side in ("a", "b"):
                out.setdefault(r[side], {})[part] = r[f"mean_score_{side}"]
    return {name: terms for name, terms in out.items() if len(terms) == 2}


def plot_gold_terms(ax, terms: Dict[str, Dict[str, float]]):
    """Each policy's mean gold reward per answer as two bars side by side, content and style, with
    their sum marked: where a policy's reward comes from. `terms` as gold_terms returns it."""
    names = list(terms)
    xs = range(len(names))
    for offset, part, colour in ((-0.2, "content", "tab:blue"), (0.2, "style", "tab:orange")):
        ax.bar([x + offset for x in xs], [terms[n][part] for n in names], width=0.38, color=colour,
               label=f"{part} term" + (" (correctness)" if part == "content" else " (tone, length, ...)"))
    ax.plot(list(xs), [terms[n]["content"] + terms[n]["style"] for n in names], "kD", label="gold (their sum)")
    ax.axhline(0, color="black", lw=0.6)
    ax.axhline(task.MAX_GOLD, color="grey", lw=0.8, ls=":")
    ax.set_xticks(list(xs), names)
    ax.set_ylabel("mean per answer (test prompts)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=6.5, loc="upper right")


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


def judge_label(name: str) -> str:
    """A judge's name for a table: "rm" for an rm:RUN_DIR judge, else the name."""
    return "rm" if name.startswith("rm:") else name


def win_rate_table(rows: List[dict], phrasing: bool = False) -> List[str]:
    """One Markdown row per (comparison, judge[, phrasing])."""
    out = ["| comparison | judge |" + (" phrasing |" if phrasing else "")
           + " wins | ties | losses | win-rate (ties half) | 95% CI | mean score a / b |",
           "|---|---|" + ("---|" if phrasing else "") + "---|---|---|---|---|---|"]
    for r in rows:
        ci = r["ci95"] or [None, None]
        out.append(f"| {r['a']} vs {r['b']} | {judge_label(r['judge'])} | "
                   + (f"{r['phrasing']} ({r['pairs']}) | " if phrasing else "")
                   + f"{r['wins']} | {r['ties']} | {r['losses']} | {_pct(r['win_rate'])} | "
                   f"[{_pct(ci[0])}, {_pct(ci[1])}] | {_num(r['mean_score_a'])} / {_num(r['mean_score_b'])} |")
    return out


def rm_accuracy_line(acc: dict, split: str) -> str:
    return (f"Reward model on {acc['pairs']} {split} pairs: agrees with the noiseless gold preference "
            f"{_pct(acc['vs_gold'])}, with the noisy labels {_pct(acc['vs_noisy_labels'])} (the labels themselves "
            f"agree with gold {_pct(acc['labels_vs_gold'])}); on the {acc['content_pairs']} pairs that differ in "
            f"correctness {_pct(acc['vs_gold_content_pairs'])}, on those that differ only in style "
            f"{_pct(acc['vs_gold_style_pairs'])}.")


def answers_table(results: dict) -> List[str]:
    """Share of each model's evaluation answers of each kind (ANSWER_KINDS)."""
    out = ["| answers of | " + " | ".join(ANSWER_KINDS) + " |", "|---" * (len(ANSWER_KINDS) + 1) + "|"]
    for name, shares in results["answers"].items():
        out.append(f"| {name} | " + " | ".join(_pct(shares[k]) for k in ANSWER_KINDS) + " |")
    return out


def results_table(results: dict) -> str:
    """The run's results as Markdown: win-rates per judge (whole test split, then by phrasing), RM
    accuracy, what the answers are made of, over-optimisation, wall times."""
    rows = results.get("results", [])
    clustered = any(r.get("ci_clusters") for r in rows)
    out = ["## Results", "", *win_rate_table(rows), "",
           "Ties count half; the 95% CI is a bootstrap over "
           + (f"facts ({max(r['ci_clusters'] or 0 for r in rows)} clusters of prompts)." if clustered
              else "prompts.")
           + (" gold:correctness and gold:style are the gold reward's content term and the sum of its other "
              "terms." if any(r["judge"] == "gold:style" for r in rows) else "")]
    if results.get("by_phrasing"):
        out += ["", "By phrasing of the question (seen: a template the training files use; unseen: one they "
                    "never use):", "", *win_rate_table(results["by_phrasing"], phrasing=True)]
    if "rm_gold_accuracy" in results:
        out += ["", rm_accuracy_line(results["rm_gold_accuracy"], "held-out test")]
    if "rm_gold_accuracy_dev" in results:
        out += ["", rm_accuracy_line(results["rm_gold_accuracy_dev"], "dev")]
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
