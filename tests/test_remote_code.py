"""A saved HLSS folder loads as remote code where hlss_hf cannot be imported, and serves the feature pipeline."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json

import numpy as np
import pytest
import torch
from _tiny import run_without_hlss, tiny_hlss_model, tiny_tokenizer
from PIL import Image

from hlss_hf import HLSSImageProcessor, HLSSProcessor  # importing hlss_hf registers the Auto classes


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny HLSS model saved with its processor; returns (folder, model)."""
    folder = tmp_path_factory.mktemp("hlss")
    model = tiny_hlss_model(seed=11).eval()
    model.save_pretrained(folder)
    HLSSProcessor(HLSSImageProcessor(modality="he", crop_size=32), tiny_tokenizer()).save_pretrained(folder)
    return folder, model


def test_folder_holds_code_and_auto_map(saved):
    folder, _ = saved
    files = set(os.listdir(folder))
    assert {
        "config.json",
        "model.safetensors",
        "configuration_hlss.py",
        "modeling_hlss.py",
        "losses.py",
    } <= files
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert auto_map == {
        "AutoConfig": "configuration_hlss.HLSSConfig",
        "AutoModel": "modeling_hlss.HLSSModel",
        "AutoModelForImageClassification": "modeling_hlss.HLSSForImageClassification",
    }


def test_remote_code_load_in_a_clean_process_gives_identical_outputs(saved, tmp_path):
    folder, model = saved
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.save(x, tmp_path / "x.pt")
    result = run_without_hlss(
        f"""
        try:
            import hlss_hf
        except ImportError:
            pass
        else:
            raise SystemExit("hlss_hf is importable: the test would not prove remote code works")
        import torch
        from transformers import AutoModel, AutoModelForImageClassification, AutoProcessor

        model = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
        assert not any(p.requires_grad for p in model.text_model.parameters())
        x = torch.load({str(tmp_path / "x.pt")!r})
        with torch.no_grad():
            out = model(x)
        torch.save({{"embeds": out.image_embeds, "patch": out.attribute_scores["patch"]}}, {str(tmp_path / "out.pt")!r})
        classifier = AutoModelForImageClassification.from_pretrained(
            {str(folder)!r}, trust_remote_code=True, num_labels=3
        )
        assert type(classifier).__name__ == "HLSSForImageClassification"
        processor = AutoProcessor.from_pretrained({str(folder)!r}, trust_remote_code=True)
        assert type(processor).__name__ == "HLSSProcessor", type(processor)
        assert type(processor).__module__.startswith("transformers_modules.")
        print("ok")
        """,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "ok" in result.stdout
    remote = torch.load(tmp_path / "out.pt")
    with torch.no_grad():
        local = model(x)
    assert torch.equal(remote["embeds"], local.image_embeds)
    assert torch.equal(remote["patch"], local.attribute_scores["patch"])


def test_image_feature_extraction_pipeline_returns_the_embeddings(saved):
    from transformers import pipeline

    folder, model = saved
    pixels = np.random.default_rng(0).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    extractor = pipeline("image-feature-extraction", model=str(folder))
    features = extractor(Image.fromarray(pixels), return_tensors=True)
    expected = model.get_image_features(
        HLSSImageProcessor(modality="he", crop_size=32)(pixels)["pixel_values"]
    ).pooler_output
    assert features.shape == expected.shape == (1, model.config.projection_dim)
    torch.testing.assert_close(features, expected.detach())


def test_pipeline_with_hlss_hf_imported_needs_no_remote_code_prompt(saved, tmp_path, monkeypatch):
    """The local classes serve the pipeline: nothing asks whether to run the folder's code, also for a folder
    with an image processor alone (as fine-tuning writes), from which transformers derives a video processor."""
    from transformers import pipeline

    _, model = saved
    model.save_pretrained(tmp_path)
    HLSSImageProcessor(modality="he", crop_size=32).save_pretrained(tmp_path)
    assert (tmp_path / "preprocessor_config.json").is_file()
    prompts = []  # recorded, not raised: transformers turns errors raised at the prompt into a soft failure
    monkeypatch.setattr("builtins.input", lambda message="": prompts.append(message) or "n")
    for task in ("image-feature-extraction", "image-classification"):
        served = pipeline(task, model=str(tmp_path), device="cpu")
        assert type(served.image_processor) is HLSSImageProcessor
        assert type(served.model).__module__.startswith("hlss_hf.")
    assert prompts == []
