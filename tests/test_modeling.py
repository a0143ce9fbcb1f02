"""HLSSConfig / HLSSModel / HLSSForImageClassification behaviour on tiny towers (CPU, offline)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import math

import pytest
import torch
import torch.nn.functional as F
from _tiny import (
    MINILM_PATH,
    TINY_ATTRIBUTES,
    bert_config,
    clip_config,
    clip_text_config,
    clip_vision_config,
    hierarchical_pixels,
    resnet_config,
    tiny_hlss_model,
    tiny_tokenizer,
    vit_config,
)
from transformers import AutoModel, AutoModelForImageClassification, CLIPModel

import hlss_hf
from hlss_hf import HLSSConfig, HLSSForImageClassification, HLSSModel, HLSSOutput, load_attributes

LEVELS = ("patch", "slide", "patient")
NAMES = {level: list(bank) for level, bank in TINY_ATTRIBUTES.items()}
TOWER_PAIRS = {
    "clip+clip": (clip_vision_config, clip_text_config),
    "vit+bert": (vit_config, bert_config),
    "resnet+minilm": (resnet_config, lambda: MINILM_PATH),
}


_BUILT = {}


def _pair(name):
    """One tiny model per tower pair for the whole module (building MiniLM banks costs seconds)."""
    if name not in _BUILT:
        vision, text = TOWER_PAIRS[name]
        _BUILT[name] = tiny_hlss_model(vision(), text())
    return _BUILT[name]


@pytest.fixture(scope="module", params=list(TOWER_PAIRS))
def pair_model(request):
    return _pair(request.param)


@pytest.fixture(scope="module")
def clip_model():
    return tiny_hlss_model()


def _tiny_config(**overrides):
    kwargs = dict(vision_config=vit_config(), text_config=bert_config(), attribute_names=NAMES)
    kwargs.update(overrides)
    return HLSSConfig(**kwargs)


# ------------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("temperature", 0.0),
        ("base_temperature", -1.0),
        ("align_temperature", float("nan")),
        ("lambda_patch", -0.5),
        ("lambda_slide", float("inf")),
        ("lambda_patient", "1"),
        ("lambda_align", -1.0),
        ("alignment_reduction", "batchmean"),
        ("use_visual_projection", "no"),
        ("text_pooling", "max"),
        ("modality", "ihc"),
        ("image_size", 0),
        ("mpp", -0.5),
        ("magnification", 0),
        ("projection_dim", 7),
        ("attribute_names", {"organ": ["brain"]}),
        ("attribute_names", {"patch": ["a", "a"]}),
        ("attribute_names", {"patch": [""]}),
        ("vision_config", {"hidden_size": 32}),
        ("text_config", 3),
    ],
)
def test_config_bad_value_raises_naming_the_key(key, value):
    with pytest.raises(ValueError, match=key):
        _tiny_config(**{key: value})


def test_config_derives_sizes_pooling_and_round_trips():
    config = _tiny_config(lambda_align=0.5, mpp=0.5, magnification=20, alignment_reduction="sum")
    assert config.projection_dim == 32
    assert config.num_attributes == {"patch": 3, "slide": 2, "patient": 2}
    assert config.text_pooling == "mean"  # BERT-like towers: sentence-transformers mean pooling
    restored = HLSSConfig.from_dict(config.to_dict())
    assert restored.attribute_names == NAMES
    assert (restored.lambda_align, restored.mpp, restored.magnification) == (0.5, 0.5, 20.0)
    assert restored.alignment_reduction == "sum" and _tiny_config().alignment_reduction == "mean"
    assert restored.use_visual_projection is True
    assert restored.vision_config.model_type == "vit" and restored.text_config.hidden_size == 32


def test_config_takes_the_towers_of_a_full_clip_config():
    full = clip_config()
    config = HLSSConfig(vision_config=full, text_config=full, attribute_names=NAMES)
    assert config.vision_config.model_type == "clip_vision_model"
    assert config.text_config.model_type == "clip_text_model"
    assert config.projection_dim == full.projection_dim
    assert config.text_pooling == "pooler"  # CLIP: EOS token through its pretrained projection


def test_config_builds_towers_from_dicts_with_model_type():
    config = HLSSConfig(
        vision_config=vit_config().to_dict(), text_config=bert_config().to_dict(), attribute_names=NAMES
    )
    assert type(config.vision_config).__name__ == "ViTConfig"
    assert type(config.text_config).__name__ == "BertConfig"


def test_model_needs_attributes_at_every_level():
    with pytest.raises(ValueError, match="slide"):
        HLSSModel(_tiny_config(attribute_names={"patch": ["a"], "slide": [], "patient": ["c"]}))


@pytest.mark.parametrize("vision", ["clip", "vit", "resnet", "convnext", "dinov2"])
def test_every_trainable_parameter_gets_a_gradient(vision):
    # DDP (accelerate multi-process training) fails on trainable parameters that receive no gradient.
    from transformers import ConvNextConfig, Dinov2Config

    configs = {
        "clip": clip_vision_config,
        "vit": vit_config,
        "resnet": resnet_config,
        "convnext": lambda: ConvNextConfig(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2),
        "dinov2": lambda: Dinov2Config(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=32,
            patch_size=8,
        ),
    }
    torch.manual_seed(0)
    model = HLSSModel(_tiny_config(vision_config=configs[vision]())).train()
    out = model(hierarchical_pixels())
    assert out.image_embeds.shape == (2, 2, 2, 2, 32)
    out.loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not {n for n in trainable if n.startswith("text_model.")}
    assert {n for n, p in model.named_parameters() if p.requires_grad and p.grad is None} == set()
    assert any(n.startswith("vision_model.") for n in trainable) and "visual_projection.weight" in trainable


# ---------------------------------------------------------------------------------------------------- outputs
def test_flat_forward_shapes_and_unit_norm(pair_model):
    model = pair_model.eval()
    d = model.config.projection_dim
    out = model(torch.rand(3, 3, 32, 32))
    assert isinstance(out, HLSSOutput) and out.loss is None
    assert out.image_embeds.shape == (3, d)
    torch.testing.assert_close(out.image_embeds.norm(dim=-1), torch.ones(3))
    for level in LEVELS:
        assert out.attribute_scores[level].shape == (3, len(NAMES[level]))
        torch.testing.assert_close(out.attribute_scores[level].norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(
        model.get_image_features(torch.rand(2, 3, 32, 32)).pooler_output.norm(dim=-1), torch.ones(2)
    )


def test_hierarchical_forward_returns_loss_and_parts_in_training(pair_model):
    model = pair_model.train()
    b, s, p, v = 2, 2, 2, 2
    out = model(hierarchical_pixels(b, s, p, v))
    model.eval()
    d = model.config.projection_dim
    assert out.image_embeds.shape == (b, s, p, v, d)
    assert {k: t.shape for k, t in out.attribute_scores.items()} == {
        level: (b, s, p, v, len(NAMES[level])) for level in LEVELS
    }
    assert set(out.level_losses) == {f"{kind}_{level}" for kind in ("hvc", "ha") for level in LEVELS}
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    hvc = sum(out.level_losses[f"hvc_{level}"] for level in LEVELS)
    ha = sum(out.level_losses[f"ha_{level}"] for level in LEVELS)
    torch.testing.assert_close(out.hvc_loss, hvc)
    torch.testing.assert_close(out.alignment_loss, ha)
    torch.testing.assert_close(out.loss, hvc + ha)


def test_loss_weights_follow_the_config(clip_model):
    x = hierarchical_pixels(seed=1)
    base = clip_model(x, return_loss=True)
    clip_model.config.lambda_slide, clip_model.config.lambda_align = 0.25, 3.0
    try:
        weighted = clip_model(x, return_loss=True)
    finally:
        clip_model.config.lambda_slide, clip_model.config.lambda_align = 1.0, 1.0
    parts = base.level_losses
    expected = (
        parts["hvc_patch"] + 0.25 * parts["hvc_slide"] + parts["hvc_patient"] + 3.0 * base.alignment_loss
    )
    torch.testing.assert_close(weighted.loss, expected)


def test_alignment_reduction_sum_scales_each_ha_term_by_the_number_of_images(clip_model):
    x = hierarchical_pixels(seed=2)  # 2 * 2 * 2 * 2 = 16 images
    mean = clip_model(x, return_loss=True)
    clip_model.config.alignment_reduction = "sum"
    try:
        summed = clip_model(x, return_loss=True)
    finally:
        clip_model.config.alignment_reduction = "mean"
    for level in LEVELS:
        torch.testing.assert_close(summed.level_losses[f"ha_{level}"], 16 * mean.level_losses[f"ha_{level}"])
    torch.testing.assert_close(summed.loss, mean.hvc_loss + 16 * mean.alignment_loss)


def test_eval_hierarchical_forward_has_no_loss_unless_asked(clip_model):
    clip_model.eval()
    x = hierarchical_pixels()
    assert clip_model(x).loss is None
    assert torch.isfinite(clip_model(x, return_loss=True).loss)


@pytest.mark.parametrize("pair", ["clip+clip", "vit+bert"])
def test_patch_token_towers_take_other_crop_sizes(pair):
    model = _pair(pair).eval()
    assert model.get_image_features(torch.rand(2, 3, 48, 48)).pooler_output.shape == (
        2,
        model.config.projection_dim,
    )
    # The pretraining size keeps the exact position embeddings (no interpolation).
    x = torch.rand(2, 3, 32, 32)
    expected = F.normalize(model.visual_projection(model.vision_model(pixel_values=x).pooler_output), dim=-1)
    torch.testing.assert_close(model.get_image_features(x).pooler_output, expected)


def test_return_dict_false_gives_a_tuple(clip_model):
    clip_model.eval()
    out = clip_model(torch.rand(2, 3, 32, 32), return_dict=False)
    assert isinstance(out, tuple) and out[0].shape == (2, clip_model.config.projection_dim)


def test_bad_inputs_raise(clip_model):
    with pytest.raises(ValueError, match="pixel_values"):
        clip_model(torch.rand(2, 2, 3, 32, 32))
    with pytest.raises(ValueError, match="return_loss"):
        clip_model(torch.rand(2, 3, 32, 32), return_loss=True)


def test_single_view_batches_need_lambda_patch_zero(clip_model):
    x = hierarchical_pixels(v=1)
    with pytest.raises(ValueError, match="lambda_patch"):
        clip_model(x, return_loss=True)
    clip_model.config.lambda_patch = 0.0
    try:
        out = clip_model(x, return_loss=True)
    finally:
        clip_model.config.lambda_patch = 1.0
    assert "hvc_patch" not in out.level_losses and torch.isfinite(out.loss)


# ------------------------------------------------------------------------------------------ text tower / banks
def test_text_tower_frozen_and_kept_in_eval_mode(clip_model):
    assert all(not p.requires_grad for p in clip_model.text_model.parameters())
    clip_model.train()
    assert clip_model.training and clip_model.vision_model.training
    assert not clip_model.text_model.training
    assert not any(m.training for m in clip_model.text_model.modules())
    clip_model.eval()


def test_text_tower_never_runs_in_a_training_forward(clip_model):
    calls = []
    handle = clip_model.text_model.register_forward_hook(lambda *args: calls.append(1))
    try:
        clip_model.train()
        clip_model(hierarchical_pixels()).loss.backward()
        clip_model.zero_grad()
        assert calls == []
        clip_model.encode_texts(["a sanity check that the hook fires"], tiny_tokenizer())
        assert len(calls) == 1
    finally:
        handle.remove()
        clip_model.eval()


def test_banks_are_unit_norm_persistent_buffers_and_heads_start_at_them(clip_model):
    state = clip_model.state_dict()
    params = dict(clip_model.named_parameters())
    for level in LEVELS:
        bank = getattr(clip_model, f"bank_{level}")
        assert f"bank_{level}" in state and f"bank_{level}" not in params
        assert bank.shape == (len(NAMES[level]), clip_model.config.projection_dim)
        torch.testing.assert_close(bank.norm(dim=-1), torch.ones(len(NAMES[level])))
    fresh = tiny_hlss_model(seed=3)
    for level in LEVELS:
        torch.testing.assert_close(fresh.heads[level].weight, getattr(fresh, f"bank_{level}"))
        assert torch.count_nonzero(fresh.heads[level].bias) == 0


def test_bank_rows_are_prompt_ensembles(clip_model):
    tokenizer = tiny_tokenizer()
    for level, bank in TINY_ATTRIBUTES.items():
        for row, (name, descriptions) in enumerate(bank.items()):
            each = F.normalize(clip_model.encode_texts(descriptions, tokenizer), dim=-1)
            expected = F.normalize(each.mean(0), dim=-1)
            torch.testing.assert_close(
                getattr(clip_model, f"bank_{level}")[row], expected, msg=f"{level}/{name}"
            )


def test_optimizer_steps_change_heads_not_banks():
    model = tiny_hlss_model(seed=4).train()
    banks = {level: getattr(model, f"bank_{level}").clone() for level in LEVELS}
    heads = {level: model.heads[level].weight.detach().clone() for level in LEVELS}
    text = [p.detach().clone() for p in model.text_model.parameters()]
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for step in range(3):
        optimizer.zero_grad()
        model(hierarchical_pixels(seed=step)).loss.backward()
        optimizer.step()
    for level in LEVELS:
        assert torch.equal(getattr(model, f"bank_{level}"), banks[level])
        assert not torch.allclose(model.heads[level].weight, heads[level])
    assert all(torch.equal(a, b) for a, b in zip(text, model.text_model.parameters(), strict=True))


@pytest.mark.parametrize(
    ("lambdas", "name"),
    [
        (dict(lambda_align=0.0), "HVC alone"),
        (dict(lambda_patch=0.0, lambda_slide=0.0, lambda_patient=0.0, lambda_align=1.0), "HA alone"),
    ],
)
def test_gradient_reaches_the_vision_tower(lambdas, name):
    model = tiny_hlss_model(seed=5, **lambdas).train()
    out = model(hierarchical_pixels())
    out.loss.backward()
    grad = model.vision_model.embeddings.patch_embedding.weight.grad
    assert grad is not None and grad.abs().sum() > 0, name
    assert torch.isfinite(grad).all()
    # The switched-off terms are logged without gradient.
    off = [k for k, t in out.level_losses.items() if not t.requires_grad]
    expected_off = (
        ["ha_patch", "ha_slide", "ha_patient"]
        if name == "HVC alone"
        else ["hvc_patch", "hvc_slide", "hvc_patient"]
    )
    assert sorted(off) == sorted(expected_off)


def test_all_weights_zero_gives_a_loss_without_gradient():
    model = tiny_hlss_model(seed=6, lambda_patch=0.0, lambda_slide=0.0, lambda_patient=0.0, lambda_align=0.0)
    out = model.train()(hierarchical_pixels())
    assert not out.loss.requires_grad and out.loss.item() == 0.0


def test_bf16_autocast_forward_and_backward_are_finite(clip_model):
    clip_model.train()
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = clip_model(hierarchical_pixels())
        out.loss.backward()
    finally:
        clip_model.eval()
    grads = [p.grad for p in clip_model.vision_model.parameters() if p.grad is not None]
    clip_model.zero_grad()
    assert torch.isfinite(out.loss) and out.loss.dtype == torch.float32
    assert grads and all(torch.isfinite(g).all() for g in grads)


# ---------------------------------------------------------------------------------------- zero-shot / explain
def test_zero_shot_logits_are_scaled_cosines(clip_model):
    clip_model.eval()
    tokenizer = tiny_tokenizer()
    x = torch.rand(3, 3, 32, 32)
    texts = ["glioma", "meningioma", "normal brain"]
    logits = clip_model.zero_shot_logits(x, texts=texts, tokenizer=tokenizer, logit_scale=10.0)
    expected = (
        10.0 * clip_model.get_image_features(x).pooler_output @ clip_model.encode_texts(texts, tokenizer).T
    )
    assert logits.shape == (3, 3)
    torch.testing.assert_close(logits, expected)
    default = clip_model.zero_shot_logits(x, text_embeds=clip_model.encode_texts(texts, tokenizer))
    torch.testing.assert_close(default, expected / 10.0 / clip_model.config.temperature)
    with pytest.raises(ValueError, match="at most one"):
        clip_model.zero_shot_logits(x, texts=texts, tokenizer=tokenizer, text_embeds=default)
    with pytest.raises(ValueError, match=r"no class descriptions \(config.class_prompts\)"):
        clip_model.zero_shot_logits(x)


@pytest.mark.parametrize("use_heads", [True, False])
def test_top_attributes_rank_names_by_score(clip_model, use_heads):
    clip_model.eval()
    x = torch.rand(2, 3, 32, 32)
    top = clip_model.top_attributes(x, level="patch", k=2, use_heads=use_heads)
    z = clip_model.get_image_features(x).pooler_output
    scores = F.normalize(clip_model.heads["patch"](z), dim=-1) if use_heads else z @ clip_model.bank_patch.T
    assert len(top) == 2
    for row, ranked in zip(scores, top, strict=True):
        assert len(ranked) == 2
        best = row.argsort(descending=True)[:2].tolist()
        assert [name for name, _ in ranked] == [NAMES["patch"][i] for i in best]
        assert [s for _, s in ranked] == pytest.approx(row[best].tolist(), abs=1e-6)
    with pytest.raises(ValueError, match="level"):
        clip_model.top_attributes(x, level="organ")


# --------------------------------------------------------------------------------------- attribute files
def test_attribute_yaml_and_json_files_load(tmp_path):
    import yaml

    (tmp_path / "a.yaml").write_text(yaml.safe_dump(TINY_ATTRIBUTES))
    (tmp_path / "a.json").write_text(json.dumps(TINY_ATTRIBUTES))
    assert load_attributes(tmp_path / "a.yaml") == TINY_ATTRIBUTES
    assert load_attributes(str(tmp_path / "a.json")) == TINY_ATTRIBUTES
    single = {**TINY_ATTRIBUTES, "patient": {"glioma": "one description"}}
    assert load_attributes(single)["patient"] == {"glioma": ["one description"]}


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda a: a.pop("slide"), "slide"),
        (lambda a: a.update(patient={}), "patient"),
        (lambda a: a["patch"].update(necrosis=[]), "patch/necrosis"),
        (lambda a: a["patch"].update(normal=["ok", "  "]), "patch/normal"),
        (lambda a: a.update(organ={"brain": ["x"]}), "organ"),
    ],
)
def test_attribute_file_errors_name_the_level_or_attribute(tmp_path, change, match):
    import yaml

    attributes = json.loads(json.dumps(TINY_ATTRIBUTES))
    change(attributes)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(attributes))
    with pytest.raises(ValueError, match=match) as info:
        load_attributes(path)
    assert "bad.yaml" in str(info.value)


def test_attribute_file_missing_or_unparsable(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_attributes(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="broken.json"):
        load_attributes(broken)


def test_shipped_attribute_sets_load_by_name():
    for name in ("srh_brain_tumor", "srh_brain_tumor.yaml"):
        assert all(len(bank) == 128 for bank in load_attributes(name).values())
    with pytest.raises(
        ValueError, match=r"'he_tgca' does not exist and is not a shipped set \[.*'he_tcga.yaml'"
    ):
        load_attributes("he_tgca")


# ------------------------------------------------------------------------------------- pretrained towers
def test_from_vision_text_pretrained_keeps_the_real_minilm_weights():
    model = _pair("resnet+minilm")
    reference = AutoModel.from_pretrained(MINILM_PATH)
    ours = model.text_model.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in reference.state_dict().items())
    assert model.config.text_model_name_or_path == MINILM_PATH
    assert model.config.projection_dim == 384 and model.config.text_pooling == "mean"


def test_tokenizer_comes_from_the_text_path_or_must_be_given():
    torch.manual_seed(0)
    model = HLSSModel.from_vision_text_pretrained(resnet_config(), MINILM_PATH, attributes=TINY_ATTRIBUTES)
    torch.testing.assert_close(
        model.bank_patch, _pair("resnet+minilm").bank_patch
    )  # same tokenizer, same banks
    with pytest.raises(ValueError, match="tokenizer"):
        HLSSModel.from_vision_text_pretrained(vit_config(), bert_config(), attributes=TINY_ATTRIBUTES)


def test_minilm_mean_pooling_matches_sentence_transformers_recipe():
    model = _pair("resnet+minilm")
    tokenizer = tiny_tokenizer()
    texts = ["densely packed nuclei", "a sharply bounded lesion with calcifications"]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    hidden = AutoModel.from_pretrained(MINILM_PATH).eval()(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    expected = F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    torch.testing.assert_close(model.encode_texts(texts, tokenizer), expected, atol=1e-5, rtol=1e-5)


def test_one_clip_checkpoint_reuses_both_pretrained_projections(tmp_path):
    torch.manual_seed(7)
    clip = CLIPModel(clip_config()).eval()
    clip.save_pretrained(tmp_path / "clip")
    model = HLSSModel.from_vision_text_pretrained(
        str(tmp_path / "clip"), str(tmp_path / "clip"), attributes=TINY_ATTRIBUTES, tokenizer=tiny_tokenizer()
    ).eval()
    assert torch.equal(model.visual_projection.weight, clip.visual_projection.weight)
    assert torch.equal(model.text_model.text_projection.weight, clip.text_projection.weight)
    x = torch.rand(2, 3, 32, 32)
    ids = tiny_tokenizer()(["a glial tumour"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(
            model.get_image_features(x).pooler_output,
            F.normalize(clip.get_image_features(x).pooler_output, dim=-1),
        )
        text = clip.get_text_features(
            input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]
        ).pooler_output
    torch.testing.assert_close(
        model.encode_texts(["a glial tumour"], tiny_tokenizer()), F.normalize(text, dim=-1)
    )


# ------------------------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("pair", list(TOWER_PAIRS))
def test_save_load_round_trip_through_auto_model(tmp_path, pair):
    model = _pair(pair).eval()
    model.config.lambda_align = 0.5
    try:
        model.save_pretrained(tmp_path)
    finally:
        model.config.lambda_align = 1.0
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert type(loaded) is HLSSModel and loaded.config.lambda_align == 0.5
    assert loaded.config.attribute_names == NAMES
    assert all(not p.requires_grad for p in loaded.text_model.parameters())
    x = torch.rand(2, 3, 32, 32)
    a, b = model(x), loaded(x)
    assert (a.image_embeds - b.image_embeds).abs().max() < 1e-5
    for level in LEVELS:
        assert (a.attribute_scores[level] - b.attribute_scores[level]).abs().max() < 1e-5
        assert torch.equal(getattr(model, f"bank_{level}"), getattr(loaded, f"bank_{level}"))
    tokenizer = tiny_tokenizer()
    assert (
        model.encode_texts(["x y"], tokenizer) - loaded.encode_texts(["x y"], tokenizer)
    ).abs().max() < 1e-5
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert set(auto_map) == {"AutoConfig", "AutoModel", "AutoModelForImageClassification"}
    assert {"configuration_hlss.py", "modeling_hlss.py", "losses.py"} <= set(os.listdir(tmp_path))


def test_classifier_loads_the_vision_side_of_an_hlss_folder(tmp_path):
    model = _pair("vit+bert").eval()
    model.save_pretrained(tmp_path)
    labels = ["glioma", "meningioma", "normal"]
    classifier, info = AutoModelForImageClassification.from_pretrained(
        tmp_path,
        num_labels=3,
        id2label=dict(enumerate(labels)),
        label2id={n: i for i, n in enumerate(labels)},
        output_loading_info=True,
    )
    assert type(classifier) is HLSSForImageClassification
    assert set(info["missing_keys"]) == {"classifier.weight", "classifier.bias"}
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    classifier.eval()
    x = torch.rand(4, 3, 32, 32)
    torch.testing.assert_close(
        classifier.get_image_features(x).pooler_output, model.get_image_features(x).pooler_output
    )
    y = torch.tensor([0, 1, 2, 1])
    out = classifier(x, labels=y)
    assert out.logits.shape == (4, 3) and classifier.config.id2label[1] == "meningioma"
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, y))
    out.loss.backward()
    assert classifier.classifier.weight.grad.abs().sum() > 0
    names = {n for n, _ in classifier.named_modules()}
    assert {"vision_model", "visual_projection", "classifier"} <= names
    # LoRA targets live in the vision tower (ViT in transformers 5 names them q_proj / v_proj).
    assert any(n.startswith("vision_model.") and n.endswith((".q_proj", ".query")) for n in names)


def test_package_registers_the_auto_classes():
    from transformers import AutoConfig

    assert AutoConfig.for_model("hlss").__class__ is HLSSConfig
    model = AutoModel.from_config(_tiny_config())
    assert type(model) is HLSSModel
    assert (
        type(AutoModelForImageClassification.from_config(_tiny_config(num_labels=2)))
        is HLSSForImageClassification
    )
    assert math.isclose(model.config.temperature, 0.07)
    assert {"HLSSConfig", "HLSSModel", "HLSSForImageClassification"} <= set(hlss_hf.__all__)
