"""Patch, slide and patient metrics from patch class scores, and the two rules that aggregate them
(docs/evaluation.md#metrics)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, average_precision_score, recall_score
from sklearn.metrics import confusion_matrix as count_pairs

LEVELS: tuple[str, ...] = ("patch", "slide", "patient")
#: Rules that turn patch scores into slide / patient scores (see :func:`aggregate_scores`).
AGGREGATIONS: tuple[str, ...] = ("reference", "sum")
#: Folder of the `evaluate` metric module (patch / slide / patient metrics): `evaluate.load(METRIC_PATH)`.
METRIC_PATH = str(Path(__file__).resolve().parent / "hierarchical_accuracy")


def check_aggregation(aggregation: str) -> None:
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")


def reference_patch_scores(scores: torch.Tensor) -> torch.Tensor:
    """`[N, C]` class probabilities from non-negative patch scores as the HLSS reference makes them from kNN
    votes: each row L1-normalised (``s / sum_c |s_c|``), then softmaxed (docs/evaluation.md#metrics)."""
    scores = torch.as_tensor(scores).float()
    if scores.ndim != 2:
        raise ValueError(f"scores must be [N, C], got shape {tuple(scores.shape)}")
    return F.normalize(scores, p=1, dim=1).softmax(dim=1)


def aggregate_scores(
    scores: torch.Tensor,
    group_ids: Sequence[str],
    labels: torch.Tensor | Sequence[int] | None = None,
    return_groups: bool = False,
    aggregation: str = "sum",
):
    """Combine patch scores per group (slide or patient), groups in order of first appearance.

    `"sum"` adds the raw patch scores. `"reference"` (the HLSS reference's ``hlss/eval_knn_hlss_accplot.py``)
    sums :func:`reference_patch_scores` per group and L1-normalises each group's row: its mean patch probability.

    Returns `(group_scores [G, C], group_labels [G] or None)` (labels from the patches' `labels`), plus the
    group ids in row order when `return_groups`. A group holding patches of several classes is a ValueError
    naming it.
    """
    check_aggregation(aggregation)
    scores = torch.as_tensor(scores)
    group_ids = [str(g) for g in group_ids]
    if scores.ndim != 2 or len(group_ids) != scores.shape[0]:
        raise ValueError(
            f"need scores [N, C] and N group ids; got {tuple(scores.shape)} and {len(group_ids)} ids"
        )
    if aggregation == "reference":
        scores = reference_patch_scores(scores)
    index_of: dict[str, int] = {}
    index = torch.tensor([index_of.setdefault(g, len(index_of)) for g in group_ids], dtype=torch.long)
    groups = list(index_of)
    group_scores = torch.zeros(len(groups), scores.shape[1], dtype=scores.dtype, device=scores.device)
    group_scores.index_add_(0, index.to(scores.device), scores)
    if aggregation == "reference":
        group_scores = F.normalize(group_scores, p=1, dim=1)
    group_labels = None
    if labels is not None:
        labels = torch.as_tensor(labels, dtype=torch.long).cpu()
        if labels.shape != (len(group_ids),):
            raise ValueError(f"labels must be [{len(group_ids)}], got {tuple(labels.shape)}")
        group_labels = torch.full((len(groups),), -1, dtype=torch.long)
        group_labels[index] = labels
        # Every patch's label must equal its group's (scatter keeps one of them; compare back).
        bad = (group_labels[index] != labels).nonzero().flatten()
        if len(bad):
            group = group_ids[int(bad[0])]
            found = sorted({int(v) for v in labels[index == index_of[group]]})
            raise ValueError(f"group {group!r} has patches with different labels {found}")
    if return_groups:
        return group_scores, group_labels, groups
    return group_scores, group_labels


def average_precision(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """Average precision of one class (`targets` 1 for positives) from its scores `[N]`: scikit-learn's
    `average_precision_score`, `sum_n (R_n - R_{n-1}) P_n` over distinct thresholds; NaN without positives."""
    positives = torch.as_tensor(targets).cpu().numpy().astype(bool)
    if not positives.any():
        return float("nan")
    return float(average_precision_score(positives, torch.as_tensor(scores).double().cpu().numpy()))


def _class_indices(labels: torch.Tensor, num_classes: int) -> np.ndarray:
    labels = torch.as_tensor(labels, dtype=torch.long).cpu().numpy()
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
    return labels


def confusion_matrix(scores: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Counts `[C, C]`: row = true class, column = predicted class (argmax of `scores`); scikit-learn's."""
    predictions = torch.as_tensor(scores).argmax(dim=1).cpu().numpy()
    labels = _class_indices(labels, num_classes)
    return torch.from_numpy(count_pairs(labels, predictions, labels=np.arange(num_classes))).long()


def classification_metrics(scores: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, float]:
    """Accuracy, top-2, top-3, mean class accuracy and mean average precision from class scores.

    Top-k with `k >= num_classes` is 1.0; mean class accuracy (macro recall) and mean average precision (macro
    one-vs-rest AP) average over the classes present in `labels` (docs/evaluation.md#metrics). Returns keys
    `acc`, `top2`, `top3`, `mca`, `map`.
    """
    scores = torch.as_tensor(scores).float().cpu()
    labels = torch.as_tensor(labels, dtype=torch.long).cpu()
    if scores.ndim != 2 or scores.shape != (labels.shape[0], num_classes):
        raise ValueError(
            f"scores must be [N, {num_classes}] for {labels.shape[0]} labels, got {tuple(scores.shape)}"
        )
    if labels.numel() == 0:
        raise ValueError("cannot compute metrics on zero samples")
    # Top-k stays ours: on tied scores (common in kNN votes) it ranks the lower class first as argmax does, and
    # scikit-learn's top_k_accuracy_score the higher one (most of 3,000 tie-heavy problems scored differently).
    ranking = torch.argsort(scores, dim=1, descending=True, stable=True)
    predictions = ranking[:, 0].numpy()
    truth = _class_indices(labels, num_classes)
    present = np.unique(truth)
    result: dict[str, float] = {"acc": float(accuracy_score(truth, predictions))}
    for k, name in ((2, "top2"), (3, "top3")):
        hits = (ranking[:, : min(k, num_classes)] == labels[:, None]).any(dim=1)
        result[name] = float(hits.double().mean())
    # Macro recall over the present classes is balanced_accuracy_score without its warning for predicted classes
    # that never occur in `labels`.
    result["mca"] = float(recall_score(truth, predictions, labels=present, average="macro"))
    result["map"] = float(np.mean([average_precision(scores[:, c], labels == c) for c in present.tolist()]))
    return result


def _levels(scores, labels, slide_ids, patient_ids, aggregation):
    """Yield `(level, scores, labels)` for the patch level and each level whose ids are given."""
    check_aggregation(aggregation)
    scores = torch.as_tensor(scores).float().cpu()
    labels = torch.as_tensor(labels, dtype=torch.long).cpu()
    # The reference scores its patch level on the same per-patch probabilities it aggregates.
    yield "patch", (reference_patch_scores(scores) if aggregation == "reference" else scores), labels
    for level, ids in (("slide", slide_ids), ("patient", patient_ids)):
        if ids is not None:
            group_scores, group_labels = aggregate_scores(scores, ids, labels, aggregation=aggregation)
            yield level, group_scores, group_labels


def hierarchical_metrics(
    scores: torch.Tensor,
    labels: torch.Tensor,
    slide_ids: Sequence[str] | None,
    patient_ids: Sequence[str] | None,
    num_classes: int,
    aggregation: str = "sum",
) -> dict[str, float]:
    """:func:`classification_metrics` of the patch scores `[N, C]` and of the slide / patient scores
    aggregated from them (:func:`aggregate_scores`; `None` ids skip that level), keyed `"{level}/{metric}"`
    (`"slide/map"`). With `"reference"` the patch level is scored on :func:`reference_patch_scores` (only its
    map changes)."""
    result = {}
    for level, level_scores, level_labels in _levels(scores, labels, slide_ids, patient_ids, aggregation):
        for name, value in classification_metrics(level_scores, level_labels, num_classes).items():
            result[f"{level}/{name}"] = value
    return result


def hierarchical_confusion_matrices(
    scores: torch.Tensor,
    labels: torch.Tensor,
    slide_ids: Sequence[str] | None,
    patient_ids: Sequence[str] | None,
    num_classes: int,
    aggregation: str = "sum",
) -> dict[str, torch.Tensor]:
    """Confusion matrices `[C, C]` (rows true, columns predicted) per level, as :func:`hierarchical_metrics`."""
    return {
        level: confusion_matrix(level_scores, level_labels, num_classes)
        for level, level_scores, level_labels in _levels(scores, labels, slide_ids, patient_ids, aggregation)
    }
