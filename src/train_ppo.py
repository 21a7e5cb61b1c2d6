"""PPO: improve the SFT policy against the reward model, with a per-token KL penalty to the SFT model.

Models: the actor starts from the SFT run (-a); the reference policy is that SFT model, frozen (with
a LoRA actor it is the same backbone with the adapters switched off, so no second copy is held); the
reward model is the RM run (-c), frozen; the critic starts from the RM and gives a value per token.
One step = one rollout batch (sample, score, GAE) followed by --ppo-epochs passes of minibatch
updates. Every step logs reward, KL, clip fraction, entropy, value loss and timings to metrics.jsonl.

Examples:
  # offline, on a fresh clone, after the train_sft.py and train_rm.py examples (tiny preset)
  python src/train_ppo.py -n demo -a runs/sft_demo_<stamp> -c runs/rm_demo_<stamp> --preset tiny/lora \\
      --prompts synthetic:ppo_prompts --eval-prompts synthetic:eval_prompts --part all \\
      --rollout-batch-size 32 --minibatch-size 8 --max-new-tokens 32 --max-steps 20

  # GPT-2 medium with LoRA on the "ppo" share of HH-RLHF prompts
  python src/train_ppo.py -n hh -a runs/sft_hh_<stamp> -c runs/rm_hh_<stamp> --preset gpt2-medium/lora
"""
from dataclasses import fields, replace

from checkpoints import checkpoint_info, init_model, load_model
from cli import (
    add_common_args,
    add_dataclass_args,
    config_record,
    done_line,
    held_out_source,
    new_run_dir,
    parser,
    print_main,
    resumed_args,
    seed_process,
    train_config,
)
from common import UserError, run_cli
from configs import PPOConfig, get_preset
from dataset import PromptDataset, collate_prompts
from gpt import mark_only_lora_trainable
from tokenizer import get_tokenizer
from trainers import Dist, PPOStage, Trainer, process_device


def judge_scorer(spec: str):
    """A score judge of evaluate.py (gold, function:MODULE:ATTR, rm:RUN_DIR) as fn(generation, prompts),
    reading each response the way evaluate.py does."""
    from evaluate import answer_from_tokens, make_judge
    judge = make_judge(spec)
    if judge.kind != "score":
        raise UserError(f"{spec}: only score judges (gold, function:MODULE:ATTR, rm:RUN_DIR) can score PPO samples")
    tok = get_tokenizer()

    def score(gen, prompts):
        Tp = gen.prompt_len
        answers = [answer_from_tokens(tok, row[Tp:][mask[Tp:].bool()].tolist())
                   for row, mask in zip(gen.tokens.cpu(), gen.response_mask.cpu())]
        return judge.score_fn(list(prompts), answers)
    return score


def main(argv=None):
    ap = parser(__doc__)
    ap.add_argument("-a", "--actor", help="SFT run or checkpoint: the initial policy and the reference")
    ap.add_argument("-c", "--critic", help="reward-model run or checkpoint: the reward, and the critic's init")
    ap.add_argument("--prompts", default="Anthropic/hh-rlhf", help="rollout prompts: hub name, file or directory")
    ap.add_argument("--split", default="train", help="split of --prompts")
    ap.add_argument("--eval-prompts", default=None, help="held-out prompts (default: the test split of --prompts; "
                    "'none' = no evaluation)")
    ap.add_argument("--eval-split", default="test", help="split of the held-out prompts")
    ap.add_argument("--part", default="ppo", choices=["sft", "rm", "ppo", "all"],
                    help="hash-based share of the prompts (the default keeps them disjoint from the RM's)")
    ap.add_argument("--critic-lora-rank", type=int, default=None, help="critic LoRA rank (default: the RM's)")
    ap.add_argument("--eval-judge", action="append", default=[], metavar="SPEC",
                    help="also score held-out samples with this judge at each evaluation (repeatable): gold "
                         "(the synthetic task's true reward), function:MODULE:ATTR or rm:RUN_DIR")
    ap.add_argument("--reward", default=None, metavar="SPEC",
                    help="train against this score judge instead of the -c reward model (e.g. gold, to see "
                         "what PPO reaches against the true reward); -c still initialises the critic")
    add_common_args(ap, {"lr": 1e-5, "warmup_steps": 0, "eval_every": 20, "save_every": 50, "log_every": 1,
                         "adam_eps": 1e-5, "max_steps": 200, "preset": None})
    add_dataclass_args(ap.add_argument_group("PPO (PPOConfig in src/configs.py)"), PPOConfig, PPOConfig())
    args = resumed_args(ap.parse_args(argv))
    if not args.actor or not args.critic:
        raise UserError("PPO needs -a SFT_RUN (the policy to improve) and -c RM_RUN (the reward model)")

    d = Dist()
    d.init(process_device(args.device, d))
    ppo_cfg = PPOConfig(**{f.name: getattr(args, f.name) for f in fields(PPOConfig)})
    args.batch_size = ppo_cfg.rollout_batch_size  # one trainer step = one rollout batch
    args.grad_accum = 1
    train_cfg = train_config(args)

    # The actor: the SFT model (the preset decides LoRA; default: the SFT run's own preset).
    sft = checkpoint_info(args.actor)
    if sft["kind"] != "lm":
        raise UserError(f"-a {args.actor} is a {sft['stage']} checkpoint ({sft['kind']} model); -a needs an SFT run")
    args.preset = args.preset or sft["preset"]
    if args.preset is None:
        raise UserError(f"-a {args.actor} records no preset; pass --preset")
    actor_cfg = replace(get_preset(args.preset, lora_rank=args.lora_rank), dropout=0.0)  # item 7: no dropout
    rm, rm_info = load_model(args.critic, kind="rm", what="-c")
    rm = rm.eval().requires_grad_(False)
    critic_cfg = replace(rm_info["config"], dropout=0.0, lora_rank=args.critic_lora_rank
                         if args.critic_lora_rank is not None else rm_info["config"].lora_rank)

    seed_process(train_cfg.seed, 0)
    actor = init_model("lm", actor_cfg, args.actor, what="-a")
    ref = None
    if actor_cfg.lora_rank:
        mark_only_lora_trainable(actor)
    else:
        ref = init_model("lm", actor_cfg, args.actor, what="-a")
    critic = init_model("value", critic_cfg, args.critic, what="-c")
    if critic_cfg.lora_rank:
        mark_only_lora_trainable(critic, also=("head",))
    seed_process(train_cfg.seed, d.rank)

    tok = get_tokenizer()
    prompt_len = actor_cfg.block_size - ppo_cfg.max_new_tokens
    part = None if args.part == "all" else args.part
    train_set = PromptDataset(args.prompts, tokenizer=tok, max_length=prompt_len, split=args.split, part=part)
    eval_source = held_out_source(args.prompts, args.eval_prompts, "--eval-prompts", "--prompts")
    eval_set = eval_source and PromptDataset(eval_source, tokenizer=tok, max_length=prompt_len,
                                             split=args.eval_split, part=part, limit=ppo_cfg.eval_samples)
    print_main(d, f"prompts: {train_set.stats_line()}\neval:    {eval_set.stats_line() if eval_set else 'none'}")
    reference = "LoRA, reference = adapters off" if ref is None else "full, frozen copy as reference"
    print_main(d, f"actor {args.preset} ({reference}), "
                  f"critic from {rm_info['preset']}")

    run_dir = new_run_dir("ppo", args, d)
    record = config_record("ppo", args, actor_cfg, train_cfg, ppo=ppo_cfg.to_dict(), critic_model=critic_cfg.to_dict(),
                           data={"train": train_set.stats, "eval": eval_set and eval_set.stats})
    scorers = {spec: judge_scorer(spec) for spec in args.eval_judge}  # logged as eval/<spec>
    if args.reward:
        stage = PPOStage(actor, critic, ppo_cfg, reward_fn=judge_scorer(args.reward), ref=ref, eval_scorers=scorers)
    else:
        stage = PPOStage(actor, critic, ppo_cfg, reward_model=rm, ref=ref, eval_scorers=scorers)
    trainer = Trainer(stage, train_cfg, run_dir, train_set, collate_prompts, eval_set, preset=args.preset,
                      config_record=record, dist_info=d)
    metrics = trainer.fit(resume=bool(args.resume))
    print_main(d, done_line(run_dir, metrics, [("eval/score", "eval score", ".3f"), ("eval/kl", "KL", ".3f")]))


if __name__ == "__main__":
    run_cli(main)
