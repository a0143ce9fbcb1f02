"""The settings of ``train.py`` (sections ``model``, ``data``, ``training``: :class:`TrainConfig`) and the run
settings it shares with ``finetune.py`` (:class:`RunConfig`, :class:`DataSourceConfig`): one name and one meaning
in both scripts. How they are read and spelt: docs/training.md; the finetune sections: :mod:`hlss_hf.training.config`."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from hlss_hf.cli import Config, Section
from hlss_hf.cli import check as _check
from hlss_hf.errors import ConfigError

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


def read_augmentation_file(value: Any, key: str) -> Any:
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
# Shared settings


@dataclass
class RunConfig(Section):
    """The run settings ``train.py`` and ``finetune.py`` share: output, optimisation, precision, logging,
    evaluation cadence and publishing."""

    section: ClassVar[str] = "training"

    output_dir: str = "outputs/hlss"
    """Where the model, logs and checkpoints go."""
    overwrite_output_dir: bool = False
    """Replace an earlier run in output_dir, once the new one (in <output_dir>.incoming) has finished."""
    seed: int = 0
    """Seed of the weights, the sampling and the augmentations."""
    per_device_batch_size: int = 32
    """Examples per device per step (train.py: patients; finetune.py: patches)."""
    num_epochs: float = 1.0
    """Epochs over the training split (unless max_steps)."""
    max_steps: int | None = None
    """Total optimizer steps; overrides num_epochs (null: use num_epochs)."""
    lr: float = 1e-3
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    lr_scheduler: str = "cosine"
    """transformers scheduler name."""
    warmup_ratio: float = 0.1
    """Fraction of the optimizer steps spent warming up."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step."""
    max_grad_norm: float | None = 1.0
    """Gradient clipping norm (null or 0: off)."""
    mixed_precision: Literal["no", "fp16", "bf16", "fp8"] | None = None
    """no, fp16, bf16 or fp8 (null: `accelerate launch --mixed_precision` / accelerate config, else no)."""
    cpu: bool = False
    """Run on CPU even when an accelerator is present."""
    report_to: str = "auto"
    """Trackers: tensorboard, wandb, ... (comma-separated), `all`, `none`, or `auto` (tensorboard if installed)."""
    project_name: str = "hlss"
    """Tracker project name."""
    logging_steps: int = 1
    """Log the training loss every N optimizer steps."""
    eval_steps: int = 0
    """Evaluate every N optimizer steps (0: no periodic evaluation, only at the end)."""
    eval_batch_size: int = 64
    """Patches per forward pass in evaluation."""
    push_to_hub: str | None = None
    """Hub repo id (owner/name) to push to."""
    hub_private: bool = False
    """Create the Hub repo as private."""
    model_license: str = "other"
    """License written in the model card."""
    project_url: str | None = None
    """Project link written in the model card (the code's home page)."""

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
    required: ClassVar[tuple[str, ...]] = ("dataset",)

    dataset: str | None = None
    """A local dataset folder (Hub layout or save_to_disk) or a Hub dataset id."""
    dataset_config_name: str | None = None
    """Hub dataset config name."""
    train_split: str = "train"
    """Training split."""
    validation_split: str | None = "validation"
    """Evaluation split (null: no evaluation)."""
    num_workers: int | None = None
    """DataLoader workers (null: 0 on the CPU, else this process's share of the cores but one, at most 16)."""

    def validate(self) -> None:
        super().validate()
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

    objective: Literal["hlss", "align"] = "hlss"
    """`hlss`, or `align`: CLIP's loss on (patch, data.text_column) pairs, the stage HLSS starts from."""
    init_from: str | None = None
    """Start from this HLSS model's towers and projection (e.g. an `align` run); docs/training.md."""
    init_config: str | None = None
    """A train.py config run first to make a missing model.init_from (an existing one must match it)."""
    vision: Any = "openai/clip-vit-base-patch16"
    """Vision tower: a Hub id, a folder, or transformers config fields with `model_type` (random init)."""
    text: Any = "openai/clip-vit-base-patch16"
    """Frozen text tower: as model.vision, or `pkg:<python package>` (its `model` folder)."""
    text_fallback: Any = None
    """Text tower used when `text` is `pkg:...` and that package is not installed."""
    tokenizer: str | None = None
    """Hub id, folder or pkg:<package> (null: the tower's, or a word vocabulary of the attributes')."""
    attributes: Any = "srh_brain_tumor.yaml"
    """Attribute banks: a YAML/JSON file (here or in hlss_hf/models/hlss/attributes/) or level -> attribute map."""
    use_visual_projection: bool | None = None
    """A new linear map into the joint space (null: unless both towers come from one CLIP checkpoint)."""
    projection_dim: int | None = None
    """Joint space size; default: the text tower's output size."""
    temperature: float = 0.07
    """SupCon temperature tau."""
    base_temperature: float = 0.07
    """SupCon base temperature."""
    lambda_patch: float = 1.0
    """Weight of the patch-level HVC loss."""
    lambda_slide: float = 1.0
    """Weight of the slide-level HVC loss."""
    lambda_patient: float = 1.0
    """Weight of the patient-level HVC loss."""
    lambda_align: float = 1.0
    """Weight of the hierarchical alignment loss."""
    align_temperature: float = 1.0
    """Alignment (KL) temperature tau_a."""
    alignment_reduction: str = "mean"
    """Alignment loss over images: `mean`, or `sum` (the reference's, gradient-free: lambda_align 0)."""
    text_pooling: Literal["mean", "cls", "pooler"] | None = None
    """Text pooling: mean, cls or pooler (null: the model's choice for the tower)."""
    head_init: str = "text"
    """Heads start as `text` (each level's bank) or `text_centered` (less its mean; benchmarks/README.md)."""
    caption_temperature: float = 0.07
    """Temperature of the image-text loss (objective align)."""
    class_prompts: Any = None
    """Each dataset class -> descriptions (or a YAML / JSON file of them); docs/training.md."""
    config_kwargs: dict = field(default_factory=dict)
    """Extra HLSSConfig fields passed through unchanged."""

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


@dataclass
class DataConfig(DataSourceConfig):
    """Where the patches come from and how a hierarchical batch [B, S, P, V, C, H, W] is drawn."""

    dataset: str = "demo"
    """`demo` (synthetic, built locally), a local folder in the Hub layout, or a Hub dataset id."""
    demo: dict = field(default_factory=dict)
    """Keyword arguments of build_demo_dataset (dataset: demo)."""
    cache_dir: str | None = None
    """Where the demo dataset is written and read back (null: built in memory each run)."""
    streaming: bool = False
    """Stream the training split (needs training.max_steps)."""
    text_column: str = "caption"
    """The column of text paired with each patch (model.objective align)."""
    num_slides: int = 2
    """S: slides drawn per patient."""
    num_patches: int = 2
    """P: patches drawn per slide."""
    num_views: int = 2
    """V: augmented views per patch."""
    crop_size: int = 224
    """Side of the training crops, pixels."""
    eval_resize: int | None = None
    """Evaluation: resize the shortest edge to this before the centre crop (null: no resize)."""
    eval_framing: Literal["center_crop", "resize"] = "center_crop"
    """Evaluation input: `center_crop` (data.crop_size at native resolution, after data.eval_resize if set) or
    `resize` (the whole patch resized to data.crop_size, bicubic, as the reference does)."""
    eval_antialias: bool = True
    """Antialias a shrinking evaluation resize (false: as the reference's torchvision 0.16.2)."""
    augmentation: dict | str | None = None
    """A hlss_hf.data.augmentation preset, its operations, or a YAML file (null: hlss_hf; {}: centre crop)."""
    balance_classes: bool = False
    """Replicate patients of smaller classes to balance classes."""
    drop_last: bool = True
    """Drop each epoch's last partial batch (false: the reference's; accelerate pads it across processes)."""

    def validate(self) -> None:
        self.augmentation = read_augmentation_file(self.augmentation, self.key("augmentation"))
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

    output_dir: str | None = None
    """Where the model, logs and checkpoints go (null: outputs/hlss[-align]-<dataset name>)."""

    schedule_epochs: float | None = None
    """LR schedule length in epochs, if not the run's (the reference: 40000, reporting epoch 11199)."""
    schedule_steps: int | None = None
    """Length of the LR schedule in optimizer steps (instead of schedule_epochs)."""
    schedule_length: Literal["run", "reference"] = "run"
    """Steps per epoch the LR schedule counts: `run` (each process's) or `reference` (floor(ceil(N / B) / W) for
    N patients on W processes: the reference's, faster than the epochs when W > 1; docs/fidelity.md)."""
    max_steps_this_run: int | None = None
    """Stop after this many steps in this run (checkpointing first)."""
    weight_decay_all: bool = False
    """Decay biases and norm weights too, as the reference (false: only weight matrices)."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_epsilon: float = 1e-8
    """AdamW epsilon."""
    save_steps: int = 0
    """Checkpoint every N steps (0: never, except on max_steps_this_run)."""
    save_total_limit: int = 2
    """Keep the last K checkpoints (and the newest good one, when it is older: see docs/training.md)."""
    resume_from_checkpoint: str | None = None
    """`latest` or a checkpoint folder (changeable keys: hlss_hf.training.checkpoints.RESUMABLE_KEYS)."""
    eval_at_end: bool = True
    """kNN evaluation after training."""
    eval_before_training: bool = False
    """With eval_at_end, also evaluate the untrained model first; both results are printed at the end."""
    knn_k: int = 200
    """kNN neighbours (200: the paper's, and `python -m hlss_hf.evaluate knn`'s default)."""
    knn_temperature: float = 0.07
    """kNN vote temperature."""
    knn_aggregation: str = "reference"
    """Slide / patient kNN rule: `reference` or `sum` (docs/evaluation.md)."""

    def validate(self) -> None:
        super().validate()
        _check(
            self.schedule_epochs is None or self.schedule_epochs > 0,
            self.key("schedule_epochs"),
            "must be > 0",
        )
        for name in ("schedule_steps", "max_steps_this_run", "save_total_limit", "knn_k"):
            value = getattr(self, name)
            _check(value is None or value >= 1, self.key(name), "must be >= 1")
        _check(
            self.schedule_epochs is None or self.schedule_steps is None,
            self.key("schedule_steps"),
            "set either schedule_steps or schedule_epochs, not both",
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
        for name in ("adam_beta1", "adam_beta2"):
            _check(0 <= getattr(self, name) < 1, self.key(name), "must be in [0, 1)")
        _check(self.adam_epsilon > 0, self.key("adam_epsilon"), "must be > 0")
        _check(self.save_steps >= 0, self.key("save_steps"), "must be >= 0")
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

    renamed: ClassVar[dict[str, tuple[str, str]]] = RENAMED

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
