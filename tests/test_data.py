"""Corpora, prepared datasets (memmaps + cache reuse), random-window batches and BERT masking.

Nothing here touches the network: the tiny-shakespeare download is replaced by a fake `_fetch`.
"""

import hashlib
import json
import random
import subprocess
import sys
import textwrap
import urllib.error

import numpy as np
import pytest
import torch

import minillm.data.corpora as corpora
import minillm.data.dataset as data
from minillm.cli import main
from minillm.data.dataset import MLM_SPECIAL_TOKENS, get_batch, load_text, mask_tokens, prepare_dataset
from minillm.model.losses import IGNORE_INDEX
from minillm.data.tokenizer import BPETokenizer, CharTokenizer, load_tokenizer

TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
        "All:\nSpeak, speak.\n\nFirst Citizen:\nYou are all resolved rather to die than to famish?\n") * 20


@pytest.fixture
def fake_shakespeare(monkeypatch):
    """Pretend TEXT is tiny-shakespeare: its hash becomes the expected one; count the downloads."""
    payload = TEXT.encode("utf-8")
    monkeypatch.setattr(corpora, "SHAKESPEARE_SHA256", hashlib.sha256(payload).hexdigest())
    calls = []

    def fetch(url, timeout=30.0):
        calls.append(url)
        return payload

    monkeypatch.setattr(corpora, "_fetch", fetch)
    return calls


# --- corpora ---------------------------------------------------------------------------------

def test_python_docs_is_the_sorted_pydoc_topics():
    from pydoc_data.topics import topics
    text = load_text("python-docs")
    assert text == "\n\n".join(topics[k] for k in sorted(topics))
    assert len(text) > 100_000 and load_text("python-docs") == text


def test_shakespeare_downloads_once_verifies_and_caches(tmp_path, fake_shakespeare):
    assert load_text("shakespeare", cache_dir=tmp_path) == TEXT
    assert (tmp_path / "shakespeare.txt").read_text() == TEXT
    assert load_text("shakespeare", cache_dir=tmp_path) == TEXT
    assert len(fake_shakespeare) == 1  # the second call read the cache
    (tmp_path / "shakespeare.txt").write_text("truncated")  # a damaged cache is fetched again
    assert load_text("shakespeare", cache_dir=tmp_path) == TEXT
    assert len(fake_shakespeare) == 2


def test_shakespeare_wrong_checksum_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(corpora, "_fetch", lambda url, timeout=30.0: b"<html>captive portal</html>")
    with pytest.raises(ValueError, match="sha256"):
        load_text("shakespeare", cache_dir=tmp_path)
    assert not (tmp_path / "shakespeare.txt").exists()


def test_shakespeare_offline_error_says_how_to_pass_a_local_copy(tmp_path, monkeypatch):
    def offline(url, timeout=30.0):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(corpora, "_fetch", offline)
    with pytest.raises(FileNotFoundError, match="--data PATH"):
        load_text("shakespeare", cache_dir=tmp_path)


def test_local_copy_with_the_right_checksum_is_shakespeare(tmp_path, fake_shakespeare):
    path = tmp_path / "input.txt"
    path.write_text(TEXT)
    ds = prepare_dataset(path, cache_dir=tmp_path / "cache")
    assert ds.meta["source"] == "shakespeare" and ds.path.name.startswith("shakespeare-char")
    assert fake_shakespeare == []  # a path is read, never downloaded


def test_folder_of_txt_files_sorted_and_newline_separated(tmp_path):
    (tmp_path / "b.txt").write_text("second\n")
    (tmp_path / "a.txt").write_text("first")  # no trailing newline: one is added
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("third\n")
    (tmp_path / "notes.md").write_text("ignored")
    assert load_text(tmp_path) == "first\nsecond\nthird\n"
    assert load_text(tmp_path / "b.txt") == "second\n"


def test_bad_sources_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="did you mean 'shakespeare'"):
        load_text("shakespear")
    with pytest.raises(FileNotFoundError, match="no .txt files"):
        load_text(tmp_path)
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        load_text(tmp_path / "latin1.txt")
    with pytest.raises(ValueError, match="vocab_size applies"):
        prepare_dataset("python-docs", tokenizer="char", vocab_size=100, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="'char' or 'bpe'"):
        prepare_dataset("python-docs", tokenizer="wordpiece", cache_dir=tmp_path)


# --- prepared datasets -----------------------------------------------------------------------

def test_char_dataset_is_nanogpt_split_as_uint16_memmaps(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text(TEXT)
    ds = prepare_dataset(path, tokenizer="char", cache_dir=tmp_path / "cache")
    n = len(TEXT)
    assert isinstance(ds.train, np.memmap) and ds.train.dtype == np.uint16
    assert ds.tokenizer.decode(ds.train) == TEXT[: int(n * 0.9)]  # nanoGPT: data[:int(n*0.9)]
    assert ds.tokenizer.decode(ds.val) == TEXT[int(n * 0.9):]
    assert ds.tokenizer.chars == sorted(set(TEXT))
    meta = json.loads((ds.path / "meta.json").read_text())
    assert meta == ds.meta
    assert meta["text_sha256"] == hashlib.sha256(TEXT.encode()).hexdigest()
    assert meta["train_tokens"] + meta["val_tokens"] == n and meta["vocab_size"] == ds.tokenizer.vocab_size
    assert (ds.path / "tokenizer.json").exists() and not ds.reused


def test_second_prepare_reuses_without_tokenizing(tmp_path, monkeypatch):
    path = tmp_path / "t.txt"
    path.write_text(TEXT)
    first = prepare_dataset(path, special_tokens=MLM_SPECIAL_TOKENS, cache_dir=tmp_path)

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("re-tokenized a prepared dataset")

    monkeypatch.setattr(CharTokenizer, "encode", no_tokenizing)
    monkeypatch.setattr(CharTokenizer, "from_text", no_tokenizing)
    again = prepare_dataset(path, special_tokens=MLM_SPECIAL_TOKENS, cache_dir=tmp_path)
    assert again.reused and again.path == first.path
    np.testing.assert_array_equal(again.train, first.train)
    assert again.tokenizer.special_tokens == first.tokenizer.special_tokens
    monkeypatch.undo()
    other = prepare_dataset(path, cache_dir=tmp_path)  # other settings: another folder
    assert other.path != first.path and not other.reused


def test_bpe_dataset_round_trips_and_chunking_changes_nothing(tmp_path, monkeypatch):
    text = TEXT + "  \n\n   indented\n\tcafé 🙂\n" * 5
    path = tmp_path / "t.txt"
    path.write_text(text)
    whole = prepare_dataset(path, tokenizer="bpe", vocab_size=300, cache_dir=tmp_path / "a")
    assert isinstance(whole.tokenizer, BPETokenizer) and whole.tokenizer.vocab_size == 300
    n_train = int(len(text) * 0.9)
    assert whole.tokenizer.decode(whole.train) == text[:n_train]
    assert whole.tokenizer.decode(whole.val) == text[n_train:]
    # The tokenizer saw only the train split.
    assert whole.tokenizer.to_dict() == BPETokenizer.train(text[:n_train], 300).to_dict()
    monkeypatch.setattr(data, "_CHUNK_CHARS", 37)  # tokenize in many small pieces
    chunked = prepare_dataset(path, tokenizer="bpe", vocab_size=300, cache_dir=tmp_path / "b")
    np.testing.assert_array_equal(chunked.train, whole.train)
    np.testing.assert_array_equal(chunked.val, whole.val)


def test_bpe_dataset_ids_equal_encoding_the_whole_split(tmp_path, monkeypatch):
    # "\n\n" before a word, runs of spaces, CRLF (read as "\n"), multi-byte characters that 37-byte
    # reads cut in half, and special tokens: the streamed ids must be encode() of each whole split.
    text = ("Word.\n\nNext  line\r\n\r\n   indented<|endoftext|>\n café 東京 🙂\n'RE it's\n" * 40
            + "no newline at the end")
    path = tmp_path / "t.txt"
    path.write_bytes(text.encode("utf-8"))
    read = load_text(path)
    assert "\r" not in read  # universal newlines, as Path.read_text
    monkeypatch.setattr(data, "_CHUNK_CHARS", 37)
    for pattern in ("gpt2", "gpt4", "none"):
        ds = prepare_dataset(path, tokenizer="bpe", vocab_size=320, special_tokens={"<|endoftext|>": 400},
                             split_pattern=pattern, cache_dir=tmp_path / pattern)
        train, val = data.split_text(read)
        assert ds.tokenizer.special_tokens == {"<|endoftext|>": 400} and ds.meta["split_pattern"] == pattern
        assert ds.tokenizer.to_dict() == BPETokenizer.train(train, 320, {"<|endoftext|>": 400},
                                                            pattern=pattern).to_dict()
        assert ds.train.tolist() == ds.tokenizer.encode(train)
        assert ds.val.tolist() == ds.tokenizer.encode(val)
        assert ds.meta["text_sha256"] == hashlib.sha256(read.encode()).hexdigest()  # the key as before
        assert ds.meta["characters"] == len(read) and ds.meta["bytes"] == len(read.encode())


def test_streamed_corpus_reads_like_load_text(tmp_path):
    (tmp_path / "a.txt").write_bytes("é\r".encode() + b"\n" + "東".encode() * 10)  # "\r\n" across reads
    (tmp_path / "b.txt").write_bytes(b"")
    (tmp_path / "c.txt").write_bytes("x\r".encode())
    for size in (1, 2, 3, 1 << 20):
        assert "".join(corpora.iter_path(tmp_path, chunk_bytes=size)) == load_text(tmp_path)
    assert load_text(tmp_path) == "é\n" + "東" * 10 + "\n\nx\n"
    (tmp_path / "d.txt").write_bytes(b"ok\n" * 1000 + b"\xff")
    with pytest.raises(ValueError, match="not UTF-8 text \\(byte 3000"):
        list(corpora.iter_path(tmp_path / "d.txt", chunk_bytes=7))


def test_char_dataset_of_a_50_mb_file_stays_in_bounded_memory(tmp_path):
    """Peak RSS growth while preparing 50 MB of text, measured in a fresh process.

    Holding the text once (50 MB as a str), its UTF-8 copy for the hash and the split copies would
    take > 150 MB; streaming holds ~1M characters and their ids at a time.
    """
    rng = random.Random(0)
    words = ["the", "model", "tokens", "naïve", "東京", "🙂", "attention", "a", "of", "x=1;"]
    block = "".join(" ".join(rng.choices(words, k=rng.randrange(1, 15))) + "\n" for _ in range(20_000))
    path = tmp_path / "big.txt"
    with open(path, "w", encoding="utf-8") as f:
        reps = -(-50_000_000 // len(block.encode()))
        for _ in range(reps):
            f.write(block)
    n = len(block) * reps
    script = textwrap.dedent(f"""
        import json, resource, sys
        from minillm.data.dataset import prepare_dataset
        def peak():  # ru_maxrss: kilobytes on Linux, bytes on macOS
            scale = 1 if sys.platform == "darwin" else 1024
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
        before = peak()
        ds = prepare_dataset({str(path)!r}, cache_dir={str(tmp_path / "cache")!r})
        print(json.dumps({{"growth": peak() - before, "path": str(ds.path), **ds.meta}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.splitlines()[-1])
    assert r["characters"] == n and r["bytes"] >= 50_000_000
    n_train = int(n * 0.9)  # split_text's point: one char token per character
    assert r["train_tokens"] == n_train and r["val_tokens"] == n - n_train
    tok = load_tokenizer(r["path"])
    train = np.memmap(f"{r['path']}/train.bin", dtype=np.uint16, mode="r")
    val = np.memmap(f"{r['path']}/val.bin", dtype=np.uint16, mode="r")
    start = n_train % len(block)
    assert tok.decode(train[:300]) == block[:300]
    assert tok.decode(train[-100:]) + tok.decode(val[:100]) == (block * 2)[start - 100 + len(block):][:200]
    assert r["growth"] < 64 * 2**20, f"peak RSS grew by {r['growth'] / 2**20:.0f} MB for 50 MB of text"


def test_large_vocab_is_stored_as_uint32(tmp_path):
    chars = [chr(c) for c in range(0x10000, 0x10000 + 66_000)]  # beyond the surrogates
    path = tmp_path / "big.txt"
    path.write_text("".join(chars))
    ds = prepare_dataset(path, cache_dir=tmp_path)
    assert ds.tokenizer.vocab_size > 65536 and ds.train.dtype == np.uint32
    assert ds.tokenizer.decode(ds.val) == "".join(chars)[int(len(chars) * 0.9):]


# --- batches ---------------------------------------------------------------------------------

def test_get_batch_windows_shift_by_one_and_match_nanogpt():
    tokens = np.arange(1000, dtype=np.uint16) * 7 % 1013
    B, T = 4, 16
    g = torch.Generator().manual_seed(1)
    x, y = get_batch(tokens, B, T, generator=g)
    assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64
    torch.testing.assert_close(x[:, 1:], y[:, :-1])
    # nanoGPT's get_batch, with the same generator state.
    ix = torch.randint(len(tokens) - T, (B,), generator=torch.Generator().manual_seed(1))
    ref_x = torch.stack([torch.from_numpy(tokens[i:i + T].astype(np.int64)) for i in ix])
    ref_y = torch.stack([torch.from_numpy(tokens[i + 1:i + 1 + T].astype(np.int64)) for i in ix])
    torch.testing.assert_close(x, ref_x)
    torch.testing.assert_close(y, ref_y)
    # A torch tensor of tokens gives the same batch.
    x2, y2 = get_batch(torch.from_numpy(tokens.astype(np.int64)), B, T,
                       generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close((x2, y2), (x, y))


def test_get_batch_resumes_exactly_from_a_saved_generator_state():
    tokens = np.arange(500, dtype=np.uint16)
    g = torch.Generator().manual_seed(0)
    get_batch(tokens, 2, 8, generator=g)
    state = g.get_state()
    after = [get_batch(tokens, 2, 8, generator=g) for _ in range(3)]
    g2 = torch.Generator()
    g2.set_state(state)
    for a, b in zip(after, [get_batch(tokens, 2, 8, generator=g2) for _ in range(3)]):
        torch.testing.assert_close(a, b)


def test_get_batch_needs_enough_tokens():
    with pytest.raises(ValueError, match="at least 17 tokens"):
        get_batch(np.arange(16, dtype=np.uint16), 2, 16)
    x, y = get_batch(np.arange(17, dtype=np.uint16), 3, 16)  # exactly one window fits
    assert (x[:, 0] == 0).all() and (y[:, -1] == 16).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_get_batch_on_cuda():
    x, y = get_batch(np.arange(100, dtype=np.uint16), 2, 8, device="cuda")
    assert x.is_cuda and y.is_cuda
    torch.testing.assert_close(x[:, 1:].cpu(), y[:, :-1].cpu())


# --- masked-LM corruption --------------------------------------------------------------------

def test_mask_tokens_follows_bert_80_10_10_and_never_picks_specials():
    tok = CharTokenizer.from_text(TEXT, special_tokens=MLM_SPECIAL_TOKENS)
    pad, mask = tok.special_tokens["[PAD]"], tok.special_tokens["[MASK]"]
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, len(tok.chars), (64, 512), generator=g)
    x[:, 400:] = pad  # padding at the end of every row
    inputs, labels = mask_tokens(x, tok, generator=torch.Generator().manual_seed(1))
    chosen = labels != IGNORE_INDEX
    ordinary = x != pad
    assert not chosen[~ordinary].any() and (inputs[~ordinary] == pad).all()
    assert abs(chosen.sum().item() / ordinary.sum().item() - 0.15) < 0.01
    torch.testing.assert_close(labels[chosen], x[chosen])
    torch.testing.assert_close(inputs[~chosen], x[~chosen])
    n = chosen.sum().item()
    masked = (inputs == mask) & chosen
    replaced = (inputs != mask) & (inputs != x) & chosen
    kept = (inputs == x) & chosen
    assert abs(masked.sum().item() / n - 0.8) < 0.03
    assert abs(replaced.sum().item() / n - 0.1) < 0.02  # (a random token equal to the original
    assert abs(kept.sum().item() / n - 0.1) < 0.02  # counts as kept: ~1/V of 10%)
    assert (inputs[replaced] < len(tok.chars)).all()  # random tokens are never specials
    again = mask_tokens(x, tok, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(again, (inputs, labels))


def test_mask_tokens_needs_a_mask_token():
    with pytest.raises(ValueError, match=r"\[MASK\]"):
        mask_tokens(torch.zeros(2, 4, dtype=torch.long), CharTokenizer.from_text("abc"))


# --- the command -----------------------------------------------------------------------------

def test_cli_prepares_then_reuses(tmp_path, capsys):
    path = tmp_path / "t.txt"
    path.write_text(TEXT)
    args = ["data", str(path), "--tokenizer=bpe", "--vocab_size=280", f"--cache_dir={tmp_path}"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "bytes/token" in out and "vocab_size=280" in out and "prepared in" in out
    assert main(args) == 0
    assert "(reused)" in capsys.readouterr().out
    assert main(["data", str(path), "--vocab_sise=3", f"--cache_dir={tmp_path}"]) == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "--help"])
    assert exit_info.value.code == 0


def test_cli_split_pattern_and_special_token_ids(tmp_path, capsys):
    path = tmp_path / "t.txt"
    path.write_text(TEXT)
    base = ["data", str(path), "--tokenizer=bpe", "--vocab_size=280", f"--cache_dir={tmp_path}"]
    assert main(base + ["--split_pattern=gpt4", "--special_tokens=<|endoftext|>=300,[MASK]=290"]) == 0
    out = capsys.readouterr().out
    assert "vocab_size=301" in out and "'<|endoftext|>', '[MASK]'" in out
    ds = prepare_dataset(path, tokenizer="bpe", vocab_size=280, cache_dir=tmp_path, split_pattern="gpt4",
                         special_tokens={"<|endoftext|>": 300, "[MASK]": 290})
    assert ds.reused and ds.tokenizer.special_tokens == {"<|endoftext|>": 300, "[MASK]": 290}
    assert main(base + ["--special_tokens=<s>=5"]) == 2
    assert "collide with the byte/merge ids" in capsys.readouterr().err
    assert main(base + ["--special_tokens=<s>=300,</s>"]) == 2
    with pytest.raises(SystemExit) as exit_info:  # argparse's choices
        main(base + ["--split_pattern=gpt5"])
    assert exit_info.value.code == 2
    assert main(["data", str(path), "--split_pattern=gpt4", f"--cache_dir={tmp_path}"]) == 2  # char
