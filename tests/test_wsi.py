"""The real H&E region ../shared/data/cmu_small_region.svs through dataset_scripts/wsi.py (skipped when absent)."""

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the scripts are not part of the installed package
    sys.path.insert(0, str(REPO))

from dataset_scripts import wsi  # noqa: E402
from hlss_hf.data.schema import decode_image  # noqa: E402
from hlss_hf.data.tiling import SlideTask, TilingOptions, tile_slide  # noqa: E402

SLIDE = Path(__file__).resolve().parents[2] / "shared" / "data" / "cmu_small_region.svs"
pytestmark = pytest.mark.skipif(not SLIDE.is_file(), reason=f"{SLIDE} not present")


def test_real_svs_region_gives_tissue_tiles_with_scanner_provenance(tmp_path):
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(f"slide_path,patient_id,label,split\n{SLIDE},CMU-1,skin,train\n")
    out = tmp_path / "out"
    summary = wsi.main(
        ["--manifest", str(manifest), "--output_dir", str(out), "--patch-size", "256", "--progress", "false"]
    )
    ds = datasets.load_dataset(str(out), cache_dir=str(tmp_path / "cache"))["train"]
    grid = (2220 // 256) * (2967 // 256)
    # The region is about one third tissue: some tiles are kept, the glass is dropped.
    assert 0.15 * grid < len(ds) < 0.7 * grid
    assert summary.totals("train") == {"patients": 1, "slides": 1, "patches": len(ds)}
    assert set(ds["level"]) == {0}
    assert np.allclose(ds["mpp"], 0.499, atol=1e-4)
    assert set(ds["magnification"]) == {20.0}
    assert set(ds["source"]) == {"wsi:cmu_small_region.svs"}
    images = np.stack([decode_image(row["image"]) for row in ds])
    assert images.shape[1:] == (256, 256, 3)
    # Tissue tiles are stained (pink/purple), not white glass.
    assert images.mean() < 215
    saturation = (images.max(-1).astype(float) - images.min(-1)) / np.maximum(images.max(-1), 1)
    assert np.median(saturation.reshape(len(ds), -1).mean(1)) > 0.15


def test_real_svs_resampled_to_one_micron_per_pixel():
    task = SlideTask(str(SLIDE), "CMU-1", "cmu", "skin", "wsi:cmu")
    # Only a few tiles are read and encoded; num_candidates counts all the tissue tiles found.
    level0 = tile_slide(task, TilingOptions(patch_size=128, max_tiles_per_slide=2))
    coarse = tile_slide(task, TilingOptions(patch_size=128, mpp=1.0, max_tiles_per_slide=2))
    assert level0.error is None and coarse.error is None and len(coarse.rows) == 2
    row = coarse.rows[0]
    assert row["mpp"] == 1.0 and row["magnification"] == pytest.approx(20 * 0.499, rel=1e-3)
    assert decode_image(row["image"]).shape == (128, 128, 3)
    # A 128 px tile at 1 mpp covers ~256 level-0 px: about a quarter as many tiles as 128 px at level 0.
    assert 0.15 < coarse.num_candidates / level0.num_candidates < 0.4
