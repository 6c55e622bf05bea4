"""Key layouts of vision-transformer checkpoints → :class:`~medtransfer.backbones.vit.ViTFeatures` names.

* ``hf_dinov2``: a Hugging Face ``Dinov2Model`` file (``model.safetensors`` as ``save_pretrained``
  writes it, e.g. ``microsoft/rad-dino``): ``embeddings.*`` / ``encoder.layer.<i>.*`` / ``layernorm.*``.
  The separate query, key and value projections are concatenated (in that order) into timm's one
  ``attn.qkv``; the mask token (used only by DINOv2's masked pretraining) and the classifier of a task model
  (``Dinov2ForImageClassification``, whose backbone sits under ``dinov2.``) go to ``upstream_only.``.
* ``open_clip_visual``: an open_clip checkpoint of a CLIP model whose image tower is a timm model
  (``visual.trunk.*``, e.g. BiomedCLIP): the trunk is kept; the image projection into the joint
  image-text space (``visual.head.*``), the text tower (``text.*``) and ``logit_scale`` go to
  ``upstream_only.`` so the loader lists them as discarded.

Both end under ``model.``, where :class:`ViTFeatures` keeps the timm model. Tensors of no known
upstream name pass through unchanged, so the loader reports them as unexpected (never dropped).
"""
from __future__ import annotations

import re

import torch

UPSTREAM_ONLY = "upstream_only."
_HF_BLOCK = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
_HF_BLOCK_NAMES = {
    "norm1": "norm1", "norm2": "norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
    "attention.output.dense": "attn.proj", "attention.o_proj": "attn.proj",
}
_HF_QKV = {"attention.attention.query": 0, "attention.attention.key": 1, "attention.attention.value": 2,
           "attention.q_proj": 0, "attention.k_proj": 1, "attention.v_proj": 2}
_HF_TOP = {
    "embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed",
    "embeddings.register_tokens": "reg_token", "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias", "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias", "embeddings.mask_token": UPSTREAM_ONLY + "embeddings.mask_token",
}


def _hf_block_key(i: str, rest: str) -> tuple[str, int | None]:
    """``(timm name, qkv slot)`` of one tensor of HF block ``i`` (slot None unless q, k or v)."""
    module, _, leaf = rest.rpartition(".")
    if module in _HF_QKV:
        return f"blocks.{i}.attn.qkv.{leaf}", _HF_QKV[module]
    if module in _HF_BLOCK_NAMES:
        return f"blocks.{i}.{_HF_BLOCK_NAMES[module]}.{leaf}", None
    if rest in ("layer_scale1.lambda1", "layer_scale2.lambda1"):
        return f"blocks.{i}.ls{rest[11]}.gamma", None
    return f"encoder.layer.{i}.{rest}", None  # unknown: passes through, reported as unexpected


def layout_hf_dinov2(ckpt: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Hugging Face ``Dinov2Model`` state dict → timm ViT names under ``model.`` (see the module docstring)."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, list[torch.Tensor | None]] = {}
    for key, value in ckpt.items():
        key = key[len("dinov2."):] if key.startswith("dinov2.") else key  # saved from a task model
        m = _HF_BLOCK.match(key)
        if m:
            name, slot = _hf_block_key(m.group(1), m.group(2))
            if slot is not None:
                qkv.setdefault(name, [None, None, None])[slot] = value
                continue
        else:
            name = _HF_TOP.get(key, UPSTREAM_ONLY + key if key.startswith("classifier.") else key)
        out[name if name.startswith(UPSTREAM_ONLY) else "model." + name] = value
    for name, parts in qkv.items():
        if any(p is None for p in parts):
            missing = [n for n, p in zip(("query", "key", "value"), parts) if p is None]
            raise KeyError(f"'{name}': the checkpoint lacks the {', '.join(missing)} projection of this block")
        out["model." + name] = torch.cat(parts, dim=0)  # type: ignore[arg-type]
    return out


def layout_open_clip_visual(ckpt: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An open_clip CLIP checkpoint with a timm image trunk → the trunk under ``model.``; the rest upstream-only."""
    out: dict[str, torch.Tensor] = {}
    for key, value in ckpt.items():
        if key.startswith("visual.trunk."):
            out["model." + key[len("visual.trunk."):]] = value
        else:
            out[UPSTREAM_ONLY + key] = value
    return out
