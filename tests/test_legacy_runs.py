"""Run directories written by medtransfer 0.1.0 before the Trainer (``tests/fixtures/legacy_v1``,
made by ``tests/fixtures/make_legacy_runs.py`` at commit 053b525) still load and predict exactly
what they predicted then."""
import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from legacy_inputs import classification_inputs_2d, classification_inputs_3d, segmentation_input
from medtransfer.inference import predict_folder
from medtransfer.segmentation.inference import predict_segmentation

LEGACY = Path(__file__).parent / "fixtures" / "legacy_v1"


def _rows(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as fh:
        return {Path(r["path"]).name: r for r in csv.DictReader(fh)}


@pytest.mark.parametrize("name, make_inputs", [("cls2d", classification_inputs_2d),
                                               ("ensemble2d", classification_inputs_2d),
                                               ("cls3d", classification_inputs_3d)])
def test_legacy_classification_run_predicts_identically(name, make_inputs, tmp_path):
    inputs = make_inputs(tmp_path / "in")
    predict_folder(LEGACY / name, inputs, tmp_path / "p.csv", device="cpu")
    expected, got = _rows(LEGACY / name / "expected_predictions.csv"), _rows(tmp_path / "p.csv")
    assert sorted(got) == sorted(expected) and len(got) >= 4
    for key, row in expected.items():
        assert got[key]["status"] == row["status"] == "ok"
        assert got[key]["predicted"] == row["predicted"]
        for col in (c for c in row if c.startswith("prob_")):
            assert float(got[key][col]) == pytest.approx(float(row[col]), abs=2e-6), (key, col)


def test_legacy_segmentation_run_predicts_the_same_mask(tmp_path):
    image, _, affine = segmentation_input(9)
    src = tmp_path / "seg_in.nii.gz"
    nib.save(nib.Nifti1Image(image, affine), str(src))
    rows = predict_segmentation(LEGACY / "seg2d", [src], tmp_path / "out")
    assert rows[0]["status"] == "ok"
    mask = np.asarray(nib.load(rows[0]["mask_nifti"]).dataobj).astype(int)
    expected = np.loadtxt(LEGACY / "seg2d" / "expected_mask.txt", dtype=int).reshape(mask.shape)
    assert len(np.unique(expected)) == 3  # the fixture predicts all three labels, so a swap would show
    np.testing.assert_array_equal(mask, expected)
