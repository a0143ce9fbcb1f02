"""Frozen-embedding evaluation as in the HLSS paper: embeddings, kNN, linear probe, zero-shot, patch / slide /
patient metrics (docs/evaluation.md). Attribute explanations and figures: :mod:`hlss_hf.evaluation.explain`."""

from hlss_hf.evaluation.distributed import distributed_evaluate, distributed_knn_evaluate
from hlss_hf.evaluation.embeddings import PRECISIONS, EmbeddingSet, extract_embeddings, model_fingerprint
from hlss_hf.evaluation.knn import knn_evaluate, knn_predict, knn_scores
from hlss_hf.evaluation.metrics import (
    AGGREGATIONS,
    METRIC_PATH,
    aggregate_scores,
    average_precision,
    classification_metrics,
    confusion_matrix,
    hierarchical_confusion_matrices,
    hierarchical_metrics,
    reference_patch_scores,
)
from hlss_hf.evaluation.probes import (
    class_text_embeddings,
    linear_probe_evaluate,
    train_linear_probe,
    zero_shot_evaluate,
    zero_shot_probabilities,
    zero_shot_scores,
)

__all__ = [
    "AGGREGATIONS",
    "METRIC_PATH",
    "PRECISIONS",
    "EmbeddingSet",
    "aggregate_scores",
    "average_precision",
    "class_text_embeddings",
    "classification_metrics",
    "confusion_matrix",
    "distributed_evaluate",
    "distributed_knn_evaluate",
    "extract_embeddings",
    "hierarchical_confusion_matrices",
    "hierarchical_metrics",
    "knn_evaluate",
    "knn_predict",
    "knn_scores",
    "linear_probe_evaluate",
    "model_fingerprint",
    "reference_patch_scores",
    "train_linear_probe",
    "zero_shot_evaluate",
    "zero_shot_probabilities",
    "zero_shot_scores",
]
