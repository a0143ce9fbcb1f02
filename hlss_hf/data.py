"""Hierarchical patient -> slide -> patch sampling over Hugging Face patch datasets (docs/method.md).

A converted dataset has one row per patch (see :mod:`hlss_hf.schema`). For pretraining, one sample is one
**patient**: ``S`` slides drawn without replacement while the patient has enough (cycling through its slides in a
random order when it has fewer), ``P`` patches per slide drawn at random (without replacement while the slide has
enough, with replacement when it has fewer), and ``V`` independent augmentations of every patch. A batch of ``B``
patients is the tensor ``[B, S, P, V, C, H, W]`` that :class:`~hlss_hf.HLSSModel` takes.

Every random choice of a sample is a function of ``(seed, epoch, sample index)`` only, through generators local
to the call. The same sample is therefore identical whatever the number of DataLoader workers or processes and
across reruns, so a run on 2 processes with per-device batch ``b`` sees the same global batches as one process
with batch ``2b`` (accelerate's sharding gives process ``r`` batch ``W*s + r`` at step ``s``).

Example:

```python
>>> from datasets import load_dataset
>>> from torch.utils.data import DataLoader
>>> from hlss_hf.augmentation import build_augmentation
>>> from hlss_hf.data import HierarchicalPatchDataset, collate_hierarchical
>>> ds = load_dataset("data/opensrh", split="train")
>>> train = HierarchicalPatchDataset(ds, num_slides=2, num_patches=2, num_views=2,
...                                  transform=build_augmentation(None, 224), seed=0, balance_classes=True)
>>> loader = DataLoader(train, batch_size=32, shuffle=True, num_workers=4, collate_fn=collate_hierarchical)
>>> for epoch in range(10):
...     train.set_epoch(epoch)
...     for batch in loader:  # batch["pixel_values"]: [32, 2, 2, 2, 3, 224, 224]
...         ...
```

Streaming sources (``load_dataset(..., streaming=True)``) go through :class:`HierarchicalStreamingDataset`.

:func:`load_split` is the one way the scripts read a split (a converted folder, a Hub id, streaming or not), with
one-line errors naming the dataset, the split and the setting; :func:`build_train_loader` builds the pretraining
loader from a ``TrainConfig``.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, Subset

from hlss_hf.errors import DatasetError

from .augmentation import HLSSAugmentation
from .schema import IMAGE, LABEL, PATIENT_ID, SLIDE_ID, decode_image, modality_of

__all__ = [
    "HierarchyIndex",
    "HierarchicalPatchDataset",
    "HierarchicalStreamingDataset",
    "HierarchicalCollator",
    "collate_hierarchical",
    "to_float",
    "DatasetError",
    "load_split",
    "split_names",
    "EpochBatchSampler",
    "EpochPermutationSampler",
    "build_train_loader",
    "default_num_workers",
    "loader_workers",
    "stream_batches",
]

#: A transform takes a float image ``[C, H, W]`` and a ``torch.Generator`` (the only source of randomness it
#: may use) and returns a float image of a fixed size.
Transform = Callable[..., torch.Tensor]


def to_float(images: np.ndarray | Sequence[np.ndarray], modality: str) -> torch.Tensor:
    """Convert decoded patches to float images with the processor's pixel conversion (docs/method.md,
    preprocessing).

    Args:
        images (`np.ndarray` or list of arrays): ``(N, H, W, 2)`` uint16 for SRH or ``(N, H, W, 3)`` uint8 for H&E
            (a list when the patches differ in size).
        modality (`str`): ``"srh"`` or ``"he"``.

    Returns:
        `torch.FloatTensor` ``[N, 3, H, W]`` in [0, 1], or a list of ``[3, H, W]`` tensors for a list input.
    """
    from .models.hlss.pixels_hlss import he_to_float, srh_to_float

    if modality == "srh":
        convert = srh_to_float
    else:
        convert = he_to_float
        # PIL-backed arrays are read-only and torch warns when wrapping them; uint8 copies are cheap.
        if isinstance(images, np.ndarray):
            images = images if images.flags.writeable else images.copy()
        else:
            images = [image if image.flags.writeable else image.copy() for image in images]
    if isinstance(images, np.ndarray):
        return convert(images)
    return [convert(image) for image in images]


def _column(table: pa.Table, name: str) -> pa.ChunkedArray:
    column = table.column(name)
    if column.null_count:
        first_null = column.is_null().to_numpy(zero_copy_only=False).argmax()
        raise DatasetError(
            f"column {name!r} has {column.null_count} missing values (first at row {first_null})"
        )
    return column


def _encode(column: pa.ChunkedArray) -> tuple[np.ndarray, list]:
    """Dictionary-encode a column: codes in order of first appearance and the distinct values."""
    encoded = column.combine_chunks().dictionary_encode()
    return encoded.indices.to_numpy(zero_copy_only=False), encoded.dictionary.to_pylist()


@dataclass
class HierarchyIndex:
    """The patient -> slide -> patch-row hierarchy of a patch dataset, built from its id columns only.

    Patients and slides keep the order of their first row in the dataset.

    Example:

    ```python
    >>> index = HierarchyIndex.from_dataset(load_dataset("data/opensrh", split="train"))
    >>> index.num_patients, index.class_names[index.labels[index.patient_ids[0]]]
    >>> index.rows[(patient, index.slides[patient][0])]  # row indices of that slide's patches
    ```

    Attributes:
        patient_ids (`list[str]`): patients in order.
        slides (`dict[str, list[str]]`): patient -> its slide ids.
        rows (`dict[tuple[str, str], np.ndarray]`): ``(patient, slide)`` -> row indices (int64, dataset order).
        labels (`dict[str, int]`): patient -> label index.
        class_names (`list[str]`): class names from the ``label`` ClassLabel feature.
    """

    patient_ids: list[str]
    slides: dict[str, list[str]]
    rows: dict[tuple[str, str], np.ndarray]
    labels: dict[str, int]
    class_names: list[str] = field(default_factory=list)

    @classmethod
    def from_dataset(cls, dataset: datasets.Dataset) -> HierarchyIndex:
        """Index a :class:`datasets.Dataset` by reading its ``patient_id``, ``slide_id`` and ``label`` columns.

        Images are never read or decoded.

        Args:
            dataset (`datasets.Dataset`): a patch dataset in the :mod:`hlss_hf.schema` layout (any row order;
                selections and shuffles are honoured: row indices refer to ``dataset``'s own positions).

        Raises:
            DatasetError: when a column is missing, has missing values, the dataset is empty, a patient's rows
                disagree on the label (naming the patient) or a slide id belongs to two patients (naming both).
        """
        names = (PATIENT_ID, SLIDE_ID, LABEL)
        missing = [name for name in names if name not in dataset.column_names]
        if missing:
            raise DatasetError(f"dataset has no column(s) {missing}; it has {dataset.column_names}")
        if len(dataset) == 0:
            raise DatasetError("dataset is empty: no rows to index")
        # Arrow format on the id columns only: no image bytes are touched, and an indices mapping is applied.
        table = dataset.select_columns(list(names)).with_format("arrow")[:]
        patient_codes, patient_ids = _encode(_column(table, PATIENT_ID))
        slide_codes, slide_names = _encode(_column(table, SLIDE_ID))
        labels = _column(table, LABEL).to_numpy().astype(np.int64)
        # A slide is cut from one patient's tissue (the converters refuse anything else): a slide id under two
        # patients is a mislabelled row, and training would treat two slides as one.
        pairs = np.unique(np.stack([slide_codes, patient_codes], axis=1), axis=0)
        shared = np.flatnonzero(np.diff(pairs[:, 0]) == 0)
        if len(shared):
            slide_code = pairs[shared[0], 0]
            owners = sorted(str(patient_ids[code]) for code in pairs[pairs[:, 0] == slide_code, 1])
            raise DatasetError(f"slide {slide_names[slide_code]!r} belongs to several patients: {owners}")
        # Group rows by (patient, slide) in first-appearance order; lexsort is stable so rows keep dataset order.
        order = np.lexsort((slide_codes, patient_codes))
        sorted_p, sorted_s = patient_codes[order], slide_codes[order]
        breaks = np.flatnonzero((np.diff(sorted_p) != 0) | (np.diff(sorted_s) != 0)) + 1
        starts = np.concatenate([[0], breaks])
        ends = np.concatenate([breaks, [len(order)]])
        slides: dict[str, list[str]] = {str(p): [] for p in patient_ids}
        rows: dict[tuple[str, str], np.ndarray] = {}
        patient_labels: dict[str, int] = {}
        for start, end in zip(starts, ends, strict=True):
            patient = str(patient_ids[sorted_p[start]])
            slide = str(slide_names[sorted_s[start]])
            members = order[start:end].astype(np.int64)
            slides[patient].append(slide)
            rows[(patient, slide)] = members
            found = np.unique(labels[members])
            if patient in patient_labels:
                found = np.union1d(found, [patient_labels[patient]])
            if len(found) != 1:
                raise DatasetError(f"patient {patient!r} has rows with different labels {found.tolist()}")
            patient_labels[patient] = int(found[0])
        feature = dataset.features[LABEL]
        if isinstance(feature, datasets.ClassLabel):
            class_names = list(feature.names)
        else:
            class_names = [str(i) for i in range(int(labels.max()) + 1)]
        return cls([str(p) for p in patient_ids], slides, rows, patient_labels, class_names)

    @property
    def num_patients(self) -> int:
        return len(self.patient_ids)

    @property
    def num_slides(self) -> int:
        return len(self.rows)

    @property
    def num_patches(self) -> int:
        return int(sum(len(r) for r in self.rows.values()))

    def patients_per_class(self) -> dict[int, list[str]]:
        """Label index -> its patients (in index order); classes without patients are left out."""
        groups: dict[int, list[str]] = {}
        for patient in self.patient_ids:
            groups.setdefault(self.labels[patient], []).append(patient)
        return dict(sorted(groups.items()))

    def counts(self) -> dict[str, dict[str, int]]:
        """Patients, slides and patches per class name."""
        out: dict[str, dict[str, int]] = {}
        for label, patients in self.patients_per_class().items():
            name = self.class_names[label] if 0 <= label < len(self.class_names) else str(label)
            out[name] = {
                "patients": len(patients),
                "slides": sum(len(self.slides[p]) for p in patients),
                "patches": sum(len(self.rows[(p, s)]) for p in patients for s in self.slides[p]),
            }
        return out


def balanced_patient_list(index: HierarchyIndex, seed: int = 0) -> list[str]:
    """Replicate the patient lists of smaller classes up to the size of the largest class.

    Each smaller class is repeated whole as often as it fits; the remainder is a seeded random subset of it, so
    the list is deterministic and no patient is over-represented by more than one copy.

    Args:
        index (`HierarchyIndex`): the dataset's hierarchy.
        seed (`int`, defaults to 0): seed of the remainder's choice.
    """
    groups = index.patients_per_class()
    largest = max(len(patients) for patients in groups.values())
    rng = np.random.default_rng([seed, 0x6A1A])
    balanced: list[str] = []
    for patients in groups.values():
        copies, remainder = divmod(largest, len(patients))
        balanced.extend(patients * copies)
        extra = sorted(rng.choice(len(patients), size=remainder, replace=False).tolist())
        balanced.extend(patients[i] for i in extra)
    return balanced


def _choose(rng: np.random.Generator, count: int, needed: int, cycle: bool) -> np.ndarray:
    """Pick ``needed`` positions out of ``count``: without replacement when possible; otherwise by cycling through
    a random order (``cycle=True``, used for slides) or independently with replacement (patches)."""
    if count >= needed:
        return rng.choice(count, size=needed, replace=False)
    if cycle:
        return np.resize(rng.permutation(count), needed)
    return rng.choice(count, size=needed, replace=True)


#: What a patch that cannot be read raises (PIL, imagecodecs, Arrow, a missing file).
_UNREADABLE = (ValueError, TypeError, OSError, IndexError, pa.ArrowException)


def _reason(error: BaseException) -> str:
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or ['?'])[0]}"


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_patch_sizes(
    patches: Sequence[torch.Tensor],
    transform: Transform | None,
    patient: str,
    rows: Sequence[int] | None = None,
) -> None:
    """Every drawn patch at least the transform's crop: a smaller one would be upsampled into blur (the first
    row is checked before training starts; a dataset may mix sizes further on)."""
    crop = getattr(transform, "crop_size", None)
    if not isinstance(crop, int):
        return
    for n, patch in enumerate(patches):
        height, width = patch.shape[-2:]
        if min(height, width) < crop:
            where = f"patient {patient!r}" + (f", row {rows[n]}" if rows is not None else "")
            raise DatasetError(
                f"{where}: a patch of {height}x{width} px, smaller than data.crop_size {crop}; convert the data "
                "with a larger patch size, or lower data.crop_size"
            )


def _views(
    patches: Sequence[torch.Tensor],
    num_views: int,
    transform: Transform | None,
    generator: torch.Generator,
    patient: str,
) -> torch.Tensor:
    """``num_views`` transformed copies of each patch ``[C, H, W]`` -> ``[N, V, C, h, w]``.

    Views are written straight into one preallocated tensor: at 300 px an extra stack or clone per patient
    costs as much as reading its patches. An :class:`~hlss_hf.augmentation.HLSSAugmentation` gets all
    ``N * V`` views in one :meth:`~hlss_hf.augmentation.HLSSAugmentation.batch` call, patch-major as the
    sequential calls would be (so the draws are the same).
    """
    if isinstance(transform, HLSSAugmentation) and len(patches) and len({p.shape[0] for p in patches}) == 1:
        size = transform.crop_size
        out = torch.empty((len(patches), num_views, patches[0].shape[0], size, size), dtype=patches[0].dtype)
        repeated = [patch for patch in patches for _ in range(num_views)]
        transform.batch(repeated, generator, out=out.view(-1, *out.shape[2:]))
        return out
    out = None
    for n, patch in enumerate(patches):
        for v in range(num_views):
            view = patch if transform is None else transform(patch, generator=generator)
            if out is None:
                out = torch.empty((len(patches), num_views, *view.shape), dtype=view.dtype)
            elif view.shape != out.shape[2:]:
                what = "the transform returned views" if transform is not None else "patches have"
                raise ValueError(
                    f"patient {patient!r}: {what} different shapes {tuple(out.shape[2:])} and {tuple(view.shape)}; "
                    + (
                        "it must produce a fixed crop size"
                        if transform is not None
                        else "pass a transform that crops"
                    )
                )
            out[n, v] = view
    return out


class HierarchicalPatchDataset(Dataset):
    """Map-style dataset of patients: item ``i`` is the ``i``-th patient (of the class-balanced list if asked).

    Args:
        dataset (`datasets.Dataset`): a patch dataset in the :mod:`hlss_hf.schema` layout.
        num_slides (`int`, defaults to 2): slides per patient ``S``.
        num_patches (`int`, defaults to 2): patches per slide ``P``.
        num_views (`int`, defaults to 2): augmented views per patch ``V``.
        transform (`callable`, *optional*): ``transform(image [C, H, W] float, generator=torch.Generator)`` ->
            fixed-size float image, e.g. :func:`hlss_hf.augmentation.build_augmentation`. It must draw its
            randomness from the generator only. ``None`` keeps the converted image (then all patches must have
            the same size) and repeats it ``V`` times.
        seed (`int`, defaults to 0): base seed; sample ``i`` of epoch ``e`` depends on ``(seed, e, i)`` only.
        balance_classes (`bool`, defaults to `False`): replicate the patients of smaller classes up to the size
            of the largest class (see :func:`balanced_patient_list`).
        index (`HierarchyIndex`, *optional*): a prebuilt index of ``dataset`` (built when omitted).

    Items are dicts: ``pixel_values`` float ``[S, P, V, C, H, W]``, ``label`` int, ``patient_id`` str,
    ``slide_ids`` list of ``S`` str (with repeats when the patient has fewer than ``S`` slides), ``rows``
    LongTensor ``[S, P]`` (the dataset row of each drawn patch: its caption or any other column).

    :meth:`set_epoch` changes the draws; the epoch lives in shared memory so that persistent DataLoader workers
    see it too (call it before iterating the loader of that epoch).
    """

    def __init__(
        self,
        dataset: datasets.Dataset,
        num_slides: int = 2,
        num_patches: int = 2,
        num_views: int = 2,
        transform: Transform | None = None,
        seed: int = 0,
        balance_classes: bool = False,
        index: HierarchyIndex | None = None,
    ):
        _check_positive(num_slides=num_slides, num_patches=num_patches, num_views=num_views)
        if not isinstance(seed, int | np.integer) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        if IMAGE not in dataset.column_names:
            raise ValueError(f"dataset has no column {IMAGE!r}; it has {dataset.column_names}")
        self.index = index if index is not None else HierarchyIndex.from_dataset(dataset)
        self.modality = modality_of(dataset.features)
        self.num_slides, self.num_patches, self.num_views = int(num_slides), int(num_patches), int(num_views)
        self.transform = transform
        self.seed = int(seed)
        self.balance_classes = balance_classes
        self.patients = (
            balanced_patient_list(self.index, seed) if balance_classes else list(self.index.patient_ids)
        )
        self._images = dataset.select_columns([IMAGE])
        # SRH and raw H&E (Array3D) are read as zero-copy views; encoded H&E as bytes, decoded by decode_image
        # (imagecodecs for RGB PNG / JPEG: the same pixels as datasets' PIL decoding, twice as fast).
        self._array_column = not isinstance(dataset.features[IMAGE], datasets.Image)
        if not self._array_column:
            self._images = self._images.cast_column(IMAGE, datasets.Image(decode=False))
        self._srh_reader: _FixedArrayReader | None = None
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def class_names(self) -> list[str]:
        return self.index.class_names

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Use the draws of ``epoch`` (a non-negative integer) from now on.

        Args:
            epoch (`int`): the epoch number.
        """
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self._epoch.fill_(int(epoch))

    def __len__(self) -> int:
        return len(self.patients)

    def sample_rows(
        self, index: int, epoch: int | None = None
    ) -> tuple[list[str], np.ndarray, np.random.Generator]:
        """The slides and patch rows drawn for item ``index``: ``(slide_ids [S], rows [S, P], generator)``.

        Args:
            index (`int`): item index.
            epoch (`int`, *optional*): the epoch (defaults to the current one).

        Returns:
            The slide ids, the dataset row of each drawn patch, and the numpy generator (positioned after the
            draws; its next output seeds the augmentations).
        """
        epoch = self.epoch if epoch is None else epoch
        patient = self.patients[index]
        rng = np.random.default_rng([self.seed, epoch, index])
        slides = self.index.slides[patient]
        chosen = [slides[j] for j in _choose(rng, len(slides), self.num_slides, cycle=True)]
        rows = np.empty((self.num_slides, self.num_patches), dtype=np.int64)
        for s, slide in enumerate(chosen):
            candidates = self.index.rows[(patient, slide)]
            rows[s] = candidates[_choose(rng, len(candidates), self.num_patches, cycle=False)]
        return chosen, rows, rng

    def __getitem__(self, index: int | tuple[int, int]) -> dict[str, Any]:
        # An (epoch, index) pair draws that epoch's sample: what a sampler spanning several epochs yields.
        epoch, index = index if isinstance(index, tuple) else (None, index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"patient index {index} out of range for {len(self)} patients")
        index = index % len(self)
        patient = self.patients[index]
        slide_ids, rows, rng = self.sample_rows(index, epoch)
        # One read for all the patient's drawn rows; a patch drawn twice is read and converted once.
        unique, inverse = np.unique(rows.reshape(-1), return_inverse=True)
        images = self._read(unique.tolist(), patient)
        _check_patch_sizes(images, self.transform, patient, unique.tolist())
        generator = torch.Generator().manual_seed(int(rng.integers(0, 2**63 - 1)))
        patches = [images[j] for j in inverse.reshape(-1).tolist()]
        views = _views(patches, self.num_views, self.transform, generator, patient)
        pixel_values = views.reshape(self.num_slides, self.num_patches, *views.shape[1:])
        return {
            "pixel_values": pixel_values,
            "label": self.index.labels[patient],
            "patient_id": patient,
            "slide_ids": slide_ids,
            "rows": torch.from_numpy(rows),
        }

    def __getstate__(self) -> dict[str, Any]:
        # The reader holds numpy views of memory-mapped Arrow buffers: rebuild it in each worker, never pickle it.
        state = dict(self.__dict__)
        state["_srh_reader"] = None
        return state

    def read_images(self, rows: Sequence[int], patient: str | None = None) -> list[np.ndarray]:
        """Decode the images of dataset ``rows`` with :func:`hlss_hf.schema.decode_image`.

        Array rows (SRH, raw H&E) are zero-copy views of the memory-mapped Arrow data (read-only; copy before
        writing).

        Args:
            rows (sequence of `int`): positions in the dataset.
            patient (`str`, *optional*): named in the error when a row cannot be read.

        Returns:
            list of ``(H, W, 2)`` uint16 (SRH) or ``(H, W, 3)`` uint8 (H&E) arrays.
        """
        rows = [int(r) for r in rows]
        try:
            return self._decode_rows(rows)
        except _UNREADABLE as error:
            owner = f"patient {patient!r}: " if patient is not None else ""
            # Name the row that fails, not every row of the batch: read them one at a time (only on failure).
            for row in rows:
                try:
                    self._decode_rows([row])
                except _UNREADABLE as row_error:
                    raise DatasetError(
                        f"{owner}row {row}: cannot read its image ({_reason(row_error)})"
                    ) from None
            raise DatasetError(f"{owner}cannot read image rows {rows[:8]}: {_reason(error)}") from error

    def _decode_rows(self, rows: list[int]) -> list[np.ndarray]:
        if self._array_column:
            if self._srh_reader is None:
                self._srh_reader = _FixedArrayReader(self._images)
            values = self._srh_reader.rows(rows)
        else:
            values = self._images[rows][IMAGE]
        images = [decode_image(value, strict=True) for value in values]
        channels, dtype = (2, np.uint16) if self.modality == "srh" else (3, np.uint8)
        for image in images:
            if image.ndim != 3 or image.shape[-1] != channels or image.dtype != dtype:
                raise ValueError(
                    f"shape {image.shape} {image.dtype}, expected (H, W, {channels}) {np.dtype(dtype).name}"
                )
        return images

    def _read(self, rows: list[int], patient: str) -> list[torch.Tensor]:
        # One conversion call per patch: stacking the patches first would only add a copy.
        return to_float(self.read_images(rows, patient), self.modality)

    def shard_patients(self, num_shards: int, index: int) -> Subset:
        """The items of shard ``index`` out of ``num_shards`` (every ``num_shards``-th item, from ``index``).

        Items keep their global index, so their content does not depend on the sharding. With accelerate,
        ``accelerator.prepare(DataLoader(dataset, ...))`` already shards batches; use this for manual
        multi-process or multi-node splits.

        Args:
            num_shards (`int`): number of shards (e.g. the world size).
            index (`int`): this shard (e.g. the rank), in ``[0, num_shards)``.
        """
        _check_positive(num_shards=num_shards)
        if not 0 <= index < num_shards:
            raise ValueError(f"shard index must be in [0, {num_shards}), got {index}")
        return Subset(self, list(range(index, len(self), num_shards)))


class _FixedArrayReader:
    """Zero-copy numpy views of a fixed-shape array column (``Array3D``: SRH, raw H&E) of a ``datasets.Dataset``.

    ``dataset[rows]`` goes through datasets' formatting, which copies nested lists (and the numpy formatter
    widens uint16 to int64); here each Arrow chunk's values buffer is viewed once as ``(rows, H, W, C)``, so a
    read is an index into memory-mapped data. Falls back to the Arrow formatter when the storage is not a plain
    fixed-size layout (nulls, sliced chunks).
    """

    def __init__(self, dataset: datasets.Dataset):
        self.dataset = dataset
        feature = dataset.features[IMAGE]
        self.shape = tuple(int(v) for v in feature.shape)
        self.dtype = np.dtype(feature.dtype)
        indices = dataset._indices  # the select/shuffle mapping, when there is one
        self.mapping = None if indices is None else indices.column(0).to_numpy()
        self.chunks: list[np.ndarray] | None = []
        self.starts = [0]
        column = dataset.data.table.column(IMAGE)
        size = int(np.prod(self.shape))
        for chunk in column.chunks:
            storage = chunk.storage if isinstance(chunk, pa.ExtensionArray) else chunk
            values = storage
            for _ in range(len(self.shape)):
                if not pa.types.is_list(values.type) and not pa.types.is_large_list(values.type):
                    break
                values = values.flatten()
            if storage.null_count or len(values) != len(chunk) * size or values.null_count:
                self.chunks = None
                break
            self.chunks.append(values.to_numpy(zero_copy_only=False).reshape(len(chunk), *self.shape))
            self.starts.append(self.starts[-1] + len(chunk))

    def slice(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` as one ``(n, H, W, C)`` array: a zero-copy (read-only) view when they are
        consecutive rows of one Arrow chunk, else stacked."""
        if self.chunks is not None and stop > start:
            first = start if self.mapping is None else int(self.mapping[start])
            last = stop - 1 if self.mapping is None else int(self.mapping[stop - 1])
            consecutive = self.mapping is None or bool((np.diff(self.mapping[start:stop]) == 1).all())
            chunk = int(np.searchsorted(self.starts, first, side="right")) - 1
            if consecutive and last < self.starts[chunk + 1]:
                offset = self.starts[chunk]
                return self.chunks[chunk][first - offset : last + 1 - offset]
        return np.stack(self.rows(list(range(start, stop))))

    def rows(self, rows: list[int]) -> list[np.ndarray]:
        """The arrays of ``rows`` (positions in the dataset, after its indices mapping)."""
        if self.chunks is None:
            column = self.dataset.with_format("arrow")[rows][IMAGE]
            return [np.asarray(v, dtype=self.dtype).reshape(self.shape) for v in column.to_pylist()]
        absolute = np.asarray(rows) if self.mapping is None else self.mapping[np.asarray(rows)]
        chunk_ids = np.searchsorted(self.starts, absolute, side="right") - 1
        return [
            self.chunks[c][a - self.starts[c]]
            for a, c in zip(absolute.tolist(), chunk_ids.tolist(), strict=True)
        ]


def collate_hierarchical(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack patient samples into a batch.

    Args:
        batch (list of dict): items of :class:`HierarchicalPatchDataset` or :class:`HierarchicalStreamingDataset`.

    Returns:
        dict with ``pixel_values`` ``[B, S, P, V, C, H, W]``, ``labels`` LongTensor ``[B]``, ``patient_ids``
        (list of B str), ``slide_ids`` (list of B lists) and, for map-style items, ``rows`` LongTensor
        ``[B, S, P]`` (the dataset rows drawn).
    """
    if len(batch) == 0:
        raise ValueError("cannot collate an empty batch")
    shapes = {tuple(item["pixel_values"].shape) for item in batch}
    if len(shapes) != 1:
        raise ValueError(
            f"samples have different shapes {sorted(shapes)}; patients: {[b['patient_id'] for b in batch]}"
        )
    collated = {
        "pixel_values": torch.stack([item["pixel_values"] for item in batch]),
        "labels": torch.tensor([int(item["label"]) for item in batch], dtype=torch.long),
        "patient_ids": [item["patient_id"] for item in batch],
        "slide_ids": [list(item["slide_ids"]) for item in batch],
    }
    if all("rows" in item for item in batch):  # streamed items have no dataset rows
        collated["rows"] = torch.stack([item["rows"] for item in batch])
    return collated


class HierarchicalCollator:
    """Callable form of :func:`collate_hierarchical` (for ``DataLoader(collate_fn=...)`` and Trainer-style code)."""

    def __call__(self, batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return collate_hierarchical(batch)


def _patient_hash(patient: str) -> int:
    # crc32 is stable across processes and runs, unlike Python's salted hash().
    return zlib.crc32(patient.encode("utf-8"))


class HierarchicalStreamingDataset(IterableDataset):
    """Patient samples from a streamed patch dataset (``load_dataset(..., streaming=True)``).

    Example:

    ```python
    >>> stream = load_dataset("me/opensrh", split="train", streaming=True)
    >>> data = HierarchicalStreamingDataset(stream, transform=build_augmentation(None, 224), buffer_size=32)
    >>> loader = DataLoader(data, batch_size=32, num_workers=4, collate_fn=collate_hierarchical)
    ```

    Semantics:

    - Rows are read in stream order. Each patient belongs to exactly one consumer, the DataLoader worker of one
      process chosen by ``crc32(patient_id) % (world_size * num_workers)``; every consumer reads the whole stream
      and keeps only its patients' rows (images of other patients are not decoded).
    - Kept rows are grouped by patient in a buffer of at most ``buffer_size`` patients. A patient is emitted as
      one sample when ``patches_per_patient`` of its patches are buffered; when a new patient arrives and the
      buffer is full, the oldest patient is emitted with what it has; at the end of the stream the rest are
      emitted oldest first. Rows of an emitted patient that arrive later start a new group (a second sample of
      that patient). A stream sorted by patient therefore gives one sample per patient (while patients have at
      most ``patches_per_patient`` patches); a shuffled stream gives partial patients.
    - Each sample is drawn from its group like :class:`HierarchicalPatchDataset` (slides without replacement,
      cycling when too few; patches without replacement, with when too few; ``V`` views), with randomness from
      ``(seed, epoch, patient_id, group number)``. Given the same stream and the same ``buffer_size`` /
      ``patches_per_patient``, a patient's samples are identical for any number of workers or processes.
    - Do not also split the stream with ``datasets.distributed.split_dataset_by_node``: the patient hash
      already splits it, and a node split by shard would cut patients whose rows straddle shards.
    - Memory: at most ``buffer_size * patches_per_patient`` decoded patches per consumer.

    Args:
        dataset (`datasets.IterableDataset` or any iterable of row dicts): the streamed patch dataset.
        num_slides (`int`, defaults to 2): slides per patient ``S``.
        num_patches (`int`, defaults to 2): patches per slide ``P``.
        num_views (`int`, defaults to 2): views per patch ``V``.
        transform (`callable`, *optional*): as in :class:`HierarchicalPatchDataset`.
        seed (`int`, defaults to 0): base seed.
        buffer_size (`int`, defaults to 16): patients held at once per consumer.
        patches_per_patient (`int`, defaults to 64): buffered patches that make a patient ready.
        rank (`int`, *optional*), world_size (`int`, *optional*): this process and the process count; taken
            from ``torch.distributed`` when it is initialised, else 0 and 1.
        modality (`str`, *optional*): ``"srh"`` or ``"he"``; read from ``dataset.features`` when omitted.
    """

    def __init__(
        self,
        dataset: Any,
        num_slides: int = 2,
        num_patches: int = 2,
        num_views: int = 2,
        transform: Transform | None = None,
        seed: int = 0,
        buffer_size: int = 16,
        patches_per_patient: int = 64,
        rank: int | None = None,
        world_size: int | None = None,
        modality: str | None = None,
    ):
        _check_positive(
            num_slides=num_slides,
            num_patches=num_patches,
            num_views=num_views,
            buffer_size=buffer_size,
            patches_per_patient=patches_per_patient,
        )
        if not isinstance(seed, int | np.integer) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        features = getattr(dataset, "features", None)
        if modality is None:
            if features is None:
                raise ValueError("the stream has no features; pass modality='srh' or 'he'")
            modality = modality_of(features)
        if modality not in ("srh", "he"):
            raise ValueError(f"modality must be 'srh' or 'he', got {modality!r}")
        self.modality = modality
        self.class_names = (
            list(features[LABEL].names)
            if features and isinstance(features.get(LABEL), datasets.ClassLabel)
            else None
        )
        # Undecoded images: rows of other consumers' patients then cost no PNG decoding.
        image_feature = features.get(IMAGE) if features is not None else None
        if isinstance(image_feature, datasets.Image) and hasattr(dataset, "decode"):
            dataset = dataset.decode(False)
        elif (
            isinstance(dataset, datasets.IterableDataset)
            and (modality == "srh" or image_feature is not None)
            and not isinstance(image_feature, datasets.Image)
        ):  # SRH, or raw H&E (an Array3D feature)
            # numpy formatting yields each Array3D as one array instead of nested Python lists (much faster).
            dataset = dataset.with_format("numpy")
        self.dataset = dataset
        self.num_slides, self.num_patches, self.num_views = int(num_slides), int(num_patches), int(num_views)
        self.transform = transform
        self.seed = int(seed)
        self.buffer_size = int(buffer_size)
        self.patches_per_patient = int(patches_per_patient)
        self.rank, self.world_size = rank, world_size
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Use the draws of ``epoch``; forwarded to the stream (``datasets`` reshuffles shards by epoch).

        Args:
            epoch (`int`): the epoch number.
        """
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self._epoch.fill_(int(epoch))
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(int(epoch))

    def _consumer(self) -> tuple[int, int]:
        rank, world = self.rank, self.world_size
        if rank is None or world is None:
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                rank = torch.distributed.get_rank() if rank is None else rank
                world = torch.distributed.get_world_size() if world is None else world
            else:
                rank, world = rank or 0, world or 1
        if not 0 <= rank < world:
            raise ValueError(f"rank must be in [0, world_size={world}), got {rank}")
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return rank * workers + worker, world * workers

    def __iter__(self) -> Iterator[dict[str, Any]]:
        consumer, consumers = self._consumer()
        epoch = self.epoch
        # patient -> (label, {slide: [raw images]}); insertion order = age in the buffer.
        buffer: OrderedDict[str, tuple[int, dict[str, list]]] = OrderedDict()
        counts: dict[str, int] = {}
        groups_emitted: dict[str, int] = {}

        def emit(patient: str) -> dict[str, Any]:
            label, slides = buffer.pop(patient)
            counts.pop(patient)
            group = groups_emitted.get(patient, 0)
            groups_emitted[patient] = group + 1
            return self._sample(patient, label, slides, epoch, group)

        for position, row in enumerate(self._rows()):
            try:
                patient, slide = str(row[PATIENT_ID]), str(row[SLIDE_ID])
                label, image = int(row[LABEL]), row[IMAGE]
            except KeyError as error:
                raise ValueError(f"stream row {position} has no column {error.args[0]!r}") from None
            if _patient_hash(patient) % consumers != consumer:
                continue
            if patient not in buffer:
                if len(buffer) >= self.buffer_size:
                    yield emit(next(iter(buffer)))
                buffer[patient] = (label, {})
                counts[patient] = 0
            elif buffer[patient][0] != label:
                raise ValueError(
                    f"patient {patient!r} has rows with different labels {buffer[patient][0]} and {label}"
                )
            buffer[patient][1].setdefault(slide, []).append(image)
            counts[patient] += 1
            if counts[patient] >= self.patches_per_patient:
                yield emit(patient)
        while buffer:
            yield emit(next(iter(buffer)))

    def _rows(self) -> Iterator[dict[str, Any]]:
        if isinstance(self.dataset, datasets.IterableDataset):
            # .iter() rather than iter(): in a DataLoader worker, datasets' __iter__ hands each worker only some
            # shards, but grouping by patient hash needs every row. Batches also read faster than rows.
            for batch in self.dataset.iter(batch_size=64):
                columns = [name for name in (IMAGE, PATIENT_ID, SLIDE_ID, LABEL) if name in batch]
                for j in range(len(batch[columns[0]])):
                    yield {name: batch[name][j] for name in columns}
        else:
            yield from self.dataset

    def _sample(
        self, patient: str, label: int, slides: dict[str, list], epoch: int, group: int
    ) -> dict[str, Any]:
        rng = np.random.default_rng([self.seed, epoch, _patient_hash(patient), group])
        slide_ids = list(slides)
        chosen = [slide_ids[j] for j in _choose(rng, len(slide_ids), self.num_slides, cycle=True)]
        raw = []
        for slide in chosen:
            images = slides[slide]
            raw.extend(images[j] for j in _choose(rng, len(images), self.num_patches, cycle=False))
        decoded = [decode_image(value) for value in raw]
        converted = to_float(decoded, self.modality)
        _check_patch_sizes(converted, self.transform, patient)
        generator = torch.Generator().manual_seed(int(rng.integers(0, 2**63 - 1)))
        views = _views(converted, self.num_views, self.transform, generator, patient)
        return {
            "pixel_values": views.reshape(self.num_slides, self.num_patches, *views.shape[1:]),
            "label": label,
            "patient_id": patient,
            "slide_ids": chosen,
        }


# ---------------------------------------------------------------------------------------------------------------
# Loading a split: train.py, finetune.py and `python -m hlss_hf.evaluate` all read their data here.


def _by(key: str | None) -> str:
    return f" ({key})" if key else ""


def _loading_error(source: str, error: BaseException, key: str | None) -> Exception | None:
    """The one-line error for a failed ``load_dataset`` / ``get_dataset_split_names``, or ``None`` (re-raise)."""
    from .sources import hub_source_error

    source_error = hub_source_error(source, "dataset", error, key)  # offline, unknown or unreachable Hub id
    if source_error is not None:
        return source_error
    if isinstance(error, FileNotFoundError) and os.path.isdir(source):  # e.g. a folder without data files
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        return DatasetError(f"dataset {source!r}{_by(key)}: {first}")
    return None


def split_names(
    source: str | os.PathLike | datasets.DatasetDict,
    *,
    config_name: str | None = None,
    key: str | None = None,
) -> list[str]:
    """The split names of a dataset, read as :func:`load_split` reads it (no split is loaded).

    Args:
        source: a ``save_to_disk`` folder, a Hub-layout folder, a Hub dataset id or a ``DatasetDict``.
        config_name (`str`, *optional*): the dataset configuration.
        key (`str`, *optional*): the setting that named the dataset (e.g. ``"--dataset"``), named in errors.
    """
    if isinstance(source, datasets.DatasetDict | datasets.IterableDatasetDict):
        return list(source)
    from .sources import check_local_source

    check_local_source(source, "dataset", key)
    path = Path(os.path.expanduser(os.fspath(source)))
    if (path / "dataset_dict.json").is_file():
        return list(json.loads((path / "dataset_dict.json").read_text(encoding="utf-8"))["splits"])
    _check_not_single_split(path, os.fspath(source), key)
    local = str(path) if path.is_dir() else os.fspath(source)
    try:
        return list(datasets.get_dataset_split_names(local, config_name))
    except Exception as err:
        error = _loading_error(local, err, key)
        if error is None:
            raise
        raise error from err


def _check_not_single_split(path: Path, label: str, key: str | None) -> None:
    if (path / "state.json").is_file() and not (path / "dataset_dict.json").is_file():
        raise DatasetError(
            f"dataset {label!r}{_by(key)} is one saved split (Dataset.save_to_disk), not a dataset with named "
            "splits: save a DatasetDict, or write the data with dataset_scripts/"
        )


def load_split(
    source: str | os.PathLike | datasets.DatasetDict,
    split: str,
    *,
    config_name: str | None = None,
    cache_dir: str | None = None,
    streaming: bool = False,
    max_samples: int | None = None,
    required_columns: Sequence[str] = (PATIENT_ID, SLIDE_ID),
    key: str | None = None,
    split_key: str | None = None,
    name: str | None = None,
) -> datasets.Dataset | datasets.IterableDataset:
    """One split of a patch dataset, checked: the one loader of ``train.py``, ``finetune.py`` and
    ``python -m hlss_hf.evaluate``.

    Whatever goes wrong ends in one line naming the dataset and the setting that chose it: a mistyped local path
    (:class:`~hlss_hf.errors.SourceError`, never looked up on the Hub), an id that is not in the cache while
    offline or not on the Hub (``SourceError``), a folder without data files, a single saved split, a missing
    split (listing the splits there are), an empty split, or a missing required column (:class:`DatasetError`).

    Args:
        source (`str`, `os.PathLike` or `datasets.DatasetDict`): a ``save_to_disk`` folder (what the converters
            write; memory-mapped, only this split is opened), a Hub-layout folder (data files, README configs), a
            Hub dataset id, or splits already in memory.
        split (`str`): the split to load.
        config_name (`str`, *optional*): the dataset configuration (``load_dataset``'s ``name``).
        cache_dir (`str`, *optional*): the ``datasets`` cache folder.
        streaming (`bool`, defaults to `False`): return an ``IterableDataset`` (read as it is iterated).
        max_samples (`int`, *optional*): keep the first ``max_samples`` rows.
        required_columns (`Sequence[str]`, defaults to the patient and slide ids): columns the split must have.
        key (`str`, *optional*): the setting that named the dataset (e.g. ``"data.dataset"``, ``"--dataset"``).
        split_key (`str`, *optional*): the setting that named the split (e.g. ``"data.train_split"``).
        name (`str`, *optional*): what errors call the dataset (default: ``source``; "in-memory" for splits).

    Returns:
        `datasets.Dataset`, or `datasets.IterableDataset` when ``streaming``.

    Example:

    ```python
    >>> from hlss_hf.data import load_split
    >>> train = load_split("data/opensrh", "train", key="--dataset", split_key="--train-split")
    ```
    """
    in_memory = isinstance(source, datasets.DatasetDict)
    label = name if name is not None else ("in-memory" if in_memory else os.fspath(source))

    def missing_split(names: list[str] | None) -> DatasetError:
        listed = f"; its splits are {names}" if names is not None else ""
        return DatasetError(f"dataset {label!r} has no split {split!r}{_by(split_key)}{listed}")

    def empty_split() -> DatasetError:
        return DatasetError(f"split {split!r} of dataset {label!r} is empty{_by(split_key)}")

    if in_memory:
        if split not in source:
            raise missing_split(list(source))
        data = source[split].to_iterable_dataset() if streaming else source[split]
    else:
        from .sources import check_local_source

        check_local_source(source, "dataset", key)  # a mistyped path is named here, not looked up on the Hub
        path = Path(os.path.expanduser(os.fspath(source)))
        _check_not_single_split(path, label, key)
        if (path / "dataset_dict.json").is_file() and not streaming:
            names = split_names(path)
            if split not in names:
                raise missing_split(names)
            try:
                data = datasets.load_from_disk(str(path / split))
            except IndexError as err:  # datasets fails this way on a split saved with no rows
                raise empty_split() from err
        else:
            local = str(path) if path.is_dir() else os.fspath(source)
            try:
                data = datasets.load_dataset(
                    local, config_name, split=split, streaming=streaming, cache_dir=cache_dir
                )
            except Exception as err:
                error = _loading_error(local, err, key)
                if (
                    error is None
                    and isinstance(err, ValueError)
                    and re.search(r"(Unknown|Bad) split", str(err))
                ):
                    try:
                        names = split_names(source, config_name=config_name, key=key)
                    except Exception:
                        names = None
                    error = missing_split(names)
                if error is None:
                    raise
                raise error from err
    if isinstance(data, datasets.Dataset) and len(data) == 0:
        raise empty_split()
    columns = data.column_names or (list(data.features) if data.features else None)  # None: a bare stream
    absent = [column for column in required_columns if columns is not None and column not in columns]
    if absent:
        raise DatasetError(
            f"split {split!r} of dataset {label!r}{_by(key)} has no {' or '.join(absent)} column (it has "
            f"{columns}); HLSS needs the slide and patient of every patch: write the data with dataset_scripts/"
        )
    if max_samples is not None:
        if isinstance(data, datasets.IterableDataset):
            data = data.take(max_samples)
        else:
            data = data.select(range(min(max_samples, len(data))))
    return data


# ---------------------------------------------------------------------------------------------------------------
# The pretraining loader


class EpochPermutationSampler(Sampler[int]):
    """A permutation of the dataset's indices drawn from ``(seed, epoch)`` only.

    The permutation is cut to a multiple of ``multiple`` (the global micro-batch: per-device batch x processes),
    so every process gets the same number of full batches and a run on W processes sees exactly the batches of
    a single-process run with W times the per-device batch.

    Args:
        length (`int`): Dataset size.
        seed (`int`): Base seed.
        multiple (`int`): Keep the first ``floor(length / multiple) * multiple`` indices of each permutation.
        drop_last (`bool`, *optional*, defaults to `True`): Cut to ``multiple``; `False` keeps every index.
    """

    def __init__(self, length: int, seed: int, multiple: int, drop_last: bool = True) -> None:
        self.length = length
        self.seed = seed
        self.multiple = multiple
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return (self.length // self.multiple) * self.multiple if self.drop_last else self.length

    def order(self, epoch: int) -> list[int]:
        """Epoch ``epoch``'s indices."""
        order = np.random.default_rng([self.seed, epoch, 0x5EED]).permutation(self.length)
        return order[: len(self)].tolist()

    def __iter__(self):
        return iter(self.order(self.epoch))


class EpochBatchSampler(Sampler[list]):
    """The per-device batches of an :class:`EpochPermutationSampler`, epoch by epoch, for all processes (Accelerate
    deals them out in turn).

    Each epoch's batches are those of a plain ``BatchSampler`` over that epoch's permutation: a kept partial last
    batch (``drop_last=False``) ends its epoch, and on several processes it is completed, with as many more
    batches as every process needs, the way Accelerate completes the last batches of a loader
    (``BatchSamplerShard``, ``even_batches``). With ``num_epochs`` > 1 one iteration therefore yields the batches
    of the per-epoch iterations ``epoch, epoch + 1, ...`` back to back, as ``(epoch, index)`` items, and DataLoader
    workers build the next epoch's first batches while the last ones train instead of starting only once an
    epoch's iterator is used up.

    Args:
        sampler (`EpochPermutationSampler`): Each epoch's order; its ``set_epoch`` sets the first epoch.
        batch_size (`int`): Patients per device batch.
        num_processes (`int`): Processes the batches are dealt to.
    """

    def __init__(self, sampler: EpochPermutationSampler, batch_size: int, num_processes: int) -> None:
        self.sampler = sampler
        self.batch_size = batch_size
        self.num_processes = num_processes
        self.drop_last = sampler.drop_last  # read by Accelerate's BatchSamplerShard
        self.num_epochs = 1

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def epoch_batches(self) -> int:
        """Batches (for all processes together) in one epoch."""
        batches = -(-len(self.sampler) // self.batch_size)
        return -(-batches // self.num_processes) * self.num_processes

    def __len__(self) -> int:
        return self.epoch_batches() * self.num_epochs

    def _batches(self, epoch: int) -> list[list]:
        items = self.sampler.order(epoch)
        if self.num_epochs > 1:
            items = [(epoch, index) for index in items]
        batches = [items[i : i + self.batch_size] for i in range(0, len(items), self.batch_size)]
        short = batches and len(batches[-1]) < self.batch_size
        if self.num_processes == 1 or (len(batches) % self.num_processes == 0 and not short):
            # What Accelerate deals out as it is.
            return batches
        from accelerate.data_loader import BatchSamplerShard
        from torch.utils.data import BatchSampler

        plain = BatchSampler(items, self.batch_size, drop_last=False)
        shards = [list(BatchSamplerShard(plain, self.num_processes, p)) for p in range(self.num_processes)]
        return [batch for turn in zip(*shards, strict=True) for batch in turn]

    def __iter__(self):
        epochs = range(self.sampler.epoch, self.sampler.epoch + self.num_epochs)
        return (batch for epoch in epochs for batch in self._batches(epoch))


#: Most DataLoader workers a process starts by itself for a model on an accelerator.
MAX_AUTO_WORKERS = 16


def default_num_workers(device: str | torch.device) -> int:
    """DataLoader workers for a model on `device`: 0 on the CPU (the model already uses every core and workers only
    compete with it), else this process's share of the cores (those it may use, divided among the processes
    launched on this machine) but one, left to the process itself, at most :data:`MAX_AUTO_WORKERS`."""
    if torch.device(device).type == "cpu":
        return 0
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    local_processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, min(MAX_AUTO_WORKERS, cores // local_processes - 1))


def loader_workers(num_workers: int | None, device: str | torch.device) -> dict[str, Any]:
    """DataLoader keyword arguments for a model on ``device``: ``num_workers`` (``None``: :func:`default_num_workers`)
    and ``pin_memory`` on CUDA, so that the host-to-device copy runs asynchronously (Accelerate's
    ``non_blocking``, set by :func:`hlss_hf.harness.make_accelerator`)."""
    return {
        "num_workers": default_num_workers(device) if num_workers is None else num_workers,
        "pin_memory": torch.device(device).type == "cuda",
    }


def build_train_loader(
    config, train_ds, num_processes: int, device: str | torch.device = "cpu"
) -> tuple[Dataset | IterableDataset, DataLoader]:
    """The hierarchical dataset and DataLoader of one pretraining process (before ``accelerator.prepare``).

    Args:
        config (`TrainConfig`): the run's config (``data`` and ``training`` sections).
        train_ds (`datasets.Dataset` or `datasets.IterableDataset`): the training split (a stream when
            ``data.streaming``).
        num_processes (`int`): processes sharing the global batch.
        device (`str` or `torch.device`, defaults to ``"cpu"``): where the model trains; sets the worker count
            when ``data.num_workers`` is null (:func:`default_num_workers`) and pins batches for CUDA.

    Returns:
        `(dataset, loader)`: a :class:`HierarchicalPatchDataset` with an :class:`EpochBatchSampler`, or a
        :class:`HierarchicalStreamingDataset`.
    """
    from .augmentation import build_augmentation
    from .errors import ConfigError

    d, t = config.data, config.training
    transform = build_augmentation(d.augmentation, d.crop_size)
    common = dict(
        num_slides=d.num_slides,
        num_patches=d.num_patches,
        num_views=d.num_views,
        transform=transform,
        seed=t.seed,
    )
    # A private generator: creating a DataLoader iterator then never draws from the global RNG, which keeps
    # a resumed run's RNG stream identical to an uninterrupted one.
    generator = torch.Generator().manual_seed(t.seed)
    workers = loader_workers(d.num_workers, device)
    if d.streaming:
        dataset = HierarchicalStreamingDataset(train_ds, **common)
        loader = DataLoader(
            dataset,
            batch_size=t.per_device_batch_size,
            collate_fn=collate_hierarchical,
            drop_last=True,
            generator=generator,
            **workers,
        )
        return dataset, loader
    dataset = HierarchicalPatchDataset(train_ds, balance_classes=d.balance_classes, **common)
    most_slides = max(len(slides) for slides in dataset.index.slides.values())
    if d.num_slides > most_slides:
        # Slides are drawn again when a patient has fewer, but a draw larger than every patient's set repeats
        # each slide: the same images batched over and over, which no setting asks for on purpose.
        raise ConfigError(
            f"config key 'data.num_slides': {d.num_slides} slides per patient, but no training patient has more "
            f"than {most_slides}"
        )
    height, width = dataset.read_images([0])[0].shape[:2]
    if min(height, width) < d.crop_size:
        # Crops of a smaller patch are upsampled blur: what the converters' patch size and the processor's crop
        # should agree on, checked on the first row before anything trains.
        raise DatasetError(
            f"training split, row 0: patches are {height}x{width} px, smaller than data.crop_size {d.crop_size}; "
            "convert the data with a larger patch size, or lower data.crop_size"
        )
    global_batch = t.per_device_batch_size * num_processes
    if d.drop_last and len(dataset) < global_batch:
        raise ConfigError(
            f"config key 'training.per_device_batch_size': {len(dataset)} training patients cannot fill one "
            f"global batch of {global_batch} patients ({num_processes} process(es) x {t.per_device_batch_size})"
        )
    sampler = EpochPermutationSampler(len(dataset), t.seed, global_batch, drop_last=d.drop_last)
    loader = DataLoader(
        dataset,
        batch_sampler=EpochBatchSampler(sampler, t.per_device_batch_size, num_processes),
        collate_fn=collate_hierarchical,
        generator=generator,
        # Workers kept from epoch to epoch (they read the epoch from shared memory, set_epoch): restarting them
        # added ~95-140 ms to each epoch's first batch on the benchmark (benchmarks/README.md, "Training input
        # end to end"). Not for streams: the stream's own epoch (its shard shuffle) reaches workers only when
        # they restart.
        persistent_workers=workers["num_workers"] > 0,
        **workers,
    )
    return dataset, loader


def stream_batches(loader, dataset, skip: int, device) -> Iterator[dict[str, Any]]:
    """Endless batches from a streaming loader (epoch after epoch), skipping the ``skip`` already trained on.

    Each process reads its own patients, so processes may finish a pass at different times; cycling keeps every
    process stepping until ``max_steps``.
    """
    from accelerate.utils import send_to_device

    epoch = 0
    while True:
        dataset.set_epoch(epoch)
        produced = False
        for batch in loader:
            produced = True
            if skip:
                skip -= 1
                continue
            yield send_to_device(batch, device, non_blocking=True)  # asynchronous from pinned batches
        if not produced:
            raise RuntimeError(
                "the streaming training split produced no batch (fewer patients than one batch?)"
            )
        epoch += 1
