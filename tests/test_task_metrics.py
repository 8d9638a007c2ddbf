"""Task-level agreement for unlabeled evaluation data: top-1 for classifiers, decoded sequences for CTC
recognizers, IoU of thresholded maps for segmentation/detection heads."""
from __future__ import annotations

import numpy as np
import pytest

from graphopt.task_metrics import (agreement, ctc_decode, edit_distance, map_iou, map_regions, region_f1,
                                   sequence_agreement, symbol_agreement, task_kind)

pytestmark = pytest.mark.fast


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_kinds_are_guessed_from_shape_and_values():
    rng = np.random.default_rng(0)
    assert task_kind((8, 10)) == "classifier"
    assert task_kind((8, 40, 97), _softmax(rng.standard_normal((8, 40, 97)))) == "ctc"
    assert task_kind((8, 40, 97), rng.standard_normal((8, 40, 97))) == "ctc"          # logits
    assert task_kind((2, 1, 16, 16), rng.random((2, 1, 16, 16))) == "map"
    assert task_kind((2, 16, 16), rng.random((2, 16, 16))) == "map"
    assert task_kind((2, 3, 16, 16), rng.standard_normal((2, 3, 16, 16))) is None


def test_ctc_decoding_collapses_repeats_and_drops_blanks():
    steps = [0, 3, 3, 0, 3, 5, 5, 0]                 # blank, a, a, blank, a, b, b, blank -> a a b
    probs = np.eye(6)[steps][None]
    assert ctc_decode(probs) == [(3, 3, 5)]


def test_sequence_agreement_counts_whole_lines():
    t = np.eye(6)[[[0, 3, 3, 0, 5], [1, 1, 0, 2, 2]]]
    s = t.copy()
    s[1, 3] = np.eye(6)[4]                            # second line decodes to (1, 4, 2) instead of (1, 2)
    r = agreement(s, t, "ctc")
    assert r["metric"] == "sequence_agreement" and r["value"] == 0.5


def test_symbol_agreement_is_one_minus_the_character_error_rate():
    assert edit_distance((1, 2, 3), (1, 3)) == 1 and edit_distance((), (4, 5)) == 2 and edit_distance((7,), (8,)) == 1
    t = np.eye(6)[[[0, 3, 3, 0, 5], [1, 1, 0, 2, 2]]]      # (3, 5) and (1, 2): 4 symbols
    s = t.copy()
    s[1, 3] = np.eye(6)[4]                                # (1, 4, 2): one insertion
    assert symbol_agreement(s, t) == pytest.approx(0.75)
    assert symbol_agreement(t, t) == 1.0
    blank = np.eye(6)[[[0, 0, 0]]]
    assert symbol_agreement(blank, blank) == 1.0 and symbol_agreement(np.eye(6)[[[0, 2, 0]]], blank) == 0.0


def test_map_iou_and_classifier_agreement():
    t = np.zeros((1, 1, 4, 4))
    t[0, 0, :2, :2] = 0.9
    s = np.zeros_like(t)
    s[0, 0, :2, :1] = 0.8
    assert map_iou(s, t) == 0.5 and map_iou(np.zeros_like(t), np.zeros_like(t)) == 1.0
    assert agreement(np.array([[1, 0], [0, 1.0]]), np.array([[1, 0], [1, 0.0]]))["value"] == 0.5


def test_decodings_can_ignore_a_symbol_at_their_ends():
    t = np.eye(6)[[[0, 3, 0, 5, 0], [0, 3, 0, 5, 0]]]        # (3, 5) twice
    s = t.copy()
    s[0, 4] = np.eye(6)[5]                                     # 5 5 collapses: still (3, 5)
    s[1, 4] = np.eye(6)[0]
    s[1, 4, :] = 0
    s[1, 4, 4] = 1                                             # (3, 5, 4): a trailing "space" (4)
    s[1, 0, :] = 0
    s[1, 0, 4] = 1                                             # (4, 3, 5, 4)
    assert ctc_decode(s, strip=(4,)) == [(3, 5), (3, 5)]
    assert sequence_agreement(s, t) == 0.5 and sequence_agreement(s, t, strip=(4,)) == 1.0
    inner = np.eye(6)[[[0, 3, 4, 5, 0]]]                       # a space between symbols stays
    assert ctc_decode(inner, strip=(4,)) == [(3, 4, 5)]


def test_region_f1_matches_regions_not_pixels():
    t = np.zeros((2, 1, 20, 40))
    t[0, 0, 2:6, 2:30] = 0.9                                   # two thin lines on the first map
    t[0, 0, 10:14, 5:25] = 0.9
    assert map_regions(t[0, 0]) == [(2, 2, 6, 30), (10, 5, 14, 25)]
    s = t.copy()
    s[0, 0, 1:7, 1:31] = 0.9                                   # first line one pixel larger all round
    assert map_iou(s, t) < 0.75                                # pixels: the border counts
    assert region_f1(s, t) == 1.0                              # regions: the same two lines
    s[0, 0, 10:14, 5:25] = 0.0                                 # second line missed
    assert region_f1(s, t) == pytest.approx(2 * 1 / 3)
    s[1, 0, 15:18, 0:3] = 0.9                                  # a spurious region on the empty second map
    s[1, 0, 0:2, 0:10] = 0.9                                   # under 3 pixels high: dropped like DBNet does
    assert region_f1(s, t) == pytest.approx(2 * 1 / 4)
    assert region_f1(np.zeros_like(t), np.zeros_like(t)) == 1.0
