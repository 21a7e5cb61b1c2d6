"""The memory plan (src/memory.py): its parts follow from the parameter counts, its peak is within
20% of what the stage really takes on this CPU, and it says what fits a 16 GB card."""
import re

import pytest
from conftest import run_script

import memory
from configs import get_preset
from gpt import GPT

GiB = 1024 ** 3


def test_weights_gradients_and_optimizer_follow_the_parameter_counts():
    full = memory.plan(memory.Shape("mini", "sft", 8, 256))
    n = sum(p.numel() for p in GPT(get_preset("mini", pretrained=None)).parameters())
    assert full["weights"] == 4 * n and full["gradients"] == 4 * n and full["optimizer"] == 8 * n
    lora = memory.plan(memory.Shape("mini/lora", "sft", 8, 256))
    adapters = lora["gradients"] // 4  # LoRA trains its adapters only: the weights gain exactly those
    assert lora["weights"] == full["weights"] + 4 * adapters and lora["optimizer"] < full["optimizer"] / 20
    ppo_full = memory.plan(memory.Shape("mini", "ppo", 8, 192, max_new_tokens=64))
    ppo_lora = memory.plan(memory.Shape("mini/lora", "ppo", 8, 192, max_new_tokens=64))
    assert ppo_full["weights"] - ppo_lora["weights"] == pytest.approx(4 * n, rel=0.05)  # the reference copy, less the adapters
    ckpt = memory.plan(memory.Shape("mini", "sft", 8, 256, checkpointing=True))
    assert ckpt["activations"] < full["activations"] / 2
    half = memory.plan(memory.Shape("mini", "sft", 8, 256, precision="bf16"))
    assert half["activations"] < full["activations"] and half["autocast copies"] > 0


# Each stage, full and LoRA, fp32 and bf16, with and without checkpointing: estimate vs measured peak.
MEASURED = ["tiny sft -b 8 --seq-len 256 --precision fp32",
            "mini sft -b 8 --seq-len 512 --precision fp32 --grad-checkpointing",
            "mini rm -b 4 --seq-len 512 --precision fp32",
            "mini/lora dpo -b 4 --seq-len 256 --precision bf16",
            "mini/lora ppo -b 16 --minibatch-size 8 --seq-len 192 --max-new-tokens 64 --precision fp32"]


@pytest.mark.parametrize("args", MEASURED)
def test_the_estimate_is_within_20_percent_of_the_measured_cpu_peak(args):
    r = run_script("memory.py", *args.split(), "--measure", timeout=300)
    assert r.returncode == 0, r.stderr
    ratio = float(re.search(r"estimate / measured = ([0-9.]+)", r.stdout).group(1))
    assert 0.8 <= ratio <= 1.2, r.stdout


def test_what_fits_a_16gb_card_and_the_suggestion_fits_too():
    """gpt2-medium SFT at batch 16 x 1024 in fp16 does not fit a T4: the suggested micro-batch (a
    divisor of 16, gradient accumulation keeping the global batch) fits and the next larger divisor
    does not. The README's gpt2-medium commands fit as the README gives them for a T4."""
    budget = 16 * GiB - 1 * GiB
    shape = memory.Shape("gpt2-medium", "sft", 16, 1024, precision="fp16")
    assert memory.plan(shape)["total"] > budget
    b = memory.largest_fitting_batch(shape, budget)
    assert b == 8
    assert memory.plan(memory.Shape("gpt2-medium", "sft", b, 1024, precision="fp16"))["total"] <= budget
    out = memory.report(shape, 16 * GiB, 1 * GiB)
    assert "does NOT fit" in out and "-b 8 --grad-accum 2" in out
    for readme in (memory.Shape("gpt2-medium", "sft", 8, 1024, precision="fp16"),
                   memory.Shape("gpt2-medium/lora", "rm", 4, 1024, precision="fp16"),  # the README's T4 setting
                   memory.Shape("gpt2-medium/lora", "ppo", 32, 1024, precision="fp16", minibatch_size=8)):
        assert memory.report(readme, 16 * GiB, 1 * GiB).splitlines()[-1].startswith("fits 16 GiB"), readme
    rm_b8 = memory.report(memory.Shape("gpt2-medium/lora", "rm", 8, 1024, precision="fp16"), 16 * GiB, 1 * GiB)
    assert "does NOT fit" in rm_b8 and "-b 4 --grad-accum 2" in rm_b8  # what the README tells T4 users


@pytest.mark.parametrize("args, message", [(["gpt2", "sft", "--gpu-mem", "lots"], "is not a size"),
                                           (["tiny", "sft", "--seq-len", "5000"], "longer than tiny's block size"),
                                           (["nope", "sft"], "unknown preset"),
                                           (["tiny", "sft", "-b", "0"], "--batch-size must be >= 1")])
def test_bad_input_is_one_line_exit_2(args, message):
    r = run_script("memory.py", *args)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr
