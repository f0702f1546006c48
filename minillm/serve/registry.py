"""Several models, each with versions, switched without downtime: the server's model update service.

A *model* is a name clients ask for (`"model": "shakespeare"`). Each name has a *current version*,
the one new requests get, and possibly a *previous* one, kept loaded so a rollback is instant. A
version is one checkpoint, loaded once, with its own decode engine (minillm/generate/batching.py):

    version = {checkpoint step, content hash (sha256 of its weights), creation time, engine}

Switching a name to a new checkpoint (POST /admin/models/NAME, or `Registry.switch`):

    1. load it and warm it up (a short forward pass whose logits must all be finite, then one token
       through the engine) OFF the request path: a checkpoint that fails to load, gives NaN or inf,
       or fails to generate is refused, and the current version never stops serving;
    2. point the name at it: every request that arrives from now on gets the new version;
    3. requests already admitted hold their version object and finish on it (its engine keeps
       running), so no request fails or changes model mid-way;
    4. the old version becomes `previous` (rollback swaps the two back); the one it displaces is
       retired: its engine shuts down once its last admitted request has finished.

Step 2 is one assignment under a lock: a request sees either the old version or the new one, never
a half-switched state. That is the whole trick of a blue/green switch inside one process.

A switch only adds a new name when asked to (`create=True`), and never past `max_models` names:
each name holds up to two loaded models, so an unbounded count is unbounded memory.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from minillm.generate.batching import BatchEngine, EngineStats, SamplingParams

EOS_TOKENS = ("<|endoftext|>", "</s>", "[EOS]", "<|end_of_text|>", "<|im_end|>")  # GPT-2 … Qwen2
MAX_MODELS = 8  # model names one server holds, at most (each with up to two loaded versions)


class TooManyModels(ValueError):
    """A switch that would add a model name past the registry's max_models."""


def check_finite_logits(model, path: str = "(in memory)", n_tokens: int = 8) -> None:
    """A short forward pass (token ids 0..n_tokens-1); ValueError if any logit is NaN or inf.

    A checkpoint whose weights are NaN (a diverged run, `distill --temperature=nan`, a bad
    conversion) loads without complaint and even "generates": argmax over NaN logits picks token 0
    forever. Its logits give it away at once, so every path that serves a checkpoint (start-up,
    admin switch) runs this first."""
    import itertools

    import torch

    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    device = tensor.device if tensor is not None else "cpu"
    T = max(1, min(n_tokens, model.cfg.block_size))
    idx = (torch.arange(T, device=device) % model.cfg.vocab_size).unsqueeze(0)  # (1, T)
    with torch.no_grad():
        out = model(idx)
    logits = out[0] if isinstance(out, tuple) else out  # (1, T, V)
    if not bool(torch.isfinite(logits).all()):
        raise ValueError(f"{path}: the warm-up forward pass gives non-finite logits (NaN or inf): its "
                         f"weights are broken (a diverged run or a bad conversion?); refusing to serve it")


@dataclass
class ModelVersion:
    """One loaded checkpoint of a model name, serving through its own engine."""
    name: str
    path: str
    version: str  # what /v1/models and the logs show: "step-<N>-<first 12 hex of the weights' sha256>"
    step: int | None
    sha256: str
    created: int  # when the checkpoint was written (its manifest's time), unix seconds
    model: object
    tokenizer: object
    engine: BatchEngine
    meta: dict = field(default_factory=dict)  # the checkpoint's config.json (e.g. its "instruct" template)
    in_flight: int = 0  # admitted requests not yet finished
    loaded_at: float = field(default_factory=time.time)

    @property
    def block_size(self) -> int:
        return self.model.cfg.block_size

    def describe(self) -> dict:
        return {"version": self.version, "step": self.step, "sha256": self.sha256, "created": self.created,
                "path": self.path, "loaded_at": int(self.loaded_at)}


def content_identity(folder: Path) -> tuple[str, int]:
    """(sha256 of the weights, creation time) from a checkpoint's manifest, which recorded both."""
    manifest = folder / "manifest.json"
    try:
        files = json.loads(manifest.read_text())["files"]
        return files["model.safetensors"]["sha256"], int(manifest.stat().st_mtime)
    except (OSError, ValueError, KeyError, TypeError):  # a Hugging Face folder has no manifest
        from minillm.weights.checkpoint import sha256_file

        weights = next((folder / w for w in ("model.safetensors", "pytorch_model.bin") if (folder / w).exists()), None)
        if weights is None:
            return "unknown", int(time.time())
        return sha256_file(weights), int(weights.stat().st_mtime)


class Registry:
    """Model names → (current, previous) versions. `load(path)` turns a path into a started engine."""

    def __init__(self, load, max_batch_size: int = 16, max_queue: int = 64, seed: int = 0,
                 flat_decode: bool = False, max_models: int = MAX_MODELS):
        self._load = load  # path -> (model, tokenizer, meta), e.g. checkpoint.load_model with a device
        self.max_batch_size, self.max_queue, self.seed = max_batch_size, max_queue, seed
        self.max_models = max_models  # names a switch may grow the registry to (start-up may give more)
        self.flat_decode = flat_decode  # engines decode without the module tree (minillm.generate.flat)
        self._current: dict[str, ModelVersion] = {}
        self._previous: dict[str, ModelVersion] = {}
        self._lock = threading.Lock()  # guards the two dicts and every in_flight count
        self._switching: dict[str, threading.Lock] = {}  # one load at a time per name
        self.retired = EngineStats(batch_rows=[0] * (max_batch_size + 1))  # totals of engines shut down

    # --- reading -------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self._current)

    def versions(self) -> list[ModelVersion]:
        """Every loaded version, current ones first."""
        with self._lock:
            return list(self._current.values()) + list(self._previous.values())

    def current(self, name: str) -> ModelVersion:
        with self._lock:
            return self._current[name]  # KeyError: the API answers 404 with the list of names

    def acquire(self, name: str) -> ModelVersion:
        """The current version of `name`, counted as in use until `release`: it keeps running until then."""
        with self._lock:
            v = self._current[name]
            v.in_flight += 1
            return v

    def release(self, v: ModelVersion) -> None:
        with self._lock:
            v.in_flight -= 1

    def info(self, name: str) -> dict:
        with self._lock:
            cur, prev = self._current[name], self._previous.get(name)
            return {"model": name, "current": cur.describe(), "previous": prev.describe() if prev else None}

    # --- loading and switching -----------------------------------------------------------------------
    def make_version(self, name: str, model, tokenizer, meta: dict | None = None, path: str = "(in memory)",
                     start: bool = True) -> ModelVersion:
        """A version around a loaded model; started and warmed up unless start=False (then `start()` later)."""
        if tokenizer is None:
            raise FileNotFoundError(f"{path}: tokenizer.json is missing; serving needs the tokenizer (text in, text out)")
        meta = meta or {}
        eos = next((tokenizer.special_tokens[s] for s in EOS_TOKENS if s in getattr(tokenizer, "special_tokens", {})),
                   None)
        engine = BatchEngine(model, tokenizer, self.max_batch_size, self.max_queue, eos_id=eos, seed=self.seed,
                             flat_decode=self.flat_decode)  # (refuses models it cannot decode, by name)
        check_finite_logits(model, path)  # NaN weights are refused here, not served
        if start:
            engine.start()
            try:  # warm-up: the first forward pass allocates memory; a broken model fails here, not on a client
                [event] = engine.complete([[0]], SamplingParams(max_tokens=1, temperature=0.0))
                if event.error:
                    raise ValueError(f"{path}: the warm-up generation failed: {event.error}")
            except BaseException:
                engine.shutdown()
                raise
        sha, created = content_identity(Path(path)) if Path(path).exists() else ("in-memory", int(time.time()))
        step = meta.get("step") if isinstance(meta.get("step"), int) else None
        version = f"step-{step if step is not None else 'na'}-{sha[:12]}"
        return ModelVersion(name, str(path), version, step, sha, created, model, tokenizer, engine, meta)

    def load_version(self, name: str, path: str) -> ModelVersion:
        """Load, start and warm up a version; raises (ValueError, FileNotFoundError, ...) if it cannot serve."""
        from minillm.weights.checkpoint import find_checkpoint
        from minillm.weights.huggingface import is_hf_folder

        folder = Path(path) if is_hf_folder(path) else find_checkpoint(path)
        model, tokenizer, meta = self._load(folder)
        return self.make_version(name, model, tokenizer, meta, str(folder))

    def add(self, v: ModelVersion) -> ModelVersion:
        """Serve a new name (at start-up)."""
        with self._lock:
            if v.name in self._current:
                raise ValueError(f"model {v.name!r} is given twice; give each model its own name (NAME=PATH)")
            self._current[v.name] = v
        return v

    def start(self) -> None:
        """Start the engines that are not running yet (the app's start-up)."""
        for v in self.versions():
            if not v.engine.alive:
                v.engine.start()

    def switch(self, name: str, path: str, create: bool = False) -> tuple[ModelVersion | None, ModelVersion]:
        """Make `path` the current version of `name`; (old current, new current).

        A name not served yet is KeyError unless create=True, and TooManyModels past max_models
        (checked before loading, and again before adding: two creations may race)."""
        self._check_new_name(name, create)
        lock = self._switching.setdefault(name, threading.Lock())
        with lock:  # two admins switching one name at once: one after the other
            new = self.load_version(name, path)  # may raise: nothing has changed yet
            with self._lock:
                try:
                    self._check_new_name(name, create, locked=True)
                except BaseException:
                    new.engine.shutdown()
                    raise
                old, retired = self._current.get(name), self._previous.get(name)
                self._current[name] = new
                if old is not None:
                    self._previous[name] = old
            if retired is not None:
                self._retire(retired)
            return old, new

    def _check_new_name(self, name: str, create: bool, locked: bool = False) -> None:
        """KeyError for an unknown name without create; TooManyModels for one past max_models."""
        with contextlib.nullcontext() if locked else self._lock:
            if name in self._current:
                return
            if not create:
                raise KeyError(name)
            if len(self._current) >= self.max_models:
                raise TooManyModels(f"this server holds {len(self._current)} models, its limit "
                                    f"(max_models={self.max_models}); no model {name!r} was added")

    def rollback(self, name: str) -> tuple[ModelVersion, ModelVersion]:
        """Swap current and previous: (the version rolled back from, the one now current)."""
        with self._lock:
            if name not in self._current:
                raise KeyError(name)
            prev = self._previous.get(name)
            if prev is None:
                raise ValueError(f"model {name!r} has no previous version to roll back to")
            cur = self._current[name]
            self._current[name], self._previous[name] = prev, cur
            return cur, prev

    def _retire(self, v: ModelVersion, poll_s: float = 0.05, timeout_s: float = 600.0) -> None:
        """Shut v's engine down once nothing uses it (in a background thread: the switch returns now)."""
        def wait_then_stop():
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                with self._lock:
                    idle = v.in_flight == 0
                if idle and v.engine.active_rows == 0 and v.engine.queue_depth == 0:
                    break
                time.sleep(poll_s)
            v.engine.shutdown()
            with self._lock:  # its counters live on in the server's totals
                s, r = v.engine.stats, self.retired
                r.prompt_tokens += s.prompt_tokens
                r.generated_tokens += s.generated_tokens
                r.batch_rows = [a + b for a, b in zip(r.batch_rows, s.batch_rows)]

        threading.Thread(target=wait_then_stop, name=f"minillm-retire-{v.name}", daemon=True).start()

    def shutdown(self) -> None:
        for v in self.versions():
            v.engine.shutdown()
