"""Checkpoints that say what they are, load strictly, and are never half-written.

Layout:
  runs/<stage>_<name>_<stamp>/checkpoints/step_000500/{model.safetensors, optimizer.pt, trainer_state.json}
  runs/<stage>_<name>_<stamp>/final/model.safetensors
Weights are safetensors; the file's metadata key `minchatgpt` holds JSON {stage, kind, preset,
model_config}, so loading the wrong thing (an SFT model as a reward model, a gpt2-medium checkpoint
into the tiny preset) fails with a clear message instead of a silent non-strict load. Optimizer and
RNG state go through torch.save and come back with torch.load(weights_only=True): no pickles.

Two ways to load:
- `load_model(path)`: the exact model that was saved (resume, PPO's reward model, evaluation).
- `init_model(kind, config, init)`: a new model of `config` started from other weights — hub GPT-2,
  a transformers directory, or one of our checkpoints. The source's LoRA adapters (if any) are merged
  into its weights first; the new model's own adapters start at B = 0, so an SFT model without LoRA
  initialises a LoRA reward model (this failed in the original) and vice versa.
"""
import glob
import json
import os
import random
import shutil
from dataclasses import replace
from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from common import UserError, atomic_path, looks_like_path
from configs import ModelConfig
from gpt import GPT, RewardModel, ValueModel

KINDS = {"lm": GPT, "rm": RewardModel, "value": ValueModel}
MODEL_FILE = "model.safetensors"


def kind_of(model) -> str:
    for kind, cls in KINDS.items():
        if type(model) is cls:
            return kind
    raise TypeError(f"not a minChatGPT model: {type(model).__name__}")


def save_model(model, out_dir: str, stage: str, preset: Optional[str] = None) -> str:
    """Write out_dir/model.safetensors atomically (common.atomic_path)."""
    os.makedirs(out_dir, exist_ok=True)
    meta = {"stage": stage, "kind": kind_of(model), "preset": preset, "model_config": model.config.to_dict()}
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    path = os.path.join(out_dir, MODEL_FILE)
    with atomic_path(path) as tmp:
        save_file(state, tmp, metadata={"minchatgpt": json.dumps(meta)})
    return path


def latest_checkpoint(run_dir: str) -> Optional[str]:
    """The newest complete checkpoints/step_* directory of a run (temporary ones are ignored)."""
    steps = sorted(glob.glob(os.path.join(run_dir, "checkpoints", "step_*")))
    steps = [s for s in steps if os.path.isfile(os.path.join(s, "trainer_state.json"))]
    return steps[-1] if steps else None


def find_model_file(path: str) -> str:
    """A run dir (its final/ model, else its newest checkpoint), a checkpoint dir, or the file."""
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise UserError(f"checkpoint not found: {path}")
    for candidate in (os.path.join(path, MODEL_FILE), os.path.join(path, "final", MODEL_FILE)):
        if os.path.isfile(candidate):
            return candidate
    step = latest_checkpoint(path)
    if step:
        return os.path.join(step, MODEL_FILE)
    raise UserError(f"no {MODEL_FILE} in {path} (expected a run dir, a checkpoint dir or the file)")


def is_checkpoint(path: str) -> bool:
    """True for our run dirs / checkpoint dirs / model files, False for hub names and HF dirs."""
    try:
        return os.path.exists(path) and "minchatgpt" in _metadata(find_model_file(path))
    except UserError:
        return False


def _metadata(file: str) -> dict:
    from safetensors import safe_open
    try:
        with safe_open(file, "pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise UserError(f"{file} is not a readable safetensors file ({e})") from None


def checkpoint_info(path: str) -> dict:
    """{stage, kind, preset, model_config, file} of one of our checkpoints."""
    file = find_model_file(path)
    meta = _metadata(file)
    if "minchatgpt" not in meta:
        raise UserError(f"{file} was not written by minChatGPT (no metadata); use it as a GPT-2 init instead")
    info = json.loads(meta["minchatgpt"])
    info["file"] = file
    info["config"] = ModelConfig.from_dict(info["model_config"])
    return info


def _describe(info: dict) -> str:
    return f"a {info['stage']} checkpoint ({info['kind']} model, preset {info.get('preset') or 'custom'})"


def load_model(path: str, kind: Optional[str] = None, stages=None, what: str = "checkpoint",
               config: Optional[ModelConfig] = None):
    """The exact model saved at `path`. `kind`/`stages` say what the caller needs: anything else is a
    clear error. `config`, if given, must describe the same architecture as the checkpoint (its
    dropout may differ). Returns (model, info)."""
    info = checkpoint_info(path)
    if kind is not None and info["kind"] != kind or stages is not None and info["stage"] not in stages:
        want = "/".join(stages) if stages else kind
        raise UserError(f"{what} {path} is {_describe(info)}, expected a {want} checkpoint")
    saved = info["config"]
    if config is not None and config.architecture() != saved.architecture():
        raise UserError(f"{what} {path} does not fit the preset: {_arch_diff(config, saved)}")
    model = KINDS[info["kind"]](replace(saved, dropout=config.dropout) if config else saved)
    state = load_file(info["file"])
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"{info['file']} does not match its own config: missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}")
    return model, info


def _arch_diff(want: ModelConfig, got: ModelConfig) -> str:
    a, b = want.architecture(), got.architecture()
    return ", ".join(f"{k} {a.get(k)} (preset) vs {b.get(k)} (checkpoint)" for k in sorted(set(a) | set(b))
                     if a.get(k) != b.get(k))


def init_model(kind: str, config: ModelConfig, init: Optional[str] = None, what: str = "-p"):
    """A new `kind` model of `config`, initialised from `init` (or config.pretrained, or randomly).

    `init` may be 'huggingface' (the preset's hub weights), a hub name, a transformers directory, or
    one of our checkpoints. A value model (critic) started from a reward model keeps its head.
    """
    model = KINDS[kind](config)
    source = config.pretrained if init in (None, "huggingface") else init
    if init == "huggingface" and not source:
        raise UserError(f"{what} huggingface: this preset has no pretrained weights; use a GPT-2 preset")
    if source is None:
        return model  # random init (the from-scratch presets)
    backbone = model if kind == "lm" else model.backbone
    src_head = None
    if not os.path.exists(source) and looks_like_path(source):
        raise UserError(f"{what} {source}: not found (expected a run dir, a checkpoint, a transformers "
                        f"directory or a hub name like openai-community/gpt2)")
    if is_checkpoint(source):
        src, info = load_model(source, what=what)
        plain = replace(config, lora_rank=0)
        if plain.architecture() != replace(info["config"], lora_rank=0).architecture():
            raise UserError(f"{what} {source} does not fit the preset: {_arch_diff(plain, info['config'])}")
        weights = (src if info["kind"] == "lm" else src.backbone).merged_state_dict()
        src_head = getattr(src, "head", None)
    else:
        weights = GPT.from_pretrained(source, replace(config, lora_rank=0)).state_dict()
    missing, unexpected = backbone.load_state_dict(weights, strict=False)
    missing = [k for k in missing if "lora_" not in k]  # new adapters start at B = 0
    if missing or unexpected:
        raise UserError(f"{what} {source} does not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if src_head is not None and kind != "lm":
        model.head.load_state_dict(src_head.state_dict())
    return model


# -----------------------------------------------------------------------------
# Training state: everything besides weights that an exact resume needs


def save_training_checkpoint(run_dir: str, step: int, models: dict, stage: str, preset: Optional[str],
                             optimizers: dict, schedulers: dict, trainer_state: dict, rng_states: list,
                             keep_last: int, scaler=None) -> str:
    """checkpoints/step_XXXXXX/ with one safetensors file per model, optimizer.pt (optimizers,
    schedulers, the fp16 GradScaler's loss scale, each process's RNG state) and trainer_state.json,
    written to a temporary directory and renamed into place; then all but the newest `keep_last`
    checkpoints are removed.

    The temporary directory is `.tmp_step_XXXXXX`, not common.atomic_path's `step_XXXXXX.tmpPID`:
    its name must not match `step_*`, which latest_checkpoint and the pruning below glob for. An
    older checkpoint of the same step (a resumed run saving it again) is removed just before the
    rename, because a directory cannot be renamed over one that is not empty."""
    root = os.path.join(run_dir, "checkpoints")
    final = os.path.join(root, f"step_{step:06d}")
    tmp = os.path.join(root, f".tmp_step_{step:06d}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name, model in models.items():
        save_model(model, os.path.join(tmp, name) if name != "model" else tmp, stage, preset)
    torch.save({
        "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
        "schedulers": {k: s.state_dict() for k, s in schedulers.items()},
        "rng": rng_states,
        "scaler": scaler.state_dict() if scaler is not None else None,  # without it fp16 resume is not exact
    }, os.path.join(tmp, "optimizer.pt"))
    with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
        json.dump(trainer_state, f, indent=2)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    done = sorted(glob.glob(os.path.join(root, "step_*")))
    for old in done[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_training_checkpoint(ckpt_dir: str, models: dict, optimizers: dict, schedulers: dict, scaler=None):
    """Restore models, optimizers, schedulers and the GradScaler in place; returns (trainer_state, rng_states)."""
    for name, model in models.items():
        file = os.path.join(ckpt_dir, MODEL_FILE) if name == "model" else os.path.join(ckpt_dir, name, MODEL_FILE)
        model.load_state_dict(load_file(file), strict=True)
    blob = torch.load(os.path.join(ckpt_dir, "optimizer.pt"), weights_only=True)
    for k, o in optimizers.items():
        o.load_state_dict(blob["optimizers"][k])
    for k, s in schedulers.items():
        s.load_state_dict(blob["schedulers"][k])
    if scaler is not None and blob.get("scaler"):
        scaler.load_state_dict(blob["scaler"])
    with open(os.path.join(ckpt_dir, "trainer_state.json")) as f:
        return json.load(f), blob["rng"]


def rng_state() -> dict:
    """This process's random number generators (torch, CUDA, Python's random)."""
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_pos": random.getstate()[2]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
