"""Layer groups, freezing, the BatchNorm policy and discriminative learning rates.

Layer groups (ordered input → output) are derived generically:

* a timm model (``backbone.model`` with ``group_matcher``) uses timm's own coarse grouping
  (stem, one group per block stage, the final conv/norm);
* any other backbone: its top-level children, with the children of a container named
  ``stages``/``blocks``/``features``/``layers`` expanded one level; a composite child (one with
  submodules: ``layer1``, ``stages.0``, ``denseblock2``) starts a group, single layers before the
  first one (conv, norm) form the ``stem`` group and those after a group join it.

The head is never part of the layer groups and always trains.

BatchNorm policy (2D and 3D BatchNorm, SyncBatchNorm, InstanceNorm with running statistics):

* ``frozen`` — inference mode (running statistics used, not updated), no affine gradients;
* ``eval-stats`` — inference mode, affine parameters train with their group;
* ``train`` — statistics update and affine parameters train with their group.

A norm in a frozen group is always ``frozen``. The mode stays in force across ``model.train()``
(:class:`~medtransfer.transfer.model.TransferModel` re-applies it).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from medtransfer.options import BNPolicy, FreezeMode, look_up_option

BN_POLICIES = tuple(p for p in BNPolicy.values() if p != BNPolicy.AUTO)
FREEZE_MODES = FreezeMode.values()
_CONTAINERS = ("stages", "blocks", "features", "layers")


@dataclass
class LayerGroup:
    """One unit of freezing and learning rate: its parameters and its norm modules."""

    name: str
    params: list[nn.Parameter] = field(default_factory=list)
    param_names: list[str] = field(default_factory=list)
    norms: list[nn.Module] = field(default_factory=list)


def _timm_groups(inner: nn.Module, prefix: str) -> list[LayerGroup]:
    from timm.models._manipulate import group_with_matcher

    named = [(n, ("p", n, p)) for n, p in inner.named_parameters()]
    named += [(n, ("m", n, m)) for n, m in inner.named_modules() if isinstance(m, _NormBase)]
    grouped = group_with_matcher(named, inner.group_matcher(coarse=True), return_values=True)
    groups = []
    for gid in sorted(grouped):
        g = LayerGroup(name=f"group{gid}")
        for kind, n, obj in grouped[gid]:
            if kind == "p":
                g.params.append(obj)
                g.param_names.append(prefix + n)
            else:
                g.norms.append(obj)
        if g.params or g.norms:
            groups.append(g)
    groups[0].name = "stem"
    return groups


def _child_entries(backbone: nn.Module) -> list[tuple[str, nn.Module]]:
    entries = []
    for name, child in backbone.named_children():
        if name in _CONTAINERS and isinstance(child, (nn.Sequential, nn.ModuleList)):
            entries += [(f"{name}.{sub}", m) for sub, m in child.named_children()]
        else:
            entries.append((name, child))
    return entries


def _stage_groups(backbone: nn.Module, stages: tuple[str, ...]) -> list[LayerGroup]:
    """Groups from the backbone's own stage interface (``stage_names``: module paths, shallow → deep):
    what comes before the first stage is the ``stem``; what comes after the last one joins it. Names
    that are not module paths (a feature map called ``stem``) mark no group of their own."""
    modules_by_name = dict(backbone.named_modules())
    stages = tuple(n for n in stages if n in modules_by_name)
    groups = [LayerGroup(name="stem")] + [LayerGroup(name=n) for n in stages]

    def owners(names: list[str]) -> list[int]:
        out, current = [], 0
        for name in names:
            hits = [i for i, st in enumerate(stages, start=1) if name == st or name.startswith(st + ".")]
            current = hits[0] if hits else current
            out.append(current)
        return out

    modules = [(n, m) for n, m in backbone.named_modules() if isinstance(m, _NormBase)]
    for (_, module), i in zip(modules, owners([n for n, _ in modules])):
        groups[i].norms.append(module)
    params = list(backbone.named_parameters())
    for (name, p), i in zip(params, owners([n for n, _ in params])):
        groups[i].params.append(p)
        groups[i].param_names.append(name)
    return [g for g in groups if g.params or g.norms]


def layer_groups(backbone: nn.Module) -> list[LayerGroup]:
    """The backbone's layer groups, input → output (see the module docstring)."""
    if getattr(backbone, "tokens", False) and isinstance(getattr(backbone, "image", None), nn.Module):
        groups = layer_groups(backbone.image)  # a slice encoder: the groups of the 2D backbone it wraps
        for g in groups:
            g.param_names = [f"image.{n}" for n in g.param_names]
        return groups
    inner = getattr(backbone, "model", None)
    if isinstance(inner, nn.Module) and hasattr(inner, "group_matcher"):
        return _timm_groups(inner, "model.")
    stages = tuple(getattr(backbone, "stage_names", ()) or ())
    if stages:
        return _stage_groups(backbone, stages)
    groups: list[LayerGroup] = []
    for name, child in _child_entries(backbone):
        if not any(True for _ in child.parameters()) and not any(isinstance(m, _NormBase) for m in child.modules()):
            continue
        is_stage = any(True for _ in child.children())
        if is_stage or not groups:
            groups.append(LayerGroup(name=name if is_stage else "stem"))
        g = groups[-1]
        for n, p in child.named_parameters():
            g.params.append(p)
            g.param_names.append(f"{name}.{n}")
        g.norms += [m for m in child.modules() if isinstance(m, _NormBase)]
    return groups


def apply_plan(
    model: nn.Module,
    freeze: str = "none",
    bn_policy: str = "frozen",
    trainable_stages: int = 1,
    pattern: str = "",
    unfrozen: int | None = None,
) -> list[bool]:
    """Set ``requires_grad`` and the BatchNorm mode of ``model.backbone``; the head always trains.

    ``freeze``: ``none`` (everything trains), ``backbone`` (nothing of it), ``all_but_last`` (the last
    ``trainable_stages`` layer groups train), ``pattern`` (parameters whose name matches the regular
    expression ``pattern`` stay frozen). ``unfrozen`` further limits training to the last
    ``unfrozen`` groups (gradual unfreezing). Returns which layer groups train.
    """
    freeze = look_up_option(freeze, FreezeMode, "train.freeze")
    bn_policy = look_up_option(bn_policy, BNPolicy, "train.bn_policy")
    if bn_policy is BNPolicy.AUTO:
        raise ValueError("resolve bn_policy 'auto' (frozen for pretrained weights, train otherwise) first")
    groups = layer_groups(model.backbone)
    n = len(groups)
    allowed = {FreezeMode.NONE: n, FreezeMode.BACKBONE: 0, FreezeMode.ALL_BUT_LAST: min(trainable_stages, n),
               FreezeMode.PATTERN: n}[freeze]
    if unfrozen is not None:
        allowed = min(allowed, unfrozen)
    regex = re.compile(pattern) if freeze is FreezeMode.PATTERN and pattern else None
    trains = [i >= n - allowed for i in range(n)]
    for g, on in zip(groups, trains):
        norm_params = {id(p) for m in g.norms for p in m.parameters(recurse=False)}
        for name, p in zip(g.param_names, g.params):
            frozen = not on or (regex is not None and regex.search(name) is not None)
            if id(p) in norm_params and bn_policy is BNPolicy.FROZEN:
                frozen = True
            p.requires_grad_(not frozen)
        for m in g.norms:
            affine_frozen = not any(p.requires_grad for p in m.parameters(recurse=False))
            m._mt_bn_eval = (not on) or bn_policy in (BNPolicy.FROZEN, BNPolicy.EVAL_STATS) or (
                regex is not None and affine_frozen and any(True for _ in m.parameters(recurse=False)))
    for p in model.head.parameters():
        p.requires_grad_(True)
    model.train(model.training)
    return trains


def group_learning_rates(n_groups: int, lr: float, ratio: float) -> list[float]:
    """Discriminative learning rates for ``n_groups`` backbone groups: geometric from ``lr × ratio``
    (first group) to ``lr`` (last group), as fastai's ``slice(lr / 100, lr)`` is ``ratio = 0.01``."""
    if n_groups <= 1:
        return [lr] * n_groups
    return [lr * ratio ** (1 - i / (n_groups - 1)) for i in range(n_groups)]


def restore_frozen_norms(module: nn.Module) -> None:
    """Put the norms that a plan froze (``_mt_bn_eval``) back into inference mode; call after
    ``module.train()`` so the BatchNorm policy survives it."""
    for m in module.modules():
        if getattr(m, "_mt_bn_eval", False):
            m.eval()
