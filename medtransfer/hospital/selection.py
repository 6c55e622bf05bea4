"""What a PACS query found (:class:`InstanceRecord`), which of it a job takes (:class:`Selection`)
and the work units it becomes (one per instance for 2D models, one per series for 3D and
segmentation models), before any pixel data is retrieved."""
from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from medtransfer.errors import ConfigError
from medtransfer.hospital.connection import check_keyword
from medtransfer.inference.batch import SeriesFilter

NUMERIC_VRS = {"DS", "IS", "US", "SS", "UL", "SL", "FL", "FD", "UV", "SV"}
QUERY_FIELDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "Modality",
                "SeriesDescription", "InstanceNumber")


@dataclass(frozen=True)
class InstanceRecord:
    """One instance as the PACS's query answered it (no pixel data)."""

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str = ""
    modality: str = ""
    series_description: str = ""
    instance_number: int | None = None
    attributes: Mapping[str, str | None] = field(default_factory=dict)
    """Values of the range keywords as the query returned them (``None``: not returned)."""

    @property
    def key(self) -> str:
        """The row's ``path``: the instance's place in the DICOMweb resource tree (any source)."""
        return f"studies/{self.study_uid}/series/{self.series_uid}/instances/{self.sop_uid}"

    @property
    def series_key(self) -> str:
        return f"studies/{self.study_uid}/series/{self.series_uid}"


@dataclass(frozen=True)
class HeaderRange:
    """A numeric header attribute within ``[low, high]`` (either end open), e.g. SliceThickness 2.5–5."""

    keyword: str
    low: float | None = None
    high: float | None = None

    def describe(self) -> str:
        lo = "" if self.low is None else f"{self.low:g}"
        hi = "" if self.high is None else f"{self.high:g}"
        return f"{self.keyword} {lo}–{hi}" if lo and hi else f"{self.keyword} {'>= ' + lo if lo else '<= ' + hi}"

    def reason_to_skip(self, value: object) -> str | None:
        """None when every value of the attribute lies in the range, else why the image is skipped."""
        values = _numbers(value)
        if not values:
            return f"{self.keyword} missing (selection {self.describe()})"
        outside = [v for v in values if (self.low is not None and v < self.low) or (self.high is not None and v > self.high)]
        if outside:
            shown = "\\".join(f"{v:g}" for v in values)
            return f"{self.keyword} {shown} outside the selection {self.describe()}"
        return None


def _numbers(value: object) -> list[float]:
    if value is None or value == "":
        return []
    items = value if isinstance(value, (list, tuple)) else re.split(r"\\", str(value))
    try:
        out = [float(v) for v in items if str(v).strip() != ""]
    except (TypeError, ValueError):
        return []
    return [v for v in out if math.isfinite(v)]


def parse_range(text: str) -> HeaderRange:
    """``"SliceThickness=2.5:5"`` (also ``=2.5:`` or ``=:5``) → :class:`HeaderRange`."""
    from pydicom.datadict import dictionary_VR, tag_for_keyword

    keyword, sep, bounds = text.partition("=")
    keyword = keyword.strip()
    m = re.fullmatch(r"\s*([-+0-9.eE]*)\s*:\s*([-+0-9.eE]*)\s*", bounds)
    if not sep or not m or not (m.group(1) or m.group(2)):
        raise ConfigError(f"--where '{text}' must be KEYWORD=LOW:HIGH (an end may be left open), "
                          "e.g. --where SliceThickness=2.5:5 or --where Rows=512:.")
    check_keyword(keyword, "--where selection")
    vr = dictionary_VR(tag_for_keyword(keyword))
    if vr not in NUMERIC_VRS:
        raise ConfigError(f"--where {keyword}: a range needs a numeric attribute; {keyword} has VR {vr}. "
                          "Use the PACS search keys in the URL for text and dates.")
    try:
        low = float(m.group(1)) if m.group(1) else None
        high = float(m.group(2)) if m.group(2) else None
    except ValueError:
        raise ConfigError(f"--where '{text}': the bounds must be numbers.") from None
    if low is not None and high is not None and low > high:
        raise ConfigError(f"--where '{text}': the low end {low:g} is above the high end {high:g}.")
    return HeaderRange(keyword, low, high)


@dataclass
class Selection:
    """The selection filters of ``predict`` (modality, series description, minimum slices) plus
    numeric ranges on header attributes, applied to the query's answers."""

    series_filter: SeriesFilter = field(default_factory=SeriesFilter)
    ranges: tuple[HeaderRange, ...] = ()

    def query_fields(self) -> list[str]:
        """Attributes to ask the PACS for with every instance."""
        return list(dict.fromkeys([*QUERY_FIELDS, *(r.keyword for r in self.ranges)]))

    def reason_to_skip(self, records: list[InstanceRecord], n_slices: int | None = None) -> str | None:
        """Why these instances (one, or a series) are not taken; ranges whose values the query did
        not return are checked again on the retrieved headers (:meth:`header_reason`)."""
        first = records[0]
        why = self.series_filter.reason_to_skip(first.modality, first.series_description, n_slices)
        if why:
            return why
        for rng in self.ranges:
            for rec in records:
                value = rec.attributes.get(rng.keyword)
                if value not in (None, ""):
                    why = rng.reason_to_skip(value)
                    if why:
                        return why
        return None

    def needs_header_check(self, records: Iterable[InstanceRecord]) -> bool:
        return any(rec.attributes.get(r.keyword) in (None, "") for r in self.ranges for rec in records)

    def header_reason(self, header) -> str | None:
        """The range check on a retrieved header (a pydicom Dataset)."""
        for rng in self.ranges:
            why = rng.reason_to_skip(header.get(rng.keyword))
            if why:
                return why
        return None


@dataclass
class Unit:
    """One row of the output: an instance (2D model) or a series (3D or segmentation model)."""

    key: str
    records: list[InstanceRecord]
    status: str = ""
    reason: str = ""

    @property
    def study_uid(self) -> str:
        return self.records[0].study_uid

    @property
    def series_uid(self) -> str:
        return self.records[0].series_uid

    def ids(self) -> dict[str, str]:
        single = len(self.records) == 1 and self.key == self.records[0].key
        return {"sop_instance_uid": self.records[0].sop_uid if single else "",
                "study_instance_uid": self.study_uid, "series_instance_uid": self.series_uid}


def _instance_order(rec: InstanceRecord) -> tuple:
    return (rec.study_uid, rec.series_uid, rec.instance_number if rec.instance_number is not None else 1 << 30,
            rec.sop_uid)


def plan_units(records: Iterable[InstanceRecord], per_series: bool, selection: Selection) -> list[Unit]:
    """Work units sorted by study, series and instance; those the selection excludes are ``skipped``
    already (no retrieval). Duplicate answers for one SOP Instance UID count once."""
    unique = {rec.sop_uid: rec for rec in records}
    ordered = sorted(unique.values(), key=_instance_order)
    units: list[Unit] = []
    if per_series:
        series: dict[str, list[InstanceRecord]] = {}
        for rec in ordered:
            series.setdefault(rec.series_key, []).append(rec)
        for key, recs in series.items():
            unit = Unit(key, recs)
            why = selection.reason_to_skip(recs, len(recs))
            if why:
                unit.status, unit.reason = "skipped", why
            units.append(unit)
        return units
    for rec in ordered:
        unit = Unit(rec.key, [rec])
        why = selection.reason_to_skip([rec])
        if why:
            unit.status, unit.reason = "skipped", why
        units.append(unit)
    return units


def shard_by_study(units: list[Unit], shard: tuple[int, int] | None) -> list[Unit]:
    """The ``i``-th of ``n`` contiguous blocks of the sorted studies (a study's rows, and so its
    report, stay in one shard; shard outputs concatenated in order equal the full run)."""
    if shard is None:
        return units
    studies = list(dict.fromkeys(u.study_uid for u in units))
    i, n = shard
    keep = set(studies[len(studies) * i // n: len(studies) * (i + 1) // n])
    return [u for u in units if u.study_uid in keep]
