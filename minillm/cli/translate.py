"""`minillm translate`: a sentence through a Seq2Seq checkpoint (greedy or beam search).

    minillm translate out "3 March 2021"
    minillm translate out-multi30k "ein Hund läuft durch das Gras" --beam=4 --length_penalty=0.6
    minillm translate out "..." --beam=4 --length_penalty=1.0 --length_penalty_style=hf   (HF's alpha)
"""

from __future__ import annotations

from minillm.generate.beam import LENGTH_PENALTY_STYLES, translate
from minillm.hardware import resolve_device
from minillm.weights.checkpoint import TOKENIZER_FILE, check_finite_forward, find_checkpoint, load_model


def cmd_translate(args, overrides: list[str]) -> int:
    if overrides:
        raise ValueError(f"unknown option {overrides[0].split('=')[0]}; translate takes --beam, --length_penalty, "
                         "--length_penalty_style, --max_new_tokens, --device")
    check_beam_options(args)
    folder = find_checkpoint(args.checkpoint)
    model, tok, meta = load_model(folder, device=resolve_device(args.device))
    check_finite_forward(model, folder)
    if "seq2seq" not in meta:
        raise ValueError(f"{folder} is a language model, not a translation model; use `minillm generate`, or "
                         "train one with `minillm train --objective=seq2seq`")
    if tok is None:
        raise FileNotFoundError(f"{folder / TOKENIZER_FILE}: missing, so the sentence cannot be encoded")
    for line in translate(model, tok, args.text, beam_size=args.beam, alpha=args.length_penalty,
                          max_new_tokens=args.max_new_tokens, length_penalty_style=args.length_penalty_style):
        print(line)
    return 0


def check_beam_options(args) -> None:
    """--beam, --length_penalty, --length_penalty_style (and --max_new_tokens, --max_sentences where the
    command has them), checked before any checkpoint is read. (A NaN is refused by minillm.cli.main.)"""
    if args.beam < 1:
        raise ValueError(f"--beam must be >= 1 (1 = greedy), got {args.beam}")
    if args.length_penalty < 0:
        raise ValueError(f"--length_penalty must be >= 0, got {args.length_penalty}")
    if getattr(args, "max_new_tokens", None) is not None and args.max_new_tokens < 1:
        raise ValueError(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
    if getattr(args, "max_sentences", None) is not None and args.max_sentences < 1:
        raise ValueError(f"--max_sentences must be >= 1, got {args.max_sentences}")
    if args.length_penalty_style not in LENGTH_PENALTY_STYLES:
        raise ValueError(f"--length_penalty_style must be gnmt (((5+|Y|)/6)^alpha) or hf (|Y|^alpha, as Hugging "
                         f"Face's generate), got {args.length_penalty_style!r}")


def add_beam_options(p, prefix: str = "") -> None:
    """The beam-search options, shared by `translate` and `eval` (prefix: a word before each help text)."""
    p.add_argument("--beam", type=int, default=1, help=f"{prefix}beam size (1 = greedy, the default; the paper uses 4)")
    p.add_argument("--length_penalty", type=float, default=0.6,
                   help=f"{prefix}length-penalty alpha for beam search (default 0.6, the paper's GNMT value)")
    p.add_argument("--length_penalty_style", default="gnmt", metavar="gnmt|hf",
                   help=f"{prefix}gnmt (default): lp = ((5+|Y|)/6)^alpha, as GNMT; hf: lp = |Y|^alpha, as Hugging "
                        "Face's generate(length_penalty=alpha). The same alpha means different things in the two")


def add_parser(sub) -> None:
    p = sub.add_parser("translate", help="translate sentences with a Seq2Seq checkpoint (greedy or beam search)",
                       description="Translate each TEXT with an encoder–decoder trained by "
                                   "`minillm train --objective=seq2seq`; one output line per input.")
    p.add_argument("checkpoint", help="checkpoint folder or a run's out_dir")
    p.add_argument("text", nargs="+", help="sentence(s) to translate")
    add_beam_options(p)
    p.add_argument("--max_new_tokens", type=int, default=None, help="longest output (default: block_size - 1)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    p.set_defaults(func=cmd_translate)
