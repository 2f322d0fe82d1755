"""Labelled text data: GLUE-style TSV folders, CSV/JSONL files, or a Hugging Face dataset id.

Everything a user can get wrong about a data file is caught here with a one-line ``DpqError`` naming
the file and line. Batches are length-bucketed and dynamically padded: SST-2 sentences average 13
tokens, so padding to a fixed 128 would waste most of the compute.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import hashlib
import json
import logging
import os
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch

from .errors import DpqError

log = logging.getLogger("dpq")

TEXT_COLUMNS = ("sentence", "text")
LABEL_COLUMN = "label"
SPLIT_NAMES = {"train": ("train",), "dev": ("dev", "validation", "valid", "val")}
SUFFIXES = (".tsv", ".csv", ".jsonl")
HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?(:[\w.-]+)?$")
csv.field_size_limit(1 << 24)


@dataclass
class Split:
    texts: list[str]
    labels: list[int]
    source: str

    def __len__(self) -> int:
        return len(self.texts)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for t, y in zip(self.texts, self.labels):
            h.update(t.encode())
            h.update(b"\t%d\n" % y)
        return h.hexdigest()[:16]

    def subset(self, n: int | None, seed: int) -> "Split":
        if n is None or n >= len(self):
            return self
        idx = sorted(random.Random(seed).sample(range(len(self)), n))
        return Split([self.texts[i] for i in idx], [self.labels[i] for i in idx], f"{self.source}[{n} of {len(self)}]")


SPAN_BUDGET = 20_000_000  # word spans enumerated to find phrase families; long-form text falls back to rows


def sentence_families(texts: Sequence[str], budget: int, max_samples: int,
                      seed: int) -> tuple[set[int], set[int]] | None:
    """(held-out rows, rows dropped from train): whole sentences drawn in seeded order, each with its family (every
    row that is a word span of it, duplicates included), until ``budget`` rows are taken or ``max_samples``
    sentences are held out. A sentence is a row that is no word span of another row. None where the spans would be
    too many to enumerate (long-form text, where rows are not phrases of each other): draw plain rows there."""
    norm = [" ".join(t.split()) for t in texts]
    rows: dict[str, list[int]] = {}
    for i, t in enumerate(norm):
        rows.setdefault(t, []).append(i)
    if sum(n * (n + 1) // 2 for n in (len(t.split()) for t in rows)) > SPAN_BUDGET:
        log.info("validation_unit sentence: rows too long to find phrase families; holding out rows")
        return None

    def spans(t: str) -> set[str]:
        w = t.split()
        return {" ".join(w[a:b]) for a in range(len(w)) for b in range(a + 1, len(w) + 1)} & rows.keys()

    contained = set()
    for t in rows:
        contained |= spans(t) - {t}
    sentences = sorted(t for t in rows if t not in contained)
    random.Random(seed).shuffle(sentences)
    picked: set[int] = set()
    taken: set[int] = set()
    for t in sentences:
        if len(picked) >= max_samples or len(taken) >= budget:
            break
        family = {i for s in spans(t) for i in rows[s]}
        picked.add(rows[t][0])
        taken |= family
    return picked, taken - picked


@dataclass
class TextData:
    splits: dict[str, Split]
    label_names: list[str]
    source: str
    skipped_rows: int = 0

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def hold_out(self, fraction: float, max_samples: int, seed: int, unit: str = "sentence") -> "TextData":
        """A seeded slice of train set aside as the ``heldout`` split (checkpoints are chosen on it, so dev is only
        ever reported); train keeps the rest. ``fraction`` 0: no slice, selection falls back to dev.

        ``unit`` "row": any ``fraction`` of the rows (at most ``max_samples``). "sentence": whole sentences, the rows
        that no other row contains, each taken out of train with every row that is a word span of it, until
        ``fraction`` of the rows are out or ``max_samples`` sentences are held out. SST-2's training rows are the
        phrases of its sentences' parse trees: a randomly held-out phrase is one whose sentence trains, and students
        matched their teacher on such rows while trailing it by 1.5-3.3 pt on dev (BENCHMARKS.md, issue 13)."""
        train = self.splits.get("train")
        budget = int(len(train) * fraction) if train is not None and fraction > 0 else 0
        if budget == 0:
            return self
        families = sentence_families(train.texts, budget, max_samples, seed) if unit == "sentence" else None
        if families is None:
            unit = "row"
            families = set(random.Random(seed).sample(range(len(train)), min(budget, max_samples))), set()
        picked, dropped = families
        if not picked:
            return self
        keep = [i for i in range(len(train)) if i not in picked and i not in dropped]
        held = sorted(picked)
        take = lambda idx, name: Split([train.texts[i] for i in idx], [train.labels[i] for i in idx], name)
        splits = dict(self.splits, train=take(keep, f"{train.source}[train]"),
                      heldout=take(held, f"{train.source}[held out {len(held)} {unit}s]"))
        if dropped:
            log.info("held out %d sentences of train; %d rows that are phrases of them leave train too",
                     len(held), len(dropped))
        return dataclasses.replace(self, splits=splits)

    @property
    def selection_split(self) -> str:
        """Where checkpoints are chosen: the held-out slice of train, else (no slice) dev."""
        return "heldout" if "heldout" in self.splits else "dev"

    def split(self, name: str) -> Split:
        name = canonical_split(name) or name
        if name not in self.splits:
            raise DpqError(f"{self.source}: no '{name}' split (found: {', '.join(sorted(self.splits)) or 'none'})")
        return self.splits[name]


def canonical_split(name: str) -> str | None:
    """The split ``name`` reads as ('train' or 'dev': validation, valid and val are the dev split), else None."""
    return next((s for s, aliases in SPLIT_NAMES.items() if name in aliases), None)


# ----------------------------------------------------------------------------- reading files


def _decode(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DpqError(f"{path}:{line}: not UTF-8 (byte 0x{raw[e.start]:02x}); re-save the file as UTF-8") from None


def _lines(text: str) -> list[str]:
    """The file's lines: only \\n and \\r\\n end one. ``str.splitlines`` also ends a line at U+2028, U+0085, form feed
    and vertical tab, which are characters inside a sentence (web text holds them), so it cut rows in two."""
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def _csv_records(path: Path, text: str) -> Iterator[tuple[int, list[str] | None, str]]:
    """(first line, fields, why not) of each CSV record. A quoted field may span lines and keeps its newlines."""
    reader = csv.reader((line + "\n" for line in text.split("\n")), delimiter=",")
    while True:
        start = reader.line_num + 1
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            if "field limit" in str(e):
                # an unclosed quote runs on to the end of the file: what follows cannot be told apart into rows
                raise DpqError(f"{path}:{start}: a field longer than {csv.field_size_limit() >> 20} MiB "
                               "(csv.field_size_limit); is a quote left open on this line?") from None
            said = "a carriage return inside an unquoted field" if "new-line" in str(e) else str(e)
            yield start, None, f"unreadable CSV: {said}"
            continue
        yield start, fields, ""


def _rows_delimited(path: Path, delimiter: str) -> Iterator[tuple[int, dict | None, str]]:
    text = _decode(path)
    if delimiter == "\t":
        # GLUE TSVs are unquoted and contain bare quote characters: parse fields literally
        records = ((n, line.split("\t"), "") for n, line in enumerate(_lines(text), start=1))
    else:
        records = _csv_records(path, text)
    header = None
    for n, fields, why in records:
        if header is None:
            if fields is None:
                raise DpqError(f"{path}:{n}: header line: {why}")
            header, width = fields, len(fields)
            continue
        if fields is not None and not any(f.strip() for f in fields):
            continue
        if fields is None:
            yield n, None, why
        elif len(fields) != width:
            yield n, None, f"{len(fields)} fields, header has {width}"
        else:
            yield n, dict(zip(header, fields)), ""
    if header is None:
        raise DpqError(f"{path}: empty file (expected a header line with 'sentence' and 'label')")


def _rows_jsonl(path: Path) -> Iterator[tuple[int, dict | None, str]]:
    for n, line in enumerate(_lines(_decode(path)), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            yield n, None, f"invalid JSON ({e.msg})"
            continue
        if not isinstance(obj, dict):
            yield n, None, "not a JSON object"
        else:
            yield n, obj, ""


def _header_of(path: Path) -> list[str] | None:
    if path.suffix == ".jsonl":
        return None
    text = _decode(path)
    if path.suffix == ".tsv":
        first = _lines(text)[:1]
        return first[0].split("\t") if first else []
    n, fields, why = next(_csv_records(path, text), (1, [], ""))
    if fields is None:
        raise DpqError(f"{path}:{n}: header line: {why}")
    return fields


INTEGER = re.compile(r"-?[0-9]+")  # ASCII digits, as recipe.INTEGER: int() also reads "١٢"


def _label_of(value) -> tuple[str | None, str]:
    """(the class a row's label names, else None and why). A JSONL label is a string or an integer: ``true``,
    ``1.0`` or ``[1]`` beside ``1`` would each become a class of its own, so they are malformed rows."""
    if isinstance(value, str):
        return (value.strip(), "") if value.strip() else (None, "empty label")
    if value is None:
        return None, "empty label"
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value), ""
    kind = {bool: "a boolean", float: "a floating-point number", list: "a list", dict: "an object"}.get(type(value), "")
    return None, f"label {json.dumps(value)} is {kind or type(value).__name__}, not a class name or an integer"


def _as_integer(label: str) -> int | None:
    """The integer a label spells (``1.0``, ``01``, ``+1``, ``1e0``), else None."""
    try:
        number = float(label)
    except ValueError:
        return None
    return int(number) if number.is_integer() else None


def _text_and_label(row: dict, classes: Sequence[str] | None) -> tuple[str, str] | str:
    """(text, class) of a parsed row, else why it is malformed."""
    key = next((c for c in TEXT_COLUMNS if c in row), None)
    if key is None or LABEL_COLUMN not in row:
        return "no 'sentence' or 'label' field"
    text, (label, why) = row[key], _label_of(row[LABEL_COLUMN])
    if not isinstance(text, str):  # JSONL null or a number: no sentence to learn from
        return f"text is {'null' if text is None else type(text).__name__}, not a string"
    if label is None:
        return why
    if label == LABEL_COLUMN and text.strip() in TEXT_COLUMNS and LABEL_COLUMN not in (classes or ()):
        return "the header line again: files joined together?"
    return text, label


def _stray_labels(labels: Sequence[str]) -> dict[str, str]:
    """Labels that are not classes beside integer class labels, each with why: another spelling of one of the
    integers (``1.0`` beside ``1``: pandas writes floats), or a rare non-integer among them (``true``, ``[1]``,
    ``label``). Mapping ``1.0`` to ``1`` would be unambiguous, but a file that spells one class two ways was
    produced by something else going wrong, and a user finds that out better now than in a report."""
    counts = collections.Counter(labels)
    integers = {int(v): v for v in counts if INTEGER.fullmatch(v) and str(int(v)) == v}
    if not integers:
        return {}
    smallest = min(counts[v] for v in integers.values())
    stray = {}
    for v in counts:
        if v in integers.values():
            continue
        same = _as_integer(v)
        if same in integers:
            stray[v] = f"label '{v}' is the integer label '{integers[same]}' written another way"
        elif counts[v] * 2 < smallest:  # a few odd rows among integer classes, not a class of their own
            stray[v] = f"label '{v}' among integer labels ({', '.join(sorted(integers.values(), key=int)[:5])})"
    return stray


def _read_rows(path: Path, *, skip_bad_rows: bool = False,
               classes: Sequence[str] | None = None) -> tuple[list[str], list[str], list[int], int]:
    """(texts, labels, line numbers, skipped count) of one TSV/CSV/JSONL file. ``classes``: the declared classes
    (then any label outside them is refused by ``_to_ids``, and no label is judged stray here)."""
    path = Path(path)
    if not path.is_file():
        raise DpqError(f"{path}: file not found")
    if path.suffix not in SUFFIXES:
        raise DpqError(f"{path}: unsupported file type '{path.suffix}' (use .tsv, .csv or .jsonl)")
    header = _header_of(path)
    if header is not None:
        missing = [c for c in ("sentence|text", LABEL_COLUMN) if not set(c.split("|")) & set(header)]
        if missing:
            raise DpqError(f"{path}: header has no {' or '.join(repr(m) for m in missing)} column (header: {header})")
    rows = (_rows_jsonl(path) if path.suffix == ".jsonl"
            else _rows_delimited(path, "\t" if path.suffix == ".tsv" else ","))
    texts, labels, lines, bad = [], [], [], []
    for n, row, why in rows:
        got = _text_and_label(row, classes) if row is not None else why
        if isinstance(got, str):
            bad.append((n, got))
            continue
        texts.append(got[0])
        labels.append(got[1])
        lines.append(n)
    stray = _stray_labels(labels) if classes is None else {}
    if stray:
        bad = sorted(bad + [(n, stray[y]) for n, y in zip(lines, labels) if y in stray])
        keep = [i for i, y in enumerate(labels) if y not in stray]
        texts, labels, lines = ([xs[i] for i in keep] for xs in (texts, labels, lines))
    if bad and not skip_bad_rows:
        shown = ", ".join(f"line {n} ({why})" for n, why in bad[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        declare = " (or list the classes in the recipe's data.labels)" if stray else ""
        raise DpqError(f"{path}: {len(bad)} malformed row(s): {shown}{more}; fix them or pass --skip-bad-rows"
                       f"{declare}")
    if bad:
        log.warning("%s: skipped %d malformed row(s) (first at line %d)", path, len(bad), bad[0][0])
    return texts, labels, lines, len(bad)


def read_file(path: Path, *, skip_bad_rows: bool = False) -> tuple[list[str], list[str], int]:
    """Return (texts, raw labels, skipped count) from one TSV/CSV/JSONL file."""
    texts, labels, _, skipped = _read_rows(path, skip_bad_rows=skip_bad_rows)
    return texts, labels, skipped


def _label_order(raw: Sequence[str]) -> list[str]:
    uniq = set(raw)
    if all(INTEGER.fullmatch(v) for v in uniq):
        return sorted(uniq, key=int)
    return sorted(uniq)


def _to_ids(path: str, raw: list[str], names: list[str], lines: list[int] | None = None) -> list[int]:
    index = {n: i for i, n in enumerate(names)}
    for i, v in enumerate(raw):
        if v not in index:
            where = f"line {lines[i]}" if lines else f"row {i + 1}"
            raise DpqError(f"{path}: label '{v}' ({where}) is not one of the classes {names}")
    return [index[v] for v in raw]


def _report_thin_classes(source: str, splits: dict[str, Split], names: list[str]) -> None:
    """One warning naming the classes a split lacks or that hold under 1% of the largest class's train rows: the
    classifier gets an output for every class of the data, so a stray row's class would train in silence."""
    counts = {s: [tally[i] for i in range(len(names))]
              for s, split in splits.items() for tally in [collections.Counter(split.labels)]}
    train = counts.get("train")
    thin = [i for i in range(len(names))
            if any(c[i] == 0 for c in counts.values()) or (train and train[i] * 100 < max(train))]
    if thin:
        said = ", ".join(f"'{names[i]}' ({', '.join(f'{c[i]} {s}' for s, c in counts.items())} rows)"
                         for i in thin)
        log.warning("%s: %d classes, and %s few or no rows: %s; a stray row? the model gets an output per class",
                    source, len(names), "these have" if len(thin) > 1 else "this one has", said)


def _find_split_file(folder: Path, split: str) -> Path | None:
    for stem in SPLIT_NAMES[split]:
        for suffix in SUFFIXES:
            if (folder / f"{stem}{suffix}").is_file():
                return folder / f"{stem}{suffix}"
    return None


def load_files(train: Path | None, dev: Path | None, *, labels: list[str] | None = None,
               skip_bad_rows: bool = False, source: str = "") -> TextData:
    raw: dict[str, tuple[Path, list[str], list[str], list[int]]] = {}
    skipped = 0
    declared = None if labels is None else [str(v) for v in labels]
    for name, path in (("train", train), ("dev", dev)):
        if path is None:
            continue
        texts, y, lines, s = _read_rows(path, skip_bad_rows=skip_bad_rows, classes=declared)
        skipped += s
        if not texts:
            raise DpqError(f"{path}: the {name} split is empty")
        raw[name] = (path, texts, y, lines)
    if declared is None:
        base = raw.get("train") or raw.get("dev")
        declared = _label_order(base[2])
    labels = declared
    if len(labels) < 2:
        raise DpqError(f"{source}: only one class ({labels}) found; a classifier needs at least two")
    splits = {name: Split(texts, _to_ids(str(path), y, labels, lines), str(path))
              for name, (path, texts, y, lines) in raw.items()}
    source = source or str(train or dev)
    _report_thin_classes(source, splits, labels)
    return TextData(splits, labels, source, skipped)


def load_hub(spec: str, *, labels: list[str] | None = None) -> TextData:
    import datasets
    from datasets.exceptions import DatasetsError

    name, _, config = spec.partition(":")
    try:
        ds = datasets.load_dataset(name, config or None)
    # offline or unreachable, unknown or gated id (OSError), unknown config (ValueError), unusable files on the Hub
    except (OSError, ValueError, DatasetsError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DpqError(f"data '{spec}': not a local path and could not be loaded from the Hugging Face Hub "
                       f"({first[:200]})") from None
    splits = {}
    label_names = labels
    for split, aliases in SPLIT_NAMES.items():
        key = next((a for a in aliases if a in ds), None)
        if key is None:
            continue
        part = ds[key]
        text_col = next((c for c in TEXT_COLUMNS if c in part.column_names), None)
        if text_col is None or LABEL_COLUMN not in part.column_names:
            raise DpqError(f"data '{spec}': split '{key}' has no sentence/label columns ({part.column_names})")
        if label_names is None:
            feat = part.features[LABEL_COLUMN]
            label_names = list(getattr(feat, "names", None) or _label_order([str(v) for v in part[LABEL_COLUMN]]))
        ys = [int(v) for v in part[LABEL_COLUMN]]
        bad = [i for i, v in enumerate(ys) if not 0 <= v < len(label_names)]
        if bad:
            raise DpqError(f"data '{spec}': split '{key}' row {bad[0] + 1} has label {ys[bad[0]]} "
                           f"outside the classes {label_names}")
        splits[split] = Split(list(part[text_col]), ys, f"{spec}/{key}")
    if not splits:
        raise DpqError(f"data '{spec}': no train or validation split")
    _report_thin_classes(spec, splits, list(map(str, label_names)))
    return TextData(splits, list(map(str, label_names)), spec)


def data_files(spec: str | os.PathLike) -> dict[str, Path] | None:
    """The local files ``load_data(spec)`` reads, by split; None for a hub id (keyed by its id and config)."""
    spec_s = str(spec)
    path = Path(spec_s).expanduser()
    if path.is_dir():
        return {s: f for s in SPLIT_NAMES if (f := _find_split_file(path, s)) is not None}
    if "," in spec_s:
        return {s: p for s, p in zip(SPLIT_NAMES, (Path(x.strip()).expanduser() for x in spec_s.split(",")))
                if p.is_file()}
    return {} if path.exists() else None


# ----------------------------------------------------------------------------- content digests

_DIGESTS: dict[str, tuple[list, str]] = {}
_RACY_NS = 2_000_000_000  # a file written this recently may change again within its timestamps' resolution
_unwritable_cache_said = False


def file_digest(path: Path) -> str:
    """The sha256 of a file's bytes (as ``artifacts.sha256_file``), read once per version of the file: remembered
    by its path, size, mtime, ctime and inode, in this process and in $DPQ_CACHE/file-digests, so a 400 MB model
    is not read again by every `dpq run`. An edit in place changes mtime and ctime, a replacement the inode too.
    A cache that cannot be written costs a re-read next time (said once), never the run."""
    from .artifacts import sha256_file
    from .models import cache_dir

    path = Path(path).resolve()
    st = path.stat()
    stamp = [str(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    name = hashlib.sha256(str(path).encode()).hexdigest()[:32]
    if name in _DIGESTS and _DIGESTS[name][0] == stamp:
        return _DIGESTS[name][1]
    entry = cache_dir() / "file-digests" / f"{name}.json"
    try:
        got = json.loads(entry.read_text())
        if got["stamp"] == stamp and re.fullmatch(r"[0-9a-f]{64}", got["sha256"]):
            _DIGESTS[name] = (stamp, got["sha256"])
            return got["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    digest = sha256_file(path)
    # a file changed again within its timestamps' resolution would keep its stamp: remember settled files only
    if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > _RACY_NS:
        _DIGESTS[name] = (stamp, digest)
        _write_digest(entry, {"stamp": stamp, "sha256": digest})
    return digest


def _write_digest(entry: Path, record: dict) -> None:
    global _unwritable_cache_said
    from .artifacts import write_json_atomic

    try:
        write_json_atomic(entry, record)
    except OSError as e:
        if not _unwritable_cache_said:
            _unwritable_cache_said = True
            log.warning("cannot write the file-digest cache %s (%s); hashing in memory, files are read again "
                        "next run", entry.parent, e.strerror or e)


def data_content(spec: str | os.PathLike) -> dict[str, str] | None:
    """What a stage's key holds of the data: each local split file's sha256 (16 hex digits); None for a hub id."""
    files = data_files(spec)
    return None if files is None else {s: file_digest(f)[:16] for s, f in files.items()}


def load_data(spec: str | os.PathLike, *, labels: list[str] | None = None, skip_bad_rows: bool = False,
              need: Sequence[str] = ("train", "dev")) -> TextData:
    """Load ``spec``: a folder of split files, ``TRAIN,DEV`` file paths, or a hub id like ``nyu-mll/glue:sst2``."""
    spec_s = str(spec)
    path = Path(spec_s).expanduser()
    unknown = [s for s in need if canonical_split(s) is None]
    if unknown:
        raise DpqError(f"no '{unknown[0]}' split: dpq reads {', '.join(n for a in SPLIT_NAMES.values() for n in a)}")
    need = [canonical_split(s) for s in need]
    if path.is_dir():
        found = {s: _find_split_file(path, s) for s in SPLIT_NAMES}
        for s in need:
            if found[s] is None:
                want = " or ".join(f"{SPLIT_NAMES[s][0]}{x}" for x in SUFFIXES)
                raise DpqError(f"{path}: no {s} split (expected {want})")
        data = load_files(found["train"] if "train" in need else None, found["dev"] if "dev" in need else None,
                          labels=labels, skip_bad_rows=skip_bad_rows, source=str(path))
    elif "," in spec_s:
        parts = [Path(p.strip()).expanduser() for p in spec_s.split(",")]
        if len(parts) != 2:
            raise DpqError(f"data '{spec_s}': give a folder, or exactly two files TRAIN,DEV")
        data = load_files(parts[0], parts[1], labels=labels, skip_bad_rows=skip_bad_rows, source=spec_s)
    elif path.is_file():
        raise DpqError(f"{path}: give the folder holding train/dev files, or TRAIN,DEV file paths")
    elif HUB_ID.match(spec_s) and not spec_s.startswith((".", "/", "~")):
        data = load_hub(spec_s, labels=labels)
    else:
        raise DpqError(f"data '{spec_s}': no such file or folder")
    for s in need:
        data.split(s)
    return data


# ----------------------------------------------------------------------------- batching


def truncate_ids(ids: list[int], max_length: int) -> tuple[list[int], bool]:
    """``ids`` cut to ``max_length`` keeping the closing special token; and whether it was cut."""
    if len(ids) <= max_length:
        return ids, False
    return ids[: max_length - 1] + ids[-1:], True


def tokenize(tokenizer, texts: Sequence[str], max_length: int) -> tuple[list[list[int]], int]:
    """Token ids without padding; returns (ids, number of texts truncated to ``max_length``)."""
    enc = tokenizer(list(texts), truncation=False, add_special_tokens=True)["input_ids"]
    truncated = 0
    out = []
    for ids in enc:
        ids, cut = truncate_ids(ids, max_length)
        truncated += cut
        out.append(ids)
    if truncated:
        log.warning("%d of %d texts longer than %d tokens were truncated", truncated, len(texts), max_length)
    return out, truncated


@dataclass
class EncodedSplit(torch.utils.data.Dataset):
    """Tokenized examples; ``extra`` holds per-example id lists for a second tokenizer (the teacher's)."""

    input_ids: list[list[int]]
    labels: list[int]
    extra: dict[str, list[list[int]]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict:
        item = {"input_ids": self.input_ids[i], "labels": self.labels[i], "index": i}
        for k, v in self.extra.items():
            item[k] = v[i]
        return item

    @property
    def lengths(self) -> list[int]:
        return [len(x) for x in self.input_ids]

    def mean_length(self) -> float:
        return sum(self.lengths) / max(1, len(self))


def encode_split(split: Split, tokenizer, max_length: int, teacher_tokenizer=None) -> EncodedSplit:
    ids, _ = tokenize(tokenizer, split.texts, max_length)
    extra = {}
    if teacher_tokenizer is not None:
        extra["teacher_input_ids"], _ = tokenize(teacher_tokenizer, split.texts, max_length)
    return EncodedSplit(ids, list(split.labels), extra)


def pad_id(tokenizer) -> int:
    """The id padded positions carry: the tokenizer's pad token, else 0 (the mask hides them either way)."""
    return 0 if tokenizer.pad_token_id is None else tokenizer.pad_token_id


def pad_ids(tokenizer, teacher_tokenizer=None) -> dict[str, int]:
    """Pad ids of a batch's id columns: the student's, and the teacher's where the batch carries its inputs too."""
    ids = {"input_ids": pad_id(tokenizer)}
    if teacher_tokenizer is not None:
        ids["teacher_input_ids"] = pad_id(teacher_tokenizer)
    return ids


class Collator:
    """Pads every ``*input_ids`` field to the longest in the batch and adds its attention mask."""

    def __init__(self, pad_ids: dict[str, int]):
        self.pad_ids = pad_ids

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        batch: dict[str, torch.Tensor] = {
            "labels": torch.tensor([it["labels"] for it in items]),
            "index": torch.tensor([it["index"] for it in items]),
        }
        for key, pad in self.pad_ids.items():
            seqs = [it[key] for it in items]
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), pad, dtype=torch.long)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            for r, s in enumerate(seqs):
                ids[r, : len(s)] = torch.tensor(s)
                mask[r, : len(s)] = 1
            prefix = key[: -len("input_ids")]
            batch[key] = ids
            batch[f"{prefix}attention_mask"] = mask
        return batch


class LengthBucketSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of similar-length examples, in an order fixed by (seed, epoch) so a resumed run sees the same data.

    Shuffle, cut into pools of ``pool`` batches, sort each pool by length, cut into batches, shuffle the batches.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, *, shuffle: bool, seed: int = 0, pool: int = 50):
        if batch_size < 1:
            raise DpqError(f"batch size must be at least 1 (got {batch_size})")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.pool = pool
        self.epoch = 0
        self.start = 0
        self.shard_index, self.shards = 0, 1

    def shard(self, index: int, count: int) -> "LengthBucketSampler":
        """Yield only process ``index``'s share of every batch (of ``count`` processes), so N processes step through
        the same global batches as one. Accelerate's own batch sharding drops every batch shorter than the batch
        size that is not the last, and bucketing puts such batches anywhere in the epoch."""
        self.shard_index, self.shards = index, count
        return self

    def seek(self, epoch: int, start_batch: int = 0) -> None:
        """Where the next pass starts. Not ``set_epoch``: Accelerate's loader calls that with its own pass count,
        which would undo a resumed run's position."""
        self.epoch, self.start = epoch, start_batch

    def batches(self) -> list[list[int]]:
        idx = list(range(len(self.lengths)))
        if not self.shuffle:
            idx.sort(key=lambda i: self.lengths[i])
            return [idx[i : i + self.batch_size] for i in range(0, len(idx), self.batch_size)]
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        rng.shuffle(idx)
        span = self.batch_size * self.pool
        out = []
        for p in range(0, len(idx), span):
            chunk = sorted(idx[p : p + span], key=lambda i: self.lengths[i])
            out += [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        rng.shuffle(out)
        return out

    def __iter__(self) -> Iterator[list[int]]:
        for b in self.batches()[self.start :]:
            # a batch smaller than the process count repeats its first example rather than leave a process idle
            yield b[self.shard_index :: self.shards] or b[:1]

    def __len__(self) -> int:
        return max(0, -(-len(self.lengths) // self.batch_size) - self.start)


def make_loader(ds: EncodedSplit, pad_ids: dict[str, int], batch_size: int, *, shuffle: bool, seed: int = 0,
                workers: int = 0, pin_memory: bool = False, shard: tuple[int, int] = (0, 1)):
    """``workers`` > 0 collates in worker processes (a GPU then never waits for padding); ``pin_memory`` lets the
    copies to the GPU run asynchronously."""
    sampler = LengthBucketSampler(ds.lengths, batch_size, shuffle=shuffle, seed=seed).shard(*shard)
    # a private generator: creating an iterator must not draw from the global RNG, or a resumed run's
    # dropout masks would differ from an uninterrupted one's
    return torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=Collator(pad_ids),
                                       generator=torch.Generator().manual_seed(seed), num_workers=workers,
                                       pin_memory=pin_memory, persistent_workers=workers > 0)
