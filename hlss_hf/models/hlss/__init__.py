"""HLSS: configuration, model, towers, losses, processor and pipelines (docs/method.md).

Remote code: a saved folder gets these files by basename and loads them where hlss_hf is not installed, so they
import one another only as ``from .name import ...`` at the start of a line and never import hlss_hf.
"""
