"""check_input_contract: a batch is checked against the weights' input contract."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from medtransfer.backbones import InputContract, InputContractError, check_input_contract, get_weight_spec

IMAGENET = get_weight_spec("resnet18.tv_in1k")
XRV = get_weight_spec("densenet121.xrv_all")
MEDICALNET = get_weight_spec("medicalnet_resnet10.23datasets")


def _imagenet_batch(channels=3):
    g = torch.Generator().manual_seed(0)
    unit = torch.rand(2, channels, 32, 32, generator=g)
    mean = torch.tensor(IMAGENET.mean[:channels]).view(1, -1, 1, 1)
    std = torch.tensor(IMAGENET.std[:channels]).view(1, -1, 1, 1)
    return (unit - mean) / std


def test_a_correct_batch_passes():
    c = check_input_contract(_imagenet_batch(), IMAGENET)
    lo, hi = c.expected_range
    assert lo == pytest.approx((0 - 0.485) / 0.229) and hi == pytest.approx((1 - 0.406) / 0.225)
    x = (torch.rand(2, 1, 32, 32) * 2 - 1) * 1024  # torchxrayvision's [-1024, 1024]
    assert check_input_contract(x, XRV).expected_range == pytest.approx((-1024, 1024))
    assert check_input_contract(x.numpy(), "densenet121.xrv_all").channels == 1


def test_raw_hounsfield_units_into_an_imagenet_backbone():
    hu = torch.full((2, 3, 32, 32), -1000.0)
    hu[..., 8:24, 8:24] = 40.0
    hu[..., 12, 12] = 1500.0
    with pytest.raises(InputContractError, match=r"values about \[-2.118, 2.64\].*raw Hounsfield units.*window CT first"):
        check_input_contract(hu, IMAGENET)


def test_three_channels_into_a_one_channel_model():
    with pytest.raises(InputContractError, match=r"expects 1 input channel\(s\); the batch has 3.*in_channels=3"):
        check_input_contract(_imagenet_batch(3), XRV)
    # the backbone built for 3 channels accepts them
    check_input_contract((torch.rand(2, 3, 32, 32) * 2 - 1) * 1024, XRV, channels=3)


def test_2d_batch_into_a_3d_model_and_back():
    with pytest.raises(InputContractError, match=r"3D backbone expecting a batch \(N, C, D, H, W\).*stack slices"):
        check_input_contract(torch.randn(2, 1, 32, 32), MEDICALNET)
    with pytest.raises(InputContractError, match="dims=3"):
        check_input_contract(torch.randn(2, 3, 8, 32, 32), IMAGENET)


def test_unscaled_unit_images_into_xrv():
    with pytest.raises(InputContractError, match=r"\[-1024, 1024\].*only 0.0\d+% of that range.*\(x - \[0.5\]\) / \[0.000488281\]"):
        check_input_contract(torch.rand(2, 1, 32, 32), XRV)


def test_zscore_contract_of_medicalnet():
    g = torch.Generator().manual_seed(0)
    vol = torch.randn(2, 1, 8, 16, 16, generator=g)
    check_input_contract(vol, MEDICALNET)
    with pytest.raises(InputContractError, match="z-scored.*sample 0 has mean 3"):
        check_input_contract(vol + 3, MEDICALNET)


def test_non_finite_and_integer_batches():
    x = _imagenet_batch()
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(InputContractError, match="NaN"):
        check_input_contract(x, IMAGENET)
    with pytest.raises(InputContractError, match="float batch"):
        check_input_contract(np.zeros((2, 3, 8, 8), dtype=np.uint8), IMAGENET)


def test_explicit_contract_object():
    c = InputContract("four-sequence mri", dims=3, channels=4, mean=(0.5,) * 4, std=(0.5,) * 4)
    check_input_contract(torch.rand(1, 4, 8, 8, 8) * 2 - 1, c)
