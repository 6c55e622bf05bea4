"""Volumes through a 2D backbone: slice and view encoders, pooling over slices, the recipe that picks
them, and prediction on DICOM series with the same encoder."""
import csv

import numpy as np
import pytest
import torch

from conftest import shared_data
from medtransfer.backbones import get_weight_spec, load_backbone
from medtransfer.config import load_config
from medtransfer.data.profile import DataProfile, plan_recipe
from medtransfer.errors import ConfigError
from medtransfer.inference import predict_folder
from medtransfer.run import load_run
from medtransfer.train.finetune import finetune
from medtransfer.transfer import layer_groups
from medtransfer.transfer.volume import SliceEncoder, SlicePool
from test_pipeline import TINY, _planted_npz


def _lite0(channels):
    try:
        return load_backbone(get_weight_spec("efficientnet_lite0.in1k"), channels, "pretrained")[0].eval()
    except Exception as exc:  # the pip weights package is part of the base install; say so if missing
        pytest.skip(f"EfficientNet-Lite0 weights not installed: {exc}")


def test_one_gray_slice_gives_exactly_the_2d_backbones_features():
    image = _lite0(1)
    enc = SliceEncoder(image, group=1).eval()
    x = torch.rand(2, 5, 48, 48)
    with torch.no_grad():
        tokens = enc(x)
        direct = torch.stack([image(x[:, i:i + 1]) for i in range(5)], dim=1)
    assert tokens.shape == (2, 5, image.num_features)
    torch.testing.assert_close(tokens, direct, rtol=0, atol=1e-6)  # no hidden re-scaling of the slices


def test_slice_triplets_are_the_neighbours_as_rgb_with_the_pretrained_stem():
    image = _lite0(3)
    enc = SliceEncoder(image, group=3).eval()
    x = torch.rand(1, 4, 48, 48)
    with torch.no_grad():
        tokens = enc(x)
        middle = image(x[:, 0:3])  # slice 1 with its neighbours 0 and 2
        edge = image(torch.stack([x[:, 0], x[:, 0], x[:, 1]], dim=1))  # slice 0: its missing neighbour repeated
    # 1e-4: a batch of 4 slice images and a batch of 1 take different oneDNN reduction orders
    torch.testing.assert_close(tokens[:, 1], middle, rtol=0, atol=1e-4)
    torch.testing.assert_close(tokens[:, 0], edge, rtol=0, atol=1e-4)


def test_views_take_slices_along_each_axis_and_stride_subsamples():
    class Mean(torch.nn.Module):
        num_features = 1

        def forward(self, x):
            return x.mean(dim=(1, 2, 3))[:, None]

    x = torch.zeros(1, 8, 8, 8)
    x[0, 2] = 1.0  # one bright axial slice
    axial = SliceEncoder(Mean(), group=1)(x)[0, :, 0]
    assert axial.tolist() == [0, 0, 1, 0, 0, 0, 0, 0]
    assert SliceEncoder(Mean(), group=1, stride=3)(x).shape == (1, 3, 1)
    views = SliceEncoder(Mean(), ("axial", "coronal", "sagittal"), group=1)(x)[0, :, 0]
    assert views.shape == (8 + 8 + 8,)
    # Every coronal and sagittal slice crosses the bright axial slice: 1 of its 8 rows.
    torch.testing.assert_close(views[8:], torch.full((16,), 1 / 8))
    # A non-cubic volume: coronal / sagittal slices are resized to the axial in-plane size.
    assert SliceEncoder(Mean(), ("axial", "coronal"), group=1)(torch.zeros(2, 5, 8, 8)).shape == (2, 5 + 8, 1)


def test_attention_weights_sum_to_one_per_volume_and_follow_the_slices():
    pool = SlicePool(16, "attention")
    tokens = torch.randn(3, 7, 16)
    w = pool.weights(tokens)
    torch.testing.assert_close(w.sum(dim=1), torch.ones(3))
    assert (w > 0).all()
    perm = torch.randperm(7)
    torch.testing.assert_close(pool(tokens[:, perm]), pool(tokens), rtol=1e-5, atol=1e-6)  # a set of slices
    mean, peak = SlicePool(16, "mean"), SlicePool(16, "max")
    torch.testing.assert_close(mean(tokens), mean.norm(tokens).mean(dim=1))
    torch.testing.assert_close(peak(tokens), peak.norm(tokens).amax(dim=1))


def test_slice_encoder_keeps_the_2d_backbones_layer_groups():
    image = _lite0(3)
    direct = layer_groups(image)
    wrapped = layer_groups(SliceEncoder(image))
    assert [g.name for g in wrapped] == [g.name for g in direct]
    assert [len(g.params) for g in wrapped] == [len(g.params) for g in direct]
    assert wrapped[0].param_names[0] == "image." + direct[0].param_names[0]


@pytest.fixture(scope="module")
def sliced_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sliced")
    npz = _planted_npz(tmp / "v.npz", (16, 28, 28), lambda rng, k: rng.integers(0, 2, size=(k, 1)))
    cfg = load_config("xray", overrides=[*TINY, "train.head_epochs=3", "train.finetune_epochs=2",
                                         "model.volume_encoder=slices"])
    res = finetune(cfg, data=npz, out_dir=tmp / "run")
    return res, npz


def test_a_sliced_run_learns_and_says_which_encoder_it_used(sliced_run):
    res, _ = sliced_run
    assert res.metrics["test"]["auc"] > 0.9
    text = (res.run_dir / "config.yaml").read_text()
    assert "volume_encoder: slices" in text
    assert "attention pooling" in res.load_report.volume_encoder
    run = load_run(res.run_dir, device="cpu")
    assert isinstance(run.model.backbone, SliceEncoder)
    assert (run.pre.spec.dims, run.pre.spec.depth) == (3, 16)
    card = (res.run_dir / "model_card.md").read_text()
    assert "slices" in card and "attention" in card


def test_rebuilt_sliced_run_gives_the_test_report_probabilities(sliced_run):
    res, npz = sliced_run
    run = load_run(res.run_dir, device="cpu")
    arrays = np.load(npz)
    x = torch.stack([run.pre.load_npz_volume(a) for a in arrays["test_images"][:8]])
    with torch.no_grad():
        prob = run.model.probabilities(run.model(run.pre.normalize(x)))[:, 1].numpy()
    with open(res.run_dir / "predictions_test.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))[:8]
    np.testing.assert_allclose(prob, [float(r["prob_1"]) for r in rows], atol=1e-5)


def test_predict_on_a_dicom_series_uses_the_same_encoder(sliced_run, tmp_path):
    studies = shared_data("brain_mr_dicom_studies")
    res, _ = sliced_run
    s = predict_folder(res.run_dir, studies / "Study1", tmp_path / "p.csv", batch_size=2)
    rows = list(csv.DictReader(open(s.out_csv, newline="")))
    assert rows and all(r["status"] == "ok" for r in rows)
    run = load_run(res.run_dir, device="cpu")
    first = rows[0]
    x, _ = run.pre.load_series(first["files"].split(";"))
    assert x.shape == (16, 32, 32)  # the series resampled to the trained depth, slices through the 2D backbone
    with torch.no_grad():
        p = run.model.probabilities(run.model(run.pre.normalize(x[None])))[0, 1].item()
    assert float(first["prob_1"]) == pytest.approx(p, abs=1e-5)


def test_channels_encoder_is_still_available_and_old_runs_load_as_channels(tmp_path):
    npz = _planted_npz(tmp_path / "v.npz", (16, 28, 28), lambda rng, k: rng.integers(0, 2, size=(k, 1)))
    res = finetune(load_config("xray", overrides=[*TINY, "model.volume_encoder=channels"]), data=npz,
                   out_dir=tmp_path / "run")
    ckpt = torch.load(tmp_path / "run" / "model.pt", map_location="cpu", weights_only=True)
    assert (ckpt["preprocess"]["channels"], ckpt["preprocess"].get("dims", 2)) == (16, 2)
    ckpt["config"]["model"].pop("volume_encoder")  # as written by the previous release
    torch.save(ckpt, tmp_path / "run" / "model.pt")
    run = load_run(tmp_path / "run", device="cpu")
    assert not isinstance(run.model.backbone, SliceEncoder)
    assert res.metrics["test"]["auc"] > 0.9


def test_auto_is_channels_for_a_volume_npz_and_slices_for_volume_files(tmp_path):
    import nibabel as nib

    from medtransfer.config import ModelConfig
    from medtransfer.data.datasets import resolve_samples
    from medtransfer.train.classifier import _resolved_volume_encoder

    npz = _planted_npz(tmp_path / "v.npz", (8, 28, 28), lambda rng, k: rng.integers(0, 2, size=(k, 1)), n=(6, 4, 4))
    assert _resolved_volume_encoder(ModelConfig(), resolve_samples(npz, None)) == "channels"
    rows = ["path,label,patient_id"]
    for i in range(4):
        nib.save(nib.Nifti1Image(np.random.rand(12, 12, 6).astype(np.float32), np.eye(4)), tmp_path / f"v{i}.nii.gz")
        rows.append(f"v{i}.nii.gz,{i % 2},p{i}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    table = resolve_samples(tmp_path, tmp_path / "labels.csv")
    assert _resolved_volume_encoder(ModelConfig(), table) == "slices"
    assert _resolved_volume_encoder(ModelConfig(backbone="tiny_cnn3d.random"), table) == "channels"  # a 3D backbone


def test_slice_encoders_refuse_2d_images(tmp_path):
    npz = _planted_npz(tmp_path / "i.npz", (28, 28), lambda rng, k: rng.integers(0, 2, size=(k, 1)))
    with pytest.raises(ConfigError, match="data are 2D images"):
        finetune(load_config("xray", overrides=[*TINY, "model.volume_encoder=slices"]), data=npz,
                 out_dir=tmp_path / "run")


def test_ensemble_members_share_one_feature_pass(tmp_path, monkeypatch):
    from medtransfer.train import validation

    npz = _planted_npz(tmp_path / "v.npz", (8, 28, 28), lambda rng, k: rng.integers(0, 2, size=(k, 1)),
                       n=(40, 16, 16))
    overrides = ["model.backbone=efficientnet_lite0.in1k", "data.size=32", "train.head_epochs=2",
                 "train.finetune_epochs=0", "train.head_augment=false", "train.ensemble=2", "model.stages=-1",
                 "model.volume_encoder=slices"]
    _lite0(3)
    passes = []
    real = validation.extract_features

    def counted(encode, loader, root, **kw):
        passes.append(str(root))
        return real(encode, loader, root, **kw)

    monkeypatch.setattr(validation, "extract_features", counted)
    res = finetune(load_config("general", overrides=overrides), data=npz, out_dir=tmp_path / "run")
    assert len(passes) == 2  # train + val once, for both members
    assert len(res.metrics["members"]) == 2
    assert not (tmp_path / "run" / ".feature_cache").exists()


@pytest.mark.parametrize("shape, stride", [((28, 28, 28), 1), ((64, 64, 64), 1), ((512, 256, 256), 4)])
def test_recipe_plans_the_slice_encoders_cost_when_asked(shape, stride):
    profile = DataProfile(3, 1, shape, "binary", 2, 1188, 98, 298)
    assert not any("volume_encoder" in o for o in plan_recipe(profile).overrides())  # default: channels
    r = plan_recipe(profile, volume_encoder="slices")
    o = r.overrides()
    assert "model.volume_encoder=slices" in o and "model.stages=-1" in o and "train.finetune_epochs=0" in o
    assert f"model.slice_stride={stride}" in o
    assert r.estimated_minutes <= 12.0 + 1e-6
    assert any("attention pooling" in why for why in r.reasons)
    views = plan_recipe(profile, volume_encoder="views")
    assert "model.volume_encoder=views" in views.overrides()
    views_stride = int(next(o for o in views.overrides() if "slice_stride" in o).split("=")[1])
    assert views_stride >= stride and views.estimated_minutes <= 12.0 + 1e-6  # 3 directions cost more
    assert "train.time_limit_minutes=18" in o


def test_negative_stages_drop_the_last_stages():
    from medtransfer.config import ModelConfig
    from medtransfer.transfer.volume import build_backbone

    spec = get_weight_spec("tiny_cnn.random")
    full, _ = build_backbone(spec, ModelConfig(backbone="tiny_cnn.random", weights="none"), 1, "none")
    cut, _ = build_backbone(spec, ModelConfig(backbone="tiny_cnn.random", weights="none", stages=-1), 1, "none")
    assert cut.num_features == full.num_features // 2  # tiny CNN: channels double per stage, the last one gone
    with pytest.raises(ConfigError, match="would drop all"):
        build_backbone(spec, ModelConfig(backbone="tiny_cnn.random", stages=-full.num_stages), 1, "none")


def test_sliced_run_exports_with_its_volume_contract(sliced_run, tmp_path):
    from medtransfer.inference.export import export_run
    from medtransfer.inference.export import export_contract

    res, _ = sliced_run
    out = export_run(res.run_dir, tmp_path / "model.pt", "torchscript")  # checked against PyTorch inside
    assert out.is_file()
    contract = export_contract(load_run(res.run_dir, device="cpu"))
    assert contract["input"]["shape"] == ["batch", 16, 32, 32]
    assert "16 slices" in contract["input"]["preprocessing"]
