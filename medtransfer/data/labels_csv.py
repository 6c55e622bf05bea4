"""The labels CSV of a folder of images, read as spreadsheet programs write it, and checked.

Encodings: UTF-8 (with or without the byte-order mark Excel writes), UTF-16 (Excel's "Unicode
text") and Windows-1252 (older spreadsheets); delimiters: comma, semicolon (locales with a decimal
comma) or tab. Header names are case-insensitive. Every problem names the file's line numbers:
empty or missing labels (``NaN``, ``NA``, …) and one path listed with two different labels are
refused; exact duplicate rows are reported and kept once.
"""
from __future__ import annotations

import csv
import io
import logging
from collections import defaultdict
from pathlib import Path

from medtransfer.errors import DataError

logger = logging.getLogger(__name__)

PATH_COLUMNS = ("path", "file", "filename", "image")
MISSING = frozenset({"", "nan", "na", "n/a", "none", "null", "?", "-"})
"""Label cells that mean 'no label' (spreadsheet and pandas spellings)."""


def _decode(path: Path) -> str:
    raw = path.read_bytes()
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return raw.decode("utf-16")
    if b"\x00" in raw[:4096]:
        raise DataError(f"Labels file '{path}' is not a text file (it holds NUL bytes). Pass a CSV with columns "
                        "path,label[,patient_id][,split].")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    try:
        text = raw.decode("cp1252")
    except UnicodeDecodeError as exc:
        raise DataError(f"Labels file '{path}' is neither UTF-8, UTF-16 nor Windows-1252 text (byte {exc.start}). "
                        "Save it as 'CSV UTF-8' from your spreadsheet program, or convert it: iconv -f <encoding> "
                        "-t utf-8.") from None
    logger.warning("%s is not UTF-8; read as Windows-1252 (as older spreadsheet programs write). Save it as "
                   "'CSV UTF-8' to be sure names with accents are read as meant.", path)
    return text


def _dialect(text: str) -> type[csv.Dialect] | csv.Dialect:
    try:
        return csv.Sniffer().sniff(text[:8192], delimiters=",;\t")
    except csv.Error:
        return csv.excel


def read_labels_csv(path: str | Path) -> list[dict[str, str]]:
    """Rows of a labels CSV as ``{column: value}`` with lower-case column names and a ``path`` key, plus
    ``_line`` (the file's line number, for messages). Checks the columns, the labels and duplicates."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Labels file '{path}' does not exist.")
    text = _decode(path)
    reader = csv.DictReader(io.StringIO(text), dialect=_dialect(text))
    fields = [f.strip().lower() for f in (reader.fieldnames or []) if f]
    path_col = next((c for c in PATH_COLUMNS if c in fields), None)
    if path_col is None or "label" not in fields:
        raise DataError(f"Labels file '{path}' needs a 'path' column (file path relative to --data, or absolute) "
                        f"and a 'label' column; it has: {', '.join(fields) or 'no header'}.")
    rows = []
    for row in reader:
        clean = {k.strip().lower(): (v or "").strip() for k, v in row.items() if k}
        if not any(clean.values()):
            continue  # a blank line
        clean["path"], clean["_line"] = clean.pop(path_col), str(reader.line_num)
        rows.append(clean)
    if not rows:
        raise DataError(f"Labels file '{path}' has no rows.")
    _check_labels(rows, path)
    return _without_duplicates(rows, path)


def _lines(rows: list[dict[str, str]], limit: int = 10) -> str:
    shown = ", ".join(r["_line"] for r in rows[:limit])
    return shown + (f" and {len(rows) - limit} more" if len(rows) > limit else "")


def _check_labels(rows: list[dict[str, str]], path: Path) -> None:
    empty = [r for r in rows if r["label"].lower() in MISSING]
    if empty:
        raise DataError(f"Labels file '{path}': {len(empty)} row(s) have no label (empty, NaN or NA) at line(s) "
                        f"{_lines(empty)}. Label them or remove them; an empty label is not a class.")
    no_path = [r for r in rows if not r["path"]]
    if no_path:
        raise DataError(f"Labels file '{path}': {len(no_path)} row(s) have no path at line(s) {_lines(no_path)}.")


def _without_duplicates(rows: list[dict[str, str]], path: Path) -> list[dict[str, str]]:
    by_path: dict[str, list[dict[str, str]]] = defaultdict(list)
    for r in rows:
        by_path[r["path"]].append(r)
    conflicts = {p: rs for p, rs in by_path.items() if len({r["label"] for r in rs}) > 1}
    if conflicts:
        shown = "; ".join(p + ": " + ", ".join(repr(r["label"]) + " (line " + r["_line"] + ")" for r in rs)
                          for p, rs in list(conflicts.items())[:5])
        raise DataError(f"Labels file '{path}' gives {len(conflicts)} file(s) two different labels: {shown}. "
                        "Keep one row per file.")
    repeats = [r for rs in by_path.values() for r in rs[1:]]
    if repeats:
        logger.warning("%s: %d duplicate row(s) (same file, same label) at line(s) %s were counted once",
                       path, len(repeats), _lines(repeats))
    return [rs[0] for rs in by_path.values()]
