"""CT preprocessing for the Merlin encoder on a real CT series: HU from medtransfer's DICOM reader,
RAS orientation, the encoder's spacing and grid, the HU window; and volumes in the wrong units refused.

Data: the 3-slice abdominal CT series with its DICOM SEG liver mask (QIICR/dcmqi) and a real
multi-slice brain MR series, from the shared data folder (skipped when absent).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import SHARED_DATA
from medtransfer.backbones import InputContractError, check_input_contract, get_weight_spec
from medtransfer.data.ct import preprocess_ct
from medtransfer.io import read_series
from medtransfer.io.seg import read_seg
from medtransfer.io.volume import Volume

CT = SHARED_DATA / "ct_liver_seg_dicom"
MR = SHARED_DATA / "brain_mr_dicom_studies" / "Study3" / "11-T1post-18670"
SPEC = get_weight_spec("i3resnet152.merlin_astra")
needs_ct = pytest.mark.skipif(not (CT / "ct").is_dir(), reason=f"shared CT series not found under {CT}")


@pytest.fixture(scope="module")
def ct_volume():
    return read_series(CT / "ct")


@needs_ct
def test_real_ct_lands_on_the_contract_grid_orientation_spacing_and_window(ct_volume):
    out, rep = preprocess_ct(ct_volume, SPEC.ct)
    assert rep["orientation_in"] == "LPS" and rep["orientation_out"] == "RAS"  # axial DICOM: i → left, j → posterior
    assert rep["spacing_in_mm"] == [0.8105, 0.8105, 1.0] and rep["spacing_out_mm"] == [1.5, 1.5, 3.0]
    assert out.shape == (224, 224, 160) and rep["shape_out"] == [224, 224, 160]
    assert out.dtype == np.float32 and out.min() == 0.0 and out.max() == 1.0
    # HU from the reader: -3024 outside the reconstruction circle, air and soft tissue inside
    assert rep["hu_percentiles_0.5_50_99.5"][0] == -3024.0
    # every source voxel of the liver lands where the output affine says, windowed
    seg = read_seg(CT / "liver_seg.dcm", ct_volume)
    liver = np.argwhere(seg.masks[0][:, :, 0] > 0)
    hu = ct_volume.array[liver[:, 0], liver[:, 1], 0]
    assert 30 < np.median(hu) < 120  # liver parenchyma in HU
    world = ct_volume.affine @ np.c_[liver, np.zeros(len(liver)), np.ones(len(liver))].T
    ijk = np.rint(np.linalg.inv(np.asarray(rep["affine_out"])) @ world).astype(int)[:3].T
    got = out[ijk[:, 0], ijk[:, 1], ijk[:, 2]]
    lo, hi = SPEC.ct.hu_window
    assert abs(np.median(got) - (np.median(hu) - lo) / (hi - lo)) < 0.01
    # RAS: +i points to the patient's right (+x), where the liver is: right of the grid's centre
    assert np.asarray(rep["affine_out"])[0, 0] > 0 and ijk[:, 0].mean() > 112 + 20
    check_input_contract(torch.from_numpy(out)[None, None], SPEC)  # the contract accepts it


@needs_ct
def test_raw_hu_and_an_already_scaled_volume_are_refused(ct_volume):
    raw = torch.from_numpy(ct_volume.array[None, None].copy())
    with pytest.raises(InputContractError, match="raw Hounsfield units.*preprocess_ct"):
        check_input_contract(raw, SPEC)
    a = ct_volume.array
    unit = Volume((a - a.min()) / (a.max() - a.min()), ct_volume.affine.copy())  # [0, 1], then treated as HU
    out, _ = preprocess_ct(unit, SPEC.ct)
    with pytest.raises(InputContractError, match="less than 1% of the HU window.*must not be windowed again"):
        check_input_contract(torch.from_numpy(out)[None, None], SPEC)


@pytest.mark.skipif(not MR.is_dir(), reason=f"shared MR series not found under {MR}")
def test_an_mr_series_through_the_ct_window_is_refused():
    out, rep = preprocess_ct(read_series(MR), SPEC.ct)
    assert rep["fraction_above_window"] > 0.4
    with pytest.raises(InputContractError, match="sit at its top.*MR image"):
        check_input_contract(torch.from_numpy(out)[None, None], SPEC)


@needs_ct
@pytest.mark.skipif(not SPEC.sources[0].available(SPEC.name), reason="the Merlin shard packages are not installed")
def test_the_registered_hu_window_is_the_one_the_weights_batchnorm_statistics_expect(ct_volume):
    """The HU window choice, measured: conv1 responses of the real CT under Astra's -1000..200 window
    match bn1's running statistics; under Merlin's pretraining window -1000..1000 their variance is
    off by a factor of about 2.4 (|log ratio| 0.87) whatever the share of padding."""
    import dataclasses

    from medtransfer.backbones import load_backbone
    from medtransfer.backbones.i3resnet import stem_statistics_fit

    model, _ = load_backbone(SPEC, 1, stages=1)
    fits = {}
    for window in ((-1000.0, 200.0), (-1000.0, 1000.0)):
        prep = dataclasses.replace(SPEC.ct, hu_window=window, spacing_mm=(1.5, 1.5, 1.0))  # keep the 3 slices
        out, _ = preprocess_ct(ct_volume, prep, size=(224, 224, 3))
        fits[window] = stem_statistics_fit(model.eval(), torch.from_numpy(out)[None, None])
    astra, merlin = fits[(-1000.0, 200.0)], fits[(-1000.0, 1000.0)]
    assert SPEC.ct.hu_window == (-1000.0, 200.0)
    assert astra["mean_error"] < 0.05 and astra["log_var_error"] < 0.3
    assert merlin["log_var_error"] > 0.7 and merlin["total"] > 3 * astra["total"]


def test_a_ct_encoder_run_reads_nifti_in_hu_through_its_contract(tmp_path):
    """A 3D backbone with a CT contract: training, evaluation and predict read a volume in HU through
    the contract (RAS, spacing, HU window), not through the percentile window; the contract travels
    in model.pt's preprocessing."""
    import nibabel as nib
    import numpy as np

    from medtransfer.backbones import get_weight_spec
    from medtransfer.config import load_config
    from medtransfer.data.preprocess import Preprocessor, PreprocessSpec, preprocess_spec

    hu = np.full((40, 40, 20), -1000.0, np.float32)  # air
    hu[20:] = 200.0  # the top of the encoder's window (-1000 … 200 HU) on the right side (+x = R)
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(hu, np.diag([1.5, 1.5, 3.0, 1.0])), str(path))
    w = get_weight_spec("i3resnet152.merlin_astra")
    spec = preprocess_spec(load_config("general", overrides=["data.size=32"]).data, 1, w.mean, w.std, 3, w.ct)
    assert PreprocessSpec.from_dict(spec.to_dict()) == spec and spec.ct["hu_window"] == [-1000.0, 200.0]
    x = Preprocessor(spec).load_volume(str(path))
    assert tuple(x.shape) == (1, 32, 32, round(32 * 160 / 224))
    row = x[0, :, 16, 11].numpy()  # along x at the centre: air (0) on the left, 1 on the right
    assert row[:8].max() == 0.0 and row[-8:].min() == pytest.approx(1.0)
    plain = Preprocessor(PreprocessSpec(32, 1, "tags", (0.5, 99.5), (0.0,), (1.0,), 3)).load_volume(str(path))
    assert tuple(plain.shape) == (1, 32, 32, 32)  # without a contract: percentile window, cubic grid
