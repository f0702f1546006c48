"""What every command does with an option it does not take: name it, and the close matches.

`minillm.cli.main` hands each command the `--key=value` words argparse did not recognise (the
model and training commands read them as config fields). Commands without config fields call
`reject_unknown`, so a typo is one line with a suggestion, never silently ignored.
"""

from __future__ import annotations

import difflib
import errno
import math


def reject_unknown(args, overrides: list[str], command: str) -> None:
    """Raise ValueError for the first `--key=value` this command does not take."""
    for arg in overrides:
        key = arg[2:].split("=", 1)[0].replace("-", "_")
        known = [k for k in vars(args) if k not in ("func", "command")]
        close = difflib.get_close_matches(key, known, n=2)
        hint = f"; did you mean {', '.join('--' + c for c in close)}?" if close else "; see --help"
        raise ValueError(f"unknown option --{key} for {command}{hint}")


def check_finite_options(args) -> None:
    """Raise ValueError for the first option whose value is a float that is NaN or infinite.

    argparse's `type=float` takes "nan" and "inf" as numbers; a NaN temperature or learning rate
    then trains a model of NaN weights without a word. (`--key=value` config fields are checked by
    parse_value, and again by their dataclasses.)"""
    for key, value in vars(args).items():
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"--{key} must be a finite number, got {v}")


def describe_os_error(e: OSError) -> str:
    """One line for an operating-system error: what failed, on which file, and for a full disk what to do.
    The file being written is left as it was: every checkpoint and data file goes through atomic_write."""
    where = f" writing {e.filename}" if getattr(e, "filename", None) else ""
    if e.errno == errno.ENOSPC:
        return (f"no space left on the device{where}; the files already there (the previous checkpoint "
                "included) are intact. Free some space and run the command again")
    if e.errno == errno.EDQUOT:
        return f"disk quota exceeded{where}; the files already there are intact"
    what = e.strerror or str(e)
    return f"{what}{f' ({e.filename})' if getattr(e, 'filename', None) else ''}"
