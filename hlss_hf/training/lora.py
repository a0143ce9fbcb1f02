"""LoRA fine-tuning of the vision tower of ``HLSSForImageClassification`` with PEFT: the adapter's settings, the
classifier it trains, its evaluation, and the adapter / merged folders it is saved as.

The adapters go into the vision tower only (module prefix ``vision_model``); the new classification head
(``classifier``) trains in full and is saved with the adapter (``modules_to_save``). ``visual_projection``
stays frozen.

Example:

```python
from peft import get_peft_model
from hlss_hf import HLSSForImageClassification
from hlss_hf.training.lora import lora_config_for

model = HLSSForImageClassification.from_pretrained("out/hlss", num_labels=7)
peft_model = get_peft_model(model, lora_config_for(model, r=8, alpha=16))
peft_model.print_trainable_parameters()
```
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from huggingface_hub import HfApi, hf_hub_download
from peft import LoraConfig, PeftConfig, PeftModel
from torch import nn

from hlss_hf.evaluation import hierarchical_metrics
from hlss_hf.files import naming_full_disk
from hlss_hf.models.hlss.configuration_hlss import HLSSConfig
from hlss_hf.models.hlss.modeling_hlss import HLSSForImageClassification
from hlss_hf.models.hlss.processing_hlss import HLSSImageProcessor
from hlss_hf.sources import hub_url
from hlss_hf.training.config import FINETUNE_AUGMENTATIONS
from hlss_hf.training.run_warnings import informative_metrics

VISION_PREFIX = "vision_model"
HEAD_MODULES = ["classifier"]
#: Written beside the adapter by `finetune.py`: `{"id2label": {"0": name, ...}}`, to rebuild the classifier.
LABELS_FILE = "labels.json"
#: How `peft.AutoPeftModel` rebuilds the base model of our adapters. PEFT would record the base class's own module
#: (`hlss_hf.models.hlss.modeling_hlss`, or `transformers_modules...` under remote code), which its import allowlist refuses;
#: the transformers Auto class resolves to the same class, with or without hlss_hf installed.
AUTO_MAPPING = {"base_model_class": "AutoModelForImageClassification", "parent_library": "transformers"}

# Leaf module names LoRA targets by default, per transformers vision `model_type`: the query / value projections of
# attention towers (as in the LoRA paper), the point-wise (Linear) convolutions of ConvNeXt and the convolutions of
# ResNet (LoRA supports Conv2d). transformers 5 names ViT-family projections q_proj / v_proj (4.x: query / value);
# when the tower is given and lacks the table's names, the names present in it are discovered instead.
_DEFAULT_TARGETS: dict[str, list[str]] = {
    "clip_vision_model": ["q_proj", "v_proj"],
    "siglip_vision_model": ["q_proj", "v_proj"],
    "siglip2_vision_model": ["q_proj", "v_proj"],
    "vit": ["q_proj", "v_proj"],
    "deit": ["q_proj", "v_proj"],
    "beit": ["q_proj", "v_proj"],
    "dinov2": ["q_proj", "v_proj"],
    "dinov2_with_registers": ["q_proj", "v_proj"],
    "swin": ["q_proj", "v_proj"],
    "swinv2": ["query", "value"],
    "resnet": ["convolution"],
    "convnext": ["pwconv1", "pwconv2"],
    "convnextv2": ["pwconv1", "pwconv2"],
}

# Tried in order on towers whose model_type is not in the table (e.g. timm models through TimmWrapper: "qkv").
_DISCOVERY_ORDER: list[list[str]] = [
    ["q_proj", "v_proj"],
    ["query", "value"],
    ["qkv"],
    ["pwconv1", "pwconv2"],
    ["convolution"],
]

_LORA_LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _leaf_names(module: nn.Module) -> set[str]:
    """Names (last path component) of the LoRA-capable layers inside `module`."""
    return {
        name.rsplit(".", 1)[-1] for name, sub in module.named_modules() if isinstance(sub, _LORA_LAYER_TYPES)
    }


def default_lora_target_modules(vision_config, vision_model: nn.Module | None = None) -> list[str]:
    """Leaf module names (e.g. `["q_proj", "v_proj"]`) to put LoRA on for a vision tower: by its config's
    `model_type`; when `vision_model` is given and lacks the table's names (another transformers release, or a type
    outside the table), the first known name family present in it (e.g. `qkv` for timm ViTs). Raises `ValueError`
    when none is found."""
    model_type = getattr(vision_config, "model_type", None)
    present = _leaf_names(vision_model) if vision_model is not None else None
    table = _DEFAULT_TARGETS.get(model_type)
    if table is not None and (present is None or all(name in present for name in table)):
        return list(table)
    if present is not None:
        for family in _DISCOVERY_ORDER:
            if all(name in present for name in family):
                return list(family)
    raise ValueError(
        f"No default LoRA target modules for vision tower type {model_type!r}; pass target_modules "
        f"(--target_modules) with leaf names of its Linear / Conv layers"
        + (f", e.g. one of {sorted(present)[:20]}" if present is not None else "")
    )


def vision_target_regex(target_modules: Sequence[str]) -> str:
    """A PEFT `target_modules` regex (matched with `re.fullmatch`) for the given leaf names inside the vision tower
    only, e.g. `vision_model\\.(.*\\.)?(q_proj|v_proj)`."""
    names = "|".join(re.escape(name) for name in target_modules)
    return rf"{VISION_PREFIX}\.(.*\.)?({names})"


def lora_config_for(
    model: nn.Module,
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.0,
    target_modules: Sequence[str] | None = None,
    bias: str = "none",
) -> LoraConfig:
    """A `LoraConfig` for an `HLSSForImageClassification`: LoRA on the vision tower, the classifier trained in full.

    `model` is only read. `alpha` is the scaling numerator (`scale = alpha / r`); `target_modules` are leaf names
    inside the vision tower (default :func:`default_lora_target_modules`); `bias`: `"none"`, `"all"` or
    `"lora_only"`. Raises `ValueError` for bad hyperparameters or a name that matches no layer of the tower.
    """
    if r < 1:
        raise ValueError(f"lora_r must be >= 1, got {r}")
    if alpha <= 0:
        raise ValueError(f"lora_alpha must be > 0, got {alpha}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"lora_dropout must be in [0, 1), got {dropout}")
    vision_model = getattr(model, VISION_PREFIX, None)
    if vision_model is None:
        raise ValueError(f"{type(model).__name__} has no `{VISION_PREFIX}` submodule to put LoRA on")
    vision_config = getattr(model.config, "vision_config", None)
    if target_modules is None:
        target_modules = default_lora_target_modules(vision_config, vision_model)
    target_modules = [str(name) for name in target_modules]
    if not target_modules:
        raise ValueError("target_modules is empty")
    present = _leaf_names(vision_model)
    missing = [name for name in target_modules if name not in present]
    if missing:
        raise ValueError(
            f"target module(s) {missing} match no Linear / Conv layer in the vision tower "
            f"({getattr(vision_config, 'model_type', '?')}); available leaf names: {sorted(present)}"
        )
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=vision_target_regex(target_modules),
        modules_to_save=list(HEAD_MODULES),
        bias=bias,
    )


def set_train_mode(model: nn.Module, mode: bool = True) -> nn.Module:
    """`model.train(mode)`, but batch-norm layers whose parameters are frozen stay in eval mode.

    In train mode a batch norm updates its running statistics even when its weights are frozen; those buffers are
    not part of the adapter, so a saved adapter would no longer reproduce the fine-tuned model (ResNet towers).
    Returns `model`.
    """
    model.train(mode)
    if mode:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
                p.requires_grad for p in module.parameters(recurse=False)
            ):
                module.eval()
    return model


def load_lora_classifier(adapter_dir, base_model: str | None = None, is_trainable: bool = False, **kwargs):
    """A `peft.PeftModel` wrapping an `HLSSForImageClassification` with the saved classes: the adapter folder of
    `finetune.py` (with `labels.json`) on `base_model` (default: the one its `adapter_config.json` records);
    `kwargs` go to `HLSSForImageClassification.from_pretrained` (e.g. `dtype`)."""
    adapter_dir = Path(adapter_dir)
    labels_path = adapter_dir / LABELS_FILE
    if not labels_path.is_file():
        raise FileNotFoundError(f"{labels_path} is missing: the adapter folder must come from finetune.py")
    if base_model is None:
        base_model = PeftConfig.from_pretrained(str(adapter_dir)).base_model_name_or_path
        if not base_model:
            raise ValueError(f"{adapter_dir}/adapter_config.json names no base model; pass base_model")
    model = HLSSForImageClassification.from_pretrained(base_model, **adapter_labels(adapter_dir), **kwargs)
    return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=is_trainable)


def finish_adapter_folder(adapter_dir, names: Sequence[str]) -> None:
    """Make a folder `PeftModel.save_pretrained` wrote self-describing: `labels.json` (`names` in classifier order)
    and an `auto_mapping` AutoPeftModel accepts."""
    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["auto_mapping"] = dict(AUTO_MAPPING)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    labels = {"id2label": {str(i): name for i, name in enumerate(names)}}
    (adapter_dir / LABELS_FILE).write_text(json.dumps(labels, indent=2) + "\n", encoding="utf-8")


def adapter_labels(adapter: str | Path, **hub_kwargs) -> dict:
    """`num_labels` / `id2label` / `label2id` of an adapter (folder or Hub id), from its `labels.json`. For
    `AutoPeftModel.from_pretrained(adapter, **adapter_labels(adapter))` when the base model's config does not
    already hold the adapter's classes. `hub_kwargs` go to `huggingface_hub.hf_hub_download` (e.g.
    `revision`)."""
    path = Path(adapter) / LABELS_FILE
    if not path.is_file():
        path = Path(hf_hub_download(str(adapter), LABELS_FILE, **hub_kwargs))
    id2label = {int(i): n for i, n in json.loads(path.read_text(encoding="utf-8"))["id2label"].items()}
    return {
        "num_labels": len(id2label),
        "id2label": id2label,
        "label2id": {name: i for i, name in id2label.items()},
    }


def format_target_modules(target_modules: str | Sequence[str]) -> str:
    """LoRA target modules as the config holds them: a regular expression (PEFT matches a string as one) shown as
    written, a list of module names joined."""
    if isinstance(target_modules, str):
        return f"`{target_modules}` (a regular expression over module names)"
    return ", ".join(f"`{name}`" for name in target_modules)


def augmentation_config(spec: str | dict) -> dict | str:
    """What `hlss_hf.data.augmentation.build_augmentation` takes for `data.augmentation`: finetune's own presets
    (`light`, `none`) as their operations; a preset of `hlss_hf.data.augmentation` by name; a mapping as it is (a
    YAML file was read into one when the config was validated)."""
    if isinstance(spec, str):
        return FINETUNE_AUGMENTATIONS.get(spec, spec)
    return spec


def load_classifier(model_path: str, names: list[str]):
    """`HLSSForImageClassification` for the classes `names`, from a saved HLSS folder. From an `HLSSModel`
    folder the classifier is new. From an `HLSSForImageClassification` folder (a merged fine-tune) a trained
    classifier over the same class names is kept, its rows reordered to `names`; over other names it is
    re-initialised, with a warning."""
    config = HLSSConfig.from_pretrained(model_path)
    trained = "HLSSForImageClassification" in (config.architectures or [])
    old_names = [config.id2label[i] for i in range(len(config.id2label))] if trained else []
    id2label = dict(enumerate(names))
    label2id = {name: i for i, name in enumerate(names)}
    if sorted(old_names) == sorted(names) and old_names != names:
        model = HLSSForImageClassification.from_pretrained(model_path)
        order = torch.tensor([old_names.index(name) for name in names])
        with torch.no_grad():
            model.classifier.weight.copy_(model.classifier.weight[order].clone())
            model.classifier.bias.copy_(model.classifier.bias[order].clone())
        model.config.id2label, model.config.label2id = id2label, label2id
        return model
    if trained and old_names != names:
        warnings.warn(
            f"model {model_path!r} classifies {old_names}, the dataset has {names}: the classifier is "
            "re-initialised",
            stacklevel=2,
        )
    model = HLSSForImageClassification.from_pretrained(
        model_path, num_labels=len(names), id2label=id2label, label2id=label2id, ignore_mismatched_sizes=True
    )
    if trained and old_names != names and len(old_names) == len(names):
        # Same shape, so from_pretrained kept the old rows: start the new classes from scratch.
        with torch.no_grad():
            model.classifier.weight.normal_(0.0, config.initializer_range)
            model.classifier.bias.zero_()
    return model


def load_processor(model_path: str, model, crop_size: int | None) -> HLSSImageProcessor:
    """The model's saved image processor (or a default one for its modality) with the crop size used here."""
    try:
        processor = HLSSImageProcessor.from_pretrained(model_path)
    except OSError:
        processor = HLSSImageProcessor(modality=getattr(model.config, "modality", "he"))
    if crop_size is None:
        crop_size = int(processor.crop_size["height"]) if processor.do_center_crop else None
        crop_size = crop_size or int(getattr(model.config, "image_size", 224))
    processor.do_center_crop = True
    processor.crop_size = {"height": int(crop_size), "width": int(crop_size)}
    return processor


@torch.no_grad()
def evaluate(
    model, loader, accelerator, labels: torch.Tensor, slide_ids, patient_ids, num_classes: int
) -> dict[str, float]:
    """Softmax patch scores over the evaluation split (`loader`'s items carry their row `index`; `labels` `[N]`,
    `slide_ids` / `patient_ids` per row or `None` to skip that level) -> `loss` and `{level}/{metric}` of
    `hlss_hf.evaluation.hierarchical_metrics`."""
    was_training = model.training
    model.eval()
    all_scores, all_index = [], []
    for batch in loader:
        logits = model(pixel_values=batch["pixel_values"]).logits.float()
        scores, index = accelerator.gather_for_metrics((logits.log_softmax(-1), batch["index"]))
        all_scores.append(scores.cpu())
        all_index.append(index.cpu())
    set_train_mode(model, was_training)
    log_scores = torch.cat(all_scores)
    index = torch.cat(all_index)
    # Put the rows back in dataset order (gather_for_metrics keeps each row once).
    order = torch.argsort(index)
    log_scores, index = log_scores[order], index[order]
    if index.numel() != labels.numel() or not torch.equal(index, torch.arange(labels.numel())):
        raise RuntimeError(
            f"evaluation saw {index.numel()} rows, expected each of the {labels.numel()} rows once"
        )
    rows = index.tolist()
    metrics = {"loss": float(F.nll_loss(log_scores, labels))}
    levels = hierarchical_metrics(
        log_scores.exp(),
        labels,
        None if slide_ids is None else [slide_ids[i] for i in rows],
        None if patient_ids is None else [patient_ids[i] for i in rows],
        num_classes,
    )
    metrics.update(informative_metrics(levels, num_classes))  # top-k over k or fewer classes is always 1
    return metrics


def save_adapter(peft_model, processor, names: list[str], target: Path, state_dict=None) -> None:
    """Adapter (PEFT, loadable by `peft.AutoPeftModel`: :data:`AUTO_MAPPING`) + processor + labels.json into
    `target`; `state_dict`: the full weights from `accelerator.get_state_dict` (sharded models hold only a part)."""
    # About what the adapter file holds: the trained parameters (LoRA and the classifier).
    needed = sum(p.numel() * p.element_size() for p in peft_model.parameters() if p.requires_grad)
    with naming_full_disk(target, needed):
        peft_model.save_pretrained(str(target), state_dict=state_dict)
        processor.save_pretrained(str(target))
    finish_adapter_folder(target, names)


def save_merged(peft_model, processor, target: Path):
    """`merge_and_unload` (in place: call last) and save the plain model with its processor."""
    merged = peft_model.merge_and_unload()
    with naming_full_disk(
        target, lambda: sum(t.numel() * t.element_size() for t in merged.state_dict().values())
    ):
        merged.save_pretrained(str(target))
        processor.save_pretrained(str(target))
    return merged


def push_adapter(adapter_dir: Path, args) -> str:
    """Upload the adapter folder (with its card) to `training.push_to_hub`; returns the repo's address."""
    api = HfApi()
    api.create_repo(args.training.push_to_hub, private=args.training.hub_private, exist_ok=True)
    api.upload_folder(
        repo_id=args.training.push_to_hub,
        folder_path=str(adapter_dir),
        commit_message="HLSS LoRA adapter (finetune.py)",
    )
    return hub_url(args.training.push_to_hub)
