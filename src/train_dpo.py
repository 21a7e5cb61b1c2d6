"""DPO / IPO: improve the SFT policy straight from preference pairs, with no reward model and no sampling.

The policy starts from the SFT run (-p) and learns to give each pair's chosen response a higher
log-ratio to the reference than the rejected one; the reference is that SFT model, frozen (with a
LoRA preset, the same backbone with its adapters switched off, so no second copy is held). --loss dpo
is -log sigmoid(beta h) (Rafailov et al. 2023), --loss ipo is (h - 1/(2 beta))^2 (Azar et al. 2023), h
the pair's log-ratio difference. The pairs are the reward model's: the same files and, by default, the
same "rm" share of the prompts. Dropout is off, so that policy and reference agree exactly at the start.
Logged: loss, implicit-reward accuracy (chosen above rejected, ties half), the chosen and rejected
implicit rewards beta * log-ratio and their margin, the policy's log-probs of both; on --eval-data every
--eval-every. The run is a policy like SFT's and PPO's: evaluate.py, sample.py, chat.py and export.py load it.

Examples:
  # offline, on a fresh clone, after the train_sft.py example (tiny preset, the reward model's pairs)
  python src/train_dpo.py -n demo -p runs/sft_demo_<stamp> --data synthetic:rm_train \\
      --eval-data synthetic:rm_dev --part all -b 32 --lr 1e-4 --beta 0.1 --max-steps 100

  # IPO instead, with LoRA adapters on the SFT model (the reference is the model with them off)
  python src/train_dpo.py -n ipo --preset tiny/lora -p runs/sft_demo_<stamp> --data synthetic:rm_train \\
      --eval-data synthetic:rm_dev --part all -b 32 --lr 1e-3 --loss ipo --beta 0.1 --max-steps 100

  # GPT-2 medium with LoRA on the "rm" share of HH-RLHF
  python src/train_dpo.py -n hh -b 8 --preset gpt2-medium/lora -p runs/sft_hh_<stamp> --data Anthropic/hh-rlhf
"""
import functools
from dataclasses import fields, replace

from checkpoints import checkpoint_info, is_checkpoint
from cli import (
    add_common_args,
    add_data_args,
    add_dataclass_args,
    load_data,
    model_config,
    parser,
    policy_and_reference,
    print_main,
    resumed_args,
    same_init_on_every_process,
    start,
    train,
)
from common import UserError, run_cli
from configs import DPOConfig
from dataset import PreferenceDataset, collate_preference
from tokenizer import get_tokenizer
from trainers import DPOStage


def main(argv=None):
    ap = parser(__doc__)
    ap.add_argument("-p", "--init", default=None,
                    help="the SFT run or checkpoint: the initial policy and the reference (a hub name or "
                         "transformers directory works too)")
    ap.add_argument("--max-length", type=int, default=None, help="longest sequence (default: block size)")
    add_data_args(ap, "rm", what="preference pairs (the reward model's)")
    add_common_args(ap, {"lr": 1e-6, "epochs": 1.0, "preset": None})
    add_dataclass_args(ap.add_argument_group("DPO (DPOConfig in src/configs.py)"), DPOConfig, DPOConfig())
    args = resumed_args(ap.parse_args(argv))
    if not args.init:
        raise UserError("DPO needs -p SFT_RUN: the policy to improve, and its reference")
    dpo_cfg = DPOConfig(**{f.name: getattr(args, f.name) for f in fields(DPOConfig)})

    d, train_cfg = start(args)
    if is_checkpoint(args.init):
        sft = checkpoint_info(args.init)
        if sft["kind"] != "lm":
            raise UserError(f"-p {args.init} is a {sft['stage']} checkpoint ({sft['kind']} model); -p needs an "
                            f"SFT run (a language model)")
        args.preset = args.preset or sft["preset"]
    if args.preset is None:
        raise UserError(f"-p {args.init} records no preset; pass --preset")
    model_cfg = replace(model_config(args), dropout=0.0)
    make = functools.partial(PreferenceDataset, tokenizer=get_tokenizer(),
                             max_length=args.max_length or model_cfg.block_size)
    train_set, eval_set = load_data(make, args, d)
    for data in (train_set, eval_set):
        if data is not None and data.ranked:
            raise UserError(f"{data.stats['source']} ranks {data.k} responses per prompt; DPO trains on pairs "
                            f"(chosen, rejected)")

    with same_init_on_every_process(train_cfg.seed, d):
        policy, ref, reference = policy_and_reference(model_cfg, args.init, "-p")
    print_main(d, f"policy {args.preset} ({reference}), {policy.num_params(trainable_only=True) / 1e6:.2f}M "
                  f"trainable; {dpo_cfg.loss}, beta {dpo_cfg.beta}")
    train(DPOStage(policy, dpo_cfg, ref), args, model_cfg, train_cfg, d, train_set, eval_set, collate_preference,
          [("eval/accuracy", "implicit-reward accuracy", ".3f"), ("eval/margin", "margin", ".3f"),
           ("eval/loss", "loss", ".4f")], dpo=dpo_cfg.to_dict())


if __name__ == "__main__":
    run_cli(main)
