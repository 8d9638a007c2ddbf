"""Agreement between a student's and a teacher's outputs in the terms of the task, for evaluation data without
labels (the teacher supplies the answers):

* classifier (output [N, C]): top-1 agreement, the fraction of examples whose arg-max class is the same;
* ctc (output [N, T, C], a CTC recognizer such as PP-OCR's: per time step a distribution over C symbols with the
  blank at index `blank`): decoded-sequence agreement, the fraction of examples whose greedy CTC decodings (arg-max
  per step, repeats collapsed, blanks dropped) are identical (symbol_agreement: one minus the character error rate
  against the teacher's decodings);
* map (output [N, 1, H, W] or [N, H, W] with values in [0, 1], a segmentation or text-detection probability map):
  the intersection over union of the maps thresholded at `threshold`, over the whole evaluation set
  (region_f1: the same maps as regions, the F-measure of the student's regions matched one to one to the
  teacher's at box IoU >= 0.5, the text-detection view of it; map IoU on thin text lines moves with every one-pixel
  shift of a region's border).

`task_kind(shape, values)` guesses the kind from an output's shape and values; passes and commands take it as an
explicit option where the guess could be wrong."""
from __future__ import annotations

import numpy as np

KINDS = ("classifier", "ctc", "map")


def task_kind(shape, values: np.ndarray | None = None) -> str | None:
    """The kind of an output from its shape (batch first) and, when given, sample values; None when unsure.
    A rank-3 output is a CTC recognizer's when its rows are distributions (or logits: values outside [0, 1]), a
    probability map when its values lie in [0, 1] without summing to 1 per row."""
    shape = tuple(shape)
    in_unit = values is not None and np.nanmin(values) >= 0.0 and np.nanmax(values) <= 1.0
    if len(shape) == 2:
        return "classifier"
    if len(shape) == 4 and shape[1] == 1:
        return "map" if values is None or in_unit else None
    if len(shape) == 3:
        if values is not None and in_unit:
            sums = np.asarray(values, np.float64).sum(-1)
            return "ctc" if np.allclose(sums, 1.0, atol=1e-3) else "map"
        return "ctc" if shape[2] > 2 else None
    return None


def ctc_decode(probs: np.ndarray, blank: int = 0, strip: tuple[int, ...] = ()) -> list[tuple[int, ...]]:
    """Greedy CTC decoding of [N, T, C] scores: per example the symbol sequence (repeats collapsed, blanks out),
    with the symbols in `strip` (a recognizer's space) removed from both ends."""
    best = np.asarray(probs).argmax(-1)
    out = []
    for row in best:
        keep = np.ones(len(row), bool)
        keep[1:] = row[1:] != row[:-1]
        seq = [int(s) for s in row[keep] if s != blank]
        while seq and seq[-1] in strip:
            seq.pop()
        while seq and seq[0] in strip:
            seq.pop(0)
        out.append(tuple(seq))
    return out


def top1_agreement(student: np.ndarray, teacher: np.ndarray) -> float:
    return float(np.mean(np.asarray(student).argmax(1) == np.asarray(teacher).argmax(1)))


def sequence_agreement(student: np.ndarray, teacher: np.ndarray, blank: int = 0, strip: tuple[int, ...] = ()) -> float:
    a, b = ctc_decode(student, blank, strip), ctc_decode(teacher, blank, strip)
    return float(np.mean([x == y for x, y in zip(a, b)])) if a else 0.0


def edit_distance(a, b) -> int:
    """Levenshtein distance between two sequences (insertions, deletions and substitutions cost 1)."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def symbol_agreement(student: np.ndarray, teacher: np.ndarray, blank: int = 0) -> float:
    """1 - (edit distance between the decodings, summed) / (symbols the teacher decoded): one minus the student's
    character error rate against the teacher; 1.0 when neither decodes anything."""
    a, b = ctc_decode(student, blank), ctc_decode(teacher, blank)
    total = sum(len(y) for y in b)
    errors = sum(edit_distance(x, y) for x, y in zip(a, b))
    return 1.0 - errors / total if total else float(errors == 0)


def map_iou(student: np.ndarray, teacher: np.ndarray, threshold: float = 0.3) -> float:
    """IoU of the two maps thresholded at `threshold` (1.0 when both are empty)."""
    s, t = np.asarray(student) > threshold, np.asarray(teacher) > threshold
    union = np.logical_or(s, t).sum()
    return 1.0 if union == 0 else float(np.logical_and(s, t).sum() / union)


def map_regions(prob: np.ndarray, threshold: float = 0.3, min_side: int = 3) -> list[tuple[int, int, int, int]]:
    """Boxes (y0, x0, y1, x1) of the 8-connected regions of one [H, W] map thresholded at `threshold`, without those
    under `min_side` pixels high or wide (DBNet's post-processing drops them too)."""
    from scipy import ndimage
    labels, _ = ndimage.label(np.asarray(prob) > threshold, structure=np.ones((3, 3), bool))
    return [(sl[0].start, sl[1].start, sl[0].stop, sl[1].stop) for sl in ndimage.find_objects(labels)
            if sl is not None and sl[0].stop - sl[0].start >= min_side and sl[1].stop - sl[1].start >= min_side]


def _box_iou(a, b) -> float:
    h = min(a[2], b[2]) - max(a[0], b[0])
    w = min(a[3], b[3]) - max(a[1], b[1])
    if h <= 0 or w <= 0:
        return 0.0
    inter = h * w
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def region_f1(student: np.ndarray, teacher: np.ndarray, threshold: float = 0.3, min_iou: float = 0.5) -> float:
    """F-measure of the student's map regions against the teacher's, over the whole set: per map the regions
    (map_regions) are matched one to one, greedily by box IoU, where it is at least `min_iou`; 2 x matched /
    (student's regions + teacher's regions). 1.0 when neither has a region."""
    s_maps = np.asarray(student).reshape(-1, *np.shape(student)[-2:])
    t_maps = np.asarray(teacher).reshape(-1, *np.shape(teacher)[-2:])
    matched = total = 0
    for s_map, t_map in zip(s_maps, t_maps):
        sb, tb = map_regions(s_map, threshold), map_regions(t_map, threshold)
        total += len(sb) + len(tb)
        pairs = sorted(((_box_iou(a, b), i, j) for i, a in enumerate(sb) for j, b in enumerate(tb)), reverse=True)
        used_s, used_t = set(), set()
        for iou, i, j in pairs:
            if iou < min_iou:
                break
            if i not in used_s and j not in used_t:
                used_s.add(i)
                used_t.add(j)
                matched += 1
    return 1.0 if total == 0 else 2.0 * matched / total


def agreement(student: np.ndarray, teacher: np.ndarray, kind: str | None = None, blank: int = 0,
              threshold: float = 0.3) -> dict:
    """{"kind", "metric", "value"}: the task-level agreement of student with teacher (kind guessed if None)."""
    kind = kind or task_kind(np.shape(teacher), teacher)
    if kind == "classifier":
        return {"kind": kind, "metric": "top1_agreement", "value": top1_agreement(student, teacher)}
    if kind == "ctc":
        return {"kind": kind, "metric": "sequence_agreement", "value": sequence_agreement(student, teacher, blank)}
    if kind == "map":
        return {"kind": kind, "metric": "map_iou", "value": map_iou(student, teacher, threshold)}
    diff = np.asarray(student, np.float64) - np.asarray(teacher, np.float64)
    return {"kind": None, "metric": "relative_rmse",
            "value": float(np.sqrt(np.mean(diff ** 2)) / max(np.sqrt(np.mean(np.square(teacher, dtype=np.float64))),
                                                             1e-30))}
