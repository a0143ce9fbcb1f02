"""End-to-end: `python -m hlss_hf.evaluate` on the demo dataset with a tiny saved HLSS model; explanations."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _tiny import tiny_hlss_model, tiny_tokenizer  # noqa: E402

from hlss_hf.data import demo  # noqa: E402
from hlss_hf.evaluate import main  # noqa: E402
from hlss_hf.evaluation import extract_embeddings, linear_probe_evaluate  # noqa: E402
from hlss_hf.evaluation.explain import class_attribute_summary, explain  # noqa: E402


@pytest.fixture(scope="module")
def tiny_model():
    return tiny_hlss_model(image_size=32, seed=0)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("cli")
    tiny_model.save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    demo.build_demo_dataset(
        root / "data", num_patients=9, patches_per_slide=4, patch_size=32, val_fraction=0.25, align_fraction=0
    )
    return root


@pytest.fixture(scope="module")
def demo_embeddings(saved, tiny_model):
    import datasets

    data = datasets.load_dataset(str(saved / "data"))
    return (
        extract_embeddings(tiny_model, data["train"], progress=False),
        extract_embeddings(tiny_model, data["validation"], progress=False),
    )


def _run(saved, *extra, mode="knn"):
    out = saved / "out"
    args = [
        mode,
        "--model_name_or_path",
        str(saved / "model"),
        "--dataset",
        str(saved / "data"),
        "--output_dir",
        str(out),
    ]
    return main([*args, *extra]), out


def test_knn_cli_writes_report_plots_and_reuses_cache(saved):
    report, out = _run(saved, "--k", "10")
    saved_report = json.loads((out / "knn_validation.json").read_text())
    assert saved_report["metrics"] == pytest.approx(report["metrics"])
    assert {"patch/acc", "slide/acc", "patient/acc", "patch/top2", "patch/mca", "patch/map"} <= set(
        report["metrics"]
    )
    assert all(0.0 <= v <= 1.0 for v in report["metrics"].values())
    for level in ("patch", "slide", "patient"):
        assert (out / f"knn_validation_confusion_{level}.png").read_bytes()[:4] == b"\x89PNG"
        matrix = torch.tensor(report["confusion_matrices"][level])
        assert matrix.shape == (3, 3)
    assert sum(map(sum, report["confusion_matrices"]["patch"])) == report["num_patches"]
    cached = sorted((out / "cache").glob("embeddings-*.pt"))
    assert len(cached) == 2  # train and validation
    stamps = [p.stat().st_mtime_ns for p in cached]
    again, _ = _run(saved, "--k", "10")
    assert again["metrics"] == report["metrics"]
    assert [p.stat().st_mtime_ns for p in cached] == stamps, "second run must load the cache, not rewrite it"


def test_knn_cli_aggregation_rule_is_selectable_and_reported(saved, demo_embeddings, capsys):
    from hlss_hf.evaluation import knn_evaluate
    from hlss_hf.training.run_warnings import informative_metrics

    train, val = demo_embeddings
    runs = (
        ((), "reference"),
        (("--aggregation", "sum"), "sum"),
        (("--aggregation", "reference"), "reference"),
    )
    for flag, rule in runs:
        report, out = _run(saved, "--k", "10", *flag)
        assert report["settings"]["aggregation"] == rule
        assert json.loads((out / "knn_validation.json").read_text())["settings"]["aggregation"] == rule
        assert f"slide / patient aggregation: {rule}" in capsys.readouterr().out
        # Three classes: top-3 (always 1) is not reported (hlss_hf.training.run_warnings, top_k_not_informative).
        expected = informative_metrics(knn_evaluate(train, val, k=10, aggregation=rule), val.num_classes)
        assert report["metrics"] == pytest.approx(expected) and "patch/top3" not in report["metrics"]
        assert [w["name"] for w in report["warnings"]] == ["top_k_not_informative"]
    linear, _ = _run(saved, mode="linear")
    assert linear["settings"]["aggregation"] == "sum"


def test_cli_framing_resize_records_the_reference_framing(saved):
    report, out = _run(saved, "--k", "10", "--framing", "resize", "--output_dir", str(saved / "framed"))
    framing = report["settings"]["framing"]
    assert framing["do_resize"] and framing["resample"] == "bicubic" and not framing["do_center_crop"]
    assert framing["size"] == {"height": 32, "width": 32}  # the tiny model's image size
    cropped, _ = _run(saved, "--k", "10", "--framing", "center_crop", "--output_dir", str(saved / "framed"))
    framing = cropped["settings"]["framing"]
    assert not framing["do_resize"] and framing["do_center_crop"]
    # Different framings never share cached embeddings.
    assert len(list((saved / "framed" / "cache").glob("embeddings-*.pt"))) == 4


def test_knn_cli_embeds_in_fp32_unless_asked_for_bf16(saved, monkeypatch):
    # The reference evaluates, and the training-time kNN runs, in fp32: so does `evaluate knn` by default (it ran
    # bf16 autocast on CUDA before); `--precision bf16` autocasts on the model's device (here the CPU).
    import hlss_hf.evaluation.embeddings as evaluation

    autocast_on = []
    image_features = evaluation._image_features

    def spy(model, pixel_values):
        autocast_on.append(torch.is_autocast_enabled(pixel_values.device.type))
        return image_features(model, pixel_values)

    monkeypatch.setattr(evaluation, "_image_features", spy)
    out = str(saved / "precision")
    report, _ = _run(saved, "--k", "10", "--output_dir", out)
    assert autocast_on and not any(autocast_on)
    assert report["settings"]["precision"] == "fp32"
    autocast_on.clear()
    rounded, _ = _run(saved, "--k", "10", "--output_dir", out, "--precision", "bf16")
    assert autocast_on and all(autocast_on)  # computed anew: the fp32 cache is not reused
    assert rounded["settings"]["precision"] == "bf16"
    assert len(list((saved / "precision" / "cache").glob("embeddings-*.pt"))) == 4


def test_linear_and_zeroshot_cli(saved, tmp_path):
    report, _ = _run(saved, mode="linear")
    assert report["metrics"]["patch/acc"] > 0.0
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text(
        "normal: [normal tissue]\nlow_grade: [a low grade tumour]\nhigh_grade: a high grade tumour\n"
    )
    report, out = _run(saved, "--prompts", str(prompts), mode="zeroshot")
    assert report["settings"]["prompts"]["high_grade"] == ["a high grade tumour"]
    assert (out / "zeroshot_validation_confusion_patient.png").exists()


def test_zeroshot_cli_unknown_class_is_a_clear_error(saved, tmp_path, capsys):
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text("normal: [x]\nlow_grade: [y]\nhigh_grade: [z]\nglioblastoma: [w]\n")
    with pytest.raises(SystemExit) as exit_info:
        _run(saved, "--prompts", str(prompts), mode="zeroshot")
    assert exit_info.value.code == 2
    assert "unknown classes ['glioblastoma']" in capsys.readouterr().err


def test_cli_missing_split_is_a_clear_error(saved, capsys):
    with pytest.raises(SystemExit):
        _run(saved, "--validation_split", "test")
    assert "has no split 'test'" in capsys.readouterr().err


def test_explain_cli_writes_class_heatmaps_and_target(saved):
    import datasets

    slides = set(datasets.load_dataset(str(saved / "data"), split="validation")["slide_id"])
    slide = sorted(slides)[0]
    report, out = _run(saved, "--slide_id", slide, "--top_k", "2", mode="explain")
    assert report["target"]["target"] == {
        "kind": "slide",
        "id": slide,
        "num_patches": 4,
        "labels": report["target"]["target"]["labels"],
    }
    assert [len(v) for v in report["target"]["levels"].values()] == [2, 2, 2]
    for level in ("patch", "slide", "patient"):
        assert (out / f"explain_validation_classes_{level}.png").exists()
        assert len(report["class_summary"]["levels"][level]["mean"]) == 3
    assert (out / f"explain_validation_slide_{slide}.png").exists()


def test_update_card_writes_model_index_and_replaces_on_rerun(saved):
    from huggingface_hub import ModelCard

    report, _ = _run(saved, "--k", "10", "--update_card")
    card = ModelCard.load(saved / "model" / "README.md")
    results = card.data.eval_results
    names = [r.metric_name for r in results]
    assert "patient accuracy (kNN, k=10, reference aggregation)" in names
    assert "patch mAP (kNN, k=10, reference aggregation)" in names
    by_name = {r.metric_name: r for r in results}
    slide = by_name["slide accuracy (kNN, k=10, reference aggregation)"]
    assert slide.metric_config == "k=10, reference aggregation"
    assert slide.metric_value == round(100 * report["metrics"]["slide/acc"], 1)
    assert "/" not in slide.dataset_type  # a folder is recorded by its name, never its path
    assert (
        len(names) == len(set(names)) == 12
    )  # 3 levels x acc, top-2, mca, map (top-3 of 3 classes: not reported)
    # A rerun on the same dataset and split replaces the kNN results; another rule is named as such.
    _run(saved, "--k", "5", "--update_card", "--aggregation", "sum")
    rerun = [r.metric_name for r in ModelCard.load(saved / "model" / "README.md").data.eval_results]
    assert len(rerun) == 12 and "slide accuracy (kNN, k=5, sum aggregation)" in rerun
    assert "model-index" in (saved / "model" / "README.md").read_text()


def test_linear_probe_recovers_a_linear_class_signal(demo_embeddings):
    # The demo's classes live in nuclear morphology, which a random tiny tower does not see; the probe is tested on
    # the demo's hierarchy with embeddings that carry a linear class signal (a class mean plus noise) instead.
    import dataclasses

    generator = torch.Generator().manual_seed(0)
    train, val = demo_embeddings
    means = torch.nn.functional.normalize(
        torch.randn(train.num_classes, train.embeddings.shape[1], generator=generator), dim=-1
    )

    def with_signal(split):
        noisy = (
            means[split.labels]
            + 0.3
            * torch.randn(split.embeddings.shape, generator=generator)
            / split.embeddings.shape[1] ** 0.5
        )
        return dataclasses.replace(split, embeddings=torch.nn.functional.normalize(noisy, dim=-1))

    metrics, _ = linear_probe_evaluate(with_signal(train), with_signal(val))
    assert metrics["patch/acc"] > 0.9 and metrics["patient/acc"] > 0.9
    # Without the signal (the random tower's own embeddings) the same probe is not above chance by much.
    assert linear_probe_evaluate(train, val)[0]["patch/acc"] < metrics["patch/acc"]


def test_explain_targets_and_errors(tiny_model, demo_embeddings):
    _, val = demo_embeddings
    one = explain(tiny_model, val, index=0, k=10)
    assert one["target"]["num_patches"] == 1
    # k is capped at each level's size; scores sorted descending.
    assert [len(v) for v in one["levels"].values()] == [3, 2, 2]
    scores = [item["score"] for item in one["levels"]["patch"]]
    assert scores == sorted(scores, reverse=True)
    patient = explain(tiny_model, val, patient_id=val.patient_ids[0])
    assert patient["target"]["num_patches"] == val.patient_ids.count(val.patient_ids[0])
    top = tiny_model.top_attributes(torch.zeros(1, 3, 32, 32), level="slide", k=2)[0]
    assert [name for name, _ in top] in (
        ["infiltrative", "well circumscribed"],
        ["well circumscribed", "infiltrative"],
    )
    with pytest.raises(ValueError, match="exactly one"):
        explain(tiny_model, val, index=0, slide_id=val.slide_ids[0])
    with pytest.raises(ValueError, match="slide 'nope' is not in"):
        explain(tiny_model, val, slide_id="nope")
    with pytest.raises(ValueError, match="no attribute heads"):
        explain(torch.nn.Linear(2, 2), val, index=0)


def test_explain_matches_model_top_attributes(tiny_model, saved):
    import datasets

    from hlss_hf.evaluation.embeddings import _default_pixels

    data = datasets.load_dataset(str(saved / "data"), split="validation").select(range(2))
    val = extract_embeddings(tiny_model, data, progress=False)
    pixels = _default_pixels([np.asarray(img) for img in data["image"]], "he", 32)
    expected = tiny_model.top_attributes(pixels, level="patch", k=3)[1]
    # Ranked by the raw affinities, as top_attributes ranks a single image (without a set to compare with).
    got = explain(tiny_model, val, index=1, k=3, standardize=False)["levels"]["patch"]
    assert [a["attribute"] for a in got] == [name for name, _ in expected]
    assert [a["score"] for a in got] == pytest.approx([s for _, s in expected], abs=1e-5)
    assert [a["affinity"] for a in got] == pytest.approx([s for _, s in expected], abs=1e-5)


def test_class_summary_means(tiny_model, demo_embeddings):
    _, val = demo_embeddings
    summary = class_attribute_summary(tiny_model, val, k=1)
    from hlss_hf.evaluation.explain import attribute_scores

    scores = attribute_scores(tiny_model, val.embeddings, "patient")
    expected = scores[val.labels == 2].mean(dim=0)
    assert summary["levels"]["patient"]["mean"][2] == pytest.approx(expected.tolist(), abs=1e-6)
    assert summary["num_patches"]["high_grade"] == int((val.labels == 2).sum())
    assert len(summary["levels"]["patch"]["top"]["normal"]) == 1


def test_save_to_disk_folder_and_its_empty_split(saved, tmp_path, capsys):
    import datasets

    data = datasets.load_dataset(str(saved / "data"))
    data["validation"] = data["validation"].select([])
    data.save_to_disk(tmp_path / "saved")
    args = [
        "--model_name_or_path",
        str(saved / "model"),
        "--dataset",
        str(tmp_path / "saved"),
        "--output_dir",
        str(tmp_path),
    ]
    report = main(["linear", *args, "--validation_split", "train"])
    assert report["num_patches"] == len(data["train"])
    with pytest.raises(SystemExit) as exit_info:
        main(["knn", *args])
    assert exit_info.value.code == 2
    assert "split 'validation' of dataset" in capsys.readouterr().err


def test_fine_tuned_classifier_folder(saved, tmp_path, capsys):
    """A classifier folder is embedded by its own tower; the modes that need text tower or heads say so."""
    from hlss_hf import HLSSForImageClassification

    folder = tmp_path / "classifier"
    HLSSForImageClassification.from_pretrained(saved / "model", num_labels=3).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    args = [
        "--model_name_or_path",
        str(folder),
        "--dataset",
        str(saved / "data"),
        "--output_dir",
        str(tmp_path / "out"),
    ]
    report = main(["knn", *args])
    assert 0.0 <= report["metrics"]["patch/acc"] <= 1.0
    for mode in ("zeroshot", "explain"):
        with pytest.raises(SystemExit) as exit_info:
            main([mode, *args])
        assert exit_info.value.code == 2
        assert f"without text tower or attribute heads; {mode} needs" in capsys.readouterr().err
