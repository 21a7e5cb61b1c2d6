"""chat.py: a conversation keeps the newest whole turns that fit, a reply stops at the next human turn,
the text streams in whole characters as GPT.generate writes it, and the terminal (through a pty) and the
web page (headless Chromium) show the model's own replies, conditioned on the turns before."""
import json
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
import torch
from conftest import ROOT, SRC, randomize_

import chat
from checkpoints import save_model
from common import UserError, run_cli
from configs import EOS_ID, ModelConfig
from evaluate import GenParams
from gpt import GPT, RewardModel
from tokenizer import format_prompt, get_tokenizer

CONFIG = ModelConfig(n_layer=2, n_head=4, n_embd=64, block_size=128)
QUESTION = "What is the capital of France?"
GREEDY = GenParams(temperature=0, max_new_tokens=16)
tok = get_tokenizer()


class ScriptedLM(GPT):
    """A GPT whose network is replaced by a script and whose decoding is GPT.generate's own: it answers
    each prompt with reply_fn(prompt text), token by token and then EOS, and records every prompt."""

    def __init__(self, reply_fn, block_size=128):
        super().__init__(ModelConfig(n_layer=1, n_head=1, n_embd=4, block_size=block_size))
        self.reply_fn, self.prompts, self.script, self.steps = reply_fn, [], [], 0

    def forward(self, idx, attention_mask=None, kv_cache=None):
        if kv_cache is None or kv_cache.length == 0:  # the prompt: write the script of this reply
            self.prompts.append(tok.decode(idx[0]))
            self.script, self.steps = tok.encode(self.reply_fn(self.prompts[-1]), allow_special=False) + [EOS_ID], 0
        else:
            self.steps += 1
        if kv_cache is not None:
            kv_cache.length += idx.shape[1]
        return torch.full((*idx.shape, 1), float(self.steps))  # (B, T, 1): the step, read by lm_head

    @property
    def lm_head(self):
        def head(h):  # (b, 1) -> (b, V), all mass on the script's token for this step
            logits = torch.full((h.shape[0], self.config.vocab_size), -1e4)
            logits[:, self.script[min(int(h[0, 0]), len(self.script) - 1)]] = 0.0
            return logits
        return head


def test_on_step_sees_exactly_the_generated_tokens_in_order():
    model = randomize_(GPT(CONFIG), seed=1).eval()
    ids, mask = tok.pad([tok.encode("Hello there, how"), tok.encode("A")], padding_side="left")  # (2, Tp)
    Tp, kw = ids.shape[1], dict(max_new_tokens=10, temperature=1.0, top_k=50)
    probe = model.generate(ids, mask, eos_id=None, generator=torch.Generator().manual_seed(0), **kw)
    eos = int(probe.tokens[0, Tp + 2])  # with this as EOS, row 0 finishes early and row 1 goes on
    assert eos not in probe.tokens[1, Tp:].tolist()
    seen = []
    out = model.generate(ids, mask, eos_id=eos, generator=torch.Generator().manual_seed(0),
                         on_step=lambda t: seen.append(t.clone()), **kw)
    plain = model.generate(ids, mask, eos_id=eos, generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(out.tokens, plain.tokens) and torch.equal(out.response_mask, plain.response_mask)
    steps = torch.stack(seen, dim=1)  # (B, n)
    assert steps.shape == (2, 10) and torch.equal(steps, out.tokens[:, Tp:])
    ended = int(out.response_mask[0].sum())
    assert ended <= 3 and steps[0, ended - 1] == eos and (steps[0, ended:] == eos).all()  # pad after EOS


def test_reply_stops_where_the_model_starts_a_new_human_turn():
    model = ScriptedLM(lambda prompt: " Paris is the capital.\n\nHuman: and now I talk for you")
    c = chat.Chat(model, GREEDY, "cpu")
    pieces = []
    reply = c.say(QUESTION, on_text=pieces.append)
    assert reply == "Paris is the capital." and c.history == [(QUESTION, reply)]
    assert "".join(pieces) == reply  # nothing of "\n\nHuman:" streamed before it was recognised
    assert model.steps < len(model.script) - 2  # generation itself stopped there, not at the script's EOS
    c.say("Thanks")
    assert model.prompts[1] == format_prompt(QUESTION) + " " + reply + format_prompt("Thanks")


def test_text_held_back_as_a_possible_next_turn_is_sent_when_it_is_not_one():
    model = ScriptedLM(lambda prompt: " Wait\n\nHum")  # the start of "\n\nHuman:", then EOS
    pieces = []
    reply = chat.Chat(model, GREEDY, "cpu").say(QUESTION, on_text=pieces.append)
    assert reply == "Wait\n\nHum" and pieces[0] == "Wait" and "".join(pieces) == reply


def test_second_turn_is_conditioned_on_the_first_and_reset_forgets():
    model = ScriptedLM(lambda prompt: " You said: " + prompt.rsplit("Human: ", 1)[1].split("\n")[0])
    c = chat.Chat(model, GREEDY, "cpu")
    assert c.say("hello") == "You said: hello"
    assert c.say("bye") == "You said: bye"
    assert model.prompts[1] == "\n\nHuman: hello\n\nAssistant: You said: hello\n\nHuman: bye\n\nAssistant:"
    assert c.last_prompt == model.prompts[1]
    c.reset()
    c.say("again")
    assert model.prompts[2] == format_prompt("again") and c.history == [("again", "You said: again")]


def test_history_is_truncated_from_the_left_by_whole_turns():
    model = ScriptedLM(lambda prompt: " Noted, thanks.", block_size=64)
    c = chat.Chat(model, GenParams(temperature=0, max_new_tokens=16), "cpu")
    assert c.room == 48
    turns, dropped = [], 0
    for k in range(12):
        message = f"message number {k}"
        c.say(message)
        prompt, new = model.prompts[-1], format_prompt(message)
        assert len(tok.encode(prompt, allow_special=False)) <= c.room
        fits = lambda j: len(tok.encode("".join(turns[j:]) + new, allow_special=False)) <= c.room  # noqa: E731
        keep = min(j for j in range(len(turns) + 1) if fits(j))  # the most whole turns that fit
        assert prompt == "".join(turns[keep:]) + new
        dropped = max(dropped, keep)
        turns.append(new + " Noted, thanks.")
    assert dropped > 0 and len(c.history) == 12  # turns were dropped from the prompt, never from the history
    assert model.prompts[-1].startswith("\n\nHuman:") and "message number 10" in model.prompts[-1]


def test_a_message_longer_than_the_block_is_refused():
    c = chat.Chat(ScriptedLM(lambda p: " ok", block_size=64), GenParams(temperature=0, max_new_tokens=16), "cpu")
    with pytest.raises(UserError, match="message too long"):
        c.say("word " * 60)
    assert c.history == []


def test_streamed_pieces_are_whole_characters_and_arrive_while_generating():
    text = " Grüße aus 東京 🙂, café."
    split = [t for t in tok.encode(text) if not _is_utf8(tok.enc.decode_single_token_bytes(t))]
    assert split  # some character is split over tokens: the test means something
    model = ScriptedLM(lambda prompt: text)
    pieces, steps = [], []
    reply = chat.Chat(model, GREEDY, "cpu").say("Say something", on_text=lambda s: (pieces.append(s),
                                                                                     steps.append(model.steps)))
    assert reply == text.strip() and "".join(pieces) == reply
    assert not any("\ufffd" in p for p in pieces) and len(pieces) > 5
    assert steps[0] < steps[-1]  # streamed as generated, not all at the end


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


# -----------------------------------------------------------------------------
# The command line


@pytest.mark.parametrize("case", ["missing", "reward model", "two models without --web"])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, case):
    if case == "missing":
        argv, needle = [str(tmp_path / "missing")], str(tmp_path / "missing")
    elif case == "reward model":
        save_model(randomize_(RewardModel(CONFIG)), str(tmp_path / "rm" / "final"), stage="rm")
        argv, needle = [str(tmp_path / "rm")], "reward model"
    else:
        argv, needle = ["gpt2", "gpt2-medium"], "--web"
    with pytest.raises(SystemExit) as exit_:
        run_cli(lambda: chat.main(argv))
    captured = capsys.readouterr()
    assert exit_.value.code == 2 and captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1 and needle in captured.err, captured.err


class Pty:
    """A command on a pseudo-terminal, as a person would run it."""

    def __init__(self, argv):
        self.fd, child = pty.openpty()
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", TERM="dumb")
        self.proc = subprocess.Popen(argv, stdin=child, stdout=child, stderr=child, cwd=ROOT, env=env,
                                     start_new_session=True)
        os.close(child)
        self.buffer = ""

    def expect(self, marker: str, timeout: float = 60) -> str:
        """Everything before the next `marker` (escape sequences and \\r removed); consumes both."""
        deadline = time.time() + timeout
        while marker not in self.buffer:
            if time.time() > deadline or not select.select([self.fd], [], [], deadline - time.time())[0]:
                raise AssertionError(f"no {marker!r} in {self.buffer!r}")
            try:
                data = os.read(self.fd, 4096)
            except OSError:  # the child closed the terminal
                data = b""
            if not data:
                raise AssertionError(f"ended before {marker!r}: {self.buffer!r}")
            self.buffer += re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", data.decode(errors="replace")).replace("\r", "")
        before, _, self.buffer = self.buffer.partition(marker)
        return before

    def send(self, text: str):
        os.write(self.fd, text.encode())

    def close(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        os.close(self.fd)


def test_terminal_chat_two_turns_reset_and_ctrl_d():
    """A random nano model sampled at temperature 1: the second prompt holds the first turn with the
    reply as it was streamed, /reset forgets it and restarts the seed, and Ctrl-D exits 0."""
    term = Pty([sys.executable, os.path.join(SRC, "chat.py"), "--preset", "nano", "--max-new-tokens", "8",
                "--temperature", "1", "--show-prompt"])
    try:
        def turn(message):
            """Send a message at the "you: " prompt: (the prompt the model saw, its streamed reply)."""
            term.send(message + "\n")
            term.expect("prompt: ")
            prompt = json.loads(term.expect("\n"))
            term.expect("nano: ")
            return prompt, term.expect("\nyou: ").strip()

        term.expect("you: ")
        prompt1, reply1 = turn(QUESTION)
        assert prompt1 == format_prompt(QUESTION) and reply1
        prompt2, reply2 = turn("And of Spain?")
        assert prompt2 == prompt1 + " " + reply1 + format_prompt("And of Spain?")
        term.send("/reset\n")
        term.expect("(new conversation)\nyou: ")
        prompt3, reply3 = turn(QUESTION)
        assert (prompt3, reply3) == (prompt1, reply1)  # no history, and the same random draws again
        term.send("\x04")  # Ctrl-D on an empty line
        assert term.proc.wait(timeout=30) == 0
    finally:
        term.close()


# -----------------------------------------------------------------------------
# The web page


def browser():
    """Headless Chromium through selenium, or a skip saying what is missing (a failure under CI)."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing = "the selenium package (pip install -r requirements.txt)"
    else:
        binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
        if binary and driver:
            options = webdriver.ChromeOptions()
            options.binary_location = binary
            for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--window-size=1100,560", "--force-device-scale-factor=1"):
                options.add_argument(flag)
            return webdriver.Chrome(service=Service(driver), options=options)
        missing = "Chromium (apt-get install -y chromium chromium-driver)"
    if os.environ.get("CI"):
        pytest.fail(f"the web chat test needs {missing}; .ci/run must install it")
    pytest.skip(f"the web chat test needs {missing}")


@pytest.fixture(scope="module")
def web_models(tmp_path_factory):
    """name -> path of the models the page serves: two tiny random ones saved as runs, or, with
    MINCHATGPT_CHAT_MODELS="SFT_RUN PPO_RUN" (e.g. a pipeline run's), those."""
    given = os.environ.get("MINCHATGPT_CHAT_MODELS", "").split()
    if given:
        return {chat.model_name(path): path for path in given}
    root = tmp_path_factory.mktemp("web")
    paths = {}
    for seed, name in enumerate(("sft", "ppo")):
        paths[name] = str(root / name)
        save_model(randomize_(GPT(CONFIG), seed=seed).eval(), os.path.join(paths[name], "final"), stage=name)
    return paths


def test_web_chat_streams_each_models_own_replies_side_by_side(web_models):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser()
    server = subprocess.Popen([sys.executable, os.path.join(SRC, "chat.py"), *web_models.values(), "--web",
                               "--port", "0", "--temperature", "0", "--max-new-tokens", "32", "--device", "cpu"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1"))
    try:
        # What each model says in-process, turn by turn: the page must show exactly these replies.
        params = GenParams(temperature=0, max_new_tokens=32)
        chats = {name: chat.Chat(chat.load_models([path], None)[name], params, "cpu")
                 for name, path in web_models.items()}
        questions = (QUESTION, "What colour is a banana?")
        expected = {name: [c.say(q) for q in questions] for name, c in chats.items()}
        first_alone = {name: chat.Chat(c.model, params, "cpu").say(questions[1]) for name, c in chats.items()}
        assert any(first_alone[n] != expected[n][1] for n in chats)  # the history changes a reply: can fail

        line = server.stdout.readline()
        url = re.search(r"http://127\.0\.0\.1:\d+", line).group(0)
        driver.get(url)
        columns = driver.find_elements(By.CSS_SELECTOR, ".column")
        assert [col.get_attribute("data-model") for col in columns] == list(web_models)
        assert len(driver.find_elements(By.CSS_SELECTOR, "#picker input[type=checkbox]")) == 2

        def ask(text, n_done):
            driver.find_element(By.ID, "msg").send_keys(text + Keys.ENTER)
            WebDriverWait(driver, 60).until(
                lambda d: len(d.find_elements(By.CSS_SELECTOR, ".assistant[data-done]")) == n_done)
            return {col.get_attribute("data-model"): [driver.execute_script("return arguments[0].textContent", m)
                                                      for m in col.find_elements(By.CSS_SELECTOR, ".assistant")]
                    for col in driver.find_elements(By.CSS_SELECTOR, ".column")}

        assert ask(questions[0], 2) == {name: replies[:1] for name, replies in expected.items()}
        if os.environ.get("MINCHATGPT_SCREENSHOT"):  # the README's picture, of one question
            driver.save_screenshot(os.path.join(ROOT, "docs", "chat.png"))
        assert ask(questions[1], 4) == expected

        # The reply is streamed: several events that join up to it. Another session starts afresh.
        name = list(web_models)[0]
        events = sse(url, {"session": "other", "model": name, "text": questions[1]})
        assert len(events) > 2 and "".join(e.get("text", "") for e in events) == events[-1]["reply"]
        assert events[-1]["reply"] == first_alone[name]

        driver.find_element(By.ID, "msg").send_keys("/reset" + Keys.ENTER)
        WebDriverWait(driver, 30).until(lambda d: not d.find_elements(By.CSS_SELECTOR, ".msg"))
        assert ask(questions[1], 2) == {name: [first_alone[name]] for name in web_models}
    finally:
        driver.quit()
        server.kill()
        server.wait()


def sse(url: str, body: dict) -> list:
    """The events of one POST /chat."""
    request = urllib.request.Request(url + "/chat", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        raw = response.read().decode()
    return [json.loads(chunk[len("data: "):]) for chunk in raw.split("\n\n") if chunk]
