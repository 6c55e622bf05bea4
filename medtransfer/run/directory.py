"""The run directory: the one place that decides what is written where, when, and by which rank.

* ``config.yaml`` — once, before training, with every ``auto`` resolved;
* ``last.pt`` — the resumable state, every epoch;
* ``model.pt``, ``metrics.json`` — once, at the end;
* ``history.csv``, ``split_report.json``, ``load_report.json`` — as the run goes.

Every write is atomic (:mod:`medtransfer.utils.atomic`); only the main rank of a ``torchrun`` job
writes. A folder that already holds files is refused unless the run resumes it or ``overwrite``
replaces it (so a failed run never leaves a config that does not match another run's model).
"""
from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from medtransfer.errors import DataError, UsageError
from medtransfer.run.checkpoint import LAST_FORMAT, OLD_LAST_FORMATS, CheckpointError, read_checkpoint
from medtransfer.utils.atomic import save_torch_atomic, write_csv_atomic, write_json_atomic, write_text_atomic

logger = logging.getLogger(__name__)

RUN_FILES = ("model.pt", "last.pt", "config.yaml", "metrics.json")
"""Files that mark a folder as a medtransfer run directory."""


def default_run_dir(name: str) -> Path:
    """``runs/<timestamp>-<name>``."""
    return Path("runs") / f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-{name}"


class RunDirectory:
    """Writes one run's files. ``main=False`` (a non-zero torchrun rank) makes every write a no-op."""

    def __init__(self, path: str | os.PathLike[str], main: bool = True):
        self.path = Path(path)
        self.main = main
        self._written: set[str] = set()

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    # ---- opening ----------------------------------------------------------------------------
    def open_new(self, overwrite: bool = False) -> "RunDirectory":
        """Create the folder for a new run; refuse one that already holds files unless ``overwrite``
        (then an earlier run's files are removed first)."""
        if not self.main:
            return self
        entries = sorted(p.name for p in self.path.iterdir()) if self.path.is_dir() else []
        if entries and not overwrite:
            raise UsageError(
                f"The run directory '{self.path}' is not empty ({', '.join(entries[:5])}"
                f"{', …' if len(entries) > 5 else ''}). Pass --resume {self.path} to continue that run, "
                "--overwrite to replace it, or another --out.")
        if entries:
            if not any(name in entries for name in RUN_FILES):
                raise UsageError(f"--overwrite refused: '{self.path}' holds files but is not a medtransfer run "
                                "directory (no model.pt, last.pt, config.yaml or metrics.json); choose a new --out.")
            logger.warning("--overwrite: removing the earlier run in %s", self.path)
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        return self

    def load_last(self) -> dict[str, Any]:
        """The resumable state (``last.pt``) of an interrupted run."""
        last = self.path / "last.pt"
        if not last.is_file() and (self.path / "members").is_dir():
            raise DataError(f"Cannot resume '{self.path}' as a whole: it is an ensemble (train.ensemble). Resume an "
                            f"unfinished member with --resume {self.path / 'members' / '<i>'}.")
        if not last.is_file() and (self.path / "candidates").is_dir():
            raise DataError(f"Cannot resume '{self.path}' as a whole: it fitted the data recipe's candidates "
                            "(candidates/<name>) to keep the best on validation, which a restart must redo. Run it "
                            f"again into a new folder, or resume one candidate with --resume {self.path / 'candidates'}/<name>.")
        if not last.is_file():
            raise DataError(f"Cannot resume '{self.path}': it has no last.pt (written after each finished epoch). "
                            "Pass the --out folder of a run that finished at least one epoch.")
        try:
            return read_checkpoint(last, (LAST_FORMAT,), f"--resume {self.path}")
        except CheckpointError as exc:
            if any(f"{old!r}" in str(exc) for old in OLD_LAST_FORMATS):
                raise CheckpointError(
                    f"Cannot resume '{self.path}': its last.pt was written by an earlier medtransfer (format "
                    f"{OLD_LAST_FORMATS[0]!r}, before the Trainer), which this version cannot continue. Its "
                    "model.pt (if the run finished) still loads for predict and evaluate; start a new run to "
                    "train further.") from None
            raise

    # ---- writing ----------------------------------------------------------------------------
    def _once(self, name: str) -> None:
        if name in self._written:
            raise RuntimeError(f"{name} is written once per run; it was already written to {self.path}")
        self._written.add(name)

    def write_config(self, yaml_text: str) -> None:
        """``config.yaml``, once, with every ``auto`` resolved."""
        if self.main:
            self._once("config.yaml")
            write_text_atomic(self.path / "config.yaml", yaml_text)

    def write_metrics(self, metrics: Mapping[str, Any]) -> None:
        if self.main:
            self._once("metrics.json")
            write_json_atomic(self.path / "metrics.json", metrics)

    def save_model(self, payload: Mapping[str, Any]) -> None:
        if self.main:
            self._once("model.pt")
            save_torch_atomic(dict(payload), self.path / "model.pt")

    def save_last(self, state: Mapping[str, Any]) -> None:
        if self.main:
            save_torch_atomic({"format": LAST_FORMAT, **state}, self.path / "last.pt")

    def write_json(self, name: str, obj: Any) -> None:
        if self.main:
            write_json_atomic(self.path / name, obj)

    def write_rows(self, name: str, rows: Sequence[Mapping[str, Any]]) -> None:
        """A CSV whose columns are every key of the rows, in first-seen order."""
        if self.main and rows:
            write_csv_atomic(self.path / name, rows, list(dict.fromkeys(k for r in rows for k in r)))
