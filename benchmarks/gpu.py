"""The NVIDIA GPU benchmark: one short script (under 5 minutes on one H100-class card).

    python benchmarks/gpu.py               # on a machine with an NVIDIA GPU
    python benchmarks/gpu.py --dry-run     # the same code path on the CPU, tiny shapes, ~1 minute

1. The card's bf16 matmul peak, measured (8192^3, median of 10).
2. SFT step (forward, backward, clip, fused AdamW) of a gpt2-medium-shaped model (random weights)
   in bf16 autocast at sequence 1024, loss on every token: tokens/s and MFU against that peak,
   eager and torch.compile'd; and transformers' GPT2LMHeadModel(labels=) on the same batch.
3. Generation, ours (KV cache; the model itself, its bf16 sampler copy, and that copy
   torch.compile'd) vs transformers generate(use_cache=True), same weights, batch 8, 32-token
   prompts, 128 new tokens, sampling, bf16 autocast.
Writes benchmarks/results/gpu-latest.md/.json (dry runs: gpu-dry-run.md/.json).
"""
import harness  # noqa: I001  (first: flush-denormal, harmless on the GPU side)

import argparse
import json
import os
import shutil
import tempfile
import time
from dataclasses import replace

import torch

harness.use_src()
from run import train_flops  # noqa: E402

from configs import EOS_ID, get_preset  # noqa: E402
from gpt import GPT  # noqa: E402
from loss import lm_loss  # noqa: E402


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def timed(fn, device, repeats: int) -> list:
    """Seconds per call, each call synchronised (CUDA kernels run asynchronously)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    return [harness.seconds(fn, sync) for _ in range(repeats)]


def matmul_peak(device, dtype, n, repeats=10) -> dict:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    return harness.summary(2 * n ** 3 / s / 1e12 for s in timed(lambda: a @ b, device, repeats))


def palm_flops(cfg, B, T) -> float:
    """The PaLM / nanoGPT MFU convention: 6 N + 12 L C T per token, N all weights (the tied
    embedding included, as the output layer), attention counted without causal masking."""
    N = cfg.n_layer * 12 * cfg.n_embd ** 2 + cfg.vocab_size * cfg.n_embd
    return (6 * N + 12 * cfg.n_layer * cfg.n_embd * T) * B * T


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: checks the script runs")
    ap.add_argument("--batch", type=int, default=8, help="sequences per SFT step")
    ap.add_argument("--steps", type=int, default=10, help="timed SFT steps (after 3 warm-up steps)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd SFT step and sampler")
    ap.add_argument("--out", default=os.path.join(harness.HERE, "results"))
    args = ap.parse_args()
    t_start = time.time()

    if args.dry_run:
        device, dtype = torch.device("cpu"), torch.bfloat16
        cfg, B, T, n_peak, new_tokens, gen_shape = get_preset("tiny"), 2, 64, 512, 8, get_preset("tiny")
        args.steps = 2
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --dry-run to check the script on a CPU")
        device, dtype = torch.device("cuda"), torch.bfloat16
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        cfg = replace(get_preset("gpt2-medium"), pretrained=None)
        B, T, n_peak, new_tokens = args.batch, 1024, 8192, 128
        gen_shape = cfg
    res = {"machine": harness.machine(), "dry_run": args.dry_run, "device": str(device),
           "card": torch.cuda.get_device_name() if device.type == "cuda" else harness.cpu_model(),
           "cuda": torch.version.cuda, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    log(f"{res['card']}, torch {torch.__version__}")

    # 1. Peak
    res["peak_tflops"] = matmul_peak(device, dtype, n_peak)
    peak = res["peak_tflops"]["median"]
    log(f"bf16 matmul peak {peak:.1f} TFLOP/s")

    # 2. SFT step
    from transformers import GPT2LMHeadModel
    torch.manual_seed(0)
    ours = GPT(cfg)
    hf_dir = tempfile.mkdtemp(prefix="minchatgpt-gpu-")  # the transformers copy of the same weights
    ours.export_hf(hf_dir)
    hf = GPT2LMHeadModel.from_pretrained(hf_dir).to(device).train()
    ours = ours.to(device).train()
    ids = torch.randint(0, EOS_ID, (B, T), device=device)
    loss_mask = torch.ones_like(ids)

    def make_step(model, loss_fn):
        return harness.train_step(model, loss_fn, lambda: torch.autocast(device.type, dtype=dtype))

    flops = train_flops(cfg, B, T, B * (T - 1))
    flops_palm = palm_flops(cfg, B, T)
    res["sft"] = {"shape": "gpt2-medium" if not args.dry_run else "tiny", "batch": [B, T], "loss_on": "all tokens",
                  "flops_per_step": flops, "palm_flops_per_step": flops_palm, "rows": []}
    variants = [("ours, eager", ours, lambda m: lm_loss(m.lm_head.weight, m(ids), ids, loss_mask)[0]),
                ("transformers, eager", hf, lambda m: m(ids, labels=ids).loss)]
    if not args.no_compile:
        variants.append(("ours, torch.compile", ours, None))
    for name, model, loss_fn in variants:
        if loss_fn is None:  # compile the blocks (the fused loss stays eager: a Python loop over chunks)
            compiled = torch.compile(ours)
            step = make_step(ours, lambda: lm_loss(ours.lm_head.weight, compiled(ids), ids, loss_mask)[0])
        else:
            step = make_step(model, lambda m=model, f=loss_fn: f(m))
        log(f"SFT step: {name}")
        t = time.time()
        timed(step, device, 3)  # warm-up (and compilation)
        warm_s = time.time() - t
        s = harness.summary(timed(step, device, args.steps))
        tok_s = B * T / s["median"]
        row = {"name": name, "step_s": s, "tokens_per_s": tok_s, "warmup_s": warm_s,
               "tflops": flops / s["median"] / 1e12, "mfu": flops / s["median"] / 1e12 / peak,
               "mfu_palm": flops_palm / s["median"] / 1e12 / peak}
        if device.type == "cuda":
            row["max_memory_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30
            torch.cuda.reset_peak_memory_stats()
        res["sft"]["rows"].append(row)
        log(f"  {tok_s:.0f} tok/s, MFU {100 * row['mfu']:.1f}% (PaLM convention {100 * row['mfu_palm']:.1f}%)")
    del hf
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # 3. Generation
    torch.manual_seed(0)
    g_ours = GPT(gen_shape)
    g_ours.export_hf(hf_dir)
    g_hf = GPT2LMHeadModel.from_pretrained(hf_dir).to(device).eval()
    g_ours = g_ours.to(device).eval()
    prompt = torch.randint(0, EOS_ID, (8, 32), device=device)

    samplers = {"ours, fp32 weights": g_ours, "ours, bf16 sampler": g_ours.for_decoding("bf16")}
    if not args.no_compile:
        samplers["ours, bf16 sampler, compiled"] = g_ours.for_decoding("bf16", compile=True)

    def gen(sampler):
        with torch.autocast(device.type, dtype=dtype):
            out = sampler.generate(prompt, max_new_tokens=new_tokens, eos_id=None)
        assert out.tokens.shape == (8, 32 + new_tokens)

    def gen_hf():
        with torch.autocast(device.type, dtype=dtype):
            out = g_hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, top_k=0, top_p=1.0,
                                max_new_tokens=new_tokens, use_cache=True, eos_token_id=None, pad_token_id=EOS_ID)
        assert out.shape == (8, 32 + new_tokens)

    log("generation")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    calls = {**{name: (lambda s=s: gen(s)) for name, s in samplers.items()}, "transformers": gen_hf}
    rates, warmup_s = {name: [] for name in calls}, {}
    with torch.no_grad():
        for name, call in calls.items():  # warm-up (the compiled sampler compiles here)
            warmup_s[name] = harness.seconds(call, sync)
        for _ in range(3 if not args.dry_run else 1):  # rounds alternate, so a slow spell hits every variant
            for name, call in calls.items():
                rates[name].append(8 * new_tokens / harness.seconds(call, sync))
    res["generation"] = {"shape": "gpt2-medium" if not args.dry_run else "tiny", "batch": 8, "prompt": 32,
                         "new_tokens": new_tokens, "warmup_s": warmup_s,
                         "tok_s": {name: harness.summary(r) for name, r in rates.items()},
                         "ratio": {name: harness.summary(a / b for a, b in zip(rates[name], rates["transformers"]))
                                   for name in samplers}}
    for name, t in res["generation"]["tok_s"].items():
        log(f"  {name}: {t['median']:.0f} tok/s (warm-up {warmup_s[name]:.1f} s)")
    shutil.rmtree(hf_dir, ignore_errors=True)
    res["elapsed_s"] = time.time() - t_start

    name = "gpu-dry-run" if args.dry_run else "gpu-latest"
    os.makedirs(args.out, exist_ok=True)
    md = [f"# GPU benchmark{' (dry run on the CPU: not a GPU figure)' if args.dry_run else ''}", "",
          f"{res['card']}; torch {torch.__version__}, CUDA {res['cuda']}; {res['started']}, "
          f"{res['elapsed_s']:.0f} s. bf16 matmul peak (measured, {n_peak}³): {peak:.1f} TFLOP/s.", "",
          f"SFT step, {res['sft']['shape']} shape, batch {B}×{T}, bf16 autocast, loss on every token. MFU = "
          f"FLOPs the step needs (causal attention) / time / measured peak; in brackets the PaLM/nanoGPT "
          f"convention (6N + 12LCT per token).", "",
          "| | tokens/s | TFLOP/s | MFU | warm-up s |", "|---|---|---|---|---|"]
    for r in res["sft"]["rows"]:
        md.append(f"| {r['name']} | {r['tokens_per_s']:.0f} | {r['tflops']:.1f} | {100 * r['mfu']:.1f}% "
                  f"({100 * r['mfu_palm']:.1f}%) | {r['warmup_s']:.1f} |")
    g = res["generation"]
    md += ["", f"Generation, {g['shape']} shape, batch 8, 32-token prompts, {g['new_tokens']} new tokens, sampling, "
           "bf16 autocast (the samplers: GPT.for_decoding):", "",
           "| | tokens/s | / transformers | warm-up s |", "|---|---|---|---|"]
    for who, t in g["tok_s"].items():
        r = g["ratio"].get(who)
        ratio = f"{r['median']:.2f} ({r['min']:.2f}–{r['max']:.2f})" if r else ""
        md.append(f"| {who} | {t['median']:.0f} | {ratio} | {g['warmup_s'][who]:.1f} |")
    md.append("")
    for ext, text in (("json", json.dumps(res, indent=1)), ("md", "\n".join(md))):
        path = os.path.join(args.out, f"{name}.{ext}")
        with open(path + ".tmp", "w") as f:
            f.write(text + "\n")
        os.replace(path + ".tmp", path)
    print("\n".join(md))


if __name__ == "__main__":
    main()
