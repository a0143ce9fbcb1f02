"""Build a small synthetic patient-slide-patch dataset in seconds, without downloads.

    python dataset_scripts/demo.py --output data/demo
    python dataset_scripts/demo.py --output data/demo-srh --modality srh --num-patients 12

The generator is :func:`hlss_hf.data.demo.build_demo_dataset` (what ``python train.py`` trains on when no dataset
is given); docs/data.md describes the data.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path

# A converter needs none of hlss_hf's Auto classes: importing it registers none, nor loads torch for them.
HLSS_HF_PARSE_FIRST = True

try:
    import hlss_hf  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# The generator's internals are imported too because tests/test_dataset_scripts.py reads them through this script
# (`demo._render_patch`); drop them once it imports hlss_hf.data.demo.
from hlss_hf.data.demo import (  # noqa: F401
    DEMO_CLASSES,
    PHRASES,
    _class_params,
    _render_patch,
    _slide_stain,
    build_demo_dataset,
    drawn_terms,
)
from hlss_hf.errors import ConversionError, OutputInUseError
from hlss_hf.publishing import add_image_format_argument


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    # The defaults are build_demo_dataset's, which are the demo's (python train.py): one place to change them.
    default = {k: v.default for k, v in inspect.signature(build_demo_dataset).parameters.items()}
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    destination = parser.add_mutually_exclusive_group(required=True)
    destination.add_argument("--output", help="destination folder (save_to_disk layout + README.md card)")
    destination.add_argument("--push-to-hub", metavar="REPO_ID", help="push to this Hub dataset repo instead")
    parser.add_argument("--private", action="store_true", help="create the Hub repo private")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    parser.add_argument(
        "--modality", choices=("he", "srh"), default=default["modality"], help="H&E RGB or 2-channel SRH"
    )
    parser.add_argument("--num-patients", type=int, default=default["num_patients"], help="patients in all")
    parser.add_argument("--num-classes", type=int, default=default["num_classes"], help="classes")
    low, high = default["slides_per_patient"]
    parser.add_argument("--min-slides", type=int, default=low, help="fewest slides per patient")
    parser.add_argument("--max-slides", type=int, default=high, help="most slides per patient")
    parser.add_argument(
        "--patches-per-slide", type=int, default=default["patches_per_slide"], help="patches per slide"
    )
    parser.add_argument("--patch-size", type=int, default=default["patch_size"], help="patch side, pixels")
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=default["val_fraction"],
        help="fraction of patients per class in validation",
    )
    parser.add_argument(
        "--align-fraction",
        type=float,
        default=default["align_fraction"],
        help="fraction of patients per class in align (image-caption pairs for the alignment stage; 0: none)",
    )
    parser.add_argument("--seed", type=int, default=default["seed"], help="the data depends on it only")
    add_image_format_argument(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        dataset = build_demo_dataset(
            args.output,
            num_patients=args.num_patients,
            num_classes=args.num_classes,
            slides_per_patient=(args.min_slides, args.max_slides),
            patches_per_slide=args.patches_per_slide,
            patch_size=args.patch_size,
            modality=args.modality,
            val_fraction=args.val_fraction,
            align_fraction=args.align_fraction,
            seed=args.seed,
            overwrite=args.overwrite,
            show_progress=True,
            push_to_hub=args.push_to_hub,
            private=args.private,
            image_format=args.image_format,
        )
    except (ConversionError, OutputInUseError, ValueError) as error:
        sys.exit(f"error: {error}")
    for split, ds in dataset.items():
        print(
            f"{split}: {len(set(ds['patient_id']))} patients, {len(set(ds['slide_id']))} slides, {len(ds)} patches"
        )
    print(
        f"wrote {args.output}"
        if args.output
        else f"pushed to https://huggingface.co/datasets/{args.push_to_hub}"
    )


if __name__ == "__main__":
    main()
