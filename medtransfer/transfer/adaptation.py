"""How much of a pretrained backbone adapts to the task (``train.adaptation``), on the model side.

* ``full`` — the recipe's head-only epochs, then the whole backbone (its layer groups, BatchNorm policy
  and learning rates as configured; ``train.layer_decay`` < 1 gives layer-wise learning-rate decay);
* ``linear_probe`` — the backbone stays frozen for every epoch and only the head trains, on features
  the frozen backbone computes once (the feature cache);
* ``lora`` — low-rank adapters (the ``peft`` library) on the attention projections of a vision
  transformer or on the ordinary convolutions of a CNN; after the head-only epochs the adapters and
  the head train, the pretrained weights never change. The adapters are merged into the weights they
  adapt before the model is saved, so ``model.pt`` is a plain network;
* ``bitfit`` — after the head-only epochs only the biases and the normalisation parameters of the
  backbone train (BatchNorm statistics follow ``train.bn_policy``).

``auto`` (choosing among these on held-out data) is the training recipe's job
(:mod:`medtransfer.train.auto`); this module builds, restricts, counts and merges.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from medtransfer.errors import MedTransferError
from medtransfer.options import AdaptationMode, look_up_option
from medtransfer.transfer.plan import apply_plan, layer_groups

logger = logging.getLogger(__name__)

ADAPTER_MARK = "lora_"
"""Parameter names of LoRA adapters contain this (``…qkv.lora_A.default.weight``)."""
_NORMS = (nn.LayerNorm, nn.GroupNorm, _NormBase)
_ATTENTION = re.compile(r"(^|\.)(attn|attention|self_attn)$")


def head_and_finetune_epochs(mode: str, head_epochs: int, finetune_epochs: int) -> tuple[int, int]:
    """Epochs of the head-only and the fine-tuning phase: a linear probe spends all of them on the head."""
    if look_up_option(mode, AdaptationMode, "train.adaptation") is AdaptationMode.LINEAR_PROBE:
        return head_epochs + finetune_epochs, 0
    return head_epochs, finetune_epochs


def lora_targets(backbone: nn.Module, patterns: Sequence[str] = ()) -> list[str]:
    """Module names LoRA wraps: those matching any regular expression of ``patterns``, or by default the
    linear projections inside attention modules (vision transformers) or else every plain convolution
    with one group (CNNs; depthwise convolutions and timm's dynamically padded ``Conv2dSame`` cannot
    carry a mergeable adapter)."""
    named = list(backbone.named_modules())
    if patterns:
        regexes = [re.compile(p) for p in patterns]
        names = [n for n, m in named if isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv3d))
                 and any(r.search(n) for r in regexes)]
        what = f"matching {list(patterns)}"
    else:
        names = [n for n, m in named if isinstance(m, nn.Linear) and _ATTENTION.search(n.rpartition(".")[0])]
        if not names:
            names = [n for n, m in named if type(m) in (nn.Conv2d, nn.Conv3d) and m.groups == 1]
        what = "(attention projections, or convolutions with one group)"
    if not names:
        raise MedTransferError(f"LoRA found no layer to adapt in {type(backbone).__name__} {what}. Set "
                               "train.lora_targets to regular expressions on its module names, or choose another "
                               "train.adaptation.")
    return names


def add_lora(backbone: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
             patterns: Sequence[str] = ()) -> list[str]:
    """Inject LoRA adapters (``peft``) into ``backbone`` in place; returns the adapted module names.
    The adapters start at zero (LoRA's ``B = 0``), so the network computes what it did before."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise MedTransferError('train.adaptation = lora needs the peft package: pip install "medtransfer[peft]" '
                               "(or pip install peft).") from None
    targets = lora_targets(backbone, patterns)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")
    inject_adapter_in_model(config, backbone)
    logger.info("LoRA rank %d, alpha %g on %d modules of the backbone", rank, alpha, len(targets))
    return targets


def has_adapters(model: nn.Module) -> bool:
    return any(ADAPTER_MARK in n for n, _ in model.named_parameters())


def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA adapter of ``model`` into the weight it adapts and put the plain layer back, in
    place (the state dict then has the original names); returns how many layers were merged."""
    if not has_adapters(model):
        return 0
    from peft.tuners.lora import LoraLayer

    merged = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge(safe_merge=True)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.get_base_layer())
            merged += 1
    return merged


def _keeps(mode: AdaptationMode, name: str, is_norm: bool) -> bool:
    if mode is AdaptationMode.LORA:
        return ADAPTER_MARK in name
    if mode is AdaptationMode.BITFIT:
        return is_norm or name.endswith("bias")
    return True


def restrict_trainable(model: nn.Module, mode: str, trains: Sequence[bool]) -> None:
    """After :func:`~medtransfer.transfer.plan.apply_plan`: in the layer groups that train (``trains``),
    keep only what ``mode`` adapts (LoRA: the adapters; BitFit: biases and norm parameters). Frozen
    groups stay frozen; ``full`` changes nothing."""
    mode = look_up_option(mode, AdaptationMode, "train.adaptation")
    if mode not in (AdaptationMode.LORA, AdaptationMode.BITFIT):
        return
    norm_params = {id(p) for m in model.backbone.modules() if isinstance(m, _NORMS)
                   for p in m.parameters(recurse=False)}
    for group, on in zip(layer_groups(model.backbone), trains):
        for name, p in zip(group.param_names, group.params):
            p.requires_grad_(bool(on) and _keeps(mode, name, id(p) in norm_params))


def plan_applier(mode: str) -> Callable[..., list[bool]]:
    """:func:`apply_plan` followed by :func:`restrict_trainable` for ``mode`` (the ``Unfreeze`` callback's action)."""

    def apply(model: nn.Module, *plan: Any) -> list[bool]:
        trains = apply_plan(model, *plan)
        restrict_trainable(model, mode, trains)
        return trains

    return apply


def parameter_counts(model: nn.Module) -> dict[str, Any]:
    """Trainable and total parameters of ``model`` as it is now (adapters counted apart: they are merged
    into the weights they adapt, so the saved model has ``total - adapters`` parameters)."""
    params = list(model.named_parameters())
    adapters = sum(p.numel() for n, p in params if ADAPTER_MARK in n)
    trainable = sum(p.numel() for _, p in params if p.requires_grad)
    total = sum(p.numel() for _, p in params)
    return {"trainable": trainable, "total": total - adapters, "adapters": adapters,
            "trainable_percent": round(100.0 * trainable / max(total - adapters, 1), 4)}


def layer_decay_rates(n_groups: int, lr: float, decay: float) -> list[float]:
    """Layer-wise learning-rate decay (BEiT / MAE / RETFound fine-tuning): group ``i`` of ``n`` (input →
    output) trains at ``lr × decay ** (n - 1 - i)``, the last group at ``lr``."""
    return [lr * decay ** (n_groups - 1 - i) for i in range(n_groups)]
