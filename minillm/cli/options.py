"""What every command does with an option it does not take: name it, and the close matches.

`minillm.cli.main` hands each command the `--key=value` words argparse did not recognise (the
model and training commands read them as config fields). Commands without config fields call
`reject_unknown`, so a typo is one line with a suggestion, never silently ignored.
"""

from __future__ import annotations

import difflib


def reject_unknown(args, overrides: list[str], command: str) -> None:
    """Raise ValueError for the first `--key=value` this command does not take."""
    for arg in overrides:
        key = arg[2:].split("=", 1)[0].replace("-", "_")
        known = [k for k in vars(args) if k not in ("func", "command")]
        close = difflib.get_close_matches(key, known, n=2)
        hint = f"; did you mean {', '.join('--' + c for c in close)}?" if close else "; see --help"
        raise ValueError(f"unknown option --{key} for {command}{hint}")
