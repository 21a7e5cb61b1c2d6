"""judges.py: reading a chat judge's verdict, finding its API key, and a reward-model judge that reads an
answer exactly as the reward model was trained to. (The chat judge against a live server, and the judges
inside whole comparisons, are tested in test_evaluate.py.)"""
import json

import pytest
import torch
from conftest import randomize_

from common import UserError
from configs import ModelConfig
from dataset import PreferenceDataset, collate_preference
from gpt import RewardModel, gather_last
from judges import api_key, parse_verdict, rm_scores
from tokenizer import get_tokenizer

SECRET = "sk-test-0123456789abcdefSECRET"


@pytest.mark.parametrize("reply, verdict", [
    ("[[A]]", "A"), ("Reasoning...\n\n[[B]]", "B"), ("**[[ Tie ]]**", "tie"), ("verdict: [[a]].", "A"),
    ("Not [[A]] at first sight, but on reflection [[B]]", "B"), ("B", "B"), ("**Tie**", "tie"),
    ("Answer A is better.", "A"), ("", None), ("I cannot decide.", None), ("A or B", None), ("[[C]]", None),
    ("It's a tie.", "tie"), ("Both are equally good", "tie"), ("Both answers are equally bad.", "tie"),
    ("Neither is better.", "tie"), ("I choose B", "B"), ("I prefer answer A.", "A"), ("Response B", "B"),
    ("B is better.", "B"), ("I choose A, no wait, I choose B", None), ("Answer A is a tie with B", None),
    ("Answer B is better because " + "it explains more " * 5 + "than answer A", None),
])
def test_parse_verdict(reply, verdict):
    assert parse_verdict(reply) == verdict


def test_key_file(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "openai.key").write_text(json.dumps({"OPENAI_API_KEY": SECRET}))
    assert api_key() == SECRET  # the original's file, found in the current directory
    (tmp_path / "bad.key").write_text(json.dumps({"api_key": SECRET}))
    with pytest.raises(UserError) as e:
        api_key(str(tmp_path / "bad.key"))
    assert SECRET not in str(e.value)
    monkeypatch.setenv("OPENAI_API_KEY", "from-env")
    assert api_key() == "from-env" and api_key(str(tmp_path / "openai.key")) == SECRET


def test_rm_scores_equal_the_scores_of_the_training_path():
    """The reward model must score an answer at evaluation as it scored the same text in training:
    PreferenceDataset item -> collate_preference -> the (2B, T) right-padded forward -> gather_last.
    In each pair both responses have the same number of tokens, so the pair's shared prompt cut is
    also each response's own cut (rm_scores sees one response at a time)."""
    block = 32
    tok = get_tokenizer()
    rm = randomize_(RewardModel(ModelConfig(n_layer=2, n_head=4, n_embd=64, block_size=block)), std=0.05).eval()
    short = "\n\nHuman: Hi.\n\nAssistant:"  # 10 tokens
    long = "\n\nHuman: " + "Tell me more, please. " * 8 + "\n\nAssistant:"  # 57 tokens
    rows = [
        {"prompt": short, "chosen": " Yes.", "rejected": " No."},  # 10 + 2 + EOS: fits
        {"prompt": long, "chosen": " Yes.", "rejected": " No."},  # the prompt keeps its last 29 tokens
        {"prompt": long, "chosen": " cat" * 20, "rejected": " dog" * 20},  # the prompt keeps its last 11
        {"prompt": short, "chosen": " cat" * 40, "rejected": " dog" * 40},  # no prompt; the response's end
    ]
    for r in rows:
        assert len(tok.encode(r["chosen"])) == len(tok.encode(r["rejected"]))
    data = PreferenceDataset(rows, tok, max_length=block)
    assert len(data) == 4 and data.stats["truncated"] == 3
    batch = collate_preference([data[i] for i in range(len(data))])
    ids = torch.cat([batch["chosen_ids"], batch["rejected_ids"]])  # (2B, T), right padded
    mask = torch.cat([batch["chosen_mask"], batch["rejected_mask"]])
    with torch.no_grad():
        trained = gather_last(rm(ids), mask).tolist()  # (2B,) as the RM trainer reads its scores

    prompts = [r["prompt"] for r in rows] * 2
    scored = rm_scores(rm, prompts, [r["chosen"] for r in rows] + [r["rejected"] for r in rows], batch_size=3)
    assert scored == pytest.approx(trained, abs=1e-5)
    assert len({round(s, 4) for s in scored}) == 8  # a model whose scores tell the texts apart
