"""`minillm generate`: load a checkpoint and continue prompts, streaming text to the terminal.

    minillm generate out --prompt="def " --max_new_tokens=300 --temperature=0.8 --top_k=200
    minillm generate out --prompt=ROMEO: --num_samples=3 --seed=7 --escapes --stop='\\n\\n'
    minillm generate out-instruct --prompt="Reverse the following word." --input=tiger --temperature=0

A model from `minillm finetune --task=instruct` (its config has an "instruct" record) takes each prompt
as an instruction: wrapped in its training template, stopped at its end marker, and only the response is
printed. --raw continues the prompt text as it is instead.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from minillm.cli.run_options import add_run_options, flat_decode, load_options, set_threads
from minillm.weights.checkpoint import TOKENIZER_FILE, check_finite_forward, find_checkpoint, load_model
from minillm.data.chat_template import chat_prompt_for
from minillm.finetune.instruct import format_prompt
from minillm.generate.flat import decode_steps
from minillm.generate.sampling import generate_text
from minillm.generate.speculative import speculative_text
from minillm.hardware import resolve_device, resolve_dtype
from minillm.model.builtin_ops import for_inference
from minillm.model.config import ModelConfig, split_overrides


def cmd_generate(args, overrides: list[str]) -> int:
    """Load a checkpoint and continue prompts, streaming the text to the terminal."""
    (model_changes,) = split_overrides(overrides, ModelConfig)  # e.g. --attention=sdpa
    threads = set_threads(args)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device, allow_cpu_half=True)
    folder = find_checkpoint(args.out_dir)  # a checkpoint folder, or a run's newest complete one
    # a GGUF file keeps its quantized blocks unless --dequantize; --backend picks their matmul
    model, tok, meta = load_model(folder, device=device, **load_options(args, device), **model_changes)
    check_finite_forward(model, folder)
    if "seq2seq" in meta:
        raise ValueError(f"{folder} is an encoder–decoder (translation) model; use `minillm translate {args.out_dir} "
                         "\"...\"`")
    if tok is None:
        raise FileNotFoundError(f"{folder / TOKENIZER_FILE}: missing, so the prompt cannot be encoded")
    if dtype != torch.float32:
        model = model.to(dtype)
    if not args.readable:
        # PyTorch's fused norms, activations and attention: the same function, faster (an explicit
        # --attention=... is kept as asked)
        for_inference(model, attention="attention" not in model_changes)
    prompts = []
    for p in args.prompt or ["\n"]:
        if p.startswith("FILE:"):  # nanoGPT's convention for long prompts
            p = Path(p[5:]).read_text(encoding="utf-8")
        prompts.append(_unescape(p) if args.escapes else p)
    stop, instruct = list(args.stop or []), meta.get("instruct") if not args.raw else None
    if instruct:  # an instruction-tuned model: prompt in its template, stop where its responses end
        given = _unescape(args.input) if args.escapes else args.input
        prompts = [format_prompt(p, given, instruct["template"], tok) for p in prompts]
        stop.append(instruct["end"])
    if args.chat:  # the model's own chat template (GGUF / HF tokenizer_config.json): each prompt is a user turn
        rendered = [chat_prompt_for(tok, ([{"role": "system", "content": args.system}] if args.system else [])
                                    + [{"role": "user", "content": p}]) for p in prompts]
        if rendered[0] is None:
            raise ValueError(f"{folder} has no chat template; --chat needs an instruct model that ships one "
                             "(a GGUF file or a Hugging Face folder), e.g. smollm2-135m-instruct")
        prompts, instruct = [text for text, _ in rendered], True
        stop += rendered[0][1]
    shown = (lambda p: "") if instruct else (lambda p: p)  # the template is not the user's text: print the answer only
    rows = [p for p in prompts for _ in range(args.num_samples)]
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    kw = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
              use_cache=not args.no_cache, generator=gen, stop=stop, window_stride=args.window_stride,
              flat_decode=flat_decode(args, args.readable))
    text_fn, stats = generate_text, {}
    if args.speculative:  # each row alone (batch size 1), the same keyword arguments but use_cache
        kw = dict({k: v for k, v in kw.items() if k != "use_cache"}, k=args.draft_k, stats=stats,
                  draft=_draft(args, tok, device, dtype))
        text_fn = speculative_text
    t0, n_tokens, counts = time.perf_counter(), 0, []
    if args.batch and len(rows) > 1:
        # all rows in one left-padded batch: faster, printed when done
        texts = generate_text(model, tok, rows, args.max_new_tokens, **kw, token_counts=counts)
        for i, (p, t) in enumerate(zip(rows, texts)):
            print(f"--- sample {i + 1} ---\n{shown(p)}{t}")
        n_tokens = sum(counts)
    else:
        for i, p in enumerate(rows):
            if len(rows) > 1:
                print(f"--- sample {i + 1} ---")
            print(shown(p), end="", flush=True)
            [t] = text_fn(model, tok, [p], args.max_new_tokens, **kw, token_counts=counts,
                          stream=lambda _, piece: print(piece, end="", flush=True))
            print()
            n_tokens += counts[0]
    dt = time.perf_counter() - t0
    print(f"[{n_tokens} tokens in {dt:.2f} s, {n_tokens / dt:.1f} tokens/s on {device}, "
          f"{'no ' if args.no_cache else ''}KV cache, {threads} thread{'s' if threads != 1 else ''}; "
          f"{decode_steps(model, kw['flat_decode']) if not args.no_cache else 'no decode steps'}; "
          f"{_source(meta, model)}]",
          file=sys.stderr)
    if args.speculative:
        print(f"[speculative decoding ({args.speculative}, k={args.draft_k}): {stats['accepted']} of "
              f"{stats['drafted']} guesses accepted ({stats['accepted'] / max(stats['drafted'], 1):.0%}), "
              f"{stats['tokens'] / max(stats['rounds'], 1):.2f} tokens per target forward]", file=sys.stderr)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser(
        "generate", help="sample text from a trained checkpoint (streams to the terminal)",
        description="Continue one or more prompts with a trained causal LM. Greedy when --temperature=0; "
                    "otherwise sampling with temperature, top-k and top-p (nucleus). Uses a KV cache "
                    "unless --no_cache. Prompts longer than the context are cropped to the last "
                    "block_size tokens; past block_size the context falls back by --window_stride tokens "
                    "and is re-prefilled into the cache (--window_stride=1: nanoGPT's sliding window). "
                    "An instruction-tuned checkpoint (minillm finetune --task=instruct) reads each --prompt "
                    "as an instruction: it is wrapped in the template the model was tuned with (--input "
                    "fills its Input section), generation stops at the model's end marker, and only the "
                    "response is printed; --raw turns this off and continues the prompt text as given.",
        epilog="examples: minillm generate out --prompt='def ' --max_new_tokens=300 --temperature=0.8 "
               "--top_k=200  |  minillm generate out --prompt=ROMEO: --num_samples=3 --seed=7 "
               "--escapes --stop='\\n\\n'  |  --prompt=FILE:prompt.txt reads the prompt from a file. "
               "ModelConfig fields that do not change the weights may be set, e.g. --attention=sdpa.")
    p.add_argument("out_dir", help="checkpoint folder written by minillm train")
    p.add_argument("--prompt", action="append", default=None,
                   help="text to continue (repeat for several prompts; default: a newline)")
    p.add_argument("--max_new_tokens", type=int, default=200, help="tokens to generate per sample (default 200)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy; <1 sharper, >1 more random")
    p.add_argument("--top_k", type=int, default=200, help="sample among the k most likely tokens (0 = all)")
    p.add_argument("--top_p", type=float, default=None, help="nucleus sampling: smallest set with mass ≥ p")
    p.add_argument("--num_samples", type=int, default=1, help="samples per prompt")
    p.add_argument("--seed", type=int, default=1337, help="sampling seed: same seed, same text")
    p.add_argument("--stop", action="append", default=None,
                   help="stop a sample when this string appears (repeatable; use --escapes for \\n)")
    p.add_argument("--input", default="",
                   help="instruction-tuned models: the context of the template's Input section (default none)")
    p.add_argument("--chat", action="store_true",
                   help="models with a chat template (instruct GGUF files, Hugging Face instruct folders): "
                        "each --prompt is a user message, formatted with the model's own template; "
                        "generation stops at its end-of-turn token and only the answer is printed")
    p.add_argument("--system", default=None, help="with --chat: a system message before each prompt")
    p.add_argument("--raw", action="store_true",
                   help="instruction-tuned models: continue the prompt as plain text, without the template")
    p.add_argument("--escapes", action="store_true", help="interpret \\n, \\t in --prompt, --input and --stop")
    p.add_argument("--no_cache", action="store_true", help="recompute the whole context every token")
    p.add_argument("--window_stride", type=int, default=None,
                   help="past block_size, re-prefill the last block_size-K+1 tokens every K tokens "
                        "(default block_size//4; 1 = nanoGPT's exact sliding window, slower)")
    p.add_argument("--batch", action="store_true", help="run all samples as one left-padded batch")
    p.add_argument("--speculative", default=None, metavar="draft:PATH|lookup",
                   help="speculative decoding, one row at a time: a smaller checkpoint with the same tokenizer "
                        "guesses --draft_k tokens (draft:PATH), or n-grams of the context do (lookup); the "
                        "target checks them in one forward. Same distribution; greedy: the same tokens")
    p.add_argument("--draft_k", type=int, default=4, help="tokens guessed per round with --speculative (default 4)")
    p.add_argument("--readable", action="store_true",
                   help="run minillm's written-out layers and modules (the code you read) instead of "
                        "PyTorch's fused norms, activations and attention and flat decode steps "
                        "(minillm/generate/flat.py): the same function, slower")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="weight precision for generation (bf16/fp16 on GPU)")
    add_run_options(p)  # --threads, --backend, --dequantize, --compile
    p.set_defaults(func=_checked_generate)


def _checked_generate(args, overrides):
    if args.max_new_tokens < 0 or args.num_samples < 1:
        raise ValueError("--max_new_tokens must be >= 0 and --num_samples >= 1")
    if args.top_k is not None and args.top_k <= 0:
        args.top_k = None  # 0 = no top-k filter
    if args.escapes and args.stop:
        args.stop = [_unescape(s) for s in args.stop]
    if args.speculative and not (args.speculative == "lookup" or args.speculative.startswith("draft:")):
        raise ValueError(f"--speculative must be draft:PATH or lookup, got {args.speculative!r}")
    if args.compile and (args.speculative or args.no_cache):
        raise ValueError("--compile compiles the cached one-token decode step: drop --speculative and --no_cache")
    if args.speculative and (args.batch or args.no_cache):
        raise ValueError("--speculative runs one row at a time through a KV cache: drop --batch and --no_cache")
    return cmd_generate(args, overrides)


def _draft(args, tok, device, dtype):
    """--speculative=lookup -> "lookup"; draft:PATH -> that checkpoint's model, if it has `tok`."""
    if args.speculative == "lookup":
        return "lookup"
    path = args.speculative[len("draft:"):]
    draft, draft_tok, _ = load_model(path, device=device)
    if draft_tok is None or draft_tok.to_dict() != tok.to_dict():
        raise ValueError(f"--speculative: the draft {path} has another tokenizer than the target; a draft must "
                         "share the target's tokenizer")
    draft = draft.to(dtype)
    return draft if args.readable else for_inference(draft)


def _unescape(text: str) -> str:
    """'\\n' and '\\t' typed in a shell -> newline and tab (other text untouched, unicode safe)."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


def _source(meta: dict, model) -> str:
    """Where the weights came from, for the closing line: a training step or a Hugging Face folder."""
    if "gguf" in meta:
        types = ", ".join(f"{n} {t}" for t, n in meta["gguf"]["tensor_types"].items())
        backends = sorted({m.backend for m in model.modules() if hasattr(m, "backend")})
        how = f"kept quantized, backend {', '.join(backends)}" if "kept" in meta["gguf"] else "run in fp32"
        return f"GGUF file, {meta['gguf'].get('name') or 'llama'} ({types} tensors, {how})"
    if "huggingface" in meta:
        return f"Hugging Face {meta['huggingface'].get('model_type', 'model')} folder"
    return f"checkpoint step {meta.get('step', '?')}"
