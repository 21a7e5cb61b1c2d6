"""Fuzzing the data loaders (SFTDataset, PreferenceDataset, PromptDataset, load_prompts) with hypothesis, over
the local formats they read (.jsonl, .json, .csv, .parquet, and .jsonl.gz for broken bytes).

The contract (dataset.py, tests/test_dataset.py): whatever a file holds, a loader either raises a UserError whose
message is one line naming the file (and the line or row of a malformed one), or returns a dataset whose stats
count every row: rows = kept + dropped + rows in other parts. Never another exception, never a crash.

The number of examples is fixed and the draw derandomized, so every run tries the same inputs; no example database
is written. No network: the hub is switched off and the datasets cache lives in a temporary directory."""
import collections
import csv
import gzip
import itertools
import json
import re

import datasets
import huggingface_hub
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from common import UserError
from dataset import SCHEMAS, PreferenceDataset, PromptDataset, SFTDataset, load_prompts, load_rows, part_of, stats_line
from tokenizer import format_prompt, get_tokenizer

H, A = "\n\nHuman:", "\n\nAssistant:"
VOCAB = 50257
TEXT_FORMATS = ["jsonl", "json", "csv"]
FORMATS = TEXT_FORMATS + ["parquet"]
FUZZ = dict(deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
_names = itertools.count()

# -----------------------------------------------------------------------------
# What to write

ODD = ["", " ", "\t", "\x00", "NA", "None", "null", "nan", "4", "-1.5", "True", "\ufeffBOM", "a\r\nb", "line\u2028sep",
       "é", "🚉", "<|endoftext|>", '"quoted", with comma', "#hash", H, A, f"{H} q{A}", f"{H} q{A} a"]
FLOATS = st.floats(allow_nan=False, allow_infinity=False, allow_subnormal=False)  # conftest flushes denormals
words = st.text(st.characters(codec="utf-8"), max_size=8) | st.sampled_from(ODD)
# pieces of HH transcripts, so that the split at the last "\n\nAssistant:" meets all its cases
texts = words | st.lists(st.sampled_from([H, A, " q", " a", " Hi", "\n", "Assistant:"]) | words, max_size=6).map("".join)
maybe_texts = st.none() | texts
EXTRA = {"act": maybe_texts, "id": st.integers(-2**53, 2**53), "score": FLOATS}


@st.composite
def row_sets(draw, columns, value=maybe_texts, min_rows=1):
    """Rows over some of `columns` (a missing key is a missing value), and the columns the file will have."""
    have = draw(st.lists(st.sampled_from(columns), min_size=1, unique=True))
    extra = draw(st.lists(st.sampled_from(sorted(EXTRA)), unique=True, max_size=2))
    rows = []
    for _ in range(draw(st.integers(min_rows, 6))):
        row = {c: draw(value(c) if callable(value) else value) for c in have if draw(st.integers(0, 5))}
        row.update({c: draw(EXTRA[c]) for c in extra})
        rows.append(row)
    return rows, have + extra


def write_rows(path, fmt, rows, columns, types=None):
    """`rows` as a file of format `fmt`; a CSV cell of None is empty, a Parquet column has `types[c]` if given."""
    if fmt == "jsonl":
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    elif fmt == "json":
        with open(path, "w", encoding="utf-8") as f:
            json.dump(rows, f, ensure_ascii=False, indent=1)
    elif fmt == "csv":
        with open(path, "w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows({c: "" if r.get(c) is None else r[c] for c in columns} for r in rows)
    else:
        types = types or {}
        pq.write_table(pa.table({c: pa.array([r.get(c) for r in rows], type=types.get(c)) for c in columns}), path)
    return path


def new_path(workdir, ext):
    return str(workdir / f"f{next(_names)}.{ext}")


# -----------------------------------------------------------------------------
# What must come back


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Files and the datasets cache in a temporary directory; the hub switched off."""
    root = tmp_path_factory.mktemp("fuzz")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", root / "hf_cache")
        mp.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        yield root


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer()


def loaders(tok, max_length):
    return {
        "sft": lambda source: SFTDataset(source, tok, max(2, max_length)),
        "preference": lambda source: PreferenceDataset(source, tok, max_length),
        "prompts": lambda source: PromptDataset(source, tok, max_length),
        "load_prompts": lambda source: load_prompts(source),
    }


def attempt(load, path):
    """(dataset, None) or (None, message of the UserError), which must be one line naming the file."""
    try:
        ds = load(path)
    except UserError as e:
        message = str(e)
        assert len(message.splitlines()) == 1 and message == message.strip(), repr(message)
        assert path in message, message
        event("UserError: " + re.sub(r"\d+", "N", message.replace(path, "FILE"))[:36])
        return None, message
    event("dataset")
    return ds, None


def check_dataset(ds, path, max_length, n_rows=None):
    """Counted rows add up (to the rows in the file), and every item is a short sequence of token ids."""
    if isinstance(ds, list):  # load_prompts
        assert ds and len(set(ds)) == len(ds) and all(isinstance(p, str) and p for p in ds)
        return
    stats = ds.stats
    assert stats["source"] == path
    assert stats["rows"] == (len(load_rows(path)) if n_rows is None else n_rows)
    assert stats["rows"] == stats["kept"] + sum(stats["dropped"].values()) + stats["other_parts"]
    assert stats["kept"] == len(ds) >= 1 and 0 <= stats["truncated"] <= stats["kept"]
    assert all(n >= 1 for n in stats["dropped"].values())
    for i in range(len(ds)):
        item = ds[i]
        seqs = [v for v in item.values() if torch.is_tensor(v)] + item.get("ranked_ids", [])
        assert seqs
        for s in seqs:
            assert s.dtype == torch.long and s.dim() == 1 and 1 <= len(s) <= max(2, max_length)
            assert 0 <= int(s.min()) and int(s.max()) < VOCAB


def check_any(tok, path, max_length=4):
    """Every loader on `path`: a one-line UserError naming the file, or a dataset that counts its rows."""
    messages = {}
    for name, load in loaders(tok, max_length).items():
        ds, messages[name] = attempt(load, path)
        if ds is not None:
            check_dataset(ds, path, max_length)
    return messages


# -----------------------------------------------------------------------------
# The reference: what a loader makes of well-typed rows (module docstring of dataset.py)


def hh_split(text):
    head, assistant, response = text.rpartition(A)
    return (head + assistant, response) if assistant else None


def parse(kind, cols, v, seen):
    """(reason the row is dropped, None) or (None, (prompt, responses))."""
    if kind == "sft":
        pair = hh_split(v["chosen"]) if cols == ("chosen",) else (v[cols[0]], v[cols[1]])
        if pair is None:
            return "no assistant turn", None
        return ("empty response", None) if not pair[1].strip() else (None, (format_prompt(pair[0]), [pair[1]]))
    if kind == "preference":
        if cols == ("chosen", "rejected"):
            chosen, rejected = hh_split(v["chosen"]), hh_split(v["rejected"])
            if chosen is None or rejected is None:
                return "no assistant turn", None
            if chosen[0] != rejected[0]:
                return "prompts differ", None
            prompt, responses = chosen[0], [chosen[1], rejected[1]]
        else:
            prompt = v["prompt"]
            responses = v["responses"] if cols == ("prompt", "responses") else [v["chosen"], v["rejected"]]
        if len(responses) < 2:
            return "fewer than 2 responses", None
        if len({r.strip() for r in responses}) < len(responses):
            return "identical responses", None
        return None, (format_prompt(prompt), responses)
    text = v[cols[0]]
    if cols == ("chosen",):
        pair = hh_split(text)
        if pair is None:
            return "no assistant turn", None
        text = pair[0]
    prompt = format_prompt(text)
    if not text.strip():
        return "empty prompt", None
    if prompt in seen:
        return "duplicate prompt", None
    seen.add(prompt)
    return None, (prompt, [])


def reference(kind, rows, columns, source, part=None, limit=None):
    """(examples, stats without "truncated") for rows whose columns hold text or nothing (and lists of texts)."""
    cols = next(c for c in SCHEMAS[kind] if set(c) <= set(columns))
    stats = {"source": source, "part": part, "rows": 0, "kept": 0, "dropped": collections.Counter(), "other_parts": 0}
    examples, seen = [], set()
    for row in rows:
        if limit is not None and len(examples) >= limit:
            break
        stats["rows"] += 1
        v = {c: row.get(c) or ([] if c == "responses" else "") for c in cols}
        reason, example = parse(kind, cols, v, seen)
        if reason:
            stats["dropped"][reason] += 1
        elif part is not None and part_of(example[0]) != part:
            stats["other_parts"] += 1
        else:
            examples.append(example)
    stats["kept"], stats["dropped"] = len(examples), dict(stats["dropped"])
    return examples, stats


def check_against_reference(tok, kind, path, rows, columns, part=None, limit=None, max_length=4):
    if kind == "prompts" and limit is not None:
        load = lambda source: PromptDataset(source, tok, max_length, part=part, limit=limit)  # noqa: E731
    else:
        load = {"sft": lambda source: SFTDataset(source, tok, max(2, max_length), part=part),
                "preference": lambda source: PreferenceDataset(source, tok, max_length, part=part),
                "prompts": lambda source: PromptDataset(source, tok, max_length, part=part)}[kind]
    examples, want = reference(kind, rows, columns, path, part, limit)
    ds, message = attempt(load, path)
    if not examples:
        assert message == f"no usable examples: {stats_line(dict(want, truncated=0))}"
        return
    ks = sorted({len(responses) for _, responses in examples})
    if kind == "preference" and len(ks) > 1:
        assert message == (f"{path}: rows rank different numbers of responses ({ks}); "
                           "a batch needs the same number in every row")
        return
    assert message is None, message
    got = dict(ds.stats)
    got.pop("truncated")
    assert got == want
    check_dataset(ds, path, max_length, n_rows=want["rows"])
    if kind == "prompts":
        assert ds.prompts == [p for p, _ in examples]
        assert load_prompts(path, part=part, limit=limit) == ds.prompts


# -----------------------------------------------------------------------------
# Random bytes


PREFIXES = [b"", b'{"prompt": "', b'{"chosen": "\\n\\nHuman: q\\n\\nAssistant:', b"prompt,response\n", b"[", b"[{",
            b"\xef\xbb\xbf", b"PAR1", b"\x1f\x8b\x08\x00"]


@settings(max_examples=60, **FUZZ)
@given(ext=st.sampled_from(FORMATS + ["jsonl.gz"]), prefix=st.sampled_from(PREFIXES), body=st.binary(max_size=300),
       compress=st.booleans())
def test_random_bytes(workdir, tok, ext, prefix, body, compress):
    data = prefix + body
    if ext == "jsonl.gz" and compress:
        data = gzip.compress(data)
    path = new_path(workdir, ext)
    with open(path, "wb") as f:
        f.write(data)
    check_any(tok, path)


# -----------------------------------------------------------------------------
# Random JSON values, one per line or in an array: every row must be an object


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**53, 2**53) | FLOATS | texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["prompt", "response", "x", "a\nb"]), inner,
                                                                max_size=3),
    max_leaves=6)
json_rows = st.fixed_dictionaries({}, optional={"prompt": maybe_texts, "response": maybe_texts, "chosen": texts})


@settings(max_examples=60, **FUZZ)
@given(ext=st.sampled_from(["jsonl", "json"]), values=st.lists(json_rows | json_values, min_size=1, max_size=5))
def test_random_json_values(workdir, tok, ext, values):
    path = new_path(workdir, ext)
    with open(path, "w", encoding="utf-8") as f:
        if ext == "jsonl":
            f.writelines(json.dumps(v, ensure_ascii=False) + "\n" for v in values)
        else:
            json.dump(values, f, ensure_ascii=False, indent=1)
    messages = check_any(tok, path)
    bad = [i for i, v in enumerate(values) if not isinstance(v, dict)]
    if ext == "jsonl" and bad and not isinstance(values[0], list):  # a first line "[..." is read as an array
        i = bad[0]
        want = f"{path}, line {i + 1}: expected one JSON object per line, found {type(values[i]).__name__}"
        assert set(messages.values()) == {want}
    elif ext == "json" and bad:
        i = bad[0]
        want = f"{path}: item {i + 1} of the JSON array should be an object, found {type(values[i]).__name__}"
        assert set(messages.values()) == {want}
    elif not any(values):  # nothing but {}
        assert set(messages.values()) == {f"{path} has no rows"}


# -----------------------------------------------------------------------------
# Wrong types in the right columns, missing and extra columns


KINDS = {"sft": ["prompt", "response", "chosen"], "preference": ["prompt", "responses", "chosen", "rejected"],
         "prompts": ["prompt", "chosen"]}
LIST_TEXTS = st.lists(texts, max_size=4)
TYPED = {  # a column's kind of value -> (values, right for a text column, right for "responses")
    "text": (maybe_texts, True, False),
    "texts": (st.none() | LIST_TEXTS, False, True),
    "int": (st.integers(-2**53, 2**53), False, False),
    "float": (FLOATS, False, False),
    "bool": (st.booleans(), False, False),
    "ints": (st.lists(st.integers(-9, 9), min_size=1, max_size=3), False, False),
    "object": (st.fixed_dictionaries({"a": texts}), False, False),
    "texts with null": (st.lists(texts, max_size=2).map(lambda v: v + [None]), False, False),
}
MIXED = st.none() | texts | st.integers(-9, 9) | st.booleans() | LIST_TEXTS  # JSON only


@st.composite
def typed_rows(draw, kind, fmt):
    """Rows whose columns each hold one kind of value (or, in JSON, several), some of them wrong."""
    columns = draw(st.lists(st.sampled_from(KINDS[kind] + ["act"]), min_size=1, unique=True))
    kinds = {c: draw(st.sampled_from(sorted(TYPED) + (["mixed"] if fmt in ("jsonl", "json") else []))) for c in columns}
    n = draw(st.integers(1, 5))
    rows = [{c: draw(MIXED if kinds[c] == "mixed" else TYPED[kinds[c]][0]) for c in columns} for _ in range(n)]
    return rows, columns


def wrong(col, value):
    if value is None:
        return False
    if col == "responses":
        return not (isinstance(value, list) and all(isinstance(x, str) for x in value))
    return not isinstance(value, str)


@settings(max_examples=80, **FUZZ)
@given(kind=st.sampled_from(sorted(KINDS)), fmt=st.sampled_from(["jsonl", "json", "parquet"]), data=st.data())
def test_wrong_types_and_missing_columns(workdir, tok, kind, fmt, data):
    rows, columns = data.draw(typed_rows(kind, fmt))
    path = new_path(workdir, fmt)
    try:
        write_rows(path, fmt, rows, columns)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):  # Parquet cannot hold such a column
        return
    load = loaders(tok, 4)[kind]
    cols = next((c for c in SCHEMAS[kind] if set(c) <= set(columns)), None)
    ds, message = attempt(load, path)
    if cols is None:
        assert message.startswith(f"{path}: missing column ") and f"columns found: {', '.join(columns)}" in message
        return
    bad = [(c, next(i for i, r in enumerate(rows) if wrong(c, r[c]))) for c in cols if any(wrong(c, r[c]) for r in rows)]
    if bad:
        col, i = bad[0]  # columns are checked in the schema's order
        want = "a list of texts" if col == "responses" else "text"
        assert message is not None and message.startswith(f"{path}: row {i + 1}: column {col!r} should hold {want}, ")
        return
    check_against_reference(tok, kind, path, rows, columns)


# -----------------------------------------------------------------------------
# Well-typed rows in every format: the rows kept and dropped are exactly those of the reference


@settings(max_examples=100, **FUZZ)
@given(kind=st.sampled_from(["sft", "pairs", "kwise", "prompts"]), fmt=st.sampled_from(FORMATS), data=st.data())
def test_rows_are_kept_or_dropped_and_counted(workdir, tok, kind, fmt, data):
    if kind == "kwise":
        if fmt == "csv":  # a CSV cell cannot hold a list
            fmt = "jsonl"
        rows, columns = data.draw(row_sets(["prompt", "responses"],
                                           lambda c: st.none() | LIST_TEXTS if c == "responses" else maybe_texts))
    else:
        rows, columns = data.draw(row_sets(["prompt", "chosen", "rejected"] if kind == "pairs" else KINDS[kind]))
    kind = "preference" if kind in ("pairs", "kwise") else kind
    part = data.draw(st.sampled_from([None, None, "sft", "rm", "ppo"]))
    limit = data.draw(st.none() | st.integers(1, 4)) if kind == "prompts" else None
    path = new_path(workdir, fmt)
    types = {c: pa.list_(pa.string()) if c == "responses" else pa.string() for c in columns if c not in EXTRA}
    write_rows(path, fmt, rows, columns, types)
    if fmt in ("jsonl", "json"):  # a JSON file has the columns some row has
        columns = [c for c in columns if any(c in r for r in rows)]
        if not columns:
            assert attempt(loaders(tok, 4)[kind], path)[1] == f"{path} has no rows"
            return
    if not any(set(c) <= set(columns) for c in SCHEMAS[kind]):
        assert attempt(loaders(tok, 4)[kind], path)[1].startswith(f"{path}: missing column ")
        return
    check_against_reference(tok, kind, path, rows, columns, part, limit)


# -----------------------------------------------------------------------------
# Broken text: latin-1 lines in a UTF-8 file, stray bytes, NULs, BOMs, quotes and line ends


STRAY = [b"\xe9", b"\x00", b"\xef\xbb\xbf", b"\r", b"\n", b"\xff\xfe", b'"', b",", b"\x80abc", b"{", b"}", b"\\"]


def first_non_utf8_line(data):
    for n, line in enumerate(data.split(b"\n"), 1):
        try:
            (line.removeprefix(b"\xef\xbb\xbf") if n == 1 else line).decode("utf-8")
        except UnicodeDecodeError:
            return n
    return None


@settings(max_examples=80, **FUZZ)
@given(fmt=st.sampled_from(TEXT_FORMATS), data=st.data(),
       rows=st.lists(st.fixed_dictionaries({"prompt": texts | st.sampled_from(["café", "naïve", "Größe"]),
                                            "response": texts}), min_size=1, max_size=4))
def test_broken_text(workdir, tok, fmt, data, rows):
    path = new_path(workdir, fmt)
    write_rows(path, fmt, rows, ["prompt", "response"])
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    for n in data.draw(st.sets(st.integers(0, len(lines) - 1), max_size=2)):  # lines saved as latin-1
        lines[n] = lines[n].decode("utf-8").encode("latin-1", errors="replace")
    raw = bytearray(b"\n".join(lines))
    for _ in range(data.draw(st.integers(0, 3))):
        at = data.draw(st.integers(0, len(raw)))
        raw[at:at] = data.draw(st.sampled_from(STRAY))
    with open(path, "wb") as f:
        f.write(raw)
    messages = check_any(tok, path)
    n = first_non_utf8_line(bytes(raw))
    if n is not None:  # never read as text: the first broken line (or an earlier malformed one) is named
        broken = bytes(raw).split(b"\n")[n - 1].removeprefix(b"\xef\xbb\xbf" if n == 1 else b"")
        for message in messages.values():
            assert message is not None and message.startswith(f"{path}, line ")
            line = int(message[len(f"{path}, line "):].split(":")[0])
            assert line <= n and (line == n) == ("not UTF-8 text" in message)
            found = re.search(r"not UTF-8 text \(byte (0x[0-9a-f]{2}) at column (\d+)\)", message)
            if found:  # the byte named is the one in the file, counted from the start of the line (after a BOM)
                assert broken[int(found[2]) - 1] == int(found[1], 16)


# -----------------------------------------------------------------------------
# BOMs, odd column names, files without rows


@settings(max_examples=30, **FUZZ)
@given(fmt=st.sampled_from(TEXT_FORMATS), at=st.integers(0, 3),
       rows=st.lists(st.fixed_dictionaries({"prompt": texts, "response": texts}), min_size=3, max_size=4))
def test_a_bom_only_starts_a_file(workdir, tok, fmt, at, rows):
    """A BOM before the first line is allowed; one that starts a later line of JSON is named by its line."""
    at = 0 if fmt == "csv" else at  # (in CSV a later one is a character of a cell, or breaks its quotes)
    path = write_rows(new_path(workdir, fmt), fmt, rows, ["prompt", "response"])
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    lines[at] = b"\xef\xbb\xbf" + lines[at]
    with open(path, "wb") as f:
        f.write(b"\n".join(lines))
    ds, message = attempt(loaders(tok, 4)["prompts"], path)
    if at == 0:
        assert message is None or message.startswith("no usable examples: ")
    else:
        assert message.startswith(f"{path}, line {at + 1}: malformed JSON (")


NAMES = ["a\nb", "line\u2028sep", "x\x85y", "tab\there", "", " ", "a,b", '"q"', "é", "🚉", "\x00x", "pro\x00mpt"]


@settings(max_examples=40, **FUZZ)
@given(fmt=st.sampled_from(FORMATS), names=st.lists(st.sampled_from(NAMES), min_size=1, max_size=3, unique=True),
       rows=st.lists(texts, min_size=1, max_size=3))
def test_odd_column_names(workdir, tok, fmt, names, rows):
    """Column names that hold line breaks, NULs or nothing: still one line, and the names are shown."""
    table = [{name: text for name in names} for text in rows]
    path = write_rows(new_path(workdir, fmt), fmt, table, names)
    messages = check_any(tok, path)
    if any("\x00" in name for name in names):
        where = {"json": f"{path}: item 1 of the JSON array", "parquet": path}.get(fmt, f"{path}, line 1")
        assert set(messages.values()) == {f"{where}: a column name holds a NUL byte"}
    elif fmt != "csv":  # (pandas renames an empty or repeated CSV column)
        for message in messages.values():
            assert message.startswith(f"{path}: missing column ")
            shown = message.split("; columns found: ")[1]
            assert all((name if name.isprintable() and name.strip() == name != "" else repr(name)) in shown
                       for name in names)


@settings(max_examples=20, **FUZZ)
@given(fmt=st.sampled_from(FORMATS), columns=st.lists(st.sampled_from(["prompt", "response", "chosen"]), unique=True),
       n=st.integers(0, 3), blank=st.sampled_from(["", "\n", "  \n", "\r\n"]))
def test_files_without_rows(workdir, tok, fmt, columns, n, blank):
    """Nothing but blank lines, `{}`s, `[]` or a header: every loader says the file has no rows."""
    path = new_path(workdir, fmt)
    if fmt == "parquet":
        pq.write_table(pa.table({c: pa.array([], pa.string()) for c in columns}), path)
    else:
        text = {"jsonl": blank + "{}\n" * n + blank, "json": blank + "[" + ", ".join(["{}"] * n) + "]" + blank,
                "csv": ",".join(columns) + "\n" * bool(columns)}[fmt]
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    assert set(check_any(tok, path).values()) == {f"{path} has no rows"}


# -----------------------------------------------------------------------------
# Huge lines


@settings(max_examples=4, **FUZZ)
@given(fmt=st.sampled_from(FORMATS), size=st.sampled_from([70_000, 300_000, 1_000_000]), data=st.data())
def test_huge_lines(workdir, tok, fmt, size, data):
    huge = data.draw(st.sampled_from(["word ", "x", "é🚉 "])) * (size // 5)
    rows = [{"prompt": huge, "response": " short"}, {"prompt": "q", "response": huge}, {"prompt": "q2", "response": " "}]
    path = write_rows(new_path(workdir, fmt), fmt, rows, ["prompt", "response"])
    sft = SFTDataset(path, tok, 8)
    assert (sft.stats["rows"], sft.stats["kept"], sft.stats["truncated"]) == (3, 2, 2)
    assert sft.stats["dropped"] == {"empty response": 1}
    check_dataset(sft, path, 8, n_rows=3)
    prompts = PromptDataset(path, tok, 8)
    assert prompts.prompts == [format_prompt(huge), format_prompt("q"), format_prompt("q2")]
    check_dataset(prompts, path, 8, n_rows=3)
