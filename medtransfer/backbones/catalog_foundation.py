"""Foundation-model weights: DINOv2, RAD-DINO, BiomedCLIP's image tower, CT-FM, and the gated ones
(UNI, RETFound, DINOv3) that only a user-supplied file provides.

Every entry records its input contract: the size it was trained at, the patch size, the channels and
the normalisation (the preprocessing applies them; :func:`~medtransfer.backbones.vit.describe_input_grid`
says in the load report how another size is adapted). Gray images get the summed RGB kernels of the
patch embedding, as CNN stems do.
"""
from __future__ import annotations

from medtransfer.backbones.registry import Stage, WeightSpec, register
from medtransfer.backbones.segresnet import segresnet_encoder_builder
from medtransfer.backbones.sources import HubSource, ManualSource
from medtransfer.backbones.vit import vit_builder
from medtransfer.data.ct import CTPreprocessing

IMAGENET = "ImageNet mean/std on [0, 1]"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_VIT = dict(first_conv="model.patch_embed.proj", classifier="model.head", cam_layer="token_map")

# --- DINOv2 (timm's copies of facebookresearch/dinov2 on the Hugging Face Hub) ----------------------
for _size, _dim in (("small", 384), ("base", 768)):
    _arch = f"vit_{_size}_patch14_dinov2"
    register(
        WeightSpec(
            name=f"{_arch}.lvd142m",
            builder=vit_builder(_arch),
            **_VIT,
            input_size=518,
            patch_size=14,
            license="Apache-2.0 (facebookresearch/dinov2 weights, as republished by timm)",
            sources=(HubSource(f"timm/{_arch}.lvd142m", "model.safetensors"),),
            key_layout="timm",
            upstream_file="model.safetensors",
            intensity=IMAGENET,
            description=f"DINOv2 ViT-{_size[0].upper()}/14 ({_dim}-d class token), self-supervised on LVD-142M "
                        "natural images; the general default",
            attribution="Oquab et al., 'DINOv2: Learning Robust Visual Features without Supervision', TMLR 2024",
            extra={"pooling": "class token after the final norm", "layer_scale": True},
        )
    )

# --- RAD-DINO (microsoft/rad-dino: a Hugging Face Dinov2Model) ---------------------------------------
RAD_DINO_PREPROCESSOR = {"image_mean": [0.5307, 0.5307, 0.5307], "image_std": [0.2583, 0.2583, 0.2583],
                         "crop_size": {"height": 518, "width": 518}, "size": {"shortest_edge": 518}}
RAD_DINO_CONFIG = {"model_type": "dinov2", "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                   "patch_size": 14, "image_size": 518, "mlp_ratio": 4, "use_swiglu_ffn": False}
register(
    WeightSpec(
        name="vit_base_patch14_dinov2.rad_dino",
        builder=vit_builder("vit_base_patch14_dinov2"),
        **_VIT,
        mean=tuple(RAD_DINO_PREPROCESSOR["image_mean"]),
        std=tuple(RAD_DINO_PREPROCESSOR["image_std"]),
        intensity="[0, 1] then (x - 0.5307) / 0.2583 (its preprocessor_config.json: BitImageProcessor, shortest "
                  "edge resized to 518 px, bicubic, centre crop 518)",
        input_size=518,
        patch_size=14,
        license="MSRLA (Microsoft Research License Agreement, per the microsoft/rad-dino model card): research use "
                "only, not for clinical practice",
        sources=(HubSource("microsoft/rad-dino", "model.safetensors"),),
        key_layout="hf_dinov2",
        discard=("upstream_only.",),
        upstream_file="model.safetensors",
        description="RAD-DINO ViT-B/14: DINOv2 continued on chest X-rays (MIMIC-CXR, CheXpert, NIH, PadChest, BRAX); "
                    "classify on its class token",
        attribution="Pérez-García et al., 'Exploring scalable medical image encoders beyond text supervision', "
                    "Nature Machine Intelligence 2025 (Microsoft Health Futures)",
        extra={"hf_config": RAD_DINO_CONFIG, "hf_preprocessor": RAD_DINO_PREPROCESSOR,
               "pooling": "class token after the final norm (the Dinov2Model pooler_output)"},
    )
)

# --- BiomedCLIP image tower (open_clip checkpoint; the weights are a pickle) -------------------------
register(
    WeightSpec(
        name="vit_base_patch16_224.biomedclip",
        builder=vit_builder("vit_base_patch16_224"),
        **_VIT,
        mean=CLIP_MEAN,
        std=CLIP_STD,
        intensity="CLIP mean/std on [0, 1] (open_clip_config.json preprocess_cfg)",
        input_size=224,
        patch_size=16,
        license="MIT (microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224); the model card asks for research use "
                "only",
        sources=(HubSource("microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224", "open_clip_pytorch_model.bin"),),
        key_layout="open_clip_visual",
        discard=("upstream_only.",),
        upstream_file="open_clip_pytorch_model.bin",
        description="BiomedCLIP image encoder (timm ViT-B/16 trunk of open_clip, 768-d class token; the 512-d "
                    "image-text projection and the PubMedBERT text tower are discarded), trained on PMC-15M figures",
        attribution="Zhang et al., 'A Multimodal Biomedical Foundation Model Trained from Fifteen Million Image-Text "
                    "Pairs', NEJM AI 2025",
        extra={"file_format": "PyTorch pickle: read with torch.load(weights_only=True); a file that needs other "
                              "Python objects is refused", "pooling": "class token after the final norm"},
    )
)

# --- CT-FM (project-lighter/ct_fm_feature_extractor: MONAI SegResEncoder, safetensors) ----------------
_CTFM_CT = CTPreprocessing(orientation="SPL", spacing_mm=(1.0, 1.0, 1.0), hu_window=(-1024.0, 2048.0),
                           size=(160, 160, 160),
                           axis_order="[B, 1, D, H, W]: array axes of the SPL-oriented volume (S, P, L)",
                           channels="1 channel: HU through the window, scaled to [0, 1]")
register(
    WeightSpec(
        name="segresnet_encoder3d.ct_fm",
        builder=segresnet_encoder_builder(32, (1, 2, 2, 4, 4)),
        dims=3,
        in_channels=1,
        mean=(0.0,),
        std=(1.0,),
        intensity="CT in HU, window [-1024, 2048] scaled to [0, 1]; SPL orientation, 1 mm isotropic, 160^3",
        input_size=(160, 160, 160),
        first_conv="conv_init",
        classifier="classifier",
        cam_layer="layers.4.blocks",
        license="Apache-2.0 (project-lighter/ct_fm_feature_extractor)",
        sources=(HubSource("project-lighter/ct_fm_feature_extractor", "model.safetensors"),),
        key_layout="same",
        upstream_file="model.safetensors",
        ct=_CTFM_CT,
        stages=tuple(Stage(f"layers.{i}", 32 * 2**i, (2**i,) * 3) for i in range(5)),
        description="CT-FM 3D SegResNet encoder (77.8M parameters, 512 features), contrastive self-supervised "
                    "pretraining on 148,000 CT scans of the Imaging Data Commons",
        attribution="Pai et al., 'Vision Foundation Models for Computed Tomography', arXiv:2501.09001 (project-lighter)",
        extra={"hf_config": {"spatial_dims": 3, "in_channels": 1, "init_filters": 32, "blocks_down": [1, 2, 2, 4, 4]},
               "upstream_preprocessing": "Orientation SPL, Spacing 1 mm, ScaleIntensityRange(-1024, 2048 -> 0, 1, "
                                         "clip), 320^3 whole volume or 160^3 around a mask (extract_feat_LP.py)"},
    )
)

# --- gated or non-commercial: only from a file the user places (weights import), never exported ------
_GATED = "Gated: request access at {url}, accept its terms, download '{file}' yourself."
for _name, _arch, _kw, _file, _url, _licence, _layout_discard, _desc in (
    ("vit_large_patch16_224.uni", "vit_large_patch16_224", {"init_values": 1e-5}, "pytorch_model.bin",
     "https://huggingface.co/MahmoodLab/UNI",
     "CC-BY-NC-ND 4.0 (MahmoodLab/UNI): non-commercial academic research only, no redistribution (gated)", (),
     "UNI ViT-L/16 pathology foundation model (Mass General Brigham), DINOv2 on 100M H&E tiles"),
    ("vit_large_patch16_224.retfound_cfp", "vit_large_patch16_224", {}, "RETFound_mae_natureCFP.pth",
     "https://huggingface.co/YukunZhou/RETFound_mae_natureCFP",
     "CC BY-NC 4.0 (rmaphoh/RETFound_MAE): non-commercial use only (gated)", ("model.decoder_", "model.mask_token"),
     "RETFound ViT-L/16 retinal foundation model, MAE on 904k colour fundus photographs (decoder discarded)"),
    ("vit_base_patch16_dinov3.lvd1689m", "vit_base_patch16_dinov3", {}, "model.safetensors",
     "https://huggingface.co/timm/vit_base_patch16_dinov3.lvd1689m",
     "DINOv3 License (Meta; gated, https://ai.meta.com/resources/models-and-libraries/dinov3-license/)", (),
     "DINOv3 ViT-B/16 (distilled), self-supervised on LVD-1689M; rotary position embeddings, 4 registers"),
):
    register(
        WeightSpec(
            name=_name,
            builder=vit_builder(_arch, **_kw),
            **_VIT,
            input_size=256 if "dinov3" in _arch else 224,
            patch_size=16,
            license=_licence,
            redistributable=False,
            sources=(ManualSource(_file, _GATED.format(url=_url, file=_file)),),
            key_layout="timm",
            discard=_layout_discard,
            upstream_file=_file,
            intensity=IMAGENET,
            description=_desc + " (file-only source)",
            extra={"access": _url, "pooling": "class token after the final norm"},
        )
    )
