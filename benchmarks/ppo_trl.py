"""The TRL side of the PPO benchmark; runs inside a TRL virtual environment (benchmarks/setup_trl.sh),
never in the project's own. Loads the models benchmarks/run.py saved and prints one RESULT line.

    benchmarks/.venv-trl112/bin/python benchmarks/ppo_trl.py --algo ppo  --models DIR   # TRL 1.12 PPOTrainer
    benchmarks/.venv-trl116/bin/python benchmarks/ppo_trl.py --algo rloo --models DIR   # TRL 1.16 RLOOTrainer

Settings mirror ppo_ours.py: 32 completions of 32 new tokens per update, sampling at temperature 1
over the full vocabulary, 4 epochs x 4 minibatches of 8 (one optimizer step each), KL coefficient
0.05, fp32 on the CPU. Self-contained on purpose: no project module is importable here.
"""
import argparse
import json
import os
import sys
import tempfile
import time

import torch

torch.set_flush_denormal(True)  # as in every process of the benchmark, before torch starts threads

ROLLOUT, MINIBATCH, EPOCHS, NEW_TOKENS = 32, 8, 4, 32


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--algo", choices=["ppo", "rloo"], required=True)
    ap.add_argument("--models", required=True)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall time at the start of training and at the end of every optimizer step."""

        def __init__(self):
            self.marks, self.cpu_marks = [], []

        def on_train_begin(self, *a, **k):
            self.marks.append(time.perf_counter())
            self.cpu_marks.append(time.process_time())

        def on_step_end(self, *a, **k):
            self.marks.append(time.perf_counter())
            self.cpu_marks.append(time.process_time())

    policy_dir, reward_dir = os.path.join(args.models, "policy"), os.path.join(args.models, "reward")
    with open(os.path.join(args.models, "prompts.json")) as f:
        prompts = json.load(f)
    tok = AutoTokenizer.from_pretrained(policy_dir, padding_side="left")
    tok.pad_token = tok.eos_token
    timer = StepTimer()
    updates = args.warmup + args.steps
    common = dict(output_dir=tempfile.mkdtemp(), learning_rate=1e-5, report_to="none", save_strategy="no",
                  logging_steps=10_000, use_cpu=True, bf16=False, seed=0, dataloader_num_workers=0,
                  disable_tqdm=True, lr_scheduler_type="constant", gradient_checkpointing=False)

    if args.algo == "ppo":
        from trl.experimental.ppo import PPOConfig, PPOTrainer
        # One update: 32 prompts (per_device_train_batch_size, gradient_accumulation_steps=1), then
        # 4 epochs x 4 minibatches of 8, each one optimizer step on policy and value together.
        config = PPOConfig(per_device_train_batch_size=ROLLOUT, gradient_accumulation_steps=1,
                           num_mini_batches=ROLLOUT // MINIBATCH, num_ppo_epochs=EPOCHS, response_length=NEW_TOKENS,
                           temperature=1.0, kl_coef=0.05, stop_token="eos", total_episodes=ROLLOUT * updates,
                           num_sample_generations=0, local_rollout_forward_batch_size=ROLLOUT, **common)
        dataset = Dataset.from_dict({"input_ids": [tok(p)["input_ids"] for p in prompts[:ROLLOUT]]})
        trainer = PPOTrainer(
            args=config, processing_class=tok,
            model=AutoModelForCausalLM.from_pretrained(policy_dir),
            ref_model=AutoModelForCausalLM.from_pretrained(policy_dir),
            reward_model=AutoModelForSequenceClassification.from_pretrained(reward_dir, num_labels=1),
            value_model=AutoModelForSequenceClassification.from_pretrained(reward_dir, num_labels=1),
            train_dataset=dataset, callbacks=[timer])
        steps_per_update = 1  # TRL's PPO calls on_step_end once per rollout batch
        note = ("PPOTrainer (trl.experimental.ppo): policy and value in one optimizer; rollout logits kept from "
                "generation; policy, reference, value and reward as separate full models.")
    else:
        from trl import RLOOConfig, RLOOTrainer
        k = 4  # completions per prompt: 8 prompts x 4 = 32 completions per generation
        config = RLOOConfig(per_device_train_batch_size=MINIBATCH, num_generations=k,
                            steps_per_generation=ROLLOUT // MINIBATCH, num_iterations=EPOCHS,
                            max_completion_length=NEW_TOKENS, temperature=1.0, top_p=1.0, top_k=0, beta=0.05,
                            mask_truncated_completions=False,
                            max_steps=updates * EPOCHS * (ROLLOUT // MINIBATCH), **common)
        dataset = Dataset.from_dict({"prompt": prompts[:ROLLOUT // k]})
        trainer = RLOOTrainer(model=policy_dir, reward_funcs=reward_dir, args=config, train_dataset=dataset,
                              processing_class=tok, callbacks=[timer])
        steps_per_update = EPOCHS * (ROLLOUT // MINIBATCH)  # 16 optimizer steps per generation batch
        note = (f"RLOOTrainer, k={k} completions for each of {ROLLOUT // k} prompts, {EPOCHS} iterations x "
                f"{ROLLOUT // MINIBATCH} steps of {MINIBATCH} per generation (no critic: a different algorithm, "
                "with less work per update than PPO).")

    trainer.train()
    marks, cpu_marks = timer.marks[::steps_per_update], timer.cpu_marks[::steps_per_update]  # update boundaries
    times = [b - a for a, b in zip(marks, marks[1:])]
    cpu = [b - a for a, b in zip(cpu_marks, cpu_marks[1:])]
    if len(times) != updates:
        raise RuntimeError(f"expected {updates} updates, timed {len(times)} ({len(timer.marks)} marks)")
    timed = sorted(times[args.warmup:])
    median = timed[len(timed) // 2] if len(timed) % 2 else sum(timed[len(timed) // 2 - 1:len(timed) // 2 + 1]) / 2
    print("RESULT " + json.dumps({
        "completions_per_s": ROLLOUT / median, "step_s": times[args.warmup:], "warmup_s": times[:args.warmup],
        "cpu_s": cpu[args.warmup:],
        "settings": {"rollout": ROLLOUT, "minibatches": ROLLOUT // MINIBATCH, "ppo_epochs": EPOCHS,
                     "new_tokens": NEW_TOKENS, "steps": args.steps, "warmup": args.warmup,
                     "threads": torch.get_num_threads(), "trl": trl.__version__,
                     "transformers": transformers.__version__, "torch": torch.__version__,
                     "python": sys.version.split()[0], "optimizer": str(config.optim), "note": note},
    }), flush=True)


if __name__ == "__main__":
    main()
