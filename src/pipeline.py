"""The whole RLHF pipeline in one command: data -> SFT -> reward model -> PPO -> evaluation.

With no arguments it runs offline on a CPU, from scratch, on the built-in synthetic task whose true
preference is known (src/task.py): a tiny GPT-2 learns to answer questions about a small world of
facts from demonstrations of mixed quality, a reward model learns from noisy preference labels, PPO
optimises the policy against that reward model, and the task's gold reward judges the result.
Every stage runs through the same code as its script (train_sft.py, train_rm.py, train_ppo.py,
evaluate.py) into one run directory, and a results table is printed and saved. Training and tuning
read the task's train and dev files; the final evaluation alone reads its test files.

Examples:
  # the main job (the full plan; --help lists every plan's step counts)
  python src/pipeline.py

  # a shortened run (what the tests run)
  python src/pipeline.py --plan quick

  # the main job once per seed, with every seed's figures, their mean and an interval over facts
  python src/pipeline.py --seeds 0,1,2

  # longer PPO than the plan's
  python src/pipeline.py --ppo-args="--max-steps 120"

  # real data on a GPU: GPT-2 medium with LoRA on HH-RLHF, judged by the reward model
  # (add --judge openai for an LLM judge)
  python src/pipeline.py --preset gpt2-medium/lora --data Anthropic/hh-rlhf --prompts fka/awesome-chatgpt-prompts
"""
import json
import os
import shlex
import time
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional

from checkpoints import init_model, save_model
from cli import parser, seed_process
from common import UserError, make_run_dir, resolve_device, run_cli, write_json_atomic
from configs import get_preset
from judges import GOLD_JUDGES
from results import (
    answer_breakdown,
    over_optimisation,
    phrasing_results,
    results_table,
    seeds_summary,
    seeds_table,
)


@dataclass
class Plan:
    """Step counts and learning rates of each stage (per-stage flags of the real scripts)."""

    sft: List[str] = field(default_factory=list)
    rm: List[str] = field(default_factory=list)
    ppo: List[str] = field(default_factory=list)
    eval_limit: Optional[int] = None  # test prompts evaluated (None: the whole test split)
    max_new_tokens: int = 32
    about: str = ""  # what the plan is for, shown by --help

    def summary(self) -> str:
        """The plan's size in words, e.g. 'SFT 400 steps, RM 250, PPO 15, 200 test prompts'."""
        sft, rm, ppo = (flags[flags.index("--max-steps") + 1] for flags in (self.sft, self.rm, self.ppo))
        prompts = "every test prompt" if self.eval_limit is None else f"{self.eval_limit} test prompts"
        return f"SFT {sft} steps, RM {rm}, PPO {ppo}, {prompts}"


# Tuned on the synthetic task's dev split with the tiny preset, on a CPU (see README, "Results").
PLANS = {
    "full": Plan(
        about="the main job",
        sft=["-b", "32", "--lr", "2e-3", "--max-steps", "600", "--warmup-steps", "30", "--eval-every", "200"],
        rm=["-b", "32", "--lr", "1e-3", "--max-steps", "600", "--warmup-steps", "30", "--eval-every", "200"],
        ppo=["--rollout-batch-size", "64", "--minibatch-size", "16", "--ppo-epochs", "4", "--max-steps", "80",
             "--actor-lr", "3e-4", "--critic-lr", "1e-3", "--kl-coef", "0.1", "--eval-every", "10",
             "--save-every", "10", "--keep-last", "100"],
    ),
    "quick": Plan(
        about="a shortened run, what the tests run",
        sft=["-b", "32", "--lr", "2e-3", "--max-steps", "400", "--warmup-steps", "20", "--eval-every", "0"],
        rm=["-b", "32", "--lr", "1e-3", "--max-steps", "250", "--warmup-steps", "20", "--eval-every", "0"],
        ppo=["--rollout-batch-size", "64", "--minibatch-size", "16", "--ppo-epochs", "4", "--max-steps", "15",
             "--actor-lr", "3e-4", "--critic-lr", "1e-3", "--kl-coef", "0.1", "--eval-every", "5",
             "--save-every", "0"],
        eval_limit=200,
    ),
    "smoke": Plan(
        about="checks the plumbing",
        sft=["-b", "8", "--lr", "2e-3", "--max-steps", "20", "--warmup-steps", "2", "--eval-every", "0"],
        rm=["-b", "8", "--lr", "1e-3", "--max-steps", "10", "--warmup-steps", "2", "--eval-every", "0"],
        ppo=["--rollout-batch-size", "8", "--minibatch-size", "4", "--ppo-epochs", "2", "--max-steps", "3",
             "--actor-lr", "3e-4", "--critic-lr", "1e-3", "--eval-every", "3", "--eval-samples", "16",
             "--save-every", "0"],
        eval_limit=24,
        max_new_tokens=12,
    ),
}


class Timer:
    def __init__(self):
        self.seconds: Dict[str, float] = {}

    def stage(self, name: str, fn, *args):
        print(f"\n=== {name} ===", flush=True)
        t0 = time.time()
        out = fn(*args)
        self.seconds[name] = time.time() - t0
        print(f"--- {name}: {self.seconds[name]:.0f} s", flush=True)
        return out


def build_parser():
    ap = parser(__doc__)
    ap.add_argument("-n", "--name", default="task", help="experiment name, part of the run directory")
    ap.add_argument("--preset", default="tiny", help="model preset for every stage")
    ap.add_argument("--plan", default="full", choices=sorted(PLANS),
                    help="step counts and learning rates of every stage on the synthetic task: "
                         + "; ".join(f"{name} ({plan.about}: {plan.summary()})" for name, plan in PLANS.items())
                         + ". With --data the scripts' own defaults apply instead (and --*-args)")
    ap.add_argument("--seed", type=int, default=0, help="seeds data, initialisation, sampling and evaluation")
    ap.add_argument("--seeds", default=None, metavar="S,S,...",
                    help="run the whole pipeline once per seed (e.g. 0,1,2) into one directory, and report every "
                         "seed, their mean and an interval over facts (runs/seeds_<name>_<stamp>/)")
    ap.add_argument("--out-dir", default="runs", help="where the run directory is made")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--data", default=None,
                    help="real data instead of the synthetic task: HH-style pairs for all three stages, each stage "
                         "keeping its own disjoint part of the prompts (see src/dataset.py)")
    ap.add_argument("--prompts", default=None, help="with --data: evaluation prompts (default: --data's test split)")
    ap.add_argument("--judge", action="append", default=[], help="extra evaluation judges (see evaluate.py)")
    ap.add_argument("--eval-limit", type=int, default=None, help="evaluation prompts (default: the plan's)")
    for stage in ("sft", "rm", "ppo"):
        ap.add_argument(f"--{stage}-args", default="", metavar="ARGS",
                        help=f"more flags for train_{stage}.py, after the plan's (so they win), e.g. "
                             f"--{stage}-args='--max-steps 100'")
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)

    plan = PLANS[args.plan]
    if args.data is not None:  # real data: each script's own defaults (the plans are tuned for the tiny task)
        plan = Plan(eval_limit=400 if plan.eval_limit is None else plan.eval_limit, max_new_tokens=128)
    if args.eval_limit is not None:
        if args.eval_limit < 1:
            raise UserError("--eval-limit must be at least 1")
        plan = replace(plan, eval_limit=args.eval_limit)
    args.device = str(resolve_device(args.device))  # a name again: the stage scripts take it as a flag
    if args.seeds is None:
        run_dir = make_run_dir("pipeline", args.name, args.out_dir)
        print(f"run directory: {run_dir}", flush=True)
        run_pipeline(args, plan, args.seed, run_dir)
        return
    seeds = parse_seeds(args.seeds)
    top = make_run_dir("seeds", args.name, args.out_dir)
    print(f"run directory: {top} (seeds {', '.join(map(str, seeds))})", flush=True)
    runs = {}
    for seed in seeds:
        print(f"\n##### seed {seed}", flush=True)
        run_pipeline(args, plan, seed, os.path.join(top, f"seed_{seed}"))
        runs[seed] = os.path.join(top, f"seed_{seed}")
    summary = seeds_summary(runs)
    write_json_atomic(os.path.join(top, "results.json"), summary)
    table = seeds_table(summary)
    with open(os.path.join(top, "results.md"), "w") as f:
        f.write(table + "\n")
    print("\n" + table)
    print(f"\nresults: {os.path.join(top, 'results.md')}")


def parse_seeds(text: str) -> List[int]:
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--seeds {text!r}: expected comma-separated integers, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds {text!r}: expected distinct comma-separated integers, e.g. 0,1,2")
    return seeds


def run_pipeline(args, plan: Plan, seed: int, run_dir: str) -> dict:
    """Data, SFT, RM, PPO and evaluation of one seed into `run_dir`; returns (and writes) its results."""
    os.makedirs(run_dir, exist_ok=True)
    timer = Timer()
    common = ["--preset", args.preset, "--seed", str(seed), "--device", args.device]

    if args.data is None:
        import task
        files = timer.stage("data", task.write_task_data, os.path.join(run_dir, "data"), seed)
        # Training and validation read only the dev files; test files go to the final evaluation alone.
        sft_data = ["--data", files["sft"], "--eval-data", files["sft_dev"], "--part", "all"]
        rm_data = ["--data", files["rm_train"], "--eval-data", files["rm_dev"], "--part", "all"]
        ppo_data = ["--prompts", files["ppo_prompts"], "--eval-prompts", files["dev_prompts"], "--part", "all",
                    "--eval-judge", "gold"]
        eval_prompts, judges = files["test_prompts"], list(GOLD_JUDGES)
    else:
        sft_data, rm_data, ppo_data = ["--data", args.data], ["--data", args.data], ["--prompts", args.data]
        eval_prompts, judges = args.prompts or args.data, []

    import train_ppo
    import train_rm
    import train_sft
    stage_dirs = {s: os.path.join(run_dir, s) for s in ("sft", "rm", "ppo")}
    base = save_initial_model(args.preset, seed, os.path.join(run_dir, "init"))
    timer.stage("sft", train_sft.main, ["--run-dir", stage_dirs["sft"], *common, *sft_data, *plan.sft,
                                        *shlex.split(args.sft_args)])
    timer.stage("rm", train_rm.main, ["--run-dir", stage_dirs["rm"], "-p", stage_dirs["sft"], *common, *rm_data,
                                      *plan.rm, *shlex.split(args.rm_args)])
    timer.stage("ppo", train_ppo.main, ["--run-dir", stage_dirs["ppo"], "-a", stage_dirs["sft"], "-c",
                                        stage_dirs["rm"], *common, "--max-new-tokens", str(plan.max_new_tokens),
                                        *ppo_data, *plan.ppo, *shlex.split(args.ppo_args)])
    results = timer.stage("evaluation", evaluate_all, run_dir, stage_dirs, base, eval_prompts,
                          judges + [f"rm:{stage_dirs['rm']}"] + args.judge, plan, args, seed)
    if args.data is None:
        results["rm_gold_accuracy"] = rm_gold_accuracy(stage_dirs["rm"], files["rm_test"], args.device)
        results["rm_gold_accuracy_dev"] = rm_gold_accuracy(stage_dirs["rm"], files["rm_dev"], args.device)
        results["over_optimisation"] = over_optimisation(stage_dirs["ppo"], run_dir)
        results["answers"] = answer_breakdown(os.path.join(run_dir, "eval", "generations.jsonl"))
        results["by_phrasing"] = phrasing_results(os.path.join(run_dir, "eval"), seed)
    results["seed"] = seed
    results["seconds"] = timer.seconds
    write_json_atomic(os.path.join(run_dir, "results.json"), results)
    table = results_table(results)
    with open(os.path.join(run_dir, "results.md"), "w") as f:
        f.write(table + "\n")
    print("\n" + table)
    print(f"\nresults: {os.path.join(run_dir, 'results.md')}")
    return results


def save_initial_model(preset: str, seed: int, out_dir: str) -> Optional[str]:
    """The model before any training on the task (what SFT starts from): random weights for the
    from-scratch presets, hub GPT-2 otherwise (returned as its hub name)."""
    config = get_preset(preset)
    if config.pretrained:
        return config.pretrained
    seed_process(seed, 0)  # the same draw as train_sft.py makes
    save_model(init_model("lm", config), out_dir, stage="init", preset=preset)
    return out_dir


def evaluate_all(run_dir, stage_dirs, base, prompts_source, judges, plan, args, seed) -> dict:
    """PPO vs SFT and SFT vs the initial model, under every judge. On the synthetic task the
    intervals resample facts: prompts about one fact are not independent evidence."""
    import evaluate
    from dataset import load_prompts
    from judges import make_judge
    prompts = load_prompts(prompts_source, limit=plan.eval_limit, split="test" if args.data else "train")
    clusters = None if args.data else evaluate.prompt_clusters(prompts, "fact", prompts_source)
    models = {"init": base, "sft": stage_dirs["sft"], "ppo": stage_dirs["ppo"]}
    params = evaluate.GenParams(max_new_tokens=plan.max_new_tokens, temperature=1.0, top_k=0, seed=seed)
    built = [make_judge(spec, device=args.device) for spec in judges]
    return evaluate.evaluate(models, prompts, built, comparisons=[("ppo", "sft"), ("sft", "init")],
                             out_dir=os.path.join(run_dir, "eval"), cache_dir=os.path.join(run_dir, "eval_cache"),
                             params=params, device=args.device, clusters=clusters)


def rm_gold_accuracy(rm_dir: str, rm_test: str, device: str) -> dict:
    """How often the reward model orders a held-out pair as the noiseless gold reward does (pairs with
    equal gold are not in the data), next to its agreement with the noisy labels it was trained on."""
    import torch

    import task
    from checkpoints import load_model
    from judges import rm_scores
    rm, _ = load_model(rm_dir, kind="rm")
    rm.eval()
    with open(rm_test) as f:
        rows = [json.loads(line) for line in f]
    chosen = torch.tensor(rm_scores(rm, [r["prompt"] for r in rows], [r["chosen"] for r in rows], device))
    rejected = torch.tensor(rm_scores(rm, [r["prompt"] for r in rows], [r["rejected"] for r in rows], device))
    gold = torch.tensor([r["gold_chosen"] - r["gold_rejected"] for r in rows])
    agree = (chosen - rejected) * gold > 0  # (N,) ordered as the noiseless gold orders them
    # pairs whose answers differ in correctness (the content term) vs in style only
    content = torch.tensor([task.gold_breakdown(r["prompt"], r["chosen"], True)["content"]
                            != task.gold_breakdown(r["prompt"], r["rejected"], True)["content"] for r in rows])
    share = lambda sel: agree[sel].float().mean().item() if sel.any() else None  # noqa: E731
    return {"pairs": len(rows), "vs_gold": agree.float().mean().item(),
            "vs_noisy_labels": (chosen > rejected).float().mean().item(),
            "labels_vs_gold": (gold > 0).float().mean().item(),
            "content_pairs": int(content.sum()), "vs_gold_content_pairs": share(content),
            "vs_gold_style_pairs": share(~content)}


if __name__ == "__main__":
    run_cli(main)
