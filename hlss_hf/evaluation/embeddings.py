"""Frozen image-tower embeddings of one dataset split, map-style or streamed, cached on disk
(docs/evaluation.md#embeddings)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
import torch.nn.functional as F
import xxhash
from torch import nn
from tqdm.auto import tqdm

from hlss_hf.data import loader_workers
from hlss_hf.data.hierarchy import _FixedArrayReader
from hlss_hf.data.schema import decode_image, modality_of
from hlss_hf.files import write_file_atomically
from hlss_hf.models.hlss.pixels_hlss import he_to_float, srh_to_float
from hlss_hf.models.hlss.processing_hlss import HLSSImageProcessor

logger = logging.getLogger(__name__)

# Bumped whenever the cached file's content or the extraction changes, so stale caches are never reused.
_CACHE_VERSION = 1
#: Precisions of the embedding forward: fp32, or bf16 autocast (faster on GPUs, embeddings rounded).
PRECISIONS: tuple[str, ...] = ("fp32", "bf16")


@dataclass
class EmbeddingSet:
    """Frozen embeddings `[N, D]` (L2-normalised float32) of one dataset split with each patch's label and,
    where the dataset has them, slide and patient ids (else `None`); `class_names` in label-index order."""

    embeddings: torch.Tensor
    labels: torch.Tensor
    slide_ids: list[str] | None
    patient_ids: list[str] | None
    class_names: list[str]

    def __post_init__(self):
        self.embeddings = torch.as_tensor(self.embeddings, dtype=torch.float32)
        self.labels = torch.as_tensor(self.labels, dtype=torch.long)
        self.class_names = [str(name) for name in self.class_names]
        if self.embeddings.ndim != 2:
            raise ValueError(f"embeddings must be [N, D], got shape {tuple(self.embeddings.shape)}")
        n = self.embeddings.shape[0]
        if self.labels.shape != (n,):
            raise ValueError(f"labels must be [{n}], got shape {tuple(self.labels.shape)}")
        for name in ("slide_ids", "patient_ids"):
            ids = getattr(self, name)
            if ids is not None:
                ids = [str(i) for i in ids]
                setattr(self, name, ids)
                if len(ids) != n:
                    raise ValueError(f"{name} has {len(ids)} entries for {n} embeddings")
        if n and (self.labels.min() < 0 or self.labels.max() >= len(self.class_names)):
            bad = sorted({int(v) for v in self.labels if v < 0 or v >= len(self.class_names)})
            raise ValueError(
                f"labels {bad} are outside the {len(self.class_names)} classes {self.class_names}"
            )

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def save(self, path: str | os.PathLike) -> None:
        """Write the set to `path` (a torch file), atomically (:func:`hlss_hf.files.write_file_atomically`)."""
        payload = {"version": _CACHE_VERSION, **{f.name: getattr(self, f.name) for f in fields(self)}}
        payload["embeddings"], payload["labels"] = self.embeddings.contiguous(), self.labels.contiguous()
        write_file_atomically(path, lambda tmp: torch.save(payload, tmp))

    @classmethod
    def load(cls, path: str | os.PathLike) -> EmbeddingSet:
        """Read a set written by :meth:`save`."""
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if payload.get("version") != _CACHE_VERSION:
            raise ValueError(f"{path}: embedding file version {payload.get('version')} != {_CACHE_VERSION}")
        return cls(**{f.name: payload[f.name] for f in fields(cls)})


def check_compatible(train: EmbeddingSet, val: EmbeddingSet) -> None:
    """Refuse an empty set, different class names or embedding sizes: `val` cannot be scored against `train`."""
    if len(train) == 0 or len(val) == 0:
        raise ValueError(f"empty embedding set: train has {len(train)}, evaluation has {len(val)} embeddings")
    if train.class_names != val.class_names:
        unknown = [name for name in val.class_names if name not in train.class_names]
        detail = f"; unknown to train: {unknown}" if unknown else ""
        raise ValueError(
            f"class names differ between train {train.class_names} and evaluation {val.class_names}{detail}"
        )
    if train.embeddings.shape[1] != val.embeddings.shape[1]:
        raise ValueError(
            f"embedding sizes differ: train {train.embeddings.shape[1]}, eval {val.embeddings.shape[1]}"
        )


# model -> (what its tensors were when hashed, the fingerprint); entries go with their models.
_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def model_fingerprint(model: nn.Module) -> str:
    """Hash of a model's class, configuration and every state-dict tensor (names, dtypes, shapes and bytes).

    The bytes are hashed with xxh3-128 (several GB/s, read in place: no copy on the host), and the result is
    remembered per model until a tensor changes: every in-place update (optimizer step, `load_state_dict`, `copy_`)
    bumps a tensor's version counter and a replaced tensor has a new storage, both part of the memo's key.
    (Writes through a numpy view of a parameter bypass the counter; call `model_fingerprint.cache_clear()`.)
    A `config` with `to_dict()` is hashed too; equal digests mean equal forward passes.
    """
    state = model.state_dict()
    config = getattr(model, "config", None)
    values = None
    if config is not None and hasattr(config, "to_dict"):
        # The load path and the library version do not change the forward pass.
        values = {
            k: v for k, v in config.to_dict().items() if k not in ("_name_or_path", "transformers_version")
        }
    config_json = json.dumps(values, sort_keys=True, default=str)
    version = tuple(
        (name, t.data_ptr(), t._version, t.dtype, tuple(t.shape), t.device) for name, t in state.items()
    )
    memo = _FINGERPRINTS.get(model)
    if memo is not None and memo[0] == (config_json, version):
        return memo[1]
    digest = xxhash.xxh3_128(type(model).__qualname__.encode())
    digest.update(config_json.encode())
    for name, tensor in sorted(state.items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    fingerprint = digest.hexdigest()
    _FINGERPRINTS[model] = ((config_json, version), fingerprint)
    return fingerprint


model_fingerprint.cache_clear = _FINGERPRINTS.clear  # type: ignore[attr-defined]


def _processor_fingerprint(processor: Any) -> str:
    if processor is None:
        return "default"
    to_dict = getattr(processor, "to_dict", None)
    if callable(to_dict):
        try:
            return json.dumps(to_dict(), sort_keys=True, default=str)
        except Exception:  # noqa: BLE001 - some processors refuse to_dict; fall back to the repr below
            pass
    return repr(processor)


def _default_pixels(images, modality: str, image_size: int | None) -> torch.Tensor:
    """Convert decoded patches to `[N, 3, H, W]` floats, centre-cropped to the model's image size."""
    if isinstance(images, np.ndarray):  # a stacked batch [N, H, W, C]
        images = [images] if image_size is None or min(images.shape[1:3]) >= image_size else list(images)
    if image_size is None or all(min(np.shape(image)[-3:-1]) >= image_size for image in images):
        # Big enough to crop: the processor's batch path gives the same values as the loop below.
        crop = {"height": image_size or 1, "width": image_size or 1}
        processor = HLSSImageProcessor(
            modality=modality, do_center_crop=image_size is not None, crop_size=crop
        )
        return processor(images=images)["pixel_values"]

    convert = srh_to_float if modality == "srh" else he_to_float
    tensors = []
    for image in images:
        tensor = convert(image)
        if image_size is not None:
            height, width = tensor.shape[-2:]
            if height >= image_size and width >= image_size:
                top, left = (height - image_size) // 2, (width - image_size) // 2
                tensor = tensor[..., top : top + image_size, left : left + image_size]
            else:
                tensor = F.interpolate(
                    tensor[None], size=(image_size, image_size), mode="bilinear", align_corners=False
                )[0]
        tensors.append(tensor)
    return torch.stack(tensors)


def pooled(out: Any, name: str) -> torch.Tensor:
    """`out` itself, or its `name` (`image_embeds` / `text_embeds`) or else `pooler_output`: plain transformers
    models return a ModelOutput from `get_image_features` / `get_text_features`."""
    if isinstance(out, torch.Tensor):
        return out
    embeds = getattr(out, name, None)
    embeds = embeds if embeds is not None else getattr(out, "pooler_output", None)
    if embeds is None:
        raise TypeError(
            f"expected a tensor or an output with {name} or pooler_output, got {type(out).__name__}"
        )
    return embeds


def _image_features(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    return pooled(model.get_image_features(pixel_values=pixel_values), "image_embeds")


def _column(dataset, name: str) -> list:
    return list(dataset.select_columns([name]).with_format(None)[name])


def extract_embeddings(
    model: nn.Module,
    dataset,
    processor: Any = None,
    batch_size: int = 64,
    cache_dir: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    num_workers: int | None = None,
    precision: str = "fp32",
) -> EmbeddingSet:
    """Embed every patch of one dataset split with the frozen image tower, cached under `cache_dir` (a streamed
    split is read once, in order, never cached; docs/evaluation.md#embeddings).

    Args:
        model (`nn.Module`): anything with `get_image_features(pixel_values)` giving `[N, D]`, as a tensor or as
            the `pooler_output` of a transformers 5 output (`HLSSModel`, `CLIPModel`).
        dataset (`datasets.Dataset` or `datasets.IterableDataset`): one split with `image` and a `ClassLabel`
            `label`; `slide_id` and `patient_id` are optional (without them: patch-level metrics only, and a
            warning).
        processor (*optional*): called as `processor(images=[...], return_tensors="pt")`; `None`:
            `he_to_float` / `srh_to_float` and a centre crop to `model.config.image_size`.
        device (*optional*): the model is moved there; default: where its parameters are.
        num_workers (`int`, *optional*): DataLoader workers decoding the next batches (0: the main process);
            `None`: :func:`hlss_hf.data.default_num_workers` (0 on the CPU, where workers would compete with
            the model's threads), for a stream at most 1, since each stream worker reads the whole stream
            (:class:`_StreamRounds`).
        precision (`str`): `"fp32"` (the HLSS reference's and the training-time kNN's) or `"bf16"` (autocast).
    """
    info = _split_info(dataset)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers is not None and num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    split = info.split

    if device is not None:
        model = model.to(device)
    param = next(model.parameters(), None)
    device = torch.device(device) if device is not None else getattr(param, "device", torch.device("cpu"))

    cache_path = None
    if cache_dir is not None and info.streamed:
        warnings.warn(f"split {split!r} is streamed: its embeddings are not cached", stacklevel=2)
    elif cache_dir is not None:
        dataset_fp = getattr(dataset, "_fingerprint", None)
        if dataset_fp is None:
            warnings.warn("dataset has no _fingerprint: embeddings are not cached", stacklevel=2)
        else:
            inputs = [model_fingerprint(model), dataset_fp, split, _processor_fingerprint(processor)]
            key = hashlib.sha256(json.dumps([_CACHE_VERSION, *inputs, device.type, precision]).encode())
            cache_path = Path(cache_dir) / f"embeddings-{split}-{key.hexdigest()[:24]}.pt"
            if cache_path.exists():
                logger.info("Loading cached embeddings from %s", cache_path)
                try:
                    return EmbeddingSet.load(cache_path)
                except Exception as err:  # noqa: BLE001 - any unreadable cache is only a lost shortcut
                    # Truncated (a full disk, a kill before the atomic save existed), or not ours: embed again,
                    # and the save below replaces it.
                    warnings.warn(
                        f"{cache_path}: unreadable cached embeddings ({type(err).__name__}); embedding again",
                        stacklevel=2,
                    )

    image_size = getattr(getattr(model, "config", None), "image_size", None)
    was_training = model.training
    model.eval()
    bf16 = precision == "bf16"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    try:
        with torch.inference_mode(), autocast:
            local, rows = _embed_rounds(
                lambda pixel_values: _image_features(model, pixel_values),
                dataset,
                info,
                processor,
                image_size,
                batch_size,
                num_workers,
                device,
                progress,
                store=torch.device("cpu"),
            )
    finally:
        model.train(was_training)
    result = _embedding_set(dataset, info, rows, local.reshape(-1, local.shape[-1]))
    if cache_path is not None:
        result.save(cache_path)
    return result


@dataclass
class _SplitInfo:
    """What embedding a split needs to know of it, checked once (see :func:`_split_info`)."""

    split: str
    streamed: bool
    modality: str
    image_feature: Any
    class_names: list[str]
    columns: list[str]  # label, then slide_id / patient_id where present


def _embedding_label(split: str) -> str:
    """The progress bar's label: the split's name where the dataset knows it (an in-memory one does not)."""
    return "embedding" if split == "unknown" else f"embedding {split}"


def _split_info(dataset) -> _SplitInfo:
    """Check a split (map-style or streamed) for embedding and describe it; a missing hierarchy warns."""
    if isinstance(dataset, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        raise ValueError(f"pass one split of the DatasetDict (one of {list(dataset)}), not the whole dict")
    streamed = isinstance(dataset, datasets.IterableDataset)
    split = str(dataset.split) if getattr(dataset, "split", None) is not None else "unknown"
    features = dataset.features
    if features is None:  # a stream of JSON / CSV rows whose types are only known once read
        raise ValueError(
            f"streamed split {split!r} has no declared features: the image and ClassLabel label columns must be "
            "typed (stream a dataset written by dataset_scripts/, or pass features= to load_dataset)"
        )
    for column in ("image", "label"):
        if column not in features:
            raise ValueError(f"dataset split {split!r} has no {column!r} column; it has {list(features)}")
    if not isinstance(features["label"], datasets.ClassLabel):
        raise ValueError(f"column 'label' of split {split!r} must be a ClassLabel, got {features['label']!r}")
    if not streamed and len(dataset) == 0:
        raise ValueError(f"dataset split {split!r} is empty: nothing to embed")
    missing = [name for name in ("slide_id", "patient_id") if name not in features]
    if missing:
        warnings.warn(
            f"dataset split {split!r} has no {missing} column(s): only patch-level metrics will be computed",
            stacklevel=3,
        )
    return _SplitInfo(
        split=split,
        streamed=streamed,
        modality=modality_of(features),
        image_feature=features["image"],
        class_names=list(features["label"].names),
        columns=["label"] + [name for name in ("slide_id", "patient_id") if name in features],
    )


def _embed_rounds(
    embed: Callable[[torch.Tensor], torch.Tensor],
    dataset,
    info: _SplitInfo,
    processor: Any,
    image_size: int | None,
    batch_size: int,
    num_workers: int | None,
    device: torch.device,
    progress: bool,
    *,
    world: int = 1,
    rank: int = 0,
    store: torch.device | None = None,
) -> tuple[torch.Tensor, dict[str, list]]:
    """This process's share of `dataset` embedded by `embed(pixel_values)`, in rounds of `B * world` rows
    (`B = batch_size`): process `rank` embeds rows `[rank * B, (rank + 1) * B)` of each round, or one padding
    row where the last round does not reach it (FSDP hangs unless forward counts match; docs/evaluation.md).

    Returns the L2-normalised embeddings `[rounds, B, D]` on `store` (default: the device), each round's rows
    padded to `B` with zeros (gathered from all processes, they read as the dataset's rows, then padding), and
    a stream's labels and ids (column -> values, in stream order).
    """
    size = batch_size
    rows: dict[str, list] = {name: [] for name in info.columns}
    if info.streamed:
        source = _StreamRounds(dataset, info, size, world, rank, processor, image_size)
    else:
        total = len(dataset)
        own, counts = [], []
        for j in range(math.ceil(total / (size * world))):
            start = j * size * world + rank * size
            stop = min(start + size, total)
            counts.append(max(0, stop - start))
            # Only the last round can leave a process without rows: one padding row keeps the forward count equal.
            own.extend(range(start, stop) if stop > start else [total - 1])
        subset = dataset.select(own) if own != list(range(total)) else dataset
        source = _ImageBatches(_image_column(subset), size, processor, info.modality, image_size)
    chunks = []
    total = None if info.streamed else len(dataset)
    with tqdm(total=total, desc=_embedding_label(info.split), unit="img", disable=not progress) as bar:
        for j, item in enumerate(_batch_loader(source, num_workers, device, info.streamed)):
            if info.streamed:
                pixel_values, n, round_rows = item
                for name, values in round_rows.items():
                    rows[name].extend(values)
            else:
                pixel_values, n = item, counts[j]
            embeds = F.normalize(embed(pixel_values.to(device, non_blocking=True)).float(), dim=-1)
            chunks.append(F.pad(embeds[:n], (0, 0, 0, size - n)).to(store or embeds.device))
            bar.update((len(rows["label"]) if info.streamed else min(total, (j + 1) * size * world)) - bar.n)
    if not chunks:  # an empty stream; every process read the same stream, so every process stops here
        raise ValueError(f"dataset split {info.split!r} is empty: nothing to embed")
    return torch.stack(chunks), rows


def _embedding_set(
    dataset, info: _SplitInfo, rows: dict[str, list], embeddings: torch.Tensor
) -> EmbeddingSet:
    """The set of `embeddings` (rows in dataset order, padding after them) with the split's labels and ids (`rows`
    for a stream). The rows are copied: the set keeps no padding and is no inference-mode tensor (a linear probe
    trains on it)."""
    columns = rows if info.streamed else {name: _column(dataset, name) for name in info.columns}
    return EmbeddingSet(
        embeddings=embeddings[: len(columns["label"])].clone(),
        labels=torch.tensor(columns["label"], dtype=torch.long),
        slide_ids=columns.get("slide_id"),
        patient_ids=columns.get("patient_id"),
        class_names=info.class_names,
    )


def _image_column(dataset):
    """The `image` column as the batches read it: encoded bytes for `datasets.Image` (decoded by
    :func:`_decode_images`); array features (`Array3D`) as they are, read by :class:`_ImageBatches` through
    :class:`hlss_hf.data._FixedArrayReader`."""
    images = dataset.select_columns(["image"])
    if isinstance(images.features["image"], datasets.Image):
        return images.cast_column("image", datasets.Image(decode=False)).with_format(None)
    return images


def _decode_images(values) -> np.ndarray | list[np.ndarray]:
    """Decode one slice of the `image` column: a stacked array stays whole; encoded images go through
    :func:`hlss_hf.data.schema.decode_image` (imagecodecs for 8-bit RGB PNG and JPEG, PIL for the rest)."""
    if isinstance(values, np.ndarray) and values.ndim == 4:
        return values
    return [decode_image(value) for value in values]


class _ImageBatches(torch.utils.data.Dataset):
    """Batch `i` of a split's `image` column, decoded and converted (what DataLoader workers compute): by
    `processor(images=...)`, or without one by `he_to_float` / `srh_to_float` and a centre crop to `image_size`."""

    def __init__(self, images, batch_size: int, processor: Any, modality: str, image_size: int | None):
        self.images, self.batch_size = images, batch_size
        self.processor, self.modality, self.image_size = processor, modality, image_size
        # Array columns (SRH, raw H&E) are read as views of the memory-mapped Arrow data, built lazily in each
        # worker: datasets' numpy formatting copies every batch (~0.12 ms per 300 px SRH patch).
        self._arrays = not isinstance(images.features["image"], datasets.Image)
        self._reader = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_reader": None}  # views of mapped buffers: never pickled

    def __len__(self) -> int:
        return math.ceil(len(self.images) / self.batch_size)

    def __getitem__(self, i: int) -> torch.Tensor:
        start, stop = i * self.batch_size, min((i + 1) * self.batch_size, len(self.images))
        if self._arrays:
            if self._reader is None:
                self._reader = _FixedArrayReader(self.images)
            batch = self._reader.slice(start, stop)
        else:
            batch = self.images[start:stop]["image"]
        return _pixels(batch, self.processor, self.modality, self.image_size)


def _batch_loader(source, num_workers: int | None, device: torch.device, streamed: bool):
    """A DataLoader over ``source``, whose items are whole batches (a slice of the Arrow table or a round of the
    stream), with :func:`hlss_hf.data.loader_workers`' worker count and pinning; a stream gets at most one
    worker unless told otherwise, because every worker reads the whole stream (:class:`_StreamRounds`)."""
    workers = loader_workers(num_workers, device)
    if num_workers is None and streamed:
        workers["num_workers"] = min(workers["num_workers"], 1)
    return torch.utils.data.DataLoader(source, batch_size=None, **workers)


def _pixels(values, processor: Any, modality: str, image_size: int | None) -> torch.Tensor:
    """`[n, 3, H, W]` model input from one slice of the `image` column (bytes or a stacked array)."""
    decoded = _decode_images(values)
    if processor is not None:
        return processor(images=decoded, return_tensors="pt")["pixel_values"]
    return _default_pixels(decoded, modality, image_size)


class _StreamRounds(torch.utils.data.IterableDataset):
    """One process's share of a streamed split, in the rounds of :func:`_embed_rounds`. Each item is
    `(pixel_values, n, rows)`: the process's slice of the round, its number of rows `n` (0 where a short last
    round does not reach it: the pixels are then the round's first row, the padding forward), and the round's
    `label` / `slide_id` / `patient_id` for all of its rows (every process reads the whole stream, so every
    process knows every row's ids and the stream's length without a collective).

    In DataLoader worker `w` of `n` the whole stream is read and rounds `w, w + n, ...` are decoded, so the
    DataLoader, which takes items from its workers in turn, returns the rounds in stream order. (A
    `datasets.IterableDataset` iterated by a worker would shard itself by files instead: `iter()` does not.)
    """

    def __init__(
        self, stream, info: _SplitInfo, batch_size: int, world: int, rank: int, processor, image_size
    ):
        stream = stream.select_columns(["image", *info.columns])
        if isinstance(info.image_feature, datasets.Image):
            # Encoded bytes, decoded by _decode_images in the batch (imagecodecs), as for a map-style split.
            stream = stream.cast_column("image", datasets.Image(decode=False))
        self.stream = stream.with_format(None)
        self.info, self.batch_size, self.world, self.rank = info, batch_size, world, rank
        self.processor, self.image_size = processor, image_size
        dtype = getattr(info.image_feature, "dtype", None)
        # Array columns arrive as nested lists: stacked in the column's own dtype, as the map-style path reads them.
        self.array_dtype = (
            None if isinstance(info.image_feature, datasets.Image) else np.dtype(dtype or "float32")
        )

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        index, count = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        size = self.batch_size
        for j, rows in enumerate(self.stream.iter(batch_size=size * self.world)):
            if j % count != index:
                continue
            images = rows["image"][self.rank * size : (self.rank + 1) * size]
            n = len(images)
            if n == 0:
                images = rows["image"][:1]
            if self.array_dtype is not None:
                images = np.asarray(images, dtype=self.array_dtype)
            pixels = _pixels(images, self.processor, self.info.modality, self.image_size)
            ids = {name: list(values) for name, values in rows.items() if name != "image"}
            yield pixels, n, ids
