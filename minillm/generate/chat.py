"""A conversation with a chat model: the history, its template, and the context window it must fit.

A chat model answers the whole conversation, not the last line: each turn, the history (system
message, every user and assistant message so far) is rendered with the model's own chat template
(minillm/data/chat_template.py) and the model continues it until its end-of-turn token. The history
grows every turn and the context window does not, so when the rendered prompt plus the room for an
answer no longer fits in block_size, the oldest turns are dropped (the system message is kept) and
the session says how many.

    >>> chat = ChatSession(model, tokenizer, system="Be brief.")
    >>> answer = chat.reply("What is the capital of France?", stream=print_piece)
    >>> chat.dropped, chat.last_tokens, chat.last_seconds
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from minillm.data.chat_template import chat_prompt_for
from minillm.generate.sampling import generate_text


class ChatSession:
    """The messages of one conversation and the settings to answer them with."""

    def __init__(self, model, tokenizer, system: str | None = None, max_new_tokens: int = 256,
                 temperature: float = 0.7, top_k: int | None = None, top_p: float | None = 0.9,
                 seed: int = 0, flat_decode: bool = True):
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("this model has no chat template (a chat needs an instruct model: a GGUF or "
                             "Hugging Face folder with one, e.g. `minillm pull smollm2-135m-instruct`)")
        if max_new_tokens >= model.cfg.block_size:
            raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for the conversation in "
                             f"block_size={model.cfg.block_size}")
        self.model, self.tokenizer = model, tokenizer
        self.system = system
        self.messages: list[dict] = []  # user and assistant turns, oldest first
        self.sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, flat_decode=flat_decode)
        self.max_new_tokens = max_new_tokens
        self.generator = torch.Generator().manual_seed(seed)
        self.dropped = 0  # turns dropped to fit the context during the last reply
        self.last_tokens, self.last_seconds = 0, 0.0

    def conversation(self) -> list[dict]:
        """The messages the template sees: the system message (if any) and the turns."""
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.messages

    def reset(self) -> None:
        self.messages = []

    def prompt(self) -> tuple[str, list[str]]:
        """The rendered prompt and its stop strings, after dropping the oldest turns that do not fit."""
        self.dropped = 0
        budget = self.model.cfg.block_size - self.max_new_tokens
        while True:
            text, stops = chat_prompt_for(self.tokenizer, self.conversation())
            if len(self.tokenizer.encode(text)) <= budget:
                return text, stops
            if len(self.messages) <= 1:  # the newest user message alone is too long
                raise ValueError(f"the message is longer than the context allows ({budget} tokens "
                                 f"with room for {self.max_new_tokens} new ones)")
            # drop the oldest exchange (a user turn and the answer to it) and try again
            drop = 2 if len(self.messages) > 2 and self.messages[1]["role"] == "assistant" else 1
            self.messages = self.messages[drop:]
            self.dropped += drop

    def reply(self, user_text: str, stream=None) -> str:
        """Add the user's message, generate the answer (streamed piece by piece to `stream`), keep it.

        A KeyboardInterrupt while generating ends the answer where it is: what was generated so far
        is kept as the answer, and the interrupt is raised again for the caller to report."""
        self.messages.append({"role": "user", "content": user_text})
        text, stops = self.prompt()
        pieces, counts = [], []

        def collect(_row: int, piece: str) -> None:
            pieces.append(piece)
            if stream is not None:
                stream(piece)

        start = time.perf_counter()
        try:
            [answer] = generate_text(self.model, self.tokenizer, [text], self.max_new_tokens, stop=stops,
                                     generator=self.generator, stream=collect, token_counts=counts,
                                     **self.sampling)
        except KeyboardInterrupt:
            self._finish("".join(pieces), len(pieces), start)
            raise
        self._finish(answer, counts[0] if counts else 0, start)
        return answer

    def _finish(self, answer: str, n_tokens: int, start: float) -> None:
        self.messages.append({"role": "assistant", "content": answer})
        self.last_tokens, self.last_seconds = n_tokens, time.perf_counter() - start

    def save(self, path: str | Path) -> None:
        """The conversation as JSON ({"messages": [...]}, the shape OpenAI's chat API takes)."""
        from minillm.files import write_json

        write_json(path, {"messages": self.conversation()}, sort_keys=False)
