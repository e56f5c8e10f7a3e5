"""One look for every long-running loop: a rich progress bar that stays quiet when asked to."""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def make_progress(*extra_columns, disable: bool = False, console: Console | None = None) -> Progress:
    """A rich Progress with the columns used across the project; `extra_columns` go on the right.

    Output goes to stderr so that stdout stays clean for results (`exported: PATH`, tables).
    """
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        *extra_columns,
        console=console or Console(file=sys.stderr),
        disable=disable,
        transient=False,
    )


@contextmanager
def progress_task(description: str, total: int | None, disable: bool = False) -> Iterator:
    """`with progress_task("encode", n) as advance: advance(batch)` for the simple one-bar case."""
    with make_progress(disable=disable) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n=1: progress.advance(task, n)
