"""Built-in demo data: a small, SYNTHETIC chest-radiograph-like DICOM dataset.

Nothing here is patient data. The images are drawn from a simple anatomical model (body outline,
lung fields, mediastinum and heart, spine, ribs, diaphragm, vascular texture, quantum noise) and
about 40% of them carry a round pulmonary opacity of varying size and contrast (the binary
"finding"). Several images per synthetic patient; patients differ in anatomy, images of one
patient in pose and exposure. The files look like what a PACS export of DX/CR would hold:
12–16-bit stored values, RescaleSlope/Intercept, WindowCenter/Width, a mix of MONOCHROME1 and
MONOCHROME2, ImagerPixelSpacing, PatientID.

The dataset is generated once (deterministically) into ``$MEDTRANSFER_HOME/demo/xray-v1``
(default ``~/.cache/medtransfer``) and reused.
"""
from __future__ import annotations

import csv
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

DEMO_VERSION = "xray-v1"
LABEL_NAMES = ["no_finding", "opacity"]
_DONE_MARKER = ".complete"
FINDINGS_FILE = "findings.csv"
"""Sidecar of ``labels.csv``: where each opacity was drawn (``path, cx, cy, radius``; centre column ``cx``
and row ``cy`` as fractions of the image width and height, ``radius`` as a fraction of the side: the
opacity's intensity has fallen to e^-1.5 ≈ 0.22 of its peak there). Images without a finding have no row."""


def medtransfer_home() -> Path:
    """Root of medtransfer's cache (``$MEDTRANSFER_HOME`` or ``~/.cache/medtransfer``)."""
    env = os.environ.get("MEDTRANSFER_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "medtransfer"


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    n = gaussian_filter(rng.standard_normal(shape), sigma)
    return n / (n.std() + 1e-8)


def _ellipse(yy, xx, cy, cx, ry, rx, angle=0.0):
    c, s = np.cos(angle), np.sin(angle)
    y, x = yy - cy, xx - cx
    u = (x * c + y * s) / rx
    v = (-x * s + y * c) / ry
    return u * u + v * v


def _soft(mask_dist: np.ndarray, edge: float = 0.08) -> np.ndarray:
    """Soft inside-mask from a normalised ellipse distance (1 inside, 0 outside)."""
    return np.clip((1.0 - mask_dist) / edge, 0.0, 1.0)


def synth_chest(
    rng: np.random.Generator, anatomy: dict[str, float], finding: dict[str, float] | None, size: int = 256
) -> np.ndarray:
    """Attenuation image in [0, 1] (higher = denser = brighter), shape (size, size)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    jy, jx = rng.normal(0, 0.01, 2)
    rot = rng.normal(0, 0.03)
    img = np.full((size, size), 0.03, np.float32)
    body = _soft(_ellipse(yy, xx, 0.55 + jy, 0.5 + jx, 0.55, anatomy["body_rx"], rot), 0.05)
    img += 0.42 * body
    # Lung fields: dark, with vascular texture that fades towards the periphery.
    lungs = np.zeros_like(img)
    for side in (-1, 1):
        cx = 0.5 + jx + side * anatomy["lung_dx"]
        d = _ellipse(yy, xx, anatomy["lung_cy"] + jy, cx, anatomy["lung_ry"], anatomy["lung_rx"], rot + side * 0.08)
        lungs = np.maximum(lungs, _soft(d, 0.12))
    # Diaphragm domes cut the lung bases.
    dome = np.clip((anatomy["lung_cy"] + anatomy["lung_ry"] * 0.75 + jy - yy) / 0.03, 0, 1)
    lungs *= dome
    texture = _smooth_noise(rng, (size, size), 1.5) * 0.02 + _smooth_noise(rng, (size, size), 6) * 0.015
    img -= lungs * (0.30 - texture)
    # Ribs: curved bright bands across each lung.
    for k in range(9):
        y0 = 0.22 + k * 0.065 + jy
        curve = y0 + 0.12 * (xx - 0.5 - jx) ** 2 * 4
        band = np.exp(-(((yy - curve) / 0.012) ** 2))
        img += 0.06 * band * lungs
    # Mediastinum, heart (patient's left = image right) and spine.
    img += 0.25 * _soft(_ellipse(yy, xx, 0.45 + jy, 0.5 + jx, 0.28, 0.07, rot), 0.2)
    img += 0.22 * _soft(
        _ellipse(yy, xx, 0.66 + jy, 0.55 + jx + anatomy["heart_dx"], anatomy["heart_r"], anatomy["heart_r"] * 1.2), 0.15
    )
    img += 0.12 * np.exp(-(((xx - 0.5 - jx) / 0.035) ** 2)) * body
    if finding is not None:
        r = finding["radius"]
        d = ((yy - finding["cy"]) ** 2 + (xx - finding["cx"]) ** 2) / (r * r)
        blob = np.exp(-d * 1.5) * (1.0 + 0.25 * _smooth_noise(rng, (size, size), 2.0))
        img += finding["contrast"] * blob * np.clip(lungs * 1.5, 0, 1)
    img += rng.normal(0, 0.012, img.shape).astype(np.float32)
    return np.clip(img, 0.0, 1.0)


def _write_dicom(path: Path, density: np.ndarray, *, rng: np.random.Generator, patient_id: str, index: int,
                 study_uid: str) -> dict[str, object]:
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    modality = "DX" if rng.random() < 0.5 else "CR"
    bits = int(rng.choice([12, 14, 16]))
    monochrome1 = bool(rng.random() < 0.4)
    slope, intercept = [(1.0, 0.0), (0.5, 0.0), (2.0, -1024.0), (1.0, -500.0)][int(rng.integers(4))]
    maxval = 2**bits - 1
    gain = rng.uniform(0.55, 0.9)
    offset = rng.uniform(0.02, 0.1)
    stored = (offset + gain * density) * maxval
    if monochrome1:
        stored = maxval - stored
    stored = np.clip(np.round(stored), 0, maxval).astype(np.uint16)
    physical = stored.astype(np.float64) * slope + intercept
    lo, hi = np.percentile(physical, [1, 99])

    sop_class = "1.2.840.10008.5.1.4.1.1.1.1" if modality == "DX" else "1.2.840.10008.5.1.4.1.1.1"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = modality
    ds.PatientID = patient_id
    ds.PatientName = f"SYNTHETIC^DEMO{patient_id[-3:]}"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.SeriesDescription = "SYNTHETIC CHEST PA (medtransfer demo)"
    ds.ImageComments = "Synthetic image generated by medtransfer; not patient data."
    ds.InstanceNumber = index + 1
    ds.SeriesNumber = 1
    ds.Rows, ds.Columns = density.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.RescaleSlope = f"{slope:g}"
    ds.RescaleIntercept = f"{intercept:g}"
    ds.RescaleType = "US"
    ds.WindowCenter = f"{(lo + hi) / 2:.1f}"
    ds.WindowWidth = f"{max(hi - lo, 1.0):.1f}"
    ds.ImagerPixelSpacing = ["0.7", "0.7"]
    ds.PixelData = stored.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return {"modality": modality, "bits_stored": bits, "monochrome1": monochrome1}


def generate_demo_dataset(
    out_dir: str | os.PathLike[str], n_patients: int = 72, seed: int = 2024, size: int = 256
) -> Path:
    """Write the synthetic dataset (DICOM files + ``labels.csv``) into ``out_dir``.

    ``labels.csv`` columns: ``path`` (relative to ``out_dir``), ``label`` (0 = no_finding,
    1 = opacity), ``patient_id``; ``findings.csv`` (see :data:`FINDINGS_FILE`) says where each opacity is.
    Returns ``out_dir``.
    """
    from pydicom.uid import generate_uid

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows, findings = [], []
    for p in range(n_patients):
        pid = f"DEMO{p:03d}"
        anatomy = {
            "body_rx": rng.uniform(0.40, 0.47),
            "lung_dx": rng.uniform(0.16, 0.20),
            "lung_cy": rng.uniform(0.46, 0.52),
            "lung_ry": rng.uniform(0.22, 0.27),
            "lung_rx": rng.uniform(0.10, 0.13),
            "heart_dx": rng.uniform(0.0, 0.05),
            "heart_r": rng.uniform(0.09, 0.13),
        }
        propensity = 0.75 if rng.random() < 0.45 else 0.1
        study_uid = generate_uid()
        n_images = int(rng.integers(3, 5))
        (out / "images" / pid).mkdir(parents=True, exist_ok=True)
        for i in range(n_images):
            label = int(rng.random() < propensity)
            finding = None
            if label:
                side = rng.choice([-1, 1])
                finding = {
                    "cy": anatomy["lung_cy"] + rng.uniform(-0.6, 0.45) * anatomy["lung_ry"],
                    "cx": 0.5 + side * (anatomy["lung_dx"] + rng.uniform(-0.5, 0.5) * anatomy["lung_rx"]),
                    "radius": rng.uniform(0.035, 0.08),
                    "contrast": rng.uniform(0.12, 0.32),
                }
            density = synth_chest(rng, anatomy, finding, size)
            rel = Path("images") / pid / f"img{i:02d}.dcm"
            _write_dicom(out / rel, density, rng=rng, patient_id=pid, index=i, study_uid=study_uid)
            rows.append({"path": rel.as_posix(), "label": label, "patient_id": pid})
            if finding is not None:
                findings.append({"path": rel.as_posix(), **{k: f"{finding[k]:.6f}" for k in ("cx", "cy", "radius")}})
    with open(out / "labels.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "label", "patient_id"])
        writer.writeheader()
        writer.writerows(rows)
    with open(out / FINDINGS_FILE, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "cx", "cy", "radius"])
        writer.writeheader()
        writer.writerows(findings)
    (out / "README.txt").write_text(
        "SYNTHETIC chest-radiograph-like DICOM images generated by medtransfer (demo data).\n"
        "Not patient data. Labels: 0 = no_finding, 1 = opacity. See labels.csv.\n"
    )
    return out


def demo_dataset_dir(regenerate: bool = False) -> Path:
    """The cached demo dataset, generated on first use (atomically: a half-written one is redone)."""
    target = medtransfer_home() / "demo" / DEMO_VERSION
    if (target / _DONE_MARKER).exists() and not regenerate:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("Generating the synthetic demo dataset into %s (once)", target)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=target.parent))
    try:
        generate_demo_dataset(tmp)
        (tmp / _DONE_MARKER).write_text(DEMO_VERSION)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def demo_findings(dataset_dir: str | os.PathLike[str] | None = None) -> dict[str, dict[str, float]]:
    """Opacity positions of a demo dataset: ``{path relative to the dataset: {cx, cy, radius}}`` (fractions
    of the image side, see :data:`FINDINGS_FILE`). ``None``: the cached demo set, regenerated once
    (pixel-identical) when it was written by a version without the sidecar."""
    root = Path(dataset_dir) if dataset_dir is not None else demo_dataset_dir()
    if dataset_dir is None and not (root / FINDINGS_FILE).is_file():
        root = demo_dataset_dir(regenerate=True)
    path = root / FINDINGS_FILE
    if not path.is_file():
        from medtransfer.errors import DataError

        raise DataError(f"{path} does not exist: the demo set in {root} predates the findings sidecar. "
                        "Write it again with 'medtransfer demo-data OUT_DIR'.")
    with open(path, newline="") as fh:
        return {r["path"]: {k: float(r[k]) for k in ("cx", "cy", "radius")} for r in csv.DictReader(fh)}
