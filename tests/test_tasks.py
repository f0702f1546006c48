"""Labelled data for fine-tuning (minillm/data/tasks.py): the four file formats, label ids, one-line
errors for bad input, SST-2 and the instruction set downloaded and checked by sha256 (with the network
replaced by a fake `_fetch` and the expected digests by those of tiny files), and the generated tasks."""

import collections
import io
import json
import math
import re
import urllib.error
import zipfile

import pytest

from minillm.data import corpora, tasks
from minillm.data.tasks import (BAD, GOOD, classification_data, encode_labels, instruction_records,
                                read_labelled, split_records)

ROWS = [("  a fine film ", "pos"), ("a dull film", "neg"), ("moving", "pos")]


def write_rows(path, rows, text_column="text", label_column="label"):
    """`rows` as a file of the format path's suffix says."""
    if path.suffix in (".csv", ".tsv"):
        sep = "," if path.suffix == ".csv" else "\t"
        lines = [f"{a}{sep}{b}\n" for a, b in [(text_column, label_column), *rows]]
        path.write_text("".join(lines), encoding="utf-8")
    else:
        objs = [{text_column: t, label_column: y} for t, y in rows]
        path.write_text(json.dumps(objs) if path.suffix == ".json" else "\n".join(map(json.dumps, objs)),
                        encoding="utf-8")
    return path


# --- files and labels -----------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".json"])
def test_each_format_reads_stripped_texts_and_raw_labels(tmp_path, suffix):
    path = write_rows(tmp_path / f"data{suffix}", ROWS, "review", "stars")
    texts, labels = read_labelled(path, text_column="review", label_column="stars")
    assert texts == ["a fine film", "a dull film", "moving"]
    assert labels == ["pos", "neg", "pos"]


def test_csv_quoting_and_fields_beyond_the_default_size_limit(tmp_path):
    long = "x" * 200_000  # more than csv's 128 KiB default field limit
    path = tmp_path / "d.csv"
    path.write_text(f'text,label\n"good, really",1\n{long},0\n', encoding="utf-8")
    assert read_labelled(path) == (["good, really", long], ["1", "0"])


def test_string_labels_map_sorted_and_dev_maps_the_same_way(tmp_path):
    train = write_rows(tmp_path / "train.jsonl", [("a", "pos"), ("b", "neutral"), ("c", "neg")])
    dev = write_rows(tmp_path / "dev.csv", [("d", "pos"), ("e", "neg")])
    data = classification_data(train, dev_path=dev)
    assert data.labels == ["neg", "neutral", "pos"]
    assert data.train == [("a", 2), ("b", 1), ("c", 0)]
    assert data.dev == [("d", 2), ("e", 0)]  # not [0, 1]: dev has no "neutral", ids still follow training
    assert data.source == str(train)


def test_int_labels_and_digit_strings_stay_ids():
    assert encode_labels([2, 0, 0]) == ([2, 0, 0], ["0", "1", "2"])
    assert encode_labels(["1", "0", " 1"]) == ([1, 0, 1], ["0", "1"])  # a csv cell is always a string
    assert encode_labels([1], labels=["0", "1"]) == ([1], ["0", "1"])


def test_a_file_without_dev_path_is_split_by_seed(tmp_path):
    rows = [(f"text {i}", "ab"[i % 2]) for i in range(50)]
    path = write_rows(tmp_path / "d.tsv", rows)
    data = classification_data(path, dev_fraction=0.2, seed=1)
    assert len(data.train) == 40 and len(data.dev) == 10 and data.labels == ["a", "b"]
    assert sorted(data.train + data.dev) == sorted((t, "ab".index(y)) for t, y in rows)
    assert classification_data(path, dev_fraction=0.2, seed=1) == data
    assert classification_data(path, dev_fraction=0.2, seed=2).dev != data.dev


def test_split_records_is_a_seeded_partition():
    train, dev = split_records(list(range(100)), 0.1, seed=0)
    assert len(dev) == 10 and sorted(train + dev) == list(range(100)) and train == sorted(train)
    assert split_records(list(range(100)), 0.1, seed=0) == (train, dev)
    with pytest.raises(ValueError, match=r"dev_fraction must be between 0 and 1, got 1\.5"):
        split_records([1, 2], 1.5, seed=0)


@pytest.mark.parametrize("name, content, kwargs, match", [
    ("missing.csv", None, {}, r"missing\.csv: no such file"),
    ("d.xlsx", "text,label\n", {}, r"unknown extension '\.xlsx'; use one of \.csv, \.tsv"),
    ("d.csv", "text,lable\na,1\n", {}, r"no label column 'label' \(did you mean 'lable'\?\); its columns are "
                                       r"'text', 'lable'; pass label_column=NAME"),
    ("d.csv", "texts,label\na,1\n", {}, r"no text column 'text' \(did you mean 'texts'\?\)"),
    ("d.csv", "sentence,label\na,1\n", {}, r"no text column 'text'; its columns are 'sentence', 'label'"),
    ("d.csv", "text,label\n", {}, r"d\.csv has a header but 0 rows"),
    ("d.csv", "", {}, r"d\.csv is empty"),
    ("d.csv", "text,label\na,1\n  ,0\n", {}, r"d\.csv: row 2: text '  ' is empty or not a string"),
    ("d.csv", "text,label\na,1\nb\n", {}, r"row 2 has no value for column 'label'"),
    ("d.csv", "text,label\na,1\nb,\n", {}, r"row 2 has an empty label"),
    ("d.jsonl", '{"text": "a", "label": 1}\n{"text": "b"\n', {}, r"d\.jsonl: not valid JSON at line 2"),
    ("d.json", '{"text": "a"}', {}, r"expected a JSON list of objects, got a dict"),
    ("d.json", '[{"text": "a", "label": 1}, {"label": 0}]', {}, r"row 2 has no value for column 'text'"),
    ("d.csv", "text,label\na,1\nb,0\nc,1\n", {"dev_fraction": 0.1},
     r"d\.csv: 3 rows with dev_fraction=0\.1 leave an empty dev split; change dev_fraction or add rows"),
])
def test_bad_files_fail_with_one_line_errors(tmp_path, name, content, kwargs, match):
    path = tmp_path / name
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=match) as e:
        classification_data(path, **kwargs)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("value, kind", [(1.0, "float"), (True, "bool"), ([1], "list"), (None, "NoneType"),
                                         ({"y": 1}, "dict")])
def test_labels_neither_int_nor_str_name_the_row_value_and_type(tmp_path, value, kind):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"text": "a", "label": 0}, {"text": "b", "label": value}]), encoding="utf-8")
    with pytest.raises(ValueError, match=rf"d\.json: row 2: label .* is a {kind}; labels must be ints"):
        classification_data(path)


def test_a_dev_label_unseen_in_training_is_refused(tmp_path):
    train = write_rows(tmp_path / "train.csv", [("a", "pos"), ("b", "neg")])
    dev = write_rows(tmp_path / "dev.csv", [("c", "pos"), ("d", "neutral")])
    with pytest.raises(ValueError, match=r"dev\.csv: row 2: label 'neutral' was not seen in training \(labels: "
                                         r"neg, pos\)"):
        classification_data(train, dev_path=dev)


def test_an_unknown_source_name_gets_a_hint():
    with pytest.raises(ValueError, match=r"not one of sentiment, sst2 \(did you mean 'sst2'\?\)"):
        classification_data("sst-2")


# --- downloads, with the network replaced -----------------------------------------------------------

SST2_TRAIN = b"sentence\tlabel\nhide new secretions \t0\na gorgeous film \t1\nslow and dull \t0\n"
SST2_DEV = b"sentence\tlabel\nit 's a charming journey \t1\n"


def sst2_zip(train=SST2_TRAIN, dev=SST2_DEV):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("SST-2/train.tsv", train)
        z.writestr("SST-2/dev.tsv", dev)
        z.writestr("SST-2/test.tsv", b"index\tsentence\n")
    return buffer.getvalue()


def fake_network(monkeypatch, payload):
    calls = []

    def fetch(url, timeout=30.0):
        calls.append(url)
        if payload is None:
            raise urllib.error.URLError("no network")
        return payload
    monkeypatch.setattr(corpora, "_fetch", fetch)
    return calls


@pytest.fixture
def tiny_sst2_digests(monkeypatch):
    monkeypatch.setattr(tasks, "SST2_SHA256", {"train.tsv": corpora.sha256_hex(SST2_TRAIN),
                                              "dev.tsv": corpora.sha256_hex(SST2_DEV)})


@pytest.mark.usefixtures("tiny_sst2_digests")
def test_sst2_downloads_once_then_reads_the_cache(tmp_path, monkeypatch):
    calls = fake_network(monkeypatch, sst2_zip())
    data = classification_data("sst2", cache_dir=tmp_path)
    assert calls == [tasks.SST2_URL]
    assert data.train == [("hide new secretions", 0), ("a gorgeous film", 1), ("slow and dull", 0)]
    assert data.dev == [("it 's a charming journey", 1)]
    assert data.labels == ["negative", "positive"] and data.source == "sst2"
    assert (tmp_path / "sst2" / "train.tsv").read_bytes() == SST2_TRAIN
    fake_network(monkeypatch, None)  # offline now: the verified cache is enough
    assert classification_data("sst2", cache_dir=tmp_path) == data


@pytest.mark.usefixtures("tiny_sst2_digests")
def test_sst2_refuses_a_changed_file_and_writes_nothing(tmp_path, monkeypatch):
    fake_network(monkeypatch, sst2_zip(dev=SST2_DEV + b"a new row \t0\n"))
    with pytest.raises(ValueError, match=r"SST-2 dev\.tsv from .* has sha256 \w+, expected \w+; refusing"):
        classification_data("sst2", cache_dir=tmp_path)
    assert not (tmp_path / "sst2" / "train.tsv").exists()
    fake_network(monkeypatch, b"<html>captive portal</html>")
    with pytest.raises(ValueError, match=r"is not the GLUE SST-2 zip"):
        classification_data("sst2", cache_dir=tmp_path)


@pytest.mark.usefixtures("tiny_sst2_digests")
def test_sst2_offline_says_where_to_put_the_files_and_a_damaged_copy_is_fetched_again(tmp_path, monkeypatch):
    fake_network(monkeypatch, None)
    with pytest.raises(FileNotFoundError, match=rf"If you are offline, copy GLUE's SST-2/train\.tsv and "
                                                rf"SST-2/dev\.tsv into {re.escape(str(tmp_path / 'sst2'))}"):
        classification_data("sst2", cache_dir=tmp_path)
    (tmp_path / "sst2").mkdir()
    (tmp_path / "sst2" / "train.tsv").write_bytes(SST2_TRAIN[:-5])  # truncated
    (tmp_path / "sst2" / "dev.tsv").write_bytes(SST2_DEV)
    calls = fake_network(monkeypatch, sst2_zip())
    assert len(classification_data("sst2", cache_dir=tmp_path).train) == 3 and len(calls) == 1


RECORDS = [{"instruction": "Reverse the word.", "input": "cat", "output": "tac"},
           {"instruction": "Name a color.", "output": "blue"}]


def test_instruction_data_downloads_once_verifies_and_defaults_input(tmp_path, monkeypatch):
    payload = json.dumps(RECORDS).encode("utf-8")
    monkeypatch.setattr(tasks, "ALPACA_SHA256", corpora.sha256_hex(payload))
    calls = fake_network(monkeypatch, payload)
    records = instruction_records("alpaca-1100", cache_dir=tmp_path)
    assert records == [RECORDS[0], {"instruction": "Name a color.", "input": "", "output": "blue"}]
    assert calls == [tasks.ALPACA_URL]
    assert (tmp_path / "instructions" / "instruction-data.json").read_bytes() == payload
    fake_network(monkeypatch, None)
    assert instruction_records("alpaca-1100", cache_dir=tmp_path) == records
    fake_network(monkeypatch, payload + b" ")
    with pytest.raises(ValueError, match=r"instruction-data\.json from .* has sha256 \w+, expected \w+; refusing"):
        instruction_records("alpaca-1100", cache_dir=tmp_path / "other")


@pytest.mark.parametrize("records, match", [
    ([{"instruction": "a", "output": "b"}, {"instruction": "c", "input": "d"}],
     r"r\.json: row 2 has no 'output' key \(it has 'instruction', 'input'\)"),
    ([{"instruction": "a", "input": 3, "output": "b"}], r"row 1: 'input' is 3; it must be a non-empty string"),
    ([{"instruction": " ", "output": "b"}], r"row 1: 'instruction' is ' '"),
    ([], r"r\.json has no records"),
    ([["a", "b"]], r"row 1 is a list, expected an object"),
])
def test_bad_instruction_records_fail_with_one_line_errors(tmp_path, records, match):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    with pytest.raises(ValueError, match=match):
        instruction_records(path)


def test_instruction_records_read_jsonl(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(map(json.dumps, RECORDS)) + "\n", encoding="utf-8")
    assert [r["input"] for r in instruction_records(path)] == ["cat", ""]


# --- the generated tasks --------------------------------------------------------------------------

def expected_label(sentence):
    """The rule the generator promises: the last clause decides; "not"/"never" flips its adjective."""
    clause = re.split(r" but |, | and ", sentence.rstrip("."))[-1].split()
    assert clause[-1] in GOOD + BAD, sentence
    return int((clause[-1] in GOOD) != ("not" in clause or "never" in clause))


def test_generated_sentiment_is_labelled_by_its_rule_balanced_and_disjoint():
    data = classification_data("sentiment", n_train=2000, n_dev=300, seed=0)
    assert len(data.train) == 2000 and len(data.dev) == 300 and data.labels == ["negative", "positive"]
    assert all(y == expected_label(s) for s, y in data.train + data.dev)
    assert not {s for s, _ in data.train} & {s for s, _ in data.dev}
    for split in (data.train, data.dev):
        assert 0.4 < sum(y for _, y in split) / len(split) < 0.6
    negated = [y for s, y in data.train if " is not " in s and " but " not in s and "," not in s]
    assert set(negated) == {0, 1}  # "not good" and "not bad" both occur


def test_generated_sentiment_defeats_a_bag_of_words():
    """Naive Bayes on word counts (Laplace-smoothed) cannot even fit the training set: "not" and "but"
    change what the words around them mean, which only a model reading the order can use."""
    data = classification_data("sentiment")
    assert len(data.train) == 4000 and len(data.dev) == 500

    def words(sentence):
        return sentence.replace(",", " ").rstrip(".").split()
    counts = [collections.Counter(), collections.Counter()]
    for s, y in data.train:
        counts[y].update(words(s))
    vocab, totals = set(counts[0]) | set(counts[1]), [sum(c.values()) for c in counts]

    def log_p(s, y):  # the classes are balanced (to within 1%), so the prior is left out
        return sum(math.log((counts[y][w] + 1) / (totals[y] + len(vocab))) for w in words(s))
    for split in (data.train, data.dev):
        accuracy = sum((log_p(s, 1) > log_p(s, 0)) == y for s, y in split) / len(split)
        assert 0.5 < accuracy < 0.75  # about 0.58 with seed 0; plain sentences are the part it gets


def test_generated_tasks_are_seeded():
    assert classification_data("sentiment", seed=3) == classification_data("sentiment", seed=3)
    assert classification_data("sentiment", seed=3).train != classification_data("sentiment", seed=4).train
    assert instruction_records("tasks", seed=3) == instruction_records("tasks", seed=3)
    assert instruction_records("tasks", seed=3) != instruction_records("tasks", seed=4)


def test_generated_instructions_have_exact_answers():
    records = instruction_records()
    assert len(records) == 600
    assert len({(r["instruction"], r["input"]) for r in records}) == 600  # no record twice
    kinds = {r["instruction"].split()[0] for r in records}
    assert kinds == {"Reverse", "Convert", "What", "Sort", "Add", "Give"}
    for r in records:
        if r["instruction"].startswith("Reverse"):
            assert r["output"] == r["input"][::-1]
        elif r["instruction"].startswith("Convert"):
            assert r["output"] == r["input"].upper()
        elif r["instruction"].startswith("Sort"):
            assert r["output"].split() == sorted(r["input"].split())
        elif r["instruction"].startswith("Add"):
            a, b = r["input"].split(" + ")
            assert int(r["output"]) == int(a) + int(b)
    assert {"instruction": 'What is the plural of "mouse"?', "input": "", "output": "mice"} in records
    assert {"instruction": 'Give the opposite of "cold"?', "input": "", "output": "hot"} not in records
    assert {"instruction": 'Give the opposite of "cold".', "input": "", "output": "hot"} in records
    train, dev = split_records(records, 0.1, seed=0)
    assert len(dev) == 60 and not {id(r) for r in train} & {id(r) for r in dev}
