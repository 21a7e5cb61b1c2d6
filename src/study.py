"""The study: which way of learning from preferences helps a small model most, at what KL cost, and
what each of the original project's implementation choices costs, measured with the task's gold reward.

For every seed, from the same pipeline run (SFT model, reward model, preference pairs, prompts), it
trains and evaluates:
  methods   PPO (the pipeline's), RLOO (Ahmadian et al. 2024: k samples per prompt, leave-one-out
            baseline, no critic), DPO and IPO (Rafailov et al. 2023; Azar et al. 2023) on the reward
            model's pairs, and best-of-n against the reward model (n = 1 .. 16, analytic KL
            log n - (n - 1) / n; Gao et al. 2022), DPO also at other betas for the frontier;
  switches  PPO with one of the original's choices put back: a reward model that averages its head
            over every position, padding included; one gradient step per rollout with one
            sequence-level advantage (reward - V(prompt)); rollouts sampled from the top 50 tokens
            while log-probs come from the full softmax; and the judging protocol that always shows the
            newer model as "B", measured with a simulated judge of known position bias.
Every policy answers the test prompts once (temperature 1, as the pipeline's evaluation); the gold
reward and its correctness and style parts compare it with SFT (and with PPO), and its KL to SFT is
measured on fresh samples of the same prompts. Intervals are 95% percentile bootstraps of the mean
over seeds that resample the task's facts (one draw for every seed): prompts about one fact are not
independent evidence.

Everything is kept under one directory, and a rerun with --run-dir reuses whatever is finished
(a training killed part-way resumes from its newest checkpoint): killing the study loses at most
the stage that was running.

Output in the run directory: results.md (the table), results.json, frontier.png (gold reward against
KL to SFT, with PPO's and RLOO's dev curves along training), and seed_<s>/ with every run.

Examples:
  # the study, 3 seeds on the full plan (reusing an existing `pipeline.py --seeds 0,1,2` run)
  python src/study.py --base runs/seeds_task_<stamp>

  # from scratch (runs the pipeline for each seed first)
  python src/study.py --seeds 0,1,2

  # continue a study that was killed
  python src/study.py --run-dir runs/study_task_<stamp> --seeds 0,1,2

  # the quick version (what the tests run)
  python src/study.py --plan quick --seeds 0
"""
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from cli import parser
from common import UserError, make_run_dir, resolve_device, run_cli, write_json_atomic
from pipeline import PLANS, parse_seeds

JUDGES = ["gold", "gold:correctness", "gold:style"]
POSITION_BIAS = 0.2  # the simulated judge's P(says "B" whatever the answers)


@dataclass
class StudyPlan:
    """What the study trains on top of a pipeline plan (flags of the real scripts)."""

    pipeline: str  # the pipeline plan every seed's SFT, RM and PPO come from (pipeline.PLANS)
    dpo: List[str]  # train_dpo.py flags (beta and loss are added per variant)
    dpo_betas: List[float]  # DPO's beta at each point of the frontier; the table's row is the first
    rloo: List[str]  # train_ppo.py flags on top of the pipeline's PPO flags for RLOO
    best_of: List[int]  # best-of-n's n (the table shows 4 and 16 where run)
    switch_ppo: List[str] = field(default_factory=list)  # flags on top of the PPO flags for every switch run
    switch_rm: List[str] = field(default_factory=list)  # flags on top of the RM flags for the switch's RM
    eval_limit: Optional[int] = None  # test prompts (None: the whole test split)
    about: str = ""


STUDY_PLANS = {
    "full": StudyPlan(
        about="the study",
        pipeline="full",
        # chosen on seed 0's dev prompts (gold win-rate vs SFT): lr 1e-4 and beta 0.3 for 200 steps 71.5%;
        # beta 0.1: 55.0% (lr 1e-4, 200 steps), 62.9% (3e-5, 300), 35.0% (3e-4, 300), 10.0% (1e-3, 300)
        dpo=["-b", "32", "--lr", "1e-4", "--max-steps", "200", "--warmup-steps", "10", "--eval-every", "100",
             "--save-every", "100"],
        dpo_betas=[0.3, 0.1, 1.0],
        rloo=["--advantage", "rloo", "--rloo-k", "4"],
        best_of=[1, 2, 4, 8, 16],
    ),
    "quick": StudyPlan(
        about="a shortened study, what the tests run",
        pipeline="quick",
        dpo=["-b", "16", "--lr", "1e-4", "--max-steps", "10", "--warmup-steps", "2", "--eval-every", "0",
             "--save-every", "0"],
        dpo_betas=[0.1],
        rloo=["--advantage", "rloo", "--rloo-k", "4", "--rollout-batch-size", "32", "--max-steps", "3",
              "--eval-every", "3", "--eval-samples", "32"],
        best_of=[1, 2, 4],
        switch_ppo=["--rollout-batch-size", "32", "--max-steps", "3", "--eval-every", "3", "--eval-samples", "32"],
        switch_rm=["--max-steps", "40"],
        eval_limit=64,
    ),
}


@dataclass
class Variant:
    """One policy of the study: how it is trained (script and flags) and where its row goes."""

    name: str  # directory and model name
    label: str  # the table's label
    group: str  # "method" | "switch" | "frontier" (a point of the figure only)
    script: str  # "ppo" | "dpo" | "rm" (a reward model for a switch) | "pipeline" (made by the pipeline)
    flags: List[str] = field(default_factory=list)
    rm: str = "rm"  # the reward model a PPO variant optimises (a directory of the seed)


def variants(plan: StudyPlan) -> List[Variant]:
    dpo = [Variant(f"dpo_beta{b:g}" if i else "dpo", f"DPO (beta {b:g})", "frontier" if i else "method", "dpo",
                   ["--beta", str(b)]) for i, b in enumerate(plan.dpo_betas)]
    return [
        Variant("ppo", "PPO", "method", "pipeline"),
        Variant("rloo", "RLOO (k = 4, no critic)", "method", "ppo", plan.rloo),
        dpo[0],
        Variant("ipo", f"IPO (beta {plan.dpo_betas[0]:g})", "method", "dpo",
                ["--loss", "ipo", "--beta", str(plan.dpo_betas[0])]),
        *dpo[1:],
        Variant("rm_mean_pad", "", "rm", "rm", ["--score-mean-with-padding", *plan.switch_rm]),
        Variant("ppo_rm_mean_pad", "PPO, RM = mean over all positions incl. padding", "switch", "ppo",
                plan.switch_ppo, rm="rm_mean_pad"),
        Variant("ppo_sequence", "PPO, one step per rollout, advantage = R - V(prompt)", "switch", "ppo",
                ["--advantage", "sequence", *plan.switch_ppo]),
        Variant("ppo_top_k", "PPO, rollouts from top-k 50, log-probs of full softmax", "switch", "ppo",
                ["--rollout-top-k", "50", *plan.switch_ppo]),
    ]


# -----------------------------------------------------------------------------
# Runs, reused when finished


def finished(run_dir: str) -> bool:
    return os.path.isdir(os.path.join(run_dir, "final"))


def train_once(main, run_dir: str, argv: List[str]) -> bool:
    """Run a training script's main into run_dir unless it has finished; resume it from its newest
    checkpoint if it was killed after one, else start it again. Returns True if it trained."""
    if finished(run_dir):
        return False
    if os.path.isdir(os.path.join(run_dir, "checkpoints")) and os.listdir(os.path.join(run_dir, "checkpoints")):
        main(["--resume", run_dir])
    else:
        shutil.rmtree(run_dir, ignore_errors=True)
        main(["--run-dir", run_dir, *argv])
    return True


class Seconds:
    """Wall time of every stage of a seed, kept in seconds.json so reruns report the first run's."""

    def __init__(self, path: str):
        self.path = path
        self.values = json.load(open(path)) if os.path.exists(path) else {}

    def run(self, name: str, fn, *args):
        t0 = time.time()
        out = fn(*args)
        if out is not False or name not in self.values:
            self.values[name] = time.time() - t0
            write_json_atomic(self.path, self.values)
        return out


def base_run(args, plan: StudyPlan, seed: int, seed_dir: str) -> str:
    """The seed's pipeline run: --base's, or one made (once) in the study directory."""
    if args.base:
        for candidate in (os.path.join(args.base, f"seed_{seed}"), args.base):
            if os.path.isfile(os.path.join(candidate, "results.json")) and os.path.isdir(
                    os.path.join(candidate, "sft")):
                with open(os.path.join(candidate, "results.json")) as f:
                    if json.load(f).get("seed", seed) == seed:
                        return candidate
        raise UserError(f"--base {args.base} has no finished pipeline run of seed {seed} "
                        f"(expected {os.path.join(args.base, f'seed_{seed}', 'results.json')})")
    run_dir = os.path.join(seed_dir, "pipeline")
    if not os.path.isfile(os.path.join(run_dir, "results.json")):
        import pipeline
        shutil.rmtree(run_dir, ignore_errors=True)
        pipe_args = pipeline.build_parser().parse_args(["--plan", plan.pipeline, "--device", args.device])
        pipeline.run_pipeline(pipe_args, PLANS[plan.pipeline], seed, run_dir)
    return run_dir


def run_seed(args, plan: StudyPlan, seed: int, seed_dir: str) -> dict:
    """Every variant of one seed, trained if not yet, then evaluated; returns the seed's records."""
    import train_dpo
    import train_ppo
    import train_rm
    os.makedirs(seed_dir, exist_ok=True)
    seconds = Seconds(os.path.join(seed_dir, "seconds.json"))
    base = base_run(args, plan, seed, seed_dir)
    data = os.path.join(base, "data")
    pipe = PLANS[plan.pipeline]
    common = ["--preset", "tiny", "--seed", str(seed), "--device", args.device]
    dirs = {"sft": os.path.join(base, "sft"), "rm": os.path.join(base, "rm"), "ppo": os.path.join(base, "ppo")}
    for v in variants(plan):
        if v.script == "pipeline":
            continue
        dirs[v.name] = out = os.path.join(seed_dir, v.name)
        if v.script == "dpo":
            argv = ["-p", dirs["sft"], "--data", os.path.join(data, "rm_train.jsonl"), "--eval-data",
                    os.path.join(data, "rm_dev.jsonl"), "--part", "all", *common, *plan.dpo, *v.flags]
            seconds.run(v.name, train_once, train_dpo.main, out, argv)
        elif v.script == "rm":
            argv = ["-p", dirs["sft"], "--data", os.path.join(data, "rm_train.jsonl"), "--eval-data",
                    os.path.join(data, "rm_dev.jsonl"), "--part", "all", *common, *pipe.rm, *v.flags]
            seconds.run(v.name, train_once, train_rm.main, out, argv)
        else:
            argv = ["-a", dirs["sft"], "-c", dirs[v.rm], "--prompts", os.path.join(data, "ppo_prompts.jsonl"),
                    "--eval-prompts", os.path.join(data, "dev_prompts.jsonl"), "--part", "all", "--eval-judge",
                    "gold", "--max-new-tokens", str(pipe.max_new_tokens), *common, *pipe.ppo, *v.flags]
            seconds.run(v.name, train_once, train_ppo.main, out, argv)
    with open(os.path.join(base, "results.json")) as f:
        base_seconds = json.load(f)["seconds"]
    evaluation = evaluate_seed(args, plan, seed, seed_dir, dirs, data, seconds)
    return {"seed": seed, "base": base, "dirs": dirs, "seconds": {**seconds.values, "ppo": base_seconds["ppo"]},
            **evaluation}


# -----------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def kl_to_reference(policy_dir: str, ref_dir: str, prompts: List[str], max_new_tokens: int, seed: int,
                    device: str, batch_size: int = 64) -> float:
    """KL(policy || reference) per answer in nats: sum over response tokens of log pi - log ref, on
    answers the policy samples (temperature 1, the full softmax, as evaluated), averaged over prompts."""
    from checkpoints import load_model
    from dataset import pad_batch
    from ppo import PPOModels
    from tokenizer import get_tokenizer
    policy, _ = load_model(policy_dir, kind="lm")
    ref, _ = load_model(ref_dir, kind="lm")
    policy.to(device).eval(), ref.to(device).eval()
    models = PPOModels(policy, None, ref)
    keep = policy.config.block_size - max_new_tokens
    ids = [x[-keep:] for x in get_tokenizer().encode_batch(prompts, allow_special=False)]
    g = torch.Generator(device=device).manual_seed(seed)
    total = 0.0
    for s in range(0, len(ids), batch_size):
        prompt_ids, prompt_mask = pad_batch([torch.tensor(x) for x in ids[s:s + batch_size]], padding_side="left")
        gen = models.generate(prompt_ids.to(device), prompt_mask.to(device), max_new_tokens, g)
        Tp = gen.prompt_len
        mask = gen.response_mask[:, Tp:].float()  # (b, Tn)
        log_ratio = models.logprobs(gen.tokens, gen.attention_mask, Tp)[0] - models.ref_logprobs(
            gen.tokens, gen.attention_mask, Tp)  # (b, Tn)
        total += (log_ratio * mask).sum().item()
    return total / len(ids)


def evaluate_seed(args, plan: StudyPlan, seed: int, seed_dir: str, dirs: Dict[str, str], data: str,
                  seconds: Seconds) -> dict:
    """Answers of every policy on the test prompts, judged against SFT and PPO by the gold reward and
    its parts; KL to SFT; the position-biased judge under both protocols."""
    import evaluate
    from best_of_n import BestOfN
    from dataset import load_prompts
    from judges import make_judge
    source = os.path.join(data, "test_prompts.jsonl")
    prompts = load_prompts(source, limit=plan.eval_limit)
    clusters = evaluate.prompt_clusters(prompts, "fact", source)
    pipe = PLANS[plan.pipeline]
    params = evaluate.GenParams(max_new_tokens=pipe.max_new_tokens, temperature=1.0, top_k=0, seed=seed)
    cache = os.path.join(seed_dir, "eval_cache")  # not eval/: the output's generations.jsonl would overwrite it
    policies = [v.name for v in variants(plan) if v.script != "rm"]
    models: Dict[str, object] = {"sft": dirs["sft"], **{name: dirs[name] for name in policies}}
    scorer = make_judge(f"rm:{dirs['rm']}", device=args.device)
    for n in plan.best_of:
        bon = BestOfN(dirs["sft"], scorer, n)
        models[f"best_of_{n}"] = bon
        if f"best_of_{n}" not in seconds.values:  # sampling and ranking timed here, read from the cache below
            seconds.run(f"best_of_{n}", bon.answers, prompts, params, args.device, "fp32",
                        os.path.join(cache, "generations.jsonl"))
    judges = [make_judge(spec, device=args.device) for spec in JUDGES]
    others = [m for m in models if m != "sft"]
    comparisons = [(m, "sft") for m in others] + [(m, "ppo") for m in others if m != "ppo"]
    results = evaluate.evaluate(models, prompts, judges, comparisons, out_dir=os.path.join(seed_dir, "eval"),
                                cache_dir=cache, params=params, device=args.device, clusters=clusters,
                                n_boot=1000)
    protocols = {}
    biased = make_judge(f"position-biased:{POSITION_BIAS:g}:gold", device=args.device)
    for name, fixed in (("both_orders", False), ("fixed_order", True)):
        protocols[name] = evaluate.evaluate({"ppo": dirs["ppo"], "sft": dirs["sft"]}, prompts, [biased],
                                            [("ppo", "sft")], out_dir=os.path.join(seed_dir, f"eval_{name}"),
                                            cache_dir=cache, params=params, device=args.device, clusters=clusters,
                                            n_boot=1000, fixed_order=fixed)
    kl_path = os.path.join(seed_dir, "kl.json")
    kl = json.load(open(kl_path)) if os.path.exists(kl_path) else {}
    for name in policies:
        if name not in kl:
            kl[name] = kl_to_reference(dirs[name], dirs["sft"], prompts, pipe.max_new_tokens, seed, args.device)
            write_json_atomic(kl_path, kl)
    for n in plan.best_of:
        kl[f"best_of_{n}"] = models[f"best_of_{n}"].kl
    kl["sft"] = 0.0
    return {"eval_dir": os.path.join(seed_dir, "eval"), "kl": kl, "facts": clusters,
            "protocol_dirs": {k: os.path.join(seed_dir, f"eval_{k}") for k in protocols}}


# -----------------------------------------------------------------------------
# The table and the figure


VALUE = {"win": 1.0, "tie": 0.5, "loss": 0.0}


def _outcomes(eval_dir: str, facts: List[str], judge: str, a: str, b: str):
    """(values, facts) of every judged prompt of comparison a vs b under `judge` in eval_dir."""
    values, labels = [], []
    with open(os.path.join(eval_dir, "judgments.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if (r["judge"], r["a"], r["b"]) == (judge, a, b) and r["outcome"] is not None:
                values.append(VALUE[r["outcome"]])
                labels.append(facts[r["i"]])
    return values, labels


def _mean_score(eval_dir: str, a: str, b: str, side: str = "a") -> float:
    """Mean gold reward per answer of one side of comparison a vs b in eval_dir's results."""
    with open(os.path.join(eval_dir, "results.json")) as f:
        (row,) = [r for r in json.load(f)["results"] if (r["judge"], r["a"], r["b"]) == ("gold", a, b)]
    return row[f"mean_score_{side}"]


def _win(seeds: List[dict], judge: str, a: str, b: str, eval_key: str = "eval_dir", n_boot: int = 10000) -> dict:
    """Mean over seeds of a's win-rate against b (ties half) and its facts-and-seeds interval."""
    from evaluate import runs_bootstrap_ci
    runs = [_outcomes(s[eval_key] if eval_key == "eval_dir" else s["protocol_dirs"][eval_key], s["facts"],
                      judge, a, b) for s in seeds]
    rates = [sum(v) / len(v) for v, _ in runs]
    lo, hi = runs_bootstrap_ci(runs, n_boot)
    return {"win_rate": sum(rates) / len(rates), "per_seed": rates, "ci95": [lo, hi],
            "significant": not lo <= 0.5 <= hi}


def summarize(seeds: List[dict], plan: StudyPlan) -> dict:
    """The study's numbers over seeds: one row per policy (mean gold reward per answer, win-rates
    against SFT under each judge and against PPO under gold, KL to SFT, minutes of compute), and the
    judging protocols' win-rates next to the truth."""
    names = [("sft", "SFT (the starting point)", "method")]
    names += [(v.name, v.label, v.group) for v in variants(plan) if v.script != "rm"]
    names += [(f"best_of_{n}", f"best-of-{n} (RM picks)", "method" if n in (4, 16) else "frontier")
              for n in plan.best_of]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    rows = []
    for name, label, group in names:
        # SFT's gold reward is the b side of any comparison with it
        gold = [_mean_score(s["eval_dir"], "ppo" if name == "sft" else name, "sft", "b" if name == "sft" else "a")
                for s in seeds]
        row = {"name": name, "label": label, "group": group, "gold": mean(gold), "gold_per_seed": gold,
               "kl": mean([s["kl"][name] for s in seeds]),
               "seconds": None if name == "sft" else mean([s["seconds"].get(name, 0.0) for s in seeds]),
               "win": {}}
        if name != "sft":
            row["win"] = {judge: _win(seeds, judge, name, "sft") for judge in JUDGES}
            if name != "ppo":
                row["win"]["vs_ppo"] = _win(seeds, "gold", name, "ppo")
        rows.append(row)
    judge = f"position-biased:{POSITION_BIAS:g}:gold"
    protocol = {"p_b": POSITION_BIAS, "truth": _win(seeds, "gold", "ppo", "sft"),
                **{k: _win(seeds, judge, "ppo", "sft", eval_key=k) for k in ("both_orders", "fixed_order")}}
    return {"seeds": [s["seed"] for s in seeds], "plan": plan.about, "rows": rows, "judge_protocol": protocol,
            "runs": {str(s["seed"]): {"base": s["base"], "seconds": s["seconds"]} for s in seeds}}


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _cell(w: Optional[dict]) -> str:
    if not w:
        return "-"
    return f"{_pct(w['win_rate'])} [{_pct(w['ci95'][0])}, {_pct(w['ci95'][1])}]" + ("" if w["significant"] else " ~")


def table(summary: dict) -> str:
    seeds = ", ".join(map(str, summary["seeds"]))
    out = [f"## The study: every method and switch against SFT (test split, seeds {seeds})", "",
           "Win-rates count ties half; [95% interval over seeds and facts]; ~ marks an interval that contains "
           "50% (no difference shown). KL to SFT in nats per answer (best-of-n: analytic).", "",
           "| policy | gold per answer | vs SFT, gold | correctness only | style only | vs PPO, gold | KL to SFT | "
           "minutes |", "|---|---|---|---|---|---|---|---|"]
    for group, title in (("method", "methods"), ("switch", "the original's choices, one at a time (PPO)"),
                         ("frontier", "more frontier points")):
        out.append(f"| **{title}** | | | | | | | |")
        for r in (r for r in summary["rows"] if r["group"] == group):
            minutes = "-" if r["seconds"] is None else f"{r['seconds'] / 60:.1f}"
            cells = " | ".join(_cell(r["win"].get(k)) for k in (*JUDGES, "vs_ppo"))
            out.append(f"| {r['label']} | {r['gold']:.2f} | {cells} | {r['kl']:.2f} | {minutes} |")
    p = summary["judge_protocol"]
    out += ["", f"## The judging protocol (PPO vs SFT; a simulated judge that says B on {_pct(p['p_b'])} of "
            "questions whatever the answers, else the gold reward's verdict)", "",
            "| protocol | PPO's win-rate |", "|---|---|",
            f"| the truth (gold reward) | {_cell(p['truth'])} |",
            f"| biased judge, both orders (a flipped verdict is a tie) | {_cell(p['both_orders'])} |",
            f"| biased judge, PPO always shown as B (the original's) | {_cell(p['fixed_order'])} |"]
    return "\n".join(out)


def plot_frontier(summary: dict, seeds: List[dict], path: str):
    """Gold reward per answer against KL to SFT for every policy (the Gao et al. 2022 picture):
    best-of-n's curve, DPO's betas, PPO's and RLOO's dev curves along training (mean over seeds)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from results import ppo_curve
    from task import MAX_GOLD
    rows = {r["name"]: r for r in summary["rows"]}
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=150)
    for name, colour in (("ppo", "tab:blue"), ("rloo", "tab:green")):
        curves = [ppo_curve(s["dirs"][name]) for s in seeds]
        steps = min(len(c) for c in curves)
        if steps > 1:
            kl = [sum(c[i]["kl"] for c in curves) / len(curves) for i in range(steps)]
            gold = [sum(c[i]["gold"] for c in curves) / len(curves) for i in range(steps)]
            ax.plot(kl, gold, color=colour, lw=0.8, ls="--", alpha=0.7,
                    label=f"{rows[name]['label'].split(' (')[0]} along training (dev prompts)")
    bon = sorted((r for r in summary["rows"] if r["name"].startswith("best_of_")), key=lambda r: r["kl"])
    if bon:
        ax.plot([0.0] + [r["kl"] for r in bon], [rows["sft"]["gold"]] + [r["gold"] for r in bon], "o-",
                color="tab:orange", ms=4, label="best-of-n (n = " + ", ".join(r["name"][8:] for r in bon) + ")")
    dpo = sorted((r for r in summary["rows"] if r["name"].startswith("dpo")), key=lambda r: r["kl"])
    ax.plot([r["kl"] for r in dpo], [r["gold"] for r in dpo], "s-", color="tab:red", ms=5,
            label="DPO (beta " + ", ".join(r["label"].split("beta ")[1].rstrip(")") for r in dpo) + ")")
    marks = {"sft": ("k", "*"), "ppo": ("tab:blue", "D"), "rloo": ("tab:green", "D"), "ipo": ("tab:purple", "s")}
    for name, (colour, marker) in marks.items():
        r = rows[name]
        ax.plot(r["kl"], r["gold"], marker, color=colour, ms=8, ls="none", label=r["label"])
    for r, colour in zip((r for r in summary["rows"] if r["group"] == "switch"), ("tab:brown", "tab:pink", "tab:olive")):
        ax.plot(r["kl"], r["gold"], "x", color=colour, ms=8, mew=2, ls="none", label=r["label"])
    ax.axhline(MAX_GOLD, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("KL(policy || SFT), nats per answer")
    ax.set_ylabel(f"gold reward per answer (test; best {MAX_GOLD:g})")
    ax.set_title(f"Gold reward against KL to SFT, mean over seeds {', '.join(map(str, summary['seeds']))}",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None):
    ap = parser(__doc__)
    ap.add_argument("--plan", default="full", choices=sorted(STUDY_PLANS),
                    help="; ".join(f"{k} ({p.about}: on the pipeline's {p.pipeline} plan)" for k, p in STUDY_PLANS.items()))
    ap.add_argument("--seeds", default="0,1,2", metavar="S,S,...", help="seeds (default 0,1,2)")
    ap.add_argument("--base", default=None, metavar="RUN",
                    help="reuse a `pipeline.py --seeds` run (its seed_<s>/) or one pipeline run for the SFT model, "
                         "reward model, PPO run and data (default: run the pipeline's plan for each seed)")
    ap.add_argument("-n", "--name", default="task", help="experiment name: runs/study_<name>_<stamp>/")
    ap.add_argument("--run-dir", default=None, help="the study directory: a new one, or a killed study's to continue")
    ap.add_argument("--out-dir", default="runs", help="where a new study directory is made")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    args = ap.parse_args(argv)
    plan = STUDY_PLANS[args.plan]
    seeds = parse_seeds(args.seeds)
    if args.base and not os.path.isdir(args.base):
        raise UserError(f"--base {args.base}: no such directory")
    args.device = str(resolve_device(args.device))
    study_dir = args.run_dir or make_run_dir("study", args.name, args.out_dir)
    os.makedirs(study_dir, exist_ok=True)
    print(f"study directory: {study_dir} (plan {args.plan}, seeds {', '.join(map(str, seeds))})", flush=True)
    t0 = time.time()
    records = []
    for seed in seeds:
        print(f"\n##### seed {seed}", flush=True)
        records.append(run_seed(args, plan, seed, os.path.join(study_dir, f"seed_{seed}")))
    summary = summarize(records, plan)
    summary["seconds_this_run"] = time.time() - t0
    write_json_atomic(os.path.join(study_dir, "results.json"), summary)
    text = table(summary)
    with open(os.path.join(study_dir, "results.md"), "w") as f:
        f.write(text + "\n")
    plot_frontier(summary, records, os.path.join(study_dir, "frontier.png"))
    print("\n" + text)
    print(f"\nresults: {os.path.join(study_dir, 'results.md')}, figure: {os.path.join(study_dir, 'frontier.png')}")


if __name__ == "__main__":
    run_cli(main)
