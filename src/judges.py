"""Judges: what decides which of two answers to a prompt is the better one.

There are two kinds (a judge's `.kind`):
  pairwise  ChatJudge, an OpenAI-compatible chat model at temperature 0, shown the prompt and both
            answers and asked for a verdict: A, B or tie; PositionBiasedJudge, a simulated one whose
            bias towards position B is known (position-biased:P:SPEC)
  score     ScoreJudge, which scores each answer on its own; the higher score wins:
              rm:RUN_DIR          a reward model, reading prompt + response + EOS as it was trained
              gold                the synthetic task's gold reward (task.gold_reward), on the answer text
                                  and the generation's EOS flag; gold:correctness and gold:style its parts
              function:MOD:ATTR   any fn(prompt, response) -> float
`make_judge` builds one from its --judge spec. evaluate.py shows chat judges every pair in both orders
and caches their verdicts; train_ppo.py can use a score judge as the PPO reward.
"""
import hashlib
import importlib
import json
import os
import re
import sys
from typing import Callable, List, Optional, Tuple
from urllib.parse import urlsplit

import numpy as np
import torch

from checkpoints import load_model
from common import UserError, autocast
from configs import EOS_ID
from dataset import fit_ranked
from tokenizer import ENDOFTEXT, get_tokenizer

# The cache keys' ingredients, here because the verdict cache (ChatJudge.key) and evaluate.py's answer
# cache both use them, and evaluate.py imports this module (never the other way round).
CACHE_VERSION = 1  # part of every cache key: bump it when what an answer or a verdict record holds changes


def json_sha256(obj) -> str:
    """Hex sha256 of `obj` as JSON with sorted keys: the same in every process and every run."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


# -----------------------------------------------------------------------------
# Chat judges


JUDGE_SYSTEM = (
    "You are an impartial judge. You will see a conversation between a user and an AI assistant, then "
    "two candidate answers for the assistant's next turn, Answer A and Answer B. Decide which answer is more "
    "helpful, truthful and harmless for the user. Judge the content only: neither the order in which the "
    "answers are shown nor their length may influence you. Explain your reasoning in a few sentences, then "
    "give your final verdict on the last line as exactly one of: [[A]] if Answer A is better, [[B]] if "
    "Answer B is better, [[tie]] if they are equally good or equally bad."
)


def judge_messages(prompt: str, first: str, second: str) -> List[dict]:
    """The chat messages that ask which of two answers to `prompt` is better (first shown as A)."""
    conversation = prompt.strip()
    conversation = conversation[:-len("Assistant:")].rstrip() if conversation.endswith("Assistant:") else conversation
    a, b = first.strip() or "(empty answer)", second.strip() or "(empty answer)"
    user = f"[Conversation]\n{conversation}\n\n[Answer A]\n{a}\n\n[Answer B]\n{b}\n\n[Your verdict]"
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


_VERDICTS = {"a": "A", "b": "B", "tie": "tie"}
_FILLER = {"final", "verdict", "answer", "is", "the", "better", "my"}


_SHORT = 12  # words: a longer reply without a [[tag]] is reasoning whose conclusion is not guessed at
_TIE = re.compile(r"\b(?:it'?s a tie|tie|equally (?:good|bad|helpful|poor|strong|weak)|"
                  r"(?:both|they)(?: answers)? are (?:equally|equal|the same)|neither (?:one )?is better)\b")
_PICK = re.compile(r"\b(?:i (?:choose|pick|prefer|select)|answer|option|response)\s+\(?([ab])\)?(?![a-z])|"
                   r"^\W*\(?([ab])\)?\W+is (?:better|the better one)\b")


def parse_verdict(reply: str) -> Optional[str]:
    """'A', 'B' or 'tie' from a judge's reply, or None when it cannot be read. The last [[A]] / [[B]] /
    [[tie]] anywhere in the reply counts (any case, spaces inside, markdown around it); failing that, a
    short reply (at most _SHORT words) that names one verdict and nothing else: "B", "**Tie**",
    "Answer A is better.", "I choose B", "It's a tie.", "Both are equally good"."""
    tags = re.findall(r"\[\[\s*(a|b|tie)\s*\]\]", reply or "", flags=re.IGNORECASE)
    if tags:
        return _VERDICTS[tags[-1].lower()]
    text = (reply or "").lower().strip()
    words = re.findall(r"[a-z']+", text)
    if len(words) > _SHORT:
        return None
    content = [w for w in words if w not in _FILLER]
    if len(content) == 1 and content[0] in _VERDICTS:
        return _VERDICTS[content[0]]
    picks = {a or b for a, b in _PICK.findall(text)}
    tie = _TIE.search(text) is not None
    if tie and not picks:
        return "tie"
    return picks.pop().upper() if len(picks) == 1 and not tie else None


def public_url(url) -> str:
    """A server URL without credentials, query or fragment: safe to print and to store."""
    parts = urlsplit(str(url))
    host = parts.hostname or ""
    return f"{parts.scheme}://{host}{':' + str(parts.port) if parts.port else ''}{parts.path}"


def _scrub(text: str, secret: Optional[str]) -> str:
    """`text` with the API key, and anything shaped like an OpenAI key, masked (not words such as "task-based")."""
    if secret:
        text = text.replace(secret, "***")
    return re.sub(r"(?<![A-Za-z0-9])sk-[A-Za-z0-9_\-*.]{3,}", "sk-***", text)


class ChatJudge:
    """An OpenAI-compatible chat model asked which of two answers is better, at temperature 0.

    Retries are the openai client's own: it retries rate limits (429), server errors (5xx), 408/409,
    timeouts and dropped connections up to `max_retries` times, waiting 0.5 s * 2**n (at most 8 s) less
    up to 25% random jitter, or what the server's Retry-After header asks for. A request that still
    fails stops the run with one line (verdicts already received stay cached)."""

    kind = "pairwise"

    def __init__(self, model: str, api_key: str, base_url: Optional[str] = None, timeout: float = 60.0,
                 max_retries: int = 8, max_tokens: int = 512):
        import openai
        self.openai, self.model, self.max_tokens, self._key = openai, model, max_tokens, api_key
        self.client = openai.OpenAI(api_key=api_key, base_url=base_url, timeout=timeout, max_retries=max_retries)
        self.name = f"openai:{model}"
        self.server = public_url(self.client.base_url)

    def key(self, prompt: str, first: str, second: str) -> str:
        """Cache key of one (pair, order): the judge's identity and the exact messages it is sent."""
        return json_sha256([CACHE_VERSION, self.model, self.server, self.max_tokens,
                            judge_messages(prompt, first, second)])

    def ask(self, prompt: str, first: str, second: str) -> Tuple[Optional[str], str, Optional[str]]:
        """(verdict in positions: 'A' = first, 'B' = second, 'tie', or None if unreadable; the reply; why
        the reply ended: the server's finish_reason ("stop", "length" for one cut at max_tokens, ...),
        "refusal" for a refusal, "malformed" for a 200 response that holds no reply). A cut-off reply is
        no verdict even if it holds a [[tag]]: the verdict belongs on the last line, which it lacks."""
        failure = None
        try:
            response = self.client.chat.completions.create(
                model=self.model, messages=judge_messages(prompt, first, second), temperature=0,
                max_tokens=self.max_tokens)
        except self.openai.AuthenticationError:
            failure = (f"the judge server {self.server} rejected the API key (401): check OPENAI_API_KEY or the "
                       f"key file")
        except self.openai.APIError as e:
            what = f"HTTP {e.status_code}" if getattr(e, "status_code", None) else type(e).__name__
            message = _scrub(" ".join(str(e).split()), self._key)[:300]
            failure = (f"judge request to {self.server} failed after retries ({what}: {message}); verdicts so "
                       f"far are cached, rerun the same command to resume")
        if failure:  # raised out here, so that no chained exception carries the request (and its key) along
            raise UserError(failure)
        reply, finish = read_reply(response)
        reply, finish = _scrub(reply, self._key), finish if finish is None else _scrub(str(finish), self._key)
        return (None if finish == "length" else parse_verdict(reply)), reply, finish


def read_reply(response) -> Tuple[str, Optional[str]]:
    """(reply text, why it ended) from whatever a server sent back with status 200, never raising: a
    refusal is its text with "refusal"; a body without a message (no choices, not JSON) is described,
    with "malformed"."""
    choices = getattr(response, "choices", None)
    message = getattr(choices[0], "message", None) if isinstance(choices, list) and choices else None
    if message is None:
        extra = getattr(response, "model_extra", None) or {}  # what the server sent instead of choices
        raw = response if isinstance(response, str) else json.dumps(extra, default=str)
        return f"(no reply in the response: {' '.join(str(raw).split())[:200]})", "malformed"
    content, refusal = getattr(message, "content", None), getattr(message, "refusal", None)
    if not content and refusal:
        return str(refusal), "refusal"
    text = content if isinstance(content, str) else json.dumps(content, default=str) if content else ""
    return text, getattr(choices[0], "finish_reason", None)


def why_unreadable(verdict: Optional[str], reply: Optional[str], finish: Optional[str]) -> Optional[str]:
    """None for a readable verdict; else why the reply could not be read: its finish reason when that is
    not "stop" ("length": cut off at max_tokens, "refusal", "content_filter", "malformed", ...), "empty",
    or "no_verdict" (a reply that names no A, B or tie)."""
    if verdict in ("A", "B", "tie"):
        return None
    if finish and finish != "stop":
        return str(finish)
    return "empty" if not (reply or "").strip() else "no_verdict"


class PositionBiasedJudge:
    """A simulated pairwise judge with a known position bias, to measure what a judging protocol does
    with one: asked about (prompt, first, second) it answers "B" with probability p_b whatever the
    answers, and otherwise the truth of `score(prompt, text)`: the higher score wins, equal scores tie.
    The coin is a hash of the question (and `seed`), so the same question always gets the same answer,
    like a chat judge at temperature 0, and its verdicts cache like one's. The judge sees texts only:
    a score function of the synthetic task scores them as answers that ended."""

    kind = "pairwise"
    server = "(simulated)"

    def __init__(self, score: Callable[[str, str], float], p_b: float, name: str = "function", seed: int = 0):
        if not 0 <= p_b <= 1:
            raise UserError(f"position-biased judge: P(B) must be in [0, 1], got {p_b}")
        self.score, self.p_b, self.seed = score, p_b, seed
        self.name = f"position-biased:{p_b:g}:{name}"

    def key(self, prompt: str, first: str, second: str) -> str:
        return json_sha256([CACHE_VERSION, self.name, self.seed, prompt, first, second])

    def ask(self, prompt: str, first: str, second: str) -> Tuple[Optional[str], str, Optional[str]]:
        """(verdict, reply, finish reason), as ChatJudge.ask."""
        coin = int(json_sha256(["coin", self.seed, prompt, first, second])[:13], 16) / 16 ** 13  # uniform [0, 1)
        if coin < self.p_b:
            return "B", "[[B]] (position bias)", "stop"
        a, b = self.score(prompt, first), self.score(prompt, second)
        verdict = "A" if a > b else "B" if b > a else "tie"
        return verdict, f"[[{verdict}]] (scores {a:g} vs {b:g})", "stop"


def position_biased_judge(spec: str, **kw) -> PositionBiasedJudge:
    """position-biased:P:SPEC, SPEC a score judge (gold, rm:RUN_DIR, function:MODULE:ATTR)."""
    p, _, inner = spec[len("position-biased:"):].partition(":")
    try:
        p_b = float(p)
    except ValueError:
        raise UserError(f"--judge {spec}: expected position-biased:P:SPEC with P a probability, e.g. "
                        f"position-biased:0.3:gold") from None
    judge = make_judge(inner, **kw)
    if judge.kind != "score":
        raise UserError(f"--judge {spec}: the truth of a position-biased judge must be a score judge, not {inner}")
    return PositionBiasedJudge(lambda prompt, text: judge.score_fn([prompt], [{"text": text, "ended": True}])[0],
                               p_b, judge.name)


# -----------------------------------------------------------------------------
# Score judges


class ScoreJudge:
    """Scores every answer on its own (`score_fn(prompts, answers) -> scores`); the higher score wins."""

    kind = "score"

    def __init__(self, name: str, score_fn: Callable[[List[str], List[dict]], List[float]]):
        self.name, self.score_fn = name, score_fn


def function_judge(fn: Callable[[str, str], float], name: str) -> ScoreJudge:
    """fn(prompt, response) -> float, where the response text ends with "<|endoftext|>" if the model
    emitted EOS (the convention of task.gold_reward)."""
    def score(prompts, answers):
        try:
            return [float(fn(p, a["text"] + (ENDOFTEXT if a["ended"] else ""))) for p, a in zip(prompts, answers)]
        except ValueError as e:
            raise UserError(f"--judge {name}: {e}") from None
    return ScoreJudge(name, score)


def gold_judge(spec: str = "gold") -> ScoreJudge:
    """The synthetic task's gold reward (or one of its parts, GOLD_JUDGES) on each answer's text and
    the generation's own EOS flag."""
    import task
    fn = getattr(task, GOLD_JUDGES[spec])

    def score(prompts, answers):
        try:
            return [fn(p, a["text"], a["ended"]) for p, a in zip(prompts, answers)]
        except ValueError as e:
            raise UserError(f"--judge {spec}: {e}") from None
    return ScoreJudge(spec, score)


def rm_scores(rm, prompts: List[str], responses: List[str], device="cpu", precision="fp32",
              batch_size: int = 16) -> List[float]:
    """A RewardModel's score of each prompt + response + EOS, built as PreferenceDataset builds its training
    sequences: prompt and response encoded separately as ordinary text, EOS appended, and the result cut to
    the block by the dataset's own rule (`fit_ranked`), so the score is read at EOS, as in training."""
    tok, device = get_tokenizer(), torch.device(device)
    seqs = []  # each (T,) with T <= block_size
    for p, r in zip(tok.encode_batch(prompts, allow_special=False), tok.encode_batch(responses, allow_special=False)):
        response = np.array(r + [EOS_ID], dtype=np.int32)
        seqs += fit_ranked(np.array(p, dtype=np.int32), [response], rm.config.block_size)
    scores = []
    rm.to(device)
    with torch.no_grad():
        for i in range(0, len(seqs), batch_size):
            ids, mask = tok.pad(seqs[i:i + batch_size], padding_side="right")
            with autocast(device, precision):
                scores += rm.score(ids.to(device), mask.to(device)).float().cpu().tolist()
    rm.cpu()
    return scores


def rm_judge(run_dir: str, device="cpu", precision="fp32", batch_size: int = 16) -> ScoreJudge:
    """The reward model of a run (or checkpoint) as a score judge of answer texts (see rm_scores)."""
    rm, _ = load_model(run_dir, kind="rm", what="--judge rm:")
    rm.eval()
    return ScoreJudge(f"rm:{run_dir}", lambda prompts, answers: rm_scores(
        rm, prompts, [a["text"] for a in answers], device, precision, batch_size))


# -----------------------------------------------------------------------------
# A judge from its --judge spec


JUDGE_FORMS = ("openai, rm:RUN_DIR, gold, gold:correctness, gold:style, function:MODULE:ATTR, "
               "position-biased:P:SPEC (simulated: says B with probability P, else SPEC's verdict)")
# The synthetic task's true reward, and its two parts (task.py), scored on the answer text and the
# generation's own EOS flag.
GOLD_JUDGES = {"gold": "gold_reward", "gold:correctness": "correctness", "gold:style": "style"}


def api_key(key_file: Optional[str] = None) -> str:
    """The judge's API key: --key-file, else $OPENAI_API_KEY, else ./openai.key (the original's JSON file
    {"OPENAI_API_KEY": ...}). Never printed, never written."""
    if key_file is None and os.environ.get("OPENAI_API_KEY"):
        return os.environ["OPENAI_API_KEY"]
    path = key_file or "openai.key"
    if not os.path.isfile(path):
        where = f"key file {path} not found" if key_file else "no API key for the OpenAI judge"
        raise UserError(f"{where}: set OPENAI_API_KEY, or write {{\"OPENAI_API_KEY\": \"...\"}} to openai.key "
                        f"(or --key-file PATH); a local server that needs no key: OPENAI_API_KEY=none; "
                        f"offline judges: --judge gold, --judge rm:RUN_DIR")
    try:
        with open(path) as f:
            key = json.load(f).get("OPENAI_API_KEY")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        key = None
    if not isinstance(key, str) or not key:
        raise UserError(f"key file {path} is not a JSON object with a non-empty \"OPENAI_API_KEY\" string")
    return key


def make_judge(spec: str, judge_model: str = "gpt-4o-mini", base_url: Optional[str] = None,
               key_file: Optional[str] = None, timeout: float = 60.0, max_retries: int = 8,
               max_tokens: int = 512, device="cpu", precision: str = "fp32", batch_size: int = 16):
    """A judge from its --judge spec (see JUDGE_FORMS)."""
    if spec == "openai":
        return ChatJudge(judge_model, api_key(key_file), base_url, timeout, max_retries, max_tokens)
    if spec.startswith("position-biased:"):
        return position_biased_judge(spec, device=device, precision=precision, batch_size=batch_size)
    if spec.startswith("rm:"):
        return rm_judge(spec[3:], device, precision, batch_size)
    if spec in GOLD_JUDGES:
        return gold_judge(spec)
    if spec.startswith("function:"):
        module_name, _, attr = spec[len("function:"):].partition(":")
        if os.getcwd() not in sys.path:
            sys.path.append(os.getcwd())
        try:
            fn = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError, ValueError) as e:
            raise UserError(f"--judge {spec}: cannot import {module_name}.{attr} ({e})") from None
        if not callable(fn):
            raise UserError(f"--judge {spec}: {module_name}.{attr} is not a function")
        return function_judge(fn, spec)
    raise UserError(f"unknown judge {spec!r}; use one of: {JUDGE_FORMS}")
