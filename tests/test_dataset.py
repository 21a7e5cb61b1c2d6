"""dataset.py: sources in every local format, HH parsing and drop counts, loss masks, truncation,
parts, DDP sharding, and one clear line for every kind of bad input. No network: the hub is
switched off (or pointed at a closed port) and the datasets cache lives in tmp_path."""
import csv
import gzip
import json
import os
import shutil
import time

import datasets
import huggingface_hub
import pytest
import torch

from common import UserError
from dataset import (
    PARTS,
    PreferenceDataset,
    PromptDataset,
    SFTDataset,
    collate_preference,
    collate_prompts,
    collate_sft,
    format_prompt,
    load_prompts,
    load_rows,
    part_of,
    shard_batches,
    split_transcript,
    synthetic_path,
)
from tokenizer import ENDOFTEXT, get_tokenizer

H, A = "\n\nHuman:", "\n\nAssistant:"
EOS = 50256
LONG = " ".join(["word"] * 200)  # 200 tokens

HH_ROWS = [
    {"chosen": f"{H} What is 2+2?{A} 4.", "rejected": f"{H} What is 2+2?{A} 5."},
    # multi-turn and unicode: the prompt keeps every earlier turn
    {"chosen": f"{H} Où est la gare? 🚉{A} Tout droit.{H} Merci — et après?{A} À gauche, 200 m.",
     "rejected": f"{H} Où est la gare? 🚉{A} Tout droit.{H} Merci — et après?{A} Je ne sais pas."},
    # "Assistant:" without the blank line before it is text, not a turn
    {"chosen": f"{H} Spell it{A} It is spelled Assistant: A-s-s.", "rejected": f"{H} Spell it{A} No."},
    {"chosen": f"{H} {LONG}{A} Short answer.", "rejected": f"{H} {LONG}{A} Other answer."},  # over-long
    {"chosen": f"{H} Hi{A} Hello.", "rejected": f"{H} Hey{A} Hello."},  # dropped: prompts differ
    {"chosen": f"{H} Name?{A} Bob.", "rejected": f"{H} Name?{A} Bob. "},  # dropped: identical responses
    {"chosen": f"{H} Anyone there?", "rejected": f"{H} Anyone there?"},  # dropped: no assistant turn
]
RM_STATIC_ROWS = [
    {"prompt": f"{H} Tell me a joke.{A}", "response": " Why did the chicken cross the road?",
     "chosen": " Why did the chicken cross the road?", "rejected": " No."},
    {"prompt": f"{H} Translate 'chat', «s'il vous plaît».{A}", "response": " Cat.", "chosen": " Cat.",
     "rejected": " Dog."},
    {"prompt": f"{H} Same?{A}", "response": " Yes.", "chosen": " Yes.", "rejected": " Yes."},  # dropped
]
KWISE_ROWS = [
    {"prompt": f"{H} Best colour?{A}", "responses": [" Blue, because the sky.", " Blue.", " Dunno."]},
    {"prompt": f"{H} 1+1?{A}", "responses": [" 2.", " 3.", " Eleven."]},
    {"prompt": f"{H} Dup?{A}", "responses": [" a", " b", " a"]},  # dropped: identical responses
]
PROMPT_ROWS = [  # fka/awesome-chatgpt-prompts: act, prompt (raw requests)
    {"act": "Linux Terminal", "prompt": 'I want you to act as a "linux terminal", reply only with output.\npwd'},
    {"act": "Poète", "prompt": "Écris un poème sur la mer, s'il te plaît 🌊 "},
    {"act": "Formatted", "prompt": f"{H} Already formatted?{A}"},
    {"act": "Duplicate", "prompt": 'I want you to act as a "linux terminal", reply only with output.\npwd'},
]


@pytest.fixture(autouse=True)
def hermetic(tmp_path, monkeypatch):
    """The datasets cache in tmp_path; the hub switched off unless a test switches it back on."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer()


def enc(text):
    return get_tokenizer().encode(text, allow_special=False)


def write(path, rows):
    """Rows in the file format named by the path's extension; returns the path as a string."""
    path = str(path)
    if path.endswith(".jsonl.gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    elif path.endswith(".jsonl"):
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    elif path.endswith(".json"):
        with open(path, "w", encoding="utf-8") as f:
            json.dump(rows, f, ensure_ascii=False, indent=1)
    elif path.endswith(".csv"):
        with open(path, "w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif path.endswith(".parquet"):
        datasets.Dataset.from_list(rows).to_parquet(path)
    else:
        raise ValueError(path)
    return path


def make_source(tmp_path, fmt, rows, name="data"):
    """`rows` as the training split of a source in local format `fmt`."""
    if fmt == "saved":
        path = tmp_path / f"{name}_saved"
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
        return str(path)
    if fmt == "saved_dict":
        path = tmp_path / f"{name}_saved_dict"
        datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                              "test": datasets.Dataset.from_list(rows[:1])}).save_to_disk(str(path))
        return str(path)
    if fmt == "hh_dir":  # <dir>/train.jsonl.gz and <dir>/test.jsonl.gz, as in the hh-rlhf repository
        path = tmp_path / f"{name}_hh_dir"
        path.mkdir()
        write(path / "train.jsonl.gz", rows)
        write(path / "test.jsonl.gz", rows[:1])
        return str(path)
    return write(tmp_path / f"{name}.{fmt}", rows)


def one_line_error(fn, *args, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and message.strip() == message
    return message


# -----------------------------------------------------------------------------
# HH transcripts


def test_split_transcript_at_the_last_assistant_turn():
    prompt, response = split_transcript(HH_ROWS[1]["chosen"])
    assert prompt == f"{H} Où est la gare? 🚉{A} Tout droit.{H} Merci — et après?{A}"
    assert response == " À gauche, 200 m."
    assert split_transcript(HH_ROWS[2]["chosen"]) == (f"{H} Spell it{A}", " It is spelled Assistant: A-s-s.")
    assert split_transcript(f"{H} Anyone there?") is None
    assert split_transcript(f"{H} Hi{A}") == (f"{H} Hi{A}", "")


def test_format_prompt_wraps_raw_text_only():
    assert format_prompt(" What is RLHF? \n") == f"{H} What is RLHF?{A}"
    assert format_prompt(f"{H} Hi{A} Hello.{H} Bye{A}") == f"{H} Hi{A} Hello.{H} Bye{A}"


def test_hh_pairs_split_dropped_and_counted(tok):
    ds = PreferenceDataset(HH_ROWS, tok, max_length=1024)
    assert json.loads(json.dumps(ds.stats)) == {  # saved with the run as it is
        "source": "<rows>", "part": None, "rows": 7, "kept": 4, "other_parts": 0, "truncated": 0,
        "dropped": {"prompts differ": 1, "identical responses": 1, "no assistant turn": 1}}
    assert len(ds) == 4
    assert ds.stats_line() == ("<rows>: read 7, kept 4, dropped 3 (identical responses: 1, no assistant turn: 1, "
                               "prompts differ: 1), truncated 0")
    prompt = f"{H} Où est la gare? 🚉{A} Tout droit.{H} Merci — et après?{A}"
    assert ds[1]["chosen_ids"].tolist() == enc(prompt) + enc(" À gauche, 200 m.") + [EOS]
    assert ds[1]["rejected_ids"].tolist() == enc(prompt) + enc(" Je ne sais pas.") + [EOS]
    assert ds[1]["chosen_ids"].dtype == torch.long
    # SFT reads the chosen transcript: only the row without an assistant turn is dropped
    sft = SFTDataset(HH_ROWS, tok, max_length=1024)
    assert (sft.stats["kept"], sft.stats["dropped"]) == (6, {"no assistant turn": 1})
    # prompts of the chosen transcripts
    assert load_prompts(HH_ROWS)[:2] == [f"{H} What is 2+2?{A}", prompt]


def test_rm_static_and_kwise_rows(tok):
    ds = PreferenceDataset(RM_STATIC_ROWS, tok, max_length=64)
    assert (ds.stats["kept"], ds.stats["dropped"]) == (2, {"identical responses": 1})
    assert ds[1]["rejected_ids"].tolist() == enc(RM_STATIC_ROWS[1]["prompt"] + " Dog.") + [EOS]
    sft = SFTDataset(RM_STATIC_ROWS, tok, max_length=64)  # prompt + response; identical pairs are fine for SFT
    row = RM_STATIC_ROWS[0]
    assert len(sft) == 3 and sft[0]["input_ids"].tolist() == enc(row["prompt"] + row["response"]) + [EOS]
    literal = SFTDataset([{"prompt": "Q", "response": f" a {ENDOFTEXT} b"}], tok, max_length=64)[0]["input_ids"]
    assert literal.tolist().count(EOS) == 1 and literal[-1] == EOS  # text from a file never makes a real EOS

    ranked = PreferenceDataset(KWISE_ROWS, tok, max_length=64)
    assert (ranked.stats["kept"], ranked.stats["dropped"]) == (2, {"identical responses": 1})
    item = ranked[0]
    assert set(item) == {"ranked_ids"} and len(item["ranked_ids"]) == 3
    assert [s.tolist() for s in item["ranked_ids"]] == [enc(KWISE_ROWS[0]["prompt"] + r) + [EOS]
                                                         for r in KWISE_ROWS[0]["responses"]]
    batch = collate_preference([ranked[0], ranked[1]])
    T = max(len(s) for i in range(2) for s in ranked[i]["ranked_ids"])
    assert batch["ranked_ids"].shape == batch["ranked_mask"].shape == (2, 3, T)
    assert batch["ranked_mask"][1, 2].sum() == len(ranked[1]["ranked_ids"][2])
    assert torch.equal(batch["ranked_ids"][1, 2, :len(ranked[1]["ranked_ids"][2])], ranked[1]["ranked_ids"][2])


# -----------------------------------------------------------------------------
# Every local format reads the same rows


FORMATS = ["jsonl", "jsonl.gz", "json", "csv", "parquet", "saved", "saved_dict", "hh_dir"]


def same_items(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            xs, ys = (x[k], y[k]) if isinstance(x[k], list) else ([x[k]], [y[k]])
            assert all(torch.equal(u, v) if torch.is_tensor(u) else u == v for u, v in zip(xs, ys))


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_local_format(tmp_path, tok, fmt):
    hh = make_source(tmp_path, fmt, HH_ROWS, "hh")
    assert load_rows(hh).to_list() == HH_ROWS
    pairs = PreferenceDataset(hh, tok, max_length=48)
    same_items([pairs[i] for i in range(len(pairs))], [PreferenceDataset(HH_ROWS, tok, 48)[i] for i in range(4)])
    assert pairs.stats["dropped"] == {"prompts differ": 1, "identical responses": 1, "no assistant turn": 1}
    sft = SFTDataset(hh, tok, max_length=48)
    reference = SFTDataset(HH_ROWS, tok, max_length=48)
    same_items([sft[i] for i in range(len(sft))], [reference[i] for i in range(len(reference))])

    rm = PreferenceDataset(make_source(tmp_path, fmt, RM_STATIC_ROWS, "rm"), tok, max_length=48)
    same_items([rm[0], rm[1]], [PreferenceDataset(RM_STATIC_ROWS, tok, 48)[i] for i in range(2)])
    if fmt != "csv":  # a CSV cell cannot hold a list
        ranked = PreferenceDataset(make_source(tmp_path, fmt, KWISE_ROWS, "kwise"), tok, max_length=48)
        same_items([ranked[0], ranked[1]], [PreferenceDataset(KWISE_ROWS, tok, 48)[i] for i in range(2)])

    prompts = PromptDataset(make_source(tmp_path, fmt, PROMPT_ROWS, "prompts"), tok, max_length=48)
    assert prompts.prompts == load_prompts(PROMPT_ROWS) == [
        f"{H} {PROMPT_ROWS[0]['prompt']}{A}", f"{H} Écris un poème sur la mer, s'il te plaît 🌊{A}",
        f"{H} Already formatted?{A}"]
    assert prompts.stats["dropped"] == {"duplicate prompt": 1}


def test_directory_split_selects_the_file(tmp_path, tok):
    hh = make_source(tmp_path, "hh_dir", HH_ROWS)
    assert load_rows(hh, split="test").to_list() == HH_ROWS[:1]
    saved = make_source(tmp_path, "saved_dict", HH_ROWS)
    assert load_rows(saved, split="test").to_list() == HH_ROWS[:1]
    assert PreferenceDataset(hh, tok, 64, split="test").stats_line().startswith(f"{hh} [test]: read 1, kept 1")
    # a clone of the whole hh-rlhf repository: every <subset>/train.jsonl.gz
    root = tmp_path / "hh-rlhf"
    for subset, rows in [("harmless-base", HH_ROWS[:3]), ("helpful-base", HH_ROWS[3:])]:
        (root / subset).mkdir(parents=True)
        write(root / subset / "train.jsonl.gz", rows)
        write(root / subset / "test.jsonl.gz", rows[:1])
    assert load_rows(root).to_list() == HH_ROWS
    assert load_rows(root, split="test").to_list() == [HH_ROWS[0], HH_ROWS[3]]


# -----------------------------------------------------------------------------
# SFT: loss masks, truncation, packing


def test_sft_loss_on_response_and_eos_only(tok):
    ds = SFTDataset(HH_ROWS, tok, max_length=1024)
    p, r = enc(f"{H} Où est la gare? 🚉{A} Tout droit.{H} Merci — et après?{A}"), enc(" À gauche, 200 m.")
    item = ds[1]
    assert item["input_ids"].tolist() == p + r + [EOS]
    assert item["loss_mask"].tolist() == [0] * len(p) + [1] * (len(r) + 1)  # the earlier answer is context
    whole = SFTDataset(HH_ROWS, tok, max_length=1024, train_on_prompt=True)[1]
    assert torch.equal(whole["input_ids"], item["input_ids"])
    assert whole["loss_mask"].tolist() == [0] + [1] * (len(p) + len(r))

    batch = collate_sft([ds[0], ds[1]])
    T = len(item["input_ids"])
    n0 = len(ds[0]["input_ids"])
    assert batch["input_ids"].shape == batch["attention_mask"].shape == batch["loss_mask"].shape == (2, T)
    assert batch["attention_mask"][0].tolist() == [1] * n0 + [0] * (T - n0)  # right padded
    assert batch["loss_mask"][0, n0:].sum() == 0
    assert batch["input_ids"][0, n0 - 1] == EOS and batch["attention_mask"][0, n0 - 1] == 1  # a real EOS


def test_sft_truncation_cuts_the_prompt_from_the_left(tok):
    ds = SFTDataset([HH_ROWS[3]], tok, max_length=32)
    p, r = enc(f"{H} {LONG}{A}"), enc(" Short answer.")
    item = ds[0]
    assert item["input_ids"].tolist() == p[-(32 - len(r) - 1):] + r + [EOS]
    assert item["loss_mask"].tolist() == [0] * (32 - len(r) - 1) + [1] * (len(r) + 1)
    assert ds.stats["truncated"] == 1


def test_sft_response_longer_than_max_length_keeps_its_beginning_without_eos(tok):
    ds = SFTDataset([{"prompt": "Say many words", "response": " " + LONG}], tok, max_length=16)
    p, r = enc(format_prompt("Say many words")), enc(" " + LONG)
    assert ds[0]["input_ids"].tolist() == p[-1:] + r[:15]  # no EOS: the answer did not end here
    assert ds[0]["loss_mask"].tolist() == [0] + [1] * 15


@pytest.mark.parametrize("train_on_prompt", [False, True])
def test_sft_packing_concatenates_into_blocks(tok, train_on_prompt):
    rows = RM_STATIC_ROWS + [{"prompt": "Q", "response": " A"}] * 3
    plain = SFTDataset(rows, tok, max_length=32, train_on_prompt=train_on_prompt)
    assert plain.stats["truncated"] == 0
    packed = SFTDataset(rows, tok, max_length=32, train_on_prompt=train_on_prompt, pack=True)
    stream = torch.cat([plain[i]["input_ids"] for i in range(len(plain))])
    masks = torch.cat([plain[i]["loss_mask"] for i in range(len(plain))])
    assert len(packed) == -(-len(stream) // 32) and len(packed) < len(plain)
    assert [len(packed[i]["input_ids"]) for i in range(len(packed) - 1)] == [32] * (len(packed) - 1)
    assert torch.equal(torch.cat([packed[i]["input_ids"] for i in range(len(packed))]), stream)
    if train_on_prompt:
        assert masks[32] == 1
    masks[::32] = 0  # a block's first token is predicted from nothing
    assert torch.equal(torch.cat([packed[i]["loss_mask"] for i in range(len(packed))]), masks)


# -----------------------------------------------------------------------------
# Preference and prompt truncation


def test_preference_truncation_keeps_the_end_of_each_response(tok):
    # a long prompt: both responses keep the same prompt tail, and their whole response + EOS
    ds = PreferenceDataset([HH_ROWS[3]], tok, max_length=24)
    p, rc, rr = enc(f"{H} {LONG}{A}"), enc(" Short answer."), enc(" Other answer.")
    room = 24 - max(len(rc), len(rr)) - 1
    assert ds[0]["chosen_ids"].tolist() == p[-room:] + rc + [EOS]
    assert ds[0]["rejected_ids"].tolist() == p[-room:] + rr + [EOS]
    assert ds.stats["truncated"] == 1
    # a response longer than max_length keeps its end, EOS included
    row = {"prompt": f"{H} Q{A}", "chosen": " " + LONG + " THE END", "rejected": " Short."}
    ds = PreferenceDataset([row], tok, max_length=16)
    assert ds[0]["chosen_ids"].tolist() == (enc(" " + LONG + " THE END") + [EOS])[-16:]
    assert ds[0]["rejected_ids"].tolist() == enc(" Short.") + [EOS]
    batch = collate_preference([ds[0]])
    assert batch["chosen_ids"].shape == batch["rejected_ids"].shape == (1, 16)  # one width for both
    assert batch["rejected_mask"].tolist() == [[1] * len(enc(" Short.") + [EOS]) + [0] * (16 - 3)]


def test_prompts_truncate_from_the_left_and_pad_on_the_left(tok):
    long_prompt = f"{H} {LONG}{A}"
    ds = PromptDataset([{"prompt": long_prompt}, {"prompt": "Hi"}], tok, max_length=10)
    assert ds[0]["prompt_ids"].tolist() == enc(long_prompt)[-10:] and ds[0]["prompt"] == long_prompt
    assert ds.stats["truncated"] == 1
    batch = collate_prompts([ds[0], ds[1]])
    n = len(enc(format_prompt("Hi")))
    assert batch["input_ids"][1, -n:].tolist() == enc(format_prompt("Hi"))
    assert batch["attention_mask"].tolist() == [[1] * 10, [0] * (10 - n) + [1] * n]
    assert batch["prompts"] == [long_prompt, format_prompt("Hi")]
    assert load_prompts(PROMPT_ROWS, limit=2) == load_prompts(PROMPT_ROWS)[:2]
    assert PromptDataset(PROMPT_ROWS, tok, 64, limit=1).stats["rows"] == 1


# -----------------------------------------------------------------------------
# Parts and sharding


def test_parts_are_disjoint_whatever_file_they_come_from(tmp_path, tok):
    questions = [f"{H} question {i}?{A}" for i in range(300)]
    hh = write(tmp_path / "hh.jsonl", [{"chosen": q + " yes", "rejected": q + " no"} for q in questions])
    rm = write(tmp_path / "rm.csv", [{"prompt": q, "chosen": " yes", "rejected": " no"} for q in questions])
    parts = {part: set(load_prompts(hh, part=part)) for part in PARTS}
    assert set().union(*parts.values()) == set(questions)
    assert sum(map(len, parts.values())) == 300  # disjoint
    assert [len(parts[p]) for p in PARTS] == [126, 122, 52]  # shares 0.4 / 0.4 / 0.2
    assert set(load_prompts(rm, part="rm")) == parts["rm"]  # keyed on the prompt, not the file
    reward = PreferenceDataset(rm, tok, 64, part="rm")
    assert (reward.stats["kept"], reward.stats["other_parts"]) == (122, 178)
    assert "178 in parts other than 'rm'" in reward.stats_line()
    ppo = PromptDataset(hh, tok, 64, part="ppo")
    assert set(ppo.prompts) == parts["ppo"] and not set(ppo.prompts) & set(load_prompts(rm, part="rm"))
    # sha256 of the text, not Python's per-process hash(): pinned values
    assert [part_of(q) for q in questions[:9]] == ["rm", "sft", "rm", "sft", "rm", "ppo", "sft", "rm", "ppo"]
    assert part_of(f"{H} question  0? {A}") == part_of(questions[0])  # runs of whitespace do not matter


def test_shard_batches_for_ddp():
    kw = dict(batch_size=4, epoch=3, seed=7)
    ranks = [shard_batches(37, rank=r, world_size=2, **kw) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 4  # 37 // (4 * 2) full steps
    seen = [sum(batches, []) for batches in ranks]
    assert all(len(b) == 4 for batches in ranks for b in batches)
    assert not set(seen[0]) & set(seen[1]) and len(set(seen[0]) | set(seen[1])) == 32
    assert ranks[0] == shard_batches(37, rank=0, world_size=2, **kw)  # deterministic in (seed, epoch)
    assert shard_batches(37, rank=0, world_size=2, batch_size=4, epoch=4, seed=7) != ranks[0]
    assert shard_batches(37, rank=0, world_size=2, batch_size=4, epoch=3, seed=8) != ranks[0]
    # drop_last=False: every example, equal batch counts, at most world_size - 1 repeats
    ranks = [shard_batches(37, rank=r, world_size=2, drop_last=False, **kw) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 5 and len(ranks[0][-1]) == len(ranks[1][-1]) == 3
    seen = sum(ranks[0], []) + sum(ranks[1], [])
    assert set(seen) == set(range(37)) and len(seen) == 38
    assert shard_batches(5, 2, epoch=0, seed=0, shuffle=False, drop_last=False) == [[0, 1], [2, 3], [4]]
    assert "do not fill one batch" in one_line_error(shard_batches, 7, 4, epoch=0, seed=0, world_size=2)


# -----------------------------------------------------------------------------
# Bad input: one clear line, never a traceback or an empty dataset


def test_missing_file_and_unreadable_kinds(tmp_path, tok):
    missing = str(tmp_path / "nope.jsonl")
    assert one_line_error(SFTDataset, missing, tok, 64) == f"file not found: {missing}"
    assert one_line_error(load_rows, "./data/nope") == "file not found: ./data/nope"
    txt = tmp_path / "rows.txt"
    txt.write_text("hello\n")
    assert "cannot read" in one_line_error(load_rows, str(txt)) and ".jsonl.gz" in one_line_error(load_rows, str(txt))
    corrupt = tmp_path / "corrupt.jsonl.gz"
    corrupt.write_bytes(gzip.compress(b'{"prompt": "a"}\n' * 50)[:30])
    assert one_line_error(load_rows, str(corrupt)).startswith(f"{corrupt}: cannot read the file (")
    not_parquet = tmp_path / "rows.parquet"
    not_parquet.write_text("prompt\nhello\n")
    assert one_line_error(load_rows, str(not_parquet)).startswith(f"cannot read {not_parquet} as parquet: ArrowInvalid")
    empty_dir = tmp_path / "empty_dir"
    empty_dir.mkdir()
    assert f"{empty_dir} has no train data: expected train.jsonl.gz" in one_line_error(load_rows, str(empty_dir))
    saved = make_source(tmp_path, "saved_dict", HH_ROWS)
    message = one_line_error(load_rows, saved, split="validation")
    assert message == f"{saved} has no split 'validation' (it has train, test)"


def test_hub_unreachable_fails_fast_with_a_way_out(tok):
    for name in ["Anthropic/hh-rlhf:helpful-base", "nobody/no-such-dataset"]:
        start = time.time()
        message = one_line_error(SFTDataset, name, tok, 64)
        assert time.time() - start < 5
        assert message.startswith(f"'{name}' is not a local file or directory and the Hugging Face hub is unreachable")
        assert "HF_HUB_OFFLINE is set" in message and "pass its path" in message
    assert "subsets: helpful-base, harmless-base" in one_line_error(load_rows, "Anthropic/hh-rlhf:helpful")


def test_hub_probe_fails_fast_without_offline_mode(monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    start = time.time()
    message = one_line_error(load_rows, "Dahoas/rm-static", split="test")
    assert time.time() - start < 10  # one quick probe, not datasets' retries
    assert "'Dahoas/rm-static' is not a local file or directory and the Hugging Face hub is unreachable" in message
    assert "test.jsonl.gz" in message and "set HF_HUB_OFFLINE=1 to use a copy already cached" in message


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_malformed_json_line_names_file_and_line(tmp_path, tok, suffix):
    lines = [json.dumps(r) for r in HH_ROWS[:2]] + ['{"chosen": "x", "rejected": '] + [json.dumps(HH_ROWS[0])]
    path = str(tmp_path / f"bad{suffix}")
    with (gzip.open if suffix.endswith(".gz") else open)(path, "wt") as f:
        f.write("\n".join(lines) + "\n")
    message = one_line_error(PreferenceDataset, path, tok, 64)
    assert message.startswith(f"{path}, line 3: malformed JSON (")
    path = write(tmp_path / "list.jsonl", HH_ROWS[:1])
    with open(path, "a") as f:
        f.write("[1, 2]\n")
    assert one_line_error(load_rows, path) == f"{path}, line 2: expected one JSON object per line, found list"


def test_malformed_json_array_names_the_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n {"prompt": "a"},\n {"prompt": "b"\n]\n')
    assert one_line_error(load_rows, str(path)).startswith(f"{path}, line 4: malformed JSON (")


def test_malformed_csv_names_the_line(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text('act,prompt\nA,"hello"\nB,"hi",extra,fields\n')
    message = one_line_error(load_prompts, str(path))
    assert message.startswith(f"cannot read {path} as csv: ParserError:") and "line 3" in message


def test_non_utf8_bytes_name_file_and_line(tmp_path):
    for suffix, content in [(".jsonl", b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n'),
                            (".csv", b'act,prompt\nA,ok\nB,caf\xe9\n')]:
        path = tmp_path / f"latin1{suffix}"
        path.write_bytes(content)
        line = 2 if suffix == ".jsonl" else 3
        column = content.splitlines()[line - 1].index(0xE9) + 1
        assert one_line_error(load_prompts, str(path)) == (
            f"{path}, line {line}: not UTF-8 text (byte 0xe9 at column {column}); save it as UTF-8")


def test_missing_columns_say_which_and_what_exists(tmp_path, tok):
    path = write(tmp_path / "half.jsonl", [{"prompt": "p", "chosen": " c"}])
    assert one_line_error(PreferenceDataset, path, tok, 64) == (
        f"{path}: missing column rejected for preference rows (they need prompt+responses or "
        "prompt+chosen+rejected or chosen+rejected); columns found: prompt, chosen")
    path = write(tmp_path / "other.csv", [{"question": "q", "answer": "a"}])
    assert one_line_error(load_prompts, path) == (
        f"{path}: missing column prompt for prompts rows (they need prompt or chosen); columns found: question, answer")
    path = write(tmp_path / "typed.jsonl", [{"prompt": "q"}, {"prompt": 5}])
    assert one_line_error(load_prompts, path) == f"{path}: row 2: column 'prompt' should hold text, not '5'"


def test_no_usable_examples_is_an_error_not_an_empty_dataset(tmp_path, tok):
    path = write(tmp_path / "useless.jsonl", HH_ROWS[4:])
    assert one_line_error(PreferenceDataset, path, tok, 64) == (
        f"no usable examples: {path}: read 3, kept 0, dropped 3 (identical responses: 1, no assistant turn: 1, "
        "prompts differ: 1), truncated 0")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert one_line_error(load_rows, str(empty)) == f"{empty} has no rows"
    header_only = tmp_path / "header.csv"
    header_only.write_text("act,prompt\n")
    assert one_line_error(load_prompts, str(header_only)) == f"{header_only} has no rows"
    assert part_of(f"{H} What is 2+2?{A}") == "sft"
    assert one_line_error(SFTDataset, HH_ROWS[:1], tok, 64, part="ppo") == (
        "no usable examples: <rows>: read 1, kept 0, dropped 0, 1 in parts other than 'ppo', truncated 0")


def test_other_bad_arguments(tok):
    assert one_line_error(SFTDataset, HH_ROWS, tok, 64, part="val") == "unknown part 'val'; parts: sft, rm, ppo"
    rows = KWISE_ROWS[:1] + [{"prompt": "q", "responses": [" a", " b"]}]
    assert "rows rank different numbers of responses ([2, 3])" in one_line_error(PreferenceDataset, rows, tok, 64)
    assert one_line_error(SFTDataset, HH_ROWS, tok, 1) == "max_length must be at least 2, got 1"


def test_synthetic_files_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """synthetic:NAME generates the task's files once, through a temporary directory: a write that
    fails leaves nothing in the cache, and a copy another process finished first is the one kept."""
    import task
    cache = tmp_path / "minchatgpt"  # tmp_path also holds the datasets cache
    monkeypatch.setenv("MINCHATGPT_CACHE", str(cache))
    calls = []

    def write(out_dir, text="ours", fail=False):  # stands in for task.write_task_data (seconds of work)
        calls.append(out_dir)
        os.makedirs(out_dir)
        for name in task.SPLITS:
            with open(os.path.join(out_dir, name + ".jsonl"), "w") as f:
                f.write(json.dumps({"prompt": text}) + "\n")
        if fail:
            raise OSError("disk full")

    monkeypatch.setattr(task, "write_task_data", write)
    path = synthetic_path("synthetic:ppo_prompts")
    out = os.path.dirname(path)
    assert os.listdir(cache) == [os.path.basename(out)] and load_rows(path)["prompt"] == ["ours"]
    assert os.path.dirname(synthetic_path("synthetic:sft")) == out and len(calls) == 1  # made once
    assert one_line_error(load_rows, "synthetic:nope").startswith("unknown synthetic file 'nope'")

    shutil.rmtree(out)
    monkeypatch.setattr(task, "write_task_data", lambda d: write(d, fail=True))
    with pytest.raises(OSError, match="disk full"):
        synthetic_path("synthetic:sft")
    assert os.listdir(cache) == []  # no half-written directory, under any name

    def race(d):  # another process finishes `out` while this one is still writing
        write(out, text="theirs")
        write(d)

    monkeypatch.setattr(task, "write_task_data", race)
    assert synthetic_path("synthetic:sft") == os.path.join(out, "sft.jsonl")
    assert os.listdir(cache) == [os.path.basename(out)] and load_rows(path)["prompt"] == ["theirs"]
