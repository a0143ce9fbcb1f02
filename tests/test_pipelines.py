"""pipeline("hlss-feature-extraction" / "hlss-image-classification"): SRH uint16 arrays and TIFF files in, the
model's own embeddings and class scores out, with hlss_hf imported and as remote code without it."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from _tiny import IMAGE_SIZE, tiny_hlss_model  # noqa: E402
from transformers import pipeline  # noqa: E402

import hlss_hf  # noqa: E402,F401
from hlss_hf import HLSSForImageClassification, HLSSImageProcessor  # noqa: E402
from hlss_hf.models.hlss.pipeline_hlss import add_pipelines_to_folder, read_patch  # noqa: E402

NAMES = ["hgg", "lgg", "normal"]


def srh(seed, size=40):
    return np.random.default_rng(seed).integers(0, 65536, (size, size, 2)).astype(np.uint16)


@pytest.fixture(scope="module")
def srh_model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("srh-model")
    tiny_hlss_model(image_size=IMAGE_SIZE).save_pretrained(folder)
    HLSSImageProcessor(modality="srh", crop_size=IMAGE_SIZE).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def classifier_dir(srh_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("srh-classifier")
    torch.manual_seed(0)
    model = HLSSForImageClassification.from_pretrained(
        srh_model_dir,
        num_labels=3,
        id2label=dict(enumerate(NAMES)),
        label2id={n: i for i, n in enumerate(NAMES)},
    )
    model.save_pretrained(folder)
    HLSSImageProcessor(modality="srh", crop_size=IMAGE_SIZE).save_pretrained(folder)
    return folder


def expected_features(folder, array):
    from hlss_hf import HLSSModel

    model, processor = HLSSModel.from_pretrained(folder).eval(), HLSSImageProcessor.from_pretrained(folder)
    with torch.no_grad():
        return model.get_image_features(**processor(images=[array], return_tensors="pt")).pooler_output[0]


def test_read_patch_accepts_srh_arrays_channel_first_tiffs_and_rejects_other_shapes(tmp_path):
    array = srh(0)
    np.testing.assert_array_equal(read_patch(array), array)
    np.testing.assert_array_equal(read_patch(np.moveaxis(array, -1, 0)), array)
    tifffile.imwrite(tmp_path / "p.tif", np.moveaxis(array, -1, 0))
    got = read_patch(tmp_path / "p.tif")
    assert got.dtype == np.uint16
    np.testing.assert_array_equal(got, array)
    with pytest.raises(ValueError, match=r"\[H, W, 2\]"):
        read_patch(np.zeros((40, 40, 4), np.uint16))
    with pytest.raises(FileNotFoundError, match="missing.tif"):
        read_patch(tmp_path / "missing.tif")


def test_feature_pipeline_embeds_uint16_arrays_and_tiff_files_like_the_model(srh_model_dir, tmp_path):
    array = srh(1)
    tifffile.imwrite(tmp_path / "p.tiff", array)
    embed = pipeline("hlss-feature-extraction", model=str(srh_model_dir))
    expected = expected_features(srh_model_dir, array)
    torch.testing.assert_close(torch.tensor(embed(array)), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(
        embed(str(tmp_path / "p.tiff"), return_tensors=True)[0], expected, rtol=0, atol=1e-5
    )
    batch = embed([array, srh(2)])
    assert len(batch) == 2 and not np.allclose(batch[0], batch[1])


def test_classification_pipeline_scores_srh_patches_with_the_classifier(classifier_dir):
    array = srh(3)
    classify = pipeline("hlss-image-classification", model=str(classifier_dir))
    out = classify(array, top_k=3)
    model = HLSSForImageClassification.from_pretrained(classifier_dir).eval()
    processor = HLSSImageProcessor.from_pretrained(classifier_dir)
    with torch.no_grad():
        probs = model(**processor(images=[array], return_tensors="pt")).logits[0].softmax(-1)
    assert [d["label"] for d in out] == [NAMES[i] for i in probs.argsort(descending=True).tolist()]
    np.testing.assert_allclose(
        [d["score"] for d in out], probs.sort(descending=True).values.numpy(), atol=1e-6
    )


@pytest.mark.slow
def test_pipelines_run_as_remote_code_without_hlss_hf(srh_model_dir, classifier_dir, tmp_path):
    add_pipelines_to_folder(srh_model_dir)
    add_pipelines_to_folder(classifier_dir)
    array = srh(4)
    np.save(tmp_path / "patch.npy", array)
    code = f"""
import sys; sys.modules["hlss_hf"] = None
import json, numpy as np
from transformers import pipeline
array = np.load({str(tmp_path / "patch.npy")!r})
embed = pipeline("hlss-feature-extraction", model={str(srh_model_dir)!r}, trust_remote_code=True)
classify = pipeline("hlss-image-classification", model={str(classifier_dir)!r}, trust_remote_code=True)
print(json.dumps({{"embedding": embed(array), "classes": classify(array, top_k=2),
                  "module": type(embed).__module__}}))
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["module"].startswith("transformers_modules."), report["module"]
    np.testing.assert_allclose(
        report["embedding"], expected_features(srh_model_dir, array).numpy(), atol=1e-5
    )
    assert len(report["classes"]) == 2 and {d["label"] for d in report["classes"]} <= set(NAMES)
