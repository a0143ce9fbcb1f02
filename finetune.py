"""LoRA fine-tuning of an HLSS vision tower for patch classification, with PEFT and Accelerate.

    python finetune.py --model_name_or_path outputs/hlss-demo --dataset data/demo --num_epochs 3 --merge
    python finetune.py --config my_finetune.yaml --training.max_steps 200      # YAML + overrides
    accelerate launch --mixed_precision bf16 finetune.py --model_name_or_path me/hlss-srh --dataset <hub id>
    python finetune.py --help                                                  # every config key

Configuration: `hlss_hf.config.FinetuneConfig`, the same system and, for the settings both scripts have, the
same keys as train.py: sections `model` (model_name_or_path, label_names, LoRA), `data` and `training`, set in
a YAML file (`--config`) or as `--section.key value` (the bare `--key` when one section has it).

The model is `HLSSForImageClassification` built from a saved HLSS folder (`vision_model` + `visual_projection`
+ a new `classifier`). LoRA adapters go into the vision tower (`model.target_modules`, default per tower type,
see `hlss_hf.peft_utils`); the classifier trains in full (`modules_to_save`); everything else stays frozen.
Training is patch-level cross-entropy on single patches of the train split; evaluation runs on the evaluation
split at patch, slide and patient level (softmax patch scores summed per slide and per patient).

Writes to `training.output_dir`:
    adapter/            adapter_config.json + adapter_model.safetensors (PEFT), preprocessor_config.json,
                        labels.json; load with `hlss_hf.peft_utils.load_lora_classifier(adapter_dir)`
    merged/             with --merge: the merged HLSSForImageClassification (config with auto_map, safetensors,
                        processor) that `pipeline("image-classification", model=merged_dir)` runs
    metrics.jsonl       one JSON line per logged step and per evaluation
    finetune_report.json  arguments, labels, parameter counts, final patch / slide / patient metrics
The adapter and merged folders carry a filled model card (README.md). The run works in
`<output_dir>.incoming` and swaps it in when it has finished, so a failed run leaves `output_dir` as it was; a
`output_dir` that holds an earlier run needs `--training.overwrite_output_dir true` and is then replaced whole
(no earlier `merged/` stays beside a new adapter).
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

# hlss_hf registers its Auto classes (loading torch: seconds) once this program has read its command line, so that
# --help and settings errors answer at once (hlss_hf/__init__.py).
HLSS_HF_PARSE_FIRST = True

from hlss_hf.cli import check_command_line
from hlss_hf.config import FinetuneConfig, flatten_config, format_help, parse_config
from hlss_hf.errors import ConfigError


def print_help() -> None:
    """This docstring and every config key with its default."""
    print(__doc__)
    print(format_help(FinetuneConfig))


def parse_args(argv: list[str] | None = None) -> FinetuneConfig:
    """Parse the command line (and the optional `--config` YAML, whose values the command line overrides).

    The keys are those of `hlss_hf.config.FinetuneConfig` (sections `model`, `data`, `training`; the settings
    shared with `train.py` have the same names there); `--help` lists them with their defaults.

    Args:
        argv (`list[str]`, *optional*): arguments without the program name; default `sys.argv[1:]`.

    Returns:
        `FinetuneConfig`, validated.

    Raises:
        ConfigError: an unknown key (with the nearest valid one), a missing required key or an impossible
            value (the key is named).
    """
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    if "-h" in argv or "--help" in argv:
        print_help()
        raise SystemExit(0)
    return parse_config(argv, FinetuneConfig)


if __name__ == "__main__":
    check_command_line(sys.argv[1:], parse_args, print_help)  # before torch and the model code load

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from accelerate.utils import DistributedType, set_seed
from peft import get_peft_model
from tqdm.auto import tqdm
from transformers import get_scheduler

from hlss_hf.augmentation import build_augmentation
from hlss_hf.config import FINETUNE_AUGMENTATIONS as AUGMENTATION_PRESETS
from hlss_hf.data import _FixedArrayReader, load_split, loader_workers, split_names, to_float
from hlss_hf.errors import DatasetError, NonFiniteLossError
from hlss_hf.evaluation import hierarchical_metrics
from hlss_hf.files import naming_full_disk, write_text_atomically
from hlss_hf.model_card import write_finetune_cards
from hlss_hf.processing_hlss import HLSSImageProcessor
from hlss_hf.schema import decode_image, modality_of
from hlss_hf.training.checkpoints import (
    JsonlWriter,
    holds_output_dir,
    plan_output,
    publish_output,
    start_output,
)
from hlss_hf.training.loop import all_finite
from hlss_hf.training.lora import (
    VISION_PREFIX,
    default_lora_target_modules,
    finish_adapter_folder,
    lora_config_for,
    set_train_mode,
)
from hlss_hf.training.optim import make_accelerator, scheduler_steps
from hlss_hf.training.run_warnings import (
    WarningLog,
    evaluation_warnings,
    finetune_warnings,
    informative_metrics,
)

logger = logging.getLogger("finetune")

REPORT_FILE = "finetune_report.json"
METRICS_FILE = "metrics.jsonl"
ADAPTER_DIR = "adapter"
MERGED_DIR = "merged"

# ----------------------------------------------------------------------------------------------------------------
# 1. Arguments
# ----------------------------------------------------------------------------------------------------------------


def augmentation_config(spec: str | dict) -> dict | str:
    """What `hlss_hf.augmentation.build_augmentation` takes for `data.augmentation`: finetune's own presets
    (`light`, `none`) as their operations; a preset of `hlss_hf.augmentation` by name; a mapping as it is (a
    YAML file was read into one when the config was validated)."""
    if isinstance(spec, str):
        return AUGMENTATION_PRESETS.get(spec, spec)
    return spec


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
    names = split_names(path_or_id, config_name=config_name, key="data.dataset")
    common = dict(config_name=config_name, cache_dir=cache_dir, required_columns=(), key="data.dataset")
    return datasets.DatasetDict({name: load_split(path_or_id, name, **common) for name in names})


def select_splits(
    data: datasets.DatasetDict, args: FinetuneConfig
) -> tuple[datasets.Dataset, datasets.Dataset | None, str | None]:
    """Pick the training and evaluation splits (`None` when evaluation is off) with `hlss_hf.data.load_split`,
    which names a missing or empty split."""
    common = dict(required_columns=(), name=args.data.dataset)
    train = load_split(
        data,
        args.data.train_split,
        max_samples=args.data.max_train_samples,
        split_key="data.train_split",
        **common,
    )
    eval_name = args.data.validation_split
    if eval_name == "validation" and eval_name not in data and "test" in data:
        warnings.warn(
            f"dataset {args.data.dataset!r} has no 'validation' split; evaluating on 'test'", stacklevel=2
        )
        eval_name = "test"
    evaluation = None
    if eval_name is not None:
        try:
            evaluation = load_split(
                data,
                eval_name,
                max_samples=args.data.max_eval_samples,
                split_key="data.validation_split",
                **common,
            )
        except DatasetError as error:
            if eval_name in data:
                raise
            raise DatasetError(f"{error}; use --validation_split null to skip evaluation") from error
    return train, evaluation, eval_name


def resolve_labels(
    train: datasets.Dataset, label_column: str, label_names: list[str] | None
) -> tuple[list[str], dict[Any, int]]:
    """The class names in model order, and the map from stored label values to model class indices.

    Args:
        train (`datasets.Dataset`): the training split (its features and, for non-ClassLabel columns, values).
        label_column (`str`): the label column.
        label_names (`list[str]`, *optional*): class names in model order (see `model.label_names`).

    Returns:
        `(names, value_to_index)`.

    Raises:
        ValueError: no label column, or label names unknown to / missing from the dataset (named).
    """
    features = train.features
    if label_column not in features:
        raise DatasetError(
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
            raise DatasetError(
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
    raise DatasetError(
        f"label column {label_column!r} must be a ClassLabel, string or integer, got {feature!r}"
    )


def check_label_values(
    split: datasets.Dataset, split_name: str, label_column: str, value_to_index: dict, names: list[str]
) -> None:
    """Raise `ValueError` naming the first patch whose label is not one of the model's classes."""
    if label_column not in split.features:
        raise DatasetError(
            f"split {split_name!r} has no label column {label_column!r} (columns: {list(split.features)})"
        )
    labels = split[label_column]
    for row, value in enumerate(labels):
        if value not in value_to_index:
            patch = split[row]["patch_id"] if "patch_id" in split.features else f"row {row}"
            raise DatasetError(
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
        if isinstance(self.dataset.features["image"], datasets.Image):
            # Encoded bytes, decoded by decode_image (imagecodecs for RGB PNG / JPEG, twice PIL's speed).
            self.dataset = self.dataset.cast_column("image", datasets.Image(decode=False))
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
        if not isinstance(self.dataset.features["image"], datasets.Image):
            # Zero-copy rows of an Array3D column (SRH, raw H&E): `dataset[i]` would build nested Python lists
            # (~50x slower).
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
    model, loader, accelerator, labels: torch.Tensor, slide_ids, patient_ids, num_classes: int
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
    levels = hierarchical_metrics(
        log_scores.exp(),
        labels,
        None if slide_ids is None else [slide_ids[i] for i in rows],
        None if patient_ids is None else [patient_ids[i] for i in rows],
        num_classes,
    )
    metrics.update(informative_metrics(levels, num_classes))  # top-k over k or fewer classes is always 1
    return metrics


# ----------------------------------------------------------------------------------------------------------------
# 5. Saving
# ----------------------------------------------------------------------------------------------------------------


def save_adapter(peft_model, processor, names: list[str], target: Path, state_dict=None) -> None:
    """Adapter (PEFT) + processor + labels.json into `target` (a folder of this run, swapped in at the end).

    The adapter config names `transformers.AutoModelForImageClassification` as its base class, so
    `peft.AutoPeftModel.from_pretrained(adapter_dir)` loads it (see `hlss_hf.peft_utils.AUTO_MAPPING`).
    `state_dict`: the full weights from `accelerator.get_state_dict` (sharded models hold only a part).
    """
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


def push_adapter(adapter_dir: Path, args: FinetuneConfig) -> str:
    """Upload the adapter folder (with its card) to `training.push_to_hub`; returns the repo's address."""
    from huggingface_hub import HfApi

    from hlss_hf.publishing import hub_url

    api = HfApi()
    api.create_repo(args.training.push_to_hub, private=args.training.hub_private, exist_ok=True)
    api.upload_folder(
        repo_id=args.training.push_to_hub,
        folder_path=str(adapter_dir),
        commit_message="HLSS LoRA adapter (finetune.py)",
    )
    return hub_url(args.training.push_to_hub)


# ----------------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------------


@holds_output_dir(lambda argv: parse_args(argv).training.output_dir)
def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run fine-tuning; returns the report (also written to `output_dir/finetune_report.json`)."""
    # 1. Settings, the run's folder (a used output_dir needs training.overwrite_output_dir), accelerator.
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = parse_args(argv)
    t = args.training
    out = Path(t.output_dir)
    # Fine-tuning has no resume, so every run works beside and swaps in at the end: a failed run leaves
    # output_dir as it was (or absent).
    run_dir = plan_output(out, overwrite=t.overwrite_output_dir, resume=None, always_stage=True)
    accelerator = make_accelerator(t, project_dir=run_dir)
    if t.merge and accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise ConfigError(
            "config key 'training.merge': merging needs the whole model in one process; with FSDP / DeepSpeed "
            "save the adapter, then merge it with peft's merge_and_unload in one process"
        )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logger.setLevel(logging.INFO if accelerator.is_main_process else logging.WARNING)
    set_seed(t.seed)

    # 2. Data.
    with accelerator.main_process_first():
        data = load_patch_dataset(
            args.data.dataset, args.data.dataset_config_name, args.data.datasets_cache_dir
        )
    train_split, eval_split, eval_name = select_splits(data, args)
    names, value_to_index = resolve_labels(train_split, args.data.label_column, args.model.label_names)
    check_label_values(train_split, args.data.train_split, args.data.label_column, value_to_index, names)
    if eval_split is not None:
        check_label_values(eval_split, eval_name, args.data.label_column, value_to_index, names)

    # 3. Model, processor and LoRA.
    model = load_classifier(args.model.model_name_or_path, names)
    processor = load_processor(args.model.model_name_or_path, model, args.data.crop_size)
    crop = int(processor.crop_size["height"])
    modality = modality_of(train_split.features)
    if getattr(model.config, "modality", modality) != modality:
        raise DatasetError(
            f"dataset {args.data.dataset!r} holds {modality!r} patches but model "
            f"{args.model.model_name_or_path!r} was trained on {model.config.modality!r}"
        )
    processor.modality = modality
    lora_config = lora_config_for(
        model, args.model.lora_r, args.model.lora_alpha, args.model.lora_dropout, args.model.target_modules
    )
    # The leaf names as the user wrote them (or the tower's defaults); PEFT gets them as one regular expression.
    target_names = list(
        args.model.target_modules
        or default_lora_target_modules(model.config.vision_config, getattr(model, VISION_PREFIX))
    )
    model = get_peft_model(model, lora_config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info(
        "LoRA %s on %s: %d trainable of %d parameters",
        lora_config.target_modules,
        args.model.model_name_or_path,
        trainable,
        total,
    )
    train_set = PatchClassificationDataset(
        train_split,
        value_to_index,
        processor,
        augment=build_augmentation(augmentation_config(args.data.augmentation), crop),
        label_column=args.data.label_column,
        modality=modality,
        seed=t.seed,
    )
    # Dropping the last partial global batch keeps every step identical whatever the number of processes
    # (accelerate would otherwise pad it differently); a split smaller than one global batch keeps it.
    global_batch = t.per_device_batch_size * accelerator.num_processes
    workers = loader_workers(args.data.num_workers, accelerator.device)
    train_loader = torch.utils.data.DataLoader(
        train_set,
        batch_size=t.per_device_batch_size,
        shuffle=True,
        drop_last=len(train_set) >= global_batch,
        generator=torch.Generator().manual_seed(t.seed),
        **workers,
    )
    eval_loader = eval_labels = slide_ids = patient_ids = None
    if eval_split is not None:
        eval_set = PatchClassificationDataset(
            eval_split, value_to_index, processor, label_column=args.data.label_column, modality=modality
        )
        eval_loader = torch.utils.data.DataLoader(
            eval_set, batch_size=t.eval_batch_size, shuffle=False, **workers
        )
        eval_labels = torch.tensor(
            [value_to_index[v] for v in eval_split[args.data.label_column]], dtype=torch.long
        )
        slide_ids, patient_ids = hierarchy_ids(eval_split, eval_name)

    # 4. Optimizer, prepare, schedule.
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)
    steps_per_epoch = max(1, math.ceil(len(train_loader) / t.gradient_accumulation_steps))
    total_steps = t.max_steps if t.max_steps is not None else math.ceil(t.num_epochs * steps_per_epoch)
    num_epochs = math.ceil(total_steps / steps_per_epoch)
    scheduler = get_scheduler(
        t.lr_scheduler,
        optimizer,
        num_warmup_steps=scheduler_steps(accelerator, int(round(t.warmup_ratio * total_steps))),
        num_training_steps=scheduler_steps(accelerator, total_steps),
    )
    scheduler = accelerator.prepare(scheduler)

    # 5. The settings, data and model are valid: only now does the run touch its folder.
    if accelerator.is_main_process:
        start_output(run_dir, out, resume=False)
    accelerator.wait_for_everyone()
    if t.trackers():
        accelerator.init_trackers(t.project_name, config=flatten_config(args))
    writer = JsonlWriter(run_dir / METRICS_FILE) if accelerator.is_main_process else None

    def record(values: dict[str, Any], step: int) -> None:
        if writer is not None:
            writer.write({"step": step, **values})
        accelerator.log({k: v for k, v in values.items() if isinstance(v, int | float)}, step=step)

    # Named warnings (hlss_hf.run_warnings): printed once, logged, and written into the report and cards.
    run_warnings = WarningLog(printer=lambda text: accelerator.print(text, flush=True))
    found = finetune_warnings(total_steps)
    if eval_labels is not None:
        train_labels = [value_to_index[v] for v in train_split[args.data.label_column]]
        found += evaluation_warnings(train_labels, eval_labels.tolist(), names)
    for warning in run_warnings.add(found):
        record({"warning": warning.name, "message": warning.message}, 0)

    def run_eval(step: int, epoch: int) -> dict[str, float]:
        metrics = evaluate(model, eval_loader, accelerator, eval_labels, slide_ids, patient_ids, len(names))
        record({"epoch": epoch, **{f"eval/{k}": v for k, v in metrics.items()}}, step)
        logger.info("step %d eval: %s", step, ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())))
        return metrics

    # 6. Train.
    logger.info(
        "training %d steps (%d epochs of %d steps), %d patches, processes: %d, global batch %d, output %s%s",
        total_steps,
        num_epochs,
        steps_per_epoch,
        len(train_set),
        accelerator.num_processes,
        global_batch * t.gradient_accumulation_steps,
        out,
        f" (written to {run_dir} until the run has finished)",
    )
    start = time.perf_counter()
    set_train_mode(model)
    progress = tqdm(
        total=total_steps, disable=not accelerator.is_local_main_process, desc="LoRA", unit="step"
    )
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
                if not all_finite(loss, accelerator):  # every process stops together
                    raise NonFiniteLossError(
                        f"non-finite loss at step {global_step + 1} (epoch {epoch}); {out} is unchanged (this run's "
                        f"log is in {run_dir}). Lower training.lr (now {t.lr}) or check the data"
                    )
                accelerator.backward(loss)
                if accelerator.sync_gradients and t.max_grad_norm:
                    accelerator.clip_grad_norm_(params, t.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            running += float(loss.detach())
            running_n += 1
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            progress.update(1)
            if global_step % t.logging_steps == 0 or global_step == total_steps:
                # Every process reaches this line at the same steps: the mean over processes is the global loss.
                mean_loss = accelerator.reduce(
                    torch.tensor(running / running_n, device=accelerator.device), "mean"
                )
                record(
                    {"epoch": epoch, "loss": float(mean_loss), "lr": scheduler.get_last_lr()[0]}, global_step
                )
                progress.set_postfix(loss=f"{float(mean_loss):.4f}")
                running, running_n = 0.0, 0
            if eval_loader is not None and t.eval_steps and global_step % t.eval_steps == 0:
                last_eval, last_eval_step = run_eval(global_step, epoch), global_step
            if global_step >= total_steps:
                break
        if global_step >= total_steps:
            break
    progress.close()
    if eval_loader is not None and last_eval_step != global_step:
        last_eval = run_eval(global_step, num_epochs - 1)
    train_seconds = time.perf_counter() - start

    # 7. Save beside, swap in, push.
    report: dict[str, Any] = {
        "args": args.to_dict(),
        "labels": names,
        "eval_split": eval_name,
        "lora": {
            "r": args.model.lora_r,
            "alpha": args.model.lora_alpha,
            "dropout": args.model.lora_dropout,
            "target_modules": target_names,
            # PEFT's regular expression over the whole model's module names, as passed to LoraConfig.
            "target_modules_regex": lora_config.target_modules,
            "modules_to_save": list(lora_config.modules_to_save),
        },
        "parameters": {"trainable": trainable, "total": total},
        "steps": global_step,
        "processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "train_patches": len(train_set),
        "train_seconds": train_seconds,
        "eval": last_eval,
        "warnings": run_warnings.to_list(),
        "adapter_dir": str(out / ADAPTER_DIR),
        "merged_dir": str(out / MERGED_DIR) if t.merge else None,
    }
    state_dict = accelerator.get_state_dict(model)  # every process: sharded weights are gathered here
    if accelerator.is_main_process:
        peft_model = accelerator.unwrap_model(model)
        save_adapter(peft_model, processor, names, run_dir / ADAPTER_DIR, state_dict=state_dict)
        if t.merge:
            save_merged(peft_model, processor, run_dir / MERGED_DIR)
        write_finetune_cards(
            args, report, argv, run_dir / ADAPTER_DIR, run_dir / MERGED_DIR if t.merge else None
        )
        write_text_atomically(
            run_dir / REPORT_FILE, json.dumps(report, indent=2, sort_keys=True, default=str) + "\n"
        )
        writer.close()
        publish_output(run_dir, out)
        logger.info("saved %s", out)
        if t.push_to_hub:
            print(f"Pushed the adapter to {push_adapter(out / ADAPTER_DIR, args)}", flush=True)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return report


def cli() -> None:
    """Entry point: errors a user can fix (settings, data, a used output folder, a non-finite loss, file system,
    Hub) print one line ``error: ...`` and exit with status 1; ``--debug`` or ``HLSS_DEBUG=1`` shows the traceback."""
    from hlss_hf.cli import debug_requested, exit_on_error

    argv = sys.argv[1:]
    debug = "--debug" in argv or debug_requested()
    argv = [arg for arg in argv if arg != "--debug"]
    with exit_on_error(debug, user_errors=(ConfigError, NonFiniteLossError)):
        main(argv)


if __name__ == "__main__":
    cli()
