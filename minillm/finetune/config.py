"""What a fine-tuning run is told: FinetuneConfig, every knob with why it exists.

`minillm finetune CHECKPOINT --key=value` sets any field, checked against its type, as for training.
Three ways to fine-tune the same model (compare them; docs/guides/finetune.md has measured figures):

    full            every weight trains (the default)              most capacity, a full copy per task
    freeze_trunk    only the head trains (BERT: pooler + classifier)   what the pre-trained features alone know
    lora_rank > 0   low-rank adapters on the trunk + the head      ~1% of the weights, merged afterwards
"""

from __future__ import annotations

from dataclasses import dataclass

from minillm.train.config import check_finite_fields

TASKS = ("classify", "instruct")


@dataclass
class FinetuneConfig:
    # --- what to learn ---------------------------------------------------------------------
    task: str = "classify"  # "classify": one label per text | "instruct": answer instructions (causal LMs)
    data: str | None = None  # classify: sentiment (generated, offline) | sst2 | a .csv/.tsv/.jsonl/.json file;
    #                          instruct: tasks (generated, offline) | alpaca-1100 | a .json/.jsonl file
    dev_data: str | None = None  # a separate dev file; None = the data set's own dev split (or dev_fraction)
    dev_fraction: float = 0.1  # held-out share when a file has no separate dev file
    text_column: str = "text"  # column/key of the text in a local file (SST-2's is "sentence", set for you)
    label_column: str = "label"  # column/key of the label: integers, or strings (mapped in sorted order)
    template: str = "alpaca"  # instruct: the prompt format (alpaca, plain, or chat = the tokenizer's own chat
    #                           template, for instruct models such as SmolLM2), see finetune/instruct.py
    pooling: str = "auto"  # classify: which vector the head reads. auto = [CLS] for an encoder whose tokenizer
    #                        has it, else the mean of the tokens; the last token for a decoder. "mean" helps an
    #                        encoder whose pre-training never taught [CLS] anything (NSP still at chance)
    # --- how: full, frozen trunk, or LoRA --------------------------------------------------------
    freeze_trunk: bool = False  # train only the head, BERT's pooler included (a probe of the pre-trained features)
    lora_rank: int = 0  # > 0: LoRA adapters of this rank (Hu et al. 2021); the trunk's weights stay frozen
    lora_alpha: float = 16.0  # LoRA scale α: the update is (α/r)·B·A
    lora_targets: str = "qkv,proj"  # comma-separated linear layers to adapt: qkv, proj, up, down, gate
    lora_dropout: float = 0.0  # dropout on the adapters' input
    reinit: bool = False  # start from random weights of the base's shape and tokenizer: the control that
    #                       shows what pre-training bought (same model, same data, no pre-training)
    save_adapter: bool = True  # LoRA: also write the adapter alone (OUT/adapter/) beside the merged model
    # --- optimisation ----------------------------------------------------------------------
    max_iters: int = 300  # optimizer steps
    batch_size: int = 32  # examples per step
    learning_rate: float = 1e-3  # peak, for the small models of this engine; BERT-base takes 2e-5..5e-5
    min_lr: float = 3e-5  # floor of the cosine decay
    warmup_iters: int = 20  # linear warm-up: a fresh head's first gradients are large
    weight_decay: float = 0.01  # on 2-D weights (BERT fine-tuning's 0.01)
    grad_clip: float = 1.0  # global gradient-norm clip; 0 = none
    eval_interval: int = 100  # evaluate on the dev split (and checkpoint) every this many steps, and at the end
    max_eval_examples: int = 1000  # dev examples per evaluation (instruct generates answers: fewer is faster)
    # --- where -------------------------------------------------------------------------------
    device: str = "auto"  # auto | cpu | cuda | cuda:1 | mps
    seed: int = 1337  # head init, batches, dropout
    out_dir: str = "out-finetune"  # checkpoints (and the LoRA adapter), metrics.jsonl
    overwrite: bool = False  # start afresh in an out_dir that already holds a run
    cache_dir: str | None = None  # downloads (SST-2, the instruction set); None = ~/.cache/minillm

    def __post_init__(self):
        check_finite_fields(self)
        if self.task not in TASKS:
            raise ValueError(f"FinetuneConfig.task must be one of {', '.join(TASKS)}, got {self.task!r}")
        for name in ("max_iters", "batch_size", "eval_interval", "max_eval_examples"):
            if getattr(self, name) <= 0:
                raise ValueError(f"FinetuneConfig.{name} must be positive, got {getattr(self, name)}")
        for name in ("learning_rate", "min_lr", "warmup_iters", "weight_decay", "grad_clip", "lora_rank"):
            if getattr(self, name) < 0:
                raise ValueError(f"FinetuneConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 < self.dev_fraction < 1.0:
            raise ValueError(f"FinetuneConfig.dev_fraction must be in (0, 1), got {self.dev_fraction}")
        if self.pooling not in ("auto", "cls", "last", "mean"):
            raise ValueError(f"FinetuneConfig.pooling must be auto, cls, last or mean, got {self.pooling!r}")
        if self.freeze_trunk and self.lora_rank:
            raise ValueError("choose one of freeze_trunk=true (linear probe) and lora_rank>0 (LoRA), not both")
        if self.device not in ("auto", "cpu", "mps") and not self.device.startswith("cuda"):
            raise ValueError(f"FinetuneConfig.device must be auto, cpu, cuda[:N] or mps, got {self.device!r}")

    @property
    def mode(self) -> str:
        return "lora" if self.lora_rank else ("frozen" if self.freeze_trunk else "full")

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())
