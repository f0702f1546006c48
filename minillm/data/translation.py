"""Parallel text for the encoder–decoder: (source sentence, target sentence) pairs, and their batches.

Three sources of pairs:
    date_pairs(n)            an offline, generated task: "3 March 2021" / "March 3, 2021" -> "2021-03-03".
                             Small enough to learn on a CPU in seconds, hard enough to need attention
                             (the day must be copied from the front of the source to the end of the target)
    load_parallel(src, tgt)  two text files (optionally .gz), line i of one translating line i of the other
    multi30k(split)          Multi30k task 1 (Elliott et al. 2016), German–English image captions, the
                             classic small translation benchmark: downloaded once, checked by sha256

Batches follow the paper's teacher forcing: the decoder reads [BOS, y1 .. yn] and is trained to
predict [y1 .. yn, EOS]; sequences are right-padded with the pad id, which both the attention masks
and the loss ignore.
"""

from __future__ import annotations

import datetime
import gzip
import random
import re
import urllib.error
from pathlib import Path

import torch

from minillm.data import corpora
from minillm.files import write_bytes

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
SPECIALS = ("<pad>", "<bos>", "<eos>")  # a tokenizer for translation carries these three


# --- a generated task -----------------------------------------------------------------------------

DATE_FORMATS = ("{day} {month} {year}", "{month} {day}, {year}", "{day} {mon} {year}")


def date_pairs(n: int, seed: int = 0, start_year: int = 1900, end_year: int = 2099,
               formats: tuple[str, ...] = DATE_FORMATS) -> list[tuple[str, str]]:
    """n random dates written out ("3 March 2021", "March 3, 2021", "3 Mar 2021") and in ISO form.
    Fewer formats and years make an easier task (the end-to-end test uses one format)."""
    if not formats:
        raise ValueError("date_pairs needs at least one format")
    rng = random.Random(seed)
    first = datetime.date(start_year, 1, 1).toordinal()
    last = datetime.date(end_year, 12, 31).toordinal()
    pairs = []
    for _ in range(n):
        d = datetime.date.fromordinal(rng.randint(first, last))
        month = MONTHS[d.month - 1]
        src = rng.choice(formats).format(day=d.day, month=month, mon=month[:3], year=d.year)
        pairs.append((src, d.isoformat()))
    return pairs


# --- files ----------------------------------------------------------------------------------------

def _read_lines(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            return f.read().splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason})") from None


def load_parallel(src_path: str | Path, tgt_path: str | Path) -> list[tuple[str, str]]:
    """Pairs from two aligned files (plain or .gz): line i of src_path translates line i of tgt_path.
    An empty line or differing line counts is an error naming the file and line: a misaligned corpus
    trains a model on wrong pairs without any other sign."""
    src_path, tgt_path = Path(src_path), Path(tgt_path)
    src, tgt = _read_lines(src_path), _read_lines(tgt_path)
    if len(src) != len(tgt):
        raise ValueError(f"{src_path} has {len(src)} lines but {tgt_path} has {len(tgt)}: parallel files "
                         "must align line by line")
    for path, lines in ((src_path, src), (tgt_path, tgt)):
        for i, line in enumerate(lines):
            if not line.strip():
                raise ValueError(f"{path}:{i + 1}: empty line (every source needs a translation)")
    return list(zip(src, tgt))


# --- Multi30k --------------------------------------------------------------------------------------

MULTI30K_URL = "https://raw.githubusercontent.com/multi30k/dataset/master/data/task1/raw/{file}"
MULTI30K_SPLITS = {"train": "train", "val": "val", "test": "test_2016_flickr"}
MULTI30K_SHA256 = {
    "train.de.gz": "726e39b2fa9eb9ffb6dc763fb35a179f80fae06ffc5d28b6ace5faa883de28a6",
    "train.en.gz": "d79cfa999dd4c51d2cb42499b6796d5a882c3a8a961923c25a898c90f8bbd56f",
    "val.de.gz": "f0cba2f995189cf5770f29a8a9a537a3ad3f51657ad873405082ff6863a5e75a",
    "val.en.gz": "14f7d25ddd868909a9213e361768460edcacdd6ab9d1e77b92560dc10c10dc28",
    "test_2016_flickr.de.gz": "9204244e408ccb38d2a55cfcd344df15005fc42a07a6e55ca6c52b6ababb8cc8",
    "test_2016_flickr.en.gz": "611d361c6334bc7246101d48097c13cf5c4413c5befc793cc629934359d532d9",
}


def multi30k_file(name: str, cache_dir: str | Path | None = None) -> Path:
    """Path of one Multi30k file in the cache, downloaded and verified if missing or damaged."""
    expected = MULTI30K_SHA256[name]
    path = (Path(cache_dir) if cache_dir is not None else corpora.default_cache_dir()) / "multi30k" / name
    if path.exists():
        if corpora.sha256_hex(path.read_bytes()) == expected:
            return path
        path.unlink()  # a truncated or edited copy: fetch it again
    url = MULTI30K_URL.format(file=name)
    try:
        data = corpora._fetch(url)
    except (urllib.error.URLError, OSError) as e:
        raise FileNotFoundError(f"could not download Multi30k {name} from {url} ({e}). If you are offline "
                                f"and have the file, copy it to {path}") from None
    digest = corpora.sha256_hex(data)
    if digest != expected:
        raise ValueError(f"downloaded Multi30k {name} has sha256 {digest}, expected {expected}; refusing "
                         "to use it (a proxy or a changed file?)")
    write_bytes(path, data)  # atomic: no half-written file for a concurrent reader
    return path


def multi30k(split: str = "train", src_lang: str = "de", tgt_lang: str = "en",
             cache_dir: str | Path | None = None) -> list[tuple[str, str]]:
    """Multi30k task-1 pairs: split "train" (29,000), "val" (1,014) or "test" (test2016, 1,000)."""
    if split not in MULTI30K_SPLITS:
        raise ValueError(f"unknown Multi30k split {split!r}; choose one of {list(MULTI30K_SPLITS)}")
    if {src_lang, tgt_lang} != {"de", "en"}:
        raise ValueError(f"Multi30k task 1 pairs German and English; got {src_lang!r} -> {tgt_lang!r}")
    stem = MULTI30K_SPLITS[split]
    return load_parallel(multi30k_file(f"{stem}.{src_lang}.gz", cache_dir),
                         multi30k_file(f"{stem}.{tgt_lang}.gz", cache_dir))


# --- a summarization-style task derived from the shipped corpus -------------------------------------

_SECTION = re.compile(r"([^\n]+)\n([*=\-]{3,})\n\n(.+?)(?:\n\n|$)", re.S)


def docs_headlines() -> list[tuple[str, str]]:
    """(paragraph, heading) pairs from the Python documentation topics every CPython ships
    (pydoc_data.topics, the `python-docs` corpus): each section's first paragraph is the source, its
    heading the target. Headline generation, a summarization task in the style of Gigaword (Rush et
    al. 2015), scored with ROUGE; derived from a shipped corpus, so it needs no download. Small: about
    two hundred pairs, a task to exercise the pipeline and the metric, not to rank models."""
    from pydoc_data.topics import topics

    pairs = []
    for name in sorted(topics):
        for heading, underline, body in _SECTION.findall(topics[name]):
            if len(underline) != len(heading.rstrip()):  # an underline is exactly as long as its heading
                continue
            paragraph = " ".join(body.split())  # one line: the paragraph's own line breaks carry nothing
            if heading.strip() and paragraph:
                pairs.append((paragraph, heading.strip()))
    # some sections appear under several topics: keep each pair once, so none is both trained and held out
    return list(dict.fromkeys(pairs))


# --- one name for each source, one held-out split -----------------------------------------------

DATES_SIZES = {"train": 20_000, "val": 500, "test": 500}  # generated: as many as asked, different seeds
HELD_OUT_FRACTION = 0.05  # two user files: the last 5% of the lines are the held-out split


def translation_pairs(source: str, split: str = "train", cache_dir: str | Path | None = None,
                      n: int | None = None) -> list[tuple[str, str]]:
    """Pairs of one split of a named source, the same every call (training and `minillm eval` agree):
        "dates"               date_pairs, seed 0/1/2 for train/val/test (n overrides the size)
        "multi30k"            de -> en; test = test2016
        "headlines"           docs_headlines: every 10th pair is held out ("val" and "test")
        "SRC_FILE,TGT_FILE"   load_parallel; the last 5% of lines are "val" (and "test"), the rest "train"
    """
    if split not in ("train", "val", "test"):
        raise ValueError(f"unknown split {split!r}; choose train, val or test")
    if source == "dates":
        return date_pairs(n or DATES_SIZES[split], seed=("train", "val", "test").index(split))
    if source == "multi30k":
        pairs = multi30k(split, cache_dir=cache_dir)
    elif source == "headlines":
        pairs = [p for i, p in enumerate(docs_headlines()) if (i % 10 == 9) == (split != "train")]
    elif source.count(",") == 1:
        pairs = load_parallel(*source.split(","))
        held = max(1, int(len(pairs) * HELD_OUT_FRACTION))
        if len(pairs) < 2:
            raise ValueError(f"{source}: {len(pairs)} pair(s); need at least 2 (one to train, one held out)")
        pairs = pairs[:-held] if split == "train" else pairs[-held:]
    else:
        raise ValueError(f"unknown translation data {source!r}: use dates, multi30k, headlines or SRC_FILE,TGT_FILE")
    return pairs[:n] if n else pairs


# --- batches ---------------------------------------------------------------------------------------

def collate(pairs_ids: list[tuple[list[int], list[int]]], pad_id: int, bos_id: int, eos_id: int):
    """Token-id pairs -> src (B, S), tgt_in (B, T), tgt_out (B, T), right-padded with pad_id.
    tgt_in = [BOS, y1 .. yn] and tgt_out = [y1 .. yn, EOS]: position t predicts the token after it."""
    B = len(pairs_ids)
    S = max(len(s) for s, _ in pairs_ids)
    T = max(len(t) for _, t in pairs_ids) + 1  # + BOS (in) / EOS (out)
    src = torch.full((B, S), pad_id, dtype=torch.long)
    tgt_in = torch.full((B, T), pad_id, dtype=torch.long)
    tgt_out = torch.full((B, T), pad_id, dtype=torch.long)
    for b, (s, t) in enumerate(pairs_ids):
        src[b, :len(s)] = torch.tensor(s, dtype=torch.long)
        tgt_in[b, :len(t) + 1] = torch.tensor([bos_id] + t, dtype=torch.long)
        tgt_out[b, :len(t) + 1] = torch.tensor(t + [eos_id], dtype=torch.long)
    return src, tgt_in, tgt_out
