"""Peak resident memory of one PPO update: a LoRA actor whose reference is the same backbone with
the adapters switched off, or a full actor plus a second, frozen full copy as the reference.
Run in a fresh process per mode (the peak only grows); prints one RESULT line.

    python benchmarks/ppo_memory.py --mode lora|full [--shape gpt2-small]

Everything else is the same in both modes: a LoRA critic (rank 8, head trainable), the reward
from a function (no reward model), fp32 on the CPU.
"""
import harness  # noqa: I001  (first: flush-denormal before torch starts threads)

import argparse
import copy
import resource
import tempfile
from dataclasses import replace

import torch

harness.use_src()
from configs import PPOConfig, TrainConfig, get_preset  # noqa: E402
from dataset import collate_prompts  # noqa: E402
from gpt import GPT, ValueModel, mark_only_lora_trainable  # noqa: E402
from trainers import PPOStage, Trainer  # noqa: E402

SHAPES = {"tiny": get_preset("tiny"), "gpt2-small": replace(get_preset("gpt2"), pretrained=None)}
ROLLOUT, MINIBATCH, NEW_TOKENS, PROMPT, LORA_RANK = 8, 4, 16, 16, 8


def rss_mb() -> float:
    """Peak resident memory of this process so far. VmHWM, not getrusage's ru_maxrss: on Linux
    ru_maxrss survives exec, so a child started by a big parent would report the parent's size."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["lora", "full"], required=True)
    ap.add_argument("--shape", default="gpt2-small", choices=list(SHAPES))
    args = ap.parse_args()

    base = SHAPES[args.shape]
    torch.manual_seed(0)
    if args.mode == "lora":
        actor = GPT(replace(base, lora_rank=LORA_RANK))
        mark_only_lora_trainable(actor)
        ref = None  # PPOStage runs the actor with its adapters off
    else:
        actor = GPT(base)
        ref = copy.deepcopy(actor)
    critic = ValueModel(replace(base, lora_rank=LORA_RANK))
    mark_only_lora_trainable(critic, also=("head",))

    def reward_fn(gen, *_):  # any cheap score: memory is what is measured here
        return gen.response_mask.float().mean(dim=1)

    g = torch.Generator().manual_seed(0)
    items = [{"prompt_ids": torch.randint(0, 50000, (PROMPT,), generator=g), "prompt": ""} for _ in range(ROLLOUT)]
    ppo = PPOConfig(rollout_batch_size=ROLLOUT, minibatch_size=MINIBATCH, ppo_epochs=1, max_new_tokens=NEW_TOKENS,
                    normalize_reward=False)
    train = TrainConfig(batch_size=ROLLOUT, max_steps=1, warmup_steps=0, eval_every=0, save_every=0,
                        device="cpu", precision="fp32")
    stage = PPOStage(actor, critic, ppo, reward_fn=reward_fn, ref=ref)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(stage, train, run_dir, items, collate_prompts)
        after_build = rss_mb()
        stage.train_step(trainer, [collate_prompts(items)])
    harness.print_json({
        "peak_rss_mb": rss_mb(), "after_build_rss_mb": after_build,
        "settings": {"shape": args.shape, "mode": args.mode, "lora_rank": LORA_RANK, "rollout": ROLLOUT,
                     "minibatch": MINIBATCH, "new_tokens": NEW_TOKENS, "prompt_tokens": PROMPT,
                     "critic": f"LoRA r={LORA_RANK}, head trainable",
                     "actor_params": actor.num_params(), "trainable_actor_params": actor.num_params(True)},
    })


if __name__ == "__main__":
    main()
