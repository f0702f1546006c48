"""`minillm train` and `minillm eval`: the command-line face of minillm/train/.

    minillm train                                   tiny char model on python-docs, a few CPU minutes
    minillm train --preset=shakespeare-char-cpu --data=tinyshakespeare.txt
    minillm train --n_layer=6 --max_iters=3000 --out_dir=out-big
    minillm train --resume=true --max_iters=4000    continue out/ where it stopped
    minillm eval out                                validation loss and perplexity of a checkpoint
    minillm train --objective=seq2seq --data=dates  the encoder–decoder on a generated task (train/seq2seq.py)
    minillm train --objective=seq2seq --n_enc_layer=3 --n_dec_layer=1   separate depths (default: n_layer each)
    minillm eval out --metric=bleu,rouge --beam=4   BLEU/ROUGE of a Seq2Seq checkpoint on its held-out split
"""

from __future__ import annotations

import dataclasses
import math
import sys

import torch

from minillm.cli.translate import add_beam_options, check_beam_options
from minillm.model.config import PRESETS, ModelConfig, split_overrides
from minillm.model.seq2seq import Seq2SeqConfig
from minillm.weights.checkpoint import CONFIG_FILE, TOKENIZER_FILE, check_finite_forward, find_checkpoint, load_model
from minillm.data.dataset import load_text, prepare_dataset, split_text
from minillm.generate.sampling import generate_text
from minillm.hardware import resolve_device
from minillm.train import RECIPES, TrainConfig, TrainingDiverged, TrainingInterrupted, evaluate, train
from minillm.train.evaluate import describe_batches
from minillm.train.seq2seq import SEQ2SEQ_OPTIONS, train_seq2seq
from minillm.train.state import resume_configs, saved_train_config

SAMPLE_PROMPT = "\n"


def _field_help(dc) -> str:
    return ", ".join(f.name for f in dataclasses.fields(dc))


def build_configs(preset: str, data: str | None, overrides: list[str]) -> tuple[ModelConfig, TrainConfig, str, dict]:
    """Model and train configs from a preset or recipe, a checkpoint when resuming, and overrides; the
    fourth item holds the encoder–decoder's own options (--n_enc_layer, --n_dec_layer, --label_smoothing)."""
    # TrainConfig first: its vocab_size is the BPE size asked for; the model's always follows the tokenizer
    train_changes, model_changes, seq2seq_changes = split_overrides(overrides, TrainConfig, ModelConfig, Seq2SeqConfig)
    for key in seq2seq_changes:
        if key not in SEQ2SEQ_OPTIONS:  # pad_id etc. come from the tokenizer; "model" is ModelConfig itself
            raise ValueError(f"--{key} cannot be set: the run derives it (settable: "
                             f"{', '.join('--' + k for k in SEQ2SEQ_OPTIONS)})")
    if train_changes.get("resume"):
        out_dir = train_changes.get("out_dir", TrainConfig.out_dir)
        model_cfg, train_cfg, recorded = resume_configs(out_dir, model_changes, train_changes)
        _check_seq2seq_options(seq2seq_changes, train_cfg)
        return model_cfg, train_cfg, data or recorded, seq2seq_changes
    objective = train_changes.get("objective", "clm")
    if objective in ("mlm", "mlm+nsp") and "causal" not in model_changes:
        model_changes["causal"] = False  # a masked LM looks both ways
    if objective == "mlm+nsp":  # BERT's pre-training: segment embeddings for A/B and the NSP head
        model_changes.setdefault("n_token_types", 2)
        model_changes.setdefault("nsp_head", True)
    recipe = RECIPES.get(preset)
    if recipe is not None:
        model_cfg = ModelConfig.from_preset(recipe["preset"], **{**recipe["model"], **model_changes})
        train_cfg = TrainConfig(**{**recipe["train"], **train_changes})
        _check_seq2seq_options(seq2seq_changes, train_cfg)
        seq2seq = train_cfg.objective == "seq2seq"  # parallel text, not a corpus: its own default data
        return model_cfg, train_cfg, data or ("dates" if seq2seq else recipe["data"]), seq2seq_changes
    train_cfg = TrainConfig(**train_changes)
    _check_seq2seq_options(seq2seq_changes, train_cfg)
    return ModelConfig.from_preset(preset, **model_changes), train_cfg, data or "python-docs", seq2seq_changes


def _check_seq2seq_options(changes: dict, tc: TrainConfig) -> None:
    if changes and tc.objective != "seq2seq":  # a language model has one stack: --n_layer
        raise ValueError(f"{', '.join('--' + k for k in changes)} need --objective=seq2seq")


def cmd_train(args, overrides: list[str]) -> int:
    """Train a model and save checkpoints, metrics and a loss plot to out_dir."""
    model_cfg, train_cfg, data, seq2seq_changes = build_configs(args.preset, args.data, overrides)
    if train_cfg.objective == "seq2seq":
        return _train_seq2seq(model_cfg, train_cfg, data, args.sample_tokens > 0, seq2seq_changes)
    try:
        result = train(model_cfg, train_cfg, data)
    except TrainingDiverged as e:
        print(f"minillm train: {e}", file=sys.stderr)
        return 1
    except TrainingInterrupted as e:
        return report_interrupted("train", e)
    if result["rank"] != 0:  # under torchrun, process 0 reports and samples
        return 0
    if result.get("already_done"):
        print(f"{result['out_dir']} is already trained to step {result['step']} (max_iters={train_cfg.max_iters}): "
              f"nothing to do; pass a larger --max_iters to train further")
        return 0
    print(f"done: {result['step']} steps, val loss {result['val_loss']:.4f} (best {result['best_val_loss']:.4f}), "
          f"{result['ms_per_iter']:.1f} ms/iter on {result['device']}; checkpoint, metrics.jsonl and "
          f"loss.png in {result['out_dir']}/")
    if args.sample_tokens > 0 and train_cfg.objective == "clm":
        model, tok = result["model"], result["tokenizer"]
        prompt = SAMPLE_PROMPT if _encodable(tok, SAMPLE_PROMPT) else tok.decode([0])
        print(f"--- sample ({args.sample_tokens} tokens, temperature 0.8, top_k 200) ---")
        generate_text(model, tok, [prompt], args.sample_tokens, temperature=0.8, top_k=200,
                      generator=torch.Generator(device="cpu").manual_seed(train_cfg.seed),
                      stream=lambda i, piece: print(piece, end="", flush=True))
        print(f"\n--- more: minillm generate {result['out_dir']} --prompt=... ---")
    return 0


def report_interrupted(command: str, e: TrainingInterrupted, resume_with: str = "") -> int:
    """One line on stderr for a run stopped by Ctrl-C or SIGTERM: the step, the checkpoint that
    survives, and the command that continues it (or, with no checkpoint yet, that starts it again).
    Returns 128 + the signal's number, as a shell reports a process ended by it (130, 143)."""
    signal_name = {2: "", 15: " by SIGTERM"}.get(e.signum, f" by signal {e.signum}")
    if e.step is None:
        print(f"minillm {command}: interrupted{signal_name} before training started; nothing was written",
              file=sys.stderr)
    elif e.checkpoint_step is None:  # the first save had not completed: nothing to resume from
        again = ("minillm train --overwrite=true" if command == "train" else f"minillm {command} ... --overwrite=true")
        print(f"minillm {command}: stopped at step {e.step}{signal_name}; no checkpoint was written yet, so there "
              f"is nothing to resume; start again with: {again} --out_dir={e.out_dir}", file=sys.stderr)
    else:
        cont = (f"minillm train {resume_with}--resume=true --out_dir={e.out_dir}" if command == "train"
                else f"minillm generate|eval {e.out_dir}")
        verb = "continue with" if command == "train" else "use it with"
        print(f"minillm {command}: stopped at step {e.step}{signal_name}; last checkpoint at step "
              f"{e.checkpoint_step} in {e.out_dir}; {verb}: {cont}", file=sys.stderr)
    return 128 + e.signum


def _train_seq2seq(model_cfg, train_cfg, data: str, show_examples: bool, seq2seq_changes: dict) -> int:
    from minillm.generate.beam import translate

    try:
        result = train_seq2seq(model_cfg, train_cfg, data, seq2seq=seq2seq_changes)
    except TrainingDiverged as e:
        print(f"minillm train: {e}", file=sys.stderr)
        return 1
    except TrainingInterrupted as e:
        return report_interrupted("train", e, "--objective=seq2seq ")
    out = result["out_dir"]
    if result.get("already_done"):
        print(f"{out} is already trained to step {result['step']} (max_iters={train_cfg.max_iters}): "
              f"nothing to do; pass a larger --max_iters to train further")
        return 0
    print(f"done: {result['step']} steps, val loss {result['val_loss']:.4f} (best {result['best_val_loss']:.4f}), "
          f"{result['ms_per_iter']:.1f} ms/iter on {result['device']}; checkpoint and metrics.jsonl in {out}/")
    if show_examples:
        pairs = result["val_pairs"][:3]
        print("--- held-out examples (greedy) ---")
        for (src, ref), hyp in zip(pairs, translate(result["model"], result["tokenizer"], [s for s, _ in pairs])):
            print(f"{src}  ->  {hyp}   (reference: {ref})")
        print(f"--- more: minillm translate {out} \"...\" --beam=4 | minillm eval {out} --metric=bleu --beam=4 ---")
    return 0


def _encodable(tok, text: str) -> bool:
    try:
        tok.encode(text)
        return True
    except ValueError:
        return False


def cmd_eval(args, overrides: list[str]) -> int:
    """Validation loss and perplexity (masked-token accuracy for an MLM) of a checkpoint."""
    train_changes, model_changes = split_overrides(overrides, TrainConfig, ModelConfig)
    if args.metric is not None:  # '' is not "the default": say so, before anything is loaded
        from minillm.evaluate.translation import parse_metrics

        parse_metrics(args.metric)
    check_beam_options(args)
    device = resolve_device(train_changes.pop("device", "auto"))
    folder = find_checkpoint(args.out_dir)
    model, tok, meta = load_model(folder, device=device, **model_changes)
    check_finite_forward(model, folder)
    if tok is None:
        raise FileNotFoundError(f"{folder / TOKENIZER_FILE}: missing, so evaluation text cannot be encoded")
    if "seq2seq" in meta or args.metric is not None:
        return _eval_translation(args, model, tok, meta, train_changes)
    if args.split == "test":
        raise ValueError("--split=test is for translation checkpoints; a language model has train and val")
    tc = saved_train_config(meta, folder / CONFIG_FILE, **train_changes)
    source = args.data or meta.get("data", "python-docs")
    ds = prepare_dataset(source, tokenizer=tc.tokenizer,
                         vocab_size=tc.vocab_size if tc.tokenizer == "bpe" else None,
                         special_tokens=list(tok.special_tokens), cache_dir=tc.cache_dir)
    tokens = ds.val if args.split == "val" else ds.train
    if ds.tokenizer.to_dict() != tok.to_dict():
        # other text than the model was trained on: encode it with the model's own tokenizer
        train_text, val_text = split_text(load_text(source, cache_dir=tc.cache_dir))
        tokens = torch.tensor(tok.encode(val_text if args.split == "val" else train_text))
    objective = "clm" if model.cfg.causal else ("mlm+nsp" if model.cfg.nsp_head else "mlm")
    r = evaluate(model, tokens, tc.batch_size, model.cfg.block_size, tc.eval_iters, device,
                 torch.Generator().manual_seed(tc.seed + 1), tok, objective)
    acc = f", masked-token accuracy {r['acc']:.1%}" if "acc" in r else ""
    if "nsp_acc" in r:
        acc += f", next-sentence accuracy {r['nsp_acc']:.1%} (MLM loss {r['mlm_loss']:.4f} + NSP loss {r['nsp_loss']:.4f})"
    print(f"{args.split} loss {r['loss']:.4f}, perplexity {r['ppl']:.2f}{acc} "
          f"({describe_batches(tc.eval_iters, tc.batch_size, model.cfg.block_size, f'{source} {args.split}')}, "
          f"seed {tc.seed + 1}; step {meta.get('step', '?')}, "
          f"{math.log(tok.vocab_size):.2f} = uniform guess)")
    return 0


def _eval_translation(args, model, tok, meta: dict, train_changes: dict) -> int:
    """BLEU/ROUGE of a Seq2Seq on a held-out split, decoded greedily or by beam search."""
    import time

    from minillm.data.translation import translation_pairs
    from minillm.evaluate.translation import BLEU_SIGNATURE, parse_metrics, score_translations
    from minillm.generate.beam import translate

    metrics = parse_metrics(args.metric or "bleu")
    if "seq2seq" not in meta:
        raise ValueError(f"--metric={args.metric} scores translations; {args.out_dir} is a language model "
                         "(train one with --objective=seq2seq)")
    check_beam_options(args)
    source = args.data or meta.get("data", "dates")
    pairs = translation_pairs(source, args.split, train_changes.get("cache_dir", meta.get("train", {}).get("cache_dir")),
                              n=args.max_sentences)
    t0 = time.perf_counter()
    hyps = translate(model, tok, [s for s, _ in pairs], beam_size=args.beam, alpha=args.length_penalty,
                     length_penalty_style=args.length_penalty_style)
    seconds = time.perf_counter() - t0
    scores = score_translations(hyps, [t for _, t in pairs], metrics)
    how = "greedy" if args.beam == 1 else \
        f"beam {args.beam}, length penalty {args.length_penalty}" + (" (hf)" if args.length_penalty_style == "hf" else "")
    print(f"{source} {args.split}: {len(pairs):,} sentences, {how}, {seconds:.1f} s "
          f"(step {meta.get('step', '?')})")
    if "bleu" in metrics:
        p = "/".join(f"{scores[f'bleu_p{n}']:.1f}" for n in range(1, 5))
        print(f"BLEU = {scores['bleu']:.2f} {p} (BP = {scores['bleu_bp']:.3f})  {BLEU_SIGNATURE}")
    if "rouge" in metrics:
        print(f"ROUGE F1: rouge1 {scores['rouge1']:.2f}, rouge2 {scores['rouge2']:.2f}, rougeL {scores['rougeL']:.2f}")
    return 0


def add_parser(sub) -> None:
    choices = sorted(PRESETS) + sorted(RECIPES)
    p = sub.add_parser(
        "train", help="train a model (default: tiny char GPT on python-docs, a few CPU minutes)",
        description="Train a GPT (objective=clm), BERT-style (objective=mlm, or mlm+nsp: masked tokens and "
                    "next-sentence prediction) or encoder–decoder translation "
                    "(objective=seq2seq, data: dates | multi30k | SRC_FILE,TGT_FILE) model, evaluating every "
                    "eval_interval steps and saving a checkpoint, metrics.jsonl and loss.png to out_dir. "
                    "Every ModelConfig and TrainConfig field can be set with --key=value. "
                    "Run with torchrun for several processes/GPUs.",
        epilog=f"model options: {_field_help(ModelConfig)}.  train options: {_field_help(TrainConfig)}.  "
               f"seq2seq options: {', '.join(SEQ2SEQ_OPTIONS)}.  "
               "Recipes: " + "; ".join(f"{k} ({v['data']}, {v['train'].get('max_iters', TrainConfig.max_iters)} iters)"
                                       for k, v in RECIPES.items()) +
               ".  Examples: minillm train | minillm train --preset=shakespeare-char-cpu "
               "--data=input.txt | minillm train --objective=mlm --tokenizer=bpe --vocab_size=512 | "
               "minillm train --objective=mlm+nsp --out_dir=out-bert | "
               "minillm train --resume=true --max_iters=2000",
    )
    p.add_argument("--preset", default="python-docs-char", choices=choices, metavar="NAME",
                   help="model preset or training recipe (default: python-docs-char, the tiny preset with "
                        f"sinusoidal positions on python-docs): {', '.join(choices)}")
    p.add_argument("--data", default=None,
                   help="python-docs (default, offline), shakespeare (downloaded once), or a .txt file/folder; "
                        "with --objective=seq2seq: dates (default, offline), multi30k, headlines (summarization, offline), "
                        "or SRC_FILE,TGT_FILE")
    p.add_argument("--sample_tokens", type=int, default=300,
                   help="tokens of text to sample from the trained model at the end (0: none)")
    p.set_defaults(func=cmd_train)

    e = sub.add_parser(
        "eval", help="validation loss / perplexity of a checkpoint",
        description="Evaluate a checkpoint on the validation split of its training data (or --data) "
                    "with the same fixed batches as training. --eval_iters=, --batch_size=, --device= "
                    "may be given as --key=value.",
    )
    e.add_argument("out_dir", help="checkpoint folder written by minillm train")
    e.add_argument("--data", default=None, help="evaluate on this source instead of the training data")
    e.add_argument("--split", default="val", choices=("val", "train", "test"),
                   help="which split (default: val; test = Multi30k's test2016 for a translation checkpoint)")
    e.add_argument("--metric", default=None,
                   help="translation checkpoints: comma-separated bleu,rouge (default: bleu)")
    add_beam_options(e, prefix="translation: ")
    e.add_argument("--max_sentences", type=int, default=None, help="translation: score only the first N pairs")
    e.set_defaults(func=cmd_eval)
