"""Threshold fitting from scores: hand-checked cases."""

from __future__ import annotations

import pytest

from personal_vlm_node.calibration import EGO_THRESHOLD_WINDOW, best_threshold, fit_thresholds
from personal_vlm_node.errors import PersonalVLMError


def test_the_best_single_threshold_is_a_midpoint_and_ties_go_to_the_one_nearest_half():
    # t in (0.2, 0.6]: every positive, 2 of 3 negatives; t in (0.65, 0.7]: 2 of 3 positives, every
    # negative. Both give Wtd 5/6; the midpoints are 0.4 and 0.675, and 0.4 is nearer 0.5.
    t, wtd = best_threshold([0.6, 0.7, 0.8], [0.1, 0.2, 0.65])
    assert t == pytest.approx(0.4) and wtd == pytest.approx(5 / 6)


def test_a_window_moves_the_threshold_off_the_edge_of_the_positives():
    positives, negatives = [0.70, 0.72, 0.74, 0.76], [0.1, 0.2, 0.3, 0.69]
    # Alone, 0.695 separates the split perfectly, but 0.01 higher a quarter of the positives is lost.
    t, wtd = best_threshold(positives, negatives)
    assert t == pytest.approx(0.695) and wtd == 1.0
    # Averaged over ±0.1, 0.495 (Wtd 0.875 everywhere within its window) beats it.
    t, wtd = best_threshold(positives, negatives, window=0.1)
    assert t == pytest.approx(0.495) and wtd == pytest.approx(0.875)


def test_ego_threshold_is_fitted_with_the_window_and_says_so():
    fitted = fit_thresholds([0.9, 0.95], [0.1, 0.2], [0.70, 0.72, 0.74, 0.76], [0.1, 0.2, 0.3, 0.69])
    assert fitted["recognize_threshold"] == pytest.approx(0.495)
    assert fitted["figures"]["ego_threshold_window"] == EGO_THRESHOLD_WINDOW == 0.1
    assert fitted["figures"]["ego_wtd_at_threshold"] == pytest.approx(0.875)


def test_a_split_without_negatives_is_refused():
    with pytest.raises(PersonalVLMError, match="both positive and negative"):
        best_threshold([0.5], [])
