"""Fine-tune a pre-trained model to classify texts: SST-2 sentiment, or any labelled file.

    base model (minillm checkpoint, or a Hugging Face BERT / GPT-2 folder)
      → its trunk + a fresh head (model/heads.py: [CLS] for an encoder, the last token for a decoder)
      → inputs: [CLS] text [SEP] for an encoder with those tokens, the text alone otherwise, cut to
        block_size (counted and reported), right-padded per batch with an attention mask
      → L_task = cross-entropy(head(pool(h)), label), full / frozen trunk / LoRA (finetune/trainer.py)
      → dev accuracy, precision/recall/F1 per class and the confusion matrix (evaluate/classification.py)

    >>> result = finetune_classifier("out-bert", FinetuneConfig(data="sst2", lora_rank=8))
    >>> result["report"]["accuracy"]
"""

from __future__ import annotations

import torch

from minillm.data.tasks import classification_data
from minillm.evaluate.classification import classification_report
from minillm.finetune.config import FinetuneConfig
from minillm.finetune.trainer import check_out_dir, choose_trainable, fit, fresh_copy
from minillm.model.heads import SequenceClassifier

HEAD = ["pooler", "head"]  # the task's own modules: trained in every mode (the pooler only if it exists)


def pad_id(tokenizer) -> int:
    """The id padding is filled with (masked out everywhere, so any id works; [PAD] reads best)."""
    specials = tokenizer.special_tokens
    return next((specials[s] for s in ("[PAD]", "<|endoftext|>", "</s>") if s in specials), 0)


def encode_texts(texts: list[str], tokenizer, block_size: int, wrap: bool) -> tuple[list[list[int]], int]:
    """Token ids per text, [CLS] … [SEP]-wrapped if `wrap`, cut to block_size; (ids, how many were cut).
    A text keeps its beginning: the first block_size tokens (minus [CLS] and [SEP])."""
    room = block_size - 2 if wrap else block_size
    cls_sep = (tokenizer.special_tokens["[CLS]"], tokenizer.special_tokens["[SEP]"]) if wrap else None
    rows, cut = [], 0
    for text in texts:
        ids = tokenizer.encode(text, allowed_special="none")  # a "[SEP]" typed in a review is just text
        if not ids:
            raise ValueError(f"the text {text!r} encodes to no tokens")
        if len(ids) > room:
            ids, cut = ids[:room], cut + 1
        rows.append([cls_sep[0], *ids, cls_sep[1]] if wrap else ids)
    return rows, cut


def collate(rows: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest row: (idx (B, T), attention_mask (B, T), 1 = real token)."""
    T = max(len(r) for r in rows)
    idx = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        idx[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    return idx.to(device), mask.to(device)


@torch.no_grad()
def score(model: SequenceClassifier, rows: list[list[int]], labels: list[int], pad: int, device,
          batch_size: int = 64) -> tuple[list[int], float]:
    """(predicted label ids, mean loss) over rows, in one pass of the model."""
    was = model.training
    model.eval()
    preds, total = [], 0.0
    for i in range(0, len(rows), batch_size):
        idx, mask = collate(rows[i:i + batch_size], pad, device)
        y = torch.tensor(labels[i:i + batch_size], device=device)
        logits, loss = model(idx, y, attention_mask=mask)
        preds += logits.argmax(-1).tolist()
        total += loss.item() * len(y)
    model.train(was)
    return preds, total / len(rows)


def build_classifier(lm, tokenizer, labels: list[str], pooling: str = "auto") -> tuple[SequenceClassifier, bool]:
    """(classifier on lm's trunk, whether inputs are [CLS]/[SEP]-wrapped). By default an encoder whose
    tokenizer has [CLS] and [SEP] reads [CLS] through a pooler (the pre-trained one if lm has it); an
    encoder without them averages its tokens; a decoder reads its last token."""
    if not hasattr(lm, "transformer") or not hasattr(lm.cfg, "causal"):
        raise ValueError(f"fine-tuning classifies with a CausalLM or a MaskedLM trunk, not a {type(lm).__name__}")
    wrap = not lm.cfg.causal and all(s in tokenizer.special_tokens for s in ("[CLS]", "[SEP]"))
    if pooling == "auto":
        pooling = "last" if lm.cfg.causal else ("cls" if wrap else "mean")
    if pooling == "cls" and not wrap:
        raise ValueError("pooling=cls needs an encoder whose tokenizer has [CLS] and [SEP] "
                         "(pre-train with --objective=mlm+nsp); use --pooling=mean")
    return SequenceClassifier.from_pretrained(lm, labels, pooling), wrap


def finetune_classifier(lm, tokenizer, cfg: FinetuneConfig, *, base: str = "", device="cpu",
                        progress: bool = True, say=print) -> dict:
    """Fine-tune `lm` (a loaded CausalLM / MaskedLM) on cfg.data; returns the dev report and run facts."""
    if cfg.task != "classify":
        raise ValueError(f"finetune_classifier runs task=classify, not {cfg.task}")
    data = classification_data(cfg.data or "sentiment", text_column=cfg.text_column, label_column=cfg.label_column,
                               dev_path=cfg.dev_data, dev_fraction=cfg.dev_fraction, cache_dir=cfg.cache_dir,
                               seed=cfg.seed)
    check_out_dir(cfg)
    if cfg.reinit:
        lm = fresh_copy(lm, cfg.seed)
    torch.manual_seed(cfg.seed)  # the fresh head's initial weights
    model, wrap = build_classifier(lm, tokenizer, data.labels, cfg.pooling)
    model.to(device)
    T = model.cfg.block_size
    train_rows, train_cut = encode_texts([t for t, _ in data.train], tokenizer, T, wrap)
    dev_rows, dev_cut = encode_texts([t for t, _ in data.dev[:cfg.max_eval_examples]], tokenizer, T, wrap)
    train_y = [y for _, y in data.train]
    dev_y = [y for _, y in data.dev[:cfg.max_eval_examples]]
    if train_cut or dev_cut:
        say(f"{train_cut:,} of {len(train_rows):,} training and {dev_cut:,} of {len(dev_rows):,} dev texts are longer "
            f"than block_size={T} tokens and were cut to their first {T - 2 if wrap else T}")
    counts = choose_trainable(model, cfg, [h for h in HEAD if getattr(model, h, None) is not None])
    say(f"fine-tuning {'a RANDOMLY INITIALISED ' if cfg.reinit else ''}{model.pooling}-pooled {'encoder' if not model.cfg.causal else 'decoder'} ({cfg.mode}): "
        f"{counts['trainable']:,} of {counts['total']:,} parameters train; {len(train_rows):,} train / "
        f"{len(dev_rows):,} dev examples of {data.source}, labels {data.labels}")
    pad = pad_id(tokenizer)
    gen = torch.Generator().manual_seed(cfg.seed)

    def next_batch(step):
        pick = torch.randint(len(train_rows), (cfg.batch_size,), generator=gen).tolist()
        idx, mask = collate([train_rows[i] for i in pick], pad, device)
        return {"idx": idx, "labels": torch.tensor([train_y[i] for i in pick], device=device), "attention_mask": mask}

    last = {}

    def evaluate():
        preds, loss = score(model, dev_rows, dev_y, pad, device)
        last["report"] = classification_report(dev_y, preds, data.labels)  # the final one is the run's report
        return {"val_loss": loss, "val_acc": last["report"]["accuracy"], "val_macro_f1": last["report"]["macro"]["f1"]}

    meta = {"base": base, "finetune": {**vars(cfg), "mode": cfg.mode}, "data": data.source,
            "classifier": {"labels": data.labels, "pooling": model.pooling, "wrap": wrap}}
    result = fit(model, cfg, next_batch, evaluate, tokenizer=tokenizer, head=HEAD[1:] if model.pooler is None else HEAD,
                 meta=meta, device=device, progress=progress,
                 describe=lambda ev: f"step {ev['step']}: dev loss {ev['val_loss']:.4f}, accuracy {ev['val_acc']:.1%}, "
                                     f"macro F1 {ev['val_macro_f1']:.3f}")
    return {**result, "report": last["report"], "params": counts, "truncated": {"train": train_cut, "dev": dev_cut},
            "n_train": len(train_rows), "n_dev": len(dev_rows), "labels": data.labels, "model": model}
