"""Check a config against its weights before building anything: the size-bomb guard of every loader.

A model is built from its config, then its weights are copied in. Building first means a config.json
that says n_layer=100000 or n_embd=65536 allocates gigabytes (or minutes of module construction)
before the weights could say it is wrong. But a safetensors file starts with a JSON header that
lists every tensor's name, dtype and shape, readable without reading a single tensor:

    safetensors_shapes(files)   {name: shape} from the headers alone (safe_open + get_slice().get_shape())
    check_block_count(...)      the config's number of layers against the blocks the header holds
    build_on_meta(build)        the model built on PyTorch's "meta" device: every shape, no memory
    check_shapes(...)           each tensor the header holds against the shape the config gives it
    check_derived_buffers(...)  what the config alone allocates (position tables, RoPE's cos/sin), bounded

So a loader reads the header, checks the cheap counts, builds the model on the meta device (no
memory), compares every shape, bounds the buffers no file holds, and only then builds it for real.
minillm checkpoints (weights/checkpoint.py) and Hugging Face folders (weights/huggingface.py) both do.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import torch

# Buffers the config alone sizes (a sinusoidal table of block_size x n_embd, RoPE's cos/sin of
# block_size x D/2): no file backs them, so only this bound stops block_size=10**12. 2**28 elements
# is 1 GiB in fp32, ~250x what Llama 3.1's 131,072-token RoPE tables need.
MAX_DERIVED_ELEMENTS = 1 << 28
_BLOCK = re.compile(r"^(.*?)blocks\.(\d+)\.")


class HeaderMismatch(ValueError):
    """The config and the weights' header disagree; the message names both."""


def safetensors_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} from the headers of `files`; no tensor is read. ValueError naming a file
    whose header cannot be read (the message says "not a readable safetensors file", as loading does)."""
    from safetensors import SafetensorError, safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in f.keys():
                    shapes[name] = tuple(f.get_slice(name).get_shape())
        except (SafetensorError, OSError, ValueError) as e:
            raise HeaderMismatch(f"{file}: not a readable safetensors file ({str(e).splitlines()[0][:200]})") from None
    return shapes


def block_counts(shapes: dict) -> dict[str, int]:
    """How many blocks the header holds under each prefix: {"transformer.": 4} for a language model,
    {"encoder.": 3, "": 1} for an encoder–decoder (its decoder blocks sit at the top level)."""
    found: dict[str, set[int]] = {}
    for name in shapes:
        m = _BLOCK.match(name)
        if m:
            found.setdefault(m.group(1), set()).add(int(m.group(2)))
    return {prefix: max(ids) + 1 for prefix, ids in found.items()}


def check_block_count(expected: int, have: int, key: str, config_file: Path, weights: Path) -> None:
    """The config's layer count `key`=expected against the `have` blocks of the weights' header."""
    if expected != have:
        raise HeaderMismatch(f"{weights}: does not match {config_file.name}: it holds {have} layers, but "
                             f"{config_file.name} says {key}={expected}; they belong to different models")


def build_on_meta(build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """build() on the meta device: modules and shapes, no memory (and no time spent initialising)."""
    with torch.device("meta"):
        return build()


def check_shapes(model: torch.nn.Module, shapes: dict, weights: Path, config_name: str = "config.json") -> None:
    """Every tensor of the header that the model has must have the model's shape. Names only one side
    has are left to the strict load that follows (it names them: missing or unexpected keys)."""
    for name, tensor in model.state_dict().items():
        have = shapes.get(name)
        if have is not None and tuple(tensor.shape) != have:
            raise HeaderMismatch(f"{weights}: does not match {config_name}: size mismatch for {name}: "
                                 f"the config gives {list(tensor.shape)}, the file holds {list(have)}")


def check_derived_buffers(model: torch.nn.Module, config_file: Path) -> None:
    """Bound the buffers that the config alone sizes (not in the state dict, so no file backs them)."""
    saved = set(model.state_dict())
    derived = [(n, b.numel()) for n, b in model.named_buffers() if n not in saved]
    total = sum(n for _, n in derived)
    if total > MAX_DERIVED_ELEMENTS:
        biggest = max(derived, key=lambda x: x[1])[0]
        raise HeaderMismatch(f"{config_file}: the config asks for {total:,} elements of position tables "
                             f"({biggest}, ...), over the limit of {MAX_DERIVED_ELEMENTS:,}: is block_size "
                             "(max_position_embeddings, n_positions) what the model was trained with?")
