"""Reward model (RM) training: learn a scalar score from human preference pairs.

The score is a linear head on the hidden state of each sequence's last token (its EOS); the loss is
-log sigmoid(r_chosen - r_rejected) (all pairs of a K-wise ranking when the data has them). The head
is trainable even when the backbone is LoRA. Held-out loss, accuracy (chosen scored above rejected,
ties count half) and mean margin are logged every --eval-every.

Examples:
  # offline, on a fresh clone: start from an SFT run of the tiny preset (see train_sft.py --help)
  python src/train_rm.py -n demo --preset tiny -p runs/sft_demo_<stamp> --data synthetic:rm_train \\
      --eval-data synthetic:rm_test --part all -b 16 --max-steps 100 --lr 1e-3

  # GPT-2 medium with LoRA from an SFT run, on the "rm" share of HH-RLHF
  python src/train_rm.py -n hh -b 8 --preset gpt2-medium/lora -p runs/sft_hh_<stamp>
"""
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
from dataset import PreferenceDataset, collate_preference
from gpt import mark_only_lora_trainable
from tokenizer import get_tokenizer
from trainers import Dist, RMStage, Trainer, process_device


def main(argv=None):
    ap = parser(__doc__)
    ap.add_argument("-p", "--init", default=None,
                    help="initial weights: an SFT run/checkpoint (recommended), 'huggingface' / omitted = the "
                         "preset's GPT-2 weights (random for tiny/mini), a hub name or a transformers directory")
    ap.add_argument("--data", default="Anthropic/hh-rlhf", help="preference pairs: hub name, local file or directory")
    ap.add_argument("--split", default="train", help="split of --data to train on")
    ap.add_argument("--eval-data", default=None, help="held-out pairs (default: the test split of --data; "
                    "'none' = no evaluation)")
    ap.add_argument("--eval-split", default="test", help="split of the held-out data")
    ap.add_argument("--part", default="rm", choices=["sft", "rm", "ppo", "all"],
                    help="hash-based share of the prompts to use, so SFT, RM and PPO never share a prompt "
                         "('all' for data that is already split)")
    ap.add_argument("--max-length", type=int, default=None, help="longest sequence (default: block size)")
    add_common_args(ap, {"lr": 1e-5, "epochs": 1.0, "preset": "gpt2-medium"})
    args = resumed_args(ap.parse_args(argv))

    d = Dist()
    d.init(process_device(args.device, d))
    model_cfg = model_config(args)
    train_cfg = train_config(args)
    tok = get_tokenizer()
    part = None if args.part == "all" else args.part
    data_kw = dict(tokenizer=tok, max_length=args.max_length or model_cfg.block_size, part=part)
    train_set = PreferenceDataset(args.data, split=args.split, **data_kw)
    eval_source = held_out_source(args.data, args.eval_data)
    eval_set = eval_source and PreferenceDataset(eval_source, split=args.eval_split, **data_kw)
    print_main(d, f"train: {train_set.stats_line()}\neval:  {eval_set.stats_line() if eval_set else 'none'}")

    seed_process(train_cfg.seed, 0)
    model = init_model("rm", model_cfg, args.init)
    if model_cfg.lora_rank:
        mark_only_lora_trainable(model, also=("head",))
    seed_process(train_cfg.seed, d.rank)
    print_main(d, f"reward model: {args.preset}, {model.backbone.num_params() / 1e6:.1f}M parameters, "
                  f"{sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.2f}M trainable")

    run_dir = new_run_dir("rm", args, d)
    record = config_record("rm", args, model_cfg, train_cfg,
                           data={"train": train_set.stats, "eval": eval_set and eval_set.stats})
    trainer = Trainer(RMStage(model), train_cfg, run_dir, train_set, collate_preference, eval_set,
                      preset=args.preset, config_record=record, dist_info=d)
    metrics = trainer.fit(resume=bool(args.resume))
    print_main(d, done_line(run_dir, metrics, [("eval/accuracy", "eval accuracy", ".3f"),
                                               ("eval/loss", "loss", ".4f")]))


if __name__ == "__main__":
    run_cli(main)
