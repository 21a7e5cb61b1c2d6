"""Build notebooks/minChatGPT.ipynb, the Colab notebook, from the cells written out below.

The cells live here, in reviewable Python; the .ipynb is generated from them and committed without
outputs. tests/test_notebook.py checks that the committed file is exactly what this script writes,
then runs the notebook in a fresh kernel with FAST = True.

  python notebooks/build_notebook.py            # rewrite notebooks/minChatGPT.ipynb
  python notebooks/build_notebook.py --check    # exit 1 if the committed notebook is not up to date
"""
import argparse
import os
import sys

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

REPO_URL = "https://github.com/minchatgpt/minChatGPT"  # the one place the GitHub path lives
NOTEBOOK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "minChatGPT.ipynb")
COLAB_URL = (REPO_URL.replace("https://github.com/", "https://colab.research.google.com/github/")
             + "/blob/main/notebooks/minChatGPT.ipynb")
BADGE = f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({COLAB_URL})"

CELLS = []  # (id, "markdown" | "code", source, tags), in notebook order


def md(cell_id: str, source: str):
    CELLS.append((cell_id, "markdown", source.strip(), ()))


def code(cell_id: str, source: str, tags=()):
    CELLS.append((cell_id, "code", source.strip(), tuple(tags)))


# -----------------------------------------------------------------------------

md("title", f"""
# minChatGPT: RLHF for GPT-2, end to end

{BADGE}

Supervised fine-tuning (SFT), a reward model (RM) trained on preference pairs, then PPO against the
RM with a KL penalty to the SFT model, and an evaluation by a judge, the way InstructGPT aligned
GPT-3. First on the project's built-in task, whose *true* preference is known (a gold reward), so
you can see whether PPO really got better or only fooled its reward model; then, on a GPU with the
Hugging Face hub and an OpenAI key, the original setting: GPT-2 medium on Anthropic's HH-RLHF
judged by an LLM.

`Runtime > Run all` runs everything. The parameters cell below chooses the size of the offline run.
""")

code("parameters", f"""
FAST = False  # True: the smallest plan and a scripted chat (what the tests run); False: PLAN
PLAN = "quick"  # src/pipeline.py --plan: smoke (about a minute), quick (about 5 minutes), full (about 15) on 2 CPU cores
REPO_URL = "{REPO_URL}"
RUNS_DIR = "runs"  # where the run directories go (relative to the repository)

# The real setting (section 6): used only with a GPU and the hub
REAL_PRESET = "gpt2-medium"  # the original's model; "gpt2" is three times smaller and faster
REAL_MAX_STEPS = None  # cap each stage's steps, e.g. 500 for a first try; None: the scripts' own (hours on a T4)
JUDGE_MODEL = "gpt-4o-mini"  # the LLM judge
JUDGE_BASE_URL = None  # an OpenAI-compatible server instead of OpenAI, e.g. "http://localhost:8000/v1"
""", tags=["parameters"])

md("setup-md", """
## 1. Set up

Finds the repository (or clones it on Colab), installs the pinned requirements that are missing
(a torch that is already installed, such as Colab's CUDA build, is kept), and says which device and
precision the training will use.
""")

code("setup", """
import os
import subprocess
import sys
import warnings
from importlib import metadata

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm's, where ipywidgets is missing
if FAST:
    PLAN = "smoke"


def is_repo(path):
    return os.path.isfile(os.path.join(path, "src", "pipeline.py"))


ROOT = next((p for p in (os.getcwd(), os.path.dirname(os.getcwd())) if is_repo(p)), None)
if ROOT is None:  # e.g. on Colab: clone next to where we are
    ROOT = os.path.abspath(REPO_URL.rstrip("/").split("/")[-1])
    if not is_repo(ROOT):
        subprocess.run(["git", "clone", "--depth", "1", REPO_URL, ROOT], check=True)
os.chdir(ROOT)
if os.path.join(ROOT, "src") not in sys.path:
    sys.path.insert(0, os.path.join(ROOT, "src"))
print("repository:", ROOT)


def installed(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


pins = {}  # requirements.txt: one "name==version  # why" per line
with open("requirements.txt") as f:
    for line in f:
        spec = line.split("#")[0].strip()
        if "==" in spec:
            name, version = spec.split("==")
            pins[name.strip()] = version.strip()
# Not needed here: the test tools, and the Jupyter kernel this notebook already runs in.
DEV_ONLY = {"pytest", "hypothesis", "nbformat", "nbclient", "ipykernel", "selenium"}
have_torch = installed("torch")
todo = [f"{n}=={v}" for n, v in pins.items() if n not in DEV_ONLY | {"torch"} and installed(n) != v]
if have_torch is None:
    todo.append(f"torch=={pins['torch']}")
if todo:
    print("installing:", " ".join(todo))
    keep = []
    if have_torch:  # a constraint, so that nothing pip resolves replaces the torch we have
        with open("/tmp/minchatgpt-constraints.txt", "w") as f:
            f.write(f"torch=={have_torch}\\n")
        keep = ["-c", "/tmp/minchatgpt-constraints.txt"]
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", *todo, *keep], check=True)
else:
    print("requirements: all installed")

import torch

import pipeline
from common import default_precision, resolve_device

DEVICE = resolve_device("auto")
PRECISION = default_precision(DEVICE)  # what the trainers use ("auto")
if DEVICE.type == "cuda":
    cc = torch.cuda.get_device_capability(DEVICE)
    print(f"device: {torch.cuda.get_device_name(DEVICE)} (compute capability {cc[0]}.{cc[1]}), torch {torch.__version__}")
    if cc < (8, 0) and PRECISION == "bf16":
        print("note: this GPU has no bf16 units (compute capability below 8.0), so bf16 runs emulated here")
else:
    print(f"device: CPU ({os.cpu_count()} cores), torch {torch.__version__}; no GPU, which the offline task does not need")
print("precision:", {"fp32": "fp32", "bf16": "bf16 autocast",
                     "fp16": "fp16 autocast with loss scaling (GradScaler)"}[PRECISION])
print(f"plan: {PLAN} ({pipeline.PLANS[PLAN].summary()})")
""")

md("offline-md", """
## 2. The offline task, end to end

A 7.3M-parameter GPT-2 (the real 50257-token vocabulary, random initialisation) learns to answer
questions about a small world of facts from demonstrations of mixed quality (SFT); a reward model
learns from noisy preference labels; PPO optimises the policy against that reward model; the
task's gold reward, the reward model and the gold reward's two parts (correctness, style) judge
PPO against SFT on test prompts no stage trained on. This is `python src/pipeline.py --plan PLAN`,
run in this kernel.
""")

code("pipeline", """
import glob
import time

before = set(glob.glob(os.path.join(RUNS_DIR, "pipeline_*")))
t0 = time.time()
pipeline.main(["--plan", PLAN, "--out-dir", RUNS_DIR])
(RUN,) = set(glob.glob(os.path.join(RUNS_DIR, "pipeline_*"))) - before
print(f"\\n{RUN}: {time.time() - t0:.0f} s")
""")

md("results-md", """
The results (`results.md` of the run): win-rates with 95% intervals that resample the task's
facts, the reward model's agreement with the gold preference, what the answers are made of, and
PPO's reward curve.
""")

code("results", """
from IPython.display import HTML, Image, Markdown, display

with open(os.path.join(RUN, "results.md")) as f:
    display(Markdown(f.read()))
""")

md("plot-md", """
Over-optimisation: the reward model's score and the gold reward of the policy at each PPO
evaluation, against its KL from the SFT model. When the RM score keeps rising while the gold reward
falls, PPO is exploiting the reward model (a longer or weaker-KL run shows it; see the README).
""")

code("plot", """
display(Image(filename=os.path.join(RUN, "over_optimisation.png")))
""")

md("side-by-side-md", """
## 3. SFT and PPO side by side

The first test prompts of the evaluation, with each model's answer (as evaluated: sampled at
temperature 1), its gold reward (best 2.5) and its reward-model score.
""")

code("side-by-side", """
import html
import json

import task
from checkpoints import load_model
from judges import rm_scores
from tokenizer import ASSISTANT, HUMAN

with open(os.path.join(RUN, "eval", "generations.jsonl")) as f:
    rows = [json.loads(line) for line in f][:6]
prompts = [r["prompt"] for r in rows]
rm = load_model(os.path.join(RUN, "rm"), kind="rm")[0].eval()


def scored(name):
    answers = [r["answers"][name] for r in rows]
    rm_score = rm_scores(rm, prompts, [a["text"] for a in answers], DEVICE)
    return [(a["text"], task.gold_reward(p, a["text"], a["ended"]), s) for p, a, s in zip(prompts, answers, rm_score)]


head = "".join(f"<th>{h}</th>" for h in ["question", "SFT answer", "gold", "RM", "PPO answer", "gold", "RM"])
body = ""
for prompt, *models in zip(prompts, scored("sft"), scored("ppo")):
    question = prompt.split(HUMAN)[-1].split(ASSISTANT)[0].strip()
    body += f"<tr><td>{html.escape(question)}</td>"
    for text, gold, score in models:
        body += f"<td>{html.escape(text)}</td><td>{gold:+.1f}</td><td>{score:+.2f}</td>"
    body += "</tr>"
display(HTML(f"<table><tr>{head}</tr>{body}</table>"))
""")

md("chat-md", """
## 4. Chat with the PPO policy

A conversation in the HH format the models were trained on; each reply is conditioned on the turns
before it. An empty message ends the chat, `/reset` starts a new one. (The policy was trained on
single questions about its small world, so that is what it answers well.)
""")

code("chat", """
from chat import Chat
from common import UserError
from evaluate import GenParams
from sample import load_policy

chat = Chat(load_policy(os.path.join(RUN, "ppo"), None), GenParams(max_new_tokens=32, temperature=0.7, top_k=0),
            DEVICE)


def reply(text):
    print("ppo: ", end="")
    chat.say(text, on_text=lambda piece: print(piece, end="", flush=True))
    print()


if FAST:  # no keyboard when the tests run the notebook: two scripted turns
    for text in ["What is the capital of France?", "What colour is a banana?"]:
        print("you:", text)
        reply(text)
    print("\\nthe second reply was conditioned on:", repr(chat.last_prompt))
else:
    while text := input("you: ").strip():
        if text == "/reset":
            chat.reset()
            print("(new conversation)")
            continue
        try:
            reply(text)
        except UserError as e:
            print("error:", e)
""")

md("export-md", """
## 5. Export for transformers and vLLM

`python src/export.py RUN_DIR OUT_DIR` writes the policy as a plain GPT-2 directory (LoRA merged,
safetensors, tokenizer, generation config): `transformers`' `pipeline("text-generation")` and
vLLM load it as they load GPT-2. Pass the stop string, `"\\n\\nHuman:"`, so that an answer ends
where the model starts the next human turn, as ours do.
""")

code("export", """
from transformers import pipeline as hf_pipeline

import export
from evaluate import STOP
from tokenizer import format_prompt

exported = export.export(os.path.join(RUN, "ppo"), os.path.join(RUN, "hf_ppo"), force=True)
print("exported to", exported, "->", sorted(os.listdir(exported)))
generate = hf_pipeline("text-generation", model=exported, device=DEVICE)
out = generate(format_prompt("What is the capital of France?"), do_sample=False, max_new_tokens=32,
               stop_sequence=STOP, return_full_text=False)
print("transformers, greedy:", repr(out[0]["generated_text"]))
""")

md("real-md", """
## 6. The real setting: GPT-2 medium, HH-RLHF, an LLM judge

The original project's setting, with the project's own commands (README, "Each stage on its own"):
GPT-2 medium fine-tuned on Anthropic's HH-RLHF, a LoRA reward model and PPO on their own disjoint
shares of its prompts, and a judge that compares SFT and PPO answers in both orders. It needs a GPU
(on Colab: `Runtime > Change runtime type > T4 GPU`), the Hugging Face hub, and for the judge an
`OPENAI_API_KEY` (on Colab: a secret of that name) or an OpenAI-compatible server (`JUDGE_BASE_URL`).
Without them each cell says what is missing and does nothing. On a T4 the scripts' own step counts
take hours: set `REAL_MAX_STEPS` for a first try. A stage that was interrupted resumes where its last
checkpoint left off when its cell runs again.
""")

code("real-setup", """
import shlex
import shutil
import socket

from checkpoints import latest_checkpoint

REAL = os.path.join(RUNS_DIR, "real_" + REAL_PRESET.replace("/", "_"))
SFT, RM, PPO, EVAL = (os.path.join(REAL, stage) for stage in ("sft", "rm", "ppo", "eval"))


def hub_reachable():
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=5).close()
        return True
    except OSError:
        return False


def judge_key():
    \"\"\"The judge's API key: $OPENAI_API_KEY, a Colab secret of that name, or "none" for a local server.\"\"\"
    key = os.environ.get("OPENAI_API_KEY")
    if not key:
        try:
            from google.colab import userdata
            key = userdata.get("OPENAI_API_KEY")
        except Exception:  # not on Colab, or no such secret, or no access granted to it
            key = None
    return key or ("none" if JUDGE_BASE_URL else None)


def missing(what, needs=(), key=False):
    \"\"\"Why `what` cannot run here, as one sentence; None when everything it needs is here.\"\"\"
    if not torch.cuda.is_available():
        return f"{what} skipped: there is no GPU here (on Colab: Runtime > Change runtime type > T4 GPU)."
    for run_dir in needs:
        if not os.path.isdir(os.path.join(run_dir, "final")):
            return f"{what} skipped: it needs the finished run {run_dir}; run the cells above first."
    if not hub_reachable():
        return f"{what} skipped: the Hugging Face hub, where GPT-2 and HH-RLHF come from, cannot be reached."
    if key and not judge_key():
        return (f"{what} skipped: no OPENAI_API_KEY (set it, or add a Colab secret of that name, or set "
                f"JUDGE_BASE_URL to an OpenAI-compatible server).")
    return None


def run(command, env=None):
    \"\"\"Run one of the project's commands, its output shown as it comes; True if it succeeded.\"\"\"
    print("$", command, flush=True)
    args = shlex.split(command)
    args[0] = sys.executable if args[0] == "python" else args[0]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})
    for line in proc.stdout:
        print(line, end="", flush=True)
    if proc.wait():
        print(f"the command failed with exit code {proc.returncode}: its last lines above say why.")
    return proc.returncode == 0


def train(what, script, flags, run_dir, needs=()):
    \"\"\"`python src/<script> <flags>` into run_dir; an interrupted run is resumed, a finished one left alone.\"\"\"
    why = missing(what, needs)
    if why:
        print(why)
    elif os.path.isdir(os.path.join(run_dir, "final")):
        print(f"{what}: already trained in {run_dir}")
    elif latest_checkpoint(run_dir):
        run(f"python src/{script} --resume {run_dir}")
    else:
        if os.path.isdir(run_dir):
            print(f"{run_dir} was stopped before its first checkpoint: starting it over")
            shutil.rmtree(run_dir)
        steps = f" --max-steps {REAL_MAX_STEPS}" if REAL_MAX_STEPS else ""
        run(f"python src/{script} {flags} --run-dir {run_dir}{steps}")
""")

code("real-sft", """
train("SFT", "train_sft.py", f"-n hh -b 8 --preset {REAL_PRESET} --data Anthropic/hh-rlhf", SFT)
""")

code("real-rm", """
train("The reward model", "train_rm.py", f"-n hh -b 8 --preset {REAL_PRESET}/lora -p {SFT} --data Anthropic/hh-rlhf",
      RM, needs=[SFT])
""")

code("real-ppo", """
train("PPO", "train_ppo.py", f"-n hh --preset {REAL_PRESET}/lora -a {SFT} -c {RM} --prompts Anthropic/hh-rlhf",
      PPO, needs=[SFT, RM])
""")

code("real-eval", """
why = missing("The evaluation", needs=[SFT, PPO], key=True)
if why:
    print(why)
else:
    server = f" --base-url {JUDGE_BASE_URL}" if JUDGE_BASE_URL else ""
    run(f"python src/evaluate.py -n hh -s {SFT} -p {PPO} --judge openai --judge-model {JUDGE_MODEL}{server} "
        f"--out-dir {EVAL}", env={"OPENAI_API_KEY": judge_key()})
""")


# -----------------------------------------------------------------------------


def build() -> nbformat.NotebookNode:
    """The notebook, without outputs, every cell with a fixed id (so a rebuild is byte-identical)."""
    cells = []
    for cell_id, kind, source, tags in CELLS:
        cell = new_markdown_cell(source) if kind == "markdown" else new_code_cell(source)
        cell.id = cell_id
        if tags:
            cell.metadata["tags"] = list(tags)
        cells.append(cell)
    nb = new_notebook(cells=cells, metadata={
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"},
        "accelerator": "GPU",  # Colab opens it with a GPU runtime
        "colab": {"provenance": [], "gpuType": "T4"},
    })
    nbformat.validate(nb)
    return nb


def render() -> str:
    return nbformat.writes(build())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if the notebook file is not what this builds")
    args = ap.parse_args(argv)
    text = render()
    if args.check:
        with open(NOTEBOOK, encoding="utf-8") as f:
            current = f.read()
        if current != text:
            print(f"{NOTEBOOK} is out of date: run python notebooks/build_notebook.py", file=sys.stderr)
            return 1
        return 0
    with open(NOTEBOOK, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {NOTEBOOK} ({len(CELLS)} cells)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
