"""Training: the loop that turns a model and a corpus into a checkpoint, nanoGPT-style.

Read in this order:
    config.py     TrainConfig (every knob of a run) and the named recipes
    optim.py      AdamW's weight-decay groups, warm-up + cosine schedule, gradient clipping
    evaluate.py   mean loss, perplexity and masked-token accuracy on fixed batches
    metrics.py    what a run reports: metrics.jsonl, the loss plot, MFU
    state.py      the train state that makes resume exact, and `resume` itself
    loop.py       `train()`: the loop, with timing, evaluation and checkpointing as named steps
    seq2seq.py    `train_seq2seq()`: the encoder–decoder on parallel text (objective="seq2seq"),
                  a compact loop reusing the same checkpointing, metrics and optimizer
"""

from minillm.train.config import RECIPES, TrainConfig, TrainingDiverged, TrainingInterrupted
from minillm.train.evaluate import evaluate
from minillm.train.loop import train

__all__ = ["RECIPES", "TrainConfig", "TrainingDiverged", "TrainingInterrupted", "evaluate", "train"]
