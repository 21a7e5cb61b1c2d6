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
import functools
import os

from checkpoints import init_model
from cli import (
    add_common_args,
    add_data_args,
    load_data,
    model_config,
    parser,
    print_main,
    resumed_args,
    same_init_on_every_process,
    start,
    train,
)
from common import run_cli
from dataset import SFTDataset, collate_sft
from gpt import mark_only_lora_trainable
from tokenizer import get_tokenizer
from trainers import SFTStage


def main(argv=None):
    ap = parser(__doc__)
    ap.add_argument("-p", "--init", default=None,
                    help="initial weights: 'huggingface' / omitted = the preset's GPT-2 weights (random for "
                         "tiny/mini), a hub name, a transformers directory or one of our checkpoints")
    ap.add_argument("--max-length", type=int, default=None, help="longest sequence (default: block size)")
    ap.add_argument("--train-on-prompt", action="store_true", help="loss on prompt tokens too (the original)")
    ap.add_argument("--pack", action="store_true", help="pack several examples into each sequence")
    add_data_args(ap, "sft")
    add_common_args(ap, {"lr": 1e-4, "preset": "gpt2-medium"})
    args = resumed_args(ap.parse_args(argv))

    d, train_cfg = start(args)
    model_cfg = model_config(args)
    make = functools.partial(SFTDataset, tokenizer=get_tokenizer(), max_length=args.max_length or model_cfg.block_size,
                             train_on_prompt=args.train_on_prompt)
    train_set, eval_set = load_data(make, args, d, train_kw={"pack": args.pack})

    with same_init_on_every_process(train_cfg.seed, d):
        model = init_model("lm", model_cfg, args.init)
        if model_cfg.lora_rank:
            mark_only_lora_trainable(model)
    print_main(d, f"model: {args.preset}, {model.num_params() / 1e6:.1f}M parameters, "
                  f"{model.num_params(trainable_only=True) / 1e6:.2f}M trainable")
    run_dir = train(SFTStage(model), args, model_cfg, train_cfg, d, train_set, eval_set, collate_sft,
                    [("eval/loss", "eval loss", ".4f"), ("eval/ppl", "ppl", ".2f")])
    print_main(d, f"final model: {os.path.join(run_dir, 'final')}")


if __name__ == "__main__":
    run_cli(main)
