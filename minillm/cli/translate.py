"""`minillm translate`: a sentence through a Seq2Seq checkpoint (greedy or beam search).

    minillm translate out "3 March 2021"
    minillm translate out-multi30k "ein Hund läuft durch das Gras" --beam=4 --length_penalty=0.6
"""

from __future__ import annotations

from minillm.weights.checkpoint import TOKENIZER_FILE, find_checkpoint, load_model
from minillm.generate.beam import translate
from minillm.hardware import resolve_device


def cmd_translate(args, overrides: list[str]) -> int:
    if overrides:
        raise ValueError(f"unknown option {overrides[0].split('=')[0]}; translate takes --beam, --length_penalty, "
                         "--max_new_tokens, --device")
    if args.beam < 1:
        raise ValueError(f"--beam must be >= 1 (1 = greedy), got {args.beam}")
    folder = find_checkpoint(args.checkpoint)
    model, tok, meta = load_model(folder, device=resolve_device(args.device))
    if "seq2seq" not in meta:
        raise ValueError(f"{folder} is a language model, not a translation model; use `minillm generate`, or "
                         "train one with `minillm train --objective=seq2seq`")
    if tok is None:
        raise FileNotFoundError(f"{folder / TOKENIZER_FILE}: missing, so the sentence cannot be encoded")
    for line in translate(model, tok, args.text, beam_size=args.beam, alpha=args.length_penalty,
                          max_new_tokens=args.max_new_tokens):
        print(line)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("translate", help="translate sentences with a Seq2Seq checkpoint (greedy or beam search)",
                       description="Translate each TEXT with an encoder–decoder trained by "
                                   "`minillm train --objective=seq2seq`; one output line per input.")
    p.add_argument("checkpoint", help="checkpoint folder or a run's out_dir")
    p.add_argument("text", nargs="+", help="sentence(s) to translate")
    p.add_argument("--beam", type=int, default=1, help="beam size (1 = greedy; the paper uses 4)")
    p.add_argument("--length_penalty", type=float, default=0.6, help="GNMT's alpha for beam search (paper: 0.6)")
    p.add_argument("--max_new_tokens", type=int, default=None, help="longest output (default: block_size - 1)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    p.set_defaults(func=cmd_translate)
