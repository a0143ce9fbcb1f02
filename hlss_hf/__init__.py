"""hlss_hf: Hierarchical Language-tied Self-Supervision for histopathology, Hugging Face-native.

Importing the package registers HLSS with the transformers Auto classes (`AutoConfig`, `AutoModel`,
`AutoModelForImageClassification`, and `AutoImageProcessor` / `AutoProcessor` when the processors are available).
Only torch and transformers are imported here; data, training and evaluation modules load on demand.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

from .configuration_hlss import HLSSConfig
from .modeling_hlss import (
    HLSSForImageClassification,
    HLSSModel,
    HLSSOutput,
    HLSSPreTrainedModel,
    load_attributes,
)

__version__ = "0.1.0"

__all__ = [
    "HLSSConfig",
    "HLSSForImageClassification",
    "HLSSModel",
    "HLSSOutput",
    "HLSSPreTrainedModel",
    "load_attributes",
]

AutoConfig.register(HLSSConfig.model_type, HLSSConfig, exist_ok=True)
AutoModel.register(HLSSConfig, HLSSModel, exist_ok=True)
AutoModelForImageClassification.register(HLSSConfig, HLSSForImageClassification, exist_ok=True)

try:  # the processors live in their own module, which may be absent in a partial checkout
    from .processing_hlss import HLSSImageProcessor, HLSSProcessor
except ImportError:
    pass
else:
    from transformers import AutoImageProcessor, AutoProcessor

    AutoImageProcessor.register(
        HLSSConfig, image_processor_classes={"pil": HLSSImageProcessor}, exist_ok=True
    )
    AutoProcessor.register(HLSSConfig, HLSSProcessor, exist_ok=True)
    # save_pretrained then writes `auto_map` and copies processing_hlss.py, for remote-code loading.
    HLSSImageProcessor.register_for_auto_class("AutoImageProcessor")
    HLSSProcessor.register_for_auto_class("AutoProcessor")
    __all__ += ["HLSSImageProcessor", "HLSSProcessor"]
