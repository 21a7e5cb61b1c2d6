"""Sample from a model: a preset (hub weights or random init) or a trained checkpoint.

Example (works offline on a fresh clone; tiny has random weights, so expect gibberish):
  python src/sample.py --preset tiny --prompt "Hello, my name is" --max-new-tokens 20
"""
import argparse

import torch

from common import UserError, run_cli, seed_everything
from configs import PRESETS, get_preset
from gpt import GPT
from tokenizer import get_tokenizer


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n", 2)[2],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", help=f"model preset, one of: {', '.join(PRESETS)}")
    ap.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--top-p", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not args.prompt:
        raise UserError("give at least one --prompt")
    seed_everything(args.seed)
    config = get_preset(args.preset)
    model = GPT.from_pretrained(config.pretrained, config) if config.pretrained else GPT(config)
    model.eval()
    tok = get_tokenizer()
    ids, mask = tok(args.prompt, padding_side="left")
    out = model.generate(ids, mask, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         top_k=args.top_k, top_p=args.top_p, generator=torch.Generator().manual_seed(args.seed))
    for prompt, text in zip(args.prompt, tok.decode_batch(out.tokens, out.response_mask)):
        print(f"{prompt}{text}")


if __name__ == "__main__":
    run_cli(main)
