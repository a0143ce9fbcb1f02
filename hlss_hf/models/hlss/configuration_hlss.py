"""HLSS configuration (docs/method.md); remote code that imports only transformers."""

from __future__ import annotations

import math
import numbers

from transformers import AutoConfig, PreTrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

try:
    from transformers.configuration_utils import SubConfigSpec
except ImportError:  # releases before sub-config specs: the plain `sub_configs` mapping is used instead
    SubConfigSpec = None

LEVELS = ("patch", "slide", "patient")
TEXT_POOLINGS = ("pooler", "cls", "mean")
MODALITIES = ("he", "srh")

ALIGNMENT_REDUCTIONS = ("mean", "sum")

# Text towers whose pretrained projection defines the joint space (their `projection_dim`).
_PROJECTED_TEXT_TYPES = ("clip_text_model", "hlss_open_clip_text")


def _open_clip_tower_cfg(key: str, cfg, model_name) -> dict:
    if not isinstance(cfg, dict):
        raise ValueError(f"`{key}` must be a dict of open_clip tower settings, got {type(cfg)}")
    cfg = dict(cfg)
    for name in ("hf_model_name", "hf_tokenizer_name"):
        if cfg.get(name):
            # open_clip's Hugging Face text towers fetch their config from the Hub whenever they are built.
            raise ValueError(
                f"{model_name or 'open_clip model'}: `{key}.{name}`={cfg[name]!r} is an open_clip tower wrapping a "
                "transformers model; use that transformers model as the tower instead"
            )
    # Saved towers hold their weights: never let open_clip download base weights when rebuilding one.
    if "timm_model_name" in cfg:
        cfg["timm_model_pretrained"] = False
    cfg["output_tokens"] = False
    return cfg


class _OpenCLIPTowerConfig(PreTrainedConfig):
    """What the open_clip tower configs share.

    Args:
        embed_dim (`int`, defaults to 1024): the CLIP joint space size (the tower's output, after its projection).
        quick_gelu (`bool`, defaults to False): the checkpoint's `quick_gelu` (OpenAI-style weights need True).
        open_clip_model_name (`str`, *optional*): where the tower came from (provenance).
    """

    def _set_tower(self, key: str, embed_dim: int, cfg: dict | None, quick_gelu: bool, model_name) -> None:
        if not isinstance(embed_dim, int) or isinstance(embed_dim, bool) or embed_dim <= 0:
            raise ValueError(f"`embed_dim` must be a positive int, got {embed_dim!r}")
        self.embed_dim = embed_dim
        setattr(self, key, _open_clip_tower_cfg(key, cfg or {}, model_name))
        self.quick_gelu = bool(quick_gelu)
        self.open_clip_model_name = model_name

    @property
    def projection_dim(self) -> int:
        """The joint space size (`embed_dim`)."""
        return self.embed_dim


class OpenCLIPTextConfig(_OpenCLIPTowerConfig):
    r"""Configuration of an open_clip text tower used as the HLSS text tower (`OpenCLIPTextModel`).

    Args:
        text_cfg (`dict`, *optional*): open_clip's `text_cfg` (`context_length`, `vocab_size`, `width`, `heads`,
            `layers`, ...), as in the checkpoint's `open_clip_config.json`. Defaults to open_clip's defaults.
        embed_dim, quick_gelu, open_clip_model_name: as in `_OpenCLIPTowerConfig`.
    """

    model_type = "hlss_open_clip_text"

    def __init__(
        self,
        embed_dim: int = 1024,
        text_cfg: dict | None = None,
        quick_gelu: bool = False,
        open_clip_model_name: str | None = None,
        **kwargs,
    ):
        self._set_tower("text_cfg", embed_dim, text_cfg, quick_gelu, open_clip_model_name)
        super().__init__(**kwargs)


class OpenCLIPVisionConfig(_OpenCLIPTowerConfig):
    r"""Configuration of an open_clip image tower used as the HLSS vision tower (`OpenCLIPVisionModel`).

    Its output is already in the CLIP joint space of size `embed_dim` (attention pool / projection included).

    Args:
        vision_cfg (`dict`, *optional*): open_clip's `vision_cfg` (`image_size`, `layers`, `width`,
            `patch_size`, ...), as in the checkpoint's `open_clip_config.json`.
        embed_dim, quick_gelu, open_clip_model_name: as in `_OpenCLIPTowerConfig`.
    """

    model_type = "hlss_open_clip_vision"

    def __init__(
        self,
        embed_dim: int = 1024,
        vision_cfg: dict | None = None,
        quick_gelu: bool = False,
        open_clip_model_name: str | None = None,
        **kwargs,
    ):
        self._set_tower("vision_cfg", embed_dim, vision_cfg, quick_gelu, open_clip_model_name)
        super().__init__(**kwargs)

    @property
    def image_size(self):
        """The tower's pretraining image size (open_clip's `vision_cfg.image_size`, 224 by default)."""
        return self.vision_cfg.get("image_size", 224)


# Registered so that a saved HLSS config (a dict with `model_type`) rebuilds these towers, also as remote code.
AutoConfig.register(OpenCLIPTextConfig.model_type, OpenCLIPTextConfig, exist_ok=True)
AutoConfig.register(OpenCLIPVisionConfig.model_type, OpenCLIPVisionConfig, exist_ok=True)


def _resolve_sub_config(key: str, value, default_type: str) -> PreTrainedConfig:
    """Turn ``None`` / a dict with ``model_type`` / a config (or a full CLIP-like config) into one tower config."""
    if value is None:
        return CONFIG_MAPPING[default_type]()
    if isinstance(value, dict):
        model_type = value.get("model_type")
        if not model_type:
            raise ValueError(f"`{key}` given as a dict needs a `model_type` entry (e.g. 'vit', 'bert')")
        if model_type not in CONFIG_MAPPING:
            raise ValueError(f"`{key}`: unknown model_type {model_type!r}")
        if model_type == "timm_wrapper":
            # Its `to_dict` stores the head size as `num_classes`; only `from_dict` maps it back to `num_labels`.
            value = CONFIG_MAPPING[model_type].from_dict(value)
        else:
            value = CONFIG_MAPPING[model_type](**{k: v for k, v in value.items() if k != "model_type"})
    if not isinstance(value, PreTrainedConfig):
        raise ValueError(
            f"`{key}` must be a transformers config, a dict with `model_type`, or None; got {type(value)}"
        )
    # A dual-tower config (e.g. CLIPConfig): take the matching tower, keeping the shared projection size.
    nested = getattr(value, key, None)
    if isinstance(nested, PreTrainedConfig):
        shared_dim = getattr(value, "projection_dim", None)
        if shared_dim is not None and hasattr(nested, "projection_dim"):
            nested.projection_dim = shared_dim
        value = nested
    return value


def text_output_dim(text_config: PreTrainedConfig) -> int:
    """Size of the text tower's output space, the HLSS joint space: the pretrained projection size for projected
    towers (CLIP text), else the hidden size."""
    if text_config.model_type in _PROJECTED_TEXT_TYPES and getattr(text_config, "projection_dim", None):
        return int(text_config.projection_dim)
    return int(text_config.hidden_size)


def vision_output_dim(vision_config: PreTrainedConfig) -> int:
    """Size of the vision tower's pooled output: ``hidden_sizes[-1]`` for CNNs (ResNet, ConvNeXt), ``num_features``
    for timm wrappers, ``embed_dim`` for open_clip image towers, else ``hidden_size`` (ViT, CLIP vision, DINOv2)."""
    if vision_config.model_type == OpenCLIPVisionConfig.model_type:
        return int(vision_config.embed_dim)
    sizes = getattr(vision_config, "hidden_sizes", None)
    if isinstance(sizes, (list, tuple)) and sizes:
        return int(sizes[-1])
    for name in ("num_features", "hidden_size"):
        value = getattr(vision_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError(f"`vision_config` ({vision_config.model_type}): cannot tell the pooled output size")


def _check_number(name: str, value, *, positive: bool, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = value > 0 if positive else value >= 0
    if not ok:
        need = "a finite number > 0" if positive else "a finite number >= 0"
        raise ValueError(f"`{name}` must be {need}{' or None' if allow_none else ''}, got {value!r}")


def _check_attribute_names(attribute_names) -> dict[str, list[str]]:
    if attribute_names is None:
        return {level: [] for level in LEVELS}
    if not isinstance(attribute_names, dict):
        raise ValueError(
            f"`attribute_names` must be a dict level -> list of names, got {type(attribute_names)}"
        )
    unknown = sorted(set(attribute_names) - set(LEVELS))
    if unknown:
        raise ValueError(f"`attribute_names` has unknown level(s) {unknown}; levels are {list(LEVELS)}")
    checked = {}
    for level in LEVELS:
        names = attribute_names.get(level, [])
        if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) and n for n in names):
            raise ValueError(
                f"`attribute_names['{level}']` must be a list of non-empty strings, got {names!r}"
            )
        duplicates = sorted({n for n in names if list(names).count(n) > 1})
        if duplicates:
            raise ValueError(f"`attribute_names['{level}']` repeats {duplicates}")
        checked[level] = list(names)
    return checked


#: How the language-tied heads start (`HLSSConfig.head_init`).
HEAD_INITS = ("text", "text_centered")


def _check_class_prompts(class_prompts) -> dict[str, list[str]] | None:
    if class_prompts is None:
        return None
    if not isinstance(class_prompts, dict) or not class_prompts:
        raise ValueError(
            f"`class_prompts` must map class names to lists of descriptions, got {class_prompts!r}"
        )
    checked = {}
    for name, prompts in class_prompts.items():
        if (
            not isinstance(prompts, list | tuple)
            or not prompts
            or not all(isinstance(p, str) and p.strip() for p in prompts)
        ):
            raise ValueError(
                f"`class_prompts[{name!r}]` must be a non-empty list of non-empty strings, got {prompts!r}"
            )
        checked[str(name)] = [str(p) for p in prompts]
    return checked


class HLSSConfig(PreTrainedConfig):
    r"""Configuration of an HLSS model: a vision tower, a frozen text tower, attribute banks and loss settings.

    Args:
        vision_config (`PreTrainedConfig` or `dict`, *optional*): vision tower config (CLIP vision, ViT, ResNet,
            ConvNeXt, DINOv2, timm through `TimmWrapperConfig`, open_clip through `OpenCLIPVisionConfig`, ...); a
            dict needs `model_type`; a full CLIP config gives its `vision_config`. Defaults to a ViT config.
        text_config (`PreTrainedConfig` or `dict`, *optional*): text tower config (CLIP text, BERT, MiniLM,
            open_clip through `OpenCLIPTextConfig`, ...); a full CLIP config gives its `text_config`. Defaults to a
            BERT config.
        projection_dim (`int`, *optional*): joint space size D; must equal the text tower's output size (its
            `projection_dim` for CLIP text, else `hidden_size`). Derived when None.
        attribute_names (`dict[str, list[str]]`, *optional*): attribute names per level
            (`"patch"`, `"slide"`, `"patient"`); the bank sizes `N_l` are their lengths.
        temperature (`float`, defaults to 0.07): SupCon temperature of the HVC loss.
        base_temperature (`float`, defaults to 0.07): SupCon base temperature.
        lambda_patch (`float`, defaults to 1.0): weight of the patch-level HVC loss.
        lambda_slide (`float`, defaults to 1.0): weight of the slide-level HVC loss.
        lambda_patient (`float`, defaults to 1.0): weight of the patient-level HVC loss.
        lambda_align (`float`, defaults to 1.0): weight of the hierarchical alignment (HA) loss; 0 logs it only.
        align_temperature (`float`, defaults to 1.0): softmax temperature `tau_a` of the HA loss.
        alignment_reduction (`str`, defaults to `"mean"`): how each HA level reduces over images: `"mean"`, or
            `"sum"` as the reference code does (see `losses.hierarchical_alignment_loss` for the gradient).
        head_init (`str`, defaults to `"text"`): how the heads start, `"text"` or `"text_centered"`
            (`text_hlss.head_init_weights`; docs/method.md, language-tied heads).
        caption_temperature (`float`, defaults to 0.07): temperature of the image-text contrastive loss of the
            alignment stage (`forward` with text).
        class_prompts (`dict[str, list[str]]`, *optional*): class name -> descriptions (ensembled), the default
            prompts of zero-shot classification (`HLSSModel.zero_shot_logits`, `evaluate zeroshot`).
        use_visual_projection (`bool`, defaults to True): a new linear `visual_projection` into the joint space;
            False (an identity) for a tower that outputs it already (an open_clip image tower; a timm CLIP tower,
            whose kept head is the CLIP image projection).
        text_pooling (`str`, *optional*): `"pooler"`, `"cls"` or `"mean"`; defaults to `"pooler"` (the only
            choice for open_clip) for CLIP and open_clip text, else `"mean"` (sentence-transformers style).
        modality (`str`, defaults to `"he"`): `"he"` (8-bit RGB H&E) or `"srh"` (2-channel uint16 SRH).
        image_size (`int`, defaults to 224): crop size the model was trained on.
        mpp (`float`, *optional*): microns per pixel of the training patches (provenance).
        magnification (`float`, *optional*): objective magnification of the training patches (provenance).
        vision_model_name_or_path (`str`, *optional*): where the vision tower came from (provenance).
        text_model_name_or_path (`str`, *optional*): where the text tower came from (provenance; tokenizer).
        initializer_range (`float`, defaults to 0.02): std of the new linear layers' initialisation.
        kwargs: passed to `PreTrainedConfig` (e.g. `num_labels`, `id2label` for classification).

    Example:
        >>> from transformers import BertConfig, ViTConfig
        >>> config = HLSSConfig(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        ...     intermediate_size=64, image_size=32, patch_size=8), BertConfig(hidden_size=32, num_hidden_layers=2,
        ...     num_attention_heads=2, intermediate_size=64), attribute_names={"patch": ["a"], "slide": ["b"],
        ...     "patient": ["c"]})
        >>> config.num_attributes
        {'patch': 1, 'slide': 1, 'patient': 1}
    """

    model_type = "hlss"
    if SubConfigSpec is not None:
        sub_configs_defaults = {
            "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="vit"),
            "text_config": SubConfigSpec(config_class=AutoConfig, model_type="bert"),
        }
    else:
        sub_configs = {"vision_config": AutoConfig, "text_config": AutoConfig}
    # Declared as a field: transformers refuses to save undeclared attributes named like generation
    # parameters (`temperature`), taking them for misplaced generation settings.
    temperature: float = 0.07

    def __init__(
        self,
        vision_config=None,
        text_config=None,
        projection_dim: int | None = None,
        attribute_names: dict[str, list[str]] | None = None,
        temperature: float = 0.07,
        base_temperature: float = 0.07,
        lambda_patch: float = 1.0,
        lambda_slide: float = 1.0,
        lambda_patient: float = 1.0,
        lambda_align: float = 1.0,
        align_temperature: float = 1.0,
        alignment_reduction: str = "mean",
        head_init: str = "text",
        caption_temperature: float = 0.07,
        class_prompts: dict[str, list[str]] | None = None,
        use_visual_projection: bool = True,
        text_pooling: str | None = None,
        modality: str = "he",
        image_size: int = 224,
        mpp: float | None = None,
        magnification: float | None = None,
        vision_model_name_or_path: str | None = None,
        text_model_name_or_path: str | None = None,
        initializer_range: float = 0.02,
        **kwargs,
    ):
        self.vision_config = _resolve_sub_config("vision_config", vision_config, "vit")
        self.text_config = _resolve_sub_config("text_config", text_config, "bert")

        derived_dim = text_output_dim(self.text_config)
        if projection_dim is None:
            projection_dim = derived_dim
        if (
            not isinstance(projection_dim, int)
            or isinstance(projection_dim, bool)
            or projection_dim != derived_dim
        ):
            raise ValueError(
                f"`projection_dim` must equal the text tower's output size {derived_dim} (the joint space is the "
                f"text space), got {projection_dim!r}"
            )
        self.projection_dim = projection_dim
        self.attribute_names = _check_attribute_names(attribute_names)

        # Temperatures and the init std must be > 0; loss weights >= 0 (0 switches a loss off, still logged).
        numbers_given = {
            "temperature": temperature,
            "base_temperature": base_temperature,
            "align_temperature": align_temperature,
            "caption_temperature": caption_temperature,
            "initializer_range": initializer_range,
            "lambda_patch": lambda_patch,
            "lambda_slide": lambda_slide,
            "lambda_patient": lambda_patient,
            "lambda_align": lambda_align,
        }
        for name, value in numbers_given.items():
            _check_number(name, value, positive=not name.startswith("lambda_"))
            setattr(self, name, float(value))
        if head_init not in HEAD_INITS:
            raise ValueError(f"`head_init` must be one of {list(HEAD_INITS)}, got {head_init!r}")
        self.head_init = head_init
        self.class_prompts = _check_class_prompts(class_prompts)
        if alignment_reduction not in ALIGNMENT_REDUCTIONS:
            raise ValueError(
                f"`alignment_reduction` must be one of {list(ALIGNMENT_REDUCTIONS)}, got {alignment_reduction!r}"
            )
        self.alignment_reduction = alignment_reduction
        if not isinstance(use_visual_projection, bool):
            raise ValueError(f"`use_visual_projection` must be a bool, got {use_visual_projection!r}")
        self.use_visual_projection = use_visual_projection

        if text_pooling is None:
            text_pooling = "pooler" if self.text_config.model_type in _PROJECTED_TEXT_TYPES else "mean"
        if text_pooling not in TEXT_POOLINGS:
            raise ValueError(f"`text_pooling` must be one of {list(TEXT_POOLINGS)}, got {text_pooling!r}")
        if self.text_config.model_type == OpenCLIPTextConfig.model_type and text_pooling != "pooler":
            raise ValueError(
                f"`text_pooling` must be 'pooler' for an open_clip text tower (it pools inside), got {text_pooling!r}"
            )
        self.text_pooling = text_pooling

        if modality not in MODALITIES:
            raise ValueError(f"`modality` must be one of {list(MODALITIES)}, got {modality!r}")
        self.modality = modality
        if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size <= 0:
            raise ValueError(f"`image_size` must be a positive int, got {image_size!r}")
        self.image_size = image_size
        _check_number("mpp", mpp, positive=True, allow_none=True)
        _check_number("magnification", magnification, positive=True, allow_none=True)
        self.mpp = None if mpp is None else float(mpp)
        self.magnification = None if magnification is None else float(magnification)
        for name, value in (
            ("vision_model_name_or_path", vision_model_name_or_path),
            ("text_model_name_or_path", text_model_name_or_path),
        ):
            if value is not None and not isinstance(value, str):
                raise ValueError(f"`{name}` must be a string or None, got {type(value)}")
        self.vision_model_name_or_path = vision_model_name_or_path
        self.text_model_name_or_path = text_model_name_or_path
        super().__init__(**kwargs)

    @property
    def num_attributes(self) -> dict[str, int]:
        """Bank sizes ``N_l`` per level, derived from `attribute_names`."""
        return {level: len(self.attribute_names.get(level, [])) for level in LEVELS}

    @property
    def hvc_lambdas(self) -> dict[str, float]:
        """HVC loss weights per level."""
        return {"patch": self.lambda_patch, "slide": self.lambda_slide, "patient": self.lambda_patient}


__all__ = [
    "HLSSConfig",
    "LEVELS",
    "OpenCLIPTextConfig",
    "OpenCLIPVisionConfig",
    "text_output_dim",
    "vision_output_dim",
]
