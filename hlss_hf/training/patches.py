"""The labelled patches ``finetune.py`` trains and evaluates on: the splits, the label map, and a dataset of single
patches with their class."""

from __future__ import annotations

import warnings
from typing import Any

import datasets
import numpy as np
import torch

from hlss_hf.data import load_split, split_names, to_float
from hlss_hf.data.hierarchy import _FixedArrayReader
from hlss_hf.data.schema import decode_image, modality_of
from hlss_hf.errors import DatasetError
from hlss_hf.training.config import FinetuneConfig


def load_patch_dataset(
    path_or_id: str, config_name: str | None = None, cache_dir: str | None = None
) -> datasets.DatasetDict:
    """Every split of a patch dataset, each read by `hlss_hf.data.load_split` (a `save_to_disk` folder, a Hub-layout
    folder or a Hub id; a mistyped path, an unreachable id or a single saved split end in one line naming it)."""
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
    """`(names, value_to_index)`: the class names in model order (`label_names`, `model.label_names`, else the
    training split's), and the map from stored label values to class indices. Raises `DatasetError` for a missing
    label column, or label names unknown to / missing from the dataset (named)."""
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
    """Raise `DatasetError` naming the first patch whose label is not one of the model's classes."""
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
    workers. `augment` (`build_augmentation(...)`) is `None` for evaluation items; `modality` defaults to the
    dataset features'.
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
