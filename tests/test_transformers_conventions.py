"""HLSS's models and processors behave as transformers' own common test suites expect (issue 21).

The project's own tests of the behaviours that transformers' `ModelTesterMixin`, `ImageProcessingTestMixin` and
`ProcessorTesterMixin` check (those files are not ours to copy): hidden states and attention maps, the transformers 5
feature methods, the processor kwargs convention, the image-processor arguments `ImagesKwargs` declares, and weight
initialisation. Saved models of the code before these changes: `test_remote_code.py`.

Upstream common tests that do not apply to HLSS, and why (run against the four classes with tiny ViT, CLIP, ResNet
and timm towers; everything else there passes or is skipped by transformers itself for lack of a GPU, flash
attention, DeepSpeed and the like):
- `test_model_get_set_embeddings`: `get_input_embeddings()` is `None` on purpose: the input is pixels; a token
  embedding exists only in the frozen text tower, which the forward never runs.
- `test_processor_from_and_save_pretrained(_as_nested_dict)`: a saved `HLSSProcessor` carries `auto_map` (it is
  registered for `AutoProcessor` so that it loads as remote code), so the reloaded `to_dict()` has one key more.
- `test_new_models_require_torchvision_backend`: `HLSSImageProcessor` is one torch implementation; transformers'
  backend names ("pil" / "torchvision") tell apart its own processors' two implementations.
- With a ResNet tower: the hidden-state tests that expect `[seq, hidden]` tokens or a `hidden_size` (a ResNet's are
  `[C, h, w]` feature maps and its config has `hidden_sizes`), selective capture by layer index (ResNet does not
  record outputs that way) and gradient checkpointing (transformers' ResNet has none).
- With a timm tower: hidden states are timm's `forward_intermediates` (one per block, `[C, h, w]`, computed beside
  the path to the embedding, so `retain_grad` sees no gradient), and gradient checkpointing goes through timm's own
  switch, with no transformers checkpointing layer in the vision tower.
- `test_model_weights_reload_no_missing_tied_weights` / `test_can_init_all_missing_weights` for `HLSSModel`: they
  load a checkpoint without any tensor; HLSSModel refuses one without its attribute banks (tested below), and
  passes both once the banks are given.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import inspect

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _tiny import (
    IMAGE_SIZE,
    MINILM_PATH,
    bert_config,
    clip_text_config,
    clip_vision_config,
    hierarchical_pixels,
    resnet_config,
    timm_config,
    tiny_hlss_model,
    tiny_tokenizer,
    vit_config,
)
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer
from transformers.modeling_outputs import BaseModelOutputWithPooling

from hlss_hf import HLSSForImageClassification, HLSSImageProcessor, HLSSModel, HLSSProcessor
from hlss_hf.models.hlss.processing_hlss import HLSSImageProcessorKwargs, HLSSProcessorKwargs

LAYERS, HEADS, HIDDEN = 2, 2, 32
SEQ = (IMAGE_SIZE // 8) ** 2 + 1  # 16 patches of 8 px + CLS


@pytest.fixture(scope="module")
def vit_model():
    """ViT + BERT towers, eager attention (the attention maps need it), eval mode."""
    model = tiny_hlss_model(vit_config(), bert_config(), seed=1).eval()
    model.set_attn_implementation("eager")
    return model


@pytest.fixture(scope="module")
def vit_classifier(vit_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("vit_classifier")
    vit_model.save_pretrained(folder)
    classifier = HLSSForImageClassification.from_pretrained(folder, num_labels=3).eval()
    classifier.set_attn_implementation("eager")
    return classifier


def _images(n=3, seed=0):
    return torch.rand(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- hidden states and attention maps
def test_forward_and_classifier_return_the_vision_tower_s_hidden_states_and_attentions(
    vit_model, vit_classifier
):
    x = _images()
    with torch.no_grad():
        tower = vit_model.vision_model(pixel_values=x, output_hidden_states=True, output_attentions=True)
        for model in (vit_model, vit_classifier):
            out = model(x, output_hidden_states=True, output_attentions=True)
            assert len(out.hidden_states) == LAYERS + 1 and len(out.attentions) == LAYERS
            assert out.hidden_states[0].shape == (3, SEQ, HIDDEN)
            assert out.attentions[0].shape == (3, HEADS, SEQ, SEQ)
            for ours, theirs in zip(
                out.hidden_states + out.attentions, tower.hidden_states + tower.attentions, strict=True
            ):
                torch.testing.assert_close(ours, theirs)
            # Asked for nothing: nothing extra, and the tuple form has no trailing entries.
            plain = model(x)
            assert plain.hidden_states is None and plain.attentions is None
            assert len(model(x, output_hidden_states=True, return_dict=False)) == len(plain.to_tuple()) + 1


def test_the_config_switches_ask_for_them_too(vit_model):
    x = _images(2)
    vit_model.config.output_hidden_states = True
    vit_model.config.output_attentions = True
    try:
        with torch.no_grad():
            out = vit_model(x)
            features = vit_model.get_image_features(x)
    finally:
        vit_model.config.output_hidden_states = False
        vit_model.config.output_attentions = False
    assert len(out.hidden_states) == LAYERS + 1 and len(out.attentions) == LAYERS
    assert len(features.hidden_states) == LAYERS + 1 and len(features.attentions) == LAYERS


def test_hierarchical_input_gives_hidden_states_with_its_leading_dims(vit_model):
    pixels = hierarchical_pixels(b=1, s=2, p=1, v=2)
    with torch.no_grad():
        out = vit_model(pixels, output_hidden_states=True, output_attentions=True)
        flat = vit_model(pixels.reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE), output_hidden_states=True)
    assert out.hidden_states[-1].shape == (1, 2, 1, 2, SEQ, HIDDEN)
    assert out.attentions[0].shape == (1, 2, 1, 2, HEADS, SEQ, SEQ)
    torch.testing.assert_close(out.hidden_states[-1].reshape(4, SEQ, HIDDEN), flat.hidden_states[-1])


def test_returned_hidden_states_are_on_the_gradient_path(vit_model):
    out = vit_model(_images(2), output_hidden_states=True, output_attentions=True)
    hidden, attention = out.hidden_states[0], out.attentions[0]
    hidden.retain_grad()
    attention.retain_grad()
    out.image_embeds.flatten()[0].backward()
    assert hidden.grad is not None and attention.grad is not None
    vit_model.zero_grad(set_to_none=True)


def test_selected_hidden_state_layers_are_captured_alone(vit_model):
    with torch.no_grad():
        every = vit_model(_images(2), output_hidden_states=True).hidden_states
        some = vit_model(_images(2), output_hidden_states=[0, 2]).hidden_states
    assert some[1] is None
    torch.testing.assert_close(some[0], every[0])
    torch.testing.assert_close(some[2], every[2])


def test_resnet_tower_gives_its_feature_maps_and_no_attentions():
    model = tiny_hlss_model(resnet_config(), bert_config()).eval()
    with torch.no_grad():
        out = model(_images(2), output_hidden_states=True, output_attentions=True)
        tower = model.vision_model(pixel_values=_images(2), output_hidden_states=True)
    # The stem and one map per stage, [N, C, h, w]; a CNN has no attention maps, as transformers' ResNet says.
    assert [h.shape[:2] for h in out.hidden_states] == [(2, 16), (2, 16), (2, 32)]
    for ours, theirs in zip(out.hidden_states, tower.hidden_states, strict=True):
        torch.testing.assert_close(ours, theirs)
    assert out.attentions is None


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_timm_tower_gives_its_intermediates_and_no_attentions():
    pytest.importorskip("timm")
    model = tiny_hlss_model(timm_config(), bert_config()).eval()
    with torch.no_grad():
        # timm itself refuses `output_attentions`: HLSS does not pass it on, and returns none.
        out = model(_images(2), output_hidden_states=True, output_attentions=True)
    blocks = len(model.vision_model.timm_model.blocks)
    assert len(out.hidden_states) == blocks and out.hidden_states[0].shape[0] == 2
    assert out.attentions is None


# ------------------------------------------------------------------------------------- feature methods (v5)
def test_get_image_features_returns_a_base_model_output_with_pooling(vit_model):
    x = _images()
    with torch.no_grad():
        features = vit_model.get_image_features(x)
        tower = vit_model.vision_model(pixel_values=x)
        embeds = vit_model(x).image_embeds
    assert isinstance(features, BaseModelOutputWithPooling)
    torch.testing.assert_close(features.pooler_output, embeds)  # z, L2-normalised, in the joint space
    torch.testing.assert_close(features.last_hidden_state, tower.last_hidden_state)
    assert features.hidden_states is None and features.attentions is None
    with torch.no_grad():
        asked = vit_model.get_image_features(x, output_hidden_states=True, output_attentions=True)
    assert len(asked.hidden_states) == LAYERS + 1 and len(asked.attentions) == LAYERS


def test_feature_methods_return_tuples_without_return_dict(vit_model):
    x = _images(2)
    ids = tiny_tokenizer()(["a glial tumour", "necrosis"], padding=True, return_tensors="pt")
    with torch.no_grad():
        image = vit_model.get_image_features(x, return_dict=False)
        text = vit_model.get_text_features(**ids, return_dict=False)
        vit_model.config.return_dict = False
        try:
            from_config = vit_model.get_image_features(x)
        finally:
            vit_model.config.return_dict = True
        expected = vit_model.get_image_features(x)
    assert isinstance(image, tuple) and isinstance(text, tuple) and isinstance(from_config, tuple)
    # (last_hidden_state, pooler_output), as `BaseModelOutputWithPooling.to_tuple()`.
    torch.testing.assert_close(image[1], expected.pooler_output)
    torch.testing.assert_close(from_config[1], expected.pooler_output)
    assert text[0].ndim == 3 and text[1].shape == (2, vit_model.config.projection_dim)


def test_get_image_features_keeps_any_leading_dims(vit_model):
    pixels = hierarchical_pixels(b=2, s=1, p=1, v=2)
    with torch.no_grad():
        features = vit_model.get_image_features(pixels)
    assert features.pooler_output.shape == (2, 1, 1, 2, vit_model.config.projection_dim)
    assert features.last_hidden_state.shape == (2, 1, 1, 2, SEQ, HIDDEN)


def test_get_text_features_returns_a_base_model_output_with_pooling(vit_model):
    tokenizer = tiny_tokenizer()
    texts = ["densely packed nuclei", "a glial tumour"]
    ids = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        features = vit_model.get_text_features(**ids, output_hidden_states=True, output_attentions=True)
        tower = vit_model.text_model(**ids)
    assert isinstance(features, BaseModelOutputWithPooling)
    torch.testing.assert_close(features.pooler_output, vit_model.encode_texts(texts, tokenizer))
    torch.testing.assert_close(features.last_hidden_state, tower.last_hidden_state)
    assert features.last_hidden_state.shape == (*ids["input_ids"].shape, HIDDEN)
    assert len(features.hidden_states) == LAYERS + 1 and len(features.attentions) == LAYERS


def test_clip_towers_give_clip_s_projected_features():
    # As CLIPModel.get_image_features / get_text_features in transformers 5, normalised (HLSS's joint space).
    from transformers import CLIPTextModelWithProjection, CLIPVisionModelWithProjection

    model = tiny_hlss_model(clip_vision_config(), clip_text_config(), seed=2).eval()
    vision = CLIPVisionModelWithProjection(clip_vision_config()).eval()
    vision.vision_model.load_state_dict(model.vision_model.state_dict())
    vision.visual_projection.load_state_dict(model.visual_projection.state_dict())
    text = CLIPTextModelWithProjection(clip_text_config()).eval()
    text.load_state_dict(model.text_model.state_dict())
    ids = tiny_tokenizer()(["a glial tumour"], return_tensors="pt")
    x = _images(2)
    with torch.no_grad():
        torch.testing.assert_close(
            model.get_image_features(x).pooler_output,
            F.normalize(vision(pixel_values=x).image_embeds, dim=-1),
        )
        torch.testing.assert_close(
            model.get_text_features(**ids).pooler_output, F.normalize(text(**ids).text_embeds, dim=-1)
        )


# ----------------------------------------------------------------------------------- processor kwargs (v5)
def _rgb(height=32, width=32, seed=0, channels=3):
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, channels), dtype=np.uint8)


@pytest.fixture(scope="module")
def processor():
    return HLSSProcessor(HLSSImageProcessor(modality="he", crop_size=32), tiny_tokenizer())


def test_processor_declares_its_kwargs_the_v5_way():
    assert HLSSProcessor.valid_processor_kwargs is HLSSProcessorKwargs
    assert HLSSProcessorKwargs.__annotations__["images_kwargs"] is HLSSImageProcessorKwargs
    assert {"modality", "antialias", "resize_uint8", "crop_size"} <= set(
        HLSSImageProcessorKwargs.__annotations__
    )
    # Explicit call arguments are the inputs alone, defaulting to None; settings go through the kwargs classes.
    parameters = inspect.signature(HLSSProcessor.__call__).parameters
    explicit = [n for n, p in parameters.items() if n != "self" and p.kind is not p.VAR_KEYWORD]
    assert explicit == ["images", "text"] and all(parameters[n].default is None for n in explicit)


def test_flat_image_kwargs_reach_the_image_processor(processor, tmp_path):
    assert processor(images=_rgb(), crop_size=16)["pixel_values"].shape == (1, 3, 16, 16)
    # Image files reach HLSSImageProcessor as given (a pathlib.Path too), which reads them itself.
    Image.fromarray(_rgb()).save(tmp_path / "patch.png")
    from_file = processor(images=[tmp_path / "patch.png", str(tmp_path / "patch.png")], crop_size=16)
    assert torch.equal(
        from_file["pixel_values"][0], processor(images=_rgb(), crop_size=16)["pixel_values"][0]
    )
    srh = np.random.default_rng(1).integers(0, 2**16, size=(32, 32, 2), dtype=np.uint16)
    torch.testing.assert_close(
        processor(images=srh, modality="srh")["pixel_values"],
        HLSSImageProcessor(modality="srh", crop_size=32)(srh)["pixel_values"],
    )


def test_structured_kwargs_are_merged_with_each_part_s_settings():
    image_processor = HLSSImageProcessor(modality="he", crop_size=32, do_normalize=True, image_mean=0.5)
    processor = HLSSProcessor(image_processor, tiny_tokenizer())
    batch = processor(
        images=_rgb(),
        text=["a glial tumour"],
        images_kwargs={"crop_size": 16},
        text_kwargs={"padding": "max_length", "max_length": 12},
    )
    # do_normalize and image_mean stay the image processor's: only crop_size is overridden.
    torch.testing.assert_close(batch["pixel_values"], image_processor(_rgb(), crop_size=16)["pixel_values"])
    assert batch["pixel_values"].min() < 0
    assert batch["input_ids"].shape == (1, 12)


def test_tokenizer_settings_are_kept_and_the_processor_pads_batches_by_default():
    tokenizer = AutoTokenizer.from_pretrained(MINILM_PATH, max_length=20, padding="max_length")
    processor = HLSSProcessor(HLSSImageProcessor(crop_size=32), tokenizer)
    assert processor(text=["a glial tumour"])["input_ids"].shape == (1, 20)
    batch = HLSSProcessor(HLSSImageProcessor(crop_size=32), tiny_tokenizer())(text=["a", "a glial tumour"])
    assert isinstance(batch["input_ids"], torch.Tensor) and batch["input_ids"].shape[0] == 2


@pytest.mark.parametrize(
    "kwargs",
    [
        {"text_kwargs": {"padding": "do_not_pad"}, "padding": "max_length"},
        {"images_kwargs": {"crop_size": 16}, "crop_size": 8},
    ],
)
def test_a_kwarg_given_flat_and_structured_raises(processor, kwargs):
    with pytest.raises(ValueError, match="passed two times"):
        processor(images=_rgb(), text=["a glial tumour"], **kwargs)


# ------------------------------------------------------------------- image-processor arguments ImagesKwargs declares
def test_do_rescale_and_rescale_factor_apply_to_he_pixels():
    image_processor = HLSSImageProcessor(crop_size=32)
    image = _rgb()
    default = image_processor(image)["pixel_values"]
    unscaled = image_processor(image, do_rescale=False)["pixel_values"]
    assert torch.equal(unscaled, torch.from_numpy(image).permute(2, 0, 1)[None].float())
    torch.testing.assert_close(image_processor(image, rescale_factor=-2 / 255)["pixel_values"], -2 * default)
    # The batch path (a list of channels-last arrays) and the per-image path (channels-first tensors) agree.
    images = [_rgb(seed=s) for s in range(3)]
    tensors = [torch.from_numpy(i).permute(2, 0, 1) for i in images]
    for settings in ({"do_rescale": False}, {"rescale_factor": 0.5}):
        assert torch.equal(
            image_processor(images, **settings)["pixel_values"],
            image_processor(tensors, **settings)["pixel_values"],
        )


def test_srh_without_rescaling_gives_the_raw_counts():
    srh = np.random.default_rng(2).integers(0, 2**16, size=(32, 32, 2), dtype=np.uint16)
    counts = HLSSImageProcessor(modality="srh", crop_size=32)(srh, do_rescale=False)["pixel_values"][0]
    ch2, ch3 = (torch.from_numpy(srh[..., c].astype(np.float64)) for c in (0, 1))
    expected = torch.stack([(ch3 - ch2 + 5000).clamp(0, 65536), ch2, ch3]).float()
    assert torch.equal(counts, expected)


def test_do_convert_rgb_accepts_grey_and_rgba_in_either_layout():
    image_processor = HLSSImageProcessor(crop_size=32)
    rgba = _rgb(channels=4)
    grey = rgba[..., 0]
    rgb_of_rgba = image_processor(rgba[..., :3])["pixel_values"]
    rgb_of_grey = image_processor(np.repeat(grey[..., None], 3, axis=-1))["pixel_values"]
    for image in (rgba, rgba.transpose(2, 0, 1).copy(), torch.from_numpy(rgba), Image.fromarray(rgba)):
        assert torch.equal(image_processor(image)["pixel_values"], rgb_of_rgba)
    for image in (grey, grey[..., None], torch.from_numpy(grey[None]), Image.fromarray(grey)):
        assert torch.equal(image_processor(image)["pixel_values"], rgb_of_grey)


def test_without_do_convert_rgb_the_channels_are_kept_and_normalised_per_channel():
    image_processor = HLSSImageProcessor(crop_size=32, do_convert_rgb=False)
    rgba = [_rgb(channels=4, seed=s) for s in range(2)]
    pixels = image_processor(rgba, do_normalize=True, image_mean=[0.0] * 4, image_std=[0.5] * 4)[
        "pixel_values"
    ]
    assert pixels.shape == (2, 4, 32, 32)
    torch.testing.assert_close(pixels[1, 3], torch.from_numpy(rgba[1][..., 3]).float() / 255 / 0.5)


def test_input_data_format_settles_an_ambiguous_layout():
    image = np.random.default_rng(3).integers(
        0, 256, size=(3, 32, 3), dtype=np.uint8
    )  # (C, H, W) or (H, W, C)?
    first = HLSSImageProcessor(do_center_crop=False)(image, input_data_format="channels_first")[
        "pixel_values"
    ]
    assert first.shape == (1, 3, 32, 3)
    torch.testing.assert_close(first[0], torch.from_numpy(image).float() / 255)
    assert HLSSImageProcessor(do_center_crop=False)(image)["pixel_values"].shape == (1, 3, 3, 32)


def test_data_format_device_and_default_to_square_apply():
    image_processor = HLSSImageProcessor(crop_size=16)
    image = _rgb(40, 24)
    out = image_processor(image, data_format="channels_last", device="cpu")["pixel_values"]
    assert out.shape == (1, 16, 16, 3) and out.device.type == "cpu"
    square = image_processor(image, do_resize=True, size=20, default_to_square=True, do_center_crop=False)
    assert square["pixel_values"].shape == (1, 3, 20, 20)
    assert HLSSImageProcessor(do_resize=True, size=20, default_to_square=True).size == {
        "height": 20,
        "width": 20,
    }


def test_every_declared_images_kwarg_is_accepted_and_padding_is_refused_by_name():
    image_processor = HLSSImageProcessor(crop_size=16)
    neutral = {"do_pad": False, "pad_size": None, "disable_grouping": True, "image_seq_length": 4}
    assert image_processor(_rgb(), **neutral)["pixel_values"].shape == (1, 3, 16, 16)
    declared = set(HLSSImageProcessorKwargs.__annotations__) - {"return_tensors"}
    assert declared <= set(inspect.signature(HLSSImageProcessor.preprocess).parameters)
    with pytest.raises(ValueError, match="do_pad=True"):
        image_processor(_rgb(), do_pad=True)


def test_new_image_settings_round_trip_and_older_configs_get_the_defaults(tmp_path):
    import hlss_hf  # noqa: F401 - registers AutoImageProcessor

    saved = HLSSImageProcessor(crop_size=16, do_rescale=False, rescale_factor=0.5, do_convert_rgb=False)
    saved.save_pretrained(tmp_path)
    loaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert (loaded.do_rescale, loaded.rescale_factor, loaded.do_convert_rgb) == (False, 0.5, False)
    # A processor saved before these settings existed: its config lacks them.
    config = tmp_path / "preprocessor_config.json"
    import json

    data = json.loads(config.read_text())
    for key in ("do_rescale", "rescale_factor", "do_convert_rgb", "default_to_square"):
        data.pop(key)
    config.write_text(json.dumps(data))
    older = AutoImageProcessor.from_pretrained(tmp_path)
    assert torch.equal(
        older(_rgb())["pixel_values"], HLSSImageProcessor(crop_size=16)(_rgb())["pixel_values"]
    )


# -------------------------------------------------------------------------------------------- initialisation
def _strip(folder, prefixes):
    path = os.path.join(folder, "model.safetensors")
    state = {k: v for k, v in load_file(path).items() if not k.startswith(prefixes)}
    save_file(state, path, metadata={"format": "pt"})


def test_missing_tower_weights_get_the_tower_s_own_initialisation(tmp_path):
    model = tiny_hlss_model(clip_vision_config(), clip_text_config())
    model.save_pretrained(tmp_path)
    _strip(tmp_path, ("vision_model.", "text_model."))
    loaded, info = HLSSModel.from_pretrained(tmp_path, output_loading_info=True)
    assert any(k.startswith("vision_model.") for k in info["missing_keys"])
    # CLIP's own scheme (CLIPPreTrainedModel._init_weights), not HLSS's N(0, 0.02) for its new layers.
    fc_std = (2 * HIDDEN) ** -0.5  # 0.125
    q_std = HIDDEN**-0.5 * (2 * LAYERS) ** -0.5  # 0.088
    for tower in (loaded.vision_model, loaded.text_model):
        layer = next(m for name, m in tower.named_modules() if name.endswith("layers.0"))
        assert abs(float(layer.mlp.fc1.weight.std()) - fc_std) < 0.15 * fc_std
        assert abs(float(layer.self_attn.q_proj.weight.std()) - q_std) < 0.15 * q_std
    # What the checkpoint holds is loaded, not re-initialised.
    assert torch.equal(loaded.heads["patch"].weight, model.heads["patch"].weight)
    assert torch.equal(loaded.bank_slide, model.bank_slide)


def test_banks_of_a_model_built_from_its_config_are_zero_whatever_the_seed():
    config = tiny_hlss_model(vit_config(), bert_config()).config
    built = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        built.append(HLSSModel(config))
    with torch.device("meta"):
        on_meta = HLSSModel(config)
    on_meta.to_empty(device="cpu")
    on_meta.init_weights()
    for level in ("patch", "slide", "patient"):
        banks = [getattr(m, f"bank_{level}") for m in (*built, on_meta)]
        assert all(torch.count_nonzero(bank) == 0 for bank in banks)
        # Until banks are built the heads are plain linear layers, not zero (zero would score every attribute 0).
        assert built[0].heads[level].weight.abs().sum() > 0


def test_a_checkpoint_without_banks_is_an_error_not_random_banks(tmp_path):
    tiny_hlss_model(vit_config(), bert_config()).save_pretrained(tmp_path)
    _strip(tmp_path, ("bank_",))
    for load in (HLSSModel.from_pretrained, AutoModel.from_pretrained):
        with pytest.raises(
            ValueError, match=r"no attribute banks \['bank_patch', 'bank_patient', 'bank_slide'\]"
        ):
            load(tmp_path)
    # The classifier never uses the banks: it still loads from that folder.
    assert (
        type(HLSSForImageClassification.from_pretrained(tmp_path, num_labels=2)) is HLSSForImageClassification
    )
