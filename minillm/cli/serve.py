"""`minillm serve CHECKPOINT ...`: serve trained models over HTTP, many clients batched together.

    minillm serve out/shakespeare --port=8000
    minillm serve shakespeare=out/shakespeare docs=out --admin-key=$ADMIN   several models, hot updates
    curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' \
         -d '{"prompt": "ROMEO:", "max_tokens": 50, "temperature": 0.8}'
    curl -s localhost:8000/admin/models/docs -H "Authorization: Bearer $ADMIN" \
         -H 'Content-Type: application/json' -d '{"path": "out-v2"}'        switch docs to a new version

The layers, each in its own file:
    minillm/generate/batching.py   the continuous-batching engine: one thread, one KV cache of
                                   max_batch_size rows, requests joining and leaving between steps
    minillm/serve/registry.py      models and their versions: load, warm up, switch, roll back
    minillm/serve/api.py           the FastAPI app: OpenAI-compatible /v1/completions and
                                   /v1/chat/completions (+ streaming), /v1/models, /admin, /health,
                                   /metrics; validation, errors, the queue's 429s
    minillm/serve/limits.py        header/body timeouts, connection cap, quiet logs
    this file                      the command line: load the checkpoints, build the app, run uvicorn

The OpenAI Python client works against it: OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=...).
This file imports FastAPI and uvicorn only when the command runs, so `minillm --help` works without
the [serve] extra installed.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from minillm.cli.run_options import add_run_options, load_options, set_threads
from minillm.weights.checkpoint import TOKENIZER_FILE, find_checkpoint, load_model
from minillm.hardware import resolve_device, resolve_dtype
from minillm.model.config import ModelConfig, split_overrides


def cmd_serve(args, overrides: list[str]) -> int:
    """Serve checkpoints over HTTP: OpenAI-style completions and chat, with continuous batching."""
    try:
        import uvicorn
    except ImportError as e:
        raise ImportError(f"minillm serve needs uvicorn: pip install 'minillm[serve]' ({e})") from e

    from minillm.model.builtin_ops import for_inference
    from minillm.weights.huggingface import is_hf_folder
    from minillm.serve.api import build_app
    from minillm.serve.limits import freeze_startup_heap, quiet_server_logs, server_options
    from minillm.serve.metrics import setup_access_log
    from minillm.serve.registry import Registry

    (changes,) = split_overrides(overrides, ModelConfig)  # e.g. --attention=sdpa
    # on a small, shared CPU one thread can beat two: tiny matmuls spend more time synchronising
    # threads than computing (--threads; default PyTorch's, one per physical core)
    threads = set_threads(args)
    device = resolve_device(args.device or "auto")
    dtype = resolve_dtype(args.dtype, device, allow_cpu_half=True)

    def load(folder):  # float or quantized checkpoint, or a Hugging Face folder
        # a GGUF file keeps its quantized blocks unless --dequantize; --backend picks their matmul
        model, tokenizer, meta = load_model(folder, device=device, **load_options(args, device), **changes)
        model = model.to(dtype=dtype)
        if not args.readable:  # PyTorch's fused norms, activations and attention: same function, faster
            for_inference(model, attention="attention" not in changes)
        return model, tokenizer, meta

    _check_limits(args)
    registry = Registry(load, args.max_batch_size, args.max_queue, args.seed, flat_decode=not args.readable,
                        max_models=args.max_models)
    specs = _model_specs(args.checkpoints, args.model_name)
    for name, path in specs:
        folder = path if is_hf_folder(path) else find_checkpoint(path)  # a run's newest complete checkpoint
        model, tokenizer, meta = load(folder)
        if tokenizer is None:
            raise FileNotFoundError(f"{Path(folder) / TOKENIZER_FILE}: missing; serving needs the tokenizer "
                                    "(text in, text out)")
        # (make_version runs a short forward pass first: a checkpoint with NaN weights stops here)
        registry.add(registry.make_version(name, model, tokenizer, meta, str(folder), start=False))
    # the admin API loads only from here: by default the folder that holds the first model
    models_root = Path(args.models_root or Path(specs[0][1]).resolve().parent).resolve()
    api_key = args.api_key or os.environ.get("MINILLM_API_KEY") or None
    admin_key = args.admin_key or os.environ.get("MINILLM_ADMIN_KEY") or None
    # --cors-origin is repeatable and each may be a comma-separated list
    origins = [o.strip() for value in args.cors_origin or [] for o in value.split(",") if o.strip()]
    setup_access_log(args.access_log)
    app = build_app(registry, api_key=api_key, seed=args.seed, cors_origins=origins, admin_key=admin_key,
                    models_root=models_root, body_timeout_s=args.body_timeout)
    for v in registry.versions():
        n_params = sum(p.numel() for p in v.model.parameters())
        print(f"minillm serve: {v.name} = {v.path} ({v.version}; {n_params / 1e6:.2f}M parameters, block_size "
              f"{v.block_size}{', instruction-tuned' if v.meta.get('instruct') else ''})", flush=True)
    print(f"on {device}/{args.dtype}, {threads} thread{'s' if threads != 1 else ''}; batch {args.max_batch_size}, "
          f"queue {args.max_queue} per model version, "
          f"API key {'required' if api_key else 'not required'}, admin API {'on' if admin_key else 'off'}; "
          f"CORS {', '.join(origins) if origins else 'off'}; access log {args.access_log}", flush=True)
    if admin_key:
        print(f"admin API loads checkpoints from {models_root} only; up to {args.max_models} models", flush=True)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print("warning: listening beyond localhost without an API key; anyone who can reach the "
              "port can use the model (set --api-key or MINILLM_API_KEY)", flush=True)
    quiet_server_logs()
    freeze_startup_heap()  # models and libraries stay out of every later GC pass (serve/limits.py)
    # header deadline, keep-alive, connection cap; uvicorn's access log off (ours is one JSON line)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                **server_options(args.max_connections, args.header_timeout))
    return 0


def _check_limits(args) -> None:
    """The limits must be positive: a bad value fails at start-up, in one line."""
    for flag in ("max_models", "max_connections", "header_timeout", "body_timeout"):
        value = getattr(args, flag)
        if not value > 0:  # (also refuses NaN)
            raise ValueError(f"--{flag} must be positive, got {value}")


def _model_specs(checkpoints: list[str], model_name: str | None) -> list[tuple[str, str]]:
    """[(name, path)] from `PATH` or `NAME=PATH` words; a bare PATH is named --model-name or its folder."""
    specs = []
    for word in checkpoints:
        name, sep, path = word.partition("=")
        if not sep:
            name, path = (model_name if len(checkpoints) == 1 and model_name else Path(word).resolve().name), word
        if not name or not path:
            raise ValueError(f"{word!r}: give a checkpoint as PATH or NAME=PATH")
        specs.append((name, path))
    names = [n for n, _ in specs]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise ValueError(f"model name {dup!r} is given twice; name each checkpoint (NAME=PATH)")
    return specs


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" to an option's help unless the help already says what the default is."""

    def _get_help_string(self, action):
        help = action.help or ""
        if "default" in help or action.default is None or action.default is False \
                or action.default is argparse.SUPPRESS:
            return help
        return super()._get_help_string(action)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "serve", help="serve checkpoints over HTTP (OpenAI-compatible completions and chat, batching)",
        description=cmd_serve.__doc__ + " Endpoints: POST /v1/completions (prompt, max_tokens, temperature, "
        "top_p, top_k, stop, n, seed, stream); POST /v1/chat/completions (messages, the same fields); "
        "GET /v1/models; GET /health; GET /metrics (Prometheus); with --admin-key: GET /admin/models/NAME, "
        "POST /admin/models/NAME {\"path\": ..., \"create\": false} (switch NAME to a checkpoint under "
        "--models_root), POST /admin/models/NAME/rollback. Concurrent requests are decoded together, up to "
        "--max_batch_size rows; up to --max_queue more wait, beyond that requests get 429 + Retry-After. A "
        "prompt longer than block_size - max_tokens tokens is cropped to its last block_size - max_tokens "
        "tokens. Model options that do not change the weights are --key=value, e.g. --attention=sdpa.",
        formatter_class=_HelpFormatter)
    p.add_argument("checkpoints", nargs="+", metavar="[NAME=]CHECKPOINT",
                   help="one or more models: a checkpoint or run folder (or Hugging Face folder), optionally "
                        "named (NAME=PATH); requests choose one with \"model\" (default: the first)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 to accept remote clients")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--max_batch_size", "--max-batch-size", type=int, default=16,
                   help="completions decoded together (KV cache rows)")
    p.add_argument("--max_queue", "--max-queue", type=int, default=64,
                   help="requests allowed to wait for a row; more are refused with 429")
    p.add_argument("--api-key", "--api_key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $MINILLM_API_KEY, else none; "
                        "prefer the variable: command lines are visible to other users in ps)")
    p.add_argument("--admin-key", "--admin_key", default=None,
                   help="turn on the model update API (POST /admin/models/NAME {\"path\": ...}, .../rollback) behind "
                        "'Authorization: Bearer ADMIN_KEY' (default: $MINILLM_ADMIN_KEY, else off)")
    p.add_argument("--access-log", "--access_log", default="json", choices=["json", "off"],
                   help="one JSON line per request on stderr: request id, model, version, tokens, latency, status")
    p.add_argument("--cors-origin", "--cors_origin", action="append", default=None, metavar="ORIGIN",
                   help="let web pages from ORIGIN (e.g. http://localhost:3000; '*' for any) call the API "
                        "from a browser; repeat it or separate origins by commas (default: none)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weights and KV cache precision (bfloat16 halves memory on a GPU)")
    p.add_argument("--models_root", "--models-root", default=None, metavar="DIR",
                   help="the admin API loads checkpoints from inside DIR only (symlinks out refused) "
                        "(default: the folder that holds the first CHECKPOINT)")
    p.add_argument("--max_models", "--max-models", type=int, default=8,
                   help="model names the admin API may grow the server to (each holds up to two versions)")
    p.add_argument("--max_connections", "--max-connections", type=int, default=8192,
                   help="open connections; past it, requests get 503 and their connection is closed")
    p.add_argument("--header_timeout", "--header-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="a request's headers must arrive within this of the connection opening (or of "
                        "the previous answer), else the connection is closed")
    p.add_argument("--body_timeout", "--body-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="a request's body must arrive within this of its headers, else 408")
    p.add_argument("--model-name", "--model_name", default=None,
                   help="id in /v1/models and responses (default: the checkpoint folder's name)")
    add_run_options(p, compile=False)  # --threads, --backend, --dequantize
    p.add_argument("--seed", type=int, default=0, help="seed for sampling requests that give none")
    p.add_argument("--readable", action="store_true",
                   help="serve with minillm's written-out layers and modules instead of PyTorch's fused "
                        "norms, activations and attention and flat decode steps: the same function, slower")
    p.add_argument("--log-level", "--log_level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's own log level (requests are logged by --access-log)")
    p.set_defaults(func=cmd_serve)
