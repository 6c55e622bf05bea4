"""Transfer plan: layer groups, freezing, BatchNorm policy, heads and task losses."""
import math

import pytest
import torch
from torch import nn

from medtransfer.backbones import get_weight_spec, load_backbone
from medtransfer.transfer import (
    TaskLoss,
    TransferModel,
    apply_plan,
    class_weights,
    group_learning_rates,
    layer_groups,
    ordinal_targets,
)


def tiny(dims=2, task="auto", num_classes=2, head="linear"):
    torch.manual_seed(0)
    name = "tiny_cnn.random" if dims == 2 else "tiny_cnn3d.random"
    backbone, _ = load_backbone(get_weight_spec(name), 1, "none")
    return TransferModel(backbone, num_classes, head, 0.0, task)


def _norms(model):
    return {n: m for n, m in model.backbone.named_modules() if isinstance(m, nn.modules.batchnorm._NormBase)}


def test_layer_groups_of_tiny_cnn_and_timm_lite0():
    groups = layer_groups(tiny().backbone)
    assert [g.name for g in groups] == ["stem", "stages.0", "stages.1"]
    assert [len(g.params) for g in groups] == [3, 3, 3]  # conv weight + BN weight/bias each
    lite, _ = load_backbone(get_weight_spec("efficientnet_lite0.in1k"), 1, "none")
    lg = layer_groups(lite)
    # timm's coarse grouping: stem, blocks 0-5, then block 6 together with conv_head/bn2
    assert len(lg) == 8 and lg[0].name == "stem"
    assert lg[0].param_names == ["model.conv_stem.weight", "model.bn1.weight", "model.bn1.bias"]
    assert lg[1].param_names[0].startswith("model.blocks.0.")
    assert lg[-1].param_names[0].startswith("model.blocks.6.")
    assert lg[-1].param_names[-3:] == ["model.conv_head.weight", "model.bn2.weight", "model.bn2.bias"]
    assert sum(len(g.params) for g in lg) == len(list(lite.parameters()))  # every parameter in one group


@pytest.mark.parametrize("policy, bn_training, bn_grad", [
    ("frozen", False, False), ("eval-stats", False, True), ("train", True, True),
])
def test_bn_policy_on_trainable_groups_survives_model_train(policy, bn_training, bn_grad):
    model = tiny()
    apply_plan(model, "all_but_last", policy, trainable_stages=1)
    model.train()
    norms = _norms(model)
    # frozen groups (stem, stages.0): no gradients at all and BN in inference mode whatever the policy
    assert not norms["bn1"].training and not norms["stages.0.1"].training
    assert not any(p.requires_grad for n, p in model.backbone.named_parameters() if not n.startswith("stages.1"))
    # the last group: conv trains; its BN follows the policy
    assert model.backbone.stages[1][0].weight.requires_grad
    assert norms["stages.1.1"].training is bn_training
    assert norms["stages.1.1"].weight.requires_grad is bn_grad
    assert all(p.requires_grad for p in model.head.parameters())


def test_frozen_bn_statistics_do_not_move_in_train_mode_2d_and_3d():
    for dims, shape in ((2, (4, 1, 32, 32)), (3, (2, 1, 16, 16, 16))):
        model = tiny(dims)
        apply_plan(model, "none", "frozen")
        model.train()
        bn = model.backbone.bn1
        assert isinstance(bn, nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d)
        before = bn.running_mean.clone()
        model(torch.randn(shape) * 3 + 2)
        assert torch.equal(bn.running_mean, before) and not bn.training
        assert not bn.weight.requires_grad and model.backbone.conv_stem.weight.requires_grad
        apply_plan(model, "none", "train")
        model.train()
        model(torch.randn(shape) * 3 + 2)
        assert not torch.equal(bn.running_mean, before)  # statistics now adapt


def test_freeze_backbone_none_and_pattern():
    model = tiny()
    trains = apply_plan(model, "backbone", "train")
    model.train()
    assert trains == [False, False, False]
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert not any(m.training for m in _norms(model).values())
    assert apply_plan(model, "none", "train") == [True, True, True]
    model.train()
    assert all(p.requires_grad for p in model.backbone.parameters()) and all(m.training for m in _norms(model).values())
    apply_plan(model, "pattern", "train", pattern=r"^stages\.0\.")
    model.train()
    frozen = sorted(n for n, p in model.backbone.named_parameters() if not p.requires_grad)
    assert frozen == ["stages.0.0.weight", "stages.0.1.bias", "stages.0.1.weight"]
    assert not _norms(model)["stages.0.1"].training and _norms(model)["bn1"].training
    # gradual unfreezing: only the top group
    assert apply_plan(model, "none", "train", unfrozen=1) == [False, False, True]


def test_discriminative_learning_rates_are_geometric():
    assert group_learning_rates(3, 1e-3, 0.01) == pytest.approx([1e-5, 1e-4, 1e-3])
    assert group_learning_rates(1, 1e-3, 0.01) == [1e-3]


def test_mlp_head_is_dense128_relu_dropout05():
    head = tiny(head="mlp").head
    assert [type(m) for m in head] == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert head[0].out_features == 128 and head[2].p == 0.5 and head[3].out_features == 1


def test_multilabel_loss_masks_missing_labels():
    loss = TaskLoss("multilabel", 3)
    logits = torch.tensor([[0.0, 2.0, -1.0], [1.0, 0.0, 0.0]])
    y = torch.tensor([[1.0, float("nan"), 0.0], [float("nan"), float("nan"), 1.0]])
    # observed: (0, 0) y=1 z=0; (0, 2) y=0 z=-1; (1, 2) y=1 z=0
    expected = (math.log(2) + math.log(1 + math.exp(-1)) + math.log(2)) / 3
    assert loss(logits, y).item() == pytest.approx(expected, rel=1e-6)
    assert tiny(task="multilabel", num_classes=3).head[-1].out_features == 3


def test_ordinal_targets_and_probabilities():
    model = tiny(task="ordinal", num_classes=4)
    assert model.head[-1].out_features == 3
    assert ordinal_targets(torch.tensor([0, 2, 3]), 4).tolist() == [[0, 0, 0], [1, 1, 0], [1, 1, 1]]
    # P(y>0)=0.9, P(y>1)=0.5, P(y>2)=0.1 → [0.1, 0.4, 0.4, 0.1]
    z = torch.logit(torch.tensor([[0.9, 0.5, 0.1]]))
    assert model.probabilities(z)[0].tolist() == pytest.approx([0.1, 0.4, 0.4, 0.1], abs=1e-6)


def test_class_weights_from_counts():
    assert class_weights("binary", [0, 0, 0, 1], 2).tolist() == pytest.approx([3.0])
    # n / (K · n_k) with counts [2, 1, 1]
    assert class_weights("multiclass", [0, 0, 1, 2], 3).tolist() == pytest.approx([4 / 6, 4 / 3, 4 / 3])
    nan = float("nan")
    assert class_weights("multilabel", [[1, 0], [0, nan], [0, 1], [0, 1]], 2).tolist() == pytest.approx([3.0, 0.5])
    loss = TaskLoss("binary", 2, class_weights("binary", [0, 0, 0, 1], 2))
    # pos_weight 3 on the positive: -3·log σ(0) for y=1
    assert loss(torch.tensor([[0.0]]), torch.tensor([1])).item() == pytest.approx(3 * math.log(2))


def test_layer_groups_follow_the_backbone_stage_interface():
    """Backbones that name their stages (``stage_names``) get one group per stage plus the stem, every
    parameter in exactly one group: the registry's own metadata, not a guess from module names."""
    from medtransfer.backbones import list_weights

    checked = 0
    for spec in list_weights():
        with torch.device("meta"):
            backbone = spec.builder(spec.in_channels)
        modules = dict(backbone.named_modules())
        stages = tuple(n for n in getattr(backbone, "stage_names", ()) or () if n in modules)
        if not stages or hasattr(getattr(backbone, "model", None), "group_matcher"):
            continue
        groups = layer_groups(backbone)
        first = next(n for n, _ in backbone.named_parameters())
        stem = [] if first.startswith(stages[0] + ".") else ["stem"]  # e.g. a U-Net encoder starts with a stage
        assert [g.name for g in groups] == [*stem, *stages], spec.name
        names = [n for g in groups for n in g.param_names]
        assert sorted(names) == sorted(n for n, _ in backbone.named_parameters()), spec.name
        assert all(n.startswith(st) for g, st in zip(groups[len(stem):-1], stages[:-1]) for n in g.param_names), spec.name
        checked += 1
    assert checked >= 8
