"""PEFT LoRA fine-tuning (finetune.py, hlss_hf.training.lora): what trains, save / load / merge round trips,
pipeline output, the end-to-end command and its bad-input errors. Tiny towers, 32 px, a few steps, CPU."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets
import numpy as np
import pytest
import torch
from peft import PeftModel, get_peft_model
from PIL import Image
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # finetune.py and dataset_scripts/ are not part of the installed package
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _tiny import IMAGE_SIZE, clip_text_config, resnet_config, tiny_hlss_model, vit_config  # noqa: E402

import finetune  # noqa: E402
import hlss_hf  # noqa: E402,F401  (registers the Auto classes)
from hlss_hf import HLSSConfig, HLSSForImageClassification, HLSSImageProcessor  # noqa: E402
from hlss_hf.data.demo import build_demo_dataset  # noqa: E402
from hlss_hf.training.lora import (  # noqa: E402
    default_lora_target_modules,
    load_lora_classifier,
    lora_config_for,
    set_train_mode,
)

NAMES = ["a", "b", "c"]


# The three-class label kwargs of `from_pretrained` / `HLSSConfig`.
LABELS = {
    "num_labels": 3,
    "id2label": dict(enumerate(NAMES)),
    "label2id": {n: i for i, n in enumerate(NAMES)},
}


def pixels(n=4, seed=0):
    return torch.rand(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


def train_steps(model, steps=3, lr=1e-2, seed=0):
    """A few AdamW steps of cross-entropy on random images: enough to move every trainable tensor."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    set_train_mode(model)  # as finetune.py: frozen batch norms keep their running statistics
    for step in range(steps):
        x = pixels(6, seed=seed + step)
        y = torch.arange(6) % 3
        loss = model(pixel_values=x, labels=y).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return model


@pytest.fixture(scope="module")
def hlss_dir(tmp_path_factory):
    """A saved tiny HLSSModel (CLIP vision 32 px + CLIP text), the fine-tuning starting point."""
    folder = tmp_path_factory.mktemp("hlss")
    tiny_hlss_model(image_size=IMAGE_SIZE).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    """A tiny labelled H&E hierarchy as the converters write it: 6 patients, train + validation."""
    folder = tmp_path_factory.mktemp("data") / "demo"
    build_demo_dataset(
        folder,
        num_patients=6,
        num_classes=3,
        slides_per_patient=(1, 2),
        patches_per_slide=3,
        patch_size=40,
        val_fraction=0.5,
        align_fraction=0,
    )
    return folder


def base_args(hlss_dir, dataset, output_dir, *extra):
    return [
        "--model_name_or_path",
        str(hlss_dir),
        "--dataset",
        str(dataset),
        "--output_dir",
        str(output_dir),
        "--crop_size",
        str(IMAGE_SIZE),
        "--per_device_batch_size",
        "8",
        "--max_steps",
        "3",
        "--lr",
        "1e-2",
        "--logging_steps",
        "1",
        "--datasets_cache_dir",
        str(Path(output_dir).parent / "hf-cache"),
        *extra,
    ]


@pytest.fixture(scope="module")
def finetuned(hlss_dir, demo_dir, tmp_path_factory):
    """One end-to-end `finetune.py` run (3 steps, --merge): (output_dir, report)."""
    out = tmp_path_factory.mktemp("ft") / "out"
    report = finetune.main(base_args(hlss_dir, demo_dir, out, "--merge"))
    return out, report


def lines_of(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def to_disk(dataset_dict, tmp_path, name="data"):
    folder = tmp_path / name
    dataset_dict.save_to_disk(str(folder))
    return folder


# ------------------------------------------------------------------------------------------------------------------
# What trains
# ------------------------------------------------------------------------------------------------------------------


def tower_model(kind):
    """An HLSSForImageClassification with a tiny tower of the given kind (random weights)."""
    vision = {"vit": vit_config, "resnet": resnet_config}[kind]()
    config = HLSSConfig(vision_config=vision, text_config=clip_text_config(), image_size=IMAGE_SIZE, **LABELS)
    torch.manual_seed(0)
    return HLSSForImageClassification(config)


@pytest.mark.parametrize("kind", ["clip", "vit", "resnet"])
def test_only_lora_and_classifier_parameters_change(kind, hlss_dir):
    if kind == "clip":
        model = HLSSForImageClassification.from_pretrained(hlss_dir, **LABELS)
    else:
        model = tower_model(kind)
    peft_model = get_peft_model(model, lora_config_for(model, r=4, alpha=8))
    before = {k: v.detach().clone() for k, v in peft_model.state_dict().items()}
    train_steps(peft_model)
    after = peft_model.state_dict()

    changed = {k for k in before if not torch.equal(before[k], after[k])}
    lora_keys = {k for k in before if ".lora_A." in k or ".lora_B." in k}
    head_keys = {k for k in before if "classifier.modules_to_save." in k}
    assert lora_keys and head_keys
    # Every adapter matrix and the trained head copy move; nothing else does.
    assert lora_keys <= changed and head_keys <= changed
    assert changed == lora_keys | head_keys
    assert all(k.split(".")[2] == "vision_model" for k in lora_keys), sorted(lora_keys)[:3]
    frozen = [k for k in before if "visual_projection" in k or ".base_layer." in k or "original_module" in k]
    assert frozen and not (set(frozen) & changed)


def test_default_target_modules_per_tower_type():
    assert default_lora_target_modules(vit_config()) == ["q_proj", "v_proj"]
    assert default_lora_target_modules(resnet_config()) == ["convolution"]
    vit = tower_model("vit")
    assert default_lora_target_modules(vit.config.vision_config, vit.vision_model) == ["q_proj", "v_proj"]

    class Unknown:
        model_type = "mystery"

    tower = torch.nn.Sequential()
    tower.add_module("qkv", torch.nn.Linear(4, 12))
    assert default_lora_target_modules(Unknown(), tower) == ["qkv"]  # discovered in the tower
    with pytest.raises(ValueError, match="mystery"):
        default_lora_target_modules(Unknown(), torch.nn.Sequential(torch.nn.ReLU()))


def test_target_regex_stays_inside_the_vision_tower():
    import re

    from hlss_hf.training.lora import vision_target_regex

    pattern = vision_target_regex(["q_proj", "v_proj"])
    for key in ("vision_model.q_proj", "vision_model.encoder.layers.0.self_attn.v_proj"):
        assert re.fullmatch(pattern, key), key
    for key in ("text_model.encoder.layers.0.q_proj", "vision_model.encoder.q_proj_extra", "classifier"):
        assert not re.fullmatch(pattern, key), key


def test_lora_config_rejects_target_missing_from_tower():
    model = tower_model("vit")
    with pytest.raises(ValueError, match=r"\['query'\].*available leaf names"):
        lora_config_for(model, target_modules=["query"])
    with pytest.raises(ValueError, match="lora_r"):
        lora_config_for(model, r=0)


# ------------------------------------------------------------------------------------------------------------------
# Save / load / merge round trips
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_peft(hlss_dir):
    model = HLSSForImageClassification.from_pretrained(hlss_dir, **LABELS)
    return train_steps(get_peft_model(model, lora_config_for(model, r=4, alpha=8)))


def test_adapter_save_load_gives_identical_logits(trained_peft, hlss_dir, tmp_path):
    x = pixels()
    with torch.no_grad():
        expected = trained_peft(pixel_values=x).logits
    trained_peft.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()

    base = HLSSForImageClassification.from_pretrained(hlss_dir, **LABELS)
    with torch.no_grad():
        untouched = base(pixel_values=x).logits
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        got = loaded(pixel_values=x).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(untouched, expected, atol=1e-4)  # the adapter and head do change the output


def test_merge_and_unload_matches_adapter_and_reloads(trained_peft, hlss_dir, tmp_path):
    import copy

    from transformers import AutoModelForImageClassification

    x = pixels(seed=1)
    with torch.no_grad():
        unmerged = trained_peft(pixel_values=x).logits
    merged = copy.deepcopy(trained_peft).merge_and_unload().eval()
    assert type(merged) is HLSSForImageClassification
    assert not any("lora_" in k for k in merged.state_dict())
    base = HLSSForImageClassification.from_pretrained(hlss_dir, **LABELS)
    name = next(k for k in merged.state_dict() if k.endswith("q_proj.weight"))
    assert not torch.allclose(
        merged.state_dict()[name], base.state_dict()[name]
    )  # LoRA folded into the weight
    with torch.no_grad():
        got = merged(pixel_values=x).logits
    torch.testing.assert_close(got, unmerged, rtol=0, atol=1e-5)

    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "merged").eval()
    assert type(reloaded).__name__ == "HLSSForImageClassification"
    assert reloaded.config.id2label == dict(enumerate(NAMES))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values=x).logits, got, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------------------------
# The command end to end
# ------------------------------------------------------------------------------------------------------------------


def test_mixed_precision_defaults_to_the_launcher(hlss_dir, demo_dir, tmp_path, monkeypatch):
    # `accelerate launch --mixed_precision bf16` reaches the script as this variable.
    from accelerate.state import AcceleratorState, GradientState

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    # Accelerate's state is a process-wide singleton: start fresh and leave no bf16 state to later tests.
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        report = finetune.main(base_args(hlss_dir, demo_dir, tmp_path / "out", "--max_steps", "1"))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    assert report["args"]["training"]["mixed_precision"] is None and report["mixed_precision"] == "bf16"
    assert np.isfinite(report["eval"]["patch/acc"])


def test_finetune_writes_adapter_merged_model_and_hierarchical_report(finetuned):
    out, report = finetuned
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "merged" / "config.json").is_file()
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    saved = json.loads((out / "finetune_report.json").read_text())
    assert saved["steps"] == report["steps"] == 3
    assert saved["labels"] == ["normal", "low_grade", "high_grade"]
    assert saved["eval_split"] == "validation"
    for level in ("patch", "slide", "patient"):
        for metric in ("acc", "top2", "mca", "map"):
            assert 0.0 <= saved["eval"][f"{level}/{metric}"] <= 1.0
        assert f"{level}/top3" not in saved["eval"]  # three classes: top-3 always hits, so it is not reported
    # Three steps: named, printed once, in the report and the metrics log.
    names = [w["name"] for w in saved["warnings"]]
    assert names == ["few_finetune_steps", "top_k_not_informative"]
    assert [r["warning"] for r in lines_of(out) if "warning" in r] == names
    assert 0 < saved["parameters"]["trainable"] < saved["parameters"]["total"]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) for r in lines if "loss" in r)
    assert any("eval/slide/acc" in r for r in lines)


def test_adapter_and_merged_cards_are_filled_from_the_run(finetuned):
    out, report = finetuned
    card = (out / "adapter" / "README.md").read_text(encoding="utf-8")
    assert "library_name: peft" in card and "AutoPeftModel.from_pretrained" in card
    assert "More Information Needed" not in card  # not PEFT's empty template
    assert f"| patient | {report['eval']['patient/acc']:.4f} |" in card
    assert "`normal`, `low_grade`, `high_grade`" in card and "r 8, alpha 16" in card
    # The target modules as written (the CLIP tower's defaults), not the PEFT pattern's sorted characters.
    assert "target modules `q_proj`, `v_proj` in the vision tower (PEFT pattern `vision_model" in card
    assert report["lora"]["target_modules"] == ["q_proj", "v_proj"]
    assert "- `few_finetune_steps`: 3 optimizer step(s)" in card
    merged = (out / "merged" / "README.md").read_text(encoding="utf-8")
    assert "library_name: transformers" in merged and 'pipeline("image-classification"' in merged


def test_used_output_folder_is_refused_then_replaced_whole(hlss_dir, demo_dir, tmp_path):
    from accelerate.state import AcceleratorState, GradientState

    from hlss_hf.errors import ConfigError
    from hlss_hf.training.checkpoints import staging_dir

    def reset():
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()

    out = tmp_path / "out"
    finetune.main(base_args(hlss_dir, demo_dir, out, "--max_steps", "1", "--merge"))
    before = {str(p): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    reset()
    with pytest.raises(ConfigError, match=r"training\.output_dir.*adapter, merged"):
        finetune.main(base_args(hlss_dir, demo_dir, out, "--max_steps", "1"))
    assert {str(p): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before
    reset()
    finetune.main(base_args(hlss_dir, demo_dir, out, "--max_steps", "2", "--overwrite_output_dir", "true"))
    reset()
    assert not (out / "merged").exists()  # the earlier merged model does not stay beside the new adapter
    assert json.loads((out / "finetune_report.json").read_text())["steps"] == 2
    assert not staging_dir(out).exists()


def test_non_finite_loss_stops_every_process_and_leaves_no_output(hlss_dir, demo_dir, tmp_path, monkeypatch):
    from hlss_hf.errors import NonFiniteLossError
    from hlss_hf.models.hlss.modeling_hlss import HLSSForImageClassification

    forward = HLSSForImageClassification.forward

    def nan_loss(self, *args, **kwargs):
        output = forward(self, *args, **kwargs)
        output.loss = output.loss * float("nan")
        return output

    monkeypatch.setattr(HLSSForImageClassification, "forward", nan_loss)
    with pytest.raises(NonFiniteLossError, match=r"step 1 .*training\.lr"):
        finetune.main(base_args(hlss_dir, demo_dir, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_saved_adapter_and_merged_model_agree(finetuned):
    from transformers import AutoModelForImageClassification

    out, _ = finetuned
    adapter_model = load_lora_classifier(out / "adapter").eval()
    merged = AutoModelForImageClassification.from_pretrained(out / "merged").eval()
    assert merged.config.id2label == {0: "normal", 1: "low_grade", 2: "high_grade"}
    x = pixels(seed=2)
    with torch.no_grad():
        torch.testing.assert_close(
            merged(pixel_values=x).logits, adapter_model(pixel_values=x).logits, rtol=0, atol=1e-5
        )


def test_pipeline_runs_the_merged_model(finetuned):
    from transformers import AutoImageProcessor, pipeline

    out, _ = finetuned
    merged_dir = out / "merged"
    classifier = pipeline("image-classification", model=str(merged_dir), device="cpu")
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))
    result = classifier(image, top_k=3)
    assert {r["label"] for r in result} == {"normal", "low_grade", "high_grade"}
    assert sum(r["score"] for r in result) == pytest.approx(1.0, abs=1e-5)
    # Same numbers as the model on the saved processor's output.
    processor = AutoImageProcessor.from_pretrained(merged_dir)
    model = classifier.model
    with torch.no_grad():
        probs = model(**processor(image, return_tensors="pt")).logits.softmax(-1)[0]
    by_label = {r["label"]: r["score"] for r in result}
    expected = {model.config.id2label[i]: float(p) for i, p in enumerate(probs)}
    assert by_label == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("modality", ["he", "srh"])
def test_patch_dataset_items_match_the_processor(modality):
    from hlss_hf.data.augmentation import build_augmentation
    from hlss_hf.data.schema import decode_image
    from hlss_hf.models.hlss.processing_hlss import HLSSImageProcessor

    split = build_demo_dataset(
        num_patients=3,
        num_classes=3,
        slides_per_patient=(1, 1),
        patches_per_slide=2,
        patch_size=40,
        modality=modality,
        val_fraction=0.0,
        align_fraction=0,
    )["train"].select([5, 0, 3])  # a selected view: rows go through the indices mapping
    value_to_index = {i: i for i in range(3)}
    processor = HLSSImageProcessor(modality=modality, crop_size=32, do_normalize=True)
    evaluation = finetune.PatchClassificationDataset(split, value_to_index, processor)
    for i in range(len(split)):
        item = evaluation[i]
        expected = processor(decode_image(split[i]["image"]), return_tensors="pt")["pixel_values"][0]
        torch.testing.assert_close(item["pixel_values"], expected, rtol=0, atol=1e-6)
        assert int(item["labels"]) == split[i]["label"] and int(item["index"]) == i

    # Training items: the augmentation of the float patch, normalised as the processor does.
    augment = build_augmentation({"horizontal_flip": {"p": 1.0}}, 32)
    train = finetune.PatchClassificationDataset(split, value_to_index, processor, augment=augment, seed=3)
    torch.testing.assert_close(
        train[1]["pixel_values"], evaluation[1]["pixel_values"].flip(-1), rtol=0, atol=1e-6
    )
    random = finetune.PatchClassificationDataset(
        split, value_to_index, processor, build_augmentation(None, 32)
    )
    first = random[1]["pixel_values"]
    torch.testing.assert_close(random[1]["pixel_values"], first)  # a function of (seed, epoch, index)
    random.set_epoch(1)
    assert not torch.equal(random[1]["pixel_values"], first)


def test_patch_smaller_than_the_crop_is_named():
    from hlss_hf.models.hlss.processing_hlss import HLSSImageProcessor

    split = build_demo_dataset(
        num_patients=3,
        num_classes=3,
        slides_per_patient=(1, 1),
        patches_per_slide=1,
        patch_size=16,
        val_fraction=0.0,
        align_fraction=0,
    )["train"]
    dataset = finetune.PatchClassificationDataset(
        split, {i: i for i in range(3)}, HLSSImageProcessor(crop_size=32)
    )
    with pytest.raises(ValueError, match=rf"patch '{split[0]['patch_id']}' of shape \(16, 16, 3\)"):
        dataset[0]


@pytest.mark.slow  # a fresh process without hlss_hf
def test_merged_model_runs_in_a_pipeline_as_remote_code_without_hlss_hf(finetuned, tmp_path):
    """The merged folder is self-contained: a clean process that never imports hlss_hf gets the same scores."""
    out, _ = finetuned
    script = f"""
import json, sys
import numpy as np
from PIL import Image
from transformers import pipeline
classifier = pipeline("image-classification", model={str(out / "merged")!r}, trust_remote_code=True, device="cpu")
image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8))
print(json.dumps({{"hlss_hf": "hlss_hf" in sys.modules, "module": type(classifier.model).__module__,
                  "result": classifier(image, top_k=3)}}))
"""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    remote = json.loads(proc.stdout.strip().splitlines()[-1])
    assert remote["hlss_hf"] is False and remote["module"].startswith("transformers_modules")

    from transformers import pipeline

    local = pipeline("image-classification", model=str(out / "merged"), device="cpu")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    expected = {r["label"]: r["score"] for r in local(image, top_k=3)}
    assert {r["label"]: r["score"] for r in remote["result"]} == pytest.approx(expected, abs=1e-6)


def test_continuing_from_a_merged_model_keeps_or_resets_its_classifier(finetuned):
    out, _ = finetuned
    merged = HLSSForImageClassification.from_pretrained(out / "merged").eval()
    x = pixels(seed=3)
    with torch.no_grad():
        logits = merged(pixel_values=x).logits  # columns: normal, low_grade, high_grade
    reordered = finetune.load_classifier(str(out / "merged"), ["high_grade", "normal", "low_grade"]).eval()
    assert reordered.config.id2label == {0: "high_grade", 1: "normal", 2: "low_grade"}
    with torch.no_grad():
        torch.testing.assert_close(reordered(pixel_values=x).logits, logits[:, [2, 0, 1]], rtol=0, atol=1e-6)
    with pytest.warns(UserWarning, match="re-initialised"):
        fresh = finetune.load_classifier(str(out / "merged"), ["x", "y", "z"])
    assert not torch.allclose(fresh.classifier.weight, merged.classifier.weight)
    torch.testing.assert_close(fresh.visual_projection.weight, merged.visual_projection.weight)


def test_missing_hierarchy_columns_fall_back_to_patch_level(hlss_dir, tmp_path):
    data = build_demo_dataset(
        num_patients=6,
        num_classes=3,
        slides_per_patient=(1, 1),
        patches_per_slide=2,
        patch_size=32,
        val_fraction=0.5,
        align_fraction=0,
    )
    folder = to_disk(data.remove_columns(["slide_id", "patient_id"]), tmp_path)
    with pytest.warns(UserWarning, match="slide_id"):
        report = finetune.main(base_args(hlss_dir, folder, tmp_path / "out", "--max_steps", "1"))
    assert "patch/acc" in report["eval"]
    assert not any(k.startswith(("slide/", "patient/")) for k in report["eval"])


# ------------------------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_data():
    return build_demo_dataset(
        num_patients=6,
        num_classes=3,
        slides_per_patient=(1, 1),
        patches_per_slide=1,
        patch_size=16,
        val_fraction=0.5,
        align_fraction=0,
    )


def test_dataset_without_label_column_is_a_clear_error(small_data, tmp_path):
    folder = to_disk(small_data.remove_columns(["label"]), tmp_path)
    with pytest.raises(ValueError, match="no label column 'label'"):
        finetune.main(base_args("unused-model", folder, tmp_path / "out"))


def test_unknown_label_names_are_named(small_data, tmp_path):
    folder = to_disk(small_data, tmp_path)
    with pytest.raises(ValueError, match=r"unknown label names \['tumour'\]"):
        finetune.main(
            base_args(
                "unused-model", folder, tmp_path / "out", "--label_names", "normal", "low_grade", "tumour"
            )
        )


def test_string_label_outside_label_names_names_the_patch(small_data, tmp_path):
    names = small_data["train"].features["label"].names
    as_text = small_data.map(lambda row: {"diagnosis": names[row["label"]]}, remove_columns=["label"])
    folder = to_disk(as_text, tmp_path)
    with pytest.raises(ValueError, match=r"patch '[^']+' has label 'high_grade', not one of the classes"):
        finetune.main(
            base_args(
                "unused-model",
                folder,
                tmp_path / "out",
                "--label_column",
                "diagnosis",
                "--label_names",
                "normal",
                "low_grade",
            )
        )


def test_empty_split_is_a_clear_error(small_data):
    data = datasets.DatasetDict(
        {"train": small_data["train"], "validation": small_data["validation"].select([])}
    )
    args = finetune.parse_args(["--model_name_or_path", "m", "--dataset", "d"])
    with pytest.raises(ValueError, match="split 'validation' of dataset 'd' is empty"):
        finetune.select_splits(data, args)


def test_missing_eval_split_lists_the_splits(small_data, tmp_path):
    folder = to_disk(datasets.DatasetDict({"train": small_data["train"]}), tmp_path)
    with pytest.raises(ValueError, match=r"no split 'holdout'.*\['train'\]"):
        finetune.main(base_args("unused-model", folder, tmp_path / "out", "--validation_split", "holdout"))


# ------------------------------------------------------------------------------------------------------------------
# Two processes
# ------------------------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one_process_with_the_same_global_batch(finetuned, hlss_dir, demo_dir, tmp_path):
    """`accelerate launch` with 2 x 4 patches per step trains exactly as the 1 x 8 run of the `finetuned` fixture
    (same losses, same learning-rate schedule, same adapter)."""
    single, _ = finetuned
    multi = tmp_path / "multi"
    args = base_args(hlss_dir, demo_dir, multi, "--merge")
    args[args.index("--per_device_batch_size") + 1] = "4"
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()),
    ]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [*launch, str(REPO / "finetune.py"), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "processes: 2, global batch 8" in proc.stderr

    def records(folder):
        lines = (folder / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines if "loss" in json.loads(line)]

    one, two = records(single), records(multi)
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3]
    for a, b in zip(one, two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        assert b["lr"] == pytest.approx(a["lr"], rel=1e-9)
    w1 = load_file(single / "adapter" / "adapter_model.safetensors")
    w2 = load_file(multi / "adapter" / "adapter_model.safetensors")
    assert w1.keys() == w2.keys()
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], atol=1e-5, rtol=0, msg=key)


def test_auto_peft_model_loads_a_saved_adapter_with_its_classes(trained_peft, hlss_dir, tmp_path):
    from peft import AutoPeftModel

    from hlss_hf.training.lora import adapter_labels

    x = pixels()
    with torch.no_grad():
        expected = trained_peft(pixel_values=x).logits
    folder = tmp_path / "adapter"
    finetune.save_adapter(trained_peft, HLSSImageProcessor(), NAMES, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["auto_mapping"] == {
        "base_model_class": "AutoModelForImageClassification",
        "parent_library": "transformers",
    }
    loaded = AutoPeftModel.from_pretrained(folder, **adapter_labels(folder)).eval()
    assert loaded.base_model.model.config.id2label == dict(enumerate(NAMES))
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=x).logits, expected, rtol=0, atol=1e-6)


def test_full_disk_while_saving_names_the_folder_and_the_bytes(trained_peft, tmp_path, monkeypatch):
    import copy
    import errno

    from hlss_hf.errors import DiskFullError
    from hlss_hf.files import describe_os_error

    def full_disk(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    processor = HLSSImageProcessor(modality="he")
    for save, name in ((finetune.save_adapter, "adapter"), (finetune.save_merged, "merged")):
        target = tmp_path / name
        model = copy.deepcopy(trained_peft)
        monkeypatch.setattr(type(model), "save_pretrained", full_disk)
        monkeypatch.setattr(HLSSForImageClassification, "save_pretrained", full_disk)
        args = (model, processor, NAMES, target) if name == "adapter" else (model, processor, target)
        with pytest.raises(DiskFullError) as caught:
            save(*args)
        line = describe_os_error(caught.value)
        assert f"no space left writing {target}" in line and "it needs about" in line, line
        assert "\n" not in line
        monkeypatch.undo()
