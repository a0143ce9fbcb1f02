"""Convert the OpenSRH release into a patient-slide-patch Hugging Face dataset.

    python dataset_scripts/opensrh.py /data/opensrh --output_dir data/opensrh
    python dataset_scripts/opensrh.py /data/opensrh --push-to-hub me/opensrh --hub_private
    python dataset_scripts/opensrh.py /data/opensrh --output_dir data/opensrh-updated2 \
        --meta-file meta/updated2_opensrh.json --split-file meta/updated2_train_val_split.json

Expected layout (the public OpenSRH release):

    ROOT/meta/opensrh.json           patient -> {"class": ..., "slides": {slide -> {"tumor_patches": [...],
                                     "normal_patches": [...], "nondiagnostic_patches": [...]}}}
    ROOT/meta/train_val_split.json   {"train": [patients], "val": [patients]}
    ROOT/<patch paths>               300x300 two-channel uint16 TIFFs, (2, H, W) or (H, W, 2)

``--meta-file`` / ``--split-file`` name other metadata and split files of the same format (paths relative to ROOT).
The HLSS reference code read ``meta/updated2_opensrh.json`` and ``meta/updated2_train_val_split.json``, files the
public release does not include; whoever has them converts with those names (third example above), everyone else
gets the release's patients and split. The dataset card records which files were read.

Normal patients contribute their ``normal_patches``, all others their ``tumor_patches``;
``--include-nondiagnostic`` adds the ``nondiagnostic_patches``. Patches are stored channel-last ``(H, W, 2)``
with the TIFF's exact uint16 values. Splits: ``train`` and ``validation`` (the release's ``val``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

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
from hlss_hf.data.converters import ConverterConfig, OutputConfig, describe_splits, read_json, run_converter
from hlss_hf.data.schema import OPENSRH_CLASSES, features_for
from hlss_hf.data.writer import ConversionSummary, InvalidItems, write_patch_dataset
from hlss_hf.errors import ConversionError

#: OpenSRH split names -> dataset split names.
SPLIT_NAMES = {"train": "train", "val": "validation"}
NORMAL_CLASS = "normal"


def read_srh_patch(path: Path, patch_size: tuple[int, int]) -> np.ndarray:
    """Read one SRH TIFF as ``(H, W, 2)`` uint16 of ``patch_size``; raise ``ValueError`` saying what is wrong
    otherwise."""
    import tifffile

    try:
        array = tifffile.imread(path)
    except Exception as error:  # tifffile raises many types for corrupt files
        raise ValueError(f"cannot read TIFF ({type(error).__name__}: {error})") from error
    if array.ndim == 3 and array.shape[0] == 2 and array.shape[-1] != 2:
        array = np.moveaxis(array, 0, -1)  # OpenSRH stores some patches channel-first
    if array.ndim != 3 or array.shape[-1] != 2:
        raise ValueError(f"shape {array.shape}, expected (2, H, W) or (H, W, 2)")
    if array.dtype != np.uint16:
        raise ValueError(f"dtype {array.dtype}, expected uint16")
    if tuple(array.shape[:2]) != tuple(patch_size):
        raise ValueError(f"size {array.shape[:2]}, expected {tuple(patch_size)}")
    return np.ascontiguousarray(array)


def _inside(base: Path, rel: str) -> bool:
    """Whether ``rel`` (a path from the metadata) names something under ``base`` once ``..`` are folded."""
    return Path(os.path.normpath(base / rel)).is_relative_to(base)


def plan_opensrh(
    root: Path,
    meta: dict,
    split_map: dict,
    classes: list[str],
    include_nondiagnostic: bool,
    invalid: InvalidItems,
) -> dict[str, list[dict]]:
    """Turn the parsed metadata and split file into split name -> ``{"path", "patient_id", "slide_id",
    "patch_id", "label"}`` patches (paths relative to ``root``), validating everything that needs no pixel read."""
    if not isinstance(meta, dict):
        raise ConversionError(f"metadata: expected an object patient -> record, got {type(meta).__name__}")
    if not isinstance(split_map, dict) or not set(split_map) & set(SPLIT_NAMES):
        raise ConversionError(f"split file: expected keys {sorted(SPLIT_NAMES)}, got {sorted(split_map)}")
    patient_split: dict[str, str] = {}
    for key, patients in split_map.items():
        if key not in SPLIT_NAMES:
            raise ConversionError(f"split file: unknown split {key!r} (expected {sorted(SPLIT_NAMES)})")
        # A bare string would be read letter by letter as patient ids (and reported as listed twice).
        if not isinstance(patients, list) or not all(isinstance(p, str) for p in patients):
            raise ConversionError(
                f"split file: {key!r} must be a list of patient ids, got {type(patients).__name__} {patients!r:.60}"
            )
        for patient in patients:
            if patient in patient_split:
                raise ConversionError(
                    f"patient {patient}: listed in split file under both {patient_split[patient]!r} and {key!r}"
                )
            patient_split[patient] = key

    plan: dict[str, list[dict]] = {SPLIT_NAMES[key]: [] for key in split_map}
    base = Path(os.path.normpath(root.absolute()))
    for patient, split_key in patient_split.items():
        record = meta.get(patient)
        if record is None:
            invalid.invalid(f"patient {patient}", "in the split file but not in the metadata")
            continue
        if not isinstance(record, dict) or "class" not in record:
            invalid.invalid(f"patient {patient}", "metadata record has no 'class'")
            continue
        label = record["class"]
        if label not in classes:
            invalid.invalid(f"patient {patient}", f"label {label!r} is not one of {classes}")
            continue
        slides = record.get("slides") or {}
        if not isinstance(slides, dict) or not slides:
            invalid.invalid(f"patient {patient}", "has no slides")
            continue
        keys = ["normal_patches" if label == NORMAL_CLASS else "tumor_patches"]
        if include_nondiagnostic:
            keys.append("nondiagnostic_patches")
        patient_patches = []
        for slide, slide_record in slides.items():
            # Slide keys are unique within a patient; prefix when they do not already carry the patient id.
            slide_id = slide if str(slide).startswith(patient) else f"{patient}-{slide}"
            slide_record = slide_record or {}
            if not isinstance(slide_record, dict):
                invalid.invalid(
                    f"slide {slide_id}", f"metadata record is a {type(slide_record).__name__}, not an object"
                )
                continue
            # A bare string would be read letter by letter as file names (each then "not found").
            lists = {key: slide_record.get(key, []) for key in keys}
            bad = [
                key
                for key, value in lists.items()
                if not isinstance(value, list) or not all(isinstance(p, str) for p in value)
            ]
            if bad:
                invalid.invalid(
                    f"slide {slide_id}", f"{bad[0]!r} must be a list of file paths, got {lists[bad[0]]!r:.60}"
                )
                continue
            paths = [p for key in keys for p in lists[key]]
            if not paths:
                invalid.invalid(f"slide {slide_id}", f"has no patches under {keys}")
                continue
            slide_patches = []
            for rel in paths:
                # Metadata names files of the release: a path that leaves its folder as written (absolute, `..`)
                # is never opened. Symlinks the user placed in the folder are followed: their own choice.
                if not isinstance(rel, str) or not _inside(base, rel):
                    invalid.invalid(f"file {rel}", f"outside the dataset folder {root} (patient {patient})")
                    continue
                if not (root / rel).is_file():
                    invalid.invalid(f"file {rel}", f"not found (patient {patient}, slide {slide_id})")
                    continue
                slide_patches.append(
                    {
                        "path": root / rel,
                        "patient_id": patient,
                        "slide_id": slide_id,
                        "patch_id": rel,
                        "label": label,
                    }
                )
            if not slide_patches:
                invalid.invalid(f"slide {slide_id}", "none of its patches exists")
                continue
            patient_patches.extend(slide_patches)
        if not patient_patches:
            invalid.invalid(f"patient {patient}", "no slide with patches")
            continue
        plan[SPLIT_NAMES[split_key]].extend(patient_patches)
    return plan


def iter_rows(patches: list[dict], patch_size: tuple[int, int], invalid: InvalidItems) -> Iterator[dict]:
    """Read the planned patches lazily, yielding dataset rows; unreadable files go to ``invalid``."""
    for patch in patches:
        try:
            image = read_srh_patch(patch["path"], patch_size)
        except ValueError as error:
            invalid.invalid(f"file {patch['patch_id']}", str(error))
            continue
        yield {
            "image": image,
            "patient_id": patch["patient_id"],
            "slide_id": patch["slide_id"],
            "patch_id": patch["patch_id"],
            "label": patch["label"],
            "source": "opensrh",
        }


def convert(config: Config) -> ConversionSummary:
    """Convert the release at ``source.root`` as the command line says."""
    source = config.source
    root = Path(source.root)
    if not root.is_dir():
        raise ConversionError(f"root {root}: not a folder")
    classes = list(source.classes)
    meta = read_json(root / source.meta_file, "metadata")
    split_map = read_json(root / source.split_file, "split file")
    invalid = InvalidItems(skip_invalid=config.output.skip_invalid)
    plan = plan_opensrh(root, meta, split_map, classes, source.include_nondiagnostic, invalid)
    listed = {p for patients in split_map.values() for p in patients}
    unsplit = sorted(set(meta) - listed)
    patient_labels = {p["patient_id"]: p["label"] for patches in plan.values() for p in patches}
    patient_split = {p["patient_id"]: split for split, patches in plan.items() for p in patches}
    print(describe_splits(patient_labels, patient_split, f"split file {source.split_file}"), flush=True)
    patch_size = (source.patch_size, source.patch_size)
    features = features_for("srh", classes, patch_size=patch_size)
    return write_patch_dataset(
        {split: iter_rows(patches, patch_size, invalid) for split, patches in plan.items()},
        features,
        invalid=invalid,
        title="OpenSRH (HLSS patient-slide-patch layout)",
        source=f"OpenSRH release folder `{root.resolve().name}` (metadata `{source.meta_file}`, split `{source.split_file}`)"
        + (", nondiagnostic patches included" if source.include_nondiagnostic else "")
        + (
            f"; {len(unsplit)} patient(s) of the metadata are in no split and were left out"
            if unsplit
            else ""
        ),
        description="Stimulated Raman histology of brain tumours (OpenSRH); patient-level diagnosis labels.",
        totals={split: len(patches) for split, patches in plan.items()},
        **config.output.write_kwargs(),
    )


@dataclass
class OpenSRHSource(Section):
    """The OpenSRH release and what to take from it."""

    section: ClassVar[str] = "source"
    required: ClassVar[tuple[str, ...]] = ("root",)

    root: str | None = None
    """The OpenSRH release folder (the command line's one bare value)."""
    meta_file: str = "meta/opensrh.json"
    """Metadata JSON, relative to root (the HLSS reference read the unreleased meta/updated2_opensrh.json)."""
    split_file: str = "meta/train_val_split.json"
    """Split JSON, relative to root (the HLSS reference read the unreleased meta/updated2_train_val_split.json)."""
    include_nondiagnostic: bool = False
    """Also convert nondiagnostic patches."""
    patch_size: int = 300
    """Patch side in pixels (all patches must match)."""
    classes: list[str] = field(default_factory=lambda: list(OPENSRH_CLASSES))
    """Class names, in label order."""


@dataclass
class OpenSRHConfig(ConverterConfig):
    positional: ClassVar[str] = "source.root"
    source: OpenSRHSource = field(default_factory=OpenSRHSource)
    output: OutputConfig = field(default_factory=OutputConfig)


def build_parser() -> ArgumentParser:
    """The command line's parser (its help lists every key)."""
    return build_config_parser(OpenSRHConfig, __doc__.split("\n\n")[0])


def main(argv: list[str] | None = None) -> ConversionSummary:
    return run_converter(convert, OpenSRHConfig, argv, __doc__.split("\n\n")[0])


if __name__ == "__main__":
    main()
