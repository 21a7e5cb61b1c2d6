"""Best-of-n: answer each prompt with the one of n samples of the SFT policy that the reward model scores highest.

The simplest way to optimise against a reward model, with no training at all (Nakano et al. 2021;
Gao et al. 2022, "Scaling Laws for Reward Model Overoptimization"). Its divergence from the policy
it samples has a closed form, KL(best-of-n || policy) = log n - (n - 1) / n nats (Stiennon et al.
2020; an upper bound, exact when no two samples score the same: Beirami et al. 2024), which puts it
on the same reward-vs-KL axis as PPO. Best-of-n is a *model* of the evaluation (src/evaluate.py):
`BestOfN` samples through evaluate.generate_answers (cached and seeded: the k-th sample is the same
for every n, so best-of-4 picks among the first 4 of best-of-16's samples, and sample 0 is the
policy's own evaluation answer) and ranks them with a judges.py score judge (rm:RUN_DIR reads each
answer as the reward model was trained to). An answer that never emits EOS within the budget ranks
below every answer that does, as PPO's missing-EOS penalty ranks it.

Examples:
  # offline, after `python src/pipeline.py --plan quick`: best-of-4 and best-of-16 of its SFT policy,
  # ranked by its reward model, against SFT under the gold reward, on the dev prompts
  R=runs/pipeline_task_<stamp>
  python src/best_of_n.py -s $R/sft -c $R/rm --best-of 4 --best-of 16 --prompts $R/data/dev_prompts.jsonl \\
      --max-new-tokens 32 --temperature 1 --top-k 0 --judge gold --judge rm:$R/rm --out-dir $R/eval_bon

  # with the PPO policy in the same table
  python src/best_of_n.py -s $R/sft -c $R/rm --model ppo=$R/ppo --prompts $R/data/dev_prompts.jsonl \\
      --max-new-tokens 32 --temperature 1 --top-k 0 --judge gold
"""
import math
import os
import re
import sys
from dataclasses import asdict, replace
from typing import List, Optional, Union

from checkpoints import checkpoint_info, is_checkpoint
from cli import parser
from common import UserError, autocast, default_precision, make_run_dir, resolve_device, run_cli, write_json_atomic
from dataset import load_prompts
from evaluate import GenParams, check_model_source, evaluate, generate_answers, log, prompt_clusters
from gpt import GPT
from judges import JUDGE_FORMS, ScoreJudge, json_sha256, make_judge
from sample import load_policy


def analytic_kl(n: int) -> float:
    """KL(best-of-n || the sampled policy) in nats: log n - (n - 1) / n (0 for n = 1)."""
    return math.log(n) - (n - 1) / n


def sample_seed(seed: int, k: int) -> int:
    """The sampling seed of sample k: the evaluation's own seed for k = 0 (so best-of-1 is the policy's
    answer), else one derived from (seed, k)."""
    return seed if k == 0 else int(json_sha256(["best_of_n", seed, k])[:15], 16)


class BestOfN:
    """An answer source for evaluate.generate_answers / evaluate.evaluate: the best of n samples of
    `policy` (a run, checkpoint or hub name, or a GPT in memory) under `scorer` (a score judge or its
    --judge spec: rm:RUN_DIR, gold, function:MODULE:ATTR). Each answer record carries
    best_of = {n, index, score}: which sample was picked and its score."""

    def __init__(self, policy: Union[str, GPT], scorer: Union[str, ScoreJudge], n: int, **judge_kw):
        if n < 1:
            raise UserError(f"best-of-n needs n >= 1, got {n}")
        self.scorer = make_judge(scorer, **judge_kw) if isinstance(scorer, str) else scorer
        if self.scorer.kind != "score":
            raise UserError(f"best-of-n ranks samples with a score judge ({JUDGE_FORMS}), not {self.scorer.name}")
        self.policy, self.n, self.kl = policy, n, analytic_kl(n)
        self._model: Optional[GPT] = policy if isinstance(policy, GPT) else None

    def answers(self, prompts: List[str], params: GenParams, device, precision: str, cache_path: Optional[str]):
        """(the picked answer per prompt, info), sampling through evaluate.generate_answers."""
        if self._model is None:
            self._model = load_policy(self.policy, None)
        samples, infos = [], []  # n lists of answers, one per prompt
        for k in range(self.n):
            out, info = generate_answers({f"best-of-{self.n} sample {k}": self._model}, prompts,
                                         replace(params, seed=sample_seed(params.seed, k)), device, precision,
                                         cache_path)
            samples += list(out.values())
            infos += list(info.values())
        scores = [self.scorer.score_fn(prompts, s) for s in samples]  # (n, P)
        picked = []
        for i in range(len(prompts)):  # finished answers first, then the higher score, then the earlier sample
            k = max(range(self.n), key=lambda k: (samples[k][i]["ended"], scores[k][i], -k))
            picked.append({**samples[k][i], "best_of": {"n": self.n, "index": k, "score": float(scores[k][i])}})
        mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
        info = {"source": self.policy if isinstance(self.policy, str) else "<in memory>",
                "stage": f"best-of-{self.n}", "kind": "lm", "best_of_n": self.n, "scorer": self.scorer.name,
                "kl_analytic": self.kl, "fingerprint": infos[0]["fingerprint"],
                "max_new_tokens": infos[0]["max_new_tokens"],
                "generated": sum(x["generated"] for x in infos), "cached": sum(x["cached"] for x in infos),
                "score_picked": mean([a["best_of"]["score"] for a in picked]), "score_first": mean(scores[0])}
        log(f"best-of-{self.n}: analytic KL {self.kl:.3f} nats; mean {self.scorer.name} score "
            f"{info['score_picked']:.3f} (a single sample: {info['score_first']:.3f})")
        return picked, info


def main(argv=None):
    ap = parser(__doc__)
    g = ap.add_argument_group("models")
    g.add_argument("-s", "--sft", metavar="PATH", help="the policy to sample: an SFT run or checkpoint")
    g.add_argument("-c", "--reward-model", metavar="RM_RUN", help="the reward model that picks the best sample")
    g.add_argument("--scorer", metavar="SPEC", default=None,
                   help="pick with this score judge instead of -c (gold, function:MODULE:ATTR, rm:RUN_DIR)")
    g.add_argument("--best-of", type=int, action="append", default=[], metavar="N",
                   help="n (repeatable; default 4 and 16)")
    g.add_argument("--model", action="append", default=[], metavar="NAME=PATH",
                   help="another model to compare with SFT in the same table, e.g. ppo=RUN (repeatable)")
    g = ap.add_argument_group("prompts, sampling and judging (as evaluate.py)")
    g.add_argument("--prompts", required=True, help="prompt file or hub dataset (tune on dev prompts, not test)")
    g.add_argument("--split", default="train", help="split of a hub --prompts dataset")
    g.add_argument("--limit", type=int, default=None, help="use the first N prompts")
    for f, kind in (("max_new_tokens", int), ("temperature", float), ("top_k", int), ("top_p", float),
                    ("seed", int), ("batch_size", int)):
        default = getattr(GenParams(), f)
        g.add_argument("--" + f.replace("_", "-"), type=kind, default=default,
                       help=f"as evaluate.py's (default {default})")
    g.add_argument("--judge", action="append", default=[], metavar="SPEC", help=f"{JUDGE_FORMS} (repeatable)")
    g.add_argument("--fixed-order", action="store_true", help="as evaluate.py's")
    g.add_argument("--clusters", default="auto", choices=("auto", "prompt", "fact"), help="as evaluate.py's")
    g.add_argument("--n-boot", type=int, default=10000, help="bootstrap resamples")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--precision", default="auto", help="auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16")
    g = ap.add_argument_group("output")
    g.add_argument("-n", "--name", default="best_of_n", help="evaluation name: runs/eval_<name>_<stamp>/")
    g.add_argument("--out-dir", default=None, help="write the results here instead of runs/eval_<name>_<stamp>/")
    g.add_argument("--cache-dir", default=os.path.join("runs", "eval_cache"), help="answer and verdict caches")
    args = ap.parse_args(argv)

    if not args.sft or not (args.reward_model or args.scorer):
        raise UserError("best-of-n needs -s SFT_RUN (the policy) and -c RM_RUN (or --scorer SPEC) to pick with")
    if not args.judge:
        raise UserError("give at least one --judge (e.g. gold, rm:RM_RUN)")
    ns = sorted(set(args.best_of or [4, 16]))
    device = resolve_device(args.device)
    precision = default_precision(device) if args.precision == "auto" else args.precision
    autocast(device, precision)
    params = GenParams(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed, args.batch_size)
    policy = load_policy(args.sft, None)  # refuses a reward model
    scorer = make_judge(args.scorer or f"rm:{args.reward_model}", device=device, precision=precision)
    models = {"sft": args.sft, **{f"best_of_{n}": BestOfN(policy, scorer, n) for n in ns}}
    for item in args.model:
        name, sep, path = item.partition("=")
        if not sep or not path or not re.fullmatch(r"[\w.-]+", name) or name in models:
            raise UserError(f"--model {item!r}: expected NAME=PATH with a new NAME of letters, digits, _ . -")
        check_model_source(path, f"--model {name}")
        if is_checkpoint(path) and checkpoint_info(path)["kind"] != "lm":
            raise UserError(f"--model {name}={path} holds a {checkpoint_info(path)['kind']} model, not a policy")
        models[name] = path
    judges = [make_judge(spec, device=device, precision=precision) for spec in args.judge]
    if args.limit is not None and args.limit < 1:
        raise UserError("--limit must be at least 1")
    prompts = load_prompts(args.prompts, limit=args.limit, split=args.split)
    out_dir = args.out_dir or make_run_dir("eval", args.name)
    os.makedirs(out_dir, exist_ok=True)
    config = {"command": " ".join(["python"] + sys.argv) if argv is None else None, "args": vars(args),
              "kl_analytic": {f"best_of_{n}": analytic_kl(n) for n in ns}, "generation": asdict(params)}
    write_json_atomic(os.path.join(out_dir, "config.json"), config)
    evaluate(models, prompts, judges, [(name, "sft") for name in models if name != "sft"], out_dir, args.cache_dir,
             params, device, precision, n_boot=args.n_boot, config=config,
             clusters=prompt_clusters(prompts, args.clusters, args.prompts), fixed_order=args.fixed_order)
    for n in ns:
        print(f"best_of_{n}: analytic KL to the policy {analytic_kl(n):.3f} nats")
    log(f"results: {os.path.join(out_dir, 'results.json')}")


if __name__ == "__main__":
    run_cli(main)
