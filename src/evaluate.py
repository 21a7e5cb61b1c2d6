"""Compare models answer by answer with a judge: win-rates, confidence intervals, the judge's position bias.

Every model answers the same prompts ("\\n\\nHuman: {prompt}\\n\\nAssistant:", sampled, stopped at EOS
or at "\\n\\nHuman:"); a judge then compares two models' answers prompt by prompt. Judges (src/judges.py;
--judge, repeatable):
  openai              an OpenAI-compatible chat model (--judge-model, --base-url), temperature 0, asked
                      about every pair in both orders; a verdict that flips with the order is a tie
  rm:RUN_DIR          a reward-model run scores each answer (+ EOS, as it was trained); higher wins
  gold                the synthetic task's gold reward (src/task.py); needs the task's prompts;
                      gold:correctness and gold:style score its two parts alone
  function:MOD:ATTR   any fn(prompt, response) -> float; the response text ends with "<|endoftext|>"
                      when the model emitted EOS; MOD is imported from src/ or the current directory
  position-biased:P:SPEC  a simulated chat judge that says "B" with probability P whatever the answers,
                      else the verdict of the score judge SPEC: what a position bias does to a protocol
--fixed-order asks a chat judge about each pair once, the first model of each comparison (the newer one)
always shown as B: the original project's protocol, kept to measure how much it inflates a win-rate.
Answers and verdicts are cached in --cache-dir: a rerun with another judge generates nothing, a changed
model is never served stale answers, and a killed run resumes without asking the judge anything twice.
Output: a Markdown table on stdout; results.json, generations.jsonl and judgments.jsonl in the
evaluation directory (runs/eval_<name>_<stamp>/, or --out-dir).

Examples:
  # offline, on a fresh clone: the README pipeline's tiny SFT and PPO models (random init, so no
  # vanilla GPT-2 to compare with), judged by the synthetic task's gold reward and by its reward model
  python src/evaluate.py -n demo -s runs/pipeline_<stamp>/sft -p runs/pipeline_<stamp>/ppo \\
      --prompts synthetic:test_prompts --limit 200 --max-new-tokens 32 \\
      --judge gold --judge rm:runs/pipeline_<stamp>/rm

  # the original's evaluation: vanilla GPT-2 medium, SFT and PPO answer 153 awesome-chatgpt-prompts,
  # judged by an OpenAI model (key from OPENAI_API_KEY or a JSON file openai.key {"OPENAI_API_KEY": ...})
  python src/evaluate.py -n hh -s runs/sft_hh_<stamp> -p runs/ppo_hh_<stamp> --judge openai --judge-model gpt-4o-mini

  # the same answers (cached) judged by a local OpenAI-compatible server (vLLM, llama.cpp, Ollama)
  OPENAI_API_KEY=none python src/evaluate.py -n hh -s runs/sft_hh_<stamp> -p runs/ppo_hh_<stamp> \\
      --base-url http://localhost:8000/v1 --judge-model Qwen/Qwen2.5-7B-Instruct
"""
import hashlib
import json
import os
import re
import sys
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

from checkpoints import checkpoint_info, is_checkpoint, load_model
from cli import parser
from common import (
    UserError,
    autocast,
    default_precision,
    is_interactive,
    looks_like_path,
    make_run_dir,
    resolve_device,
    run_cli,
    write_json_atomic,
)
from configs import EOS_ID
from dataset import load_prompts
from gpt import GPT
from judges import CACHE_VERSION, JUDGE_FORMS, ChatJudge, json_sha256, make_judge, public_url, why_unreadable
from tokenizer import HUMAN, get_tokenizer

STOP = HUMAN  # a model that starts the next human turn has finished its answer


def log(*args):
    """Progress and notes go to stderr; stdout carries only the results table."""
    print(*args, file=sys.stderr, flush=True)


class JsonlCache:
    """A dict kept in an append-only JSON-lines file, one {"key": ..., **value} per line, written as each
    value arrives: a killed run loses at most the line being written (a torn last line is skipped, and so
    is any line that is not such an object with a string key). path=None keeps it in memory only. Thread-safe."""

    def __init__(self, path: Optional[str]):
        self.path, self.data, self.lock = path, {}, threading.Lock()
        if not path or not os.path.exists(path):
            return
        with open(path, "rb") as f:
            raw = f.read()
        for line in raw.decode("utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # the torn last line of a killed run
            if isinstance(record, dict) and isinstance(record.get("key"), str):
                self.data[record.pop("key")] = record
        if raw and not raw.endswith(b"\n"):
            with open(path, "a") as f:
                f.write("\n")  # so the next record starts on its own line

    def __contains__(self, key):
        return key in self.data

    def get(self, key):
        return self.data.get(key)

    def put(self, key: str, value: dict):
        with self.lock:
            self.data[key] = value
            if self.path:
                os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
                with open(self.path, "a") as f:
                    f.write(json.dumps({"key": key, **value}) + "\n")


# -----------------------------------------------------------------------------
# Models


def check_model_source(source: str, what: str, local_only: bool = False):
    """Fail early, before any model is loaded, on a path that does not exist."""
    if not os.path.exists(source) and (local_only or looks_like_path(source)):
        raise UserError(f"{what}: checkpoint not found: {source}")


def load_lm(source: str, what: str = "model") -> Tuple[GPT, dict]:
    """The language model at `source` and what it is: one of our run / checkpoint directories or
    files (an SFT or PPO run's model; for a reward-model run its GPT-2 backbone), a directory written
    by transformers' save_pretrained (e.g. an --export-hf), or a hub name."""
    check_model_source(source, what)
    if is_checkpoint(source):
        model, info = load_model(source, what=what)
        desc = {"source": source, "file": info["file"], "stage": info["stage"], "kind": info["kind"],
                "preset": info.get("preset")}
        if info["kind"] != "lm":
            model = model.backbone  # its tied output layer still makes it a language model
            desc["note"] = f"the GPT-2 backbone of a {info['kind']} model"
    else:
        model = GPT.from_pretrained(source)
        desc = {"source": source, "stage": "pretrained", "kind": "lm"}
    return model.eval(), desc


def model_fingerprint(model: GPT) -> str:
    """sha256 of the weights actually loaded (every tensor of the state dict, LoRA adapters included)
    and of the config fields that change the function they compute."""
    h = hashlib.sha256()
    skip = ("dropout", "lora_dropout", "gradient_checkpointing", "pretrained", "score_mean_with_padding")
    h.update(json.dumps({k: v for k, v in model.config.to_dict().items() if k not in skip}, sort_keys=True).encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


# -----------------------------------------------------------------------------
# Generation


@dataclass(frozen=True)
class GenParams:
    """How every model answers (all of it, with the seed, is part of the answer cache's key)."""

    max_new_tokens: int = 100  # response budget (the original's 100), capped at half a model's block size
    temperature: float = 0.9  # the original's sampling temperature; 0 = greedy
    top_k: int = 200  # sample from the k most likely tokens (the original's 200); 0 = off
    top_p: float = 1.0  # nucleus sampling; 1 = off
    seed: int = 0  # seeds the sampling (see generate_answers) and the bootstrap
    batch_size: int = 16  # prompts per generate call, left padded

    def __post_init__(self):
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise UserError("--max-new-tokens and --batch-size must be at least 1")
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise UserError("need --temperature >= 0, --top-k >= 0 and 0 < --top-p <= 1")


def answer_from_tokens(tok, new_ids: Sequence[int]) -> dict:
    """One generated response (its token ids, EOS included if emitted) -> the answer record:
    text (stop string and EOS removed), ended (the model emitted EOS), finish ("eos" | "stop" |
    "length") and tokens (the answer's length: tokens generated before EOS, or the text's tokens when
    a stop string was cut off)."""
    new_ids = list(new_ids)
    ended = bool(new_ids) and new_ids[-1] == EOS_ID
    ids = new_ids[:-1] if ended else new_ids
    text, finish, n_tokens = tok.decode(ids), "eos" if ended else "length", len(ids)
    if STOP in text:
        text, finish = text[:text.index(STOP)], "stop"
        n_tokens = len(tok.encode(text, allow_special=False))
    return {"text": text, "ended": ended, "finish": finish, "tokens": n_tokens}


def _batch_seed(seed: int, prompts: Sequence[str]) -> int:
    return int(json_sha256([seed, list(prompts)])[:15], 16)  # < 2**60, fits manual_seed


@torch.no_grad()
def _generate_batch(model, tok, prompts, ids, params, max_new, device, precision) -> List[dict]:
    prompt_ids, prompt_mask = tok.pad(ids, padding_side="left")
    generator = torch.Generator(device=device).manual_seed(_batch_seed(params.seed, prompts))
    with autocast(device, precision):
        out = model.generate(prompt_ids.to(device), prompt_mask.to(device), max_new_tokens=max_new,
                             temperature=params.temperature, top_k=params.top_k or None, top_p=params.top_p,
                             eos_id=EOS_ID, stop_strings=[STOP], tokenizer=tok, generator=generator)
    Tp = out.prompt_len
    new = [row[Tp:][mask[Tp:].bool()].tolist() for row, mask in zip(out.tokens.cpu(), out.response_mask.cpu())]
    return [answer_from_tokens(tok, ids) for ids in new]


def generate_answers(models: Dict[str, object], prompts: List[str], params: GenParams = GenParams(),
                     device="cpu", precision: str = "fp32", cache_path: Optional[str] = None):
    """Each model's answer to each prompt: ({name: [answer per prompt]}, {name: model info}).

    `models` maps a name to a path / hub name (see load_lm), to a GPT in memory, or to an answer source:
    an object whose `.answers(prompts, params, device, precision, cache_path)` returns (answers, info),
    such as best_of_n.BestOfN, which answers with the best of n samples of a policy. Answers are cached
    in `cache_path` (JSON lines) under the model's fingerprint, the prompt, every generation setting
    (the effective budget, device type and precision included) and the seed. Prompts are generated in
    batches of consecutive prompts, left padded. A batch's random stream is seeded from the seed and the
    batch's prompts: rerunning a prompt set reproduces it, and every model draws the same random numbers
    for a prompt (a paired comparison: two models that agree give the same answer). An answer also
    depends on the other prompts in its batch (the shared stream; padding changes the arithmetic
    slightly); with batch_size=1 it depends on its own prompt only. A batch runs when any of its prompts
    has no cached answer; cached answers are kept.
    """
    device = torch.device(device)
    tok, cache = get_tokenizer(), JsonlCache(cache_path)
    prompt_ids = tok.encode_batch(prompts, allow_special=False)
    answers, infos = {}, {}
    for name, spec in models.items():
        if hasattr(spec, "answers"):  # an answer source that samples through this function (best_of_n.BestOfN)
            answers[name], infos[name] = spec.answers(prompts, params, device, precision, cache_path)
            continue
        model, desc = (spec, {"source": "<in memory>"}) if isinstance(spec, GPT) else load_lm(spec, f"model {name}")
        home, was_training = next(model.parameters()).device, model.training
        block = model.config.block_size
        max_new = min(params.max_new_tokens, block // 2)
        keep = block - max_new  # prompt tokens kept: the end of a longer prompt, where the answer starts
        setting = {**asdict(params), "max_new_tokens": max_new, "prompt_tokens": keep, "stop": STOP,
                   "device": device.type, "precision": precision, "version": CACHE_VERSION,
                   "model": model_fingerprint(model)}
        keys = [json_sha256([setting, p]) for p in prompts]
        bs = params.batch_size
        batches = [range(i, min(i + bs, len(prompts))) for i in range(0, len(prompts), bs)]
        todo = [rows for rows in batches if any(keys[i] not in cache for i in rows)]
        generated = 0
        if todo:
            model.to(device).eval()
            for rows in tqdm(todo, desc=f"{name}: generating", disable=not is_interactive()):
                out = _generate_batch(model, tok, [prompts[i] for i in rows], [prompt_ids[i][-keep:] for i in rows],
                                      params, max_new, device, precision)
                for i, answer in zip(rows, out):
                    if keys[i] not in cache:
                        cache.put(keys[i], answer)
                        generated += 1
            model.to(home).train(was_training)
        answers[name] = [dict(cache.get(k)) for k in keys]
        infos[name] = {**desc, "fingerprint": setting["model"], "max_new_tokens": max_new,
                       "truncated_prompts": sum(len(ids) > keep for ids in prompt_ids),
                       "generated": generated, "cached": len(prompts) - generated}
        if max_new < params.max_new_tokens:
            log(f"{name}: max_new_tokens capped at {max_new} (half its block size {block})")
        log(f"{name}: {desc.get('file', desc['source'])} ({desc.get('note') or desc.get('stage')}), "
            f"fingerprint {setting['model'][:12]}: {generated} answers generated, {len(prompts) - generated} cached")
    return answers, infos


# -----------------------------------------------------------------------------
# Comparing


def _outcome(first: Optional[str], second: Optional[str]) -> Tuple[Optional[str], Optional[bool]]:
    """(outcome for model a, consistent?) from the verdicts with a's answer shown first (A) and second (B).
    Both orders must name the same winner for a win or a loss; anything else is a tie."""
    if first is None or second is None:
        return None, None
    a1 = {"A": "a", "B": "b", "tie": "tie"}[first]
    a2 = {"A": "b", "B": "a", "tie": "tie"}[second]
    outcome = {"a": "win", "b": "loss", "tie": "tie"}[a1] if a1 == a2 else "tie"
    return outcome, a1 == a2


MAX_ASKS = 3  # times one (pair, order) is asked while its replies stay unreadable


def _needs_asking(cache: JsonlCache, key: str) -> bool:
    """Not asked yet, or every reply so far unreadable and fewer than MAX_ASKS of them. A record that holds
    no verdict A / B / tie (another version's, a hand edit) counts as one unreadable reply."""
    record = cache.get(key)
    if record is None:
        return True
    asks = record.get("asks", 1)
    return record.get("verdict") not in ("A", "B", "tie") and (not isinstance(asks, int) or asks < MAX_ASKS)


def _ask_all(judge: ChatJudge, requests: Dict[str, tuple], cache: JsonlCache, max_concurrency: int):
    """Ask the judge every request without a readable verdict in the cache, at most `max_concurrency` at a
    time, each verdict appended to the cache as it arrives; an unreadable reply is asked again, up to
    MAX_ASKS times in all, and the record keeps how many times it was asked and why the last reply ended.
    Replies still unreadable at the end are logged with their reasons: they are no verdict, not a lost one."""
    for _ in range(MAX_ASKS):
        todo = {k: r for k, r in requests.items() if _needs_asking(cache, k)}
        if not todo:
            break
        log(f"{judge.name}: {len(todo)} requests to {judge.server} ({len(requests) - len(todo)} answered)")

        def ask(key, request):
            verdict, reply, finish = judge.ask(*request)
            asks = (cache.get(key) or {}).get("asks", 0)
            asks = (asks if isinstance(asks, int) else 1) + 1
            cache.put(key, {"judge": judge.name, "verdict": verdict, "reply": reply, "finish_reason": finish,
                            "asks": asks})

        pool = ThreadPoolExecutor(max_workers=max_concurrency)
        try:
            futures = [pool.submit(ask, k, r) for k, r in todo.items()]
            for f in tqdm(as_completed(futures), total=len(futures), desc=judge.name, disable=not is_interactive()):
                f.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # on failure: requests in flight finish and are cached
    why = {}
    for record in (cache.get(k) or {} for k in requests):
        reason = why_unreadable(record.get("verdict"), record.get("reply"), record.get("finish_reason"))
        if reason:
            why[reason] = why.get(reason, 0) + 1
    if why:
        log(f"{judge.name}: {sum(why.values())} of {len(requests)} replies unreadable after up to {MAX_ASKS} asks "
            f"({', '.join(f'{n} {w}' for w, n in sorted(why.items()))}); they count as no verdict, and "
            f"judgments.jsonl keeps each reply and why" + ("; a larger --judge-max-tokens may help" if "length" in why
                                                           else ""))


def judge_comparisons(prompts: List[str], answers: Dict[str, List[dict]], comparisons: List[Tuple[str, str]],
                      judge, cache_path: Optional[str] = None, max_concurrency: int = 4,
                      fixed_order: bool = False) -> Dict[str, List[dict]]:
    """One record per prompt for each comparison (a, b), keyed "a:b":
    outcome ("win" | "tie" | "loss" for a, None when a verdict could not be read), identical (the two
    answers are the same text), and
    - score judges: scores [score of a, score of b], consistent True;
    - chat judges: verdicts [with a's answer first, with b's answer first] as the judge gave them
      ('A' | 'B' | 'tie' | None), and per order the last reply, its finish_reasons, asks (times asked) and
      unreadable (None, or why the reply could not be read: judges.why_unreadable); consistent (the two
      orders agree; None if not both readable); status "judged" or "unreadable" (outcome None).
      Identical answers are a tie without asking the judge (verdicts None, status "identical").
      fixed_order (the original's protocol): only the order with a's answer second (as B) is asked and
      decides alone; the records say fixed_order True and hold None for the order not asked.
    Chat verdicts come from and go to `cache_path`, so no readable (pair, order) is ever asked twice."""
    for a, b in comparisons:
        for name in (a, b):
            if name not in answers:
                raise UserError(f"comparison {a}:{b} names {name!r}, which is not among the models: "
                                f"{', '.join(answers)}")
    if judge.kind == "score":
        needed = {name for pair in comparisons for name in pair}
        scores = {name: judge.score_fn(prompts, answers[name]) for name in needed}
        return {f"{a}:{b}": [{"i": i, "outcome": "win" if sa > sb else "loss" if sa < sb else "tie",
                              "identical": x["text"].strip() == y["text"].strip(), "scores": [sa, sb],
                              "consistent": True}
                             for i, (sa, sb, x, y) in enumerate(zip(scores[a], scores[b], answers[a], answers[b]))]
                for a, b in comparisons}

    cache = JsonlCache(cache_path)
    requests = {}
    for a, b in comparisons:
        for p, x, y in zip(prompts, answers[a], answers[b]):
            if x["text"].strip() != y["text"].strip():
                if not fixed_order:
                    requests[judge.key(p, x["text"], y["text"])] = (p, x["text"], y["text"])
                requests[judge.key(p, y["text"], x["text"])] = (p, y["text"], x["text"])
    _ask_all(judge, requests, cache, max_concurrency)
    not_asked = {"finish_reason": "not_asked", "asks": 0}
    results = {}
    for a, b in comparisons:
        records = []
        for i, (p, x, y) in enumerate(zip(prompts, answers[a], answers[b])):
            if x["text"].strip() == y["text"].strip():
                records.append({"i": i, "outcome": "tie", "identical": True, "verdicts": None, "consistent": None,
                                "status": "identical"})
                continue
            asked = [None if fixed_order else cache.get(judge.key(p, x["text"], y["text"])) or not_asked,
                     cache.get(judge.key(p, y["text"], x["text"])) or not_asked]
            verdicts = [r.get("verdict") if r and r.get("verdict") in ("A", "B", "tie") else None for r in asked]
            if fixed_order:  # a is B: "B" is a win for a, "A" a loss
                outcome, consistent = {"B": "win", "A": "loss", "tie": "tie", None: None}[verdicts[1]], None
            else:
                outcome, consistent = _outcome(*verdicts)
            asked = [r or {"asks": 0} for r in asked]  # the order a fixed-order protocol never asks
            records.append({"i": i, "outcome": outcome, "identical": False, "consistent": consistent,
                            "verdicts": verdicts, "replies": [r.get("reply") for r in asked],
                            "finish_reasons": [r.get("finish_reason") for r in asked],
                            "asks": [r.get("asks", 1) for r in asked],
                            "unreadable": [None if k == 0 and fixed_order else
                                           why_unreadable(v, r.get("reply"), r.get("finish_reason"))
                                           for k, (v, r) in enumerate(zip(verdicts, asked))],
                            "status": "unreadable" if outcome is None else "judged",
                            **({"fixed_order": True} if fixed_order else {})})
        results[f"{a}:{b}"] = records
    return results


def _asked_verdicts(record: dict):
    """(order, verdict) of the orders the judge was asked about: both, or with fixed_order the second."""
    return [(k, v) for k, v in enumerate(record["verdicts"]) if not (k == 0 and record.get("fixed_order"))]


def unreadable_counts(records: List[dict]) -> dict:
    """Unreadable replies of one comparison by position, unreadable_a_first (a's answer shown first) and
    unreadable_b_first, and by reason (judges.why_unreadable; "unknown" for records that do not say): a
    judge that fails more on one order, or keeps hitting max_tokens, shows in the summary."""
    per_order, reasons = [0, 0], {}
    for r in records:
        if r.get("identical") or not r.get("verdicts"):
            continue
        why = r.get("unreadable") or [None, None]
        for k, v in _asked_verdicts(r):
            if v is None:
                per_order[k] += 1
                reasons[why[k] or "unknown"] = reasons.get(why[k] or "unknown", 0) + 1
    return {"unreadable_a_first": per_order[0], "unreadable_b_first": per_order[1],
            "unreadable_reasons": dict(sorted(reasons.items()))}


# -----------------------------------------------------------------------------
# Statistics


def bootstrap_ci(values: Sequence[float], n_boot: int = 10000, seed: int = 0, level: float = 0.95,
                 clusters: Optional[Sequence] = None):
    """Percentile bootstrap interval of the mean of `values` (one per prompt); (nan, nan) for no values.

    With `clusters` (one label per value, e.g. the fact a prompt asks about) whole clusters are
    resampled with replacement, so prompts that share a cause of success or failure are not
    counted as independent evidence; without, each value is its own cluster."""
    return runs_bootstrap_ci([(values, clusters)], n_boot, seed, level)


def runs_bootstrap_ci(runs: Sequence[Tuple[Sequence[float], Optional[Sequence]]], n_boot: int = 10000,
                      seed: int = 0, level: float = 0.95):
    """Percentile bootstrap interval of the mean over runs (e.g. seeds) of each run's mean value.
    `runs`: [(values, cluster labels or None)]. One draw of clusters serves every run, so a cluster
    that is in every run (a fact asked in every seed) counts once, not once per run."""
    runs = [(np.asarray(v, dtype=float), c) for v, c in runs]
    if not all(len(v) for v, _ in runs):
        return float("nan"), float("nan")
    labelled = [np.arange(len(v)) if c is None else np.asarray(c) for v, c in runs]
    names, inverse = np.unique(np.concatenate(labelled), return_inverse=True)
    k, bounds = len(names), np.cumsum([0] + [len(v) for v, _ in runs])
    sums, counts = [], []  # per run: (K,) sum of values and number of values in each cluster
    for r, (v, _) in enumerate(runs):
        labels = inverse[bounds[r]:bounds[r + 1]]
        sums.append(np.bincount(labels, weights=v, minlength=k))
        counts.append(np.bincount(labels, minlength=k).astype(float))
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    chunk = max(1, 4_000_000 // k)  # resamples per step, so the index array stays small
    with np.errstate(invalid="ignore", divide="ignore"):  # a draw that misses a run's clusters: nan, dropped
        for s in range(0, n_boot, chunk):
            idx = rng.integers(0, k, size=(min(chunk, n_boot - s), k))  # (chunk, K) clusters drawn
            per_run = [su[idx].sum(axis=1) / co[idx].sum(axis=1) for su, co in zip(sums, counts)]
            means[s:s + len(idx)] = np.mean(per_run, axis=0)
    lo, hi = np.nanquantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def _mean(xs) -> Optional[float]:
    xs = list(xs)
    return float(np.mean(xs)) if xs else None


def summarize(records: List[dict], answers_a: Optional[List[dict]] = None, answers_b: Optional[List[dict]] = None,
              n_boot: int = 10000, seed: int = 0, clusters: Optional[Sequence] = None) -> dict:
    """The numbers of one comparison (a vs b) from its judge records (see judge_comparisons):
    wins / ties / losses of a over the pairs whose verdicts could be read; win rate with ties counted
    half and its 95% bootstrap interval (resampling `clusters` of prompts, one label per prompt,
    else prompts); consistency (share of asked pairs whose two orders agree; 1 for
    score judges); how often the chat judge picked the answer shown first; unreadable verdicts and the
    pairs they cost; pairs of identical answers; and, given the answers, both sides' mean length, EOS
    rate and (score judges) mean score."""
    judged = [r["outcome"] for r in records if r["outcome"] is not None]
    value = {"win": 1.0, "tie": 0.5, "loss": 0.0}
    n = len(judged)
    labels = None if clusters is None else [clusters[r["i"]] for r in records if r["outcome"] is not None]
    lo, hi = bootstrap_ci([value[o] for o in judged], n_boot, seed, clusters=labels)
    out = {
        "pairs": len(records), "judged": n,
        "wins": judged.count("win"), "ties": judged.count("tie"), "losses": judged.count("loss"),
        "win_rate": (judged.count("win") + 0.5 * judged.count("tie")) / n if n else None,
        "ci95": [lo, hi] if n else None,
        "ci_clusters": len(set(labels)) if labels is not None else None,  # None: prompts resampled
        "unparseable_pairs": len(records) - n,
        "identical": sum(bool(r.get("identical")) for r in records),
    }
    if records and "scores" in records[0]:
        out.update(consistency=1.0, unparseable_answers=0, position_a_rate=None,
                   mean_score_a=_mean(r["scores"][0] for r in records),
                   mean_score_b=_mean(r["scores"][1] for r in records))
    else:
        verdicts = [v for r in records if r["verdicts"] for _, v in _asked_verdicts(r)]
        decisive = [v for v in verdicts if v in ("A", "B")]
        out.update(consistency=_mean(r["consistent"] for r in records if r["consistent"] is not None),
                   unparseable_answers=sum(v is None for v in verdicts),
                   position_a_rate=_mean(v == "A" for v in decisive),
                   mean_score_a=None, mean_score_b=None)
    out.update(unreadable_counts(records))
    for side, ans in (("a", answers_a), ("b", answers_b)):
        if ans is not None:
            out[f"tokens_{side}"] = _mean(x["tokens"] for x in ans)
            out[f"words_{side}"] = _mean(len(x["text"].split()) for x in ans)
            out[f"eos_rate_{side}"] = _mean(x["ended"] for x in ans)
    return out


def _fmt(x, spec="{:.2f}", none="–"):
    return none if x is None else spec.format(x)


def markdown_table(rows: List[dict]) -> str:
    """The summaries (with "judge", "a", "b") as a Markdown table."""
    head = ("| judge | a vs b | pairs | a wins | ties | b wins | a win rate (ties ½) | 95% CI | consistent | "
            "A-position picks | unreadable | a / b tokens | a / b EOS | a / b score |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        ci = f"[{r['ci95'][0]:.1%}, {r['ci95'][1]:.1%}]" if r["ci95"] else "–"
        lines.append(" | ".join([
            f"| {r['judge']}", f"{r['a']} vs {r['b']}", str(r["pairs"]), str(r["wins"]),
            f"{r['ties']} ({r['identical']} same text)" if r["identical"] else str(r["ties"]),
            str(r["losses"]), _fmt(r["win_rate"], "{:.1%}"), ci, _fmt(r["consistency"], "{:.0%}"),
            _fmt(r["position_a_rate"], "{:.0%}"), f"{r['unparseable_answers']} ({r['unparseable_pairs']} pairs)",
            f"{_fmt(r.get('tokens_a'), '{:.1f}')} / {_fmt(r.get('tokens_b'), '{:.1f}')}",
            f"{_fmt(r.get('eos_rate_a'), '{:.0%}')} / {_fmt(r.get('eos_rate_b'), '{:.0%}')}",
            f"{_fmt(r['mean_score_a'])} / {_fmt(r['mean_score_b'])} |"]))
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# The whole evaluation


def default_comparisons(names: Sequence[str]) -> List[Tuple[str, str]]:
    """Every later model against every earlier one: for vanilla, sft, ppo the original's three."""
    return [(names[j], names[i]) for j in range(len(names)) for i in range(j)]


def evaluate(models: Dict[str, object], prompts: List[str], judges: list, comparisons=None,
             out_dir: Optional[str] = None, cache_dir: Optional[str] = None, params: GenParams = GenParams(),
             device="cpu", precision: str = "fp32", max_concurrency: int = 4, n_boot: int = 10000,
             config: Optional[dict] = None, clusters: Optional[Sequence] = None, fixed_order: bool = False) -> dict:
    """Generate, judge, summarise. Writes generations.jsonl, judgments.jsonl and results.json to
    `out_dir` (if given), prints the Markdown table on stdout, and returns the results dict
    {"config", "models", "prompts", "results": [summary + judge, a, b per (judge, comparison)]}.
    `clusters` (one label per prompt) makes the intervals resample clusters of prompts (see bootstrap_ci);
    `fixed_order` asks chat judges one order only, a's answer as B (see judge_comparisons)."""
    if not prompts:
        raise UserError("no prompts to evaluate on")
    if out_dir and cache_dir and os.path.abspath(out_dir) == os.path.abspath(cache_dir):
        raise UserError(f"--out-dir and --cache-dir are both {out_dir}: the answers written there would "
                        "overwrite the answer cache (generations.jsonl); give the cache a directory of its own")
    comparisons = list(comparisons or default_comparisons(list(models)))
    if not comparisons:
        raise UserError("nothing to compare: give at least two models")
    cache = (lambda name: os.path.join(cache_dir, name)) if cache_dir else (lambda name: None)
    answers, infos = generate_answers(models, prompts, params, device, precision, cache("generations.jsonl"))
    rows, judgments = [], []
    for judge in judges:
        records = judge_comparisons(prompts, answers, comparisons, judge, cache("verdicts.jsonl"), max_concurrency,
                                    fixed_order)
        for a, b in comparisons:
            summary = summarize(records[f"{a}:{b}"], answers[a], answers[b], n_boot, params.seed, clusters)
            rows.append({"judge": judge.name, "a": a, "b": b, **summary})
            judgments += [{"judge": judge.name, "a": a, "b": b, **r} for r in records[f"{a}:{b}"]]
    results = {"config": config or {}, "generation": asdict(params), "models": infos,
               "prompts": {"n": len(prompts)}, "results": rows}
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "generations.jsonl"), "w") as f:
            for i, p in enumerate(prompts):
                f.write(json.dumps({"i": i, "prompt": p, "answers": {n: answers[n][i] for n in answers}}) + "\n")
        with open(os.path.join(out_dir, "judgments.jsonl"), "w") as f:
            for j in judgments:
                f.write(json.dumps(j) + "\n")
        write_json_atomic(os.path.join(out_dir, "results.json"), results)
    print(markdown_table(rows), flush=True)
    return results


# -----------------------------------------------------------------------------
# Command line


def build_parser():
    ap = parser(__doc__)
    g = ap.add_argument_group("models")
    g.add_argument("-s", "--sft", metavar="PATH", help="SFT run or checkpoint (the original's -s)")
    g.add_argument("-p", "--ppo", metavar="PATH", help="PPO run or checkpoint: its actor (the original's -p)")
    g.add_argument("--vanilla", default="auto", metavar="NAME_OR_DIR",
                   help="base GPT-2: a hub name or transformers directory; 'auto' = the GPT-2 the SFT/PPO "
                        "model started from, if any (the original's comparison); 'none' = leave it out")
    g.add_argument("--model", action="append", default=[], metavar="NAME=PATH",
                   help="another model: our run/checkpoint (an RM run: its backbone), a transformers "
                        "directory or a hub name (repeatable)")
    g.add_argument("--compare", action="append", default=[], metavar="A:B",
                   help="compare model A against B (repeatable); default: every model against every earlier "
                        "one, in the order vanilla, sft, ppo, --model ...")
    g = ap.add_argument_group("prompts and sampling")
    g.add_argument("--prompts", default="fka/awesome-chatgpt-prompts",
                   help="hub dataset, local .jsonl/.csv file, or synthetic:test_prompts (the offline task)")
    g.add_argument("--split", default="train", help="split of a hub --prompts dataset")
    g.add_argument("--limit", type=int, default=None, help="use the first N prompts")
    for f, help_ in (("max_new_tokens", "response budget in tokens, capped at half the block size"),
                     ("temperature", "sampling temperature (0 = greedy)"), ("top_k", "top-k sampling (0 = off)"),
                     ("top_p", "nucleus sampling (1 = off)"), ("seed", "seed of sampling and bootstrap"),
                     ("batch_size", "prompts per generation batch (1 = each answer independent of the others)")):
        default = getattr(GenParams(), f)
        g.add_argument("--" + f.replace("_", "-"), type=type(default), default=default,
                       help=f"{help_} (default {default})")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--precision", default="auto", help="auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16")
    g = ap.add_argument_group("judges")
    g.add_argument("--judge", action="append", default=[], metavar="SPEC",
                   help=f"{JUDGE_FORMS} (repeatable; default openai)")
    g.add_argument("--judge-model", default="gpt-4o-mini", help="chat model of the openai judge")
    g.add_argument("--base-url", default=None,
                   help="OpenAI-compatible server, e.g. http://localhost:8000/v1 (default: $OPENAI_BASE_URL or OpenAI)")
    g.add_argument("--key-file", default=None,
                   help="JSON file {\"OPENAI_API_KEY\": ...} (default: $OPENAI_API_KEY, else ./openai.key)")
    g.add_argument("--timeout", type=float, default=60.0, help="seconds per judge request before it is retried")
    g.add_argument("--max-retries", type=int, default=8, help="retries per judge request (429, 5xx, timeouts)")
    g.add_argument("--max-concurrency", type=int, default=4, help="judge requests in flight at once")
    g.add_argument("--judge-max-tokens", type=int, default=512, help="longest judge reply")
    g.add_argument("--fixed-order", action="store_true",
                   help="ask a chat judge about each pair once, the first model of the comparison (the newer one) "
                        "always shown as B: the original's protocol, biased by any position preference of the "
                        "judge (default: both orders, a verdict that flips is a tie)")
    g.add_argument("--n-boot", type=int, default=10000, help="bootstrap resamples for the confidence interval")
    g.add_argument("--clusters", default="auto", choices=("auto", "prompt", "fact"),
                   help="what the interval's bootstrap resamples: prompts, or the synthetic task's facts (prompts "
                        "about one fact are not independent evidence); auto = fact for synthetic: prompts")
    g = ap.add_argument_group("output")
    g.add_argument("-n", "--name", default="default", help="evaluation name: runs/eval_<name>_<stamp>/")
    g.add_argument("--out-dir", default=None, help="write the results here instead of runs/eval_<name>_<stamp>/")
    g.add_argument("--cache-dir", default=os.path.join("runs", "eval_cache"),
                   help="answer and verdict caches, shared by evaluations (default runs/eval_cache)")
    return ap


def model_specs(args) -> Dict[str, str]:
    """name -> source, in the order vanilla, sft, ppo, --model ...; checked for existence up front."""
    given = {}
    for name, path in (("sft", args.sft), ("ppo", args.ppo)):
        if path:
            check_model_source(path, f"-{name[0]}/--{name}", local_only=True)
            kind = checkpoint_info(path)["kind"] if is_checkpoint(path) else "lm"
            if kind != "lm":  # its backbone was never trained to answer: generating from it means nothing
                raise UserError(f"-{name[0]}/--{name} {path} holds a {kind} model, which scores answers and does "
                                f"not write them; give an {name.upper()} run (--model NAME=PATH still compares a "
                                f"reward model's backbone, if that is what you want)")
            given[name] = path
    for item in args.model:
        name, sep, path = item.partition("=")
        if not sep or not path or not re.fullmatch(r"[\w.-]+", name):
            raise UserError(f"--model {item!r}: expected NAME=PATH with NAME made of letters, digits, _ . -")
        if name in given or name == "vanilla":
            raise UserError(f"--model {name}=...: the name {name!r} is already taken")
        check_model_source(path, f"--model {name}")
        given[name] = path
    vanilla = args.vanilla
    if vanilla == "auto":  # the GPT-2 the SFT / PPO model was started from, as the original compared against
        bases = [checkpoint_info(given[n])["config"].pretrained
                 for n in ("sft", "ppo") if n in given and is_checkpoint(given[n])]
        vanilla = next((b for b in bases if b), "none")
        if vanilla != "none":
            log(f"vanilla: {vanilla} (the GPT-2 the SFT/PPO model started from; --vanilla none leaves it out)")
    if vanilla != "none":
        check_model_source(vanilla, "--vanilla")
        given = {"vanilla": vanilla, **given}
    return given


def parse_comparisons(items: List[str], names: Sequence[str]) -> List[Tuple[str, str]]:
    out = []
    for item in items:
        a, sep, b = item.partition(":")
        if not sep or a == b:
            raise UserError(f"--compare {item!r}: expected A:B with two different model names")
        for name in (a, b):
            if name not in names:
                raise UserError(f"--compare {item}: no model named {name!r}; models: {', '.join(names) or 'none'} "
                                f"(give it with -s, -p, --vanilla or --model {name}=PATH)")
        out.append((a, b))
    return out or default_comparisons(names)


def prompt_clusters(prompts: List[str], how: str, source: str) -> Optional[List[str]]:
    """One label per prompt for the clustered bootstrap: the fact each asks about (--clusters fact,
    or auto with synthetic: prompts), else None (each prompt its own cluster)."""
    if how == "prompt" or (how == "auto" and not str(source).startswith("synthetic:")):
        return None
    import task
    try:
        return [task.parse_prompt(p)[1] for p in prompts]
    except ValueError as e:
        raise UserError(f"--clusters fact needs the synthetic task's prompts: {e}") from None


def main(argv=None):
    args = build_parser().parse_args(argv)
    models = model_specs(args)
    comparisons = parse_comparisons(args.compare, list(models))
    if not comparisons:
        raise UserError(f"nothing to compare: give at least two models (have: {', '.join(models) or 'none'}; "
                        f"use -s, -p, --vanilla, --model NAME=PATH)")
    if args.limit is not None and args.limit < 1:
        raise UserError("--limit must be at least 1")
    if args.max_concurrency < 1 or args.max_retries < 0 or args.timeout <= 0:
        raise UserError("need --max-concurrency >= 1, --max-retries >= 0 and --timeout > 0")
    params = GenParams(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed, args.batch_size)
    device = resolve_device(args.device)
    precision = default_precision(device) if args.precision == "auto" else args.precision
    autocast(device, precision)  # an unknown precision fails here, before any work
    judges = {}
    for spec in args.judge or ["openai"]:
        judges.setdefault(spec, make_judge(spec, args.judge_model, args.base_url, args.key_file, args.timeout,
                                           args.max_retries, args.judge_max_tokens, device, precision, args.batch_size))
    prompts = load_prompts(args.prompts, limit=args.limit, split=args.split)
    clusters = prompt_clusters(prompts, args.clusters, args.prompts)
    out_dir = args.out_dir or make_run_dir("eval", args.name)
    os.makedirs(out_dir, exist_ok=True)
    saved_args = {**vars(args), "base_url": args.base_url and public_url(args.base_url)}
    config = {"command": " ".join(["python"] + sys.argv) if argv is None else None, "args": saved_args,
              "models": models, "comparisons": [f"{a}:{b}" for a, b in comparisons],
              "judges": list(judges), "device": str(device), "precision": precision, "prompts": args.prompts}
    write_json_atomic(os.path.join(out_dir, "config.json"), config)
    log(f"{len(prompts)} prompts from {args.prompts}; models: {', '.join(models)}; "
        f"comparisons: {', '.join(config['comparisons'])}; judges: {', '.join(judges)}")
    evaluate(models, prompts, list(judges.values()), comparisons, out_dir, args.cache_dir, params, device, precision,
             args.max_concurrency, args.n_boot, config, clusters, args.fixed_order)
    log(f"results: {os.path.join(out_dir, 'results.json')}")
    return 0


if __name__ == "__main__":
    run_cli(main)
