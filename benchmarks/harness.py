"""What every benchmark process shares: the CPU settings, timing, statistics, machine facts.

Import this first, before anything else touches torch: `torch.set_flush_denormal(True)` is a
per-thread setting inherited only by threads created later, so it must run before torch starts
its thread pool (see src/common.py flush_denormals). Every process of the benchmark, ours and the
references alike (the TRL processes too), sets it the same way.
"""
import json
import os
import platform
import statistics
import sys
import time

import torch

torch.set_flush_denormal(True)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SRC = os.path.join(ROOT, "src")


def use_src():
    """Make the project's flat modules importable (`from gpt import GPT`), as pytest does."""
    if SRC not in sys.path:
        sys.path.insert(0, SRC)


def seconds(fn, sync=None) -> float:
    """Wall time of one call of fn()."""
    if sync:
        sync()
    t = time.perf_counter()
    fn()
    if sync:
        sync()
    return time.perf_counter() - t


def summary(values) -> dict:
    """Median and spread (min, max) of repeated measurements."""
    values = list(values)
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values),
            "values": values}


def compare(ours_fn, theirs_fn, work: float, repeats: int, warmup: int = 1) -> dict:
    """Throughput of two functions doing the same `work` (tokens, completions...) per call.

    Calls alternate (ours, theirs, ours, theirs, ...) so that a slow spell of the machine hits
    both sides; the ratio is taken per pair and its median and spread are reported.
    """
    for _ in range(warmup):
        ours_fn()
        theirs_fn()
    ours, theirs, ratios = [], [], []
    for _ in range(repeats):
        a = work / seconds(ours_fn)
        b = work / seconds(theirs_fn)
        ours.append(a)
        theirs.append(b)
        ratios.append(a / b)
    return {"ours": summary(ours), "theirs": summary(theirs), "ratio": summary(ratios)}


def train_step(model, loss_fn, autocast):
    """One SFT step as both sides of a training benchmark run it: forward under `autocast()`,
    backward, clip to norm 1, fused AdamW (transformers' Trainer default), zero grad."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, fused=True)

    def step():
        with autocast():
            loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> dict:
    """GFLOP/s of an n x n x n matmul in `dtype` on this machine: the roof for the training figures."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    a @ b
    rates = [2 * n ** 3 / seconds(lambda: a @ b) / 1e9 for _ in range(repeats)]
    return summary(rates)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    import transformers
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "os": platform.platform(),
        "flush_denormal": True,
    }


def load_average() -> list:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def print_json(obj):
    """The last line a benchmark subprocess prints: its result, for the parent to parse."""
    print("RESULT " + json.dumps(obj), flush=True)


def parse_result(stdout: str) -> dict:
    for line in reversed(stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError("benchmark subprocess printed no RESULT line:\n" + stdout[-3000:])
