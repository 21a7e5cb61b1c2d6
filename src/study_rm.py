"""What each way of making the reward model's training pairs buys, measured on the dev split.

The reward model decides what PPO can fix: one that cannot tell a right fact from a wrong one lets
wrong facts through. This trains one RM per recipe (the pairs it learns from, or how long it trains),
all from the same SFT run, with the same prompts, seed and optimiser (the pipeline's full plan), and
reports how often each orders the dev pairs as the noiseless gold reward does: all pairs, pairs that
differ in correctness, pairs that differ in style only. The dev pairs are made the same way for
every recipe (task.PAIRS), and the test pairs are not read: this is where the pipeline's recipe
(task.TRAIN_PAIRS) was chosen.

Example (after `python src/pipeline.py`; about 2 minutes per recipe on 2 CPU cores):
  python src/study_rm.py --sft runs/pipeline_task_<stamp>/sft
  python src/study_rm.py --sft runs/pipeline_task_<stamp>/sft --recipes "as before" "content edits x3"
"""
import copy
import os

import task
from cli import parser
from common import UserError, make_run_dir, resolve_device, run_cli, write_json_atomic


def _recipe(edited: float = 0.5, **weights) -> dict:
    """task.PAIRS with another share of edited pairs and other edit weights."""
    recipe = copy.deepcopy(task.PAIRS)
    recipe["edited"] = edited
    recipe["edits"].update(weights)
    return recipe


# name -> (how the RM training pairs are made, extra train_rm.py flags)
RECIPES = {
    "as before": (task.PAIRS, []),
    "content edits x3": (_recipe(content=3), []),
    "answer swaps x3 (the pipeline's)": (task.TRAIN_PAIRS, []),
    "answer swaps x3, content x2, 70% edited": (_recipe(edited=0.7, answer=3, content=2), []),
    "as before, twice the steps": (task.PAIRS, ["--max-steps", "1200"]),
}


def run_recipe(name: str, sft: str, out_dir: str, seed: int, device: str) -> dict:
    """Data made by the recipe, an RM trained on it, its agreement with gold on the dev pairs."""
    import train_rm
    from pipeline import PLANS, rm_gold_accuracy
    pairs, flags = RECIPES[name]
    files = task.write_task_data(os.path.join(out_dir, "data"), seed, train_pairs=pairs)
    rm_dir = os.path.join(out_dir, "rm")
    train_rm.main(["--run-dir", rm_dir, "-p", sft, "--preset", "tiny", "--seed", str(seed), "--device", device,
                   "--data", files["rm_train"], "--eval-data", files["rm_dev"], "--part", "all", *PLANS["full"].rm,
                   *flags])
    return {"recipe": name, "train_pairs": pairs, "flags": flags, **rm_gold_accuracy(rm_dir, files["rm_dev"], device)}


def table(rows) -> str:
    out = ["| recipe | dev pairs | RM vs gold | correctness pairs | style pairs |", "|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['recipe']} | {r['pairs']} | {100 * r['vs_gold']:.1f}% | "
                   f"{100 * r['vs_gold_content_pairs']:.1f}% ({r['content_pairs']}) | "
                   f"{100 * r['vs_gold_style_pairs']:.1f}% |")
    return "\n".join(out)


def main(argv=None):
    ap = parser(__doc__)
    ap.add_argument("--sft", required=True, help="the SFT run every reward model starts from")
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES), metavar="NAME",
                    help="recipes to run (default: all): " + "; ".join(RECIPES).replace("%", "%%"))
    ap.add_argument("--seed", type=int, default=0, help="seeds the data and the training (the SFT run's seed)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("-n", "--name", default="rm", help="experiment name: runs/study_<name>_<stamp>/")
    ap.add_argument("--out-dir", default="runs", help="where the run directory is made")
    args = ap.parse_args(argv)
    unknown = [r for r in args.recipes if r not in RECIPES]
    if unknown:
        raise UserError(f"unknown recipe {unknown[0]!r}; recipes: {'; '.join(RECIPES)}")
    if not os.path.isdir(args.sft):
        raise UserError(f"--sft {args.sft}: not a run directory")
    device = str(resolve_device(args.device))
    top = make_run_dir("study", args.name, args.out_dir)
    rows = []
    for i, name in enumerate(args.recipes):
        print(f"\n=== {name} ===", flush=True)
        rows.append(run_recipe(name, args.sft, os.path.join(top, f"recipe_{i}"), args.seed, device))
    write_json_atomic(os.path.join(top, "results.json"), {"sft": args.sft, "seed": args.seed, "rows": rows})
    text = table(rows)
    with open(os.path.join(top, "results.md"), "w") as f:
        f.write(text + "\n")
    print("\n" + text + f"\n\nresults: {os.path.join(top, 'results.md')}")


if __name__ == "__main__":
    run_cli(main)
