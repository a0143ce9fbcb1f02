"""Write patch datasets to a local folder or to the Hugging Face Hub.

Shared by the converters in ``dataset_scripts/``. A converter produces, for each split, an iterable of rows
(``image`` as a numpy array, ``label`` as a class name, ids and provenance), and :func:`write_patch_dataset`

- validates every row (image dtype / channels / shape, label in the class list, unique ``patch_id``);
- streams the rows into one Arrow file per split (bounded memory: batches of :data:`WRITER_BATCH_SIZE` rows);
- locally, saves them with :meth:`datasets.DatasetDict.save_to_disk` plus a ``README.md`` dataset card whose YAML
  (``configs`` + ``dataset_info``) points at those files, so both ``datasets.load_from_disk(DIR)`` and
  ``datasets.load_dataset(DIR)`` return the same splits and features; built beside the output and swapped in
  when complete (:mod:`hlss_hf.files`);
- or pushes the splits with :meth:`datasets.DatasetDict.push_to_hub` (parquet) and uploads the card.

Invalid items raise :class:`ConversionError` naming the item, or, with ``skip_invalid=True``, are recorded by
:class:`InvalidItems` for the summary and the card.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from datasets.arrow_writer import ArrowWriter
from datasets.info import DatasetInfo
from datasets.splits import SplitInfo
from huggingface_hub import DatasetCard
from PIL import Image as PILImage
from tqdm.auto import tqdm

from hlss_hf.data.dataset_card import (
    UNKNOWN_PROVENANCE,
    ConversionSummary,
    InvalidItems,
    check_license,
    dataset_card_text,
)
from hlss_hf.data.schema import (
    IMAGE,
    LABEL,
    PATCH_ID,
    PATIENT_ID,
    SLIDE_ID,
    decode_image,
    modality_of,
)
from hlss_hf.errors import ConversionError
from hlss_hf.files import (
    output_lock,
    remove_stale_temporaries,
    sibling_path,
    write_folder_atomically,
)
from hlss_hf.sources import hub_url

logger = logging.getLogger(__name__)

#: Rows per written Arrow batch: small enough that a 300x300x2 uint16 batch stays ~25 MB in memory.
WRITER_BATCH_SIZE = 64


def check_patch(image: Any, modality: str, patch_size: tuple[int, int] | None) -> str | None:
    """Tell why ``image`` (a channel-last numpy array; for H&E also ``{"bytes": PNG}``, encoded by a tiling worker,
    of which only the header is read) cannot be stored as a ``modality`` patch of ``patch_size``, or ``None``."""
    if modality == "he" and isinstance(image, Mapping):
        try:
            with PILImage.open(io.BytesIO(image["bytes"])) as decoded:
                mode, (width, height) = decoded.mode, decoded.size
        except Exception as error:  # PIL raises several types for broken bytes
            return f"image bytes cannot be decoded ({type(error).__name__})"
        if mode != "RGB":
            return f"image mode {mode}, expected RGB"
        if patch_size is not None and (height, width) != tuple(patch_size):
            return f"image size {(height, width)}, expected {tuple(patch_size)}"
        return None
    if not isinstance(image, np.ndarray):
        return f"image is a {type(image).__name__}, expected a numpy array"
    channels, dtype = (2, np.uint16) if modality == "srh" else (3, np.uint8)
    if image.ndim != 3 or image.shape[-1] != channels:
        return f"image shape {image.shape}, expected (H, W, {channels})"
    if image.dtype != dtype:
        return f"image dtype {image.dtype}, expected {np.dtype(dtype).name}"
    if patch_size is not None and tuple(image.shape[:2]) != tuple(patch_size):
        return f"image size {image.shape[:2]}, expected {tuple(patch_size)}"
    return None


def check_output_dir(output_dir: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an existing output folder unless ``overwrite`` (replaced once the new one is complete); checked
    before any work starts."""
    path = Path(output_dir)
    if path.exists() and not overwrite:
        raise ConversionError(f"output {path} already exists (pass --overwrite to replace it)")
    if path.exists() and not path.is_dir():
        raise ConversionError(f"output {path} exists and is not a folder")
    return path


def encode_image(image: np.ndarray, modality: str, png: bool = True) -> Any:
    # H&E patches become PNG bytes here (the costly part); SRH arrays and raw H&E (png=False) are stored as they
    # are. PNG bytes that arrive for a raw column (e.g. from an older tiling worker) are decoded: PNG is lossless.
    if modality == "he" and png:
        if isinstance(image, Mapping):
            return {"bytes": image["bytes"], "path": None}
        return datasets.Image().encode_example(image)
    if isinstance(image, Mapping):
        return decode_image(image)
    return image


def write_patch_dataset(
    split_rows: Mapping[str, Iterable[Mapping[str, Any]]],
    features: datasets.Features,
    *,
    output_dir: str | os.PathLike | None = None,
    push_to_hub: str | None = None,
    private: bool = False,
    overwrite: bool = False,
    invalid: InvalidItems | None = None,
    title: str = "HLSS patch dataset",
    source: str = "",
    description: str = "",
    command: str | None = None,
    totals: Mapping[str, int] | None = None,
    patch_size: int | tuple[int, int] | None = None,
    max_shard_size_mb: float = 500.0,
    show_progress: bool = True,
    license: str = "unknown",
    license_name: str | None = None,
    license_link: str | None = None,
) -> ConversionSummary:
    """Validate rows and write them to a dataset folder, or push them to the Hub.

    Args:
        split_rows (`Mapping[str, Iterable[Mapping]]`): split name -> rows. Each row has ``image`` (numpy,
            channel-last), ``patient_id``, ``slide_id``, ``patch_id``, ``label`` (a class name) and optionally
            ``x``, ``y``, ``level``, ``mpp``, ``magnification``, ``source``. Iterables are consumed lazily.
        features (`datasets.Features`): from :func:`hlss_hf.data.schema.features_for`.
        output_dir (`str` or `PathLike`, *optional*): destination folder (``save_to_disk`` layout + card).
        push_to_hub (`str`, *optional*): Hub dataset repo id; exactly one of ``output_dir`` / ``push_to_hub``.
        private (`bool`, defaults to `False`): create the Hub repo private.
        overwrite (`bool`, defaults to `False`): replace an existing ``output_dir`` once the new one is complete.
        invalid (`InvalidItems`, *optional*): where invalid rows go; default raises on the first.
        title, source, description, command (`str`): dataset card text.
        totals (`Mapping[str, int]`, *optional*): expected rows per split, for progress bars.
        patch_size (`int` or `(int, int)`, *optional*): required H&E PNG patch size (SRH and raw H&E: from the
            features' fixed shape).
        max_shard_size_mb (`float`, defaults to 500): shard size of the saved or pushed splits.
        show_progress (`bool`, defaults to `True`): show tqdm bars.
        license, license_name, license_link (`str`): the card's licence fields (see :func:`dataset_card_text`).

    Raises:
        ConversionError: an invalid row (without ``skip_invalid``), an existing output, or no patches at all.
            Nothing is left at ``output_dir`` and the temporary folder is removed.
    """
    if (output_dir is None) == (push_to_hub is None):
        raise ValueError("pass exactly one of output_dir and push_to_hub")
    check_license(license, license_name, license_link)
    invalid = invalid if invalid is not None else InvalidItems()
    modality = modality_of(features)
    image_feature = features[IMAGE]
    png = isinstance(image_feature, datasets.Image)
    if not png:  # SRH or raw H&E: the Array3D's fixed shape
        patch_size = tuple(image_feature.shape[:2])
    elif patch_size is not None:
        patch_size = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
    class_names = features[LABEL].names
    class_index = {name: i for i, name in enumerate(class_names)}

    # One writer per output folder, from the check that it may be written until it is in place.
    locks = contextlib.ExitStack()
    if output_dir is not None:
        locks.enter_context(output_lock(Path(output_dir).resolve(), "output"))
        try:
            final = check_output_dir(output_dir, overwrite).resolve()
            final.parent.mkdir(parents=True, exist_ok=True)
            # Scratch space for the rows beside the output (its disk, not /tmp's); the dataset itself is then built
            # in a sibling of its own and swapped in (write_folder_atomically).
            remove_stale_temporaries(final)
            tmp = sibling_path(final, "tmp")
            tmp.mkdir()
        except BaseException:
            locks.close()
            raise
    else:
        final = None
        remove_stale_temporaries(Path(tempfile.gettempdir()) / "hlss-hub-push")
        tmp = Path(tempfile.mkdtemp(prefix=f".hlss-hub-push.tmp-{os.getpid()}-"))
    rows_dir = tmp / "rows"
    rows_dir.mkdir()

    seen_patch_ids: set[str] = set()
    patient_split: dict[str, str] = {}
    patient_label: dict[str, str] = {}
    slide_patient: dict[str, str] = {}
    patients: dict[str, dict[str, set]] = defaultdict(lambda: defaultdict(set))
    slides: dict[str, dict[str, set]] = defaultdict(lambda: defaultdict(set))
    patches: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    splits_info: list[SplitInfo] = []
    empty_splits: list[str] = []
    max_shard_bytes = int(max_shard_size_mb * 2**20)
    try:
        for split, rows in split_rows.items():
            # One Arrow file per split, WRITER_BATCH_SIZE rows at a time.
            writer = ArrowWriter(
                features=features, path=str(rows_dir / f"{split}.arrow"), writer_batch_size=WRITER_BATCH_SIZE
            )
            try:
                bar = tqdm(
                    rows,
                    desc=f"{split}",
                    unit="patch",
                    total=(totals or {}).get(split),
                    disable=not show_progress,
                )
                for row in bar:
                    patch_id = str(row[PATCH_ID])
                    item = f"patch {patch_id}"
                    if patch_id in seen_patch_ids:
                        invalid.invalid(item, "duplicate patch_id")
                        continue
                    label = row[LABEL]
                    if label not in class_index:
                        invalid.invalid(item, f"label {label!r} is not one of {list(class_names)}")
                        continue
                    patient = str(row[PATIENT_ID])
                    if patient_split.setdefault(patient, split) != split:
                        # A patient in two splits would leak between train and evaluation: a converter bug.
                        raise ConversionError(
                            f"patient {patient} is in splits {patient_split[patient]!r} and {split!r}"
                        )
                    slide = str(row[SLIDE_ID])
                    if slide_patient.setdefault(slide, patient) != patient:
                        # The hierarchy must be a tree: one slide belongs to one patient.
                        raise ConversionError(
                            f"slide {slide} belongs to patients {slide_patient[slide]} and {patient}"
                        )
                    if patient_label.setdefault(patient, label) != label:
                        invalid.invalid(
                            item,
                            f"patient {patient} has label {patient_label[patient]!r}, this patch {label!r}",
                        )
                        continue
                    image = row[IMAGE]
                    reason = check_patch(image, modality, patch_size)
                    if reason is not None:
                        invalid.invalid(item, reason)
                        continue
                    seen_patch_ids.add(patch_id)
                    encoded = {**UNKNOWN_PROVENANCE, "source": "", **row}
                    encoded[IMAGE] = encode_image(image, modality, png)
                    encoded[LABEL] = class_index[label]
                    encoded[PATCH_ID], encoded[PATIENT_ID] = patch_id, patient
                    encoded[SLIDE_ID] = slide
                    writer.write({name: encoded[name] for name in features})
                    patients[split][label].add(patient)
                    slides[split][label].add((patient, encoded[SLIDE_ID]))
                    patches[split][label] += 1
                num_examples, num_bytes = writer.finalize()
            finally:
                writer.close()
            if num_examples == 0:
                empty_splits.append(split)
                continue
            splits_info.append(SplitInfo(name=split, num_bytes=num_bytes, num_examples=num_examples))
        if not splits_info:
            raise ConversionError(
                "no patches were converted" + (" (all inputs were skipped)" if invalid.skipped else "")
            )

        counts = {
            split: {
                name: {
                    "patients": len(patients[split][name]),
                    "slides": len(slides[split][name]),
                    "patches": patches[split][name],
                }
                for name in class_names
                if patches[split][name]
            }
            for split in (s.name for s in splits_info)
        }
        summary = ConversionSummary(
            counts=counts,
            skipped=list(invalid.skipped),
            destination=str(final) if final else hub_url(push_to_hub, "dataset"),
            empty_splits=empty_splits,
        )
        written = datasets.DatasetDict(
            {
                info.name: datasets.Dataset.from_file(
                    str(rows_dir / f"{info.name}.arrow"), info=DatasetInfo(features=features), split=info.name
                )
                for info in splits_info
            }
        )
        card_text = functools.partial(
            dataset_card_text,
            summary,
            features,
            splits_info,
            title=title,
            source=source,
            description=description,
            command=command,
            license=license,
            license_name=license_name,
            license_link=license_link,
        )
        with _progress_bars(show_progress):
            if push_to_hub is not None:
                written.push_to_hub(
                    push_to_hub,
                    private=private,
                    max_shard_size=max_shard_bytes,
                    commit_message="Upload HLSS patch dataset",
                )
                # push_to_hub writes a bare card; replace it with ours (same configs and features, plus counts).
                DatasetCard(card_text()).push_to_hub(
                    push_to_hub, repo_type="dataset", commit_message="Add dataset card"
                )
            else:

                def save(folder: Path) -> None:
                    written.save_to_disk(str(folder), max_shard_size=max_shard_bytes)
                    card = card_text(data_files=lambda split: f"{split}/data-*.arrow")
                    (folder / "README.md").write_text(card, encoding="utf-8")

                write_folder_atomically(final, save)
        return summary
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        locks.close()


@contextlib.contextmanager
def _progress_bars(show: bool):
    """datasets' own progress bars (``save_to_disk``, ``push_to_hub``) follow ``show_progress``."""
    was_disabled = datasets.are_progress_bars_disabled()
    if not show:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not show and not was_disabled:
            datasets.enable_progress_bars()
