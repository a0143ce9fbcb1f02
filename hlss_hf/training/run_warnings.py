"""Named warnings for settings and results whose numbers mean less than they seem (a small cohort's first runs),
printed once by train.py, finetune.py and ``python -m hlss_hf.evaluate`` and recorded in their logs, cards and
reports; docs/training.md#named-warnings lists them. Nothing here imports torch."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "MIN_FINETUNE_STEPS",
    "RunWarning",
    "WarningLog",
    "evaluation_warnings",
    "finetune_warnings",
    "informative_metrics",
    "training_warnings",
]

#: Fewer optimizer steps than this in finetune.py is warned about.
MIN_FINETUNE_STEPS = 10
_TOP_K = re.compile(r"(^|/)top(\d+)$")


@dataclass(frozen=True)
class RunWarning:
    """One named warning: ``name`` (stable, docs/training.md#named-warnings) and what it means for this run."""

    name: str
    message: str

    def __str__(self) -> str:
        return f"warning [{self.name}]: {self.message}"

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "message": self.message}


class WarningLog:
    """The run's warnings: each name shown by ``printer`` (e.g. ``accelerator.print``: the main process only) the
    first time it is added, all kept in order for the report / card."""

    def __init__(self, printer: Callable[[str], None] = print) -> None:
        self.printer = printer
        self.warnings: dict[str, RunWarning] = {}

    def add(self, warnings: Iterable[RunWarning]) -> list[RunWarning]:
        """Add `warnings`; print and return those whose name is new."""
        new = []
        for warning in warnings:
            if warning.name not in self.warnings:
                self.warnings[warning.name] = warning
                self.printer(str(warning))
                new.append(warning)
        return new

    def to_list(self) -> list[dict[str, str]]:
        return [warning.to_dict() for warning in self.warnings.values()]


def evaluation_warnings(
    bank_labels: Sequence[int],
    eval_labels: Sequence[int],
    class_names: Sequence[str],
    k: int | None = None,
) -> list[RunWarning]:
    """What makes an evaluation's numbers mean less: classes missing from the bank, top-k over too few classes, a
    kNN k beyond the bank (``k`` None: not a kNN evaluation). ``bank_labels``: the class of each bank / probe
    training patch."""
    found = []
    bank = {int(label) for label in bank_labels}
    absent = sorted({int(label) for label in eval_labels} - bank)
    if absent:
        names = [class_names[i] if i < len(class_names) else str(i) for i in absent]
        found.append(
            RunWarning(
                "class_absent_from_bank",
                f"class(es) {names} of the evaluated split have no patch in the bank (training split): their patches "
                "cannot be classified right, so accuracy is bounded and mean class accuracy / mAP count classes no "
                "vote reaches. Give every class a training patient.",
            )
        )
    num_classes = len(class_names)
    if num_classes <= 3:
        dropped = [f"top{n}" for n in (2, 3) if n >= num_classes]
        found.append(
            RunWarning(
                "top_k_not_informative",
                f"{'/'.join(dropped)} accuracy with {num_classes} classes is always 1; not reported.",
            )
        )
    if k is not None and k > len(bank_labels):
        found.append(
            RunWarning(
                "k_exceeds_bank",
                f"kNN k={k} is larger than the bank ({len(bank_labels)} patches): every patch votes, so k={k} and "
                f"k={len(bank_labels)} report the same; set a smaller k (training.knn_k, evaluate --k).",
            )
        )
    return found


def informative_metrics(metrics: Mapping[str, float], num_classes: int) -> dict[str, float]:
    """`metrics` without the top-k accuracies that cannot be below 1 (k >= `num_classes`)."""
    kept = {}
    for key, value in metrics.items():
        match = _TOP_K.search(key)
        if match is None or int(match.group(2)) < num_classes:
            kept[key] = value
    return kept


def training_warnings(
    patients_per_step: int,
    slides_per_patient: int,
    max_steps: int,
    steps_per_epoch: int | None,
    warmup_steps: int,
    objective: str = "hlss",
) -> list[RunWarning]:
    """What makes a pretraining run's losses or length mean less. ``patients_per_step``: the patients one loss
    contrasts, B x processes (gradient accumulation adds none); ``steps_per_epoch`` None: streamed, no epochs;
    ``objective`` ``align`` has no hierarchy levels."""
    found = []
    if objective == "hlss" and patients_per_step == 1:
        found.append(
            RunWarning(
                "one_patient_per_batch",
                "B = 1 patient per step: the patient level has no negatives, so its loss is constant and teaches "
                "nothing; raise training.per_device_batch_size.",
            )
        )
    if objective == "hlss" and slides_per_patient == 1:
        found.append(
            RunWarning(
                "one_slide_per_patient",
                "S = 1 slide per patient: the slide and patient levels contrast the same groups (a patient's "
                "positives are its one slide's); raise data.num_slides where patients have several slides.",
            )
        )
    if steps_per_epoch is not None and max_steps < steps_per_epoch:
        found.append(
            RunWarning(
                "shorter_than_an_epoch",
                f"the run takes {max_steps} steps, fewer than one epoch ({steps_per_epoch}): some training patients "
                "are never seen.",
            )
        )
    if warmup_steps > 0 and max_steps <= warmup_steps:
        found.append(
            RunWarning(
                "ends_in_warmup",
                f"the run ({max_steps} steps) ends inside its {warmup_steps}-step warm-up: it never trains at the "
                "peak learning rate.",
            )
        )
    return found


def finetune_warnings(steps: int) -> list[RunWarning]:
    """A fine-tune too short for its numbers to say much (fewer than :data:`MIN_FINETUNE_STEPS` steps)."""
    if steps < MIN_FINETUNE_STEPS:
        return [
            RunWarning(
                "few_finetune_steps",
                f"{steps} optimizer step(s), fewer than {MIN_FINETUNE_STEPS}: the adapter has barely moved, so its "
                "numbers mostly show the starting model; train longer (training.num_epochs, max_steps).",
            )
        ]
    return []
