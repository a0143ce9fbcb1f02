"""transformers pipelines for HLSS models that take SRH patches as they come: 2-channel uint16 arrays, SRH TIFF
files, or H&E images (docs/hub.md, pipelines). Self-contained (transformers, torch, numpy; tifffile only for TIFF
paths): :func:`add_pipelines_to_folder` copies this file into saved folders as remote code.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import AutoModel, AutoModelForImageClassification, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY

FEATURE_TASK = "hlss-feature-extraction"
CLASSIFICATION_TASK = "hlss-image-classification"
_TIFF_SUFFIXES = (".tif", ".tiff")


def read_patch(image: Any) -> np.ndarray:
    """One patch as a channel-last numpy array: SRH stays uint16 ``[H, W, 2]``, H&E becomes uint8 RGB.

    `image`: a numpy array, nested lists (an ``Array3D`` dataset row) or torch tensor (``[H, W, C]`` or
    ``[C, H, W]`` with C of 2 or 3; integers are brought back to uint16 / uint8), a PIL image, or the path of an
    image file (SRH TIFFs are read with tifffile, other files with PIL).
    """
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"image file {str(path)!r} does not exist")
        if path.suffix.lower() in _TIFF_SUFFIXES:
            # importlib: transformers' import check would demand tifffile of every remote-code user.
            image = importlib.import_module("tifffile").imread(path)
        else:
            with Image.open(path) as opened:
                image = np.asarray(opened.convert("RGB"))
    elif isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    elif isinstance(image, (list, tuple)):  # an Array3D row read without a format (SRH, raw H&E)
        image = np.asarray(image)
    elif not isinstance(image, np.ndarray):  # a PIL image
        image = np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[0] in (2, 3) and array.shape[-1] not in (2, 3):
        array = np.moveaxis(array, 0, -1)  # channel-first (as some SRH TIFFs are stored)
    if array.ndim != 3 or array.shape[-1] not in (2, 3):
        raise ValueError(f"expected a patch of shape [H, W, 2] (SRH) or [H, W, 3] (H&E), got {array.shape}")
    stored = np.dtype(np.uint16 if array.shape[-1] == 2 else np.uint8)
    if array.dtype.kind in "iu" and array.dtype != stored:
        # datasets' numpy format and nested lists widen Array3D rows to int64: back to the stored dtype.
        info = np.iinfo(stored)
        if array.size and (array.min() < info.min or array.max() > info.max):
            raise ValueError(
                f"integer patch values outside {stored.name} range: {array.min()}..{array.max()}"
            )
        array = array.astype(stored)
    return array


class _PatchPipeline(Pipeline):
    _load_processor = False
    _load_image_processor = True
    _load_feature_extractor = False
    _load_tokenizer = False

    def preprocess(self, image, **kwargs) -> dict[str, torch.Tensor]:
        inputs = self.image_processor(images=[read_patch(image)], return_tensors="pt")
        return {"pixel_values": inputs["pixel_values"].to(self.dtype)}


class HLSSFeatureExtractionPipeline(_PatchPipeline):
    """L2-normalised HLSS embeddings of patches (``model.get_image_features``).

    Call with one patch or a list (see :func:`read_patch` for the accepted forms); returns, per patch, the
    embedding as a list of floats, or with ``return_tensors=True`` a tensor ``[1, D]``.
    """

    def _sanitize_parameters(self, return_tensors=None, **kwargs):
        postprocess = {} if return_tensors is None else {"return_tensors": return_tensors}
        return {}, {}, postprocess

    def _forward(self, model_inputs):
        features = self.model.get_image_features(pixel_values=model_inputs["pixel_values"], return_dict=True)
        return {"embeddings": features.pooler_output}

    def postprocess(self, model_outputs, return_tensors=False):
        embeddings = model_outputs["embeddings"]  # [1, D]
        return embeddings if return_tensors else embeddings[0].tolist()


class HLSSImageClassificationPipeline(_PatchPipeline):
    """Class scores of patches from a fine-tuned ``HLSSForImageClassification`` (e.g. ``finetune.py --merge``).

    Returns, per patch, the ``top_k`` (default 5) classes as ``[{"label": name, "score": probability}, ...]``.
    """

    def _sanitize_parameters(self, top_k=None, **kwargs):
        return {}, {}, ({} if top_k is None else {"top_k": top_k})

    def _forward(self, model_inputs):
        return {"logits": self.model(pixel_values=model_inputs["pixel_values"]).logits}

    def postprocess(self, model_outputs, top_k=5):
        scores = model_outputs["logits"][0].float().softmax(-1)  # [num_labels]
        top_k = min(top_k, scores.numel())
        values, indices = scores.topk(top_k)
        id2label = self.model.config.id2label
        return [{"label": id2label[int(i)], "score": float(v)} for v, i in zip(values, indices, strict=True)]


def register_pipelines() -> None:
    """Register both tasks with transformers' ``PIPELINE_REGISTRY`` (``import hlss_hf`` does this)."""
    PIPELINE_REGISTRY.register_pipeline(
        FEATURE_TASK, pipeline_class=HLSSFeatureExtractionPipeline, pt_model=AutoModel, type="image"
    )
    PIPELINE_REGISTRY.register_pipeline(
        CLASSIFICATION_TASK,
        pipeline_class=HLSSImageClassificationPipeline,
        pt_model=AutoModelForImageClassification,
        type="image",
    )


def add_pipelines_to_folder(folder: str | os.PathLike) -> None:
    """Make a folder written by ``save_pretrained`` serve its pipeline as remote code (HLSSModel: feature
    extraction; HLSSForImageClassification: classification): copy this file beside the model and list the task in
    ``config.json`` (``custom_pipelines``, the entry ``Pipeline.save_pretrained`` writes)."""
    folder = Path(folder)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    module = Path(__file__).stem
    if "HLSSForImageClassification" not in (config.get("architectures") or []):
        task, impl, auto = FEATURE_TASK, "HLSSFeatureExtractionPipeline", "AutoModel"
    else:
        task, impl, auto = (
            CLASSIFICATION_TASK,
            "HLSSImageClassificationPipeline",
            "AutoModelForImageClassification",
        )
    config["custom_pipelines"] = {task: {"impl": f"{module}.{impl}", "pt": [auto], "type": "image"}}
    shutil.copyfile(__file__, folder / Path(__file__).name)
    tmp = config_path.with_name(f".{config_path.name}.tmp")
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, config_path)
