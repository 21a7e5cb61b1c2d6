"""Build report.pdf, the technical report, from measured results: nothing in it is typed in by hand.

Reads a pipeline run (its results.json and the config.json each stage saved) and, optionally, a
--seeds run, a PPO run with a weaker KL penalty, an RM study run, a methods study (study.py) and the
latest benchmark table; fills src/report_template.typ with tables, figures and the sentences the numbers
choose; and typesets it with Typst.
Typst, not LaTeX: its pip wheel (`typst`) holds compiler and fonts, so it installs on a fresh machine in seconds.
The template is its own file so that the paper's layout and fixed prose read as plain Typst; this
script holds only what depends on the results. A section whose inputs were not given says so and
names the command that makes them.

Example (after `python src/pipeline.py --seeds 0,1,2` and `python benchmarks/run.py`):
  python src/report.py --run runs/seeds_task_<stamp>/seed_0 --seeds runs/seeds_task_<stamp> \\
      --benchmarks benchmarks/results/latest.md -o report.pdf
  # and with the README's weak-KL PPO run, an RM study run and a methods study run:
  python src/report.py --run runs/seeds_task_<stamp>/seed_0 --seeds runs/seeds_task_<stamp> \\
      --ablation runs/ppo_lowkl_<stamp> --study runs/study_rm_<stamp> --methods runs/study_task_<stamp> \\
      --benchmarks benchmarks/results/latest.md -o report.pdf
"""
import os
import random
import re
import tempfile
from typing import Dict, List, Optional, Tuple

import torch

import task
from cli import parser
from common import UserError, atomic_path, read_json, run_cli
from configs import ModelConfig
from gpt import GPT
from results import (
    _num,
    _pct,
    answers_table,
    gold_terms,
    judge_label,
    plot_gold_terms,
    plot_reward_curves,
    ppo_curve,
    seeds_table,
    win_rate_table,
)

TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "report_template.typ")

# The project's goals for the full plan (README, "Results"); the report says whether each is met.
TARGETS = {
    "gold_mean": 0.80,  # mean PPO-vs-SFT gold win-rate over seeds
    "gold_lower": 0.70,  # every seed's lower 95% bound
    "correctness": 0.65,  # PPO-vs-SFT win-rate on correctness alone
    "rm_content": 0.85,  # RM agrees with gold on pairs that differ in correctness
    "rm_style": 0.95,  # ... and on pairs that differ only in style
    "minutes": 15.0,  # the whole pipeline, one seed, 2 CPU cores
}

# -----------------------------------------------------------------------------
# Typst markup from data


def esc(text) -> str:
    """Text as Typst markup that shows exactly that text: every character markup gives a meaning
    to is escaped (a '-' before a digit would become a minus sign, '//' a comment, '*' bold)."""
    text = re.sub(r"([\\#*_`$<>@\[\]~/=\-+]|\.(?=\.))", r"\\\1", re.sub(r"\s+", " ", str(text)))
    return re.sub(r"^(\d+)\.(\s)", r"\1\\.\2", text)  # "1. " at the start would be a list item


def md_inline(text: str) -> str:
    """One line of the benchmarks' Markdown as Typst markup: *emphasis* and `code` kept, the rest escaped."""
    out = []
    for part in re.split(r"(\*[^*\s][^*]*\*|`[^`]+`)", text):  # ";" ends an embedded expression
        if part.startswith("*") and part.endswith("*") and len(part) > 2:
            out.append("#emph[" + esc(part[1:-1]) + "];")
        elif part.startswith("`") and part.endswith("`") and len(part) > 2:
            out.append("#raw(" + typ_str(part[1:-1]) + ");")
        else:
            out.append(esc(part))
    return "".join(out)


def typ_str(text: str) -> str:
    """A Typst string literal."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def md_table(lines: List[str]) -> Tuple[List[str], List[List[str]]]:
    """(header, rows) of a Markdown table given as its lines (the |---| line is skipped)."""
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines if line.strip()]
    width = len(cells[0])
    return cells[0], [(row + [""] * width)[:width] for row in cells[2:]]


_NUMBER = re.compile(r"^([-+−]?[\d.,]+|–|\[.*\])")


def table(header: List[str], rows: List[List[str]], caption: str, size: str = "8pt",
          columns: Optional[str] = None) -> str:
    """A captioned table (the template's `datatable`) of text cells and a text caption: columns of
    numbers are right-aligned, columns of words left-aligned."""
    def cells(row):
        return "(" + ", ".join("[" + esc(c) + "]" for c in row) + ",)"
    aligns = ["end" if rows and all(_NUMBER.match(r[k]) for r in rows) else "start" for k in range(len(header))]
    cols = f", columns: {columns}" if columns else ""
    body = "(" + "".join(cells(r) + ", " for r in rows) + ")"  # a trailing comma keeps one row an array
    return (f"#figure(kind: table, caption: [{esc(caption)}],\n  datatable({cells(header)},\n"
            f"    {body},\n    size: {size}, aligns: ({', '.join(aligns)},){cols}))")


def figure(path: str, caption: str, label: str, width: str = "100%") -> str:
    """A captioned figure of an image file in the Typst source's directory, with a label to refer to it by."""
    return f"#figure(image({typ_str(path)}, width: {width}), caption: [{esc(caption)}]) <{label}>"


def missing(what: str, commands: List[str]) -> str:
    """The box a section shows when its inputs were not given: what is missing, and the commands that make it."""
    code = "#raw(block: true, lang: \"bash\", " + typ_str("\n".join(commands)) + ")"
    return f"#missing[{esc(what)}\n{code}]"


def run_name(path: str) -> str:
    """A run directory as the report names it: its own name, with the --seeds run's for a seed_<k>."""
    parent, base = os.path.split(os.path.normpath(path))
    return f"{os.path.basename(parent)}/{base}" if base.startswith("seed_") else base


def upper_first(text: str) -> str:
    return text[:1].upper() + text[1:]


# -----------------------------------------------------------------------------
# Inputs: what each one must be, refused with one line otherwise


def load_run(run_dir: str) -> Tuple[dict, Dict[str, dict]]:
    """results.json of a finished pipeline run on the built-in task, and the config.json each of
    its stages saved: what the method section states is read from them."""
    if not os.path.isdir(run_dir):
        raise UserError(f"--run {run_dir}: not found (give a pipeline run directory, runs/pipeline_task_<stamp>)")
    path = os.path.join(run_dir, "results.json")
    if not os.path.isfile(path):
        config = os.path.join(run_dir, "config.json")
        if os.path.isfile(config):
            stage = read_json(config, "config.json").get("stage", "stage")
            raise UserError(f"--run {run_dir}: a {stage} stage directory with no results.json, not a pipeline "
                            f"run directory (give the directory pipeline.py made, the one above it)")
        raise UserError(f"--run {run_dir}: no results.json (is it a finished pipeline run directory?)")
    results = read_json(path, "--run results.json")
    if "per_seed" in results:
        raise UserError(f"--run {run_dir}: a --seeds run; give one of its seed_<k> directories as --run "
                        f"and this one as --seeds")
    if not all(k in results for k in ("results", "seconds", "over_optimisation")):
        raise UserError(f"--run {run_dir}: its results.json is not a pipeline run's (an evaluate.py run "
                        f"directory?); give the directory pipeline.py made")
    judges = {r["judge"] for r in results["results"]}
    if not {"gold", "gold:correctness", "gold:style"} <= judges or "rm_gold_accuracy" not in results:
        raise UserError(f"--run {run_dir}: no gold-reward results (a --data run?); the report is written "
                        f"for the built-in task, whose gold reward it reports")
    configs = {stage: read_json(os.path.join(run_dir, stage, "config.json"), f"--run {stage} config")
               for stage in ("sft", "rm", "ppo")}
    return results, configs


def load_seeds(seeds_dir: str) -> Tuple[dict, Dict[str, Optional[dict]]]:
    """A pipeline.py --seeds summary, and each seed's own results.json where its seed_<k> is there."""
    summary = read_json(os.path.join(seeds_dir, "results.json"), "--seeds results.json")
    if "per_seed" not in summary:
        raise UserError(f"--seeds {seeds_dir}: not a pipeline.py --seeds run directory (no per-seed results)")
    runs = {}
    for seed in summary["per_seed"]:
        path = os.path.join(seeds_dir, f"seed_{seed}", "results.json")
        runs[seed] = read_json(path) if os.path.isfile(path) else None
    return summary, runs


def load_ablation(ppo_dir: str) -> Tuple[dict, List[dict]]:
    """A train_ppo.py run's config.json and its reward curve."""
    config = read_json(os.path.join(ppo_dir, "config.json"), "--ablation config.json")
    if config.get("stage") != "ppo":
        raise UserError(f"--ablation {ppo_dir}: a {config.get('stage')} run, not a train_ppo.py run")
    curve = ppo_curve(ppo_dir, "--ablation")
    if not curve or curve[-1]["gold"] is None:
        raise UserError(f"--ablation {ppo_dir}: no evaluations with the gold reward in its metrics.jsonl "
                        f"(train it with --eval-judge gold and --eval-every N)")
    return config, curve


def load_study(study_dir: str) -> dict:
    """A study run's results.json: one row per variant (study_rm.py: one per RM recipe)."""
    study = read_json(os.path.join(study_dir, "results.json"), "--study results.json")
    if not isinstance(study.get("rows"), list) or not study["rows"]:
        raise UserError(f"--study {study_dir}: its results.json has no rows (is it a study_rm.py run?)")
    return study


def parse_benchmarks(path: str) -> List[tuple]:
    """benchmarks/results/latest.md as blocks: ("section", title), ("text", line), ("table", header, rows)."""
    if not os.path.isfile(path):
        raise UserError(f"--benchmarks {path}: not found")
    with open(path) as f:
        lines = f.read().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        line = lines[i].rstrip()
        if line.startswith("|"):
            j = i
            while j < len(lines) and lines[j].startswith("|"):
                j += 1
            header, rows = md_table(lines[i:j])
            blocks.append(("table", header, rows))
            i = j
            continue
        if line.startswith("## "):
            blocks.append(("section", line[3:].strip()))
        elif line.strip() and not line.startswith("# "):
            blocks.append(("text", line.strip()))
        i += 1
    if not any(b[0] == "table" for b in blocks):
        raise UserError(f"--benchmarks {path}: no table in it (give benchmarks/results/latest.md)")
    return blocks


# -----------------------------------------------------------------------------
# Sentences chosen by the numbers (plain text; the caller escapes)


def verdict(row: dict, a: str = "PPO", b: str = "SFT") -> str:
    """Whether a beats b, b beats a, or neither, by whether the 95% interval excludes 50%."""
    interval = row.get("ci95")
    if not interval:
        return f"{a} {'wins' if row['win_rate'] > 0.5 else 'does not win'} (no interval)"
    if interval[0] > 0.5:
        return f"{a} beats {b} beyond noise"
    if interval[1] < 0.5:
        return f"{b} beats {a} beyond noise"
    return f"{a} and {b} cannot be told apart (the interval contains 50%)"


def goal(value: float, target: float, what: str, higher: bool = True, unit: Optional[str] = None) -> str:
    """'the goal of <what> ≥ 80% is met' or '... is missed by 1.4 points' (a share unless `unit` is given)."""
    scale, shown, gap = ((100, f"{100 * target:g}%", "points") if unit is None else (1, f"{target:g} {unit}", unit))
    relation = "≥" if higher else "≤"
    if (value >= target) if higher else (value <= target):
        return f"the goal of {what} {relation} {shown} is met"
    return f"the goal of {what} {relation} {shown} is missed by {abs(scale * (value - target)):.1f} {gap}"


def parts_sentence(correct: dict, style: dict) -> str:
    """What PPO's win over SFT is made of: facts, style, both or neither."""
    c, s = correct["win_rate"] - 0.5, style["win_rate"] - 0.5
    c_up, s_up = correct["ci95"][0] > 0.5, style["ci95"][0] > 0.5
    c_down, s_down = correct["ci95"][1] < 0.5, style["ci95"][1] < 0.5
    if c_up and s_up:
        if s > 2 * c:
            return "PPO gains on both, but most of the win is style, not facts"
        if c > 2 * s:
            return "PPO gains on both, but most of the win is correctness, not style"
        return "PPO gains on facts and style alike"
    if s_up:
        return ("the win is style; on correctness alone " +
                ("SFT is better beyond noise" if c_down else "PPO and SFT cannot be told apart"))
    if c_up:
        return ("the win is correctness; on style alone " +
                ("SFT is better beyond noise" if s_down else "PPO and SFT cannot be told apart"))
    if c_down or s_down:
        return "PPO is worse than SFT beyond noise on " + " and ".join(
            name for name, down in (("correctness", c_down), ("style", s_down)) if down)
    return "neither facts nor style improve beyond noise"


def proxy_sentence(gold: dict, rm: dict) -> str:
    """Whether the reward model (the proxy PPO optimised) favours PPO more than the truth does, less, or alike."""
    lo, hi = gold["ci95"]
    if rm["win_rate"] > hi:
        return "the proxy favours PPO more than the truth does"
    if rm["win_rate"] < lo:
        return "the proxy favours PPO less than the truth does"
    return "the proxy and the truth agree, within the interval"


def rm_sentence(acc: dict) -> str:
    """What the reward model knows: facts less well than style, or about as well (the limit PPO meets)."""
    content, style = acc["vs_gold_content_pairs"], acc["vs_gold_style_pairs"]
    if content < style - 0.05:
        return "facts are what it knows least, so what PPO can learn from it is mostly style"
    return ("it knows facts about as well as style, because its training pairs include answer swaps "
            "(the same sentence with another answer)")


def ceiling_sentence(sft_correct: float, observed: float, target: float = TARGETS["correctness"]) -> str:
    """Whether the correctness goal can be reached at all against an SFT policy that is already
    right on `sft_correct` of the prompts: a PPO policy that is always right wins at most
    0.5 + (1 - sft_correct) / 2 on correctness (ties count half)."""
    best = 0.5 + (1 - sft_correct) / 2
    if best < target:
        return (f"the goal of a correctness win-rate ≥ {100 * target:g}% cannot be reached against this SFT "
                f"policy: it is already right on {_pct(sft_correct)} of the prompts, so even a PPO policy that "
                f"is always right would win at most {_pct(best)} on correctness")
    return (f"a PPO policy that is always right would win {_pct(best)} on correctness against this SFT policy, "
            f"so {goal(observed, target, 'a correctness win-rate')}")


def curve_sentence(curve: List[dict]) -> str:
    """Did the gold reward follow the RM score along PPO, or did the proxy rise while the truth fell?"""
    first, last = curve[0], curve[-1]
    peak = max(curve, key=lambda p: p["gold"])
    rm_up = last["rm_score"] > first["rm_score"]
    if rm_up and last["gold"] < first["gold"]:
        return "over-optimisation: the proxy rose while the true reward fell below where it started"
    if rm_up and last["gold"] < peak["gold"] - 0.25:
        return (f"the true reward peaked at step {peak['step']} ({peak['gold']:.2f}) and ended lower while the "
                f"proxy kept rising: the start of over-optimisation")
    if rm_up and last["gold"] > first["gold"]:
        return "the true reward rose with the proxy: no over-optimisation within these steps at this KL penalty"
    return "the proxy did not rise: PPO did not optimise it within these steps"


def ablation_sentence(main: List[dict], weak: List[dict], main_kl: float, weak_kl: float) -> str:
    """What the weaker KL penalty bought: a higher proxy at a lower true reward (over-optimisation), or not."""
    m, w = main[-1], weak[-1]
    note = ("" if weak_kl < main_kl else
            f" (but its KL coefficient, {weak_kl:g}, is not weaker than the main run's {main_kl:g}: this is not a "
            f"weak-KL run)")
    if w["rm_score"] > m["rm_score"] and w["gold"] < m["gold"]:
        return ("over-optimisation: the weaker penalty bought a higher reward-model score and a lower true "
                "reward" + note)
    if w["gold"] >= m["gold"]:
        return "no over-optimisation within these steps: the weaker penalty did not cost true reward" + note
    return "the weaker penalty lowered both the reward-model score and the true reward" + note


def phrasing_sentence(seen: dict, unseen: dict) -> str:
    """Whether what PPO learned carries over to question phrasings no training file uses."""
    if unseen["win_rate"] >= seen["win_rate"]:
        return "unseen phrasings do as well as seen ones"
    if unseen["ci95"] and unseen["ci95"][1] >= seen["win_rate"]:
        return "unseen phrasings do worse, but not beyond noise"
    return "unseen phrasings do worse than seen ones beyond noise"


def speed_sentence(blocks: List[tuple]) -> str:
    """How many of the benchmark goals were met, and which were missed."""
    met, missed = 0, []
    for block in blocks:
        if block[0] != "table" or "goal" not in block[1]:
            continue
        k = block[1].index("goal")
        for row in block[2]:
            if row[k].startswith("met"):
                met += 1
            elif row[k].startswith("missed"):
                missed.append(" ".join(c for c in row[:k] if not re.fullmatch(r"[\d.]+( \(.*\))?", c)))
    if not met + len(missed):
        return "The benchmark table states no goals."
    text = f"Of the {met + len(missed)} goals the benchmark checks, {met} are met"
    return text + (f"; missed: {'; '.join(missed)}." if missed else ", none missed.")


# -----------------------------------------------------------------------------
# The sections


def _parameters(model: ModelConfig) -> int:
    """The model's parameter count, from shapes alone (no weights are made)."""
    with torch.device("meta"):
        return GPT(model).num_params()


def _row(rows: List[dict], judge: str, a: str = "ppo", b: str = "sft") -> Optional[dict]:
    for r in rows:
        if judge_label(r["judge"]) == judge and (r["a"], r["b"]) == (a, b):
            return r
    return None


def method_section(configs: Dict[str, dict]) -> Tuple[str, str]:
    """The model and the stages in words, and the table of every stage's settings."""
    ppo_run = configs["ppo"]
    model, ppo, args = ModelConfig.from_dict(ppo_run["model"]), ppo_run["ppo"], ppo_run["args"]
    advantage = ppo.get("advantage", "gae")  # how each token is credited (configs.PPOConfig)
    credit = {
        "gae": f"GAE (γ = {ppo['gamma']:g}, λ = {ppo['lam']:g}), {ppo['ppo_epochs']} epochs of clipped updates "
               f"(clip {ppo['cliprange']:g}) per rollout and a critic initialised from the reward model",
        "rloo": f"a leave-one-out baseline over {ppo.get('rloo_k')} samples per prompt (RLOO [7]) instead of a "
                f"critic, and {ppo['ppo_epochs']} epochs of clipped updates (clip {ppo['cliprange']:g}) per rollout",
        "sequence": "the original project's credit: one gradient step per rollout, every token of a response "
                    "credited with its reward minus the value of the prompt"}.get(advantage, f"advantage {advantage}")
    init = (f"initialised from {model.pretrained}" if model.pretrained else
            "randomly initialised, because no GPT-2 weights can be downloaded here")
    text = (f"The model is a GPT-2 written from scratch (pre-LayerNorm blocks, tied embeddings, KV-cache "
            f"generation) with the real {model.vocab_size}-token GPT-2 vocabulary: the '{args['preset']}' preset, "
            f"{model.n_layer} layers of width {model.n_embd}, {_parameters(model) / 1e6:.1f}M parameters, {init}. "
            f"SFT minimises cross-entropy on the response tokens of demonstrations. The reward model is the same "
            f"network with a scalar head on the last real token, "
            f"{'initialised from SFT' if configs['rm']['args'].get('init') else 'randomly initialised'}. "
            f"PPO trains the SFT policy "
            f"against it with a per-token KL penalty to the frozen SFT policy (β = {ppo['kl_coef']:g}), "
            + credit + (", and a response that never emits EOS scored below every finished one" if
               ppo.get("missing_eos_penalty") is not None else "") + ".")
    rows = []
    for stage, what in (("sft", "demonstrations"), ("rm", "preference pairs"), ("ppo", "prompts")):
        c = configs[stage]
        a, data = c["args"], c["data"]
        if stage == "ppo":
            batch = f"{a['rollout_batch_size']} rollouts, minibatch {a['minibatch_size']}"
            lr = f"{a['actor_lr']:g} / {a['critic_lr']:g}"
            extra = f"β {a['kl_coef']:g}, {a['max_new_tokens']} new tokens, T = {a['temperature']:g}"
        else:
            batch, lr = str(a["batch_size"]), f"{a['lr']:g}"
            extra = ("from SFT" if a.get("init") else "from scratch") if stage == "rm" else "loss on the response"
        rows.append([stage.upper(), f"{data['train']['kept']:,} {what}", f"{data['eval']['kept']:,}",
                     str(a["max_steps"]), batch, lr, f"{a['warmup_steps']} steps, {a['schedule']}", extra])
    header = ["stage", "trains on", "dev rows", "steps", "batch", "peak lr", "warm-up, schedule", "other"]
    sft = configs["sft"]["args"]
    caption = (f"Each stage's settings, from the config.json it saved. PPO's learning rates are the actor's and "
               f"the critic's; every stage uses AdamW (betas {sft['beta1']:g}, {sft['beta2']:g}) and clips gradients "
               f"at norm {sft['grad_clip']:g}.")
    return esc(text), table(header, rows, caption, size="7.8pt")


def task_section() -> Tuple[str, str]:
    """The task in words (its numbers from src/task.py), and one demonstration of each kind with
    the gold reward's terms for it (computed, not typed in)."""
    mix = ", ".join(f"{100 * share:.0f}% {kind}" for kind, share in task.DEMO_MIX.items())
    text = (f"The task (src/task.py) is a world of {len(task.FACTS)} facts in {len(task.RELATIONS)} relations "
            f"(capitals, colours, animal sounds), each name one GPT-2 token, asked in the HH format with one of "
            f"{len(task.RELATIONS['capital']['questions'])} phrasings and optional remarks; test prompts also "
            f"use phrasings no other file contains. Demonstrations are of mixed quality ({mix}), so SFT has "
            f"room to improve. Simulated raters prefer answer a to b with probability "
            f"σ((g(a) − g(b)) / {task.TAU:g}), so a gap of 0.5 is labelled right "
            f"{_pct(task.preference_probability(0.5, 0))} of the time. The gold reward g is the sum of a content "
            f"term (the asked fact stated as a plain sentence about the asked subject; any entity outside such a "
            f"sentence counts as wrong; a hedged answer counts as none) and style terms: tone, length (more than "
            f"{task.CONCISE_WORDS} words costs), repetition, fluency and ending (no EOS costs). The best answer "
            f"scores {task.MAX_GOLD:g}. Answers that try to game it (repeated courtesies, every entity at once, "
            f"refusing, hedging, rambling, made-up words) all score below a plain correct answer, and tests "
            f"generate hundreds of each. Prompts are split into disjoint files: training files for each stage, "
            f"dev files that training validates on and anything is tuned on, and test files that only the final "
            f"evaluation reads.")
    prompt = task.all_prompts()[task.FACTS[0]][0]
    question = prompt.split("Human:")[-1].split("Assistant:")[0].strip()
    rng = random.Random(0)
    terms = ["content", "tone", "length", "repetition", "fluency", "ending"]
    rows = []
    for kind in task.DEMO_MIX:
        _, response = task.demonstration(rng, prompt, kind)
        g = task.gold_breakdown(prompt, response, True)
        rows.append([kind, response] + [f"{g[t]:+g}" if g[t] else "0" for t in terms]
                    + [f"{task.gold_reward(prompt, response, True):g}"])
    caption = (f"One demonstration of each kind for the prompt \"{question}\" and the gold reward's terms for it "
               f"(task.gold_breakdown; each demonstration ends with EOS).")
    return esc(text), table(["kind", "response"] + terms + ["gold"], rows, caption, size="7.5pt",
                            columns="(auto, 1fr) + (auto,) * 7")


def plan_of(configs: Dict[str, dict]) -> Optional[str]:
    """Which of pipeline.py's plans the run's step counts are (None: its own)."""
    from pipeline import PLANS
    for name, plan in PLANS.items():
        if all(configs[stage]["args"]["max_steps"] == int(flags[flags.index("--max-steps") + 1])
               for stage, flags in (("sft", plan.sft), ("rm", plan.rm), ("ppo", plan.ppo))):
            return name
    return None


def results_section(run_dir: str, results: dict, configs: Dict[str, dict]) -> Dict[str, str]:
    """PPO against SFT on the run's test prompts: the headline paragraph and table."""
    rows = results["results"]
    gold, rm = _row(rows, "gold"), _row(rows, "rm")
    correct, style = _row(rows, "gold:correctness"), _row(rows, "gold:style")
    clusters = gold.get("ci_clusters")
    over = f"the {clusters} facts" if clusters else "the prompts"
    text = (f"On the {gold['pairs']} test prompts, which no stage trained or tuned on, PPO's answer is better than "
            f"SFT's under the gold reward on {_pct(gold['win_rate'])} of the prompts (ties count half; 95% "
            f"bootstrap interval {_pct(gold['ci95'][0])} to {_pct(gold['ci95'][1])}): {verdict(gold)}. Mean gold "
            f"reward per answer goes from {gold['mean_score_b']:.2f} (SFT) to {gold['mean_score_a']:.2f} (PPO) "
            f"of {task.MAX_GOLD:g}; SFT's answer is better than the untrained initialisation's on "
            f"{_pct(_row(rows, 'gold', 'sft', 'init')['win_rate'])}. The reward model, judging the same answers, "
            f"prefers PPO's on {_pct(rm['win_rate'])}: {proxy_sentence(gold, rm)}. Intervals resample {over}, not "
            f"the prompts: the prompts about one fact succeed or fail together, and counting them as independent "
            f"would narrow the interval.")
    seen = [r for r in results.get("by_phrasing", []) if judge_label(r["judge"]) == "gold"
            and (r["a"], r["b"]) == ("ppo", "sft")]
    if len(seen) == 2:
        s, u = sorted(seen, key=lambda r: r["phrasing"])
        text += (f" On the {u['pairs']} prompts asked with a phrasing no training file uses PPO wins "
                 f"{_pct(u['win_rate'])}, on the {s['pairs']} others {_pct(s['win_rate'])}: "
                 f"{phrasing_sentence(s, u)}.")
    plan, minutes = plan_of(configs), sum(results["seconds"].values()) / 60
    device = configs["ppo"]["args"]["device"]
    text += (f" The whole pipeline took {minutes:.1f} minutes on {'a CPU' if device == 'cpu' else device}"
             + (f" with the {plan} plan" if plan else " with step counts of its own")
             + (f" ({goal(minutes, TARGETS['minutes'], 'the whole pipeline', higher=False, unit='minutes')})."
                if plan == "full" else "."))
    header, body = md_table(win_rate_table(rows))
    caption = (f"Every comparison on the test split of run {run_name(run_dir)}, "
               f"under each judge: gold is the true reward, gold:correctness its content term alone, gold:style "
               f"the sum of its other terms, rm the learned reward model. Ties count half.")
    return {"results_main": esc(text), "headline_table": table(header, body, caption)}


def seeds_section(run_dir: str, seeds_dir: Optional[str], seeds) -> str:
    """The whole pipeline once per seed: every seed's PPO-vs-SFT figures, their mean and interval, the goals."""
    if not seeds:
        return missing("Only one run was given, so this report has no intervals over seeds. This makes a run per "
                       "seed and passes it to the report:",
                       ["python src/pipeline.py --seeds 0,1,2",
                        "python src/report.py --run runs/seeds_task_<stamp>/seed_0 \\",
                        "    --seeds runs/seeds_task_<stamp> ..."])
    summary, runs = seeds
    mean, per = summary["mean"], summary["per_seed"]
    names = ", ".join(per)
    which = [s for s in per if os.path.realpath(os.path.join(seeds_dir, f"seed_{s}")) == os.path.realpath(run_dir)]
    text = (f"The whole pipeline was run once per seed ({names}), each seed with its own data, initialisation, "
            f"sampling and test prompts" + (f"; the run above is seed {which[0]}" if which else
                                            "; the run above is not one of them") + ". "
            f"Over the seeds PPO wins {_pct(mean['gold']['win_rate'])} on average under the gold reward (95% "
            f"interval {_pct(mean['gold']['ci95'][0])} to {_pct(mean['gold']['ci95'][1])}, from a bootstrap that "
            f"draws the facts once for all seeds), {_pct(mean['gold:correctness']['win_rate'])} on correctness "
            f"alone and {_pct(mean['gold:style']['win_rate'])} on style alone. "
            f"{upper_first(goal(mean['gold']['win_rate'], TARGETS['gold_mean'], 'a mean gold win-rate'))}; "
            f"{goal(mean['gold']['min_lower'], TARGETS['gold_lower'], 'every seed’s lower bound')} (lowest "
            f"{_pct(mean['gold']['min_lower'])}).")
    beyond = sum(per[s]["gold"]["ci95"][0] > 0.5 for s in per)
    text += (f" PPO beats SFT beyond noise on every seed." if beyond == len(per) else
             f" PPO beats SFT beyond noise on {beyond} of the {len(per)} seeds.")
    lowest = min(per, key=lambda s: per[s]["rm_content_pairs"])
    text += (f" The reward model agrees with gold on {_pct(mean['rm_content_pairs'])} of correctness pairs on "
             f"average (lowest: seed {lowest}, {_pct(per[lowest]['rm_content_pairs'])}), so "
             f"{goal(mean['rm_content_pairs'], TARGETS['rm_content'], 'a mean agreement on correctness pairs')}, "
             f"and on {_pct(mean['rm_style_pairs'])} of style pairs, so "
             f"{goal(mean['rm_style_pairs'], TARGETS['rm_style'], 'a mean agreement on style pairs')}.")
    header, body = md_table(seeds_table(summary).splitlines()[2:])
    caption = ("PPO against SFT over seeds, test split: win-rates with 95% intervals that resample facts "
               "(the mean's draws them once for all seeds), and the reward model's agreement with gold on all "
               "held-out pairs / those that differ in correctness / those that differ only in style.")
    out = esc(text) + "\n\n" + table(header, body, caption, size="7.6pt")
    policy_rows = []
    for s, r in runs.items():
        if r and r.get("answers"):
            a = r["answers"]
            policy_rows.append([s, _num(per[s]["gold"]["mean_score_b"]), _num(per[s]["gold"]["mean_score_a"]),
                                _pct(a["sft"]["correct"]), _pct(a["ppo"]["correct"]), _pct(a["sft"]["wrong"]),
                                _pct(a["ppo"]["wrong"]), _pct(0.5 + (1 - a["sft"]["correct"]) / 2),
                                f"{per[s]['seconds'] / 60:.1f}"])
    if policy_rows:
        out += "\n\n" + table(
            ["seed", "gold SFT", "gold PPO", "correct SFT", "correct PPO", "wrong SFT", "wrong PPO",
             "best possible correctness win", "minutes"], policy_rows,
            "Each seed's policies: mean gold reward per answer, share of correct and wrong answers, the "
            "correctness win-rate a PPO policy that is always right would reach against that SFT policy, and "
            "the whole pipeline's wall time.", size="7.6pt")
    return out


def decomposition_section(results: dict, seeds, workdir: str) -> Dict[str, str]:
    """Tone against correctness: the two parts of the gold reward, per policy, and what the answers are made of."""
    rows = results["results"]
    correct, style = _row(rows, "gold:correctness"), _row(rows, "gold:style")
    answers = results.get("answers", {})
    text = (f"The gold reward splits into its content term (is the asked fact stated, and nothing wrong?) and the "
            f"sum of its other terms (tone, length, repetition, fluency, ending). Judged on correctness alone PPO "
            f"wins {_pct(correct['win_rate'])} (interval {_pct(correct['ci95'][0])} to {_pct(correct['ci95'][1])}), "
            f"on style alone {_pct(style['win_rate'])} ({_pct(style['ci95'][0])} to {_pct(style['ci95'][1])}): "
            f"{parts_sentence(correct, style)}.")
    if "sft" in answers and "ppo" in answers:
        sft, ppo = answers["sft"], answers["ppo"]
        text += (f" From SFT to PPO correct answers go from {_pct(sft['correct'])} to {_pct(ppo['correct'])} and "
                 f"wrong ones from {_pct(sft['wrong'])} to {_pct(ppo['wrong'])}; polite answers from "
                 f"{_pct(sft['polite'])} to {_pct(ppo['polite'])}, rude ones from {_pct(sft['rude'])} to "
                 f"{_pct(ppo['rude'])}. And {ceiling_sentence(sft['correct'], correct['win_rate'])}.")
    if seeds:
        runs = seeds[1]
        best = [0.5 + (1 - r["answers"]["sft"]["correct"]) / 2 for r in runs.values() if r and r.get("answers")]
        if best:
            reachable = max(best) >= TARGETS["correctness"]
            text += (f" Over the seeds the best possible correctness win-rate is {_pct(min(best))} to "
                     f"{_pct(max(best))}: the correctness goal is " +
                     ("within reach on at least one seed." if reachable else "out of reach on every seed."))
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(4.6, 2.4))
    plot_gold_terms(ax, gold_terms(results))
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "gold_terms.svg"), metadata={"Date": None})
    plt.close(fig)
    out = {"decomposition": esc(text),
           "terms_figure": figure("gold_terms.svg", "Mean gold reward per test answer of each policy, split into "
                                  "the content term (correctness) and the style terms; the diamond is their sum, "
                                  f"the dotted line the best possible answer ({task.MAX_GOLD:g}).", "fig-terms",
                                  width="4.6in")}
    if answers:
        header, body = md_table(answers_table(results))
        out["answers_table"] = table(
            header, body, f"What the {results['prompts']['n']} test answers of each policy are made of (share of "
            "answers, from the gold reward's terms; polite and rude from the tone term, too long from the length "
            "term).")
    else:
        out["answers_table"] = ""
    return out


def reward_section(results: dict, configs: Dict[str, dict], ablation, workdir: str) -> str:
    """The reward model against gold, and the reward-against-KL curve (with the ablation's, if given)."""
    acc = results["rm_gold_accuracy"]
    curve = results["over_optimisation"]
    text = (f"The reward model learned from {configs['rm']['data']['train']['kept']:,} noisy pairs in "
            f"{results['seconds']['rm'] / 60:.1f} minutes. On {acc['pairs']} held-out test pairs it orders "
            f"{_pct(acc['vs_gold'])} as the noiseless gold does (the noisy labels themselves agree with gold on "
            f"{_pct(acc['labels_vs_gold'])}): {_pct(acc['vs_gold_style_pairs'])} of the pairs that differ only in "
            f"style and {_pct(acc['vs_gold_content_pairs'])} of the {acc['content_pairs']} that differ in "
            f"correctness; {rm_sentence(acc)}. On this run "
            f"{goal(acc['vs_gold_content_pairs'], TARGETS['rm_content'], 'agreement on correctness pairs')} and "
            f"{goal(acc['vs_gold_style_pairs'], TARGETS['rm_style'], 'agreement on style pairs')}.")
    if curve:
        first, last = curve[0], curve[-1]
        text += (f" Along PPO, evaluated every {curve[1]['step'] - curve[0]['step'] if len(curve) > 1 else 0} steps "
                 f"on {configs['ppo']['data']['eval']['kept']} dev prompts, the policy moves to a KL of "
                 f"{last['kl']:.2f} nats from SFT by step {last['step']}, its reward-model score from "
                 f"{first['rm_score']:.2f} to {last['rm_score']:.2f} and its gold reward from {first['gold']:.2f} to "
                 f"{last['gold']:.2f}: {curve_sentence(curve)}.")
    import matplotlib.pyplot as plt
    fig = plt.figure(figsize=(6.5, 2.8))
    curves = [("main run", curve, "o")] + ([("weak KL", ablation[1], "s")] if ablation else [])
    plot_reward_curves(fig, curves, rect=(0.08, 0.15, 0.9, 0.74))
    fig.savefig(os.path.join(workdir, "reward_curve.svg"), metadata={"Date": None})
    plt.close(fig)
    caption = ("Gold reward and reward-model score of the policy at each PPO evaluation (dev prompts, fixed "
               "sampling seed), against its KL from the SFT model and against the step"
               + (", for the main run and the weak-KL ablation." if ablation else ".")
               + " The RM score is in the reward model's own units; the gold reward's best is "
               f"{task.MAX_GOLD:g}.")
    return esc(text) + "\n\n" + figure("reward_curve.svg", caption, "fig-curve", width="6.5in")


def ablation_section(run_dir: str, results: dict, configs: Dict[str, dict], ablation) -> str:
    """The weak-KL PPO run against the main one, or what makes it."""
    main_kl = configs["ppo"]["ppo"]["kl_coef"]
    if not ablation:  # the main run's PPO command with only the KL coefficient changed
        a = configs["ppo"]["args"]
        return missing(
            f"No weak-KL PPO run was given (--ablation), so over-optimisation under a weak penalty is not shown "
            f"here. This trains one from this run's SFT and reward model with its PPO settings but a KL "
            f"coefficient of 0.01 instead of {main_kl:g}, then rebuilds the report:",
            [f"S={run_dir}",
             f"python src/train_ppo.py -n lowkl --preset {a['preset']} -a $S/sft -c $S/rm --part all \\",
             "    --prompts $S/data/ppo_prompts.jsonl --eval-prompts $S/data/dev_prompts.jsonl --eval-judge gold \\",
             f"    --rollout-batch-size {a['rollout_batch_size']} --minibatch-size {a['minibatch_size']} "
             f"--ppo-epochs {a['ppo_epochs']} --max-new-tokens {a['max_new_tokens']} --max-steps {a['max_steps']} \\",
             f"    --actor-lr {a['actor_lr']:g} --critic-lr {a['critic_lr']:g} --kl-coef 0.01 "
             f"--eval-every {a['eval_every']} --save-every 0",
             "python src/report.py --run $S --ablation runs/ppo_lowkl_<stamp> ..."])
    config, weak = ablation
    weak_kl = config["ppo"]["kl_coef"]
    main = results["over_optimisation"]
    same = (os.path.realpath(config["args"]["actor"]) == os.path.realpath(os.path.join(run_dir, "sft")) and
            os.path.realpath(config["args"]["critic"]) == os.path.realpath(os.path.join(run_dir, "rm")))
    peak = max(weak, key=lambda p: p["rm_score"])
    text = (f"The ablation trains PPO with a KL coefficient of {weak_kl:g} instead of {main_kl:g} for "
            f"{config['args']['max_steps']} steps, "
            + ("from this run's SFT policy and reward model. " if same else
               f"from the SFT policy {config['args']['actor']} and reward model {config['args']['critic']}, not "
               f"this run's: its numbers compare with the main run's only as far as those models do. ")
            + f"It ends at a KL of {weak[-1]['kl']:.2f} nats from SFT (main run: {main[-1]['kl']:.2f}), a "
            f"reward-model score of {weak[-1]['rm_score']:.2f} (highest {peak['rm_score']:.2f}, main run "
            f"{main[-1]['rm_score']:.2f}) and a gold reward of {weak[-1]['gold']:.2f} (main run "
            f"{main[-1]['gold']:.2f}): "
            f"{ablation_sentence(main, weak, main_kl, weak_kl)}.")
    return esc(text) + " Both curves are in @fig-curve."


def study_section(run_dir: str, study: Optional[dict], study_dir: Optional[str]) -> str:
    """A study run's table (study_rm.py: what each RM recipe buys, on dev), or what makes it."""
    if not study:
        return missing(
            "No study run was given (--study), so which parts of the recipe matter is not measured in this "
            "report; those results do not exist yet. This trains one reward model per recipe for its training "
            "pairs from this run's SFT model and reports each one's agreement with gold on the dev pairs "
            "(about 2 minutes per recipe on 2 CPU cores), then rebuilds the report:",
            [f"python src/study_rm.py --sft {run_dir}/sft",
             f"python src/report.py --run {run_dir} --study runs/study_rm_<stamp> ..."])
    rows = study["rows"]
    label = next((k for k in ("switch", "recipe", "name") if k in rows[0]), None)  # what names a variant
    known = {"pairs": "dev pairs", "vs_gold": "RM vs gold", "vs_gold_content_pairs": "correctness pairs",
             "vs_gold_style_pairs": "style pairs", "content_pairs": "correctness pairs (n)",
             "vs_noisy_labels": "vs noisy labels", "labels_vs_gold": "labels vs gold"}
    keys = [k for k, v in rows[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    keys = [k for k in known if k in keys] + [k for k in keys if k not in known]

    def cell(k, v):
        if isinstance(v, float) and 0 <= v <= 1 and k not in ("pairs", "content_pairs"):
            return _pct(v)
        return f"{v:g}" if isinstance(v, float) else str(v)
    body = [[str(r.get(label, i))] + [cell(k, r.get(k)) if r.get(k) is not None else "–" for k in keys]
            for i, r in enumerate(rows)]
    best = max(rows, key=lambda r: r.get("vs_gold_content_pairs", r.get("vs_gold", 0)))
    text = (f"Study run {run_name(study_dir)}: one variant per row, everything else "
            f"as in the pipeline, measured on the dev split (the test split is not read).")
    if "vs_gold_content_pairs" in best:
        text += (f" The variant whose reward model orders most correctness pairs as gold does is "
                 f"\"{best.get(label, '?')}\" ({_pct(best['vs_gold_content_pairs'])}).")
    return esc(text) + "\n\n" + table([label or "variant"] + [known.get(k, k) for k in keys], body,
                                      "The study's variants and what each measured, on the dev split.")


def load_methods(study_dir: str) -> dict:
    """A study.py run's results.json (one row per method and switch) and its frontier figure."""
    study = read_json(os.path.join(study_dir, "results.json"), "--methods results.json")
    if not isinstance(study.get("rows"), list) or "judge_protocol" not in study:
        raise UserError(f"--methods {study_dir}: its results.json is not a study.py run's (no methods rows)")
    if not os.path.isfile(os.path.join(study_dir, "frontier.png")):
        raise UserError(f"--methods {study_dir}: frontier.png is missing (rerun study.py with --run-dir {study_dir})")
    return study


def versus_sentence(row: dict, other: str = "PPO") -> str:
    """What a method's gold win-rate against `other` says, chosen by its interval."""
    w = row["win"]["vs_ppo"]
    name = row["label"].split(" (")[0]
    if w["ci95"][1] < 0.5:
        return f"{other} beats {name} beyond noise ({_pct(1 - w['win_rate'])} of prompts)"
    if w["ci95"][0] > 0.5:
        return f"{name} beats {other} beyond noise ({_pct(w['win_rate'])} of prompts)"
    return f"{name} and {other} cannot be told apart ({name} wins {_pct(w['win_rate'])})"


def _study_rows(rows: List[dict]) -> List[List[str]]:
    def cell(w):
        return "–" if not w else f"{_pct(w['win_rate'])} [{_pct(w['ci95'][0])}, {_pct(w['ci95'][1])}]"
    return [[r["label"], f"{r['gold']:.2f}", cell(r["win"].get("gold")), cell(r["win"].get("gold:correctness")),
             cell(r["win"].get("gold:style")), cell(r["win"].get("vs_ppo")), f"{r['kl']:.2f}",
             "–" if r["seconds"] is None else f"{r['seconds'] / 60:.1f}"] for r in rows]


STUDY_HEADER = ["policy", "gold", "vs SFT", "correctness", "style", "vs PPO", "KL", "min"]


def methods_section(run_dir: str, study: Optional[dict], study_dir: Optional[str], workdir: str) -> Dict[str, str]:
    """study.py's methods table and frontier figure (results), and its switch rows (ablations), or
    the command that makes them."""
    if not study:
        box = missing(
            "No methods study was given (--methods), so PPO is not compared here with RLOO, DPO, IPO and "
            "best-of-n, nor are the original's choices measured one at a time; those results do not exist "
            "in this report yet. This trains and evaluates them from this run's seeds, then rebuilds it:",
            ["python src/study.py --base runs/seeds_task_<stamp>",
             f"python src/report.py --run {run_dir} --methods runs/study_task_<stamp> ..."])
        return {"methods": box, "switches": box}
    import shutil
    shutil.copy(os.path.join(study_dir, "frontier.png"), os.path.join(workdir, "frontier.png"))
    rows = study["rows"]
    seeds = study["seeds"]
    by = {r["name"]: r for r in rows}
    methods = [r for r in rows if r["group"] == "method"]
    best = max(methods, key=lambda r: r["gold"])
    over = ("seed " if len(seeds) == 1 else "seeds ") + ", ".join(map(str, seeds))
    text = (f"Study run {run_name(study_dir)} ({over}; every method from the same SFT model, reward model and "
            f"preference pairs; intervals resample facts{' and seeds' if len(seeds) > 1 else ''}). "
            f"The highest gold reward per answer is {best['label']}'s ({best['gold']:.2f}; SFT "
            f"{by['sft']['gold']:.2f}, PPO {by['ppo']['gold']:.2f}). Against PPO under the gold reward: "
            + "; ".join(versus_sentence(r) for r in methods if r["name"] not in ("sft", "ppo")) + ".")
    if len(seeds) == 1:
        text += " One seed only: the intervals do not include the variation between seeds."
    caption = ("Every method against SFT on the test prompts: gold reward per answer; win-rates under the gold "
               "reward and its correctness and style parts, and against PPO, with 95% intervals; KL to SFT in nats "
               "per answer (best-of-n: analytic); minutes of the method's own compute.")
    frontier = figure("frontier.png", "Gold reward against KL to SFT for every policy (test prompts); dashed: "
                      "PPO's and RLOO's evaluations along training (dev prompts).", "fig-frontier")
    methods_text = (esc(text) + "\n\n" + table(STUDY_HEADER, _study_rows(methods), caption, size="7pt")
                    + "\n\n" + frontier)
    switches = [r for r in rows if r["group"] == "switch"]
    p = study["judge_protocol"]
    sw_text = ("Each row is PPO with one of the original project's choices put back and everything else as in "
               "the pipeline. " + "; ".join(
                   f"{r['label'][5:]}: gold {r['gold']:.2f} against PPO's {by['ppo']['gold']:.2f}, "
                   + versus_sentence(r) for r in switches) + ". "
               f"A simulated judge that says B on {_pct(p['p_b'])} of questions whatever the answers, else the "
               f"gold verdict, gives PPO {_pct(p['fixed_order']['win_rate'])} when PPO is always shown as B (the "
               f"original's protocol) and {_pct(p['both_orders']['win_rate'])} when both orders are asked, "
               f"against {_pct(p['truth']['win_rate'])} under the gold reward itself.")
    sw_table = table(STUDY_HEADER, _study_rows(switches), "The original's choices, one at a time (as the "
                     "methods table).", size="7pt")
    return {"methods": methods_text, "switches": esc(sw_text) + "\n\n" + sw_table}


def speed_section(blocks: Optional[List[tuple]]) -> str:
    """The benchmark file as the paper's tables: its sections, notes and tables, and the goals met."""
    if not blocks:
        return missing("No benchmark table was given (--benchmarks), so this report has no speed figures. This "
                       "measures them (about 25 minutes on 2 cores; the TRL references first need their own "
                       "virtual environments), then rebuilds the report:",
                       ["bash benchmarks/setup_trl.sh", "python benchmarks/run.py",
                        "python src/report.py --run ... --benchmarks benchmarks/results/latest.md"])
    out = [esc("Speed is measured by benchmarks/run.py as ratios against transformers and TRL in the same run, on "
               "the same machine, with identical weights; every figure below is read from its output. "
               + speed_sentence(blocks))]
    title, notes = "", []  # a table's caption: its section's title (first table only) and the notes before it
    for block in blocks:
        if block[0] == "section":
            out += [md_inline(n) for n in notes]
            title, notes = re.sub(r"^\d+\.\s*", "", block[1]), []
        elif block[0] == "text":
            notes.append(block[1])
        else:
            header, rows = block[1], block[2]
            caption = " ".join([title + "." if title else ""] + [n.rstrip(":") + "." for n in notes]).strip()
            caption = re.sub(r"\*([^*]+)\*", r"\1", caption).replace("..", ".")
            out.append(table(header, rows, caption, size="6.6pt" if len(header) >= 9 else "7.8pt"))
            title, notes = "", []
    return "\n\n".join(out + [md_inline(n) for n in notes])


def limitations_section(results: dict, configs: Dict[str, dict], seeds, blocks, methods=None) -> str:
    """What was not run, decided from what the run's files say it used."""
    model = ModelConfig.from_dict(configs["ppo"]["model"])
    args = configs["ppo"]["args"]
    judges = {judge_label(r["judge"]) for r in results["results"]}
    items = []
    if not model.pretrained:
        items.append(f"No GPT-2 weights: every policy is the {args['preset']} preset "
                     f"({_parameters(model) / 1e6:.1f}M parameters) trained from scratch. GPT-2 from the hub "
                     f"(124M to 1.5B parameters) was not run; the code loads it and is tested against transformers "
                     f"on random weights of the same shapes.")
    items.append(f"No HH-RLHF at scale: every stage trained on the built-in task "
                 f"({configs['sft']['data']['train']['kept']:,} demonstrations, "
                 f"{configs['rm']['data']['train']['kept']:,} preference pairs, "
                 f"{configs['ppo']['data']['train']['kept']:,} PPO prompts, {len(task.FACTS)} facts). What holds "
                 f"here, where the RM's errors and the gold reward are known, need not hold for human preferences.")
    if not any(j.startswith("openai") for j in judges):
        items.append("No LLM judge was asked: the gold reward judged, which a real task does not have. The judge "
                     "code (both orders, temperature 0, every unreadable reply counted) is tested against a local "
                     "OpenAI-compatible server only.")
    devices = {c["args"].get("device") for c in configs.values()}
    if devices <= {"cpu"}:
        items.append("No GPU: every stage ran on CPU cores" +
                     (" and the benchmarks on a CPU; no GPU figure is measured." if blocks else "."))
    if not methods:
        items.append("Only PPO was run: DPO [6], which needs neither a reward model nor sampling, and RLOO [7], which "
                     "needs no critic, are the obvious comparisons on this task and were not trained here"
                     + (" (TRL's RLOO appears only as a speed reference)." if blocks else "."))
    else:
        few = len(methods["seeds"]) < 3
        items.append((f"The methods study ran on {len(methods['seeds'])} seed(s) only "
                      f"({', '.join(map(str, methods['seeds']))}). " if few else "")
                     + "DPO's learning rate and beta were chosen on one seed's dev prompts and IPO took DPO's, "
                       "RLOO took PPO's settings: the rows compare each method at one setting, not at its best.")
    if not seeds:
        items.append("One seed: the intervals resample facts within one run, not runs.")
    return "\n".join("- " + esc(item) for item in items)


def abstract(run_dir: str, results: dict, seeds, ablation, configs) -> str:
    rows = results["results"]
    gold, correct, style, rm = (_row(rows, j) for j in ("gold", "gold:correctness", "gold:style", "rm"))
    model = ModelConfig.from_dict(configs["ppo"]["model"])
    text = (f"We run InstructGPT's recipe (supervised fine-tuning, a reward model learned from preference pairs, "
            f"PPO with a KL penalty) on a {_parameters(model) / 1e6:.1f}M-parameter GPT-2 "
            f"{'trained from scratch' if not model.pretrained else 'from ' + model.pretrained} on a "
            f"task whose true reward is known, so that every result is measured against the truth instead of a "
            f"judge. On {gold['pairs']} held-out test prompts PPO's answer beats SFT's under the gold reward on "
            f"{_pct(gold['win_rate'])} of prompts (95% interval over facts {_pct(gold['ci95'][0])} to "
            f"{_pct(gold['ci95'][1])}): {verdict(gold)}; mean gold reward per answer goes from "
            f"{gold['mean_score_b']:.2f} to {gold['mean_score_a']:.2f} of {task.MAX_GOLD:g}.")
    if seeds:
        mean = seeds[0]["mean"]["gold"]
        text += (f" Over {len(seeds[0]['per_seed'])} seeds the mean win-rate is {_pct(mean['win_rate'])} "
                 f"({_pct(mean['ci95'][0])} to {_pct(mean['ci95'][1])}).")
    text += (f" On correctness alone PPO wins {_pct(correct['win_rate'])}, on style alone {_pct(style['win_rate'])}: "
             f"{parts_sentence(correct, style)}. The reward model orders "
             f"{_pct(results['rm_gold_accuracy']['vs_gold'])} of held-out pairs as the truth does but prefers "
             f"PPO's answers on {_pct(rm['win_rate'])} of prompts: {proxy_sentence(gold, rm)}.")
    if ablation:
        main_kl, weak_kl = configs["ppo"]["ppo"]["kl_coef"], ablation[0]["ppo"]["kl_coef"]
        text += (f" With a KL coefficient of {weak_kl:g}: "
                 f"{ablation_sentence(results['over_optimisation'], ablation[1], main_kl, weak_kl)}.")
    return esc(text)


def byline(run_dir, seeds_dir, ablation_dir, study_dir, benchmarks) -> str:
    named = [f"run {run_name(run_dir)}"]
    if seeds_dir:
        named.append(f"seeds run {run_name(seeds_dir)}")
    if ablation_dir:
        named.append(f"ablation {run_name(ablation_dir)}")
    if study_dir:
        named.append(f"study {run_name(study_dir)}")
    if benchmarks:
        named.append(f"benchmarks {os.path.basename(benchmarks)}")
    return esc("Typeset by src/report.py from " + ", ".join(named) + "; every number is read from their files.")


# -----------------------------------------------------------------------------
# Filling the template, and typesetting it


def fill(template: str, values: Dict[str, str]) -> str:
    """The template with every {{name}} replaced; a name without a value, or a value without a
    place, is a bug in the template or here."""
    names = set(re.findall(r"\{\{(\w+)\}\}", template))
    if names != set(values):
        raise RuntimeError(f"template and values disagree: {sorted(names ^ set(values))}")
    return re.sub(r"\{\{(\w+)\}\}", lambda m: values[m.group(1)], template)


def build(run_dir: str, out: str, ablation: Optional[str] = None, benchmarks: Optional[str] = None,
          seeds: Optional[str] = None, study: Optional[str] = None, source_dir: Optional[str] = None,
          methods: Optional[str] = None) -> str:
    """Check every input, write the figures and the Typst source, and typeset `out`."""
    import matplotlib
    matplotlib.use("Agg")
    matplotlib.rcParams.update({"svg.hashsalt": "minchatgpt",  # the same figures give the same SVG
                                "font.size": 7, "axes.titlesize": 7.5, "legend.fontsize": 6.5})
    import typst

    results, configs = load_run(run_dir)
    seeds_in = load_seeds(seeds) if seeds else None
    ablation_in = load_ablation(ablation) if ablation else None
    study_in = load_study(study) if study else None
    methods_in = load_methods(methods) if methods else None
    blocks = parse_benchmarks(benchmarks) if benchmarks else None
    with open(TEMPLATE) as f:
        template = f.read()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = source_dir or tmp
        os.makedirs(workdir, exist_ok=True)
        method, config_table = method_section(configs)
        task_text, gold_table = task_section()
        values = {
            "byline": byline(run_dir, seeds, ablation, study, benchmarks),
            "abstract": abstract(run_dir, results, seeds_in, ablation_in, configs),
            "method": method, "config_table": config_table, "task": task_text, "gold_table": gold_table,
            **results_section(run_dir, results, configs),
            "seeds": seeds_section(run_dir, seeds, seeds_in),
            **decomposition_section(results, seeds_in, workdir),
            "reward_model": reward_section(results, configs, ablation_in, workdir),
            "ablation": ablation_section(run_dir, results, configs, ablation_in),
            "study": study_section(run_dir, study_in, study),
            **methods_section(run_dir, methods_in, methods, workdir),
            "speed": speed_section(blocks),
            "limitations": limitations_section(results, configs, seeds_in, blocks, methods_in),
        }
        source = os.path.join(workdir, "report.typ")
        with open(source, "w") as f:
            f.write(fill(template, values))
        try:  # only the fonts the wheel carries: the same PDF on every machine
            pdf = typst.compile(source, root=workdir, ignore_system_fonts=True)
        except typst.TypstError as e:  # a bug in the template or in the markup made here
            raise RuntimeError(f"typst could not compile {source}:\n{e.diagnostic}") from None
    with atomic_path(out) as tmp_out, open(tmp_out, "wb") as f:
        f.write(pdf)
    return out


def main(argv=None):
    ap = parser(__doc__)
    ap.add_argument("--run", required=True, help="a finished pipeline run directory (results.json)")
    ap.add_argument("--seeds", default=None, help="a pipeline.py --seeds run directory (optional)")
    ap.add_argument("--ablation", default=None, help="a train_ppo.py run with a weaker KL penalty (optional)")
    ap.add_argument("--study", default=None, help="a study run directory, e.g. study_rm.py's (optional)")
    ap.add_argument("--methods", default=None, help="a study.py run directory: methods and switches (optional)")
    ap.add_argument("--benchmarks", default=None, help="benchmarks/results/latest.md (optional)")
    ap.add_argument("--source-dir", default=None,
                    help="also keep the generated Typst source and figures there (to read or edit)")
    ap.add_argument("-o", "--out", default="report.pdf", help="the PDF to write (default: report.pdf)")
    args = ap.parse_args(argv)
    for flag, path in (("--seeds", args.seeds), ("--ablation", args.ablation), ("--study", args.study),
                       ("--methods", args.methods), ("--benchmarks", args.benchmarks)):
        if path and not os.path.exists(path):
            raise UserError(f"{flag} {path}: not found")
    print(f"wrote {build(args.run, args.out, args.ablation, args.benchmarks, args.seeds, args.study, args.source_dir, args.methods)}")


if __name__ == "__main__":
    run_cli(main)
