"""HLSS towers: building, loading and pooling the vision and text towers, open_clip towers as transformers models,
text tokenizers, and the body of `HLSSModel.from_vision_text_pretrained` (docs/method.md). timm and open_clip
(``pip install 'hlss_hf[reference]'``) are imported by name when a tower needs them (`_require`).
"""

from __future__ import annotations

import copy
import gzip
import importlib
import importlib.util
import json
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from huggingface_hub import hf_hub_download
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoTokenizer,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
    PreTrainedConfig,
    PreTrainedModel,
    TimmWrapperForImageClassification,
    TimmWrapperModel,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import ModelOutput

from .attributes_hlss import load_attributes
from .configuration_hlss import (
    HLSSConfig,
    OpenCLIPTextConfig,
    OpenCLIPVisionConfig,
    _resolve_sub_config,
    vision_output_dim,
)

__all__ = [
    "OpenCLIPTextModel",
    "OpenCLIPVisionModel",
    "build_from_towers",
    "load_text_tokenizer",
    "load_tower",
    "open_clip_tokenizer",
    "resolve_tower_spec",
]


# The open_clip id schemas (open_clip's own): a Hub repository holding `open_clip_config.json` + weights, or a folder.
OPEN_CLIP_SCHEMAS = ("hf-hub:", "local-dir:")
_EXTRA_HINT = "pip install 'hlss_hf[reference]' (timm and open_clip_torch)"


def _require(module: str, package: str, needed_for: str):
    """Import an optional dependency, or fail naming the package and the extra that installs it."""
    # importlib (not an import statement): transformers refuses remote code whose import statements name a package
    # that is not installed, and these are needed only by the towers that use them.
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"{needed_for} needs the `{package}` package, which is not installed: pip install '{package}', or "
            f"{_EXTRA_HINT}"
        ) from err


def _is_open_clip_id(source) -> bool:
    return isinstance(source, str) and source.startswith(OPEN_CLIP_SCHEMAS)


@dataclass
class OpenCLIPTextOutput(ModelOutput):
    """Output of `OpenCLIPTextModel.forward`: `text_embeds` ``[T, embed_dim]``, open_clip's `encode_text` (pooled,
    projected, not normalised)."""

    text_embeds: torch.FloatTensor | None = None


class OpenCLIPTextModel(PreTrainedModel):
    """An open_clip text tower (`TextTransformer` with its projection) as a transformers model.

    Built from `OpenCLIPTextConfig` (open_clip's `text_cfg`), so a saved HLSS model rebuilds it from `config.json` and
    loads its weights from `model.safetensors` (keys `text.*`, open_clip's own names). Needs `open_clip_torch`.

    Example:
        >>> tower = HLSSModel.from_vision_text_pretrained(
        ...     "timm/resnet50_clip.cc12m", "hf-hub:timm/resnet50_clip.cc12m", attributes="he_tcga").text_model
    """

    config_class = OpenCLIPTextConfig
    base_model_prefix = "open_clip_text"
    main_input_name = "input_ids"

    def __init__(self, config: OpenCLIPTextConfig):
        super().__init__(config)
        open_clip_model = _require("open_clip.model", "open_clip_torch", "an open_clip text tower")
        # open_clip's own tower builder (the one its CLIP classes call), so every text_cfg option means the same.
        self.text = open_clip_model._build_text_tower(config.embed_dim, config.text_cfg, config.quick_gelu)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module):
        """open_clip initialises its layers when built; only the causal mask is rebuilt here.

        The mask is a non-persistent buffer, so no checkpoint holds it, and `from_pretrained` builds the tower on
        the meta device and leaves such buffers uninitialised.
        """
        if getattr(module, "attn_mask", None) is not None and hasattr(module, "build_causal_mask"):
            module.attn_mask = module.build_causal_mask().to(module.attn_mask.device)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        """Embed CLIP BPE ids ``[T, L <= context_length]`` as open_clip does: padding (``attention_mask == 0``)
        becomes open_clip's `pad_id`, and the ids are padded to `context_length` as open_clip's tokenizer does."""
        length = int(self.config.text_cfg.get("context_length", 77))
        pad_id = int(self.config.text_cfg.get("pad_id", 0))
        if input_ids.shape[-1] > length:
            raise ValueError(
                f"`input_ids` has {input_ids.shape[-1]} tokens; this open_clip text tower takes at most {length}"
            )
        if attention_mask is not None:
            input_ids = input_ids.masked_fill(attention_mask == 0, pad_id)
        input_ids = F.pad(input_ids, (0, length - input_ids.shape[-1]), value=pad_id)
        return OpenCLIPTextOutput(text_embeds=self.text(input_ids))


class OpenCLIPVisionModel(PreTrainedModel):
    """An open_clip image tower (ModifiedResNet, VisionTransformer, timm trunk) as a transformers model.

    Its output is already in the CLIP joint space (attention pool / projection included), so `HLSSModel` needs no
    `visual_projection` when its text tower is the same checkpoint's. Needs `open_clip_torch`.
    Output: `BaseModelOutputWithPooling.pooler_output` ``[N, embed_dim]`` (open_clip's `encode_image`).
    """

    config_class = OpenCLIPVisionConfig
    base_model_prefix = "open_clip_vision"
    main_input_name = "pixel_values"
    input_modalities = ("image",)

    def __init__(self, config: OpenCLIPVisionConfig):
        super().__init__(config)
        open_clip_model = _require("open_clip.model", "open_clip_torch", "an open_clip image tower")
        self.visual = open_clip_model._build_vision_tower(
            config.embed_dim, config.vision_cfg, config.quick_gelu
        )
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module):
        """Nothing: open_clip initialises its layers when built and checkpoints hold every image tower tensor."""

    def forward(self, pixel_values: torch.Tensor, **kwargs):
        """Embed images: `pixel_values` ``[N, 3, H, W]`` -> `pooler_output` ``[N, embed_dim]``."""
        return BaseModelOutputWithPooling(pooler_output=self.visual(pixel_values))


def _build_vision_tower(vision_config: PreTrainedConfig, keep_head: bool = False) -> PreTrainedModel:
    # CLIPVisionConfig maps to CLIPVisionModel in AutoModel too; explicit so older releases agree.
    if vision_config.model_type == "clip_vision_model":
        return CLIPVisionModel(vision_config)
    if vision_config.model_type == OpenCLIPVisionConfig.model_type:
        return OpenCLIPVisionModel(vision_config)
    if vision_config.model_type == "timm_wrapper":
        _require("timm", "timm", f"the timm vision tower {vision_config.architecture!r}")
        # A kept head is the tower's last layer: timm's CLIP towers keep their image projection there.
        return (TimmWrapperForImageClassification if keep_head else TimmWrapperModel)(vision_config)
    return AutoModel.from_config(vision_config)


def _build_text_tower(text_config: PreTrainedConfig) -> PreTrainedModel:
    # CLIP text keeps its pretrained projection: the joint space is the space after it.
    if text_config.model_type == "clip_text_model":
        return CLIPTextModelWithProjection(text_config)
    if text_config.model_type == OpenCLIPTextConfig.model_type:
        return OpenCLIPTextModel(text_config)
    return AutoModel.from_config(text_config)


def _vision_tower_dim(tower: PreTrainedModel, vision_config: PreTrainedConfig) -> int:
    """Size of what `_pool_vision` returns for this tower."""
    timm_model = getattr(tower, "timm_model", None)
    if timm_model is not None:
        # A kept head outputs `num_classes`; without one timm returns its pre-logits features.
        return int(
            timm_model.num_classes or getattr(timm_model, "head_hidden_size", 0) or timm_model.num_features
        )
    return vision_output_dim(vision_config)


def _visual_projection(config: HLSSConfig, tower: PreTrainedModel) -> nn.Module:
    """A new linear map into the joint space, or an identity for a tower that already outputs it."""
    dim = _vision_tower_dim(tower, config.vision_config)
    if config.use_visual_projection:
        return nn.Linear(dim, config.projection_dim, bias=False)
    if isinstance(tower, TimmWrapperModel):
        raise ValueError(
            "use_visual_projection=False: the timm tower must keep its head (the CLIP image projection); "
            "pass a TimmWrapperForImageClassification, a Hub id or a config instead of a TimmWrapperModel"
        )
    if dim != config.projection_dim:
        raise ValueError(
            f"use_visual_projection=False needs a vision tower that outputs the joint space, but "
            f"{config.vision_config.model_type} outputs {dim} dims and the joint space has {config.projection_dim}"
        )
    return nn.Identity()


def _pool_vision(outputs) -> torch.Tensor:
    """Pooled vision features ``[N, C]`` from any backbone's output."""
    logits = getattr(outputs, "logits", None)
    if logits is not None:
        return logits.flatten(1)  # a kept timm head: for CLIP towers, the image projection
    pooled = getattr(outputs, "pooler_output", None)
    if pooled is None:
        hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
        # Token towers: the CLS token; feature maps [N, C, H, W]: global average.
        pooled = hidden[:, 0] if hidden.dim() == 3 else hidden.flatten(2).mean(-1)
    # CNN poolers give [N, C, 1, 1].
    return pooled.flatten(1)


def _tower_output_switches(tower: nn.Module, output_hidden_states, output_attentions: bool) -> dict:
    """The keyword arguments asking a tower for its hidden states / attention maps (only those asked for).

    A tower without them returns none, as transformers' CNNs do: a ResNet ignores `output_attentions`, open_clip
    towers both switches; timm towers refuse `output_attentions`, so it is not passed to them.
    """
    switches = {}
    if output_hidden_states:
        switches["output_hidden_states"] = output_hidden_states  # True, or the indices of the layers to keep
    if output_attentions and not isinstance(tower, (TimmWrapperModel, TimmWrapperForImageClassification)):
        switches["output_attentions"] = True
    return switches


def _with_leading_dims(values, lead: tuple):
    """Reshape a tensor (or each tensor of a tuple) ``[M, ...]`` to ``[*lead, ...]``; `None` stays `None`.

    A flat batch (``lead == (M,)``) gets the tower's own tensors back, not views: `retain_grad` on them then sees
    the gradient of the outputs computed from them.
    """
    if values is None:
        return None
    if isinstance(values, torch.Tensor):
        return values if tuple(lead) == tuple(values.shape[:1]) else values.reshape(*lead, *values.shape[1:])
    return tuple(_with_leading_dims(value, lead) for value in values)


def _tower_output(outputs, name: str, asked):
    """`outputs.<name>` (hidden_states / attentions) where asked for, else `None`."""
    return getattr(outputs, name, None) if asked else None


def resolve_tower_spec(spec, role: str = "text"):
    """A tower as the config names it, made loadable: ``pkg:<package>`` -> that installed package's ``model`` folder
    (docs/method.md, towers without a download), a mapping with ``model_type`` -> its config (random init);
    anything else (Hub id, folder, open_clip id, config, model) unchanged. `role` (vision / text) names it in errors.
    """
    if isinstance(spec, dict):
        fields = dict(spec)
        if "model_type" not in fields:
            raise ValueError(
                f"a {role} tower given as a mapping needs `model_type`, got keys {sorted(fields)}"
            )
        return AutoConfig.for_model(fields.pop("model_type"), **fields)
    if isinstance(spec, str) and spec.startswith("pkg:"):
        module_name = spec[len("pkg:") :]
        if importlib.util.find_spec(module_name) is None:
            raise ImportError(
                f"{role} tower {spec!r}: package {module_name!r} is not installed "
                f"(pip install {module_name.replace('_', '-')})"
            )
        folder = os.path.join(os.path.dirname(importlib.import_module(module_name).__file__), "model")
        if not os.path.isdir(folder):
            raise ValueError(f"{role} tower {spec!r}: package {module_name!r} has no `model` folder")
        return folder
    return spec


def _tower_config(source: str) -> PreTrainedConfig:
    """`AutoConfig.from_pretrained`, naming the extra to install when the tower's library is missing (timm)."""
    try:
        return AutoConfig.from_pretrained(source)
    except ImportError as err:
        raise ImportError(f"{source!r}: {err}\nInstall the towers' libraries with {_EXTRA_HINT}") from err


def _checkpoint_key(source) -> str | None:
    """Where a tower string points, with the open_clip schema removed, for telling two towers share a checkpoint."""
    if not isinstance(source, (str, os.PathLike)):
        return None
    source = os.fspath(source)
    if source.startswith("hf-hub:"):
        source = source[len("hf-hub:") :]
    elif source.startswith("local-dir:"):
        source = os.path.abspath(source[len("local-dir:") :])
    elif os.path.isdir(source):
        source = os.path.abspath(source)
    return source.rstrip("/")


def _same_open_clip_checkpoint(vision, text) -> bool:
    """Both towers from one open_clip checkpoint (one of them named with an open_clip schema)."""
    if not (_is_open_clip_id(vision) or _is_open_clip_id(text)):
        return False
    return _checkpoint_key(vision) is not None and _checkpoint_key(vision) == _checkpoint_key(text)


def _open_clip_model_cfg(source: str) -> dict:
    """The `model_cfg` of an open_clip checkpoint's `open_clip_config.json` (``hf-hub:`` or ``local-dir:`` id)."""
    if source.startswith("local-dir:"):
        path = os.path.join(source[len("local-dir:") :], "open_clip_config.json")
        if not os.path.isfile(path):
            raise ValueError(f"{source!r}: no open_clip_config.json in that folder")
    else:
        path = hf_hub_download(source[len("hf-hub:") :], "open_clip_config.json")
    with open(path, encoding="utf-8") as handle:
        model_cfg = json.load(handle).get("model_cfg")
    if not isinstance(model_cfg, dict) or "embed_dim" not in model_cfg:
        raise ValueError(f"{source!r}: open_clip_config.json has no `model_cfg` with `embed_dim`")
    return model_cfg


def _open_clip_tower_config(source: str, key: str) -> PreTrainedConfig:
    model_cfg = _open_clip_model_cfg(source)
    common = dict(
        embed_dim=model_cfg["embed_dim"],
        quick_gelu=model_cfg.get("quick_gelu", False),
        open_clip_model_name=source,
    )
    if key == "vision_config":
        return OpenCLIPVisionConfig(vision_cfg=model_cfg.get("vision_cfg", {}), **common)
    return OpenCLIPTextConfig(text_cfg=model_cfg.get("text_cfg", {}), **common)


def _load_open_clip_tower(source: str, key: str) -> PreTrainedModel:
    """One tower of an open_clip checkpoint, with its pretrained weights, loaded by open_clip itself."""
    open_clip = _require("open_clip", "open_clip_torch", f"the open_clip tower {source!r}")
    config = _open_clip_tower_config(source, key)  # validates the tower before the download
    full = open_clip.create_model(source, device="cpu")
    if key == "vision_config":
        tower = OpenCLIPVisionModel(config)
        tower.visual.load_state_dict(full.visual.state_dict())
    else:
        tower = OpenCLIPTextModel(config)
        if hasattr(full, "text"):  # CustomTextCLIP keeps the text tower as a module
            state = full.text.state_dict()
        else:  # CLIP spreads its text tower over its own attributes, under the tower's names
            skip = ("visual.", "logit_scale", "logit_bias")
            state = {k: v for k, v in full.state_dict().items() if not k.startswith(skip)}
        tower.text.load_state_dict(state)
    return tower.eval()


def open_clip_tokenizer(text_config: OpenCLIPTextConfig) -> CLIPTokenizer:
    """open_clip's CLIP BPE tokenizer as a transformers `CLIPTokenizer` (saved with the processor, loads anywhere).

    Built offline from the BPE merges open_clip ships; with ``padding="max_length"`` and the tower's context length
    its ids equal `open_clip.get_tokenizer(...)` ones wherever the attention mask is 1 (`OpenCLIPTextModel` puts
    open_clip's `pad_id` at the masked positions). The tokenizer pads with ``<|endoftext|>``; its
    `model_max_length` is the tower's context length.
    """
    text_cfg = text_config.text_cfg
    vocab_size = int(text_cfg.get("vocab_size", 49408))
    clean = (text_cfg.get("tokenizer_kwargs") or {}).get("clean", "lower")
    if vocab_size != 49408 or clean != "lower":
        raise ValueError(
            f"{text_config.open_clip_model_name or 'open_clip text tower'}: only the CLIP BPE tokenizer "
            f"(vocab_size 49408, lower-case cleaning) converts; got vocab_size {vocab_size}, clean {clean!r}"
        )
    tokenizer_module = _require("open_clip.tokenizer", "open_clip_torch", "the open_clip tokenizer")
    with gzip.open(tokenizer_module.default_bpe(), "rt", encoding="utf-8") as handle:
        # open_clip's SimpleTokenizer reads the same merges: a header line, then 49152 - 256 - 2 merges.
        merges = [tuple(line.split()) for line in handle.read().split("\n")[1 : 49152 - 256 - 2 + 1]]
    chars = list(tokenizer_module.bytes_to_unicode().values())
    vocab = [
        *chars,
        *(c + "</w>" for c in chars),
        *("".join(m) for m in merges),
        "<|startoftext|>",
        "<|endoftext|>",
    ]
    return CLIPTokenizer(
        vocab={token: i for i, token in enumerate(vocab)},
        merges=merges,
        model_max_length=int(text_cfg.get("context_length", 77)),
    )


def load_text_tokenizer(text):
    """The tokenizer of a text tower given as `from_vision_text_pretrained` takes it: a Hub id / folder
    (`AutoTokenizer`), an open_clip id or an open_clip text tower or its config (`open_clip_tokenizer`)."""
    if isinstance(text, OpenCLIPTextModel):
        text = text.config
    if isinstance(text, OpenCLIPTextConfig):
        return open_clip_tokenizer(text)
    text = resolve_tower_spec(text, "text")
    if _is_open_clip_id(text):
        return open_clip_tokenizer(_open_clip_tower_config(text, "text_config"))
    if isinstance(text, (str, os.PathLike)):
        return AutoTokenizer.from_pretrained(os.fspath(text))
    raise ValueError(f"no tokenizer can be loaded for a text tower given as {type(text)}; pass `tokenizer`")


def load_tower(source, key: str, reuse_projection: bool = False, keep_head: bool = False):
    """Return ``(tower, clip_visual_projection or None)`` from a path / id, a config or a model."""
    if isinstance(source, PreTrainedModel):
        return source, None
    if isinstance(source, PreTrainedConfig):
        config = _resolve_sub_config(key, source, "vit" if key == "vision_config" else "bert")
        if key == "vision_config":
            return _build_vision_tower(config, keep_head=keep_head), None
        return _build_text_tower(config), None
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(
            f"`{key.split('_')[0]}` must be a Hub id, a folder, a config or a model, got {type(source)}"
        )
    source = os.fspath(source)
    if _is_open_clip_id(source):
        return _load_open_clip_tower(source, key), None
    model_type = _tower_config(source).model_type
    if key == "vision_config":
        if model_type == "clip":
            full = CLIPVisionModelWithProjection.from_pretrained(source)
            return full.vision_model, (full.visual_projection if reuse_projection else None)
        if model_type == "timm_wrapper":
            _require("timm", "timm", f"the timm vision tower {source!r}")
            timm_class = TimmWrapperForImageClassification if keep_head else TimmWrapperModel
            return timm_class.from_pretrained(source), None
        return AutoModel.from_pretrained(source), None
    if model_type in ("clip", "clip_text_model"):
        return CLIPTextModelWithProjection.from_pretrained(source), None
    return AutoModel.from_pretrained(source), None


def build_from_towers(cls, vision, text, attributes, tokenizer=None, batch_size: int = 64, **config_kwargs):
    """`cls.from_vision_text_pretrained` (`HLSSModel`, whose docstring gives the arguments): load both towers,
    build the config and the model, and its attribute banks."""
    attributes = load_attributes(attributes)
    # What train.py's config accepts works here too: `pkg:<package>` towers and config mappings.
    vision_spec, text_spec = vision, text
    vision, text = resolve_tower_spec(vision, "vision"), resolve_tower_spec(text, "text")
    same_clip = isinstance(vision, str) and isinstance(text, str) and vision == text
    same_clip = same_clip and not _is_open_clip_id(vision)
    same_clip = same_clip and _tower_config(vision).model_type == "clip"
    if config_kwargs.get("use_visual_projection") is None:  # None or absent: decided by the towers
        config_kwargs["use_visual_projection"] = not _same_open_clip_checkpoint(vision, text)
    keep_head = not config_kwargs["use_visual_projection"]

    vision_model, clip_projection = load_tower(
        vision, "vision_config", reuse_projection=same_clip, keep_head=keep_head
    )
    text_model, _ = load_tower(text, "text_config")
    if isinstance(vision_spec, str):
        config_kwargs.setdefault("vision_model_name_or_path", vision_spec)
    if isinstance(text_spec, str):
        config_kwargs.setdefault("text_model_name_or_path", text_spec)
    # Copies: building the composite config resets its sub-configs' attention implementation, and the
    # towers must keep theirs (the model re-attaches the towers' own configs).
    config = HLSSConfig(
        vision_config=copy.deepcopy(vision_model.config),
        text_config=copy.deepcopy(text_model.config),
        attribute_names={level: list(bank) for level, bank in attributes.items()},
        **config_kwargs,
    )
    model = cls(config, vision_model=vision_model, text_model=text_model)
    if (
        clip_projection is not None
        and isinstance(model.visual_projection, nn.Linear)
        and clip_projection.weight.shape == model.visual_projection.weight.shape
    ):
        model.visual_projection.weight.data.copy_(clip_projection.weight.data)
    if tokenizer is None:
        if isinstance(text_model, OpenCLIPTextModel):
            tokenizer = open_clip_tokenizer(text_model.config)
        elif isinstance(text, str):
            tokenizer = load_text_tokenizer(text)
        else:
            raise ValueError("`tokenizer` is required when `text` is a config or a model instance")
    model.build_attribute_banks(attributes, tokenizer, batch_size=batch_size)
    return model
