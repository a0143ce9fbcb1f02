"""LoRA fine-tuning of an HLSS vision tower for patch classification, with PEFT and Accelerate.

    python finetune.py --model out/hlss --dataset data/demo --output_dir out/ft --epochs 3 --merge
    python finetune.py --config configs/finetune.yaml --max_steps 200          # YAML + overrides
    accelerate launch --mixed_precision bf16 finetune.py --model out/hlss --dataset <hub id>

The model is `HLSSForImageClassification` built from a saved HLSS folder (`vision_model` + `visual_projection`
+ a new `classifier`). LoRA adapters go into the vision tower (`--target_modules`, default per tower type, see
`hlss_hf.peft_utils`); the classifier trains in full (`modules_to_save`); everything else stays frozen.
Training is patch-level cross-entropy on single patches of the train split; evaluation runs on the evaluation
split at patch, slide and patient level (softmax patch scores summed per slide and per patient).

Writes to `--output_dir`:
    adapter/            adapter_config.json + adapter_model.safetensors (PEFT), preprocessor_config.json,
                        labels.json; load with `hlss_hf.peft_utils.load_lora_classifier(adapter_dir)`
    merged/             with --merge: the merged HLSSForImageClassification (config with auto_map, safetensors,
                        processor) that `pipeline("image-classification", model=merged_dir)` runs
    metrics.jsonl       one JSON line per logged step and per evaluation
    finetune_report.json  arguments, labels, parameter counts, final patch / slide / patient metrics
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
import torch.nn.functional as F
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from peft import get_peft_model
from transformers import HfArgumentParser, get_scheduler

from hlss_hf.augmentation import build_augmentation
from hlss_hf.data import DatasetError, _FixedArrayReader, load_split, split_names, to_float
from hlss_hf.evaluation import hierarchical_metrics
from hlss_hf.peft_utils import finish_adapter_folder, lora_config_for, set_train_mode
from hlss_hf.processing_hlss import HLSSImageProcessor
from hlss_hf.schema import decode_image, modality_of
from hlss_hf.training_utils import JsonlWriter

logger = logging.getLogger("finetune")

REPORT_FILE = "finetune_report.json"
METRICS_FILE = "metrics.jsonl"
ADAPTER_DIR = "adapter"
MERGED_DIR = "merged"

# Fine-tuning uses a light augmentation by default: the strong pretraining set ("strong") mostly slows
# convergence of a small adapter; "none" only centre-crops.
AUGMENTATION_PRESETS: dict[str, dict | None] = {
    "light": {
        "random_resized_crop": {"p": 1.0, "scale": (0.5, 1.0)},
        "horizontal_flip": {},
        "vertical_flip": {},
    },
    "strong": None,  # hlss_hf.augmentation.DEFAULT_AUGMENTATION
    "none": {},
}


@dataclass
class FinetuneArguments:
    """Every option of `finetune.py`; each can be set on the command line or in the `--config` YAML."""

    model: str | None = field(
        default=None,
        metadata={"help": "Saved HLSS folder (HLSSModel or HLSSForImageClassification) or Hub id."},
    )
    dataset: str | None = field(
        default=None,
        metadata={"help": "Patch dataset: a local folder (Hub layout or save_to_disk) or a Hub dataset id."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name (Hub)."})
    cache_dir: str | None = field(
        default=None, metadata={"help": "datasets cache folder (default: HF cache)."}
    )
    output_dir: str = field(default="out/ft", metadata={"help": "Where the adapter, metrics and report go."})
    train_split: str = field(default="train", metadata={"help": "Split used for training."})
    eval_split: str = field(
        default="validation",
        metadata={
            "help": "Split evaluated at patch / slide / patient level; 'none' skips evaluation. When the "
            "default 'validation' is absent, 'test' is used if present."
        },
    )
    label_column: str = field(default="label", metadata={"help": "Column holding the class of each patch."})
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
    epochs: int = field(default=3, metadata={"help": "Training epochs (ignored when --max_steps > 0)."})
    max_steps: int = field(default=-1, metadata={"help": "Optimizer steps; > 0 overrides --epochs."})
    batch_size: int = field(default=32, metadata={"help": "Patches per device per step."})
    eval_batch_size: int | None = field(default=None, metadata={"help": "Default: 2 x --batch_size."})
    lr: float = field(default=1e-3, metadata={"help": "Peak learning rate (LoRA and classifier)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    lr_scheduler: str = field(default="cosine", metadata={"help": "transformers scheduler name."})
    warmup_steps: int = field(default=0, metadata={"help": "Linear warm-up steps."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Batches per optimizer step."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm; 0 disables it."})
    mixed_precision: str | None = field(
        default=None,
        metadata={"help": "'no', 'fp16' or 'bf16'; default: `accelerate launch --mixed_precision`, else 'no'."},
    )
    seed: int = field(default=42, metadata={"help": "Seed for initialisation, shuffling and augmentation."})
    num_workers: int = field(default=0, metadata={"help": "DataLoader workers."})
    eval_every: int = field(
        default=0, metadata={"help": "Evaluate every N optimizer steps; 0: after each epoch."}
    )
    logging_steps: int = field(
        default=10, metadata={"help": "Log the training loss every N optimizer steps."}
    )
    crop_size: int | None = field(
        default=None, metadata={"help": "Crop side; default: the model's processor crop size or image_size."}
    )
    augmentation: str = field(
        default="light",
        metadata={
            "help": "'light' (crop + flips), 'strong' (the pretraining set), 'none', or a YAML file of "
            "hlss_hf.augmentation operations; the YAML config may give the dict inline."
        },
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Use the first N training patches."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Use the first N evaluation patches."}
    )
    merge: bool = field(default=False, metadata={"help": "Also save the merged model (merge_and_unload)."})
    push_to_hub: str | None = field(
        default=None,
        metadata={"help": "Hub repo id to push the adapter folder to (adapter, processor, labels.json)."},
    )
    hub_private: bool = field(default=False, metadata={"help": "Create the --push_to_hub repo as private."})
    report_to: str = field(
        default="none", metadata={"help": "Accelerate tracker ('none', 'tensorboard', ...)."}
    )


# ----------------------------------------------------------------------------------------------------------------
# 1. Arguments
# ----------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> FinetuneArguments:
    """Parse the command line (and the optional `--config` YAML, whose values the command line overrides).

    Args:
        argv (`list[str]`, *optional*): arguments without the program name; default `sys.argv[1:]`.

    Returns:
        `FinetuneArguments`, validated.

    Raises:
        ValueError: an unknown config key, a missing required option or an impossible value (the key is named).
    """
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, rest = pre.parse_known_args(argv)
    parser = HfArgumentParser(FinetuneArguments, description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None, help="YAML file of options (keys as the flags, no dashes).")
    inline_augmentation = None
    config_tokens: list[str] = []
    if known.config:
        values = load_config_file(known.config)
        if isinstance(values.get("augmentation"), dict):
            inline_augmentation = values.pop("augmentation")
        # Config values go through argparse as leading flags, so they get the same type conversion as the
        # command line (YAML reads `1e-3` as a string) and the command line, coming later, overrides them.
        for key, value in values.items():
            if value is None:
                continue
            items = value if isinstance(value, list) else [value]
            config_tokens += [f"--{key}", *(str(item) for item in items)]
    args, _ = parser.parse_args_into_dataclasses(args=config_tokens + rest, look_for_args_file=False)
    if inline_augmentation is not None and "--augmentation" not in rest:
        args.augmentation = inline_augmentation
    validate_args(args)
    return args


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML config of `FinetuneArguments` fields; an unknown key raises `ValueError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(values, dict):
        raise ValueError(
            f"config file {str(path)!r} must hold a mapping of options, got {type(values).__name__}"
        )
    known = {f.name for f in dataclasses.fields(FinetuneArguments)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(
            f"unknown key(s) {unknown} in config file {str(path)!r}; known keys: {sorted(known)}"
        )
    return values


def validate_args(args: FinetuneArguments) -> None:
    """Check the options once, up front; raise `ValueError` naming the offending option."""
    if not args.model:
        raise ValueError("--model is required (a saved HLSS folder or Hub id; `model:` in a config file)")
    if not args.dataset:
        raise ValueError("--dataset is required (a dataset folder or Hub id; `dataset:` in a config file)")
    for key in ("model", "dataset"):
        value = getattr(args, key)
        # Hub ids are `name` or `owner/name`; anything else that looks like a path must exist here.
        looks_local = os.path.isabs(value) or value.startswith((".", "~")) or value.count("/") > 1
        if looks_local and not Path(value).expanduser().exists():
            raise FileNotFoundError(f"--{key} {value!r} does not exist")
    if args.push_to_hub is not None and args.push_to_hub.count("/") != 1:
        raise ValueError(f"--push_to_hub {args.push_to_hub!r} must look like 'namespace/name'")
    positive = {
        "lora_r": args.lora_r,
        "lora_alpha": args.lora_alpha,
        "batch_size": args.batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "logging_steps": args.logging_steps,
    }
    for key, value in positive.items():
        if value < 1:
            raise ValueError(f"--{key} must be >= 1, got {value}")
    if args.max_steps <= 0 and args.epochs < 1:
        raise ValueError(f"--epochs must be >= 1 when --max_steps is not set, got {args.epochs}")
    if not 0.0 <= args.lora_dropout < 1.0:
        raise ValueError(f"--lora_dropout must be in [0, 1), got {args.lora_dropout}")
    if args.lr <= 0:
        raise ValueError(f"--lr must be > 0, got {args.lr}")
    for key in ("weight_decay", "warmup_steps", "max_grad_norm", "num_workers", "eval_every"):
        if getattr(args, key) < 0:
            raise ValueError(f"--{key} must be >= 0, got {getattr(args, key)}")
    for key in ("eval_batch_size", "crop_size", "max_train_samples", "max_eval_samples"):
        value = getattr(args, key)
        if value is not None and value < 1:
            raise ValueError(f"--{key} must be >= 1, got {value}")
    if args.mixed_precision not in (None, "no", "fp16", "bf16"):
        raise ValueError(f"--mixed_precision must be 'no', 'fp16' or 'bf16', got {args.mixed_precision!r}")
    if args.label_names is not None and len(set(args.label_names)) != len(args.label_names):
        raise ValueError(f"--label_names has duplicates: {args.label_names}")
    if isinstance(args.augmentation, str) and args.augmentation not in AUGMENTATION_PRESETS:
        if not Path(args.augmentation).is_file():
            raise ValueError(
                f"--augmentation must be one of {sorted(AUGMENTATION_PRESETS)} or a YAML file, got "
                f"{args.augmentation!r}"
            )


def augmentation_config(spec: str | dict) -> dict | None:
    """The `hlss_hf.augmentation.build_augmentation` config for a preset name, a YAML file or an inline dict."""
    if isinstance(spec, dict):
        return spec
    if spec in AUGMENTATION_PRESETS:
        return AUGMENTATION_PRESETS[spec]
    values = yaml.safe_load(Path(spec).read_text(encoding="utf-8"))
    if not isinstance(values, dict):
        raise ValueError(f"augmentation file {spec!r} must hold a mapping of operation -> parameters")
    return values


# ----------------------------------------------------------------------------------------------------------------
# 2. Data
# ----------------------------------------------------------------------------------------------------------------


def load_patch_dataset(
    path_or_id: str, config_name: str | None = None, cache_dir: str | None = None
) -> datasets.DatasetDict:
    """Every split of a patch dataset, each read by `hlss_hf.data.load_split` (a `save_to_disk` folder, a Hub-layout
    folder or a Hub id; a mistyped path, an unreachable id or a single saved split end in one line naming it).

    Args:
        path_or_id (`str`): folder or Hub dataset id.
        config_name (`str`, *optional*): the dataset configuration.
        cache_dir (`str`, *optional*): the `datasets` cache folder.

    Returns:
        `datasets.DatasetDict`.
    """
    names = split_names(path_or_id, config_name=config_name, key="--dataset")
    common = dict(config_name=config_name, cache_dir=cache_dir, required_columns=(), key="--dataset")
    return datasets.DatasetDict({name: load_split(path_or_id, name, **common) for name in names})


def select_splits(
    data: datasets.DatasetDict, args: FinetuneArguments
) -> tuple[datasets.Dataset, datasets.Dataset | None, str | None]:
    """Pick the training and evaluation splits (`None` when evaluation is off) with `hlss_hf.data.load_split`,
    which names a missing or empty split."""
    common = dict(required_columns=(), name=args.dataset)
    train = load_split(
        data, args.train_split, max_samples=args.max_train_samples, split_key="--train_split", **common
    )
    eval_name = None if args.eval_split.lower() == "none" else args.eval_split
    if eval_name == "validation" and eval_name not in data and "test" in data:
        warnings.warn(f"dataset {args.dataset!r} has no 'validation' split; evaluating on 'test'", stacklevel=2)
        eval_name = "test"
    evaluation = None
    if eval_name is not None:
        try:
            evaluation = load_split(
                data, eval_name, max_samples=args.max_eval_samples, split_key="--eval_split", **common
            )
        except DatasetError as error:
            if eval_name in data:
                raise
            raise DatasetError(f"{error}; use --eval_split none to skip evaluation") from error
    return train, evaluation, eval_name


def resolve_labels(
    train: datasets.Dataset, label_column: str, label_names: list[str] | None
) -> tuple[list[str], dict[Any, int]]:
    """The class names in model order, and the map from stored label values to model class indices.

    Args:
        train (`datasets.Dataset`): the training split (its features and, for non-ClassLabel columns, values).
        label_column (`str`): the label column.
        label_names (`list[str]`, *optional*): class names in model order (see `FinetuneArguments.label_names`).

    Returns:
        `(names, value_to_index)`.

    Raises:
        ValueError: no label column, or label names unknown to / missing from the dataset (named).
    """
    features = train.features
    if label_column not in features:
        raise ValueError(
            f"dataset has no label column {label_column!r} (columns: {list(features)}); fine-tuning needs a label "
            "per patch (--label_column)"
        )
    feature = features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        names = list(feature.names)
        if label_names is None:
            return names, {i: i for i in range(len(names))}
        unknown = [n for n in label_names if n not in names]
        missing = [n for n in names if n not in label_names]
        if unknown or missing:
            raise ValueError(
                f"--label_names do not match the dataset's classes {names}: unknown label names {unknown}, "
                f"missing {missing}"
            )
        return list(label_names), {names.index(n): i for i, n in enumerate(label_names)}
    dtype = getattr(feature, "dtype", None)
    values = sorted(set(train[label_column]), key=str)
    if dtype == "string":
        names = list(label_names) if label_names is not None else [str(v) for v in values]
        return names, {n: i for i, n in enumerate(names)}
    if dtype is not None and ("int" in dtype):
        if label_names is None:
            names = [str(i) for i in range(int(max(values)) + 1)]
        else:
            names = list(label_names)
        return names, {i: i for i in range(len(names))}
    raise ValueError(
        f"label column {label_column!r} must be a ClassLabel, string or integer, got {feature!r}"
    )


def check_label_values(
    split: datasets.Dataset, split_name: str, label_column: str, value_to_index: dict, names: list[str]
) -> None:
    """Raise `ValueError` naming the first patch whose label is not one of the model's classes."""
    if label_column not in split.features:
        raise ValueError(
            f"split {split_name!r} has no label column {label_column!r} (columns: {list(split.features)})"
        )
    labels = split[label_column]
    for row, value in enumerate(labels):
        if value not in value_to_index:
            patch = split[row]["patch_id"] if "patch_id" in split.features else f"row {row}"
            raise ValueError(
                f"split {split_name!r}: patch {patch!r} has label {value!r}, not one of the classes {names} "
                "(unknown label name; pass --label_names listing every class)"
            )


class PatchClassificationDataset(torch.utils.data.Dataset):
    """Single patches with their class, for supervised fine-tuning (a map-style view over an HF dataset).

    Evaluation items are exactly what the processor (and so `pipeline("image-classification")`) gives. Training
    items: decode -> float in [0, 1] (SRH or H&E conversion) -> the processor's resize, when it resizes ->
    augmentation (which crops) -> the processor's normalisation, when it normalises. The augmentation draws
    come from a generator seeded by `(seed, epoch, index)`, so they do not depend on the number of processes or
    workers.

    Args:
        dataset (`datasets.Dataset`): rows with `image` and the label column.
        value_to_index (`dict`): stored label value -> class index.
        processor (`HLSSImageProcessor`): the model's image processor.
        augment (`HLSSAugmentation`, *optional*): `build_augmentation(...)`; `None` for evaluation items.
        label_column (`str`, defaults to `"label"`): the label column.
        modality (`str`, *optional*): `"he"` or `"srh"`; default from the dataset features.
        seed (`int`, defaults to 0): augmentation seed.
    """

    def __init__(
        self, dataset, value_to_index, processor, augment=None, label_column="label", modality=None, seed=0
    ):
        self.dataset = dataset.select_columns(["image"])
        self.patch_ids = dataset["patch_id"] if "patch_id" in dataset.features else None
        self.labels = torch.tensor([value_to_index[v] for v in dataset[label_column]], dtype=torch.long)
        self.modality = modality or modality_of(dataset.features)
        self.processor = processor
        self.augment = augment
        self.seed = int(seed)
        self.epoch = 0
        self._srh_reader = None

    def __getstate__(self) -> dict[str, Any]:
        # The SRH reader holds views of memory-mapped Arrow buffers: rebuilt in each worker, never pickled.
        return {**self.__dict__, "_srh_reader": None}

    def set_epoch(self, epoch: int) -> None:
        """Change the augmentation draws for a new epoch."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def _image(self, index: int) -> np.ndarray:
        if self.modality == "srh":
            # Zero-copy rows of the Array3D column: `dataset[i]` would build nested Python lists (~50x slower).
            if self._srh_reader is None:
                self._srh_reader = _FixedArrayReader(self.dataset)
            return self._srh_reader.rows([index])[0]
        return decode_image(self.dataset[index]["image"])

    def _pixels(self, image: np.ndarray, index: int) -> torch.Tensor:
        processor = self.processor
        if self.augment is None:
            return processor(image, modality=self.modality, return_tensors="pt")["pixel_values"][0]
        pixels = to_float(image, self.modality)
        if processor.do_resize:
            pixels = processor.resize(pixels[None], processor.size)[0]
        seed = np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1, np.uint64)[0]
        pixels = self.augment(pixels, generator=torch.Generator().manual_seed(int(seed >> np.uint64(1))))
        if processor.do_normalize:
            pixels = processor.normalize(pixels[None], processor.image_mean, processor.image_std)[0]
        return pixels

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        image = self._image(index)
        try:
            pixel_values = self._pixels(image, index)
        except ValueError as error:
            patch = self.patch_ids[index] if self.patch_ids is not None else f"row {index}"
            raise ValueError(f"patch {patch!r} of shape {image.shape}: {error}") from error
        return {"pixel_values": pixel_values, "labels": self.labels[index], "index": torch.tensor(index)}


def hierarchy_ids(split: datasets.Dataset, split_name: str) -> tuple[list[str] | None, list[str] | None]:
    """Slide and patient ids of each row; a missing column gives `None` (that level is skipped, with a warning)."""
    result = []
    for column in ("slide_id", "patient_id"):
        if column in split.features:
            result.append([str(v) for v in split[column]])
        else:
            warnings.warn(
                f"split {split_name!r} has no {column!r} column: the {column.split('_')[0]}-level metrics are "
                "skipped (patch-level only)",
                stacklevel=2,
            )
            result.append(None)
    return result[0], result[1]


# ----------------------------------------------------------------------------------------------------------------
# 3. Model
# ----------------------------------------------------------------------------------------------------------------


def load_classifier(model_path: str, names: list[str]):
    """`HLSSForImageClassification` for the classes `names`, from a saved HLSS folder.

    From an `HLSSModel` folder the classifier is new. From an `HLSSForImageClassification` folder (a merged
    fine-tune) a trained classifier over the same class names is kept, its rows reordered to `names`; over
    other names it is re-initialised, with a warning.
    """
    from hlss_hf import HLSSConfig, HLSSForImageClassification

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


# ----------------------------------------------------------------------------------------------------------------
# 4. Evaluation
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(
    model, loader, accelerator: Accelerator, labels: torch.Tensor, slide_ids, patient_ids, num_classes: int
) -> dict[str, float]:
    """Softmax patch scores over the evaluation split -> patch / slide / patient metrics (plus the mean loss).

    Args:
        model: the (prepared) model.
        loader: the prepared evaluation DataLoader (items carry their row `index`).
        accelerator (`Accelerator`): gathers scores across processes.
        labels (`torch.LongTensor` of shape `[N]`): class of each row of the evaluation split.
        slide_ids, patient_ids (`list[str]` or `None`): hierarchy of each row; `None` skips that level.
        num_classes (`int`): number of classes.

    Returns:
        `dict[str, float]`: `loss` and `{level}/{metric}` from `hlss_hf.evaluation.hierarchical_metrics`.
    """
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
    metrics.update(
        hierarchical_metrics(
            log_scores.exp(),
            labels,
            None if slide_ids is None else [slide_ids[i] for i in rows],
            None if patient_ids is None else [patient_ids[i] for i in rows],
            num_classes,
        )
    )
    return metrics


# ----------------------------------------------------------------------------------------------------------------
# 5. Saving
# ----------------------------------------------------------------------------------------------------------------


def _write_atomically(target: Path, write) -> None:
    """Call `write(tmp_dir)` then move the folder into place, replacing any previous one."""
    tmp = target.with_name(f".{target.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write(tmp)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def save_adapter(peft_model, processor, names: list[str], target: Path) -> None:
    """Adapter (PEFT) + processor + labels.json, written to a temporary folder then moved into place.

    The adapter config names `transformers.AutoModelForImageClassification` as its base class, so
    `peft.AutoPeftModel.from_pretrained(adapter_dir)` loads it (see `hlss_hf.peft_utils.AUTO_MAPPING`).
    """

    def write(tmp: Path) -> None:
        peft_model.save_pretrained(str(tmp))
        processor.save_pretrained(str(tmp))
        finish_adapter_folder(tmp, names)

    _write_atomically(target, write)


def push_adapter(adapter_dir: Path, args: FinetuneArguments) -> str:
    """Upload the adapter folder to `--push_to_hub`; returns the repo's address on the endpoint in use."""
    from huggingface_hub import HfApi

    from hlss_hf.publishing import hub_url

    api = HfApi()
    api.create_repo(args.push_to_hub, private=args.hub_private, exist_ok=True)
    api.upload_folder(
        repo_id=args.push_to_hub, folder_path=str(adapter_dir), commit_message="HLSS LoRA adapter (finetune.py)"
    )
    return hub_url(args.push_to_hub)


def save_merged(peft_model, processor, target: Path):
    """`merge_and_unload` (in place: call last) and save the plain model with its processor."""
    merged = peft_model.merge_and_unload()

    def write(tmp: Path) -> None:
        merged.save_pretrained(str(tmp))
        processor.save_pretrained(str(tmp))

    _write_atomically(target, write)
    return merged


# ----------------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run fine-tuning; returns the report (also written to `output_dir/finetune_report.json`)."""
    # 1. Arguments and logging.
    args = parse_args(argv)
    # accelerate runs several processes on CPU (gloo) only when told `cpu=True`.
    world = int(os.environ.get("WORLD_SIZE", "1"))
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_dir=args.output_dir,
        cpu=world > 1 and not torch.cuda.is_available(),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logger.setLevel(logging.INFO if accelerator.is_main_process else logging.WARNING)
    set_seed(args.seed)
    output_dir = Path(args.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)

    # 2. Data.
    with accelerator.main_process_first():
        data = load_patch_dataset(args.dataset, args.dataset_config, args.cache_dir)
    train_split, eval_split, eval_name = select_splits(data, args)
    names, value_to_index = resolve_labels(train_split, args.label_column, args.label_names)
    check_label_values(train_split, args.train_split, args.label_column, value_to_index, names)
    if eval_split is not None:
        check_label_values(eval_split, eval_name, args.label_column, value_to_index, names)

    # 3. Model, processor and LoRA.
    model = load_classifier(args.model, names)
    processor = load_processor(args.model, model, args.crop_size)
    crop = int(processor.crop_size["height"])
    modality = modality_of(train_split.features)
    if getattr(model.config, "modality", modality) != modality:
        raise ValueError(
            f"dataset {args.dataset!r} holds {modality!r} patches but model {args.model!r} was trained on "
            f"{model.config.modality!r}"
        )
    processor.modality = modality
    lora_config = lora_config_for(model, args.lora_r, args.lora_alpha, args.lora_dropout, args.target_modules)
    model = get_peft_model(model, lora_config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info(
        "LoRA %s on %s: %d trainable of %d parameters",
        lora_config.target_modules,
        args.model,
        trainable,
        total,
    )

    train_set = PatchClassificationDataset(
        train_split,
        value_to_index,
        processor,
        augment=build_augmentation(augmentation_config(args.augmentation), crop),
        label_column=args.label_column,
        modality=modality,
        seed=args.seed,
    )
    # Dropping the last partial global batch keeps every step identical whatever the number of processes
    # (accelerate would otherwise pad it differently); a split smaller than one global batch keeps it.
    global_batch = args.batch_size * accelerator.num_processes
    train_loader = torch.utils.data.DataLoader(
        train_set,
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=args.num_workers,
        drop_last=len(train_set) >= global_batch,
        generator=torch.Generator().manual_seed(args.seed),
    )
    eval_loader = eval_labels = slide_ids = patient_ids = None
    if eval_split is not None:
        eval_set = PatchClassificationDataset(
            eval_split, value_to_index, processor, label_column=args.label_column, modality=modality
        )
        eval_loader = torch.utils.data.DataLoader(
            eval_set,
            batch_size=args.eval_batch_size or 2 * args.batch_size,
            shuffle=False,
            num_workers=args.num_workers,
        )
        eval_labels = torch.tensor(
            [value_to_index[v] for v in eval_split[args.label_column]], dtype=torch.long
        )
        slide_ids, patient_ids = hierarchy_ids(eval_split, eval_name)

    # 4. Optimizer and schedule.
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)

    # 5. Prepare.
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)
    steps_per_epoch = max(1, math.ceil(len(train_loader) / args.gradient_accumulation_steps))
    total_steps = args.max_steps if args.max_steps > 0 else args.epochs * steps_per_epoch
    num_epochs = math.ceil(total_steps / steps_per_epoch)
    # The prepared scheduler steps once per process at each optimizer step (accelerate's convention).
    scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer,
        num_warmup_steps=args.warmup_steps * accelerator.num_processes,
        num_training_steps=total_steps * accelerator.num_processes,
    )
    scheduler = accelerator.prepare(scheduler)
    if args.report_to != "none":
        accelerator.init_trackers(
            "hlss_finetune", config={k: str(v) for k, v in dataclasses.asdict(args).items()}
        )
    writer = None
    if accelerator.is_main_process:
        (output_dir / METRICS_FILE).unlink(missing_ok=True)  # a new run starts a new metrics file
        writer = JsonlWriter(output_dir / METRICS_FILE)

    def record(values: dict[str, Any], step: int) -> None:
        if writer is not None:
            writer.write({"step": step, **values})
        accelerator.log(values, step=step)

    def run_eval(step: int, epoch: int) -> dict[str, float]:
        metrics = evaluate(model, eval_loader, accelerator, eval_labels, slide_ids, patient_ids, len(names))
        record({"epoch": epoch, **{f"eval/{k}": v for k, v in metrics.items()}}, step)
        logger.info("step %d eval: %s", step, ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())))
        return metrics

    # 6. Train.
    logger.info(
        "training %d steps (%d epochs of %d steps), %d patches, processes: %d, global batch %d",
        total_steps,
        num_epochs,
        steps_per_epoch,
        len(train_set),
        accelerator.num_processes,
        global_batch * args.gradient_accumulation_steps,
    )
    start = time.perf_counter()
    set_train_mode(model)
    global_step, running, running_n = 0, 0.0, 0
    last_eval: dict[str, float] | None = None
    last_eval_step = -1
    for epoch in range(num_epochs):
        train_set.set_epoch(epoch)
        for batch in train_loader:
            with accelerator.accumulate(model):
                outputs = model(pixel_values=batch["pixel_values"], labels=batch["labels"])
                loss = (
                    outputs.loss
                    if outputs.loss is not None
                    else F.cross_entropy(outputs.logits.float(), batch["labels"])
                )
                if not torch.isfinite(loss):
                    raise RuntimeError(
                        f"non-finite loss {loss.item()} at step {global_step} (epoch {epoch}); stopping"
                    )
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            running += float(loss.detach())
            running_n += 1
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            if global_step % args.logging_steps == 0 or global_step == total_steps:
                # Every process reaches this line at the same steps: the mean over processes is the global loss.
                mean_loss = accelerator.reduce(
                    torch.tensor(running / running_n, device=accelerator.device), "mean"
                )
                record(
                    {"epoch": epoch, "loss": float(mean_loss), "lr": scheduler.get_last_lr()[0]}, global_step
                )
                running, running_n = 0.0, 0
            if eval_loader is not None and args.eval_every and global_step % args.eval_every == 0:
                last_eval, last_eval_step = run_eval(global_step, epoch), global_step
            if global_step >= total_steps:
                break
        if eval_loader is not None and not args.eval_every and last_eval_step != global_step:
            last_eval, last_eval_step = run_eval(global_step, epoch), global_step
        if global_step >= total_steps:
            break
    if eval_loader is not None and last_eval_step != global_step:
        last_eval = run_eval(global_step, num_epochs - 1)
    train_seconds = time.perf_counter() - start

    # 7. Save.
    accelerator.wait_for_everyone()
    report: dict[str, Any] = {
        "args": dataclasses.asdict(args),
        "labels": names,
        "eval_split": eval_name,
        "lora": {
            "r": args.lora_r,
            "alpha": args.lora_alpha,
            "dropout": args.lora_dropout,
            "target_modules": lora_config.target_modules,
            "modules_to_save": list(lora_config.modules_to_save),
        },
        "parameters": {"trainable": trainable, "total": total},
        "steps": global_step,
        "mixed_precision": accelerator.mixed_precision,
        "train_patches": len(train_set),
        "train_seconds": train_seconds,
        "eval": last_eval,
        "adapter_dir": str(output_dir / ADAPTER_DIR),
        "merged_dir": str(output_dir / MERGED_DIR) if args.merge else None,
    }
    if accelerator.is_main_process:
        peft_model = accelerator.unwrap_model(model)
        save_adapter(peft_model, processor, names, output_dir / ADAPTER_DIR)
        if args.merge:
            save_merged(peft_model, processor, output_dir / MERGED_DIR)
        _write_json(output_dir / REPORT_FILE, report)
        writer.close()
        logger.info("saved %s", output_dir)
        if args.push_to_hub:
            print(f"Pushed the adapter to {push_adapter(output_dir / ADAPTER_DIR, args)}", flush=True)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return report


if __name__ == "__main__":
    main()
