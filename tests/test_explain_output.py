"""explain's output for people: printed top attributes, readable class heatmaps, files that follow the umask."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import stat
import sys
import types
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _tiny import tiny_hlss_model  # noqa: E402

from hlss_hf.evaluation import EmbeddingSet  # noqa: E402
from hlss_hf.evaluation.explain import (  # noqa: E402
    class_attribute_summary,
    explain,
    format_class_summary,
    format_explanation,
    heatmap_attributes,
    plot_class_heatmap,
)


def embeddings(n=12, dim=32, seed=0):
    z = torch.nn.functional.normalize(
        torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=-1
    )
    return EmbeddingSet(
        embeddings=z,
        labels=torch.arange(n) % 3,
        class_names=["hgg", "lgg", "normal"],
        slide_ids=[f"s{i // 2}" for i in range(n)],
        patient_ids=[f"p{i // 4}" for i in range(n)],
    )


def test_printed_explanations_name_every_level_and_its_top_attributes():
    model, data = tiny_hlss_model(image_size=32), embeddings()
    result = explain(model, data, slide_id="s0", k=2)
    text = format_explanation(result)
    assert text.splitlines()[0].startswith("slide s0 (2 patches")
    for level, items in result["levels"].items():
        assert f"  {level} attributes:" in text
        assert all(item["attribute"] in text for item in items)
    summary = format_class_summary(class_attribute_summary(model, data, k=2))
    assert "patch attributes, top per class:" in summary and "  hgg (4 patches): " in summary


def test_heatmap_keeps_the_top_attributes_labels_its_colour_bar_and_follows_the_umask(tmp_path):
    classes = ["a", "b"]
    attributes = [f"attribute number {i}" for i in range(30)]
    mean = torch.zeros(2, 30)
    mean[0, 3], mean[1, 7] = 0.9, 0.8
    summary = {
        "class_names": classes,
        "num_patches": {"a": 1, "b": 1},
        "levels": {
            "patch": {
                "attributes": attributes,
                "mean": mean.tolist(),
                "top": {
                    "a": [
                        {"attribute": attributes[3], "score": 0.9},
                        {"attribute": attributes[0], "score": 0.0},
                    ],
                    "b": [
                        {"attribute": attributes[7], "score": 0.8},
                        {"attribute": attributes[1], "score": 0.0},
                    ],
                },
            }
        },
    }
    assert heatmap_attributes(summary, "patch", max_attributes=3) == [3, 7, 0]
    assert heatmap_attributes(summary, "patch", max_attributes=40) == list(range(30))
    old = os.umask(0o022)
    try:
        path = plot_class_heatmap(summary, "patch", tmp_path / "heat.png", max_attributes=3)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # not mkstemp's 0600
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class _Banks(torch.nn.Module):
    """Just what the explanations read: `config.attribute_names`, `heads` and the fixed banks."""

    def __init__(self, bank: torch.Tensor):
        super().__init__()
        names = [f"attribute_{chr(97 + i)}" for i in range(bank.shape[0])]
        self.config = types.SimpleNamespace(attribute_names={"patch": names})
        self.heads = torch.nn.ModuleDict({"patch": torch.nn.Linear(bank.shape[1], bank.shape[0])})
        self.register_buffer("bank_patch", bank)


def test_class_attributes_rank_against_patches_in_general():
    # Attribute 0 is near every image (an offset any sentence encoder gives some descriptions); attribute 1 sets
    # class 0 apart, attribute 2 class 1. Ranked raw, attribute 0 tops both classes; standardised over the set, each
    # class's own attribute comes first.
    bank = torch.eye(4)[:3]
    images = torch.zeros(8, 4)
    images[:, 0] = 0.9
    images[:4, 1], images[4:, 2] = 0.3, 0.3
    images[:, 3] = torch.linspace(0.1, 0.2, 8)  # a little spread, common to both classes
    data = EmbeddingSet(
        embeddings=torch.nn.functional.normalize(images, dim=-1),
        labels=torch.tensor([0] * 4 + [1] * 4),
        class_names=["first", "second"],
        slide_ids=[f"s{i}" for i in range(8)],
        patient_ids=[f"p{i}" for i in range(8)],
    )
    model = _Banks(bank)
    raw = class_attribute_summary(model, data, k=1, use_heads=False, standardize=False)["levels"]["patch"][
        "top"
    ]
    assert raw["first"][0]["attribute"] == raw["second"][0]["attribute"] == "attribute_a"
    summary = class_attribute_summary(model, data, k=1, use_heads=False)
    top = summary["levels"]["patch"]["top"]
    assert (top["first"][0]["attribute"], top["second"][0]["attribute"]) == ("attribute_b", "attribute_c")
    assert top["first"][0]["affinity"] == pytest.approx(float(data.embeddings[:4, 1].mean()))  # the raw mean
    assert (summary["affinity"], summary["ranked_by"]) == ("banks", "standardized")
    one = explain(model, data, index=5, k=1, use_heads=False)["levels"]["patch"][0]
    assert one["attribute"] == "attribute_c"
