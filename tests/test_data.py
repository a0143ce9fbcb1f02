"""Hierarchical patient sampling (docs/method.md, the batch): index, sampling rules, determinism, workers,
sharding, streaming."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import io  # noqa: E402

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from augmentation_reference import per_image_reference  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from hlss_hf.data import (  # noqa: E402
    EpochBatchSampler,
    EpochPermutationSampler,
    HierarchicalCollator,
    HierarchicalPatchDataset,
    HierarchicalStreamingDataset,
    HierarchyIndex,
    balanced_patient_list,
    collate_hierarchical,
)
from hlss_hf.data.augmentation import DEFAULT_AUGMENTATION, build_augmentation  # noqa: E402
from hlss_hf.data.schema import features_for  # noqa: E402

SIZE = 12
CLASSES = ["hgg", "lgg", "normal"]


def srh_reference(raw: np.ndarray) -> torch.Tensor:
    """The SRH conversion of docs/method.md (preprocessing) written out: (H, W, 2) uint16 -> [CH3 - CH2 +
    5000/65536, CH2, CH3] / 65536, clamped."""
    ch2 = raw[..., 0].astype(np.float64) / 65536
    ch3 = raw[..., 1].astype(np.float64) / 65536
    return torch.from_numpy(np.clip(np.stack([ch3 - ch2 + 5000 / 65536, ch2, ch3]), 0, 1)).float()


def patch_value(patient: int, slide: int, patch: int) -> int:
    # Every patch gets a distinct constant CH2 so that tests can tell which row was drawn from its pixels.
    return 1000 * (patient + 1) + 100 * slide + patch


def make_rows(layout: dict[str, tuple[int, list[int]]], modality: str = "srh") -> list[dict]:
    """layout: patient -> (label, [patches per slide]); patients are numbered in insertion order."""
    rows = []
    for p, (patient, (label, slides)) in enumerate(layout.items()):
        for s, count in enumerate(slides):
            for k in range(count):
                value = patch_value(p, s, k)
                if modality == "srh":
                    image = np.full((SIZE, SIZE, 2), value, dtype=np.uint16)
                    image[..., 1] = value + 7
                else:
                    pixels = np.full((SIZE, SIZE, 3), value % 251, dtype=np.uint8)
                    buffer = io.BytesIO()
                    Image.fromarray(pixels).save(buffer, format="PNG")
                    image = {"bytes": buffer.getvalue(), "path": None}
                rows.append(
                    {
                        "image": image,
                        "patient_id": patient,
                        "slide_id": f"{patient}-s{s}",
                        "patch_id": f"{patient}-s{s}-{k}",
                        "label": label,
                        "x": 0,
                        "y": 0,
                        "level": -1,
                        "mpp": float("nan"),
                        "magnification": float("nan"),
                        "source": "test",
                    }
                )
    return rows


def make_dataset(layout, modality="srh") -> datasets.Dataset:
    features = features_for(modality, CLASSES, patch_size=SIZE if modality == "srh" else None)
    return datasets.Dataset.from_list(make_rows(layout, modality), features=features)


LAYOUT = {
    "P0": (0, [3]),  # one slide
    "P1": (0, [4, 1]),  # second slide has fewer patches than P
    "P2": (0, [2, 2, 2]),
    "P3": (1, [5, 5]),
    "P4": (1, [3, 3]),
    "P5": (2, [2, 2]),
}


@pytest.fixture(scope="module")
def srh_ds():
    return make_dataset(LAYOUT)


def crop_aug():
    return build_augmentation(
        {"random_resized_crop": {"scale": [0.5, 1.0]}, "horizontal_flip": {"p": 0.5}}, 8
    )


# --- index ---------------------------------------------------------------------------------------------------


def test_index_groups_rows_by_patient_and_slide(srh_ds):
    index = HierarchyIndex.from_dataset(srh_ds)
    assert index.patient_ids == list(LAYOUT)
    assert index.slides["P2"] == ["P2-s0", "P2-s1", "P2-s2"]
    assert index.labels == {p: label for p, (label, _) in LAYOUT.items()}
    assert index.class_names == CLASSES
    assert index.num_patients == 6 and index.num_slides == 12 and index.num_patches == len(srh_ds)
    for (patient, slide), rows in index.rows.items():
        assert all(
            srh_ds[int(r)]["slide_id"] == slide and srh_ds[int(r)]["patient_id"] == patient for r in rows
        )
    assert index.counts()["lgg"] == {"patients": 2, "slides": 4, "patches": 16}


def test_index_follows_a_shuffled_view_and_never_decodes_images():
    # Corrupt PNG bytes: any decode would raise, so a successful index proves it reads the id columns only.
    rows = make_rows({"A": (0, [2]), "B": (1, [1, 1])}, modality="he")
    for row in rows:
        row["image"] = {"bytes": b"not a png", "path": None}
    ds = datasets.Dataset.from_list(rows, features=features_for("he", CLASSES)).shuffle(seed=3)
    index = HierarchyIndex.from_dataset(ds)
    assert sorted(index.patient_ids) == ["A", "B"]
    for (patient, _), positions in index.rows.items():
        assert all(ds.select_columns(["patient_id"])[int(r)]["patient_id"] == patient for r in positions)


def test_index_errors_name_the_problem():
    rows = make_rows({"A": (0, [2]), "B": (1, [1])})
    rows[1]["label"] = 2  # A's rows now disagree
    features = features_for("srh", CLASSES, patch_size=SIZE)
    with pytest.raises(ValueError, match="'A'.*different labels"):
        HierarchyIndex.from_dataset(datasets.Dataset.from_list(rows, features=features))
    good = datasets.Dataset.from_list(make_rows({"A": (0, [2])}), features=features)
    with pytest.raises(ValueError, match="slide_id"):
        HierarchyIndex.from_dataset(good.remove_columns("slide_id"))
    with pytest.raises(ValueError, match="empty"):
        HierarchyIndex.from_dataset(good.select([]))


# --- sampling rules ------------------------------------------------------------------------------------------


def test_item_and_batch_shapes(srh_ds):
    data = HierarchicalPatchDataset(srh_ds, num_slides=2, num_patches=3, num_views=2, transform=crop_aug())
    item = data[3]
    assert item["pixel_values"].shape == (2, 3, 2, 3, 8, 8)
    assert item["pixel_values"].dtype == torch.float32
    assert item["label"] == 1 and item["patient_id"] == "P3" and len(item["slide_ids"]) == 2
    batch = HierarchicalCollator()([data[i] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 2, 3, 2, 3, 8, 8)
    assert batch["labels"].tolist() == [0, 0, 0, 1] and batch["labels"].dtype == torch.long
    assert batch["patient_ids"] == ["P0", "P1", "P2", "P3"]


@pytest.mark.parametrize("view", ["plain", "shuffled", "selected"])
def test_pixels_are_the_drawn_rows_converted(srh_ds, view):
    # The zero-copy reader must honour datasets' indices mapping (shuffle / select) and chunk boundaries.
    if view == "shuffled":
        srh_ds = srh_ds.shuffle(seed=1)
    elif view == "selected":
        srh_ds = datasets.concatenate_datasets([srh_ds.select(range(20, 34)), srh_ds.select(range(20))])
    data = HierarchicalPatchDataset(srh_ds, num_slides=2, num_patches=2, num_views=3, transform=None)
    for i in range(len(data)):
        item = data[i]
        slide_ids, rows, _ = data.sample_rows(i)
        assert item["slide_ids"] == slide_ids
        for s in range(2):
            for p in range(2):
                raw = np.asarray(srh_ds[int(rows[s, p])]["image"], dtype=np.uint16)
                assert srh_ds[int(rows[s, p])]["slide_id"] == slide_ids[s]
                for v in range(3):
                    torch.testing.assert_close(item["pixel_values"][s, p, v], srh_reference(raw))


def test_patient_with_fewer_slides_cycles_and_others_draw_without_replacement(srh_ds):
    data = HierarchicalPatchDataset(srh_ds, num_slides=2, num_patches=1, num_views=1, seed=5)
    for epoch in range(4):
        data.set_epoch(epoch)
        assert data[0]["slide_ids"] == ["P0-s0", "P0-s0"]  # one slide, S=2: cycles
        assert len(set(data[2]["slide_ids"])) == 2  # three slides, S=2: distinct
    cycling = HierarchicalPatchDataset(srh_ds, num_slides=5, num_patches=1, num_views=1, seed=1)
    slides = cycling[3]["slide_ids"]  # two slides, S=5: each slide at least twice (a cycle of a random order)
    assert sorted(set(slides)) == ["P3-s0", "P3-s1"] and min(slides.count(s) for s in set(slides)) == 2


def test_slide_with_fewer_patches_than_p_draws_with_replacement(srh_ds):
    data = HierarchicalPatchDataset(srh_ds, num_slides=2, num_patches=3, num_views=1)
    slide_ids, rows, _ = data.sample_rows(1)  # P1: slides of 4 and 1 patches
    small = slide_ids.index("P1-s1")
    assert len(set(rows[small].tolist())) == 1  # the only patch, three times
    assert len(set(rows[1 - small].tolist())) == 3  # enough patches: without replacement
    index = data.index
    for s, slide in enumerate(slide_ids):
        assert set(rows[s].tolist()) <= set(index.rows[("P1", slide)].tolist())


def test_draws_are_deterministic_per_seed_and_epoch(srh_ds):
    data = HierarchicalPatchDataset(srh_ds, num_patches=2, num_views=2, transform=crop_aug(), seed=11)
    first = [data[i]["pixel_values"] for i in range(len(data))]
    again = HierarchicalPatchDataset(srh_ds, num_patches=2, num_views=2, transform=crop_aug(), seed=11)
    assert all(torch.equal(a, again[i]["pixel_values"]) for i, a in enumerate(first))
    data.set_epoch(1)
    assert not all(torch.equal(a, data[i]["pixel_values"]) for i, a in enumerate(first))
    data.set_epoch(0)
    assert all(torch.equal(a, data[i]["pixel_values"]) for i, a in enumerate(first))
    other_seed = HierarchicalPatchDataset(srh_ds, num_patches=2, num_views=2, transform=crop_aug(), seed=12)
    assert not all(torch.equal(a, other_seed[i]["pixel_values"]) for i, a in enumerate(first))


def test_augmented_views_equal_the_per_view_reference_calls():
    # The dataset augments all S*P*V views of a patient in one batched call; it must give what one reference
    # call per view gives on the same drawn rows and generator (the research-code way), pixels with clamped
    # CH3 - CH2 included.
    from hlss_hf.models.hlss.pixels_hlss import srh_to_float

    rows = make_rows({"A": (0, [3, 2]), "B": (1, [2])})
    rng = np.random.default_rng(0)
    for i, row in enumerate(rows):
        image = rng.integers(8000, 12000, (SIZE, SIZE, 2)).astype(np.uint16)
        image[..., 1] += 4000  # CH3 > CH2: channel 0 unclamped
        if i % 2:
            image[2:6, 2:6, 0] = 60000  # clamped to 0 in channel 0
        row["image"] = image
    ds = datasets.Dataset.from_list(rows, features=features_for("srh", CLASSES, patch_size=SIZE))
    # Solarize is left out: a value within float rounding of its threshold (the batched sharpness gives 0.2, the
    # per-view one 0.19999999) flips to 1 - x on one path only, a 0.6 jump that says nothing about batching.
    operations = {name: params for name, params in DEFAULT_AUGMENTATION.items() if name != "solarize"}
    aug = build_augmentation(operations, 8)
    data = HierarchicalPatchDataset(ds, num_slides=2, num_patches=2, num_views=2, transform=aug, seed=3)
    for i in range(len(data)):
        _, drawn, draws = data.sample_rows(i)
        generator = torch.Generator().manual_seed(int(draws.integers(0, 2**63 - 1)))
        expected = torch.stack(
            [
                per_image_reference(
                    aug, srh_to_float(np.asarray(ds[int(r)]["image"], dtype=np.uint16)), generator=generator
                )
                for r in drawn.reshape(-1).tolist()
                for _ in range(2)
            ]
        ).reshape(2, 2, 2, 3, 8, 8)
        torch.testing.assert_close(data[i]["pixel_values"], expected, atol=1e-5, rtol=0)


def test_views_of_a_patch_differ(srh_ds):
    aug = build_augmentation({"random_resized_crop": {"scale": [0.2, 0.5]}}, 8)
    ds = datasets.Dataset.from_list(
        [
            dict(row, image=np.random.default_rng(i).integers(0, 65535, (SIZE, SIZE, 2), dtype=np.uint16))
            for i, row in enumerate(make_rows({"A": (0, [2])}))
        ],
        features=features_for("srh", CLASSES, patch_size=SIZE),
    )
    pixels = HierarchicalPatchDataset(ds, num_slides=1, num_patches=1, num_views=2, transform=aug)[0][
        "pixel_values"
    ]
    assert not torch.equal(pixels[0, 0, 0], pixels[0, 0, 1])


def test_dataloader_workers_give_identical_batches(srh_ds):
    data = HierarchicalPatchDataset(srh_ds, num_patches=2, num_views=2, transform=crop_aug(), seed=3)

    def run(**kwargs):
        loader = DataLoader(data, batch_size=2, collate_fn=collate_hierarchical, **kwargs)
        out = []
        for epoch in range(2):
            data.set_epoch(epoch)
            out.extend(batch["pixel_values"] for batch in loader)
        return out

    serial = run(num_workers=0)
    assert all(torch.equal(a, b) for a, b in zip(serial, run(num_workers=2), strict=True))
    # Persistent workers see set_epoch through shared memory.
    assert all(
        torch.equal(a, b) for a, b in zip(serial, run(num_workers=2, persistent_workers=True), strict=True)
    )
    assert not torch.equal(serial[0], serial[3])  # epoch 1 differs from epoch 0


def test_class_balancing_replicates_smaller_classes(srh_ds):
    data = HierarchicalPatchDataset(srh_ds, balance_classes=True, seed=4)
    per_class = {label: 0 for label in range(3)}
    for patient in data.patients:
        per_class[data.index.labels[patient]] += 1
    assert per_class == {0: 3, 1: 3, 2: 3}
    assert data.patients.count("P5") == 3 and set(data.patients) == set(LAYOUT)
    assert balanced_patient_list(data.index, seed=4) == data.patients
    assert len(data) == 9
    # Copies of one patient are different samples (randomness follows the item index, not the patient).
    augmented = HierarchicalPatchDataset(srh_ds, balance_classes=True, seed=4, transform=crop_aug())
    copies = [augmented[i]["pixel_values"] for i, p in enumerate(augmented.patients) if p == "P5"]
    assert not torch.equal(copies[0], copies[1])


def test_bad_arguments_are_named(srh_ds):
    with pytest.raises(ValueError, match="num_patches"):
        HierarchicalPatchDataset(srh_ds, num_patches=0)
    with pytest.raises(ValueError, match="seed"):
        HierarchicalPatchDataset(srh_ds, seed=-1)
    with pytest.raises(ValueError, match="image"):
        HierarchicalPatchDataset(srh_ds.remove_columns("image"))
    with pytest.raises(ValueError, match="different shapes"):
        collate_hierarchical(
            [
                {
                    "pixel_values": torch.zeros(1, 1, 1, 3, 4, 4),
                    "label": 0,
                    "patient_id": "a",
                    "slide_ids": ["x"],
                },
                {
                    "pixel_values": torch.zeros(1, 1, 1, 3, 5, 5),
                    "label": 0,
                    "patient_id": "b",
                    "slide_ids": ["y"],
                },
            ]
        )


def test_he_dataset_is_scaled_by_255():
    ds = make_dataset({"A": (0, [2]), "B": (1, [2, 1])}, modality="he")
    data = HierarchicalPatchDataset(ds, num_slides=1, num_patches=1, num_views=1)
    item = data[1]
    rows = data.sample_rows(1)[1]
    expected = np.asarray(ds[int(rows[0, 0])]["image"], dtype=np.float32) / 255
    torch.testing.assert_close(item["pixel_values"][0, 0, 0], torch.from_numpy(expected).permute(2, 0, 1))


# --- process sharding ----------------------------------------------------------------------------------------


def test_accelerate_sharding_covers_each_patient_once_with_identical_samples():
    from accelerate.data_loader import prepare_data_loader

    layout = {f"Q{i}": (i % 3, [2, 1 + i % 2]) for i in range(8)}
    data = HierarchicalPatchDataset(make_dataset(layout), num_patches=2, transform=crop_aug(), seed=9)
    single = {}
    for batch in DataLoader(data, batch_size=2, collate_fn=collate_hierarchical):
        single.update(zip(batch["patient_ids"], batch["pixel_values"], strict=True))
    seen = []
    for rank in range(2):
        loader = prepare_data_loader(
            DataLoader(data, batch_size=2, collate_fn=collate_hierarchical),
            num_processes=2,
            process_index=rank,
            put_on_device=False,
        )
        for batch in loader:
            for patient, pixels in zip(batch["patient_ids"], batch["pixel_values"], strict=True):
                seen.append(patient)
                assert torch.equal(pixels, single[patient])
    assert sorted(seen) == sorted(layout)  # each patient exactly once over the two processes
    shards = [data.shard_patients(2, r) for r in range(2)]
    assert sorted(shards[0].indices + shards[1].indices) == list(range(8))
    assert torch.equal(shards[1][0]["pixel_values"], single[data.patients[1]])
    with pytest.raises(ValueError, match="shard index"):
        data.shard_patients(2, 2)


# --- streaming -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def parquet_stream(tmp_path_factory, srh_ds):
    path = tmp_path_factory.mktemp("stream") / "train.parquet"
    srh_ds.to_parquet(str(path))
    return str(path)


def stream(path):
    return datasets.load_dataset("parquet", data_files=path, split="train", streaming=True)


def test_streaming_emits_each_patient_of_a_sorted_stream_once(parquet_stream, srh_ds):
    data = HierarchicalStreamingDataset(
        stream(parquet_stream), num_slides=2, num_patches=2, num_views=1, buffer_size=2
    )
    assert data.modality == "srh" and data.class_names == CLASSES
    items = list(data)
    assert sorted(item["patient_id"] for item in items) == sorted(LAYOUT)
    assert all(item["pixel_values"].shape == (2, 2, 1, 3, SIZE, SIZE) for item in items)
    # Pixels are real rows of the right slide, converted as docs/method.md (preprocessing) says.
    by_patch = {}
    for row in srh_ds:
        by_patch.setdefault(row["slide_id"], []).append(
            srh_reference(np.asarray(row["image"], dtype=np.uint16))
        )
    for item in items:
        assert item["label"] == LAYOUT[item["patient_id"]][0]
        for s, slide in enumerate(item["slide_ids"]):
            for p in range(2):
                assert any(torch.allclose(item["pixel_values"][s, p, 0], ref) for ref in by_patch[slide])
    assert item["slide_ids"] == ["P5-s0", "P5-s1"] or item["slide_ids"] == ["P5-s1", "P5-s0"]


def test_streaming_is_split_across_workers_and_ranks_deterministically(parquet_stream):
    def run(num_workers=0, rank=None, world_size=None, epoch=0):
        data = HierarchicalStreamingDataset(
            stream(parquet_stream),
            num_patches=2,
            num_views=2,
            transform=crop_aug(),
            seed=2,
            rank=rank,
            world_size=world_size,
        )
        data.set_epoch(epoch)
        loader = DataLoader(data, batch_size=None, num_workers=num_workers)
        return {item["patient_id"]: item["pixel_values"] for item in loader}

    serial = run()
    assert sorted(serial) == sorted(LAYOUT)
    workers = run(num_workers=2)
    assert sorted(workers) == sorted(LAYOUT) and all(torch.equal(serial[p], workers[p]) for p in LAYOUT)
    ranks = [run(rank=r, world_size=2) for r in range(2)]
    assert not set(ranks[0]) & set(ranks[1]) and set(ranks[0]) | set(ranks[1]) == set(LAYOUT)
    assert all(torch.equal(serial[p], ranks[r][p]) for r in range(2) for p in ranks[r])
    assert not all(torch.equal(serial[p], t) for p, t in run(epoch=1).items())


def test_streaming_buffer_evicts_the_oldest_and_caps_patients(srh_ds):
    # Interleave two patients' rows: with room for one patient, every switch evicts the other.
    rows = [srh_ds[i] for i in range(len(srh_ds)) if srh_ds[i]["patient_id"] in ("P3", "P4")]
    p3, p4 = [r for r in rows if r["patient_id"] == "P3"], [r for r in rows if r["patient_id"] == "P4"]
    interleaved = [row for pair in zip(p3, p4, strict=False) for row in pair]
    for row in interleaved:
        row["image"] = np.asarray(row["image"], dtype=np.uint16)
    items = list(
        HierarchicalStreamingDataset(interleaved, num_patches=1, num_views=1, buffer_size=1, modality="srh")
    )
    assert len(items) == len(interleaved)  # each row became its own group
    capped = list(
        HierarchicalStreamingDataset(p3, num_patches=1, num_views=1, patches_per_patient=4, modality="srh")
    )
    assert [item["patient_id"] for item in capped] == ["P3"] * 3  # 10 patches in groups of 4, 4, 2
    with pytest.raises(ValueError, match="modality"):
        HierarchicalStreamingDataset(p3)


def test_streaming_he_parquet_decodes_png_rows(tmp_path):
    ds = make_dataset({"A": (0, [2]), "B": (1, [1, 2])}, modality="he")
    path = str(tmp_path / "he.parquet")
    ds.to_parquet(path)
    data = HierarchicalStreamingDataset(stream(path), num_slides=1, num_patches=1, num_views=1)
    items = {item["patient_id"]: item for item in data}
    assert data.modality == "he" and sorted(items) == ["A", "B"]
    by_slide = {}
    for row in ds:
        pixels = torch.from_numpy(np.asarray(row["image"], dtype=np.float32) / 255).permute(2, 0, 1)
        by_slide.setdefault(row["slide_id"], []).append(pixels)
    for item in items.values():
        assert any(torch.allclose(item["pixel_values"][0, 0, 0], c) for c in by_slide[item["slide_ids"][0]])


# --- loading a split (hlss_hf.data.load_split: train.py, finetune.py and evaluate read data this way) -----------


@pytest.fixture(scope="module")
def split_sources(tmp_path_factory, srh_ds):
    """The same two splits as a save_to_disk folder and as a Hub-layout folder (one parquet file per split)."""
    root = tmp_path_factory.mktemp("sources")
    splits = datasets.DatasetDict({"train": srh_ds, "validation": srh_ds.select(range(4))})
    splits.save_to_disk(str(root / "saved"))
    (root / "hub").mkdir()
    for name, split in splits.items():
        split.to_parquet(str(root / "hub" / f"{name}.parquet"))
    return root


@pytest.mark.parametrize("layout", ["saved", "hub"])
def test_load_split_reads_both_folder_layouts_with_max_samples(split_sources, srh_ds, layout):
    from hlss_hf.data import load_split, split_names

    source = str(split_sources / layout)
    assert sorted(split_names(source)) == ["train", "validation"]
    train = load_split(source, "train")
    assert isinstance(train, datasets.Dataset) and train["patch_id"] == srh_ds["patch_id"]
    assert load_split(source, "validation", max_samples=3)["patch_id"] == srh_ds["patch_id"][:3]
    stream = load_split(source, "train", streaming=True, max_samples=5)
    assert isinstance(stream, datasets.IterableDataset)
    assert [row["patch_id"] for row in stream] == srh_ds["patch_id"][:5]


@pytest.mark.parametrize("layout, streaming", [("saved", False), ("hub", False), ("hub", True)])
def test_load_split_names_a_missing_split_its_setting_and_the_splits_there_are(
    split_sources, layout, streaming
):
    from hlss_hf.data import load_split
    from hlss_hf.errors import DatasetError

    source = str(split_sources / layout)
    expected = (
        rf"dataset '{source}' has no split 'test' \(--split\); its splits are \['train', 'validation'\]"
    )
    with pytest.raises(DatasetError, match=expected):
        load_split(source, "test", streaming=streaming, key="--dataset", split_key="--split")


def test_load_split_names_missing_id_columns_and_empty_splits(tmp_path, srh_ds):
    from hlss_hf.data import load_split
    from hlss_hf.errors import DatasetError

    folder = tmp_path / "flat"
    flat = srh_ds.remove_columns(["patient_id", "slide_id"])
    datasets.DatasetDict({"train": flat, "validation": flat.select([])}).save_to_disk(str(folder))
    with pytest.raises(
        DatasetError, match=r"'train' of dataset .*flat' \(data\.dataset\) has no patient_id or slide_id"
    ):
        load_split(str(folder), "train", key="data.dataset")
    assert load_split(str(folder), "train", required_columns=())["patch_id"] == srh_ds["patch_id"]
    with pytest.raises(DatasetError, match=r"split 'validation' of dataset .* is empty \(--eval_split\)"):
        load_split(str(folder), "validation", required_columns=(), split_key="--eval_split")
    in_memory = datasets.DatasetDict({"train": srh_ds, "validation": srh_ds.select([])})
    with pytest.raises(DatasetError, match=r"split 'validation' of dataset 'demo' is empty"):
        load_split(in_memory, "validation", name="demo")
    with pytest.raises(DatasetError, match=r"dataset 'demo' has no split 'test' \(data\.validation_split\)"):
        load_split(in_memory, "test", name="demo", split_key="data.validation_split")


def test_load_split_bad_sources_are_one_line_errors_naming_the_setting(tmp_path, monkeypatch):
    from hlss_hf.data import load_split, split_names
    from hlss_hf.errors import DatasetError, SourceError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    with pytest.raises(SourceError, match=r"dataset 'data/dmo' \(--dataset\): no such folder"):
        load_split("data/dmo", "train", key="--dataset")  # a mistyped path, never looked up on the Hub
    with pytest.raises(DatasetError, match=r"dataset 'data' \(--dataset\): .*data files"):
        load_split("data", "train", key="--dataset")
    datasets.Dataset.from_dict({"patch_id": ["a"]}).save_to_disk(str(tmp_path / "one"))
    with pytest.raises(DatasetError, match=r"dataset 'one' \(--dataset\) is one saved split"):
        split_names("one", key="--dataset")
    # HF_DATASETS_OFFLINE is set for these tests: an id that is not cached says so.
    with pytest.raises(SourceError, match=r"'nobody/nothing' \(data\.dataset\).*offline"):
        load_split("nobody/nothing", "train", key="data.dataset")


# --- atomic writes (hlss_hf.files: what every writer of the project uses) -----------------------------------------


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name or ".old-" in p.name)


def test_write_folder_atomically_swaps_in_a_complete_folder(tmp_path):
    from hlss_hf.files import write_folder_atomically

    target = tmp_path / "model"

    def write(tmp):
        assert list(tmp.iterdir()) == [] and tmp.parent == tmp_path  # an empty sibling: the swap is a rename
        (tmp / "a.txt").write_text("first")
        return "built"

    assert write_folder_atomically(target, write) == "built"
    assert (target / "a.txt").read_text() == "first"
    write_folder_atomically(target, lambda tmp: (tmp / "b.txt").write_text("second"))
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]  # replaced, nothing of the old copy kept
    assert leftovers(tmp_path) == []


def test_write_folder_atomically_keeps_the_old_folder_when_writing_or_swapping_fails(tmp_path, monkeypatch):
    from hlss_hf import files

    target = tmp_path / "model"
    files.write_folder_atomically(target, lambda tmp: (tmp / "a.txt").write_text("keep"))

    def fail(tmp):
        (tmp / "half.txt").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        files.write_folder_atomically(target, fail)
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"] and leftovers(tmp_path) == []

    replace = os.replace

    def replace_fails_for_the_new_folder(src, dst):
        if ".tmp-" in str(src):
            raise OSError("rename failed")
        replace(src, dst)

    monkeypatch.setattr(files.os, "replace", replace_fails_for_the_new_folder)
    with pytest.raises(OSError, match="rename failed"):
        files.write_folder_atomically(target, lambda tmp: (tmp / "b.txt").write_text("new"))
    assert (target / "a.txt").read_text() == "keep" and leftovers(tmp_path) == []


def test_write_text_atomically_leaves_the_old_file_when_writing_fails(tmp_path):
    from hlss_hf.files import write_file_atomically, write_text_atomically

    path = tmp_path / "report.json"
    write_text_atomically(path, "{}")

    def fail(tmp):
        tmp.write_text("{partial")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        write_file_atomically(path, fail)
    assert path.read_text() == "{}" and leftovers(tmp_path) == []


def test_train_loader_workers_pinning_and_persistence_follow_the_device(srh_ds, monkeypatch):
    from hlss_hf.data import build_train_loader
    from hlss_hf.training.config import TrainConfig, parse_config

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    base = ["--data.dataset", "unused", "--training.per_device_batch_size", "2", "--data.crop_size", "8"]
    auto = parse_config(base, TrainConfig)
    assert auto.data.num_workers is None  # null: chosen from the device
    _, on_cpu = build_train_loader(auto, srh_ds, 1)
    assert (on_cpu.num_workers, on_cpu.pin_memory) == (0, False)  # workers would compete with the model
    _, on_gpu = build_train_loader(auto, srh_ds, 1, torch.device("cuda", 0))
    assert (on_gpu.num_workers, on_gpu.pin_memory, on_gpu.persistent_workers) == (7, True, True)
    fixed = parse_config(base + ["--data.num_workers", "3"], TrainConfig)
    for device in ("cpu", "cuda"):
        assert build_train_loader(fixed, srh_ds, 1, device)[1].num_workers == 3


@pytest.mark.parametrize("num_processes", [1, 2, 3])
@pytest.mark.parametrize("drop_last", [True, False])
def test_epoch_batches_across_epochs_are_the_per_epoch_loaders_batches(num_processes, drop_last):
    # What each process trained on when every epoch had its own iteration: a DataLoader's BatchSampler over the
    # epoch's permutation, sharded by Accelerate (which completes a kept short batch on several processes).
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler

    patients, batch = 11, 2  # 5 or 6 batches an epoch, the sixth of one patient when kept

    def order(epoch):
        sampler = EpochPermutationSampler(patients, 4, batch * num_processes, drop_last)
        sampler.set_epoch(epoch)
        return sampler

    def shard(batches, process):
        return batches if num_processes == 1 else BatchSamplerShard(batches, num_processes, process)

    spanning = EpochBatchSampler(order(0), batch, num_processes)
    spanning.set_epoch(3)
    for num_epochs in (1, 3):  # one epoch yields plain indices, several (epoch, index) items
        spanning.num_epochs = num_epochs
        for process in range(num_processes):
            per_epoch = [
                [(epoch, index) if num_epochs > 1 else index for index in items]
                for epoch in range(3, 3 + num_epochs)
                for items in shard(BatchSampler(order(epoch), batch, drop_last), process)
            ]
            ours = shard(spanning, process)
            assert list(ours) == per_epoch and len(ours) == len(per_epoch)
            assert drop_last or num_processes > 1 or min(map(len, per_epoch)) == 1  # the short batch is there


def test_a_patch_smaller_than_the_crop_further_on_is_named_with_its_row():
    from hlss_hf.errors import DatasetError

    rows = make_rows(LAYOUT, "he")
    small = io.BytesIO()
    Image.fromarray(np.zeros((4, 6, 3), dtype=np.uint8)).save(small, format="PNG")
    rows[5]["image"] = {"bytes": small.getvalue(), "path": None}  # P1's first slide; row 0 is whole
    ds = datasets.Dataset.from_list(rows, features=features_for("he", CLASSES))
    data = HierarchicalPatchDataset(ds, num_slides=2, num_patches=4, num_views=1, transform=crop_aug())
    assert data[data.patients.index("P0")]["pixel_values"].shape[-1] == 8
    # P1's two slides are both drawn, all four patches of the first.
    with pytest.raises(
        DatasetError, match=r"patient 'P1', row 5: a patch of 4x6 px, smaller than data.crop_size 8"
    ):
        data[data.patients.index("P1")]
