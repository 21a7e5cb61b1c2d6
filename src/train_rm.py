"""Reward model (RM) training: learn a scalar score from human preference pairs.

The score is a linear head on the hidden state of each sequence's last token (its EOS); the loss is
-log sigmoid(r_chosen - r_rejected) (all pairs of a K-wise ranking when the data has them). The head
is trainable even when the backbone is LoRA. Held-out loss, accuracy (chosen scored above rejected,
ties count half) and mean margin are logged every --eval-every. --score-mean-with-padding makes the
original project's reward model instead: the head's mean over every position of the padded batch.

Examples:
  # offline, on a fresh clone: start from an SFT run of the tiny preset (see train_sft.py --help)
  python src/train_rm.py -n demo --preset tiny -p runs/sft_demo_<stamp> --data synthetic:rm_train \\
      --eval-data synthetic:rm_dev --part all -b 16 --max-steps 100 --lr 1e-3

  # GPT-2 medium with LoRA from an SFT run, on the "rm" share of HH-RLHF
  python src/train_rm.py -n hh -b 8 --preset gpt2-medium/lora -p runs/sft_hh_<stamp>
"""
import functools

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
from dataset import PreferenceDataset, collate_preference
from gpt import mark_only_lora_trainable
from tokenizer import get_tokenizer
from trainers import RMStage


def main(argv=None):
    ap = parser(__doc__)
    ap.add_argument("-p", "--init", default=None,
                    help="initial weights: an SFT run/checkpoint (recommended), 'huggingface' / omitted = the "
                         "preset's GPT-2 weights (random for tiny/mini), a hub name or a transformers directory")
    ap.add_argument("--max-length", type=int, default=None, help="longest sequence (default: block size)")
    ap.add_argument("--score-mean-with-padding", action="store_true",
                    help="score = the head's mean over every position, padding included, as the original's RM "
                         "(recorded in the checkpoint, so PPO and the judges score the same way); default: the "
                         "head at the last real token (EOS)")
    add_data_args(ap, "rm", what="preference pairs")
    add_common_args(ap, {"lr": 1e-5, "epochs": 1.0, "preset": "gpt2-medium"})
    args = resumed_args(ap.parse_args(argv))

    d, train_cfg = start(args)
    model_cfg = model_config(args, score_mean_with_padding=args.score_mean_with_padding or None)
    make = functools.partial(PreferenceDataset, tokenizer=get_tokenizer(),
                             max_length=args.max_length or model_cfg.block_size)
    train_set, eval_set = load_data(make, args, d)

    with same_init_on_every_process(train_cfg.seed, d):
        model = init_model("rm", model_cfg, args.init)
        if model_cfg.lora_rank:
            mark_only_lora_trainable(model, also=("head",))  # the score head always trains
    print_main(d, f"reward model: {args.preset}, {model.backbone.num_params() / 1e6:.1f}M parameters, "
                  f"{sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.2f}M trainable")
    train(RMStage(model), args, model_cfg, train_cfg, d, train_set, eval_set, collate_preference,
          [("eval/accuracy", "eval accuracy", ".3f"), ("eval/loss", "loss", ".4f")])


if __name__ == "__main__":
    run_cli(main)
