"""Interpretability through the language-tied heads: which attributes an image, slide, patient or class is tied
to, as numbers, lines for a terminal and figures (docs/evaluation.md#explanations)."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hlss_hf.evaluation.embeddings import EmbeddingSet
from hlss_hf.evaluation.metrics import LEVELS
from hlss_hf.files import write_file_atomically


def _attribute_names(model: nn.Module) -> dict[str, list[str]]:
    config = getattr(model, "config", None)
    names = getattr(config, "attribute_names", None)
    if not names or getattr(model, "heads", None) is None:
        raise ValueError(
            f"{type(model).__name__} has no attribute heads / config.attribute_names: interpretability needs an "
            "HLSSModel built with attribute banks"
        )
    return {level: list(names[level]) for level in LEVELS if names.get(level)}


def attribute_scores(
    model: nn.Module,
    embeddings: torch.Tensor,
    level: str = "patch",
    use_heads: bool = True,
    batch_size: int = 4096,
) -> torch.Tensor:
    """`[N, N_l]` affinities (on the CPU) of normalised image embeddings `[N, D]` to an `HLSSModel`'s
    attributes of one level: the trained heads' `normalize(head_l(z))`, or without `use_heads` the bank
    cosines `z . t_a`."""
    names = _attribute_names(model)
    if level not in names:
        raise ValueError(f"level must be one of {list(names)}, got {level!r}")
    head = model.heads[level]
    param = next(head.parameters())
    rows = []
    with torch.no_grad():
        for start in range(0, embeddings.shape[0], batch_size):
            z = embeddings[start : start + batch_size].to(device=param.device, dtype=param.dtype)
            if use_heads:
                scores = F.normalize(head(z), dim=-1)
            else:
                scores = z @ getattr(model, f"bank_{level}").to(z.dtype).T
            rows.append(scores.float().cpu())
    return torch.cat(rows) if rows else torch.zeros(0, len(names[level]))


def _select(embedding_set: EmbeddingSet, index, slide_id, patient_id) -> tuple[dict[str, Any], torch.Tensor]:
    chosen = [
        (kind, value)
        for kind, value in (("index", index), ("slide", slide_id), ("patient", patient_id))
        if value is not None
    ]
    if len(chosen) != 1:
        raise ValueError("give exactly one of index, slide_id or patient_id")
    kind, value = chosen[0]
    if kind == "index":
        if not -len(embedding_set) <= int(value) < len(embedding_set):
            raise ValueError(f"index {value} is outside the {len(embedding_set)} patches")
        rows = torch.tensor([int(value) % len(embedding_set)])
    else:
        ids = embedding_set.slide_ids if kind == "slide" else embedding_set.patient_ids
        if ids is None:
            raise ValueError(f"the embeddings have no {kind} ids (the dataset has no {kind}_id column)")
        rows = torch.tensor([i for i, v in enumerate(ids) if v == str(value)], dtype=torch.long)
        if len(rows) == 0:
            raise ValueError(f"{kind} {value!r} is not in the embeddings")
    labels = sorted({int(v) for v in embedding_set.labels[rows]})
    target = {
        "kind": kind,
        "id": int(value) if kind == "index" else str(value),
        "num_patches": len(rows),
        "labels": [embedding_set.class_names[c] for c in labels],
    }
    return target, rows


def _top(ranked: torch.Tensor, affinity: torch.Tensor, names: list[str], k: int) -> list[dict[str, Any]]:
    """The `k` attributes of highest `ranked` score, each with its raw mean `affinity`."""
    values, order = ranked.topk(min(k, len(names)))
    return [
        {"attribute": names[i], "score": float(v), "affinity": float(affinity[i])}
        for v, i in zip(values.tolist(), order.tolist(), strict=True)
    ]


def _standardized(scores: torch.Tensor) -> torch.Tensor:
    """``[N, A]`` affinities standardised per attribute over the ``N`` patches (z-scores)."""
    spread = (
        scores.std(dim=0, unbiased=False).clamp_min(1e-12) if len(scores) > 1 else torch.ones(scores.shape[1])
    )
    return (scores - scores.mean(dim=0)) / spread


def explain(
    model: nn.Module,
    embedding_set: EmbeddingSet,
    index: int | None = None,
    slide_id: str | None = None,
    patient_id: str | None = None,
    k: int = 5,
    use_heads: bool = True,
    standardize: bool = True,
) -> dict[str, Any]:
    """Top attributes of every level for one image, one slide or one patient (mean over its patches).

    The target is one of `index` (a row of the set), `slide_id` or `patient_id`; `k` attributes per level,
    ranked by affinities standardised over the whole set (docs/evaluation.md#explanations) or, without
    `standardize`, raw ones; `use_heads`: see :func:`attribute_scores`.

    Returns:
        JSON-ready `dict`: `{"target": {"kind", "id", "num_patches", "labels"}, "levels": {level:
        [{"attribute": name, "score": float, "affinity": float}, ...]}}`, attributes by decreasing score (the
        standardised mean affinity, or the raw one without `standardize`; `affinity` is always the raw mean).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    names = _attribute_names(model)
    target, rows = _select(embedding_set, index, slide_id, patient_id)
    levels = {}
    for level, level_names in names.items():
        scores = attribute_scores(model, embedding_set.embeddings, level, use_heads)  # [N, A]
        affinity = scores[rows].mean(dim=0)
        ranked = _standardized(scores)[rows].mean(dim=0) if standardize else affinity
        levels[level] = _top(ranked, affinity, level_names, k)
    return {"target": target, "levels": levels}


def class_attribute_summary(
    model: nn.Module,
    embedding_set: EmbeddingSet,
    k: int = 5,
    use_heads: bool = True,
    standardize: bool = True,
) -> dict[str, Any]:
    """Mean attribute affinity of each class, and each class's top attributes, per level.

    `k`, `use_heads` and `standardize` as in :func:`explain`.

    Returns:
        JSON-ready `dict`: `{"class_names": [...], "num_patches": {class: n}, "affinity": "heads" or "banks",
        "ranked_by": "standardized" or "mean", "levels": {level: {"attributes": [...], "mean": [[C x N_l]],
        "standardized": [[C x N_l]], "top": {class: [{"attribute", "score", "affinity"}]}}}}`: a top item's
        `score` is what ranked it, `affinity` the raw mean. Classes without patches: NaN means, no top items.
    """
    if len(embedding_set) == 0:
        raise ValueError("cannot summarise an empty embedding set")
    names = _attribute_names(model)
    num_classes = embedding_set.num_classes
    counts = torch.bincount(embedding_set.labels, minlength=num_classes)
    summary: dict[str, Any] = {
        "class_names": embedding_set.class_names,
        "num_patches": {
            name: int(n) for name, n in zip(embedding_set.class_names, counts.tolist(), strict=True)
        },
        # How affinities were measured and which class means rank the attributes (and fill the heatmap).
        "affinity": "heads" if use_heads else "banks",
        "ranked_by": "standardized" if standardize else "mean",
        "levels": {},
    }

    def class_means(scores: torch.Tensor) -> torch.Tensor:
        sums = torch.zeros(num_classes, scores.shape[1]).index_add_(0, embedding_set.labels, scores)
        mean = sums / counts[:, None].clamp(min=1)
        mean[counts == 0] = float("nan")
        return mean

    for level, level_names in names.items():
        scores = attribute_scores(model, embedding_set.embeddings, level, use_heads)
        mean, standardized = class_means(scores), class_means(_standardized(scores))
        ranked = standardized if standardize else mean
        top = {
            name: _top(ranked[c], mean[c], level_names, k) if counts[c] else []
            for c, name in enumerate(embedding_set.class_names)
        }
        summary["levels"][level] = {
            "attributes": level_names,
            "mean": mean.tolist(),
            "standardized": standardized.tolist(),
            "top": top,
        }
    return summary


def format_explanation(explanation: dict[str, Any]) -> str:
    """:func:`explain`'s result as lines for a terminal: the target, then each level's top attributes."""
    target = explanation["target"]
    lines = [
        f"{target['kind']} {target['id']} ({target['num_patches']} patches; label {', '.join(target['labels'])})"
    ]
    for level, items in explanation["levels"].items():
        lines.append(f"  {level} attributes:")
        lines.extend(f"    {item['score']:+.3f}  {item['attribute']}" for item in items)
    return "\n".join(lines)


def format_class_summary(summary: dict[str, Any]) -> str:
    """:func:`class_attribute_summary`'s top attributes per level and class, as lines for a terminal."""
    lines = []
    for level, data in summary["levels"].items():
        lines.append(f"{level} attributes, top per class:")
        for class_name, items in data["top"].items():
            n = summary["num_patches"][class_name]
            if not items:
                lines.append(f"  {class_name} (no patches)")
                continue
            tops = ", ".join(f"{item['attribute']} ({item['score']:+.2f})" for item in items)
            lines.append(f"  {class_name} ({n} patches): {tops}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- figures
# matplotlib (0.75 s to import) is imported where a figure is drawn: train.py imports this module for its scores.


def _save(figure, path: str | os.PathLike) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    write_file_atomically(path, lambda tmp: figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    return Path(path)


def plot_explanation(explanation: dict[str, Any], path: str | os.PathLike) -> Path:
    """Bar chart of :func:`explain`'s top attributes, one panel per level; written as PNG to `path`."""
    from matplotlib.figure import Figure

    levels = explanation["levels"]
    figure = Figure(
        figsize=(5 * len(levels), 0.4 * max(len(v) for v in levels.values()) + 1.8), layout="constrained"
    )
    axes = figure.subplots(1, len(levels), squeeze=False)[0]
    for axis, (level, items) in zip(axes, levels.items(), strict=True):
        labels = [item["attribute"] for item in items][::-1]
        axis.barh(labels, [item["score"] for item in items][::-1], color="tab:blue")
        axis.set_title(f"{level} attributes")
        axis.set_xlabel("affinity")
    target = explanation["target"]
    figure.suptitle(
        f"{target['kind']} {target['id']} ({target['num_patches']} patches, {', '.join(target['labels'])})"
    )
    return _save(figure, path)


def heatmap_attributes(summary: dict[str, Any], level: str, max_attributes: int = 20) -> list[int]:
    """Columns a class heatmap shows: all attributes of the level when there are at most ``max_attributes``,
    else the classes' top attributes (round-robin over classes, best first) up to ``max_attributes``."""
    data = summary["levels"][level]
    attributes = data["attributes"]
    if len(attributes) <= max_attributes:
        return list(range(len(attributes)))
    index = {name: i for i, name in enumerate(attributes)}
    ranked = [[index[item["attribute"]] for item in items] for items in data["top"].values()]
    chosen: list[int] = []
    for rank in range(max((len(r) for r in ranked), default=0)):
        for order in ranked:
            if rank < len(order) and order[rank] not in chosen and len(chosen) < max_attributes:
                chosen.append(order[rank])
    return chosen


def plot_class_heatmap(
    summary: dict[str, Any], level: str, path: str | os.PathLike, max_attributes: int = 20
) -> Path:
    """PNG heatmap of the class means that rank the attributes (standardised or raw), classes by attributes of
    one level; beyond ``max_attributes`` only the classes' top (:func:`heatmap_attributes`), as titled."""
    from matplotlib.figure import Figure

    if level not in summary["levels"]:
        raise ValueError(f"level {level!r} not in the summary (levels: {list(summary['levels'])})")
    data = summary["levels"][level]
    columns = heatmap_attributes(summary, level, max_attributes)
    classes = summary["class_names"]
    attributes = [textwrap.shorten(data["attributes"][i], width=40, placeholder="...") for i in columns]
    ranked_by = summary.get("ranked_by", "mean")
    values = torch.tensor(data[ranked_by])[:, columns]  # [C, shown attributes]
    figure = Figure(
        figsize=(max(5.0, 0.55 * len(attributes) + 3), max(3.5, 0.45 * len(classes) + 2.5)),
        layout="constrained",
    )
    axis = figure.subplots()
    image = axis.imshow(values.numpy(), aspect="auto", cmap="viridis")
    axis.set_xticks(range(len(attributes)), attributes, rotation=50, ha="right", fontsize=8)
    axis.set_yticks(range(len(classes)), classes)
    axis.set_xlabel(f"{level} attribute")
    axis.set_ylabel("class")
    shown = (
        ""
        if len(columns) == len(data["attributes"])
        else f" (top {len(columns)} of {len(data['attributes'])})"
    )
    what = "standardised affinity" if ranked_by == "standardized" else "affinity"
    axis.set_title(f"mean {level} attribute {what} per class{shown}")
    finite = values[torch.isfinite(values)]
    middle = float(finite.min() + finite.max()) / 2 if finite.numel() else 0.0
    if len(classes) * len(columns) <= 400:  # values stay legible
        for row in range(values.shape[0]):
            for col in range(values.shape[1]):
                value = float(values[row, col])
                if value == value:  # not NaN
                    colour = "black" if value > middle else "white"
                    axis.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=7, color=colour)
    bar = figure.colorbar(image, ax=axis)
    source = "fixed bank: cosine to the descriptions" if summary.get("affinity") == "banks" else "head output"
    scale = "z-score over all patches" if ranked_by == "standardized" else "cosine"
    bar.set_label(f"mean affinity ({source}; {scale})")
    return _save(figure, path)


def plot_loss_curve(
    records: Sequence[dict], path: str | os.PathLike, title: str = "training loss"
) -> Path | None:
    """The training loss (and each logged part: hvc_*, ha_*, alignment / image-text losses) against the optimizer
    step, from ``metrics.jsonl`` records (those without ``step`` and ``loss`` are skipped), as PNG written
    atomically; ``None`` when no record holds a loss."""
    from matplotlib.figure import Figure

    steps = [r for r in records if "loss" in r and "step" in r]
    if not steps:
        return None
    parts = [k for k in steps[-1] if k == "loss" or k.endswith("_loss") or k.startswith(("hvc_", "ha_"))]
    figure = Figure(figsize=(6.5, 4))
    axis = figure.subplots()
    for key in parts:
        points = [(r["step"], r[key]) for r in steps if isinstance(r.get(key), int | float)]
        if points:
            xs, ys = zip(*points, strict=True)
            axis.plot(xs, ys, label=key, linewidth=2.0 if key == "loss" else 1.0)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("loss")
    axis.set_title(title)
    axis.legend(fontsize=7, loc="upper right")
    axis.grid(alpha=0.3)
    return _save(figure, path)


def plot_confusion_matrix(
    matrix: torch.Tensor, class_names: Sequence[str], path: str | os.PathLike, title: str = "confusion matrix"
) -> Path:
    """Confusion matrix (rows true, columns predicted) with counts in the cells, as PNG."""
    from matplotlib.figure import Figure

    matrix = torch.as_tensor(matrix)
    size = max(3.5, 0.55 * len(class_names) + 2)
    figure = Figure(figsize=(size, size))
    axis = figure.subplots()
    axis.imshow(matrix.numpy(), cmap="Blues")
    axis.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    axis.set_yticks(range(len(class_names)), class_names)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    axis.set_title(title)
    peak = float(matrix.max()) if matrix.numel() else 0.0
    for row, counts in enumerate(matrix.tolist()):
        for col, value in enumerate(counts):
            colour = "white" if value > peak / 2 else "black"
            axis.text(col, row, str(int(value)), ha="center", va="center", color=colour, fontsize=8)
    return _save(figure, path)
