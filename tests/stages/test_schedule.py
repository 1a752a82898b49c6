"""The learning-rate schedule: warmup, then cosine down to the floor."""

import pytest

from minimind_pl.stages.base import lr_multiplier


def test_warmup_rises_linearly_to_peak():
    assert lr_multiplier(0, 100, 10, 0.1) == pytest.approx(0.1)
    assert lr_multiplier(9, 100, 10, 0.1) == pytest.approx(1.0)


def test_cosine_ends_at_min_ratio_as_minimind():
    assert lr_multiplier(0, 100, 0, 0.1) == pytest.approx(1.0)
    assert lr_multiplier(50, 100, 0, 0.1) == pytest.approx(0.55)
    assert lr_multiplier(100, 100, 0, 0.1) == pytest.approx(0.1)
    assert lr_multiplier(500, 100, 0, 0.1) == pytest.approx(0.1)
