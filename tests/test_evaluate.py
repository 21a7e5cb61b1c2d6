"""evaluate.py and the judges it drives (judges.py): a fair, cached, resumable judge, and honest statistics.

The LLM judge is driven through the real `openai` client against a small OpenAI-compatible server that
runs inside the test on 127.0.0.1 (FakeJudgeServer): its verdict rule, its failures (429, 500, a
timeout, garbage) and a process killed mid-run are all under the test's control, and it counts every
request per (pair, order). Models are tiny random GPT-2s saved as checkpoints in temporary directories.
"""
import json
import os
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from conftest import ROOT, SRC, randomize_

from checkpoints import load_model, save_model
from common import UserError
from configs import ModelConfig
from evaluate import (
    GenParams,
    _outcome,
    answer_from_tokens,
    bootstrap_ci,
    runs_bootstrap_ci,
    generate_answers,
    judge_comparisons,
    main,
    summarize,
)
from gpt import GPT, RewardModel
from judges import ChatJudge, function_judge, make_judge, rm_scores
from tokenizer import ENDOFTEXT, get_tokenizer

CONFIG = ModelConfig(n_layer=2, n_head=4, n_embd=64, block_size=128)
SECRET = "sk-test-0123456789abcdefSECRET"


# -----------------------------------------------------------------------------
# A fake OpenAI-compatible judge server


class FakeJudgeServer:
    """POST /v1/chat/completions on 127.0.0.1 in a thread, answering in the OpenAI JSON shape.

    decide(answer_a, answer_b) -> reply text. fault(pair_order, attempt) -> None, ("status", code) or
    ("sleep", seconds) for that attempt (1-based) of that (pair, order). hold_after=N: after N answered
    requests, further requests are held unanswered until `release` is set (to kill a client mid-run).
    Counts: `answered` and `attempts` per (pair, order), i.e. per distinct user message."""

    def __init__(self, decide, fault=None, hold_after=None, require_key=None):
        self.decide, self.fault, self.hold_after, self.require_key = decide, fault, hold_after, require_key
        self.answered, self.attempts, self.keys_seen = Counter(), Counter(), set()
        self.lock, self.release = threading.Lock(), threading.Event()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/v1"

    def __enter__(self):
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def send_json(self, code, obj, headers=()):
                data = json.dumps(obj).encode()
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in headers:
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout) or was killed

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                assert self.path == "/v1/chat/completions" and body["temperature"] == 0
                user = body["messages"][-1]["content"]
                a, b = re.search(r"\[Answer A\]\n(.*)\n\n\[Answer B\]\n(.*)\n\n\[Your verdict\]", user, re.S).groups()
                key = self.headers.get("Authorization", "").removeprefix("Bearer ")
                with server.lock:
                    server.keys_seen.add(key)
                    server.attempts[user] += 1
                    attempt = server.attempts[user]
                    held = server.hold_after is not None and sum(server.answered.values()) >= server.hold_after
                if server.require_key and key != server.require_key:
                    return self.send_json(401, {"error": {"message": f"Incorrect API key provided: {key}",
                                                          "type": "invalid_request_error", "code": "invalid_api_key"}})
                if held:
                    server.release.wait(60)
                    return  # never answered: the client was killed while waiting
                fault = server.fault(user, attempt) if server.fault else None
                if fault and fault[0] == "status":  # retry-after-ms keeps the client's backoff tiny
                    return self.send_json(fault[1], {"error": {"message": "try later", "type": "server_error"}},
                                          [("retry-after-ms", "5")])
                if fault and fault[0] == "sleep":
                    time.sleep(fault[1])  # longer than the client's timeout: it has given up
                    return self.send_json(200, {"error": "too late"})
                with server.lock:
                    server.answered[user] += 1
                self.send_json(200, {
                    "id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": server.decide(a, b)}}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

        return Handler


def prefers_longer(a, b):
    """A position-fair judge: the longer answer wins, the verdict written in varied styles."""
    if len(a) == len(b):
        return "Both are equally fine.\n\n[[tie]]"
    return "The first answer is more complete.\n**Final verdict: [[A]]**" if len(a) > len(b) \
        else "Answer B covers more.\nVerdict: [[ b ]]"


def always_a(a, b):
    return "Answer A is better. [[A]]"


# -----------------------------------------------------------------------------
# Hand-made prompts and answers, tiny checkpoints


PROMPTS = [f"\n\nHuman: Tell me about topic number {i}.\n\nAssistant:" for i in range(6)]


def answer(text, ended=True):
    return {"text": text, "ended": ended, "finish": "eos" if ended else "length", "tokens": len(text.split())}


ANSWERS = {
    "long": [answer(f" Topic {i} is a long story, and here is all of it in some detail.") for i in range(6)],
    "short": [answer(f" Topic {i}: no.") for i in range(6)],
}


def chat_judge(server, key="sk-anything", **kw):
    return ChatJudge("fake-judge", key, server.url, **{"timeout": 5.0, "max_retries": 3, **kw})


@pytest.fixture(scope="module")
def task_prompts():
    import task
    groups = list(task.all_prompts().values())
    return [groups[i][7 * i] for i in range(6)]  # six facts


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, task_prompts):
    """Two different tiny LMs (as an SFT and a PPO run), a tiny RM run, and a prompt file."""
    root = tmp_path_factory.mktemp("ckpts")
    paths = {}
    for seed, stage in ((0, "sft"), (1, "ppo")):
        torch.manual_seed(seed)
        save_model(GPT(CONFIG), str(root / stage / "final"), stage=stage)
        paths[stage] = str(root / stage)
    save_model(randomize_(RewardModel(CONFIG), std=0.05), str(root / "rm" / "final"), stage="rm")
    paths["rm"] = str(root / "rm")
    paths["prompts"] = str(root / "prompts.jsonl")
    with open(paths["prompts"], "w") as f:
        f.writelines(json.dumps({"prompt": p}) + "\n" for p in task_prompts)
    return paths


def cli(*args, env=None, cwd=None, **popen):
    """`python src/evaluate.py args...` with the given environment (OPENAI_API_KEY removed unless given)."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL")}
    full_env.update(PYTHONUNBUFFERED="1", **(env or {}))
    cmd = [sys.executable, os.path.join(SRC, "evaluate.py"), *map(str, args)]
    if popen:
        return subprocess.Popen(cmd, cwd=cwd or ROOT, env=full_env, text=True, **popen)
    return subprocess.run(cmd, cwd=cwd or ROOT, env=full_env, capture_output=True, text=True, timeout=120)


# -----------------------------------------------------------------------------
# Verdicts and statistics


def test_a_verdict_must_survive_the_swap():
    assert _outcome("A", "B") == ("win", True)  # a shown first wins, and wins again shown second
    assert _outcome("B", "A") == ("loss", True)
    assert _outcome("tie", "tie") == ("tie", True)
    assert _outcome("A", "A") == ("tie", False)  # always the first position: flips with the order
    assert _outcome("A", "tie") == ("tie", False)
    assert _outcome(None, "A") == (None, None)


def records(wins, ties, losses, unparseable=0, consistent=None):
    out = [{"outcome": o, "verdicts": ["A", "B"], "consistent": True}
           for o in ["win"] * wins + ["tie"] * ties + ["loss"] * losses]
    out += [{"outcome": None, "verdicts": [None, "B"], "consistent": None}] * unparseable
    for r, c in zip(out, consistent or []):
        r["consistent"] = c
    return out


def test_win_rate_counts_ties_half_and_skips_unreadable_pairs():
    s = summarize(records(6, 2, 2, unparseable=3))
    assert (s["wins"], s["ties"], s["losses"], s["judged"], s["pairs"]) == (6, 2, 2, 10, 13)
    assert s["win_rate"] == pytest.approx(0.7)
    assert (s["unparseable_pairs"], s["unparseable_answers"]) == (3, 3)
    lo, hi = s["ci95"]
    assert lo < 0.7 < hi


def test_bootstrap_interval_contains_the_estimate_and_shrinks_with_n():
    widths = []
    for n in (10, 100, 1000):
        values = [1.0] * (6 * n // 10) + [0.5] * (2 * n // 10) + [0.0] * (2 * n // 10)
        lo, hi = bootstrap_ci(values, n_boot=4000, seed=0)
        assert lo <= 0.7 <= hi
        widths.append(hi - lo)
    assert widths[0] > 2.5 * widths[1] > 2.5 * 2.5 * widths[2]  # ~ 1/sqrt(n)
    assert bootstrap_ci([1.0] * 5) == (1.0, 1.0)
    assert bootstrap_ci([0.0, 1.0] * 20, seed=3) == bootstrap_ci([0.0, 1.0] * 20, seed=3)  # seeded


def test_clustered_bootstrap_resamples_whole_clusters():
    """With every cluster the same size and constant inside, resampling clusters is resampling their
    values: the interval equals the plain bootstrap of one value per cluster (same draws), and is
    far wider than treating the 480 copies as independent prompts."""
    rng = random.Random(0)
    per_cluster = [float(rng.random() < 0.7) for _ in range(24)]
    values = [v for v in per_cluster for _ in range(20)]
    labels = [f"fact{k}" for k in range(24) for _ in range(20)]
    clustered = bootstrap_ci(values, n_boot=4000, seed=1, clusters=labels)
    assert clustered == bootstrap_ci(per_cluster, n_boot=4000, seed=1)
    lo, hi = bootstrap_ci(values, n_boot=4000, seed=1)
    assert clustered[1] - clustered[0] > 3 * (hi - lo)
    # each value its own cluster: the plain bootstrap
    own = bootstrap_ci(values[:50], seed=2, clusters=list(range(50)))
    assert own == pytest.approx(bootstrap_ci(values[:50], seed=2))


def test_interval_over_seeds_draws_the_facts_once_for_all_seeds():
    """Two seeds that agree fact by fact give the one-seed interval (a fact counts once, not once per
    seed); the mean of two seeds that differ lies between theirs."""
    rng = random.Random(1)
    labels = [k for k in range(24) for _ in range(10)]
    a = [float(rng.random() < 0.8) for _ in labels]
    b = [float(rng.random() < 0.5) for _ in labels]
    one = runs_bootstrap_ci([(a, labels)], n_boot=3000, seed=0)
    assert runs_bootstrap_ci([(a, labels), (a, labels)], n_boot=3000, seed=0) == pytest.approx(one)
    lo, hi = runs_bootstrap_ci([(a, labels), (b, labels)], n_boot=3000, seed=0)
    assert lo < (sum(a) + sum(b)) / (2 * len(a)) < hi
    assert runs_bootstrap_ci([(b, labels)], n_boot=3000, seed=0)[1] < hi < one[1]


def test_consistency_rate():
    s = summarize(records(2, 2, 0, consistent=[True, True, False, None]))
    assert s["consistency"] == pytest.approx(2 / 3)  # the pair with an unreadable order does not count
    score = summarize([{"outcome": "win", "scores": [1.0, 0.0], "consistent": True},
                       {"outcome": "loss", "scores": [0.5, 3.0], "consistent": True}])
    assert score["mean_score_a"] == 0.75 and score["mean_score_b"] == 1.5


# -----------------------------------------------------------------------------
# The chat judge through the real openai client


def test_fair_judge_both_orders_each_asked_once_and_cached(tmp_path):
    cache = str(tmp_path / "verdicts.jsonl")
    with FakeJudgeServer(prefers_longer) as server:
        recs = judge_comparisons(PROMPTS, ANSWERS, [("long", "short")], chat_judge(server), cache, max_concurrency=3)
        s = summarize(recs["long:short"], ANSWERS["long"], ANSWERS["short"])
        assert (s["wins"], s["ties"], s["losses"], s["win_rate"]) == (6, 0, 0, 1.0)
        assert s["consistency"] == 1.0 and s["position_a_rate"] == 0.5 and s["unparseable_answers"] == 0
        assert len(server.answered) == 12 and set(server.answered.values()) == {1}  # 6 pairs x 2 orders
        # A rerun, and the reversed comparison, are answered from the cache alone.
        again = judge_comparisons(PROMPTS, ANSWERS, [("long", "short"), ("short", "long")], chat_judge(server), cache)
        assert sum(server.attempts.values()) == 12
        assert [r["outcome"] for r in again["short:long"]] == ["loss"] * 6
        assert [r["verdicts"] for r in again["long:short"]] == [["A", "B"]] * 6
    assert len(open(cache).readlines()) == 12


def test_judge_that_always_prefers_position_a_gives_ties(tmp_path):
    with FakeJudgeServer(always_a) as server:
        recs = judge_comparisons(PROMPTS, ANSWERS, [("long", "short")], chat_judge(server))
    s = summarize(recs["long:short"])
    assert (s["wins"], s["ties"], s["losses"]) == (0, 6, 0)
    assert s["win_rate"] == 0.5 and s["consistency"] == 0.0 and s["position_a_rate"] == 1.0


def test_identical_answers_are_a_tie_without_asking():
    answers = {"x": ANSWERS["long"], "y": [dict(a) for a in ANSWERS["long"]]}
    answers["y"][0] = ANSWERS["short"][0]
    with FakeJudgeServer(prefers_longer) as server:
        recs = judge_comparisons(PROMPTS, answers, [("x", "y")], chat_judge(server))
    assert len(server.attempts) == 2  # only the pair that differs, in both orders
    s = summarize(recs["x:y"])
    assert (s["wins"], s["ties"], s["identical"]) == (1, 5, 5)
    by_length = judge_comparisons(PROMPTS, answers, [("x", "y")], function_judge(lambda p, r: len(r), "length"))
    assert summarize(by_length["x:y"])["identical"] == 5


def test_retries_on_429_500_and_timeout(tmp_path):
    def fault(user, attempt):
        if "topic number 0" in user and attempt == 1:
            return ("status", 429)
        if "topic number 1" in user and attempt <= 2:
            return ("status", 500)
        if "topic number 2" in user and attempt == 1:
            return ("sleep", 1.5)
        return None

    with FakeJudgeServer(prefers_longer, fault) as server:
        t0 = time.time()
        judge = chat_judge(server, timeout=0.5)
        recs = judge_comparisons(PROMPTS, ANSWERS, [("long", "short")], judge, max_concurrency=4)
        elapsed = time.time() - t0
    assert [r["outcome"] for r in recs["long:short"]] == ["win"] * 6
    assert set(server.answered.values()) == {1} and len(server.answered) == 12
    per_topic = Counter()
    for user, n in server.attempts.items():
        per_topic[int(re.search(r"topic number (\d)", user).group(1))] += n
    assert per_topic == {0: 4, 1: 6, 2: 4, 3: 2, 4: 2, 5: 2}  # both orders: 1 retry, 2 retries, 1 retry
    assert elapsed < 10  # the server's retry-after-ms and one 0.5 s timeout, not minutes


def test_failure_after_retries_is_one_line_and_keeps_what_arrived(tmp_path):
    cache, broken = str(tmp_path / "verdicts.jsonl"), [True]
    fault = lambda user, attempt: ("status", 500) if broken[0] and "topic number 3" in user else None  # noqa: E731
    with FakeJudgeServer(prefers_longer, fault) as server:
        with pytest.raises(UserError, match="HTTP 500.*rerun the same command to resume"):
            judge_comparisons(PROMPTS, ANSWERS, [("long", "short")], chat_judge(server, max_retries=1), cache,
                              max_concurrency=1)
        failed = {u: n for u, n in server.attempts.items() if "topic number 3" in u}
        assert set(failed.values()) == {2}  # 1 + 1 retry (the other order may have started before the stop)
        assert len(server.attempts) - len(failed) == 6  # pairs 0-2, both orders, then the run stopped
        assert len(open(cache).readlines()) == 6
        broken[0] = False  # the server recovers; the rerun asks only what never arrived
        recs = judge_comparisons(PROMPTS, ANSWERS, [("long", "short")], chat_judge(server), cache)
    assert set(server.answered.values()) == {1} and len(server.answered) == 12
    assert summarize(recs["long:short"])["wins"] == 6


def test_garbage_replies_are_counted_not_dropped():
    def garbage(a, b):
        if "Topic 0" in a:
            return "I would rather not say."  # both orders of pair 0
        if "Topic 1" in a and len(a) > len(b):
            return ""  # pair 1, one order only
        return prefers_longer(a, b)

    with FakeJudgeServer(garbage) as server:
        recs = judge_comparisons(PROMPTS, ANSWERS, [("long", "short")], chat_judge(server))
    s = summarize(recs["long:short"])
    assert (s["unparseable_answers"], s["unparseable_pairs"], s["judged"], s["wins"]) == (3, 2, 4, 4)
    assert recs["long:short"][0]["replies"] == ["I would rather not say."] * 2


def test_a_rejected_key_is_not_echoed():
    with FakeJudgeServer(prefers_longer, require_key="sk-the-right-one") as server:
        with pytest.raises(UserError) as e:
            judge_comparisons(PROMPTS, ANSWERS, [("long", "short")], chat_judge(server, key=SECRET))
    assert "401" in str(e.value) and SECRET not in str(e.value) and "SECRET" not in str(e.value)


def test_killed_run_resumes_without_asking_anything_twice(ckpts, tmp_path):
    cache = tmp_path / "cache"
    args = ["--model", f"a={ckpts['sft']}", "--model", f"b={ckpts['ppo']}", "--prompts", ckpts["prompts"],
            "--judge", "openai", "--judge-model", "fake-judge", "--max-new-tokens", "8", "--max-concurrency", "2",
            "--cache-dir", cache]
    with FakeJudgeServer(prefers_longer, hold_after=5) as server:
        args += ["--base-url", server.url]
        proc = cli(*args, "--out-dir", tmp_path / "eval1", env={"OPENAI_API_KEY": SECRET},
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        verdicts, deadline = cache / "verdicts.jsonl", time.time() + 90
        while not (verdicts.exists() and len(verdicts.read_text().splitlines()) >= 5):
            assert proc.poll() is None and time.time() < deadline, "first run ended before it was killed"
            time.sleep(0.05)
        proc.kill()  # SIGKILL: no cleanup of any kind
        out1, err1 = proc.communicate()
        first_answered, first_received = sum(server.answered.values()), sum(server.attempts.values())
        server.hold_after = None
        server.release.set()
        second = cli(*args, "--out-dir", tmp_path / "eval2", env={"OPENAI_API_KEY": SECRET})
        assert second.returncode == 0, second.stderr
    results = json.loads((tmp_path / "eval2" / "results.json").read_text())["results"][0]
    expected = 2 * (results["pairs"] - results["identical"])
    counts = {"pairs_x_orders": expected, "first_run_answered": first_answered,
              "first_run_received": first_received, "total_received": sum(server.attempts.values()),
              "total_answered": sum(server.answered.values()),
              "max_answers_per_pair_order": max(server.answered.values())}
    print("resume test request counts:", counts)
    assert first_answered == 5 and len(server.answered) == expected
    assert set(server.answered.values()) == {1}  # every (pair, order) answered exactly once over both runs
    assert "0 answers generated" in second.stderr  # the answers came from the cache too
    # The key reached the server, and nothing else: not the output, not a file.
    assert server.keys_seen == {SECRET}
    for text in (out1, err1, second.stdout, second.stderr):
        assert SECRET not in text
    for root, _, files in os.walk(tmp_path):
        for f in files:
            assert SECRET not in open(os.path.join(root, f), errors="replace").read(), f


def test_missing_key_is_one_line_exit_2(ckpts, tmp_path):
    r = cli("-s", ckpts["sft"], "-p", ckpts["ppo"], "--prompts", ckpts["prompts"], "--judge", "openai", cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and "OPENAI_API_KEY" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "runs").exists()  # nothing started


# -----------------------------------------------------------------------------
# Generation


def test_answer_text_stops_at_eos_and_at_the_next_human_turn():
    tok = get_tokenizer()
    assert answer_from_tokens(tok, tok.encode(" Paris.") + [tok.eos_id]) == \
        {"text": " Paris.", "ended": True, "finish": "eos", "tokens": 2}
    a = answer_from_tokens(tok, tok.encode(" Paris.\n\nHuman: and Rome?"))
    assert (a["text"], a["ended"], a["finish"]) == (" Paris.", False, "stop")
    assert answer_from_tokens(tok, tok.encode(" Paris is"))["finish"] == "length"


def test_generation_cache_reuses_answers_and_a_changed_model_regenerates(ckpts, task_prompts, tmp_path):
    cache = str(tmp_path / "generations.jsonl")
    params = GenParams(max_new_tokens=8, batch_size=4)
    first, info = generate_answers({"sft": ckpts["sft"]}, task_prompts, params, cache_path=cache)
    assert info["sft"]["generated"] == 6 and info["sft"]["stage"] == "sft"
    assert all(0 < a["tokens"] <= 8 and set(a) == {"text", "ended", "finish", "tokens"} for a in first["sft"])
    again, info = generate_answers({"sft": ckpts["sft"]}, task_prompts, params, cache_path=cache)
    assert (info["sft"]["generated"], info["sft"]["cached"]) == (0, 6) and again == first
    fresh, _ = generate_answers({"sft": ckpts["sft"]}, task_prompts, params, cache_path=None)
    assert fresh == first  # seeded: the cache holds what a fresh run produces
    other, info = generate_answers({"sft": ckpts["sft"]}, task_prompts[:2], GenParams(max_new_tokens=8, seed=1),
                                   cache_path=cache)
    assert info["sft"]["generated"] == 2 and other["sft"] != first["sft"][:2]  # another seed, another sample

    copy = tmp_path / "copy"  # the same weights elsewhere: the key is their content, not their path
    shutil.copytree(ckpts["sft"], copy)
    _, info = generate_answers({"sft": str(copy)}, task_prompts, params, cache_path=cache)
    assert info["sft"]["generated"] == 0
    model, _ = load_model(str(copy), kind="lm")  # the same path, changed weights: nothing stale is served
    with torch.no_grad():
        model.h[0].mlp.c_fc.bias[0] += 1.0
    save_model(model, str(copy / "final"), stage="sft")
    _, changed = generate_answers({"sft": str(copy)}, task_prompts, params, cache_path=cache)
    assert changed["sft"]["generated"] == 6 and changed["sft"]["fingerprint"] != info["sft"]["fingerprint"]


def test_budget_capped_by_block_size():
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32))
    prompts = ["\n\nHuman: Hi.\n\nAssistant:", "\n\nHuman: " + "Tell me more, please. " * 10 + "\n\nAssistant:"]
    answers, info = generate_answers({"m": model}, prompts, GenParams(max_new_tokens=100, temperature=0))
    assert info["m"]["max_new_tokens"] == 16 and info["m"]["truncated_prompts"] == 1  # kept its last 16 tokens
    assert all(a["tokens"] <= 16 for a in answers["m"])


# -----------------------------------------------------------------------------
# Offline judges: reward model and functions


def test_rm_judge_scores_prompt_response_eos_as_trained(ckpts, task_prompts):
    tok = get_tokenizer()
    judge = make_judge(f"rm:{ckpts['rm']}")
    answers = {"x": [answer(" The capital is Paris."), answer(" Yellow."), answer(" moo " * 200)],
               "y": [answer(" I do not know."), answer(" Blue, obviously."), answer(" Moo.")]}
    recs = judge_comparisons(task_prompts[:3], answers, [("x", "y")], judge)["x:y"]
    rm, _ = load_model(ckpts["rm"], kind="rm")
    for r, p, x in zip(recs, task_prompts, answers["x"]):
        ids = (tok.encode(p, allow_special=False) + tok.encode(x["text"], allow_special=False) + [tok.eos_id])[-128:]
        with torch.no_grad():
            expected = rm.score(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)).item()
        assert r["scores"][0] == pytest.approx(expected, abs=1e-5)  # the long one: its end, EOS included
        assert r["outcome"] == ("win" if r["scores"][0] > r["scores"][1] else "loss")
    assert len({round(s, 6) for r in recs for s in r["scores"]}) == 6  # a real model, not a constant
    alone = []  # the y answers (different lengths) one at a time, from hand-built ids
    for p, y in zip(task_prompts, answers["y"]):
        ids = tok.encode(p, allow_special=False) + tok.encode(y["text"], allow_special=False) + [tok.eos_id]
        with torch.no_grad():
            alone.append(rm.score(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)).item())
    batched = rm_scores(rm, task_prompts[:3], [y["text"] for y in answers["y"]], batch_size=2)
    assert batched == pytest.approx(alone, abs=1e-5)
    assert [r["scores"][1] for r in recs] == pytest.approx(batched, abs=1e-5)


def test_function_judges(task_prompts, tmp_path, monkeypatch):
    import task
    _, subject, truth = task.parse_prompt(task_prompts[0])
    good, cut = answer(f" Of course. It is {truth}."), answer(f" It is {truth}.", ended=False)
    answers = {"good": [good], "cut": [cut]}
    gold = judge_comparisons(task_prompts[:1], answers, [("good", "cut")], make_judge("gold"))["good:cut"][0]
    assert gold["scores"] == [task.gold_reward(task_prompts[0], good["text"], ended=True),
                              task.gold_reward(task_prompts[0], cut["text"], ended=False)]
    assert gold["outcome"] == "win"  # the cut-off answer pays for its missing EOS
    # the gold judges read the generation's EOS flag: an "<|endoftext|>" typed out as text ends nothing
    typed = answer(good["text"] + ENDOFTEXT, ended=False)
    scores = judge_comparisons(task_prompts[:1], {"good": [good], "typed": [typed]}, [("good", "typed")],
                               make_judge("gold"))["good:typed"][0]["scores"]
    assert scores == [gold["scores"][0], task.gold_reward(task_prompts[0], typed["text"], ended=False)]
    assert scores[1] < scores[0]
    parts = [judge_comparisons(task_prompts[:1], answers, [("good", "cut")], make_judge(f"gold:{part}"))
             ["good:cut"][0]["scores"] for part in ("correctness", "style")]
    assert [c + s for c, s in zip(*parts)] == gold["scores"]
    assert parts[0] == [task.gold_breakdown(task_prompts[0], x["text"], x["ended"])["content"] for x in (good, cut)]

    (tmp_path / "my_judge.py").write_text("seen = []\ndef score(prompt, response):\n"
                                          "    seen.append(response)\n    return -len(response)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    custom = judge_comparisons(task_prompts[:1], answers, [("good", "cut")], make_judge("function:my_judge:score"))
    import my_judge
    assert sorted(my_judge.seen) == sorted([good["text"] + ENDOFTEXT, cut["text"]])
    assert custom["good:cut"][0]["outcome"] == "loss"
    with pytest.raises(UserError, match="not a prompt of this task"):
        judge_comparisons(PROMPTS[:1], {"a": [good], "b": [cut]}, [("a", "b")], make_judge("gold"))


def test_offline_cli_end_to_end_and_another_judge_reuses_the_answers(ckpts, tmp_path):
    common = ["-s", ckpts["sft"], "-p", ckpts["ppo"], "--prompts", ckpts["prompts"], "--max-new-tokens", "8",
              "--cache-dir", tmp_path / "cache", "--n-boot", "1000"]
    r = cli(*common, "--judge", "gold", "--judge", f"rm:{ckpts['rm']}", "--out-dir", tmp_path / "e1")
    assert r.returncode == 0, r.stderr
    assert "| gold | ppo vs sft | 6 |" in r.stdout and f"| rm:{ckpts['rm']} | ppo vs sft | 6 |" in r.stdout
    results = json.loads((tmp_path / "e1" / "results.json").read_text())
    assert [(x["judge"], x["a"], x["b"]) for x in results["results"]] == \
        [("gold", "ppo", "sft"), (f"rm:{ckpts['rm']}", "ppo", "sft")]  # no vanilla: tiny models have no hub base
    for x in results["results"]:
        assert x["wins"] + x["ties"] + x["losses"] == 6
        assert x["ci95"][0] <= x["win_rate"] <= x["ci95"][1]
    generations = [json.loads(line) for line in open(tmp_path / "e1" / "generations.jsonl")]
    assert len(generations) == 6 and set(generations[0]["answers"]) == {"sft", "ppo"}
    assert len(open(tmp_path / "e1" / "judgments.jsonl").readlines()) == 12
    import task
    rm, _ = load_model(ckpts["rm"], kind="rm")
    rescore = {"gold": lambda prompt, x: task.gold_reward(prompt, x["text"], ended=x["ended"]),
               f"rm:{ckpts['rm']}": lambda prompt, x: rm_scores(rm, [prompt], [x["text"]])[0]}
    for j in map(json.loads, open(tmp_path / "e1" / "judgments.jsonl")):  # each saved score, from the saved answers
        prompt, answers = generations[j["i"]]["prompt"], generations[j["i"]]["answers"]
        expected = [rescore[j["judge"]](prompt, answers[name]) for name in (j["a"], j["b"])]
        assert j["scores"] == pytest.approx(expected, abs=1e-5)
    assert results["models"]["ppo"]["generated"] == 6

    r = cli(*common, "--judge", "gold:correctness", "--clusters", "fact", "--out-dir", tmp_path / "e2")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("0 answers generated, 6 cached") == 2
    again = json.loads((tmp_path / "e2" / "results.json").read_text())["results"][0]
    content = [[task.correctness(g["prompt"], g["answers"][m]["text"], g["answers"][m]["ended"])
                for m in ("ppo", "sft")] for g in generations]
    assert (again["wins"], again["ties"], again["losses"]) == \
        (sum(a > b for a, b in content), sum(a == b for a, b in content), sum(a < b for a, b in content))
    assert again["ci_clusters"] == len({task.parse_prompt(g["prompt"]) for g in generations})
    assert results["results"][0]["ci_clusters"] is None  # a prompts file: each prompt its own cluster


@pytest.mark.parametrize("args, message", [
    (["-s", "/no/such/run", "--judge", "gold"], "checkpoint not found"),
    (["--judge", "oracle"], "unknown judge 'oracle'"),
    (["--judge", "function:no_such_module:f"], "cannot import"),
    (["--compare", "sft:vanilla", "--judge", "gold"], "no model named 'vanilla'"),
    (["--judge", "gold", "--limit", "0"], "--limit must be at least 1"),
    (["--judge", "gold", "--prompts", "EMPTY"], "no usable examples"),
    (["--judge", "openai"], "OPENAI_API_KEY"),
])
def test_bad_input_is_a_user_error(ckpts, tmp_path, monkeypatch, args, message):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.jsonl").write_text(json.dumps({"prompt": ""}) + "\n")
    args = [str(tmp_path / "empty.jsonl") if a == "EMPTY" else a for a in args]
    base = ["--prompts", ckpts["prompts"]] + ([] if "-s" in args else ["-s", ckpts["sft"], "-p", ckpts["ppo"]])
    with pytest.raises(UserError, match=re.escape(message)):
        main(base + args)
    assert not (tmp_path / "runs").exists()


def test_unreadable_replies_are_asked_again_a_bounded_number_of_times(tmp_path):
    """An unreadable reply is not a verdict: it is asked again (up to MAX_ASKS times per pair and order),
    a readable one never; the cache records how often each was asked, so a rerun asks nothing new."""
    from evaluate import MAX_ASKS
    from judges import json_sha256, parse_verdict

    class FlakyJudge:
        kind, name, server = "pairwise", "flaky", "in-process"

        def __init__(self):
            self.asked = Counter()

        def key(self, prompt, first, second):
            return json_sha256([prompt, first, second])

        def ask(self, prompt, first, second):
            self.asked[prompt, first] += 1
            if prompt == "never" or self.asked[prompt, first] == 1:
                return None, "I am not sure.", "length"
            return parse_verdict("[[A]]"), "[[A]]", "stop"

    prompts = ["once", "never"]
    answers = {"x": [{"text": "yes", "ended": True}] * 2, "y": [{"text": "no", "ended": True}] * 2}
    judge, cache = FlakyJudge(), str(tmp_path / "verdicts.jsonl")
    records = judge_comparisons(prompts, answers, [("x", "y")], judge, cache)["x:y"]
    assert judge.asked == {("once", "yes"): 2, ("once", "no"): 2, ("never", "yes"): MAX_ASKS,
                           ("never", "no"): MAX_ASKS}
    assert records[0]["verdicts"] == ["A", "A"] and records[0]["outcome"] == "tie"  # A both times: a flip
    assert records[1]["outcome"] is None and records[1]["verdicts"] == [None, None]
    again = FlakyJudge()
    judge_comparisons(prompts, answers, [("x", "y")], again, cache)
    assert sum(again.asked.values()) == 0
