"""Knowledge distillation: a small student learns from a big teacher's whole distribution.

Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a Neural Network". A one-hot target
says only which token came next; the teacher's distribution also says which others were plausible
("dark knowledge"), which is more information per example. Both soften with a temperature τ:

    p^τ = softmax(z / τ)
    soft = τ² · KL(p_T^τ ‖ p_S^τ) = τ² · Σ_v p_T^τ(v) · (log p_T^τ(v) - log p_S^τ(v))
    hard = cross-entropy(z_S, y)                       (the ordinary next-token / masked-token loss)
    loss = α · soft + (1 - α) · hard

Why τ²: the gradient of the soft term w.r.t. a student logit is (p_S^τ - p_T^τ)/τ, and the
probabilities' differences shrink ~1/τ as well, so gradients scale as 1/τ²; multiplying by τ² keeps
the soft term's pull comparable to the hard term's when τ changes (Hinton et al. §2).
Both terms average over the positions that carry a label: every position of a causal LM, the
masked ~15% of a masked LM (as DistilBERT does), so the same code serves GPT and BERT students.

The teacher runs on the fly on each batch (no_grad, eval mode): nothing is stored. Optionally
`TopKCache` keeps only the teacher's k largest logits per position (B·T·k numbers instead of
B·T·V), keyed by step: a second student trained with the same seed sees the same batches and reuses
them without running the teacher again. With top-k, p_T is renormalised over its k tokens and the
KL runs over those k (the "sparse" distillation of e.g. MiniLLM/Gemma-style top-k KD).

The teacher is a minillm checkpoint, or a Hugging Face GPT-2 / BERT folder (minillm.weights.huggingface);
its vocabulary must be the student's: comparing two distributions needs the same tokens.

    minillm distill --teacher=out/big --preset=tiny --out_dir=out/distilled --alpha=0.5 --temperature=2
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from minillm.model.losses import IGNORE_INDEX, cross_entropy
from minillm.train.fit import finetune


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                      alpha: float = 0.5, temperature: float = 2.0,
                      teacher_indices: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """α·τ²·KL(p_T^τ ‖ p_S^τ) + (1-α)·CE(z_S, y), averaged over labelled positions; also returns parts.

    student_logits (B, T, V); targets (B, T) with IGNORE_INDEX where nothing is predicted;
    teacher_logits (B, T, V), or (B, T, k) with `teacher_indices` (B, T, k) for a top-k teacher.
    """
    if not 0.0 <= alpha <= 1.0:  # (False for NaN too)
        raise ValueError(f"alpha (the soft-loss weight) must be in [0, 1], got {alpha}")
    if not temperature > 0 or temperature == float("inf"):  # (NaN fails every comparison: `<= 0` lets it through)
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    hard = cross_entropy(student_logits, targets)
    keep = (targets != IGNORE_INDEX).reshape(-1)  # (N,) positions that count
    zs = student_logits.float().reshape(-1, student_logits.shape[-1])[keep] / temperature  # (n, V)
    zt = teacher_logits.float().reshape(-1, teacher_logits.shape[-1])[keep] / temperature  # (n, V) or (n, k)
    log_ps = F.log_softmax(zs, dim=-1)  # log p_S^τ over the whole vocabulary
    if teacher_indices is not None:  # top-k teacher: the student's log-probs at the teacher's k tokens
        log_ps = log_ps.gather(-1, teacher_indices.reshape(-1, teacher_indices.shape[-1])[keep])  # (n, k)
    log_pt = F.log_softmax(zt, dim=-1)  # (renormalised over the k tokens for a top-k teacher)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1)  # (n,) KL(p_T ‖ p_S) per position
    soft = kl.sum() / keep.sum().clamp_min(1) * temperature ** 2
    loss = alpha * soft + (1 - alpha) * hard
    return loss, {"soft": soft.detach(), "hard": hard.detach()}


class TopKCache:
    """The teacher's k largest logits (fp16) and their token ids (int32) per position, per step."""

    def __init__(self, k: int):
        if k <= 0:
            raise ValueError(f"top-k cache needs k > 0, got {k}")
        self.k, self.steps = k, {}

    def get(self, step: int, teacher, x: torch.Tensor):
        if step not in self.steps:
            with torch.no_grad():
                vals, idx = teacher_logits(teacher, x).topk(self.k, dim=-1)  # (B, T, k) each
            self.steps[step] = (vals.half(), idx.int())
        vals, idx = self.steps[step]
        return vals.float(), idx.long()

    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() + i.numel() * i.element_size() for v, i in self.steps.values())


@torch.no_grad()
def teacher_logits(teacher, x: torch.Tensor) -> torch.Tensor:
    teacher.eval()  # no dropout: the teacher's best guess
    return teacher(x)[0]


def load_teacher(path: str | Path, device="cpu"):
    """(model, tokenizer or None) from a minillm checkpoint or a Hugging Face GPT-2/BERT folder."""
    from minillm.weights.checkpoint import check_finite_forward, find_checkpoint, load_model

    path = Path(path)
    hf = None
    if (path / "config.json").is_file():
        try:
            hf = json.loads((path / "config.json").read_text(encoding="utf-8"))
        except ValueError:
            hf = None
    if isinstance(hf, dict) and "model" not in hf and "model_type" in hf:  # a Hugging Face folder
        from minillm.weights.huggingface import load_bert, load_gpt2

        if hf["model_type"] not in ("gpt2", "bert"):
            raise ValueError(f"{path}: a Hugging Face {hf['model_type']!r} model; teachers can be gpt2 or bert")
        model = load_gpt2(path) if hf["model_type"] == "gpt2" else load_bert(path)
        check_finite_forward(model, path)
        return model.to(device).eval(), None
    model, tokenizer, meta = load_model(path, device=device)
    kind = "an encoder–decoder (Seq2Seq)" if "seq2seq" in meta else \
        "a fine-tuned classifier" if "classifier" in meta else None
    if kind is not None:  # its logits are not next-token (or masked-token) distributions over the text
        raise ValueError(f"{path} is {kind}; a teacher is a language model (causal or masked), whose "
                         "token distributions the student learns")
    check_finite_forward(model, find_checkpoint(path))
    return model, tokenizer


def check_compatible(teacher, student, teacher_tokenizer=None, student_tokenizer=None) -> None:
    """Same vocabulary (size, and the same tokens when both tokenizers are known), same objective."""
    vt, vs = teacher.cfg.vocab_size, student.cfg.vocab_size
    if vt != vs:
        raise ValueError(f"the teacher's vocabulary has {vt} tokens and the student's {vs}: distillation "
                         "compares distributions over the same tokens, so they must share a tokenizer")
    if teacher_tokenizer is not None and student_tokenizer is not None \
            and teacher_tokenizer.to_dict() != student_tokenizer.to_dict():
        raise ValueError("the teacher's and the student's tokenizers differ (same size, other tokens): "
                         "train the student with the teacher's tokenizer")
    if student.cfg.block_size > teacher.cfg.block_size:
        raise ValueError(f"the student's block_size={student.cfg.block_size} is longer than the teacher's "
                         f"{teacher.cfg.block_size}: the teacher cannot score those windows (pass --block_size=...)")
    if teacher.cfg.causal != student.cfg.causal:
        raise ValueError("teacher and student must both be causal LMs or both masked LMs")


def distill(student, teacher, train_tokens, iters: int, *, alpha: float = 0.5, temperature: float = 2.0,
            topk: int = 0, cache: TopKCache | None = None, **finetune_kwargs) -> dict:
    """Train `student` in place for `iters` steps on α·soft + (1-α)·hard against `teacher`.

    topk > 0 (or a TopKCache): distil from the teacher's top-k logits, cached by step.
    finetune_kwargs: batch_size, learning_rate, warmup_iters, objective, tokenizer, device, seed, ...
    Returns {"losses", "soft", "hard"} per step (and "cache" when top-k is used).
    """
    check_compatible(teacher, student)
    distillation_loss(torch.zeros(1, 1, 2), torch.zeros(1, 1, 2), torch.zeros(1, 1, dtype=torch.long),
                      alpha, temperature)  # bad alpha / temperature fail before any step
    if topk and cache is None:
        cache = TopKCache(topk)
    soft, hard = [], []

    def loss_fn(model, x, y, step):
        logits = model(x)[0]  # (B, T, V)
        if cache is not None:
            t_vals, t_idx = cache.get(step, teacher, x)  # (B, T, k) each
        else:
            t_vals, t_idx = teacher_logits(teacher, x), None  # (B, T, V), on the fly
        loss, parts = distillation_loss(logits, t_vals, y, alpha, temperature, t_idx)
        soft.append(parts["soft"].item())
        hard.append(parts["hard"].item())
        return loss

    losses = finetune(student, train_tokens, iters, loss_fn=loss_fn, **finetune_kwargs)
    out = {"losses": losses, "soft": soft, "hard": hard}
    if cache is not None:
        out["cache"] = cache
    return out
