"""`minillm train` and `minillm eval`: the command-line face of minillm/train/.

    minillm train                                   tiny char model on python-docs, a few CPU minutes
    minillm train --preset=shakespeare-char-cpu --data=tinyshakespeare.txt
    minillm train --n_layer=6 --max_iters=3000 --out_dir=out-big
    minillm train --resume=true --max_iters=4000    continue out/ where it stopped
    minillm eval out                                validation loss and perplexity of a checkpoint
"""

from __future__ import annotations

import dataclasses
import math
import sys

import torch

from minillm.model.config import PRESETS, ModelConfig, split_overrides
from minillm.checkpoint import CONFIG_FILE, TOKENIZER_FILE, find_checkpoint, load_model
from minillm.data.dataset import load_text, prepare_dataset, split_text
from minillm.generate.sampling import generate_text
from minillm.hardware import resolve_device
from minillm.train import RECIPES, TrainConfig, TrainingDiverged, TrainingInterrupted, evaluate, train
from minillm.train.state import resume_configs, saved_train_config

SAMPLE_PROMPT = "\n"


def _field_help(dc) -> str:
    return ", ".join(f.name for f in dataclasses.fields(dc))


def build_configs(preset: str, data: str | None, overrides: list[str]) -> tuple[ModelConfig, TrainConfig, str]:
    """Model and train configs from a preset or recipe, a checkpoint when resuming, and overrides."""
    # TrainConfig first: its vocab_size is the BPE size asked for; the model's always follows the tokenizer
    train_changes, model_changes = split_overrides(overrides, TrainConfig, ModelConfig)
    if train_changes.get("resume"):
        out_dir = train_changes.get("out_dir", TrainConfig.out_dir)
        model_cfg, train_cfg, recorded = resume_configs(out_dir, model_changes, train_changes)
        return model_cfg, train_cfg, data or recorded
    if train_changes.get("objective", "clm") == "mlm" and "causal" not in model_changes:
        model_changes["causal"] = False  # a masked LM looks both ways
    recipe = RECIPES.get(preset)
    if recipe is not None:
        model_cfg = ModelConfig.from_preset(recipe["preset"], **{**recipe["model"], **model_changes})
        train_cfg = TrainConfig(**{**recipe["train"], **train_changes})
        return model_cfg, train_cfg, data or recipe["data"]
    return ModelConfig.from_preset(preset, **model_changes), TrainConfig(**train_changes), data or "python-docs"


def cmd_train(args, overrides: list[str]) -> int:
    """Train a model and save checkpoints, metrics and a loss plot to out_dir."""
    model_cfg, train_cfg, data = build_configs(args.preset, args.data, overrides)
    try:
        result = train(model_cfg, train_cfg, data)
    except TrainingDiverged as e:
        print(f"minillm train: {e}", file=sys.stderr)
        return 1
    except TrainingInterrupted as e:
        if e.step is None:
            print("minillm train: interrupted before training started; nothing was written", file=sys.stderr)
        else:
            kept = (f"last checkpoint at step {e.checkpoint_step} in {e.out_dir}" if e.checkpoint_step is not None
                    else "no checkpoint was written yet")
            print(f"minillm train: stopped at step {e.step}; {kept}; continue with: minillm train --resume=true "
                  f"--out_dir={e.out_dir}", file=sys.stderr)
        return 130  # 128 + SIGINT, as shells report a Ctrl-C
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


def _encodable(tok, text: str) -> bool:
    try:
        tok.encode(text)
        return True
    except ValueError:
        return False


def cmd_eval(args, overrides: list[str]) -> int:
    """Validation loss and perplexity (masked-token accuracy for an MLM) of a checkpoint."""
    train_changes, model_changes = split_overrides(overrides, TrainConfig, ModelConfig)
    device = resolve_device(train_changes.pop("device", "auto"))
    folder = find_checkpoint(args.out_dir)
    model, tok, meta = load_model(folder, device=device, **model_changes)
    if tok is None:
        raise FileNotFoundError(f"{folder / TOKENIZER_FILE}: missing, so evaluation text cannot be encoded")
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
    objective = "clm" if model.cfg.causal else "mlm"
    r = evaluate(model, tokens, tc.batch_size, model.cfg.block_size, tc.eval_iters, device,
                 torch.Generator().manual_seed(tc.seed + 1), tok, objective)
    n_tok = tc.eval_iters * tc.batch_size * model.cfg.block_size
    acc = f", masked-token accuracy {r['acc']:.1%}" if "acc" in r else ""
    print(f"{args.split} loss {r['loss']:.4f}, perplexity {r['ppl']:.2f}{acc} "
          f"({tc.eval_iters} batches, {n_tok:,} tokens of {source}; step {meta.get('step', '?')}, "
          f"{math.log(tok.vocab_size):.2f} = uniform guess)")
    return 0


def add_parser(sub) -> None:
    choices = sorted(PRESETS) + sorted(RECIPES)
    p = sub.add_parser(
        "train", help="train a model (default: tiny char GPT on python-docs, a few CPU minutes)",
        description="Train a GPT (objective=clm) or BERT-style (objective=mlm) model, evaluating every "
                    "eval_interval steps and saving a checkpoint, metrics.jsonl and loss.png to out_dir. "
                    "Every ModelConfig and TrainConfig field can be set with --key=value. "
                    "Run with torchrun for several processes/GPUs.",
        epilog=f"model options: {_field_help(ModelConfig)}.  train options: {_field_help(TrainConfig)}.  "
               "Recipes: " + "; ".join(f"{k} ({v['data']}, {v['train'].get('max_iters', TrainConfig.max_iters)} iters)"
                                       for k, v in RECIPES.items()) +
               ".  Examples: minillm train | minillm train --preset=shakespeare-char-cpu "
               "--data=input.txt | minillm train --objective=mlm --tokenizer=bpe --vocab_size=512 | "
               "minillm train --resume=true --max_iters=2000",
    )
    p.add_argument("--preset", default="python-docs-char", choices=choices, metavar="NAME",
                   help="model preset or training recipe (default: python-docs-char, the tiny preset with "
                        f"sinusoidal positions on python-docs): {', '.join(choices)}")
    p.add_argument("--data", default=None,
                   help="python-docs (default, offline), shakespeare (downloaded once), or a .txt file/folder")
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
    e.add_argument("--split", default="val", choices=("val", "train"), help="which split (default: val)")
    e.set_defaults(func=cmd_eval)
