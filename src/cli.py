"""Command-line plumbing shared by train_sft.py, train_rm.py and train_ppo.py.

A training script is: its own flags + `add_data_args` + `add_common_args`, then `start` (processes,
device, TrainConfig), `load_data` (training and held-out sets), the models (initialised inside
`same_init_on_every_process`), and `train` (run directory, config record, Trainer.fit, last line).
The original project's short flags keep their meaning: -n experiment name, -b batch size,
-p init/pretrained, -a actor, -c critic/reward model. Every TrainConfig field is a long flag.
"""
import argparse
import inspect
import os
import re
import sys
import typing
from contextlib import contextmanager
from dataclasses import fields

import torch

from common import UserError, make_run_dir, read_json, seed_everything
from configs import PRESETS, TrainConfig, get_preset
from trainers import Dist, Trainer, process_device

# Process r is seeded with seed + r * SEED_STRIDE (a prime): data-parallel processes must sample different
# rollouts and dropout masks, or N processes would do the work of one.
SEED_STRIDE = 104729
PARTS = ["sft", "rm", "ppo", "all"]  # dataset.part_of: the hash-based share of prompts each stage uses


def parser(doc: str) -> argparse.ArgumentParser:
    """An ArgumentParser whose description is the docstring's first line and whose --help ends with
    the rest of the docstring (the examples)."""
    first, _, rest = doc.strip().partition("\n")
    return argparse.ArgumentParser(description=first, epilog=rest.strip(),
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def field_docs(cls) -> dict:
    """The one-line comment after each field of a config dataclass: its documentation, shown by --help."""
    docs = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+): [^=]+=.*?#\s*(.*)$", line)
        if m:
            docs[m.group(1)] = m.group(2).replace("%", "%%")
    return docs


def add_dataclass_args(group, cls, base, short=None, hide=()):
    """One --flag per field of config dataclass `cls` (but those in `hide`), defaulting to the values in `base`."""
    docs, short = field_docs(cls), short or {}
    for f in fields(cls):
        if f.name in hide:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(base, f.name)
        helptext = f"{docs.get(f.name, '')} (default {default})"
        if f.type is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=helptext)
        else:
            kind = f.type if f.type in (int, float, str) else typing.get_args(f.type)[0]  # Optional[X] -> X
            group.add_argument(*short.get(f.name, []), flag, type=kind, default=default, help=helptext)


def add_data_args(ap: argparse.ArgumentParser, stage: str, source: str = "--data", held_out: str = "--eval-data",
                  what: str = "training data"):
    """The data flags: `source` (a hub name, file or directory), its --split, the `held_out` set and
    its --eval-split, and --part (default: `stage`'s own share of the prompts)."""
    g = ap.add_argument_group("data")
    g.add_argument(source, default="Anthropic/hh-rlhf", help=f"{what}: hub name, local file or directory")
    g.add_argument("--split", default="train", help=f"split of {source} to train on")
    g.add_argument(held_out, default=None, help=f"held-out data (default: the test split of {source}; "
                   "'none' = no evaluation)")
    g.add_argument("--eval-split", default="test", help="split of the held-out data")
    g.add_argument("--part", default=stage, choices=PARTS,
                   help="hash-based share of the prompts to use, so SFT, RM and PPO never share a prompt "
                        "('all' for data that is already split)")


def add_common_args(ap: argparse.ArgumentParser, defaults: dict, hide=()):
    """Flags every training script has. `defaults` overrides TrainConfig defaults per stage;
    TrainConfig fields in `hide` get no flag (the script sets them, see `start`)."""
    defaults = dict(defaults)
    g = ap.add_argument_group("run")
    g.add_argument("-n", "--name", default="default", help="experiment name, part of the run directory")
    g.add_argument("--preset", default=defaults.pop("preset", "gpt2-medium"),
                   help="model preset: " + ", ".join(PRESETS))
    g.add_argument("--lora-rank", type=int, default=None, help="override the preset's LoRA rank (0 = no LoRA)")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute activations to save memory")
    g.add_argument("--out-dir", default="runs", help="where run directories are made")
    g.add_argument("--run-dir", default=None, help="exact run directory (default: <out-dir>/<stage>_<name>_<stamp>)")
    g.add_argument("--resume", metavar="RUN_DIR", help="continue RUN_DIR from its newest checkpoint, "
                   "with the settings saved in it (other flags are ignored)")
    add_dataclass_args(ap.add_argument_group("training (TrainConfig in src/configs.py)"), TrainConfig,
                       TrainConfig(**defaults), short={"batch_size": ["-b"]}, hide=hide)


def train_config(args, **fixed) -> TrainConfig:
    """The TrainConfig of the parsed flags; `fixed` gives the fields a script has no flag for."""
    return TrainConfig(**{f.name: fixed[f.name] if f.name in fixed else getattr(args, f.name)
                          for f in fields(TrainConfig)})


def start(args, **fixed):
    """This process's place in a torchrun launch (process group started on its device) and the
    training config: (Dist, TrainConfig)."""
    dist_info = Dist()
    dist_info.init(process_device(args.device, dist_info))
    return dist_info, train_config(args, **fixed)


def load_data(make, args, dist_info, source: str = "data", held_out: str = "eval_data", train_kw=None, eval_kw=None):
    """(training set, held-out set or None) made by `make(source, split=, part=, ...)` from the data
    flags (add_data_args), with what became of their rows printed."""
    part = None if args.part == "all" else args.part
    train_set = make(getattr(args, source), split=args.split, part=part, **(train_kw or {}))
    flag = "--" + source.replace("_", "-")
    eval_source = held_out_source(getattr(args, source), getattr(args, held_out), "--" + held_out.replace("_", "-"),
                                  flag)
    eval_set = eval_source and make(eval_source, split=args.eval_split, part=part, **(eval_kw or {}))
    print_main(dist_info, f"train: {train_set.stats_line()}\neval:  {eval_set.stats_line() if eval_set else 'none'}")
    return train_set, eval_set


@contextmanager
def same_init_on_every_process(seed: int, dist_info):
    """Models made inside start from the same random draw on every process (DDP needs identical
    replicas); afterwards each process gets its own stream."""
    seed_process(seed, 0)
    yield
    seed_process(seed, dist_info.rank)


def policy_and_reference(model_cfg, source: str, what: str):
    """The policy to fine-tune, loaded from `source`, and its frozen reference: (policy, ref, how).
    A LoRA policy trains only its adapters and is its own reference with them off (ref None, no
    second copy); a full one gets a second, frozen copy. Call inside same_init_on_every_process."""
    from checkpoints import init_model
    from gpt import mark_only_lora_trainable
    policy = init_model("lm", model_cfg, source, what=what)
    if model_cfg.lora_rank:
        mark_only_lora_trainable(policy)
        return policy, None, "LoRA, reference = adapters off"
    return policy, init_model("lm", model_cfg, source, what=what), "full, frozen copy as reference"


def train(stage, args, model_cfg, train_cfg, dist_info, train_set, eval_set, collate, done_fields, **record) -> str:
    """Make the run directory, record the configuration, fit `stage` and print the last line;
    returns the run directory."""
    run_dir = new_run_dir(stage.name, args, dist_info)
    config = config_record(stage.name, args, model_cfg, train_cfg,
                           data={"train": train_set.stats, "eval": eval_set and eval_set.stats}, **record)
    trainer = Trainer(stage, train_cfg, run_dir, train_set, collate, eval_set, preset=args.preset,
                      config_record=config, dist_info=dist_info)
    metrics = trainer.fit(resume=bool(args.resume))
    print_main(dist_info, done_line(run_dir, metrics, done_fields))
    return run_dir


def model_config(args, **overrides):
    return get_preset(args.preset, lora_rank=args.lora_rank,
                      gradient_checkpointing=args.grad_checkpointing or None, **overrides)


def resumed_args(args):
    """With --resume RUN_DIR, the arguments saved in RUN_DIR/config.json (plus resume itself)."""
    if not args.resume:
        return args
    path = os.path.join(args.resume, "config.json")
    saved = read_json(path, "run config (is --resume a run directory?)")
    if not isinstance(saved, dict) or not isinstance(saved.get("args"), dict):
        raise UserError(f"--resume {args.resume}: {path} is not a training run's config (no saved arguments)")
    # Another script's run (an SFT run given to train_rm.py) has flags this script lacks: refuse it
    # before they are used. Flags this script gained since the run was made take their defaults.
    ours, theirs = set(vars(args)) - {"resume"}, set(saved["args"]) - {"resume"}
    if theirs - ours:
        differ = ", ".join("--" + k.replace("_", "-") for k in sorted(theirs - ours)[:3])
        raise UserError(f"--resume {args.resume} was made by another script (stage {saved.get('stage', '?')} in its "
                        f"config.json; flags this script does not have: {differ})")
    restored = argparse.Namespace(**{**{k: getattr(args, k) for k in ours - theirs}, **saved["args"]})
    restored.resume = args.resume
    return restored


def held_out_source(data: str, eval_data, flag: str = "--eval-data", train_flag: str = "--data"):
    """The held-out source: `eval_data` if given ('none' = no evaluation), else the test split of
    `data` — which a single file does not have, so that is an error, not a silent evaluation on the
    training data."""
    if eval_data == "none":
        return None
    if eval_data:
        return eval_data
    if os.path.isfile(data) or data.startswith("synthetic:"):
        raise UserError(f"{train_flag} {data} is a single file with no held-out split: pass {flag} FILE "
                        f"(or {flag} none to skip evaluation)")
    return data


def new_run_dir(stage: str, args, dist_info) -> str:
    """The run directory: --resume's, --run-dir, or a new <out-dir>/<stage>_<name>_<stamp>; made by
    the main process and shared with the others."""
    if args.resume:
        return args.resume
    path = None
    if dist_info.is_main:
        if args.run_dir:
            if os.path.exists(os.path.join(args.run_dir, "config.json")):
                raise UserError(f"--run-dir {args.run_dir} already holds a run; use --resume to continue it")
            os.makedirs(args.run_dir, exist_ok=True)
            path = args.run_dir
        else:
            path = make_run_dir(stage, args.name, args.out_dir)
    return dist_info.broadcast(path)


def seed_process(seed: int, rank: int):
    """Same seed for model init on every process; then a distinct stream per process."""
    seed_everything(seed + rank * SEED_STRIDE)


def config_record(stage: str, args, model_cfg, train_cfg, **extra) -> dict:
    """What goes to config.json and wandb: the command line, the resolved configs, data stats."""
    return {
        "stage": stage,
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "args": {k: v for k, v in vars(args).items()},
        "model": model_cfg.to_dict(),
        "train": train_cfg.to_dict(),
        "torch": torch.__version__,
        **extra,
    }


def done_line(run_dir: str, metrics: dict, fields) -> str:
    """The last line of a training script: the final held-out metrics, `fields` as
    (metrics key, label, format), or a note that nothing was evaluated (--eval-data none)."""
    shown = [f"{label} {metrics[key]:{fmt}}" for key, label, fmt in fields if key in metrics]
    return f"done: {run_dir}  " + ("  ".join(shown) if shown else "(no held-out evaluation)")


def print_main(dist_info, *args):
    if dist_info.is_main:
        print(*args, flush=True)

