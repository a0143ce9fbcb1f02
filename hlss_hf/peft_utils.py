"""The adapter loaders under the name that published model cards import them by; new code imports
:mod:`hlss_hf.training.lora`."""

from hlss_hf.training.lora import adapter_labels, load_lora_classifier  # noqa: F401
