"""The evaluation a pretraining run makes of its frozen embeddings on the validation split: kNN and zero-shot
accuracy per level, and each class's top attributes."""

from __future__ import annotations

from typing import Any

from hlss_hf.evaluation import (
    distributed_evaluate,
    hierarchical_confusion_matrices,
    hierarchical_metrics,
    knn_scores,
    zero_shot_probabilities,
)
from hlss_hf.evaluation.explain import class_attribute_summary
from hlss_hf.training.building import TrainData, TrainParts
from hlss_hf.training.config import TrainConfig
from hlss_hf.training.loop import RunLog
from hlss_hf.training.report import TOP_ATTRIBUTES
from hlss_hf.training.run_warnings import RunWarning, evaluation_warnings, informative_metrics

#: Softmax temperature of the zero-shot class scores (CLIP's logit scale of 100), as `evaluate zeroshot`'s default.
ZERO_SHOT_TEMPERATURE = 0.01


def evaluate(
    config: TrainConfig, data: TrainData, parts: TrainParts, accelerator, log: RunLog, step: int
) -> dict:
    """Evaluate the frozen embeddings on the validation split: kNN accuracy (patch / slide / patient), zero-shot
    accuracy with the class descriptions (``model.class_prompts``) and each class's top attributes. Every process
    takes part (sharded models need all ranks); the training RNG does not move. Returns ``metrics``
    (``eval/<level>/<metric>``, ``eval/zeroshot/<level>/<metric>``), ``top_attributes`` (class -> its top
    patient-level attributes), ``warnings``, ``confusion`` and ``class_names``.
    """
    t = config.training
    banks_model = accelerator.unwrap_model(parts.model)  # the banks are buffers, whole on every process

    def report(train, val) -> dict[str, Any]:
        # k beyond the bank is clamped here and named once (k_exceeds_bank) rather than warned at every evaluation.
        k = min(t.knn_k, len(train))
        scores = knn_scores(train, val, k=k, temperature=t.knn_temperature)
        groups = (val.labels, val.slide_ids, val.patient_ids, val.num_classes)
        metrics = hierarchical_metrics(scores, *groups, aggregation=t.knn_aggregation)
        confusion = hierarchical_confusion_matrices(scores, *groups, aggregation=t.knn_aggregation)
        warnings = evaluation_warnings(train.labels.tolist(), val.labels.tolist(), val.class_names, k=t.knn_k)
        metrics = informative_metrics(metrics, val.num_classes)  # top-k over too few classes is always 1
        metrics = {f"eval/{key}": float(value) for key, value in metrics.items()}
        if parts.class_embeds is not None:
            scores = zero_shot_probabilities(val.embeddings, parts.class_embeds, ZERO_SHOT_TEMPERATURE)
            zero_shot = hierarchical_metrics(scores, *groups, aggregation="sum")
            zero_shot = informative_metrics(zero_shot, val.num_classes)
            metrics.update({f"eval/zeroshot/{key}": float(value) for key, value in zero_shot.items()})
        # The attributes whose descriptions each class's image embeddings are nearer to than images in general (the
        # fixed banks: what the text says, whatever the heads have learnt).
        summary = class_attribute_summary(banks_model, val, k=TOP_ATTRIBUTES, use_heads=False)
        levels = summary["levels"]["patient"]["top"]
        return {
            "metrics": metrics,
            "top_attributes": {name: [item["attribute"] for item in items] for name, items in levels.items()},
            "warnings": [w.to_dict() for w in warnings],
            "confusion": {level: matrix.tolist() for level, matrix in confusion.items()},
            "class_names": list(val.class_names),
        }

    result = distributed_evaluate(
        accelerator,
        parts.model,
        data.train_ds,
        data.val_ds,
        report,
        parts.image_processor,
        batch_size=t.eval_batch_size,
        progress=True,  # a bar on the main process: embedding a large split takes a while
    )
    log.log(step, result["metrics"])
    log.warn(step, [RunWarning(**w) for w in result.get("warnings", [])])
    return result
