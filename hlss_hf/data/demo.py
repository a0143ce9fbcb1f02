"""The synthetic demo dataset: procedural H&E or SRH patches of a patient-slide-patch hierarchy, with captions, in
memory or written as the converters write (docs/data.md, "The demo's data").

Example:

```python
>>> from hlss_hf.data.demo import build_demo_dataset
>>> dataset = build_demo_dataset()  # datasets.DatasetDict with "train", "validation" and "align"
```
"""

from __future__ import annotations

import colorsys
import inspect
import math
from collections.abc import Iterator
from pathlib import Path

import datasets
import numpy as np

from hlss_hf.data.converters import validation_count
from hlss_hf.data.schema import features_for
from hlss_hf.data.writer import write_patch_dataset

#: Class names of the demo (in label order) when ``num_classes`` is 3; otherwise ``class_0``, ``class_1``...
DEMO_CLASSES: tuple[str, ...] = ("normal", "low_grade", "high_grade")


#: ``train`` and ``validation`` for HLSS pretraining and its evaluation; ``align``: patients held apart for the image-text
#: alignment that HLSS starts from (``configs/demo_align.yaml``), disjoint from the other two.
SPLITS: tuple[str, ...] = ("train", "validation", "align")


def demo_class_names(num_classes: int) -> list[str]:
    """The demo's class names for ``num_classes`` classes."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    return (
        list(DEMO_CLASSES) if num_classes == len(DEMO_CLASSES) else [f"class_{i}" for i in range(num_classes)]
    )


# Per class: nuclear radius (px at 64 px patches), elongation, irregularity of the outline, chromatin texture
# strength, and arrangement. The nuclear area fraction and the stain darkness are drawn per patient from the
# same ranges for every class, so colour and mean darkness carry (almost) no class information: the class is
# in the nuclei's size, shape, texture and arrangement.
_MORPHOLOGY: tuple[dict[str, float | str], ...] = (
    # normal: small, round, smooth, evenly spaced nuclei.
    {"radius": 2.6, "elongation": 1.1, "irregularity": 0.0, "chromatin": 0.1, "arrangement": "even"},
    # low grade: elongated spindle nuclei aligned in streams.
    {"radius": 3.0, "elongation": 2.6, "irregularity": 0.05, "chromatin": 0.25, "arrangement": "aligned"},
    # high grade: large, pleomorphic, irregular nuclei with coarse chromatin, crowded in clusters.
    {"radius": 4.4, "elongation": 1.3, "irregularity": 0.3, "chromatin": 0.7, "arrangement": "clustered"},
)


def _class_params(label: int, num_classes: int) -> dict[str, float | str]:
    # More classes than the three prototypes: interpolate the numbers, take the nearest arrangement.
    t = label / max(num_classes - 1, 1) * (len(_MORPHOLOGY) - 1)
    low = _MORPHOLOGY[int(math.floor(t))]
    high = _MORPHOLOGY[min(int(math.floor(t)) + 1, len(_MORPHOLOGY) - 1)]
    w = t - math.floor(t)
    params: dict[str, float | str] = {
        key: (1 - w) * float(low[key]) + w * float(high[key]) for key in low if key != "arrangement"
    }
    params["arrangement"] = (low if w < 0.5 else high)["arrangement"]
    return params


# ---------------------------------------------------------------------------------------------------------------
# Words for what was drawn. Each feature of a patch is named by one term; captions describe a patch in these terms,
# the shipped attribute set ``demo_morphology`` has an attribute of the same name per term and level, and
# :func:`class_terms` says which of them are true of a class's prototype (what the tests check explanations against).

#: feature -> its terms with their upper bounds: a drawn value is named by the first term whose bound it is below.
#: Radius in px at 64 px patches, elongation as length / width, size variation as the std of log radius, density as
#: the fraction of the patch covered by nuclei, stroma as the mean stroma stain showing between them.
TERM_BOUNDS: dict[str, tuple[tuple[str, float], ...]] = {
    "radius": (("small_nuclei", 2.8), ("medium_nuclei", 3.6), ("large_nuclei", math.inf)),
    "elongation": (("round_nuclei", 1.2), ("oval_nuclei", 1.8), ("spindle_nuclei", math.inf)),
    "irregularity": (("smooth_outlines", 0.15), ("irregular_outlines", math.inf)),
    "chromatin": (("fine_chromatin", 0.4), ("coarse_chromatin", math.inf)),
    "size_variation": (("uniform_size", 0.16), ("variable_size", math.inf)),
    "density": (("sparse_nuclei", 0.12), ("moderate_density", 0.22), ("dense_nuclei", math.inf)),
    "stroma": (("scant_stroma", 0.45), ("moderate_stroma", 0.6), ("abundant_stroma", math.inf)),
}


ARRANGEMENT_TERMS: dict[str, str] = {
    "even": "even_spacing",
    "aligned": "parallel_streams",
    "clustered": "crowded_clusters",
}


#: The features a class sets; density and stroma follow from the patient's and slide's draws (the same ranges for
#: every class) and from how much of the patch the nuclei cover.
CLASS_FEATURES: tuple[str, ...] = (
    "radius",
    "elongation",
    "irregularity",
    "chromatin",
    "size_variation",
    "arrangement",
)


#: Caption wordings of each term; each patch's caption picks one per term.
PHRASES: dict[str, tuple[str, ...]] = {
    "small_nuclei": ("small", "tiny"),
    "medium_nuclei": ("medium-sized", "mid-sized"),
    "large_nuclei": ("large", "enlarged"),
    "round_nuclei": ("round", "rounded"),
    "oval_nuclei": ("oval", "ovoid"),
    "spindle_nuclei": ("elongated, spindle-shaped", "slender, spindle-shaped"),
    "smooth_outlines": ("smooth nuclear outlines", "smooth, regular nuclear contours"),
    "irregular_outlines": ("irregular nuclear outlines", "irregular, notched nuclear contours"),
    "fine_chromatin": ("fine chromatin", "delicate, finely granular chromatin"),
    "coarse_chromatin": ("coarse chromatin", "coarse, clumped chromatin"),
    "uniform_size": ("uniform in size", "all of a similar size"),
    "variable_size": ("varying in size", "of unequal, variable sizes"),
    "even_spacing": ("evenly spaced", "spaced at regular intervals"),
    "parallel_streams": ("aligned in parallel streams", "running in streaming rows"),
    "crowded_clusters": ("crowded in clusters", "bunched into tight clusters"),
    "sparse_nuclei": ("sparse", "scattered"),
    "moderate_density": ("moderately dense", "fairly numerous"),
    "dense_nuclei": ("densely packed", "dense"),
    "scant_stroma": ("scant, pale stroma", "little stroma"),
    "moderate_stroma": ("a moderate amount of stroma", "some fibrous stroma"),
    "abundant_stroma": ("abundant fibrous stroma", "plenty of wavy stroma"),
}


_CAPTIONS: tuple[str, ...] = (
    "{density} {radius}, {elongation} nuclei with {irregularity} and {chromatin}, {size_variation} and "
    "{arrangement}, in {stroma}.",
    "Nuclei are {radius}, {elongation}, {size_variation} and {arrangement}; they have {chromatin} and "
    "{irregularity}. The nuclei are {density}, set in {stroma}.",
    "A field of {density} nuclei, {radius} and {elongation}, {arrangement} and {size_variation}, showing "
    "{irregularity} and {chromatin}, within {stroma}.",
    "{stroma} around {radius}, {elongation} nuclei {arrangement}; they are {density}, {size_variation}, with "
    "{chromatin} and {irregularity}.",
)


def _term(feature: str, value: float | str) -> str:
    if feature == "arrangement":
        return ARRANGEMENT_TERMS[str(value)]
    return next(term for term, bound in TERM_BOUNDS[feature] if float(value) < bound)


def describe(drawn: dict[str, float | str]) -> dict[str, str]:
    """Feature -> term for what was drawn in a patch (``_render_patch``'s second result)."""
    return {feature: _term(feature, drawn[feature]) for feature in ("arrangement", *TERM_BOUNDS)}


def class_terms(label: int, num_classes: int = len(DEMO_CLASSES)) -> set[str]:
    """The terms true of class ``label``'s prototype: what the generator draws for every patient of the class
    before patient, slide and patch variation (size variation: the class's log-radius spread)."""
    params = dict(_class_params(label, num_classes))
    params["size_variation"] = 0.1 + 0.5 * float(params["irregularity"])
    return {_term(feature, params[feature]) for feature in CLASS_FEATURES}


def contradicted_terms(label: int, num_classes: int = len(DEMO_CLASSES)) -> set[str]:
    """The terms that contradict class ``label``: the other terms of the features a class sets (a low-grade patch is
    drawn with spindle nuclei, so "round" contradicts it); terms of the features the class leaves free (density,
    stroma) contradict no class."""
    every = {
        term
        for feature in CLASS_FEATURES
        for term in (
            ARRANGEMENT_TERMS.values() if feature == "arrangement" else (t for t, _ in TERM_BOUNDS[feature])
        )
    }
    return every - class_terms(label, num_classes)


def caption(drawn: dict[str, float | str], rng: np.random.Generator) -> str:
    """One sentence describing what was drawn in a patch, in a wording chosen by ``rng``; never a class name."""
    words = {
        feature: PHRASES[term][rng.integers(len(PHRASES[term]))] for feature, term in describe(drawn).items()
    }
    text = _CAPTIONS[rng.integers(len(_CAPTIONS))].format(**words)
    return text[0].upper() + text[1:]


def _slide_stain(rng: np.random.Generator, modality: str) -> np.ndarray:
    """Per-slide stain: optical-density vectors of the nuclear and stroma stains, ``[2, channels]``.

    H&E: a slide-wide hue rotation of up to a quarter turn either way (both stains), independent hue jitter,
    saturation and strength; SRH: per-channel gains of the two "stains" (lipid, protein / nucleic acid).
    """
    if modality == "srh":
        return rng.uniform(0.7, 1.3, (2, 2)).astype(np.float32)
    rotation = rng.uniform(-0.25, 0.25)
    stains = []
    for base_hue, strength in ((0.72, rng.uniform(0.9, 1.6)), (0.93, rng.uniform(0.35, 0.8))):
        hue = (base_hue + rotation + rng.normal(0, 0.03)) % 1.0
        colour = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.45, 0.9), 1.0), np.float32)
        # Optical density of the stain colour (Beer-Lambert), scaled to the slide's staining strength.
        od = -np.log(np.clip(colour * 0.85 + 0.05, 0.05, 1.0))
        stains.append(strength * od / max(float(od.max()), 1e-6))
    return np.stack(stains).astype(np.float32)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth noise in [0, 1]: a ``cells x cells`` random grid upsampled bilinearly to ``size x size``."""
    grid = rng.random((cells + 1, cells + 1)).astype(np.float32)
    coords = np.linspace(0, cells, size, dtype=np.float32)
    i = np.minimum(coords.astype(int), cells - 1)
    f = coords - i
    rows = grid[i] * (1 - f)[:, None] + grid[i + 1] * f[:, None]
    return rows[:, i] * (1 - f)[None, :] + rows[:, i + 1] * f[None, :]


def _centres(rng: np.random.Generator, count: int, size: int, arrangement: str) -> np.ndarray:
    if arrangement == "even":
        # A jittered grid: nuclei evenly spaced, never crowded.
        side = max(1, math.ceil(math.sqrt(count)))
        cells = rng.permutation(side * side)[:count]
        step = size / side
        return (np.stack([cells % side, cells // side], axis=1) + rng.uniform(0.2, 0.8, (count, 2))) * step
    if arrangement == "clustered":
        # A few crowded groups of nuclei.
        groups = rng.uniform(0, size, (max(1, round(count / 4)), 2))
        members = groups[rng.integers(0, len(groups), count)]
        return members + rng.normal(0, size / 8, (count, 2))
    return rng.uniform(0, size, (count, 2))


def _render_patch(
    rng: np.random.Generator, size: int, params: dict, stain: np.ndarray, modality: str
) -> tuple[np.ndarray, dict[str, float | str]]:
    """One patch: stroma + nuclei as stain density maps, coloured by the slide's stain; uint8 RGB / uint16.

    Returns the image and what was drawn in it (the features of :data:`TERM_BOUNDS`, and the arrangement)."""
    scale = size / 64.0  # the morphology is defined for 64 px patches
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    # Stroma: fibre-like waves along a patient-specific direction plus smooth noise.
    angle = params["fibre_angle"] + rng.normal(0, 0.3)
    waves = np.sin(
        (np.cos(angle) * xx + np.sin(angle) * yy) * params["fibre_freq"] / scale + rng.uniform(0, 6.3)
    )
    stroma = params["stroma"] * (0.7 + 0.2 * waves + 0.3 * _smooth_noise(rng, size, 4))
    nuclei = np.zeros((size, size), np.float32)
    radius = params["radius"] * scale
    mean_area = math.pi * radius**2 * (1 + params["irregularity"])
    count = max(1, int(rng.poisson(params["coverage"] * size * size / mean_area)))
    centres = _centres(rng, count, size, params["arrangement"])
    aligned = params["arrangement"] == "aligned"
    stream = rng.uniform(0, math.pi)
    chromatin = (
        1.0 - params["chromatin"] + 2 * params["chromatin"] * _smooth_noise(rng, size, max(2, size // 3))
    )
    radii, elongations = [], []
    for cx, cy in centres:
        # Pleomorphism grows with irregularity: high-grade nuclei vary in size as well as in outline.
        r = max(0.8, radius * rng.lognormal(0.0, 0.1 + 0.5 * params["irregularity"]))
        elong = params["elongation"] * rng.uniform(0.85, 1.15)
        radii.append(r / scale)
        elongations.append(elong)
        theta = stream + rng.normal(0, 0.15) if aligned else rng.uniform(0, math.pi)
        half = int(math.ceil(r * math.sqrt(elong) * 1.5)) + 1
        x0, x1 = max(int(cx) - half, 0), min(int(cx) + half + 1, size)
        y0, y1 = max(int(cy) - half, 0), min(int(cy) + half + 1, size)
        if x0 >= x1 or y0 >= y1:
            continue
        dx, dy = xx[y0:y1, x0:x1] - cx, yy[y0:y1, x0:x1] - cy
        u = dx * math.cos(theta) + dy * math.sin(theta)
        v = -dx * math.sin(theta) + dy * math.cos(theta)
        rho = np.sqrt((u / math.sqrt(elong)) ** 2 + (v * math.sqrt(elong)) ** 2) / r
        phi = np.arctan2(v, u)
        k, phase = rng.uniform(-1, 1, 2), rng.uniform(0, 6.3, 2)
        outline = 1 + params["irregularity"] * (
            k[0] * np.cos(3 * phi + phase[0]) + k[1] * np.cos(5 * phi + phase[1])
        )
        disk = np.clip((outline - rho) * r + 0.5, 0.0, 1.0)  # soft edge about one pixel wide
        nuclei[y0:y1, x0:x1] = np.maximum(nuclei[y0:y1, x0:x1], disk)
    covered = float((nuclei > 0.5).mean())
    nuclei *= params["darkness"] * chromatin
    noise = rng.normal(0.0, 0.04, (2, size, size)).astype(np.float32)
    density = np.stack([nuclei + noise[0] * 0.3, stroma * (1 - 0.7 * np.clip(nuclei, 0, 1)) + noise[1] * 0.3])
    density = np.clip(density, 0.0, None)  # [2, H, W]: nuclear stain, stroma stain
    drawn = {
        "radius": float(np.median(radii)),
        "elongation": float(np.mean(elongations)),
        "size_variation": float(np.std(np.log(radii))) if len(radii) > 1 else 0.0,
        "density": covered,
        "stroma": float(density[1].mean()),  # the stroma stain that shows between the nuclei
        **{key: params[key] for key in ("irregularity", "chromatin", "arrangement")},
    }
    if modality == "srh":
        # CH2 (lipid-weighted) is bright in the stroma, dark in nuclei; CH3 (protein / nucleic acid) rises in both.
        ch2 = stain[0, 0] * (0.55 + 0.5 * density[1] - 0.35 * density[0])
        ch3 = stain[1, 1] * (0.35 + 0.25 * density[1] + 0.5 * density[0])
        image = np.stack([ch2, ch3], axis=-1)
        return np.clip(image * 30000.0, 0, 65535).astype(np.uint16), drawn
    od = np.einsum("khw,kc->hwc", density, stain)
    image = np.exp(-od) * params["brightness"]
    return np.clip(image * 255.0, 0, 255).astype(np.uint8), drawn


def _plan(
    num_patients: int,
    num_classes: int,
    slides_per_patient: tuple[int, int],
    val_fraction: float,
    align_fraction: float,
    rng: np.random.Generator,
) -> list[dict]:
    """Patients with class, split and slide count; the splits are stratified by class."""
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
        # Alignment patients come before the validation ones, out of what would otherwise train.
        num_align = min(len(members) - num_val - 1, math.floor(align_fraction * len(members) + 0.5))
        for position, patient in enumerate(members):
            left = len(members) - position
            patient["split"] = (
                "validation" if left <= num_val else "align" if left <= num_val + num_align else "train"
            )
    return patients


def _rows(
    patients: list[dict],
    split: str,
    class_names: list[str],
    patches_per_slide: int,
    patch_size: int,
    modality: str,
    seed: int,
    terms: dict[str, dict[str, str]] | None = None,
) -> Iterator[dict]:
    """The rows of ``split``; ``terms``, when given, receives what was drawn in each patch (patch id -> feature ->
    term, :func:`describe`)."""
    grid = max(1, math.ceil(math.sqrt(patches_per_slide)))
    for patient in patients:
        if patient["split"] != split:
            continue
        index = int(patient["patient_id"].split("P")[-1])
        # Each patient has its own generator so the data does not depend on the split or the iteration order.
        rng = np.random.default_rng([seed, index])
        base = _class_params(patient["label"], len(class_names))
        # Patient-level shifts drawn from the same ranges for every class (so they blur, not carry, the class).
        patient_params = dict(
            base,
            radius=base["radius"] * rng.uniform(0.85, 1.15),
            coverage=rng.uniform(0.12, 0.3),
            darkness=rng.uniform(0.55, 1.0),
            stroma=rng.uniform(0.4, 1.0),
            fibre_angle=rng.uniform(0, math.pi),
            fibre_freq=rng.uniform(0.15, 0.6),
        )
        # Caption wordings from a generator of their own: the images do not depend on the captions.
        words = np.random.default_rng([seed, index, 1])
        for slide in range(patient["num_slides"]):
            slide_id = f"{patient['patient_id']}-S{slide + 1}"
            # Slide-level variation: the stain (hue, saturation, strength), brightness, a small density change.
            stain = _slide_stain(rng, modality)
            slide_params = dict(
                patient_params,
                coverage=patient_params["coverage"] * rng.uniform(0.85, 1.15),
                brightness=rng.uniform(0.85, 1.0),
            )
            for patch in range(patches_per_slide):
                row, col = divmod(patch, grid)
                image, drawn = _render_patch(rng, patch_size, slide_params, stain, modality)
                if terms is not None:
                    terms[f"{slide_id}-{patch:03d}"] = describe(drawn)
                yield {
                    "image": image,
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
                    "caption": caption(drawn, words),
                }


def _patients(
    num_patients: int,
    num_classes: int,
    slides_per_patient: tuple[int, int],
    patches_per_slide: int,
    patch_size: int,
    val_fraction: float,
    align_fraction: float,
    seed: int,
) -> tuple[list[dict], list[str]]:
    """The checked arguments' patient plan (:func:`_plan`) and class names."""
    if num_patients < num_classes:
        raise ValueError(f"num_patients ({num_patients}) must be at least num_classes ({num_classes})")
    low, high = slides_per_patient
    if not 1 <= low <= high:
        raise ValueError(
            f"slides_per_patient must be (low, high) with 1 <= low <= high, got {slides_per_patient}"
        )
    if patches_per_slide < 1 or patch_size < 8:
        raise ValueError("patches_per_slide must be >= 1 and patch_size >= 8")
    for name, fraction in (("val_fraction", val_fraction), ("align_fraction", align_fraction)):
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {fraction}")
    class_names = demo_class_names(num_classes)
    rng = np.random.default_rng(seed)
    return _plan(num_patients, num_classes, (low, high), val_fraction, align_fraction, rng), class_names


def drawn_terms(split: str = "validation", modality: str = "he", **kwargs) -> dict[str, dict[str, str]]:
    """What the generator drew in each patch of a split of :func:`build_demo_dataset` (``kwargs``: its data
    arguments), in the words of the captions: patch id -> feature -> term (:data:`TERM_BOUNDS`)."""
    arguments = {
        name: value.default
        for name, value in inspect.signature(build_demo_dataset).parameters.items()
        if name in inspect.signature(_patients).parameters
    }
    arguments.update(kwargs)
    patients, class_names = _patients(**arguments)
    terms: dict[str, dict[str, str]] = {}
    rows = _rows(
        patients,
        split,
        class_names,
        arguments["patches_per_slide"],
        arguments["patch_size"],
        modality,
        arguments["seed"],
        terms,
    )
    for _ in rows:
        pass
    return terms


def build_demo_dataset(
    output_dir: str | Path | None = None,
    num_patients: int = 96,
    num_classes: int = 3,
    slides_per_patient: tuple[int, int] = (2, 3),
    patches_per_slide: int = 6,
    patch_size: int = 64,
    modality: str = "he",
    val_fraction: float = 0.25,
    align_fraction: float = 0.5,
    seed: int = 0,
    overwrite: bool = False,
    show_progress: bool = False,
    push_to_hub: str | None = None,
    private: bool = False,
    image_format: str | None = None,
) -> datasets.DatasetDict:
    """Build the synthetic demo hierarchy: a ``DatasetDict`` with the :data:`SPLITS` that have patients, with a
    ``caption`` column (docs/data.md, "The demo's data"). The data is a function of the arguments only.

    Args:
        output_dir (`str` or `Path`, *optional*): also write it there, as the converters do; by default the
            dataset is only built in memory. ``push_to_hub`` (with ``private``) pushes it there instead.
        num_patients (`int`, defaults to 96): patients, assigned to classes round-robin.
        slides_per_patient (`(int, int)`, defaults to `(2, 3)`): inclusive range of slides per patient.
        modality (`str`, defaults to `"he"`): ``"he"`` (uint8 RGB PNG) or ``"srh"`` (2-channel uint16).
        val_fraction (`float`, defaults to 0.25): fraction of each class's patients in ``validation``.
        align_fraction (`float`, defaults to 0.5): fraction of each class's patients in ``align`` (image-caption
            pairs for the alignment stage before HLSS; 0: no such split). Every class keeps a training patient.
        image_format (`str`, *optional*): H&E storage, ``"png"`` (the default) or ``"raw"``
            (:func:`hlss_hf.data.schema.features_for`).

    The defaults are the demo's: ``python train.py`` trains and evaluates on exactly what
    ``python dataset_scripts/demo.py --output DIR`` writes.
    """
    if output_dir is not None and push_to_hub is not None:
        raise ValueError("give output_dir or push_to_hub, not both")
    patients, class_names = _patients(
        num_patients,
        num_classes,
        slides_per_patient,
        patches_per_slide,
        patch_size,
        val_fraction,
        align_fraction,
        seed,
    )
    features = features_for(
        modality, class_names, patch_size=patch_size, image_format=image_format, caption=True
    )
    splits = [s for s in SPLITS if any(p["split"] == s for p in patients)]

    def rows(split: str) -> Iterator[dict]:
        return _rows(patients, split, class_names, patches_per_slide, patch_size, modality, seed)

    def in_memory() -> datasets.DatasetDict:
        return datasets.DatasetDict(
            {split: datasets.Dataset.from_list(list(rows(split)), features=features) for split in splits}
        )

    if output_dir is None and push_to_hub is None:
        return in_memory()
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
    if push_to_hub is not None:  # what was pushed, as build_demo_dataset() builds it
        return in_memory()
    return datasets.load_from_disk(str(output_dir))
