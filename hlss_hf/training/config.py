"""The settings of ``train.py`` and ``finetune.py``, sections ``model``, ``data`` and ``training``:
:class:`TrainConfig` and :class:`RunConfig` (shared) live in :mod:`hlss_hf.training.pretrain_config`,
:class:`FinetuneConfig` here. Values come, in increasing priority, from the dataclass defaults, a YAML file
(``--config FILE`` or the script's default) and the command line (:mod:`hlss_hf.cli`; spellings:
docs/training.md); each section checks itself on construction, and every error names ``section.key``.

Example:

```python
>>> from hlss_hf.training.config import FinetuneConfig, parse_config
>>> config = parse_config(["--config", "configs/demo.yaml", "--training.lr", "1e-4"])
>>> config.training.lr
0.0001
>>> parse_config(["--model_name_or_path", "out/hlss", "--dataset", "me/data"], FinetuneConfig).training.seed
42
```
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from hlss_hf import cli
from hlss_hf.cli import Config, Section, flatten_config
from hlss_hf.cli import check as _check
from hlss_hf.errors import ConfigError
from hlss_hf.training.pretrain_config import (
    RENAMED,
    DataConfig,
    DataSourceConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    TrainingConfig,
    default_output_dir,
    read_augmentation_file,
)

__all__ = [
    "RENAMED",
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

# finetune.py's own augmentation presets, beside hlss_hf.data.augmentation.AUGMENTATION_PRESETS (hlss_hf, the strong
# pretraining set, and hlss_reference): a small adapter converges faster with a light set.
FINETUNE_AUGMENTATIONS: dict[str, dict] = {
    "light": {
        "random_resized_crop": {"p": 1.0, "scale": (0.5, 1.0)},
        "horizontal_flip": {},
        "vertical_flip": {},
    },
    "none": {},  # centre crop only
}


def _check_source(value: str, key: str) -> None:
    """A path-like value (``sources.looks_local``) must exist here; a Hub id is checked when it is loaded."""
    from hlss_hf.sources import looks_local

    if looks_local(value):
        _check(Path(value).expanduser().exists(), key, f"{value!r} does not exist")


@dataclass
class FinetuneModelConfig(Section):
    """The model ``finetune.py`` adapts and its LoRA adapters."""

    section: ClassVar[str] = "model"
    required: ClassVar[tuple[str, ...]] = ("model_name_or_path",)

    model_name_or_path: str | None = None
    """Saved HLSS folder (HLSSModel or HLSSForImageClassification) or Hub id."""
    label_names: list[str] | None = None
    """Class names in model order: required for string / integer labels; a ClassLabel's names, reordered."""
    lora_r: int = 8
    """LoRA rank."""
    lora_alpha: int = 16
    """LoRA alpha (scale = alpha / r)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA input."""
    target_modules: list[str] | None = None
    """Leaf module names in the vision tower to adapt (default: per tower type, e.g. q_proj v_proj for CLIP,
    query value for ViT / DINOv2, convolution for ResNet)."""

    def validate(self) -> None:
        super().validate()
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

    validation_split: str | None = "validation"
    """Split evaluated (null: none; 'test' when the default 'validation' is absent)."""
    datasets_cache_dir: str | None = None
    """The `datasets` cache folder (default: the HF cache)."""
    label_column: str = "label"
    """Column holding the class of each patch."""
    crop_size: int | None = None
    """Crop side; default: the model's processor crop size or image_size."""
    augmentation: dict | str = "light"
    """`light` (crop + flips), `none`, a hlss_hf.data.augmentation preset, its operations, or a YAML file."""
    max_train_samples: int | None = None
    """Use the first N training patches."""
    max_eval_samples: int | None = None
    """Use the first N evaluation patches."""

    def validate(self) -> None:
        self.augmentation = read_augmentation_file(self.augmentation, self.key("augmentation"))
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

    output_dir: str = "outputs/ft"
    """Where the adapter, metrics and report go."""
    seed: int = 42
    num_epochs: float = 3.0
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    project_name: str = "hlss_finetune"
    logging_steps: int = 10
    merge: bool = False
    """Also save the merged model (merge_and_unload)."""


@dataclass
class FinetuneConfig(Config):
    """The whole configuration of a ``finetune.py`` run."""

    renamed: ClassVar[dict[str, tuple[str, str]]] = RENAMED
    model: FinetuneModelConfig = field(default_factory=FinetuneModelConfig)
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    training: FinetuneTrainingConfig = field(default_factory=FinetuneTrainingConfig)


def parse_config(
    argv: list[str] | None = None,
    config_class: type[Config] = TrainConfig,
    default_config: str | os.PathLike | None = None,
) -> Config:
    """:func:`hlss_hf.cli.parse` of `config_class` (:class:`TrainConfig` or :class:`FinetuneConfig`): ``argv``
    (default ``sys.argv[1:]``) over ``--config FILE`` or `default_config`; :class:`ConfigError` names the key."""
    return cli.parse(config_class, argv, default_config)


def format_help(
    config_class: type[Config] = TrainConfig, default_config: str | os.PathLike | None = None
) -> str:
    """:func:`hlss_hf.cli.format_help`: every key with the default the run uses (`default_config`'s where set)."""
    return cli.format_help(config_class, default_config)


def command_line_value(argv: list[str], key: str, config_class: type[Config] = TrainConfig) -> Any:
    """:func:`hlss_hf.cli.command_line_value` (None when `argv` does not set `key`)."""
    return cli.command_line_value(argv, key, config_class)
