"""Labels CSVs that point at PNG / JPEG / TIFF or 2D NIfTI images instead of DICOM files."""
import numpy as np
import pytest
import torch
from PIL import Image

from medtransfer.config import load_config
from medtransfer.data.preprocess import PreprocessSpec, Preprocessor, UnsupportedImageError
from medtransfer.errors import DataError
from medtransfer.io import read_raster
from medtransfer.train.finetune import finetune

TINY = ["model.backbone=tiny_cnn.random", "model.weights=none", "data.size=32", "train.head_epochs=1",
        "train.finetune_epochs=2", "train.lr=0.01"]


def _pre(channels=1, size=16, window="tags"):
    return Preprocessor(PreprocessSpec(size, channels, window, (0.5, 99.5), (0.5,) * channels, (0.5,) * channels))


def test_png_values_are_scaled_by_their_format_not_windowed(tmp_path):
    a8 = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (16, 1))  # 0 … 240
    Image.fromarray(a8).save(tmp_path / "g8.png")
    a16 = (a8.astype(np.uint16) * 257)  # the same image in 16 bits
    Image.fromarray(a16).save(tmp_path / "g16.png")
    x8, x16 = (_pre().load_image(str(tmp_path / f)) for f in ("g8.png", "g16.png"))
    assert x8.shape == (1, 16, 16)
    torch.testing.assert_close(x8[0, 0], torch.arange(0, 256, 16, dtype=torch.float32) / 255, atol=1e-4, rtol=0)
    torch.testing.assert_close(x16, x8, atol=1e-4, rtol=0)  # 16-bit: divided by 65535, not by its maximum
    assert read_raster(tmp_path / "g16.png").meta["value_range"] == (0.0, 65535.0)


def test_rgb_png_gray_stored_as_rgb_and_jpeg(tmp_path):
    rgb = np.zeros((16, 16, 3), dtype=np.uint8)
    rgb[..., 0] = 255
    Image.fromarray(rgb).save(tmp_path / "red.png")
    gray_as_rgb = np.repeat(np.full((16, 16, 1), 100, np.uint8), 3, axis=2)
    Image.fromarray(gray_as_rgb).save(tmp_path / "gray.jpg", quality=100)
    assert read_raster(tmp_path / "red.png").array.shape == (16, 16, 3)
    assert read_raster(tmp_path / "gray.jpg").array.ndim == 2  # equal channels: one gray image
    x = _pre(channels=3).load_image(str(tmp_path / "red.png"))
    assert x[0].mean() == pytest.approx(1.0) and x[1].max() == 0
    assert _pre(channels=1).load_image(str(tmp_path / "red.png")).mean() == pytest.approx(0.299, abs=1e-3)


def test_nifti_2d_in_physical_units_and_3d_refused(tmp_path):
    import nibabel as nib

    ct = np.linspace(-1000, 1000, 16 * 16, dtype=np.float32).reshape(16, 16, 1)
    nib.save(nib.Nifti1Image(ct, np.eye(4)), tmp_path / "slice.nii.gz")
    x = _pre(window="percentile").load_image(str(tmp_path / "slice.nii.gz"))
    assert x.shape == (1, 16, 16) and x.min() == 0 and x.max() == 1
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), tmp_path / "vol.nii.gz")
    with pytest.raises(UnsupportedImageError, match="3D NIfTI image .* this model takes 2D images"):
        _pre().load_image(str(tmp_path / "vol.nii.gz"))


def _png_set(folder, n=40, colour=False, seed=0):
    rng = np.random.default_rng(seed)
    rows = ["path,label,patient_id"]
    for i in range(n):
        y = i % 2
        a = rng.integers(0, 80, size=(40, 40, 3) if colour else (40, 40)).astype(np.uint8)
        a[10:30, 10:30] += 150 * y
        Image.fromarray(a).save(folder / f"img{i:03d}.png")
        rows.append(f"img{i:03d}.png,{['normal', 'lesion'][y]},P{i // 2 + 100 * y}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder / "labels.csv"


@pytest.mark.parametrize("colour", [False, True])
def test_finetune_on_a_png_folder(tmp_path, colour):
    (tmp_path / "data").mkdir()
    labels = _png_set(tmp_path / "data", colour=colour)
    res = finetune(load_config("xray", overrides=TINY), data=tmp_path / "data", labels=labels,
                   out_dir=tmp_path / "run")
    assert res.metrics["label_names"] == ["normal", "lesion"]
    assert res.metrics["test"]["auc"] > 0.9  # the bright square is easy
    assert torch.load(tmp_path / "run" / "model.pt", weights_only=True)["preprocess"]["channels"] == (3 if colour else 1)
    from medtransfer.inference import predict_folder

    assert predict_folder(tmp_path / "run", tmp_path / "data", tmp_path / "p.csv").counts == {"ok": 40, "skipped": 1}


def test_png_without_patient_id_says_what_to_add(tmp_path):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "labels.csv").write_text("path,label\na.png,0\n")
    from medtransfer.data.samples import samples_from_folder

    with pytest.raises(DataError, match="PNG file, which carries no patient identity: add a patient_id column"):
        samples_from_folder(tmp_path, tmp_path / "labels.csv")


def _nifti_set(folder, n=32, seed=0):
    import nibabel as nib

    rng = np.random.default_rng(seed)
    rows = ["path,label,patient_id"]
    for i in range(n):
        y = i % 2
        v = rng.normal(0, 1, size=(20, 20, 12)).astype(np.float32) * 50 + 100
        v[6:14, 6:14, 3:9] += 300 * y  # a bright lesion in the positive volumes
        nib.save(nib.Nifti1Image(v, np.diag([0.8, 0.8, 3.0, 1.0])), folder / f"vol{i:03d}.nii.gz")
        rows.append(f"vol{i:03d}.nii.gz,{['normal', 'lesion'][y]},P{i}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder / "labels.csv"


def test_finetune_a_3d_backbone_on_nifti_volumes(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    labels = _nifti_set(data)
    cfg = load_config("xray", overrides=[*TINY, "model.backbone=tiny_cnn3d.random", "data.size=16",
                                         "train.finetune_epochs=4"])
    res = finetune(cfg, data=data, labels=labels, out_dir=tmp_path / "run")
    spec = torch.load(tmp_path / "run" / "model.pt", weights_only=True)["preprocess"]
    assert spec["dims"] == 3 and spec["channels"] == 1
    assert res.metrics["test"]["auc"] > 0.9
    # predict over the folder: one row per volume, the same probabilities the test report holds
    import csv

    from medtransfer.inference import predict_folder

    summary = predict_folder(tmp_path / "run", data, tmp_path / "preds.csv")
    assert summary.counts == {"ok": 32, "skipped": 1}  # labels.csv is not an image
    with open(tmp_path / "preds.csv") as f:
        got = {r["path"]: float(r["prob_lesion"]) for r in csv.DictReader(f) if r["status"] == "ok"}
    with open(tmp_path / "run" / "predictions_test.csv") as f:
        want = {r["path"]: float(r["prob_lesion"]) for r in csv.DictReader(f)}
    assert want and all(abs(got[k] - v) < 1e-5 for k, v in want.items())
    # a 2D model is told what to choose instead of failing somewhere inside
    with pytest.raises(UnsupportedImageError, match="3D NIfTI image .* Choose a 3D backbone"):
        _pre().load_image(str(data / "vol000.nii.gz"))


@pytest.mark.parametrize("augment", [[], ["augment.rotate_3d=true", "augment.rotate_degrees=10"]], ids=["in-plane", "3d"])
def test_volume_npz_into_a_3d_backbone(tmp_path, augment):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, k in zip(("train", "val", "test"), (40, 16, 16)):
        y = (np.arange(k) % 2)[:, None]
        x = rng.integers(0, 60, size=(k, 28, 28, 28))
        x[y[:, 0] == 1, 10:18, 10:18, 10:18] += 150
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = x.astype(np.uint8), y.astype(np.uint8)
    np.savez(tmp_path / "vol.npz", **arrays)
    cfg = load_config("general", overrides=[*TINY, "model.backbone=tiny_cnn3d.random", "data.size=16", *augment])
    res = finetune(cfg, data=tmp_path / "vol.npz", out_dir=tmp_path / "run")
    assert torch.load(tmp_path / "run" / "model.pt", weights_only=True)["preprocess"]["dims"] == 3
    assert res.metrics["test"]["auc"] > 0.9


def test_volume_augmentation_is_one_in_plane_transform_per_volume():
    from medtransfer.config import AugmentConfig
    from medtransfer.train.augment import augment_batch

    x = torch.zeros(2, 1, 4, 16, 16)
    x[:, :, :, 4:12, 6:10] = 1.0  # the same bar in every slice
    out = augment_batch(x, AugmentConfig(rotate_degrees=30, scale=0.1, brightness=0, contrast=0),
                        torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    for v in range(2):  # every slice of a volume moved the same way
        assert all(torch.equal(out[v, 0, 0], out[v, 0, k]) for k in range(1, 4))
    assert not torch.equal(out[0, 0, 0], out[1, 0, 0])  # but volumes differ


def test_rotate_3d_moves_content_across_slices_where_in_plane_does_not():
    from medtransfer.config import AugmentConfig, load_config
    from medtransfer.train.augment import augment_batch

    x = torch.zeros(4, 1, 9, 16, 16)
    x[:, :, 4, 4:12, 4:12] = 1.0  # one bright square in the middle slice only
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    flat = AugmentConfig(rotate_degrees=25, scale=0, brightness=0, contrast=0)
    in_plane = augment_batch(x, flat, gen())
    assert in_plane[:, :, [0, 1, 2, 3, 5, 6, 7, 8]].abs().sum() == 0  # each slice stays in its slice
    rotated = augment_batch(x, AugmentConfig(rotate_degrees=25, scale=0, brightness=0, contrast=0, rotate_3d=True), gen())
    outside = rotated[:, :, [0, 1, 2, 3, 5, 6, 7, 8]].sum(dim=(1, 2, 3, 4))
    assert (outside > 0.05 * x[0].sum()).all()  # every volume tilted out of its slice plane
    assert torch.allclose(rotated.sum(dim=(1, 2, 3, 4)), x.sum(dim=(1, 2, 3, 4)), rtol=0.1)  # a rotation keeps the mass
    assert not torch.equal(rotated[0], rotated[1])  # one transform per volume
    assert load_config("general", overrides=["augment.rotate_3d=true"]).augment.rotate_3d is True


def test_rotate_3d_flip_is_a_left_right_mirror_of_the_volume():
    from medtransfer.config import AugmentConfig
    from medtransfer.train.augment import augment_batch

    x = torch.rand(8, 1, 5, 6, 7)
    out = augment_batch(x, AugmentConfig(hflip=True, rotate_degrees=0, scale=0, brightness=0, contrast=0,
                                         rotate_3d=True), torch.Generator().manual_seed(0))
    mirrored = [torch.allclose(o, v.flip(-1), atol=1e-5) for o, v in zip(out, x)]
    kept = [torch.allclose(o, v, atol=1e-5) for o, v in zip(out, x)]
    assert all(m != k for m, k in zip(mirrored, kept)) and any(mirrored) and any(kept)


def test_a_dicom_series_folder_is_one_3d_sample():
    from conftest import shared_data
    from medtransfer.data.samples import samples_from_folder

    root = shared_data("brain_mr_dicom_studies")
    series = root / "Study3" / "11-T1post-18670"
    pre = Preprocessor(PreprocessSpec(24, 1, "tags", (0.5, 99.5), (0.5,), (0.5,), dims=3))
    x = pre.load_volume(str(series))
    assert x.shape == (1, 24, 24, 24) and 0 <= x.min() and x.max() <= 1 and x.std() > 0.05
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        labels = Path(tmp) / "labels.csv"
        labels.write_text(f"path,label\n{series},1\n{root / 'Study1' / '13_HCropVolume'},0\n")
        table = samples_from_folder(root, labels)
    assert [s.patient_id for s in table.samples] == ["PGBM-003", "PGBM-002"]  # from the series' headers


def test_a_series_and_its_nifti_reach_a_3d_model_the_same_way_round(tmp_path):
    """DICOM series come in acquisition order, NIfTI files are read in RAS order: both are put in the
    closest RAS order, so a model trained on one can be applied to the other."""
    import nibabel as nib

    from conftest import shared_data
    from medtransfer.io import read_series
    from medtransfer.io.series import list_files

    series = shared_data("brain_mr_dicom_studies") / "Study3" / "11-T1post-18670"
    vol = read_series([str(p) for p in list_files(series)])
    # the same voxels stored in another axis order (a flipped, permuted NIfTI): same physical image
    perm = np.transpose(np.flip(vol.array, 1), (2, 0, 1))
    flip = np.diag([1.0, -1.0, 1.0, 1.0])
    flip[1, 3] = vol.array.shape[1] - 1
    affine = vol.affine @ flip @ np.array([[0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1.0]])
    nib.save(nib.Nifti1Image(perm.astype(np.float32), affine), tmp_path / "same.nii.gz")
    pre = Preprocessor(PreprocessSpec(24, 1, "tags", (0.5, 99.5), (0.5,), (0.5,), dims=3))
    torch.testing.assert_close(pre.load_volume(str(tmp_path / "same.nii.gz")), pre.load_volume(str(series)),
                               atol=1e-5, rtol=0)


def test_augmentation_without_any_transform_is_skipped_and_draws_nothing():
    from medtransfer.config import AugmentConfig
    from medtransfer.train.augment import augment_batch

    x = torch.rand(3, 1, 16, 16)
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    none = AugmentConfig(rotate_degrees=0, scale=0, brightness=0, contrast=0)
    assert none.is_identity and augment_batch(x, none, gen) is x
    assert torch.equal(gen.get_state(), state)  # the generator is not advanced: later draws are unchanged
    only_contrast = AugmentConfig(rotate_degrees=0, scale=0, brightness=0, contrast=0.2)
    assert not only_contrast.is_identity and not torch.equal(augment_batch(x, only_contrast, gen), x)
