"""hlss_hf: Hierarchical Language-tied Self-Supervision for histopathology, Hugging Face-native.

Importing the package registers HLSS with the transformers Auto classes (`AutoConfig`, `AutoModel`,
`AutoModelForImageClassification`, `AutoImageProcessor`, `AutoProcessor`) and the two SRH-capable pipeline tasks
(`hlss-feature-extraction`, `hlss-image-classification`, in `models/hlss/pipeline_hlss.py`); the public names
load on first use.

The command-line programs (`train.py`, `finetune.py`, `python -m hlss_hf.evaluate`, `dataset_scripts/*.py`) read
their arguments before torch loads (seconds to tens of seconds), so that `--help` and configuration errors answer at
once: while one of them starts, registration waits for its :func:`register_auto_classes` call after parsing.
"""

import importlib
import sys

__version__ = "0.1.0"

# Public name -> the module that defines it (PEP 562: imported when first asked for).
_PUBLIC = {
    "HLSSConfig": "models.hlss.configuration_hlss",
    "HLSSFeatureExtractionPipeline": "models.hlss.pipeline_hlss",
    "HLSSForImageClassification": "models.hlss.modeling_hlss",
    "HLSSImageClassificationPipeline": "models.hlss.pipeline_hlss",
    "HLSSImageProcessor": "models.hlss.processing_hlss",
    "HLSSModel": "models.hlss.modeling_hlss",
    "HLSSOutput": "models.hlss.modeling_hlss",
    "HLSSPreTrainedModel": "models.hlss.modeling_hlss",
    "HLSSProcessor": "models.hlss.processing_hlss",
    "load_attributes": "models.hlss.attributes_hlss",
    "load_text_tokenizer": "models.hlss.towers_hlss",
}

__all__ = sorted(_PUBLIC) + ["register_auto_classes"]

# What a program of this project sets in its own module before importing hlss_hf, to parse first (see above).
PARSE_FIRST = "HLSS_HF_PARSE_FIRST"


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'hlss_hf' has no attribute {name!r}")
    register_auto_classes()  # any use of the public API has the Auto classes too
    return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))


_registered = False


def register_auto_classes() -> None:
    """Register HLSS with transformers' Auto classes and pipelines (done on import; repeating it does nothing)."""
    global _registered
    if _registered:
        return
    _registered = True  # first: the modules imported below may ask for hlss_hf's public names
    try:
        _register()
    except BaseException:
        _registered = False
        raise


def _register() -> None:
    from transformers import (
        AutoConfig,
        AutoImageProcessor,
        AutoModel,
        AutoModelForImageClassification,
        AutoProcessor,
    )
    from transformers.models.auto.video_processing_auto import VIDEO_PROCESSOR_MAPPING

    from .models.hlss.configuration_hlss import HLSSConfig
    from .models.hlss.modeling_hlss import HLSSForImageClassification, HLSSModel
    from .models.hlss.pipeline_hlss import register_pipelines
    from .models.hlss.processing_hlss import HLSSImageProcessor, HLSSProcessor

    AutoConfig.register(HLSSConfig.model_type, HLSSConfig, exist_ok=True)
    AutoModel.register(HLSSConfig, HLSSModel, exist_ok=True)
    AutoModelForImageClassification.register(HLSSConfig, HLSSForImageClassification, exist_ok=True)
    # One class serves both backends: transformers asks for "torchvision" whenever it is installed, and a "pil"-only
    # entry made every load warn "Requested torchvision backend is not available" although it was.
    AutoImageProcessor.register(
        HLSSConfig,
        image_processor_classes={"pil": HLSSImageProcessor, "torchvision": HLSSImageProcessor},
        exist_ok=True,
    )
    AutoProcessor.register(HLSSConfig, HLSSProcessor, exist_ok=True)
    # HLSS has no video processor. Without this entry, pipelines derive "HLSSVideoProcessor" from the image
    # processor's auto_map, find no local class and prompt for remote code although hlss_hf is imported.
    # (The mapping directly: `AutoVideoProcessor.register` needs torchvision.)
    VIDEO_PROCESSOR_MAPPING.register(HLSSConfig, {}, exist_ok=True)
    # save_pretrained then writes `auto_map` and copies processing_hlss.py, for remote-code loading.
    HLSSImageProcessor.register_for_auto_class("AutoImageProcessor")
    HLSSProcessor.register_for_auto_class("AutoProcessor")
    # pipeline("hlss-feature-extraction" / "hlss-image-classification"): SRH arrays and TIFF files as inputs.
    register_pipelines()


def _program_parses_first() -> bool:
    # `python -m hlss_hf.<program>`: Python imports this package to find the program while sys.argv[0] is "-m"
    # (documented for -m); a script declares it in its own module.
    return sys.argv[:1] == ["-m"] or bool(getattr(sys.modules.get("__main__"), PARSE_FIRST, False))


if not _program_parses_first():
    register_auto_classes()
