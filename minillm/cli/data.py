"""`minillm data`: prepare (or reuse) a tokenized dataset and print what the tokenizer did to it.

    minillm data                                          python-docs, character-level
    minillm data shakespeare --tokenizer=bpe --vocab_size=1024
    minillm data corpus.txt --tokenizer=bpe --split_pattern=gpt4 --special_tokens="<|endoftext|>=1023"
"""

from __future__ import annotations

import numpy as np

from minillm.cli.options import reject_unknown
from minillm.data.corpora import CORPORA
from minillm.data.dataset import DEFAULT_BPE_VOCAB, prepare_dataset
from minillm.data.tokenizer import SPLIT_PATTERNS, BPETokenizer


def add_parser(sub) -> None:
    p = sub.add_parser(
        "data", help="prepare (or reuse) a tokenized dataset and summarize it",
        description="Load a corpus, train/build its tokenizer, tokenize a 90/10 train/val split into "
                    "memmapped token files in the cache, and print a summary. Training runs this step "
                    "themselves; run it alone to see what a tokenizer does to a text, or to prepare "
                    "once before several runs.",
        epilog="examples:  minillm data  |  minillm data shakespeare --tokenizer=bpe --vocab_size=1024"
               "  |  minillm data my_notes/ --tokenizer=char.  The cache dir is $XDG_CACHE_HOME/minillm "
               "or ~/.cache/minillm unless --cache_dir is given.")
    p.add_argument("source", nargs="?", default=None,
                   help=f"corpus name ({', '.join(CORPORA)}) or a .txt file or folder of .txt files "
                        "(default: python-docs, embedded in every Python)")
    p.add_argument("--data", default=None, help="same as SOURCE (the name `minillm train` uses)")
    p.add_argument("--tokenizer", choices=("char", "bpe"), default="char",
                   help="char: one id per character (nanoGPT); bpe: byte-level BPE trained on the text")
    p.add_argument("--vocab_size", type=int, default=None,
                   help=f"BPE vocabulary size incl. 256 byte ids and specials (default {DEFAULT_BPE_VOCAB})")
    p.add_argument("--special_tokens", default="",
                   help='comma-separated special tokens, e.g. "[PAD],[MASK]" for masked-LM training; '
                        'bpe takes ids too: "<|endoftext|>=1023" (ids above the bytes and merges)')
    p.add_argument("--split_pattern", choices=tuple(SPLIT_PATTERNS), default="gpt2",
                   help="bpe pre-tokenizer: gpt2 (GPT-2's regex), gpt4 (cl100k's: digits in 3s, "
                        "symbol+word), none (no split: merges may cross words)")
    p.add_argument("--val_fraction", type=float, default=0.1, help="share of the text for validation")
    p.add_argument("--cache_dir", default=None, help="where corpora and datasets are cached")
    p.set_defaults(func=cmd_data)


def _parse_specials(arg: str) -> list[str] | dict[str, int]:
    """"[PAD],[MASK]" -> a list; "<|endoftext|>=1023" -> {token: id}: all with ids or none."""
    items = [s for s in arg.split(",") if s]
    with_id = [s.rpartition("=") for s in items]
    with_id = [(tok, int(i)) for tok, eq, i in with_id if eq and tok and i.isdigit()]
    if not with_id:
        return items
    if len(with_id) != len(items):
        raise ValueError(f"--special_tokens={arg!r}: give every token an id (TOKEN=ID) or none")
    return dict(with_id)


def _show(tokenizer, ids) -> str:
    """Token boundaries made visible: 'def'|' f'|'(x'|'):'."""
    if isinstance(tokenizer, BPETokenizer):
        return "|".join(repr(tokenizer.vocab[i].decode("utf-8", errors="replace")) for i in ids)
    return "|".join(repr(tokenizer.decode([i])) for i in ids)


def cmd_data(args, overrides: list[str]) -> int:
    """Prepare a dataset and print characters, tokens, vocabulary, compression and cache location."""
    reject_unknown(args, overrides, "data")
    if args.source and args.data and args.source != args.data:
        raise ValueError(f"two data sources given: {args.source!r} and --data={args.data!r}")
    source = args.source or args.data or "python-docs"
    specials = _parse_specials(args.special_tokens)
    ds = prepare_dataset(source, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                         special_tokens=specials, cache_dir=args.cache_dir,
                         val_fraction=args.val_fraction, verbose=True, split_pattern=args.split_pattern)
    m = ds.meta
    n_tokens = m["train_tokens"] + m["val_tokens"]
    print(f"source       {m['source']} ({m['source_arg']}), sha256 {m['text_sha256'][:16]}…")
    print(f"text         {m['characters']:,} characters, {m['bytes']:,} UTF-8 bytes")
    print(f"tokenizer    {ds.tokenizer!r}")
    print(f"tokens       {n_tokens:,} = train {m['train_tokens']:,} + val {m['val_tokens']:,} "
          f"({m['dtype']})")
    print(f"compression  {m['bytes_per_token']:.2f} bytes/token")
    sample = np.asarray(ds.train[:24]).tolist()
    print(f"first tokens {_show(ds.tokenizer, sample)}")
    if isinstance(ds.tokenizer, BPETokenizer) and ds.tokenizer.merges:
        longest = sorted(ds.tokenizer.merges.values(), key=lambda i: -len(ds.tokenizer.vocab[i]))[:8]
        print(f"longest      {_show(ds.tokenizer, longest)}")
    state = "reused" if ds.reused else f"prepared in {m['seconds']:.1f} s"
    print(f"cached at    {ds.path} ({state})")
    return 0
