"""Tile whole-slide images listed in a manifest into a patient-slide-patch Hugging Face dataset.

    python dataset_scripts/wsi.py --manifest slides.csv --output_dir data/my-wsi --mpp 0.5 --patch-size 256
    python dataset_scripts/wsi.py --manifest slides.csv --push-to-hub me/my-wsi --level 1 --num-workers 8

The manifest is a CSV with columns ``slide_path`` (absolute or relative to the manifest), ``patient_id``,
``label`` and optionally ``slide_id`` (default: the file name without extension) and ``split``
(``train`` / ``validation`` (or ``val``) / ``test``; without it patients are split with ``--val-fraction``).
Tissue is detected on a thumbnail (Otsu on saturation); tiles of ``--patch-size`` pixels are cut at
``--mpp`` microns per pixel (the best pyramid level, resized) or at ``--level`` (default level 0), and tiles
with less than ``--min-tissue`` tissue are dropped. Any format OpenSlide reads works (SVS, tiled TIFF, NDPI...).
Tiles are stored as PNG, or with ``--image-format raw`` as uint8 arrays (docs/data.md, "Storage formats").
"""

from __future__ import annotations

import csv
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

# A converter needs none of hlss_hf's Auto classes: importing it registers none, nor loads torch for them.
HLSS_HF_PARSE_FIRST = True

try:
    import hlss_hf  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jsonargparse import ArgumentParser

from hlss_hf.cli import Config, Section
from hlss_hf.cli import build_parser as build_config_parser
from hlss_hf.data.converters import (
    SPLIT_ALIASES,
    SPLIT_ORDER,
    ConverterConfig,
    OutputConfig,
    assign_splits,
    describe_splits,
    run_converter,
)
from hlss_hf.data.schema import features_for
from hlss_hf.data.tiling import SlideTask, TilingConfig, tiled_rows
from hlss_hf.data.writer import ConversionSummary, InvalidItems, write_patch_dataset
from hlss_hf.errors import ConversionError

REQUIRED_COLUMNS = ("slide_path", "patient_id", "label")


def read_manifest(path: Path) -> list[dict[str, str]]:
    """Read the manifest CSV; raise :class:`ConversionError` naming it when unreadable or missing columns."""
    if not path.is_file():
        raise ConversionError(f"manifest {path}: file not found")
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise ConversionError(f"manifest {path}: cannot read CSV ({error})") from error
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise ConversionError(f"manifest {path}: missing column(s) {missing} (has {columns})")
    if not rows:
        raise ConversionError(f"manifest {path}: no slides listed")
    return rows


def plan_slides(
    manifest: Path,
    rows: list[dict[str, str]],
    classes: list[str],
    val_fraction: float,
    seed: int,
    invalid: InvalidItems,
) -> dict[str, list[SlideTask]]:
    """Validate the manifest rows (relative slide paths are resolved against the manifest's folder) and group
    the slides by split (``val_fraction`` and ``seed`` split the patients when the manifest has no ``split``
    column): split name -> slides."""
    has_split = any("split" in row for row in rows)
    tasks: list[SlideTask] = []
    seen_slides: set[str] = set()
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        item = f"manifest {manifest.name} line {line}"
        empty = [c for c in REQUIRED_COLUMNS if not row.get(c)]
        if empty:
            invalid.invalid(item, f"empty {empty}")
            continue
        slide_path = Path(row["slide_path"])
        if not slide_path.is_absolute():
            slide_path = manifest.parent / slide_path
        slide_id = row.get("slide_id") or slide_path.stem
        if row["label"] not in classes:
            invalid.invalid(f"slide {slide_id}", f"label {row['label']!r} is not one of {classes}")
            continue
        if slide_id in seen_slides:
            invalid.invalid(f"slide {slide_id}", f"duplicate slide_id ({item})")
            continue
        if not slide_path.is_file():
            invalid.invalid(f"slide {slide_id}", f"file {slide_path} not found")
            continue
        split = ""
        if has_split:
            split = SPLIT_ALIASES.get(row.get("split", "").lower(), "")
            if not split:
                invalid.invalid(
                    f"slide {slide_id}",
                    f"split {row.get('split', '')!r} is not one of {sorted(SPLIT_ALIASES)}",
                )
                continue
        seen_slides.add(slide_id)
        tasks.append(
            SlideTask(
                str(slide_path), row["patient_id"], slide_id, row["label"], f"wsi:{slide_path.name}", split
            )
        )

    # A patient is one unit: one label and one split, or it is dropped as a whole.
    by_patient: dict[str, list[SlideTask]] = defaultdict(list)
    for task in tasks:
        by_patient[task.patient_id].append(task)
    patient_labels = {}
    for patient, slides in by_patient.items():
        labels, splits = {t.label for t in slides}, {t.split for t in slides}
        if len(labels) > 1:
            invalid.invalid(f"patient {patient}", f"slides have different labels {sorted(labels)}")
        elif len(splits) > 1:
            invalid.invalid(f"patient {patient}", f"slides are in different splits {sorted(splits)}")
        else:
            patient_labels[patient] = slides[0].label
    if not has_split:
        patient_split = assign_splits(patient_labels, val_fraction, seed)
        for task in tasks:
            task.split = patient_split.get(task.patient_id, "")
    else:
        patient_split = {t.patient_id: t.split for t in tasks}
    source = "the manifest's split column" if has_split else f"--val-fraction {val_fraction:g} per class"
    print(describe_splits(patient_labels, patient_split, source), flush=True)
    plan: dict[str, list[SlideTask]] = {}
    for split in SPLIT_ORDER:
        chosen = [t for t in tasks if t.split == split and t.patient_id in patient_labels]
        if chosen:
            plan[split] = chosen
    return plan


def convert(config: Config) -> ConversionSummary:
    """Convert the manifest's slides as the command line says."""
    source = config.source
    options = config.tiling.options(source.image_format)
    manifest = Path(source.manifest)
    rows = read_manifest(manifest)
    classes = list(source.classes) if source.classes else sorted({r["label"] for r in rows if r.get("label")})
    if not classes:
        raise ConversionError(f"manifest {manifest}: no labels")
    invalid = InvalidItems(skip_invalid=config.output.skip_invalid)
    plan = plan_slides(manifest, rows, classes, source.val_fraction, config.tiling.seed, invalid)
    resolution = f"{options.mpp} mpp" if options.mpp else f"level {options.level or 0}"
    return write_patch_dataset(
        {
            split: tiled_rows(tasks, options, config.tiling.num_workers, invalid)
            for split, tasks in plan.items()
        },
        features_for("he", classes, patch_size=options.patch_size, image_format=source.image_format),
        invalid=invalid,
        title=f"Whole-slide tiles ({manifest.name})",
        source=f"{sum(len(t) for t in plan.values())} slides from manifest `{manifest.name}`; "
        f"{options.patch_size} px tiles at {resolution}, min tissue {options.min_tissue}",
        patch_size=options.patch_size,
        **config.output.write_kwargs(),
    )


@dataclass
class WSISource(Section):
    """The manifest of slides and how patients are split."""

    section: ClassVar[str] = "source"
    required: ClassVar[tuple[str, ...]] = ("manifest",)

    manifest: str | None = None
    """CSV: slide_path, patient_id, label[, slide_id, split]."""
    classes: list[str] | None = None
    """Class names in label order (null: the sorted manifest labels)."""
    val_fraction: float = 0.2
    """Patients per class in validation when there is no split column."""
    image_format: Literal["png", "raw"] | None = None
    """H&E storage: png (default; lossless, smallest) or raw (uint8 Array3D: the same pixels, ~3.3x the bytes, no
    decoding when read: the fastest input pipeline, see benchmarks/README.md)."""


@dataclass
class WSIConfig(ConverterConfig):
    source: WSISource = field(default_factory=WSISource)
    tiling: TilingConfig = field(default_factory=TilingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


def build_parser() -> ArgumentParser:
    """The command line's parser (its help lists every key)."""
    return build_config_parser(WSIConfig, __doc__.split("\n\n")[0])


def main(argv: list[str] | None = None) -> ConversionSummary:
    return run_converter(convert, WSIConfig, argv, __doc__.split("\n\n")[0])


if __name__ == "__main__":
    main()
