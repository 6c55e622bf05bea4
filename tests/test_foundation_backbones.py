"""Foundation-model entries: every upstream layout written here, in its own key names and file format,
and loaded strictly (each tensor loaded, adapted or listed as discarded with its reason); outputs
checked against the upstream model classes (timm, transformers' Dinov2Model, MONAI's SegResEncoder);
the sidecar contract files of a Hugging Face folder; gated weights (user file only, never exported);
the ViT stage interface and Grad-CAM layer.

Full-size checkpoints are filled cheaply (built on the meta device, then uniform values), so the
files have the registry entries' real shapes without the cost of random initialisation."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from typer.testing import CliRunner

from medtransfer.backbones import get_weight_spec, import_weights, load_backbone, read_state_dict
from medtransfer.backbones.catalog_foundation import RAD_DINO_PREPROCESSOR
from medtransfer.backbones.checkpoint import CheckpointError
from medtransfer.backbones.store import ExportRefusedError, export_weights
from medtransfer.backbones.vit import ViTFeatures
from medtransfer.backbones.vit_layouts import UPSTREAM_ONLY, layout_hf_dinov2
from medtransfer.cli.main import app
from medtransfer.errors import WeightsUnavailableError

timm = pytest.importorskip("timm")


def _filled(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """``model`` (possibly on the meta device) with every parameter uniform in ±0.05 and BatchNorm
    statistics at (0, 1); layer-scale / norm weights thereby far from their initial values."""
    if any(p.is_meta for p in model.parameters()):
        model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-0.05, 0.05, generator=g)
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.fill_(1.0)
            elif name.endswith("running_mean") or name.endswith("num_batches_tracked"):
                b.zero_()
    return model.eval()


def _meta(build):
    with torch.device("meta"):
        return build()


def test_dinov2_timm_hub_file_loads_strictly_and_matches_timm(tmp_path):
    spec = get_weight_spec("vit_small_patch14_dinov2.lvd142m")
    ref = _filled(_meta(lambda: timm.create_model("vit_small_patch14_dinov2", num_classes=0, dynamic_img_size=True)))
    path = tmp_path / "model.safetensors"
    save_file(ref.state_dict(), str(path))  # timm's hub file: the bare model's tensors
    model, report = load_backbone(spec, 1, path, input_size=56)
    assert not report.missing and not report.unexpected and not report.discarded
    assert [a["key"] for a in report.adapted] == ["model.patch_embed.proj.weight"]
    assert len(report.loaded) == len(ref.state_dict()) - 1
    assert "resampled (bicubic) to 4 x 4" in report.input_grid and "Apache-2.0" in report.licence
    x = torch.rand(2, 1, 56, 56)
    with torch.no_grad():  # a gray image through summed kernels = the same image in three channels
        torch.testing.assert_close(model.eval()(x), ref(x.repeat(1, 3, 1, 1)), atol=1e-5, rtol=1e-4)


def test_hf_dinov2_layout_matches_transformers_dinov2model(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.Dinov2Config(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, image_size=56,
                                       patch_size=14, layerscale_value=0.5)
    hf = _filled(transformers.Dinov2Model(config))
    hf.save_pretrained(tmp_path)  # model.safetensors + config.json, as on the Hub
    mapped = layout_hf_dinov2(read_state_dict(tmp_path / "model.safetensors"))
    assert set(k for k in mapped if k.startswith(UPSTREAM_ONLY)) == {UPSTREAM_ONLY + "embeddings.mask_token"}
    ours = ViTFeatures("vit_small_patch14_dinov2", 3, embed_dim=48, depth=2, num_heads=3, img_size=56).eval()
    ours.load_state_dict({k: v for k, v in mapped.items() if not k.startswith(UPSTREAM_ONLY)}, strict=True)
    x = torch.rand(2, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(pixel_values=x).pooler_output, atol=1e-5, rtol=1e-4)


def _rad_dino_folder(tmp_path, preprocessor=RAD_DINO_PREPROCESSOR, tensors=True, **config_changes):
    """A microsoft/rad-dino snapshot folder: HF-named tensors of the full-size model (names and shapes from
    transformers' Dinov2Model; one placeholder tensor without ``tensors``), config.json and
    preprocessor_config.json."""
    transformers = pytest.importorskip("transformers")
    config = transformers.Dinov2Config(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, image_size=518,
                                       patch_size=14, layerscale_value=1.0)
    folder = tmp_path / "rad-dino"
    folder.mkdir()
    state = ({k: v.contiguous() for k, v in _filled(_meta(lambda: transformers.Dinov2Model(config))).state_dict().items()}
             if tensors else {"layernorm.weight": torch.ones(768)})
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg = {**config.to_dict(), "architectures": ["Dinov2Model"], **config_changes}
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "preprocessor_config.json").write_text(json.dumps({**preprocessor, "image_processor_type": "BitImageProcessor"}))
    return folder


def test_rad_dino_hub_folder_loads_strictly_and_its_contract_files_are_checked(tmp_path):
    spec = get_weight_spec("vit_base_patch14_dinov2.rad_dino")
    folder = _rad_dino_folder(tmp_path)
    model, report = load_backbone(spec, 1, folder / "model.safetensors", input_size=518)
    assert not report.missing and not report.unexpected
    assert [d["key"] for d in report.discarded] == [UPSTREAM_ONLY + "embeddings.mask_token"]
    assert [c.split(":")[0] for c in report.checked_files] == ["config.json", "preprocessor_config.json"]
    assert "no resampling" in report.input_grid and "MSRLA" in report.licence
    assert model.model.pos_embed.shape == (1, 1 + 37 * 37, 768)
    bad_mean = {**RAD_DINO_PREPROCESSOR, "image_mean": [0.5, 0.5, 0.5]}
    (folder / "preprocessor_config.json").write_text(json.dumps(bad_mean))
    with pytest.raises(CheckpointError, match=r"image_mean: \[0.5, 0.5, 0.5\] \(the registry expects \[0.5307"):
        load_backbone(spec, 1, folder / "model.safetensors")


def test_rad_dino_config_of_another_architecture_is_refused(tmp_path):
    folder = _rad_dino_folder(tmp_path, tensors=False, hidden_size=1024)  # refused before any tensor is read
    with pytest.raises(CheckpointError, match="architecture.*hidden_size: 1024"):
        load_backbone(get_weight_spec("vit_base_patch14_dinov2.rad_dino"), 1, folder / "model.safetensors")


def test_biomedclip_open_clip_pickle_keeps_the_image_trunk_only(tmp_path):
    spec = get_weight_spec("vit_base_patch16_224.biomedclip")
    trunk = _filled(_meta(lambda: timm.create_model("vit_base_patch16_224", num_classes=0, dynamic_img_size=True)))
    ckpt = {f"visual.trunk.{k}": v for k, v in trunk.state_dict().items()}
    # the rest of the open_clip model: the image projection, (a few tensors of) the PubMedBERT text tower
    ckpt.update({"visual.head.proj.weight": torch.randn(512, 768), "logit_scale": torch.tensor(4.6),
                 "text.transformer.embeddings.word_embeddings.weight": torch.randn(8, 768),
                 "text.transformer.encoder.layer.0.attention.self.query.weight": torch.randn(768, 768),
                 "text.proj.0.weight": torch.randn(640, 768), "text.proj.2.weight": torch.randn(512, 640)})
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(ckpt, path)  # a plain pickle of tensors, read with torch.load(weights_only=True)
    model, report = load_backbone(spec, 1, path, input_size=224)
    assert not report.missing and not report.unexpected
    assert {d["key"] for d in report.discarded} == {UPSTREAM_ONLY + k for k in ckpt if not k.startswith("visual.trunk.")}
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), trunk(x.repeat(1, 3, 1, 1)), atol=1e-5, rtol=1e-4)


class _Unrelated:
    """A class a pickle would have to import and build: never loaded."""


def test_a_biomedclip_pickle_needing_python_objects_is_refused(tmp_path):
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save({"state_dict": {"visual.trunk.cls_token": torch.zeros(1, 1, 768)}, "extra": _Unrelated()}, path)
    with pytest.raises(CheckpointError, match="arbitrary Python objects"):
        load_backbone(get_weight_spec("vit_base_patch16_224.biomedclip"), 3, path)


def test_ct_fm_segresnet_encoder_file_loads_and_pools_the_last_level(tmp_path):
    from monai.networks.nets.segresnet_ds import SegResEncoder

    spec = get_weight_spec("segresnet_encoder3d.ct_fm")
    ref = _filled(_meta(lambda: SegResEncoder(spatial_dims=3, init_filters=32, in_channels=1, blocks_down=(1, 2, 2, 4, 4))))
    folder = tmp_path / "ct_fm_feature_extractor"
    folder.mkdir()
    save_file(ref.state_dict(), str(folder / "model.safetensors"))  # huggingface_hub's model mixin
    (folder / "config.json").write_text(json.dumps({"blocks_down": [1, 2, 2, 4, 4], "in_channels": 1,
                                                    "init_filters": 32, "spatial_dims": 3}))
    model, report = load_backbone(spec, 1, folder / "model.safetensors")
    assert not report.missing and not report.unexpected and not report.adapted
    assert len(report.loaded) == len(ref.state_dict()) and report.checked_files[0].startswith("config.json")
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), F.adaptive_avg_pool3d(ref(x)[-1], 1).flatten(1))
        assert [f.shape[1] for f in model.forward_stages(x)] == list(model.stage_channels) == [32, 64, 128, 256, 512]
    assert spec.ct.orientation == "SPL" and spec.ct.hu_window == (-1024.0, 2048.0)


def test_gated_weights_come_only_from_the_users_file_and_are_never_exported(tmp_path):
    spec = get_weight_spec("vit_base_patch16_dinov3.lvd1689m")
    assert not spec.redistributable
    with pytest.raises(WeightsUnavailableError, match="Gated: request access at https://huggingface.co/timm/.*Licence: DINOv3"):
        load_backbone(spec, 3, "pretrained")
    # built on the CPU: its rotary embedding's frequencies are buffers that to_empty would leave unset
    ref = _filled(timm.create_model("vit_base_patch16_dinov3", num_classes=0, global_pool="token"))
    path = tmp_path / "model.safetensors"
    save_file(ref.state_dict(), str(path))
    import_weights(path, spec.name)  # the user's own copy, into the cache
    model, report = load_backbone(spec, 1, "pretrained", input_size=128)
    assert report.source.startswith("cache") and "DINOv3 License" in report.licence
    assert "rotary position embeddings" in report.input_grid
    with torch.no_grad():
        x = torch.rand(1, 1, 64, 64)
        torch.testing.assert_close(model.eval()(x), ref(x.repeat(1, 3, 1, 1)), atol=1e-5, rtol=1e-4)
    with pytest.raises(ExportRefusedError, match="its licence is DINOv3 License"):
        export_weights(spec.name, tmp_path / "carry")
    result = CliRunner().invoke(app, ["weights", "export", spec.name, "--to", str(tmp_path / "carry")])
    assert result.exit_code == 2 and "DINOv3 License" in result.output
    assert not (tmp_path / "carry").exists()
    for name in ("vit_large_patch16_224.uni", "vit_large_patch16_224.retfound_cfp"):
        gated = get_weight_spec(name)
        assert not gated.redistributable and "NC" in gated.license and not gated.sources[0].available(name)


def test_vit_stage_interface_and_grad_cam_layer():
    from medtransfer.evaluation.saliency import SaliencyExplainer
    from medtransfer.transfer import TransferModel

    spec = get_weight_spec("vit_small_patch14_dinov2.lvd142m")
    backbone = _filled(load_backbone(spec, 1, "none")[0])
    x = torch.rand(2, 1, 70, 70)
    maps = backbone.forward_stages(x)
    assert backbone.stage_names == tuple(f"blocks.{i}" for i in range(12)) and backbone.stage_channels == (384,) * 12
    assert [tuple(m.shape) for m in maps] == [(2, 384, 5, 5)] * 12
    seen = []
    backbone.get_submodule(spec.cam_layer).register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    backbone(x)
    assert seen == [(2, 384, 5, 5)]  # the tokens entering the last block, as a map
    cam = SaliencyExplainer(TransferModel(backbone, 2).eval(), "gradcam", spec.name).explain(x, [1, 0])
    assert cam.shape == (2, 70, 70) and float(cam.max()) == pytest.approx(1.0) and float(cam.min()) == 0.0


@pytest.mark.parametrize("name, size, patch, mean, licence", [
    ("vit_small_patch14_dinov2.lvd142m", 518, 14, (0.485, 0.456, 0.406), "Apache-2.0"),
    ("vit_base_patch14_dinov2.lvd142m", 518, 14, (0.485, 0.456, 0.406), "Apache-2.0"),
    ("vit_base_patch14_dinov2.rad_dino", 518, 14, (0.5307,) * 3, "MSRLA"),
    ("vit_base_patch16_224.biomedclip", 224, 16, (0.48145466, 0.4578275, 0.40821073), "MIT"),
    ("segresnet_encoder3d.ct_fm", (160, 160, 160), None, (0.0,), "Apache-2.0"),
    ("vit_large_patch16_224.uni", 224, 16, (0.485, 0.456, 0.406), "CC-BY-NC-ND 4.0"),
    ("vit_large_patch16_224.retfound_cfp", 224, 16, (0.485, 0.456, 0.406), "CC BY-NC 4.0"),
    ("vit_base_patch16_dinov3.lvd1689m", 256, 16, (0.485, 0.456, 0.406), "DINOv3 License"),
])
def test_foundation_entries_record_their_input_contract(name, size, patch, mean, licence):
    spec = get_weight_spec(name)
    d = spec.to_dict()
    assert (d["input_size"], d["patch_size"], tuple(d["mean"])) == (size, patch, mean)
    assert licence in d["license"] and d["in_channels"] in (1, 3) and d["cam_layer"]
    assert d["redistributable"] == (licence in ("Apache-2.0", "MSRLA", "MIT"))
