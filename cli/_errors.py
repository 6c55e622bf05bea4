"""One error path for every command: a :class:`~medtransfer.errors.MedTransferError` becomes its
message and its exit code (1 job failed, 2 bad usage, 3 weights missing); anything unexpected becomes
a short message naming the log file that holds the full traceback — never a raw traceback; a reader that
closes the pipe early (``| head``) ends the command quietly with 141."""
from __future__ import annotations

import os
import sys
import traceback
from datetime import datetime
from pathlib import Path
from typing import Any

import click
import typer
from rich.markup import escape
from typer.core import TyperGroup

from medtransfer.cli._console import console
from medtransfer.errors import MedTransferError

EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141
"""128 + SIGPIPE, as ``yes | head`` exits: the reader of the output (``| head``) closed it early."""


def log_dir() -> Path:
    return Path(os.environ.get("MEDTRANSFER_HOME", Path.home() / ".cache" / "medtransfer")) / "logs"


def _write_traceback(exc: BaseException) -> Path | None:
    path = log_dir() / f"error-{datetime.now().strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"medtransfer {' '.join(sys.argv[1:])}\n\n"
                        + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
        return path
    except OSError:
        return None


def report_error(exc: BaseException) -> int:
    """Print what went wrong; returns the exit code."""
    if isinstance(exc, MedTransferError):
        # escaped: a message may hold brackets ('pip install "medtransfer[ray]"') that Rich would take for markup
        console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, markup=True, soft_wrap=True)
        return exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        console.print("[bold red]interrupted[/]; outputs written so far are complete (rerun with --resume to continue).",
                      highlight=False)
        return EXIT_INTERRUPTED
    if isinstance(exc, BrokenPipeError):
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    logged = _write_traceback(exc)
    where = f"the full traceback is in {logged}" if logged else "the traceback could not be logged"
    console.print(f"[bold red]unexpected error:[/] {type(exc).__name__}: {exc}\n{where}; please report it "
                  "with that file.", highlight=False, markup=True, soft_wrap=True)
    return 1


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's final flush does not fail on the closed pipe
    (the recipe of Python's ``signal`` documentation)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


class ErrorHandlingGroup(TyperGroup):
    """The top-level command group; every (sub)command runs inside its ``invoke``."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, click.exceptions.Exit, click.exceptions.Abort, click.ClickException,
                SystemExit):
            raise
        except BaseException as exc:  # noqa: BLE001 - the one place that turns errors into exit codes
            raise typer.Exit(report_error(exc)) from None
