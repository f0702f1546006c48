"""A pretrained model's own tokenizer: a Hugging Face tokenizer.json, run by the `tokenizers` library.

For models loaded with minillm.weights.huggingface (SmolLM2, Llama, Qwen2), behind the interface of
the tokenizers trained here (encode, decode, vocab_size, special_tokens, to_dict/save).
"""

from __future__ import annotations

import json
from pathlib import Path

from minillm.data.chat_template import template_from_hf_folder
from minillm.data.tokenizer_base import as_id_list
from minillm.files import write_json


class HFTokenizer:
    """A Hugging Face model folder's tokenizer.json, run by the `tokenizers` library, behind the same
    interface (encode, decode, vocab_size, special_tokens, to_dict/save).

    A pretrained model only works with the exact vocabulary and pre-tokenizer it was trained with
    (SmolLM2 and Llama 3 use byte-level BPE like ours, with their own merges and split regex), so
    we run the original rather than re-implement each variant. `encode` adds no BOS/EOS: like the
    other tokenizers here it maps text to ids and nothing else.
    """

    def __init__(self, tokenizer_json: str, chat_template: str | None = None, bos_token: str | None = None,
                 eos_token: str | None = None):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ImportError("a Hugging Face tokenizer.json needs the tokenizers package: "
                              "pip install tokenizers (it comes with transformers)") from None
        added = _check_tokenizer_json(tokenizer_json)
        try:
            self._tok = Tokenizer.from_str(tokenizer_json)
        except Exception as e:  # the Rust library raises plain Exceptions; the first line says what it wanted
            raise ValueError(f"the tokenizers library cannot read it ({str(e).splitlines()[0][:200]})") from None
        self._json = tokenizer_json
        self.special_tokens = {t["content"]: t["id"] for t in added if t.get("special")}
        # from tokenizer_config.json: the model's own chat template (chat_template.py) and the
        # special tokens it refers to; None for a base model
        self.chat_template, self.bos_token, self.eos_token = chat_template, bos_token, eos_token

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, allowed_special="all") -> list[int]:
        if allowed_special not in ("all", "none"):
            raise ValueError("HFTokenizer.encode takes allowed_special='all' or 'none'")
        self._tok.encode_special_tokens = allowed_special == "none"  # True: "<|endoftext|>" as plain text
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        # byte-level BPE: an incomplete UTF-8 character decodes to U+FFFD, as BPETokenizer.decode
        return self._tok.decode(as_id_list(ids), skip_special_tokens=False)

    def to_dict(self) -> dict:
        return {"type": "hf", "tokenizer_json": self._json, "chat_template": self.chat_template,
                "bos_token": self.bos_token, "eos_token": self.eos_token}

    @classmethod
    def from_dict(cls, d: dict) -> "HFTokenizer":
        return cls(d["tokenizer_json"], d.get("chat_template"), d.get("bos_token"), d.get("eos_token"))

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict(), indent=None, sort_keys=False)

    def to_hf_json(self) -> str:
        """The tokenizer.json this tokenizer was read from, unchanged (export to a Hugging Face folder)."""
        return self._json

    def __repr__(self) -> str:
        return f"HFTokenizer(vocab_size={self.vocab_size}, special_tokens={list(self.special_tokens)[:8]})"


def load_hf_tokenizer(folder: str | Path) -> HFTokenizer:
    """The tokenizer of a Hugging Face model folder (its tokenizer.json), with the chat template and
    special tokens of its tokenizer_config.json / chat_template.jinja when it has them."""
    path = Path(folder)
    path = path / "tokenizer.json" if path.is_dir() else path
    if not path.exists():
        raise FileNotFoundError(f"no tokenizer.json in {folder}: a Hugging Face model folder has one")
    template = template_from_hf_folder(path.parent)
    specials = _special_token_strings(path.parent / "tokenizer_config.json")
    try:
        return HFTokenizer(path.read_text(encoding="utf-8"), template, specials.get("bos_token"),
                           specials.get("eos_token"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except ValueError as e:  # what is wrong with it, named with the file
        raise ValueError(f"{path}: {e}") from None


def _check_tokenizer_json(text: str) -> list[dict]:
    """The "added_tokens" of a tokenizer.json, after checking it is the tokenizers library's format
    (an object with a "model"); ValueError saying what is wrong (the caller names the file)."""
    if not text.strip():
        raise ValueError("empty file")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise ValueError("not a Hugging Face tokenizer.json: expected an object with a \"model\" object")
    added = data.get("added_tokens") or []
    ok = isinstance(added, list) and all(isinstance(t, dict) and isinstance(t.get("content"), str)
                                         and isinstance(t.get("id"), int) for t in added)
    if not ok:
        raise ValueError("\"added_tokens\" should be a list of objects with an \"id\" and a \"content\"")
    return added


def _special_token_strings(config: Path) -> dict[str, str]:
    """bos_token / eos_token of a tokenizer_config.json, given as a string or as {"content": ...}."""
    if not config.is_file():
        return {}
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}  # template_from_hf_folder has already said what is wrong with it
    out = {}
    for key in ("bos_token", "eos_token"):
        value = data.get(key) if isinstance(data, dict) else None
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            out[key] = value
    return out


# --- writing: minillm's own tokenizers as a tokenizer.json ---------------------------------------------

def _tokenizers_library():
    try:
        import tokenizers
    except ImportError:
        raise ImportError("writing a tokenizer.json needs the tokenizers package: pip install tokenizers "
                          "(it comes with transformers)") from None
    return tokenizers


def bpe_tokenizer_json(vocab: dict[str, int], merges: list[tuple[str, str]], specials: dict[str, int],
                       split_patterns: list[str] | None, byte_level: bool = True) -> str:
    """A tokenizer.json for the `tokenizers` library's BPE model, which transformers' AutoTokenizer runs.

    vocab: token string -> id, special tokens included; merges in priority order (first = applied
    first), each joining two vocabulary strings. byte_level: tokens are spelled with GPT-2's byte
    table (space = "Ġ", tokenizer_gguf.bytes_to_unicode), and the pipeline is the one GPT-2's own
    tokenizer.json has: each regex of `split_patterns` in turn cuts the text, keeping matches and the
    text between them ("isolated", as tokenizer_gguf's _regex_split and the `regex` findall of
    tokenizer_bpe do for these patterns), then ByteLevel maps bytes to those characters. Without
    byte_level (characters) nothing splits: BPE starts from single characters and has no merges.
    Special tokens are "added tokens": cut out of the text whole before anything else, as here.
    No post-processor: like minillm's encode, the tokenizer adds no BOS/EOS of its own.
    """
    tk = _tokenizers_library()
    tok = tk.Tokenizer(tk.models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    steps = [tk.pre_tokenizers.Split(tk.Regex(p), behavior="isolated") for p in split_patterns or []]
    if byte_level:
        steps.append(tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
        tok.decoder = tk.decoders.ByteLevel()
    else:
        tok.decoder = tk.decoders.Fuse()  # join the characters with nothing between them
    if steps:
        tok.pre_tokenizer = steps[0] if len(steps) == 1 else tk.pre_tokenizers.Sequence(steps)
    # ids come from the vocabulary, where the specials already are: add_special_tokens reuses them
    tok.add_special_tokens([tk.AddedToken(s, special=True, normalized=False)
                            for s, _ in sorted(specials.items(), key=lambda kv: kv[1])])
    if tok.get_vocab_size(with_added_tokens=True) != len(vocab):
        raise ValueError("the tokenizers library kept fewer tokens than were given (two ids spell the same string)")
    return tok.to_str()
