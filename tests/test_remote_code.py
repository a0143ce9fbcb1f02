"""A saved HLSS folder loads as remote code where hlss_hf cannot be imported, and serves the feature pipeline."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from _tiny import run_without_hlss, tiny_hlss_model, tiny_tokenizer
from PIL import Image

from hlss_hf import HLSSImageProcessor, HLSSProcessor  # importing hlss_hf registers the Auto classes

# End to end: saved folders load in fresh processes without hlss_hf (the fast tier leaves them out).
pytestmark = pytest.mark.slow


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
        "processing_hlss.py",
        "pixels_hlss.py",  # reached through processing_hlss.py's relative import
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


# ------------------------------------------------------------------------ models saved before issue 21's changes
# The last commit before issue 21 changed the model and processor API (feature outputs, processor kwargs, weight
# initialisation): folders saved by its code carry its remote-code files and must keep loading, as remote code
# and with hlss_hf's current classes.
OLD_CODE_COMMIT = "919f086e40351cd2ccc9410e0bf8518f86b41eaa"
REMOTE_CODE_FILES = ("configuration_hlss.py", "modeling_hlss.py", "losses.py", "processing_hlss.py")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def old_folder(tmp_path_factory):
    """A tiny model and processor saved by the code of `OLD_CODE_COMMIT` (read from git at test time), with the
    inputs and outputs that code gave; returns (folder, reference dict)."""
    root = tmp_path_factory.mktemp("before_issue_21")
    package = root / "hlss_before"
    package.mkdir()
    (package / "__init__.py").write_text("", encoding="utf-8")
    for name in REMOTE_CODE_FILES:
        try:
            shown = subprocess.run(
                ["git", "-C", str(REPO), "show", f"{OLD_CODE_COMMIT}:hlss_hf/{name}"],
                capture_output=True,
                text=True,
                check=True,
            )
        except (OSError, subprocess.CalledProcessError):
            pytest.skip(f"needs the git history holding {OLD_CODE_COMMIT} (the code before issue 21)")
        (package / name).write_text(shown.stdout, encoding="utf-8")
    folder = root / "hlss_saved_before_issue_21"  # distinct: remote code is cached under the folder name
    result = run_without_hlss(
        f"""
        import sys
        sys.path[:0] = [{str(root)!r}, {str(Path(__file__).parent)!r}]
        import numpy as np
        import torch
        from _tiny import TINY_ATTRIBUTES, clip_text_config, clip_vision_config, tiny_tokenizer
        from hlss_before.modeling_hlss import HLSSModel
        from hlss_before.processing_hlss import HLSSImageProcessor, HLSSProcessor

        torch.manual_seed(5)
        model = HLSSModel.from_vision_text_pretrained(
            clip_vision_config(), clip_text_config(), attributes=TINY_ATTRIBUTES, tokenizer=tiny_tokenizer()
        ).eval()
        model.save_pretrained({str(folder)!r})
        HLSSImageProcessor.register_for_auto_class("AutoImageProcessor")  # as hlss_hf/__init__.py did
        HLSSProcessor.register_for_auto_class("AutoProcessor")
        processor = HLSSProcessor(HLSSImageProcessor(modality="he", crop_size=32), tiny_tokenizer())
        processor.save_pretrained({str(folder)!r})
        image = np.random.default_rng(6).integers(0, 256, (40, 40, 3), dtype=np.uint8)
        pixels = processor(images=[image])["pixel_values"]
        with torch.no_grad():
            out = model(pixels)
        torch.save(
            {{
                "image": torch.from_numpy(image),
                "pixels": pixels,
                "embeds": out.image_embeds,
                "patch": out.attribute_scores["patch"],
                "text": model.encode_texts(["a glial tumour"], tiny_tokenizer()),
            }},
            {str(root / "reference.pt")!r},
        )
        """,
        cwd=root,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return folder, torch.load(root / "reference.pt")


def test_a_folder_saved_before_issue_21_loads_with_today_s_classes(old_folder):
    from transformers import AutoModel, AutoProcessor

    from hlss_hf import HLSSModel

    folder, reference = old_folder
    assert "get_image_features(self, pixel_values: torch.Tensor, **kwargs) -> torch.Tensor" in (
        folder / "modeling_hlss.py"
    ).read_text(encoding="utf-8")  # the folder holds the old code indeed
    model = AutoModel.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    assert type(model) is HLSSModel and type(processor) is HLSSProcessor
    pixels = processor(images=[reference["image"].numpy()])["pixel_values"]
    assert torch.equal(pixels, reference["pixels"])
    with torch.no_grad():
        out = model(pixels)
        features = model.get_image_features(pixels)
    torch.testing.assert_close(out.image_embeds, reference["embeds"])
    torch.testing.assert_close(out.attribute_scores["patch"], reference["patch"])
    torch.testing.assert_close(features.pooler_output, reference["embeds"])
    torch.testing.assert_close(model.encode_texts(["a glial tumour"], tiny_tokenizer()), reference["text"])


def test_a_folder_saved_before_issue_21_loads_as_remote_code_also_once_saved_again(old_folder, tmp_path):
    from transformers import AutoModel, AutoProcessor

    folder, reference = old_folder
    # Saved again by today's code (with hlss_hf imported: today's classes), for the second load below.
    resaved = tmp_path / "hlss_resaved_after_issue_21"
    AutoModel.from_pretrained(folder).save_pretrained(resaved)
    AutoProcessor.from_pretrained(folder).save_pretrained(resaved)
    torch.save(reference["image"], tmp_path / "image.pt")
    result = run_without_hlss(
        f"""
        import torch
        from transformers import AutoModel, AutoModelForImageClassification, AutoProcessor

        image = torch.load({str(tmp_path / "image.pt")!r}).numpy()
        outputs = {{}}
        for name, folder in (("old", {str(folder)!r}), ("resaved", {str(resaved)!r})):
            model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
            assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
            processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
            AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True, num_labels=2)
            pixels = processor(images=[image])["pixel_values"]
            with torch.no_grad():
                outputs[name] = {{"pixels": pixels, "embeds": model(pixels).image_embeds}}
                features = model.get_image_features(pixels)
            if name == "resaved":  # today's remote code: transformers 5 feature outputs
                outputs[name]["features"] = features.pooler_output
        torch.save(outputs, {str(tmp_path / "out.pt")!r})
        """,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    outputs = torch.load(tmp_path / "out.pt")
    for name in ("old", "resaved"):
        assert torch.equal(outputs[name]["pixels"], reference["pixels"]), name
        torch.testing.assert_close(outputs[name]["embeds"], reference["embeds"], msg=name)
    torch.testing.assert_close(outputs["resaved"]["features"], reference["embeds"])


def test_remote_code_also_refuses_a_checkpoint_without_banks(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    folder, model = saved
    for name in os.listdir(folder):
        shutil.copy(folder / name, tmp_path / name)
    state = {k: v for k, v in load_file(tmp_path / "model.safetensors").items() if not k.startswith("bank_")}
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    result = run_without_hlss(
        f"""
        from transformers import AutoModel
        try:
            AutoModel.from_pretrained({str(tmp_path)!r}, trust_remote_code=True)
        except ValueError as err:
            assert "no attribute banks" in str(err), err
            print("refused")
        """,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "refused" in result.stdout


# ----------------------------------------------------------------------- a folder saved by hlss_hf 0.1.0, committed
# tests/fixtures/hlss_saved_0_1/ was written once by tests/fixtures/make_hlss_saved_0_1.py with the code of 0.1.0
# (remote-code files at the package root); it is the one folder here that the code under test did not write.
SAVED_0_1 = Path(__file__).parent / "fixtures" / "hlss_saved_0_1"
SAVED_0_1_EXPECTED = SAVED_0_1.with_name("hlss_saved_0_1_expected.safetensors")
SAVED_0_1_TEXT = ["a glial tumour", "necrotic debris"]


def test_a_folder_saved_by_0_1_loads_with_today_s_classes():
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoProcessor

    from hlss_hf import HLSSModel

    expected = load_file(SAVED_0_1_EXPECTED)
    model = AutoModel.from_pretrained(SAVED_0_1).eval()
    processor = AutoProcessor.from_pretrained(SAVED_0_1)
    assert type(model) is HLSSModel and type(processor) is HLSSProcessor
    pixels = processor(images=[expected["image"].numpy()])["pixel_values"]
    assert torch.equal(pixels, expected["pixels"])
    with torch.no_grad():
        out = model(pixels)
        text = model.encode_texts(SAVED_0_1_TEXT, processor.tokenizer)
    torch.testing.assert_close(out.image_embeds, expected["embeds"])
    torch.testing.assert_close(out.attribute_scores["patch"], expected["patch"])
    torch.testing.assert_close(text, expected["text"])


def test_a_folder_saved_by_0_1_loads_as_remote_code(tmp_path):
    result = run_without_hlss(
        f"""
        import torch
        from safetensors.torch import load_file
        from transformers import AutoModel, AutoModelForImageClassification, AutoProcessor, pipeline

        folder = {str(SAVED_0_1)!r}
        expected = load_file({str(SAVED_0_1_EXPECTED)!r})
        model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        assert type(processor).__module__.startswith("transformers_modules."), type(processor).__module__
        AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True, num_labels=2)
        image = expected["image"].numpy()
        pixels = processor(images=[image])["pixel_values"]
        assert torch.equal(pixels, expected["pixels"])
        with torch.no_grad():
            out = model(pixels)
            text = model.encode_texts({SAVED_0_1_TEXT!r}, processor.tokenizer)
        torch.testing.assert_close(out.image_embeds, expected["embeds"])
        torch.testing.assert_close(out.attribute_scores["patch"], expected["patch"])
        torch.testing.assert_close(text, expected["text"])
        embed = pipeline("hlss-feature-extraction", model=folder, trust_remote_code=True)
        torch.testing.assert_close(embed(image, return_tensors=True), expected["embeds"])
        print("ok")
        """,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "ok" in result.stdout
