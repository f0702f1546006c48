"""What a training run is told: TrainConfig, and the named recipes.

TrainConfig holds every knob of a run, with nanoGPT's names (max_iters, eval_interval, batch_size,
learning_rate, ...); `minillm train --key=value` sets any of them, checked against the field's type.
The model's shape lives in minillm.model.config.ModelConfig. A recipe is plain data: a model preset
plus overrides for both dataclasses and a data source, e.g. nanoGPT's shakespeare-char runs.
"""

from __future__ import annotations

from dataclasses import dataclass

from minillm.hardware import DTYPES

OBJECTIVES = ("clm", "mlm", "mlm+nsp", "seq2seq")


@dataclass
class TrainConfig:
    # --- how long, how often ---------------------------------------------------------------
    max_iters: int = 1000  # optimizer steps; `minillm train` (tiny, python-docs): minutes on 2 CPU cores
    eval_interval: int = 250  # evaluate (and checkpoint) every this many steps, and at the end
    eval_iters: int = 20  # batches per evaluation: more = less noisy estimate, slower evaluation
    log_interval: int = 10  # log loss/speed every this many steps (each log waits for the device)
    # --- batch -----------------------------------------------------------------------------
    batch_size: int = 12  # sequences per micro-batch per process (block_size lives in ModelConfig)
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step, summed over all processes
    # --- optimizer (AdamW) and schedule ----------------------------------------------------
    learning_rate: float = 1e-3  # peak learning rate, reached after warm-up; small models take ~1e-3
    min_lr: float = 1e-4  # floor of the cosine decay (Chinchilla: ~learning_rate/10)
    warmup_iters: int = 100  # linear warm-up steps: Adam's variance estimates are noisy at first
    lr_decay_iters: int | None = None  # step where the cosine reaches min_lr; None = max_iters
    weight_decay: float = 0.1  # on 2-D matmul weights only (see optim.py)
    beta1: float = 0.9  # Adam momentum
    beta2: float = 0.99  # Adam's second-moment decay; 0.99 (not 0.999) for small batches: few tokens/step
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0 = no clipping
    # --- where and how to run --------------------------------------------------------------
    device: str = "auto"  # "auto" = cuda if available, else cpu; or "cpu", "cuda", "cuda:1", "mps"
    dtype: str = "auto"  # "auto" = bf16 on GPUs that have it, else fp16 (+GradScaler); fp32 on CPU
    compile: bool = False  # torch.compile the model: faster steps after a compile of tens of seconds
    builtin_ops: bool = False  # train with PyTorch's fused norms/GELU/cross-entropy (builtin_ops.py)
    seed: int = 1337  # weights, batches, dropout: the same seed gives the same run
    # --- what to train ---------------------------------------------------------------------
    objective: str = "clm"  # "clm" next-token prediction (GPT) | "mlm" masked tokens (BERT)
    #                         | "mlm+nsp" BERT's pre-training: masked tokens + next-sentence prediction
    #                         | "seq2seq" translation with the encoder–decoder (train/seq2seq.py)
    tokenizer: str = "char"  # "char" (nanoGPT's shakespeare-char) | "bpe" (byte-level, trained on the data)
    vocab_size: int = 1024  # BPE vocabulary size (ignored by char: its vocabulary is the text's characters)
    cache_dir: str | None = None  # prepared datasets and downloads; None = ~/.cache/minillm
    # seq2seq: held-out sentences translated greedily at every evaluation for the BLEU curve
    # (val_bleu in metrics.jsonl and loss.png); 200 keeps it to seconds on a CPU. 0 = no BLEU
    bleu_sentences: int = 200
    # --- checkpoints -----------------------------------------------------------------------
    out_dir: str = "out"  # checkpoint folder: weights, config, tokenizer, train state, metrics, plot
    always_save_checkpoint: bool = True  # save at every evaluation, not only when val loss improves
    resume: bool = False  # continue the run in out_dir exactly where its last complete checkpoint stopped
    overwrite: bool = False  # start afresh in an out_dir that already holds a run (its checkpoints are replaced)

    def __post_init__(self):
        check_finite_fields(self)
        for name in ("max_iters", "eval_interval", "eval_iters", "log_interval", "batch_size",
                     "gradient_accumulation_steps", "vocab_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"TrainConfig.{name} must be positive, got {getattr(self, name)}")
        for name in ("learning_rate", "min_lr", "warmup_iters", "weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.bleu_sentences < 0:
            raise ValueError(f"TrainConfig.bleu_sentences must be >= 0, got {self.bleu_sentences}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"TrainConfig.objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.tokenizer not in ("char", "bpe"):
            raise ValueError(f"TrainConfig.tokenizer must be 'char' or 'bpe', got {self.tokenizer!r}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"TrainConfig.dtype must be auto or one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.resume and self.overwrite:
            raise ValueError("TrainConfig: resume=true and overwrite=true contradict each other; pick one")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"Adam betas must be in [0, 1), got beta1={self.beta1}, beta2={self.beta2}")


def check_finite_fields(cfg) -> None:
    """Raise ValueError naming the first float field of dataclass `cfg` that is NaN or infinite.

    Every comparison with NaN is False, so `learning_rate < 0` lets a NaN through, and the run
    trains NaN weights to the end; checking finiteness first closes that for every field at once."""
    import dataclasses
    import math

    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{type(cfg).__name__}.{f.name} must be a finite number, got {value}")


# Named recipes: plain data, a model preset plus overrides for both dataclasses and a data source.
RECIPES: dict[str, dict] = {
    # what `minillm train` runs with no arguments: the tiny preset (sinusoidal positions, the
    # engine's default) on the embedded python-docs corpus.
    "python-docs-char": dict(preset="tiny", data="python-docs", model=dict(), train=dict()),
    # nanoGPT README's CPU run of config/train_shakespeare_char.py (~2-3 min on a laptop)
    "shakespeare-char-cpu": dict(
        preset="tiny", data="shakespeare",
        model=dict(n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0, positional="learned",
                   bias=False, attention="sdpa"),
        train=dict(builtin_ops=True, max_iters=2000, lr_decay_iters=2000, eval_interval=250, eval_iters=20,
                   log_interval=10,
                   batch_size=12, learning_rate=1e-3, min_lr=1e-4, warmup_iters=100, beta2=0.99,
                   always_save_checkpoint=False, out_dir="out-shakespeare-char-cpu"),
    ),
    # nanoGPT's config/train_shakespeare_char.py: the baby GPT (6/6/384, block 256) for one GPU
    "shakespeare-char": dict(
        preset="char-small", data="shakespeare",
        model=dict(n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2, positional="learned",
                   bias=False, attention="sdpa"),
        train=dict(builtin_ops=True, max_iters=5000, lr_decay_iters=5000, eval_interval=250, eval_iters=200,
                   log_interval=10,
                   batch_size=64, learning_rate=1e-3, min_lr=1e-4, warmup_iters=100, beta2=0.99,
                   always_save_checkpoint=False, out_dir="out-shakespeare-char"),
    ),
}


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left in place."""


class Terminated(KeyboardInterrupt):
    """A termination signal turned into an interrupt: SIGTERM is what `docker stop`, Kubernetes and
    batch schedulers send before they kill a process, and a run should stop as cleanly as on Ctrl-C.
    The command line installs the handler that raises it (minillm.cli.main); every loop that catches
    KeyboardInterrupt catches it too, and `signum` says which signal it was."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) during training: where the run stopped and which checkpoint survives.

    signum: the signal that stopped it (2 for Ctrl-C's SIGINT, 15 for SIGTERM); a shell reports
    such an exit as 128 + signum, and the command line exits with that status."""

    def __init__(self, step: int | None, checkpoint_step: int | None, out_dir: str, signum: int = 2):
        super().__init__(step, checkpoint_step, out_dir)
        self.step, self.checkpoint_step, self.out_dir, self.signum = step, checkpoint_step, out_dir, signum

    @classmethod
    def from_interrupt(cls, interrupt: KeyboardInterrupt, step, checkpoint_step, out_dir) -> "TrainingInterrupted":
        """The loop's record of `interrupt` (a plain KeyboardInterrupt is Ctrl-C, signal 2)."""
        return cls(step, checkpoint_step, out_dir, getattr(interrupt, "signum", 2))
