"""Chat with a trained model in the terminal, or on a web page (--web), its replies streamed as they are written.

The conversation is kept in the HH format the models were trained on ("\\n\\nHuman: ...\\n\\nAssistant: ..."
turns); when it outgrows the model's block (block size - --max-new-tokens), the oldest whole turns are
dropped. A reply ends at EOS or where the model starts the next human turn. Type /reset to start a new
conversation (the sampling seed starts over too); Ctrl-D quits.
--web serves a page on 127.0.0.1 with one column per model given, so that an SFT and a PPO run answer
the same messages side by side; each browser tab is its own conversation. The server is the standard
library's http.server: a local page for one user needs no web framework, and so no new dependency.

Examples:
  # works offline on a fresh clone (a tiny model with random weights, so expect gibberish)
  python src/chat.py --preset tiny --max-new-tokens 20

  # the PPO policy of a pipeline run, greedy (an SFT run, a checkpoint directory or a hub name work too)
  python src/chat.py runs/pipeline_task_<stamp>/ppo --temperature 0

  # SFT and PPO side by side in the browser, at http://127.0.0.1:8000
  python src/chat.py runs/pipeline_task_<stamp>/sft runs/pipeline_task_<stamp>/ppo --web --port 8000
"""
import codecs
import json
import os
import sys
import threading
from collections import OrderedDict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from cli import parser
from common import UserError, autocast, default_precision, resolve_device, run_cli, seed_everything
from configs import DECODE_PRECISIONS, EOS_ID, PRESETS
from evaluate import STOP, GenParams, answer_from_tokens
from gpt import GPT
from sample import load_policy
from tokenizer import format_prompt, get_tokenizer


# -----------------------------------------------------------------------------
# One conversation


class TextStream:
    """Generated tokens -> the newly readable text, passed to `on_text` piece by piece.

    Bytes of a character that GPT-2's byte-level BPE split over several tokens wait for the rest
    (an incremental UTF-8 decoder); text that may be the start of the stop string, and trailing
    whitespace, wait until the next token shows what they are. So the pieces join up to exactly the
    reply that `Chat.say` returns: stripped, and without a next "\\n\\nHuman:" turn.
    """

    def __init__(self, tok, on_text: Optional[Callable[[str], None]]):
        self.tok, self.on_text = tok, on_text
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""  # everything decoded so far
        self.sent = 0  # characters of the reply already passed on

    def step(self, tokens: torch.Tensor):
        """GPT.generate's on_step hook: tokens (1,) is the token just generated."""
        token = int(tokens[0])
        if self.on_text is None or token == EOS_ID:
            return
        self.text += self.decoder.decode(self.tok.enc.decode_single_token_bytes(token))
        shown = self.text.lstrip()
        cut = shown.find(STOP)
        if cut < 0:  # hold back a tail that could still become the stop string
            held = next((k for k in range(len(STOP) - 1, 0, -1) if shown.endswith(STOP[:k])), 0)
            cut = len(shown) - held
        self._send(shown[:cut].rstrip())

    def finish(self, reply: str):
        """Pass on what was held back and turned out to be part of the reply."""
        self._send(reply)

    def _send(self, upto: str):
        if self.on_text is not None and len(upto) > self.sent:
            piece, self.sent = upto[self.sent:], len(upto)
            self.on_text(piece)


class Chat:
    """A conversation with `model`: `say(text)` adds a human turn and returns the model's reply,
    which `history` keeps as a (human, assistant) pair for the next turns to be conditioned on.

    The model sees the newest turns that fit its block with room for the reply, each turn encoded
    on its own (a turn starts with "\\n\\nHuman:", where GPT-2's pre-tokenizer splits anyway), in
    one random stream seeded with params.seed, which `reset` starts over. The reply budget is
    params.max_new_tokens capped at half the block size, as evaluate.py caps it.
    """

    def __init__(self, model: GPT, params: GenParams, device):
        self.device = torch.device(device)
        self.model, self.params, self.tok = model.to(self.device).eval(), params, get_tokenizer()
        block = model.config.block_size
        self.max_new_tokens = min(params.max_new_tokens, block // 2)
        self.room = block - self.max_new_tokens  # tokens the conversation may take
        self.last_prompt: Optional[str] = None  # the text the model saw before its latest reply
        self.reset()

    def reset(self):
        """Forget the conversation and start the sampling stream over."""
        self.history: List[Tuple[str, str]] = []
        self._turn_ids: List[List[int]] = []  # token ids of each turn of history
        self.generator = torch.Generator(device=self.device).manual_seed(self.params.seed)

    def prompt_ids(self, text: str) -> List[int]:
        """The prompt for a new human turn `text`: the newest whole turns of the history that fit
        in `room` tokens together with it."""
        new = self.tok.encode(format_prompt(text), allow_special=False)
        if len(new) > self.room:
            raise UserError(f"message too long: {len(new)} tokens with its turn markers, and the model has room "
                            f"for {self.room} ({self.model.config.block_size} - {self.max_new_tokens} for the reply)")
        start, used = len(self._turn_ids), len(new)
        while start > 0 and used + len(self._turn_ids[start - 1]) <= self.room:
            start -= 1
            used += len(self._turn_ids[start])
        return [t for turn in self._turn_ids[start:] for t in turn] + new

    @torch.no_grad()
    def say(self, text: str, on_text: Optional[Callable[[str], None]] = None) -> str:
        """The model's reply to the human turn `text`, also added to the history. on_text receives
        each newly decoded piece of the reply as it is generated (the pieces join up to the reply)."""
        text = text.strip()
        ids = self.prompt_ids(text)
        self.last_prompt = self.tok.decode(ids)
        stream, p = TextStream(self.tok, on_text), self.params
        prompt = torch.tensor([ids], device=self.device)  # (1, Tp)
        with autocast(self.device, default_precision(self.device)):
            out = self.model.generate(prompt, max_new_tokens=self.max_new_tokens, temperature=p.temperature,
                                      top_k=p.top_k or None, top_p=p.top_p, eos_id=EOS_ID, stop_strings=[STOP],
                                      tokenizer=self.tok, generator=self.generator, on_step=stream.step)
        Tp = out.prompt_len
        new_ids = out.tokens[0, Tp:][out.response_mask[0, Tp:].bool()].tolist()
        reply = answer_from_tokens(self.tok, new_ids)["text"].strip()  # EOS and a next "Human:" turn cut off
        stream.finish(reply)
        self.history.append((text, reply))
        self._turn_ids.append(self.tok.encode(format_prompt(text) + (" " + reply if reply else ""),
                                              allow_special=False))
        return reply


# -----------------------------------------------------------------------------
# Models and flags

SAMPLING_FLAGS = {  # GenParams field -> help; the defaults are GenParams'
    "max_new_tokens": "longest reply in tokens, capped at half the model's block size",
    "temperature": "sampling temperature (0 = greedy)",
    "top_k": "top-k sampling (0 = off)",
    "top_p": "nucleus sampling (1 = off)",
    "seed": "seeds the sampling (again at each /reset) and a preset's random weights",
}


def add_sampling_args(ap):
    """The sampling flags, one per GenParams field named in SAMPLING_FLAGS."""
    g, base = ap.add_argument_group("sampling (evaluate.GenParams)"), GenParams()
    for field, help_ in SAMPLING_FLAGS.items():
        default = getattr(base, field)
        g.add_argument("--" + field.replace("_", "-"), type=type(default), default=default,
                       help=f"{help_} (default {default})")


def gen_params(args) -> GenParams:
    return GenParams(**{field: getattr(args, field) for field in SAMPLING_FLAGS})


def model_name(source: str) -> str:
    """A short name for the picker: the last folder of a run path that is not a checkpoint's
    ('runs/pipeline_x/ppo/final' -> 'ppo'), or the hub name."""
    parts = [p for p in os.path.normpath(source).split(os.sep) if p not in ("", ".")]
    while len(parts) > 1 and (parts[-1] in ("final", "checkpoints") or parts[-1].startswith("step")
                              or parts[-1].endswith(".safetensors")):
        parts.pop()
    return parts[-1] if parts else source


def load_models(sources: Sequence[str], preset: Optional[str]) -> Dict[str, GPT]:
    """name -> language model for each source ("NAME=PATH" names it), or a new `preset` model
    (random weights unless the preset has hub ones); a tiny one if neither is given."""
    if not sources:
        return {preset or "tiny": load_policy(None, preset)}
    if preset:
        raise UserError("give models to load or --preset, not both")
    models = {}
    for item in sources:
        name, sep, path = item.partition("=")
        if not sep or os.path.exists(item) or not name.replace("-", "").replace("_", "").isalnum():
            name, path = model_name(item), item
        base, k = name, 2
        while name in models:
            name, k = f"{base}-{k}", k + 1
        models[name] = load_policy(path, None)
    return models


# -----------------------------------------------------------------------------
# The terminal


def terminal(chat: Chat, name: str, show_prompt: bool = False) -> int:
    """Read a message per line, stream the reply; /reset starts over, EOF (Ctrl-D) quits."""
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    p = chat.params
    print(f"chatting with {name} (temperature {p.temperature}, top-k {p.top_k}, top-p {p.top_p}, "
          f"up to {chat.max_new_tokens} tokens a reply). /reset starts over, Ctrl-D quits.", flush=True)
    while True:
        try:
            text = input("you: ").strip()
        except EOFError:
            print()
            return 0
        if not text:
            continue
        if text == "/reset":
            chat.reset()
            print("(new conversation)", flush=True)
            continue
        try:
            if show_prompt:
                print("prompt: " + json.dumps(chat.tok.decode(chat.prompt_ids(text))), flush=True)
            print(f"{name}: ", end="", flush=True)
            chat.say(text, on_text=lambda piece: print(piece, end="", flush=True))
            print(flush=True)
        except UserError as e:
            print(f"error: {e}", flush=True)
        except KeyboardInterrupt:
            print("\n(reply interrupted; not kept)", flush=True)


# -----------------------------------------------------------------------------
# The web page

MAX_SESSIONS = 256  # conversations kept in memory; the least recently used go first


class ChatServer(ThreadingHTTPServer):
    """Serves PAGE and one Chat per (browser session, model). Request threads share the models, so
    every model call holds `lock`: one reply is generated at a time."""

    daemon_threads = True

    def __init__(self, models: Dict[str, GPT], params: GenParams, device, port: int = 8000):
        self.models, self.params, self.device = models, params, torch.device(device)
        self.lock = threading.Lock()
        self.sessions: "OrderedDict[Tuple[str, str], Chat]" = OrderedDict()
        super().__init__(("127.0.0.1", port), ChatHandler)
        self.port = self.server_address[1]

    def chat(self, session: str, name: str) -> Chat:
        """The conversation of `session` with model `name` (call with `lock` held)."""
        key = (session, name)
        if key not in self.sessions:
            self.sessions[key] = Chat(self.models[name], self.params, self.device)
            while len(self.sessions) > MAX_SESSIONS:
                self.sessions.popitem(last=False)
        self.sessions.move_to_end(key)
        return self.sessions[key]

    def page(self) -> bytes:
        p = self.params
        budget = sorted({min(p.max_new_tokens, m.config.block_size // 2) for m in self.models.values()})
        settings = (f"temperature {p.temperature} · top-k {p.top_k} · top-p {p.top_p} · "
                    f"up to {'/'.join(map(str, budget))} tokens a reply · seed {p.seed}")
        return (PAGE.replace("__MODELS__", json.dumps(list(self.models)))
                .replace("__SETTINGS__", json.dumps(settings)).encode())


class ChatHandler(BaseHTTPRequestHandler):
    """GET / the page; POST /chat {session, model, text} streams the reply as server-sent events
    ({"text": piece} ..., then {"done": true, "reply": ...} or {"error": ...}); POST /reset {session}."""

    server: ChatServer

    def do_GET(self):
        if not self._local():
            return
        if self.path in ("/", "/index.html"):
            self._reply(200, self.server.page(), "text/html; charset=utf-8")
        else:
            self._reply(404, b"not found\n", "text/plain")

    def do_POST(self):
        if not self._local():
            return
        try:  # a JSON body also makes a cross-site request need a preflight, which is never granted
            if self.headers.get("Content-Type", "").split(";")[0].strip() != "application/json":
                raise ValueError("expected a JSON body")
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            session = body["session"]
            if not isinstance(session, str) or not 0 < len(session) <= 64:
                raise ValueError("bad session id")
        except (ValueError, KeyError, TypeError) as e:
            return self._reply(400, json.dumps({"error": str(e)}).encode(), "application/json")
        if self.path == "/reset":
            with self.server.lock:
                for key in [k for k in self.server.sessions if k[0] == session]:
                    del self.server.sessions[key]
            return self._reply(200, b"{}", "application/json")
        if self.path != "/chat":
            return self._reply(404, b"not found\n", "text/plain")
        name, text = body.get("model"), body.get("text")
        if name not in self.server.models or not isinstance(text, str):
            return self._reply(400, json.dumps({"error": "need a known model and a text"}).encode(),
                               "application/json")
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        try:
            with self.server.lock:
                chat = self.server.chat(session, name)
                try:
                    reply = chat.say(text, on_text=lambda piece: self._event({"text": piece}))
                    self._event({"done": True, "reply": reply})
                except UserError as e:
                    self._event({"error": str(e)})
        except (BrokenPipeError, ConnectionResetError):
            pass  # the page went away mid-reply: that turn is not kept

    def _event(self, data: dict):
        self.wfile.write(f"data: {json.dumps(data)}\n\n".encode())
        self.wfile.flush()

    def _local(self) -> bool:
        """Refuse requests that name another host (a page elsewhere rebinding its name to 127.0.0.1)."""
        host = self.headers.get("Host", "").rsplit(":", 1)[0]
        if host in ("127.0.0.1", "localhost"):
            return True
        self._reply(403, b"forbidden\n", "text/plain")
        return False

    def _reply(self, code: int, body: bytes, kind: str):
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        pass  # no line per request


def serve(models: Dict[str, GPT], params: GenParams, device, port: int) -> int:
    try:
        server = ChatServer(models, params, device, port)
    except OSError as e:
        raise UserError(f"cannot serve on 127.0.0.1:{port}: {e.strerror or e}; pick another --port") from None
    print(f"serving {', '.join(models)} on http://127.0.0.1:{server.port}  (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>minChatGPT</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
  * { box-sizing: border-box; }
  body { margin: 0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1f2328;
         background: #f4f5f7; display: flex; flex-direction: column; height: 100vh; }
  header { display: flex; align-items: center; gap: 18px; padding: 10px 20px; background: #fff;
           border-bottom: 1px solid #d8dee4; }
  h1 { font-size: 18px; margin: 0; }
  #picker { display: flex; gap: 14px; flex: 1; color: #57606a; }
  #picker label { cursor: pointer; }
  button { font: inherit; padding: 6px 14px; border-radius: 6px; border: 1px solid #d0d7de;
           background: #f6f8fa; cursor: pointer; }
  button.primary { background: #1f6feb; border-color: #1f6feb; color: #fff; }
  button:disabled { opacity: .5; cursor: default; }
  main { flex: 1; display: grid; grid-auto-flow: column; grid-auto-columns: minmax(280px, 1fr); gap: 14px;
         padding: 14px 20px; overflow: hidden; }
  .column { display: flex; flex-direction: column; background: #fff; border: 1px solid #d8dee4;
            border-radius: 10px; min-height: 0; }
  .column h2 { font-size: 14px; margin: 0; padding: 8px 14px; border-bottom: 1px solid #d8dee4; color: #57606a; }
  .log { flex: 1; overflow-y: auto; padding: 12px 14px; display: flex; flex-direction: column; gap: 8px; }
  .msg { max-width: 85%; padding: 7px 12px; border-radius: 12px; white-space: pre-wrap; overflow-wrap: anywhere; }
  .user { align-self: flex-end; background: #ddf4ff; }
  .assistant { align-self: flex-start; background: #f6f8fa; border: 1px solid #d8dee4; }
  .assistant:not([data-done]):empty::after { content: "\\2026"; color: #8c959f; }
  .error { color: #cf222e; }
  form { display: flex; gap: 10px; padding: 0 20px 8px; }
  input { flex: 1; font: inherit; padding: 9px 12px; border: 1px solid #d0d7de; border-radius: 8px; }
  footer { padding: 0 20px 10px; font-size: 12px; color: #8c959f; }
</style></head>
<body>
<header><h1>minChatGPT</h1><div id="picker"></div><button id="reset" type="button">New chat</button></header>
<main id="columns"></main>
<form id="form"><input id="msg" autocomplete="off" placeholder="Ask something, e.g. What is the capital of France?">
<button class="primary" id="send">Send</button></form>
<footer id="settings"></footer>
<script>
const MODELS = __MODELS__, SETTINGS = __SETTINGS__;
const session = crypto.randomUUID ? crypto.randomUUID() : String(Math.random()).slice(2);
const $ = (id) => document.getElementById(id);
const logs = {};
$("settings").textContent = SETTINGS + " · /reset or New chat starts over";
for (const name of MODELS) {
  const col = document.createElement("section");
  col.className = "column"; col.dataset.model = name;
  col.innerHTML = "<h2></h2><div class='log'></div>";
  col.querySelector("h2").textContent = name;
  $("columns").append(col);
  logs[name] = col.querySelector(".log");
  if (MODELS.length > 1) {
    const label = document.createElement("label");
    label.innerHTML = "<input type='checkbox' checked> ";
    label.append(name);
    label.querySelector("input").onchange = (e) => { col.hidden = !e.target.checked; };
    $("picker").append(label);
  }
}
function bubble(name, cls, text) {
  const div = document.createElement("div");
  div.className = "msg " + cls; div.textContent = text;
  logs[name].append(div); logs[name].scrollTop = logs[name].scrollHeight;
  return div;
}
async function post(path, body) {
  return fetch(path, {method: "POST", headers: {"Content-Type": "application/json"},
                      body: JSON.stringify({session, ...body})});
}
async function ask(name, text) {
  bubble(name, "user", text);
  const out = bubble(name, "assistant", "");
  try {
    const reader = (await post("/chat", {model: name, text})).body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let end;
      while ((end = buffer.indexOf("\\n\\n")) >= 0) {
        const event = JSON.parse(buffer.slice(6, end));  // after "data: "
        buffer = buffer.slice(end + 2);
        if (event.text) out.textContent += event.text;
        if (event.done) out.textContent = event.reply;
        if (event.error) { out.textContent = event.error; out.classList.add("error"); }
        logs[name].scrollTop = logs[name].scrollHeight;
      }
    }
  } catch (e) { out.textContent = String(e); out.classList.add("error"); }
  out.dataset.done = "1";
}
async function reset() {
  await post("/reset", {});
  for (const name of MODELS) logs[name].replaceChildren();
}
$("reset").onclick = reset;
$("form").onsubmit = async (e) => {
  e.preventDefault();
  const text = $("msg").value.trim();
  if (!text) return;
  $("msg").value = "";
  if (text === "/reset") return reset();
  $("send").disabled = true;
  for (const name of MODELS) if (!document.querySelector(`[data-model="${name}"]`).hidden) await ask(name, text);
  $("send").disabled = false; $("msg").focus();
};
$("msg").focus();
</script>
</body></html>
"""


# -----------------------------------------------------------------------------


def main(argv=None):
    ap = parser(__doc__)
    ap.add_argument("models", nargs="*", metavar="MODEL",
                    help="SFT or PPO run or checkpoint directory, transformers directory or hub name; "
                         "NAME=PATH names it on the page (several only with --web)")
    ap.add_argument("--preset", default=None,
                    help=f"instead of a model: a new one of this preset (default tiny), one of: {', '.join(PRESETS)}")
    add_sampling_args(ap)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--decode-precision", choices=DECODE_PRECISIONS, default="fp32",
                    help="weights to decode with: bf16 / int8 are a faster copy within 1e-3 nats of the model "
                         "(GPT.for_decoding; benchmarks/decode.py measures which is fastest here) (default fp32)")
    ap.add_argument("--show-prompt", action="store_true",
                    help="print the prompt the model sees (the conversation as kept) before each reply")
    ap.add_argument("--web", action="store_true", help="serve a chat page on 127.0.0.1 instead of the terminal")
    ap.add_argument("--port", type=int, default=8000, help="port of --web (0 = any free one; default 8000)")
    args = ap.parse_args(argv)
    if len(args.models) > 1 and not args.web:
        raise UserError("several models need --web (the page shows them side by side)")
    params = gen_params(args)
    device = resolve_device(args.device)
    seed_everything(args.seed)
    models = {name: model.to(device).for_decoding(args.decode_precision)
              for name, model in load_models(args.models, args.preset).items()}
    if args.web:
        return serve(models, params, device, args.port)
    (name, model), = models.items()
    return terminal(Chat(model, params, device), name, args.show_prompt)


if __name__ == "__main__":
    run_cli(main)
