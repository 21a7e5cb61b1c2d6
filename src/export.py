"""Export a trained policy (an SFT or PPO run) as a Hugging Face GPT-2 directory.

OUT_DIR is what transformers' AutoModelForCausalLM / AutoTokenizer / pipeline("text-generation") and
vLLM load as GPT-2: the LoRA adapters merged into the weights (model.safetensors), config.json,
GPT-2's tokenizer (tokenizer.json, and vocab.json / merges.txt, copied from the same offline files our
tokenizer reads), generation_config.json and a short README.md (model card).

generation_config.json holds what our evaluation samples with (evaluate.GenParams: temperature 0.9,
top-k 200, 100 new tokens), EOS as eos and pad id, so a plain `pipeline(...)(prompt)` or vLLM answers
as evaluate.py does. Our models also stop where they start the next human turn ("\\n\\nHuman:"), but
that stop string is not in generation_config.json: with `stop_strings` there, transformers (5.x)
refuses to generate at all unless the caller hands `generate` the tokenizer, and the pipeline does
that only when given a stop sequence. So the caller passes it, and then gets our tokens exactly
(tested): pipeline(prompt, stop_sequence="\\n\\nHuman:"), model.generate(..., stop_strings=[...],
tokenizer=tok), vLLM SamplingParams(stop=["\\n\\nHuman:"]). The README.md written there says so.

Reward models are refused (exit 2). transformers' GPT2ForSequenceClassification could carry the
weights, but not our scores: its score layer has no bias, and it reads the score at the last token
that is not the pad id, which for GPT-2 is EOS, the very token our reward model reads its score
at. Matching it would take rewriting weights and padding with a token other than EOS; the reward
model is used through our own code instead (evaluate.py --judge rm:RUN_DIR, judges.rm_scores).

OUT_DIR must not exist or be empty. --force replaces an earlier export there (a directory holding
only the files a model export has; anything else is never deleted). The export is written next to
OUT_DIR and moved into place when complete, so a failed export leaves nothing half-written.

Examples:
  # the PPO policy of a pipeline run (a run directory, its final/ or checkpoints/step_N/ all work)
  python src/export.py runs/pipeline_task_<stamp>/ppo exported/ppo

  # then, with transformers
  python -c "from transformers import pipeline; p = pipeline('text-generation', model='exported/ppo'); \\
      print(p('\\n\\nHuman: What is the capital of France?\\n\\nAssistant:', stop_sequence='\\n\\nHuman:'))"
"""
import fnmatch
import json
import os
import shutil

from checkpoints import checkpoint_info, is_checkpoint
from cli import parser
from common import UserError, run_cli
from configs import EOS_ID, GPT2_VOCAB_SIZE
from evaluate import STOP, GenParams, check_model_source
from gpt import GPT, hf_tokenizer
from sample import load_policy
from tokenizer import gpt2_bpe_files

# Names a model export holds (ours, or one written by save_pretrained): --force replaces only these.
EXPORT_FILES = ("config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
                "pytorch_model*.bin", "pytorch_model.bin.index.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja",
                "README.md")


def load_for_export(source: str) -> tuple:
    """(policy, checkpoint info) of an SFT or PPO run / checkpoint; anything else is a UserError."""
    check_model_source(source, "RUN_DIR", local_only=True)
    if not is_checkpoint(source):
        raise UserError(f"{source} is not a minChatGPT run or checkpoint (no model.safetensors written by "
                        f"minChatGPT in it); a transformers directory needs no export")
    info = checkpoint_info(source)
    if info["kind"] == "rm":
        raise UserError(f"{source} is a reward model (stage {info['stage']}): not exported, because transformers' "
                        f"GPT2ForSequenceClassification would not give its scores (see export.py --help); "
                        f"use it through evaluate.py --judge rm:{source}")
    model = load_policy(source, None)  # refuses a value model with one line
    if model.config.vocab_size != GPT2_VOCAB_SIZE:
        raise UserError(f"{source} has a vocabulary of {model.config.vocab_size} tokens; the GPT-2 tokenizer "
                        f"exported with it has {GPT2_VOCAB_SIZE}")
    return model, info


def check_out_dir(out_dir: str, force: bool) -> bool:
    """Whether OUT_DIR holds an earlier export to replace (only with --force); UserError if it may not
    be written."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"OUT_DIR {out_dir} exists and is not a directory")
    entries = sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []
    if not entries:
        return False
    if is_checkpoint(out_dir):
        raise UserError(f"OUT_DIR {out_dir} holds a minChatGPT checkpoint: not writing over it; choose another "
                        f"directory")
    if not force:
        raise UserError(f"OUT_DIR {out_dir} is not empty ({len(entries)} entries); pass --force to replace "
                        f"an earlier export there, or choose another directory")
    foreign = [e for e in entries if os.path.isdir(os.path.join(out_dir, e))
               or not any(fnmatch.fnmatch(e, pattern) for pattern in EXPORT_FILES)]
    if foreign:
        raise UserError(f"OUT_DIR {out_dir} holds {foreign[0]!r}, which is not part of a model export: not "
                        f"replacing it even with --force; choose another directory")
    return True


def write_export(model: GPT, out_dir: str, info: dict, source: str):
    """Write the Hugging Face directory of `model` into the (new or empty) directory out_dir."""
    from transformers import GenerationConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one "Writing model shards" bar for a single file says nothing
    model.eval().export_hf(out_dir)  # config.json + model.safetensors, LoRA merged
    tok = hf_tokenizer()
    tok.model_max_length = model.config.block_size
    tok.pad_token = tok.eos_token  # GPT-2 pads with EOS (the attention mask tells them apart), as we do
    tok.padding_side = "left"  # prompts are left padded for batched generation
    tok.save_pretrained(out_dir)
    # transformers leaves settings equal to its own defaults out of tokenizer_config.json, and those
    # defaults have changed between versions (a serving engine may run another): write them out.
    path = os.path.join(out_dir, "tokenizer_config.json")
    with open(path) as f:
        tok_config = json.load(f)
    tok_config.update(padding_side="left", clean_up_tokenization_spaces=False)
    with open(path, "w") as f:
        json.dump(tok_config, f, indent=2, sort_keys=True)
    vocab_bpe, encoder_json = gpt2_bpe_files()  # GPT-2's own files, sha256-checked
    shutil.copyfile(encoder_json, os.path.join(out_dir, "vocab.json"))
    shutil.copyfile(vocab_bpe, os.path.join(out_dir, "merges.txt"))
    gen = GenParams()
    GenerationConfig(
        bos_token_id=EOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID, do_sample=True,
        temperature=gen.temperature, top_k=gen.top_k, top_p=gen.top_p,
        max_new_tokens=min(gen.max_new_tokens, model.config.block_size // 2),
    ).save_pretrained(out_dir)
    with open(os.path.join(out_dir, "README.md"), "w") as f:
        f.write(model_card(info, source, model))
    mode = 0o666 & ~_umask()  # transformers may write files readable by their owner only
    for name in os.listdir(out_dir):
        os.chmod(os.path.join(out_dir, name), mode)


def model_card(info: dict, source: str, model: GPT) -> str:
    c, gen, stop = model.config, GenParams(), json.dumps(STOP)
    return f"""# minChatGPT {info['stage']} policy

GPT-2 ({c.n_layer} layers, {c.n_embd} wide, {c.n_head} heads, context {c.block_size}; preset
{info.get('preset') or 'custom'}) exported by minChatGPT's src/export.py from `{os.path.normpath(source)}`
(weights sha256 {info.get('sha256', 'unrecorded')}), LoRA adapters merged.

Prompts use Anthropic HH's format, `"\\n\\nHuman: <question>\\n\\nAssistant:"`; an answer ends at EOS
or where the model starts the next human turn, so pass that stop string:

```python
from transformers import pipeline
chat = pipeline("text-generation", model="PATH")
chat("\\n\\nHuman: Hello!\\n\\nAssistant:", stop_sequence={stop}, return_full_text=False)
# vLLM: SamplingParams(stop=[{stop}]); model.generate(..., stop_strings=[{stop}], tokenizer=tok)
```

generation_config.json samples as minChatGPT's evaluation does (temperature {gen.temperature}, top-k
{gen.top_k}); `do_sample=False` gives greedy answers.
"""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def export(source: str, out_dir: str, force: bool = False) -> str:
    """Export the policy at `source` into out_dir (see the module docstring); returns out_dir."""
    replace_old = check_out_dir(out_dir, force)  # before loading anything: fail fast
    model, info = load_for_export(source)
    out_dir = os.path.normpath(out_dir)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp, old = f"{out_dir}.tmp{os.getpid()}", f"{out_dir}.old{os.getpid()}"
    try:
        os.mkdir(tmp)
        write_export(model, tmp, info, source)
        if replace_old:
            os.rename(out_dir, old)
            try:
                os.rename(tmp, out_dir)
            except OSError:
                os.rename(old, out_dir)  # put the earlier export back
                raise
            shutil.rmtree(old)
        else:
            os.replace(tmp, out_dir)  # out_dir is absent or an empty directory
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def main(argv=None):
    ap = parser(__doc__)
    ap.add_argument("run_dir", metavar="RUN_DIR", help="SFT or PPO run directory, or one of its checkpoint directories")
    ap.add_argument("out_dir", metavar="OUT_DIR", help="directory to write (must not exist or be empty)")
    ap.add_argument("--force", action="store_true", help="replace an earlier export in OUT_DIR")
    args = ap.parse_args(argv)
    out = export(args.run_dir, args.out_dir, args.force)
    print(f"exported {args.run_dir} to {out} (transformers / vLLM GPT-2; stop answers at {STOP!r})")


if __name__ == "__main__":
    run_cli(main)
