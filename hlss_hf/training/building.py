"""Build what a pretraining run needs from its ``TrainConfig``: towers, tokenizer, model, processors and data splits.

``train.py`` calls these in order; tests and benchmarks call them one at a time to build the same model or data as a
run would:

```python
>>> from hlss_hf.training.building import build_model, build_tokenizer, load_splits, resolve_attributes, resolve_tower
>>> from hlss_hf.training.config import parse_config
>>> config = parse_config(["--config", "configs/demo.yaml"])
>>> train_ds, val_ds = load_splits(config)
>>> text = resolve_tower(config.model.text, config.model.text_fallback, "text")
>>> tokenizer = build_tokenizer(config, text, resolve_attributes(config.model.attributes))
>>> model = build_model(config, "he", tokenizer)
```

Every problem with the config raises :class:`~hlss_hf.errors.ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import logging
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
import yaml
from tqdm.auto import tqdm
from transformers import AutoConfig, BertTokenizerFast

from hlss_hf.data import build_train_loader, load_split
from hlss_hf.data.schema import modality_of
from hlss_hf.errors import ConfigError, DatasetError, SourceError
from hlss_hf.evaluation import class_text_embeddings
from hlss_hf.models.hlss.attributes_hlss import load_attributes, shipped_attribute_file
from hlss_hf.models.hlss.configuration_hlss import OpenCLIPTextConfig
from hlss_hf.models.hlss.modeling_hlss import HLSSModel
from hlss_hf.models.hlss.processing_hlss import HLSSImageProcessor, HLSSProcessor
from hlss_hf.models.hlss.towers_hlss import load_text_tokenizer
from hlss_hf.sources import check_local_source
from hlss_hf.training.checkpoints import describe_changes, flatten, resume_changes
from hlss_hf.training.config import TrainConfig, parse_config
from hlss_hf.training.loop import TextTowerGuard
from hlss_hf.training.optim import Schedule, lr_scheduler, optimizer_groups, plan_schedule

logger = logging.getLogger(__name__)  # INFO on the main process (train.py sets "hlss_hf")


# ---------------------------------------------------------------------------------------------------------------
# Towers and tokenizer


def resolve_tower(spec: Any, fallback: Any = None, role: str = "vision") -> Any:
    """A tower spec from the config as ``from_vision_text_pretrained`` accepts it: a Hub id / local folder as is,
    ``pkg:<module>`` as that package's ``model`` folder (``fallback`` when it is not installed), a mapping of config
    fields with ``model_type`` as a ``PretrainedConfig`` (random init). ``role`` names the key in errors."""
    if isinstance(spec, dict):
        fields = dict(spec)
        return AutoConfig.for_model(fields.pop("model_type"), **fields)
    if isinstance(spec, str) and spec.startswith("pkg:"):
        module_name = spec[len("pkg:") :]
        if importlib.util.find_spec(module_name) is None:
            if fallback is None:
                raise ConfigError(f"config key 'model.{role}': package {module_name!r} is not installed")
            logger.warning("%s is not installed; using model.%s_fallback", module_name, role)
            return resolve_tower(fallback, None, role)
        module = importlib.import_module(module_name)
        return os.path.join(os.path.dirname(module.__file__), "model")
    return spec


def resolve_attributes(spec: Any) -> Any:
    """A path, a file name shipped in ``hlss_hf/models/hlss/attributes/``, or a mapping, as accepted by the model."""
    try:
        if isinstance(spec, dict):
            resolved = spec
        elif Path(spec).is_file():
            resolved = str(spec)
        else:
            resolved = shipped_attribute_file(spec)
        load_attributes(resolved)  # a malformed file stops the run here, in one line naming the item
    except ValueError as err:
        raise ConfigError(f"config key 'model.attributes': {err}") from err
    return resolved


def fallback_tokenizer(attributes: Any):
    """A BERT-style word-level tokenizer whose vocabulary is the words of the attribute descriptions. Only for
    a random-init text tower (a config, no checkpoint): it then has no tokenizer of its own, and any
    consistent tokenisation of the descriptions gives distinct random bank rows."""
    words = set()
    for bank in load_attributes(attributes).values():
        for descriptions in bank.values():
            for text in descriptions:
                words.update(re.findall(r"\w+|[^\w\s]", text.lower()))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(words)]
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "vocab.txt"
        path.write_text("\n".join(vocab) + "\n", encoding="utf-8")
        return BertTokenizerFast(vocab_file=str(path), do_lower_case=True)


def build_tokenizer(config: TrainConfig, text: Any, attributes: Any):
    """The text tower's tokenizer: ``model.tokenizer``, else the one saved with ``model.init_from``, else the
    tower's own (open_clip towers' too), else :func:`fallback_tokenizer`."""
    spec = config.model.tokenizer
    if spec is not None:
        return load_text_tokenizer(resolve_tower(spec, None, "tokenizer"))
    if config.model.init_from is not None:
        return _from_init_model(config, load_text_tokenizer)
    if isinstance(text, str | OpenCLIPTextConfig):
        return load_text_tokenizer(text)
    vocab_size = getattr(text, "vocab_size", None)
    tokenizer = fallback_tokenizer(attributes)
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise ConfigError(
            f"config key 'model.text': vocab_size {vocab_size} is smaller than the {len(tokenizer)} words of the "
            "attribute descriptions; raise it or set model.tokenizer"
        )
    return tokenizer


# ---------------------------------------------------------------------------------------------------------------
# Model and processors


def dataset_scale(dataset) -> dict[str, float]:
    """Median ``mpp`` / ``magnification`` of a (map-style) patch dataset, when its rows record them: saved in the
    model config as provenance, so users know the scale the encoder expects."""
    scale = {}
    names = getattr(dataset, "column_names", None) or []
    for column in ("mpp", "magnification"):
        if column in names:
            values = np.asarray(dataset.data.column(column).to_numpy(zero_copy_only=False), dtype=np.float64)
            values = values[np.isfinite(values) & (values > 0)]
            if values.size:
                scale[column] = float(np.median(values))
    return scale


def class_prompts_for(config: TrainConfig, class_names: list[str] | None) -> dict[str, list[str]] | None:
    """``model.class_prompts`` in the dataset's class order; every class needs descriptions, no other class may
    have any."""
    prompts = config.model.class_prompts
    if prompts is None or class_names is None:
        return prompts
    unknown = [name for name in prompts if name not in class_names]
    missing = [name for name in class_names if name not in prompts]
    if unknown or missing:
        problems = [f"no descriptions for classes {missing}"] if missing else []
        if unknown:
            problems.append(f"descriptions for classes the dataset does not have {unknown}")
        raise ConfigError(
            f"config key 'model.class_prompts': {'; '.join(problems)} (the dataset's classes: {list(class_names)})"
        )
    return {name: prompts[name] for name in class_names}


def _from_init_model(config: TrainConfig, load):
    """``load(model.init_from)``, with a missing folder or an unloadable model named by the config key."""
    source = config.model.init_from
    try:
        check_local_source(source, "model", "model.init_from")
        return load(source)
    except SourceError as err:
        raise ConfigError(f"config key 'model.init_from': {err}") from err
    except (OSError, ValueError, KeyError) as err:
        first = (str(err).strip() or type(err).__name__).splitlines()[0]
        raise ConfigError(
            f"config key 'model.init_from': cannot load an HLSS model from {source!r}: {first}"
        ) from err


def build_model(
    config: TrainConfig,
    modality: str,
    tokenizer=None,
    scale: dict | None = None,
    class_names: list[str] | None = None,
    start=None,
):
    """Build a fresh ``HLSSModel`` from the config (towers, attribute banks, loss settings).

    With ``model.init_from`` (or ``start``) the towers and the image projection are that model's (e.g. aligned on
    captions) and only the banks and heads are new; otherwise the towers come from ``model.vision`` /
    ``model.text``. ``scale``: :func:`dataset_scale`; ``class_names``: the dataset's classes, the order of
    ``model.class_prompts``; ``start``'s towers are shared, not copied.
    """
    m = config.model
    kwargs = dict(
        temperature=m.temperature,
        base_temperature=m.base_temperature,
        lambda_patch=m.lambda_patch,
        lambda_slide=m.lambda_slide,
        lambda_patient=m.lambda_patient,
        lambda_align=m.lambda_align,
        align_temperature=m.align_temperature,
        alignment_reduction=m.alignment_reduction,
        caption_temperature=m.caption_temperature,
        head_init=m.head_init,
        class_prompts=class_prompts_for(config, class_names),
        use_visual_projection=m.use_visual_projection,
        modality=modality,
        image_size=config.data.crop_size,
    )
    if m.text_pooling is not None:
        kwargs["text_pooling"] = m.text_pooling
    if m.projection_dim is not None:
        kwargs["projection_dim"] = m.projection_dim
    kwargs.update(scale or {})
    kwargs.update(m.config_kwargs)
    attributes = resolve_attributes(m.attributes)
    if start is None and m.init_from is not None:
        start = _from_init_model(config, HLSSModel.from_pretrained)  # e.g. an align run's output
    if start is not None:
        # The text space the towers were aligned in: the same pooling and projection.
        kwargs.update(
            use_visual_projection=start.config.use_visual_projection,
            text_pooling=start.config.text_pooling,
            vision_model_name_or_path=m.init_from,
            text_model_name_or_path=m.init_from,
        )
        model = HLSSModel.from_vision_text_pretrained(
            start.vision_model, start.text_model, attributes=attributes, tokenizer=tokenizer, **kwargs
        )
        model.visual_projection.load_state_dict(start.visual_projection.state_dict())
    else:
        model = HLSSModel.from_vision_text_pretrained(
            resolve_tower(m.vision, None, "vision"),
            resolve_tower(m.text, m.text_fallback, "text"),
            attributes=attributes,
            tokenizer=tokenizer,
            **kwargs,
        )
    # The text tower is frozen: only the vision tower, the projection and the heads train. The alignment objective
    # does not use the heads (DDP refuses trainable parameters without a gradient).
    model.text_model.requires_grad_(False)
    if m.objective == "align":
        model.heads.requires_grad_(False)
    return model


@dataclasses.dataclass
class CaptionTable:
    """Every caption of a split embedded once by the frozen text tower (docs/method.md, the alignment stage: the
    text tower does not train, so its embeddings may be cached): ``embeds`` ``[U, D]`` for the ``U`` distinct
    captions, ``index`` ``[N]`` the caption of each dataset row."""

    embeds: torch.Tensor
    index: torch.Tensor

    def lookup(self, rows: torch.Tensor) -> torch.Tensor:
        """The caption embeddings of dataset ``rows`` (any shape ``[...]``) -> ``[..., D]``."""
        return self.embeds[self.index[rows.to(self.index.device)]]


def build_caption_table(
    model, tokenizer, dataset, column: str, batch_size: int = 256, progress: bool = False
) -> CaptionTable:
    """Embed the ``column`` text of every row of ``dataset`` with ``model``'s text tower, each distinct text once;
    a missing column or the first empty text is a ``ConfigError`` naming ``data.text_column``."""
    if column not in dataset.column_names:
        raise ConfigError(
            f"config key 'data.text_column': the training split has no column {column!r} (it has "
            f"{dataset.column_names}); model.objective align needs a text per patch"
        )
    texts = list(dataset[column])
    position: dict[str, int] = {}
    index = torch.empty(len(texts), dtype=torch.long)
    for row, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            patch = dataset[row].get("patch_id", row) if "patch_id" in dataset.column_names else row
            raise ConfigError(
                f"config key 'data.text_column': patch {patch} has no {column} text (got {text!r})"
            )
        index[row] = position.setdefault(text, len(position))
    unique = list(position)
    chunks = [
        model.encode_texts(unique[start : start + batch_size], tokenizer, batch_size=batch_size)
        for start in tqdm(
            range(0, len(unique), batch_size), desc=f"embedding {column}s", unit="batch", disable=not progress
        )
    ]
    embeds = torch.cat(chunks)
    return CaptionTable(embeds=embeds, index=index.to(embeds.device))


def build_image_processor(config: TrainConfig, modality: str):
    """The evaluation / inference image processor: ``data.eval_framing`` ``resize`` scales the whole patch to
    ``data.crop_size`` (bicubic, the reference's framing); ``center_crop`` crops that size at native resolution,
    after an optional shortest-edge resize to ``data.eval_resize``. Either resize antialiases unless
    ``data.eval_antialias`` is false."""
    d = config.data
    if d.eval_framing == "resize":
        return HLSSImageProcessor(
            modality=modality,
            do_resize=True,
            size={"height": d.crop_size, "width": d.crop_size},
            resample="bicubic",
            antialias=d.eval_antialias,
            do_center_crop=False,
        )
    return HLSSImageProcessor(
        modality=modality,
        do_resize=d.eval_resize is not None,
        size={"shortest_edge": d.eval_resize or d.crop_size},
        antialias=d.eval_antialias,
        do_center_crop=True,
        crop_size=d.crop_size,
    )


# ---------------------------------------------------------------------------------------------------------------
# Data


def load_splits(config: TrainConfig) -> tuple[Any, Any]:
    """The run's (train, validation) splits: the demo hierarchy, a local dataset folder or a Hub dataset id.

    Non-demo data goes through :func:`hlss_hf.data.load_split` (the train split streamed when ``data.streaming``;
    validation is always map-style, `None` when ``data.validation_split`` is empty). Its dataset errors are
    re-raised as ``ConfigError`` naming the key. Call it under ``accelerator.main_process_first()``: the main
    process builds the demo cache or downloads, the others read it.
    """
    d = config.data
    try:
        if d.dataset == "demo":
            splits = _demo_splits(config)
            train = load_split(splits, d.train_split, name="demo", split_key="data.train_split")
            val = (
                load_split(splits, d.validation_split, name="demo", split_key="data.validation_split")
                if d.validation_split
                else None
            )
            return train, val
        common = dict(config_name=d.dataset_config_name, key="data.dataset")
        train = load_split(
            d.dataset, d.train_split, streaming=d.streaming, split_key="data.train_split", **common
        )
        val = (
            load_split(d.dataset, d.validation_split, split_key="data.validation_split", **common)
            if d.validation_split
            else None
        )
    except DatasetError as err:
        message = str(err)
        if d.validation_split and f"has no split {d.validation_split!r}" in message:
            # A small cohort converted without a split column may have no validation split: say how to go on.
            message += (
                "; to go on, train without evaluation (--data.validation_split null), name a split it has "
                "(--data.validation_split <name>), or convert again with a validation split (a `split` column in "
                "the manifest, --split-file, or two or more patients in a class with --val-fraction > 0)"
            )
        raise ConfigError(message) from err
    if d.demo:
        # The demo config's data.demo stays set when only data.dataset is overridden on the command line.
        logger.info("data.demo is ignored: data.dataset is %r, not the demo", d.dataset)
    return train, val


def demo_arguments(config: TrainConfig, build_demo_dataset) -> dict[str, Any]:
    """``data.demo`` checked against ``build_demo_dataset``'s arguments, the seed added."""
    kwargs = dict(config.data.demo)
    accepted = set(inspect.signature(build_demo_dataset).parameters) - {"output_dir"}
    for key in kwargs:
        if key not in accepted:
            raise ConfigError(
                f"config key 'data.demo.{key}': not an argument of build_demo_dataset ({sorted(accepted)}); "
                "on the command line write mappings with a space after each colon: '{num_patients: 12}'"
            )
    kwargs.setdefault("seed", config.training.seed)
    return kwargs


def _demo_splits(config: TrainConfig):
    """The synthetic demo (``dataset_scripts/demo.py``, a checkout's), built from ``data.demo``; with
    ``data.cache_dir`` saved there once and read back afterwards."""
    try:
        from dataset_scripts.demo import build_demo_dataset
    except ImportError as err:
        raise ConfigError(
            "config key 'data.dataset': the demo needs dataset_scripts/demo.py of a checkout; run train.py from it"
        ) from err

    d = config.data
    kwargs = demo_arguments(config, build_demo_dataset)
    if d.cache_dir is None:
        return build_demo_dataset(output_dir=None, **kwargs)
    cache = Path(d.cache_dir)
    if not (cache / "dataset_dict.json").is_file():
        if cache.exists():
            # Never replace a folder we did not write (or an older layout of the demo): say so instead.
            raise ConfigError(
                f"config key 'data.cache_dir': {cache} exists but holds no saved dataset "
                "(dataset_dict.json); delete it or choose another folder"
            )
        build_demo_dataset(output_dir=cache, **kwargs)
    return datasets.load_from_disk(str(cache))


def make_init_model(config: TrainConfig, run: Callable[[list[str]], Any], repo_root: Path) -> None:
    """Make ``model.init_from`` by running ``model.init_config`` when that folder does not exist yet (the demo's
    image-text alignment, made on its first run and reused afterwards).

    An existing folder is used as it is, unless it was made with other settings than ``model.init_config``: then the
    run stops naming them (the folder is never replaced by a run that did not make it). ``run``: train.py's
    ``main``; ``repo_root``: the checkout whose ``configs/`` a relative ``model.init_config`` may name.
    """
    m = config.model
    if m.init_from is None or m.init_config is None:
        return
    init_config = m.init_config
    if not Path(init_config).is_file() and (repo_root / init_config).is_file():
        init_config = str(repo_root / init_config)  # a config of this checkout, run from elsewhere
    init_args = ["--config", init_config, "--training.output_dir", m.init_from]
    wanted = parse_config(init_args)
    folder = Path(m.init_from)
    if folder.exists():
        made = folder / "train_config.yaml"
        if not made.is_file():
            raise ConfigError(
                f"config key 'model.init_from': {folder} exists but holds no train_config.yaml, so it was not made "
                f"by {m.init_config}; set model.init_config null to start from it as it is, or choose another folder"
            )
        saved = yaml.safe_load(made.read_text(encoding="utf-8"))
        applied, refused = resume_changes(saved, wanted.to_dict())
        # The same folder may be named another way; keys newer than the folder keep their defaults.
        known = set(flatten(saved)) - {"training.output_dir"}
        changed = {key: values for key, values in {**applied, **refused}.items() if key in known}
        if changed:
            raise ConfigError(
                f"config key 'model.init_from': {folder} was made with other settings than {m.init_config} "
                f"({describe_changes(changed)}); delete that folder to make it again, or choose another folder"
            )
        return
    # This run's own data mistakes (a missing folder or split, an unknown Hub repo, no id columns) are named before
    # the first stage takes its time (the run reads a dataset again from its cache, and builds the demo again).
    load_splits(config)
    print(f"Making {folder} first, with {m.init_config} (the model this run starts from)", flush=True)
    run(init_args)
    print(f"Made {folder}; now the run of this config", flush=True)


@dataclasses.dataclass(frozen=True)
class TrainData:
    """The splits and the training loader (not yet prepared)."""

    train_ds: Any
    val_ds: Any
    modality: str
    train_dataset: Any  # the hierarchical dataset of patients the loader draws from
    loader: Any


@dataclasses.dataclass(frozen=True)
class TrainParts:
    """The prepared model, optimizer, schedule and loader, and the text embeddings computed once before them."""

    model: Any
    optimizer: Any
    scheduler: Any
    loader: Any
    schedule: Schedule
    processor: Any
    image_processor: Any
    guard: TextTowerGuard
    # objective align: every training caption's text embedding (the text tower is frozen).
    captions: CaptionTable | None = None
    # model.class_prompts: one text embedding per class, for the zero-shot evaluation.
    class_embeds: torch.Tensor | None = None


def load_data(config: TrainConfig, accelerator) -> TrainData:
    """The splits and the hierarchical loader (the main process first: it builds / downloads, the others read its
    cache)."""
    with accelerator.main_process_first():
        train_ds, val_ds = load_splits(config)
        dataset, loader = build_train_loader(config, train_ds, accelerator.num_processes, accelerator.device)
    return TrainData(train_ds, val_ds, modality_of(train_ds.features), dataset, loader)


def build_training(config: TrainConfig, data: TrainData, accelerator) -> TrainParts:
    """Model (towers, banks, heads), processors, optimizer and LR schedule, prepared by Accelerate."""
    t, d = config.training, config.data
    text = resolve_tower(config.model.text, config.model.text_fallback, "text")
    tokenizer = build_tokenizer(config, text, resolve_attributes(config.model.attributes))
    class_names = data.train_ds.features["label"].names
    scale = dataset_scale(data.train_ds) if not d.streaming else {}
    model = build_model(config, data.modality, tokenizer, scale, class_names=class_names)
    image_processor = build_image_processor(config, data.modality)
    # Text embeddings the run needs, computed once before Accelerate wraps (and may shard) the model.
    model.to(accelerator.device)
    captions = class_embeds = None
    if config.model.objective == "align":
        progress = accelerator.is_local_main_process
        captions = build_caption_table(model, tokenizer, data.train_ds, d.text_column, progress=progress)
    prompts = class_prompts_for(config, class_names)
    if prompts is not None:
        class_embeds = class_text_embeddings(model, tokenizer, prompts, class_names)
    guard = TextTowerGuard()
    model.text_model.register_forward_pre_hook(guard)
    optimizer = torch.optim.AdamW(
        optimizer_groups(model, t), lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon
    )
    patients = len(data.train_dataset) if t.schedule_length == "reference" else None
    schedule = plan_schedule(t, data.loader, patients, accelerator.num_processes, d.streaming)
    scheduler = lr_scheduler(t, optimizer, accelerator, schedule.steps, schedule.warmup)
    loader = data.loader
    if d.streaming:
        # The streaming dataset shards patients over processes itself: accelerate must not shard it again.
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    else:
        model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    processor = HLSSProcessor(image_processor=image_processor, tokenizer=tokenizer)  # saved beside the model
    return TrainParts(
        model,
        optimizer,
        scheduler,
        loader,
        schedule,
        processor,
        image_processor,
        guard,
        captions,
        class_embeds,
    )
