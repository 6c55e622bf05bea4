"""Named CT windows and channel stacks."""
from __future__ import annotations

import numpy as np
import pytest

from medtransfer.errors import ConfigError
from medtransfer.io import WINDOWS, stack_windows, window_by_name


def test_known_windows():
    assert window_by_name("lung") == (-600.0, 1500.0)
    assert window_by_name("Soft-Tissue") == WINDOWS["soft_tissue"] == (50.0, 400.0)
    assert {"lung", "mediastinum", "bone", "brain", "liver", "soft_tissue", "subdural"} <= set(WINDOWS)


def test_typo_suggests_the_right_name():
    with pytest.raises(ConfigError, match="Did you mean 'mediastinum'"):
        window_by_name("mediastinun")


def test_stack_three_windows_hand_computed():
    hu = np.array([[-1000.0, -600.0], [50.0, 1000.0]], dtype=np.float32)
    out = stack_windows(hu, ["lung", "mediastinum", "bone"])
    assert out.shape == (3, 2, 2) and out.dtype == np.float32
    # lung (-600, 1500): lower edge -600 - 0.5 - 749.5 = -1350, width-1 = 1499
    assert out[0, 0, 0] == pytest.approx((-1000 + 1350) / 1499)
    assert out[0, 0, 1] == pytest.approx(750 / 1499)
    # mediastinum (50, 350): -1000 HU is black, 1000 HU white, 50 HU mid-grey
    assert out[1, 0, 0] == 0.0 and out[1, 1, 1] == 1.0
    assert out[1, 1, 0] == pytest.approx((50 - (50 - 0.5 - 174.5)) / 349)
    # bone (400, 1800)
    assert out[2, 1, 1] == pytest.approx((1000 - (400 - 0.5 - 899.5)) / 1799)
    np.testing.assert_array_equal(stack_windows(hu, "chest"), out)


def test_tags_and_pairs():
    hu = np.zeros((4, 4), dtype=np.float32)
    out = stack_windows(hu, ["tags", (0, 100)], meta={"window_center": 40.0, "window_width": 400.0})
    assert out.shape == (2, 4, 4)
    assert out[1, 0, 0] == pytest.approx(50 / 99)  # lower edge 0 - 0.5 - 49.5
    with pytest.raises(ConfigError, match="no WindowCenter"):
        stack_windows(hu, ["tags"], meta={})
