"""Saving and pushing HLSS models (a mixin of `HLSSPreTrainedModel`): the `auto_map` of every saved config, the
model card `save_pretrained` writes from the config alone, and `push_to_hub` keeping that card and the pipelines.
"""

from __future__ import annotations

import importlib
import os
import tempfile

from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError

from .configuration_hlss import HLSSConfig

__all__ = ["HLSSHubMixin", "hlss_model_card"]

# Every auto class an HLSS checkpoint can be opened with; written into config.json's `auto_map` on save so that
# both the pretraining model and the classifier load as remote code from any HLSS folder.
_AUTO_MAP = {
    "AutoConfig": "configuration_hlss.HLSSConfig",
    "AutoModel": "modeling_hlss.HLSSModel",
    "AutoModelForImageClassification": "modeling_hlss.HLSSForImageClassification",
}


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


class HLSSHubMixin:
    """`save_pretrained` / `push_to_hub` of `HLSSPreTrainedModel` (before `PreTrainedModel` in its bases)."""

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained` with every HLSS auto class in `auto_map` and an HLSS card (`README.md`:
        the loaded folder's, else `hlss_model_card`; an existing one in `save_directory` is kept).
        ``push_to_hub=True`` goes through :meth:`push_to_hub`, which also ships the pipelines."""
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
        """`PreTrainedModel.push_to_hub` (same arguments and `CommitInfo`), keeping the HLSS card, which transformers
        would replace with its generic one: the loaded folder's, else the repo's own, else `hlss_model_card`; `tags`
        are added to it. Also uploads the pipeline file."""
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
