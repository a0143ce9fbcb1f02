"""Hierarchical patient -> slide -> patch sampling over a Hugging Face patch dataset (docs/data.md, "Training
loaders"; the batch layout and the sampling rules: docs/method.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import Dataset, Subset

from hlss_hf.data.augmentation import HLSSAugmentation
from hlss_hf.data.schema import IMAGE, LABEL, PATIENT_ID, SLIDE_ID, decode_image, modality_of
from hlss_hf.errors import DatasetError
from hlss_hf.models.hlss.pixels_hlss import he_to_float, srh_to_float

#: A transform takes a float image ``[C, H, W]`` and a ``torch.Generator`` (the only source of randomness it
#: may use) and returns a float image of a fixed size.
Transform = Callable[..., torch.Tensor]


def to_float(images: np.ndarray | Sequence[np.ndarray], modality: str) -> torch.Tensor:
    """Decoded patches (``(N, H, W, 2)`` uint16 SRH or ``(N, H, W, 3)`` uint8 H&E, or a list of ``(H, W, C)``)
    to float ``[N, 3, H, W]`` in [0, 1] (a list for a list) with the processor's conversion (docs/method.md)."""
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
        """Index ``dataset`` (any row order; row indices are its own positions, after a select or shuffle) from
        its ``patient_id``, ``slide_id`` and ``label`` columns; images are never read.

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
    the list is deterministic (``seed``) and no patient is over-represented by more than one copy.
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


class _PatientSampler:
    """What both hierarchical datasets share: ``S``, ``P``, ``V``, the transform, the seed and the epoch (in shared
    memory, so that persistent DataLoader workers see :meth:`set_epoch`)."""

    def _set_sampling(self, num_slides, num_patches, num_views, transform, seed, **positive: int) -> None:
        _check_positive(num_slides=num_slides, num_patches=num_patches, num_views=num_views, **positive)
        if not isinstance(seed, int | np.integer) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.num_slides, self.num_patches, self.num_views = int(num_slides), int(num_patches), int(num_views)
        self.transform = transform
        self.seed = int(seed)
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Use the draws of ``epoch`` (a non-negative integer) from now on."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self._epoch.fill_(int(epoch))

    def _pixel_values(
        self, patches: Sequence[torch.Tensor], rng: np.random.Generator, patient: str
    ) -> torch.Tensor:
        """``V`` transformed copies of each of the ``S * P`` drawn patches ``[C, H, W]`` -> ``[S, P, V, C, h, w]``,
        the transform's generator seeded by ``rng``'s next draw.

        Views are written straight into one preallocated tensor: at 300 px an extra stack or clone per patient
        costs as much as reading its patches. An :class:`~hlss_hf.data.augmentation.HLSSAugmentation` gets all
        ``S * P * V`` views in one :meth:`~hlss_hf.data.augmentation.HLSSAugmentation.batch` call, patch-major as
        the sequential calls would be (so the draws are the same).
        """
        generator = torch.Generator().manual_seed(int(rng.integers(0, 2**63 - 1)))
        transform, num_views = self.transform, self.num_views
        if (
            isinstance(transform, HLSSAugmentation)
            and len(patches)
            and len({p.shape[0] for p in patches}) == 1
        ):
            size = transform.crop_size
            out = torch.empty(
                (len(patches), num_views, patches[0].shape[0], size, size), dtype=patches[0].dtype
            )
            repeated = [patch for patch in patches for _ in range(num_views)]
            transform.batch(repeated, generator, out=out.view(-1, *out.shape[2:]))
        else:
            out = None
            for n, patch in enumerate(patches):
                for v in range(num_views):
                    view = patch if transform is None else transform(patch, generator=generator)
                    if out is None:
                        out = torch.empty((len(patches), num_views, *view.shape), dtype=view.dtype)
                    elif view.shape != out.shape[2:]:
                        what = "the transform returned views" if transform is not None else "patches have"
                        fix = (
                            "it must produce a fixed crop size"
                            if transform is not None
                            else "pass a transform that crops"
                        )
                        raise ValueError(
                            f"patient {patient!r}: {what} different shapes {tuple(out.shape[2:])} and "
                            f"{tuple(view.shape)}; {fix}"
                        )
                    out[n, v] = view
        return out.reshape(self.num_slides, self.num_patches, *out.shape[1:])


class HierarchicalPatchDataset(_PatientSampler, Dataset):
    """Map-style dataset of patients: item ``i`` is the ``i``-th patient (of the class-balanced list if asked).

    Args:
        dataset (`datasets.Dataset`): a patch dataset in the :mod:`hlss_hf.data.schema` layout.
        num_slides (`int`, defaults to 2): slides per patient ``S``.
        num_patches (`int`, defaults to 2): patches per slide ``P``.
        num_views (`int`, defaults to 2): augmented views per patch ``V``.
        transform (`callable`, *optional*): ``transform(image [C, H, W] float, generator=torch.Generator)`` ->
            fixed-size float image, e.g. :func:`hlss_hf.data.augmentation.build_augmentation`. It must draw its
            randomness from the generator only. ``None`` keeps the converted image (then all patches must have
            the same size) and repeats it ``V`` times.
        seed (`int`, defaults to 0): base seed; sample ``i`` of epoch ``e`` depends on ``(seed, e, i)`` only.
        balance_classes (`bool`, defaults to `False`): replicate the patients of smaller classes up to the size
            of the largest class (see :func:`balanced_patient_list`).
        index (`HierarchyIndex`, *optional*): a prebuilt index of ``dataset`` (built when omitted).

    Items are dicts: ``pixel_values`` float ``[S, P, V, C, H, W]``, ``label`` int, ``patient_id`` str,
    ``slide_ids`` list of ``S`` str (with repeats when the patient has fewer than ``S`` slides), ``rows``
    LongTensor ``[S, P]`` (the dataset row of each drawn patch: its caption or any other column).

    Call :meth:`set_epoch` before iterating the loader of that epoch.
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
        self._set_sampling(num_slides, num_patches, num_views, transform, seed)
        if IMAGE not in dataset.column_names:
            raise ValueError(f"dataset has no column {IMAGE!r}; it has {dataset.column_names}")
        self.index = index if index is not None else HierarchyIndex.from_dataset(dataset)
        self.modality = modality_of(dataset.features)
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

    @property
    def class_names(self) -> list[str]:
        return self.index.class_names

    def __len__(self) -> int:
        return len(self.patients)

    def sample_rows(
        self, index: int, epoch: int | None = None
    ) -> tuple[list[str], np.ndarray, np.random.Generator]:
        """The slides and patch rows drawn for item ``index`` in ``epoch`` (default: the current one):
        ``(slide_ids [S], rows [S, P], generator)``, the numpy generator positioned after the draws (its next
        output seeds the augmentations)."""
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
        patches = [images[j] for j in inverse.reshape(-1).tolist()]
        return {
            "pixel_values": self._pixel_values(patches, rng, patient),
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
        """Decode the images of dataset ``rows`` (:func:`hlss_hf.data.schema.decode_image`): ``(H, W, 2)`` uint16
        (SRH) or ``(H, W, 3)`` uint8 (H&E) arrays; array rows are read-only zero-copy views of the memory-mapped
        Arrow data. ``patient`` is named in the error when a row cannot be read."""
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
        multi-process or multi-node splits (``num_shards``: the world size, ``index``: the rank).
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
    """Stack the items of :class:`HierarchicalPatchDataset` or :class:`HierarchicalStreamingDataset` into a batch:
    ``pixel_values`` ``[B, S, P, V, C, H, W]``, ``labels`` LongTensor ``[B]``, ``patient_ids`` (list of B str),
    ``slide_ids`` (list of B lists) and, for map-style items, ``rows`` LongTensor ``[B, S, P]`` (the rows drawn).
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
