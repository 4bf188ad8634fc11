"""Helpers every subcommand shares: error handling, JSON output, progress bars.

Nothing here imports torch: `infq --help` must stay fast.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from infq.errors import InfqError


def stderr_console() -> Console:
    return Console(stderr=True)


@contextmanager
def cli_errors() -> Iterator[None]:
    """Turn an InfqError into `error: ...` on stderr and exit code 2, with no traceback."""
    try:
        yield
    except InfqError as e:
        stderr_console().print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        raise typer.Exit(InfqError.exit_code) from None
    except KeyboardInterrupt:
        stderr_console().print("[yellow]interrupted[/]")
        raise typer.Exit(130) from None


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=None, default=str) + "\n")
    sys.stdout.flush()


def progress(quiet: bool = False) -> Progress:
    """A rich progress bar on stderr (so --json stdout stays clean); disabled when quiet."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=stderr_console(),
        disable=quiet,
        transient=False,
    )


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"
