"""The `minillm` command line.

    minillm info --preset gpt2            parameters, FLOPs per token, weight memory
    minillm <command> --help              what each command does and takes

Options that configure the model or the run are `--key=value`, checked against the config
dataclasses' fields and types; an unknown key is an error suggesting the closest names.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
from contextlib import contextmanager

from minillm.cli.options import check_finite_options, describe_os_error


# One module per command (train and eval share one), in pipeline order. Each has `add_parser(sub)`,
# which adds its subparser and sets `func(args, overrides) -> exit code`. A command parses, calls
# the library, prints: the work itself is in minillm's other folders.
COMMAND_MODULES: list[str] = [
    "minillm.cli.info",
    "minillm.cli.pull",
    "minillm.cli.data",
    "minillm.cli.train",
    "minillm.cli.finetune",
    "minillm.cli.checkpoints",
    "minillm.cli.generate",
    "minillm.cli.chat",
    "minillm.cli.translate",
    "minillm.cli.quantize",
    "minillm.cli.prune",
    "minillm.cli.distill",
    "minillm.cli.compress_report",
    "minillm.cli.export",
    "minillm.cli.serve",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minillm",
        description="minillm: a readable Transformer engine. Train, evaluate, generate, inspect.",
        epilog="Model and training options are --key=value (e.g. --n_layer=4). "
               "Run 'minillm COMMAND --help' for each command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    overrides = [r for r in rest if r.startswith("--") and "=" in r]
    stray = [r for r in rest if r not in overrides]
    if stray:
        parser.error(f"unrecognised arguments: {' '.join(stray)} (options are --key=value)")
    try:
        check_finite_options(args)
        with sigterm_as_interrupt(args.command != "serve"):  # (the server handles its own signals)
            return args.func(args, overrides) or 0
    except (ValueError, FileNotFoundError, ImportError) as e:
        # bad input, a missing file, or an optional extra not installed: the message says what to do
        print(f"minillm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the disk filled up, permission denied, ...: what and where, in one line
        print(f"minillm {args.command}: error: {describe_os_error(e)}", file=sys.stderr)
        return 1
    except RecursionError:  # a data file nested deeper than Python's parser goes
        print(f"minillm {args.command}: error: input nested too deeply to read (a JSON file thousands of "
              "levels deep?)", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: one line, not a traceback (`train` says more itself)
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"minillm {args.command}: interrupted{' by SIGTERM' if signum == signal.SIGTERM else ''}",
              file=sys.stderr)
        return 128 + signum


@contextmanager
def sigterm_as_interrupt(enabled: bool = True):
    """While the command runs, SIGTERM raises train.config.Terminated (a KeyboardInterrupt): what
    `docker stop`, Kubernetes and batch schedulers send then stops a run as Ctrl-C does, with the
    same one line and a checkpoint named. The previous handler comes back afterwards."""
    from minillm.train.config import Terminated

    def on_sigterm(signum, frame):
        raise Terminated(signum)

    installed, previous = False, None
    if enabled:
        try:
            previous, installed = signal.signal(signal.SIGTERM, on_sigterm), True
        except ValueError:  # not the main thread (an embedding program): leave signals alone
            pass
    try:
        yield
    finally:
        if installed:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main())
