"""The dataset card a converter writes beside its data: size, provenance, licence, the conversion's summary and
the items it skipped (docs/data.md)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import datasets
from datasets.info import DatasetInfo, DatasetInfosDict
from datasets.splits import SplitInfo
from datasets.utils.metadata import MetadataConfigs
from huggingface_hub import DatasetCardData

from hlss_hf.data.schema import CAPTION, IMAGE, LABEL, modality_of
from hlss_hf.errors import ConversionError

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


@dataclass
class InvalidItems:
    """Decides what happens to invalid input: raise :class:`ConversionError`, or (`skip_invalid`) skip and
    remember it in `skipped`."""

    skip_invalid: bool = False
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def invalid(self, item: str, reason: str) -> None:
        """Report an invalid `item` (e.g. ``"patient NIO_001"``, ``"file patches/a.tif"``) and its `reason`, in a
        few words: raises unless ``skip_invalid``."""
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
        splits_info (`Sequence[SplitInfo]`): one entry per written split.
        data_files (`Callable[[str], str]`, *optional*): split name -> its files' glob in the folder or repo
            (default: the parquet shards ``push_to_hub`` writes).
        source (`str`): where the data came from (a sentence, e.g. the OpenSRH release folder).
        description (`str`, *optional*): extra Markdown placed under the `title`.
        command (`str`, *optional*): the command that produced the dataset.
        license (`str`, defaults to ``"unknown"``): Hub licence id of the data; ``"other"`` needs
            ``license_name`` (short name) and ``license_link`` (address), which only ``"other"`` takes.
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
