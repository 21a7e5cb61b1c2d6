"""Our side of the PPO benchmark: PPOStage.train_step through the Trainer, on the models that
benchmarks/run.py saved (the same files TRL loads). Prints one RESULT line of JSON.

    python benchmarks/ppo_ours.py --models DIR [--steps 3] [--threads 2]
"""
import harness  # noqa: I001  (first: flush-denormal before torch starts threads)

import argparse
import json
import os
import tempfile
import time

import torch
from safetensors.torch import load_file

harness.use_src()
from configs import PPOConfig, TrainConfig, get_preset  # noqa: E402
from dataset import collate_prompts  # noqa: E402
from gpt import GPT, RewardModel, ValueModel  # noqa: E402
from tokenizer import get_tokenizer  # noqa: E402
from trainers import PPOStage, Trainer  # noqa: E402

ROLLOUT, MINIBATCH, EPOCHS, NEW_TOKENS = 32, 8, 4, 32


def load_scalar_model(cls, cfg, path):
    """Our RewardModel / ValueModel from a transformers GPT2ForSequenceClassification directory:
    the backbone from `transformer.*`, the head from `score.weight` (no bias there; ours stays 0)."""
    sd = load_file(os.path.join(path, "model.safetensors"))
    model = cls(cfg)
    model.backbone.load_hf_state_dict({k: v for k, v in sd.items() if k.startswith("transformer.")}, source=path)
    with torch.no_grad():
        model.head.weight.copy_(sd["score.weight"])
        model.head.bias.zero_()
    return model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", required=True)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = get_preset("tiny")
    policy = os.path.join(args.models, "policy")
    actor = GPT.from_pretrained(policy, config=cfg)
    ref = GPT.from_pretrained(policy, config=cfg)  # a full actor needs its own frozen reference, as TRL's
    reward = load_scalar_model(RewardModel, cfg, os.path.join(args.models, "reward"))
    critic = load_scalar_model(ValueModel, cfg, os.path.join(args.models, "reward"))  # critic from the RM

    tok = get_tokenizer()
    with open(os.path.join(args.models, "prompts.json")) as f:
        prompts = json.load(f)[:ROLLOUT]
    items = [{"prompt_ids": torch.tensor(tok.encode(p)), "prompt": p} for p in prompts]
    batch = collate_prompts(items)  # left-padded, as every rollout batch

    ppo = PPOConfig(rollout_batch_size=ROLLOUT, minibatch_size=MINIBATCH, ppo_epochs=EPOCHS, max_new_tokens=NEW_TOKENS,
                    temperature=1.0, kl_coef=0.05, actor_lr=1e-5, critic_lr=1e-5)
    train = TrainConfig(batch_size=ROLLOUT, lr=1e-5, warmup_steps=0, max_steps=args.warmup + args.steps,
                        eval_every=0, save_every=0, device="cpu", precision="fp32", seed=0, adam_eps=1e-5)
    stage = PPOStage(actor, critic, ppo, reward_model=reward, ref=ref)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(stage, train, run_dir, items, collate_prompts)
        times, cpu, stats = [], [], {}
        for i in range(args.warmup + args.steps):
            t, c = time.perf_counter(), time.process_time()
            stats = stage.train_step(trainer, [batch])
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
    timed = times[args.warmup:]
    harness.print_json({
        "completions_per_s": ROLLOUT / harness.summary(timed)["median"],
        "step_s": timed, "warmup_s": times[:args.warmup], "cpu_s": cpu[args.warmup:],
        "last": {k: stats[k] for k in ("gen_s", "prep_s", "train_s", "response_length", "kl") if k in stats},
        "settings": {"rollout": ROLLOUT, "minibatches": ROLLOUT // MINIBATCH, "ppo_epochs": EPOCHS,
                     "new_tokens": NEW_TOKENS, "steps": args.steps, "warmup": args.warmup,
                     "threads": torch.get_num_threads(), "actor": "full, separate frozen reference",
                     "precision": "fp32"},
    })


if __name__ == "__main__":
    main()
