"""From a row's new token ids to final text: stop strings, and what must be held back while streaming.

A token is not yet text a user can be shown. Two things can still change the tail of a completion:
it might grow into a stop string (stop "\\n\\n" and the text so far ends in "\\n"), and a byte-level
tokenizer may have produced half a UTF-8 character, which decodes as U+FFFD until the rest of its
bytes arrive. `StopText` decodes a row's ids after every token, cuts the text before the earliest
stop string, and hands out only the pieces that can no longer change. generate_text (sampling.py)
and the serving engine (batching.py) both use it, so the two cannot disagree on where a completion
ends.

    >>> row = StopText(tokenizer, stops=["\\n\\n"])
    >>> row.add(token_id); piece = row.take()      # stream piece; row.stopped ends the row
    >>> row.take(final=True)                        # at the end: whatever was held back
"""

from __future__ import annotations

from typing import Callable


def find_stop(text: str, stops) -> int:
    """Index of the earliest stop string in `text`, or -1: the completion ends just before it."""
    return min((text.find(s) for s in stops if s in text), default=-1)


def held_back(text: str, stops) -> int:
    """How many characters at the end of `text` are not final yet, and must not be shown: an
    incomplete UTF-8 character (U+FFFD at the end), or the longest prefix of a stop string."""
    hold = len(text) - len(text.rstrip("\ufffd"))  # a byte-level BPE may end mid-character
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), hold, -1):  # the longest prefix of s ending text
            if text.endswith(s[:n]):
                hold = n
                break
    return hold


class StopText:
    """One row's generated ids and their text, cut before the first stop string.

    `add(token)` records a token (None: no new token, e.g. an end-of-text token that is not shown)
    and re-decodes; `take()` returns the text that became final since the last take. `find` is the
    stop search (find_stop; the serving engine passes its module's own name for it, so a test can
    make one row's text handling fail).

    context: the text just before the row (its prompt). A stop string may begin there and end in the
    generated text: an instruction template's prompt ends with "### Response:\n", so a model that
    answers "###" has written the end marker "\n###" whose newline the prompt holds."""

    def __init__(self, tokenizer, stops: str | list[str] | None = (), find: Callable[[str, list], int] = find_stop,
                 context: str = ""):
        self.stops = [stops] if isinstance(stops, str) else list(stops or ())
        if any(s == "" for s in self.stops):
            raise ValueError("stop strings must be non-empty")
        self.tokenizer, self.find = tokenizer, find
        longest = max(map(len, self.stops), default=1)
        self.context = context[max(0, len(context) - longest + 1):] if longest > 1 else ""  # what a stop can reach
        self.ids: list[int] = []  # the row's generated token ids (what the model conditions on)
        self.text = ""  # their text, cut before a stop string
        self.stopped = False  # a stop string appeared: the row is over
        self.shown = 0  # characters of `text` already handed out

    def add(self, token: int | None) -> None:
        if token is not None:
            self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        cut = 0 if self._begun_in_context(text) else self.find(text, self.stops)
        if cut >= 0:  # the row ends just before the stop string, which is never shown
            text, self.stopped = text[:cut], True
        self.text = text

    def take(self, final: bool = False) -> str:
        """The next piece of final text ('' if none): all of it once the row is over (final, or
        stopped), else everything but what held_back says may still change."""
        done = final or self.stopped
        end = len(self.text) if done else \
            len(self.text) - min(len(self.text), held_back(self.context + self.text, self.stops))
        piece = self.text[self.shown:end]
        self.shown = max(self.shown, end)
        return piece

    def _begun_in_context(self, text: str) -> bool:
        """A stop string that starts in the context (the prompt's end) and ends in `text`."""
        for s in self.stops:
            k = len(s) - 1  # at most k of its characters can lie in the context, at least one in the text
            if k and self.context and s in self.context[-k:] + text[:k]:
                return True
        return False
