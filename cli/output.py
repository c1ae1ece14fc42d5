"""The CLI's one way to report: `emit` (exactly one JSON object on stdout with --json, else the
human text), `stdout_to_stderr` (while a --json command runs, whatever anything prints on stdout
goes to stderr) and `progress` (a rich bar on stderr, only when it is a terminal).
It imports nothing of cli/."""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager, redirect_stdout
from typing import Any

import typer


def emit(data: dict[str, Any], as_json: bool, human: str) -> None:
    """With as_json: data as one JSON line on stdout (values JSON does not know as str); else human."""
    if as_json:
        sys.stdout.write(json.dumps(data, default=str) + "\n")
        sys.stdout.flush()
    else:
        typer.echo(human)


@contextmanager
def stdout_to_stderr(enabled: bool):
    """While a --json job runs, whatever anything prints on stdout (Python or C) goes to stderr."""
    if not enabled:
        yield
        return
    real = sys.stdout
    try:
        fd_out, fd_err = real.fileno(), sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (e.g. a test runner's buffer)
        fd_out = fd_err = None
    real.flush()
    saved = os.dup(fd_out) if fd_out is not None else None
    if saved is not None:
        os.dup2(fd_err, fd_out)
    try:
        with redirect_stdout(sys.stderr):
            yield
    finally:
        real.flush()
        sys.stderr.flush()
        if saved is not None:
            os.dup2(saved, fd_out)
            os.close(saved)


@contextmanager
def progress(enabled: bool, label: str):
    """Yields a callback(done, total, text); a rich bar on stderr only when it is a terminal."""
    if not (enabled and sys.stderr.isatty()):
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                  console=Console(stderr=True), transient=False) as prog:
        task = prog.add_task(label, total=None, info="")

        def cb(done: int, total: int, info: str = "") -> None:
            prog.update(task, completed=done, total=total or None, info=info)  # total 0: a stage, not a count

        yield cb
