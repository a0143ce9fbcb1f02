"""The text side of `HLSSModel` (a mixin): text features, the attribute banks and their heads, zero-shot logits and
attribute rankings (docs/method.md).
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .attributes_hlss import load_attributes
from .configuration_hlss import LEVELS
from .towers_hlss import _tower_output, _tower_output_switches

__all__ = ["HLSSTextMixin", "head_init_weights"]


def head_init_weights(bank: torch.Tensor, head_init: str = "text") -> torch.Tensor:
    """A language-tied head's initial weight ``[N_l, D]`` from its bank: its rows (``"text"``), or the rows less
    their mean, renormalised (``"text_centered"``; why: docs/method.md, language-tied heads). A bank of one row
    keeps it."""
    if head_init == "text" or bank.shape[0] < 2:
        return bank
    return F.normalize(bank - bank.mean(dim=0, keepdim=True), dim=-1)


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


class HLSSTextMixin:
    """`HLSSModel`'s text-side methods; they use its `text_model`, `heads`, banks (`bank_<level>`), `config` and
    `get_image_features`."""

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
            output_hidden_states, output_attentions, return_dict: as in `get_image_features`, for the text tower.
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
        """Tokenize and embed texts with the frozen text tower (no gradient), `batch_size` texts per forward,
        truncated to `max_length` (default: the tokenizer's limit). Returns ``[T, D]``, L2-normalised, on the
        model's device."""
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
        """Encode the attribute descriptions into the banks (docs/method.md, attribute banks) and re-initialise
        the heads from them (`head_init_weights`, bias 0); sets `config.attribute_names` and returns the banks.
        `attributes` as `load_attributes` reads them; `batch_size` descriptions per text forward.
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
                Without either, the columns are the classes of `class_prompts()`, each the ensemble of its
                descriptions (needs `tokenizer`).
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
        """`config.class_prompts` (class -> descriptions), in `config.id2label` order when those are its classes."""
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
