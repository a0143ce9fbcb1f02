"""Reading a split and building the pretraining loader: what train.py, finetune.py and `python -m hlss_hf.evaluate`
share (docs/data.md)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from accelerate.data_loader import BatchSamplerShard
from torch.utils.data import BatchSampler, DataLoader, Dataset, IterableDataset, Sampler

from hlss_hf.data.augmentation import build_augmentation
from hlss_hf.data.hierarchy import HierarchicalPatchDataset, collate_hierarchical
from hlss_hf.data.schema import PATIENT_ID, SLIDE_ID
from hlss_hf.data.streaming import HierarchicalStreamingDataset
from hlss_hf.errors import ConfigError, DatasetError
from hlss_hf.sources import check_local_source, hub_source_error


def _by(key: str | None) -> str:
    return f" ({key})" if key else ""


def _loading_error(source: str, error: BaseException, key: str | None) -> Exception | None:
    """The one-line error for a failed ``load_dataset`` / ``get_dataset_split_names``, or ``None`` (re-raise)."""
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
    """The split names of a dataset, read as :func:`load_split` reads it (same arguments; no split is loaded)."""
    if isinstance(source, datasets.DatasetDict | datasets.IterableDatasetDict):
        return list(source)
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
        config_name (`str`, *optional*): ``load_dataset``'s ``name``.
        streaming (`bool`, defaults to `False`): return an ``IterableDataset``.
        max_samples (`int`, *optional*): keep the first ``max_samples`` rows.
        required_columns (`Sequence[str]`, defaults to the patient and slide ids): columns the split must have.
        key (`str`, *optional*): the setting that named the dataset (e.g. ``"data.dataset"``, ``"--dataset"``).
        split_key (`str`, *optional*): the setting that named the split (e.g. ``"data.train_split"``).
        name (`str`, *optional*): what errors call the dataset (default: ``source``; "in-memory" for splits).
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


class EpochPermutationSampler(Sampler[int]):
    """A permutation of the dataset's indices drawn from ``(seed, epoch)`` only.

    The permutation is cut to a multiple of ``multiple`` (the global micro-batch: per-device batch x processes),
    so every process gets the same number of full batches and a run on W processes sees exactly the batches of
    a single-process run with W times the per-device batch. ``drop_last=False`` keeps every index.
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
    epoch's iterator is used up. The ``sampler``'s ``set_epoch`` sets the first epoch.
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
    ``non_blocking``, set by :func:`hlss_hf.training.optim.make_accelerator`)."""
    return {
        "num_workers": default_num_workers(device) if num_workers is None else num_workers,
        "pin_memory": torch.device(device).type == "cuda",
    }


def build_train_loader(
    config, train_ds, num_processes: int, device: str | torch.device = "cpu"
) -> tuple[Dataset | IterableDataset, DataLoader]:
    """The hierarchical dataset and DataLoader of one pretraining process (before ``accelerator.prepare``):
    a :class:`HierarchicalPatchDataset` with an :class:`EpochBatchSampler`, or, when ``data.streaming``, a
    :class:`HierarchicalStreamingDataset`. ``device`` sets the workers (:func:`loader_workers`)."""
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
