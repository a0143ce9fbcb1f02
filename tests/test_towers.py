"""The reference's kind of towers through their own loaders: timm image towers (transformers' TimmWrapper, the
head kept where it is the CLIP image projection) and open_clip checkpoints (``local-dir:`` / ``hf-hub:`` ids).

Every tower here is a tiny random one written offline by `_tiny.write_open_clip_checkpoint`, laid out like the Hub's
``timm/resnet50_clip.cc12m`` (timm image tower + open_clip checkpoint in one folder).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _tiny import (  # noqa: E402
    IMAGE_SIZE,
    OPEN_CLIP_MODEL_CFG,
    TIMM_CLIP_ARGS,
    TINY_ATTRIBUTES,
    bert_config,
    hierarchical_pixels,
    run_without_hlss,
    timm_clip_config,
    timm_config,
    tiny_tokenizer,
    vit_config,
    write_open_clip_checkpoint,
)
from torch import nn  # noqa: E402
from transformers import TimmWrapperForImageClassification, TimmWrapperModel  # noqa: E402

from hlss_hf import HLSSConfig, HLSSImageProcessor, HLSSModel, HLSSProcessor  # noqa: E402
from hlss_hf.models.hlss.configuration_hlss import OpenCLIPTextConfig  # noqa: E402
from hlss_hf.models.hlss.towers_hlss import (  # noqa: E402
    OpenCLIPTextModel,
    OpenCLIPVisionModel,
    load_text_tokenizer,
    open_clip_tokenizer,
)

open_clip = pytest.importorskip("open_clip")
pytest.importorskip("timm")

TEXTS = ["Densely packed nuclei", "a  glial tumour, H&E stain!", "tumour infiltrating the tissue " * 12]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny open_clip + timm checkpoint folder; returns (folder, the open_clip model it holds)."""
    folder = str(tmp_path_factory.mktemp("resnet50_clip_tiny"))
    write_open_clip_checkpoint(folder, seed=3)
    return folder, open_clip.create_model(f"local-dir:{folder}").eval()


@pytest.fixture(scope="module")
def reference_pair(checkpoint):
    """As the reference: the timm image tower of the folder + the open_clip text tower of the same folder."""
    folder, _ = checkpoint
    torch.manual_seed(0)
    return HLSSModel.from_vision_text_pretrained(
        folder, f"local-dir:{folder}", attributes=TINY_ATTRIBUTES
    ).eval()


@pytest.fixture(scope="module")
def open_clip_pair(checkpoint):
    """Both towers of the open_clip checkpoint, through open_clip."""
    folder, _ = checkpoint
    spec = f"local-dir:{folder}"
    return HLSSModel.from_vision_text_pretrained(spec, spec, attributes=TINY_ATTRIBUTES).eval()


def _pixels(n=3, seed=0):
    return torch.rand(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------- tokenizer


def test_open_clip_tokenizer_gives_open_clip_s_ids(checkpoint):
    folder, _ = checkpoint
    tokenizer = load_text_tokenizer(f"local-dir:{folder}")
    length = OPEN_CLIP_MODEL_CFG["text_cfg"]["context_length"]
    assert tokenizer.model_max_length == length
    ours = tokenizer(TEXTS, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
    theirs = open_clip.get_tokenizer(f"local-dir:{folder}")(TEXTS)
    # open_clip pads with id 0; OpenCLIPTextModel puts that id wherever the attention mask is 0.
    assert torch.equal(ours["input_ids"].masked_fill(ours["attention_mask"] == 0, 0), theirs)
    assert theirs[2, -1] == tokenizer.eos_token_id  # the long text is truncated, its end token kept


# --------------------------------------------------------------------------------------------- towers


def test_open_clip_text_tower_embeds_as_open_clip(checkpoint, reference_pair):
    folder, full = checkpoint
    assert isinstance(reference_pair.text_model, OpenCLIPTextModel)
    assert reference_pair.config.text_pooling == "pooler" and reference_pair.config.projection_dim == 32
    batch = load_text_tokenizer(f"local-dir:{folder}")(
        TEXTS, padding=True, truncation=True, return_tensors="pt"
    )
    with torch.no_grad():
        ours = reference_pair.get_text_features(**batch).pooler_output
        theirs = F.normalize(full.encode_text(open_clip.get_tokenizer(f"local-dir:{folder}")(TEXTS)), dim=-1)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    # The banks are the prompt-ensembled open_clip text embeddings.
    descriptions = TINY_ATTRIBUTES["slide"]["infiltrative"]
    with torch.no_grad():
        expected = F.normalize(
            full.encode_text(open_clip.get_tokenizer(f"local-dir:{folder}")(descriptions)), dim=-1
        )
    torch.testing.assert_close(
        reference_pair.bank_slide[0], F.normalize(expected.mean(0), dim=-1), rtol=1e-5, atol=1e-6
    )


def test_reference_towers_insert_no_projection_and_keep_the_timm_head(checkpoint, reference_pair):
    """timm id + the same repository's open_clip id: the timm tower's head is the image projection."""
    import timm
    from safetensors.torch import load_file

    folder, _ = checkpoint
    model = reference_pair
    assert model.config.use_visual_projection is False
    assert isinstance(model.visual_projection, nn.Identity)
    assert isinstance(model.vision_model, TimmWrapperForImageClassification)
    assert not any("visual_projection" in name for name, _ in model.named_parameters())
    x = _pixels()
    with torch.no_grad():
        head = model.vision_model.timm_model(x)  # attention pool + its output projection, [N, 32]
        torch.testing.assert_close(model.get_image_features(x).pooler_output, F.normalize(head, dim=-1))
    assert head.shape == (3, 32)
    # The weights are timm's own, as published (timm key names, no transformers prefix).
    native = timm.create_model("test_byobnet", num_classes=32, **TIMM_CLIP_ARGS).eval()
    native.load_state_dict(load_file(os.path.join(folder, "model.safetensors")))
    with torch.no_grad():
        torch.testing.assert_close(native(x), head)


def test_open_clip_image_tower_embeds_as_open_clip(checkpoint, open_clip_pair):
    _, full = checkpoint
    assert isinstance(open_clip_pair.vision_model, OpenCLIPVisionModel)
    assert isinstance(open_clip_pair.visual_projection, nn.Identity)
    x = _pixels(seed=1)
    with torch.no_grad():
        torch.testing.assert_close(
            open_clip_pair.get_image_features(x).pooler_output,
            F.normalize(full.encode_image(x), dim=-1),
            rtol=1e-5,
            atol=1e-6,
        )


def test_other_tower_pairs_get_a_new_projection(checkpoint):
    folder, _ = checkpoint
    # A timm tower without CLIP head, and an open_clip text tower: the pooled features are projected.
    model = HLSSModel.from_vision_text_pretrained(
        timm_config(), f"local-dir:{folder}", attributes=TINY_ATTRIBUTES
    )
    assert isinstance(model.vision_model, TimmWrapperModel) and model.config.use_visual_projection
    assert model.visual_projection.weight.shape == (32, model.vision_model.timm_model.num_features)
    # The open_clip image tower with another text tower (not its joint space): projected too.
    model = HLSSModel.from_vision_text_pretrained(
        f"local-dir:{folder}", bert_config(), attributes=TINY_ATTRIBUTES, tokenizer=tiny_tokenizer()
    )
    assert isinstance(model.visual_projection, nn.Linear) and model.visual_projection.weight.shape == (32, 32)
    assert model.get_image_features(_pixels()).pooler_output.shape == (3, 32)


@pytest.mark.parametrize(
    "vision,text,same",
    [
        ("timm/resnet50_clip.cc12m", "hf-hub:timm/resnet50_clip.cc12m", True),  # the reference's two towers
        ("hf-hub:timm/resnet50_clip.cc12m", "hf-hub:timm/resnet50_clip.cc12m/", True),
        ("timm/resnet50_clip.cc12m", "hf-hub:timm/resnet50_clip.openai", False),
        ("timm/resnet50_clip.cc12m", "timm/resnet50_clip.cc12m", False),  # no open_clip tower named
    ],
)
def test_same_checkpoint_detection_decides_the_default_projection(vision, text, same):
    from hlss_hf.models.hlss.towers_hlss import _same_open_clip_checkpoint

    assert _same_open_clip_checkpoint(vision, text) is same


def test_identity_projection_needs_a_tower_in_the_joint_space(checkpoint):
    folder, _ = checkpoint
    with pytest.raises(ValueError, match="joint space"):
        HLSSModel.from_vision_text_pretrained(
            timm_clip_config(num_labels=16),
            f"local-dir:{folder}",
            attributes=TINY_ATTRIBUTES,
            use_visual_projection=False,
        )
    with pytest.raises(ValueError, match="keep its head"):
        HLSSModel.from_vision_text_pretrained(
            TimmWrapperModel(timm_clip_config()),
            f"local-dir:{folder}",
            attributes=TINY_ATTRIBUTES,
            use_visual_projection=False,
        )


def test_config_round_trips_open_clip_towers_and_rejects_what_cannot_rebuild(reference_pair):
    restored = HLSSConfig.from_dict(reference_pair.config.to_dict())
    assert isinstance(restored.text_config, OpenCLIPTextConfig)
    assert restored.text_config.text_cfg == reference_pair.config.text_config.text_cfg
    assert restored.vision_config.model_type == "timm_wrapper" and restored.vision_config.num_labels == 32
    assert restored.use_visual_projection is False
    with pytest.raises(ValueError, match="hf_model_name"):
        OpenCLIPTextConfig(embed_dim=32, text_cfg={"hf_model_name": "microsoft/BiomedNLP-PubMedBERT"})
    with pytest.raises(ValueError, match="text_pooling"):
        HLSSConfig(timm_clip_config(), reference_pair.config.text_config, text_pooling="mean")
    with pytest.raises(ValueError, match="vocab_size"):
        open_clip_tokenizer(OpenCLIPTextConfig(embed_dim=32, text_cfg={"vocab_size": 1000}))


def test_a_training_step_moves_the_vision_tower_and_heads_only(checkpoint):
    folder, _ = checkpoint
    torch.manual_seed(1)
    model = HLSSModel.from_vision_text_pretrained(folder, f"local-dir:{folder}", attributes=TINY_ATTRIBUTES)
    model.train()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.5)
    out = model(hierarchical_pixels(seed=4))
    out.loss.backward()
    optimizer.step()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert any(
        name.startswith("vision_model.timm_model.head.") for name in changed
    )  # the CLIP projection trains
    assert any(name.startswith("heads.") for name in changed)
    assert not any(name.startswith("text_model.") for name in changed)
    assert not model.text_model.training


def test_gradient_checkpointing_goes_through_the_tower_s_library(checkpoint, open_clip_pair):
    folder, _ = checkpoint
    torch.manual_seed(2)
    model = HLSSModel.from_vision_text_pretrained(
        folder, f"local-dir:{folder}", attributes=TINY_ATTRIBUTES
    ).train()
    x = hierarchical_pixels(seed=5)
    model(x).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.activation_checkpointing_enable()
    assert model.vision_model.timm_model.grad_checkpointing
    model(x).loss.backward()
    for name, grad in plain.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="ModifiedResNet"):  # it would silently ignore the switch
        open_clip_pair.activation_checkpointing_enable()


# --------------------------------------------------------------------------------------------- save / load


@pytest.mark.slow  # fresh processes without hlss_hf
def test_saved_models_load_through_auto_model_where_hlss_hf_is_not_importable(
    reference_pair, open_clip_pair, checkpoint, tmp_path
):
    folder, _ = checkpoint
    tokenizer = load_text_tokenizer(f"local-dir:{folder}")
    image_processor = HLSSImageProcessor(modality="he", crop_size=IMAGE_SIZE)
    for name, model in (("reference", reference_pair), ("open_clip", open_clip_pair)):
        model.save_pretrained(tmp_path / name)
        HLSSProcessor(image_processor, tokenizer).save_pretrained(tmp_path / name)
    x = _pixels(seed=2)
    torch.save(x, tmp_path / "x.pt")
    result = run_without_hlss(
        f"""
        import torch
        from transformers import AutoModel, AutoProcessor

        texts = {TEXTS[:2]!r}
        out = {{}}
        for name in ("reference", "open_clip"):
            folder = {str(tmp_path)!r} + "/" + name
            model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
            assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
            processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
            batch = processor.tokenizer(texts, padding=True, return_tensors="pt")
            with torch.no_grad():
                out[name] = {{
                    "image": model.get_image_features(torch.load({str(tmp_path / "x.pt")!r})).pooler_output,
                    "text": model.get_text_features(**batch).pooler_output,
                    "bank": model.bank_patch.clone(),
                    "vision": type(model.vision_model).__name__,
                    "projection": type(model.visual_projection).__name__,
                }}
        torch.save(out, {str(tmp_path / "out.pt")!r})
        print("ok")
        """,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    remote = torch.load(tmp_path / "out.pt")
    assert remote["reference"]["vision"] == "TimmWrapperForImageClassification"
    assert remote["open_clip"]["vision"] == "OpenCLIPVisionModel"
    batch = tokenizer(TEXTS[:2], padding=True, return_tensors="pt")
    for name, model in (("reference", reference_pair), ("open_clip", open_clip_pair)):
        assert remote[name]["projection"] == "Identity"
        # The same weights and inputs; the outputs may differ in the last float bits where the CPU kernels sum in
        # another order (seen with one thread per process: 2 pytest workers on 2 cores).
        with torch.no_grad():
            last_bits = dict(rtol=0, atol=1e-6)
            torch.testing.assert_close(
                remote[name]["image"], model.get_image_features(x).pooler_output, **last_bits
            )
            torch.testing.assert_close(
                remote[name]["text"], model.get_text_features(**batch).pooler_output, **last_bits
            )
        assert torch.equal(remote[name]["bank"], model.bank_patch)


def test_classifier_loads_the_towers_of_a_saved_folder(reference_pair, open_clip_pair, tmp_path):
    from hlss_hf import HLSSForImageClassification

    x = _pixels(seed=5)
    for name, model in (("reference", reference_pair), ("open_clip", open_clip_pair)):
        model.save_pretrained(tmp_path / name)
        classifier = HLSSForImageClassification.from_pretrained(tmp_path / name, num_labels=3).eval()
        assert isinstance(classifier.visual_projection, nn.Identity)
        assert type(classifier.vision_model) is type(model.vision_model)
        with torch.no_grad():
            torch.testing.assert_close(
                classifier.get_image_features(x).pooler_output, model.get_image_features(x).pooler_output
            )
            assert classifier(x).logits.shape == (3, 3)


def test_missing_library_error_names_the_package_and_the_extra(
    reference_pair, open_clip_pair, tmp_path, monkeypatch
):
    reference_pair.save_pretrained(tmp_path / "reference")
    open_clip_pair.save_pretrained(tmp_path / "open_clip")
    monkeypatch.setitem(sys.modules, "open_clip.model", None)  # import of it now raises ImportError
    with pytest.raises(ImportError, match=r"open_clip_torch.*hlss_hf\[reference\]"):
        HLSSModel.from_pretrained(tmp_path / "open_clip")
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ImportError, match=r"`timm` package.*hlss_hf\[reference\]"):
        HLSSModel.from_pretrained(tmp_path / "reference")
    monkeypatch.setitem(sys.modules, "open_clip", None)
    with pytest.raises(ImportError, match=r"open_clip_torch.*hlss_hf\[reference\]"):
        HLSSModel.from_vision_text_pretrained(
            vit_config(), f"local-dir:{tmp_path}", attributes=TINY_ATTRIBUTES, tokenizer=tiny_tokenizer()
        )


# --------------------------------------------------------------------------------------------- reference facts


@pytest.mark.slow
def test_reference_image_tower_is_the_same_network_in_open_clip_and_timm():
    """open_clip RN50 (CC12M tag: QuickGELU, weights in the Hub repo timm/resnet50_clip.cc12m) has a ModifiedResNet
    whose attention pool outputs the 1024-d joint space; timm's resnet50_clip, built through TimmWrapper with its
    head kept, is the same network: open_clip's image weights, converted by timm, give the same embeddings."""
    import timm
    from timm.models.byobnet import checkpoint_filter_fn
    from transformers import TimmWrapperConfig

    from hlss_hf.models.hlss.towers_hlss import _pool_vision

    tag = open_clip.get_pretrained_cfg("RN50", "cc12m")
    assert tag["hf_hub"].strip("/") == "timm/resnet50_clip.cc12m" and tag["quick_gelu"] is True
    timm_tag = timm.models.get_pretrained_cfg("resnet50_clip.cc12m")
    assert (timm_tag.hf_hub_id, timm_tag.num_classes, timm_tag.classifier) == (
        "timm/resnet50_clip.cc12m",
        1024,
        "head.proj",
    )
    model_cfg = open_clip.get_model_config("RN50")
    assert model_cfg["embed_dim"] == 1024
    torch.manual_seed(0)
    visual = open_clip.create_model("RN50", force_quick_gelu=True).visual.eval()
    tower = TimmWrapperForImageClassification(
        TimmWrapperConfig(architecture="resnet50_clip", num_labels=model_cfg["embed_dim"])
    ).eval()
    converted = checkpoint_filter_fn(
        {f"visual.{k}": v for k, v in visual.state_dict().items()}, tower.timm_model
    )
    tower.timm_model.load_state_dict(converted)
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = _pool_vision(tower(pixel_values=x))
        theirs = visual(x)
    assert ours.shape == theirs.shape == (2, 1024)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
