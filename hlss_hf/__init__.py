"""hlss_hf: Hierarchical Language-tied Self-Supervision for histopathology, Hugging Face-native."""

__version__ = "0.1.0"
