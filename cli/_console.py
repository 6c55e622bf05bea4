"""Consoles for the CLI's tables."""
from __future__ import annotations

import os
import sys

from rich.console import Console

console = Console(stderr=True)
"""Messages, warnings and summaries go to stderr; stdout carries only what scripts read (paths, JSON)."""

PIPE_WIDTH = 200
"""Width of tables written to a file or a pipe (rich would assume 80 columns and squeeze them)."""


def table_console() -> Console:
    """A stdout console: the terminal's width on a terminal; wide lines when piped or redirected."""
    if sys.stdout.isatty() or os.environ.get("COLUMNS"):
        return Console()
    return Console(width=PIPE_WIDTH)


def setup_logging(quiet: bool) -> None:
    """``medtransfer.*`` log lines on the stderr console (INFO, or WARNING when quiet)."""
    import logging

    from rich.logging import RichHandler

    root = logging.getLogger("medtransfer")
    root.handlers[:] = [RichHandler(console=console, show_path=False, show_time=False, markup=False)]
    root.setLevel(logging.WARNING if quiet else logging.INFO)
    root.propagate = False
