"""``medtransfer inspect DIR``: list what a DICOM folder holds and what is wrong with it."""
from __future__ import annotations

import json
from pathlib import Path

import typer


def inspect_command(
    directory: Path = typer.Argument(..., help="Folder to scan (searched recursively)."),
    json_output: bool = typer.Option(False, "--json", help="Print the full inventory as JSON instead of text."),
    decode: bool = typer.Option(
        False, "--decode", help="Also decode every image's pixel data to find corrupt or undecodable files (slower)."
    ),
) -> None:
    """List the patients, studies and series in a DICOM folder, and every problem found.

    For each series: modality, description, number of slices, image size, spacing, transfer
    syntax and photometric interpretation. Non-image objects (SR, RTSTRUCT, SEG, PR, DICOMDIR)
    are listed apart. Problems (unreadable or undecodable files, missing or duplicate slices,
    uneven spacing, mixed sizes or orientations) are reported one per line with the file path.
    Only headers are read unless --decode is given. Patient names and birth dates are never shown.

    Exits 0 when the folder was scanned (even if problems were found), 1 when it does not exist
    or holds no files.
    """
    from medtransfer.io.inventory import inventory, render_inventory

    if not directory.exists():
        typer.echo(f"Error: folder '{directory}' does not exist. Check the path.", err=True)
        raise typer.Exit(code=1)
    if not directory.is_dir():
        typer.echo(f"Error: '{directory}' is a file, not a folder. Pass the folder that holds it.", err=True)
        raise typer.Exit(code=1)
    inv = inventory(directory, decode_check=decode)
    if inv["counts"]["files"] == 0:
        typer.echo(f"Error: folder '{directory}' holds no files (hidden files are skipped).", err=True)
        raise typer.Exit(code=1)
    if json_output:
        typer.echo(json.dumps(inv, indent=2))
    else:
        typer.echo(render_inventory(inv))
