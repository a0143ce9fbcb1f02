"""Build a small synthetic patient-slide-patch dataset in seconds, without downloads.

    python dataset_scripts/demo.py --output_dir data/demo
    python dataset_scripts/demo.py --output_dir data/demo-srh --modality srh --num-patients 12

The generator is :func:`hlss_hf.data.demo.build_demo_dataset` (what ``python train.py`` trains on when no dataset
is given); docs/data.md describes the data.
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

# A converter needs none of hlss_hf's Auto classes: importing it registers none, nor loads torch for them.
HLSS_HF_PARSE_FIRST = True

try:
    import hlss_hf  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hlss_hf.cli import Section
from hlss_hf.data.converters import ConverterConfig, DestinationConfig, run_converter
from hlss_hf.data.demo import build_demo_dataset

# The defaults are build_demo_dataset's, which are the demo's (python train.py): one place to change them.
_DEFAULTS = {name: p.default for name, p in inspect.signature(build_demo_dataset).parameters.items()}


@dataclass
class DemoSource(Section):
    """What the synthetic data holds (the arguments of build_demo_dataset)."""

    section: ClassVar[str] = "source"

    modality: Literal["he", "srh"] = _DEFAULTS["modality"]
    """H&E RGB or 2-channel SRH."""
    num_patients: int = _DEFAULTS["num_patients"]
    """Patients in all."""
    num_classes: int = _DEFAULTS["num_classes"]
    """Classes."""
    min_slides: int = _DEFAULTS["slides_per_patient"][0]
    """Fewest slides per patient."""
    max_slides: int = _DEFAULTS["slides_per_patient"][1]
    """Most slides per patient."""
    patches_per_slide: int = _DEFAULTS["patches_per_slide"]
    """Patches per slide."""
    patch_size: int = _DEFAULTS["patch_size"]
    """Patch side, pixels."""
    val_fraction: float = _DEFAULTS["val_fraction"]
    """Fraction of patients per class in validation."""
    align_fraction: float = _DEFAULTS["align_fraction"]
    """Fraction of patients per class in align (image-caption pairs for the alignment stage; 0: none)."""
    seed: int = _DEFAULTS["seed"]
    """The data depends on it only."""
    image_format: Literal["png", "raw"] | None = None
    """H&E storage: png (default; lossless, smallest) or raw (uint8 Array3D: the same pixels, ~3.3x the bytes)."""


@dataclass
class DemoConfig(ConverterConfig):
    source: DemoSource = field(default_factory=DemoSource)
    output: DestinationConfig = field(default_factory=DestinationConfig)


def generate(config: DemoConfig) -> None:
    """Build the demo data as the command line says, and say what was written."""
    source, output = config.source, config.output
    dataset = build_demo_dataset(
        output.output_dir,
        num_patients=source.num_patients,
        num_classes=source.num_classes,
        slides_per_patient=(source.min_slides, source.max_slides),
        patches_per_slide=source.patches_per_slide,
        patch_size=source.patch_size,
        modality=source.modality,
        val_fraction=source.val_fraction,
        align_fraction=source.align_fraction,
        seed=source.seed,
        overwrite=output.overwrite_output_dir,
        show_progress=True,
        push_to_hub=output.push_to_hub,
        private=output.hub_private,
        image_format=source.image_format,
    )
    for split, ds in dataset.items():
        print(
            f"{split}: {len(set(ds['patient_id']))} patients, {len(set(ds['slide_id']))} slides, {len(ds)} patches"
        )
    print(
        f"wrote {output.output_dir}"
        if output.output_dir
        else f"pushed to https://huggingface.co/datasets/{output.push_to_hub}"
    )


def main(argv: list[str] | None = None) -> None:
    run_converter(generate, DemoConfig, argv, __doc__.split("\n\n")[0], user_errors=(ValueError,))


if __name__ == "__main__":
    main()
