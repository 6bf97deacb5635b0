"""``python -m diffueraser_core batch SHOTLIST [options]``: many shots, networks loaded once, resumable.

SHOTLIST is a CSV file with a header row naming the columns ``video``, ``mask`` and ``output`` (in any order),
then one shot per row; relative paths are relative to the shot list's folder; blank rows and rows whose first
cell starts with ``#`` are skipped. Every option of ``remove`` applies to every shot (``--ray [ADDRESS]`` runs each
shot across a Ray cluster; without it the shots run one after another in this process).

Example ``shots.csv``::

    video,mask,output
    shot010/plate.mp4,shot010/mask,out/shot010.mp4
    shot020/plate.mov,shot020/mask.png,out/shot020

Faults: a shot that fails (bad file, wrong mask, out of memory, a lost cluster) is reported with its row and the
message, and the batch goes on; the summary lists every failure and the exit code is 1. Each output is written
atomically (temporary name, then rename) and recorded as done in the state file ``SHOTLIST.state.json`` (next to
the shot list; ``--state`` to choose another place) once it exists. Interrupting the batch (Ctrl-C) keeps the
finished shots; running the same command again skips every shot recorded done whose output still exists and
re-runs the rest (failed ones included). Exit codes: 0 all shots done, 1 a shot failed or the shot list is bad,
2 bad command line, 130 interrupted.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

from .errors import DiffuEraserError, InputError, Interrupted

log = logging.getLogger(__name__)

PROG = "python -m diffueraser_core batch"
COLUMNS = ("video", "mask", "output")
STATE_SUFFIX = ".state.json"
STATE_VERSION = 1


@dataclass
class ShotRow:
    line: int
    video: str
    mask: str
    output: str

    def label(self) -> str:
        return f"line {self.line} ({os.path.basename(self.video)} -> {self.output})"


def read_shot_list(path: str) -> List[ShotRow]:
    """Rows of a shot list with absolute paths; a clear ``InputError`` for every format problem."""
    where = f"{PROG}: shot list {path!r}"
    if not os.path.isfile(path):
        raise InputError(f"{where} does not exist")
    base = os.path.dirname(os.path.abspath(path))
    with open(path, newline="", encoding="utf-8-sig") as handle:
        rows = [(n, row) for n, row in enumerate(csv.reader(handle), start=1)]
    rows = [(n, [c.strip() for c in row]) for n, row in rows if any(c.strip() for c in row)]
    rows = [(n, row) for n, row in rows if not row[0].startswith("#")]
    if not rows:
        raise InputError(f"{where} is empty; it needs a header row 'video,mask,output' and one row per shot")
    line, header = rows[0]
    names = [h.lower() for h in header]
    missing = [c for c in COLUMNS if c not in names]
    unknown = [h for h in names if h not in COLUMNS]
    if missing or unknown or len(set(names)) != len(names):
        raise InputError(
            f"{where}: the header (line {line}) must name the columns video, mask, output once each; got {header}"
        )
    column = {c: names.index(c) for c in COLUMNS}
    shots: List[ShotRow] = []
    for line, row in rows[1:]:
        if len(row) != len(header) or any(not row[column[c]] for c in COLUMNS):
            raise InputError(f"{where}: line {line} needs {len(header)} non-empty cells ({', '.join(header)}), got {row}")
        paths = {c: os.path.normpath(os.path.join(base, os.path.expanduser(row[column[c]]))) for c in COLUMNS}
        shots.append(ShotRow(line, paths["video"], paths["mask"], paths["output"]))
    if not shots:
        raise InputError(f"{where} has a header but no shots")
    seen: Dict[str, int] = {}
    for shot in shots:
        if shot.output in seen:
            raise InputError(f"{where}: lines {seen[shot.output]} and {shot.line} write the same output {shot.output!r}")
        seen[shot.output] = shot.line
    inputs = {p: s.line for s in shots for p in (s.video, s.mask)}
    for shot in shots:
        if shot.output in inputs:
            raise InputError(
                f"{where}: line {shot.line} would overwrite the input {shot.output!r} (line {inputs[shot.output]})"
            )
    return shots


class BatchState:
    """The state file: one record per output (done / failed), rewritten atomically after every shot."""

    def __init__(self, path: str):
        self.path = path
        self.shots: Dict[str, dict] = {}
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as handle:
                    data = json.load(handle)
                self.shots = dict(data.get("shots", {}))
            except (OSError, ValueError, AttributeError) as exc:
                raise InputError(
                    f"{PROG}: state file {path!r} is unreadable ({exc}); delete it to start the batch over"
                ) from exc

    def is_done(self, shot: ShotRow) -> bool:
        record = self.shots.get(shot.output)
        return (
            record is not None
            and record.get("status") == "done"
            and record.get("video") == shot.video
            and record.get("mask") == shot.mask
            and os.path.exists(shot.output)
        )

    def record(self, shot: ShotRow, status: str, **extra) -> None:
        self.shots[shot.output] = {
            "status": status,
            "video": shot.video,
            "mask": shot.mask,
            "line": shot.line,
            "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            **extra,
        }
        self.save()

    def save(self) -> None:
        tmp = f"{self.path}.partial"
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump({"version": STATE_VERSION, "shots": self.shots}, handle, indent=1, sort_keys=True)
        os.replace(tmp, self.path)


def build_parser() -> argparse.ArgumentParser:
    from .cli import add_run_options

    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                epilog="SHOTLIST: CSV with a header row video,mask,output; see the README.")
    p.add_argument("shotlist", help="CSV file: header video,mask,output then one shot per row")
    p.add_argument("--state", default=None, help=f"state file (default: SHOTLIST{STATE_SUFFIX})")
    add_run_options(p)
    return p


@dataclass
class BatchResult:
    done: List[ShotRow]
    skipped: List[ShotRow]
    failed: List[tuple]  # (ShotRow, message)
    interrupted: bool = False

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        return 1 if self.failed else 0


def run_batch(args, stream=None, engine=None) -> BatchResult:
    """Run every shot of ``args.shotlist``; ``engine`` (a ``jobs`` engine) may be given to reuse loaded networks."""
    from .cli import _ProgressPrinter, _check_models, _default_models_dir, check_output, settings_from_args
    from .jobs import make_engine, read_shot, run_shot

    stream = stream or sys.stderr
    shots = read_shot_list(args.shotlist)
    state = BatchState(args.state or f"{args.shotlist}{STATE_SUFFIX}")
    settings = settings_from_args(args)
    printer = _ProgressPrinter(stream, args.quiet)
    result = BatchResult([], [], [])
    todo = []
    for shot in shots:
        if state.is_done(shot):
            result.skipped.append(shot)
            stream.write(f"[batch] {shot.label()}: done in an earlier run, skipped\n")
        else:
            todo.append(shot)
    if not todo:
        return result
    models_dir = args.models or _default_models_dir()
    found = _check_models(models_dir, args.prior_only, args.lora)
    own_engine = engine is None
    if engine is None:
        engine = make_engine(args, found, models_dir, printer)
    engine.set_printer(printer)
    try:
        for number, shot in enumerate(todo, start=1):
            stream.write(f"[batch] shot {number}/{len(todo)}: {shot.label()}\n")
            stream.flush()
            started = time.monotonic()
            try:
                target = check_output(args, shot.video, shot.mask, shot.output, f"{PROG} {shot.label()}")
                data = read_shot(shot.video, shot.mask, args, target, printer)
                run_shot(engine, data, target, settings, args, printer)
            except (KeyboardInterrupt, Interrupted):
                result.interrupted = True
                stream.write(
                    f"[batch] interrupted during {shot.label()}; {len(result.done) + len(result.skipped)} shot(s) "
                    f"are done and kept; run the same command again to resume\n"
                )
                break
            except Exception as exc:  # one shot's failure must not stop the others
                message = str(exc) if isinstance(exc, DiffuEraserError) else f"{type(exc).__name__}: {exc}"
                log.debug("shot %s failed", shot.label(), exc_info=True)
                state.record(shot, "failed", error=message)
                result.failed.append((shot, message))
                stream.write(f"[batch] FAILED {shot.label()}: {message}\n")
                continue
            state.record(shot, "done", frames=data.num_frames, seconds=round(time.monotonic() - started, 1))
            result.done.append(shot)
    finally:
        if own_engine:
            engine.close()
    return result


def main(argv: Optional[List[str]] = None, stream=None, engine=None) -> int:
    stream = stream or sys.stderr
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = run_batch(args, stream, engine)
    except DiffuEraserError as exc:
        stream.write(f"error: {exc}\n")
        return 1
    stream.write(
        f"[batch] {len(result.done)} done, {len(result.skipped)} skipped (done earlier), {len(result.failed)} failed"
        f"{', interrupted' if result.interrupted else ''}\n"
    )
    for shot, message in result.failed:
        stream.write(f"[batch]   FAILED {shot.label()}: {message}\n")
    stream.flush()
    return result.exit_code
