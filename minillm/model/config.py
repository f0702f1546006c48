"""Model configuration: one dataclass, presets as plain data, `--key=value` overrides.

Every knob of the Transformer lives in `ModelConfig`, each with a comment on why it exists.
Presets are dictionaries of field values (no code), so a reader sees at a glance what makes
"gpt2" different from "llama-style". A config that cannot work fails when it is built, with a
message naming the field, not an hour into training.

    >>> cfg = ModelConfig.from_preset("gpt2")
    >>> cfg = apply_overrides(cfg, ["--n_layer=6", "--dropout=0.1"])
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass

ATTENTION_IMPLS = ("naive", "sdpa", "triton")
POSITIONAL = ("sinusoidal", "learned", "rotary", "none")
ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "swiglu")
NORMS = ("layernorm", "rmsnorm")
ROPE_SCALINGS = ("linear", "llama3")  # context-extension rules for RoPE frequencies, see positional.py


@dataclass
class ModelConfig:
    # --- sizes -----------------------------------------------------------------------------
    vocab_size: int = 256  # number of token ids; set from the tokenizer when training
    block_size: int = 256  # longest context the model sees (positions 0 .. block_size-1)
    n_layer: int = 6  # number of Transformer blocks
    n_head: int = 6  # attention heads per block; n_embd must divide evenly
    # key/value heads (grouped-query attention, Ainslie et al. 2023): each group of n_head/n_kv_head
    # query heads shares one K/V head, shrinking the KV cache by that factor. None = n_head (classic
    # multi-head attention); 1 = multi-query attention (Shazeer, 2019). Llama-3-8B: 32 / 8.
    n_kv_head: int | None = None
    n_embd: int = 384  # model width C; each head gets D = C / H channels
    ffn_hidden: int = 0  # FFN inner width; 0 = 4*C (or 8/3*C rounded to 64 for SwiGLU)
    n_token_types: int = 0  # BERT's segment embeddings (2 for BERT); 0 = none
    # BERT's next-sentence head on a masked LM: the pooler (dense + tanh on [CLS]) and a 2-way
    # classifier "is B the segment that follows A?" (objective mlm+nsp; model/heads.py)
    nsp_head: bool = False
    head_size: int = 0  # channels per head D; 0 = n_embd / n_head. Set when heads are pruned away
    #                     (minillm/compress/prune.py): then H·D < C and attention works in H·D channels

    # --- architecture choices --------------------------------------------------------------
    positional: str = "sinusoidal"  # "Attention Is All You Need" default; or learned/rotary/none
    rope_base: float = 10000.0  # RoPE frequency base θ (Llama uses 10000 or 500000)
    # RoPE context extension, as Hugging Face's config.json "rope_scaling" asks: None (plain RoPE),
    # "linear" (positions divided by rope_factor, Chen et al. 2023) or "llama3" (low frequencies
    # divided by rope_factor, high ones kept, a smooth blend between; Llama 3.1)
    rope_scaling: str | None = None
    rope_factor: float = 1.0  # how many times longer the extended context is ("factor")
    rope_low_freq_factor: float = 1.0  # llama3 only: wavelengths > original/low are fully scaled
    rope_high_freq_factor: float = 4.0  # llama3 only: wavelengths < original/high are untouched
    rope_original_context: int = 8192  # llama3 only: the context the model was first trained at
    activation: str = "gelu"  # FFN non-linearity: relu | gelu | gelu_tanh | swiglu
    norm: str = "layernorm"  # layernorm (GPT-2, BERT) or rmsnorm (Llama)
    norm_eps: float = 1e-5  # added to the variance; BERT uses 1e-12
    prenorm: bool = True  # pre-norm (GPT-2, Llama) trains stably; post-norm is the original/BERT
    embed_norm: bool = False  # BERT normalises the summed embeddings before the first block
    bias: bool = True  # bias in linear layers and norms; Llama drops them
    qkv_bias: bool | None = None  # bias on the q, k, v projections only; None = bias. Qwen2: True
    tie_weights: bool = True  # share token embedding and output projection (GPT-2, BERT)
    causal: bool = True  # decoder (GPT) masks the future; encoder (BERT) sees both sides
    # local attention (Longformer; Mistral 7B): query i sees only keys j with i - window < j ≤ i,
    # i.e. itself and the window-1 tokens before it (Hugging Face Mistral's convention). The KV
    # cache then keeps only the last window-1 tokens. None = full causal attention.
    sliding_window: int | None = None

    # --- regularisation and init -----------------------------------------------------------
    dropout: float = 0.0  # default rate for the three dropouts below (nanoGPT's name)
    attn_dropout: float | None = None  # on attention probabilities; None = dropout
    resid_dropout: float | None = None  # on each residual branch output; None = dropout
    embd_dropout: float | None = None  # on the summed embeddings; None = dropout
    init_std: float = 0.02  # GPT-2's N(0, 0.02) initialisation

    # --- implementation switch -------------------------------------------------------------
    attention: str = "naive"  # naive (readable, minillm/model/attention.py) | sdpa (PyTorch) | triton

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        for name in ("ffn_hidden", "n_token_types", "head_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"ModelConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.head_size == 0 and self.n_embd % self.n_head != 0:
            raise ValueError(
                f"ModelConfig.n_embd={self.n_embd} is not divisible by n_head={self.n_head}: "
                "each head needs the same number of channels"
            )
        if self.n_kv_head is not None and (self.n_kv_head <= 0 or self.n_head % self.n_kv_head != 0):
            raise ValueError(
                f"ModelConfig.n_kv_head={self.n_kv_head} must be a positive divisor of n_head={self.n_head}: "
                "every key/value head serves the same number of query heads"
            )
        if self.sliding_window is not None:
            if self.sliding_window < 1:
                raise ValueError(f"ModelConfig.sliding_window must be >= 1 (or None), got {self.sliding_window}")
            if not self.causal:
                raise ValueError("ModelConfig.sliding_window needs causal=True: the window looks back only")
        if self.nsp_head and self.causal:
            raise ValueError("ModelConfig.nsp_head needs causal=False: next-sentence prediction reads [CLS], "
                             "which sees the whole pair only in an encoder")
        if self.rope_scaling is not None:
            _check_choice("rope_scaling", self.rope_scaling, ROPE_SCALINGS)
            if self.rope_factor < 1.0:
                raise ValueError(f"ModelConfig.rope_factor must be >= 1, got {self.rope_factor}")
            if self.rope_scaling == "llama3" and not 0 < self.rope_low_freq_factor < self.rope_high_freq_factor:
                raise ValueError("ModelConfig.rope_low_freq_factor must be positive and below "
                                 "rope_high_freq_factor")
        _check_choice("positional", self.positional, POSITIONAL)
        _check_choice("activation", self.activation, ACTIVATIONS)
        _check_choice("norm", self.norm, NORMS)
        _check_choice("attention", self.attention, ATTENTION_IMPLS)
        if self.positional == "rotary" and self.head_dim % 2 != 0:
            raise ValueError(
                f"ModelConfig.positional='rotary' rotates channel pairs, so the head dim must be even; "
                f"n_embd/n_head = {self.head_dim}"
            )
        if self.positional == "sinusoidal" and self.n_embd % 2 != 0:
            raise ValueError(f"ModelConfig.n_embd={self.n_embd} must be even for sinusoidal positions")
        for name in ("dropout", "attn_dropout", "resid_dropout", "embd_dropout"):
            p = getattr(self, name)
            if p is not None and not 0.0 <= p < 1.0:
                raise ValueError(f"ModelConfig.{name} must be in [0, 1), got {p}")
        if self.norm_eps <= 0:
            raise ValueError(f"ModelConfig.norm_eps must be positive, got {self.norm_eps}")

    @property
    def head_dim(self) -> int:
        return self.head_size or self.n_embd // self.n_head

    @property
    def attn_dim(self) -> int:
        """Width of q, k, v and of the heads' concatenated output: H·D (= C unless heads were pruned)."""
        return self.n_head * self.head_dim

    @property
    def kv_heads(self) -> int:
        """H_kv, the number of key/value heads (n_kv_head, or n_head when it is None)."""
        return self.n_kv_head or self.n_head

    @property
    def qkv_has_bias(self) -> bool:
        return self.bias if self.qkv_bias is None else self.qkv_bias

    @property
    def ffn_dim(self) -> int:
        if self.ffn_hidden:
            return self.ffn_hidden
        if self.activation == "swiglu":  # keep parameter count ≈ 4*C with three matrices (Llama)
            return 64 * ((8 * self.n_embd // 3 + 63) // 64)
        return 4 * self.n_embd

    def rate(self, which: str) -> float:
        """Dropout rate for 'attn', 'resid' or 'embd', falling back to `dropout`."""
        p = getattr(self, f"{which}_dropout")
        return self.dropout if p is None else p

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Presets are plain data. Sizes follow the models they are named after.
PRESETS: dict[str, dict] = {
    # nanoGPT's CPU shakespeare-char recipe shape: trains in minutes on 2 cores.
    "tiny": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=256),
    # nanoGPT's shakespeare-char "baby GPT" (6L/6H/384, block 256), vocab of 65 characters.
    "char-small": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=65, dropout=0.2),
    # GPT-2 small, 124M: learned positions, GELU-tanh, LayerNorm, biases, tied weights.
    "gpt2": dict(
        n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257,
        positional="learned", activation="gelu_tanh", norm="layernorm", bias=True, tie_weights=True,
    ),
    # BERT-tiny sized encoder (google/bert_uncased_L-2_H-128_A-2): post-norm, learned positions,
    # token types, embedding LayerNorm, exact GELU, eps 1e-12.
    "bert-tiny": dict(
        n_layer=2, n_head=2, n_embd=128, ffn_hidden=512, block_size=512, vocab_size=30522,
        n_token_types=2, positional="learned", activation="gelu", norm_eps=1e-12, prenorm=False,
        embed_norm=True, causal=False, dropout=0.1,
    ),
    # A small Llama-style decoder: RoPE, RMSNorm, SwiGLU, no biases, untied head.
    "llama-style": dict(
        n_layer=8, n_head=8, n_embd=512, block_size=1024, vocab_size=32000,
        positional="rotary", activation="swiglu", norm="rmsnorm", norm_eps=1e-6, bias=False,
        tie_weights=False,
    ),
    # SmolLM2-135M's shape (HuggingFaceTB/SmolLM2-135M config.json): a Llama with grouped-query
    # attention (9 query heads share 3 K/V heads), RoPE θ = 100000, tied embeddings.
    # Load its weights with minillm.weights.huggingface.load_llama(folder).
    "smollm2-135m": dict(
        n_layer=30, n_head=9, n_kv_head=3, n_embd=576, ffn_hidden=1536, block_size=8192, vocab_size=49152,
        positional="rotary", rope_base=100000.0, activation="swiglu", norm="rmsnorm", norm_eps=1e-5,
        bias=False, tie_weights=True,
    ),
}


def _check_choice(field: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"ModelConfig.{field}={value!r} is not one of {', '.join(choices)}{hint}")


# --- command-line overrides ----------------------------------------------------------------

def parse_value(text: str, annotation, name: str):
    """Convert `text` to the type a dataclass field declares (int, float, bool, str, X | None)."""
    if isinstance(annotation, str):  # `from __future__ import annotations` keeps them as strings
        if annotation.endswith("| None") and text.lower() == "none":
            return None  # --n_kv_head=none, --sliding_window=none: back to the default
        annotation = {"int": int, "float": float, "bool": bool, "str": str, "bool | None": bool,
                      "float | None": float, "int | None": int, "str | None": str}.get(annotation, str)
    origin = typing.get_origin(annotation)
    if origin is not None:  # Optional[X]
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if text.lower() == "none":
            return None
        annotation = args[0]
    if annotation is bool:
        low = text.lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"--{name} expects a boolean (true/false), got {text!r}")
    if annotation is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"--{name} expects an integer, got {text!r}") from None
    if annotation is float:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"--{name} expects a number, got {text!r}") from None
        if not math.isfinite(value):  # float() takes "nan" and "inf"; no hyper-parameter means them
            raise ValueError(f"--{name} expects a finite number, got {text!r}")
        return value
    return text


def split_overrides(args: list[str], *dataclasses_: type) -> list[dict]:
    """Parse `--key=value` strings into one dict per dataclass, type-checked against its fields.

    An unknown key is an error that lists the closest valid names across all the dataclasses.
    """
    fields = [{f.name: f for f in dataclasses.fields(dc)} for dc in dataclasses_]
    out: list[dict] = [{} for _ in dataclasses_]
    for arg in args:
        if not arg.startswith("--") or "=" not in arg:
            raise ValueError(f"override {arg!r} must look like --key=value")
        key, text = arg[2:].split("=", 1)
        key = key.replace("-", "_")
        for i, fs in enumerate(fields):
            if key in fs:
                out[i][key] = parse_value(text, fs[key].type, key)
                break
        else:
            names = [n for fs in fields for n in fs]
            close = difflib.get_close_matches(key, names, n=3)
            hint = f"; did you mean {', '.join('--' + c for c in close)}?" if close else ""
            raise ValueError(f"unknown option --{key}{hint}")
    return out


def apply_overrides(cfg, args: list[str]):
    """Return a copy of dataclass `cfg` with `--key=value` overrides applied (and re-validated)."""
    (changes,) = split_overrides(args, type(cfg))
    return dataclasses.replace(cfg, **changes)
