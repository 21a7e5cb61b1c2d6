"""export.py: the exported directory is GPT-2 to transformers, and answers exactly as our model does.

The policy is a tiny random GPT-2 whose LoRA adapters alone (base weights frozen) were trained to
answer three prompts: one ends with EOS, one starts the next human turn (the stop string), one runs
past the token budget. Without the adapters it says something else entirely, so an export that
dropped or misplaced the merged LoRA update cannot match.
"""
import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Tokenizer, pipeline

import export
import sample
from checkpoints import save_model
from common import run_cli
from configs import EOS_ID, ModelConfig
from evaluate import STOP, GenParams
from gpt import GPT, RewardModel, ValueModel, lora_disabled, mark_only_lora_trainable
from tokenizer import format_prompt, get_tokenizer

CONFIG = ModelConfig(n_layer=2, n_head=4, n_embd=64, block_size=128, lora_rank=8)
ENDS = format_prompt("What is the capital of France?")  # answered, then EOS
STOPS = format_prompt("Can you help me?")  # answered, then the next human turn begins
RUNS_ON = "Once upon a time, in a land far away,"  # a continuation longer than the budget
TEACH = {ENDS: " The capital of France is Paris.<|endoftext|>",
         STOPS: " Sure, what do you need?" + STOP + " more",
         RUNS_ON: " a dog liked to run and jump and play all day long in the warm sun"}
PROMPTS = list(TEACH)
NEW = 12  # token budget: more than the first two answers need, less than the third


def train_adapters(model: GPT, steps: int = 40) -> GPT:
    """Teach the LoRA adapters (nothing else) the TEACH continuations by gradient descent."""
    tok = get_tokenizer()
    seqs = [tok.encode(p + r) for p, r in TEACH.items()]  # "<|endoftext|>" in the text becomes EOS
    ids, mask = tok.pad(seqs)  # (B, T) each, right padded
    weight = mask.clone()
    for i, p in enumerate(TEACH):
        weight[i, :len(tok.encode(p))] = 0  # loss on the continuation only
    weight = weight[:, 1:].flatten().float()
    mark_only_lora_trainable(model)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        logits = model.logits(ids, mask)[:, :-1]  # (B, T-1, V)
        nll = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
        loss = (nll * weight).sum() / weight.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def our_greedy(model: GPT, prompts, stop=True):
    """New tokens per prompt from our generate, called as sample.py calls it (EOS kept when emitted)."""
    tok = get_tokenizer()
    ids, mask = tok.pad(tok.encode_batch(prompts, allow_special=False), padding_side="left")
    out = model.generate(ids, mask, max_new_tokens=NEW, temperature=0, eos_id=EOS_ID,
                         stop_strings=[STOP] if stop else [], tokenizer=tok)
    Tp = out.prompt_len
    return [row[Tp:][m[Tp:].bool()].tolist() for row, m in zip(out.tokens, out.response_mask)]


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    """(run dir, the trained policy, its export) of a tiny 'PPO run' with trained LoRA adapters."""
    torch.manual_seed(0)
    model = randomize_(GPT(CONFIG), seed=1)
    with torch.no_grad():  # adapters start as LoRA's do (B = 0): what they do, training put there
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.zero_()
    train_adapters(model)
    run_dir = tmp_path_factory.mktemp("run") / "ppo_run"
    save_model(model, str(run_dir / "final"), stage="ppo", preset=None)
    out = tmp_path_factory.mktemp("export") / "hf"
    export.main([str(run_dir), str(out)])
    return str(run_dir), model, str(out)


def test_the_adapters_carry_the_answers(policy):
    """The premise of the tests below: each prompt ends its own way, and only with the adapters."""
    _, model, _ = policy
    tok = get_tokenizer()
    ends, stops, runs_on = our_greedy(model, PROMPTS)
    assert ends[-1] == EOS_ID and tok.decode(ends[:-1]) == " The capital of France is Paris."
    assert tok.decode(stops) == " Sure, what do you need?" + STOP
    assert len(runs_on) == NEW and EOS_ID not in runs_on
    with lora_disabled(model):
        assert all(a != b for a, b in zip(our_greedy(model, PROMPTS), (ends, stops, runs_on)))


def test_transformers_generate_gives_our_tokens(policy):
    _, model, out = policy
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    enc = tok(PROMPTS, return_tensors="pt", padding=True)  # the exported tokenizer pads on the left
    with torch.no_grad():
        gen = hf.generate(**enc, do_sample=False, max_new_tokens=NEW, stop_strings=[STOP], tokenizer=tok)
    theirs = gen[:, enc["input_ids"].size(1):].tolist()
    for ours, row in zip(our_greedy(model, PROMPTS), theirs):
        assert row == ours + [EOS_ID] * (len(row) - len(ours))  # a finished row is padded with EOS


def test_transformers_defaults_stop_at_eos_and_need_no_tokenizer(policy):
    """generate with only the exported generation_config (greedy asked for): EOS ends an answer; the
    stop string is the caller's to pass, so generate works without a tokenizer."""
    _, model, out = policy
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([get_tokenizer().encode(ENDS)])
    with torch.no_grad():
        gen = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False)
    assert gen[0, ids.size(1):].tolist() == our_greedy(model, [ENDS], stop=False)[0]


def test_pipeline_gives_our_answers(policy):
    run_dir, model, out = policy
    chat = pipeline("text-generation", model=out)
    tok = get_tokenizer()
    ours = sample.sample(sample.load_policy(run_dir, None), PROMPTS, GenParams(max_new_tokens=NEW, temperature=0),
                         torch.device("cpu"))
    for prompt, tokens, answer in zip(PROMPTS, our_greedy(model, PROMPTS), ours):
        text = chat(prompt, do_sample=False, max_new_tokens=NEW, stop_sequence=STOP,
                    return_full_text=False)[0]["generated_text"]
        assert text == tok.decode([t for t in tokens if t != EOS_ID])  # the stop string is left in
        assert text.split(STOP)[0] == answer["text"]  # what sample.py prints
    sampled = chat(ENDS, max_new_tokens=4)[0]["generated_text"]  # the exported defaults: sampling
    assert sampled.startswith(ENDS) and len(sampled) > len(ENDS)


TEXTS = ["\n\nHuman: What's the capital of France?\n\nAssistant: Paris.", "  two  spaces\tand a tab\n\n\n",
         "naïve café, 東京, emoji 🙂 and a , spaced . stop ?", "I'll can't we've 1234567 3.14 $5", "<|endoftext|>",
         " a , b . c ! d ? e ' f"]


def test_exported_tokenizer_encodes_and_decodes_like_ours(policy, tmp_path):
    _, _, out = policy
    ours, theirs = get_tokenizer(), AutoTokenizer.from_pretrained(out)
    for text in TEXTS:
        ids = ours.encode(text)
        assert theirs.encode(text) == ids, text
        assert theirs.decode(ids) == ours.decode(ids) == text
    # what the prompts use: a typed-out "<|endoftext|>" is ordinary text
    text = TEXTS[-2] + " after"
    assert theirs(text, split_special_tokens=True)["input_ids"] == ours.encode(text, allow_special=False)
    assert (theirs.pad_token_id, theirs.eos_token_id, theirs.padding_side) == (EOS_ID, EOS_ID, "left")
    assert theirs.model_max_length == CONFIG.block_size
    # vocab.json + merges.txt alone (for tools that read the classic files) make the same tokenizer
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(os.path.join(out, name), tmp_path / name)
    classic = GPT2Tokenizer.from_pretrained(str(tmp_path))
    assert [classic.encode(t) for t in TEXTS] == [ours.encode(t) for t in TEXTS]


def test_config_says_what_serving_engines_read(policy):
    _, _, out = policy
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert config["architectures"] == ["GPT2LMHeadModel"] and config["model_type"] == "gpt2"
    assert (config["n_positions"], config["n_layer"], config["n_embd"]) == (128, 2, 64)
    with open(os.path.join(out, "tokenizer_config.json")) as f:
        # transformers 5 never cleans up spaces in a BPE decode; 4.x did where this was not False
        assert json.load(f)["clean_up_tokenization_spaces"] is False
    with open(os.path.join(out, "generation_config.json")) as f:
        gen = json.load(f)
    assert gen["eos_token_id"] == gen["pad_token_id"] == EOS_ID and "stop_strings" not in gen
    assert (gen["temperature"], gen["top_k"]) == (GenParams().temperature, GenParams().top_k)
    assert STOP.encode("unicode_escape").decode() in open(os.path.join(out, "README.md")).read()
    assert not [n for n in os.listdir(os.path.dirname(out)) if n != "hf"]  # no temporary directory left


def test_force_replaces_an_earlier_export(policy, tmp_path):
    run_dir, model, first = policy
    other = randomize_(GPT(CONFIG), seed=7).eval()
    save_model(other, str(tmp_path / "other" / "final"), stage="sft")
    out = tmp_path / "hf"
    out.mkdir()  # an empty directory is written into without --force
    export.main([run_dir, str(out)])
    export.main([str(tmp_path / "other"), str(out), "--force"])
    hf = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    ids = torch.tensor([get_tokenizer().encode(RUNS_ON)])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, other.logits(ids), atol=1e-4, rtol=0)
    assert sorted(os.listdir(tmp_path)) == ["hf", "other"]


@pytest.mark.parametrize("case", ["reward model", "value model", "missing", "not a run", "out not empty",
                                  "foreign file with --force", "out is a checkpoint", "out is a file"])
def test_bad_input_is_one_line_exit_2(policy, tmp_path, capsys, case):
    run_dir = policy[0]
    out = tmp_path / "out"
    if case == "reward model":
        save_model(RewardModel(CONFIG), str(tmp_path / "rm" / "final"), stage="rm")
        argv, needle = [str(tmp_path / "rm"), str(out)], "reward model"
    elif case == "value model":
        save_model(ValueModel(CONFIG), str(tmp_path / "critic"), stage="ppo")
        argv, needle = [str(tmp_path / "critic"), str(out)], "value model"
    elif case == "missing":
        argv, needle = [str(tmp_path / "missing"), str(out)], "not found"
    elif case == "not a run":
        (tmp_path / "data").mkdir()
        (tmp_path / "data" / "rows.jsonl").write_text("{}\n")
        argv, needle = [str(tmp_path / "data"), str(out)], "not a minChatGPT run"
    elif case == "out not empty":
        out.mkdir()
        (out / "config.json").write_text("{}")
        argv, needle = [run_dir, str(out)], "--force"
    elif case == "foreign file with --force":
        out.mkdir()
        (out / "config.json").write_text("{}")
        (out / "notes.txt").write_text("mine")
        argv, needle = [run_dir, str(out), "--force"], "notes.txt"
    elif case == "out is a checkpoint":
        out = os.path.join(run_dir, "final")
        argv, needle = [run_dir, out, "--force"], "checkpoint"
    else:
        out.write_text("a file")
        argv, needle = [run_dir, str(out)], "not a directory"
    before = sorted(os.listdir(out)) if os.path.isdir(out) else None
    with pytest.raises(SystemExit) as exit_:
        run_cli(lambda: export.main(argv))
    captured = capsys.readouterr()
    assert exit_.value.code == 2 and captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1 and needle in captured.err, captured.err
    assert (sorted(os.listdir(out)) if os.path.isdir(out) else None) == before  # nothing touched
