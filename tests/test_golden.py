"""Golden losses: the first 10 training losses of the `tiny` preset, pinned to 1e-6.

A refactor that changes what training computes (the order of random draws, the initialisation, the
loss, the optimizer) changes these numbers; one that only moves code does not. The corpus is made
here, from a fixed linear congruential generator, so the test needs no file and no download.
Run on CPU, fp32, one thread (threads change the order of float sums).

Regenerate after an intended change of the numbers, and say why in the commit:
    python tests/test_golden.py
"""

import json
from pathlib import Path

import pytest

from minillm.model.config import ModelConfig
from minillm.train import TrainConfig, train

GOLDEN = Path(__file__).parent / "golden" / "tiny_first_10_losses.txt"
WORDS = ("the", "model", "attends", "to", "every", "token", "before", "it", "and", "learns", "which",
         "ones", "matter", "for", "next", "word", "a", "small", "transformer", "reads", "text")


def corpus(n_words: int = 6000) -> str:
    """Pseudo-random words with line breaks, identical on every platform and Python version."""
    state, out = 12345, []
    for i in range(n_words):
        state = (1103515245 * state + 12345) % (1 << 31)  # the C standard's example LCG
        out.append(WORDS[state % len(WORDS)] + ("\n" if i % 11 == 10 else " "))
    return "".join(out)


def first_losses(tmp_path: Path) -> list[float]:
    data = tmp_path / "golden.txt"
    data.write_text(corpus())
    cfg = ModelConfig.from_preset("tiny")
    tc = TrainConfig(max_iters=10, eval_interval=1000, eval_iters=1, log_interval=1, device="cpu",
                     dtype="float32", seed=1337, out_dir=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"))
    train(cfg, tc, str(data), progress=False)
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


@pytest.mark.usefixtures("one_thread")
def test_first_ten_losses_of_the_tiny_preset_match_the_golden_file(tmp_path):
    expected = [float(line) for line in GOLDEN.read_text().split()]
    got = first_losses(tmp_path)
    assert len(expected) == len(got) == 10
    assert got == pytest.approx(expected, abs=1e-6, rel=0)


if __name__ == "__main__":
    import tempfile

    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        losses = first_losses(Path(d))
    GOLDEN.write_text("".join(f"{x!r}\n" for x in losses))
    print(f"wrote {GOLDEN}: {losses}")
