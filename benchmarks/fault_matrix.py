"""Fault matrix: every stage killed, starved of disk and given broken checkpoints.

For SFT, RM, PPO and evaluation (--judge gold and rm:, with its answer cache) the script writes tiny
data (task.write_task_data), runs each stage once uninterrupted on the nano preset as the reference,
then checks:
  kill  SIGKILL at seeded random points (after k metrics / cache lines, in the middle of the k-th
        checkpoint save, or a random delay after a checkpoint), then --resume RUN_DIR (evaluation:
        the same command again). Bit-identical to the reference: every tensor of every final
        model.safetensors (torch.equal) and the metrics.jsonl lines without wall times (evaluation:
        generations.jsonl, judgments.jsonl and the results rows)
  a     a checkpoint save that fails part-way (half a file written, then ENOSPC, raised by
        monkeypatching in this process; evaluation: half an answer-cache line): the run dies, its
        previous checkpoint stays loadable, and --resume continues from it, bit-identical
  b-f   a truncated model.safetensors, a bit-flipped one (tensor data and header; optimizer.pt too),
        a checkpoint of the wrong kind, one of the wrong preset, a run directory with no checkpoint,
        each given where the stage reads one (--resume, -p, -a, -c, -s, --judge rm:): exactly one
        line on stderr ("error: ...", no traceback) and exit code 2
  g     runs started in the same second with the same name (processes racing) never share a directory
and prints a Markdown table stage x fault -> result, then each case. Exit code 1 if any cell failed.

Runs start as fresh interpreters (--launch subprocess, what a user does) or as forks of this one
(--launch fork: same checks, no start-up per run; blocking runs in-process). tests/test_faults.py
runs a smaller matrix through these functions.

Examples:
  OMP_NUM_THREADS=1 python benchmarks/fault_matrix.py                        # 5 kills per stage, ~10 min
  OMP_NUM_THREADS=1 python benchmarks/fault_matrix.py --launch fork --stages sft,eval --kills 3
"""
import argparse
import contextlib
import errno
import glob
import importlib
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional
from unittest import mock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(ROOT, "src")
if SRC not in sys.path:
    sys.path.insert(0, SRC)

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import checkpoints  # noqa: E402
import common  # noqa: E402

SCRIPTS = {"sft": "train_sft.py", "rm": "train_rm.py", "ppo": "train_ppo.py", "eval": "evaluate.py"}
STAGES = list(SCRIPTS)
FAULTS = {
    "kill": "SIGKILL, then resume",
    "a": "(a) save fails part-way",
    "b": "(b) truncated model.safetensors",
    "c": "(c) bit-flipped model.safetensors",
    "d": "(d) checkpoint of the wrong kind",
    "e": "(e) checkpoint of the wrong preset",
    "f": "(f) run dir with no checkpoint",
    "g": "(g) same name, same second",
}
TIMEOUT = 600  # seconds for one run


# -----------------------------------------------------------------------------
# Running a stage's command line


@dataclass
class Outcome:
    rc: int
    stdout: str
    stderr: str

    def last_line(self) -> str:
        lines = self.stderr.strip().splitlines()
        return lines[-1] if lines else f"(exit {self.rc}, nothing on stderr)"


def run_in_process(stage: str, argv: List[str]) -> Outcome:
    """`python src/<script> argv` in this interpreter: run_cli turns a UserError into one line and
    exit 2; any other exception is printed with its traceback and exit 1, as the interpreter would."""
    module = importlib.import_module(SCRIPTS[stage][:-3])
    out, err = io.StringIO(), io.StringIO()
    rc = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            common.run_cli(lambda: module.main([str(a) for a in argv]))
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 1
        except Exception:
            traceback.print_exc()
            rc = 1
    return Outcome(rc, out.getvalue(), err.getvalue())


class Forked:
    """fn() -> exit code in a forked child (this interpreter's imports: no start-up), stdout and
    stderr to /dev/null; polled and killed like a subprocess.Popen."""

    def __init__(self, fn: Callable[[], int]):
        self.returncode = None
        self.pid = os.fork()
        if self.pid == 0:  # the child: never return into the caller (a test runner, this script)
            code = 1
            try:
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, 1)
                os.dup2(null, 2)
                code = fn()
            finally:
                os._exit(code)

    def poll(self) -> Optional[int]:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def kill(self):
        if self.poll() is None:
            os.kill(self.pid, signal.SIGKILL)

    def wait(self) -> int:
        if self.returncode is None:
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode


class Runner:
    """Runs stages as fresh interpreters ('subprocess') or in / forked from this one ('fork')."""

    def __init__(self, launch: str = "subprocess"):
        if launch not in ("subprocess", "fork"):
            raise ValueError(f"unknown launch {launch!r}")
        if launch == "fork" and torch.get_num_threads() != 1:
            # GNU OpenMP is not fork-safe: a child that starts a parallel region after the parent has
            # used its thread pool can hang for good. One thread here keeps in-process runs and
            # forked ones computing the same bits too.
            raise RuntimeError("--launch fork needs one torch thread (torch.set_num_threads(1) or "
                               "OMP_NUM_THREADS=1)")
        self.launch = launch

    def env(self) -> dict:
        # The children compute with as many threads as this process, so that a run in-process and one
        # in a child give the same bits.
        return dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="disabled",
                    OMP_NUM_THREADS=str(torch.get_num_threads()))

    def command(self, stage: str, argv: List[str]) -> List[str]:
        return [sys.executable, os.path.join(SRC, SCRIPTS[stage]), *map(str, argv)]

    def run(self, stage: str, argv: List[str]) -> Outcome:
        if self.launch == "fork":
            return run_in_process(stage, argv)
        r = subprocess.run(self.command(stage, argv), cwd=ROOT, env=self.env(), capture_output=True, text=True,
                           timeout=TIMEOUT)
        return Outcome(r.returncode, r.stdout, r.stderr)

    def start(self, stage: str, argv: List[str]):
        if self.launch == "fork":
            return Forked(lambda: run_in_process(stage, argv).rc)
        return subprocess.Popen(self.command(stage, argv), cwd=ROOT, env=self.env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)


# -----------------------------------------------------------------------------
# Tiny data, tiny runs


def stage_args(stage: str, data: Dict[str, str], refs: Dict[str, str]) -> List[str]:
    """A small run of `stage` (flags of a fresh run, without -n / --out-dir): a few seconds each.
    SFT with dropout, so the RNG state matters; RM and PPO with LoRA; PPO samples, so sampling does."""
    steps = ["--log-every", "1", "--device", "cpu", "--part", "all"]
    if stage == "sft":
        return ["--preset", "nano/dropout", "--data", data["sft"], "--eval-data", data["sft_dev"], "-b", "8",
                "--lr", "2e-3", "--warmup-steps", "2", "--max-steps", "12", "--save-every", "2", "--eval-every", "4",
                *steps]
    if stage == "rm":
        return ["--preset", "nano/lora", "-p", refs["sft"], "--data", data["rm_train"], "--eval-data", data["rm_dev"],
                "-b", "8", "--lr", "1e-3", "--warmup-steps", "2", "--max-steps", "12", "--save-every", "2",
                "--eval-every", "4", *steps]
    if stage == "ppo":
        return ["--preset", "nano/lora", "-a", refs["sft"], "-c", refs["rm"], "--prompts", data["ppo_prompts"],
                "--eval-prompts", data["dev_prompts"], "--eval-judge", "gold", "--rollout-batch-size", "8",
                "--minibatch-size", "4", "--ppo-epochs", "2", "--max-new-tokens", "8", "--max-steps", "8",
                "--save-every", "2", "--eval-every", "4", "--eval-samples", "8", "--actor-lr", "3e-4",
                "--critic-lr", "1e-3", *steps]
    return ["-s", refs["sft"], "-p", refs["ppo"], "--prompts", data["test_prompts"], "--limit", "24",
            "--max-new-tokens", "8", "--batch-size", "4", "--judge", "gold", "--judge", f"rm:{refs['rm']}",
            "--n-boot", "200", "--device", "cpu"]


@dataclass
class Matrix:
    """The work directory, its data, the reference runs and how runs are launched."""

    root: str
    runner: Runner
    seed: int = 0
    data: Dict[str, str] = field(default_factory=dict)
    refs: Dict[str, str] = field(default_factory=dict)  # stage -> reference run directory
    ref_seconds: Dict[str, float] = field(default_factory=dict)

    def setup_data(self):
        import task
        self.data = task.write_task_data(os.path.join(self.root, "data"), seed=self.seed, n_sft=256, n_sft_dev=32,
                                         n_rm_train=256, n_rm_dev=32, n_rm_test=32, n_ppo=64, n_dev=32, n_test=32,
                                         n_test_unseen=8)

    def fresh(self, stage: str, name: str) -> List[str]:
        """The full command line of a new run of `stage` called `name` (its own directory)."""
        out = os.path.join(self.root, "runs", f"{stage}_{name}")
        if stage == "eval":
            return [*stage_args(stage, self.data, self.refs), "--out-dir", os.path.join(out, "eval"),
                    "--cache-dir", os.path.join(out, "cache")]
        return [*stage_args(stage, self.data, self.refs), "-n", name, "--out-dir", out]

    def clear(self, stage: str, argv: List[str]):
        """Remove what an earlier run of `argv` (made by `fresh`) left."""
        out = argv[argv.index("--out-dir") + 1]
        shutil.rmtree(os.path.dirname(out) if stage == "eval" else out, ignore_errors=True)

    def run_dir(self, stage: str, argv: List[str]) -> Optional[str]:
        """Where the run of `argv` (made by `fresh`) writes, once it exists."""
        out = argv[argv.index("--out-dir") + 1]
        if stage == "eval":
            return out
        found = glob.glob(os.path.join(out, f"{stage}_*"))
        return found[0] if len(found) == 1 else None

    def reference(self, stage: str) -> str:
        """The uninterrupted run of `stage` (made once, after the runs it reads)."""
        for before in STAGES[:STAGES.index(stage)]:
            if before not in self.refs:
                self.reference(before)
        if stage not in self.refs:
            argv = self.fresh(stage, "ref")
            t0 = time.time()
            r = self.runner.run(stage, argv)
            if r.rc != 0:
                raise RuntimeError(f"reference {stage} run failed (exit {r.rc}): {r.stderr[-2000:]}")
            self.ref_seconds[stage] = time.time() - t0
            self.refs[stage] = self.run_dir(stage, argv)
        return self.refs[stage]

    def case_dir(self, *parts) -> str:
        path = os.path.join(self.root, "cases", *parts)
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path)
        return path


# -----------------------------------------------------------------------------
# Comparing a run with the reference


def _is_timing(key: str) -> bool:
    """Wall-clock seconds (elapsed_s, gen_s, ...): the one thing a resumed run may log differently."""
    return key.endswith("_s")


def metrics_lines(run_dir: str) -> List[str]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.dumps({k: v for k, v in json.loads(line).items() if not _is_timing(k)}) for line in f]


def model_files(run_dir: str) -> List[str]:
    """The final model.safetensors files of a run (the model; PPO's critic too), relative to final/."""
    final = os.path.join(run_dir, "final")
    return sorted(os.path.relpath(p, final) for p in glob.glob(os.path.join(final, "**", checkpoints.MODEL_FILE),
                                                                recursive=True))


def compare_training(ref: str, run: str) -> Optional[str]:
    """None if `run` ended exactly as `ref` did (weights and metrics), else what differs."""
    files = model_files(ref)
    if model_files(run) != files:
        return f"final models {model_files(run)} vs {files} in the reference"
    for rel in files:
        want, got = load_file(os.path.join(ref, "final", rel)), load_file(os.path.join(run, "final", rel))
        if want.keys() != got.keys():
            return f"{rel}: other tensor names"
        for k in want:
            if want[k].dtype != got[k].dtype or not torch.equal(want[k], got[k]):
                return f"{rel}: tensor {k} differs"
    want, got = metrics_lines(ref), metrics_lines(run)
    for i, (a, b) in enumerate(zip(want, got)):
        if a != b:
            return f"metrics line {i + 1} differs: {b[:120]} vs {a[:120]}"
    if len(want) != len(got):
        return f"{len(got)} metrics lines vs {len(want)}"
    return None


def compare_eval(ref: str, run: str) -> Optional[str]:
    for name in ("generations.jsonl", "judgments.jsonl"):
        a, b = (os.path.join(d, name) for d in (ref, run))
        if not os.path.exists(b):
            return f"no {name}"
        if open(a, "rb").read() != open(b, "rb").read():
            return f"{name} differs"
    want, got = (json.load(open(os.path.join(d, "results.json")))["results"] for d in (ref, run))
    return None if json.dumps(want) == json.dumps(got) else "results.json rows differ"


def compare(stage: str, ref: str, run: str) -> Optional[str]:
    return compare_eval(ref, run) if stage == "eval" else compare_training(ref, run)


def resume_argv(stage: str, argv: List[str], run_dir: str) -> List[str]:
    """How an interrupted run continues: --resume RUN_DIR; an evaluation reruns its command."""
    return argv if stage == "eval" else ["--resume", run_dir]


# -----------------------------------------------------------------------------
# SIGKILL at seeded random points


@dataclass
class KillPoint:
    """Kill once `trigger` has happened `k` times, `delay` seconds later. Triggers: 'lines' (metrics
    lines; for evaluation answer-cache lines), 'saving' (the k-th checkpoint save has begun),
    'saved' (k checkpoints complete)."""

    trigger: str
    k: int
    delay: float

    def __str__(self):
        return f"{self.trigger} {self.k} + {self.delay * 1000:.0f} ms"


def save_steps(run_dir: str) -> List[int]:
    """The steps at which a run of this config writes resumable checkpoints."""
    train = json.load(open(os.path.join(run_dir, "config.json")))["train"]
    return list(range(train["save_every"], train["max_steps"], train["save_every"]))


def cache_lines(path: str) -> int:
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n")
    except FileNotFoundError:
        return 0


def kill_points(m: Matrix, stage: str, n: int, seed: int) -> List[KillPoint]:
    """n kill points drawn from a RNG seeded by (seed, stage), each after the first complete
    checkpoint (before it there is nothing to resume) and before the run's end."""
    rng = random.Random(f"kill-{seed}-{stage}")
    ref = m.reference(stage)
    points = []
    if stage == "eval":
        total = cache_lines(os.path.join(os.path.dirname(ref), "cache", "generations.jsonl"))
        for _ in range(n):
            points.append(KillPoint("lines", rng.randrange(1, total), rng.uniform(0, 0.05)))
        return points
    steps = save_steps(ref)
    with open(os.path.join(ref, "metrics.jsonl")) as f:
        line_steps = [json.loads(line)["step"] for line in f]
    first = next(i for i, s in enumerate(line_steps) if s > steps[0])  # logged after the first save
    per_step = m.ref_seconds[stage] / max(1, line_steps[-1]) / 4
    for i in range(n):
        trigger = ("lines", "saving", "saved")[i % 3] if i < 3 else rng.choice(("lines", "saving", "saved"))
        if trigger == "lines":
            k = rng.randrange(first + 1, len(line_steps) - 1)  # the last two lines: too close to the end
            points.append(KillPoint("lines", k, rng.uniform(0, per_step)))
        elif trigger == "saving":  # the second save or later: an earlier checkpoint is complete
            points.append(KillPoint("saving", rng.randrange(2, len(steps) + 1), rng.uniform(0, 0.01)))
        else:
            points.append(KillPoint("saved", rng.randrange(1, len(steps) + 1), rng.uniform(0, per_step)))
    return points


def _triggered(point: KillPoint, stage: str, argv: List[str], m: Matrix, steps: List[int]) -> bool:
    run = m.run_dir(stage, argv)
    if run is None:
        return False
    if stage == "eval":
        return cache_lines(os.path.join(os.path.dirname(run), "cache", "generations.jsonl")) >= point.k
    if point.trigger == "lines":
        return cache_lines(os.path.join(run, "metrics.jsonl")) >= point.k
    step = steps[point.k - 1]
    ckpts = os.path.join(run, "checkpoints")
    if point.trigger == "saving":
        return os.path.exists(os.path.join(ckpts, f".tmp_step_{step:06d}")) or \
            os.path.exists(os.path.join(ckpts, f"step_{step:06d}"))
    return os.path.exists(os.path.join(ckpts, f"step_{step:06d}"))


def kill_and_resume(m: Matrix, stage: str, point: KillPoint, name: str) -> Optional[str]:
    """Start a fresh run, SIGKILL it at `point`, continue it; None if it then ends as the reference."""
    ref = m.reference(stage)
    steps = [] if stage == "eval" else save_steps(ref)
    argv = m.fresh(stage, name)
    m.clear(stage, argv)
    proc = m.runner.start(stage, argv)
    try:
        deadline = time.time() + TIMEOUT
        while proc.poll() is None and not _triggered(point, stage, argv, m, steps):
            if time.time() > deadline:
                return "timed out before the kill point"
            time.sleep(0.002)
        time.sleep(point.delay)
        finished = proc.poll() is not None
    finally:  # never leave the run behind
        proc.kill()
        proc.wait()
    run = m.run_dir(stage, argv)
    if run is None:
        return "the run made no directory before it was killed"
    r = m.runner.run(stage, resume_argv(stage, argv, run))
    if r.rc != 0:
        return f"{'resume' if stage != 'eval' else 'rerun'} failed (exit {r.rc}): {r.last_line()}"
    diff = compare(stage, ref, run)
    if diff:
        return diff
    return "ok (ran to its end before the kill)" if finished else None


# -----------------------------------------------------------------------------
# (a) a save that fails part-way, in this process


def _enospc(path):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


SAVE_OPS = ("model", "critic", "optimizer", "trainer_state", "checksums", "rename")


@contextlib.contextmanager
def failing_save(op: str, nth: int):
    """The `nth` resumable checkpoint save of a Trainer fails part-way through `op`: half the bytes of
    a file are written, then ENOSPC ('model' / 'critic': a model.safetensors; 'optimizer':
    optimizer.pt; 'trainer_state' / 'checksums': a JSON file), or the final rename fails ('rename')."""
    import safetensors.torch
    import trainers
    real_save, real_save_file, real_torch_save = (trainers.save_training_checkpoint, checkpoints.save_file,
                                                  torch.save)
    real_dump, real_replace = json.dump, os.replace
    calls = [0]

    def save_file(tensors, filename, metadata=None):
        critic = os.sep + "critic" + os.sep in filename
        if op == "model" and not critic or op == "critic" and critic:
            data = safetensors.torch.save(tensors, metadata=metadata)
            with open(filename, "wb") as f:
                f.write(data[:len(data) // 2])
            _enospc(filename)
        return real_save_file(tensors, filename, metadata=metadata)

    def torch_save(obj, path, *args, **kwargs):
        buf = io.BytesIO()
        real_torch_save(obj, buf, *args, **kwargs)
        with open(path, "wb") as f:
            f.write(buf.getvalue()[:len(buf.getvalue()) // 2])
        _enospc(path)

    def dump(obj, fp, *args, **kwargs):
        if os.path.basename(getattr(fp, "name", "")).startswith(op):
            text = json.dumps(obj, *args, **kwargs)
            fp.write(text[:len(text) // 2])
            _enospc(fp.name)
        return real_dump(obj, fp, *args, **kwargs)

    def replace(src, dst):
        if os.path.basename(str(src)).startswith(".tmp_step_"):
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(dst))
        return real_replace(src, dst)

    def save(*args, **kwargs):
        calls[0] += 1
        if calls[0] != nth:
            return real_save(*args, **kwargs)
        with contextlib.ExitStack() as stack:
            if op in ("model", "critic"):
                stack.enter_context(mock.patch.object(checkpoints, "save_file", save_file))
            elif op == "optimizer":
                stack.enter_context(mock.patch.object(torch, "save", torch_save))
            elif op in ("trainer_state", "checksums"):
                stack.enter_context(mock.patch.object(json, "dump", dump))
            elif op == "rename":
                stack.enter_context(mock.patch.object(os, "replace", replace))
            else:
                raise ValueError(f"unknown save op {op!r}")
            return real_save(*args, **kwargs)

    with mock.patch.object(trainers, "save_training_checkpoint", save):
        yield


@contextlib.contextmanager
def failing_cache_write(nth: int):
    """The `nth` answer-cache line of an evaluation is written half, then ENOSPC."""
    import evaluate
    real_put, calls = evaluate.JsonlCache.put, [0]

    def put(self, key, value):
        calls[0] += 1
        if calls[0] == nth and self.path:
            line = json.dumps({"key": key, **value}) + "\n"
            with open(self.path, "a") as f:
                f.write(line[:len(line) // 2])
            _enospc(self.path)
        return real_put(self, key, value)

    with mock.patch.object(evaluate.JsonlCache, "put", put):
        yield


def failed_save_then_resume(m: Matrix, stage: str, op: str, nth: int, name: str) -> Optional[str]:
    """Run `stage` in this process with its `nth` save failing in `op`; it must die, leave the checkpoint
    before it as the newest and loadable, and --resume must end as the reference did."""
    ref = m.reference(stage)
    argv = m.fresh(stage, name)
    m.clear(stage, argv)
    with failing_cache_write(nth) if stage == "eval" else failing_save(op, nth):
        r = run_in_process(stage, argv)
    if r.rc == 0:
        return "the run did not fail: the fault was never hit"
    if "No space left" not in r.stderr and "Input/output error" not in r.stderr:
        return f"failed, but not from the injected fault: {r.last_line()}"
    run = m.run_dir(stage, argv)
    if stage != "eval":
        newest, want = checkpoints.latest_checkpoint(run), save_steps(ref)[nth - 2]
        if newest is None or os.path.basename(newest) != f"step_{want:06d}":
            return f"newest checkpoint after the failed save is {newest}, expected step_{want:06d}"
        try:
            checkpoints.load_model(newest)
        except common.UserError as e:
            return f"the previous checkpoint does not load: {e}"
    r = m.runner.run(stage, resume_argv(stage, argv, run))
    if r.rc != 0:
        return f"resume failed (exit {r.rc}): {r.last_line()}"
    return compare(stage, ref, run)


# -----------------------------------------------------------------------------
# (b)-(f) broken inputs: one line on stderr, exit code 2


def one_line_exit_2(r: Outcome) -> Optional[str]:
    lines = r.stderr.strip().splitlines()
    if "Traceback" in r.stderr:
        return f"traceback (exit {r.rc}): {r.last_line()[:200]}"
    if r.rc != 2:
        return f"exit {r.rc}: {r.last_line()[:200]}"
    if len(lines) != 1 or not lines[0].startswith("error: "):
        return f"{len(lines)} lines on stderr: {' | '.join(lines)[:200]}"
    return None


def copy_run(src: str, dst: str, final: bool = False) -> str:
    """A copy of run `src` (its config, metrics and checkpoints; final/ only if asked): what a
    killed run leaves, safe to resume or damage without touching the reference."""
    os.makedirs(dst, exist_ok=True)
    for name in ("config.json", "metrics.jsonl"):
        shutil.copy(os.path.join(src, name), dst)
    for sub in ("checkpoints",) + (("final",) if final else ()):
        if os.path.isdir(os.path.join(src, sub)):
            shutil.copytree(os.path.join(src, sub), os.path.join(dst, sub))
    return dst


def model_copy(src_run: str, dst: str) -> str:
    """dst/final/model.safetensors (+ its config) from run `src_run`'s final model: a run dir to damage."""
    os.makedirs(os.path.join(dst, "final"), exist_ok=True)
    for name in ("config.json", "metrics.jsonl"):
        shutil.copy(os.path.join(src_run, name), dst)
    shutil.copy(os.path.join(src_run, "final", checkpoints.MODEL_FILE), os.path.join(dst, "final"))
    return dst


def truncate(path: str, rng: random.Random):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:rng.randrange(1, len(data))])


def flip_bit(path: str, rng: random.Random, where: str = "data") -> int:
    """Flip one random bit of a safetensors file's tensor data ('data') or JSON header ('header'), or
    of any file anywhere ('raw'); returns the byte's offset."""
    data = bytearray(open(path, "rb").read())
    if where == "raw":
        lo, hi = 0, len(data)
    else:
        header_end = 8 + int.from_bytes(data[:8], "little")
        lo, hi = (header_end, len(data)) if where == "data" else (8, header_end)
    pos = rng.randrange(lo, hi)
    data[pos] ^= 1 << rng.randrange(8)
    with open(path, "wb") as f:
        f.write(bytes(data))
    return pos


def newest_model(run: str, name: str = "model") -> str:
    ckpt = checkpoints.latest_checkpoint(run)
    return os.path.join(ckpt, *([] if name == "model" else [name]), checkpoints.MODEL_FILE)


def other_preset_model(kind: str, stage: str, preset: str, path: str):
    """A random `kind` model of `preset` saved as `stage` at `path` (a model.safetensors)."""
    from configs import get_preset
    model = checkpoints.KINDS[kind](get_preset(preset))
    checkpoints.save_model(model, os.path.dirname(path), stage, preset)


def mislabelled_model(src: str, dst_dir: str, preset: str):
    """src's tensors under metadata that claims another preset's config (sealed, as a buggy or foreign
    writer would leave it): the file's own config does not fit its tensors."""
    from safetensors import safe_open

    from configs import get_preset
    with safe_open(src, "pt") as f:
        meta = json.loads(f.metadata()["minchatgpt"])
    meta.update(preset=preset, model_config=get_preset(preset).to_dict())
    os.makedirs(dst_dir, exist_ok=True)
    checkpoints.save_weights(load_file(src), os.path.join(dst_dir, checkpoints.MODEL_FILE), meta)
    return dst_dir


@dataclass
class Case:
    """One broken input: `make(dir, rng)` builds it and returns the stage's command line; the one
    line on stderr must match the regular expression `expect` (it says what is wrong)."""

    fault: str
    name: str
    make: Callable[[str, random.Random], List[str]]
    expect: str


# What the one line must say, by what was broken.
DAMAGED = "not a readable|is corrupt|is damaged"
NO_MODEL = "no complete checkpoint|holds no model yet|not found"


def bad_input_cases(m: Matrix, stage: str) -> List[Case]:
    """The (b)-(f) cases of `stage`: each damages a copy of a reference run (never the reference) and
    gives it where the stage reads a checkpoint: --resume, and -p / -a / -c / -s / --judge rm:."""
    for s in {"sft": ["sft", "rm"], "rm": ["rm"], "ppo": ["ppo"], "eval": ["ppo"]}[stage]:
        m.reference(s)  # and the runs it reads
    refs, cases = m.refs, []

    def add(fault, name, make, expect):
        cases.append(Case(fault, name, make, expect))

    def fresh(out: str, **replace) -> List[str]:
        """A fresh run of `stage` in `out` with flags replaced or added, e.g. fresh(out, p=dir): -p dir."""
        args = stage_args(stage, m.data, refs)
        for flag, value in replace.items():
            flag = ("--" if len(flag) > 1 else "-") + flag
            if flag in args:
                args[args.index(flag) + 1] = value
            else:
                args += [flag, value]
        if stage == "eval":
            return [*args, "--out-dir", os.path.join(out, "eval"), "--cache-dir", os.path.join(out, "cache")]
        return [*args, "-n", "bad", "--out-dir", os.path.join(out, "runs")]

    def with_input(flag: str, value: str, out: str, **replace) -> List[str]:
        """A fresh run reading `value` through `flag` ('judge': the rm: judge; gold stays)."""
        if flag != "judge":
            return fresh(out, **{flag: value}, **replace)
        return [f"rm:{value}" if a == f"rm:{refs['rm']}" else a for a in fresh(out, **replace)]

    def given(flag, src_stage, damage):
        """A fresh run reading, through `flag`, a copy of reference `src_stage` damaged by damage(run, rng)."""
        def make(d, rng):
            run = model_copy(refs[src_stage], os.path.join(d, "input"))
            damage(run, rng)
            return with_input(flag, run, d)
        return make

    def resumed(damage, run_of=stage):
        """--resume a copy of the reference run of `run_of`, damaged by damage(run, rng)."""
        def make(d, rng):
            run = copy_run(refs[run_of], os.path.join(d, "run"))
            damage(run, rng)
            return ["--resume", run]
        return make

    def empty_run(src, d):
        """What a run killed before its first save leaves: config.json, metrics.jsonl."""
        run = os.path.join(d, "empty_run")
        os.makedirs(run)
        for name in ("config.json", "metrics.jsonl"):
            shutil.copy(os.path.join(src, name), run)
        return run

    def final(run):
        return os.path.join(run, "final", checkpoints.MODEL_FILE)

    # Where the stage reads a checkpoint given on its command line: (flag, the stage of the run it reads).
    inputs = {"sft": [("p", "sft")], "rm": [("p", "sft")], "ppo": [("a", "sft"), ("c", "rm")],
              "eval": [("s", "sft"), ("p", "ppo"), ("judge", "rm")]}[stage]
    labels = {flag: f"-{flag}" if len(flag) == 1 else f"--{flag} rm:" for flag, _ in inputs}
    first_flag, first_src = inputs[0]

    # (b) truncated, (c) bit-flipped: the newest checkpoint of a run to resume, and every input
    if stage != "eval":
        for name in ["model", "critic"] if stage == "ppo" else ["model"]:
            add("b", f"--resume, {name} file truncated",
                resumed(lambda run, rng, n=name: truncate(newest_model(run, n), rng)), "not a readable")
            add("c", f"--resume, {name} file: bit in tensor data",
                resumed(lambda run, rng, n=name: flip_bit(newest_model(run, n), rng, "data")), "is corrupt")
        add("c", "--resume, model file: bit in header",
            resumed(lambda run, rng: flip_bit(newest_model(run), rng, "header")), DAMAGED)
        add("c", "--resume, optimizer.pt: any bit", resumed(lambda run, rng: flip_bit(
            os.path.join(checkpoints.latest_checkpoint(run), "optimizer.pt"), rng, "raw")), "optimizer.pt is corrupt")
    for flag, src in inputs:
        add("b", f"{labels[flag]} {src} run, truncated",
            given(flag, src, lambda run, rng: truncate(final(run), rng)), "not a readable")
        add("c", f"{labels[flag]} {src} run, bit in tensor data",
            given(flag, src, lambda run, rng: flip_bit(final(run), rng)), "is corrupt")
    add("c", f"{labels[first_flag]} {first_src} run, bit in header",
        given(first_flag, first_src, lambda run, rng: flip_bit(final(run), rng, "header")), DAMAGED)

    # (d) wrong kind: another stage's run or model where this stage expects its own
    if stage != "eval":
        other = "rm" if stage == "sft" else "sft"
        add("d", f"--resume an {other} run", resumed(lambda run, rng: None, run_of=other), "made by another script")

        def swap_kind(run, rng, other=other):
            shutil.copy(final(refs[other]), newest_model(run))
        add("d", f"--resume, newest checkpoint holds the {other} model", resumed(swap_kind),
            f"is a {other} checkpoint")
    if stage == "ppo":
        add("d", "-a an rm run", lambda d, rng: fresh(d, a=refs["rm"]), "needs an SFT run")
        add("d", "-c an sft run", lambda d, rng: fresh(d, c=refs["sft"]), "expected a rm checkpoint")
    if stage == "eval":
        add("d", "-s an rm run", lambda d, rng: with_input("s", refs["rm"], d), "holds a rm model")
        add("d", "--judge rm: an sft run", lambda d, rng: with_input("judge", refs["sft"], d), "expected a rm")

    # (e) wrong preset: a nano checkpoint where the preset is tiny, a tiny one in a nano run, a file
    # whose recorded config is not that of its tensors. Evaluation has no preset: it loads any model.
    if stage != "eval":
        add("e", f"{labels[first_flag]} a nano {first_src} run, --preset tiny",
            lambda d, rng: with_input(first_flag, refs[first_src], d, preset="tiny"), "does not fit the preset")
        kind, lora = {"sft": ("lm", ""), "rm": ("rm", "/lora"), "ppo": ("lm", "/lora")}[stage]
        add("e", f"--resume, newest checkpoint holds a tiny{lora} model", resumed(
            lambda run, rng: other_preset_model(kind, stage, "tiny" + lora, newest_model(run))),
            "does not fit the run's model")
        add("e", f"{labels[first_flag]} a file whose config is tiny, its tensors nano", lambda d, rng: with_input(
            first_flag, mislabelled_model(final(refs[first_src]), os.path.join(d, "x"), "tiny"), d),
            "does not match its own config")

    # (f) no checkpoint
    if stage != "eval":
        add("f", "--resume a run with no checkpoint", lambda d, rng: ["--resume", empty_run(refs[stage], d)],
            "no complete checkpoint")
        add("f", "--resume an empty directory", lambda d, rng: ["--resume", d], "run config .* not found")
    for flag, src in inputs:
        add("f", f"{labels[flag]} a {src} run with no checkpoint",
            lambda d, rng, flag=flag, src=src: with_input(flag, empty_run(refs[src], d), d), "holds no model yet")
    return cases


def check_case(m: Matrix, stage: str, case: Case, seed: int, index: int):
    """-> (None or what is wrong, the last stderr line) of one broken-input case."""
    d = m.case_dir(stage, f"{case.fault}{index}")
    argv = case.make(d, random.Random(f"case-{seed}-{stage}-{case.fault}-{index}"))
    r = m.runner.run(stage, argv)
    problem = one_line_exit_2(r)
    if problem is None and not re.search(case.expect, r.last_line()):
        problem = f"exit 2, one line, but it does not say /{case.expect}/: {r.last_line()[:200]}"
    shutil.rmtree(d, ignore_errors=True)
    return problem, r.last_line()


# -----------------------------------------------------------------------------
# (g) runs that start in the same second


def _make_dir_child(stage: str, root: str, lost_race: bool, barrier_path: str, out_path: str) -> int:
    """In a forked child: wait for the start signal, then make_run_dir (with os.path.exists always
    False when `lost_race`: another process takes the name between a check and a mkdir)."""
    while not os.path.exists(barrier_path):
        time.sleep(0.0005)
    with contextlib.ExitStack() as stack:
        if lost_race:
            stack.enter_context(mock.patch.object(os.path, "exists", lambda p: False))
        try:
            path = common.make_run_dir(stage, "same", root)
        except Exception as e:  # reported, not raised: the parent reads it
            path = f"FAILED {type(e).__name__}: {e}"
    with open(out_path, "w") as f:
        f.write(path)
    return 0


def same_second(m: Matrix, stage: str, n: int = 6) -> Optional[str]:
    """n processes start the same `stage` run name in the same second (time.strftime fixed), half of
    them having lost the race between checking a name and taking it; all must get their own directory."""
    d = m.case_dir(stage, "g")
    root, barrier = os.path.join(d, "runs"), os.path.join(d, "go")
    with mock.patch.object(time, "strftime", lambda fmt, *a: "20260101-120000"):
        procs = [Forked(lambda i=i: _make_dir_child(stage, root, i % 2 == 1, barrier, os.path.join(d, f"out{i}")))
                 for i in range(n)]
    open(barrier, "w").close()
    for p in procs:
        p.wait()
    paths = [open(os.path.join(d, f"out{i}")).read() if os.path.exists(os.path.join(d, f"out{i}")) else "FAILED"
             for i in range(n)]
    failed = [p for p in paths if p.startswith("FAILED")]
    if failed:
        return f"{len(failed)}/{n} failed: {failed[0]}"
    if len(set(paths)) != n:
        return f"{n - len(set(paths))} of {n} shared a directory"
    if not all(os.path.isdir(p) for p in paths):
        return "a returned directory does not exist"
    shutil.rmtree(d, ignore_errors=True)
    return None


# -----------------------------------------------------------------------------
# The matrix


@dataclass
class Cell:
    passed: int = 0
    total: int = 0
    failures: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    def add(self, label: str, problem: Optional[str], note: str = ""):
        self.total += 1
        if problem and not problem.startswith("ok"):
            self.failures.append(f"{label}: {problem}")
        else:
            self.passed += 1
        self.notes.append(f"{label}: {problem or 'ok'}{' -> ' + note if note else ''}")

    def text(self, ok: str, none: str = "n/a") -> str:
        if self.failures:
            return f"FAILED ({self.passed}/{self.total}): {self.failures[0]}"
        return f"{ok} ({self.passed}/{self.total})" if self.total else none


def run_matrix(m: Matrix, stages: List[str], kills: int, seed: int, log=print) -> Dict[str, Dict[str, Cell]]:
    cells: Dict[str, Dict[str, Cell]] = {}
    for stage in stages:
        row = cells[stage] = {f: Cell() for f in FAULTS}
        t0 = time.time()
        m.reference(stage)
        log(f"{stage}: reference run in {m.ref_seconds[stage]:.1f}s")
        for i, point in enumerate(kill_points(m, stage, kills, seed)):
            row["kill"].add(str(point), kill_and_resume(m, stage, point, f"kill{i}"))
        rng = random.Random(f"save-{seed}-{stage}")
        ops = [op for op in SAVE_OPS if op != "critic" or stage == "ppo"]
        for i in range(1 if stage == "eval" else 2):
            if stage == "eval":
                nth, op = rng.randrange(2, 24), "cache line"
            else:
                nth, op = rng.randrange(2, len(save_steps(m.refs[stage])) + 1), ops[rng.randrange(len(ops))]
            row["a"].add(f"save {nth}, {op}", failed_save_then_resume(m, stage, op, nth, f"save{i}"))
        for i, case in enumerate(bad_input_cases(m, stage)):
            problem, line = check_case(m, stage, case, seed, i)
            row[case.fault].add(case.name, problem, line)
        row["g"].add("6 processes, 3 of them losing the check-then-mkdir race", same_second(m, stage))
        log(f"{stage}: done in {time.time() - t0:.0f}s")
    return cells


# What a passing cell says, by fault or (stage, fault); the text of an empty cell.
OK_TEXT = {"kill": "bit-identical", "a": "previous checkpoint used, bit-identical", "g": "distinct directories",
           ("eval", "a"): "torn cache line skipped, bit-identical"}
NA_TEXT = {("eval", "e"): "n/a (no preset: any model loads)"}


def markdown(cells: Dict[str, Dict[str, Cell]]) -> str:
    lines = ["| stage | " + " | ".join(FAULTS.values()) + " |", "|---" * (len(FAULTS) + 1) + "|"]
    for stage, row in cells.items():
        texts = [row[f].text(OK_TEXT.get((stage, f), OK_TEXT.get(f, "exit 2, one line")),
                             NA_TEXT.get((stage, f), "n/a")) for f in FAULTS]
        lines.append(f"| {stage} | " + " | ".join(texts) + " |")
    return "\n".join(lines)


def details(cells: Dict[str, Dict[str, Cell]]) -> str:
    out = []
    for stage, row in cells.items():
        for f, cell in row.items():
            out += [f"- {stage} {f}: {note}" for note in cell.notes]
    return "\n".join(out)


def main(argv=None) -> int:
    first, _, rest = __doc__.strip().partition("\n")
    ap = argparse.ArgumentParser(description=first, epilog=rest, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", default=",".join(STAGES), help="comma-separated, of " + ", ".join(STAGES))
    ap.add_argument("--kills", type=int, default=5, help="SIGKILL points per stage (default 5)")
    ap.add_argument("--seed", type=int, default=0, help="seeds the data and every random point (default 0)")
    ap.add_argument("--launch", default="subprocess", choices=("subprocess", "fork"),
                    help="runs as fresh interpreters (default) or forked from this one (faster)")
    ap.add_argument("--work-dir", default=None, help="keep the runs here (default: a temporary directory, removed)")
    args = ap.parse_args(argv)
    stages = args.stages.split(",")
    if not set(stages) <= set(STAGES) or args.kills < 1:
        ap.error(f"--stages must name some of {', '.join(STAGES)}, and --kills must be >= 1")
    stages = [s for s in STAGES if s in stages]
    common.flush_denormals()
    if args.launch == "fork":
        torch.set_num_threads(1)
    root = args.work_dir or tempfile.mkdtemp(prefix="fault_matrix_")
    try:
        m = Matrix(root, Runner(args.launch), args.seed)
        m.setup_data()
        for s in STAGES[:STAGES.index(stages[-1])]:  # the runs later stages read
            m.reference(s)
        t0 = time.time()
        cells = run_matrix(m, stages, args.kills, args.seed, log=lambda *a: print(*a, file=sys.stderr, flush=True))
    finally:
        if not args.work_dir:
            shutil.rmtree(root, ignore_errors=True)
    print(f"Command: `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '?')} python benchmarks/fault_matrix.py "
          f"{' '.join(argv if argv is not None else sys.argv[1:])}` ({time.time() - t0:.0f} s, "
          f"--launch {args.launch}, torch {torch.__version__})\n")
    print(markdown(cells))
    print("\nCases:\n" + details(cells))
    return 1 if any(c.failures for row in cells.values() for c in row.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
