"""Segmentation metrics on hand-made label maps, against MONAI and a brute-force distance computation."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.ndimage import binary_erosion
from scipy.spatial.distance import cdist

from medtransfer.metrics import (
    SegmentationEvaluator,
    dice_per_label,
    evaluate_segmentation,
    hd95_per_label,
    nsd_per_label,
    write_segmentation_report,
)

HIPPO = Path("/work/shared/data/msd_hippocampus")


def _square(shift: int = 0, shape=(30, 30)) -> np.ndarray:
    m = np.zeros(shape, dtype=np.int64)
    m[10:20, 10 + shift:20 + shift] = 1
    return m


def _hd95_brute(pred: np.ndarray, true: np.ndarray, spacing) -> float:
    """Symmetric 95th-percentile Hausdorff distance between the boundary voxels, by all-pairs distances."""
    def edge_points(m):
        e = m ^ binary_erosion(m)
        return np.argwhere(e) * np.asarray(spacing, dtype=float)

    a, b = edge_points(pred.astype(bool)), edge_points(true.astype(bool))
    d = cdist(a, b)
    return max(np.percentile(d.min(axis=1), 95), np.percentile(d.min(axis=0), 95))


def test_perfect_prediction_2d_and_3d():
    sq = _square()
    assert dice_per_label(sq, sq, [1]) == {1: 1.0}
    assert hd95_per_label(sq, sq, [1], (0.7, 0.7)) == {1: 0.0}
    assert nsd_per_label(sq, sq, [1], (0.7, 0.7), 0.0) == {1: 1.0}
    cube = np.zeros((12, 12, 12), dtype=np.uint8)
    cube[3:9, 2:10, 4:8] = 2
    assert dice_per_label(cube, cube, [2]) == {2: 1.0}
    assert hd95_per_label(cube, cube, [2], (1, 1, 3)) == {2: 0.0}


def test_shifted_square_hand_counts():
    # 10x10 squares, prediction shifted 3 columns: overlap 10 x 7 = 70 -> Dice = 2*70 / (100 + 100) = 0.7
    true, pred = _square(0), _square(3)
    assert dice_per_label(pred, true, [1])[1] == pytest.approx(0.7, abs=1e-12)
    # Boundary distances from the 36 reference edge pixels to the predicted edge (1 mm pixels):
    #   14 at 0 (shared top/bottom runs), 4 at 1, 4 at 2, 14 at 3 -> 95th percentile = 3 (same both ways)
    assert hd95_per_label(pred, true, [1], (1.0, 1.0))[1] == pytest.approx(3.0, abs=1e-6)
    # NSD at 0 mm: 14 + 14 coinciding edge pixels out of 36 + 36; at 1 mm: 18 + 18 of 72
    assert nsd_per_label(pred, true, [1], (1.0, 1.0), 0.0)[1] == pytest.approx(28 / 72, abs=1e-6)
    assert nsd_per_label(pred, true, [1], (1.0, 1.0), 1.0)[1] == pytest.approx(36 / 72, abs=1e-6)
    assert nsd_per_label(pred, true, [1], (1.0, 1.0), 3.0)[1] == pytest.approx(1.0, abs=1e-6)


def test_dice_matches_monai():
    from monai.metrics import compute_dice

    rng = np.random.default_rng(0)
    true = rng.integers(0, 3, (20, 24, 8))
    pred = np.where(rng.random(true.shape) < 0.8, true, rng.integers(0, 3, true.shape))
    ours = dice_per_label(pred, true, [1, 2])

    def oh(x):
        return torch.nn.functional.one_hot(torch.as_tensor(x), 3).permute(3, 0, 1, 2)[None].float()

    ref = compute_dice(oh(pred), oh(true), include_background=False)[0]
    np.testing.assert_allclose([ours[1], ours[2]], ref.numpy(), atol=1e-6)


def test_hd95_in_mm_scales_with_spacing_and_matches_brute_force():
    true, pred = _square(0), _square(3)
    h1 = hd95_per_label(pred, true, [1], (1.0, 1.0))[1]
    h2 = hd95_per_label(pred, true, [1], (2.0, 2.0))[1]
    assert h2 == pytest.approx(2 * h1, abs=1e-6)
    # anisotropic: 3 columns at 2.5 mm -> the furthest boundary pixels are 7.5 mm apart
    h_aniso = hd95_per_label(pred, true, [1], (1.0, 2.5))[1]
    assert h_aniso == pytest.approx(_hd95_brute(pred, true, (1.0, 2.5)), abs=1e-5)
    assert h_aniso == pytest.approx(7.5, abs=1e-5)
    # 3D blobs with anisotropic voxels
    zz, yy, xx = np.mgrid[:20, :22, :18]
    t3 = ((zz - 10) ** 2 / 36 + (yy - 11) ** 2 / 49 + (xx - 9) ** 2 / 25) <= 1
    p3 = ((zz - 11) ** 2 / 30 + (yy - 10) ** 2 / 64 + (xx - 9) ** 2 / 20) <= 1
    sp = (3.0, 0.8, 1.1)
    assert hd95_per_label(p3.astype(int), t3.astype(int), [1], sp)[1] == pytest.approx(
        _hd95_brute(p3, t3, sp), abs=1e-4)


def test_empty_mask_rule():
    empty, sq = np.zeros((30, 30), dtype=int), _square()
    # absent from both: NaN for every metric
    assert math.isnan(dice_per_label(empty, empty, [1])[1])
    assert math.isnan(hd95_per_label(empty, empty, [1])[1])
    assert math.isnan(nsd_per_label(empty, empty, [1])[1])
    # present in one only: dice 0, nsd 0, hd95 NaN
    for pred, true in ((empty, sq), (sq, empty)):
        assert dice_per_label(pred, true, [1])[1] == 0.0
        assert nsd_per_label(pred, true, [1])[1] == 0.0
        assert math.isnan(hd95_per_label(pred, true, [1])[1])


def test_evaluate_segmentation_rows_and_summary():
    true, shifted = _square(0), _square(3)
    two = true.copy()
    two[2:5, 2:5] = 2  # label 2 only in the reference of case "c"
    cases = [("a", true, true, (1, 1)), ("b", shifted, true, (2, 2)), ("c", true, two, 1.0)]
    rows, summary = evaluate_segmentation(cases, ["background", "lesion", "satellite"], n_boot=200)
    assert [r["case_id"] for r in rows] == ["a", "b", "c"]
    assert rows[1]["dice_lesion"] == pytest.approx(0.7) and rows[1]["hd95_mm_lesion"] == pytest.approx(6.0)
    assert rows[1]["volume_true_mm3_lesion"] == 400.0
    assert rows[2]["dice_satellite"] == 0.0 and math.isnan(rows[0]["dice_satellite"])
    les = summary["per_label"]["lesion"]
    assert les["dice"]["mean"] == pytest.approx((1 + 0.7 + 1) / 3)
    assert les["dice"]["median"] == 1.0 and les["dice"]["n"] == 3
    sat = summary["per_label"]["satellite"]
    assert sat["n_both_empty"] == 2 and sat["n_hd95_undefined"] == 1
    assert sat["dice"] == {"n": 1, "n_nan": 2, "mean": 0.0, "std": 0.0, "median": 0.0, "ci_low": None,
                           "ci_high": None}
    assert sat["hd95_mm"]["mean"] is None
    assert summary["mean_dice"] == pytest.approx(((1 + 0.7 + 1) / 3 + 0.0) / 2)
    # a {value: name} mapping picks labels explicitly; the stateful evaluator resets
    ev = SegmentationEvaluator({2: "satellite"}, n_boot=0)
    ev.update("c", true, two, 1.0)
    assert list(ev.aggregate()[1]["per_label"]) == ["satellite"]
    ev.reset()
    assert ev.aggregate()[0] == []


def test_label_maps_are_validated():
    with pytest.raises(ValueError, match="same shape"):
        dice_per_label(np.zeros((4, 4), int), np.zeros((4, 5), int), [1])
    with pytest.raises(ValueError, match="integer labels"):
        dice_per_label(np.full((4, 4), 0.5), np.zeros((4, 4)), [1])
    with pytest.raises(ValueError, match="spacing"):
        hd95_per_label(_square(), _square(), [1], (1.0, 1.0, 1.0))
    # float-stored integer masks (as in some MSD files) are accepted
    assert dice_per_label(_square().astype(np.float32), _square(), [1]) == {1: 1.0}


@pytest.mark.skipif(not HIPPO.exists(), reason="shared MSD hippocampus data not present")
def test_real_hippocampus_case():
    nib = pytest.importorskip("nibabel")
    img = nib.load(HIPPO / "labelsTr" / "hippocampus_001.nii.gz")
    true = np.asarray(img.dataobj).astype(np.int64)
    spacing = img.header.get_zooms()[:3]
    pred = np.roll(true, 1, axis=0)  # a one-voxel (1 mm) shift
    rows, summary = evaluate_segmentation([("001", pred, true, spacing)],
                                          ["background", "anterior", "posterior"], n_boot=0)
    for lab, name in ((1, "anterior"), (2, "posterior")):
        t, p = true == lab, pred == lab
        assert rows[0][f"dice_{name}"] == pytest.approx(2 * (t & p).sum() / (t.sum() + p.sum()))
        assert rows[0][f"hd95_mm_{name}"] == pytest.approx(_hd95_brute(p, t, spacing), abs=1e-4)
        assert 0.0 < rows[0][f"nsd_{name}"] <= 1.0
    assert summary["n_cases"] == 1


def test_segmentation_report(tmp_path):
    true = np.zeros((30, 30), int)
    true[10:20, 10:20] = 1
    pred = np.roll(true, 3, axis=1)
    img = np.random.default_rng(0).normal(size=(30, 30))
    metrics = write_segmentation_report(tmp_path, cases=[("c1", pred, true, (1.0, 1.0)), ("c2", true, true, 0.5)],
                                        label_names=["background", "organ"], images={"c1": img}, n_boot=50)
    with open(tmp_path / "segmentation_test.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["case_id"] for r in rows] == ["c1", "c2"]
    assert float(rows[0]["dice_organ"]) == pytest.approx(0.7) and float(rows[1]["dice_organ"]) == 1.0
    summary = json.loads((tmp_path / "metrics.json").read_text())["test"]
    assert summary["per_label"]["organ"]["dice"]["mean"] == pytest.approx(0.85)
    assert metrics["plots"] == ["plots/overlay_test.png"]
    assert (tmp_path / "plots" / "overlay_test.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "mean_dice" in (tmp_path / "model_card.md").read_text()
