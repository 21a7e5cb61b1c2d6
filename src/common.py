"""Small things every script shares: user errors, the CLI wrapper, seeding, devices, run dirs,
atomic writes, and telling a local path from a hub name.

A *user error* (missing file, malformed row, wrong checkpoint, missing API key) is not a bug:
the CLI prints one line on stderr and exits with code 2, no traceback. Bugs keep their traceback.
"""
import gc
import json
import os
import random
import re
import shutil
import sys
import time
from contextlib import contextmanager, nullcontext

import torch


class UserError(Exception):
    """Bad input from the user: reported as one line on stderr, exit code 2."""


class TrainingError(Exception):
    """Training cannot go on (e.g. the loss became NaN): one line on stderr, exit code 1."""


def flush_denormals():
    """Treat denormal floats as zero on the CPU.

    Adam's second moments for rarely updated rows (most of a 50257-word embedding) decay into
    denormal numbers, on which CPU arithmetic runs many times slower.
    The setting is per thread and inherited only by threads created later, so call this before
    torch starts its thread pool: first thing in a CLI (run_cli does) or a test session.
    """
    torch.set_flush_denormal(True)


def run_cli(main):
    """Run `main()`; a UserError becomes one line on stderr and exit code 2, a TrainingError exit 1."""
    flush_denormals()
    try:
        code = main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except TrainingError as e:
        print(f"training stopped: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    leave_process_group()
    sys.exit(code or 0)


def leave_process_group():
    """End a torchrun process's part in its group once every process is done.

    A gloo group (or a DDP wrapper holding one) still alive when the interpreter shuts down can
    abort the process with SIGABRT ("terminate called without an active exception") after a run
    that succeeded, which torchrun reports as a failure; so the wrappers are collected first,
    everyone waits for everyone, and the group is destroyed."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return
    gc.collect()  # a Trainer sits in reference cycles: free its DDP wrappers (and their group references)
    dist.barrier()
    dist.destroy_process_group()


def seed_everything(seed: int):
    random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA when present, else CPU; an unavailable device is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for, but torch sees no CUDA device (use --device cpu)")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r} (use auto, cpu, cuda or cuda:N)") from None


def autocast(device: torch.device, precision: str):
    """Mixed-precision context for `precision` in {'fp32', 'bf16', 'fp16'}.

    fp16 on CPU is refused: CPU fp16 matmuls are far slower than fp32.
    """
    if precision == "fp32":
        return nullcontext()
    if precision not in ("bf16", "fp16"):
        raise UserError(f"unknown precision {precision!r} (use fp32, bf16 or fp16)")
    if precision == "fp16" and device.type == "cpu":
        raise UserError("fp16 on CPU is ~100x slower than fp32; use --precision bf16 or fp32")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def default_precision(device: torch.device) -> str:
    """bf16 autocast on GPUs that have it natively (compute capability >= 8.0: A100, H100, RTX 30xx+),
    fp16 with loss scaling below that (T4, V100: torch.cuda.is_bf16_supported() can say yes there
    through slow emulation, so the capability decides), fp32 on CPU (bf16 there is an opt-in)."""
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.get_device_capability(device)[0] >= 8 else "fp16"


def make_run_dir(stage: str, name: str, root: str = "runs") -> str:
    """runs/<stage>_<name>_<YYYYmmdd-HHMMSS>/, made unique (-1, -2, ...) if runs start in the same second,
    in one process or several at once. The name is one path component: a name with a separator or
    '..' could write outside `root`."""
    if not re.fullmatch(r"[A-Za-z0-9_.+-]+", name) or ".." in name:
        raise UserError(f"-n/--name {name!r}: use letters, digits and _ . + - only (no path separators, no '..')")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = os.path.join(root, f"{stage}_{name}_{stamp}")
    os.makedirs(root, exist_ok=True)
    path, n = base, 1
    while True:
        try:  # mkdir, not a check then a makedirs: another process may take the name in between
            os.mkdir(path)
            return path
        except FileExistsError:
            path, n = f"{base}-{n}", n + 1


@contextmanager
def atomic_path(path: str):
    """Yield a temporary name next to `path`; when the block succeeds, rename it to `path`.

    A reader, or a crash, never sees half a file: `path` is the old one or the whole new one (the
    rename is atomic on one filesystem). Whatever the block wrote to the temporary name, a file or
    a directory, is removed if the block fails or the rename does (for a directory, when `path`
    already exists and is not empty)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.lexists(tmp):
            os.remove(tmp)
        raise


def write_json_atomic(path: str, obj) -> None:
    """`obj` as indented JSON with sorted keys, written through `atomic_path`."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def looks_like_path(source: str) -> bool:
    """Whether `source` names a local path rather than a hub name ('owner/name'): it starts with
    '/', '.' or '~', has more than one '/', or its first component is an existing directory.
    It need not exist: this is how a caller tells a mistyped path from a hub name."""
    return (source.startswith((".", "/", "~")) or source.count("/") > 1
            or ("/" in source and os.path.isdir(source.split("/")[0])))


def read_json(path: str, what: str = "file"):
    if not os.path.isfile(path):
        raise UserError(f"{what} not found: {path}")
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None


def is_interactive() -> bool:
    """Progress bars on a terminal or in a notebook kernel, never in CI."""
    return (sys.stderr.isatty() or "ipykernel" in sys.modules) and not os.environ.get("CI")
