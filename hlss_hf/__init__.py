"""hlss_hf: Hierarchical Language-tied Self-Supervision for histopathology, Hugging Face-native.

Importing the package registers HLSS with the transformers Auto classes (`AutoConfig`, `AutoModel`,
`AutoModelForImageClassification`, `AutoImageProcessor`, `AutoProcessor`) and the two SRH-capable pipeline tasks
(`hlss-feature-extraction`, `hlss-image-classification`, in `pipeline_hlss`).
Only torch and transformers are imported here; data, training and evaluation modules load on demand.
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoProcessor,
)
from transformers.models.auto.video_processing_auto import VIDEO_PROCESSOR_MAPPING

from .configuration_hlss import HLSSConfig
from .modeling_hlss import (
    HLSSForImageClassification,
    HLSSModel,
    HLSSOutput,
    HLSSPreTrainedModel,
    load_attributes,
    load_text_tokenizer,
)
from .pipeline_hlss import (
    HLSSFeatureExtractionPipeline,
    HLSSImageClassificationPipeline,
    register_pipelines,
)
from .processing_hlss import HLSSImageProcessor, HLSSProcessor

__version__ = "0.1.0"

__all__ = [
    "HLSSConfig",
    "HLSSFeatureExtractionPipeline",
    "HLSSForImageClassification",
    "HLSSImageClassificationPipeline",
    "HLSSImageProcessor",
    "HLSSModel",
    "HLSSOutput",
    "HLSSPreTrainedModel",
    "HLSSProcessor",
    "load_attributes",
    "load_text_tokenizer",
]

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
