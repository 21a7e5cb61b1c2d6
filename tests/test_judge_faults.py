"""The LLM judge under every fault a real server produces: no verdict may be lost, doubled or misread.

FaultServer is an OpenAI-compatible chat-completions server on 127.0.0.1 that plays a fixed script per
(pair, order) and attempt: 429 with Retry-After, 500, a reply slower than the client's timeout, a reset
connection, malformed 200 bodies, empty / cut-off / refused / garbage replies, a wrong answer label,
and verdicts in many phrasings. The real `openai` client talks to it through ChatJudge; the server logs
every request, so the tests can say exactly what was asked how often. The last tests run the whole
evaluation with a sentinel API key and check that the key goes nowhere but the Authorization header,
and that nothing on the evaluation or resume path unpickles.
"""
import json
import os
import re
import socket
import struct
import threading
import time
from collections import Counter, defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

import evaluate
from checkpoints import load_model, load_training_checkpoint, save_model, save_training_checkpoint
from common import UserError
from configs import ModelConfig
from evaluate import MAX_ASKS, judge_comparisons, summarize
from gpt import GPT, RewardModel
from judges import ChatJudge

CONFIG = ModelConfig(n_layer=2, n_head=4, n_embd=64, block_size=128)
SENTINEL = "sk-SENTINEL-1234567890abcdefXYZ"
TIMEOUT = 1.0  # the client's timeout (s); the server's slow reply takes SLOW
SLOW = 2.5


# -----------------------------------------------------------------------------
# The server


def verdict(text):
    """A reply that is a readable verdict (the server counts these: none may be asked for twice)."""
    return ("verdict", text, "stop")


def reply(text, finish="stop"):
    return ("reply", text, finish)


def status(code, message="try later", headers=()):
    return ("status", code, list(headers), message)


def body(raw: bytes, content_type="application/json"):
    return ("body", raw, content_type)


TIMEOUT_FAULT, RESET = ("timeout",), ("reset",)
TRANSPORT = {"status", "timeout", "reset"}  # faults the openai client retries by itself


def completion(model, message, finish):
    return {"id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": model,
            "choices": [{"index": 0, "finish_reason": finish, "message": {"role": "assistant", **message}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


class FaultServer:
    """POST /v1/chat/completions, answering by `plan(i, first, second, attempt, key) -> action`, where i is
    the prompt's "topic number i", first / second the answers shown as A / B, attempt counts requests
    for that (pair, order) from 1 and key is the bearer token. `history[(i, first)]` lists the action kind
    of every request of that (pair, order); `logged` every request's headers (Authorization left out)
    and body."""

    def __init__(self, plan):
        self.plan, self.lock = plan, threading.Lock()
        self.history, self.times = defaultdict(list), defaultdict(list)
        self.logged, self.keys_seen = [], set()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.httpd.handle_error = lambda *args: None  # a reset or a client that gave up is not an error here
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/v1"

    def __enter__(self):
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def requests(self):
        return sum(len(h) for h in self.history.values())

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def send(self, code, data: bytes, content_type="application/json", headers=()):
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers:
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                request = json.loads(raw)
                user = request["messages"][-1]["content"]
                i = int(re.search(r"topic number (\d+)", user).group(1))
                first, second = re.search(r"\[Answer A\]\n(.*)\n\n\[Answer B\]\n(.*)\n\n\[Your verdict\]",
                                          user, re.S).groups()
                key = self.headers.get("Authorization", "").removeprefix("Bearer ")
                with server.lock:
                    server.logged.append(({k: v for k, v in self.headers.items() if k.lower() != "authorization"},
                                          raw.decode()))
                    server.keys_seen.add(key)
                    action = server.plan(i, first, second, len(server.history[i, first]) + 1, key)
                    server.history[i, first].append(action[0])
                    server.times[i, first].append(time.monotonic())
                kind = action[0]
                if kind in ("verdict", "reply"):
                    self.send(200, json.dumps(completion(request["model"], {"content": action[1]}, action[2])).encode())
                elif kind == "refusal":
                    message = {"content": None, "refusal": action[1]}
                    self.send(200, json.dumps(completion(request["model"], message, "stop")).encode())
                elif kind == "status":
                    error = {"error": {"message": action[3], "type": "server_error"}}
                    self.send(action[1], json.dumps(error).encode(), headers=action[2])
                elif kind == "body":
                    self.send(200, action[1], content_type=action[2])
                elif kind == "timeout":
                    time.sleep(SLOW)  # the client has given up and retried; nothing is sent
                    self.close_connection = True
                elif kind == "reset":  # RST instead of a reply: SO_LINGER 0, then close
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()
                    self.close_connection = True

            def finish(self):
                try:
                    super().finish()
                except OSError:
                    pass  # the socket was reset on purpose

        return Handler


def chat_judge(server, key="sk-anything", **kw):
    return ChatJudge("fault-judge", key, server.url, **{"timeout": TIMEOUT, "max_retries": 3, "max_tokens": 64, **kw})


# -----------------------------------------------------------------------------
# Every fault, pair by pair


N = 14
PROMPTS = [f"\n\nHuman: Tell me about topic number {i}.\n\nAssistant:" for i in range(N)]
LONG = [f"Topic {i} is a long story, told here in some detail." for i in range(N)]
SHORT = [f"Topic {i}: no." for i in range(N)]
ANSWERS = {"long": [{"text": " " + t, "ended": True} for t in LONG],
           "short": [{"text": " " + t, "ended": True} for t in SHORT]}

A = verdict("The first answer is more complete.\n**Final verdict: [[A]]**")
B = verdict("Answer B covers more.\nVerdict: [[ b ]]")
COMPLETION_NULL_MESSAGE = json.dumps({**completion("fault-judge", {}, "stop"),
                                      "choices": [{"index": 0, "finish_reason": "stop", "message": None}]}).encode()

# pair -> (requests with the long answer shown first, with the short one first); the last one repeats
PLAN = {
    0: ([status(429, "rate limited", [("Retry-After", "1")]), A], [B]),
    1: ([status(500), status(500), A], [status(500), B]),
    2: ([TIMEOUT_FAULT, A], [B]),
    3: ([RESET, A], [RESET, B]),
    4: ([reply(""), A], [B]),  # empty once, then a verdict
    5: ([reply("Compared with [[B]], answer A starts out well, and", "length")], [B]),  # cut off: no final line
    6: ([A], [("refusal", "I'm sorry, I can't help with comparing these.")]),
    7: ([reply("qwzx ## 42 lorem ipsum")], [reply("qwzx ## 42 lorem ipsum")]),
    8: ([reply("[[C]]")], [reply("Answer C is better."), B]),  # a label that names no answer
    9: ([verdict("It's a tie.")], [verdict("Both answers are equally good.\n\n[[tie]]")]),
    10: ([verdict("Neither is better.")], [verdict("**Tie**")]),
    11: ([body(b'{"error": "overloaded"}'), A], [body(b"<html>502 Bad Gateway</html>", "text/html"),
                                                 body(COMPLETION_NULL_MESSAGE), B]),
    12: ([verdict("Answer A is better.")], [verdict("I choose B")]),
    13: ([verdict("**[[a]]**")], [verdict("B is better.")]),
}
# pair -> (outcome of long, why each order stayed unreadable, asks per order, the kinds the server saw)
EXPECTED = {
    0: ("win", [None, None], [1, 1], (["status", "verdict"], ["verdict"])),
    1: ("win", [None, None], [1, 1], (["status", "status", "verdict"], ["status", "verdict"])),
    2: ("win", [None, None], [1, 1], (["timeout", "verdict"], ["verdict"])),
    3: ("win", [None, None], [1, 1], (["reset", "verdict"], ["reset", "verdict"])),
    4: ("win", [None, None], [2, 1], (["reply", "verdict"], ["verdict"])),
    5: (None, ["length", None], [MAX_ASKS, 1], (["reply"] * MAX_ASKS, ["verdict"])),
    6: (None, [None, "refusal"], [1, MAX_ASKS], (["verdict"], ["refusal"] * MAX_ASKS)),
    7: (None, ["no_verdict", "no_verdict"], [MAX_ASKS] * 2, (["reply"] * MAX_ASKS, ["reply"] * MAX_ASKS)),
    8: (None, ["no_verdict", None], [MAX_ASKS, 2], (["reply"] * MAX_ASKS, ["reply", "verdict"])),
    9: ("tie", [None, None], [1, 1], (["verdict"], ["verdict"])),
    10: ("tie", [None, None], [1, 1], (["verdict"], ["verdict"])),
    11: ("win", [None, None], [2, 3], (["body", "verdict"], ["body", "body", "verdict"])),
    12: ("win", [None, None], [1, 1], (["verdict"], ["verdict"])),
    13: ("win", [None, None], [1, 1], (["verdict"], ["verdict"])),
}


def scripted(i, first, second, attempt, key):
    script = PLAN[i][0 if first == LONG[i] else 1]
    return script[min(attempt, len(script)) - 1]


def test_every_fault_ends_in_a_verdict_or_an_unreadable_status_with_its_reason(tmp_path):
    cache = str(tmp_path / "verdicts.jsonl")
    with FaultServer(scripted) as server:
        t0 = time.monotonic()
        recs = judge_comparisons(PROMPTS, ANSWERS, [("long", "short"), ("short", "long")], chat_judge(server),
                                 cache, max_concurrency=4)
        elapsed = time.monotonic() - t0
        seen = {k: list(v) for k, v in server.history.items()}
        for i, (outcome, reasons, asks, kinds) in EXPECTED.items():
            r = recs["long:short"][i]
            assert (r["outcome"], r["unreadable"], r["asks"]) == (outcome, reasons, asks), i
            assert r["status"] == ("unreadable" if outcome is None else "judged"), i
            # Transport faults were retried inside one ask; each reply was asked for once, or MAX_ASKS times
            # while it stayed unreadable; nothing answered readably was asked again.
            assert (seen[i, LONG[i]], seen[i, SHORT[i]]) == kinds, i
            for why, finish, text in zip(r["unreadable"], r["finish_reasons"], r["replies"]):
                if why:  # the reason and the last reply are on the record, not only "None"
                    assert isinstance(text, str) and finish is not None
        assert recs["long:short"][5]["finish_reasons"][0] == "length"
        assert recs["long:short"][5]["verdicts"] == [None, "B"]  # the [[B]] in a cut-off reply is not a verdict
        assert recs["long:short"][6]["replies"][1] == "I'm sorry, I can't help with comparing these."
        assert recs["long:short"][6]["finish_reasons"][1] == "refusal"
        assert recs["long:short"][7]["replies"] == ["qwzx ## 42 lorem ipsum"] * 2
        assert recs["long:short"][9]["consistent"] and recs["long:short"][10]["consistent"]
        # The client waited what Retry-After asked for (1 s) before it asked again.
        assert server.times[0, LONG[0]][1] - server.times[0, LONG[0]][0] >= 0.9

        # Per comparison and per position: long:short shows long first in verdicts[0]; short:long the opposite.
        s = summarize(recs["long:short"])
        assert (s["wins"], s["ties"], s["losses"], s["unparseable_pairs"], s["unparseable_answers"]) == (8, 2, 0, 4, 5)
        assert (s["unreadable_a_first"], s["unreadable_b_first"]) == (3, 2)
        assert s["unreadable_reasons"] == {"length": 1, "no_verdict": 3, "refusal": 1}
        r = summarize(recs["short:long"])
        assert (r["losses"], r["unreadable_a_first"], r["unreadable_b_first"]) == (8, 2, 3)
        assert r["unreadable_reasons"] == s["unreadable_reasons"]

        # A rerun asks nothing: readable verdicts and replies unreadable MAX_ASKS times are both final.
        n = server.requests()
        again = judge_comparisons(PROMPTS, ANSWERS, [("long", "short")], chat_judge(server), cache)
        assert server.requests() == n and again["long:short"] == recs["long:short"]
    assert elapsed < 20


def test_a_cache_with_foreign_or_broken_lines_is_asked_only_what_it_lacks(tmp_path):
    """Lines that are not verdict records (another version's, a torn write) must neither crash the run
    nor pass for a verdict: those (pair, order)s are asked, the readable ones are not."""
    cache = tmp_path / "verdicts.jsonl"
    plan = lambda i, first, second, attempt, key: A if first == LONG[i] else B  # noqa: E731
    with FaultServer(plan) as server:
        judge = chat_judge(server)
        judge_comparisons(PROMPTS[:3], ANSWERS, [("long", "short")], judge, str(cache))
        lines = cache.read_text().splitlines()
        keys = [json.loads(line)["key"] for line in lines]
        broken = [lines[0], json.dumps({"key": keys[1], "verdict": "C", "reply": "?"}),  # no such verdict
                  json.dumps({"key": keys[2]}), json.dumps({"key": [keys[3]], "verdict": "A"}),  # no verdict; bad key
                  "[1, 2]", "null", lines[4], lines[5], lines[0][:20]]  # not objects, a torn last line
        cache.write_text("\n".join(broken))
        n = server.requests()
        recs = judge_comparisons(PROMPTS[:3], ANSWERS, [("long", "short")], judge, str(cache))["long:short"]
        assert server.requests() - n == 3  # keys 1, 2 and 3 again; 0, 4 and 5 were readable
        assert [r["outcome"] for r in recs] == ["win"] * 3


# -----------------------------------------------------------------------------
# The whole evaluation: the API key goes to the server's Authorization header and nowhere else


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two different tiny LMs as SFT and PPO runs, a tiny RM run, and a prompt file of 6 topics."""
    root = tmp_path_factory.mktemp("runs")
    paths = {}
    for seed, stage in ((0, "sft"), (1, "ppo")):
        torch.manual_seed(seed)
        save_model(GPT(CONFIG), str(root / stage / "final"), stage=stage)
        paths[stage] = str(root / stage)
    torch.manual_seed(2)
    save_model(RewardModel(CONFIG), str(root / "rm" / "final"), stage="rm")
    paths["rm"] = str(root / "rm")
    paths["prompts"] = str(root / "prompts.jsonl")
    with open(paths["prompts"], "w") as f:
        f.writelines(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[:6])
    return paths


def echoing(i, first, second, attempt, key):
    """Failures whose messages quote the key, as OpenAI's 401 does, and a reply that quotes it too."""
    if i == 0 and attempt == 1:
        return status(500, f"upstream failed for key {key}")
    if i == 1 and attempt == 1:
        return status(429, f"rate limit for {key}", [("Retry-After", "0")])
    if i == 2 and attempt == 1:
        return RESET
    if i == 3:
        return reply(f"I see the key {key} and cannot decide.")
    return verdict("[[A]]" if first < second else "[[B]]")


def failing(i, first, second, attempt, key):
    return status(500, f"Incorrect API key provided: {key}") if i == 4 else echoing(i, first, second, attempt, key)


def eval_args(runs, server, tmp_path, name, judge_model="fault-judge"):
    return ["-s", runs["sft"], "-p", runs["ppo"], "--prompts", runs["prompts"], "--judge", "openai",
            "--judge-model", judge_model, "--base-url", server.url, "--timeout", str(TIMEOUT), "--max-retries", "2",
            "--max-new-tokens", "8", "--n-boot", "200", "--device", "cpu", "--max-concurrency", "2",
            "--cache-dir", str(tmp_path / "cache"), "--out-dir", str(tmp_path / name)]


def exception_texts(e):
    """The messages of an exception and of everything chained to it (cause and context)."""
    out, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        out += [str(e), repr(e)] + [repr(a) for a in getattr(e, "args", ())]
        e = e.__cause__ or e.__context__
    return out


def test_the_api_key_reaches_only_the_authorization_header(runs, tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("OPENAI_API_KEY", SENTINEL)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.chdir(tmp_path)
    with FaultServer(echoing) as server:
        assert evaluate.main(eval_args(runs, server, tmp_path, "ok")) == 0
        ok_requests = server.requests()
        with FaultServer(failing) as down:  # other keys (a new judge model), and one pair that never succeeds
            with pytest.raises(UserError) as failed:
                evaluate.main(eval_args(runs, down, tmp_path, "failed", judge_model="other-judge"))
    out, err = capfd.readouterr()
    assert "HTTP 500" in str(failed.value) and "***" in str(failed.value)  # the reason, with the key masked
    for text in exception_texts(failed.value) + [out, err]:
        assert SENTINEL not in text
    assert server.keys_seen == {SENTINEL} and down.keys_seen == {SENTINEL}
    for headers, text in server.logged + down.logged:
        assert SENTINEL not in text and SENTINEL not in json.dumps(headers)
    files = [os.path.join(d, f) for where in ("ok", "failed", "cache") for d, _, fs in os.walk(tmp_path / where)
             for f in fs]
    assert any(f.endswith("verdicts.jsonl") for f in files) and any(f.endswith("results.json") for f in files)
    for f in files:
        with open(f, "rb") as fh:
            assert SENTINEL.encode() not in fh.read(), f
    # The run itself went through the faults: every (pair, order) of the six pairs ended on the record.
    results = json.load(open(tmp_path / "ok" / "results.json"))["results"][0]
    judgments = [json.loads(line) for line in open(tmp_path / "ok" / "judgments.jsonl")]
    asked = [j for j in judgments if not j["identical"]]
    assert ok_requests == sum(len(h) for h in server.history.values())
    assert all(j["status"] in ("judged", "unreadable", "identical") for j in judgments)
    assert all(j["outcome"] is not None or any(j["unreadable"]) for j in asked)
    kinds = Counter(kind for h in server.history.values() for kind in h)
    assert len(asked) == 6 and kinds["status"] == 4 and kinds["reset"] == 2  # pairs 0-2 failed first, both orders
    three = [j for j in asked if j["i"] == 3]
    assert three[0]["unreadable"] == ["no_verdict"] * 2 and three[0]["asks"] == [MAX_ASKS] * 2
    assert results["unreadable_a_first"] == results["unreadable_b_first"] == 1
    assert three[0]["replies"][0] == "I see the key *** and cannot decide."  # masked before it was stored


# -----------------------------------------------------------------------------
# Nothing unpickles: torch.load only with weights_only=True, datasets never with remote code


def test_evaluation_and_resume_load_no_pickle(runs, tmp_path, monkeypatch, capfd):
    calls, real_load = [], torch.load

    def recording_load(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    monkeypatch.setattr(torch.serialization, "load", recording_load)
    # Resume: a training checkpoint written and read back through the trainers' own functions.
    torch.manual_seed(0)
    model = GPT(CONFIG)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.zeros(1, 4, dtype=torch.long)).float().sum().backward()  # some optimizer state to save
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    ckpt = save_training_checkpoint(str(tmp_path / "run"), 1, {"model": model}, "sft", None, {"model": opt},
                                    {"model": sched}, {"step": 1}, [{"torch": torch.get_rng_state()}], keep_last=1)
    state, _ = load_training_checkpoint(ckpt, {"model": GPT(CONFIG)}, {"model": opt}, {"model": sched})
    assert state == {"step": 1} and calls  # optimizer.pt went through torch.load
    load_model(ckpt, kind="lm")
    # Evaluation: checkpoints, a reward-model judge and a prompt file.
    assert evaluate.main(["-s", runs["sft"], "-p", runs["ppo"], "--prompts", runs["prompts"], "--judge",
                          f"rm:{runs['rm']}", "--max-new-tokens", "4", "--n-boot", "100", "--device", "cpu",
                          "--cache-dir", str(tmp_path / "cache"), "--out-dir", str(tmp_path / "eval")]) == 0
    capfd.readouterr()
    assert calls and all(kw.get("weights_only") is True for kw in calls), calls


def test_datasets_never_run_remote_code(tmp_path, monkeypatch):
    import datasets

    import dataset
    calls = []

    def fake_load_dataset(path, *args, **kwargs):
        calls.append((path, kwargs))
        if path in ("json", "csv", "parquet"):
            return real(path, *args, **kwargs)
        rows = [{"act": "Comedian", "prompt": "Tell me a joke."}] if "prompts" in path else \
            [{"chosen": "\n\nHuman: Hi.\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi.\n\nAssistant: Go."}]
        return datasets.Dataset.from_list(rows)

    real = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # no network check before loading
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "Tell me a story."}) + "\n")
    assert dataset.load_prompts("fka/awesome-chatgpt-prompts", limit=1)[0].endswith("Assistant:")
    assert len(dataset.load_rows("Anthropic/hh-rlhf:helpful-base", "test")) == 1
    assert len(dataset.load_prompts(str(tmp_path / "p.jsonl"))) == 1
    assert {"fka/awesome-chatgpt-prompts", "Anthropic/hh-rlhf", "json"} <= {path for path, _ in calls}
    assert all(kwargs.get("trust_remote_code") in (None, False) for _, kwargs in calls), calls
