"""Where one SFT training step spends its time: torch.profiler's top operators by self CPU time.

    python benchmarks/profile_step.py                        # gpt2-small shape, bf16, 4 x 256, loss on every token
    python benchmarks/profile_step.py --shape tiny --precision fp32

The step is the one benchmarks/run.py times (harness.train_step: forward, backward, clip, fused
AdamW), on random weights; one warm-up step, then two profiled ones.
"""
import harness  # noqa: I001  (first: sets flush-denormal before torch starts threads)

import argparse
from contextlib import nullcontext

import torch
from torch.profiler import ProfilerActivity, profile

harness.use_src()
from run import SHAPES  # noqa: E402

from configs import EOS_ID  # noqa: E402
from gpt import GPT  # noqa: E402
from loss import lm_loss  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="gpt2-small", choices=sorted(SHAPES))
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = GPT(SHAPES[args.shape])
    ids = torch.randint(0, EOS_ID, (args.batch, args.seq))
    loss_mask = torch.ones_like(ids)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.precision == "bf16" else nullcontext
    step = harness.train_step(model, lambda: lm_loss(model.lm_head.weight, model(ids), ids, loss_mask)[0], autocast)
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
        step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=45))


if __name__ == "__main__":
    main()
