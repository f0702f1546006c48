"""`minillm chat MODEL`: talk to an instruct model in the terminal, in its own chat template.

    minillm chat smollm2-135m-instruct                    a pulled model (minillm pull ...)
    minillm chat path/to/model.gguf --system="Be brief."

Inside: /reset forgets the conversation, /system TEXT sets the system message (and resets),
/save FILE writes the conversation as JSON, /help lists these; Ctrl-C stops the answer being
written, Ctrl-D (or /quit) leaves. The conversation lives in minillm/generate/chat.py.
"""

from __future__ import annotations

import sys

from minillm.cli.options import reject_unknown
from minillm.cli.run_options import add_run_options, flat_decode, load_options, set_threads
from minillm.generate.chat import ChatSession
from minillm.hardware import resolve_device
from minillm.model.builtin_ops import for_inference
from minillm.weights.checkpoint import check_finite_forward, load_model
from minillm.weights.pull import resolve

HELP = ("/reset  forget the conversation   /system TEXT  set the system message   /save FILE  write it as "
        "JSON   /quit or Ctrl-D  leave   (Ctrl-C stops an answer)")


def cmd_chat(args, overrides: list[str]) -> int:
    """Chat with an instruct model, streaming its answers; the history is kept within its context."""
    reject_unknown(args, overrides, "chat")
    path = resolve(args.model)
    changes = {"block_size": args.block_size} if args.block_size else {}
    threads = set_threads(args)
    device = resolve_device(args.device)
    # a GGUF file keeps its quantized blocks unless --dequantize; --backend picks their matmul
    model, tokenizer, _ = load_model(path, device=device, **load_options(args, device), **changes)
    check_finite_forward(model, path)
    for_inference(model)
    session = ChatSession(model, tokenizer, system=args.system, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                          flat_decode=flat_decode(args))
    print(f"chatting with {path.name} (context {model.cfg.block_size} tokens, {threads} "
          f"thread{'s' if threads != 1 else ''}). {HELP}", file=sys.stderr)
    while True:
        try:
            line = input("you> ")
        except EOFError:  # Ctrl-D
            print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh line, not an exit
            print(file=sys.stderr)
            continue
        if not line.strip():
            continue
        if line.startswith("/"):
            if _command(session, line.strip()):
                return 0
            continue
        _answer(session, line)


def _command(session: ChatSession, line: str) -> bool:
    """Run a /command; True means leave."""
    name, _, rest = line.partition(" ")
    if name in ("/quit", "/exit"):
        return True
    if name == "/reset":
        session.reset()
        print("(conversation reset)", file=sys.stderr)
    elif name == "/system":
        session.system = rest.strip() or None
        session.reset()
        print(f"(system message {'set' if session.system else 'cleared'}; conversation reset)", file=sys.stderr)
    elif name == "/save" and rest.strip():
        session.save(rest.strip())
        print(f"(saved {len(session.conversation())} messages to {rest.strip()})", file=sys.stderr)
    else:
        print(HELP, file=sys.stderr)
    return False


def _answer(session: ChatSession, line: str) -> None:
    print("model> ", end="", flush=True)
    stopped = False
    try:
        session.reply(line, stream=lambda piece: print(piece, end="", flush=True))
    except KeyboardInterrupt:
        stopped = True
    except ValueError as e:  # e.g. a message longer than the context: say so and go on chatting
        session.messages = session.messages[:-1]
        print(f"\n(error: {e})", file=sys.stderr)
        return
    print()
    if session.dropped:
        print(f"(dropped the {session.dropped} oldest messages to fit the context)", file=sys.stderr)
    rate = session.last_tokens / session.last_seconds if session.last_seconds else 0.0
    print(f"[{'stopped, ' if stopped else ''}{session.last_tokens} tokens, {rate:.1f} tokens/s]", file=sys.stderr)


def add_parser(sub) -> None:
    p = sub.add_parser("chat", help="chat with an instruct model in the terminal (its own chat template)",
                       description=cmd_chat.__doc__ + " The model's chat template (from its GGUF file or "
                       "Hugging Face folder) formats the conversation; the oldest turns are dropped when "
                       "it outgrows the context window, and the session says so. " + HELP,
                       epilog="example: minillm pull smollm2-135m-instruct && minillm chat smollm2-135m-instruct")
    p.add_argument("model", help="a pulled model's name, a .gguf file, or a Hugging Face folder with a chat template")
    p.add_argument("--system", default=None, help="the system message (default: the template's own, if any)")
    p.add_argument("--max_new_tokens", type=int, default=256, help="longest answer, in tokens (default 256)")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
    p.add_argument("--top_p", type=float, default=0.9, help="nucleus sampling (default 0.9)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--block_size", type=int, default=2048,
                   help="context window to keep, in tokens (default 2048; the model's own may be longer, "
                        "and each token of context costs KV-cache memory)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    add_run_options(p)  # --threads, --backend, --dequantize, --compile
    p.set_defaults(func=_checked_chat)


def _checked_chat(args, overrides):
    if args.max_new_tokens < 1 or args.block_size < 2:
        raise ValueError("--max_new_tokens must be >= 1 and --block_size >= 2")
    if not (0.0 <= args.temperature < float("inf")):
        raise ValueError(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if not (0.0 < args.top_p <= 1.0):
        raise ValueError(f"--top_p must be in (0, 1], got {args.top_p}")
    return cmd_chat(args, overrides)
