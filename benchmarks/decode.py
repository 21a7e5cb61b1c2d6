"""Decoding speed against transformers and against the memory-bandwidth limit, with a profile.

    python benchmarks/decode.py                   # gpt2-small, batch 8, 32-token prompts: ~4 minutes on 2 cores
    python benchmarks/decode.py --precision bf16  # both sides with bf16 weights
    python benchmarks/decode.py --shape tiny --repeats 2

Decoding one token per sequence reads every weight once per step (and the KV cache so far), and
does little arithmetic with each byte, so at small batch its speed limit is memory bandwidth:

    limit (tokens/s) = batch / (bytes read per step / bandwidth)

with the bandwidth measured in this run (summing a 256 MiB tensor, the best of 10, before and
after the timing) and the bytes per step = every parameter but the position table (one row of it
is read) + the K and V of every layer up to the current length, averaged over the steps of the
call. For each number of new tokens and both greedy decoding and sampling (full vocabulary,
temperature 1), it prints ours (GPT.generate, KV cache, weights in --precision) and transformers'
GPT2LMHeadModel.generate (use_cache=True, same weights), their ratio (calls alternate, ratio per pair, median) and each one's share of the
limit; then the operators our greedy decoding spends its time in (torch.profiler).
Writes benchmarks/results/decode.md and decode.json (decode_bf16.* with --precision bf16).
"""
import harness  # noqa: I001  (first: sets flush-denormal before torch starts threads)

import argparse
import json
import os
import tempfile
import time

import torch

harness.use_src()
from configs import EOS_ID  # noqa: E402
from run import SHAPES, model_pair  # noqa: E402

BATCH, PROMPT = 8, 32


def read_bandwidth(repeats: int = 10) -> float:
    """Bytes per second that a full read of a large fp32 tensor reaches (best of `repeats`): the
    highest figure is the limit, a slow spell of a shared machine is not."""
    x = torch.ones(64 * 2**20)  # 256 MiB
    x.sum()
    best = min(harness.seconds(x.sum) for _ in range(repeats))
    return x.numel() * x.element_size() / best


def bytes_per_step(model, new_tokens: int) -> float:
    """Bytes one decoding step reads, averaged over the steps of a call: the weights (the
    position table but one row) plus the KV cache of every layer at that step's length."""
    cfg = model.config
    weights = sum(p.numel() * p.element_size() for name, p in model.named_parameters() if "wpe" not in name)
    kv_per_position = 2 * cfg.n_layer * BATCH * cfg.n_embd * model.wte.weight.element_size()  # K and V
    mean_length = PROMPT + (new_tokens - 1) / 2
    return weights + kv_per_position * mean_length


def profile_greedy(ours, prompt, new_tokens: int, top: int = 12) -> str:
    from torch.profiler import ProfilerActivity, profile
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        ours.generate(prompt, max_new_tokens=new_tokens, temperature=0.0, eos_id=None)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="example: python benchmarks/decode.py --shape tiny --repeats 2",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="gpt2-small")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per side (after one warm-up call each)")
    p.add_argument("--new-tokens", default="64,128", help="comma-separated numbers of new tokens")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="dtype of both models' weights and KV cache; the limit counts bytes of that dtype")
    p.add_argument("--out", help="writes OUT.md and OUT.json (default benchmarks/results/decode[_bf16])")
    args = p.parse_args(argv)
    args.out = args.out or os.path.join(harness.HERE, "results", "decode" + ("_bf16" if args.precision == "bf16" else ""))
    try:
        lengths = [int(n) for n in args.new_tokens.split(",")]
    except ValueError:
        p.exit(2, f"error: --new-tokens must be comma-separated integers, got {args.new_tokens!r}\n")
    if args.repeats < 1 or not lengths or min(lengths) < 1:
        p.exit(2, "error: --repeats and every --new-tokens value must be >= 1\n")

    bandwidths = [read_bandwidth()]  # before the models exist, and again after the timing
    with tempfile.TemporaryDirectory() as workdir:
        ours, hf = model_pair(args.shape, workdir)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.precision]
    ours.to(dtype).eval()
    hf.to(dtype).eval()
    prompt = torch.randint(0, EOS_ID, (BATCH, PROMPT), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(prompt)
    rows = []
    for n in lengths:
        for mode, temperature in (("greedy", 0.0), ("sampling", 1.0)):
            def run_ours():
                ours.generate(prompt, max_new_tokens=n, temperature=temperature, eos_id=None)

            def run_hf():  # no EOS: every row generates all n tokens, as ours does with eos_id=None
                hf.generate(prompt, attention_mask=mask, do_sample=temperature > 0, temperature=temperature or None,
                            top_k=0, top_p=1.0, max_new_tokens=n, use_cache=True, eos_token_id=None,
                            pad_token_id=EOS_ID)

            with torch.no_grad():
                r = harness.compare(run_ours, run_hf, work=BATCH * n, repeats=args.repeats)
            rows.append({"shape": args.shape, "new_tokens": n, "mode": mode, **r})
            print(f"{n} new tokens, {mode}: ours {r['ours']['median']:.0f} tok/s, transformers "
                  f"{r['theirs']['median']:.0f}, ratio {r['ratio']['median']:.2f}", flush=True)
    bandwidths.append(read_bandwidth())
    bandwidth = max(bandwidths)
    for r in rows:
        r["limit_tok_s"] = BATCH * bandwidth / bytes_per_step(ours, r["new_tokens"])
    table = profile_greedy(ours, prompt, lengths[0])

    md = [f"Command: `python benchmarks/decode.py --shape {args.shape} --precision {args.precision} --repeats {args.repeats} "
          f"--new-tokens {args.new_tokens}` ({time.strftime('%Y-%m-%d')}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {harness.cpu_model()})",
          "",
          f"Batch {BATCH}, {PROMPT}-token prompts, {args.precision} weights on both sides, KV cache; read bandwidth {bandwidth / 1e9:.1f} GB/s "
          f"(sum of a 256 MiB tensor, best of 10, before and after the timing: "
          f"{' and '.join(f'{b / 1e9:.1f}' for b in bandwidths)} GB/s); limit = batch x bandwidth / bytes read per step.",
          "",
          "| new tokens | decoding | ours tok/s | transformers tok/s | ours / transformers (min-max) | ours, share of limit | transformers, share of limit | limit tok/s |",
          "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['new_tokens']} | {r['mode']} | {r['ours']['median']:.0f} | {r['theirs']['median']:.0f} | "
                  f"{r['ratio']['median']:.2f} ({r['ratio']['min']:.2f}-{r['ratio']['max']:.2f}) | "
                  f"{r['ours']['median'] / r['limit_tok_s']:.0%} | {r['theirs']['median'] / r['limit_tok_s']:.0%} | "
                  f"{r['limit_tok_s']:.0f} |")
    md += ["", f"Where our greedy decoding of {lengths[0]} tokens spends its time (torch.profiler, self CPU time):",
           "", "```", table.rstrip(), "```", ""]
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(md))
    with open(args.out + ".json", "w") as f:
        json.dump({"bandwidth_bytes_s": bandwidths, "rows": rows, "profile": table}, f, indent=1)
    print("\n".join(md))
    print(f"wrote {args.out}.md and {args.out}.json")


if __name__ == "__main__":
    main()
