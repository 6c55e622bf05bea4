"""``medtransfer export``: a run's model as one ONNX or TorchScript file with its preprocessing contract.

Thin: parses options and calls :func:`medtransfer.inference.export.export_run`. Exit codes: 0 success;
1 the export failed; 2 bad usage.
"""
from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from medtransfer.errors import ConfigError, MedTransferError

console = Console(stderr=True)


def export_command(
    run_dir: Path = typer.Argument(..., help="Run directory written by 'medtransfer finetune' (holds model.pt)."),
    fmt: str = typer.Option("onnx", "--format", "-f", help="onnx (runs with onnxruntime alone) or torchscript."),
    out: Path = typer.Option(..., "--out", "-o", help="File to write, e.g. model.onnx or model.ts.pt."),
) -> None:
    """Export a run's model with its preprocessing contract (size, channels, window, mean/std, class
    names, operating point) in the file's metadata.

    The graph takes float32 images in [0, 1] after the run's window and resize, of shape (N, C, S, S)
    or (N, C, S, S, S) with any batch size N, normalises them itself and returns class probabilities
    (an ensemble's mean, in one graph). The contract is the 'medtransfer' metadata property (ONNX) or
    the extra file medtransfer.json (TorchScript).

    Examples:

      medtransfer export runs/demo --format onnx --out demo.onnx

      medtransfer export runs/demo --format torchscript --out demo.ts.pt
    """
    from medtransfer.inference.export import export_run

    try:
        path = export_run(run_dir, out, fmt.lower())
    except ConfigError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except MedTransferError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    typer.echo(str(path))
