"""Model cards: the card of a pretraining run (``hub/templates/model_card.md`` filled by
:func:`render_model_card`), the fine-tuned adapter's and merged model's cards, and the upload of a run's folder.
Evaluation results and their later updates are in :mod:`hlss_hf.hub.model_index` (docs/hub.md, model cards).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from huggingface_hub import HfApi, ModelCardData

from hlss_hf.data.augmentation import AUGMENTATION_PRESETS, DEFAULT_AUGMENTATION
from hlss_hf.files import write_text_atomically
from hlss_hf.hub.model_index import (
    KNN_CARD_METRICS,
    LEVELS,
    PACKAGED_MODELS,
    PROBE_CARD_METRICS,
    hub_id,
    model_index_yaml,
    percent_cell,
)
from hlss_hf.sources import hub_url
from hlss_hf.training.checkpoints import TrainState
from hlss_hf.training.config import TrainConfig
from hlss_hf.training.lora import format_target_modules

#: The card template (package data).
MODEL_CARD_TEMPLATE = Path(__file__).resolve().parents[1] / "hub" / "templates" / "model_card.md"
_PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")


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


def _warning_list(warnings: Sequence[dict[str, str]]) -> str:
    """A run's named warnings (:mod:`hlss_hf.training.run_warnings`) as a card lists them."""
    return "The run warned that some numbers mean less than they seem:\n\n" + "\n".join(
        f"- `{w['name']}`: {w['message']}" for w in warnings
    )


def _command(script: str, argv: Sequence[str]) -> str:
    return f"python {script} " + shlex.join(argv)


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
    """The card's `datasets` / `base_model` metadata (YAML) for ``data.dataset`` and the tower specs: only the
    names that are Hub ids (:func:`hub_id`)."""
    links = {
        "datasets": [dataset] if hub_id(dataset) else [],
        "base_model": [*dict.fromkeys(filter(None, map(hub_id, towers)))],
    }
    links = {key: names for key, names in links.items() if names}
    return yaml.safe_dump(links, sort_keys=False) if links else ""


def model_card_values(config: TrainConfig, state: TrainState, metrics: dict[str, float], ctx: dict) -> dict:
    """Every placeholder of the card template from the run: its config, final `state`, kNN `metrics`
    (``eval/patch/acc`` ..., possibly empty) and `ctx` (``model`` unwrapped, ``train_dataset``, ``modality``,
    ``num_processes``, ``device``, ``seconds``, ``argv``, ...)."""
    m, d, t = config.model, config.data, config.training
    model, modality = ctx["model"], ctx["modality"]
    mc = model.config
    names = getattr(mc, "attribute_names", None) or {}
    index = getattr(ctx.get("train_dataset"), "index", None)
    srh = modality == "srh"
    if d.dataset == "demo":
        dataset_id = "hlss-synthetic-demo"
    else:
        dataset_id = Path(d.dataset).name if Path(d.dataset).exists() else d.dataset
    is_hub_dataset = d.dataset != "demo" and hub_id(d.dataset) is not None
    repo_id = t.push_to_hub or str(t.output_dir)
    model_name = t.push_to_hub.split("/")[-1] if t.push_to_hub else Path(t.output_dir).name
    num_labels = len(index.class_names) if index is not None else "n/a"
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
        {f"{lv}_{key}": percent_cell(metrics, lv, key) for lv in LEVELS for key, _, _ in KNN_CARD_METRICS}
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
    """The run's named warnings (:mod:`hlss_hf.training.run_warnings`): where its numbers mean less than they seem."""
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
            + " | ".join(percent_cell(metrics, f"zeroshot/{level}", key) for key, _, _ in PROBE_CARD_METRICS)
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
            "nearest to, compared with patches in general (`hlss_hf.evaluation.explain.class_attribute_summary`, fixed banks; "
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


# ------------------------------------------------------------------ the fine-tuned adapter's and merged model's cards
def finetune_card(kind: str, config: Any, report: dict[str, Any], argv: Sequence[str]) -> str:
    """The README.md of ``finetune.py``'s adapter (`kind="adapter"`) or merged model (`"merged"`), filled from the
    run's ``FinetuneConfig``, report and command line; replaces PEFT's empty template."""
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
    metadata = ModelCardData(
        library_name="peft" if kind == "adapter" else "transformers",
        pipeline_tag="image-classification",
        tags=["hlss", "histopathology", "lora", "image-classification"],
        **yaml.safe_load(license_metadata(t.model_license, t.project_url) + hub_links(dataset, [base_model])),
    )
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
    return f"---\n{metadata.to_yaml()}\n---\n\n" + "\n".join(lines)


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
    t, api = config.training, HfApi()
    api.create_repo(t.push_to_hub, private=t.hub_private, exist_ok=True)
    commit = api.upload_folder(
        repo_id=t.push_to_hub,
        folder_path=t.output_dir,
        ignore_patterns=["checkpoints/*", "runs/*", "demo_dataset/*", "*.tmp", f"{t.project_name}/*"],
        commit_message="HLSS pretraining: model, processor and model card",
    )
    return str(getattr(commit, "commit_url", commit))
