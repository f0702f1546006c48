"""Datasets: text -> token ids on disk (numpy memmaps) -> random batches, for GPT and BERT training.

The recipe is nanoGPT's `data/shakespeare_char/prepare.py` + `train.py:get_batch`:

1. read the text: `load_text` takes a corpus name ("python-docs", "shakespeare", "sst2-text"; see
   corpora.py) or a .txt file/folder;
2. split it by characters: the first 90% is train, the rest val;
3. tokenize both and store them as flat uint16 arrays (uint32 when the vocabulary is > 65535),
   read back with `np.memmap`, so a dataset larger than memory still works and opening it is free.
   A file is streamed, never held whole: one pass counts its characters (and hashes it, and collects
   the characters of a char vocabulary), a second one encodes it piece by piece with the tokenizer's
   `encode_stream` and appends the ids to the memmap files. (BPE training still reads the train
   split into memory.)
4. a batch is B random windows of T+1 tokens: x = window[:-1], y = window[1:] (next-token targets).

Prepared datasets live in `<cache dir>/datasets/<name>-<tokenizer>-<key>/` (train.bin, val.bin,
tokenizer.json, meta.json), where the key hashes the text and the tokenizer settings: preparing the
same thing twice reuses the folder.

For BERT-style masked-LM training, `mask_tokens` applies BERT's 80/10/10 masking to a batch; the
positions it leaves out get the label IGNORE_INDEX, which the losses (minillm/model/losses.py) skip.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from minillm.data.corpora import (CORPORA, default_cache_dir, iter_path, python_docs_text, read_path, sha256_hex,
                                  shakespeare_text, source_name)
from minillm.data.tasks import read_labelled, sst2_files
from minillm.data.tokenizer import SPLIT_PATTERNS, BPETokenizer, CharTokenizer, load_tokenizer

__all__ = ["Dataset", "prepare_dataset", "split_text", "get_batch", "mask_tokens", "load_text", "iter_text",
           "IGNORE_INDEX", "MLM_SPECIAL_TOKENS"]

DEFAULT_BPE_VOCAB = 1024
MLM_SPECIAL_TOKENS = ("[PAD]", "[MASK]")  # what mask_tokens needs; pass as special_tokens=
# The label of a position that does not count (PyTorch's and Hugging Face's value). The data stage
# writes it (masked LM, instruction prompts, padding) and minillm.model.losses skips it: it lives
# here, with the labels' makers, so that the data stage never imports the model.
IGNORE_INDEX = -100
# Bump when the on-disk layout or the ids change: old cache folders are then ignored. 2: BPE files of
# texts over 1M characters were cut into pieces that could split a whitespace run ("\n\n" before a
# word became "\n\n" instead of "\n", "\n"); now streamed at exact cuts, ids equal encode(whole text).
FORMAT_VERSION = 2
_CHUNK_CHARS = 1 << 19  # read ~512k characters (UTF-8 bytes) at a time: bounded memory, a progress bar


def load_text(source: str | Path, cache_dir: str | Path | None = None) -> str:
    """Text of a named corpus ("python-docs", "shakespeare", "sst2-text") or of a local file/folder."""
    if str(source) == "python-docs":
        text = python_docs_text()
    elif str(source) == "shakespeare":
        text = shakespeare_text(cache_dir)
    elif str(source) == "sst2-text":
        text = "\n".join(read_labelled(sst2_files(cache_dir)[0], "sentence", "label")[0]) + "\n"
    elif Path(source).expanduser().exists():
        text = read_path(source)
    else:
        close = difflib.get_close_matches(str(source), CORPORA, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise FileNotFoundError(f"data source {str(source)!r} is neither a corpus name "
                                f"({', '.join(CORPORA)}) nor an existing file or folder{hint}")
    if not text:
        raise ValueError(f"data source {str(source)!r} is empty")
    return text


def iter_text(source: str | Path, cache_dir: str | Path | None = None,
              chunk_bytes: int = 1 << 20) -> Iterator[str]:
    """`load_text(source)` in pieces: a local file or folder is streamed, a named corpus (a few MB at
    most) is loaded whole and handed out in pieces. No check for emptiness: the caller counts."""
    if str(source) not in CORPORA and Path(source).expanduser().exists():
        yield from iter_path(source, chunk_bytes)
        return
    text = load_text(source, cache_dir)
    for i in range(0, len(text), chunk_bytes):
        yield text[i:i + chunk_bytes]


@dataclass
class Dataset:
    tokenizer: CharTokenizer | BPETokenizer
    train: np.ndarray  # 1-D token ids (np.memmap), the first (1 - val_fraction) of the text
    val: np.ndarray  # 1-D token ids (np.memmap), the rest
    meta: dict  # what meta.json holds: source, text sha256, tokenizer, counts, ...
    path: Path  # the cache folder
    reused: bool = False  # True when an earlier prepare_dataset call had already built it


def _token_dtype(vocab_size: int):
    # Token ids are stored at the smallest width that holds them: half the disk and I/O of uint32.
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def _split_stream(pieces: Iterable[str], n: int) -> tuple[Iterator[str], Iterator[str]]:
    """(head, tail): the first n characters of a stream of text pieces, and the rest.

    split_text for a stream. Both share one pass over `pieces`: read head to its end first.
    """
    it, rest = iter(pieces), []

    def head():
        left = n
        for p in it:
            if len(p) >= left:  # the piece holding the split point: cut it, keep the tail for later
                yield p[:left]
                rest.append(p[left:])
                return
            left -= len(p)
            yield p

    def tail():
        yield from rest
        yield from it

    return head(), tail()


def _write_tokens(path: Path, pieces: Iterable[str], tokenizer, dtype, progress) -> int:
    """Encode a stream of text into `path`, appending each segment's ids: memory is one segment."""
    def counted(pieces):
        for p in pieces:
            yield p
            if progress is not None:
                progress.update(len(p))

    n = 0
    with open(path, "wb") as f:
        for ids in tokenizer.encode_stream(counted(pieces)):
            np.asarray(ids, dtype=dtype).tofile(f)  # ids < 2**16 (or 2**32) by _token_dtype
            n += len(ids)
    return n


def _scan(source, cache_dir, want_chars: bool) -> tuple[int, int, str, set[str]]:
    """One pass over the text: (characters, UTF-8 bytes, sha256, the set of characters if wanted)."""
    n_chars = n_bytes = 0
    sha, chars = hashlib.sha256(), set()
    for piece in iter_text(source, cache_dir, _CHUNK_CHARS):
        data = piece.encode("utf-8")  # the hash of the pieces' bytes is the hash of the text's bytes
        sha.update(data)
        n_chars, n_bytes = n_chars + len(piece), n_bytes + len(data)
        if want_chars:
            chars.update(piece)
    return n_chars, n_bytes, sha.hexdigest(), chars


def _open_tokens(path: Path, dtype, count: int) -> np.ndarray:
    if count == 0:  # np.memmap cannot map an empty file
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))


def _load(folder: Path) -> Dataset | None:
    """The dataset in `folder` if it is complete and consistent, else None."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    dtype = np.dtype(meta["dtype"])
    for split in ("train", "val"):
        f = folder / f"{split}.bin"
        if not f.exists() or f.stat().st_size != meta[f"{split}_tokens"] * dtype.itemsize:
            return None
    return Dataset(tokenizer=load_tokenizer(folder / "tokenizer.json"),
                   train=_open_tokens(folder / "train.bin", dtype, meta["train_tokens"]),
                   val=_open_tokens(folder / "val.bin", dtype, meta["val_tokens"]),
                   meta=meta, path=folder, reused=True)


def split_text(text: str, val_fraction: float = 0.1) -> tuple[str, str]:
    """(train, val): the first 1 - val_fraction of the characters, then the rest.

    nanoGPT's `data[:int(n * 0.9)]`. The one place a validation split is made: training, `minillm
    eval` and `minillm quantize` all score the same held-out text.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_train = int(len(text) * (1 - val_fraction))
    return text[:n_train], text[n_train:]


def prepare_dataset(source: str | Path = "python-docs", tokenizer: str = "char",
                    vocab_size: int | None = None, special_tokens=(), cache_dir: str | Path | None = None,
                    val_fraction: float = 0.1, verbose: bool = False,
                    split_pattern: str = "gpt2") -> Dataset:
    """Tokenize `source` into train/val memmaps (or reuse an earlier identical preparation).

    tokenizer: "char" (vocabulary = the text's characters) or "bpe" (byte-level, `vocab_size` ids,
    default 1024, trained on the train split only so validation text is truly unseen; that split is
    read into memory for training, everything else is streamed).
    special_tokens: e.g. MLM_SPECIAL_TOKENS for masked-LM training; for bpe also a dict {token: id}.
    split_pattern: bpe's pre-tokenizer, "gpt2", "gpt4" (cl100k) or "none".
    """
    if tokenizer not in ("char", "bpe"):
        raise ValueError(f"tokenizer must be 'char' or 'bpe', got {tokenizer!r}")
    if tokenizer == "char" and vocab_size is not None:
        raise ValueError("vocab_size applies to the bpe tokenizer; a char vocabulary is the text's "
                         "set of characters")
    if tokenizer == "bpe" and vocab_size is None:
        vocab_size = DEFAULT_BPE_VOCAB
    if split_pattern not in SPLIT_PATTERNS:
        raise ValueError(f"split_pattern must be one of {', '.join(SPLIT_PATTERNS)}, got {split_pattern!r}")
    if tokenizer == "char" and (split_pattern != "gpt2" or isinstance(special_tokens, dict)):
        raise ValueError("split_pattern and special-token ids apply to the bpe tokenizer; char ids "
                         "are the sorted characters, then the special tokens in order")
    split_text("", val_fraction)  # checks val_fraction before any work
    special_tokens = dict(special_tokens) if isinstance(special_tokens, dict) else list(special_tokens)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()

    # Pass 1: count, hash (the cache key) and, for char, collect the vocabulary, without holding the text.
    n_chars, n_bytes, text_sha, chars = _scan(source, cache_dir, want_chars=tokenizer == "char")
    if n_chars == 0:
        raise ValueError(f"data source {str(source)!r} is empty")
    settings = {"format": FORMAT_VERSION, "text_sha256": text_sha, "tokenizer": tokenizer,
                "vocab_size": vocab_size, "special_tokens": special_tokens, "val_fraction": val_fraction,
                "split_pattern": split_pattern if tokenizer == "bpe" else None}
    key = sha256_hex(json.dumps(settings, sort_keys=True).encode())[:12]
    name = source_name(source, text_sha256=text_sha)
    folder = cache_dir / "datasets" / f"{name}-{tokenizer}{vocab_size or ''}-{key}"
    ds = _load(folder)
    if ds is not None:
        return ds

    t0 = time.perf_counter()
    n_train = int(n_chars * (1 - val_fraction))  # split_text's point, from the count alone
    if tokenizer == "char":
        # From the whole text, as nanoGPT does: val may contain a character train lacks.
        tok = CharTokenizer(sorted(chars), special_tokens)
    else:
        train_text = "".join(_split_stream(iter_text(source, cache_dir, _CHUNK_CHARS), n_train)[0])
        tok = BPETokenizer.train(train_text, vocab_size, special_tokens, verbose=verbose,
                                 pattern=split_pattern)
        del train_text  # encoding below streams
    dtype = _token_dtype(tok.vocab_size)

    # Build in a private temp folder, then rename it into place (atomic): two processes preparing
    # at once (e.g. torchrun ranks) never see a half-written dataset.
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    progress = None
    if verbose:
        from tqdm.auto import tqdm
        progress = tqdm(total=n_chars, desc="tokenizing", unit="char", unit_scale=True)
    try:
        # Pass 2: one read of the text, the first n_train characters to train.bin, the rest to val.bin.
        train_pieces, val_pieces = _split_stream(iter_text(source, cache_dir, _CHUNK_CHARS), n_train)
        counts = {"train": _write_tokens(tmp / "train.bin", train_pieces, tok, dtype, progress),
                  "val": _write_tokens(tmp / "val.bin", val_pieces, tok, dtype, progress)}
        tok.save(tmp / "tokenizer.json")
        meta = {**settings, "source": name, "source_arg": str(source), "characters": n_chars,
                "bytes": n_bytes, "vocab_size": tok.vocab_size, "special_tokens": tok.special_tokens,
                "dtype": np.dtype(dtype).name, "train_tokens": counts["train"],
                "val_tokens": counts["val"], "bytes_per_token": n_bytes / max(1, sum(counts.values())),
                "seconds": round(time.perf_counter() - t0, 3)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))  # written last: marks complete
        if _load(folder) is not None:  # another process finished first: use its identical copy
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            shutil.rmtree(folder, ignore_errors=True)  # leftovers of an interrupted run, if any
            try:
                os.rename(tmp, folder)
            except OSError:  # lost a race to a process renaming at the same moment
                shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if progress is not None:
            progress.close()
    ds = _load(folder)
    if ds is None:
        raise RuntimeError(f"prepared dataset at {folder} could not be read back")
    ds.reused = False
    return ds


def get_batch(tokens, batch_size: int, block_size: int, device="cpu",
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """B random windows of the token stream: x (B, T) and y (B, T) = x shifted left by one.

    Start positions come from `torch.randint(len - T, (B,), generator=generator)`, the call
    nanoGPT makes, so with the global RNG and the same seed the batches equal nanoGPT's, and a
    trainer can save/restore `generator` to resume on exactly the same batches.
    """
    n = len(tokens)
    if n < block_size + 1:
        raise ValueError(f"a block of {block_size} tokens needs at least {block_size + 1} tokens of "
                         f"data, this split has {n}; use a smaller block_size or more text")
    ix = torch.randint(n - block_size, (batch_size,), generator=generator)  # (B,) start offsets
    offsets = torch.arange(block_size + 1)  # (T+1,)
    if isinstance(tokens, torch.Tensor):
        window = tokens[ix[:, None] + offsets[None, :]].long()  # (B, T+1)
    else:
        # One fancy-index read from the memmap instead of B slices; int64 is what embeddings take.
        idx = ix.numpy()[:, None] + offsets.numpy()[None, :]  # (B, T+1)
        window = torch.from_numpy(np.asarray(tokens[idx]).astype(np.int64))
    x = window[:, :-1].contiguous()  # (B, T)
    y = window[:, 1:].contiguous()  # (B, T)
    device = torch.device(device)
    if device.type == "cuda":
        # Page-locked memory lets the copy run asynchronously, overlapping the previous step.
        x = x.pin_memory().to(device, non_blocking=True)
        y = y.pin_memory().to(device, non_blocking=True)
    elif device.type != "cpu":
        x, y = x.to(device), y.to(device)
    return x, y


def mask_tokens(x: torch.Tensor, tokenizer, generator: torch.Generator | None = None,
                mlm_probability: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masked-LM corruption (Devlin et al. 2019, section 3.1): (inputs, labels).

    Each non-special token is chosen with probability `mlm_probability`. A chosen token becomes
    [MASK] 80% of the time, a random ordinary token 10%, and stays itself 10% (so the model cannot
    learn that only [MASK] positions matter). labels hold the original id at chosen positions and
    IGNORE_INDEX (-100) elsewhere, so the loss is computed on chosen tokens only.
    The random numbers are drawn on the CPU from `generator`: same seed, same masks, on any device.
    """
    if "[MASK]" not in tokenizer.special_tokens:
        raise ValueError("mask_tokens needs a tokenizer with a '[MASK]' special token; prepare the "
                         "dataset with special_tokens=MLM_SPECIAL_TOKENS (\"[PAD]\", \"[MASK]\")")
    if not 0.0 < mlm_probability < 1.0:
        raise ValueError(f"mlm_probability must be in (0, 1), got {mlm_probability}")
    specials = set(tokenizer.special_tokens.values())
    is_special = torch.isin(x.cpu(), torch.tensor(sorted(specials)))
    ordinary = torch.tensor([i for i in range(tokenizer.vocab_size) if i not in specials])  # (V - S,)
    if len(ordinary) == 0:
        raise ValueError("the tokenizer has no ordinary tokens to draw random replacements from")
    # Always the same three draws, whatever the data: the generator advances identically each batch.
    chosen = (torch.rand(x.shape, generator=generator) < mlm_probability) & ~is_special
    action = torch.rand(x.shape, generator=generator)  # < 0.8 mask, < 0.9 random, else keep
    random_ids = ordinary[torch.randint(len(ordinary), x.shape, generator=generator)]

    inputs = x.cpu().clone()
    inputs[chosen & (action < 0.8)] = tokenizer.special_tokens["[MASK]"]
    swap = chosen & (action >= 0.8) & (action < 0.9)
    inputs[swap] = random_ids[swap]
    labels = torch.where(chosen, x.cpu(), torch.full_like(x.cpu(), IGNORE_INDEX))
    return inputs.to(x.device), labels.to(x.device)
