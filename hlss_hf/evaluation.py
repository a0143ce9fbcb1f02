"""Frozen-embedding evaluation as in the HLSS paper (docs/method.md, kNN evaluation): kNN, linear probe and
zero-shot.

Every patch of a split is embedded once with the frozen image tower (:func:`extract_embeddings`, cached on disk).
Patch class scores come from a weighted kNN vote (:func:`knn_predict`), a logistic-regression probe
(:func:`train_linear_probe`) or the text tower (:func:`zero_shot_scores`). Patch scores become slide and patient
scores by one of two rules (:func:`aggregate_scores`, `aggregation=`): `"reference"`, the HLSS reference's kNN rule
(each patch's scores L1-normalised then softmaxed over the classes, averaged per group; the patch level is scored on
the same per-patch probabilities), or `"sum"`, raw patch scores summed. Accuracy, top-2, top-3, mean class accuracy
(macro recall) and mean average precision (macro one-vs-rest AP) are reported at each level
(:func:`hierarchical_metrics`).

A streamed split (`datasets.IterableDataset`) is embedded like a map-style one, uncached. During distributed training
(DDP, FSDP, DeepSpeed) :func:`distributed_knn_evaluate` runs the kNN evaluation on every process through the prepared
model: each process embeds its share of the rows, the embeddings are gathered in dataset order.

Example:

```python
from datasets import load_dataset
from transformers import AutoModel
import hlss_hf
from hlss_hf.evaluation import extract_embeddings, knn_evaluate

model = AutoModel.from_pretrained("out/hlss")
data = load_dataset("out/opensrh")
train = extract_embeddings(model, data["train"], cache_dir="out/cache")
val = extract_embeddings(model, data["validation"], cache_dir="out/cache")
metrics = knn_evaluate(train, val, k=200, temperature=0.07, aggregation="reference")  # {"patch/acc": ...}
```

The same metrics as an `evaluate` module (offline, from the package folder): `evaluate.load(METRIC_PATH)`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from hlss_hf.data.hierarchy import _FixedArrayReader
from hlss_hf.data.loading import loader_workers
from hlss_hf.files import write_file_atomically

logger = logging.getLogger(__name__)

LEVELS: tuple[str, ...] = ("patch", "slide", "patient")
METRIC_NAMES: tuple[str, ...] = ("acc", "top2", "top3", "mca", "map")
#: Rules that turn patch scores into slide / patient scores (see :func:`aggregate_scores`).
AGGREGATIONS: tuple[str, ...] = ("reference", "sum")
# Bumped whenever the cached file's content or the extraction changes, so stale caches are never reused.
_CACHE_VERSION = 1
#: Precisions of the embedding forward: fp32, or bf16 autocast (faster on GPUs, embeddings rounded).
PRECISIONS: tuple[str, ...] = ("fp32", "bf16")
#: Folder of the `evaluate` metric module (patch / slide / patient metrics): `evaluate.load(METRIC_PATH)`.
METRIC_PATH = str(Path(__file__).resolve().parent / "metrics" / "hierarchical_accuracy")
# Elements of one similarity block in knn_predict (float32: 128 MiB); bounds memory whatever the bank size.
DEFAULT_MAX_BLOCK_ELEMENTS = 2**25


# --------------------------------------------------------------------------------------------------------------
# Embedding sets
# --------------------------------------------------------------------------------------------------------------


@dataclass
class EmbeddingSet:
    """Frozen embeddings of one dataset split, with the labels and the hierarchy of every patch.

    Args:
        embeddings (`torch.FloatTensor` of shape `[N, D]`): L2-normalised float32 embeddings.
        labels (`torch.LongTensor` of shape `[N]`): class index of each patch.
        slide_ids (`list[str]`, *optional*): slide of each patch; `None` when the dataset has no slide column.
        patient_ids (`list[str]`, *optional*): patient of each patch; `None` when the dataset has none.
        class_names (`list[str]`): class names in label-index order.
    """

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
        payload = {
            "version": _CACHE_VERSION,
            "embeddings": self.embeddings.contiguous(),
            "labels": self.labels.contiguous(),
            "slide_ids": self.slide_ids,
            "patient_ids": self.patient_ids,
            "class_names": self.class_names,
        }
        write_file_atomically(path, lambda tmp: torch.save(payload, tmp))

    @classmethod
    def load(cls, path: str | os.PathLike) -> EmbeddingSet:
        """Read a set written by :meth:`save`."""
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if payload.get("version") != _CACHE_VERSION:
            raise ValueError(f"{path}: embedding file version {payload.get('version')} != {_CACHE_VERSION}")
        return cls(
            embeddings=payload["embeddings"],
            labels=payload["labels"],
            slide_ids=payload["slide_ids"],
            patient_ids=payload["patient_ids"],
            class_names=payload["class_names"],
        )


# model -> (what its tensors were when hashed, the fingerprint); entries go with their models.
_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def model_fingerprint(model: nn.Module) -> str:
    """Hash of a model's class, configuration and every state-dict tensor (names, dtypes, shapes and bytes).

    The bytes are hashed with xxh3-128 (several GB/s, read in place: no copy on the host), and the result is
    remembered per model until a tensor changes: every in-place update (optimizer step, `load_state_dict`, `copy_`)
    bumps a tensor's version counter and a replaced tensor has a new storage, both part of the memo's key.
    (Writes through a numpy view of a parameter bypass the counter; call `model_fingerprint.cache_clear()`.)

    Args:
        model (`torch.nn.Module`): the model; a `config` attribute with `to_dict()` is included when present.

    Returns:
        `str`: a hex digest; equal for models whose forward passes are equal.
    """
    import xxhash  # a dependency of datasets

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
    try:
        memo = _FINGERPRINTS.get(model)
    except TypeError:  # not weak-referenceable
        memo = None
    if memo is not None and memo[0] == (config_json, version):
        return memo[1]
    digest = xxhash.xxh3_128(type(model).__qualname__.encode())
    digest.update(config_json.encode())
    for name, tensor in sorted(state.items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    fingerprint = digest.hexdigest()
    try:
        _FINGERPRINTS[model] = ((config_json, version), fingerprint)
    except TypeError:
        pass
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
    from hlss_hf.models.hlss.pixels_hlss import he_to_float, srh_to_float
    from hlss_hf.models.hlss.processing_hlss import HLSSImageProcessor

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


def _image_features(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    out = model.get_image_features(pixel_values=pixel_values)
    if not isinstance(out, torch.Tensor):
        # Plain transformers towers may return a ModelOutput; take the pooled embedding.
        embeds = getattr(out, "image_embeds", None)
        out = embeds if embeds is not None else getattr(out, "pooler_output", None)
        if out is None:
            raise TypeError("get_image_features returned neither a tensor nor an output with image_embeds")
    return out


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
    """Embed every patch of one dataset split with the frozen image tower.

    Images are decoded a batch at a time (encoded ones by :func:`hlss_hf.schema.decode_image`; array columns as
    one stacked array) and converted by `processor` (called as `processor(images=[...], return_tensors="pt")`),
    or, without one, by `he_to_float` / `srh_to_float` and a centre crop to `model.config.image_size`. The
    forward runs in fp32 unless `precision` asks for bf16 autocast. With `cache_dir`, the result is stored under
    a key made of the model's fingerprint (:func:`model_fingerprint`), the dataset's `_fingerprint` and split,
    the processor's settings and the precision, so a rerun loads it without a forward pass.

    A streamed split (`datasets.IterableDataset`, e.g. `load_dataset(..., streaming=True)`) is read once, in
    order, and gives the same result as the map-style split of the same rows. It is never cached: a stream has no
    fingerprint, and reading it is the very cost a cache would save (a warning says so when `cache_dir` is set).

    Args:
        model (`nn.Module`): anything with `get_image_features(pixel_values)` giving `[N, D]`, as a tensor or as
            the `pooler_output` of a transformers 5 output (`HLSSModel`, `CLIPModel`).
        dataset (`datasets.Dataset` or `datasets.IterableDataset`): one split with `image` and a `ClassLabel`
            `label`; `slide_id` and `patient_id` are optional (without them only patch-level metrics can be
            computed; a warning says so).
        processor (*optional*): an image processor such as `HLSSImageProcessor`; `None` for the default above.
        batch_size (`int`, defaults to 64): images per forward pass.
        cache_dir (`str`, *optional*): folder for cached embeddings; `None` disables caching.
        device (`str` or `torch.device`, *optional*): where to run; the model is moved there. Defaults to the
            device of the model's parameters.
        progress (`bool`, defaults to `True`): show a tqdm progress bar (without a total for a stream).
        num_workers (`int`, *optional*): DataLoader worker processes that decode and preprocess the next
            batches while the model runs (0: in the main process). `None` (default):
            :func:`hlss_hf.data.default_num_workers`, 0 on the CPU (workers would compete with the model's
            threads) and the machine's cores on an accelerator; for a stream at most 1, since each stream
            worker reads the whole stream (see :class:`_StreamRounds`).
        precision (`str`, defaults to `"fp32"`): `"fp32"` (as the HLSS reference evaluates and the training-time
            kNN runs) or `"bf16"` (autocast on the model's device: faster on GPUs, embeddings rounded to bf16).

    Returns:
        :class:`EmbeddingSet` with float32 L2-normalised embeddings.

    Raises:
        ValueError: for an empty split, a missing `image` / `label` column or a `label` that is not a ClassLabel.
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
    device = (
        torch.device(device)
        if device is not None
        else (param.device if param is not None else torch.device("cpu"))
    )

    cache_path = None
    if cache_dir is not None and info.streamed:
        warnings.warn(f"split {split!r} is streamed: its embeddings are not cached", stacklevel=2)
    elif cache_dir is not None:
        dataset_fp = getattr(dataset, "_fingerprint", None)
        if dataset_fp is None:
            warnings.warn("dataset has no _fingerprint: embeddings are not cached", stacklevel=2)
        else:
            key = hashlib.sha256(
                json.dumps(
                    [
                        _CACHE_VERSION,
                        model_fingerprint(model),
                        dataset_fp,
                        split,
                        _processor_fingerprint(processor),
                        device.type,
                        precision,
                    ],
                ).encode()
            ).hexdigest()[:24]
            cache_path = Path(cache_dir) / f"embeddings-{split}-{key}.pt"
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
    if info.streamed:
        source = _StreamRounds(dataset, info, batch_size, 1, 0, processor, image_size)
    else:
        source = _ImageBatches(_image_column(dataset), batch_size, processor, info.modality, image_size)
    batches = _batch_loader(source, num_workers, device, info.streamed)
    chunks = []
    rows = _RowIds(info)
    was_training = model.training
    model.eval()
    bf16 = precision == "bf16"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    total = None if info.streamed else len(dataset)
    try:
        with (
            torch.inference_mode(),
            autocast,
            tqdm(total=total, desc=_embedding_label(split), unit="img", disable=not progress) as bar,
        ):
            for item in batches:
                pixel_values = item
                if info.streamed:
                    pixel_values, _, round_rows = item
                    rows.extend(round_rows)
                embeds = _image_features(model, pixel_values.to(device, non_blocking=True))
                chunks.append(F.normalize(embeds.float(), dim=-1).cpu())
                bar.update(len(pixel_values))
    finally:
        model.train(was_training)

    if info.streamed and not chunks:
        raise ValueError(f"dataset split {split!r} is empty: nothing to embed")
    result = rows.embedding_set(torch.cat(chunks)) if info.streamed else _map_style_set(dataset, info, chunks)
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
    hierarchy: dict[str, bool]  # slide_id / patient_id present


def _embedding_label(split: str) -> str:
    """The progress bar's label: the split's name where the dataset knows it (an in-memory one does not)."""
    return "embedding" if split == "unknown" else f"embedding {split}"


def _split_info(dataset) -> _SplitInfo:
    """Check a split (map-style or streamed) for embedding and describe it; a missing hierarchy warns."""
    import datasets

    from hlss_hf.data.schema import modality_of

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
    hierarchy = {name: name in features for name in ("slide_id", "patient_id")}
    if not all(hierarchy.values()):
        missing = [name for name, present in hierarchy.items() if not present]
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
        hierarchy=hierarchy,
    )


def _map_style_set(dataset, info: _SplitInfo, chunks: list[torch.Tensor]) -> EmbeddingSet:
    return EmbeddingSet(
        embeddings=torch.cat(chunks),
        labels=torch.tensor(_column(dataset, "label"), dtype=torch.long),
        slide_ids=_column(dataset, "slide_id") if info.hierarchy["slide_id"] else None,
        patient_ids=_column(dataset, "patient_id") if info.hierarchy["patient_id"] else None,
        class_names=info.class_names,
    )


class _RowIds:
    """Labels and ids of a stream's rows, collected round by round as the stream is read."""

    def __init__(self, info: _SplitInfo):
        self.info = info
        self.columns: dict[str, list] = {"label": []}
        self.columns.update({name: [] for name, present in info.hierarchy.items() if present})

    def extend(self, rows: Mapping[str, list]) -> None:
        for name, values in self.columns.items():
            values.extend(rows[name])

    def __len__(self) -> int:
        return len(self.columns["label"])

    def embedding_set(self, embeddings: torch.Tensor) -> EmbeddingSet:
        return EmbeddingSet(
            embeddings=embeddings,
            labels=torch.tensor(self.columns["label"], dtype=torch.long),
            slide_ids=self.columns.get("slide_id"),
            patient_ids=self.columns.get("patient_id"),
            class_names=self.info.class_names,
        )


def _image_column(dataset):
    """The `image` column as the batches read it: encoded bytes for `datasets.Image` (decoded by
    :func:`_decode_images`); array features (`Array3D`) as they are, read by :class:`_ImageBatches` through
    :class:`hlss_hf.data._FixedArrayReader`."""
    import datasets

    images = dataset.select_columns(["image"])
    if isinstance(images.features["image"], datasets.Image):
        return images.cast_column("image", datasets.Image(decode=False)).with_format(None)
    return images


def _decode_images(values) -> np.ndarray | list[np.ndarray]:
    """Decode one slice of the `image` column: a stacked array stays whole; encoded images go through
    :func:`hlss_hf.schema.decode_image` (imagecodecs for 8-bit RGB PNG and JPEG, PIL for the rest)."""
    from hlss_hf.data.schema import decode_image

    if isinstance(values, np.ndarray) and values.ndim == 4:
        return values
    return [decode_image(value) for value in values]


class _ImageBatches(torch.utils.data.Dataset):
    """Batch `i` of a split's `image` column, decoded and converted (what DataLoader workers compute): by
    `processor(images=...)`, or without one by `he_to_float` / `srh_to_float` and a centre crop to `image_size`."""

    def __init__(self, images, batch_size: int, processor: Any, modality: str, image_size: int | None):
        import datasets

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
    """One process's share of a streamed split, read in rounds of `batch_size * world` rows.

    Round `j` holds rows `[j * B * W, (j + 1) * B * W)` of the stream; process `rank` embeds its slice
    `[rank * B, (rank + 1) * B)` of the round. Each item is `(pixel_values, n, rows)`: the slice's pixels, its
    number of rows `n` (0 in a last round too short to reach this process: the pixels are then the round's first
    row, a padding forward that keeps every process's number of forward calls equal, as FSDP needs), and the
    round's `label` / `slide_id` / `patient_id` for all of its rows (every process reads the whole stream, so
    every process knows every row's ids and the stream's length without a collective).

    In DataLoader worker `w` of `n` the whole stream is read and rounds `w, w + n, ...` are decoded, so the
    DataLoader, which takes items from its workers in turn, returns the rounds in stream order. (A
    `datasets.IterableDataset` iterated by a worker would shard itself by files instead: `iter()` does not.)
    """

    def __init__(
        self, stream, info: _SplitInfo, batch_size: int, world: int, rank: int, processor, image_size
    ):
        import datasets

        columns = ["image", "label"] + [name for name, present in info.hierarchy.items() if present]
        stream = stream.select_columns(columns)
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


# --------------------------------------------------------------------------------------------------------------
# kNN
# --------------------------------------------------------------------------------------------------------------


def knn_predict(
    query: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.07,
    chunk_size: int = 1024,
    max_block_elements: int = DEFAULT_MAX_BLOCK_ELEMENTS,
) -> torch.Tensor:
    """Weighted kNN class scores: each of the `k` most similar bank entries votes `exp(sim / temperature)`.

    Similarity is the dot product, i.e. cosine on L2-normalised embeddings. Queries are processed `chunk_size`
    at a time and, when `chunk_size * len(bank)` exceeds `max_block_elements`, the bank is scanned in blocks
    with a running top-k merge, so the extra memory is bounded by about `2 * max_block_elements` floats
    (128 MiB per block by default) whatever the sizes.

    Args:
        query (`torch.FloatTensor` of shape `[Q, D]`): normalised query embeddings.
        bank (`torch.FloatTensor` of shape `[M, D]`): normalised reference embeddings.
        bank_labels (`torch.LongTensor` of shape `[M]`): class of each bank entry, in `[0, num_classes)`.
        num_classes (`int`): number of classes `C`.
        k (`int`, defaults to 200): neighbours per query; must be in `[1, M]` (no silent clamping here).
        temperature (`float`, defaults to 0.07): vote temperature.
        chunk_size (`int`, defaults to 1024): queries per block.
        max_block_elements (`int`, defaults to `2**25`): largest similarity block `[queries, bank entries]`.

    Returns:
        `torch.FloatTensor` of shape `[Q, C]`: summed votes per class.

    Raises:
        ValueError: for `k` outside `[1, M]`, mismatched dimensions, labels outside the classes, or a
            non-positive temperature / chunk size.
    """
    if query.ndim != 2 or bank.ndim != 2 or query.shape[1] != bank.shape[1]:
        raise ValueError(
            f"query [Q, D] and bank [M, D] must share D; got {tuple(query.shape)}, {tuple(bank.shape)}"
        )
    num_bank = bank.shape[0]
    if bank_labels.shape != (num_bank,):
        raise ValueError(f"bank_labels must be [{num_bank}], got {tuple(bank_labels.shape)}")
    if not 1 <= k <= num_bank:
        raise ValueError(f"k={k} must be between 1 and the bank size ({num_bank} embeddings)")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1 or max_block_elements < 1:
        raise ValueError(
            f"chunk_size and max_block_elements must be >= 1, got {chunk_size}, {max_block_elements}"
        )
    bank_labels = bank_labels.to(device=bank.device, dtype=torch.long)
    if num_bank and (bank_labels.min() < 0 or bank_labels.max() >= num_classes):
        raise ValueError(
            f"bank_labels must lie in [0, {num_classes}), got [{bank_labels.min()}, {bank_labels.max()}]"
        )
    query = query.to(device=bank.device, dtype=bank.dtype)

    query_chunk = min(chunk_size, max(1, query.shape[0]))
    # Bank block: as large as the element budget allows, but never smaller than k (the merge keeps k per query).
    bank_chunk = max(k, max_block_elements // query_chunk)
    scores = torch.zeros(query.shape[0], num_classes, dtype=torch.float32, device=bank.device)
    for q_start in range(0, query.shape[0], query_chunk):
        q = query[q_start : q_start + query_chunk]
        top_sim = top_idx = None
        for b_start in range(0, num_bank, bank_chunk):
            sim = q @ bank[b_start : b_start + bank_chunk].T  # [q, b]
            block_sim, block_idx = sim.topk(min(k, sim.shape[1]), dim=1)
            block_idx += b_start
            del sim
            if top_sim is None:
                top_sim, top_idx = block_sim, block_idx
            else:
                # Running merge: keep the k best of the previous best and this block's best.
                merged_sim = torch.cat([top_sim, block_sim], dim=1)
                merged_idx = torch.cat([top_idx, block_idx], dim=1)
                top_sim, order = merged_sim.topk(min(k, merged_sim.shape[1]), dim=1)
                top_idx = merged_idx.gather(1, order)
        weights = (top_sim.float() / temperature).exp()  # [q, k]
        scores[q_start : q_start + q.shape[0]].scatter_add_(1, bank_labels[top_idx], weights)
    return scores


# --------------------------------------------------------------------------------------------------------------
# Aggregation and metrics
# --------------------------------------------------------------------------------------------------------------


def _check_aggregation(aggregation: str) -> None:
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")


def reference_patch_scores(scores: torch.Tensor) -> torch.Tensor:
    """Per-patch class probabilities as the HLSS reference computes them from kNN votes.

    Each row is L1-normalised (``s / sum_c |s_c|``) and then softmaxed over the classes at temperature 1. The
    L1-normalised values lie in ``[0, 1]``, so the softmax is soft: a patch's probabilities differ by at most a
    factor ``e`` and every patch weighs the same in a group, however confident its neighbours are (raw kNN votes
    ``exp(sim / 0.07)`` differ by orders of magnitude between patches).

    Args:
        scores (`torch.FloatTensor` of shape `[N, C]`): non-negative patch scores (e.g. :func:`knn_predict`).

    Returns:
        `torch.FloatTensor` of shape `[N, C]`: rows summing to 1.
    """
    scores = torch.as_tensor(scores).float()
    if scores.ndim != 2:
        raise ValueError(f"scores must be [N, C], got shape {tuple(scores.shape)}")
    return F.normalize(scores, p=1, dim=1).softmax(dim=1)


def aggregate_scores(
    scores: torch.Tensor,
    group_ids: Sequence[str],
    labels: torch.Tensor | Sequence[int] | None = None,
    return_groups: bool = False,
    aggregation: str = "sum",
):
    """Combine patch scores per group (slide or patient).

    `"sum"` adds the raw patch scores. `"reference"` is the HLSS reference evaluation
    (``hlss/eval_knn_hlss_accplot.py``): :func:`reference_patch_scores` per patch, summed per group, and each
    group's row L1-normalised (which makes it the group's mean patch probability). Argmax (accuracy) is the same
    for a group's sum and mean; the normalisation matters for mean average precision, which ranks groups.
    Groups are ordered by first appearance. A group whose patches disagree on the label is an error.

    Args:
        scores (`torch.FloatTensor` of shape `[N, C]`): patch class scores.
        group_ids (`Sequence[str]` of length `N`): group of each patch.
        labels (`torch.LongTensor` of shape `[N]`, *optional*): patch labels; gives the group labels.
        return_groups (`bool`, defaults to `False`): also return the group ids in row order.
        aggregation (`str`, defaults to `"sum"`): `"sum"` or `"reference"`.

    Returns:
        `(group_scores [G, C], group_labels [G] or None)`, plus `groups: list[str]` when `return_groups`.

    Raises:
        ValueError: when lengths differ or a group holds patches of several classes (the group is named).
    """
    _check_aggregation(aggregation)
    scores = torch.as_tensor(scores)
    group_ids = [str(g) for g in group_ids]
    if scores.ndim != 2 or len(group_ids) != scores.shape[0]:
        raise ValueError(
            f"need scores [N, C] and N group ids; got {tuple(scores.shape)} and {len(group_ids)} ids"
        )
    if aggregation == "reference":
        scores = reference_patch_scores(scores)
    index_of: dict[str, int] = {}
    index = torch.tensor([index_of.setdefault(g, len(index_of)) for g in group_ids], dtype=torch.long)
    groups = list(index_of)
    group_scores = torch.zeros(len(groups), scores.shape[1], dtype=scores.dtype, device=scores.device)
    group_scores.index_add_(0, index.to(scores.device), scores)
    if aggregation == "reference":
        group_scores = F.normalize(group_scores, p=1, dim=1)
    group_labels = None
    if labels is not None:
        labels = torch.as_tensor(labels, dtype=torch.long).cpu()
        if labels.shape != (len(group_ids),):
            raise ValueError(f"labels must be [{len(group_ids)}], got {tuple(labels.shape)}")
        group_labels = torch.full((len(groups),), -1, dtype=torch.long)
        group_labels[index] = labels
        # Every patch's label must equal its group's (scatter keeps one of them; compare back).
        bad = (group_labels[index] != labels).nonzero().flatten()
        if len(bad):
            group = group_ids[int(bad[0])]
            found = sorted({int(v) for v in labels[index == index_of[group]]})
            raise ValueError(f"group {group!r} has patches with different labels {found}")
    if return_groups:
        return group_scores, group_labels, groups
    return group_scores, group_labels


def average_precision(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """Average precision of one class: scikit-learn's `average_precision_score` (ties share a threshold).

    Args:
        scores (`torch.Tensor` of shape `[N]`): class scores.
        targets (`torch.Tensor` of shape `[N]`): 1 for positives, 0 otherwise.

    Returns:
        `float`: `sum_n (R_n - R_{n-1}) P_n` over distinct thresholds; NaN when there is no positive.
    """
    from sklearn.metrics import average_precision_score  # here, not at the top: it adds seconds to start-up

    positives = torch.as_tensor(targets).cpu().numpy().astype(bool)
    if not positives.any():
        return float("nan")
    return float(average_precision_score(positives, torch.as_tensor(scores).double().cpu().numpy()))


def _class_indices(labels: torch.Tensor, num_classes: int) -> np.ndarray:
    labels = torch.as_tensor(labels, dtype=torch.long).cpu().numpy()
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
    return labels


def confusion_matrix(scores: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Counts `[C, C]`: row = true class, column = predicted class (argmax of `scores`); scikit-learn's."""
    from sklearn.metrics import confusion_matrix as count_pairs

    predictions = torch.as_tensor(scores).argmax(dim=1).cpu().numpy()
    labels = _class_indices(labels, num_classes)
    return torch.from_numpy(count_pairs(labels, predictions, labels=np.arange(num_classes))).long()


def classification_metrics(scores: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, float]:
    """Accuracy, top-2, top-3, mean class accuracy and mean average precision from class scores.

    Top-k with `k >= num_classes` is 1.0. Mean class accuracy (macro recall, scikit-learn's
    `balanced_accuracy_score`) and mean average precision (macro one-vs-rest AP) average over the classes present
    in `labels`.

    Args:
        scores (`torch.FloatTensor` of shape `[N, C]`): class scores (higher is more likely).
        labels (`torch.LongTensor` of shape `[N]`): true classes.
        num_classes (`int`): `C`.

    Returns:
        `dict` with keys `acc`, `top2`, `top3`, `mca`, `map` (floats in [0, 1]).
    """
    from sklearn.metrics import accuracy_score, recall_score

    scores = torch.as_tensor(scores).float().cpu()
    labels = torch.as_tensor(labels, dtype=torch.long).cpu()
    if scores.ndim != 2 or scores.shape != (labels.shape[0], num_classes):
        raise ValueError(
            f"scores must be [N, {num_classes}] for {labels.shape[0]} labels, got {tuple(scores.shape)}"
        )
    if labels.numel() == 0:
        raise ValueError("cannot compute metrics on zero samples")
    # Top-k stays ours: on tied scores (common in kNN votes) it ranks the lower class first as argmax does, and
    # scikit-learn's top_k_accuracy_score the higher one (most of 3,000 tie-heavy problems scored differently).
    ranking = torch.argsort(scores, dim=1, descending=True, stable=True)
    predictions = ranking[:, 0].numpy()
    truth = _class_indices(labels, num_classes)
    present = np.unique(truth)
    result: dict[str, float] = {"acc": float(accuracy_score(truth, predictions))}
    for k, name in ((2, "top2"), (3, "top3")):
        hits = (ranking[:, : min(k, num_classes)] == labels[:, None]).any(dim=1)
        result[name] = float(hits.double().mean())
    # Macro recall over the present classes is balanced_accuracy_score without its warning for predicted classes
    # that never occur in `labels`.
    result["mca"] = float(recall_score(truth, predictions, labels=present, average="macro"))
    result["map"] = float(np.mean([average_precision(scores[:, c], labels == c) for c in present.tolist()]))
    return result


def _levels(scores, labels, slide_ids, patient_ids, aggregation):
    """Yield `(level, scores, labels)` for the patch level and each level whose ids are given."""
    _check_aggregation(aggregation)
    # The reference scores its patch level on the same per-patch probabilities it aggregates.
    yield "patch", (reference_patch_scores(scores) if aggregation == "reference" else scores), labels
    for level, ids in (("slide", slide_ids), ("patient", patient_ids)):
        if ids is not None:
            group_scores, group_labels = aggregate_scores(scores, ids, labels, aggregation=aggregation)
            yield level, group_scores, group_labels


def hierarchical_metrics(
    scores: torch.Tensor,
    labels: torch.Tensor,
    slide_ids: Sequence[str] | None,
    patient_ids: Sequence[str] | None,
    num_classes: int,
    aggregation: str = "sum",
) -> dict[str, float]:
    """Metrics at patch, slide and patient level, slide / patient scores aggregated from patch scores.

    Args:
        scores (`torch.FloatTensor` of shape `[N, C]`): patch class scores.
        labels (`torch.LongTensor` of shape `[N]`): patch classes.
        slide_ids (`Sequence[str]`, *optional*): slide of each patch; `None` skips the slide level.
        patient_ids (`Sequence[str]`, *optional*): patient of each patch; `None` skips the patient level.
        num_classes (`int`): `C`.
        aggregation (`str`, defaults to `"sum"`): `"sum"` (raw patch scores summed per group) or `"reference"`
            (:func:`aggregate_scores`; the patch level is then scored on :func:`reference_patch_scores`, which
            leaves acc / top-k / mca unchanged and changes mean average precision).

    Returns:
        `dict[str, float]` with keys `"{level}/{metric}"`, level in patch / slide / patient and metric in
        acc / top2 / top3 / mca / map, e.g. `"patch/acc"`, `"slide/map"`.
    """
    scores = torch.as_tensor(scores).float().cpu()
    labels = torch.as_tensor(labels, dtype=torch.long).cpu()
    result = {}
    for level, level_scores, level_labels in _levels(scores, labels, slide_ids, patient_ids, aggregation):
        for name, value in classification_metrics(level_scores, level_labels, num_classes).items():
            result[f"{level}/{name}"] = value
    return result


def hierarchical_confusion_matrices(
    scores: torch.Tensor,
    labels: torch.Tensor,
    slide_ids: Sequence[str] | None,
    patient_ids: Sequence[str] | None,
    num_classes: int,
    aggregation: str = "sum",
) -> dict[str, torch.Tensor]:
    """Confusion matrices `[C, C]` (rows true, columns predicted) per level, as :func:`hierarchical_metrics`."""
    scores = torch.as_tensor(scores).float().cpu()
    labels = torch.as_tensor(labels, dtype=torch.long).cpu()
    return {
        level: confusion_matrix(level_scores, level_labels, num_classes)
        for level, level_scores, level_labels in _levels(scores, labels, slide_ids, patient_ids, aggregation)
    }


def _check_compatible(train: EmbeddingSet, val: EmbeddingSet) -> None:
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


def knn_scores(
    train: EmbeddingSet, val: EmbeddingSet, k: int = 200, temperature: float = 0.07, chunk_size: int = 1024
) -> torch.Tensor:
    """kNN patch scores `[len(val), C]` of `val` against the bank `train`.

    When `k` exceeds the bank size it is clamped to the bank size with a warning (documented fallback: small
    demo datasets have fewer than 200 training patches); :func:`knn_predict` itself refuses such a `k`.
    """
    _check_compatible(train, val)
    if k > len(train):
        warnings.warn(
            f"k={k} is larger than the training bank ({len(train)} patches); using k={len(train)}",
            stacklevel=2,
        )
        k = len(train)
    return knn_predict(
        val.embeddings,
        train.embeddings,
        train.labels,
        train.num_classes,
        k=k,
        temperature=temperature,
        chunk_size=chunk_size,
    )


def knn_evaluate(
    train: EmbeddingSet,
    val: EmbeddingSet,
    k: int = 200,
    temperature: float = 0.07,
    chunk_size: int = 1024,
    aggregation: str = "reference",
) -> dict[str, float]:
    """kNN evaluation (docs/method.md, kNN evaluation): :func:`knn_scores` then :func:`hierarchical_metrics`
    on `val`.

    Args:
        train (:class:`EmbeddingSet`): the bank (training split).
        val (:class:`EmbeddingSet`): the evaluated split.
        k (`int`, defaults to 200): neighbours; clamped with a warning to the bank size when larger.
        temperature (`float`, defaults to 0.07): vote temperature.
        chunk_size (`int`, defaults to 1024): queries per block.
        aggregation (`str`, defaults to `"reference"`): slide / patient rule, `"reference"` (the HLSS
            reference's, for reproducing the paper) or `"sum"` (raw votes summed); see :func:`aggregate_scores`.

    Returns:
        `dict[str, float]` with keys such as `"patch/acc"`, `"slide/acc"`, `"patient/acc"`, `"patch/top2"`,
        `"patch/mca"`, `"patch/map"` (slide / patient keys only when `val` has those ids).
    """
    _check_aggregation(aggregation)
    scores = knn_scores(train, val, k=k, temperature=temperature, chunk_size=chunk_size)
    return hierarchical_metrics(
        scores, val.labels, val.slide_ids, val.patient_ids, val.num_classes, aggregation=aggregation
    )


def distributed_knn_evaluate(
    accelerator,
    model: nn.Module,
    train_ds,
    val_ds,
    processor: Any = None,
    *,
    batch_size: int = 64,
    k: int = 200,
    temperature: float = 0.07,
    aggregation: str = "reference",
    chunk_size: int = 1024,
    num_workers: int | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """kNN evaluation in which every process takes part: for training-time evaluation under DDP, FSDP or DeepSpeed.

    :func:`distributed_evaluate` with :func:`knn_evaluate`. With one process the embeddings and metrics equal
    :func:`extract_embeddings` (same `batch_size`, CPU) followed by :func:`knn_evaluate`.

    Args:
        accelerator, model, train_ds, val_ds, processor, batch_size, num_workers, progress: as for
            :func:`distributed_evaluate`.
        k, temperature, aggregation, chunk_size: as for :func:`knn_evaluate`.

    Returns:
        `dict[str, float]`: :func:`knn_evaluate`'s metrics (`"patch/acc"`, ...), the same on every process.
    """
    _check_aggregation(aggregation)

    def knn(train: EmbeddingSet, val: EmbeddingSet) -> dict[str, float]:
        metrics = knn_evaluate(
            train, val, k=k, temperature=temperature, chunk_size=chunk_size, aggregation=aggregation
        )
        return {key: float(value) for key, value in metrics.items()}

    return distributed_evaluate(
        accelerator,
        model,
        train_ds,
        val_ds,
        knn,
        processor,
        batch_size=batch_size,
        num_workers=num_workers,
        progress=progress,
    )


def distributed_evaluate(
    accelerator,
    model: nn.Module,
    train_ds,
    val_ds,
    evaluate_fn: Callable[[EmbeddingSet, EmbeddingSet], Any],
    processor: Any = None,
    *,
    batch_size: int = 64,
    num_workers: int | None = None,
    progress: bool = False,
) -> Any:
    """Embed two splits with every process taking part, then evaluate the embeddings on the main process.

    Call it on every process with the *prepared* model. Each process embeds its share of each split through the
    wrapped model's forward (`model(pixel_values=..., return_loss=False).image_embeds`, so FSDP gathers its
    shards and DeepSpeed ZeRO-3 its partitions; `get_image_features` on the unwrapped module would see only the
    local shard). The splits are read in rounds of `batch_size * num_processes` rows, process `r` taking rows
    `[r * batch_size, (r + 1) * batch_size)` of each round; a process the last round does not reach runs one padding
    forward, so every process makes the same number of forward calls (FSDP collectives hang otherwise). The
    embeddings are gathered back in dataset order, the main process runs `evaluate_fn(train_set, val_set)` on the
    gathered sets, and its result is broadcast: every process returns the same value.

    The forward runs under the accelerator's own mixed precision (fp32 in :func:`extract_embeddings` unless asked
    for bf16). The global CPU / CUDA RNG state is restored afterwards (DataLoader workers draw a seed from it), so
    evaluating does not change training. A streamed split (`datasets.IterableDataset`) is read whole by every
    process, which decodes only its own rows (see :class:`_StreamRounds`); map-style splits are indexed, each
    process reading only its rows.

    Args:
        accelerator (`accelerate.Accelerator`): the training run's accelerator.
        model (`nn.Module`): the prepared model (e.g. an `HLSSModel` wrapped by DDP / FSDP / DeepSpeed) whose
            `forward(pixel_values, return_loss=False)` returns `image_embeds`.
        train_ds (`datasets.Dataset` or `datasets.IterableDataset`): the reference split (e.g. the kNN bank).
        val_ds (`datasets.Dataset` or `datasets.IterableDataset`): the evaluated split.
        evaluate_fn (`Callable[[EmbeddingSet, EmbeddingSet], Any]`): runs on the main process only (it must not
            run the model: the other processes do not take part); its result must be picklable.
        processor (*optional*): image processor, as for :func:`extract_embeddings`.
        batch_size (`int`, defaults to 64): images per forward pass per process.
        num_workers (`int`, *optional*): decoding workers per process, as for :func:`extract_embeddings`.
        progress (`bool`, defaults to `False`): a progress bar on the main process.

    Returns:
        What `evaluate_fn` returned, on every process.
    """
    from accelerate.utils import broadcast_object_list

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    sets = []
    was_training = model.training
    model.eval()
    device = accelerator.device
    cuda = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda), torch.no_grad():
            for dataset in (train_ds, val_ds):
                sets.append(
                    _embed_across_processes(
                        accelerator, model, dataset, processor, batch_size, num_workers, progress
                    )
                )
    finally:
        model.train(was_training)
    # On the main process only; an error there reaches every process, so that none waits for the result forever.
    result, error = None, None
    if accelerator.is_main_process:
        try:
            result = evaluate_fn(*sets)
        except Exception as err:  # noqa: BLE001 - raised below, on every process
            error = err
    if accelerator.num_processes > 1:
        message = [result, None if error is None else f"{type(error).__name__}: {error}"]
        result, main_error = broadcast_object_list(message, from_process=0)
        if error is None and main_error is not None:
            raise RuntimeError(f"evaluation failed on the main process: {main_error}")
    if error is not None:
        raise error
    return result


def _embed_across_processes(
    accelerator, model, dataset, processor, batch_size: int, num_workers: int | None, progress: bool
) -> EmbeddingSet | None:
    """Embed `dataset` on every process (see :func:`distributed_knn_evaluate`); the set on the main process,
    `None` on the others.

    Sharded here, not by `accelerate.data_loader.prepare_data_loader` + `gather_for_metrics` (which give the same
    embeddings for a map-style split), because for a stream Accelerate 1.16 shards a multi-file
    `datasets.IterableDataset` by file (unequal rows per process: FSDP hangs, order lost), while its
    `IterableDatasetShard` has no length for `gather_for_metrics` to drop the padding by and repeats every row in
    each DataLoader worker; these rounds give every process equal forwards, in stream order, with any workers.
    """
    world, rank = accelerator.num_processes, accelerator.process_index
    device = accelerator.device
    info = _split_info(dataset)
    config = getattr(accelerator.unwrap_model(model), "config", None)
    image_size = getattr(config, "image_size", None)
    size = batch_size
    rows = _RowIds(info)
    if info.streamed:
        source = _StreamRounds(dataset, info, size, world, rank, processor, image_size)
        counts = None
    else:
        total = len(dataset)
        rounds = math.ceil(total / (size * world))
        own, counts = [], []
        for j in range(rounds):
            start = j * size * world + rank * size
            stop = min(start + size, total)
            counts.append(max(0, stop - start))
            # Only the last round can leave a process without rows: one padding row keeps the forward count equal.
            own.extend(range(start, stop) if stop > start else [total - 1])
        subset = dataset.select(own) if own != list(range(total)) else dataset
        source = _ImageBatches(_image_column(subset), size, processor, info.modality, image_size)
    batches = _batch_loader(source, num_workers, device, info.streamed)
    chunks = []
    bar = tqdm(
        total=None if info.streamed else len(dataset),
        desc=_embedding_label(info.split),
        unit="img",
        disable=not (progress and accelerator.is_main_process),
    )
    with bar:
        for j, item in enumerate(batches):
            if info.streamed:
                pixel_values, n, round_rows = item
                rows.extend(round_rows)
            else:
                pixel_values, n = item, counts[j]
            out = model(
                pixel_values=pixel_values.to(device, non_blocking=True), return_loss=False, return_dict=True
            )
            embeds = getattr(out, "image_embeds", None)
            if embeds is None:
                raise TypeError(
                    f"{type(accelerator.unwrap_model(model)).__name__}.forward(pixel_values, return_loss=False) "
                    "returned no image_embeds: distributed_knn_evaluate needs an HLSSModel-like forward"
                )
            embeds = F.normalize(embeds.float(), dim=-1)
            # Each round's rows padded to batch_size: the gathered [world, rounds, B, D] tensor then reads, round
            # after round and process after process, as the dataset's rows followed by padding.
            chunks.append(F.pad(embeds[:n], (0, 0, 0, size - n)))
            done = len(rows) if info.streamed else min(len(dataset), (j + 1) * size * world)
            bar.update(done - bar.n)
    if not chunks:  # an empty stream; every process read the same stream, so every process stops here
        raise ValueError(f"dataset split {info.split!r} is empty: nothing to embed")
    local = torch.stack(chunks)  # [rounds, B, D]
    rounds, dim = local.shape[0], local.shape[-1]
    total = len(rows) if info.streamed else len(dataset)
    if world > 1:
        # Every process must have read the same rows (a stream split by node would not be): say so, not hang.
        shapes = accelerator.gather(torch.tensor([[rounds, total]], device=device)).tolist()
        if any(shape != shapes[0] for shape in shapes):
            raise RuntimeError(
                f"the processes read different versions of split {info.split!r} ([rounds, rows] per process: "
                f"{shapes}); every process must see the whole split in the same order (do not split a stream by node)"
            )
    gathered = accelerator.gather(local.to(device).contiguous()) if world > 1 else local
    if not accelerator.is_main_process:
        return None
    embeddings = gathered.reshape(world, rounds, size, dim).transpose(0, 1).reshape(-1, dim)[:total].cpu()
    if info.streamed:
        return rows.embedding_set(embeddings)
    return _map_style_set(dataset, info, [embeddings])


# --------------------------------------------------------------------------------------------------------------
# Linear probe
# --------------------------------------------------------------------------------------------------------------


def train_linear_probe(
    train: EmbeddingSet, weight_decay: float = 1e-4, max_iter: int = 200, seed: int = 0
) -> nn.Linear:
    """Multinomial logistic regression on frozen embeddings, full batch with L-BFGS.

    Args:
        train (:class:`EmbeddingSet`): training embeddings and labels.
        weight_decay (`float`, defaults to 1e-4): L2 penalty on the weights (`weight_decay * ||W||^2 / 2`).
        max_iter (`int`, defaults to 200): L-BFGS iterations.
        seed (`int`, defaults to 0): seed of the initialisation.

    Returns:
        `nn.Linear(D, C)` on the CPU, in eval mode.
    """
    if len(train) == 0:
        raise ValueError("cannot train a linear probe on an empty embedding set")
    if weight_decay < 0 or max_iter < 1:
        raise ValueError(f"need weight_decay >= 0 and max_iter >= 1, got {weight_decay}, {max_iter}")
    generator = torch.Generator().manual_seed(seed)
    x, y = train.embeddings.float(), train.labels
    probe = nn.Linear(x.shape[1], train.num_classes)
    with torch.no_grad():
        probe.weight.normal_(0, 0.01, generator=generator)
        probe.bias.zero_()
    optimizer = torch.optim.LBFGS(
        probe.parameters(), lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe"
    )

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(probe(x), y) + 0.5 * weight_decay * probe.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return probe.eval()


def linear_probe_evaluate(
    train: EmbeddingSet,
    val: EmbeddingSet,
    weight_decay: float = 1e-4,
    max_iter: int = 200,
    seed: int = 0,
    aggregation: str = "sum",
) -> tuple[dict[str, float], torch.Tensor]:
    """Train :func:`train_linear_probe` on `train`; softmax probabilities on `val` give hierarchical metrics.

    `aggregation` (`"sum"` or `"reference"`) is the slide / patient rule of :func:`hierarchical_metrics`.

    Returns:
        `(metrics, scores)`: the :func:`hierarchical_metrics` dict and the `[len(val), C]` probabilities.
    """
    _check_compatible(train, val)
    probe = train_linear_probe(train, weight_decay=weight_decay, max_iter=max_iter, seed=seed)
    with torch.no_grad():
        scores = probe(val.embeddings.float()).softmax(dim=-1)
    metrics = hierarchical_metrics(
        scores, val.labels, val.slide_ids, val.patient_ids, val.num_classes, aggregation=aggregation
    )
    return metrics, scores


# --------------------------------------------------------------------------------------------------------------
# Zero-shot
# --------------------------------------------------------------------------------------------------------------


def class_text_embeddings(
    model: nn.Module,
    tokenizer: Any,
    class_prompts: Mapping[str, Sequence[str]],
    class_names: Sequence[str],
    batch_size: int = 64,
) -> torch.Tensor:
    """One text embedding per class: `normalize(mean_k normalize(text(prompt_k)))` (prompt ensembling).

    Args:
        model (`nn.Module`): a model with a text tower (`get_text_features(input_ids, attention_mask)`).
        tokenizer: the text tower's tokenizer.
        class_prompts (`Mapping[str, Sequence[str]]`): class name -> prompts; must cover exactly `class_names`.
        class_names (`Sequence[str]`): class order of the result.
        batch_size (`int`, defaults to 64): prompts per forward pass.

    Returns:
        `torch.FloatTensor` of shape `[C, D]`, L2-normalised.

    Raises:
        ValueError: when the model has no text tower, a class has no prompt, or a prompt names an unknown class.
    """
    if getattr(model, "text_model", "missing") is None or not callable(
        getattr(model, "get_text_features", None)
    ):
        raise ValueError(f"{type(model).__name__} has no text tower: zero-shot classification needs one")
    if tokenizer is None:
        raise ValueError("zero-shot classification needs the text tower's tokenizer, got None")
    unknown = [name for name in class_prompts if name not in class_names]
    if unknown:
        raise ValueError(f"prompts given for unknown classes {unknown}; the classes are {list(class_names)}")
    missing = [name for name in class_names if not class_prompts.get(name)]
    if missing:
        raise ValueError(f"no prompt for classes {missing}")
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    rows = []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for name in class_names:
                prompts = [str(p) for p in class_prompts[name]]
                embeds = []
                for start in range(0, len(prompts), batch_size):
                    tokens = tokenizer(
                        prompts[start : start + batch_size],
                        padding=True,
                        truncation=True,
                        return_tensors="pt",
                    )
                    out = model.get_text_features(
                        input_ids=tokens["input_ids"].to(device),
                        attention_mask=tokens["attention_mask"].to(device),
                    )
                    if not isinstance(out, torch.Tensor):
                        # Plain transformers models (e.g. CLIPModel) return a ModelOutput.
                        text_embeds = getattr(out, "text_embeds", None)
                        out = text_embeds if text_embeds is not None else out.pooler_output
                    embeds.append(F.normalize(out.float(), dim=-1))
                rows.append(F.normalize(torch.cat(embeds).mean(dim=0), dim=-1).cpu())
    finally:
        model.train(was_training)
    return torch.stack(rows)


def zero_shot_scores(
    model: nn.Module,
    tokenizer: Any,
    embeddings: EmbeddingSet | torch.Tensor,
    class_prompts: Mapping[str, Sequence[str]],
    class_names: Sequence[str] | None = None,
    temperature: float = 0.01,
) -> torch.Tensor:
    """Zero-shot class probabilities: softmax over classes of `cos(image, class text) / temperature`.

    Args:
        model (`nn.Module`): a model with a text tower whose output space is the image embeddings' space.
        tokenizer: the text tower's tokenizer.
        embeddings (:class:`EmbeddingSet` or `torch.FloatTensor [N, D]`): normalised image embeddings.
        class_prompts (`Mapping[str, Sequence[str]]`): class name -> prompts (ensembled per class).
        class_names (`Sequence[str]`, *optional*): class order; defaults to the set's class names, else the
            order of `class_prompts`.
        temperature (`float`, defaults to 0.01): softmax temperature (CLIP's logit scale of 100).

    Returns:
        `torch.FloatTensor` of shape `[N, C]`: class probabilities.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if isinstance(embeddings, EmbeddingSet):
        class_names = class_names if class_names is not None else embeddings.class_names
        embeddings = embeddings.embeddings
    class_names = list(class_names) if class_names is not None else list(class_prompts)
    text = class_text_embeddings(model, tokenizer, class_prompts, class_names)
    return zero_shot_probabilities(embeddings, text, temperature)


def zero_shot_probabilities(
    embeddings: torch.Tensor, class_embeds: torch.Tensor, temperature: float = 0.01
) -> torch.Tensor:
    """Softmax over classes of `cos(image, class text) / temperature`, from precomputed class text embeddings.

    Args:
        embeddings (`torch.FloatTensor` of shape `[N, D]`): image embeddings.
        class_embeds (`torch.FloatTensor` of shape `[C, D]`): one text embedding per class
            (:func:`class_text_embeddings`).
        temperature (`float`, defaults to 0.01): softmax temperature.

    Returns:
        `torch.FloatTensor` of shape `[N, C]`.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if class_embeds.shape[1] != embeddings.shape[1]:
        raise ValueError(
            f"text embeddings have size {class_embeds.shape[1]}, image embeddings {embeddings.shape[1]}"
        )
    text = F.normalize(class_embeds.float().to(embeddings.device), dim=-1)
    logits = F.normalize(embeddings.float(), dim=-1) @ text.T
    return (logits / temperature).softmax(dim=-1)


def zero_shot_evaluate(
    model: nn.Module,
    tokenizer: Any,
    val: EmbeddingSet,
    class_prompts: Mapping[str, Sequence[str]],
    temperature: float = 0.01,
    aggregation: str = "sum",
) -> tuple[dict[str, float], torch.Tensor]:
    """:func:`zero_shot_scores` on `val`, then :func:`hierarchical_metrics` with `aggregation` (`"sum"` or
    `"reference"`). Returns `(metrics, scores)`."""
    if len(val) == 0:
        raise ValueError("cannot evaluate an empty embedding set")
    scores = zero_shot_scores(model, tokenizer, val, class_prompts, temperature=temperature)
    metrics = hierarchical_metrics(
        scores, val.labels, val.slide_ids, val.patient_ids, val.num_classes, aggregation=aggregation
    )
    return metrics, scores
