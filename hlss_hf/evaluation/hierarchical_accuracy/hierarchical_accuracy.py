"""Hierarchical accuracy: patch, slide and patient metrics from patch class scores (HLSS evaluation).

Self-contained (numpy and scikit-learn) so that it loads with `evaluate.load` from a local folder, offline, without
hlss_hf.
"""

import datasets
import evaluate
import numpy as np
from sklearn.metrics import accuracy_score, average_precision_score, recall_score

_DESCRIPTION = """
Patch-level class scores are summed per slide and per patient; accuracy, top-2 and top-3 accuracy, mean class
accuracy (macro recall over the classes present in the references) and mean average precision (macro one-vs-rest
average precision over the classes present) are reported at each level, as in the HLSS / HiDisc evaluation.
Configuration "hierarchical" (default) needs slide_ids and patient_ids; configuration "patch" needs neither.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `float`): class scores of each patch, shape [N, C] (higher is more likely).
    references (`list` of `int`): class index of each patch.
    slide_ids (`list` of `str`): slide of each patch ("hierarchical" configuration only).
    patient_ids (`list` of `str`): patient of each patch ("hierarchical" configuration only).
    num_classes (`int`, *optional*): number of classes; defaults to the width of the scores.
Returns:
    `dict` with keys "{level}/{metric}", level in patch / slide / patient, metric in acc / top2 / top3 / mca / map.
Examples:
    >>> metric = evaluate.load("hlss_hf/evaluation/hierarchical_accuracy")
    >>> metric.compute(predictions=[[0.9, 0.1], [0.2, 0.8]], references=[0, 1], slide_ids=["a", "b"],
    ...                patient_ids=["p", "q"])["patch/acc"]
    1.0
"""

_CITATION = """
@inproceedings{watawana2024hlss,
  title={Hierarchical Text-to-Vision Self Supervised Alignment for Improved Histopathology Representation Learning},
  author={Watawana, Hasindri and Ranasinghe, Kanchana and Mahmood, Tariq and Naseer, Muzammal and Khan, Salman and Khan, Fahad Shahbaz},
  booktitle={MICCAI},
  year={2024}
}
"""

LEVELS = ("patch", "slide", "patient")


def _aggregate(scores, labels, group_ids):
    """Sum scores per group (first-appearance order); every patch of a group must share its label."""
    index_of = {}
    index = np.array([index_of.setdefault(str(g), len(index_of)) for g in group_ids], dtype=np.int64)
    group_scores = np.zeros((len(index_of), scores.shape[1]), dtype=np.float64)
    np.add.at(group_scores, index, scores)
    group_labels = np.full(len(index_of), -1, dtype=np.int64)
    group_labels[index] = labels
    mismatch = np.nonzero(group_labels[index] != labels)[0]
    if len(mismatch):
        group = str(group_ids[mismatch[0]])
        found = sorted(set(labels[index == index_of[group]].tolist()))
        raise ValueError(f"group {group!r} has patches with different labels {found}")
    return group_scores, group_labels


def _metrics(scores, labels, num_classes):
    # Top-k stays ours: on tied scores it ranks the lower class first as argmax does, and scikit-learn's
    # top_k_accuracy_score the higher one (most of 3,000 tie-heavy problems scored differently).
    ranking = np.argsort(-scores, axis=1, kind="stable")
    predictions = ranking[:, 0]
    result = {"acc": float(accuracy_score(labels, predictions))}
    for k, name in ((2, "top2"), (3, "top3")):
        result[name] = float(np.mean((ranking[:, : min(k, num_classes)] == labels[:, None]).any(axis=1)))
    present = np.unique(labels)
    # Macro recall over the present classes: balanced accuracy, without its warning for predicted absent classes.
    result["mca"] = float(recall_score(labels, predictions, labels=present, average="macro"))
    result["map"] = float(np.mean([average_precision_score(labels == c, scores[:, c]) for c in present]))
    return result


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class HierarchicalAccuracy(evaluate.Metric):
    """Patch / slide / patient accuracy, top-k, mean class accuracy and mean average precision."""

    def _info(self):
        features = {
            "predictions": datasets.Sequence(datasets.Value("float64")),
            "references": datasets.Value("int64"),
        }
        if self.config_name != "patch":
            features["slide_ids"] = datasets.Value("string")
            features["patient_ids"] = datasets.Value("string")
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(features),
        )

    def _compute(self, predictions, references, slide_ids=None, patient_ids=None, num_classes=None):
        scores = np.asarray(predictions, dtype=np.float64)
        labels = np.asarray(references, dtype=np.int64)
        if scores.ndim != 2 or scores.shape[0] != labels.shape[0] or labels.size == 0:
            raise ValueError(
                f"need predictions [N, C] for N > 0 references; got {scores.shape} and {labels.shape}"
            )
        num_classes = int(num_classes) if num_classes is not None else scores.shape[1]
        if scores.shape[1] != num_classes:
            raise ValueError(f"predictions have {scores.shape[1]} columns but num_classes={num_classes}")
        if labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(
                f"references must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]"
            )
        result = {f"patch/{k}": v for k, v in _metrics(scores, labels, num_classes).items()}
        for level, ids in (("slide", slide_ids), ("patient", patient_ids)):
            if ids is not None:
                group_scores, group_labels = _aggregate(scores, labels, list(ids))
                result.update(
                    {f"{level}/{k}": v for k, v in _metrics(group_scores, group_labels, num_classes).items()}
                )
        return result
