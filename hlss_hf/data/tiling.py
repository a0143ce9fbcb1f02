"""Cut whole-slide images into tissue patches (used by ``dataset_scripts/wsi.py`` and ``tcga.py``).

Tissue is found on a thumbnail: a pixel is tissue when its HSV saturation exceeds an Otsu threshold
(clipped to a sensible range, so that slides that are all tissue or all glass still work) and it is
neither near-black nor near-white. Tiles are laid on a non-overlapping grid at a target resolution
(``mpp``: the best pyramid level is read and resized) or at a given pyramid ``level``; tiles whose tissue
fraction is below ``min_tissue`` are dropped. Slides are read with OpenSlide (SVS, generic tiled TIFF, ...).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from hlss_hf.cli import Section, check
from hlss_hf.data.dataset_card import InvalidItems
from hlss_hf.data.writer import encode_image
from hlss_hf.errors import ConfigError

#: Otsu's threshold on saturation is clipped to this range: below it glass noise counts as tissue,
#: above it pale (but real) tissue would be lost when a slide is mostly tissue.
SATURATION_RANGE = (0.04, 0.15)
#: Thumbnail pixels per tile side: enough to estimate a tissue fraction.
THUMBNAIL_PIXELS_PER_TILE = 8
#: Largest thumbnail side, so huge slides do not blow up memory.
MAX_THUMBNAIL_SIDE = 8192


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 1] (maximises the between-class variance), numpy only."""
    hist, edges = np.histogram(values.ravel(), bins=bins, range=(0.0, 1.0))
    hist = hist.astype(np.float64)
    centers = (edges[:-1] + edges[1:]) / 2
    weight0 = np.cumsum(hist)
    weight1 = weight0[-1] - weight0
    mean0 = np.cumsum(hist * centers) / np.maximum(weight0, 1e-12)
    mean1 = ((hist * centers).sum() - np.cumsum(hist * centers)) / np.maximum(weight1, 1e-12)
    between = weight0 * weight1 * (mean0 - mean1) ** 2
    return float(centers[int(np.argmax(between))])


def tissue_mask(rgb: np.ndarray) -> np.ndarray:
    """Boolean ``(H, W)`` tissue mask of an ``(H, W, 3)`` uint8 RGB thumbnail."""
    rgb = rgb.astype(np.float32) / 255.0
    high, low = rgb.max(axis=-1), rgb.min(axis=-1)
    saturation = np.where(high > 0, (high - low) / np.maximum(high, 1e-6), 0.0)
    threshold = float(np.clip(otsu_threshold(saturation), *SATURATION_RANGE))
    # Near-black (pen marks, scanner borders) and near-white (glass) pixels are never tissue.
    return (saturation > threshold) & (high > 0.15) & (low < 0.92)


@dataclass
class TilingOptions:
    """How to cut slides into patches: the fields of :class:`TilingConfig`, and ``image_format``, how tiles leave
    the worker: ``"png"`` bytes (encoded in the worker, so in parallel) or ``"raw"`` uint8 arrays (for a raw H&E
    dataset, no encoding at all)."""

    patch_size: int = 256
    mpp: float | None = None
    level: int | None = None
    min_tissue: float = 0.5
    max_tiles_per_slide: int | None = None
    seed: int = 0
    image_format: str = "png"

    def __post_init__(self) -> None:
        if self.image_format not in ("png", "raw"):
            raise ValueError(f"image_format must be 'png' or 'raw', got {self.image_format!r}")
        if self.patch_size < 8:
            raise ValueError(f"patch_size must be at least 8, got {self.patch_size}")
        if self.mpp is not None and self.level is not None:
            raise ValueError("give mpp or level, not both")
        if self.mpp is not None and not self.mpp > 0:
            raise ValueError(f"mpp must be positive, got {self.mpp}")
        if self.level is not None and self.level < 0:
            raise ValueError(f"level must be >= 0, got {self.level}")
        if not 0.0 <= self.min_tissue <= 1.0:
            raise ValueError(f"min_tissue must be in [0, 1], got {self.min_tissue}")
        if self.max_tiles_per_slide is not None and self.max_tiles_per_slide < 1:
            raise ValueError(f"max_tiles_per_slide must be positive, got {self.max_tiles_per_slide}")


@dataclass
class SlideTask:
    """One slide to tile, with the ids and label its rows carry."""

    path: str
    patient_id: str
    slide_id: str
    label: str
    source: str
    split: str = ""


@dataclass
class SlideResult:
    """The tiles of one slide (``rows``, PNG-encoded or raw arrays) or why it failed (``error``)."""

    task: SlideTask
    rows: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    num_candidates: int = 0


@dataclass
class TilingConfig(Section):
    """How slides are cut into patches (:class:`TilingOptions`), and how many are tiled at once."""

    section: ClassVar[str] = "tiling"

    patch_size: int = 256
    """Patch side in pixels."""
    mpp: float | None = None
    """Target microns per pixel (best level, then resized)."""
    level: int | None = None
    """Read this pyramid level as is (null: level 0, unless mpp)."""
    min_tissue: float = 0.5
    """Minimal tissue fraction of a kept tile."""
    max_tiles_per_slide: int | None = None
    """Keep at most N tiles per slide (seeded subset)."""
    num_workers: int = 1
    """Slides tiled in parallel (processes)."""
    seed: int = 0
    """Seed for tile subsets and random splits."""

    def validate(self) -> None:
        super().validate()
        check(self.num_workers >= 1, self.key("num_workers"), "must be >= 1")
        self.options()  # TilingOptions' own checks, up front

    def options(self, image_format: str | None = None) -> TilingOptions:
        """These settings as :class:`TilingOptions`, tiles leaving the workers as `image_format` (default PNG)."""
        try:
            return TilingOptions(
                patch_size=self.patch_size,
                mpp=self.mpp,
                level=self.level,
                min_tissue=self.min_tissue,
                max_tiles_per_slide=self.max_tiles_per_slide,
                seed=self.seed,
                image_format=image_format or "png",
            )
        except ValueError as error:
            raise ConfigError(f"config key '{self.section}': {error}") from None


def _slide_mpp(slide: Any) -> float:
    import openslide

    value = slide.properties.get(openslide.PROPERTY_NAME_MPP_X)
    try:
        mpp = float(value)
    except (TypeError, ValueError):
        return math.nan
    return mpp if mpp > 0 else math.nan


def _objective_power(slide: Any) -> float:
    import openslide

    try:
        return float(slide.properties.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER))
    except (TypeError, ValueError):
        return math.nan


def _to_rgb(region: Image.Image) -> np.ndarray:
    # OpenSlide returns premultiplied RGBA; transparent pixels (outside the scanned area) become white.
    rgba = np.asarray(region)
    rgb = rgba[..., :3].copy()
    rgb[rgba[..., 3] == 0] = 255
    return rgb


def tile_slide(task: SlideTask, options: TilingOptions) -> SlideResult:
    """Tile one slide; never raises for a bad slide (the error goes in the result, for the parent to report).

    The result's rows carry the ``image`` as ``{"bytes": PNG, "path": None}`` (or a uint8 array with
    ``image_format="raw"``) plus ids, label and provenance (``x``, ``y`` in level-0 pixels, ``level``, ``mpp``,
    ``magnification``, ``source``).
    """
    try:
        return _tile_slide(task, options)
    except Exception as error:  # OpenSlide and PIL raise many types for broken files
        return SlideResult(task, error=f"{type(error).__name__}: {error}")


def _tile_slide(task: SlideTask, options: TilingOptions) -> SlideResult:
    import openslide

    with openslide.OpenSlide(task.path) as slide:
        mpp0 = _slide_mpp(slide)
        power0 = _objective_power(slide)
        width0, height0 = slide.dimensions
        if options.mpp is not None:
            if math.isnan(mpp0):
                return SlideResult(
                    task, error="no microns-per-pixel in the slide metadata; use --level instead"
                )
            # The coarsest level still at least as fine as the target, then resize down to the target.
            candidates = [i for i, d in enumerate(slide.level_downsamples) if mpp0 * d <= options.mpp * 1.01]
            level = max(candidates) if candidates else 0
            out_mpp = options.mpp
        else:
            level = options.level or 0
            if level >= slide.level_count:
                return SlideResult(task, error=f"level {level} requested, slide has {slide.level_count}")
            out_mpp = mpp0 * slide.level_downsamples[level]
        downsample = slide.level_downsamples[level]
        # Output pixels -> level-0 pixels; with --level it is just the level's downsample.
        scale0 = out_mpp / mpp0 if options.mpp is not None else downsample
        step0 = options.patch_size * scale0  # tile side in level-0 pixels
        read_size = max(1, round(step0 / downsample))  # tile side at the level read
        cols, rows_ = int(width0 // step0), int(height0 // step0)
        if cols == 0 or rows_ == 0:
            return SlideResult(
                task, error=f"slide {width0}x{height0} is smaller than one tile ({step0:.0f} px)"
            )

        thumb_scale = THUMBNAIL_PIXELS_PER_TILE / step0
        thumb_w = max(1, min(MAX_THUMBNAIL_SIDE, round(width0 * thumb_scale)))
        thumb_h = max(1, min(MAX_THUMBNAIL_SIDE, round(height0 * thumb_scale)))
        thumb = np.asarray(slide.get_thumbnail((thumb_w, thumb_h)).convert("RGB"))
        mask = tissue_mask(thumb)
        sx, sy = mask.shape[1] / width0, mask.shape[0] / height0  # level-0 -> thumbnail

        kept = []
        for r in range(rows_):
            for c in range(cols):
                x0, y0 = c * step0, r * step0
                window = mask[
                    int(y0 * sy) : max(int((y0 + step0) * sy), int(y0 * sy) + 1),
                    int(x0 * sx) : max(int((x0 + step0) * sx), int(x0 * sx) + 1),
                ]
                if window.size and window.mean() >= options.min_tissue:
                    kept.append((int(round(x0)), int(round(y0))))
        num_candidates = len(kept)
        if options.max_tiles_per_slide is not None and len(kept) > options.max_tiles_per_slide:
            # crc32, not hash(): str hashes differ between processes.
            rng = np.random.default_rng([options.seed, zlib.crc32(task.slide_id.encode())])
            keep = np.sort(rng.choice(len(kept), options.max_tiles_per_slide, replace=False))
            kept = [kept[i] for i in keep]

        # The objective power equivalent to the patch's resolution (20x slide read at 1 mpp -> ~10x).
        magnification = power0 / downsample if options.mpp is None else power0 * mpp0 / out_mpp
        result = SlideResult(task, num_candidates=num_candidates)
        for x0, y0 in kept:
            region = slide.read_region((x0, y0), level, (read_size, read_size))
            if read_size != options.patch_size:
                region = region.resize((options.patch_size, options.patch_size), Image.Resampling.LANCZOS)
            result.rows.append(
                {
                    "image": encode_image(_to_rgb(region), "he", png=options.image_format == "png"),
                    "patient_id": task.patient_id,
                    "slide_id": task.slide_id,
                    "patch_id": f"{task.slide_id}/{x0}_{y0}",
                    "label": task.label,
                    "x": x0,
                    "y": y0,
                    "level": level,
                    "mpp": out_mpp,
                    "magnification": magnification,
                    "source": task.source,
                }
            )
        return result


def tile_slides(tasks: list[SlideTask], options: TilingOptions, num_workers: int = 1):
    """Tile slides, in parallel processes when ``num_workers > 1``; yields :class:`SlideResult` in task order.

    At most ``2 * num_workers`` slides are in flight, so memory stays bounded by a few slides' tiles.
    """
    if num_workers <= 1:
        for task in tasks:
            yield tile_slide(task, options)
        return
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor

    pool = ProcessPoolExecutor(max_workers=num_workers)
    try:
        pending: deque = deque()
        iterator = iter(tasks)
        for task in iterator:
            pending.append(pool.submit(tile_slide, task, options))
            if len(pending) >= 2 * num_workers:
                break
        while pending:
            result = pending.popleft().result()
            next_task = next(iterator, None)
            if next_task is not None:
                pending.append(pool.submit(tile_slide, next_task, options))
            yield result
    finally:
        # When the consumer stops early (an invalid slide), queued slides are not tiled for nothing.
        pool.shutdown(wait=True, cancel_futures=True)


def tiled_rows(
    tasks: list[SlideTask], options: TilingOptions, num_workers: int, invalid: InvalidItems
) -> Iterator[dict[str, Any]]:
    """The rows of :func:`tile_slides`; failed or empty slides go to ``invalid``."""
    for result in tile_slides(tasks, options, num_workers):
        item = f"slide {result.task.slide_id}"
        if result.error is not None:
            invalid.invalid(item, f"cannot tile {result.task.path}: {result.error}")
        elif not result.rows:
            invalid.invalid(item, f"no tissue tiles (--min-tissue {options.min_tissue})")
        else:
            yield from result.rows
