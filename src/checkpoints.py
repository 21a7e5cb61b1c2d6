"""Checkpoints that say what they are, load strictly, and are never half-written.

Layout:
  runs/<stage>_<name>_<stamp>/checkpoints/step_000500/{model.safetensors, optimizer.pt, trainer_state.json,
                                                     checksums.json}
  runs/<stage>_<name>_<stamp>/final/model.safetensors
Weights are safetensors; the file's metadata key `minchatgpt` holds JSON {stage, kind, preset,
model_config, sha256}, so loading the wrong thing (an SFT model as a reward model, a gpt2-medium checkpoint
into the tiny preset) fails with a clear message instead of a silent non-strict load. Optimizer and
RNG state go through torch.save and come back with torch.load(weights_only=True): no pickles.

Nothing damaged loads silently. safetensors checks only that a file's header is well formed and
covers the file, and torch.load checks nothing, so a flipped bit in the data of either loads as
different numbers. So `sha256` seals the weights file: it is the sha256 of the whole file with those
64 characters read as zeros (`save_weights`), verified by streaming the file when a checkpoint is
first looked at (`checkpoint_info`), before any work starts; and a training checkpoint's
checksums.json holds the sha256 of its optimizer.pt and trainer_state.json, verified on resume.
Files written before these existed load unverified.

Two ways to load:
- `load_model(path)`: the exact model that was saved (resume, PPO's reward model, evaluation).
- `init_model(kind, config, init)`: a new model of `config` started from other weights — hub GPT-2,
  a transformers directory, or one of our checkpoints. The source's LoRA adapters (if any) are merged
  into its weights first; the new model's own adapters start at B = 0, so an SFT model without LoRA
  initialises a LoRA reward model (this failed in the original) and vice versa.
"""
import glob
import hashlib
import json
import os
import pickle
import random
import shutil
from dataclasses import replace
from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from common import UserError, atomic_path, looks_like_path, read_json
from configs import ModelConfig
from gpt import GPT, RewardModel, ValueModel

KINDS = {"lm": GPT, "rm": RewardModel, "value": ValueModel}
MODEL_FILE = "model.safetensors"
CHECKSUMS_FILE = "checksums.json"  # sha256 of a training checkpoint's other files


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
        save_weights(state, tmp, meta)
    return path


_UNSEALED = "0" * 64  # the digest's place while the file's digest is computed


def save_weights(state: dict, path: str, meta: dict):
    """`state` as a safetensors file with `meta` as its minchatgpt metadata, sealed: meta's "sha256" is
    the digest of the file with those 64 characters zeroed, written into them in place (same length)."""
    save_file(state, path, metadata={"minchatgpt": json.dumps({**meta, "sha256": _UNSEALED})})
    with open(path, "r+b") as f:
        header = _header(f)
        at = header.index(_UNSEALED.encode())
        digest = _sealed_digest(f, header, at)
        f.seek(at)
        f.write(digest.encode())


def _header(f) -> bytes:
    """A safetensors file's first bytes: the 8-byte length, then the JSON header."""
    f.seek(0)
    head = f.read(8)
    return head + f.read(int.from_bytes(head, "little"))


def _sealed_digest(f, header: bytes, at: int) -> str:
    """sha256 of the open file that starts with `header`, the 64 bytes at `at` read as zeros."""
    h = hashlib.sha256(header[:at] + _UNSEALED.encode() + header[at + len(_UNSEALED):])
    f.seek(len(header))
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
    return h.hexdigest()


_VERIFIED = set()  # files verified by this process, as (path, inode, size, mtime)


def verify_weights(file: str, digest: str):
    """UserError unless `file` matches the digest it was sealed with. Each file is read once per
    process: the key changes whenever it is rewritten (every writer here renames a new file in)."""
    st = os.stat(file)
    key = (os.path.realpath(file), st.st_ino, st.st_size, st.st_mtime_ns)
    if key in _VERIFIED:
        return
    with open(file, "rb") as f:
        header = _header(f)
        at = header.find(digest.encode())
        if at < 0 or _sealed_digest(f, header, at) != digest:
            raise UserError(f"{file} is corrupt: its bytes differ from the sha256 sealed into it when it was "
                            f"saved (a damaged copy or disk)")
    _VERIFIED.add(key)


def load_weights(info: dict) -> dict:
    """The tensors of checkpoint_info's (verified) file."""
    try:
        return load_file(info["file"])
    except (SafetensorError, OSError) as e:
        raise UserError(f"{info['file']} is not a readable safetensors file ({e})") from None


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def is_run_dir(path: str) -> bool:
    """Whether `path` is a training run's directory (it may not hold a model yet)."""
    if os.path.isdir(os.path.join(path, "checkpoints")) or os.path.isdir(os.path.join(path, "final")):
        return True
    try:
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "stage" in config and "args" in config


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
    if is_run_dir(path):
        raise UserError(f"run directory {path} holds no model yet: no final/{MODEL_FILE} and no complete "
                        f"checkpoints/step_* (was it stopped before its first checkpoint?)")
    raise UserError(f"no {MODEL_FILE} in {path} (expected a run dir, a checkpoint dir or the file)")


def is_checkpoint(path: str) -> bool:
    """True for our run dirs / checkpoint dirs / model files, False for hub names and HF dirs.
    A model file that cannot be read, or a run directory with no model yet, is an error (UserError):
    it is not some other format to try next."""
    if not os.path.exists(path):
        return False
    try:
        file = find_model_file(path)
    except UserError:
        if is_run_dir(path):
            raise
        return False
    return "minchatgpt" in _metadata(file)


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
    try:  # a damaged header can still be valid safetensors
        info = json.loads(meta["minchatgpt"])
        if isinstance(info, dict) and "sha256" in info:
            verify_weights(file, info["sha256"])  # first: then a damaged file is called so, whatever it claims
        config = ModelConfig.from_dict(info["model_config"])
        if info["kind"] not in KINDS:
            raise ValueError(f"unknown model kind {info['kind']!r}")
    except (ValueError, TypeError, KeyError) as e:
        raise UserError(f"{file} has unreadable minChatGPT metadata ({e}); the file is damaged") from None
    return {**info, "file": file, "config": config}


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
    _load_state(model, load_weights(info), info["file"])
    return model, info


def _load_state(model, state: dict, file: str):
    """Load `state` strictly; a mismatch (missing, unexpected or misshapen tensors) is a UserError."""
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shapes differ: the file's tensors are not those of its recorded config
        raise UserError(f"{file} does not match its own config: {str(e).splitlines()[-1].strip()}") from None
    if missing or unexpected:
        raise UserError(f"{file} does not match its own config: missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}")


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
    schedulers, the fp16 GradScaler's loss scale, each process's RNG state), trainer_state.json and
    checksums.json, written to a temporary directory and renamed into place; then all but the newest
    `keep_last` checkpoints are removed.

    Every `step_*` directory is complete, whenever the process dies (SIGKILL, a full disk): the
    temporary directory is `.tmp_step_XXXXXX`, not common.atomic_path's `step_XXXXXX.tmpPID`, since
    its name must not match `step_*`, which latest_checkpoint and the pruning below glob for; a save
    that fails removes it; and a checkpoint is removed by renaming it out of `step_*` first
    (`_remove_checkpoint`), so no half-deleted one is ever taken for the newest."""
    root = os.path.join(run_dir, "checkpoints")
    final = os.path.join(root, f"step_{step:06d}")
    tmp = os.path.join(root, f".tmp_step_{step:06d}")
    for stale in glob.glob(os.path.join(root, ".tmp_step_*")) + glob.glob(os.path.join(root, ".old_step_*")):
        shutil.rmtree(stale, ignore_errors=True)  # left by a process killed while saving
    os.makedirs(tmp)
    try:
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
        with open(os.path.join(tmp, CHECKSUMS_FILE), "w") as f:
            json.dump({name: file_sha256(os.path.join(tmp, name)) for name in ("optimizer.pt", "trainer_state.json")},
                      f, indent=2)
        if os.path.exists(final):  # a resumed run saving this step again
            _remove_checkpoint(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # e.g. a full disk: give the space back, keep the older ones
        raise
    done = sorted(glob.glob(os.path.join(root, "step_*")))
    for old in done[:-keep_last] if keep_last > 0 else []:
        _remove_checkpoint(old)
    return final


def _remove_checkpoint(path: str):
    """Rename `path` out of `step_*` (atomic), then delete it."""
    aside = os.path.join(os.path.dirname(path), ".old_" + os.path.basename(path))
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(path, aside)
    shutil.rmtree(aside, ignore_errors=True)


def load_training_checkpoint(ckpt_dir: str, models: dict, optimizers: dict, schedulers: dict, scaler=None,
                             stage: Optional[str] = None):
    """Restore models, optimizers, schedulers and the GradScaler in place; returns (trainer_state, rng_states).

    Each model file must hold a model of the kind and architecture it is restored into (and of
    `stage`, if given), every file must match its recorded sha256, and anything else is a UserError
    naming the file: a resume is exact or it does not start."""
    for name, model in models.items():
        file = os.path.join(ckpt_dir, MODEL_FILE) if name == "model" else os.path.join(ckpt_dir, name, MODEL_FILE)
        info = checkpoint_info(file)
        want = f"a {kind_of(model)} model" + (f" of the {stage} stage" if stage else "")
        if info["kind"] != kind_of(model) or stage is not None and info["stage"] != stage:
            raise UserError(f"{file} is {_describe(info)}, but this run resumes {want}")
        if info["config"].architecture() != model.config.architecture():
            raise UserError(f"{file} does not fit the run's model: {_arch_diff(model.config, info['config'])}")
        _load_state(model, load_weights(info), file)
    _verify_checksums(ckpt_dir)
    path = os.path.join(ckpt_dir, "optimizer.pt")
    try:
        blob = torch.load(path, weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:
        raise UserError(f"{path} is not readable ({str(e).splitlines()[0]})") from None
    for k, o in optimizers.items():
        o.load_state_dict(blob["optimizers"][k])
    for k, s in schedulers.items():
        s.load_state_dict(blob["schedulers"][k])
    if scaler is not None and blob.get("scaler"):
        scaler.load_state_dict(blob["scaler"])
    return read_json(os.path.join(ckpt_dir, "trainer_state.json"), "trainer state"), blob["rng"]


def _verify_checksums(ckpt_dir: str):
    """Check optimizer.pt and trainer_state.json against checksums.json (older checkpoints have none)."""
    path = os.path.join(ckpt_dir, CHECKSUMS_FILE)
    if not os.path.exists(path):
        return
    sums = read_json(path, "checksums")
    if not isinstance(sums, dict):
        raise UserError(f"{path} is damaged (not a JSON object)")
    for name, want in sums.items():
        file = os.path.join(ckpt_dir, name)
        if not os.path.isfile(file):
            raise UserError(f"{file} is missing from the checkpoint")
        if file_sha256(file) != want:
            raise UserError(f"{file} is corrupt: its sha256 differs from the one in {CHECKSUMS_FILE}")


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
