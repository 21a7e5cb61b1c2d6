"""Data for every stage: where rows come from, how HH dialogues become (prompt, response), and the
datasets, collate functions and DDP batches the trainers use.

Sources (`load_rows`), all read by Hugging Face `datasets`:
- a hub name, `owner/name` or `owner/name:subset` (the subset is the hub repository's data_dir, e.g.
  `Anthropic/hh-rlhf:helpful-base`); `split` picks train or test;
- a local `.jsonl`, `.jsonl.gz`, `.json`, `.csv` or `.parquet` file: the whole file is one split, so
  `split` is ignored;
- a directory written by `save_to_disk` (`split` picks from a DatasetDict), or a directory laid out like
  the hh-rlhf repository: `<dir>/<split>.jsonl.gz` (or .jsonl, .json, .csv, .parquet), else every
  `<dir>/<subset>/<split>.jsonl.gz`, which is what the hub serves as the full Anthropic/hh-rlhf.
Row schemas are listed in docs/INTERFACES.md; `SCHEMAS` says which columns each dataset reads.

An HH transcript `"\\n\\nHuman: ...\\n\\nAssistant: ..."` splits at its *last* `"\\n\\nAssistant:"`: the
prompt is everything up to and including it (all earlier turns), the response is the rest. A pair
whose two transcripts do not share that prompt, whose responses are identical, or that has no
assistant turn is dropped and counted in the dataset's `.stats`.

How the data is split
  Every prompt belongs to exactly one *part*: `sft`, `rm` or `ppo` (shares 0.4 / 0.4 / 0.2, `PARTS`).
  The part is decided by the prompt's own text (runs of whitespace collapsed): the first 8 bytes of
  its sha256, read as a fraction of 2**64, fall into [0, 0.4), [0.4, 0.8) or [0.8, 1). It is a
  property of the prompt, not of the file or of the row order, so `part="ppo"` keeps only prompts
  that `part="rm"` never sees, even when the reward model and PPO read the same HH file (the
  original drew its PPO prompts from the reward model's own training data). All responses to a
  prompt go with it. The hub's test splits stay for evaluation.

Text from data files is tokenized as ordinary text: a literal "<|endoftext|>" inside a dialogue is
not turned into a real EOS. Token sequences are kept as flat int32 arrays plus offsets (compact, and
cheap to share with DataLoader workers); items are built as LongTensors on access.
"""
import codecs
import contextlib
import glob
import gzip
import hashlib
import json
import os
import re
import zlib
from typing import List, Optional, Tuple

import datasets
import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence

from common import UserError, atomic_path, is_interactive
import task
from tokenizer import ASSISTANT, format_prompt, pad_batch

SYNTHETIC = "synthetic:"  # prefix of the built-in task's files, e.g. synthetic:sft
PARTS = {"sft": 0.4, "rm": 0.4, "ppo": 0.2}  # share of prompts in each part; see "How the data is split"
HH_SUBSETS = ("helpful-base", "harmless-base", "helpful-online", "helpful-rejection-sampled")
BROKEN_FILE = (OSError, EOFError, zlib.error)  # what reading a corrupt or truncated (.gz) file raises
NUL_NAME = "a column name holds a NUL byte"  # datasets and pyarrow disagree on where such a name ends
BUILDERS = {".jsonl.gz": "json", ".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}

# Columns each dataset reads, first match wins (rm-static rows have prompt, response, chosen, rejected).
SCHEMAS = {
    "sft": [("prompt", "response"), ("prompt", "chosen"), ("chosen",)],
    "preference": [("prompt", "responses"), ("prompt", "chosen", "rejected"), ("chosen", "rejected")],
    "prompts": [("prompt",), ("chosen",)],
}

# -----------------------------------------------------------------------------
# Sources


def load_rows(source, split: str = "train") -> datasets.Dataset:
    """Rows of a local file or directory, or of a hub dataset (see the module docstring). A path that
    exists is always read locally; `owner/name` that does not exist locally goes to the hub;
    `synthetic:NAME` is a file of the built-in synthetic task (`synthetic_path`)."""
    source = os.fspath(source)
    if source.startswith(SYNTHETIC):
        source = synthetic_path(source)
    if os.path.isdir(source):
        if any(os.path.exists(os.path.join(source, f)) for f in ("dataset_dict.json", "state.json")):
            return _load_saved(source, split)
        return _load_files(_split_files(source, split))
    if os.path.isfile(source):
        return _load_files([source])
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w.-]+)?", source) and not _builder(source, strict=False):
        return _load_hub(source, split)
    raise UserError(f"file not found: {source}")


def synthetic_path(source: str) -> str:
    """`synthetic:NAME` -> the path of file NAME (one of task.SPLITS: sft, sft_test, rm_train, ...) of
    the synthetic task (src/task.py) with its default seed and sizes. The files are generated once
    into $MINCHATGPT_CACHE (default ~/.cache/minchatgpt) under a name that changes with task.py's
    source, so an edit to the task never reads stale data."""
    name = source[len(SYNTHETIC):]
    if name not in task.SPLITS:
        raise UserError(f"unknown synthetic file {name!r}; known: {', '.join(task.SPLITS)}")
    with open(task.__file__, "rb") as f:
        version = hashlib.sha256(f.read()).hexdigest()[:12]
    root = os.environ.get("MINCHATGPT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "minchatgpt")
    out = os.path.join(root, f"synthetic-{version}")
    if not os.path.isdir(out):
        try:
            with atomic_path(out) as tmp:  # the directory is complete or absent
                task.write_task_data(tmp)
        except OSError:
            if not os.path.isdir(out):  # no other process made it first: a real failure
                raise
    return os.path.join(out, name + ".jsonl")


def _builder(path: str, strict: bool = True) -> Optional[str]:
    """The `datasets` loader for a file, by its extension."""
    for ext, builder in BUILDERS.items():
        if path.endswith(ext):
            return builder
    if strict:
        raise UserError(f"cannot read {path}: use a {', '.join(BUILDERS)} file or a directory")
    return None


def _split_files(directory: str, split: str) -> List[str]:
    """`<dir>/<split>.<ext>`, else `<dir>/*/<split>.<ext>` (a clone of the hh-rlhf repository)."""
    for pattern in [split + ext for ext in BUILDERS] + [os.path.join("*", split + ext) for ext in BUILDERS]:
        files = sorted(glob.glob(os.path.join(glob.escape(directory), pattern)))
        if files:
            return files
    raise UserError(f"{directory} has no {split} data: expected {split}.jsonl.gz (or .jsonl, .json, .csv, "
                    f".parquet), <subset>/{split}.jsonl.gz as in the hh-rlhf repository, or a save_to_disk directory")


@contextlib.contextmanager
def _quiet_datasets():
    """`datasets` logs its own error line before raising; ours replaces it (one line, no traceback).
    Its progress bars show on a terminal only, as ours do (common.is_interactive)."""
    level, bars_were_off = datasets.logging.get_verbosity(), datasets.utils.are_progress_bars_disabled()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    if not is_interactive():
        datasets.utils.disable_progress_bars()
    try:
        yield
    finally:
        datasets.logging.set_verbosity(level)
        if not bars_were_off:
            datasets.utils.enable_progress_bars()


def _load_files(files: List[str]) -> datasets.Dataset:
    builder = _builder(files[0])
    if builder == "json":
        for path in files:
            _check_json_rows(path)
    try:
        options = _csv_options(files[0]) if builder == "csv" else {}
        with _quiet_datasets():
            rows = datasets.load_dataset(builder, data_files=files, split="train", **options)
        rows.data.table.validate(full=True)  # the json loader lets invalid UTF-8 through; this catches it
    except UserError:
        raise
    except Exception as e:  # any failure to read a user's file is reported as a user error
        raise _read_error(files, builder, e) from None
    return rows


def _csv_options(path: str) -> dict:
    """Every column of a CSV file as the text in it, and every line a row: pandas alone would turn a
    column of numbers into numbers (the answer "4" into 4, or 4.0 next to an empty cell), cells such as
    "NA" or "None" into missing values, and skip a line of blanks without counting it."""
    import pandas as pd

    names = pd.read_csv(path, nrows=0, encoding="utf-8").columns
    if any("\0" in name for name in names):
        raise UserError(f"{path}, line 1: {NUL_NAME}")
    features = datasets.Features({name: datasets.Value("string") for name in names})
    return {"features": features, "keep_default_na": False, "skip_blank_lines": False}


def _load_saved(directory: str, split: str) -> datasets.Dataset:
    try:
        rows = datasets.load_from_disk(directory)
    except Exception as e:
        raise UserError(f"cannot read the save_to_disk directory {directory}: {_one_line(e)}") from None
    if isinstance(rows, datasets.DatasetDict):
        if split not in rows:
            raise UserError(f"{directory} has no split {split!r} (it has {', '.join(rows)})")
        rows = rows[split]
    return rows


def _load_hub(name: str, split: str) -> datasets.Dataset:
    repo, _, subset = name.partition(":")
    if repo == "Anthropic/hh-rlhf" and subset and subset not in HH_SUBSETS:
        raise UserError(f"unknown subset {subset!r} of {repo}; subsets: {', '.join(HH_SUBSETS)}")
    offline = datasets.config.HF_HUB_OFFLINE
    why = None if offline else _check_hub(repo)
    if why is None:
        try:
            with _quiet_datasets():
                return datasets.load_dataset(repo, data_dir=subset or None, split=split)
        except ConnectionError as e:
            why = "HF_HUB_OFFLINE is set and no copy is in the datasets cache" if offline else _one_line(e)
        except Exception as e:
            raise UserError(f"cannot load {name} [{split}] from the Hugging Face hub: {_one_line(e)}") from None
    tip = "" if offline else ", or set HF_HUB_OFFLINE=1 to use a copy already cached"
    raise UserError(f"{name!r} is not a local file or directory and the Hugging Face hub is unreachable ({why}); "
                    f"download the data and pass its path (a .jsonl/.jsonl.gz/.json/.csv/.parquet file, a "
                    f"save_to_disk directory, or a directory holding {split}.jsonl.gz){tip}")


def _check_hub(repo: str) -> Optional[str]:
    """Why the hub cannot serve `repo`, or None. One quick request, so that an unreachable hub fails
    now instead of after `datasets`' retries."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        HfApi().dataset_info(repo, timeout=10)
    except GatedRepoError:
        raise UserError(f"{repo} is gated on the Hugging Face hub: accept its terms there, "
                        "then `hf auth login`") from None
    except RepositoryNotFoundError:
        raise UserError(f"no dataset {repo!r} on the Hugging Face hub (or it is private), "
                        f"and no local file or directory of that name") from None
    except Exception as e:
        return f"{type(e).__name__}: {_one_line(e)}"
    return None


def _check_json_rows(path: str):
    """pyarrow's JSON reader kills the process (segfault) when a file's first row is `null`, and reads a
    later `null` as a row of empty values; so a row that is not an object is refused before `datasets`
    reads the file. A line that starts an object passes at a glance, one that is no JSON value by itself
    is part of a document over several lines (datasets reads those whole), and an array is checked whole."""
    opener = gzip.open if path.endswith(".gz") else open
    first = True
    try:
        with opener(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                line = (raw.removeprefix(codecs.BOM_UTF8) if n == 1 else raw).strip()
                if not line:
                    continue
                if first and line.startswith(b"["):
                    problem = _problem(path, "json")
                    if problem:
                        raise UserError(problem)
                    return
                first = False
                if line.startswith(b"{"):
                    continue
                try:
                    row = json.loads(line.decode("utf-8"))  # (json.loads would skip a BOM in bytes)
                except ValueError:
                    continue
                raise UserError(f"{path}, line {n}: expected one JSON object per line, found {type(row).__name__}")
    except BROKEN_FILE:
        pass  # _read_error says what is wrong with the file


def _problem(path: str, builder: str) -> Optional[str]:
    try:
        return _first_problem(path, builder)
    except BROKEN_FILE as e:
        return f"{path}: cannot read the file ({_one_line(e)})"


def _read_error(files: List[str], builder: str, error: Exception) -> UserError:
    """`datasets` rarely says where a file is broken, so look for the first bad line ourselves."""
    for path in files:
        problem = _problem(path, builder)
        if problem:
            return UserError(problem)
    cause = error.__cause__ or error
    return UserError(f"cannot read {', '.join(files)} as {builder}: {type(cause).__name__}: {_one_line(cause)}")


def _first_problem(path: str, builder: str) -> Optional[str]:
    """The first line of a text file that is not UTF-8 or (JSON Lines) not one JSON object, or the first
    item of a JSON array that is not an object; or that it has no rows. None when nothing is found
    (CSV syntax errors are left to pandas, which names the line)."""
    if builder == "parquet":
        return _parquet_problem(path)
    opener = gzip.open if path.endswith(".gz") else open
    n_rows, json_array, first = 0, False, True
    with opener(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if n == 1:  # a BOM may start the file, and is no column of it
                raw = raw.removeprefix(codecs.BOM_UTF8)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                byte = f"byte {raw[e.start]:#04x} at column {e.start + 1}"
                return f"{path}, line {n}: not UTF-8 text ({byte}); save it as UTF-8"
            if not line.strip():
                continue
            if builder != "json":
                n_rows += 1
            elif first and line.lstrip().startswith("["):  # one JSON array, checked whole below
                json_array = True
            elif not json_array:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    return f"{path}, line {n}: malformed JSON ({e.msg} at column {e.colno})"
                if not isinstance(row, dict):
                    return f"{path}, line {n}: expected one JSON object per line, found {type(row).__name__}"
                if any("\0" in name for name in row):
                    return f"{path}, line {n}: {NUL_NAME}"
                n_rows += bool(row)  # datasets reads no row from a file of `{}`s
            first = False
    if json_array:
        with opener(path, "rt", encoding="utf-8-sig") as f:
            try:
                items = json.load(f)
            except json.JSONDecodeError as e:
                return f"{path}, line {e.lineno}: malformed JSON ({e.msg} at column {e.colno})"
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                return f"{path}: item {i + 1} of the JSON array should be an object, found {type(item).__name__}"
            if any("\0" in name for name in item):
                return f"{path}: item {i + 1} of the JSON array: {NUL_NAME}"
        n_rows = sum(map(bool, items))
    if n_rows <= (builder == "csv"):  # a CSV file's first line is its header
        return f"{path} has no rows"
    return None


def _parquet_problem(path: str) -> Optional[str]:
    """That a Parquet file has no rows or no columns (pyarrow's words for it are "BatchSize must be
    greater than 0"), or a column name with a NUL; None for anything else, pyarrow names that well enough."""
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception:
        return None
    if parquet.metadata.num_rows == 0 or parquet.metadata.num_columns == 0:
        return f"{path} has no {'rows' if parquet.metadata.num_rows == 0 else 'columns'}"
    if any("\0" in name for name in parquet.schema_arrow.names):
        return f"{path}: {NUL_NAME}"
    return None


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split()) or type(e).__name__


# -----------------------------------------------------------------------------
# Dialogue text, parts, and what became of each row


def split_transcript(transcript: str) -> Optional[Tuple[str, str]]:
    """HH transcript -> (prompt up to and including the last "\\n\\nAssistant:", response), or None."""
    i = transcript.rfind(ASSISTANT)
    if i < 0:
        return None
    i += len(ASSISTANT)
    return transcript[:i], transcript[i:]


def part_of(prompt: str) -> str:
    """The part ("sft", "rm" or "ppo") a prompt belongs to; see "How the data is split"."""
    digest = hashlib.sha256(" ".join(prompt.split()).encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64  # uniform in [0, 1)
    edge = 0.0
    for name, share in PARTS.items():
        edge += share
        if u < edge:
            return name
    return name  # u within float rounding of 1


def _new_stats(source: str, part: Optional[str] = None) -> dict:
    """What became of a source's rows, as the JSON-ready dict each dataset keeps in `.stats`.
    rows = kept + sum(dropped.values()) + other_parts."""
    return {
        "source": source,
        "part": part,
        "rows": 0,  # rows read
        "kept": 0,  # examples in the dataset
        "dropped": {},  # reason -> rows dropped for it
        "other_parts": 0,  # rows whose prompt belongs to another part
        "truncated": 0,  # kept examples cut to max_length
    }


def stats_line(stats: dict) -> str:
    """`.stats` as the one line the CLIs print."""
    reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(stats["dropped"].items()))
    line = f"{stats['source']}: read {stats['rows']}, kept {stats['kept']}, dropped {sum(stats['dropped'].values())}"
    line += f" ({reasons})" if reasons else ""
    if stats["part"]:
        line += f", {stats['other_parts']} in parts other than {stats['part']!r}"
    return line + f", truncated {stats['truncated']}"


# -----------------------------------------------------------------------------
# Rows -> examples. Each parser yields, per row, an example (prompt first) or the reason it is dropped.


def _sft_rows(cols, data):
    """(prompt, response): a demonstration, rm-static's chosen answer, or HH's chosen transcript."""
    for values in zip(*data):
        pair = split_transcript(values[0]) if cols == ("chosen",) else values
        if pair is None:
            yield "no assistant turn"
        elif not pair[1].strip():
            yield "empty response"
        else:
            yield format_prompt(pair[0]), pair[1]


def _preference_rows(cols, data):
    """(prompt, [responses best first]): an HH pair, an rm-static pair, or a K-wise ranking."""
    for values in zip(*data):
        if cols == ("chosen", "rejected"):  # two HH transcripts that must share their prompt
            chosen, rejected = split_transcript(values[0]), split_transcript(values[1])
            if chosen is None or rejected is None:
                yield "no assistant turn"
                continue
            if chosen[0] != rejected[0]:
                yield "prompts differ"
                continue
            prompt, responses = chosen[0], [chosen[1], rejected[1]]
        else:
            prompt, responses = values[0], list(values[1]) if cols == ("prompt", "responses") else list(values[1:])
        if len(responses) < 2:
            yield "fewer than 2 responses"
        elif len({r.strip() for r in responses}) < len(responses):
            yield "identical responses"
        else:
            yield format_prompt(prompt), responses


def _prompt_rows(cols, data):
    """(prompt,): a prompt column (raw requests are wrapped) or the prompt of an HH transcript."""
    seen = set()
    for (text,) in zip(*data):
        if cols == ("chosen",):
            pair = split_transcript(text)
            if pair is None:
                yield "no assistant turn"
                continue
            text = pair[0]
        prompt = format_prompt(text)
        if not text.strip():
            yield "empty prompt"
        elif prompt in seen:
            yield "duplicate prompt"
        else:
            seen.add(prompt)
            yield (prompt,)


_PARSERS = {"sft": _sft_rows, "preference": _preference_rows, "prompts": _prompt_rows}


def _read(source_or_rows, split, part, kind, limit=None):
    """Rows -> (examples of `kind` in `part`, their stats, the columns read). Zero examples is a user error."""
    if part is not None and part not in PARTS:
        raise UserError(f"unknown part {part!r}; parts: {', '.join(PARTS)}")
    if isinstance(source_or_rows, (str, os.PathLike)):
        rows = load_rows(source_or_rows, split)
        label = os.fspath(source_or_rows) + ("" if os.path.isfile(source_or_rows) else f" [{split}]")
    else:  # a datasets.Dataset, or a list of row dicts
        rows = datasets.Dataset.from_list(source_or_rows) if isinstance(source_or_rows, list) else source_or_rows
        label = "<rows>"
    stats = _new_stats(label, part)
    cols, data = _columns(rows, kind, label)
    examples = []
    for example in _PARSERS[kind](cols, data):
        if limit is not None and len(examples) >= limit:
            break
        stats["rows"] += 1
        if isinstance(example, str):
            stats["dropped"][example] = stats["dropped"].get(example, 0) + 1
        elif part is not None and part_of(example[0]) != part:
            stats["other_parts"] += 1
        else:
            examples.append(example)
    stats["kept"] = len(examples)
    if not examples:
        raise UserError(f"no usable examples: {stats_line(stats)}")
    return examples, stats, cols


def _columns(rows: datasets.Dataset, kind: str, label: str):
    """The first schema of `kind` that `rows` has and its columns as lists (None -> empty)."""
    have = rows.column_names
    for cols in SCHEMAS[kind]:
        if set(cols) <= set(have):
            break
    else:
        closest = min(SCHEMAS[kind], key=lambda cols: (len(set(cols) - set(have)), -len(set(cols) & set(have))))
        missing = ", ".join(c for c in closest if c not in have)
        accepted = " or ".join("+".join(cols) for cols in SCHEMAS[kind])
        found = ", ".join(c if c.isprintable() and c.strip() == c != "" else repr(c) for c in have) or "none"
        raise UserError(f"{label}: missing column {missing} for {kind} rows (they need {accepted}); "
                        f"columns found: {found}")
    table = rows.select_columns(list(cols))[:]
    data = [table[c] for c in cols]
    for col, values in zip(cols, data):
        is_list = col == "responses"
        for i, v in enumerate(values):
            if v is None:
                values[i] = [] if is_list else ""
            elif not (isinstance(v, list) and all(isinstance(x, str) for x in v) if is_list else isinstance(v, str)):
                want = "a list of texts" if is_list else "text"
                raise UserError(f"{label}: row {i + 1}: column {col!r} should hold {want}, not {str(v)[:40]!r}")
    return cols, data


# -----------------------------------------------------------------------------
# Tokens


def _encode(tokenizer, texts) -> List[np.ndarray]:
    """Token ids of each text, batched through tiktoken's threads; '<|endoftext|>' stays ordinary text."""
    out, chunk = [], 4096
    for i in range(0, len(texts), chunk):
        batch = tokenizer.encode_batch(list(texts[i:i + chunk]), allow_special=False)
        out += [np.array(ids, dtype=np.int32) for ids in batch]
    return out


def _flatten(seqs):
    """Many 1-D arrays -> (one flat array, offsets): sequence i is flat[bounds[i]:bounds[i + 1]]."""
    bounds = np.zeros(len(seqs) + 1, dtype=np.int64)
    np.cumsum([len(s) for s in seqs], out=bounds[1:])
    return np.concatenate(seqs), bounds


def _tensor(flat, bounds, i) -> torch.Tensor:
    return torch.from_numpy(flat[bounds[i]:bounds[i + 1]].astype(np.int64))


def _fit_sft(prompt, response, max_length):
    """prompt + response (EOS included) in max_length tokens -> (ids, number of context tokens).

    The prompt loses tokens from the left so the response survives. A response that does not fit
    even so keeps its beginning after the prompt's last token (a target needs one token before it)
    and loses its EOS: an EOS at the cut would teach the model to stop mid-answer."""
    room = max_length - len(response)  # tokens left for the prompt
    if room >= 1:
        prompt = prompt[max(0, len(prompt) - room):]
    else:
        prompt, response = prompt[-1:], response[:max_length - 1]
    return np.concatenate([prompt, response]), len(prompt)


def fit_ranked(prompt, responses, max_length):
    """prompt + each response (EOS included) in max_length tokens.

    The prompt loses tokens from the left, the same for every response, so they are compared in the
    same context; a response too long on its own keeps its end, EOS included, which is where the reward
    model reads its score."""
    room = max(0, max_length - max(len(r) for r in responses))
    prompt = prompt[max(0, len(prompt) - room):]
    return [np.concatenate([prompt, r])[-max_length:] for r in responses]


def _check_max_length(max_length, least):
    if max_length < least:
        raise UserError(f"max_length must be at least {least}, got {max_length}")


# -----------------------------------------------------------------------------
# Datasets


class _Examples(torch.utils.data.Dataset):
    """What the datasets share: `.stats`, the JSON-ready counts of what became of the source's rows
    (`_new_stats`), which the CLIs save with the run, and `stats_line()`, which they print."""

    stats: dict

    def stats_line(self) -> str:
        return stats_line(self.stats)


class SFTDataset(_Examples):
    """Demonstrations: prompt + response + EOS, and which tokens carry loss.

    Items: {"input_ids": (T,), "loss_mask": (T,)}, T <= max_length. loss_mask[t] = 1 when token t is a
    training target (predicted from tokens < t): the response and its EOS; with train_on_prompt=True
    every token but the first (the original trained on whole transcripts). Truncation: `_fit_sft`.
    pack=True concatenates the examples (each ending in EOS, unless cut) and cuts the stream into
    blocks of max_length tokens, as in pre-training: no padding, attention crosses example
    boundaries, a block's first token is never a target, and the last block may be shorter.
    """

    def __init__(self, source_or_rows, tokenizer, max_length, split="train", part=None, train_on_prompt=False,
                 pack=False):
        _check_max_length(max_length, 2)
        examples, self.stats, _ = _read(source_or_rows, split, part, "sft")
        prompts = _encode(tokenizer, [p for p, _ in examples])
        responses = _encode(tokenizer, [r for _, r in examples])
        seqs, masks = [], []
        for p, r in zip(prompts, responses):
            ids, n_context = _fit_sft(p, np.append(r, tokenizer.eos_id).astype(np.int32), max_length)
            self.stats["truncated"] += len(ids) < len(p) + len(r) + 1
            seqs.append(ids)
            masks.append(np.arange(len(ids)) >= (1 if train_on_prompt else n_context))
        self.ids, self.bounds = _flatten(seqs)
        self.loss_mask, _ = _flatten(masks)
        if pack:
            self.bounds = np.append(np.arange(0, len(self.ids), max_length), len(self.ids))
        self.loss_mask[self.bounds[:-1]] = False  # an item's first token has nothing to be predicted from

    def __len__(self):
        return len(self.bounds) - 1

    def __getitem__(self, i):
        return {"input_ids": _tensor(self.ids, self.bounds, i), "loss_mask": _tensor(self.loss_mask, self.bounds, i)}


class PreferenceDataset(_Examples):
    """Responses to one prompt, best first, each as prompt + response + EOS (T <= max_length).

    Pairs (HH or rm-static rows) give {"chosen_ids": (T,), "rejected_ids": (T,)}; K-wise rows
    ({"prompt", "responses"}) give {"ranked_ids": [(T,)] * K}, best first, the same K for every row so
    that a batch is (B, K, T). Truncation: `fit_ranked`.
    """

    def __init__(self, source_or_rows, tokenizer, max_length, split="train", part=None):
        _check_max_length(max_length, 1)
        examples, self.stats, cols = _read(source_or_rows, split, part, "preference")
        self.ranked = cols == ("prompt", "responses")
        ks = sorted({len(responses) for _, responses in examples})
        if len(ks) > 1:
            raise UserError(f"{self.stats['source']}: rows rank different numbers of responses ({ks}); "
                            f"a batch needs the same number in every row")
        self.k = ks[0]
        prompts = _encode(tokenizer, [p for p, _ in examples])
        responses = _encode(tokenizer, [r for _, rs in examples for r in rs])
        seqs = []
        for i, p in enumerate(prompts):
            rs = [np.append(r, tokenizer.eos_id).astype(np.int32) for r in responses[i * self.k:(i + 1) * self.k]]
            fitted = fit_ranked(p, rs, max_length)
            self.stats["truncated"] += sum(map(len, fitted)) < self.k * len(p) + sum(map(len, rs))
            seqs += fitted
        self.ids, self.bounds = _flatten(seqs)  # sequence k of example i is number i * K + k

    def __len__(self):
        return (len(self.bounds) - 1) // self.k

    def __getitem__(self, i):
        seqs = [_tensor(self.ids, self.bounds, i * self.k + j) for j in range(self.k)]
        return {"ranked_ids": seqs} if self.ranked else {"chosen_ids": seqs[0], "rejected_ids": seqs[1]}


class PromptDataset(_Examples):
    """Formatted prompts for generation (PPO rollouts, evaluation), deduplicated; collate_prompts pads
    them on the left. Items: {"prompt_ids": (T,), "prompt": str}. A prompt longer than max_length keeps
    its end (the last turn and "\\n\\nAssistant:"), where generation continues."""

    def __init__(self, source_or_rows, tokenizer, max_length, split="train", part=None, limit=None):
        _check_max_length(max_length, 1)
        examples, self.stats, _ = _read(source_or_rows, split, part, "prompts", limit)
        self.prompts = [p for (p,) in examples]
        seqs = _encode(tokenizer, self.prompts)
        self.stats["truncated"] = sum(len(s) > max_length for s in seqs)
        self.ids, self.bounds = _flatten([s[-max_length:] for s in seqs])

    def __len__(self):
        return len(self.prompts)

    def __getitem__(self, i):
        return {"prompt_ids": _tensor(self.ids, self.bounds, i), "prompt": self.prompts[i]}


def load_prompts(source, limit=None, split="train", part=None) -> List[str]:
    """Formatted, deduplicated prompts (the first `limit` of them), e.g. for evaluation."""
    examples, _, _ = _read(source, split, part, "prompts", limit)
    return [p for (p,) in examples]


# -----------------------------------------------------------------------------
# Batches


def collate_sft(items):
    ids, mask = pad_batch([it["input_ids"] for it in items], padding_side="right")
    loss_mask = pad_sequence([it["loss_mask"] for it in items], batch_first=True, padding_value=0)
    return {"input_ids": ids, "attention_mask": mask, "loss_mask": loss_mask}  # each (B, T)


def collate_preference(items):
    """Pairs -> chosen/rejected ids and masks, each (B, T), padded to one T so that a trainer can run
    them as a single (2B, T) batch. K-wise -> {"ranked_ids", "ranked_mask"}, each (B, K, T)."""
    B = len(items)
    if "ranked_ids" in items[0]:
        ids, mask = pad_batch([s for it in items for s in it["ranked_ids"]], padding_side="right")  # (B*K, T)
        return {"ranked_ids": ids.view(B, -1, ids.size(1)), "ranked_mask": mask.view(B, -1, ids.size(1))}
    pairs = [it["chosen_ids"] for it in items] + [it["rejected_ids"] for it in items]
    ids, mask = pad_batch(pairs, padding_side="right")  # (2B, T)
    return {"chosen_ids": ids[:B], "chosen_mask": mask[:B], "rejected_ids": ids[B:], "rejected_mask": mask[B:]}


def collate_prompts(items):
    ids, mask = pad_batch([it["prompt_ids"] for it in items], padding_side="left")
    return {"input_ids": ids, "attention_mask": mask, "prompts": [it["prompt"] for it in items]}  # (B, T)


def shard_batches(n, batch_size, *, epoch, seed, rank=0, world_size=1, shuffle=True, drop_last=True):
    """This rank's batches of example indices for one epoch (for DataLoader(batch_sampler=...)).

    Every rank draws the same permutation of range(n), seeded by (seed, epoch), and takes every
    world_size-th index from position `rank`: ranks see disjoint examples and the same number of
    batches, so DDP's collective operations stay in step. drop_last=True leaves out the last
    n % (batch_size * world_size) indices of the permutation (different examples each epoch).
    drop_last=False keeps them: the permutation is padded to a multiple of world_size by repeating its
    first indices (at most world_size - 1 repeats, as DistributedSampler does) and the last batch may
    be smaller, but it is the same size on every rank.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    if drop_last:
        order = order[:n - n % (batch_size * world_size)]
    else:
        order = np.resize(order, -(-n // world_size) * world_size)  # np.resize repeats from the start
    mine = order[rank::world_size]
    batches = [mine[i:i + batch_size].tolist() for i in range(0, len(mine), batch_size)]
    if not batches:
        raise UserError(f"{n} examples do not fill one batch of {batch_size} on each of {world_size} rank(s); "
                        f"use a smaller batch size or more data")
    return batches
