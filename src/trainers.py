"""One training loop for SFT, reward modelling, PPO and DPO; the stages differ only in their step.

`Trainer` owns everything the stages have in common: devices, data-parallel processes (DDP),
mixed precision, AdamW with warmup + decay, gradient accumulation and clipping, the data order,
periodic evaluation, logging (tqdm, metrics.jsonl, wandb), atomic checkpoints and exact resume.
A `Stage` says what a step is: `SFTStage`, `RMStage` and `DPOStage` turn a micro-batch into a loss;
`PPOStage` overrides the whole step, since one rollout feeds many optimizer steps, and is glue
between the Trainer and the algorithm in ppo.py.
"""
import glob
import json
import math
import os
import time
from contextlib import nullcontext
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from checkpoints import (
    latest_checkpoint,
    load_training_checkpoint,
    rng_state,
    save_model,
    save_training_checkpoint,
    set_rng_state,
)
from common import (
    TrainingError,
    UserError,
    atomic_path,
    autocast,
    default_precision,
    flush_denormals,
    is_interactive,
    resolve_device,
    write_json_atomic,
)
from configs import EOS_ID, DPOConfig, TrainConfig
from dataset import shard_batches
from gpt import GPT, lora_disabled
from loss import (
    dpo_loss,
    ipo_loss,
    kwise_loss,
    lm_loss,
    pair_loss_masks,
    pairwise_accuracy,
    pairwise_loss,
    sequence_logprobs,
)
from ppo import (
    AdaptiveKL,
    PPOModels,
    ScoreNormalizer,
    collect_rollout,
    evaluate_policy,
    ppo_update,
    rollout_stats,
    update_schedule,
)

# -----------------------------------------------------------------------------
# Processes


class Dist:
    """This process's place in a torchrun launch (a single process when not launched so)."""

    def __init__(self):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.is_main = self.rank == 0
        self.device = torch.device("cpu")  # where tensors for collectives live (see init)

    @property
    def enabled(self):
        return self.world_size > 1

    def init(self, device: torch.device):
        """Join the process group: NCCL on CUDA devices, gloo on CPUs. NCCL reduces only tensors on
        the GPU, so collectives then use this process's device; gloo uses the CPU."""
        self.device = device if device.type == "cuda" else torch.device("cpu")
        if self.enabled and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")

    def barrier(self):
        if self.enabled:
            dist.barrier()

    def broadcast(self, obj):
        """rank 0's `obj` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        """Every rank's `obj`, on every rank."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def _reduce(self, values: List[float], op=None) -> List[float]:
        """Element-wise all-reduce (sum by default) of a list of floats, in float64 on the device
        the backend needs (see init)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
        return t.tolist()

    def sum(self, value: float) -> float:
        """The sum of `value` over all processes."""
        return self._reduce([float(value)])[0] if self.enabled else float(value)

    def mean(self, value: float) -> float:
        """The mean of `value` over all processes."""
        return self.sum(value) / self.world_size if self.enabled else value

    def concat(self, t: torch.Tensor) -> torch.Tensor:
        """1-D tensor `t` of every process, concatenated in rank order (lengths may differ), on t's device."""
        if not self.enabled:
            return t
        return torch.cat([torch.as_tensor(x) for x in self.gather(t.detach().cpu())]).to(t.device)

    def average(self, metrics: Dict[str, float]) -> Dict[str, float]:
        """Logged step metrics as the mean over processes (each process's metrics are already its
        weighted share, see Stage.train_step), so rank 0 logs everyone's numbers, not its own.
        NaN entries (a statistic a process had no data for) are left out of their mean; keys with
        "max" in the name take the maximum instead."""
        if not self.enabled or not metrics:
            return metrics
        keys = sorted(metrics)  # the same order on every process
        values = [float(_plain(metrics[k])) for k in keys]
        finite = [0.0 if math.isnan(v) else v for v in values]
        counts = [0.0 if math.isnan(v) else 1.0 for v in values]
        reduced = self._reduce(finite + counts)
        maxima = self._reduce([v if "max" in k and not math.isnan(v) else -math.inf for k, v in zip(keys, values)],
                              dist.ReduceOp.MAX)
        n = len(keys)
        out = {}
        for i, k in enumerate(keys):
            if "max" in k:
                out[k] = maxima[i] if maxima[i] > -math.inf else math.nan
            else:
                out[k] = reduced[i] / reduced[n + i] if reduced[n + i] else math.nan
        return {k: out[k] for k in metrics}  # the stage's order, for the progress bar


def process_device(name: str, d: Dist) -> torch.device:
    device = resolve_device(name)
    if device.type == "cuda" and d.enabled:
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    return device


# -----------------------------------------------------------------------------
# Logging


class MetricsLog:
    """metrics.jsonl (always), wandb (when asked), on the main process only."""

    def __init__(self, run_dir: str, enabled: bool, wandb_run=None, resume_step: Optional[int] = None):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.enabled = enabled
        self.wandb = wandb_run
        if enabled and resume_step is not None and os.path.exists(self.path):
            self._truncate(resume_step)

    def _truncate(self, resume_step: int):
        """Drop what was logged after the checkpoint we resume from (it will be logged again) and the
        torn last line a killed process may leave; rewritten atomically, so a kill now loses nothing."""
        keep = []
        with open(self.path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(row, dict) and row.get("step", 0) <= resume_step:
                    keep.append(line.rstrip("\n") + "\n")
        with atomic_path(self.path) as tmp, open(tmp, "w") as f:
            f.writelines(keep)

    def log(self, step: int, metrics: dict):
        if not self.enabled or not metrics:
            return
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log(row, step=step)


def _plain(v):
    return v.item() if isinstance(v, torch.Tensor) else v


def start_wandb(cfg: TrainConfig, run_dir: str, config: dict, run_id: Optional[str]):
    import wandb
    return wandb.init(project=cfg.wandb_project, name=os.path.basename(run_dir), dir=run_dir, config=config,
                      id=run_id, resume="allow")


# -----------------------------------------------------------------------------
# Stages


class Stage:
    """What varies between SFT, RM and PPO.

    `models`: name -> module, all saved with the run ('model' is the one later stages load);
    `frozen`: modules used but never trained (a reference policy, a reward model).
    Forward passes take `run`, name -> the module to call: the Trainer's wrapped modules (DDP,
    torch.compile) in training, the plain ones at evaluation (which runs on the main process only).
    """

    name = "stage"
    models: Dict[str, torch.nn.Module]
    frozen: Dict[str, torch.nn.Module] = {}
    lrs: Dict[str, float] = {}  # per-model learning rates (default: TrainConfig.lr)
    optimizer_steps_per_batch = 1  # PPO takes many per rollout batch

    def loss(self, trainer: "Trainer", run: Dict[str, torch.nn.Module], batch: dict):
        """-> (scalar loss, metrics dict) for one micro-batch."""
        raise NotImplementedError

    def extra_state(self) -> dict:
        """Stage state besides weights and optimizers that a resume needs (JSON-serialisable)."""
        return {}

    def load_extra_state(self, state: dict):
        pass

    def weight(self, batch: dict) -> float:
        """How many units (target tokens, pairs) the micro-batch's mean loss averages over."""
        raise NotImplementedError

    def train_step(self, trainer: "Trainer", micro_batches: List[dict]) -> dict:
        """Default step: accumulate the loss of each micro-batch, then one optimizer step.

        The gradient is that of the mean loss over every unit (token, pair) of the global batch, all
        micro-batches of all processes together: micro-batch i's mean loss is weighted by w_i / W,
        its share of the units (W summed over processes), and by the number of processes, since DDP
        averages gradients over them. So 2 processes x batch 4, 1 x batch 4 with 2 accumulation
        steps and 1 x batch 8 take the same step, however the tokens fall. Metrics get the same
        weights, so their mean over processes (Dist.average) is the global batch's."""
        weights = [float(self.weight(b)) for b in micro_batches]
        total = trainer.dist.sum(sum(weights))
        if total == 0:
            raise TrainingError(f"step {trainer.step + 1}: the batch has nothing to learn from "
                                f"(no target tokens or pairs); check the data's loss mask")
        sums: Dict[str, float] = {}
        for i, batch in enumerate(micro_batches):
            share = weights[i] * trainer.dist.world_size / total
            sync = i == len(micro_batches) - 1  # DDP all-reduces gradients on the last one only
            with trainer.no_sync(sync):
                loss, metrics = self.loss(trainer, trainer.wrapped, batch)
                trainer.check_finite(loss, "loss")
                trainer.backward(loss * share if share != 1.0 else loss)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + _plain(v) * share
        sums["grad_norm"] = trainer.optimizer_step("model")
        return sums

    @torch.no_grad()
    def evaluate(self, trainer: "Trainer", run: Dict[str, torch.nn.Module], batches) -> dict:
        return {}


def _to(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class SFTStage(Stage):
    """Next-token cross-entropy on response tokens (or whole sequences, per the dataset's mask)."""

    name = "sft"

    def __init__(self, model):
        self.models = {"model": model}

    def loss(self, trainer, run, batch):
        batch = _to(batch, trainer.device)
        with trainer.autocast():
            # Right padding: pads come after every real token, so causal attention alone keeps them
            # out of real positions (and takes SDPA's fast causal path). Pads carry no loss.
            h = run["model"](batch["input_ids"])  # (B, T, C)
            loss, n = lm_loss(self.models["model"].lm_head.weight, h, batch["input_ids"], batch["loss_mask"])
        return loss, {"loss": loss.detach()}

    def weight(self, batch):
        return batch["loss_mask"][:, 1:].sum().item()  # target tokens (lm_loss's mean is over them)

    @torch.no_grad()
    def evaluate(self, trainer, run, batches):
        total, count = 0.0, 0
        for batch in batches:
            loss, _ = self.loss(trainer, run, batch)
            n = self.weight(batch)
            total += loss.item() * n
            count += n
        if count == 0:
            return {}
        return {"loss": total / count, "ppl": math.exp(min(total / count, 50.0)), "tokens": count}


class RMStage(Stage):
    """Pairwise ranking loss -log sigmoid(r_chosen - r_rejected) on the score of each sequence's
    last token (its EOS; RewardModel.readout, which can also take the original's mean over every
    position); K-wise rankings use every pair once."""

    name = "rm"

    def __init__(self, model):
        self.models = {"model": model}

    def rewards(self, trainer, run, batch):
        """-> (loss, r_chosen, r_rejected); for K-wise rankings the pairs are neighbours in the ranking."""
        batch = _to(batch, trainer.device)
        if "ranked_ids" in batch:  # K-wise: (B, K, T), best response first
            B, K, T = batch["ranked_ids"].shape
            ids, mask = batch["ranked_ids"].view(B * K, T), batch["ranked_mask"].view(B * K, T)
        else:  # (2B, T): one forward for chosen and rejected
            ids = torch.cat([batch["chosen_ids"], batch["rejected_ids"]])
            mask = torch.cat([batch["chosen_mask"], batch["rejected_mask"]])
        with trainer.autocast():
            values = run["model"](ids)  # (N, T) right padded: the causal mask suffices
        r = self.models["model"].readout(values, mask)  # (N,) by default the score at each sequence's EOS
        if "ranked_ids" in batch:
            r = r.view(B, K)
            return kwise_loss(r), r[:, :-1].reshape(-1), r[:, 1:].reshape(-1)
        r_c, r_r = r.chunk(2)
        return pairwise_loss(r_c, r_r), r_c, r_r

    def weight(self, batch):
        """Pairs: B per pairwise batch, B K (K-1) / 2 per K-wise one (kwise_loss's mean is over them)."""
        if "ranked_ids" in batch:
            B, K, _ = batch["ranked_ids"].shape
            return B * K * (K - 1) // 2
        return batch["chosen_ids"].size(0)

    def loss(self, trainer, run, batch):
        loss, r_c, r_r = self.rewards(trainer, run, batch)
        return loss, {"loss": loss.detach(), "accuracy": pairwise_accuracy(r_c, r_r),
                      "margin": (r_c - r_r).mean().detach()}

    @torch.no_grad()
    def evaluate(self, trainer, run, batches):
        """Held-out loss, accuracy, margin, and the raw scale of the scores (mean, std)."""
        losses, chosen, rejected = [], [], []
        for batch in batches:
            loss, r_c, r_r = self.rewards(trainer, run, batch)
            losses.append(loss.item() * r_c.numel())
            chosen.append(r_c)
            rejected.append(r_r)
        if not chosen:
            return {}
        r_c, r_r = torch.cat(chosen), torch.cat(rejected)
        scores = torch.cat([r_c, r_r])
        return {"loss": sum(losses) / r_c.numel(), "accuracy": pairwise_accuracy(r_c, r_r).item(),
                "margin": (r_c - r_r).mean().item(), "pairs": r_c.numel(),
                "score_mean": scores.mean().item(), "score_std": scores.std().item()}


def _reference(policy: GPT, ref: Optional[GPT]):
    """The frozen reference: `ref`, or for a LoRA policy without one the policy with its adapters off."""
    if ref is None and not policy.config.lora_rank:
        raise ValueError("a full fine-tuned policy needs a separate frozen reference model")
    return nullcontext(ref) if ref is not None else lora_disabled(policy)


class DPOStage(Stage):
    """Direct preference optimisation (Rafailov et al. 2023; IPO: Azar et al. 2023) on preference pairs:
    the loss of loss.dpo_loss / loss.ipo_loss on the policy's and the reference's log-probs of each
    pair's chosen and rejected response. The reference is the SFT model: `ref`, frozen, or for a LoRA
    policy (ref None) the policy with its adapters off. Log-probs are summed over each sequence's tokens
    from the first one where chosen and rejected differ (loss.pair_loss_masks): the prompt and a shared
    start of the answers cancel from the loss, and so from the implicit rewards' margin and accuracy."""

    name = "dpo"

    def __init__(self, policy: GPT, cfg: DPOConfig, ref: Optional[GPT] = None):
        _reference(policy, ref)  # fails now, not at the first step, for a full policy without a reference
        self.cfg = cfg
        self.models = {"model": policy}
        self.frozen = {"ref": ref} if ref is not None else {}
        self.loss_fn = {"dpo": dpo_loss, "ipo": ipo_loss}[cfg.loss]

    def logprobs(self, trainer, model, ids, mask):
        """Summed log-probs of the marked tokens of right-padded (N, T) sequences under `model`: (N,)."""
        with trainer.autocast():
            h = model(ids)  # (N, T, C): right padding, the causal mask suffices
            return sequence_logprobs(getattr(model, "module", model).lm_head.weight, h, ids, mask)  # DDP: .module

    def pair(self, trainer, run, batch):
        """-> (loss, implicit reward of chosen (B,), of rejected (B,), policy log-probs of chosen, of rejected)."""
        batch = _to(batch, trainer.device)
        masks = pair_loss_masks(batch["chosen_ids"], batch["chosen_mask"], batch["rejected_ids"],
                                batch["rejected_mask"])
        ids, mask = torch.cat([batch["chosen_ids"], batch["rejected_ids"]]), torch.cat(masks)  # (2B, T): one forward
        with torch.no_grad(), _reference(self.models["model"], self.frozen.get("ref")) as ref:
            ref_c, ref_r = self.logprobs(trainer, ref, ids, mask).chunk(2)
        pol_c, pol_r = self.logprobs(trainer, run["model"], ids, mask).chunk(2)
        loss, r_c, r_r = self.loss_fn(pol_c, pol_r, ref_c, ref_r, self.cfg.beta)
        return loss, r_c, r_r, pol_c.detach(), pol_r.detach()

    def weight(self, batch):
        return batch["chosen_ids"].size(0)  # pairs

    def loss(self, trainer, run, batch):
        loss, r_c, r_r, pol_c, pol_r = self.pair(trainer, run, batch)
        return loss, {"loss": loss.detach(), **self._stats(r_c, r_r, pol_c, pol_r)}

    @staticmethod
    def _stats(r_c, r_r, pol_c, pol_r) -> dict:
        """Implicit-reward accuracy (chosen above rejected, ties half), the rewards and their margin,
        and the policy's log-probs of both sides (in DPO both often fall while their gap grows)."""
        return {"accuracy": pairwise_accuracy(r_c, r_r), "reward_chosen": r_c.mean(), "reward_rejected": r_r.mean(),
                "margin": (r_c - r_r).mean(), "logp_chosen": pol_c.mean(), "logp_rejected": pol_r.mean()}

    @torch.no_grad()
    def evaluate(self, trainer, run, batches):
        """The same quantities over held-out pairs."""
        losses, parts = [], []
        for batch in batches:
            loss, *rest = self.pair(trainer, run, batch)
            losses.append(loss.item() * rest[0].numel())
            parts.append(rest)
        if not parts:
            return {}
        r_c, r_r, pol_c, pol_r = (torch.cat(x) for x in zip(*parts))
        return {"loss": sum(losses) / r_c.numel(), "pairs": r_c.numel(),
                **{k: v.item() for k, v in self._stats(r_c, r_r, pol_c, pol_r).items()}}


class PPOStage(Stage):
    """PPO against a reward model with a per-token KL penalty to the reference (SFT) policy: the
    algorithm is in ppo.py; this is its glue to the Trainer.

    One trainer step = one rollout batch (ppo.collect_rollout), then `ppo_epochs` passes of
    minibatches (ppo.ppo_update), each one actor and one critic optimizer step. With
    cfg.advantage "rloo" there is no critic (critic=None) and the trainer's batches hold
    cfg.prompts_per_rollout prompts, each answered rloo_k times.

    Under DDP every process samples its own rollout from its share of the prompts; the statistics
    that span the batch are global (the score normaliser's fit, reward and advantage whitening,
    the KL the controller steers), so N processes behave as one with an N times larger rollout.
    The per-minibatch losses stay per process (DDP averages their gradients)."""

    name = "ppo"

    def __init__(self, actor, critic, cfg, reward_model=None, reward_fn=None, ref=None, eval_scorers=None):
        """`reward_model` (a RewardModel) or `reward_fn(generation, prompts) -> (B,) scores` gives the
        score. `ref`: a frozen reference policy; None when the actor is LoRA (the reference is then
        the actor with its adapters switched off). `eval_scorers`: extra name -> fn(generation,
        prompts) scores reported at evaluation (e.g. the synthetic task's gold reward)."""
        if (reward_model is None) == (reward_fn is None):
            raise ValueError("give exactly one of reward_model and reward_fn")
        if ref is None and not actor.config.lora_rank:
            raise ValueError("a full fine-tuned actor needs a separate frozen reference model")
        if (critic is None) != (cfg.advantage == "rloo"):
            raise ValueError("RLOO trains no critic; the other advantages need one")
        assert isinstance(actor, GPT)
        self.cfg = cfg
        self.models = {"model": actor, **({"critic": critic} if critic is not None else {})}
        self.frozen = {k: v for k, v in (("ref", ref), ("rm", reward_model)) if v is not None}
        self.reward_fn = reward_fn
        self.eval_scorers = eval_scorers or {}
        self.lrs = {"model": cfg.actor_lr, "critic": cfg.critic_lr}
        samples = cfg.rollout_batch_size  # sequences per rollout, whatever the advantage
        epochs, minibatch_size = update_schedule(cfg, samples)
        self.optimizer_steps_per_batch = epochs * (samples // minibatch_size)
        self.kl = AdaptiveKL(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon)  # saved with checkpoints
        self.normalizer = ScoreNormalizer(enabled=cfg.normalize_reward)  # saved with checkpoints

    def extra_state(self) -> dict:
        return {**self.kl.state_dict(), **self.normalizer.state_dict()}

    def load_extra_state(self, state: dict):
        self.kl.load_state_dict(state)
        self.normalizer.load_state_dict(state)

    def ppo_models(self, trainer, run) -> PPOModels:
        return PPOModels(run["model"], run.get("critic"), self.frozen.get("ref"), self.cfg.temperature,
                         trainer.autocast, self.cfg.rollout_top_k, self.cfg.decode_precision,
                         self.cfg.decode_compile)

    def _scorer(self, trainer, fn):
        """fn(generation, prompts) -> scores, as fp32 on the trainer's device."""
        return lambda gen, prompts: torch.as_tensor(fn(gen, prompts), dtype=torch.float32, device=trainer.device)

    def score_fn(self, trainer):
        """The reward: the reward model's score of each response (+ its EOS), or `reward_fn`'s."""
        if self.reward_fn is not None:
            return self._scorer(trainer, self.reward_fn)

        def rm_score(gen, prompts):
            with trainer.autocast():
                return self.frozen["rm"].score(gen.tokens, gen.attention_mask).float()
        return rm_score

    def train_step(self, trainer, micro_batches):
        (batch,) = micro_batches
        batch = _to(batch, trainer.device)
        models = self.ppo_models(trainer, trainer.wrapped)
        t0 = time.time()
        rollout = collect_rollout(models, batch["input_ids"], batch["attention_mask"], batch["prompts"],
                                  self.score_fn(trainer), self.normalizer, self.kl.value, self.cfg,
                                  gather=trainer.dist.concat if trainer.dist.enabled else None)
        t1 = time.time()
        stats = ppo_update(rollout, models, self.cfg,
                           actor_step=lambda loss: trainer.minimize("model", loss, "policy loss"),
                           critic_step=lambda loss: trainer.minimize("critic", loss, "value loss"))
        stats |= rollout_stats(rollout)
        stats["kl"] = trainer.dist.mean(stats["kl"])  # what the KL controller steers: all processes' mean
        stats |= {"kl_coef": self.kl.value, "gen_s": rollout.generation_seconds,
                  "prep_s": t1 - t0 - rollout.generation_seconds, "train_s": time.time() - t1}
        self.kl.update(stats["kl"], rollout.tokens.size(0) * trainer.dist.world_size)
        return stats

    @torch.no_grad()
    def evaluate(self, trainer, run, batches):
        """On held-out prompts, with a fixed sampling seed: RM score, KL to the reference, length,
        EOS rate and any extra scorers (e.g. the gold reward), averaged over responses."""
        generator = torch.Generator(trainer.device).manual_seed(trainer.cfg.seed + 1)
        extra = {name: self._scorer(trainer, fn) for name, fn in self.eval_scorers.items()}
        batches = (_to(batch, trainer.device) for batch in batches)
        return evaluate_policy(self.ppo_models(trainer, run), batches, self.score_fn(trainer), self.normalizer,
                               self.cfg, extra, generator)


# -----------------------------------------------------------------------------
# The loop


def lr_lambda(cfg: TrainConfig, total_steps: int):
    """Linear warmup to 1, then cosine / linear decay to min_lr_ratio (or constant)."""
    def f(step):
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape
    return f


class Trainer:
    def __init__(self, stage: Stage, cfg: TrainConfig, run_dir: str, train_set, collate, eval_set=None,
                 preset: Optional[str] = None, config_record: Optional[dict] = None, dist_info: Optional[Dist] = None):
        self.stage, self.cfg, self.run_dir = stage, cfg, run_dir
        self.train_set, self.eval_set, self.collate = train_set, eval_set, collate
        self.preset = preset
        self.dist = dist_info or Dist()
        self.device = process_device(cfg.device, self.dist)
        flush_denormals()
        self.dist.init(self.device)
        self.precision = default_precision(self.device) if cfg.precision == "auto" else cfg.precision
        autocast(self.device, self.precision)  # validates the choice early (fp16 on CPU is refused)
        self.config_record = config_record or {}

        for m in list(stage.models.values()) + list(stage.frozen.values()):
            m.to(self.device)
        for m in stage.frozen.values():
            m.eval().requires_grad_(False)
        self.wrapped = {}
        self.optimizers, self.schedulers = {}, {}
        n_batches = len(shard_batches(len(train_set), cfg.batch_size, epoch=0, seed=cfg.seed,
                                      rank=self.dist.rank, world_size=self.dist.world_size))
        if n_batches < cfg.grad_accum:
            raise UserError(f"{len(train_set)} training examples make {n_batches} batches of {cfg.batch_size} "
                            f"per process: fewer than one optimizer step; lower -b or add data")
        self.total_steps = cfg.max_steps or max(1, int(cfg.epochs * n_batches // cfg.grad_accum))
        for name, model in stage.models.items():
            model.train()
            self.wrapped[name] = self._wrap(model)
            params = [p for p in model.parameters() if p.requires_grad]
            if not params:
                continue
            decay = [p for p in params if p.dim() >= 2]
            no_decay = [p for p in params if p.dim() < 2]
            self.optimizers[name] = torch.optim.AdamW(
                [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                lr=stage.lrs.get(name, cfg.lr), betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps,
                fused=self.device.type in ("cuda", "cpu"))  # one kernel per step: 1.4x faster PPO on CPU
            opt_steps = self.total_steps * stage.optimizer_steps_per_batch
            self.schedulers[name] = torch.optim.lr_scheduler.LambdaLR(self.optimizers[name], lr_lambda(cfg, opt_steps))
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        self.step = 0
        self.state = {"step": 0, "epoch": 0, "batch_in_epoch": 0}

    # --- helpers for stages ---

    def _wrap(self, model):
        if self.cfg.compile:
            model = torch.compile(model)
        if self.dist.enabled and any(p.requires_grad for p in model.parameters()):
            return DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                       broadcast_buffers=False)
        return model

    def autocast(self):
        return autocast(self.device, self.precision)

    def no_sync(self, sync: bool):
        contexts = [m.no_sync() for m in self.wrapped.values() if isinstance(m, DDP)] if not sync else []
        if not contexts:
            return nullcontext()
        from contextlib import ExitStack
        stack = ExitStack()
        for c in contexts:
            stack.enter_context(c)
        return stack

    def backward(self, loss):
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def optimizer_step(self, name: str) -> float:
        """Unscale (fp16), clip the gradient norm, step, zero the gradients, advance the schedule.
        Returns the gradient norm before clipping."""
        opt = self.optimizers[name]
        params = [p for g in opt.param_groups for p in g["params"]]
        if self.scaler:
            self.scaler.unscale_(opt)
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if self.scaler:
            self.scaler.step(opt)
            self.scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        self.schedulers[name].step()
        return norm.item()

    def minimize(self, name: str, loss: torch.Tensor, what: str = "loss") -> float:
        """One optimizer step of model `name` on `loss` (checked finite first); the gradient norm."""
        self.check_finite(loss, what)
        self.backward(loss)
        return self.optimizer_step(name)

    def check_finite(self, value: torch.Tensor, what: str):
        if not torch.isfinite(value).all():
            last = latest_checkpoint(self.run_dir)
            keep = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
            raise TrainingError(f"{what} became {value.item()} at step {self.step + 1}; {keep}. "
                                f"Try a lower --lr or fp32 precision.")

    # --- data ---

    def _epoch_batches(self, epoch: int):
        return shard_batches(len(self.train_set), self.cfg.batch_size, epoch=epoch, seed=self.cfg.seed,
                             rank=self.dist.rank, world_size=self.dist.world_size)

    def _train_batches(self):
        """Yield micro-batches forever, from the saved data position on; keeps self.state current."""
        epoch, start = self.state["epoch"], self.state["batch_in_epoch"]
        while True:
            batches = self._epoch_batches(epoch)
            for i in range(start, len(batches)):
                self.state["epoch"], self.state["batch_in_epoch"] = epoch, i + 1
                yield self.collate([self.train_set[j] for j in batches[i]])
            epoch, start = epoch + 1, 0
            self.state["epoch"], self.state["batch_in_epoch"] = epoch, 0

    def _eval_batches(self):
        n = len(self.eval_set)
        bs = self.cfg.batch_size
        limit = self.cfg.eval_batches or math.ceil(n / bs)
        for i in range(0, min(n, limit * bs), bs):
            yield self.collate([self.eval_set[j] for j in range(i, min(n, i + bs))])

    # --- the loop ---

    def evaluate(self) -> dict:
        """Held-out metrics, computed on the main process while the others wait."""
        metrics = {}
        if self.eval_set is not None and self.dist.is_main:
            for m in self.stage.models.values():
                m.eval()
            try:  # the plain modules: a DDP forward on one process alone could wait on the others
                metrics = self.stage.evaluate(self, dict(self.stage.models), self._eval_batches())
                metrics = {f"eval/{k}": v for k, v in metrics.items()}
            finally:
                for m in self.stage.models.values():
                    m.train()
        self.dist.barrier()
        return metrics

    def save(self):
        rngs = self.dist.gather(rng_state())  # every process's generators: dropout and sampling differ
        if self.dist.is_main:
            save_training_checkpoint(
                self.run_dir, self.step, self.stage.models, self.stage.name, self.preset, self.optimizers,
                self.schedulers, {**self.state, "step": self.step, "stage": self.stage.extra_state()}, rngs,
                self.cfg.keep_last, self.scaler)
        self.dist.barrier()

    def resume(self, ckpt_dir: str):
        try:
            self.state, rngs = load_training_checkpoint(ckpt_dir, self.stage.models, self.optimizers,
                                                        self.schedulers, self.scaler, stage=self.stage.name)
        except UserError as e:
            older = [c for c in sorted(glob.glob(os.path.join(self.run_dir, "checkpoints", "step_*")))
                     if os.path.basename(c) < os.path.basename(ckpt_dir)]
            hint = f"; delete {ckpt_dir} to resume from {older[-1]}" if older else ""
            raise UserError(f"cannot resume from {ckpt_dir}: {e}{hint}") from None
        self.step = self.state["step"]
        self.stage.load_extra_state(self.state.pop("stage", {}))
        if len(rngs) != self.dist.world_size:
            raise UserError(f"{ckpt_dir} was written by {len(rngs)} processes; resume it with as many")
        set_rng_state(rngs[self.dist.rank])

    def fit(self, resume: bool = False) -> dict:
        cfg, is_main = self.cfg, self.dist.is_main
        resume_step = None
        if resume:
            ckpt = latest_checkpoint(self.run_dir)
            if ckpt is None:
                raise UserError(f"{self.run_dir} has no complete checkpoint to resume from")
            self.resume(ckpt)
            resume_step = self.step
        if is_main:
            write_json_atomic(os.path.join(self.run_dir, "config.json"), self.config_record)
        wandb_run = None
        if cfg.wandb and is_main:
            self.state.setdefault("wandb_id", None)
            wandb_run = start_wandb(cfg, self.run_dir, self.config_record, self.state["wandb_id"])
            self.state["wandb_id"] = wandb_run.id
        log = MetricsLog(self.run_dir, is_main, wandb_run, resume_step)
        bar = None
        if is_main and is_interactive():
            from tqdm import tqdm
            bar = tqdm(total=self.total_steps, initial=self.step, desc=self.stage.name, dynamic_ncols=True)

        if cfg.eval_every and self.step == 0:  # the starting point of every learning curve
            log.log(0, self.evaluate())
        batches = self._train_batches()
        t0, elapsed0 = time.time(), self.state.get("elapsed", 0.0)
        last: dict = {}
        try:
            while self.step < self.total_steps:
                micro = [next(batches) for _ in range(cfg.grad_accum)]
                metrics = self.dist.average(self.stage.train_step(self, micro))
                self.step += 1
                self.state["elapsed"] = elapsed0 + time.time() - t0
                if bar:
                    bar.update(1)
                    bar.set_postfix({k: f"{_plain(v):.4g}" for k, v in list(metrics.items())[:4]})
                if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                    lrs = {f"lr/{k}": s.get_last_lr()[0] for k, s in self.schedulers.items()}
                    last = {**metrics, **lrs, "epoch": self.state["epoch"], "elapsed_s": self.state["elapsed"]}
                    log.log(self.step, last)
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < self.total_steps:
                    log.log(self.step, self.evaluate())
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < self.total_steps:
                    self.save()
        finally:
            if bar:
                bar.close()
        final_eval = self.evaluate()
        log.log(self.step, final_eval)
        if is_main:
            for name, model in self.stage.models.items():
                save_model(model, os.path.join(self.run_dir, "final", *([] if name == "model" else [name])),
                           self.stage.name, self.preset)
            write_json_atomic(os.path.join(self.run_dir, "final", "config.json"), self.config_record)
        if wandb_run is not None:
            wandb_run.finish()
        self.dist.barrier()
        return {**last, **final_eval}
