"""Decoding speed against transformers and against the machine's limits, with a profile.

    python benchmarks/decode.py                     # gpt2-small, batch 8, 32-token prompts: ~5 minutes on 2 cores
    python benchmarks/decode.py --shape tiny --repeats 2
    python benchmarks/decode.py --batch 64 --prompt-len 64 --new-tokens 32 --out benchmarks/results/decode_b64
    python benchmarks/decode.py --ours int8 --theirs fp32 --new-tokens 64 --compile \
        --out benchmarks/results/decode_compile

Ours decodes through GPT.for_decoding(precision) for each --ours precision: fp32 is the model
itself; bf16 and int8 (weight-only, bf16 activations) are the sampler copies PPO rollouts,
sample.py and chat.py can use (--decode-precision); --compile adds each of them torch.compile'd
(for_decoding(..., compile=True); its compilation happens in the warm-up round and is reported
apart). Transformers' GPT2LMHeadModel.generate (use_cache=True, same weights) runs with its
weights in each --theirs dtype. Every call of every variant alternates with the others, so a slow
spell of the machine hits all of them; ratios are taken within a round (median, min-max over the
rounds).

A decode step reads every weight once (and the KV cache so far) and does 2 flops per weight per
sequence, so at batch B its speed has two limits, both measured in this run:

    memory limit (tokens/s)  = B * read bandwidth / bytes read per step
    compute limit (tokens/s) = matmul peak of the dtype / (2 * weights multiplied per token)

Read bandwidth: summing a 256 MiB tensor, best of 10, before and after the timing. Bytes per step:
every weight and buffer the sampler reads in full (the position table and, where the output layer
has its own int8 copy, the embedding table read one row a token, are left out) plus the K and V of
every layer at the step's length, averaged over the call (ours keeps them in fp32 on a CPU,
transformers in its weights' dtype). Matmul peak: 2048^3 in fp32 and in bf16
(the int8 kernel widens to bf16), best of 5. Writes benchmarks/results/decode.md and decode.json.
"""
import harness  # noqa: I001  (first: sets flush-denormal before torch starts threads)

import argparse
import copy
import json
import os
import tempfile
import time

import torch

harness.use_src()
from configs import DECODE_PRECISIONS, EOS_ID  # noqa: E402
from run import SHAPES, model_pair  # noqa: E402

HF_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def read_bandwidth(repeats: int = 10) -> float:
    """Bytes per second that a full read of a large fp32 tensor reaches (best of `repeats`): the
    highest figure is the limit, a slow spell of a shared machine is not."""
    x = torch.ones(64 * 2**20)  # 256 MiB
    x.sum()
    best = min(harness.seconds(x.sum) for _ in range(repeats))
    return x.numel() * x.element_size() / best


def bytes_per_step(sampler, batch: int, prompt_len: int, new_tokens: int, kv_bytes: int) -> float:
    """Bytes one decoding step reads, averaged over the steps of a call: the weights read in full
    plus the KV cache (kv_bytes per number) of every layer at that step's length."""
    cfg = sampler.config
    skip = ("wpe",) + (("wte",) if getattr(sampler, "int8_head", None) is not None else ())
    tensors = list(sampler.named_parameters()) + list(sampler.named_buffers())
    weights = sum(t.numel() * t.element_size() for name, t in tensors if not name.startswith(skip))
    kv_per_position = 2 * cfg.n_layer * batch * cfg.n_embd * kv_bytes  # K and V
    return weights + kv_per_position * (prompt_len + (new_tokens - 1) / 2)


def flops_per_token(cfg) -> float:
    """2 flops per weight of the block matmuls and the output layer (attention's share is <2% here)."""
    return 2 * (12 * cfg.n_layer * cfg.n_embd ** 2 + cfg.vocab_size * cfg.n_embd)


def profile_greedy(sampler, prompt, new_tokens: int, top: int = 12) -> str:
    from torch.profiler import ProfilerActivity, profile
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        sampler.generate(prompt, max_new_tokens=new_tokens, temperature=0.0, eos_id=None)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)


def csv_choices(text: str, allowed, flag: str, p) -> list:
    items = [x for x in text.split(",") if x]
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        p.exit(2, f"error: {flag} takes comma-separated values of {', '.join(allowed)}, got {text!r}\n")
    return items


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="example: python benchmarks/decode.py --shape tiny --repeats 2",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="gpt2-small")
    p.add_argument("--batch", type=int, default=8, help="sequences decoded together")
    p.add_argument("--prompt-len", type=int, default=32, help="tokens in every prompt")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (after one warm-up round)")
    p.add_argument("--new-tokens", default="64,128", help="comma-separated numbers of new tokens")
    p.add_argument("--ours", default="fp32,bf16,int8", help="our decode precisions (GPT.for_decoding)")
    p.add_argument("--theirs", default="fp32,bf16", help="dtypes of transformers' weights")
    p.add_argument("--compile", action="store_true", help="also time each of ours torch.compile'd")
    p.add_argument("--out", help="writes OUT.md and OUT.json (default benchmarks/results/decode)")
    args = p.parse_args(argv)
    args.out = args.out or os.path.join(harness.HERE, "results", "decode")
    try:
        lengths = [int(n) for n in args.new_tokens.split(",")]
    except ValueError:
        p.exit(2, f"error: --new-tokens must be comma-separated integers, got {args.new_tokens!r}\n")
    if min([args.repeats, args.batch, args.prompt_len] + lengths) < 1:
        p.exit(2, "error: --repeats, --batch, --prompt-len and every --new-tokens value must be >= 1\n")
    ours_precisions = csv_choices(args.ours, DECODE_PRECISIONS, "--ours", p)
    their_dtypes = csv_choices(args.theirs, list(HF_DTYPES), "--theirs", p)

    bandwidths = [read_bandwidth()]  # before the models exist, and again after the timing
    peaks = {name: harness.matmul_peak(dtype)["max"] * 1e9 for name, dtype in HF_DTYPES.items()}  # flop/s
    with tempfile.TemporaryDirectory() as workdir:
        model, hf = model_pair(args.shape, workdir)
    model.eval()
    samplers = {f"ours {prec}": model.for_decoding(prec) for prec in ours_precisions}
    if args.compile:
        samplers |= {f"ours compiled {prec}": model.for_decoding(prec, compile=True) for prec in ours_precisions}
    theirs = {f"transformers {name}": copy.deepcopy(hf).to(HF_DTYPES[name]).eval() for name in their_dtypes}
    del hf
    B = args.batch
    prompt = torch.randint(0, EOS_ID, (B, args.prompt_len), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(prompt)

    rows = []
    for n in lengths:
        for mode, temperature in (("greedy", 0.0), ("sampling", 1.0)):
            calls = {}
            for name, sampler in samplers.items():
                calls[name] = lambda s=sampler: s.generate(prompt, max_new_tokens=n, temperature=temperature,
                                                           eos_id=None)
            for name, hf_model in theirs.items():  # no EOS: every row generates all n tokens, as ours does
                calls[name] = lambda m=hf_model: m.generate(
                    prompt, attention_mask=mask, do_sample=temperature > 0, temperature=temperature or None,
                    top_k=0, top_p=1.0, max_new_tokens=n, use_cache=True, eos_token_id=None, pad_token_id=EOS_ID)
            rates, warmup_s = {name: [] for name in calls}, {}
            with torch.no_grad():
                for round_ in range(args.repeats + 1):  # round 0 warms up (and compiles)
                    for name, call in calls.items():
                        seconds = harness.seconds(call)
                        if round_:
                            rates[name].append(B * n / seconds)
                        else:
                            warmup_s[name] = seconds
            row = {"shape": args.shape, "new_tokens": n, "mode": mode, "warmup_s": warmup_s,
                   "tok_s": {name: harness.summary(r) for name, r in rates.items()},
                   "ratio": {f"{a} / {b}": harness.summary(x / y for x, y in zip(rates[a], rates[b]))
                             for a in samplers for b in theirs}}
            rows.append(row)
            print(f"{n} new tokens, {mode}: " + ", ".join(f"{k} {v['median']:.0f}" for k, v in row["tok_s"].items())
                  + " tok/s", flush=True)
    bandwidths.append(read_bandwidth())
    bandwidth = max(bandwidths)
    limits = {}  # variant -> new tokens -> (memory limit, compute limit) in tok/s
    for name, m in list(samplers.items()) + list(theirs.items()):
        precision = name.split()[-1]
        dtype = "fp32" if precision == "fp32" else "bf16"  # int8 products run in bf16
        # transformers' tensors are ours in the same dtype; its KV cache is in its weights' dtype, ours in fp32.
        same_bytes = m if name in samplers else samplers.get(f"ours {precision}") or model.for_decoding(precision)
        kv_bytes = 2 if name in theirs and precision == "bf16" else 4
        nbytes = {n: bytes_per_step(same_bytes, B, args.prompt_len, n, kv_bytes) for n in lengths}
        compute_limit = peaks[dtype] / flops_per_token(model.config)
        limits[name] = {n: (B * bandwidth / nbytes[n], compute_limit) for n in lengths}
    for r in rows:
        r["limits_tok_s"] = {name: {"memory": lim[r["new_tokens"]][0], "compute": lim[r["new_tokens"]][1]}
                             for name, lim in limits.items()}
    fastest = max(samplers, key=lambda name: rows[0]["tok_s"][name]["median"])
    table = profile_greedy(samplers[fastest], prompt, lengths[0])

    theirs_cols = list(theirs)
    md = [f"Command: `python benchmarks/decode.py --shape {args.shape} --batch {B} --prompt-len {args.prompt_len} "
          f"--repeats {args.repeats} --new-tokens {args.new_tokens} --ours {args.ours} --theirs {args.theirs}"
          f"{' --compile' if args.compile else ''}` "
          f"({time.strftime('%Y-%m-%d')}, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads, {harness.cpu_model()})",
          "",
          f"Batch {B}, {args.prompt_len}-token prompts, KV cache on both sides. Read bandwidth {bandwidth / 1e9:.1f} GB/s "
          f"(sum of a 256 MiB tensor, best of 10, before and after the timing: "
          f"{' and '.join(f'{b / 1e9:.1f}' for b in bandwidths)} GB/s); matmul peak (2048^3, best of 5) "
          f"{peaks['fp32'] / 1e9:.0f} GFLOP/s fp32, {peaks['bf16'] / 1e9:.0f} GFLOP/s bf16. Memory limit = batch x "
          f"bandwidth / bytes read per step; compute limit = peak / (2 x weights per token).",
          "",
          "| new tokens | decoding | who | tok/s (min-max) | " + " | ".join(f"vs {c}" for c in theirs_cols)
          + " | share of memory limit | memory limit tok/s | share of compute limit | warm-up call s |",
          "|---|---|---|---|" + "---|" * len(theirs_cols) + "---|---|---|---|"]
    for r in rows:
        for name, t in r["tok_s"].items():
            vs = [(f"{r['ratio'][f'{name} / {c}']['median']:.2f} ({r['ratio'][f'{name} / {c}']['min']:.2f}-"
                   f"{r['ratio'][f'{name} / {c}']['max']:.2f})") if name in samplers else "" for c in theirs_cols]
            lim = r["limits_tok_s"][name]
            md.append(f"| {r['new_tokens']} | {r['mode']} | {name} | "
                      f"{t['median']:.0f} ({t['min']:.0f}-{t['max']:.0f}) | "
                      + " | ".join(vs) + f" | {t['median'] / lim['memory']:.0%} | {lim['memory']:.0f} | "
                      f"{t['median'] / lim['compute']:.0%} | {r['warmup_s'][name]:.1f} |")
    md += ["", f"Where the fastest of ours ({fastest}) spends greedy decoding of {lengths[0]} tokens "
           "(torch.profiler, self CPU time):", "", "```", table.rstrip(), "```", ""]
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(md))
    with open(args.out + ".json", "w") as f:
        json.dump({"bandwidth_bytes_s": bandwidths, "matmul_peak_flop_s": peaks, "rows": rows,
                   "profiled": fastest, "profile": table}, f, indent=1)
    print("\n".join(md))
    print(f"wrote {args.out}.md and {args.out}.json")


if __name__ == "__main__":
    main()
