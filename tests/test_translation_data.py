"""Parallel data (minillm/data/translation.py): the generated date task, aligned files with one-line
errors, Multi30k's download checked by sha256 (with the network replaced), and teacher-forcing batches."""

import datetime
import gzip

import pytest
import torch

from minillm.data import corpora, translation
from minillm.data.translation import MONTHS, collate, date_pairs, load_parallel, multi30k


def test_date_pairs_are_correct_and_reproducible():
    pairs = date_pairs(200, seed=3)
    assert pairs == date_pairs(200, seed=3) and pairs != date_pairs(200, seed=4)
    for src, tgt in pairs:
        # parse the source back with the standard library and compare with the ISO target
        for fmt in ("%d %B %Y", "%B %d, %Y", "%d %b %Y"):
            try:
                parsed = datetime.datetime.strptime(src, fmt).date()
                break
            except ValueError:
                continue
        else:
            pytest.fail(f"unparseable source {src!r}")
        assert parsed.isoformat() == tgt
    assert {s.split()[0] in MONTHS for s, _ in pairs} == {True, False}  # several formats appear
    assert all(s.count(" ") == 2 and s.split()[1] == "May" for s, _ in
               date_pairs(20, formats=("{day} May {year}",)))  # (formats are plain templates)


def write(path, lines, gz=False):
    data = "".join(line + "\n" for line in lines).encode("utf-8")
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def test_load_parallel_reads_aligned_files_plain_and_gzipped(tmp_path):
    src = write(tmp_path / "a.de", ["Ein Hund.", "Zwei Katzen."])
    tgt = write(tmp_path / "a.en.gz", ["A dog.", "Two cats."], gz=True)
    assert load_parallel(src, tgt) == [("Ein Hund.", "A dog."), ("Zwei Katzen.", "Two cats.")]


def test_load_parallel_errors_name_the_file_and_line(tmp_path):
    src = write(tmp_path / "s.txt", ["one", "two", "three"])
    with pytest.raises(ValueError, match=r"s\.txt has 3 lines but .*t\.txt has 2"):
        load_parallel(src, write(tmp_path / "t.txt", ["uno", "dos"]))
    with pytest.raises(ValueError, match=r"t2\.txt:2: empty line"):
        load_parallel(src, write(tmp_path / "t2.txt", ["uno", "  ", "tres"]))
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\n\x00\n\x01\n")
    with pytest.raises(ValueError, match="not UTF-8"):
        load_parallel(tmp_path / "bad.txt", src)


def test_multi30k_downloads_once_and_checks_sha256(tmp_path, monkeypatch):
    files = {f"val.{lang}.gz": gzip.compress(text.encode()) for lang, text in
             (("de", "Ein Hund läuft.\nZwei Kinder.\n"), ("en", "A dog runs.\nTwo children.\n"))}
    fetched = []

    def fake_fetch(url, timeout=30.0):
        fetched.append(url)
        return files[url.rsplit("/", 1)[1]]

    monkeypatch.setattr(corpora, "_fetch", fake_fetch)
    # the real hashes refuse our stand-in files ...
    with pytest.raises(ValueError, match="sha256"):
        multi30k("val", cache_dir=tmp_path)
    assert not (tmp_path / "multi30k" / "val.de.gz").exists()  # nothing unverified is kept
    # ... and with their own hashes they are accepted, cached, and not fetched again
    monkeypatch.setitem(translation.MULTI30K_SHA256, "val.de.gz", corpora.sha256_hex(files["val.de.gz"]))
    monkeypatch.setitem(translation.MULTI30K_SHA256, "val.en.gz", corpora.sha256_hex(files["val.en.gz"]))
    fetched.clear()
    expected = [("Ein Hund läuft.", "A dog runs."), ("Zwei Kinder.", "Two children.")]
    assert multi30k("val", cache_dir=tmp_path) == expected
    assert fetched == [translation.MULTI30K_URL.format(file=f) for f in ("val.de.gz", "val.en.gz")]
    assert multi30k("val", "en", "de", cache_dir=tmp_path)[0] == ("A dog runs.", "Ein Hund läuft.")
    assert len(fetched) == 2  # served from the cache
    # a damaged cached copy is fetched again
    (tmp_path / "multi30k" / "val.en.gz").write_bytes(b"truncated")
    multi30k("val", cache_dir=tmp_path)
    assert len(fetched) == 3
    with pytest.raises(ValueError, match="split"):
        multi30k("dev", cache_dir=tmp_path)


def test_collate_builds_teacher_forcing_batches():
    src, tgt_in, tgt_out = collate([([5, 6, 7], [8]), ([5], [9, 10])], pad_id=0, bos_id=1, eos_id=2)
    assert src.tolist() == [[5, 6, 7], [5, 0, 0]]
    assert tgt_in.tolist() == [[1, 8, 0], [1, 9, 10]]  # BOS then the target, right-padded
    assert tgt_out.tolist() == [[8, 2, 0], [9, 10, 2]]  # the target then EOS: shifted by one
    assert src.dtype == tgt_in.dtype == tgt_out.dtype == torch.long


def test_headlines_are_a_summarization_task_derived_from_the_shipped_docs():
    from minillm.data.translation import docs_headlines, translation_pairs

    pairs = docs_headlines()
    assert len(pairs) > 100 and pairs == docs_headlines()  # shipped with CPython, the same every time
    assert all(src and tgt and "\n" not in src and len(tgt) < len(src) + 80 for src, tgt in pairs)
    assert ('Assert statements are a convenient way to insert debugging assertions into a program:',
            'The "assert" statement') in pairs
    train, val = translation_pairs("headlines", "train"), translation_pairs("headlines", "val")
    assert len(train) + len(val) == len(pairs) and not set(train) & set(val)
    assert translation_pairs("headlines", "test") == val
