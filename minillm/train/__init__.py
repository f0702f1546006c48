"""Training: the loop that turns a model and a corpus into a checkpoint, nanoGPT-style.

Read in this order:
    config.py     TrainConfig (every knob of a run) and the named recipes
    optim.py      AdamW's weight-decay groups, warm-up + cosine schedule, gradient clipping
    evaluate.py   mean loss, perplexity and masked-token accuracy on fixed batches
    metrics.py    what a run reports: metrics.jsonl, the loss plot, MFU
    state.py      the train state that makes resume exact, and `resume` itself
    loop.py       `train()`: the showpiece pre-training loop, flat and long like nanoGPT's train.py,
                  with timing, evaluation and checkpointing as named steps
    fit.py        the step and the compact loop every other loop shares (`fit_step`, `fit`), and
                  `finetune`: that loop on a text corpus (compression's fine-tune and distillation)
    seq2seq.py    `train_seq2seq()`: the encoder–decoder on parallel text (objective="seq2seq"),
                  `fit` with the same checkpointing, metrics and optimizer as loop.py
"""

from minillm.train.config import RECIPES, TrainConfig, TrainingDiverged, TrainingInterrupted
from minillm.train.evaluate import evaluate
from minillm.train.loop import train

__all__ = ["RECIPES", "TrainConfig", "TrainingDiverged", "TrainingInterrupted", "evaluate", "train"]
