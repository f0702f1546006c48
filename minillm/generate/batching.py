"""Continuous batching: many requests decoded together over one KV cache, joining and leaving between steps.

Decoding one token for one sequence is a matrix-*vector* product per layer: the weights are read from
memory to do very little arithmetic. Decoding B sequences in the same forward turns that into a
matrix-*matrix* product that reads the weights once for B tokens, so throughput grows almost linearly
with B until compute, not memory (or Python overhead, on a CPU), is the limit.

Static batching waits for B requests and runs them to the end together; a short request then holds
its row until the longest finishes. Continuous (or "in-flight") batching, from Orca (Yu et al., OSDI
2022) and vLLM (Kwon et al., SOSP 2023), re-forms the batch at every decode step instead:

    loop:
        admit waiting requests while cache rows are free   (prefill each prompt alone, sample token 1)
        one decode step for every active row                (B rows, one new token each)
        rows that hit max_tokens / a stop string / EOS leave, freeing their slot at once

Every row has its own length, so the cache here (`SlotKVCache`, minillm/generate/cache.py) keeps one
length per row instead of the single shared `KVCache.length`: row b's new token goes at position
lengths[b], and a key padding mask hides each row's unused tail — so a row computes what it would
alone, and greedy output does not depend on who else is in the batch. The prefill and decode steps
are the decode core's (minillm/generate/core.py), the ones generate_tokens runs, flat fast path
included. Active rows are kept packed in slots 0..A-1 (a leaving row is replaced by the last one),
so each step works on the view cache[:, :A] and never gathers.

All model work happens on one background thread; `submit` and `cancel` are safe to call from others
(minillm.cli.serve calls them from the asyncio event loop).

Failures stay with the request that caused them. Prefill runs one request at a time, so a request
whose prefill raises fails alone. Sampling and detokenizing are per row: if a group of rows fails
to sample, each row is retried alone, and a row that still raises (or whose text cannot be decoded)
ends with finish_reason "error", taking only its own request down. Only the shared decode forward
itself, which no single request controls, fails the whole batch when it raises.
"""

from __future__ import annotations

import collections
import logging
import sys
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch

from minillm.generate.cache import SlotKVCache
from minillm.generate.core import decode_step, prefill
from minillm.generate.flat import FlatDecoder
from minillm.generate.sampling import sample_next
from minillm.generate.text import StopText, find_stop

log = logging.getLogger("minillm.generate.batching")


@dataclass
class SamplingParams:
    max_tokens: int = 16  # new tokens per completion (prompt + max_tokens must fit block_size)
    temperature: float = 1.0  # 0 = greedy
    top_k: int | None = None
    top_p: float = 1.0
    stop: tuple[str, ...] = ()  # strings that end a completion (not included in its text)
    seed: int | None = None  # own generator: output does not depend on other traffic


@dataclass
class Event:
    """What the engine reports to a request: new final text of choice `index`, maybe its end."""
    index: int
    text: str
    finish_reason: str | None = None  # "stop" | "length" when the choice ends; "error" on a failure
    tokens: int = 0  # tokens generated for this choice so far
    error: str | None = None


class QueueFull(RuntimeError):
    """The waiting queue is at max_queue: the caller should retry later (HTTP 429)."""


class Request:
    """n completions for each of `prompts` (token ids, already fitted to the context)."""

    def __init__(self, prompts: list[list[int]], params: SamplingParams, n: int = 1,
                 emit: Callable[[Event], None] | None = None, stream: bool = True):
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        self.prompts, self.params, self.n = prompts, params, n
        self.emit = emit or (lambda event: None)  # called on the engine thread
        self.stream = stream  # False: one event per choice, at its end (fewer wake-ups for the caller)
        self.cancelled = False
        self.finished: set[int] = set()  # choice indices that have ended
        self.generator = (torch.Generator().manual_seed(params.seed) if params.seed is not None
                          else None)

    @property
    def n_rows(self) -> int:
        return len(self.prompts) * self.n


@dataclass(eq=False)
class _Row:
    """One completion being generated: it owns cache slot `slot` while active."""
    req: Request
    index: int  # choice index: prompt i, sample j -> i * n + j (OpenAI's numbering)
    slot: int
    text: StopText  # its generated ids and their text: stop strings, what is final
    done: bool = False  # finished: leaves its slot before the next step

    @property
    def ids(self) -> list[int]:
        return self.text.ids


@dataclass
class EngineStats:
    """Counters for /metrics; written by the engine thread, read by others (plain ints)."""
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefills: int = 0
    decode_steps: int = 0
    batch_rows: list[int] = field(default_factory=list)  # batch_rows[b] = decode steps run with b rows


class BatchEngine:
    """A background decode loop over `max_batch_size` cache rows, fed by a queue of ≤ `max_queue`."""

    def __init__(self, model, tokenizer, max_batch_size: int = 16, max_queue: int = 64,
                 eos_id: int | None = None, seed: int = 0, flat_decode: bool = False):
        if not getattr(model.cfg, "causal", False):
            # an encoder–decoder would need an encoder pass and a cross-attention cache per row, which
            # this engine (one decoder KV cache row per completion) does not have: `minillm translate`
            hint = ("an encoder–decoder; translate with `minillm translate`" if type(model).__name__ == "Seq2Seq"
                    else f"a {type(model).__name__}")
            raise ValueError(f"serving needs a causal LM (GPT-style); this checkpoint is {hint}")
        if max_batch_size < 1 or max_queue < 0:
            raise ValueError(f"max_batch_size must be >= 1 and max_queue >= 0, got "
                             f"{max_batch_size} and {max_queue}")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_batch_size, self.max_queue, self.eos_id = max_batch_size, max_queue, eos_id
        cfg, p = model.cfg, next(model.parameters())
        self.device = p.device
        if cfg.sliding_window is not None and cfg.sliding_window < cfg.block_size:
            # rows of different lengths would each need their own window; the attention mask's window
            # is aligned to the longest row (minillm.model.attention.causal_mask)
            raise ValueError(f"serving a sliding-window model (ModelConfig.sliding_window={cfg.sliding_window}) "
                             "is not supported yet; use `minillm generate`")
        # H_kv heads per row: grouped-query attention stores only the shared K/V heads
        self.cache = SlotKVCache(cfg.n_layer, max_batch_size, cfg.kv_heads, cfg.block_size, cfg.head_dim,
                                 device=p.device, dtype=p.dtype)
        self.rows: list[_Row] = []  # active rows; rows[i].slot == i always
        self.waiting: collections.deque[Request] = collections.deque()
        self.generator = torch.Generator().manual_seed(seed)  # for requests without their own seed
        self.stats = EngineStats(batch_rows=[0] * (max_batch_size + 1))
        # decode steps without the module tree (minillm.generate.flat; the same logits), built on
        # the engine thread when the loop starts; None runs the modules
        self.flat_decode, self._flat = flat_decode, None
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # --- called from other threads ---------------------------------------------------------------
    def start(self) -> "BatchEngine":
        self._thread = threading.Thread(target=self._loop, name="minillm-decode", daemon=True)
        self._thread.start()
        return self

    def shutdown(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def active_rows(self) -> int:
        return len(self.rows)

    def submit(self, req: Request) -> Request:
        block_size = self.model.cfg.block_size
        if any(len(p) + req.params.max_tokens > block_size for p in req.prompts):
            raise ValueError(f"prompt + max_tokens must fit the context of {block_size} tokens")
        if req.n_rows > self.max_batch_size:
            raise ValueError(f"{req.n_rows} completions (prompts × n) are more than max_batch_size="
                             f"{self.max_batch_size}; send fewer prompts or a smaller n")
        with self._cond:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting (max_queue="
                                f"{self.max_queue}); retry shortly")
            self.waiting.append(req)
            self._cond.notify()
        return req

    def cancel(self, req: Request) -> None:
        """Stop working on `req`: dropped from the queue now, its rows leave before the next step."""
        req.cancelled = True
        with self._cond:
            if req in self.waiting:
                self.waiting.remove(req)
            self._cond.notify()

    def complete(self, prompts: list[list[int]], params: SamplingParams, n: int = 1) -> list[Event]:
        """Blocking helper (tests, notebooks): run one request, return each choice's whole text."""
        results: dict[int, Event] = {}
        texts: dict[int, str] = collections.defaultdict(str)
        done = threading.Event()
        req = Request(prompts, params, n, stream=False)

        def emit(ev: Event) -> None:
            texts[ev.index] += ev.text
            if ev.finish_reason is not None:
                results[ev.index] = Event(ev.index, texts[ev.index], ev.finish_reason, ev.tokens, ev.error)
                if len(results) == req.n_rows:
                    done.set()

        req.emit = emit
        self.submit(req)
        done.wait()
        return [results[i] for i in range(req.n_rows)]

    # --- the decode loop (engine thread only) ----------------------------------------------------
    def _loop(self) -> None:
        with torch.inference_mode():
            self._flat = self._build_flat()
            while True:
                with self._cond:
                    while not self._stopping and not self.waiting and not self.rows:
                        self._cond.wait()
                    if self._stopping:
                        return
                self._admit()
                try:
                    self._leave([r for r in self.rows if r.req.cancelled])
                    if self.rows:
                        self._decode_step()
                except Exception as e:  # a failed step must not kill the server: fail its requests
                    log.exception("decode step failed")
                    for req in {r.req for r in self.rows}:
                        self._fail(req, e)
                    self.rows.clear()
                    self.cache.lengths = [0] * self.max_batch_size

    def _build_flat(self) -> FlatDecoder | None:
        """The fast decode branch, or None (the modules run). `build` already steps aside for layers
        it does not know; should it fail anyway, the engine serves through the modules."""
        if not self.flat_decode:
            return None
        try:  # native=False: the C step takes a KVCache only, never the engine's per-row cache
            return FlatDecoder.build(self.model, native=False)
        except Exception:
            log.exception("flat decode steps unavailable; decoding through the modules")
            return None

    def _admit(self) -> None:
        """Prefill waiting requests while their rows are free. A request that ends in its prefill
        (max_tokens=1, a stop in its first token) frees its rows at once, so admission goes on
        until nothing more fits: the next request does not wait for a decode step."""
        while True:
            with self._cond:
                admitted = []
                # FIFO: the head of the queue waits until its rows are free (no starving big n)
                while self.waiting and self.waiting[0].n_rows <= self.max_batch_size - len(self.rows) \
                        - sum(r.n_rows for r in admitted):
                    admitted.append(self.waiting.popleft())
            if not admitted:
                return
            for req in admitted:
                if not req.cancelled:  # its client may have left while it was being admitted
                    try:
                        self._prefill(req)
                    except Exception as e:  # this request's own prompt failed: only it fails
                        log.exception("prefill failed")
                        self._fail(req, e)

    def _prefill(self, req: Request) -> None:
        """Run each prompt alone into a free row, fork it n times, sample every row's first token."""
        for i, prompt in enumerate(req.prompts):
            first = len(self.rows)
            self.cache.select(first, 1)
            self.cache.rewind(0)  # a fresh row: positions from 0
            logits = prefill(self.model, torch.tensor([prompt], device=self.device), self.cache)  # (1, V)
            new = [_Row(req, i * req.n + j, first + j, StopText(self.tokenizer, req.params.stop, find_stop))
                   for j in range(req.n)]
            for row in new[1:]:  # n samples of one prompt share its prefix: copy, don't recompute
                self.cache.copy_row(first, row.slot)
            self.rows.extend(new)
            self.stats.prompt_tokens += len(prompt)
            self.stats.prefills += 1
            tokens = self._sample(logits.expand(req.n, -1), new)  # (n, V) -> n ids
            for row, t in zip(new, tokens):
                self._append(row, t)
        self._leave([r for r in self.rows if r.done or r.req.cancelled])

    def _decode_step(self) -> None:
        A = len(self.rows)
        self.cache.select(0, A)  # every active row: each row's new token goes at its own length
        idx = torch.tensor([[r.ids[-1]] for r in self.rows], device=self.device)  # (A, 1)
        logits = decode_step(self.model, idx, self.cache, self._flat)  # (A, V)
        tokens = self._sample(logits, self.rows)  # (A, V) -> A ids
        self.stats.decode_steps += 1
        self.stats.batch_rows[A] += 1
        for row, t in zip(list(self.rows), tokens):
            self._append(row, t)
        self._leave([r for r in self.rows if r.done or r.req.cancelled])

    def _sample(self, logits: torch.Tensor, rows: list[_Row]) -> list[int | None]:
        """One token per row; rows sharing sampling settings (and generator) are sampled together.

        A group that raises is retried row by row, so that one bad row cannot take its group's
        other rows with it; a row that fails alone gets None, and its request fails."""
        groups: dict[tuple, list[int]] = collections.defaultdict(list)
        for b, r in enumerate(rows):
            p = r.req.params
            key = (0.0,) if p.temperature == 0 else (p.temperature, p.top_k, p.top_p, id(r.req.generator))
            groups[key].append(b)
        out: list[int | None] = [None] * len(rows)

        def draw(members: list[int]) -> list[int]:
            p, gen = rows[members[0]].req.params, rows[members[0]].req.generator
            whole = len(members) == len(rows)  # the usual case: one group, every row in order
            sub = logits if whole else logits[torch.tensor(members, device=logits.device)]  # (b, V)
            return sample_next(sub, p.temperature, p.top_k, p.top_p if p.top_p < 1 else None,
                               gen or self.generator).tolist()

        for key, members in groups.items():
            try:
                for b, t in zip(members, draw(members)):
                    out[b] = t
            except Exception:
                if len(members) == 1:
                    self._fail_row(rows[members[0]])
                    continue
                for b in members:  # find the row(s) at fault; the others still get their token
                    try:
                        out[b] = draw([b])[0]
                    except Exception:
                        self._fail_row(rows[b])
        return out

    def _fail_row(self, row: _Row) -> None:
        """Fail `row`'s request, with the exception being handled (called inside `except`)."""
        log.exception("sampling or decoding failed for one row")
        self._fail(row.req, sys.exc_info()[1])

    def _fail(self, req: Request, e: BaseException) -> None:
        """End every unfinished choice of `req` with finish_reason "error"; its rows leave next."""
        if req.cancelled:  # already failed (or its client left): nobody is waiting for more
            return
        req.cancelled = True
        for i in range(req.n_rows):
            if i not in req.finished:
                req.emit(Event(i, "", "error", 0, error=f"{type(e).__name__}: {e}"))

    def _append(self, row: _Row, token: int | None) -> None:
        """Record a token, report the text that became final, and mark the row done when it ends.

        Any exception here (a token id the tokenizer cannot decode, say) fails this row's request
        only. token None: sampling already failed this row."""
        if token is None or row.req.cancelled:
            return
        try:
            self._append_token(row, token)
        except Exception:
            self._fail_row(row)

    def _append_token(self, row: _Row, token: int) -> None:
        self.stats.generated_tokens += 1
        eos = self.eos_id is not None and token == self.eos_id
        row.text.add(None if eos else token)  # the end-of-text token ends the completion, unshown
        finish = ("stop" if eos or row.text.stopped
                  else "length" if len(row.ids) >= row.req.params.max_tokens else None)
        if finish or row.req.stream:  # (not streaming: one event with the whole text at the end)
            piece = row.text.take(final=finish is not None)
            if finish or piece:
                row.req.emit(Event(row.index, piece, finish, len(row.ids)))
        row.done = finish is not None
        if row.done:
            row.req.finished.add(row.index)

    def _leave(self, leaving: list[_Row]) -> None:
        """Free the rows' slots, moving the last active row into each hole to keep rows packed."""
        for row in sorted(leaving, key=lambda r: r.slot, reverse=True):
            last = len(self.rows) - 1
            if row.slot != last:
                mover = self.rows[last]
                self.cache.copy_row(last, row.slot)
                mover.slot = row.slot
                self.rows[row.slot] = mover
            self.rows.pop()
            self.cache.lengths[last] = 0
