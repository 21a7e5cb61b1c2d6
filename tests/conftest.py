"""Shared test helpers: tiny configs, randomised weights, running the CLIs as subprocesses, and the
quick pipeline run that test_pipeline.py and test_report.py share."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(ROOT, "src")

# Before any parallel op starts torch's thread pool (see common.flush_denormals).
torch.set_flush_denormal(True)
# Two cores: keep torch from oversubscribing them when tests start subprocesses.
torch.set_num_threads(min(2, torch.get_num_threads()))


def randomize_(module: torch.nn.Module, std: float = 0.1, seed: int = 0):
    """Give every parameter (LayerNorms and biases included) random values, so a weight mapped to
    the wrong place cannot go unnoticed the way it can with identity LayerNorms and zero biases."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            noise = torch.randn(p.shape, generator=g) * std
            p.copy_(noise + 1.0 if name.endswith("ln_1.weight") or name.endswith("ln_2.weight")
                    or name.endswith("ln_f.weight") else noise)
    return module


def run_script(script: str, *args, env=None, timeout=600, cwd=None):
    """Run `python src/<script> args...` from the repo root (as the README does); returns the
    CompletedProcess with text stdout/stderr."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="disabled", **(env or {}))
    return subprocess.run(
        [sys.executable, os.path.join(SRC, script), *map(str, args)],
        cwd=cwd or ROOT, env=full_env, capture_output=True, text=True, timeout=timeout,
    )


@pytest.fixture
def tiny_config():
    from configs import ModelConfig
    return ModelConfig(n_layer=2, n_head=4, n_embd=64, block_size=128)


def run_pipeline(out_dir, *args, timeout=600, kind="pipeline"):
    """`python src/pipeline.py --out-dir OUT_DIR --device cpu args...`; returns (run directory, its
    results.json, stdout)."""
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "src", "pipeline.py"), "--out-dir", str(out_dir),
                        "--device", "cpu", *args], capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (run_dir,) = [os.path.join(out_dir, d) for d in os.listdir(out_dir) if d.startswith(kind + "_")]
    with open(os.path.join(run_dir, "results.json")) as f:
        return run_dir, json.load(f), r.stdout


@pytest.fixture(scope="session")
def quick(tmp_path_factory):
    """The quick plan's pipeline run (about 4.5 minutes on 2 cores): made once per test session,
    whichever test file asks first, and only read afterwards."""
    return run_pipeline(tmp_path_factory.mktemp("quick"), "--plan", "quick")
