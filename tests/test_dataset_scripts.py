"""Converters in dataset_scripts/: round trips through load_dataset, bad input, skipping, overwrite, push."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets
import h5py
import numpy as np
import pytest
import tifffile

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the scripts are not part of the installed package
    sys.path.insert(0, str(REPO))

from dataset_scripts import demo, opensrh, tcga, wsi  # noqa: E402
from hlss_hf.data import demo as demo_data  # noqa: E402
from hlss_hf.data.schema import decode_image  # noqa: E402

PATCH = 16  # SRH patch side in the fixtures


def load(folder, tmp_path):
    return datasets.load_dataset(str(folder), cache_dir=str(tmp_path / "hf-cache"))


def leftovers(parent):
    """Temporary folders a writer would leave next to its output."""
    return [p.name for p in Path(parent).iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def expect_error(main, argv, *fragments):
    with pytest.raises(SystemExit) as info:
        main(argv)
    message = str(info.value.code)
    assert message.startswith("error: "), message
    for fragment in fragments:
        assert fragment in message, message
    return message


# ----------------------------------------------------------------------------------------------- OpenSRH


def srh_patch(seed, channel_first=False, dtype=np.uint16, channels=2, size=PATCH):
    array = np.random.default_rng(seed).integers(0, 65536, size=(size, size, channels)).astype(dtype)
    return np.moveaxis(array, -1, 0) if channel_first else array


def make_opensrh(root, patients=None):
    """A tiny OpenSRH release. ``patients``: id -> (class, split, {slide: n_patches}). Returns the source arrays."""
    patients = patients or {
        "NIO_001": ("hgg", "train", {"NIO_001-1": 3, "NIO_001-2": 2}),
        "NIO_002": ("normal", "train", {"NIO_002-1": 2}),
        "NIO_003": ("lgg", "val", {"NIO_003-1": 2}),
        "NIO_004": ("hgg", "val", {"NIO_004-1": 1, "NIO_004-2": 1}),
    }
    meta, split, arrays, seed = {}, {"train": [], "val": []}, {}, 0
    for patient, (label, which, slides) in patients.items():
        split[which].append(patient)
        record = {"class": label, "slides": {}}
        for slide, count in slides.items():
            key = "normal_patches" if label == "normal" else "tumor_patches"
            entry = {"tumor_patches": [], "normal_patches": [], "nondiagnostic_patches": []}
            for kind, n in ((key, count), ("nondiagnostic_patches", 1)):
                for i in range(n):
                    rel = f"studies/{patient}/{slide}/patches/{slide}-{kind[:3]}-{i}.tif"
                    seed += 1
                    arrays[rel] = srh_patch(seed)
                    (root / rel).parent.mkdir(parents=True, exist_ok=True)
                    tifffile.imwrite(root / rel, srh_patch(seed, channel_first=seed % 2 == 0))
                    entry[kind].append(rel)
            record["slides"][slide] = entry
        meta[patient] = record
    (root / "meta").mkdir(parents=True, exist_ok=True)
    (root / "meta" / "opensrh.json").write_text(json.dumps(meta))
    (root / "meta" / "train_val_split.json").write_text(json.dumps(split))
    return arrays


def srh_args(root, out, *extra):
    return [str(root), "--output_dir", str(out), "--patch-size", str(PATCH), "--progress", "false", *extra]


def test_opensrh_round_trip_keeps_hierarchy_and_exact_uint16_values(tmp_path, capsys):
    root = tmp_path / "opensrh"
    arrays = make_opensrh(root)
    out = tmp_path / "out"
    summary = opensrh.main(srh_args(root, out))

    assert sorted(p.name for p in out.iterdir()) == ["README.md", "dataset_dict.json", "train", "validation"]
    assert (out / "train" / "data-00000-of-00001.arrow").is_file()
    ds = load(out, tmp_path)
    # The same folder reads back with load_from_disk (memory-mapped as written), same splits, features, rows.
    saved = datasets.load_from_disk(str(out))
    assert set(saved) == set(ds)
    for name in ds:
        assert saved[name].features == ds[name].features
        assert saved[name]["patch_id"] == ds[name]["patch_id"]
        np.testing.assert_array_equal(np.asarray(saved[name]["image"]), np.asarray(ds[name]["image"]))
    assert set(ds) == {"train", "validation"}
    assert ds["train"].features["image"] == datasets.Array3D(shape=(PATCH, PATCH, 2), dtype="uint16")
    assert ds["train"].features["label"].names == list(opensrh.OPENSRH_CLASSES)
    assert sorted(set(ds["train"]["patient_id"])) == ["NIO_001", "NIO_002"]
    assert sorted(set(ds["validation"]["patient_id"])) == ["NIO_003", "NIO_004"]
    assert len(ds["train"]) == 3 + 2 + 2 and len(ds["validation"]) == 2 + 1 + 1
    assert sorted(set(ds["train"]["slide_id"])) == ["NIO_001-1", "NIO_001-2", "NIO_002-1"]
    names = ds["train"].features["label"].names
    for split in ds.values():
        for row in split:
            assert "-non-" not in row["patch_id"]  # nondiagnostic patches are off by default
            np.testing.assert_array_equal(decode_image(row["image"]), arrays[row["patch_id"]])
            expected_label = {"NIO_001": "hgg", "NIO_002": "normal", "NIO_003": "lgg", "NIO_004": "hgg"}
            assert names[row["label"]] == expected_label[row["patient_id"]]
            assert row["source"] == "opensrh" and row["x"] == -1 and math.isnan(row["mpp"])
    assert summary.totals("train") == {"patients": 2, "slides": 3, "patches": 7}
    card = (out / "README.md").read_text()
    assert "| train | hgg | 1 | 2 | 5 |" in card and "| validation | **all** | 2 | 3 | 4 |" in card
    assert "OpenSRH" in card and "Skipped items\n\nNone." in card
    printed = capsys.readouterr().out
    assert "train: 2 patients, 3 slides, 7 patches" in printed
    assert "splits from split file meta/train_val_split.json" in printed
    assert "validation 2 (hgg 1, lgg 1)" in printed and "warning" not in printed
    assert leftovers(tmp_path) == []


def test_opensrh_include_nondiagnostic_and_custom_metadata_names(tmp_path):
    root = tmp_path / "opensrh"
    make_opensrh(root)
    (root / "meta" / "opensrh.json").rename(root / "meta" / "custom.json")
    (root / "meta" / "train_val_split.json").rename(root / "meta" / "folds.json")
    out = tmp_path / "out"
    summary = opensrh.main(
        srh_args(
            root,
            out,
            "--include-nondiagnostic",
            "--meta-file",
            "meta/custom.json",
            "--split-file",
            "meta/folds.json",
        )
    )
    assert summary.totals("train")["patches"] == 7 + 3  # one nondiagnostic patch per slide
    ds = load(out, tmp_path)
    assert sum("-non-" in pid for pid in ds["train"]["patch_id"]) == 3


def test_opensrh_converts_the_reference_metadata_by_name_and_the_card_says_which(tmp_path):
    # The HLSS reference read meta/updated2_opensrh.json and meta/updated2_train_val_split.json, which the public
    # release lacks: the converter takes those names (its defaults stay the release's) and records what it read.
    root = tmp_path / "opensrh"
    make_opensrh(root)
    meta = json.loads((root / "meta" / "opensrh.json").read_text())
    (root / "meta" / "updated2_opensrh.json").write_text(json.dumps(meta))
    updated_split = {"train": ["NIO_001"], "val": ["NIO_002", "NIO_003", "NIO_004"]}
    (root / "meta" / "updated2_train_val_split.json").write_text(json.dumps(updated_split))
    help_text = opensrh.build_parser().format_help()
    assert "updated2_opensrh.json" in help_text and "updated2_train_val_split.json" in help_text

    public, updated = tmp_path / "public", tmp_path / "updated2"
    opensrh.main(srh_args(root, public))
    names = [
        "--meta-file",
        "meta/updated2_opensrh.json",
        "--split-file",
        "meta/updated2_train_val_split.json",
    ]
    opensrh.main(srh_args(root, updated, *names))
    assert sorted(set(load(public, tmp_path)["train"]["patient_id"])) == ["NIO_001", "NIO_002"]
    assert sorted(set(load(updated, tmp_path)["train"]["patient_id"])) == ["NIO_001"]
    public_card, updated_card = (public / "README.md").read_text(), (updated / "README.md").read_text()
    assert "`meta/opensrh.json`" in public_card and "`meta/train_val_split.json`" in public_card
    assert (
        "`meta/updated2_opensrh.json`" in updated_card
        and "`meta/updated2_train_val_split.json`" in updated_card
    )


def _corrupt(root, rel):
    (root / rel).write_bytes(b"not a tiff at all")


def _rewrite(root, rel, array):
    tifffile.imwrite(root / rel, array)


def _edit_meta(root, edit):
    path = root / "meta" / "opensrh.json"
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


FIRST = "studies/NIO_001/NIO_001-1/patches/NIO_001-1-tum-0.tif"

BAD_OPENSRH = {
    "missing_file": (lambda root: (root / FIRST).unlink(), ["file " + FIRST, "not found"]),
    "corrupt_tiff": (lambda root: _corrupt(root, FIRST), ["file " + FIRST, "cannot read TIFF"]),
    "wrong_dtype": (
        lambda root: _rewrite(root, FIRST, srh_patch(0, dtype=np.uint8)),
        ["file " + FIRST, "uint8"],
    ),
    "wrong_channels": (
        lambda root: _rewrite(root, FIRST, srh_patch(0, channels=3)),
        ["file " + FIRST, "shape"],
    ),
    "wrong_size": (
        lambda root: _rewrite(root, FIRST, srh_patch(0, size=PATCH + 2)),
        ["file " + FIRST, "size"],
    ),
    "slide_without_patches": (
        lambda root: _edit_meta(root, lambda m: m["NIO_001"]["slides"]["NIO_001-2"].update(tumor_patches=[])),
        ["slide NIO_001-2", "no patches"],
    ),
    "patient_without_slides": (
        lambda root: _edit_meta(root, lambda m: m["NIO_002"].update(slides={})),
        ["patient NIO_002", "no slides"],
    ),
    "label_outside_classes": (
        lambda root: _edit_meta(root, lambda m: m["NIO_003"].update({"class": "glioma"})),
        ["patient NIO_003", "'glioma'"],
    ),
    "duplicate_patch_id": (
        lambda root: _edit_meta(
            root, lambda m: m["NIO_004"]["slides"]["NIO_004-1"]["tumor_patches"].append(FIRST)
        ),
        ["patch " + FIRST, "duplicate"],
    ),
    "missing_metadata": (
        lambda root: (root / "meta" / "opensrh.json").unlink(),
        ["metadata", "opensrh.json"],
    ),
    "patient_in_two_splits": (
        lambda root: (root / "meta" / "train_val_split.json").write_text(
            json.dumps({"train": ["NIO_001", "NIO_002"], "val": ["NIO_001"]})
        ),
        ["patient NIO_001", "both"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_OPENSRH))
def test_opensrh_bad_input_fails_naming_the_item_and_leaves_nothing(tmp_path, case):
    root = tmp_path / "opensrh"
    make_opensrh(root)
    damage, fragments = BAD_OPENSRH[case]
    damage(root)
    out = tmp_path / "out"
    expect_error(opensrh.main, srh_args(root, out), *fragments)
    assert not out.exists()
    assert leftovers(tmp_path) == []


def test_opensrh_skip_invalid_lists_skipped_items_in_summary_and_card(tmp_path, capsys):
    root = tmp_path / "opensrh"
    make_opensrh(root)
    _corrupt(root, FIRST)
    _edit_meta(root, lambda m: m["NIO_003"].update({"class": "glioma"}))
    out = tmp_path / "out"
    summary = opensrh.main(srh_args(root, out, "--skip-invalid"))
    skipped = dict(summary.skipped)
    assert set(skipped) == {"file " + FIRST, "patient NIO_003"}
    ds = load(out, tmp_path)
    assert FIRST not in ds["train"]["patch_id"] and len(ds["train"]) == 6
    assert set(ds["validation"]["patient_id"]) == {"NIO_004"}
    card = (out / "README.md").read_text()
    assert f"- `file {FIRST}`: cannot read TIFF" in card and "- `patient NIO_003`: label 'glioma'" in card
    assert "skipped 2 invalid item(s)" in capsys.readouterr().out


def test_output_is_refused_when_it_exists_and_replaced_with_overwrite(tmp_path):
    root = tmp_path / "opensrh"
    make_opensrh(root)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    expect_error(opensrh.main, srh_args(root, out), str(out), "--overwrite")
    assert (out / "keep.txt").read_text() == "precious"
    opensrh.main(srh_args(root, out, "--overwrite_output_dir"))
    assert not (out / "keep.txt").exists() and (out / "README.md").exists()
    assert leftovers(tmp_path) == []


def test_a_failed_overwrite_keeps_the_previous_dataset(tmp_path):
    root = tmp_path / "opensrh"
    make_opensrh(root)
    out = tmp_path / "out"
    opensrh.main(srh_args(root, out))
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    _corrupt(root, FIRST)
    expect_error(opensrh.main, srh_args(root, out, "--overwrite_output_dir"), FIRST)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before
    assert leftovers(tmp_path) == []


def test_small_shard_size_writes_numbered_shards_that_load_back(tmp_path):
    root = tmp_path / "opensrh"
    make_opensrh(root)
    out = tmp_path / "out"
    # One 16x16x2 uint16 patch is 1 KiB: ~2 KiB shards hold two patches each.
    opensrh.main(srh_args(root, out, "--max-shard-size-mb", str(2 / 1024)))
    shards = sorted(p.name for p in (out / "train").glob("data-*.arrow"))
    assert len(shards) > 1 and shards == [
        f"data-{i:05d}-of-{len(shards):05d}.arrow" for i in range(len(shards))
    ]
    assert len(load(out, tmp_path)["train"]) == 7
    assert len(datasets.load_from_disk(str(out))["train"]) == 7


def test_push_to_hub_pushes_the_dataset_dict_and_the_card(tmp_path, monkeypatch):
    monkeypatch.setattr(
        "huggingface_hub.constants.HF_HUB_OFFLINE", False
    )  # the push itself is replaced below
    root = tmp_path / "opensrh"
    make_opensrh(root)
    calls = {}

    def fake_push(self, repo_id, **kwargs):
        calls["push"] = (
            repo_id,
            kwargs,
            {split: len(ds) for split, ds in self.items()},
            self["train"].features,
        )

    def fake_card_push(self, repo_id, **kwargs):
        calls["card"] = (repo_id, kwargs, str(self))

    monkeypatch.setattr(datasets.DatasetDict, "push_to_hub", fake_push)
    monkeypatch.setattr("huggingface_hub.DatasetCard.push_to_hub", fake_card_push)
    monkeypatch.chdir(tmp_path)
    opensrh.main(
        [
            str(root),
            "--push-to-hub",
            "me/opensrh-tiny",
            "--hub_private",
            "--patch-size",
            str(PATCH),
            "--progress",
            "false",
        ]
    )
    repo_id, kwargs, sizes, features = calls["push"]
    assert repo_id == "me/opensrh-tiny" and kwargs["private"] is True
    assert sizes == {"train": 7, "validation": 4}
    assert features["image"] == datasets.Array3D(shape=(PATCH, PATCH, 2), dtype="uint16")
    card_repo, card_kwargs, card = calls["card"]
    assert card_repo == "me/opensrh-tiny" and card_kwargs["repo_type"] == "dataset"
    assert "path: data/train-*" in card and "| train | **all** | 2 | 3 | 7 |" in card
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--output_dir", "x", "--hub_private"], "hub_private"),
        (["--push-to-hub", "no-namespace"], "namespace/name"),
        (["--output_dir", "x", "--max-shard-size-mb", "0"], "max_shard_size_mb"),
    ],
)
def test_output_arguments_are_validated_before_any_work(tmp_path, argv, fragment):
    expect_error(opensrh.main, [str(tmp_path / "nonexistent"), *argv], fragment)


# ---------------------------------------------------------------------------------------- whole slides


def write_pyramid(path, tissue=True, mpp=0.5, size=(768, 1024)):
    """A generic tiled pyramidal TIFF (2 levels, 256 px tiles, resolution tags): pink tissue on white glass."""
    height, width = size
    image = np.full((height, width, 3), 245, np.uint8)
    if tissue:
        yy, xx = np.mgrid[0:height, 0:width]
        inside = (xx - 300) ** 2 / 250**2 + (yy - 380) ** 2 / 200**2 < 1
        noise = np.random.default_rng(0).integers(-20, 20, size=(int(inside.sum()), 3))
        image[inside] = np.clip(np.array([200, 120, 170]) + noise, 0, 255)
    with tifffile.TiffWriter(path) as tif:
        for level in range(2):
            factor = 2**level
            resolution = 1e4 / (mpp * factor)  # pixels per centimetre
            tif.write(
                image[::factor, ::factor],
                tile=(256, 256),
                photometric="rgb",
                compression="zlib",
                subfiletype=1 if level else 0,  # OpenSlide reads reduced-resolution pages as pyramid levels
                resolution=(resolution, resolution),
                resolutionunit="CENTIMETER",
            )
    return image


def write_manifest(path, rows, columns=("slide_path", "patient_id", "label", "split")):
    lines = [",".join(columns)] + [",".join(str(v) for v in row) for row in rows]
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture
def slides(tmp_path):
    folder = tmp_path / "slides"
    folder.mkdir()
    images = {}
    for name in ("s1", "s2", "s3"):
        images[name] = write_pyramid(folder / f"{name}.tif")
    manifest = tmp_path / "manifest.csv"
    write_manifest(
        manifest,
        [
            ("slides/s1.tif", "P1", "tumor", "train"),
            ("slides/s2.tif", "P1", "tumor", "train"),
            ("slides/s3.tif", "P2", "normal", "val"),
        ],
    )
    return manifest, images


def wsi_args(manifest, out, *extra):
    return [
        "--manifest",
        str(manifest),
        "--output_dir",
        str(out),
        "--patch-size",
        "128",
        "--progress",
        "false",
        *extra,
    ]


def test_wsi_tiles_tissue_at_level_zero_with_provenance(tmp_path, slides):
    manifest, images = slides
    out = tmp_path / "out"
    wsi.main(wsi_args(manifest, out))
    ds = load(out, tmp_path)
    assert set(ds) == {"train", "validation"}
    train = ds["train"]
    assert train.features["label"].names == ["normal", "tumor"]
    assert sorted(set(train["slide_id"])) == ["s1", "s2"] and set(train["patient_id"]) == {"P1"}
    assert set(ds["validation"]["slide_id"]) == {"s3"}
    assert len(train) == 2 * len(ds["validation"]) > 0
    for row in train:
        patch = decode_image(row["image"])
        assert patch.shape == (128, 128, 3)
        x, y = row["x"], row["y"]
        np.testing.assert_array_equal(patch, images[row["slide_id"]][y : y + 128, x : x + 128])
        assert row["level"] == 0 and row["mpp"] == pytest.approx(0.5)
        assert math.isnan(row["magnification"])  # generic TIFF has no objective power
        assert (
            row["source"] == f"wsi:{row['slide_id']}.tif" and row["patch_id"] == f"{row['slide_id']}/{x}_{y}"
        )
        # Tissue is the ellipse centred at (300, 380): kept tiles have their centre near it.
        assert ((x + 64 - 300) / 250) ** 2 + ((y + 64 - 380) / 200) ** 2 < 1.6
    # Every grid tile well inside the ellipse is kept: none of the tissue is lost.
    kept = {(x, y) for x, y, s in zip(train["x"], train["y"], train["slide_id"], strict=True) if s == "s1"}
    assert (256, 384) in kept and (256, 256) in kept and (768, 0) not in kept


def test_wsi_mpp_reads_the_coarser_level_and_workers_give_the_same_rows(tmp_path, slides):
    manifest, _ = slides
    one, two = tmp_path / "one", tmp_path / "two"
    wsi.main(wsi_args(manifest, one, "--mpp", "1.0", "--patch-size", "64"))
    wsi.main(wsi_args(manifest, two, "--mpp", "1.0", "--patch-size", "64", "--num-workers", "2"))
    a, b = load(one, tmp_path), load(two, tmp_path)
    assert a["train"]["patch_id"] == b["train"]["patch_id"]
    assert set(a["train"]["level"]) == {1} and set(a["train"]["mpp"]) == {1.0}
    assert decode_image(a["train"][0]["image"]).shape == (64, 64, 3)
    np.testing.assert_array_equal(decode_image(a["train"][3]["image"]), decode_image(b["train"][3]["image"]))


def test_wsi_level_option_and_tile_cap(tmp_path, slides):
    manifest, _ = slides
    out = tmp_path / "out"
    wsi.main(wsi_args(manifest, out, "--level", "1", "--patch-size", "64", "--max-tiles-per-slide", "3"))
    ds = load(out, tmp_path)
    assert set(ds["train"]["level"]) == {1} and set(ds["train"]["mpp"]) == {1.0}
    assert len(ds["train"]) == 6 and len(ds["validation"]) == 3
    assert all(x % 128 == 0 for x in ds["train"]["x"])  # 64 px at level 1 = 128 level-0 px


def arrow_bytes(folder):
    """The data files of a saved dataset, by relative path (the card, which names the command, left out)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*.arrow"))}


def test_wsi_image_format_raw_stores_the_png_pixels_and_png_is_the_unchanged_default(tmp_path, slides):
    manifest, _ = slides
    default, png, raw = tmp_path / "default", tmp_path / "png", tmp_path / "raw"
    wsi.main(wsi_args(manifest, default, "--level", "1", "--patch-size", "64"))
    wsi.main(wsi_args(manifest, png, "--level", "1", "--patch-size", "64", "--image-format", "png"))
    # Two tiling workers: raw tiles cross process boundaries as arrays.
    wsi.main(
        wsi_args(
            manifest, raw, "--level", "1", "--patch-size", "64", "--image-format", "raw", "--num-workers", "2"
        )
    )
    assert arrow_bytes(default) == arrow_bytes(png) and arrow_bytes(png)
    a, b = load(png, tmp_path), load(raw, tmp_path)
    assert isinstance(a["train"].features["image"], datasets.Image)
    assert b["train"].features["image"] == datasets.Array3D(shape=(64, 64, 3), dtype="uint8")
    for split in a:
        assert a[split]["patch_id"] == b[split]["patch_id"] and a[split]["x"] == b[split]["x"]
        for left, right in zip(a[split], b[split], strict=True):
            pixels = decode_image(right["image"])
            assert pixels.dtype == np.uint8
            np.testing.assert_array_equal(pixels, decode_image(left["image"]))
    assert (
        "`datasets.Array3D`" in (raw / "README.md").read_text()
        and "8-bit RGB PNG" in (png / "README.md").read_text()
    )


def test_image_format_is_refused_where_it_cannot_apply(tmp_path):
    from hlss_hf.data.schema import features_for

    with pytest.raises(SystemExit, match="'png' only applies to H&E"):
        demo.main(["--output_dir", str(tmp_path / "d"), "--modality", "srh", "--image-format", "png"])
    assert not (tmp_path / "d").exists()
    with pytest.raises(SystemExit):  # argparse: invalid choice
        demo.main(["--output_dir", str(tmp_path / "d"), "--image-format", "jpeg"])
    with pytest.raises(ValueError, match="patch_size is required for raw H&E"):
        features_for("he", ["a"], image_format="raw")
    with pytest.raises(ValueError, match="image_format must be one of"):
        features_for("he", ["a"], patch_size=8, image_format="jpeg")
    srh = features_for("srh", ["a"], patch_size=8, image_format="raw")
    assert srh["image"] == datasets.Array3D(shape=(8, 8, 2), dtype="uint16")


def test_writer_raw_he_checks_the_fixed_shape_and_decodes_png_bytes(tmp_path):
    from hlss_hf.data.schema import features_for
    from hlss_hf.data.writer import write_patch_dataset
    from hlss_hf.errors import ConversionError

    features = features_for("he", ["a"], patch_size=8, image_format="raw")
    first, second = _row("x"), _row("y", seed=1)
    second["image"] = datasets.Image().encode_example(second["image"])  # as a PNG tiling worker sends it
    write_patch_dataset(
        {"train": [first, second]}, features, output_dir=tmp_path / "out", show_progress=False
    )
    stored = load(tmp_path / "out", tmp_path)["train"].with_format("numpy", dtype=np.uint8)["image"]
    np.testing.assert_array_equal(stored, np.stack([_row("x")["image"], _row("y", seed=1)["image"]]))
    with pytest.raises(ConversionError, match=r"patch x: image size \(8, 8\), expected \(16, 16\)"):
        write_patch_dataset(
            {"train": [_row("x")]},
            features_for("he", ["a"], patch_size=16, image_format="raw"),
            output_dir=tmp_path / "o2",
        )


def test_wsi_without_split_column_splits_by_patient(tmp_path):
    folder = tmp_path / "slides"
    folder.mkdir()
    write_pyramid(folder / "a.tif", size=(512, 768))
    rows = [
        ("slides/a.tif", f"P{i}", "tumor" if i % 2 else "normal", f"slide{i}-{j}")
        for i in range(6)
        for j in range(2)
    ]
    manifest = tmp_path / "m.csv"
    write_manifest(manifest, rows, columns=("slide_path", "patient_id", "label", "slide_id"))
    out = tmp_path / "out"
    summary = wsi.main(
        [
            "--manifest",
            str(manifest),
            "--output_dir",
            str(out),
            "--patch-size",
            "128",
            "--level",
            "1",
            "--val-fraction",
            "0.34",
            "--progress",
            "false",
        ]
    )
    ds = load(out, tmp_path)
    train, val = set(ds["train"]["patient_id"]), set(ds["validation"]["patient_id"])
    assert not train & val and len(val) == 2 and len(train) == 4
    assert summary.totals("validation")["slides"] == 4


@pytest.mark.parametrize("num_patients", [2, 4])
def test_wsi_without_split_column_says_what_it_did_with_the_validation_split(tmp_path, capsys, num_patients):
    # Two patients of two classes cannot give a validation split (a patient is never split); four can, one per class.
    folder = tmp_path / "slides"
    folder.mkdir()
    write_pyramid(folder / "a.tif", size=(512, 768))
    rows = [
        ("slides/a.tif", f"P{i}", "tumor" if i % 2 else "normal", f"slide{i}") for i in range(num_patients)
    ]
    manifest = tmp_path / "m.csv"
    write_manifest(manifest, rows, columns=("slide_path", "patient_id", "label", "slide_id"))
    out = tmp_path / "out"
    wsi.main(
        [
            "--manifest",
            str(manifest),
            "--output_dir",
            str(out),
            "--patch-size",
            "128",
            "--level",
            "1",
            "--progress",
            "false",
        ]
    )
    printed = capsys.readouterr().out
    splits = set(load(out, tmp_path))
    assert "splits from --val-fraction 0.2 per class" in printed
    if num_patients == 2:
        assert splits == {"train"}
        assert "warning: no validation split (no class has two or more patients" in printed
        assert "--data.validation_split null" in printed
    else:
        assert splits == {"train", "validation"}
        assert "validation 2 (normal 1, tumor 1)" in printed and "warning" not in printed


BAD_WSI = {
    "missing_columns": ("slide_path,label\nslides/s1.tif,tumor\n", ["manifest", "['patient_id']"]),
    "label_outside_classes": (
        "slide_path,patient_id,label\nslides/s1.tif,P1,tumor\nslides/s2.tif,P2,other\n",
        ["slide s2", "'other'"],
    ),
    "missing_slide": ("slide_path,patient_id,label\nslides/nope.tif,P1,tumor\n", ["slide nope", "not found"]),
    "corrupt_slide": (
        "slide_path,patient_id,label\nslides/broken.tif,P1,tumor\n",
        ["slide broken", "cannot tile"],
    ),
    "slide_without_tissue": (
        "slide_path,patient_id,label\nslides/glass.tif,P1,tumor\n",
        ["slide glass", "no tissue"],
    ),
    "patient_with_two_labels": (
        "slide_path,patient_id,label\nslides/s1.tif,P1,tumor\nslides/s2.tif,P1,normal\n",
        ["patient P1", "different labels"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_WSI))
def test_wsi_bad_input_fails_naming_the_item_and_leaves_nothing(tmp_path, case):
    folder = tmp_path / "slides"
    folder.mkdir()
    write_pyramid(folder / "s1.tif", size=(256, 384))
    write_pyramid(folder / "s2.tif", size=(256, 384))
    write_pyramid(folder / "glass.tif", tissue=False, size=(256, 384))
    (folder / "broken.tif").write_bytes(b"II*\x00garbage")
    text, fragments = BAD_WSI[case]
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(text)
    out = tmp_path / "out"
    classes = ["--classes", "normal", "tumor"] if case == "label_outside_classes" else []
    expect_error(wsi.main, wsi_args(manifest, out, "--level", "1", *classes), *fragments)
    assert not out.exists()
    assert leftovers(tmp_path) == []


def test_wsi_skip_invalid_keeps_good_slides(tmp_path):
    folder = tmp_path / "slides"
    folder.mkdir()
    write_pyramid(folder / "s1.tif")
    write_pyramid(folder / "glass.tif", tissue=False, size=(256, 384))
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(
        "slide_path,patient_id,label,split\nslides/s1.tif,P1,tumor,train\n"
        "slides/glass.tif,P2,tumor,train\nslides/gone.tif,P3,tumor,train\n"
    )
    out = tmp_path / "out"
    summary = wsi.main(wsi_args(manifest, out, "--level", "1", "--skip-invalid"))
    assert [item for item, _ in summary.skipped] == ["slide gone", "slide glass"]
    assert set(load(out, tmp_path)["train"]["slide_id"]) == {"s1"}
    card = (out / "README.md").read_text()
    assert "- `slide glass`: no tissue tiles" in card and "- `slide gone`: file" in card


# ------------------------------------------------------------------------------------------------- TCGA


def write_h5(path, n, seed, dtype=np.uint8, coords=True, name="imgs", size=32):
    images = np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3)).astype(dtype)
    with h5py.File(path, "w") as handle:
        handle.create_dataset(name, data=images)
        if coords:
            handle.create_dataset("coords", data=np.stack([np.arange(n) * 32, np.arange(n) * 64], axis=1))
    return images


TCGA_SLIDES = {
    "TCGA-02-0001-01Z-00-DX1.h5": ("GBM", 3),
    "TCGA-02-0001-01Z-00-DX2.h5": ("GBM", 2),
    "TCGA-02-0003-01Z-00-DX1.h5": ("GBM", 2),
    "TCGA-CS-4938-01Z-00-DX1.h5": ("LGG", 2),
    "TCGA-CS-4941-01Z-00-DX1.h5": ("LGG", 3),
    "TCGA-CS-4942-01Z-00-DX1.h5": ("LGG", 1),
}


@pytest.fixture
def tcga_root(tmp_path):
    root = tmp_path / "tcga"
    (root / "nested").mkdir(parents=True)
    images, labels = {}, {}
    for i, (name, (label, n)) in enumerate(TCGA_SLIDES.items()):
        images[name.split(".")[0]] = write_h5(root / ("nested" if i % 2 else "") / name, n, seed=i)
        labels[name[:12]] = label
    (root / "labels.csv").write_text("patient_id,label\n" + "".join(f"{k},{v}\n" for k, v in labels.items()))
    return root, images


def tcga_args(root, out, *extra):
    # The HDF5 fixtures hold 32 px patches; --patch-size is what HDF5 patches must measure.
    return [
        str(root),
        "--labels",
        str(root / "labels.csv"),
        "--output_dir",
        str(out),
        "--progress",
        "false",
        "--patch-size",
        "32",
        *extra,
    ]


def test_tcga_hdf5_round_trip_with_barcodes_and_patient_split(tmp_path, tcga_root):
    root, images = tcga_root
    out = tmp_path / "out"
    tcga.main(tcga_args(root, out, "--val-fraction", "0.34", "--seed", "3"))
    ds = load(out, tmp_path)
    assert ds["train"].features["label"].names == ["GBM", "LGG"]
    train, val = set(ds["train"]["patient_id"]), set(ds["validation"]["patient_id"])
    assert not train & val and len(val) == 2  # one patient of each class
    assert train | val == {"TCGA-02-0001", "TCGA-02-0003", "TCGA-CS-4938", "TCGA-CS-4941", "TCGA-CS-4942"}
    rows = [row for split in ds.values() for row in split]
    assert len(rows) == sum(n for _, n in TCGA_SLIDES.values())
    for row in rows:
        index = int(row["patch_id"].split("/")[1])
        assert row["slide_id"].startswith(row["patient_id"]) and row["patch_id"].startswith(row["slide_id"])
        np.testing.assert_array_equal(decode_image(row["image"]), images[row["slide_id"]][index])
        assert (row["x"], row["y"]) == (index * 32, index * 64)
        assert row["source"] == f"tcga:{row['slide_id']}.h5"
    assert {r["slide_id"] for r in rows if r["patient_id"] == "TCGA-02-0001"} == {
        "TCGA-02-0001-01Z-00-DX1",
        "TCGA-02-0001-01Z-00-DX2",
    }


def test_tcga_image_format_raw_keeps_the_hdf5_pixels(tmp_path, tcga_root):
    root, images = tcga_root
    out = tmp_path / "out"
    tcga.main(tcga_args(root, out, "--image-format", "raw"))
    ds = load(out, tmp_path)
    assert ds["train"].features["image"] == datasets.Array3D(shape=(32, 32, 3), dtype="uint8")
    for split in ds.values():
        for row in split.with_format("numpy", dtype=np.uint8):
            index = int(row["patch_id"].split("/")[1])
            np.testing.assert_array_equal(row["image"], images[row["slide_id"]][index])


def test_tcga_split_file_slide_level_json_labels_and_whole_slide_files(tmp_path, tcga_root):
    root, _ = tcga_root
    write_pyramid(root / "TCGA-06-0125-01Z-00-DX1.8a7b3c.tif", size=(256, 384))
    labels = {
        "TCGA-02-0001": "GBM",
        "TCGA-02-0001-01Z-00-DX2": "GBM",
        "TCGA-02-0003": "GBM",
        "TCGA-06-0125": "GBM",
        "TCGA-CS-4938": "LGG",
        "TCGA-CS-4941": "LGG",
        "TCGA-CS-4942": "LGG",
    }
    (root / "labels.json").write_text(json.dumps(labels))
    split = {
        "train": ["TCGA-02-0001", "TCGA-CS-4938", "TCGA-CS-4941", "TCGA-06-0125"],
        "val": ["TCGA-02-0003", "TCGA-CS-4942"],
    }
    (root / "split.json").write_text(json.dumps(split))
    out = tmp_path / "out"
    tcga.main(
        [
            str(root),
            "--labels",
            str(root / "labels.json"),
            "--split-file",
            str(root / "split.json"),
            "--output_dir",
            str(out),
            "--level",
            "1",
            "--patch-size",
            "32",  # the HDF5 fixtures' size: one patch size for tiles and HDF5 patches alike
            "--progress",
            "false",
        ]
    )
    ds = load(out, tmp_path)
    assert set(ds["validation"]["patient_id"]) == {"TCGA-02-0003", "TCGA-CS-4942"}
    wsi_rows = ds["train"].filter(lambda r: r["patient_id"] == "TCGA-06-0125")
    assert len(wsi_rows) > 0 and set(wsi_rows["slide_id"]) == {"TCGA-06-0125-01Z-00-DX1"}
    assert set(wsi_rows["level"]) == {1} and decode_image(wsi_rows[0]["image"]).shape == (32, 32, 3)


def _tcga_damage(name):
    def damage(root):
        path = next(root.rglob(name))
        if name.endswith("DX2.h5"):
            write_h5(path, 2, seed=0, dtype=np.float32)
        elif "4942" in name:
            write_h5(path, 2, seed=0, name="features")
        else:
            path.write_bytes(b"\x89HDF\r\n\x1a\n broken")

    return damage


BAD_TCGA = {
    "wrong_dtype": (_tcga_damage("TCGA-02-0001-01Z-00-DX2.h5"), ["slide TCGA-02-0001-01Z-00-DX2", "float32"]),
    "missing_imgs": (_tcga_damage("TCGA-CS-4942-01Z-00-DX1.h5"), ["slide TCGA-CS-4942-01Z-00-DX1", "'imgs'"]),
    "corrupt_hdf5": (
        _tcga_damage("TCGA-CS-4938-01Z-00-DX1.h5"),
        ["slide TCGA-CS-4938-01Z-00-DX1", "cannot open"],
    ),
    "bad_barcode": (lambda root: write_h5(root / "slide-7.h5", 1, 0), ["file", "slide-7.h5", "TCGA barcode"]),
    "missing_label": (
        lambda root: write_h5(root / "TCGA-99-9999-01Z-00-DX1.h5", 1, 0),
        ["slide TCGA-99-9999-01Z-00-DX1", "no label"],
    ),
    "empty_slide": (
        lambda root: write_h5(next(root.rglob("TCGA-02-0003*")), 0, 0, coords=False),
        ["slide TCGA-02-0003-01Z-00-DX1", "no patches"],
    ),
    # Patches of another size than --patch-size (32 here) must not join the dataset.
    "wrong_patch_size": (
        lambda root: write_h5(next(root.rglob("TCGA-CS-4941*")), 3, 0, size=16),
        ["slide TCGA-CS-4941-01Z-00-DX1", "TCGA-CS-4941-01Z-00-DX1.h5", "16x16", "expected 32x32"],
    ),
    "conflicting_labels": (
        lambda root: (root / "labels.csv").write_text(
            (root / "labels.csv").read_text() + "TCGA-02-0001,LGG\n"
        ),
        ["patient TCGA-02-0001", "different labels", "'GBM'", "'LGG'", "line 7"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_TCGA))
def test_tcga_bad_input_fails_naming_the_item_and_leaves_nothing(tmp_path, tcga_root, case):
    root, _ = tcga_root
    damage, fragments = BAD_TCGA[case]
    damage(root)
    out = tmp_path / "out"
    expect_error(tcga.main, tcga_args(root, out, "--val-fraction", "0.5"), *fragments)
    assert not out.exists()
    assert leftovers(tmp_path) == []


def test_tcga_skip_invalid_and_labels_outside_class_list(tmp_path, tcga_root):
    root, _ = tcga_root
    _tcga_damage("TCGA-02-0001-01Z-00-DX2.h5")(root)
    out = tmp_path / "out"
    summary = tcga.main(tcga_args(root, out, "--classes", "GBM", "--skip-invalid", "--val-fraction", "0"))
    skipped = [item for item, _ in summary.skipped]
    assert "slide TCGA-02-0001-01Z-00-DX2" in skipped
    assert {"slide TCGA-CS-4938-01Z-00-DX1", "slide TCGA-CS-4941-01Z-00-DX1"} <= set(skipped)
    ds = load(out, tmp_path)
    assert set(ds) == {"train"} and set(ds["train"]["patient_id"]) == {"TCGA-02-0001", "TCGA-02-0003"}
    assert "TCGA-CS-4938" in (out / "README.md").read_text()


def test_tcga_patch_size_is_required_of_hdf5_patches_not_a_resize(tmp_path, tcga_root):
    root, _ = tcga_root  # 32 px patches
    expect_error(
        tcga.main,
        tcga_args(root, tmp_path / "out", "--val-fraction", "0", "--patch-size", "64"),
        "slide TCGA-02-0001-01Z-00-DX1",
        "TCGA-02-0001-01Z-00-DX1.h5",
        "32x32, expected 64x64",
    )
    assert not (tmp_path / "out").exists()
    write_h5(next(root.rglob("TCGA-CS-4941*")), 3, 0, size=64)
    summary = tcga.main(tcga_args(root, tmp_path / "out", "--val-fraction", "0", "--skip-invalid"))
    assert [item for item, _ in summary.skipped] == ["slide TCGA-CS-4941-01Z-00-DX1"]
    train = load(tmp_path / "out", tmp_path)["train"]
    assert "TCGA-CS-4941" not in set(train["patient_id"])
    assert {decode_image(image).shape for image in train["image"]} == {(32, 32, 3)}
    assert "64x64, expected 32x32" in (tmp_path / "out" / "README.md").read_text()
    assert "HDF5 'imgs' must already be this size" in " ".join(tcga.build_parser().format_help().split())


def test_tcga_json_slide_and_patient_keys_must_agree_within_a_patient(tmp_path, tcga_root):
    root, _ = tcga_root
    labels = root / "labels.json"
    # The slide key says LGG, its patient GBM: not a slide-wins override but a contradiction.
    labels.write_text(
        '{"TCGA-02-0001": "GBM", "TCGA-02-0001-01Z-00-DX2": "LGG", "TCGA-02-0003": "GBM", '
        '"TCGA-CS-4938": "LGG", "TCGA-CS-4941": "LGG", "TCGA-CS-4942": "LGG", "TCGA-99-0000": "GBM", '
        '"TCGA-99-0000": "LGG"}'
    )
    argv = [
        str(root),
        "--labels",
        str(labels),
        "--patch-size",
        "32",
        "--val-fraction",
        "0",
        "--progress",
        "false",
    ]
    expect_error(
        tcga.main,
        [*argv, "--output_dir", str(tmp_path / "out")],
        "patient TCGA-02-0001",
        "'GBM' (TCGA-02-0001 key TCGA-02-0001)",
        "'LGG' (TCGA-02-0001-01Z-00-DX2 key TCGA-02-0001-01Z-00-DX2)",
    )
    # TCGA-99-0000 also disagrees with itself (a repeated JSON key) but has no slides: it does not matter.
    summary = tcga.main([*argv, "--output_dir", str(tmp_path / "out"), "--skip-invalid"])
    assert [item for item, _ in summary.skipped] == ["patient TCGA-02-0001"]
    assert "TCGA-02-0001" not in set(load(tmp_path / "out", tmp_path)["train"]["patient_id"])
    # A repeated key with two labels is refused too (json.loads alone would keep the last) once it has slides.
    labels.write_text('{"TCGA-02-0003": "GBM", "TCGA-02-0003": "LGG", "TCGA-CS-4938": "LGG"}')
    expect_error(
        tcga.main,
        [*argv, "--output_dir", str(tmp_path / "out2")],
        "patient TCGA-02-0003: different labels in labels.json: 'GBM' (TCGA-02-0003 key TCGA-02-0003), 'LGG'",
    )


def test_tcga_split_file_patient_without_slide_files_is_an_error(tmp_path, tcga_root):
    root, _ = tcga_root
    patients = sorted({name[:12] for name in TCGA_SLIDES})
    (root / "split.json").write_text(json.dumps({"train": patients, "test": ["TCGA-02-0404"]}))
    argv = tcga_args(root, tmp_path / "out", "--split-file", str(root / "split.json"))
    expect_error(tcga.main, argv, "patient TCGA-02-0404", "no slide files")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    summary = tcga.main([*argv, "--skip-invalid"])
    assert [item for item, _ in summary.skipped] == ["patient TCGA-02-0404"]
    assert "- `patient TCGA-02-0404`: in split file" in (tmp_path / "out" / "README.md").read_text()
    assert set(load(tmp_path / "out", tmp_path)) == {"train"}


# ------------------------------------------------------------------------------------------------- demo


def test_build_demo_dataset_in_memory_has_hierarchy_and_patient_split():
    ds = demo_data.build_demo_dataset(
        num_patients=9, patches_per_slide=4, patch_size=32, val_fraction=0.34, align_fraction=0
    )
    assert set(ds) == {"train", "validation"}
    train, val = ds["train"], ds["validation"]
    assert not set(train["patient_id"]) & set(val["patient_id"])
    assert len(set(val["patient_id"])) == 3 and len(set(train["patient_id"])) == 6
    assert train.features["label"].names == list(demo_data.DEMO_CLASSES)
    slides_per_patient = {}
    for patient, slide in zip(train["patient_id"], train["slide_id"], strict=True):
        slides_per_patient.setdefault(patient, set()).add(slide)
    assert all(2 <= len(s) <= 3 for s in slides_per_patient.values())
    assert len(train) == 4 * sum(len(s) for s in slides_per_patient.values())
    assert len(set(train["patch_id"])) == len(train)
    assert decode_image(train[0]["image"]).shape == (32, 32, 3)


def _nuclear_shape_and_brightness(label: int, n: int = 12) -> tuple[float, float]:
    """Mean boundary / area ratio of the nuclear mask and mean brightness of ``n`` patches of one class.

    The stain and the patient-level numbers (coverage, darkness, stroma) are held fixed, as one slide would.
    """
    rng = np.random.default_rng(0)
    stain = demo_data._slide_stain(np.random.default_rng(1), "he")
    params = dict(
        demo_data._class_params(label, 3),
        coverage=0.2,
        darkness=0.8,
        stroma=0.7,
        fibre_angle=0.3,
        fibre_freq=0.3,
        brightness=0.95,
    )
    ratios, brightness = [], []
    for _ in range(n):
        image = demo_data._render_patch(rng, 64, params, stain, "he")[0].astype(np.float32) / 255
        mask = -np.log(np.clip(image, 1e-3, 1)).sum(-1) > 1.2  # optical density: the nuclei
        core = mask[1:-1, 1:-1]
        inner = core & mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
        ratios.append((core & ~inner).sum() / max(core.sum(), 1))
        brightness.append(image.mean())
    return float(np.mean(ratios)), float(np.mean(brightness))


def test_demo_classes_differ_in_nuclear_morphology_not_brightness():
    (small, light_0), (_, light_1), (large, light_2) = (_nuclear_shape_and_brightness(c) for c in range(3))
    # Small round nuclei (normal) have far more boundary per nuclear pixel than large high-grade ones ...
    assert small > 1.3 * large
    # ... while the brightness of a slide barely depends on the class (coverage is drawn per patient).
    assert max(light_0, light_1, light_2) - min(light_0, light_1, light_2) < 0.05


def test_demo_stain_varies_per_slide_and_the_data_is_reproducible():
    ds = demo_data.build_demo_dataset(
        num_patients=6, patches_per_slide=4, patch_size=48, seed=5, val_fraction=0.25, align_fraction=0
    )["train"]
    colour = {}
    for row in ds:
        colour.setdefault(row["slide_id"], []).append(decode_image(row["image"]).reshape(-1, 3).mean(0))
    slide_means = np.stack([np.mean(v, 0) for v in colour.values()])
    assert np.ptp(slide_means, axis=0).max() > 40  # slides differ in stain colour by tens of grey levels
    again = demo_data.build_demo_dataset(
        num_patients=6, patches_per_slide=4, patch_size=48, seed=5, val_fraction=0.25, align_fraction=0
    )["train"]
    np.testing.assert_array_equal(decode_image(again[5]["image"]), decode_image(ds[5]["image"]))


def test_demo_push_to_hub_pushes_what_it_builds(monkeypatch, capsys):
    pushed = {}
    monkeypatch.setattr(
        datasets.DatasetDict,
        "push_to_hub",
        lambda self, repo_id, **kw: pushed.update(
            repo=repo_id, private=kw["private"], rows=len(self["train"])
        ),
    )
    monkeypatch.setattr(
        "huggingface_hub.DatasetCard.push_to_hub", lambda self, repo_id, **kw: pushed.update(card=str(self))
    )
    demo.main(
        [
            "--push-to-hub",
            "me/demo",
            "--hub_private",
            "--num-patients",
            "6",
            "--patches-per-slide",
            "2",
            "--patch-size",
            "16",
        ]
    )
    assert (
        pushed["repo"] == "me/demo" and pushed["private"] is True and "HLSS synthetic demo" in pushed["card"]
    )
    out = capsys.readouterr().out
    assert "train: 3 patients" in out and "pushed to" in out and pushed["rows"] == 18


def test_demo_srh_writes_uint16_two_channel_dataset_that_loads_back(tmp_path):
    out = tmp_path / "demo"
    ds = demo_data.build_demo_dataset(
        out,
        num_patients=4,
        num_classes=2,
        patches_per_slide=2,
        patch_size=24,
        modality="srh",
        val_fraction=0.5,
        align_fraction=0,
    )
    loaded = load(out, tmp_path)
    assert loaded["train"].features["image"] == datasets.Array3D(shape=(24, 24, 2), dtype="uint16")
    assert len(loaded["train"]) == len(ds["train"])
    image = decode_image(loaded["validation"][0]["image"])
    assert image.dtype == np.uint16 and image.shape == (24, 24, 2) and image.max() > 255


# ------------------------------------------------------------------------------------------------- CLIs


@pytest.mark.parametrize("module", [opensrh, tcga, wsi])
def test_converters_share_the_output_options(module):
    text = module.build_parser().format_help()
    for option in (
        "--output.output_dir",
        "--output.push_to_hub",
        "--output.hub_private",
        "--output.overwrite_output_dir",
        "--output.skip_invalid",
    ):
        assert option in text


@pytest.mark.parametrize("module", [opensrh, tcga, wsi, demo])
def test_help_exits_cleanly(module, capsys):
    with pytest.raises(SystemExit) as info:
        module.main(["--help"])
    assert info.value.code == 0 and "--output" in capsys.readouterr().out


def test_script_run_from_the_repo_root_exits_non_zero_naming_the_bad_file(tmp_path):
    # One real subprocess (slow: the package imports torch) covers the script entry point and the exit status.
    root = tmp_path / "opensrh"
    make_opensrh(root)
    _corrupt(root, FIRST)
    out = tmp_path / "out"
    bad = subprocess.run(
        [sys.executable, "dataset_scripts/opensrh.py", *srh_args(root, out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert bad.returncode != 0 and f"error: file {FIRST}" in bad.stderr and not out.exists()
    assert leftovers(tmp_path) == []


def test_demo_main_writes_a_loadable_dataset(tmp_path, capsys):
    demo_out = tmp_path / "demo"
    demo.main(
        [
            "--output_dir",
            str(demo_out),
            "--num-patients",
            "6",
            "--patches-per-slide",
            "2",
            "--patch-size",
            "16",
        ]
    )
    assert f"wrote {demo_out}" in capsys.readouterr().out
    ds = load(demo_out, tmp_path)
    assert len(ds["train"]) + len(ds["validation"]) == 2 * len(
        set(ds["train"]["slide_id"]) | set(ds["validation"]["slide_id"])
    )
    with pytest.raises(SystemExit, match="already exists"):
        demo.main(["--output_dir", str(demo_out)])


#: Whole words a demo caption or attribute must never use: the class names and their parts.
CLASS_WORDS = {"normal", "low", "high", "grade", "low_grade", "high_grade"}


def test_demo_captions_describe_what_was_drawn_never_the_class():
    split = demo_data.build_demo_dataset(num_patients=12, patches_per_slide=4, patch_size=48)["train"]
    drawn = demo_data.drawn_terms("train", num_patients=12, patches_per_slide=4, patch_size=48)
    assert split.features["caption"] == datasets.Value("string")
    openings = set()
    for row in split:
        caption = row["caption"]
        words = set(caption.lower().replace(",", " ").replace(".", " ").replace(";", " ").split())
        assert not words & CLASS_WORDS, caption
        # Every feature of the patch is named, in one of its term's wordings.
        for feature, term in drawn[row["patch_id"]].items():
            assert any(phrase in caption.lower() for phrase in demo_data.PHRASES[term]), (
                feature,
                term,
                caption,
            )
        openings.add(caption.split()[0])
    assert len(openings) >= 3  # several phrasings, chosen per patch
    # The captions follow the drawing, so they differ between classes in the class's own terms.
    by_class = {
        label: " ".join(c for c, lab in zip(split["caption"], split["label"], strict=True) if lab == label)
        for label in range(3)
    }
    assert "spindle-shaped" in by_class[1] and "spindle-shaped" not in by_class[0] + by_class[2]


def test_demo_card_documents_the_caption_column(tmp_path):
    out = tmp_path / "demo"
    demo_data.build_demo_dataset(out, num_patients=12, patches_per_slide=2, patch_size=16)
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "`caption`: one sentence per patch" in card and "never its class" in card
    assert load(out, tmp_path)["align"].features["caption"] == datasets.Value("string")


@pytest.mark.slow
def test_demo_script_defaults_write_the_data_train_py_trains_and_evaluates_on(tmp_path, capsys):
    from hlss_hf.training.building import _demo_splits
    from hlss_hf.training.config import parse_config

    demo.main(["--output_dir", str(tmp_path / "demo")])
    assert "validation: 24 patients" in capsys.readouterr().out
    written = datasets.load_from_disk(str(tmp_path / "demo"))
    used = _demo_splits(parse_config(["--config", str(REPO / "configs" / "demo.yaml")]))
    assert set(written) == set(used) == {"train", "validation", "align"}
    for split in used:
        assert written[split]["patch_id"] == used[split]["patch_id"]
        assert written[split]["caption"] == used[split]["caption"]
        assert written[split]["label"] == used[split]["label"]
        for row in (0, len(used[split]) - 1):
            np.testing.assert_array_equal(
                decode_image(written[split][row]["image"]), decode_image(used[split][row]["image"])
            )


def test_demo_attribute_set_is_the_generator_vocabulary():
    import yaml

    from hlss_hf.models.hlss.attributes_hlss import shipped_attribute_file

    bank = yaml.safe_load(Path(shipped_attribute_file("demo_morphology")).read_text(encoding="utf-8"))
    vocabulary = set(demo_data.PHRASES)
    for level, attributes in bank.items():
        assert set(attributes) == vocabulary, level
        for descriptions in attributes.values():
            for text in descriptions:
                words = set(text.lower().replace(",", " ").replace("-", " ").split())
                assert not words & CLASS_WORDS, text


# --------------------------------------------------------------------------------- writer and helpers


def _row(patch, patient="p1", slide="s1", label="a", seed=0):
    image = np.random.default_rng(seed).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    return {"image": image, "patient_id": patient, "slide_id": slide, "patch_id": patch, "label": label}


def test_writer_rejects_a_slide_under_two_patients_and_a_patient_with_two_labels(tmp_path):
    from hlss_hf.data.schema import features_for
    from hlss_hf.data.writer import InvalidItems, write_patch_dataset
    from hlss_hf.errors import ConversionError

    features = features_for("he", ["a", "b"])
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match="slide s1 belongs to patients p1 and p2"):
        write_patch_dataset({"train": [_row("x"), _row("y", patient="p2")]}, features, output_dir=out)
    with pytest.raises(ConversionError, match="patch y: patient p1 has label 'a'"):
        write_patch_dataset({"train": [_row("x"), _row("y", label="b")]}, features, output_dir=out)
    with pytest.raises(ConversionError, match="patient p1 is in splits 'train' and 'test'"):
        write_patch_dataset({"train": [_row("x")], "test": [_row("y")]}, features, output_dir=out)
    invalid = InvalidItems(skip_invalid=True)
    with pytest.raises(ConversionError, match="no patches were converted"):
        write_patch_dataset({"train": [_row("x", label="c")]}, features, output_dir=out, invalid=invalid)
    assert not out.exists() and leftovers(tmp_path) == []


def test_writer_drops_empty_splits_and_checks_he_patch_size(tmp_path):
    from hlss_hf.data.schema import features_for
    from hlss_hf.data.writer import write_patch_dataset
    from hlss_hf.errors import ConversionError

    features = features_for("he", ["a"])
    out = tmp_path / "out"
    summary = write_patch_dataset({"train": [_row("x")], "validation": []}, features, output_dir=out)
    assert summary.empty_splits == ["validation"] and set(load(out, tmp_path)) == {"train"}
    with pytest.raises(ConversionError, match=r"patch x: image size \(8, 8\), expected \(16, 16\)"):
        write_patch_dataset({"train": [_row("x")]}, features, output_dir=tmp_path / "o2", patch_size=16)


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5, 0.9])
def test_assign_splits_is_stratified_seeded_and_keeps_every_class_in_train(fraction):
    from hlss_hf.data.converters import assign_splits

    labels = {f"p{i:02d}": ("a" if i < 7 else "b" if i < 9 else "c") for i in range(10)}
    splits = assign_splits(labels, fraction, seed=1)
    assert splits == assign_splits(labels, fraction, seed=1)
    assert set(splits) == set(labels)
    for label in "abc":
        members = [p for p, name in labels.items() if name == label]
        val = [p for p in members if splits[p] == "validation"]
        assert len(val) < len(members)  # every class keeps training patients
        assert len(val) >= (1 if len(members) > 1 else 0)
    assert assign_splits(labels, 0.5, seed=1) != assign_splits(labels, 0.5, seed=2)


def test_tissue_mask_separates_stain_from_glass_and_dark_borders():
    from hlss_hf.data.tiling import tissue_mask

    image = np.full((40, 60, 3), 240, np.uint8)
    image[10:30, 10:30] = (190, 110, 160)  # pink tissue
    image[:, 55:] = (10, 10, 10)  # black scanner border
    mask = tissue_mask(image)
    assert mask[10:30, 10:30].all()
    assert not mask[:, 30:].any() and not mask[:10].any()
    assert not tissue_mask(np.full((20, 20, 3), 240, np.uint8)).any()  # all glass: nothing


# ----------------------------------------------------------------------------------------------- newcomer errors


def run_script(script, *argv, env_extra=None, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    env.pop("HLSS_DEBUG", None)
    return subprocess.run(
        [sys.executable, str(REPO / "dataset_scripts" / script), *argv],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_one_line_error(proc, *fragments):
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.mark.slow
def test_newcomer_errors_are_one_line_with_nothing_left_behind(tmp_path):
    root = tmp_path / "opensrh"
    make_opensrh(root)
    # A mistyped local path: named at once, not looked up on the Hub.
    out = tmp_path / "out"
    assert_one_line_error(
        run_script("opensrh.py", "data/dmo", "--output_dir", str(out), cwd=tmp_path),
        "data/dmo",
        "not a folder",
    )
    # Pushing while offline: refused before any work.
    assert_one_line_error(
        run_script("opensrh.py", str(root), "--patch-size", str(PATCH), "--push-to-hub", "me/x"),
        "HF_HUB_OFFLINE",
    )
    # An output that cannot be written (its parent is a file).
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_one_line_error(
        run_script("opensrh.py", str(root), "--patch-size", str(PATCH), "--output_dir", str(blocker / "out")),
        str(blocker),
    )
    # A manifest without the id columns.
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("slide_path,label\nx.svs,a\n")
    assert_one_line_error(
        run_script("wsi.py", "--manifest", str(manifest), "--output_dir", str(out)), "patient_id"
    )
    assert not out.exists() and leftovers(tmp_path) == []


@pytest.mark.slow
def test_debug_shows_the_traceback(tmp_path):
    proc = run_script("opensrh.py", "missing", "--output_dir", str(tmp_path / "o"), "--debug", cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "ConversionError" in proc.stderr


def test_a_killed_conversion_leaves_a_temporary_folder_the_next_run_removes(tmp_path):
    root = tmp_path / "opensrh"
    make_opensrh(root)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.tmp-{dead.pid}-0123abcd"
    (stale / "rows").mkdir(parents=True)
    running = tmp_path / f".out.tmp-{os.getpid()}-4567abcd"  # a live conversion's folder is not touched
    running.mkdir()
    opensrh.main(srh_args(root, tmp_path / "out"))
    assert not stale.exists() and running.exists()
    assert (tmp_path / "out" / "README.md").is_file()


def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    import errno

    root = tmp_path / "opensrh"
    make_opensrh(root)
    out = tmp_path / "out"

    def full(self, path, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(datasets.DatasetDict, "save_to_disk", full)
    message = expect_error(opensrh.main, srh_args(root, out), "no space left on the device holding")
    assert "\n" not in message
    assert not out.exists() and leftovers(tmp_path) == []
