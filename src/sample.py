"""Sample answers from a trained model (an SFT or PPO run), a transformers directory or hub name, or a new preset.

Each prompt is put in the HH format the models are trained on ("\\n\\nHuman: {prompt}\\n\\nAssistant:";
--raw keeps it as given), and an answer ends at EOS or where the model starts the next human turn.
Printed for each prompt: the prompt as the model saw it, then the answer.

Examples:
  # works offline on a fresh clone (tiny has random weights, so expect gibberish)
  python src/sample.py --preset tiny --prompt "Hello, my name is" --raw --max-new-tokens 20

  # the PPO policy of a pipeline run, greedy (an SFT run, a checkpoint directory or a hub name work too)
  python src/sample.py runs/pipeline_task_<stamp>/ppo --prompt "What is the capital of France?" --temperature 0
"""
from typing import List

import torch

from checkpoints import checkpoint_info, is_checkpoint
from cli import parser
from common import UserError, autocast, default_precision, resolve_device, run_cli, seed_everything
from configs import DECODE_PRECISIONS, EOS_ID, PRESETS, get_preset
from evaluate import STOP, GenParams, answer_from_tokens, load_lm
from gpt import GPT
from tokenizer import format_prompt, get_tokenizer


def load_policy(source, preset) -> GPT:
    """The language model to sample from: `source` loaded (our run or checkpoint, a transformers
    directory, a hub name), or a new model of `preset` (its hub weights, or random ones)."""
    if source and preset:
        raise UserError("give a model to load or --preset, not both")
    if not source:
        config = get_preset(preset or "tiny")
        return GPT.from_pretrained(config.pretrained, config) if config.pretrained else GPT(config)
    if is_checkpoint(source):
        info = checkpoint_info(source)
        if info["kind"] != "lm":  # load_lm would take its backbone, which was never trained to answer
            what = {"rm": "a reward model", "value": "a value model"}[info["kind"]]
            raise UserError(f"{source} is {what} (stage {info['stage']}): it scores answers, it does not "
                            f"write them; give an SFT or PPO run")
    return load_lm(source)[0]


@torch.no_grad()
def sample(model: GPT, prompts: List[str], params: GenParams, device: torch.device) -> List[dict]:
    """One answer per prompt (as evaluate.answer_from_tokens describes it), all prompts in one
    left-padded batch drawing from one random stream seeded with params.seed."""
    tok = get_tokenizer()
    ids = tok.encode_batch(prompts, allow_special=False)
    room = model.config.block_size - params.max_new_tokens
    if room < 1 or max(map(len, ids)) > room:
        raise UserError(f"a prompt of {max(map(len, ids))} tokens + --max-new-tokens {params.max_new_tokens} "
                        f"does not fit the model's block size {model.config.block_size}")
    prompt_ids, prompt_mask = tok.pad(ids, padding_side="left")  # (B, Tp) each
    generator = torch.Generator(device=device).manual_seed(params.seed)
    model.to(device).eval()
    with autocast(device, default_precision(device)):
        out = model.generate(prompt_ids.to(device), prompt_mask.to(device), max_new_tokens=params.max_new_tokens,
                             temperature=params.temperature, top_k=params.top_k or None, top_p=params.top_p,
                             eos_id=EOS_ID, stop_strings=[STOP], tokenizer=tok, generator=generator)
    Tp = out.prompt_len
    return [answer_from_tokens(tok, row[Tp:][mask[Tp:].bool()].tolist())
            for row, mask in zip(out.tokens.cpu(), out.response_mask.cpu())]


def main(argv=None):
    ap = parser(__doc__)
    ap.add_argument("model", nargs="?", default=None,
                    help="SFT or PPO run or checkpoint directory, transformers directory or hub name")
    ap.add_argument("--model", dest="model_flag", metavar="MODEL", default=None, help="the same, as a flag")
    ap.add_argument("--preset", default=None,
                    help=f"instead of a model: a new one of this preset (default tiny), one of: {', '.join(PRESETS)}")
    ap.add_argument("--prompt", action="append", default=[], help="prompt text (repeat for a batch)")
    ap.add_argument("--raw", action="store_true", help="use the prompts as given, not in the HH format")
    gen = GenParams()
    ap.add_argument("--max-new-tokens", type=int, default=gen.max_new_tokens,
                    help=f"response budget in tokens (default {gen.max_new_tokens})")
    ap.add_argument("--temperature", type=float, default=gen.temperature,
                    help=f"sampling temperature, 0 = greedy (default {gen.temperature})")
    ap.add_argument("--top-k", type=int, default=gen.top_k, help=f"top-k sampling, 0 = off (default {gen.top_k})")
    ap.add_argument("--top-p", type=float, default=gen.top_p, help=f"nucleus sampling, 1 = off (default {gen.top_p})")
    ap.add_argument("--seed", type=int, default=gen.seed,
                    help=f"seeds the sampling and a preset's random weights (default {gen.seed})")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--decode-precision", choices=DECODE_PRECISIONS, default="fp32",
                    help="weights to decode with: bf16 / int8 are a faster copy within 1e-3 nats of the model "
                         "(GPT.for_decoding; benchmarks/decode.py measures which is fastest here) (default fp32)")
    args = ap.parse_args(argv)
    if args.model and args.model_flag and args.model != args.model_flag:
        raise UserError(f"two models given: {args.model} and --model {args.model_flag}")
    if not args.prompt:
        raise UserError("give at least one --prompt")
    params = GenParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                       top_p=args.top_p, seed=args.seed)
    device = resolve_device(args.device)
    seed_everything(args.seed)
    model = load_policy(args.model or args.model_flag, args.preset).to(device).for_decoding(args.decode_precision)
    prompts = args.prompt if args.raw else [format_prompt(p) for p in args.prompt]
    for prompt, answer in zip(prompts, sample(model, prompts, params, device)):
        print(prompt + answer["text"])


if __name__ == "__main__":
    run_cli(main)
