"""PPO: improve the SFT policy against the reward model, with a per-token KL penalty to the SFT model.

Models: the actor starts from the SFT run (-a); the reference policy is that SFT model, frozen (with
a LoRA actor it is the same backbone with the adapters switched off, so no second copy is held); the
reward model is the RM run (-c), frozen; the critic starts from the RM and gives a value per token.
One step = one rollout batch (sample, score, GAE) followed by --ppo-epochs passes of minibatch
updates. Every step logs reward, KL, clip fraction, entropy, value loss and timings to metrics.jsonl.
--advantage rloo (Ahmadian et al. 2024) answers each of rollout-batch-size / --rloo-k prompts --rloo-k
times and baselines each answer by the others' mean reward, with no critic; --advantage sequence and
--rollout-top-k 50 are the original project's choices (see PPOConfig in src/configs.py).

Examples:
  # offline, on a fresh clone, after the train_sft.py and train_rm.py examples (tiny preset)
  python src/train_ppo.py -n demo -a runs/sft_demo_<stamp> -c runs/rm_demo_<stamp> --preset tiny/lora \\
      --prompts synthetic:ppo_prompts --eval-prompts synthetic:dev_prompts --part all \\
      --rollout-batch-size 32 --minibatch-size 8 --max-new-tokens 32 --max-steps 20

  # RLOO instead of PPO: 8 prompts x 4 answers per rollout, no critic (-c is still the reward)
  python src/train_ppo.py -n rloo -a runs/sft_demo_<stamp> -c runs/rm_demo_<stamp> --preset tiny/lora \
      --prompts synthetic:ppo_prompts --eval-prompts synthetic:dev_prompts --part all \
      --rollout-batch-size 32 --minibatch-size 8 --max-new-tokens 32 --max-steps 20 --advantage rloo --rloo-k 4

  # GPT-2 medium with LoRA on the "ppo" share of HH-RLHF prompts
  python src/train_ppo.py -n hh -a runs/sft_hh_<stamp> -c runs/rm_hh_<stamp> --preset gpt2-medium/lora
"""
import functools
from dataclasses import fields, replace

from checkpoints import checkpoint_info, init_model, load_model
from cli import (
    add_common_args,
    add_data_args,
    add_dataclass_args,
    load_data,
    parser,
    policy_and_reference,
    print_main,
    resumed_args,
    same_init_on_every_process,
    start,
    train,
)
from common import UserError, run_cli
from configs import PPOConfig, get_preset
from dataset import PromptDataset, collate_prompts
from evaluate import answer_from_tokens
from gpt import mark_only_lora_trainable
from judges import make_judge
from tokenizer import get_tokenizer
from trainers import PPOStage


def judge_scorer(spec: str):
    """A score judge of judges.py (gold, function:MODULE:ATTR, rm:RUN_DIR) as fn(generation, prompts),
    reading each response the way evaluate.py does."""
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
    ap.add_argument("-c", "--critic", help="reward-model run or checkpoint: the reward, and the critic's init "
                                           "(RLOO: the reward only)")
    ap.add_argument("--critic-lora-rank", type=int, default=None, help="critic LoRA rank (default: the RM's)")
    ap.add_argument("--eval-judge", action="append", default=[], metavar="SPEC",
                    help="also score held-out samples with this judge at each evaluation (repeatable): gold "
                         "(the synthetic task's true reward), function:MODULE:ATTR or rm:RUN_DIR")
    ap.add_argument("--reward", default=None, metavar="SPEC",
                    help="train against this score judge instead of the -c reward model (e.g. gold, to see "
                         "what PPO reaches against the true reward); -c still initialises the critic")
    add_data_args(ap, "ppo", source="--prompts", held_out="--eval-prompts", what="rollout prompts")
    # One trainer step is one rollout batch, whose size and learning rates are PPO's own flags:
    # TrainConfig's batch size, accumulation and learning rate have no flag here.
    add_common_args(ap, {"warmup_steps": 0, "eval_every": 20, "save_every": 50, "log_every": 1,
                         "adam_eps": 1e-5, "max_steps": 200, "preset": None}, hide=("batch_size", "grad_accum", "lr"))
    add_dataclass_args(ap.add_argument_group("PPO (PPOConfig in src/configs.py)"), PPOConfig, PPOConfig())
    args = resumed_args(ap.parse_args(argv))
    if not args.actor or not args.critic:
        raise UserError("PPO needs -a SFT_RUN (the policy to improve) and -c RM_RUN (the reward model)")

    ppo_cfg = PPOConfig(**{f.name: getattr(args, f.name) for f in fields(PPOConfig)})
    d, train_cfg = start(args, batch_size=ppo_cfg.prompts_per_rollout, grad_accum=1, lr=ppo_cfg.actor_lr)

    # The actor: the SFT model (the preset decides LoRA; default: the SFT run's own preset).
    sft = checkpoint_info(args.actor)
    if sft["kind"] != "lm":
        raise UserError(f"-a {args.actor} is a {sft['stage']} checkpoint ({sft['kind']} model); -a needs an SFT run")
    args.preset = args.preset or sft["preset"]
    if args.preset is None:
        raise UserError(f"-a {args.actor} records no preset; pass --preset")
    # Dropout off in every PPO model: with it the rollout's log-probs and the update's disagree.
    actor_cfg = replace(get_preset(args.preset, lora_rank=args.lora_rank), dropout=0.0)
    rm, rm_info = load_model(args.critic, kind="rm", what="-c")
    rm = rm.eval().requires_grad_(False)
    critic_cfg = replace(rm_info["config"], dropout=0.0, lora_rank=args.critic_lora_rank
                         if args.critic_lora_rank is not None else rm_info["config"].lora_rank)

    with same_init_on_every_process(train_cfg.seed, d):
        actor, ref, reference = policy_and_reference(actor_cfg, args.actor, "-a")
        critic = None  # RLOO has none
        if ppo_cfg.advantage != "rloo":
            critic = init_model("value", critic_cfg, args.critic, what="-c")
            if critic_cfg.lora_rank:
                mark_only_lora_trainable(critic, also=("head",))

    make = functools.partial(PromptDataset, tokenizer=get_tokenizer(),
                             max_length=actor_cfg.block_size - ppo_cfg.max_new_tokens)
    train_set, eval_set = load_data(make, args, d, source="prompts", held_out="eval_prompts",
                                    eval_kw={"limit": ppo_cfg.eval_samples})
    critic_note = f"critic from {rm_info['preset']}" if critic is not None else "no critic (RLOO)"
    print_main(d, f"actor {args.preset} ({reference}), {critic_note}, advantage {ppo_cfg.advantage}")

    scorers = {spec: judge_scorer(spec) for spec in args.eval_judge}  # logged as eval/<spec>
    reward = {"reward_fn": judge_scorer(args.reward)} if args.reward else {"reward_model": rm}
    stage = PPOStage(actor, critic, ppo_cfg, ref=ref, eval_scorers=scorers, **reward)
    train(stage, args, actor_cfg, train_cfg, d, train_set, eval_set, collate_prompts,
          [("eval/score", "eval score", ".3f"), ("eval/kl", "KL", ".3f")],
          ppo=ppo_cfg.to_dict(), critic_model=critic_cfg.to_dict() if critic is not None else None)


if __name__ == "__main__":
    run_cli(main)
