"""Patient samples from a streamed patch dataset (``load_dataset(..., streaming=True)``), docs/data.md."""

from __future__ import annotations

import zlib
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import datasets
import numpy as np
import torch
from accelerate.utils import send_to_device
from torch.utils.data import IterableDataset

from hlss_hf.data.hierarchy import Transform, _check_patch_sizes, _choose, _PatientSampler, to_float
from hlss_hf.data.schema import IMAGE, LABEL, PATIENT_ID, SLIDE_ID, decode_image, modality_of


def _patient_hash(patient: str) -> int:
    # crc32 is stable across processes and runs, unlike Python's salted hash().
    return zlib.crc32(patient.encode("utf-8"))


class HierarchicalStreamingDataset(_PatientSampler, IterableDataset):
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
        num_slides, num_patches, num_views, transform, seed: as in :class:`HierarchicalPatchDataset`.
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
        self._set_sampling(
            num_slides,
            num_patches,
            num_views,
            transform,
            seed,
            buffer_size=buffer_size,
            patches_per_patient=patches_per_patient,
        )
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
        self.buffer_size = int(buffer_size)
        self.patches_per_patient = int(patches_per_patient)
        self.rank, self.world_size = rank, world_size

    def set_epoch(self, epoch: int) -> None:
        """Use the draws of ``epoch``; forwarded to the stream (``datasets`` reshuffles shards by epoch)."""
        super().set_epoch(epoch)
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
        return {
            "pixel_values": self._pixel_values(converted, rng, patient),
            "label": label,
            "patient_id": patient,
            "slide_ids": chosen,
        }


def stream_batches(loader, dataset, skip: int, device) -> Iterator[dict[str, Any]]:
    """Endless batches from a streaming loader (epoch after epoch), skipping the ``skip`` already trained on.

    Each process reads its own patients, so processes may finish a pass at different times; cycling keeps every
    process stepping until ``max_steps``.
    """
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
