"""minChatGPT against what users would otherwise run: transformers and TRL, in one run.

    python benchmarks/run.py                      # everything: ~25 minutes on 2 CPU cores
    python benchmarks/run.py --quick              # fewer repeats and the tiny model only: a smoke test
    python benchmarks/run.py --sections generation,train --repeats 5

Writes benchmarks/results/latest.md and latest.json (machine, settings, every repeat). Every
figure is a ratio measured in this run, on this machine, with identical weights and settings;
the two sides alternate call by call and the ratio is taken per pair (median and min-max over
the repeats). Sections:
  generation  ours (GPT.generate, KV cache) vs GPT2LMHeadModel.generate(use_cache=True), same
              weights (exported with GPT.export_hf), batch 8, 32-token prompts, sampling from
              the full vocabulary, every row generating all its new tokens; and both without cache
  train       one SFT step (forward, backward, gradient clipping, AdamW) vs GPT2LMHeadModel(labels=)
              on the same batch, fp32 and bf16 autocast; loss on the response half of each row
              (a realistic SFT batch) and on every token; GFLOP/s against the matmul peak measured
              in this run
  ppo         completions/s of full PPO updates vs TRL 1.12's PPOTrainer (and TRL 1.16's
              RLOOTrainer as a second reference), identical tiny models; needs
              `bash benchmarks/setup_trl.sh` once (each TRL in its own virtual environment)
  memory      peak RSS of a PPO step with a LoRA actor (reference = adapters off) vs a full actor
              plus a full frozen reference, gpt2-small shape
Every process (ours and the references) sets torch.set_flush_denormal(True) before torch starts
its threads (benchmarks/harness.py).
"""
import harness  # noqa: I001  (first: sets flush-denormal before torch starts threads)

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import replace

import torch

harness.use_src()
from configs import EOS_ID, get_preset  # noqa: E402
from gpt import GPT  # noqa: E402
from loss import lm_loss, lm_loss_reference  # noqa: E402

SECTIONS = ("generation", "train", "ppo", "memory")
SHAPES = {  # name -> ModelConfig; random weights
    "tiny": get_preset("tiny"),
    "gpt2-small": replace(get_preset("gpt2"), pretrained=None),
}
TRL = {  # reference name -> (virtual environment, ppo_trl.py --algo)
    "trl-1.12 PPO": (".venv-trl112", "ppo"),
    "trl-1.16 RLOO": (".venv-trl116", "rloo"),
}


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def model_pair(shape: str, workdir: str):
    """Our GPT with random weights and transformers' GPT2LMHeadModel holding the same weights."""
    from transformers import GPT2LMHeadModel
    torch.manual_seed(0)
    ours = GPT(SHAPES[shape])
    path = os.path.join(workdir, f"hf-{shape}")
    ours.export_hf(path)
    return ours, GPT2LMHeadModel.from_pretrained(path)


# -----------------------------------------------------------------------------
# 1. Generation


def bench_generation(args, workdir) -> list:
    rows = []
    for shape in args.shapes:
        ours, hf = model_pair(shape, workdir)
        ours.eval()
        hf.eval()
        prompt = torch.randint(0, EOS_ID, (8, 32), generator=torch.Generator().manual_seed(0))
        mask = torch.ones_like(prompt)
        for cache in (True, False):
            for n in (64, 128):
                if not cache and shape != "tiny" and n > 64:
                    continue  # ~3 minutes a call on 2 cores: the 64-token row makes the point
                repeats = args.repeats if cache or shape == "tiny" else min(args.repeats, 2)

                def run_ours():
                    out = ours.generate(prompt, max_new_tokens=n, temperature=1.0, eos_id=None, use_cache=cache)
                    assert out.tokens.shape == (8, 32 + n)

                def run_hf():  # no EOS: every row generates all n tokens, as ours does with eos_id=None
                    out = hf.generate(prompt, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                                      top_p=1.0, max_new_tokens=n, use_cache=cache, eos_token_id=None,
                                      pad_token_id=EOS_ID)
                    assert out.shape == (8, 32 + n)

                log(f"generation {shape} {n} new tokens, cache={cache}")
                with torch.no_grad():
                    r = harness.compare(run_ours, run_hf, work=8 * n, repeats=repeats, warmup=1 if cache else 0)
                rows.append({"model": shape, "new_tokens": n, "cache": cache, **r})
                log(f"  ours {r['ours']['median']:.0f} tok/s, transformers {r['theirs']['median']:.0f} tok/s, "
                    f"ratio {r['ratio']['median']:.2f}")
    return rows


def bench_decoding_layout(args, workdir) -> list:
    """What gpt._decoding_layout buys: ours with it (as committed) vs ours with it switched off,
    KV cache, 128 new tokens, fp32."""
    import gpt as gpt_module
    rows = []
    for shape in args.shapes:
        ours, _ = model_pair(shape, workdir)
        ours.eval()
        prompt = torch.randint(0, EOS_ID, (8, 32), generator=torch.Generator().manual_seed(0))

        def run_with():
            ours.generate(prompt, max_new_tokens=128, temperature=1.0, eos_id=None)

        def run_without():
            saved, gpt_module._decoding_layout = gpt_module._decoding_layout, lambda model: nullcontext()
            try:
                ours.generate(prompt, max_new_tokens=128, temperature=1.0, eos_id=None)
            finally:
                gpt_module._decoding_layout = saved

        log(f"decoding layout {shape}: on vs off")
        with torch.no_grad():
            r = harness.compare(run_with, run_without, work=8 * 128, repeats=args.repeats)
        rows.append({"model": shape, **r})
        log(f"  on / off {r['ratio']['median']:.2f}")
    return rows


# -----------------------------------------------------------------------------
# 2. Training step


def train_flops(cfg, B: int, T: int, n_loss: int) -> float:
    """FLOPs of one training step that the loss needs (forward + backward = 3x forward):
    2 per weight per token in the blocks, causal attention (2 C T per token per layer: the T x T
    scores and their weighted sum, half of them masked), and the output layer on the n_loss
    tokens that carry loss. The same count is used for both sides (transformers runs the output
    layer on every token, so it does more work than this for the same step)."""
    C, L, V = cfg.n_embd, cfg.n_layer, cfg.vocab_size
    block_weights = L * 12 * C * C  # qkv 3C^2, projection C^2, MLP 8C^2
    forward = 2 * block_weights * B * T + 2 * L * C * T * B * T + 2 * V * C * n_loss
    return 3 * forward


def train_steps(ours, hf, ids, loss_mask, precision: str):
    """One SFT step for each side, with identical optimizers; returns two closures."""
    labels = ids.masked_fill(loss_mask == 0, -100)  # transformers' way of saying "no loss here"
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else nullcontext

    def make(model, loss_fn):
        return harness.train_step(model, loss_fn, ctx)

    # Ours as SFTStage computes it: hidden states, then the loss on the target tokens only.
    ours_step = make(ours, lambda: lm_loss(ours.lm_head.weight, ours(ids), ids, loss_mask)[0])
    hf_step = make(hf, lambda: hf(ids, labels=labels).loss)
    plain_step = make(ours, lambda: lm_loss_reference(ours.lm_head.weight, ours(ids), ids, loss_mask)[0])
    return ours_step, hf_step, plain_step


def bench_train(args, workdir, peaks) -> dict:
    rows, ablation = [], []
    for shape in args.shapes:
        B, T = (8, 256) if shape == "tiny" else (4, 256)
        ours, hf = model_pair(shape, workdir)
        ours.train()
        hf.train()
        ids = torch.randint(0, EOS_ID, (B, T), generator=torch.Generator().manual_seed(0))
        for loss_on in ("response", "all"):
            loss_mask = torch.ones_like(ids)
            if loss_on == "response":
                loss_mask[:, :T // 2] = 0  # the prompt half carries no loss
            n_loss = int(loss_mask[:, 1:].sum())  # targets: every position but the first can be one
            for precision in ("fp32", "bf16"):
                ours_step, hf_step, plain_step = train_steps(ours, hf, ids, loss_mask, precision)
                log(f"train {shape} loss on {loss_on} tokens, {precision}")
                r = harness.compare(ours_step, hf_step, work=B * T, repeats=args.repeats)
                flops = train_flops(ours.config, B, T, n_loss)
                peak = peaks[precision]["median"]
                side = {}
                for who in ("ours", "theirs"):
                    gflops = flops * r[who]["median"] / (B * T) / 1e9
                    side[who] = {"gflops": gflops, "of_peak": gflops / peak}
                rows.append({"model": shape, "batch": [B, T], "loss_on": loss_on, "loss_tokens": n_loss,
                             "precision": precision, "flops_per_step": flops, **r, "achieved": side})
                log(f"  ours {r['ours']['median']:.0f} tok/s, transformers {r['theirs']['median']:.0f} tok/s, "
                    f"ratio {r['ratio']['median']:.2f}; ours {side['ours']['gflops']:.0f} GFLOP/s "
                    f"({100 * side['ours']['of_peak']:.0f}% of {precision} peak)")
                if shape == "tiny":  # what the fused output layer + cross-entropy buys (ours before)
                    a = harness.compare(ours_step, plain_step, work=B * T, repeats=args.repeats)
                    ablation.append({"model": shape, "loss_on": loss_on, "precision": precision, **a})
                    log(f"  fused vs plain chunked cross-entropy: {a['ratio']['median']:.2f}x")
    return {"rows": rows, "fused_ce_ablation": ablation}


# -----------------------------------------------------------------------------
# 3. PPO against TRL


PROMPT_SUBJECTS = ["France", "Japan", "Kenya", "Peru", "Norway", "Egypt", "Canada", "Vietnam"]
PROMPT_FORMS = [
    "What is the capital of {}?",
    "Tell me one thing about {} that a visitor should know.",
    "Write a short poem about the weather in {}.",
    "Which languages are spoken in {}, and by how many people?",
]


def ppo_prompts():
    """32 prompts of different lengths (9 to 20 tokens), the same text on both sides."""
    return [f"\n\nHuman: {form.format(c)}\n\nAssistant:" for form in PROMPT_FORMS for c in PROMPT_SUBJECTS]


def prepare_ppo_models(workdir) -> str:
    """The policy (a transformers GPT-2 directory) and the reward model (a transformers
    GPT2ForSequenceClassification directory with one label), tiny preset, random weights; both
    sides load these, so they start from identical models. The critic starts from the reward model."""
    from transformers import GPT2ForSequenceClassification

    from gpt import RewardModel, hf_tokenizer
    d = os.path.join(workdir, "ppo-models")
    cfg = SHAPES["tiny"]
    torch.manual_seed(1)
    GPT(cfg).export_hf(os.path.join(d, "policy"))
    torch.manual_seed(2)
    rm = RewardModel(cfg)
    rm.backbone.export_hf(os.path.join(d, "reward-lm"))
    seq = GPT2ForSequenceClassification.from_pretrained(os.path.join(d, "reward-lm"), num_labels=1,
                                                        pad_token_id=EOS_ID)
    with torch.no_grad():
        seq.score.weight.copy_(rm.head.weight)  # our head's bias is 0 at init: the same function
    seq.save_pretrained(os.path.join(d, "reward"))
    hf_tokenizer().save_pretrained(os.path.join(d, "reward"))
    with open(os.path.join(d, "prompts.json"), "w") as f:
        json.dump(ppo_prompts(), f)
    return d


def run_json(cmd, timeout=1800) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               WANDB_MODE="disabled")
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=harness.ROOT)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    return harness.parse_result(p.stdout)


def bench_ppo(args, workdir) -> dict:
    models = prepare_ppo_models(workdir)
    common = ["--models", models, "--steps", str(args.ppo_steps), "--threads", str(torch.get_num_threads())]
    refs = {}
    for name, (venv, algo) in TRL.items():
        python = os.path.join(harness.HERE, venv, "bin", "python")
        if os.path.exists(python):
            refs[name] = [python, os.path.join(harness.HERE, "ppo_trl.py"), "--algo", algo, *common]
        else:
            log(f"{name}: {venv} missing, skipped (run `bash benchmarks/setup_trl.sh`)")
    ours_cmd = [sys.executable, os.path.join(harness.HERE, "ppo_ours.py"), *common]
    sides = {"ours": ours_cmd, **refs}
    runs = {k: [] for k in sides}
    for i in range(args.ppo_rounds):  # rounds alternate the processes, as compare() alternates calls
        for name, cmd in sides.items():
            log(f"ppo round {i + 1}/{args.ppo_rounds}: {name}")
            runs[name].append(run_json(cmd))
    out = {"runs": runs, "settings": runs["ours"][0]["settings"], "rows": []}
    for ours in ("ours",):
        for name in refs:
            ratios = [a["completions_per_s"] / b["completions_per_s"] for a, b in zip(runs[ours], runs[name])]
            out["rows"].append({
                "ours_variant": ours, "reference": name, "settings": runs[name][0]["settings"],
                "ours": harness.summary(r["completions_per_s"] for r in runs[ours]),
                "theirs": harness.summary(r["completions_per_s"] for r in runs[name]),
                "ratio": harness.summary(ratios),
                "cpu_ratio": harness.summary(
                    harness.summary(b["cpu_s"])["median"] / harness.summary(a["cpu_s"])["median"]
                    for a, b in zip(runs[ours], runs[name])),
            })
            log(f"  {ours} vs {name}: {out['rows'][-1]['ratio']['median']:.2f}x")
    return out


# -----------------------------------------------------------------------------
# 4. Memory


def bench_memory(args) -> dict:
    rows = {}
    for mode in ("lora", "full"):
        log(f"memory: PPO step, {mode} actor")
        runs = [run_json([sys.executable, os.path.join(harness.HERE, "ppo_memory.py"), "--mode", mode,
                          "--shape", args.memory_shape]) for _ in range(args.memory_rounds)]
        rows[mode] = {"peak_rss_mb": harness.summary(r["peak_rss_mb"] for r in runs),
                      "after_build_rss_mb": harness.summary(r["after_build_rss_mb"] for r in runs),
                      "settings": runs[0]["settings"]}
    rows["ratio_full_over_lora"] = rows["full"]["peak_rss_mb"]["median"] / rows["lora"]["peak_rss_mb"]["median"]
    log(f"  peak RSS lora {rows['lora']['peak_rss_mb']['median']:.0f} MB, "
        f"full {rows['full']['peak_rss_mb']['median']:.0f} MB")
    return rows


# -----------------------------------------------------------------------------
# Report


def fmt_range(s, digits=2):
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}–{s['max']:.{digits}f})"


def goal_mark(value, goal):
    return f"{'met' if value >= goal else 'missed'} (goal ≥ {goal}×)"


def markdown(res: dict) -> str:
    m = res["machine"]
    out = ["# minChatGPT benchmarks", "",
           f"Machine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads; torch {m['torch']}, "
           f"transformers {m['transformers']}, Python {m['python']}; flush-denormal on in every process.  ",
           f"Run {res['started']}, {res['elapsed_min']:.0f} min, load average at start {res['load_start']} / end "
           f"{res['load_end']}. Medians over the repeats, (min–max) of the per-pair ratio; each ratio "
           f"compares calls made alternately in the same run with identical weights.", ""]
    if "peaks" in res:
        p = res["peaks"]
        out += [f"Matmul peak (2048³, this run): fp32 {p['fp32']['median']:.0f} GFLOP/s, "
                f"bf16 {p['bf16']['median']:.0f} GFLOP/s.", ""]
    if "generation" in res:
        out += ["## 1. Generation (new tokens/s; batch 8, 32-token prompts, sampling over the full vocabulary)", "",
                "| model | new tokens | KV cache | ours | transformers | ours / transformers | goal |",
                "|---|---|---|---|---|---|---|"]
        for r in res["generation"]:
            goal = goal_mark(r["ratio"]["median"], 1.3) if r["cache"] else "–"
            out.append(f"| {r['model']} | {r['new_tokens']} | {'yes' if r['cache'] else 'no'} | "
                       f"{r['ours']['median']:.0f} | {r['theirs']['median']:.0f} | {fmt_range(r['ratio'])} | {goal} |")
        speedups = []
        for r in res["generation"]:
            if not r["cache"]:
                with_cache = next(c for c in res["generation"] if c["cache"] and c["model"] == r["model"]
                                  and c["new_tokens"] == r["new_tokens"])
                speedups.append(f"{r['model']} {r['new_tokens']} tokens "
                                f"{with_cache['ours']['median'] / r['ours']['median']:.1f}×")
        out += ["", "KV cache vs recomputing the prefix (ours): " + ", ".join(speedups) + ".", ""]
        if res.get("decoding_layout"):
            out += ["Input-major weight layout while decoding on the CPU (gpt._decoding_layout), on / off, KV "
                    "cache, 128 new tokens: " + ", ".join(f"{r['model']} {fmt_range(r['ratio'])}"
                                                          for r in res["decoding_layout"]) + ".", ""]
    if "train" in res:
        out += ["## 2. SFT training step (tokens/s; forward, backward, clip, fused AdamW on both sides)", "",
                "Loss on *response*: the second half of each row carries loss (the prompt half does not), "
                "a realistic SFT batch; *all*: every token. Tokens/s counts every input token. GFLOP/s counts "
                "what the loss needs (output layer only on loss tokens), the same count for both sides.", "",
                "| model | batch | loss on | precision | ours | transformers | ours / transformers | "
                "ours GFLOP/s (% of peak) | transformers GFLOP/s (% of peak) | goal |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for r in res["train"]["rows"]:
            goal = goal_mark(r["ratio"]["median"], 1.5 if r["model"] == "tiny" else 1.1)
            a = r["achieved"]
            out.append(f"| {r['model']} | {r['batch'][0]}×{r['batch'][1]} | {r['loss_on']} ({r['loss_tokens']}) | "
                       f"{r['precision']} | {r['ours']['median']:.0f} | {r['theirs']['median']:.0f} | "
                       f"{fmt_range(r['ratio'])} | {a['ours']['gflops']:.0f} ({100 * a['ours']['of_peak']:.0f}%) | "
                       f"{a['theirs']['gflops']:.0f} ({100 * a['theirs']['of_peak']:.0f}%) | {goal} |")
        if res["train"]["fused_ce_ablation"]:
            out += ["", "Fused output layer + cross-entropy (loss.linear_cross_entropy) vs the plain chunked "
                    "F.cross_entropy path (ours before), tiny:", "",
                    "| loss on | precision | fused / plain |", "|---|---|---|"]
            for r in res["train"]["fused_ce_ablation"]:
                out.append(f"| {r['loss_on']} | {r['precision']} | {fmt_range(r['ratio'])} |")
        out.append("")
    if "ppo" in res:
        s = res["ppo"]["settings"]
        out += ["## 3. PPO (completions/s of full updates: rollout + optimisation)", "",
                f"Tiny models, identical weights (policy, reward model; critic from the reward model), "
                f"{s['rollout']} prompts × {s['new_tokens']} new tokens per update, {s['ppo_epochs']} epochs × "
                f"{s['minibatches']} minibatches, fp32, {s['steps']} timed updates per process after "
                f"{s['warmup']} warm-up, {len(res['ppo']['runs']['ours'])} processes per side.", "",
                "| ours | reference | ours | reference | ours / reference | CPU-time ratio | goal |",
                "|---|---|---|---|---|---|---|"]
        for r in res["ppo"]["rows"]:
            goal = goal_mark(r["ratio"]["median"], 2.0) if "PPO" in r["reference"] else "second reference"
            out.append(f"| {r['ours_variant']} | {r['reference']} | {r['ours']['median']:.2f} | "
                       f"{r['theirs']['median']:.2f} | {fmt_range(r['ratio'])} | {fmt_range(r['cpu_ratio'])} | "
                       f"{goal} |")
        out += ["", "*ours*: PPOStage.train_step through the Trainer as committed (fused AdamW, as transformers' "
                "Trainer and so TRL use). CPU-time ratio: process CPU seconds per update, reference / ours "
                "(less sensitive to other load on the machine than wall time)."]
        notes = {r["reference"]: r["settings"].get("note", "") for r in res["ppo"]["rows"]}
        out += [f"\n{name}: {note}" for name, note in notes.items()]
        out.append("")
    if "memory" in res:
        mem = res["memory"]
        s = mem["lora"]["settings"]
        out += ["## 4. Memory (peak RSS of a PPO step)", "",
                f"{s['shape']} shape, rollout {s['rollout']} × {s['new_tokens']} new tokens, "
                f"critic {s['critic']} in both; reward from a function (no reward model).", "",
                "| actor | reference | RSS after building (MB) | peak RSS (MB) |", "|---|---|---|---|",
                f"| LoRA r={mem['lora']['settings']['lora_rank']} | the actor, adapters off | "
                f"{mem['lora']['after_build_rss_mb']['median']:.0f} | {fmt_range(mem['lora']['peak_rss_mb'], 0)} |",
                f"| full | a second full copy, frozen | {mem['full']['after_build_rss_mb']['median']:.0f} | "
                f"{fmt_range(mem['full']['peak_rss_mb'], 0)} |", "",
                f"Full copies need {mem['ratio_full_over_lora']:.2f}× the peak memory of the LoRA actor.", ""]
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    ap.add_argument("--repeats", type=int, default=3, help="timed pairs per figure (after one warm-up pair)")
    ap.add_argument("--ppo-rounds", type=int, default=3, help="processes per side for PPO")
    ap.add_argument("--ppo-steps", type=int, default=3, help="timed PPO updates per process (after one warm-up)")
    ap.add_argument("--memory-rounds", type=int, default=1, help="processes per mode (memory is not noisy)")
    ap.add_argument("--memory-shape", default="gpt2-small", choices=list(SHAPES))
    ap.add_argument("--shapes", default="tiny,gpt2-small", help="model shapes for generation and train")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--quick", action="store_true", help="smoke test: tiny only, 1 repeat, 1 PPO round")
    ap.add_argument("--out", default=os.path.join(harness.HERE, "results"), help="where latest.md/json go")
    ap.add_argument("--name", default="latest", help="file name stem of the results")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.shapes = args.shapes.split(",")
    if args.quick:
        args.repeats, args.ppo_rounds, args.ppo_steps, args.memory_rounds = 1, 1, 1, 1
        args.shapes, args.memory_shape = ["tiny"], "tiny"
    sections = args.sections.split(",")
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}; known: {', '.join(SECTIONS)}")

    t0 = time.time()
    res = {"machine": harness.machine(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
           "load_start": harness.load_average(), "args": vars(args)}
    log(f"machine: {res['machine']}; load {res['load_start']}")
    with tempfile.TemporaryDirectory(prefix="minchatgpt-bench-") as workdir:
        if "train" in sections:
            res["peaks"] = {"fp32": harness.matmul_peak(torch.float32), "bf16": harness.matmul_peak(torch.bfloat16)}
            log(f"matmul peak fp32 {res['peaks']['fp32']['median']:.0f} GFLOP/s, "
                f"bf16 {res['peaks']['bf16']['median']:.0f} GFLOP/s")
        if "generation" in sections:
            res["generation"] = bench_generation(args, workdir)
            res["decoding_layout"] = bench_decoding_layout(args, workdir)
        if "train" in sections:
            res["train"] = bench_train(args, workdir, res["peaks"])
        if "ppo" in sections:
            res["ppo"] = bench_ppo(args, workdir)
        if "memory" in sections:
            res["memory"] = bench_memory(args)
    res["load_end"] = harness.load_average()
    res["elapsed_min"] = (time.time() - t0) / 60
    os.makedirs(args.out, exist_ok=True)
    md = markdown(res)
    for ext, text in (("json", json.dumps(res, indent=1)), ("md", md)):
        path = os.path.join(args.out, f"{args.name}.{ext}")
        with open(path + ".tmp", "w") as f:
            f.write(text + "\n")
        os.replace(path + ".tmp", path)
    print(md)
    log(f"wrote {os.path.join(args.out, args.name)}.md/.json")


if __name__ == "__main__":
    main()
