"""Build a small synthetic patient-slide-patch dataset in seconds, without downloads.

    python dataset_scripts/demo.py --output data/demo
    python dataset_scripts/demo.py --output data/demo-srh --modality srh --num-patients 12

Patches are procedural tissue-like textures: nuclei-like dark blobs on a stroma-like background. The class
sets nuclear density, size and colour (the patient-level signal); each patient and slide perturbs them
(hierarchical variation); each patch adds its own placement and noise. ``--modality he`` gives uint8 RGB
patches (stored as PNG), ``--modality srh`` 2-channel uint16 SRH-like patches ``[CH2, CH3]``.

The same data is available in Python, e.g. for training when no dataset is given:

    from dataset_scripts.demo import build_demo_dataset
    dataset = build_demo_dataset()          # datasets.DatasetDict with "train" and "validation"
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

try:
    import hlss_hf  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import datasets

from hlss_hf.publishing import ConversionError, validation_count, write_patch_dataset
from hlss_hf.schema import features_for

#: Class names of the demo (in label order) when ``num_classes`` is 3; otherwise ``class_0``, ``class_1``...
DEMO_CLASSES: tuple[str, ...] = ("normal", "low_grade", "high_grade")
SPLITS: tuple[str, ...] = ("train", "validation")


def demo_class_names(num_classes: int) -> list[str]:
    """The demo's class names for ``num_classes`` classes."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    return (
        list(DEMO_CLASSES) if num_classes == len(DEMO_CLASSES) else [f"class_{i}" for i in range(num_classes)]
    )


def _class_params(label: int, num_classes: int) -> dict[str, float]:
    # Classes spread along one axis of "atypia": denser, larger, darker and bluer nuclei.
    t = label / max(num_classes - 1, 1)
    return {
        "density": 0.004 + 0.012 * t,  # nuclei per pixel
        "radius": 2.0 + 2.5 * t,
        "hue": t,  # 0: purple-pink nuclei, 1: dark blue nuclei
        "darkness": 0.45 + 0.35 * t,
    }


def _render_patch(
    rng: np.random.Generator, size: int, params: dict[str, float], stain: np.ndarray, modality: str
) -> np.ndarray:
    """One patch: background texture + nuclei disks + noise; returns uint8 RGB or uint16 2-channel."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    # Smooth stroma-like background from a few random low-frequency waves.
    background = np.zeros((size, size), np.float32)
    for _ in range(3):
        fx, fy, phase = rng.uniform(0.02, 0.12, 2).tolist() + [rng.uniform(0, 2 * math.pi)]
        background += np.sin(fx * xx + fy * yy + phase)
    background = 0.5 + 0.08 * background
    nuclei = np.zeros((size, size), np.float32)
    count = rng.poisson(params["density"] * size * size)
    centers = rng.uniform(0, size, (count, 2))
    radii = np.maximum(0.8, rng.normal(params["radius"], 0.4, count))
    elongations = rng.uniform(0.7, 1.3, count)
    for (cx, cy), radius, elong in zip(centers, radii, elongations, strict=True):
        # Only the bounding box is touched: the disk is zero beyond sqrt(1.5) * radius / 0.7 < 1.8 * radius.
        half = int(math.ceil(1.8 * radius)) + 1
        x0, x1 = max(int(cx) - half, 0), min(int(cx) + half + 1, size)
        y0, y1 = max(int(cy) - half, 0), min(int(cy) + half + 1, size)
        dist = ((xx[y0:y1, x0:x1] - cx) / elong) ** 2 + ((yy[y0:y1, x0:x1] - cy) * elong) ** 2
        disk = np.clip(1.5 - dist / radius**2, 0.0, 1.0)
        nuclei[y0:y1, x0:x1] = np.maximum(nuclei[y0:y1, x0:x1], disk)
    noise = rng.normal(0.0, 0.03, (size, size)).astype(np.float32)
    if modality == "srh":
        # CH2 (lipid-weighted) is bright in the background; CH3 (protein/nucleic) rises in nuclei.
        ch2 = stain[0] * (background - 0.35 * params["darkness"] * nuclei + noise)
        ch3 = stain[1] * (0.6 * background + 0.5 * params["darkness"] * nuclei + noise)
        image = np.stack([ch2, ch3], axis=-1)
        return np.clip(image * 30000.0, 0, 65535).astype(np.uint16)
    pink = np.array([0.93, 0.62, 0.78], np.float32)
    nucleus = (1 - params["hue"]) * np.array([0.45, 0.25, 0.6], np.float32) + params["hue"] * np.array(
        [0.2, 0.15, 0.5], np.float32
    )
    tissue = background[..., None] * 1.6 * pink * stain
    alpha = (params["darkness"] * nuclei)[..., None]
    image = (1 - alpha) * tissue + alpha * nucleus + noise[..., None]
    return np.clip(image * 255.0, 0, 255).astype(np.uint8)


def _plan(
    num_patients: int,
    num_classes: int,
    slides_per_patient: tuple[int, int],
    val_fraction: float,
    rng: np.random.Generator,
) -> list[dict]:
    """Patients with class, split and slide count; the split is stratified by class."""
    patients = []
    for index in range(num_patients):
        patients.append(
            {
                "patient_id": f"demo-P{index:03d}",
                "label": index % num_classes,
                "num_slides": int(rng.integers(slides_per_patient[0], slides_per_patient[1] + 1)),
            }
        )
    for label in range(num_classes):
        members = [p for p in patients if p["label"] == label]
        num_val = validation_count(len(members), val_fraction)
        for position, patient in enumerate(members):
            patient["split"] = "validation" if position >= len(members) - num_val else "train"
    return patients


def _rows(
    patients: list[dict],
    split: str,
    class_names: list[str],
    patches_per_slide: int,
    patch_size: int,
    modality: str,
    seed: int,
) -> Iterator[dict]:
    grid = max(1, math.ceil(math.sqrt(patches_per_slide)))
    for patient in patients:
        if patient["split"] != split:
            continue
        index = int(patient["patient_id"].split("P")[-1])
        # Each patient has its own generator so the data does not depend on the split or the iteration order.
        rng = np.random.default_rng([seed, index])
        base = _class_params(patient["label"], len(class_names))
        patient_params = {
            "density": base["density"] * rng.uniform(0.85, 1.15),
            "radius": base["radius"] * rng.uniform(0.9, 1.1),
            "hue": float(np.clip(base["hue"] + rng.normal(0, 0.05), 0, 1)),
            "darkness": base["darkness"],
        }
        for slide in range(patient["num_slides"]):
            slide_id = f"{patient['patient_id']}-S{slide + 1}"
            # Slide-level variation: stain intensity / colour balance and a small density change.
            stain = rng.uniform(0.9, 1.1, 3).astype(np.float32)
            slide_params = dict(patient_params, density=patient_params["density"] * rng.uniform(0.9, 1.1))
            for patch in range(patches_per_slide):
                row, col = divmod(patch, grid)
                yield {
                    "image": _render_patch(rng, patch_size, slide_params, stain, modality),
                    "patient_id": patient["patient_id"],
                    "slide_id": slide_id,
                    "patch_id": f"{slide_id}-{patch:03d}",
                    "label": class_names[patient["label"]],
                    "x": col * patch_size,
                    "y": row * patch_size,
                    "level": 0,
                    "mpp": math.nan,
                    "magnification": math.nan,
                    "source": "demo",
                }


def build_demo_dataset(
    output_dir: str | Path | None = None,
    num_patients: int = 24,
    num_classes: int = 3,
    slides_per_patient: tuple[int, int] = (2, 3),
    patches_per_slide: int = 8,
    patch_size: int = 64,
    modality: str = "he",
    val_fraction: float = 0.25,
    seed: int = 0,
    overwrite: bool = False,
    show_progress: bool = False,
    push_to_hub: str | None = None,
    private: bool = False,
) -> datasets.DatasetDict:
    """Build the synthetic demo hierarchy.

    Args:
        output_dir (`str` or `Path`, *optional*): also write it there, as the converters do (readable with
            ``datasets.load_from_disk(output_dir)`` or ``datasets.load_dataset(output_dir)``); by default the
            dataset is only built in memory.
        num_patients (`int`, defaults to 24): patients, assigned to classes round-robin.
        num_classes (`int`, defaults to 3): classes (at least 2).
        slides_per_patient (`(int, int)`, defaults to `(2, 3)`): inclusive range of slides per patient.
        patches_per_slide (`int`, defaults to 8): patches per slide.
        patch_size (`int`, defaults to 64): patch side in pixels.
        modality (`str`, defaults to `"he"`): ``"he"`` (uint8 RGB PNG) or ``"srh"`` (2-channel uint16).
        val_fraction (`float`, defaults to 0.25): fraction of each class's patients in ``validation``.
        seed (`int`, defaults to 0): the data is a function of the arguments and the seed only.
        overwrite (`bool`, defaults to `False`): replace an existing ``output_dir``.
        show_progress (`bool`, defaults to `False`): show progress bars.
        push_to_hub (`str`, *optional*): push the dataset (and its card) to this Hub dataset repo instead of
            writing ``output_dir``.
        private (`bool`, defaults to `False`): create that repo private.

    Returns:
        `datasets.DatasetDict` with splits ``train`` and ``validation`` (features from
        :func:`hlss_hf.schema.features_for`).
    """
    if num_patients < num_classes:
        raise ValueError(f"num_patients ({num_patients}) must be at least num_classes ({num_classes})")
    low, high = slides_per_patient
    if not 1 <= low <= high:
        raise ValueError(
            f"slides_per_patient must be (low, high) with 1 <= low <= high, got {slides_per_patient}"
        )
    if patches_per_slide < 1 or patch_size < 8:
        raise ValueError("patches_per_slide must be >= 1 and patch_size >= 8")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if output_dir is not None and push_to_hub is not None:
        raise ValueError("give output_dir or push_to_hub, not both")
    class_names = demo_class_names(num_classes)
    features = features_for(modality, class_names, patch_size=patch_size)
    patients = _plan(num_patients, num_classes, (low, high), val_fraction, np.random.default_rng(seed))
    splits = [s for s in SPLITS if any(p["split"] == s for p in patients)]

    def rows(split: str) -> Iterator[dict]:
        return _rows(patients, split, class_names, patches_per_slide, patch_size, modality, seed)

    if output_dir is None and push_to_hub is None:
        return datasets.DatasetDict(
            {split: datasets.Dataset.from_list(list(rows(split)), features=features) for split in splits}
        )
    write_patch_dataset(
        {split: rows(split) for split in splits},
        features,
        output_dir=output_dir,
        push_to_hub=push_to_hub,
        private=private,
        overwrite=overwrite,
        title=f"HLSS synthetic demo ({'H&E' if modality == 'he' else 'SRH'})",
        source="synthetic (dataset_scripts/demo.py), procedural tissue-like textures; no real patient data",
        show_progress=show_progress,
    )
    if push_to_hub is not None:
        return build_demo_dataset(
            None,
            num_patients,
            num_classes,
            slides_per_patient,
            patches_per_slide,
            patch_size,
            modality,
            val_fraction,
            seed,
        )
    return datasets.load_from_disk(str(output_dir))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    destination = parser.add_mutually_exclusive_group(required=True)
    destination.add_argument("--output", help="destination folder (save_to_disk layout + README.md card)")
    destination.add_argument("--push-to-hub", metavar="REPO_ID", help="push to this Hub dataset repo instead")
    parser.add_argument("--private", action="store_true", help="create the Hub repo private")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    parser.add_argument("--modality", choices=("he", "srh"), default="he", help="H&E RGB or 2-channel SRH")
    parser.add_argument("--num-patients", type=int, default=24)
    parser.add_argument("--num-classes", type=int, default=3)
    parser.add_argument("--min-slides", type=int, default=2, help="fewest slides per patient")
    parser.add_argument("--max-slides", type=int, default=3, help="most slides per patient")
    parser.add_argument("--patches-per-slide", type=int, default=8)
    parser.add_argument("--patch-size", type=int, default=64)
    parser.add_argument(
        "--val-fraction", type=float, default=0.25, help="fraction of patients per class in validation"
    )
    parser.add_argument("--seed", type=int, default=0)
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
            seed=args.seed,
            overwrite=args.overwrite,
            show_progress=True,
            push_to_hub=args.push_to_hub,
            private=args.private,
        )
    except (ConversionError, ValueError) as error:
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
