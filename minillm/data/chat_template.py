"""A model's own chat template: messages → the exact text it was trained on, rendered safely.

An instruction-tuned model learned one conversation format, e.g. ChatML for SmolLM2 and Qwen2:

    <|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n

Prompting it any other way ("User: …\\nAssistant:") makes it a worse model. The format ships with
the weights as a Jinja template (GGUF: `tokenizer.chat_template`; Hugging Face: `chat_template`
in tokenizer_config.json, or a chat_template.jinja file), and every runtime renders it the same
way, as transformers' `apply_chat_template` does: Jinja with trim_blocks and lstrip_blocks, the
variables `messages`, `add_generation_prompt`, `tools`, `documents` and the special tokens
(`bos_token`, `eos_token`, ...), a `raise_exception(msg)` function, a `tojson` filter that keeps
non-ASCII text as it is, and the loop controls `{% break %}` / `{% continue %}`.

A template is code that came with a downloaded file, so it runs in Jinja's sandbox (no attribute
access to Python internals, no mutation of the inputs) and within bounds: at most MAX_RANGE items
from `range()` in all, MAX_CHARS of output and MAX_SECONDS of rendering. A template that raises,
loops or floods is a one-line ChatTemplateError.
"""

from __future__ import annotations

import contextvars
import json
import time
from datetime import datetime
from functools import lru_cache
from pathlib import Path

MAX_RANGE = 100_000      # items that range() may produce while rendering one prompt, all calls together
MAX_CHARS = 4_000_000    # rendered characters
MAX_SECONDS = 5.0


class ChatTemplateError(ValueError):
    """The template could not render these messages; one line saying why."""


# what range() may still produce while the current prompt renders (one budget per render, per thread)
_RANGE_LEFT: contextvars.ContextVar[int] = contextvars.ContextVar("range_left", default=MAX_RANGE)


@lru_cache(maxsize=1)
def _environment():
    """A sandboxed Jinja environment configured as transformers configures it, plus our bounds."""
    try:
        import jinja2
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:  # jinja2 comes with torch, so this is rare
        raise ImportError("chat templates need jinja2: pip install jinja2") from e

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def bounded_range(*args):
        r = range(*args)
        left = _RANGE_LEFT.get() - len(r)
        if left < 0:
            raise ChatTemplateError(f"the chat template asked range() for more than {MAX_RANGE} items")
        _RANGE_LEFT.set(left)
        return r

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, range=bounded_range,
                       strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env


@lru_cache(maxsize=16)
def _compile(template: str):
    """A template compiled once (a server renders the same one for every chat request)."""
    import jinja2

    try:
        return _environment().from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the chat template does not parse (line {e.lineno}): {e.message}") from None


def render_chat(template: str, messages: list[dict], add_generation_prompt: bool = True,
                special_tokens: dict | None = None, tools: list | None = None,
                documents: list | None = None, **kwargs) -> str:
    """The prompt text for `messages` (each {"role", "content", ...}) under `template`.

    special_tokens: {"bos_token": ..., "eos_token": ...} as the tokenizer names them; kwargs are
    extra template variables (as apply_chat_template's), e.g. enable_thinking=False."""
    import jinja2

    compiled = _compile(template)
    _RANGE_LEFT.set(MAX_RANGE)
    variables = {**(special_tokens or {}), **kwargs, "messages": messages, "tools": tools,
                 "documents": documents, "add_generation_prompt": add_generation_prompt}
    pieces, size, start = [], 0, time.perf_counter()
    try:
        # render piece by piece, so that a template that floods or spins is stopped on the way
        for piece in compiled.generate(**variables):
            pieces.append(piece)
            size += len(piece)
            if size > MAX_CHARS:
                raise ChatTemplateError(f"the chat template rendered more than {MAX_CHARS:,} characters")
            if time.perf_counter() - start > MAX_SECONDS:
                raise ChatTemplateError(f"the chat template took more than {MAX_SECONDS:g} s to render")
    except ChatTemplateError:
        raise
    except jinja2.TemplateError as e:  # raise_exception(...) in the template, or a sandbox refusal
        raise ChatTemplateError(f"the chat template refused these messages: {_one_line(e)}") from None
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, RecursionError) as e:
        raise ChatTemplateError(f"the chat template failed: {type(e).__name__}: {_one_line(e)}") from None
    return "".join(pieces)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:300] + ("…" if len(text) > 300 else "")


def template_from_hf_folder(folder: str | Path) -> str | None:
    """A Hugging Face folder's chat template: chat_template.jinja, else tokenizer_config.json's
    `chat_template` (a string, or a list of named templates of which we take "default"), else None."""
    folder = Path(folder)
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    config = folder / "tokenizer_config.json"
    if not config.is_file():
        return None
    try:
        value = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config} is not a JSON object: {_one_line(e)}") from None
    if isinstance(value, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{config}: chat_template must be a string or a list of named templates")
    return value


def chat_prompt_for(tokenizer, messages: list[dict], add_generation_prompt: bool = True):
    """(prompt text, stop strings) in the tokenizer's own chat template, or None when it has none.

    The answer ends at the end-of-turn token the template closes each message with, which is the
    tokenizer's eos_token for the templates models ship (<|im_end|> for ChatML, <|eot_id|> for
    Llama 3)."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return None
    specials = {k: getattr(tokenizer, k, None) for k in ("bos_token", "eos_token")}
    text = render_chat(template, messages, add_generation_prompt, {k: v for k, v in specials.items() if v})
    return text, [specials["eos_token"]] if specials["eos_token"] else []
