"""`minillm finetune`: a pre-trained checkpoint learns a labelled task (minillm/finetune/).

    minillm finetune out-bert --task=classify                     the generated sentiment task, offline
    minillm finetune out-bert --task=classify --data=sst2 --lora_rank=8
    minillm finetune out-bert --task=classify --data=reviews.csv --text_column=review --label_column=stars
    minillm finetune out-gpt --task=instruct --data=alpaca-1100   then: minillm generate out-finetune "..."
    minillm finetune smollm2-135m-instruct --task=instruct --template=chat --lora_rank=8 --quantize=int4   QLoRA
"""

from __future__ import annotations

import dataclasses
import json

from minillm.weights.checkpoint import check_finite_forward, find_checkpoint, load_model
from minillm.files import write_json
from minillm.finetune.config import FinetuneConfig
from minillm.hardware import resolve_device
from minillm.model.config import split_overrides
from minillm.train.config import TrainingInterrupted


def cmd_finetune(args, overrides: list[str]) -> int:
    """Fine-tune a minillm checkpoint or a Hugging Face BERT / GPT-2 folder on a classification or
    instruction task; full, frozen trunk (--freeze_trunk=true) or LoRA (--lora_rank=8); LoRA with --quantize=int4
    is QLoRA (the base stays 4-bit and frozen: a float model quantized, a GGUF's own blocks, or a quantized
    checkpoint of that scheme)."""
    (changes,) = split_overrides(overrides, FinetuneConfig)
    cfg = FinetuneConfig(**changes)
    device = resolve_device(cfg.device)
    if args.quantize:  # QLoRA: the base is held quantized (a GGUF's own blocks, or quantized here)
        from minillm.finetune.qlora import load_quantized_base

        if not cfg.lora_rank:
            raise ValueError("--quantize trains LoRA adapters over a quantized base (QLoRA): pass --lora_rank=8 too")
        lm, tokenizer, meta = load_quantized_base(args.checkpoint, args.quantize, device)
    else:
        lm, tokenizer, meta = load_model(args.checkpoint, device)
    check_finite_forward(lm, find_checkpoint(args.checkpoint))
    if tokenizer is None:
        raise ValueError(f"{args.checkpoint} has no tokenizer.json: fine-tuning needs the tokenizer the model was "
                         "trained with")
    from minillm.finetune.qlora import check_trainable, is_quantized

    check_trainable(lm, cfg.mode)  # a quantized base (checkpoint or --quantize) trains adapters only: QLoRA
    if is_quantized(lm) and not args.quantize:  # QLoRA is asked for, not stumbled into: its merge is a float model
        scheme = lm.quant_config.get("scheme") if hasattr(lm, "quant_config") else "int4"
        raise ValueError(f"{args.checkpoint} is quantized ({scheme}): LoRA on a quantized model is not supported "
                         f"without --quantize: pass --quantize={scheme} to train QLoRA adapters over it as it is "
                         "(the merged result is a float model), or fine-tune the float checkpoint")
    if is_quantized(lm) and cfg.task == "classify":
        raise ValueError("QLoRA runs --task=instruct: a classifier copies its trunk into a fresh float model "
                         "(model/heads.py); classify from the float checkpoint with --lora_rank")
    if "classifier" in meta:
        raise ValueError(f"{args.checkpoint} is already a fine-tuned classifier; start from its base model")
    if cfg.lora_rank:  # before any data is read: a rank the layers cannot hold is a typo, said at once
        from minillm.finetune.lora import check_rank

        check_rank(lm, cfg.lora_rank, cfg.targets)
    try:
        if cfg.task == "classify":
            from minillm.finetune.classify import finetune_classifier

            r = finetune_classifier(lm, tokenizer, cfg, base=str(args.checkpoint), device=device)
        else:
            from minillm.finetune.instruct import finetune_instruct

            r = finetune_instruct(lm, tokenizer, cfg, base=str(args.checkpoint), device=device)
    except TrainingInterrupted as e:  # Ctrl-C or SIGTERM: one line, the checkpoint that survives
        from minillm.cli.train import report_interrupted

        return report_interrupted("finetune", e)
    p = r["params"]
    print(f"done: {cfg.max_iters} steps ({cfg.mode}), {p['trainable']:,} of {p['total']:,} parameters trained "
          f"({p['trainable'] / p['total']:.2%}), {r['ms_per_step']:.0f} ms/step on {device}")
    summary = {"mode": cfg.mode, "params": p, "ms_per_step": r["ms_per_step"], "eval": r["eval"],
               "config": dataclasses.asdict(cfg), "base": str(args.checkpoint)}
    if cfg.task == "classify":
        from minillm.evaluate.classification import format_report

        print(format_report(r["report"]))
        summary["report"] = r["report"]
        if args.baseline:
            summary["baseline"] = _baseline(cfg)
    else:
        ev = r["eval"]
        print(f"dev: loss {ev['val_loss']:.4f}, exact match {ev['val_exact_match']:.1%}, "
              f"ROUGE-L F1 {ev['val_rougeL']:.3f} (on {min(cfg.max_eval_examples, r.get('n_dev', 10**9))} examples)")
        for s in r.get("samples", [])[:3]:
            print(json.dumps(s, ensure_ascii=False))
    write_json(f"{cfg.out_dir}/finetune_report.json", summary)
    print(f"checkpoint in {cfg.out_dir}/checkpoints/ (use it like any: minillm generate|eval|quantize|serve "
          f"{cfg.out_dir}){'; adapter alone in ' + cfg.out_dir + '/adapter/' if cfg.mode == 'lora' and cfg.save_adapter else ''}")
    return 0


def _baseline(cfg: FinetuneConfig) -> dict:
    """The bag-of-words classifier on the same train/dev split: what the fine-tune must beat."""
    from minillm.data.tasks import classification_data
    from minillm.finetune.baseline import bag_of_words_baseline

    data = classification_data(cfg.data or "sentiment", text_column=cfg.text_column, label_column=cfg.label_column,
                               dev_path=cfg.dev_data, dev_fraction=cfg.dev_fraction, cache_dir=cfg.cache_dir,
                               seed=cfg.seed)
    r = bag_of_words_baseline(data.train, data.dev[:cfg.max_eval_examples], data.labels)
    print(f"bag-of-words baseline (tf-idf + logistic regression, {r['n_features']:,} features): dev accuracy "
          f"{r['accuracy']:.1%}, macro F1 {r['macro']['f1']:.3f}")
    return {k: r[k] for k in ("accuracy", "macro", "n_features")}


def add_parser(sub) -> None:
    p = sub.add_parser(
        "finetune", help="fine-tune a checkpoint: classification or instruction tuning; full, frozen or LoRA",
        description=cmd_finetune.__doc__ + " Every FinetuneConfig field is a --key=value option (see "
        "minillm/finetune/config.py). classify data: sentiment (generated, offline; default) | sst2 (GLUE, "
        "downloaded and checked by sha256) | a .csv/.tsv/.jsonl/.json file with --text_column and --label_column. "
        "instruct data: tasks (generated, offline; default) | alpaca-1100 (LLMs-from-scratch's 1,100, downloaded) "
        "| a .json/.jsonl file of instruction/input/output records. Checkpoints go to --out_dir (default "
        "out-finetune) in the usual format: a LoRA model is saved merged, and its adapter alone in OUT/adapter/.",
        epilog="options: " + ", ".join(f.name for f in dataclasses.fields(FinetuneConfig)) + ".  Examples: "
        "minillm finetune out-bert --task=classify | minillm finetune out-bert --data=sst2 --lora_rank=8 "
        "--learning_rate=1e-3 | minillm finetune out --task=instruct --max_iters=500")
    p.add_argument("checkpoint", help="the base model: a minillm run/checkpoint folder or a Hugging Face "
                   "BERT / GPT-2 folder (with tokenizer.json)")
    p.add_argument("--quantize", choices=("int4", "int8"), default=None,
                   help="QLoRA (with --lora_rank): hold the frozen base in this format while the adapters train "
                   "(a GGUF keeps its own blocks; a float model is quantized in groups of 32); the saved "
                   "checkpoint is the float model with the adapter merged, the adapter alone is in OUT/adapter/")
    p.add_argument("--baseline", action="store_true",
                   help="classify: also fit the bag-of-words baseline on the same split and print its accuracy")
    p.set_defaults(func=cmd_finetune)
