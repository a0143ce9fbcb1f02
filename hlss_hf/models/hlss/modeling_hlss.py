"""HLSS models: a vision tower tied to a frozen text tower through per-level attribute banks (docs/method.md)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    PreTrainedModel,
    TimmWrapperForImageClassification,
    TimmWrapperModel,
)
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput
from transformers.utils import ModelOutput

from .configuration_hlss import LEVELS, HLSSConfig
from .hub_hlss import HLSSHubMixin
from .losses import hierarchical_alignment_loss, hierarchical_contrastive_loss, image_text_contrastive_loss
from .text_hlss import HLSSTextMixin, _paired_text, head_init_weights
from .towers_hlss import (
    OpenCLIPVisionModel,
    _build_text_tower,
    _build_vision_tower,
    _pool_vision,
    _tower_output,
    _tower_output_switches,
    _visual_projection,
    _with_leading_dims,
    build_from_towers,
)

__all__ = [
    "HLSSForImageClassification",
    "HLSSModel",
    "HLSSOutput",
    "HLSSPreTrainedModel",
]


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
            `output_hidden_states=True`), each with the input's leading dims (e.g. `[N, seq, hidden]` for a ViT,
            `[N, C, h, w]` feature maps for a ResNet or timm; `None` for an open_clip tower).
        attentions (`tuple[torch.FloatTensor]`, *optional*): the vision tower's attention maps (with
            `output_attentions=True` and eager attention), each `[N, heads, seq, seq]` with the input's leading
            dims; `None` for towers without them (CNNs, timm and open_clip towers).
        image_text_loss (`torch.FloatTensor` of shape `()`, *optional*): CLIP's symmetric contrastive loss of the
            (image, text) pairs (text given, with `return_loss`).
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


class HLSSPreTrainedModel(HLSSHubMixin, PreTrainedModel):
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
        """`PreTrainedModel.from_pretrained`, re-applying the freezing (loading recreates the parameters). Refuses a
        checkpoint without attribute banks: they are text-tower embeddings and cannot be re-initialised."""
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


class HLSSModel(HLSSTextMixin, HLSSPreTrainedModel):
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

        Without text the text tower never runs here: the banks are fixed buffers. With text (docs/method.md, the
        alignment stage), image ``i`` and text ``i`` are a pair (``losses.image_text_contrastive_loss``).

        Args:
            pixel_values (`torch.FloatTensor`): `[N, C, H, W]` images, or `[B, S, P, V, C, H, W]`
                (patients, slides per patient, patches per slide, views per patch).
            return_loss (`bool`, *optional*): compute the loss; defaults to True in training mode for the
                hierarchical form or with text, False otherwise. Without text it requires the hierarchical form.
            return_dict (`bool`, *optional*): return an `HLSSOutput` (default) or a tuple.
            output_hidden_states, output_attentions: as in `get_image_features`.
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
        if pixel_values.dim() not in (4, 7):
            raise ValueError(
                f"`pixel_values` must be [N, C, H, W] or [B, S, P, V, C, H, W], got {tuple(pixel_values.shape)}"
            )
        hierarchical = pixel_values.dim() == 7
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
        """Build an HLSS model from two towers and an attribute file (docs/method.md, towers and the joint space).

        Towers come through the ecosystem's own loaders: transformers (`from_pretrained`; a timm model id loads as
        `TimmWrapperModel`), or open_clip for its ids ``"hf-hub:<repo>"`` / ``"local-dir:<folder>"``. timm and
        open_clip towers need `pip install 'hlss_hf[reference]'`.

        When `vision` and `text` are the same CLIP checkpoint, its image projection is reused: a transformers CLIP's
        `visual_projection` is copied; an open_clip checkpoint, or a timm image tower whose repository is the text's
        ``hf-hub:`` id (the reference towers), already outputs the joint space, so `use_visual_projection`
        defaults to False and a timm tower keeps its head (the CLIP image projection).

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
        return build_from_towers(
            cls, vision, text, attributes, tokenizer=tokenizer, batch_size=batch_size, **config_kwargs
        )


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
            output_hidden_states, output_attentions: as in `get_image_features`.
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
