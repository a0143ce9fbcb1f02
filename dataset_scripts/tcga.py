"""Convert TCGA slides (whole-slide files or per-slide HDF5 patch files) into a patient-slide-patch dataset.

    python dataset_scripts/tcga.py /data/tcga-gbmlgg --labels labels.csv --output_dir data/tcga --mpp 0.5
    python dataset_scripts/tcga.py /data/tcga-h5 --labels labels.json --split-file splits.json --push-to-hub me/tcga

Inputs, found recursively under ROOT:
- whole-slide files (``.svs``, ``.tif``, ``.tiff``, ``.ndpi``, ``.mrxs``, ``.scn``): tiled like
  ``dataset_scripts/wsi.py`` (tissue detection, ``--patch-size`` at ``--mpp`` or ``--level``);
- HDF5 files (``.h5``, ``.hdf5``), one per slide, with a dataset ``imgs`` of shape ``(n, H, W, 3)`` uint8
  (and optionally ``coords`` ``(n, 2)`` with level-0 x, y).
``--patch-size`` is the side of every patch in the dataset: whole-slide files are tiled at that size, and
HDF5 ``imgs`` must already be ``--patch-size`` x ``--patch-size`` (they are not resized: a file with another
patch shape is invalid, named with its shape).
Patches are stored as PNG, or with ``--image-format raw`` as uint8 arrays (docs/data.md, "Storage formats").
The file name starts with the slide barcode (``TCGA-02-0001-01Z-00-DX1[.uuid].svs``); the patient is its first
three fields (``TCGA-02-0001``). Labels come from ``--labels``: a CSV (columns ``id``/``barcode``/
``patient_id``/``slide_id`` and ``label``) or a JSON object, keyed by patient or slide barcode (slide wins).
All entries of one patient (its own and its slides') must agree: a patient with slide files and two
different labels is invalid.
Splits are by patient: ``--split-file`` (JSON ``{"train": [...], "validation"|"val": [...], "test": [...]}``,
patient barcodes; every patient listed must have slide files) or a stratified random ``--val-fraction`` with
``--seed``.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np

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
    read_json,
    run_converter,
)
from hlss_hf.data.schema import features_for
from hlss_hf.data.tiling import SlideTask, TilingConfig, TilingOptions, tiled_rows
from hlss_hf.data.writer import ConversionSummary, InvalidItems, write_patch_dataset
from hlss_hf.errors import ConversionError

SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn")
HDF5_EXTENSIONS = (".h5", ".hdf5")
#: TCGA barcode: project-TSS-participant, then optional sample/portion/analyte/slide fields.
BARCODE = re.compile(r"^(TCGA-[A-Z0-9]{2}-[A-Z0-9]{4})(-[A-Z0-9]+)*$", re.IGNORECASE)
ID_COLUMNS = ("id", "barcode", "slide_id", "patient_id", "case_id", "case_submitter_id")
HDF5_BATCH = 64


@dataclass
class SlideFile:
    path: Path
    patient_id: str
    slide_id: str
    kind: str  # "wsi" or "hdf5"


def parse_barcode(path: Path) -> tuple[str, str]:
    """(patient barcode, slide barcode) from a file name; ``ValueError`` when it is not a TCGA barcode."""
    slide = path.name.split(".")[0]  # drops the ".<uuid>.svs" / ".h5" suffixes
    match = BARCODE.match(slide)
    if match is None:
        raise ValueError(f"file name {path.name!r} does not start with a TCGA barcode (TCGA-XX-XXXX...)")
    return match.group(1).upper(), slide.upper()


@dataclass
class LabelEntry:
    key: str  # barcode (patient or slide), upper-cased
    label: str
    where: str  # "line 3" (CSV) or "key ..." (JSON), for error messages


def read_labels(path: Path) -> list[LabelEntry]:
    """Every barcode -> label entry of a labels file (``.json``: an object barcode -> label; otherwise a CSV), in
    file order (duplicates kept)."""
    if not path.is_file():
        raise ConversionError(f"labels {path}: file not found")
    try:
        if path.suffix.lower() == ".json":
            # Pairs, not a dict: a repeated key must not silently keep its last value.
            data = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=list)
            if not isinstance(data, list) or (data and not isinstance(data[0], tuple)):
                raise ConversionError(f"labels {path}: expected a JSON object barcode -> label")
            return [LabelEntry(str(k).upper(), str(v), f"key {k}") for k, v in data]
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            columns = reader.fieldnames or []
            id_column = next((c for c in ID_COLUMNS if c in columns), None)
            if id_column is None or "label" not in columns:
                raise ConversionError(
                    f"labels {path}: needs a 'label' column and one of {list(ID_COLUMNS)} (has {columns})"
                )
            return [
                LabelEntry(row[id_column].strip().upper(), (row["label"] or "").strip(), f"line {line}")
                for line, row in enumerate(reader, start=2)  # line 1 is the header
                if row[id_column]
            ]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error) as error:
        raise ConversionError(f"labels {path}: cannot read ({error})") from error


def resolve_labels(
    entries: list[LabelEntry], patients: set[str], source: str, invalid: InvalidItems
) -> tuple[dict[str, str], set[str]]:
    """Barcode -> label, refusing the ``patients`` (those with slide files; conflicts of others do not matter)
    whose entries (patient and slide keys) disagree: ``(barcode -> label without the refused, the refused)``;
    each refused patient goes to ``invalid``, naming the labels file ``source``."""

    def patient_of(key: str) -> str:
        match = BARCODE.match(key)
        return match.group(1).upper() if match else key

    by_patient: dict[str, dict[str, str]] = defaultdict(dict)  # patient -> label -> first entry with it
    for entry in entries:
        by_patient[patient_of(entry.key)].setdefault(entry.label, f"{entry.key} {entry.where}")
    refused = set()
    for patient in sorted(patients):
        labels = by_patient.get(patient, {})
        if len(labels) > 1:
            found = ", ".join(f"{label!r} ({where})" for label, where in labels.items())
            invalid.invalid(f"patient {patient}", f"different labels in {source}: {found}")
            refused.add(patient)
    label_map = {entry.key: entry.label for entry in entries if patient_of(entry.key) not in refused}
    return label_map, refused


def read_split_file(path: Path) -> dict[str, str]:
    """Patient barcode -> split name, from ``{"train": [...], "validation": [...], ...}``."""
    data = read_json(path, "split file")
    if not isinstance(data, dict):
        raise ConversionError(f"split file {path}: expected an object split -> patients")
    splits: dict[str, str] = {}
    for key, patients in data.items():
        if key.lower() not in SPLIT_ALIASES:
            raise ConversionError(
                f"split file {path}: unknown split {key!r} (expected {sorted(SPLIT_ALIASES)})"
            )
        for patient in patients:
            patient = str(patient).upper()
            if patient in splits:
                raise ConversionError(f"patient {patient}: in split file under two splits")
            splits[patient] = SPLIT_ALIASES[key.lower()]
    return splits


def find_slides(root: Path, invalid: InvalidItems) -> list[SlideFile]:
    """All slide files under ``root`` with their barcodes; bad names and duplicate slides go to ``invalid``."""
    if not root.is_dir():
        raise ConversionError(f"root {root}: not a folder")
    files = sorted(
        p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in SLIDE_EXTENSIONS + HDF5_EXTENSIONS
    )
    if not files:
        raise ConversionError(f"root {root}: no slide ({', '.join(SLIDE_EXTENSIONS)}) or HDF5 files")
    slides, seen = [], {}
    for path in files:
        try:
            patient, slide = parse_barcode(path)
        except ValueError as error:
            invalid.invalid(f"file {path}", str(error))
            continue
        if slide in seen:
            invalid.invalid(f"slide {slide}", f"two files: {seen[slide]} and {path}")
            continue
        seen[slide] = path
        kind = "hdf5" if path.suffix.lower() in HDF5_EXTENSIONS else "wsi"
        slides.append(SlideFile(path, patient, slide, kind))
    return slides


def iter_hdf5(slide: SlideFile, label: str, patch_size: int, invalid: InvalidItems) -> Iterator[dict]:
    """Rows of one HDF5 patch file, read in batches; an unreadable file or ``imgs`` of another shape than
    ``patch_size`` (patches are not resized) goes to ``invalid``."""
    import h5py

    item = f"slide {slide.slide_id}"
    try:
        handle = h5py.File(slide.path, "r")
    except Exception as error:  # h5py raises OSError and others for corrupt files
        invalid.invalid(item, f"cannot open HDF5 {slide.path} ({type(error).__name__}: {error})")
        return
    with handle:
        images = handle.get("imgs")
        if not isinstance(images, h5py.Dataset):
            invalid.invalid(item, f"{slide.path} has no dataset 'imgs'")
            return
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            invalid.invalid(item, f"'imgs' is {images.dtype} {images.shape}, expected uint8 (n, H, W, 3)")
            return
        if tuple(images.shape[1:3]) != (patch_size, patch_size):
            height, width = images.shape[1:3]
            invalid.invalid(
                item,
                f"{slide.path.name}: 'imgs' patches are {height}x{width}, expected {patch_size}x{patch_size} "
                "(--patch-size; HDF5 patches are not resized)",
            )
            return
        if images.shape[0] == 0:
            invalid.invalid(item, "has no patches ('imgs' is empty)")
            return
        coords = handle.get("coords")
        coords = (
            np.asarray(coords)
            if isinstance(coords, h5py.Dataset) and coords.shape == (images.shape[0], 2)
            else None
        )
        for start in range(0, images.shape[0], HDF5_BATCH):
            try:
                batch = images[start : start + HDF5_BATCH]
            except Exception as error:  # a truncated file fails on read, not on open
                invalid.invalid(item, f"cannot read 'imgs'[{start}:] ({type(error).__name__}: {error})")
                return
            for offset, image in enumerate(batch):
                index = start + offset
                x, y = (int(coords[index][0]), int(coords[index][1])) if coords is not None else (-1, -1)
                yield {
                    "image": image,
                    "patient_id": slide.patient_id,
                    "slide_id": slide.slide_id,
                    "patch_id": f"{slide.slide_id}/{index:06d}",
                    "label": label,
                    "x": x,
                    "y": y,
                    "source": f"tcga:{slide.path.name}",
                }


def iter_split(
    slides: list[SlideFile],
    labels: dict[str, str],
    options: TilingOptions,
    num_workers: int,
    invalid: InvalidItems,
) -> Iterator[dict]:
    """Rows of one split: HDF5 files read in order, whole-slide files tiled (in parallel when asked)."""
    for slide in slides:
        if slide.kind == "hdf5":
            yield from iter_hdf5(slide, labels[slide.slide_id], options.patch_size, invalid)
    tasks = [
        SlideTask(str(s.path), s.patient_id, s.slide_id, labels[s.slide_id], f"tcga:{s.path.name}")
        for s in slides
        if s.kind == "wsi"
    ]
    yield from tiled_rows(tasks, options, num_workers, invalid)


def convert(config: Config) -> ConversionSummary:
    """Convert the TCGA slides under ``source.root`` as the command line says."""
    source = config.source
    options = config.tiling.options(source.image_format)
    invalid = InvalidItems(skip_invalid=config.output.skip_invalid)
    labels_path = Path(source.labels)
    entries = read_labels(labels_path)
    slides = find_slides(Path(source.root), invalid)
    present = {s.patient_id for s in slides}
    label_map, refused = resolve_labels(entries, present, labels_path.name, invalid)
    classes = list(source.classes) if source.classes else sorted({e.label for e in entries})

    slide_labels: dict[str, str] = {}
    # One label per patient: resolve_labels refused every patient whose entries (patient and slide keys) disagree.
    patient_label: dict[str, str] = {}
    for slide in slides:
        if slide.patient_id in refused:
            continue  # already reported once for the whole patient
        label = label_map.get(slide.slide_id, label_map.get(slide.patient_id))
        if label is None:
            invalid.invalid(
                f"slide {slide.slide_id}",
                f"no label for it or its patient {slide.patient_id} in {source.labels}",
            )
            continue
        if label not in classes:
            invalid.invalid(f"slide {slide.slide_id}", f"label {label!r} is not one of {classes}")
            continue
        slide_labels[slide.slide_id] = label
        patient_label[slide.patient_id] = label

    if source.split_file:
        patient_split = read_split_file(Path(source.split_file))
        for patient in sorted(patient_label):
            if patient not in patient_split:
                invalid.invalid(f"patient {patient}", f"not in split file {source.split_file}")
        for patient in sorted(set(patient_split) - present):
            invalid.invalid(
                f"patient {patient}",
                f"in split file {source.split_file} but has no slide files under {source.root}",
            )
    else:
        patient_split = assign_splits(patient_label, source.val_fraction, config.tiling.seed)
    splits_from = (
        f"split file {source.split_file}"
        if source.split_file
        else f"--val-fraction {source.val_fraction:g} per class"
    )
    print(describe_splits(patient_label, patient_split, splits_from), flush=True)
    plan: dict[str, list[SlideFile]] = {}
    for split in SPLIT_ORDER:
        chosen = [
            s
            for s in slides
            if s.slide_id in slide_labels
            and s.patient_id in patient_label
            and patient_split.get(s.patient_id) == split
        ]
        if chosen:
            plan[split] = chosen
    if not plan:
        raise ConversionError("no slide with a label and a split")
    num_hdf5 = sum(s.kind == "hdf5" for s in slides)
    return write_patch_dataset(
        {
            split: iter_split(chosen, slide_labels, options, config.tiling.num_workers, invalid)
            for split, chosen in plan.items()
        },
        features_for("he", classes, patch_size=options.patch_size, image_format=source.image_format),
        invalid=invalid,
        patch_size=options.patch_size,
        title="TCGA (HLSS patient-slide-patch layout)",
        source=f"The Cancer Genome Atlas: {len(slides) - num_hdf5} whole-slide files and {num_hdf5} HDF5 patch files "
        f"under `{Path(source.root).name}`; labels from `{Path(source.labels).name}`",
        **config.output.write_kwargs(),
    )


@dataclass
class TCGASource(Section):
    """The TCGA slides, their labels and splits."""

    section: ClassVar[str] = "source"
    required: ClassVar[tuple[str, ...]] = ("root", "labels")

    root: str | None = None
    """Folder searched recursively for slide and HDF5 files (the command line's one bare value)."""
    labels: str | None = None
    """CSV or JSON: patient or slide barcode -> label."""
    classes: list[str] | None = None
    """Class names in label order (null: the sorted labels)."""
    split_file: str | None = None
    """JSON split -> patient barcodes (null: val_fraction)."""
    val_fraction: float = 0.2
    """Patients per class in validation."""
    image_format: Literal["png", "raw"] | None = None
    """H&E storage: png (default; lossless, smallest) or raw (uint8 Array3D: the same pixels, ~3.3x the bytes, no
    decoding when read: the fastest input pipeline, see benchmarks/README.md)."""


@dataclass
class TCGATiling(TilingConfig):
    """How slides are cut into patches, and the side every HDF5 patch must have."""

    patch_size: int = 256
    """Patch side in pixels: whole-slide files are tiled at this size; HDF5 'imgs' must already be this size
    (another shape is an error naming the file)."""


@dataclass
class TCGAConfig(ConverterConfig):
    positional: ClassVar[str] = "source.root"
    source: TCGASource = field(default_factory=TCGASource)
    tiling: TCGATiling = field(default_factory=TCGATiling)
    output: OutputConfig = field(default_factory=OutputConfig)


def build_parser() -> ArgumentParser:
    """The command line's parser (its help lists every key)."""
    return build_config_parser(TCGAConfig, __doc__.split("\n\n")[0])


def main(argv: list[str] | None = None) -> ConversionSummary:
    return run_converter(convert, TCGAConfig, argv, __doc__.split("\n\n")[0])


if __name__ == "__main__":
    main()
