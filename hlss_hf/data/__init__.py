"""Patch datasets: the row schema, the hierarchical samplers and loaders, augmentations and the demo (docs/data.md).

Modules: ``schema`` (the columns, decoding), ``hierarchy`` (the patient -> slide -> patch dataset), ``streaming``
(the same over a stream), ``loading`` (reading a split, the pretraining loader), ``augmentation`` (+ its kernels)
and ``demo`` (the synthetic dataset).
"""

import importlib

# Public name -> the module that defines it. They load on first use (PEP 562) rather than here: the converters import
# hlss_hf.data.schema, which runs this file, and their --help and argument errors answer before torch loads
# (tests/test_own_data.py).
_HOMES = {
    "HierarchyIndex": "hierarchy",
    "HierarchicalPatchDataset": "hierarchy",
    "HierarchicalCollator": "hierarchy",
    "balanced_patient_list": "hierarchy",
    "collate_hierarchical": "hierarchy",
    "to_float": "hierarchy",
    "HierarchicalStreamingDataset": "streaming",
    "stream_batches": "streaming",
    "load_split": "loading",
    "split_names": "loading",
    "EpochBatchSampler": "loading",
    "EpochPermutationSampler": "loading",
    "build_train_loader": "loading",
    "default_num_workers": "loading",
    "loader_workers": "loading",
}

__all__ = list(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
