"""`minillm checkpoints OUT_DIR`: which checkpoints a run holds, and whether one is complete.

    minillm checkpoints out                 list them; exit 0 if one is complete, 1 if none is
    minillm checkpoints out --quiet         only the exit status (what sky/train.yaml asks before resuming)

A checkpoint is complete when its manifest.json lists every file with its size (minillm/weights/checkpoint.py);
`minillm train --resume=true` resumes from the newest complete one, by the same rule.
"""

from __future__ import annotations

from pathlib import Path

from minillm.cli.options import reject_unknown
from minillm.weights.checkpoint import CONFIG_FILE, is_complete, latest_checkpoint, step_folders, verify


def cmd_checkpoints(args, overrides: list[str]) -> int:
    """List a run's checkpoints, newest first; exit 0 when one is complete (resume would use it)."""
    reject_unknown(args, overrides, "checkpoints")
    out = Path(args.out_dir)
    if not out.exists():
        raise FileNotFoundError(f"{out} does not exist")
    folders = step_folders(out)
    if not folders and (out / CONFIG_FILE).exists():  # a single checkpoint folder, not a run
        folders = [(None, out)]
    latest = latest_checkpoint(out) if folders and folders[0][0] is not None else (out if is_complete(out) else None)
    if not args.quiet:
        for step, folder in folders:
            state = "complete" if is_complete(folder) else "incomplete (an interrupted save; ignored)"
            if args.verify and is_complete(folder):
                verify(folder)  # raises a one-line CheckpointError naming the changed file
                state = "complete, sha256 verified"
            mark = "  <- resume starts here" if folder == latest else ""
            print(f"{'step ' + str(step) if step is not None else 'checkpoint'}  {folder}  {state}{mark}")
        if not folders:
            print(f"{out}: no checkpoints")
    return 0 if latest is not None else 1


def add_parser(sub) -> None:
    p = sub.add_parser("checkpoints", help="list a run's checkpoints and whether they are complete",
                       description=cmd_checkpoints.__doc__ + " A checkpoint is complete when its "
                       "manifest.json (written last) lists every file with its size; an interrupted save "
                       "leaves an incomplete folder, which resume ignores.",
                       epilog="example: minillm checkpoints out  |  "
                              "minillm checkpoints /checkpoints/run --quiet && minillm train --resume=true ...")
    p.add_argument("out_dir", help="a training run's out_dir (or one checkpoint folder)")
    p.add_argument("--verify", action="store_true", help="also check every file's sha256 against the manifest")
    p.add_argument("--quiet", action="store_true", help="print nothing; the exit status says it")
    p.set_defaults(func=cmd_checkpoints)
