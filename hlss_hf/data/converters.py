"""What every converter shares: its output settings (sections ``output`` / destination on the one CLI system),
the run around a conversion, and patient-level split assignment."""

from __future__ import annotations

import contextlib
import json
import math
import sys
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from huggingface_hub import constants

from hlss_hf.cli import Config, Section, check, debug_requested, exit_on_error, parse
from hlss_hf.data.dataset_card import ConversionSummary, check_license
from hlss_hf.data.writer import check_output_dir
from hlss_hf.errors import ConfigError, ConversionError
from hlss_hf.files import command_line, output_lock

#: Accepted ``split`` values (a manifest's column, a split file's keys) -> dataset split names, in output order.
SPLIT_ALIASES = {"train": "train", "validation": "validation", "val": "validation", "test": "test"}
SPLIT_ORDER = ("train", "validation", "test")


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

    ``convert`` is the converter's body, called with its ``config_class`` (a :class:`hlss_hf.cli.Config` with an
    ``output`` section); ``argv`` defaults to ``sys.argv[1:]``; ``user_errors`` are further errors whose message
    is written for the user.
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


def read_json(path: Path, what: str) -> Any:
    """Read a JSON file, raising :class:`ConversionError` naming it (as ``what``) when missing or malformed."""
    if not path.is_file():
        raise ConversionError(f"{what} {path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConversionError(f"{what} {path}: cannot read JSON ({error})") from error


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
    when there is no validation split, why and how ``train.py`` goes on without one. ``source`` says where the
    splits came from (``"--val-fraction 0.2"``, ``"the manifest's split column"``).
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
    """Patient id -> split (``train`` / ``val_name``), stratified by label and seeded; never splits a patient.
    Each label puts :func:`validation_count` of its patients (``val_fraction`` in [0, 1)) in validation."""
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
