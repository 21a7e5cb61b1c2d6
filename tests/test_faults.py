"""The fault matrix of benchmarks/fault_matrix.py, sized for CI: each stage (SFT, RM, PPO, evaluation)
SIGKILLed at 2 seeded points and resumed bit-identically, a checkpoint save failing part-way, every
broken checkpoint it reads refused with one line and exit code 2, and run directories never shared.
Runs are forked from this process (no interpreter start-up each): about a minute on 2 cores."""
import os
import random
import shutil
import sys

import pytest
import torch
from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import fault_matrix as fm  # noqa: E402

from checkpoints import load_model, save_model  # noqa: E402
from common import UserError  # noqa: E402
from configs import get_preset  # noqa: E402
from gpt import GPT  # noqa: E402

if not hasattr(os, "fork"):
    pytest.skip("the fault matrix forks its runs", allow_module_level=True)


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # forked children must not use OpenMP's pool (see fm.Runner)
    m = fm.Matrix(str(tmp_path_factory.mktemp("faults")), fm.Runner("fork"), seed=0)
    m.setup_data()
    yield m
    torch.set_num_threads(threads)


@pytest.mark.parametrize("stage", fm.STAGES)
def test_sigkill_then_resume_is_bit_identical(matrix, stage):
    points = fm.kill_points(matrix, stage, 2, seed=0)
    for i, point in enumerate(points):
        assert fm.kill_and_resume(matrix, stage, point, f"kill{i}") is None, f"{stage}, killed at {point}"


# The part of the save that fails, chosen so that a save which is not atomic would leave a checkpoint
# that looks complete and is not (trainer_state.json is what marks a checkpoint complete).
@pytest.mark.parametrize("stage, op, nth", [("sft", "trainer_state", 3), ("rm", "checksums", 4),
                                            ("ppo", "critic", 2), ("eval", "cache line", 7)])
def test_a_save_failing_part_way_leaves_the_previous_checkpoint(matrix, stage, op, nth):
    assert fm.failed_save_then_resume(matrix, stage, op, nth, f"save_{op.replace(' ', '_')}") is None


@pytest.mark.parametrize("fault", ["b", "c", "d", "e", "f"])
@pytest.mark.parametrize("stage", fm.STAGES)
def test_broken_checkpoint_is_one_line_and_exit_2(matrix, stage, fault):
    """Each case must also say what is wrong (Case.expect), not just fail somewhere."""
    cases = [c for c in fm.bad_input_cases(matrix, stage) if c.fault == fault]
    if (stage, fault) == ("eval", "e"):
        assert not cases  # evaluation has no preset
        return
    assert cases
    problems = []
    for i, case in enumerate(cases):
        problem, line = fm.check_case(matrix, stage, case, 0, i)
        if problem:
            problems.append(f"{case.name}: {problem}")
    assert not problems, problems


def test_runs_started_in_the_same_second_never_share_a_directory(matrix):
    for stage in fm.STAGES:
        assert fm.same_second(matrix, stage) is None, stage


def test_no_flipped_bit_of_a_model_file_loads(tmp_path):
    """Wherever a bit flips (header or tensor data), loading fails with a UserError: safetensors alone
    would load most of these as different weights."""
    path = save_model(GPT(get_preset("nano")), str(tmp_path / "good"), "sft", "nano")
    rng = random.Random(0)
    for i in range(12):
        bad = tmp_path / f"bad{i}"
        bad.mkdir()
        shutil.copy(path, bad / "model.safetensors")
        fm.flip_bit(str(bad / "model.safetensors"), rng, "header" if i % 4 == 0 else "data")
        with pytest.raises(UserError, match="corrupt|not a readable|damaged"):
            load_model(str(bad))
    model, _ = load_model(path)
    assert torch.equal(model.lm_head.weight, load_model(path)[0].lm_head.weight)


def test_a_file_without_a_seal_still_loads(tmp_path):
    """Checkpoints written before the seal existed: loaded as they were, unverified."""
    import json

    from safetensors.torch import save_file
    model = GPT(get_preset("nano"))
    meta = {"stage": "sft", "kind": "lm", "preset": "nano", "model_config": model.config.to_dict()}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"),
              metadata={"minchatgpt": json.dumps(meta)})
    loaded, info = load_model(str(tmp_path))
    assert "sha256" not in info and torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_resume_drops_a_torn_metrics_line(tmp_path):
    """A metrics line cut short (a full disk while logging) is dropped on resume, with what came after
    the checkpoint, instead of stopping the resume with a JSON error."""
    import json

    from trainers import MetricsLog
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n" + lines[0][:9])
    MetricsLog(str(tmp_path), True, resume_step=3)
    assert (tmp_path / "metrics.jsonl").read_text() == "\n".join(lines[:3]) + "\n"
