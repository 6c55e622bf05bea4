"""The output table of a PACS job: the folder job's table (:class:`~medtransfer.inference.batch.PredictionTable`
under its lock), written chunk by chunk; on ``--resume`` the complete rows already written are kept and
their inputs not done again."""
from __future__ import annotations

import contextlib
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from medtransfer.hospital.selection import Unit
from medtransfer.inference.batch import BASE_FIELDS, PredictionTable, output_fields, output_lock


def classification_fields(label_names: Iterable[str], patient_fields: bool, per_series: bool) -> list[str]:
    """The columns of ``predict`` (the same as for a folder)."""
    return output_fields(list(label_names), 3 if per_series else 2, patient_fields)


def segmentation_fields(label_names: Iterable[str]) -> list[str]:
    """Columns of a segmentation job over a PACS: one row per series, its structure volumes and SEG."""
    return BASE_FIELDS + ["files"] + [f"volume_ml_{n}" for n in list(label_names)[1:]] + ["seg_sop_instance_uid"]


def unit_row(unit: Unit, status: str, reason: str, with_files: bool) -> dict[str, Any]:
    """A row for a unit that gets no prediction (skipped by the selection, not retrievable, …)."""
    row: dict[str, Any] = {"path": unit.key, "status": status, "reason": reason, **unit.ids()}
    if with_files:
        row["files"] = ";".join(rec.key for rec in unit.records)
    return row


class RowLog:
    """``OUT.partial`` while the job runs (the kept rows first on resume), ``OUT`` when it ends; a
    second job on the same ``OUT`` is refused while this one holds it."""

    def __init__(self, out_csv: str | os.PathLike[str], fields: list[str], resume: bool, keys: Iterable[str]):
        self.table = PredictionTable(out_csv, fields)
        self.out = self.table.path
        self._keys = list(keys)
        self._resume = resume
        self.previous: list[dict[str, str]] = []
        self.done: set[str] = set()
        self.counts: Counter = Counter()
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> RowLog:
        self._stack.enter_context(output_lock(self.out))
        try:
            if self._resume:
                self.previous = self.table.completed_rows(self._keys)
            self.done = {r["path"] for r in self.previous}
            self.counts.update(r["status"] for r in self.previous)
            self.table.__enter__()
            self.table.write(self.previous)
        except BaseException:
            self._stack.close()
            raise
        return self

    def write(self, rows: Iterable[Mapping[str, Any]]) -> None:
        rows = list(rows)
        self.table.write([{k: r.get(k, "") for k in self.table.fields} for r in rows])
        self.counts.update(r["status"] for r in rows)

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.table.__exit__(exc_type, exc, tb)
            if exc_type is None:
                self.table.commit()
        finally:
            self._stack.close()
