"""Metrics, aggregation and the offline `evaluate` module against scikit-learn and hand-made examples."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    recall_score,
    top_k_accuracy_score,
)

from hlss_hf.evaluation import (
    METRIC_PATH,
    aggregate_scores,
    average_precision,
    classification_metrics,
    confusion_matrix,
    hierarchical_confusion_matrices,
    hierarchical_metrics,
)

METRIC_DIR = Path(METRIC_PATH)


def _random_problem(seed, n=120, num_classes=5):
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.arange(num_classes), rng.integers(0, num_classes, n - num_classes)])
    scores = rng.random((n, num_classes)).astype(np.float32)
    # Nudge the true class up so the metrics are not all at chance.
    scores[np.arange(n), labels] += rng.random(n).astype(np.float32) * 0.5
    return scores, labels


@pytest.mark.filterwarnings("ignore:'k' .* greater than or equal to 'n_classes'")
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("num_classes", [3, 5, 7])
def test_classification_metrics_match_sklearn(seed, num_classes):
    scores, labels = _random_problem(seed, num_classes=num_classes)
    result = classification_metrics(torch.from_numpy(scores), torch.from_numpy(labels), num_classes)
    classes = np.arange(num_classes)
    assert result["acc"] == pytest.approx(accuracy_score(labels, scores.argmax(1)))
    assert result["top2"] == pytest.approx(top_k_accuracy_score(labels, scores, k=2, labels=classes))
    assert result["top3"] == pytest.approx(top_k_accuracy_score(labels, scores, k=3, labels=classes))
    assert result["mca"] == pytest.approx(balanced_accuracy_score(labels, scores.argmax(1)))
    assert result["mca"] == pytest.approx(recall_score(labels, scores.argmax(1), average="macro"))
    onehot = np.eye(num_classes)[labels]
    assert result["map"] == pytest.approx(average_precision_score(onehot, scores, average="macro"))


def test_average_precision_with_ties_matches_sklearn():
    # Aggregated kNN scores often tie (e.g. classes with no votes at 0); ties must share one threshold.
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 4, 60).astype(np.float64)
    targets = rng.integers(0, 2, 60)
    expected = average_precision_score(targets, scores)
    assert average_precision(torch.from_numpy(scores), torch.from_numpy(targets)) == pytest.approx(expected)


def test_average_precision_without_positive_is_nan():
    assert np.isnan(average_precision(torch.rand(5), torch.zeros(5)))


def test_metrics_skip_classes_absent_from_labels():
    # Class 2 never occurs: mean class accuracy and mAP average over classes 0 and 1 only, as sklearn does.
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7], [0.6, 0.3, 0.1]])
    labels = torch.tensor([0, 1, 1, 0])
    result = classification_metrics(scores, labels, 3)
    assert result["acc"] == pytest.approx(0.75)
    assert result["mca"] == pytest.approx((1.0 + 0.5) / 2)
    assert result["top3"] == 1.0


def test_topk_with_fewer_classes_than_k_is_one():
    scores = torch.tensor([[0.2, 0.8], [0.6, 0.4]])
    result = classification_metrics(scores, torch.tensor([0, 1]), 2)
    assert result["acc"] == 0.0
    assert result["top2"] == result["top3"] == 1.0


def test_aggregate_scores_hand_made_example():
    scores = torch.tensor([[1.0, 0.0], [0.0, 3.0], [2.0, 0.5], [0.5, 0.5], [0.0, 1.0]])
    slides = ["s1", "s2", "s1", "s3", "s2"]
    labels = torch.tensor([0, 1, 0, 1, 1])
    group_scores, group_labels, groups = aggregate_scores(scores, slides, labels, return_groups=True)
    assert groups == ["s1", "s2", "s3"]
    torch.testing.assert_close(group_scores, torch.tensor([[3.0, 0.5], [0.0, 4.0], [0.5, 0.5]]))
    assert group_labels.tolist() == [0, 1, 1]
    two = aggregate_scores(scores, slides)
    assert len(two) == 2 and two[1] is None
    torch.testing.assert_close(two[0], group_scores)


def test_aggregate_scores_rejects_mixed_label_group():
    with pytest.raises(ValueError, match="'s1'"):
        aggregate_scores(torch.ones(3, 2), ["s1", "s1", "s2"], torch.tensor([0, 1, 1]))


def test_aggregate_scores_rejects_length_mismatch():
    with pytest.raises(ValueError, match="group ids"):
        aggregate_scores(torch.ones(3, 2), ["s1", "s2"])


def test_hierarchical_metrics_hand_made_example():
    # Patient p1: slides a (2 patches) and b (1 patch), class 0; patient p2: slide c (2 patches), class 1.
    scores = torch.tensor([[0.9, 0.1], [0.4, 0.6], [0.3, 0.7], [0.2, 0.8], [0.6, 0.4]])
    labels = torch.tensor([0, 0, 0, 1, 1])
    slides = ["a", "a", "b", "c", "c"]
    patients = ["p1", "p1", "p1", "p2", "p2"]
    result = hierarchical_metrics(scores, labels, slides, patients, 2)
    assert result["patch/acc"] == pytest.approx(2 / 5)  # patches 0 and 3
    # Slides: a = [1.3, 0.7] -> 0 (right), b = [0.3, 0.7] -> 1 (wrong), c = [0.8, 1.2] -> 1 (right).
    assert result["slide/acc"] == pytest.approx(2 / 3)
    assert result["slide/mca"] == pytest.approx((0.5 + 1.0) / 2)
    # Patients: p1 = [1.6, 1.4] -> 0, p2 = [0.8, 1.2] -> 1.
    assert result["patient/acc"] == 1.0
    # Class 1 ranks p1 (1.4) above p2 (1.2): AP 1/2; class 0 ranks p1 first: AP 1.
    assert result["patient/map"] == pytest.approx(0.75)
    matrices = hierarchical_confusion_matrices(scores, labels, slides, patients, 2)
    assert matrices["slide"].tolist() == [[1, 1], [0, 1]]
    assert matrices["patient"].tolist() == [[1, 0], [0, 1]]


def test_hierarchical_metrics_without_hierarchy_is_patch_only():
    scores, labels = _random_problem(0)
    result = hierarchical_metrics(torch.from_numpy(scores), torch.from_numpy(labels), None, None, 5)
    assert set(result) == {f"patch/{m}" for m in ("acc", "top2", "top3", "mca", "map")}


def test_confusion_matrix_matches_sklearn():
    from sklearn.metrics import confusion_matrix as sk_confusion_matrix

    scores, labels = _random_problem(4)
    ours = confusion_matrix(torch.from_numpy(scores), torch.from_numpy(labels), 5).numpy()
    np.testing.assert_array_equal(ours, sk_confusion_matrix(labels, scores.argmax(1), labels=range(5)))


def _handwritten_average_precision(scores, positives):
    """The average precision these metrics computed by hand before scikit-learn (ties share a threshold)."""
    order = np.argsort(-scores, kind="stable")
    scores, positives = scores[order], positives[order].astype(np.float64)
    tp, fp = np.cumsum(positives), np.cumsum(1.0 - positives)
    last = np.r_[scores[1:] != scores[:-1], True]
    tp, fp = tp[last], fp[last]
    return float(np.sum(np.diff(np.r_[0.0, tp / positives.sum()]) * (tp / (tp + fp))))


def _handwritten_metrics(scores, labels, num_classes):
    """The hand-written accuracy, top-k, confusion matrix, mean class accuracy and mAP scikit-learn replaced."""
    ranking = np.argsort(-scores, axis=1, kind="stable")
    result = {}
    for k, name in ((1, "acc"), (2, "top2"), (3, "top3")):
        result[name] = float(np.mean((ranking[:, : min(k, num_classes)] == labels[:, None]).any(axis=1)))
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (labels, ranking[:, 0]), 1)
    present = np.unique(labels)
    result["mca"] = float(np.mean(matrix.diagonal()[present] / matrix.sum(axis=1)[present]))
    result["map"] = float(
        np.mean([_handwritten_average_precision(scores[:, c], labels == c) for c in present])
    )
    return result, matrix


def _tie_heavy_problems(count, seed):
    """Random problems: half with scores from a few values (ties), some classes absent from the labels."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        num_classes = int(rng.integers(2, 8))
        present = rng.choice(num_classes, size=int(rng.integers(1, num_classes + 1)), replace=False)
        labels = rng.choice(present, size=int(rng.integers(1, 60)))
        if i % 2:
            scores = rng.integers(0, 3, (len(labels), num_classes)).astype(np.float32)
        else:
            scores = rng.random((len(labels), num_classes)).astype(np.float32)
        yield scores, labels, num_classes


def test_sklearn_metrics_equal_the_handwritten_ones_with_ties_and_absent_classes():
    for scores, labels, num_classes in _tie_heavy_problems(300, seed=10):
        expected, matrix = _handwritten_metrics(scores.astype(np.float64), labels, num_classes)
        result = classification_metrics(torch.from_numpy(scores), torch.from_numpy(labels), num_classes)
        assert list(result) == list(expected)
        for key, value in expected.items():
            assert abs(result[key] - value) <= 1e-12, (key, result[key], value)
        ours = confusion_matrix(torch.from_numpy(scores), torch.from_numpy(labels), num_classes)
        assert ours.dtype == torch.int64
        np.testing.assert_array_equal(ours.numpy(), matrix)


def test_evaluate_module_metrics_equal_the_handwritten_ones_with_ties_and_absent_classes():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "_hierarchical_accuracy", METRIC_DIR / "hierarchical_accuracy.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for scores, labels, num_classes in _tie_heavy_problems(300, seed=11):
        scores = scores.astype(np.float64)
        expected, _ = _handwritten_metrics(scores, labels, num_classes)
        result = module._metrics(scores, labels, num_classes)
        assert list(result) == list(expected)
        for key, value in expected.items():
            assert abs(result[key] - value) <= 1e-12, (key, result[key], value)


def test_confusion_matrix_rejects_labels_outside_classes():
    with pytest.raises(ValueError, match="labels must lie"):
        confusion_matrix(torch.rand(2, 3), torch.tensor([0, 3]), 3)
    with pytest.raises(ValueError, match="labels must lie"):
        classification_metrics(torch.rand(2, 3), torch.tensor([-1, 0]), 3)


def _hierarchy(n, seed=0):
    rng = np.random.default_rng(seed)
    patient_labels = np.array([0, 1, 2, 3] + list(rng.integers(0, 4, 6)))
    patients = rng.integers(0, len(patient_labels), n)
    slides = [f"p{p}-s{rng.integers(0, 3)}" for p in patients]
    return [f"p{p}" for p in patients], slides, patient_labels[patients]


@pytest.fixture(scope="module")
def metric():
    import evaluate

    return evaluate.load(str(METRIC_DIR))


def test_evaluate_module_loads_offline_and_matches(metric):
    patients, slides, labels = _hierarchy(200)
    rng = np.random.default_rng(1)
    scores = rng.random((200, 4))
    result = metric.compute(
        predictions=scores.tolist(), references=labels.tolist(), slide_ids=slides, patient_ids=patients
    )
    expected = hierarchical_metrics(torch.from_numpy(scores), torch.from_numpy(labels), slides, patients, 4)
    assert set(result) == set(expected)
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=1e-6), key


def test_evaluate_module_add_batch_then_compute(metric):
    patients, slides, labels = _hierarchy(60, seed=2)
    scores = np.random.default_rng(2).random((60, 4))
    for start in range(0, 60, 25):
        stop = start + 25
        metric.add_batch(
            predictions=scores[start:stop].tolist(),
            references=labels[start:stop].tolist(),
            slide_ids=slides[start:stop],
            patient_ids=patients[start:stop],
        )
    result = metric.compute()
    expected = hierarchical_metrics(torch.from_numpy(scores), torch.from_numpy(labels), slides, patients, 4)
    assert result["patient/acc"] == pytest.approx(expected["patient/acc"])
    assert result["slide/map"] == pytest.approx(expected["slide/map"])


def test_evaluate_module_patch_config_loads_from_file():
    import evaluate

    metric = evaluate.load(str(METRIC_DIR / "hierarchical_accuracy.py"), "patch")
    result = metric.compute(predictions=[[0.9, 0.1], [0.3, 0.7], [0.6, 0.4]], references=[0, 1, 1])
    assert result == pytest.approx(
        {"patch/acc": 2 / 3, "patch/top2": 1.0, "patch/top3": 1.0, "patch/mca": 0.75, "patch/map": 1.0}
    )


def test_evaluate_module_requires_ids_in_default_config(metric):
    with pytest.raises(ValueError, match="slide_ids"):
        metric.compute(predictions=[[0.9, 0.1]], references=[0])


def test_evaluate_module_rejects_reference_outside_classes(metric):
    with pytest.raises(ValueError, match="references must lie"):
        metric.compute(predictions=[[0.9, 0.1]], references=[2], slide_ids=["a"], patient_ids=["p"])
