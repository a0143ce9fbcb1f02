"""Write patch datasets to a local folder or to the Hugging Face Hub.

Shared by the converters in ``dataset_scripts/``. A converter produces, for each split, an iterable of rows
(``image`` as a numpy array, ``label`` as a class name, ids and provenance), and :func:`write_patch_dataset`

- validates every row (image dtype / channels / shape, label in the class list, unique ``patch_id``);
- streams the rows into one Arrow file per split (bounded memory: batches of :data:`WRITER_BATCH_SIZE` rows);
- locally, saves them with :meth:`datasets.DatasetDict.save_to_disk` (``<split>/data-NNNNN-of-NNNNN.arrow``)
  plus a ``README.md`` dataset card whose YAML (``configs`` + ``dataset_info``) points at those files, so both
  ``datasets.load_from_disk(DIR)`` (memory-mapped, no copy) and ``datasets.load_dataset(DIR)`` return the same
  splits and features; everything is built in a temporary folder next to the output and moved into place only
  when complete;
- or pushes the splits with :meth:`datasets.DatasetDict.push_to_hub` (parquet) and uploads the card.

Invalid items raise :class:`ConversionError` naming the item, unless the converter runs with
``skip_invalid=True``, in which case :class:`InvalidItems` records them for the summary and the card.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import math
import os
import re
import shutil
import sys
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import datasets
import numpy as np
from datasets.arrow_writer import ArrowWriter
from datasets.info import DatasetInfo, DatasetInfosDict
from datasets.splits import SplitInfo
from datasets.utils.metadata import MetadataConfigs
from huggingface_hub import DatasetCard, DatasetCardData, constants
from PIL import Image as PILImage
from tqdm.auto import tqdm

from hlss_hf.cli import Config, Section, check, debug_requested, exit_on_error, parse
from hlss_hf.data.schema import (
    CAPTION,
    IMAGE,
    LABEL,
    PATCH_ID,
    PATIENT_ID,
    SLIDE_ID,
    decode_image,
    modality_of,
)
from hlss_hf.errors import ConfigError, ConversionError
from hlss_hf.files import (
    command_line,
    output_lock,
    remove_stale_temporaries,
    sibling_path,
    write_folder_atomically,
)

logger = logging.getLogger(__name__)

#: Rows per written Arrow batch: small enough that a 300x300x2 uint16 batch stays ~25 MB in memory.
WRITER_BATCH_SIZE = 64
#: Defaults for the provenance columns when a converter does not know them.
UNKNOWN_PROVENANCE: dict[str, Any] = {
    "x": -1,
    "y": -1,
    "level": -1,
    "mpp": math.nan,
    "magnification": math.nan,
}


#: The Hub's ``size_categories`` buckets: (upper bound on the row count, label).
SIZE_CATEGORIES = (
    (1_000, "n<1K"),
    (10_000, "1K<n<10K"),
    (100_000, "10K<n<100K"),
    (1_000_000, "100K<n<1M"),
    (10_000_000, "1M<n<10M"),
    (100_000_000, "10M<n<100M"),
    (1_000_000_000, "100M<n<1B"),
)


def size_category(num_rows: int) -> str:
    """The Hub's ``size_categories`` label for a dataset of ``num_rows`` rows (e.g. ``"1K<n<10K"``)."""
    for bound, label in SIZE_CATEGORIES:
        if num_rows < bound:
            return label
    return "n>1T" if num_rows > 10**12 else "1B<n<10B"


def hub_url(repo_id: str, repo_type: str = "model") -> str:
    """The web address of a Hub repo on the endpoint in use (``HF_ENDPOINT``, default huggingface.co)."""
    prefix = "" if repo_type == "model" else f"{repo_type}s/"
    return f"{constants.ENDPOINT.rstrip('/')}/{prefix}{repo_id}"


# ------------------------------------------------------------------ atomic writes
# Every writer builds its output beside the destination and renames it into place when complete: a reader, or a
# run that crashes half-way, sees the earlier version or the whole new one, never a part.


# ------------------------------------------------------------------ one writer per output
# A run (train.py, finetune.py, a converter) holds an exclusive lock on its output for as long as it runs, so a
# second run into the same folder is refused at its start instead of replacing the first one's result. The lock is
# fcntl.flock on a file beside the output: the kernel (and an NFS server's lock manager) releases it when the
# holding process dies, so a lock is never stale and no PID has to be judged alive, on any machine. The file
# itself says who holds it, for the error. Its holder deletes it on release (while still holding it), and whoever
# locks a file checks that it is still the one at that path, so two processes never lock two files of one name.


@dataclass
class InvalidItems:
    """Decides what happens to invalid input: raise :class:`ConversionError`, or skip and remember it.

    Args:
        skip_invalid (`bool`, defaults to `False`): record invalid items instead of raising.
    """

    skip_invalid: bool = False
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def invalid(self, item: str, reason: str) -> None:
        """Report an invalid item: raises unless ``skip_invalid``.

        Args:
            item (`str`): what is invalid, e.g. ``"patient NIO_001"`` or ``"file patches/a.tif"``.
            reason (`str`): why, in a few words.
        """
        if not self.skip_invalid:
            raise ConversionError(f"{item}: {reason}")
        self.skipped.append((item, reason))


@dataclass
class ConversionSummary:
    """What a conversion wrote: counts per split and class, skipped items, destination.

    Attributes:
        counts: ``counts[split][class]`` -> ``{"patients": int, "slides": int, "patches": int}``.
        skipped: ``(item, reason)`` pairs of the items left out with ``skip_invalid``.
        destination: the output folder or the Hub repository id.
        empty_splits: splits that ended with no patches (not written).
    """

    counts: dict[str, dict[str, dict[str, int]]]
    skipped: list[tuple[str, str]]
    destination: str
    empty_splits: list[str] = field(default_factory=list)

    def totals(self, split: str) -> dict[str, int]:
        """Patients, slides and patches of one split, over all classes."""
        per_class = self.counts.get(split, {})
        return {key: sum(c[key] for c in per_class.values()) for key in ("patients", "slides", "patches")}

    def table(self) -> str:
        """The counts as a Markdown table (one line per split and class, then per-split totals)."""
        lines = ["| split | class | patients | slides | patches |", "|---|---|---:|---:|---:|"]
        for split, per_class in self.counts.items():
            for name, c in per_class.items():
                lines.append(f"| {split} | {name} | {c['patients']} | {c['slides']} | {c['patches']} |")
            t = self.totals(split)
            lines.append(f"| {split} | **all** | {t['patients']} | {t['slides']} | {t['patches']} |")
        return "\n".join(lines)

    def format(self) -> str:
        """A plain-text summary to print at the end of a conversion."""
        out = [f"wrote {self.destination}"]
        for split in self.counts:
            t = self.totals(split)
            out.append(f"  {split}: {t['patients']} patients, {t['slides']} slides, {t['patches']} patches")
            for name, c in self.counts[split].items():
                out.append(
                    f"    {name}: {c['patients']} patients, {c['slides']} slides, {c['patches']} patches"
                )
        for split in self.empty_splits:
            out.append(f"  {split}: no patches (split not written)")
        out.append(f"  skipped {len(self.skipped)} invalid item(s)")
        out.extend(f"    {item}: {reason}" for item, reason in self.skipped)
        return "\n".join(out)


def check_patch(image: Any, modality: str, patch_size: tuple[int, int] | None) -> str | None:
    """Tell why ``image`` cannot be stored as a patch of ``modality``, or ``None`` when it can.

    Args:
        image: the patch as a channel-last numpy array; for H&E also ``{"bytes": PNG}`` (already encoded,
            e.g. by a tiling worker process; only its header is read).
        modality (`str`): ``"he"`` (uint8, 3 channels) or ``"srh"`` (uint16, 2 channels).
        patch_size (`(height, width)`, *optional*): the required spatial shape.
    """
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
    """Refuse an existing output folder unless ``overwrite``; checked before any work starts.

    Args:
        output_dir: the requested ``--output``.
        overwrite (`bool`): whether an existing folder may be replaced once the new one is complete.
    """
    path = Path(output_dir)
    if path.exists() and not overwrite:
        raise ConversionError(f"output {path} already exists (pass --overwrite to replace it)")
    if path.exists() and not path.is_dir():
        raise ConversionError(f"output {path} exists and is not a folder")
    return path


def _encode_image(image: np.ndarray, modality: str, png: bool = True) -> Any:
    # H&E patches become PNG bytes here (the costly part); SRH arrays and raw H&E (png=False) are stored as they
    # are. PNG bytes that arrive for a raw column (e.g. from an older tiling worker) are decoded: PNG is lossless.
    if modality == "he" and png:
        if isinstance(image, Mapping):
            return {"bytes": image["bytes"], "path": None}
        return datasets.Image().encode_example(image)
    if isinstance(image, Mapping):
        return decode_image(image)
    return image


def dataset_card_text(
    summary: ConversionSummary,
    features: datasets.Features,
    splits_info: Sequence[SplitInfo],
    *,
    title: str,
    source: str,
    description: str = "",
    command: str | None = None,
    data_files: Callable[[str], str] = lambda split: f"data/{split}-*",
    license: str = "unknown",
    license_name: str | None = None,
    license_link: str | None = None,
) -> str:
    """Render the ``README.md`` dataset card: YAML front matter for ``load_dataset`` plus a readable body.

    Args:
        summary (`ConversionSummary`): the counts and skipped items.
        features (`datasets.Features`): the dataset's features (written to ``dataset_info``).
        splits_info (`Sequence[SplitInfo]`): one entry per written split.
        data_files (`Callable[[str], str]`, *optional*): split name -> its files' glob in the folder or repo
            (default: the parquet shards ``push_to_hub`` writes).
        title (`str`): the card's heading.
        source (`str`): where the data came from (a sentence, e.g. the OpenSRH release folder).
        description (`str`, *optional*): extra Markdown placed under the heading.
        command (`str`, *optional*): the command that produced the dataset.
        license (`str`, defaults to ``"unknown"``): Hub licence id of the data; ``"other"`` needs
            ``license_name`` and ``license_link``.
        license_name, license_link (`str`, *optional*): the licence's short name and address, for ``"other"``.
    """
    num_rows = sum(s.num_examples for s in splits_info)
    card_data = DatasetCardData(
        license=license,
        pretty_name=title,
        size_categories=[size_category(num_rows)],
        tags=["histopathology", "hlss", "self-supervised", "medical"],
        task_categories=["image-classification", "image-feature-extraction"],
        task_ids=["multi-class-image-classification"],
    )
    if license == "other":
        card_data.license_name, card_data.license_link = license_name, license_link
    MetadataConfigs(
        {"default": {"data_files": [{"split": s.name, "path": data_files(s.name)} for s in splits_info]}}
    ).to_dataset_card_data(card_data)
    info = DatasetInfo(features=features, config_name="default", splits=datasets.SplitDict())
    for split_info in splits_info:
        info.splits.add(split_info)
    info.dataset_size = sum(s.num_bytes for s in splits_info)
    DatasetInfosDict({"default": info}).to_dataset_card_data(card_data)

    modality = modality_of(features)
    if modality == "srh":
        image_text = (
            "2-channel uint16 array `[CH2, CH3]`, channel-last (`datasets.Array3D`), the source values"
        )
    elif isinstance(features[IMAGE], datasets.Image):
        image_text = "8-bit RGB PNG (`datasets.Image`)"
    else:
        image_text = (
            "an 8-bit RGB array `(H, W, 3)`, uint8, channel-last (`datasets.Array3D`): raw pixels, lossless, "
            "read without decoding (`--image-format raw`; PNG is the converters' default)"
        )
    skipped = (
        "\n".join(f"- `{item}`: {reason}" for item, reason in summary.skipped) if summary.skipped else "None."
    )
    caption_text = (
        f"\n\n`{CAPTION}`: one sentence per patch describing what it shows (nuclear size, shape, outline, "
        "chromatin, arrangement, density, stroma), never its class: the text of the image-caption pairs that "
        "align an image tower with a text tower before HLSS (`train.py` with `model.objective: align`)."
        if CAPTION in features
        else ""
    )
    body = f"""
# {title}

{description}

A patient-slide-patch hierarchy for hierarchical self-supervision (HLSS): one row per patch.

- **Source:** {source}
- **Modality:** {"H&E" if modality == "he" else "stimulated Raman histology (SRH)"}; `image` is {image_text}.
- **Classes:** {", ".join(f"`{n}`" for n in features[LABEL].names)} (`label` is a `ClassLabel`:
  `ds["train"].features["label"].names` gives them in index order)
- **Licence:** {license_text(license, license_name, license_link)}
- **Splits:** by patient (no patient is in two splits).
{f"- **Command:** `{command}`" if command else ""}

## Columns

`image`, `patient_id`, `slide_id`, `patch_id` (unique), `label` (ClassLabel), `x`, `y` (top-left, level-0
pixels; -1 unknown), `level` (-1 unknown), `mpp` (microns per pixel of the patch; NaN unknown),
`magnification` (NaN unknown), `source`.{caption_text}

## Counts

{summary.table()}

## Skipped items

{skipped}

## Usage

```python
from datasets import load_dataset, load_from_disk
ds = load_dataset("<this folder or repo id>")
ds = load_from_disk("<this folder>")  # a local copy: memory-mapped as it is, no cache copy
```
"""
    return f"---\n{card_data.to_yaml()}\n---\n{body}"


def license_text(license: str, license_name: str | None = None, license_link: str | None = None) -> str:
    """The licence as a sentence for a card body."""
    if license == "other":
        return f"[{license_name}]({license_link})"
    if license == "unknown":
        return "not stated by the converter; check the terms of the source data before use"
    return f"`{license}`"


def check_license(license: str, license_name: str | None, license_link: str | None) -> None:
    """Refuse licence fields the Hub would reject: ``other`` needs a name and a link, and only ``other`` takes them."""
    if license == "other" and not (license_name and license_link):
        raise ConversionError("--license other needs --license-name and --license-link")
    if license != "other" and (license_name or license_link):
        raise ConversionError("--license-name / --license-link only apply with --license other")
    if not re.fullmatch(r"[a-z0-9][a-z0-9.+-]*", license):
        raise ConversionError(
            f"--license {license!r} is not a Hub licence id (e.g. cc-by-4.0, apache-2.0, other)"
        )


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
        features (`datasets.Features`): from :func:`hlss_hf.schema.features_for`.
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

    Returns:
        `ConversionSummary`.

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
                    encoded[IMAGE] = _encode_image(image, modality, png)
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


@dataclass
class DestinationConfig(Section):
    """Where a converter's dataset goes: a folder or a Hub dataset repo."""

    section: ClassVar[str] = "output"

    output_dir: str | None = None
    """Write the dataset to this folder (save_to_disk layout + README.md card: load_from_disk or load_dataset read
    it)."""
    push_to_hub: str | None = None
    """Push the dataset to this Hub dataset repo (namespace/name) instead."""
    hub_private: bool = False
    """Create the Hub repo private (with output.push_to_hub)."""
    overwrite_output_dir: bool = False
    """Replace an existing output.output_dir once the new one is complete."""

    def validate(self) -> None:
        super().validate()
        check(
            (self.output_dir is None) != (self.push_to_hub is None),
            self.key("output_dir"),
            "give a folder (--output.output_dir) or a Hub repo (--output.push_to_hub), one of them",
        )
        check(
            not self.hub_private or self.push_to_hub is not None, self.key("hub_private"), "needs push_to_hub"
        )
        check(
            self.push_to_hub is None or self.push_to_hub.count("/") == 1,
            self.key("push_to_hub"),
            f"{self.push_to_hub!r} must look like 'namespace/name'",
        )


@dataclass
class OutputConfig(DestinationConfig):
    """Where and how a converter writes its dataset."""

    skip_invalid: bool = False
    """Skip invalid items (listed in the summary and the card) instead of stopping at the first."""
    max_shard_size_mb: float = 500.0
    """Start a new shard after this much data (MB)."""
    progress: bool = True
    """Show progress bars."""
    license: str = "unknown"
    """Licence of the data, as a Hub licence id for the dataset card (e.g. cc-by-4.0)."""
    license_name: str | None = None
    """With license other: the licence's short name."""
    license_link: str | None = None
    """With license other: where the licence text is."""

    def validate(self) -> None:
        super().validate()
        check(self.max_shard_size_mb > 0, self.key("max_shard_size_mb"), "must be positive")

    def write_kwargs(self) -> dict[str, Any]:
        """The :func:`write_patch_dataset` keyword arguments these settings give."""
        return {
            "output_dir": self.output_dir,
            "push_to_hub": self.push_to_hub,
            "private": self.hub_private,
            "overwrite": self.overwrite_output_dir,
            "max_shard_size_mb": self.max_shard_size_mb,
            "show_progress": self.progress,
            "command": command_line(),
            "license": self.license,
            "license_name": self.license_name,
            "license_link": self.license_link,
        }


@dataclass
class ConverterConfig(Config):
    """A converter's settings: each converter's ``source`` section, ``tiling`` for slides, and ``output``
    (:class:`OutputConfig`)."""

    # The flags of before the one flag style: each answers with its key.
    renamed: ClassVar[dict[str, tuple[str, str]]] = {
        "output": ("output.output_dir", ""),
        "private": ("output.hub_private", ""),
        "overwrite": ("output.overwrite_output_dir", ""),
        "no_progress": ("output.progress", " (write --output.progress false)"),
    }


def run_converter(
    convert: Callable[[Any], ConversionSummary],
    config_class: type[Config],
    argv: list[str] | None = None,
    description: str | None = None,
    user_errors: tuple[type[BaseException], ...] = (),
) -> ConversionSummary:
    """Read a converter's command line (``--help``: its keys), run it, print its summary; errors end in one line
    ``error: ...`` and exit status 1.

    Settings errors, :class:`ConversionError`, file-system errors (a read-only or full disk), Hub errors and Ctrl-C
    end the program without a traceback (:func:`exit_on_error`); ``--debug`` or ``HLSS_DEBUG=1`` shows it. The
    writer has already removed its temporary folder, and a folder left by a killed run is removed by the next run
    (:func:`remove_stale_temporaries`).

    Args:
        convert (`Callable`): the converter's body, taking its config (an instance of `config_class`).
        config_class (`type`): the converter's :class:`hlss_hf.cli.Config`, with an ``output`` section.
        argv (`list[str]`, *optional*): the command line without the program name; default ``sys.argv[1:]``.
        description (`str`, *optional*): what ``--help`` says first.
        user_errors (`tuple` of exception types): further errors whose message is written for the user.
    """
    argv = [str(arg) for arg in (sys.argv[1:] if argv is None else argv)]
    debug, interrupted = "--debug" in argv or debug_requested(), "interrupted; nothing was written"
    with exit_on_error(debug, (ConfigError, *user_errors), interrupted=interrupted):
        config = parse(config_class, [arg for arg in argv if arg != "--debug"], description=description)
        output = config.output
        # A converter's output; the demo's (a destination only) has no licence and never had these checks.
        if isinstance(output, OutputConfig):
            if output.push_to_hub is not None and constants.HF_HUB_OFFLINE:
                raise ConversionError(
                    "output.push_to_hub needs the Hub, but HF_HUB_OFFLINE is set: unset it, or write a folder with "
                    "--output.output_dir"
                )
            check_license(output.license, output.license_name, output.license_link)
        folder = output.output_dir
        if folder is not None:
            check_output_dir(folder, output.overwrite_output_dir)
        # The whole conversion holds the output: a second converter into it is refused at its start.
        with output_lock(folder, "output.output_dir") if folder is not None else contextlib.nullcontext():
            summary = convert(config)
    if summary is not None:
        print(summary.format())
    return summary


def validation_count(num_patients: int, val_fraction: float) -> int:
    """Patients of one class that go to validation: ``val_fraction`` of them rounded half up, at least one when
    ``val_fraction > 0`` and the class has two or more patients, and never all of them (every class trains)."""
    if num_patients < 2 or val_fraction <= 0:
        return 0
    return min(num_patients - 1, max(1, math.floor(val_fraction * num_patients + 0.5)))


def describe_splits(
    patient_labels: Mapping[str, str],
    patient_split: Mapping[str, str],
    source: str,
    val_name: str = "validation",
) -> str:
    """What a converter did with its patients' splits, in words (printed before it writes): patients per split and,
    when there is no validation split, why and how ``train.py`` goes on without one.

    Args:
        patient_labels (`Mapping[str, str]`): patient id -> label, the patients converted.
        patient_split (`Mapping[str, str]`): patient id -> split name.
        source (`str`): where the splits came from (``"--val-fraction 0.2"``, ``"the manifest's split column"``).
        val_name (`str`, defaults to ``"validation"``): the validation split's name.
    """
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for patient, label in patient_labels.items():
        if patient in patient_split:
            counts[patient_split[patient]][label] += 1
    parts = [
        f"{split} {sum(counts[split].values())} ("
        + ", ".join(f"{label} {n}" for label, n in sorted(counts[split].items()))
        + ")"
        for split in ("train", val_name, "test")
        if counts.get(split)
    ]
    line = f"splits from {source}, patients per split and class: " + "; ".join(parts)
    if counts.get(val_name):
        return line
    per_class: dict[str, int] = defaultdict(int)
    for label in patient_labels.values():
        per_class[label] += 1
    if per_class and max(per_class.values()) < 2:
        why = "no class has two or more patients, and a patient is never split"
    else:
        why = f"{source} puts no patient there"
    return (
        f"{line}\nwarning: no {val_name} split ({why}): train.py then needs --data.validation_split null (no "
        "evaluation), or give the patients a split (a manifest `split` column, --split-file) or more patients"
    )


def assign_splits(
    patient_labels: Mapping[str, str], val_fraction: float, seed: int = 0, val_name: str = "validation"
) -> dict[str, str]:
    """Split patients into ``train`` / ``val_name``, stratified by label and seeded; never splits a patient.

    Each label puts :func:`validation_count` of its patients in validation.

    Args:
        patient_labels (`Mapping[str, str]`): patient id -> label.
        val_fraction (`float`): fraction of patients in validation, in [0, 1).
        seed (`int`, defaults to 0): shuffling seed.
        val_name (`str`, defaults to ``"validation"``): the validation split's name.

    Returns:
        patient id -> split name.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ConversionError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    by_label: dict[str, list[str]] = defaultdict(list)
    for patient in sorted(patient_labels):
        by_label[patient_labels[patient]].append(patient)
    splits = {}
    for label in sorted(by_label):
        members = by_label[label]
        order = rng.permutation(len(members))
        num_val = validation_count(len(members), val_fraction)
        for rank, index in enumerate(order):
            splits[members[index]] = val_name if rank < num_val else "train"
    return splits
