"""Supervised fine-tuning (SFT): train GPT-2 to continue a dialogue the way the demonstrations do.

Loss is next-token cross-entropy on the response tokens and their EOS (--train-on-prompt for the
whole sequence, as the original did). Held-out loss and perplexity are logged every --eval-every.

Examples:
  # offline, on a fresh clone: the tiny preset on the built-in synthetic task (about a minute)
  python src/train_sft.py -n demo --preset tiny --data synthetic:sft --part all -b 16 --max-steps 100 --lr 2e-3

  # GPT-2 medium on the "sft" share of Anthropic HH-RLHF (hub, or a local copy of its files)
  python src/train_sft.py -n hh -b 8 --preset gpt2-medium --data Anthropic/hh-rlhf

  # continue an interrupted run
  python src/train_sft.py --resume runs/sft_hh_20260101-120000
"""
import os

from checkpoints import init_model
from cli import (
    add_common_args,
    config_record,
    done_line,
    held_out_source,
    model_config,
    new_run_dir,
    parser,
    print_main,
    resumed_args,
    seed_process,
    train_config,
)
from common import run_cli
from dataset import SFTDataset, collate_sft
from gpt import mark_only_lora_trainable
from tokenizer import get_tokenizer
from trainers import Dist, SFTStage, Trainer, process_device


def main(argv=None):
    ap = parser(__doc__)
    ap.add_argument("-p", "--init", default=None,
                    help="initial weights: 'huggingface' / omitted = the preset's GPT-2 weights (random for "
                         "tiny/mini), a hub name, a transformers directory or one of our checkpoints")
    ap.add_argument("--data", default="Anthropic/hh-rlhf", help="training data: hub name, local file or directory")
    ap.add_argument("--split", default="train", help="split of --data to train on")
    ap.add_argument("--eval-data", default=None, help="held-out data (default: the test split of --data; "
                    "'none' = no evaluation)")
    ap.add_argument("--eval-split", default="test", help="split of the held-out data")
    ap.add_argument("--part", default="sft", choices=["sft", "rm", "ppo", "all"],
                    help="hash-based share of the prompts to use, so SFT, RM and PPO never share a prompt "
                         "('all' for data that is already split)")
    ap.add_argument("--max-length", type=int, default=None, help="longest sequence (default: block size)")
    ap.add_argument("--train-on-prompt", action="store_true", help="loss on prompt tokens too (the original)")
    ap.add_argument("--pack", action="store_true", help="pack several examples into each sequence")
    add_common_args(ap, {"lr": 1e-4, "preset": "gpt2-medium"})
    args = resumed_args(ap.parse_args(argv))

    d = Dist()
    d.init(process_device(args.device, d))
    model_cfg = model_config(args)
    train_cfg = train_config(args)
    tok = get_tokenizer()
    max_length = args.max_length or model_cfg.block_size
    part = None if args.part == "all" else args.part
    data_kw = dict(tokenizer=tok, max_length=max_length, part=part, train_on_prompt=args.train_on_prompt)
    train_set = SFTDataset(args.data, split=args.split, pack=args.pack, **data_kw)
    eval_source = held_out_source(args.data, args.eval_data)
    eval_set = eval_source and SFTDataset(eval_source, split=args.eval_split, **data_kw)
    print_main(d, f"train: {train_set.stats_line()}\neval:  {eval_set.stats_line() if eval_set else 'none'}")

    seed_process(train_cfg.seed, 0)  # identical initial weights on every process
    model = init_model("lm", model_cfg, args.init)
    if model_cfg.lora_rank:
        mark_only_lora_trainable(model)
    seed_process(train_cfg.seed, d.rank)
    print_main(d, f"model: {args.preset}, {model.num_params() / 1e6:.1f}M parameters, "
                  f"{model.num_params(trainable_only=True) / 1e6:.2f}M trainable")

    run_dir = new_run_dir("sft", args, d)
    record = config_record("sft", args, model_cfg, train_cfg,
                           data={"train": train_set.stats, "eval": eval_set and eval_set.stats})
    trainer = Trainer(SFTStage(model), train_cfg, run_dir, train_set, collate_sft, eval_set,
                      preset=args.preset, config_record=record, dist_info=d)
    metrics = trainer.fit(resume=bool(args.resume))
    print_main(d, done_line(run_dir, metrics, [("eval/loss", "eval loss", ".4f"), ("eval/ppl", "ppl", ".2f")]))
    print_main(d, f"final model: {os.path.join(run_dir, 'final')}")


if __name__ == "__main__":
    run_cli(main)
