"""hlss_hf.training.config: the one config system of train.py and finetune.py (parsing, names, help, validation).

Parsing only: nothing here builds a model or reads a dataset.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from hlss_hf.errors import ConfigError  # noqa: E402
from hlss_hf.training.config import (  # noqa: E402
    RENAMED,
    FinetuneConfig,
    FinetuneTrainingConfig,
    RunConfig,
    TrainConfig,
    TrainingConfig,
    flatten_config,
    format_help,
    parse_config,
)

DEMO = str(REPO / "configs" / "demo.yaml")


def train_config(*argv):
    return parse_config(["--config", DEMO, *argv])


def finetune_config(*argv, config_file=None):
    head = ["--config", str(config_file)] if config_file else ["--model_name_or_path", "m", "--dataset", "d"]
    return parse_config([*head, *argv], FinetuneConfig)


def error_of(parse, *argv, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        parse(*argv, **kwargs)
    return str(info.value)


# ---------------------------------------------------------------------------------------------- unknown keys
@pytest.mark.parametrize(
    "flag, nearest",
    [
        ("--training.lrr", "training.lr"),  # a typo
        ("--lrr", "training.lr"),  # a typo of a bare key
        ("--data.lr", "training.lr"),  # the right key in the wrong section
        ("--data.num_view", "data.num_views"),
        ("--training.warmup-ratoi", "training.warmup_ratio"),  # dashes are read as underscores
    ],
)
def test_unknown_command_line_key_names_the_nearest_key(flag, nearest):
    message = error_of(train_config, flag, "1")
    assert f"unknown config key '{flag[2:].replace('-', '_')}' (did you mean '{nearest}'?)" in message
    assert "the command line" in message


def test_unknown_yaml_key_names_the_file_and_the_nearest_key(tmp_path):
    sectioned = tmp_path / "sectioned.yaml"
    sectioned.write_text("training:\n  lrr: 0.1\n")
    message = error_of(parse_config, ["--config", str(sectioned)])
    assert "unknown config key 'training.lrr' (did you mean 'training.lr'?)" in message
    assert "sectioned.yaml" in message
    flat = tmp_path / "flat.yaml"
    flat.write_text("per_device_bach_size: 4\n")
    message = error_of(parse_config, ["--config", str(flat)])
    assert "did you mean 'training.per_device_batch_size'?" in message and "flat.yaml" in message


def test_abbreviations_are_not_keys():
    # argparse would otherwise read --project_u as --project_url.
    assert "unknown config key 'project_u'" in error_of(train_config, "--project_u", "x")


@pytest.mark.parametrize("old, new", sorted((old, new) for old, (new, _) in RENAMED.items()))
def test_finetune_old_names_answer_with_the_new_name(old, new, tmp_path):
    message = error_of(finetune_config, f"--{old}", "3")
    assert f"'{old}'" in message and f"'{new}'" in message
    old_yaml = tmp_path / "old.yaml"  # finetune.py's flat YAML of before
    old_yaml.write_text(f"{old}: 3\n")
    message = error_of(parse_config, ["--config", str(old_yaml)], FinetuneConfig)
    assert f"'{old}'" in message and f"'{new}'" in message and "old.yaml" in message


def test_finetune_strong_preset_is_now_hlss_hf():
    assert "'hlss_hf'" in error_of(finetune_config, "--augmentation", "strong")


# ----------------------------------------------------------------------------------------------------- help
def test_help_shows_the_defaults_of_the_default_run():
    text = format_help(TrainConfig, DEMO)
    demo = yaml.safe_load(Path(DEMO).read_text())
    assert demo["training"]["per_device_batch_size"] != TrainingConfig.per_device_batch_size
    assert "--training.per_device_batch_size, --per_device_batch_size (default 8)" in text
    assert "--data.crop_size, --crop_size (default 32)" in text  # the dataclass default is 224
    assert "--training.output_dir, --output_dir (default outputs/hlss-demo)" in text
    assert "--model.vision, --vision (default {model_type: resnet," in text
    assert "--training.knn_k, --knn_k (default 20)" in text
    # Every key is listed, keys the file does not set with the dataclass default.
    for key in ("training.resume_from_checkpoint", "model.lambda_align", "data.drop_last"):
        assert f"--{key}" in text
    assert "--training.save_total_limit, --save_total_limit (default 2)" in text


def test_help_flag_prints_the_keys_and_exits(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(["--help"], TrainConfig, DEMO)
    assert exit_info.value.code == 0
    assert "(default 8)" in capsys.readouterr().out
    import finetune

    with pytest.raises(SystemExit):
        finetune.parse_args(["--help"])
    out = capsys.readouterr().out
    assert "--model.model_name_or_path, --model_name_or_path (required)" in out
    assert "--training.seed, --seed (default 42)" in out  # finetune's own default of a shared key


# ------------------------------------------------------------------------------------------- values and files
def test_sectioned_and_flat_yaml_give_the_same_config(tmp_path):
    values = {
        "model": {"model_name_or_path": "m", "lora_r": 4},
        "data": {"dataset": "d", "max_train_samples": 10},
        "training": {"lr": "1e-4", "merge": True},
    }
    sectioned = tmp_path / "sectioned.yaml"
    sectioned.write_text(yaml.safe_dump(values))
    flat = tmp_path / "flat.yaml"
    flat.write_text(
        "model.model_name_or_path: m\ndataset: d\nlora_r: 4\ndata.max_train_samples: 10\nlr: 1e-4\nmerge: true\n"
    )
    a, b = (parse_config(["--config", str(p)], FinetuneConfig) for p in (sectioned, flat))
    assert a.to_dict() == b.to_dict()
    assert (a.model.lora_r, a.data.max_train_samples, a.training.lr, a.training.merge) == (4, 10, 1e-4, True)
    assert isinstance(a.training.lr, float)  # YAML reads 1e-4 as a string: converted to the field type


def test_command_line_overrides_the_file_and_values_are_read_as_yaml(tmp_path):
    config_file = tmp_path / "ft.yaml"
    config_file.write_text(
        "model: {model_name_or_path: m, target_modules: [q_proj, v_proj]}\ndata: {dataset: d, augmentation: "
        "{horizontal_flip: {p: 1.0}}}\ntraining: {lr: 0.5, weight_decay: 1e-4}\n"
    )
    config = finetune_config("--lr", "0.01", "--training.max-steps", "7", config_file=config_file)
    assert (config.training.lr, config.training.max_steps, config.training.weight_decay) == (0.01, 7, 1e-4)
    assert config.model.target_modules == ["q_proj", "v_proj"]
    assert config.data.augmentation == {"horizontal_flip": {"p": 1.0}}
    config = finetune_config("--target_modules", "query", "value", "--label_names", "a", "b", "c")
    assert config.model.target_modules == ["query", "value"] and config.model.label_names == ["a", "b", "c"]
    assert finetune_config("--target_modules", "[query, value]").model.target_modules == ["query", "value"]


def test_null_mappings_and_bare_booleans():
    config = train_config(
        "--training.max_steps", "null", "--data.validation_split", "null", "--data.augmentation",
        "{horizontal_flip: {p: 0.5}}", "--data.demo", "{num_patients: 12}", "--cpu", "--training.hub_private",
        "--max-grad-norm", "null",
    )  # fmt: skip
    t, d = config.training, config.data
    assert t.max_steps is None and d.validation_split is None and t.max_grad_norm is None
    assert d.augmentation == {"horizontal_flip": {"p": 0.5}} and d.demo == {"num_patients": 12}
    assert t.cpu is True and t.hub_private is True
    assert train_config("--cpu", "false").training.cpu is False
    assert finetune_config("--merge").training.merge is True
    assert finetune_config("--validation_split", "null").data.validation_split is None
    # Text keeps its spelling (YAML would read `no` as false).
    assert train_config("--mixed_precision", "no").training.mixed_precision == "no"


def test_augmentation_file_is_read_into_its_operations(tmp_path):
    path = tmp_path / "aug.yaml"
    path.write_text("horizontal_flip: {p: 1.0}\n")
    assert finetune_config("--augmentation", str(path)).data.augmentation == {"horizontal_flip": {"p": 1.0}}
    assert train_config("--data.augmentation", str(path)).data.augmentation == {"horizontal_flip": {"p": 1.0}}
    assert "does not exist" in error_of(finetune_config, "--augmentation", str(tmp_path / "missing.yaml"))


# ------------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    "argv, key",
    [
        (["--training.lr", "-1"], "training.lr"),
        (["--per_device_batch_size", "0"], "training.per_device_batch_size"),
        (["--num_epochs", "0"], "training.num_epochs"),
        (["--max_steps", "0"], "training.max_steps"),
        (["--lora_dropout", "1.5"], "model.lora_dropout"),
        (["--lora_r", "0"], "model.lora_r"),
        (["--label_names", "a", "a"], "model.label_names"),
        (["--augmentation", "heavy"], "data.augmentation"),
        (["--crop_size", "0"], "data.crop_size"),
        (["--mixed_precision", "fp12"], "training.mixed_precision"),
        (["--push_to_hub", "not a repo"], "training.push_to_hub"),
        (["--eval_steps", "-1"], "training.eval_steps"),
    ],
)
def test_finetune_validation_names_the_key(argv, key):
    assert f"config key '{key}'" in error_of(finetune_config, *argv)


def test_finetune_required_and_missing_sources_are_named(tmp_path):
    assert "'model.model_name_or_path': is required" in error_of(parse_config, ["--dataset", "d"], FinetuneConfig)
    assert "'data.dataset': is required" in error_of(parse_config, ["--model_name_or_path", "m"], FinetuneConfig)
    message = error_of(finetune_config, "--dataset", str(tmp_path / "no-such-folder"))
    assert "'data.dataset'" in message and "does not exist" in message


def test_config_classes_validate_themselves():
    # Built directly (no parser): values are converted and checked on construction, naming section.key.
    assert TrainingConfig(lr="1e-4").lr == 1e-4
    with pytest.raises(ConfigError, match=r"training\.lr"):
        TrainingConfig(lr="fast")
    with pytest.raises(ConfigError, match=r"training\.warmup_ratio"):
        FinetuneTrainingConfig(warmup_ratio=1.5)
    # Cross-section checks live in the top-level class.
    config = train_config()
    config.data.streaming = True
    with pytest.raises(ConfigError, match=r"training\.max_steps.*data\.streaming"):
        config.validate()


# ------------------------------------------------------------------------------------------------ one set of names
SHARED_VALUES = {
    "output_dir": "runs/x", "overwrite_output_dir": "true", "seed": "7", "per_device_batch_size": "3",
    "num_epochs": "2.5", "max_steps": "11", "lr": "0.02", "weight_decay": "0.05", "lr_scheduler": "linear",
    "warmup_ratio": "0.2", "gradient_accumulation_steps": "2", "max_grad_norm": "null", "mixed_precision": "bf16",
    "cpu": "true", "report_to": "none", "project_name": "p", "logging_steps": "4", "eval_steps": "5",
    "eval_batch_size": "9", "push_to_hub": "me/x", "hub_private": "true", "model_license": "mit",
    "project_url": "https://example.org",
}  # fmt: skip


def test_both_scripts_parse_the_shared_keys_to_the_same_fields(tmp_path):
    assert issubclass(TrainingConfig, RunConfig) and issubclass(FinetuneTrainingConfig, RunConfig)
    shared = [f.name for f in dataclasses.fields(RunConfig)]
    assert sorted(shared) == sorted(SHARED_VALUES)
    (tmp_path / "data").mkdir()
    data = {
        "dataset": str(tmp_path / "data"), "dataset_config_name": "c", "train_split": "tr",
        "validation_split": "va", "num_workers": "2",
    }  # fmt: skip
    argv = [a for k, v in SHARED_VALUES.items() for a in (f"--training.{k}", v)]
    argv += [a for k, v in data.items() for a in (f"--data.{k}", v)]
    train = train_config(*argv)
    fine = parse_config(["--model_name_or_path", "m", *argv], FinetuneConfig)
    for name in shared:
        assert getattr(train.training, name) == getattr(fine.training, name), name
    for name in data:
        assert getattr(train.data, name) == getattr(fine.data, name), name
    assert train.training.max_steps == 11 and train.training.max_grad_norm is None and fine.training.cpu is True
    # The flat hparams the trackers get use the same names.
    flat_train, flat_fine = flatten_config(train), flatten_config(fine)
    for name in shared:
        assert flat_train[f"training.{name}"] == flat_fine[f"training.{name}"]


def test_one_meaning_per_name():
    # train's data.cache_dir (where the demo is written) and finetune's datasets cache have different names.
    train_keys = {f"data.{f.name}" for f in dataclasses.fields(TrainConfig().data)}
    finetune_keys = {f.name for f in dataclasses.fields(FinetuneConfig.sections()["data"])}
    assert "data.cache_dir" in train_keys and "cache_dir" not in finetune_keys
    assert "datasets_cache_dir" in finetune_keys
