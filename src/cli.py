"""Command-line plumbing shared by train_sft.py, train_rm.py and train_ppo.py.

The original project's short flags keep their meaning: -n experiment name, -b batch size,
-p init/pretrained, -a actor, -c critic/reward model. Every TrainConfig field is a long flag.
"""
import argparse
import inspect
import os
import re
import sys
import typing
from dataclasses import fields

import torch

from common import UserError, make_run_dir, read_json, seed_everything
from configs import PRESETS, TrainConfig, get_preset

SEED_STRIDE = 104729  # process r is seeded with seed + r * SEED_STRIDE (a prime), RLHF_DETAILS item 10


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


def add_dataclass_args(group, cls, base, short=None):
    """One --flag per field of config dataclass `cls`, defaulting to the values in `base`."""
    docs, short = field_docs(cls), short or {}
    for f in fields(cls):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(base, f.name)
        helptext = f"{docs.get(f.name, '')} (default {default})"
        if f.type is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=helptext)
        else:
            kind = f.type if f.type in (int, float, str) else typing.get_args(f.type)[0]  # Optional[X] -> X
            group.add_argument(*short.get(f.name, []), flag, type=kind, default=default, help=helptext)


def add_common_args(ap: argparse.ArgumentParser, defaults: dict):
    """Flags every training script has. `defaults` overrides TrainConfig defaults per stage."""
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
                       TrainConfig(**defaults), short={"batch_size": ["-b"]})


def train_config(args) -> TrainConfig:
    return TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})


def model_config(args, **overrides):
    return get_preset(args.preset, lora_rank=args.lora_rank,
                      gradient_checkpointing=args.grad_checkpointing or None, **overrides)


def resumed_args(args):
    """With --resume RUN_DIR, the arguments saved in RUN_DIR/config.json (plus resume itself)."""
    if not args.resume:
        return args
    saved = read_json(os.path.join(args.resume, "config.json"), "run config (is --resume a run directory?)")
    restored = argparse.Namespace(**saved["args"])
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

