"""Labelled data for fine-tuning: (text, label) pairs for classification, instruction records for SFT.

Pre-training needs only text; fine-tuning needs an answer for every example. Two shapes cover the
classic cases (Radford et al. 2018 fine-tune GPT on labelled sentences; Ouyang et al. 2022 and
Raschka's "LLMs from scratch" ch. 7 on instruction/input/output records):

    classification_data("sentiment")   offline default: generated movie-review sentences with negation
                                       and contrast, so a bag of words cannot solve it but a Transformer can
    classification_data("sst2")        SST-2 (GLUE), downloaded once, each file checked by sha256
    classification_data("x.csv")       a local .csv/.tsv/.jsonl/.json with a text and a label column
    instruction_records("tasks")       offline default: generated instructions with exact answers
    instruction_records("alpaca-1100") the 1,100 records of LLMs-from-scratch ch. 7, checked by sha256
    instruction_records("x.jsonl")     a local .json (a list) or .jsonl file of such records

Bad input fails at once with a one-line ValueError naming the file, the row and what to change: a
mislabelled row trains a model without any other sign. Rows count from 1, a header not counted.
"""

from __future__ import annotations

import csv
import difflib
import io
import json
import random
import urllib.error
import zipfile
from dataclasses import dataclass
from pathlib import Path

from minillm.data import corpora
from minillm.files import write_bytes

SST2_URL = "https://dl.fbaipublicfiles.com/glue/data/SST-2.zip"
SST2_SHA256 = {"train.tsv": "48eac26399f8456935f81dd9e3a745c1430adb6c62e233ccfe22db4a0d15d1d1",
               "dev.tsv": "54a9c12c77e402fc14d6a66a506f24d999f596b0176eb777c972cccc2f9cc4b0"}
ALPACA_URL = ("https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/01_main-chapter-code/"
              "instruction-data.json")
ALPACA_SHA256 = "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944"
EXTENSIONS = (".csv", ".tsv", ".jsonl", ".json")


@dataclass
class ClassificationData:
    train: list[tuple[str, int]]  # (text, label id)
    dev: list[tuple[str, int]]    # held out: never seen by the optimizer
    labels: list[str]             # label id -> name, so predictions print as words
    source: str                   # "sst2", "sentiment (generated)", or the file path


# --- local files ----------------------------------------------------------------------------------

def _rows(path: Path) -> tuple[list[str], list[dict]]:
    """(column names, rows as dicts) of a .csv/.tsv/.jsonl/.json file."""
    if not path.is_file():
        raise ValueError(f"{path}: no such file; check the path")
    if path.suffix not in EXTENSIONS:
        raise ValueError(f"{path}: unknown extension {path.suffix!r}; use one of {', '.join(EXTENSIONS)}")
    try:  # utf-8-sig: a byte-order mark (Excel writes one) must not become part of the first column name
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason}); convert it first") from None
    if path.suffix in (".csv", ".tsv"):
        # One document can be longer than csv's 128 KiB default field limit; 2**31-1 fits any C long.
        csv.field_size_limit(2**31 - 1)
        # TSV by definition has no quoting: a sentence starting with `"` would otherwise swallow lines.
        reader = (csv.DictReader(io.StringIO(text, newline="")) if path.suffix == ".csv" else
                  csv.DictReader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE))
        return list(reader.fieldnames or []), list(reader)
    try:
        if path.suffix == ".json":
            rows = json.loads(text)
        else:
            rows = []
            for i, line in enumerate(text.splitlines()):
                if line.strip():
                    rows.append(json.loads(line))
    except json.JSONDecodeError as e:  # in a .jsonl file, e.lineno counts within the one line
        raise ValueError(f"{path}: not valid JSON at line {i + 1 if path.suffix == '.jsonl' else e.lineno} "
                         f"({e.msg})") from None
    except RecursionError:  # [[[[...]]]] thousands deep: Python's parser recurses once per level
        raise ValueError(f"{path}: JSON nested too deeply to read (a record is an object of strings)") from None
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of objects, got a {type(rows).__name__}")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{path}: row {i + 1} is a {type(row).__name__}, expected an object")
    return (list(rows[0]) if rows else []), rows


def _check_column(path: Path, columns: list[str], column: str, what: str) -> None:
    if column not in columns:
        close = difflib.get_close_matches(column, columns, n=2)
        hint = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
        raise ValueError(f"{path}: no {what} column {column!r}{hint}; its columns are "
                         f"{', '.join(map(repr, columns)) or 'none'}; pass {what}_column=NAME")


def read_labelled(path: str | Path, text_column: str = "text",
                  label_column: str = "label") -> tuple[list[str], list]:
    """Texts (stripped) and raw label values of a labelled .csv/.tsv (header row), .jsonl or .json file."""
    path = Path(path).expanduser()
    columns, rows = _rows(path)
    if not columns and not rows:
        raise ValueError(f"{path} is empty; it needs a header (or JSON objects) and at least one row")
    _check_column(path, columns, text_column, "text")
    _check_column(path, columns, label_column, "label")
    if not rows:
        raise ValueError(f"{path} has a header but 0 rows; add labelled rows")
    texts, labels = [], []
    for i, row in enumerate(rows, start=1):
        for column in (text_column, label_column):  # a short csv row (None), a JSON object without the key
            if column not in row or (row[column] is None and path.suffix in (".csv", ".tsv")):
                raise ValueError(f"{path}: row {i} has no value for column {column!r}; fill it in or remove "
                                 "the row")
        text = row[text_column]
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{path}: row {i}: text {text!r} is empty or not a string; fill it in or remove "
                             "the row")
        texts.append(text.strip())
        labels.append(row[label_column])
    return texts, labels


def _int_like(value) -> bool:
    # bool is an int subclass in Python, but True as a class id is almost always a mistake upstream.
    return (isinstance(value, int) and not isinstance(value, bool)) or (
        isinstance(value, str) and value.strip().isascii() and value.strip().isdigit())


MAX_LABEL_ID = 9_999  # integer labels are class ids: at most 10,000 classes (one head row per class)


def encode_labels(raw_labels: list, labels: list[str] | None = None,
                  where: str = "labels") -> tuple[list[int], list[str]]:
    """Label ids and the names they stand for.

    Ints, and strings of ASCII digits (a .csv/.tsv cell is always a string: SST-2's "0"/"1"), stay
    ids: names "0".."max", so the ids mean what the file meant. Otherwise every label is a name (an int
    by its digits) and the sorted unique names get ids 0, 1, ... Given `labels` (the training set's
    names), every label maps by name the same way, and a name not among them is an error. `where`
    names the data in messages (a path).
    """
    for i, value in enumerate(raw_labels, start=1):
        if not isinstance(value, (int, str)) or isinstance(value, bool):
            raise ValueError(f"{where}: row {i}: label {value!r} is a {type(value).__name__}; labels must be "
                             "ints (class ids) or strings (class names)")
        if isinstance(value, str) and not value.strip():
            raise ValueError(f"{where}: row {i} has an empty label; fill it in or remove the row")
        if isinstance(value, int) and value < 0:
            raise ValueError(f"{where}: row {i}: label {value} is negative; ids count from 0 (or use names)")
    int_ids = all(_int_like(v) for v in raw_labels)
    if int_ids:  # ids 0..max become max+1 classes: an id of 10**30 would build a list that long
        for i, value in enumerate(raw_labels, start=1):
            digits = str(value).strip()
            if len(digits.lstrip("0")) > len(str(MAX_LABEL_ID)) or int(digits) > MAX_LABEL_ID:
                shown = digits if len(digits) <= 24 else f"{digits[:10]}...({len(digits)} digits)"
                raise ValueError(f"{where}: row {i}: label id {shown} is above {MAX_LABEL_ID:,}; integer labels "
                                 f"are class ids 0..N-1 (at most {MAX_LABEL_ID + 1:,} classes): renumber them, "
                                 "or write the labels as names")
    names = [str(int(v)) if int_ids else str(v).strip() for v in raw_labels]
    if labels is None:
        labels = ([str(i) for i in range(max(map(int, names)) + 1)] if int_ids and names
                  else sorted(set(names)))
    index = {name: i for i, name in enumerate(labels)}
    for i, name in enumerate(names, start=1):
        if name not in index:
            raise ValueError(f"{where}: row {i}: label {name!r} was not seen in training (labels: "
                             f"{', '.join(labels)}); fix the row or add the class to the training data")
    return [index[name] for name in names], list(labels)


def split_records(records: list, dev_fraction: float, seed: int = 0, name: str = "data") -> tuple[list, list]:
    """A seeded random (train, dev) split; each keeps the records' original order."""
    if not 0 < dev_fraction < 1:
        raise ValueError(f"{name}: dev_fraction must be between 0 and 1, got {dev_fraction}")
    n_dev = round(len(records) * dev_fraction)
    if n_dev == 0 or n_dev == len(records):
        raise ValueError(f"{name}: {len(records)} rows with dev_fraction={dev_fraction} leave an empty "
                         f"{'dev' if n_dev == 0 else 'train'} split; change dev_fraction or add rows")
    dev_ids = set(random.Random(seed).sample(range(len(records)), n_dev))
    return ([r for i, r in enumerate(records) if i not in dev_ids],
            [r for i, r in enumerate(records) if i in dev_ids])


# --- downloads ------------------------------------------------------------------------------------

def _cache(cache_dir: str | Path | None) -> Path:  # the user's cache folder, as for tiny-shakespeare
    return Path(cache_dir) if cache_dir is not None else corpora.default_cache_dir()


def _intact(path: Path, sha256: str) -> bool:
    return path.is_file() and corpora.sha256_hex(path.read_bytes()) == sha256


def _download(url: str, what: str, manual: str) -> bytes:
    try:
        return corpora._fetch(url)  # looked up at call time so tests can replace it
    except (urllib.error.URLError, OSError) as e:
        raise FileNotFoundError(f"could not download {what} from {url} ({e}). If you are offline, "
                                f"{manual}") from None


def _verified(data: bytes, expected: str, what: str) -> bytes:
    digest = corpora.sha256_hex(data)
    if digest != expected:
        raise ValueError(f"{what} has sha256 {digest}, expected {expected}; refusing to use it (a proxy or a "
                         "changed file?)")
    return data


def sst2_files(cache_dir: str | Path | None = None) -> tuple[Path, Path]:
    """Paths of SST-2's train.tsv and dev.tsv: from cache_dir/sst2/ if intact, else from the GLUE zip."""
    folder = _cache(cache_dir) / "sst2"
    paths = tuple(folder / name for name in ("train.tsv", "dev.tsv"))
    if all(_intact(p, SST2_SHA256[p.name]) for p in paths):
        return paths
    data = _download(SST2_URL, "SST-2", f"copy GLUE's SST-2/train.tsv and SST-2/dev.tsv into {folder}/")
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = {p.name: archive.read(f"SST-2/{p.name}") for p in paths}
    except (zipfile.BadZipFile, KeyError) as e:
        raise ValueError(f"downloaded {SST2_URL} is not the GLUE SST-2 zip ({e}); refusing to use it") from None
    for name, member in members.items():  # check both before writing either: all or nothing in the cache
        _verified(member, SST2_SHA256[name], f"SST-2 {name} from {SST2_URL}")
    for path in paths:
        write_bytes(path, members[path.name])  # atomic: a concurrent reader sees no file or the whole file
    return paths


def alpaca_file(cache_dir: str | Path | None = None) -> Path:
    """Path of LLMs-from-scratch's instruction-data.json in the cache, downloaded and verified if needed."""
    path = _cache(cache_dir) / "instructions" / "instruction-data.json"
    if _intact(path, ALPACA_SHA256):
        return path
    data = _download(ALPACA_URL, "the instruction data", f"copy instruction-data.json to {path}")
    write_bytes(path, _verified(data, ALPACA_SHA256, f"instruction-data.json from {ALPACA_URL}"))
    return path


# --- generated tasks: the offline defaults --------------------------------------------------------

GOOD = "good great moving brilliant charming gripping delightful wonderful funny clever touching superb".split()
BAD = "bad dull boring awful clumsy tedious weak bland messy predictable lifeless shallow".split()
NOUNS = "plot acting film score script dialogue direction cast ending pacing story soundtrack".split()
INTENSIFIERS = ("", "very ", "really ", "truly ", "quite ", "remarkably ", "surprisingly ")


def _clause(rng: random.Random, positive: bool, p_not: float) -> str:
    """A predicate of the wanted polarity: "very good", or (with chance p_not) a negated opposite: "not bad"."""
    if rng.random() < p_not:
        return f"{rng.choice(('not', 'never', 'not at all'))} {rng.choice(BAD if positive else GOOD)}"
    return rng.choice(INTENSIFIERS) + rng.choice(GOOD if positive else BAD)


def _review(rng: random.Random, positive: bool) -> str:
    """One review sentence. Negation flips an adjective, and in a contrast the clause after "but" (or
    the main clause after "although") decides: swapping the clauses keeps every word and flips the
    label. Counting words gets about 58% of seed 0's dev set right (naive Bayes), counting word pairs
    about 89% (logistic regression); only reading in order can reach 100%."""
    n1, n2 = rng.sample(NOUNS, 2)
    kind = rng.random()
    if kind < 0.5:  # plain or negated, half and half
        return f"the {n1} is {_clause(rng, positive, p_not=0.5)}."
    first, last = _clause(rng, not positive, 0.25), _clause(rng, positive, 0.25)
    if kind < 0.85:
        return rng.choice((f"the {n1} is {first} at first but ultimately {last}.",
                           f"the {n1} is {first}, but the {n2} is {last}.",
                           f"although the {n1} is {first}, the {n2} is {last}."))
    return f"the {n1} is {_clause(rng, positive, 0.25)} and the {n2} is {last}."  # both agree


def _distinct(make, n: int, what: str) -> list:
    """n distinct results of make(i): a repeated example would otherwise land in both train and dev."""
    seen, out = set(), []
    for _ in range(50 * n):  # enough tries for any n the word lists can reach; a hard stop beyond that
        if len(out) == n:
            break
        item = make(len(out))
        if item not in seen:
            seen.add(item)
            out.append(item)
    if len(out) < n:
        raise ValueError(f"could generate only {len(out)} distinct {what}, not {n}; ask for fewer")
    return out


def sentiment_pairs(n_train: int = 4000, n_dev: int = 500, seed: int = 0) -> tuple[list, list]:
    """Generated (sentence, label) train and dev pairs, 0 = negative, 1 = positive; no sentence in both."""
    rng = random.Random(seed)
    # Labels alternate, so the classes are exactly balanced before the shuffle.
    pairs = _distinct(lambda i: (_review(rng, bool(i % 2)), i % 2), n_train + n_dev, "sentences")
    rng.shuffle(pairs)
    return pairs[:n_train], pairs[n_train:]


WORDS = ("tiger apple river candle garden mirror pencil rocket violin window planet basket dragon forest "
         "jacket lemon castle island kitten ladder monkey orange parrot rabbit saddle turtle wizard zebra").split()
PLURALS = dict(cat="cats", box="boxes", city="cities", child="children", mouse="mice", leaf="leaves", foot="feet",
               tooth="teeth", person="people", woman="women", knife="knives", baby="babies", bus="buses",
               goose="geese", sheep="sheep", hero="heroes", wolf="wolves", story="stories", dish="dishes",
               toy="toys", ox="oxen", cactus="cacti")
OPPOSITES = dict(hot="cold", big="small", fast="slow", happy="sad", light="dark", early="late", strong="weak",
                 rich="poor", full="empty", high="low", hard="soft", up="down", win="lose", buy="sell",
                 push="pull", first="last", true="false", inside="outside", above="below", left="right")
OPPOSITES.update({v: k for k, v in OPPOSITES.items()})


def _task(rng: random.Random, kind: int) -> tuple[str, str, str]:
    """(instruction, input, output) of one of six kinds, each with exactly one right answer."""
    word = rng.choice(WORDS)
    if kind == 0:
        return "Reverse the following word.", word, word[::-1]
    if kind == 1:
        phrase = " ".join(rng.sample(WORDS, 2))
        return "Convert the following text to uppercase.", phrase, phrase.upper()
    if kind == 2:
        noun = rng.choice(sorted(PLURALS))
        return f'What is the plural of "{noun}"?', "", PLURALS[noun]
    if kind == 3:
        letters = rng.sample("abcdefghijklmnopqrstuvwxyz", rng.randint(3, 6))
        return "Sort these letters alphabetically.", " ".join(letters), " ".join(sorted(letters))
    if kind == 4:
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        return "Add these two numbers.", f"{a} + {b}", str(a + b)
    word = rng.choice(sorted(OPPOSITES))
    return f'Give the opposite of "{word}".', "", OPPOSITES[word]


def instruction_tasks(n: int = 600, seed: int = 0) -> list[dict]:
    """n distinct generated records of random kinds (the kinds with few answers, like plurals, run out
    of new records first and the others fill in)."""
    rng = random.Random(seed)
    triples = _distinct(lambda i: _task(rng, rng.randrange(6)), n, "instruction records")
    rng.shuffle(triples)
    return [dict(instruction=a, input=b, output=c) for a, b, c in triples]


# --- the two entry points -------------------------------------------------------------------------

def classification_data(source: str | Path = "sentiment", *, text_column: str = "text",
                        label_column: str = "label", dev_path: str | Path | None = None,
                        dev_fraction: float = 0.1, cache_dir: str | Path | None = None, seed: int = 0,
                        n_train: int = 4000, n_dev: int = 500) -> ClassificationData:
    """Train and dev (text, label id) pairs of "sentiment" (generated; n_train/n_dev), "sst2", or a file.

    A file's dev split is `dev_path` if given (its labels mapped by the training names), else a seeded
    random `dev_fraction` of its rows, with label names taken from the whole file.
    """
    if str(source) == "sentiment":
        train, dev = sentiment_pairs(n_train, n_dev, seed)
        return ClassificationData(train, dev, ["negative", "positive"], "sentiment (generated)")
    if str(source) == "sst2":
        train_path, dev_path = sst2_files(cache_dir)
        text_column, label_column = "sentence", "label"
    else:
        train_path = _local(source, ("sentiment", "sst2"))
    texts, raw = read_labelled(train_path, text_column, label_column)
    ids, labels = encode_labels(raw, where=str(train_path))
    pairs = list(zip(texts, ids))
    if dev_path is None:
        train, dev = split_records(pairs, dev_fraction, seed, name=str(train_path))
    else:
        dev_texts, dev_raw = read_labelled(dev_path, text_column, label_column)
        train, dev = pairs, list(zip(dev_texts, encode_labels(dev_raw, labels, where=str(dev_path))[0]))
    if str(source) == "sst2":  # GLUE: 0 = negative, 1 = positive
        return ClassificationData(train, dev, ["negative", "positive"], "sst2")
    return ClassificationData(train, dev, labels, str(train_path))


def _check_records(records: list[dict], where: str) -> list[dict]:
    """Records as {"instruction", "input", "output"} strings; a missing "input" means no context ("")."""
    if not records:
        raise ValueError(f"{where} has no records; add some")
    for i, record in enumerate(records, start=1):
        for key in ("instruction", "output", "input"):
            value = record.get(key, "" if key == "input" else None)
            if key not in record and key != "input":
                raise ValueError(f"{where}: row {i} has no {key!r} key (it has {', '.join(map(repr, record))})")
            if not isinstance(value, str) or (key != "input" and not value.strip()):
                raise ValueError(f"{where}: row {i}: {key!r} is {value!r}; it must be a non-empty string")
    return [dict(instruction=r["instruction"], input=r.get("input", ""), output=r["output"]) for r in records]


def _local(source: str | Path, names: tuple[str, ...]) -> Path:
    """A source that is not a name must be a file; a near-miss of a name gets a hint."""
    path = Path(source).expanduser()
    if not path.is_file():
        close = difflib.get_close_matches(str(source), names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"{source}: no such file, and not one of {', '.join(names)}{hint}; check the path")
    return path


def instruction_records(source: str | Path = "tasks", *, cache_dir: str | Path | None = None,
                        n: int = 600, seed: int = 0) -> list[dict]:
    """{"instruction", "input", "output"} records of "tasks" (generated; n, seed), "alpaca-1100", or a
    local .json/.jsonl file."""
    if str(source) == "tasks":
        return instruction_tasks(n, seed)
    path = alpaca_file(cache_dir) if str(source) == "alpaca-1100" else _local(source, ("tasks", "alpaca-1100"))
    if path.suffix not in (".json", ".jsonl"):
        raise ValueError(f"{path}: unknown extension {path.suffix!r} for instruction records; use .json or .jsonl")
    return _check_records(_rows(path)[1], str(path))
