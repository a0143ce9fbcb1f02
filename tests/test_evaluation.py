"""kNN, linear probe, zero-shot and embedding extraction (hlss_hf.evaluation)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import warnings

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hlss_hf.data.schema import features_for
from hlss_hf.evaluation import (
    EmbeddingSet,
    aggregate_scores,
    extract_embeddings,
    hierarchical_metrics,
    knn_evaluate,
    knn_predict,
    knn_scores,
    linear_probe_evaluate,
    model_fingerprint,
    reference_patch_scores,
    train_linear_probe,
    zero_shot_scores,
)


def _normalized(n, d, generator):
    return F.normalize(torch.randn(n, d, generator=generator), dim=-1)


def _slow_knn(query, bank, bank_labels, num_classes, k, temperature):
    scores = torch.zeros(len(query), num_classes, dtype=torch.float64)
    for i, q in enumerate(query.double()):
        sims = [(float(q @ b.double()), j) for j, b in enumerate(bank)]
        sims.sort(key=lambda item: -item[0])
        for sim, j in sims[:k]:
            scores[i, int(bank_labels[j])] += np.exp(sim / temperature)
    return scores


@pytest.mark.parametrize("k,temperature", [(1, 0.07), (5, 0.07), (20, 0.5), (60, 0.1)])
def test_knn_predict_matches_slow_loop(k, temperature):
    g = torch.Generator().manual_seed(k)
    query, bank = _normalized(13, 8, g), _normalized(60, 8, g)
    labels = torch.randint(0, 4, (60,), generator=g)
    expected = _slow_knn(query, bank, labels, 4, k, temperature)
    scores = knn_predict(query, bank, labels, 4, k=k, temperature=temperature)
    torch.testing.assert_close(scores.double(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("chunk_size,max_block", [(1, 2**25), (7, 50), (4, 11), (1000, 20)])
def test_knn_chunked_equals_unchunked(chunk_size, max_block):
    # max_block < bank size forces the running top-k merge over bank blocks.
    g = torch.Generator().manual_seed(0)
    query, bank = _normalized(37, 16, g), _normalized(211, 16, g)
    labels = torch.randint(0, 5, (211,), generator=g)
    full = knn_predict(query, bank, labels, 5, k=10, chunk_size=10**6, max_block_elements=10**9)
    chunked = knn_predict(query, bank, labels, 5, k=10, chunk_size=chunk_size, max_block_elements=max_block)
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-3)


def test_knn_k_larger_than_bank_is_an_error():
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="k=11 .* bank size \\(10"):
        knn_predict(_normalized(3, 4, g), _normalized(10, 4, g), torch.zeros(10, dtype=torch.long), 2, k=11)


def test_knn_rejects_bad_labels_and_shapes():
    g = torch.Generator().manual_seed(0)
    bank = _normalized(10, 4, g)
    with pytest.raises(ValueError, match="bank_labels must lie"):
        knn_predict(bank, bank, torch.full((10,), 3), 2, k=2)
    with pytest.raises(ValueError, match="share D"):
        knn_predict(_normalized(3, 5, g), bank, torch.zeros(10, dtype=torch.long), 2, k=2)


def _clustered_set(n_patients, patches_per_patient, num_classes, dim, noise, seed, prefix="p"):
    """Patients of a class scatter around the class centre: separable when noise is small."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(99)), dim=-1)
    patient_labels = torch.arange(n_patients) % num_classes
    labels = patient_labels.repeat_interleave(patches_per_patient)
    embeds = F.normalize(centres[labels] + noise * torch.randn(len(labels), dim, generator=g), dim=-1)
    patients = [f"{prefix}{i // patches_per_patient}" for i in range(len(labels))]
    slides = [f"{p}-s{(i % patches_per_patient) // 3}" for i, p in enumerate(patients)]
    names = [f"class_{c}" for c in range(num_classes)]
    return EmbeddingSet(embeds, labels, slides, patients, names)


def test_knn_evaluate_on_separable_clusters():
    train = _clustered_set(12, 10, 3, 16, 0.1, seed=0, prefix="t")
    val = _clustered_set(6, 10, 3, 16, 0.1, seed=1, prefix="v")
    result = knn_evaluate(train, val, k=20)
    assert result["patch/acc"] > 0.95
    assert result["slide/acc"] == result["patient/acc"] == 1.0
    assert {
        f"{lvl}/{m}" for lvl in ("patch", "slide", "patient") for m in ("acc", "top2", "top3", "mca", "map")
    } == set(result)


def test_knn_evaluate_clamps_k_with_warning():
    train = _clustered_set(3, 4, 3, 8, 0.3, seed=0)
    val = _clustered_set(3, 4, 3, 8, 0.3, seed=1)
    with pytest.warns(UserWarning, match="k=200 is larger than the training bank \\(12"):
        result = knn_evaluate(train, val, k=200)
    assert 0.0 <= result["patch/acc"] <= 1.0


def test_knn_evaluate_rejects_unknown_label_names():
    train = _clustered_set(3, 4, 3, 8, 0.3, seed=0)
    val = _clustered_set(3, 4, 3, 8, 0.3, seed=1)
    val.class_names = ["class_0", "class_1", "glioma"]
    with pytest.raises(ValueError, match="unknown to train: \\['glioma'\\]"):
        knn_evaluate(train, val, k=5)


def test_knn_evaluate_patch_only_without_hierarchy():
    train = _clustered_set(6, 5, 3, 8, 0.2, seed=0)
    val = _clustered_set(3, 5, 3, 8, 0.2, seed=1)
    val.slide_ids = val.patient_ids = None
    assert set(knn_evaluate(train, val, k=5)) == {f"patch/{m}" for m in ("acc", "top2", "top3", "mca", "map")}


def test_reference_aggregation_hand_made_example():
    # Four patches, two classes; kNN-like votes. Slide s1 (class 0) = patches A, B; slide s2 (class 1) = C, D.
    scores = torch.tensor([[30.0, 10.0], [0.0, 4.0], [1.0, 3.0], [2.0, 6.0]])
    slides = ["s1", "s1", "s2", "s2"]
    labels = torch.tensor([0, 0, 1, 1])
    # By hand. L1-normalised rows: A [0.75, 0.25], B [0, 1], C = D [0.25, 0.75]. Softmax of two values [a, b]
    # is [sigmoid(a - b), sigmoid(b - a)]: A [s(0.5), s(-0.5)], B [s(-1), s(1)], C = D [s(-0.5), s(0.5)].
    s = lambda x: 1.0 / (1.0 + np.exp(-x))  # noqa: E731
    a, b, c = [s(0.5), s(-0.5)], [s(-1.0), s(1.0)], [s(-0.5), s(0.5)]
    # A = [0.6225, 0.3775], B = [0.2689, 0.7311], C = D = [0.3775, 0.6225].
    expected_patches = torch.tensor([a, b, c, c], dtype=torch.float32)
    torch.testing.assert_close(reference_patch_scores(scores), expected_patches)
    # Slides: the sum of its patches' probabilities, L1-normalised (each row sums to 1, so: the mean).
    # s1 = ([0.6225, 0.3775] + [0.2689, 0.7311]) / 2 = [0.4457, 0.5543] -> class 1 (wrong);
    # s2 = [0.3775, 0.6225] -> class 1 (right).
    expected_slides = torch.tensor([[(a[0] + b[0]) / 2, (a[1] + b[1]) / 2], c], dtype=torch.float32)
    group_scores, group_labels = aggregate_scores(scores, slides, labels, aggregation="reference")
    torch.testing.assert_close(group_scores, expected_slides)
    assert group_labels.tolist() == [0, 1]
    # Raw sums: s1 = [30, 14] -> class 0 (right): patch A's confident votes outweigh B; s2 = [3, 9] -> class 1.
    raw, _ = aggregate_scores(scores, slides, labels, aggregation="sum")
    torch.testing.assert_close(raw, torch.tensor([[30.0, 14.0], [3.0, 9.0]]))
    reference = hierarchical_metrics(scores, labels, slides, None, 2, aggregation="reference")
    summed = hierarchical_metrics(scores, labels, slides, None, 2, aggregation="sum")
    assert reference["slide/acc"] == 0.5 and summed["slide/acc"] == 1.0
    # Per patch the transform keeps each row's order: patch accuracy (A, C, D right; B wrong) is the same.
    assert reference["patch/acc"] == summed["patch/acc"] == 0.75
    with pytest.raises(ValueError, match="aggregation must be one of \\('reference', 'sum'\\)"):
        hierarchical_metrics(scores, labels, slides, None, 2, aggregation="mean")


def _slow_reference_metrics_scores(scores, group_ids):
    """The reference rule straight from eval_knn_hlss_accplot.py's steps, one patch at a time in float64."""
    groups: dict[str, list[float]] = {}
    for row, group in zip(scores.double().tolist(), group_ids, strict=True):
        total = sum(abs(v) for v in row)
        normalised = [v / total for v in row]
        exps = [np.exp(v) for v in normalised]
        probs = [e / sum(exps) for e in exps]
        acc = groups.setdefault(group, [0.0] * len(row))
        groups[group] = [x + p for x, p in zip(acc, probs, strict=True)]
    return torch.tensor([[v / sum(row) for v in row] for row in groups.values()])


def test_reference_aggregation_matches_a_slow_loop_and_knn_evaluate_records_the_rule():
    train = _clustered_set(9, 6, 3, 8, 0.6, seed=0, prefix="t")
    val = _clustered_set(6, 6, 3, 8, 0.6, seed=1, prefix="v")
    scores = knn_scores(train, val, k=10)
    for ids in (val.slide_ids, val.patient_ids):
        fast, _ = aggregate_scores(scores, ids, aggregation="reference")
        slow = _slow_reference_metrics_scores(scores, ids)
        torch.testing.assert_close(fast.double(), slow, atol=1e-6, rtol=0)
    for rule in ("reference", "sum"):
        expected = hierarchical_metrics(
            scores, val.labels, val.slide_ids, val.patient_ids, 3, aggregation=rule
        )
        assert knn_evaluate(train, val, k=10, aggregation=rule) == expected
    assert knn_evaluate(train, val, k=10) == knn_evaluate(train, val, k=10, aggregation="reference")
    with pytest.raises(ValueError, match="aggregation must be one of"):
        knn_evaluate(train, val, k=10, aggregation="softmax")


def test_embedding_set_validates_lengths_and_labels():
    with pytest.raises(ValueError, match="slide_ids has 2 entries for 3"):
        EmbeddingSet(torch.zeros(3, 4), torch.zeros(3), ["a", "b"], None, ["x"])
    with pytest.raises(ValueError, match="labels \\[2\\] are outside"):
        EmbeddingSet(torch.zeros(3, 4), torch.tensor([0, 1, 2]), None, None, ["x", "y"])


def test_linear_probe_beats_chance_on_separable_embeddings():
    train = _clustered_set(12, 10, 4, 32, 0.15, seed=0, prefix="t")
    val = _clustered_set(8, 10, 4, 32, 0.15, seed=1, prefix="v")
    metrics, scores = linear_probe_evaluate(train, val)
    assert scores.shape == (80, 4)
    torch.testing.assert_close(scores.sum(dim=1), torch.ones(80))
    assert metrics["patch/acc"] > 0.8  # chance is 0.25
    assert metrics["patient/acc"] == 1.0


def test_linear_probe_is_deterministic():
    train = _clustered_set(6, 5, 3, 8, 0.5, seed=0)
    first, second = train_linear_probe(train, max_iter=20), train_linear_probe(train, max_iter=20)
    torch.testing.assert_close(first.weight, second.weight)


class _TextTowerModel(nn.Module):
    """Texts embed to the centre of the class named in them; images are already embeddings."""

    def __init__(self, centres, names):
        super().__init__()
        self.register_buffer("centres", centres)
        self.names = names
        self.text_model = nn.Identity()

    def get_text_features(self, input_ids, attention_mask):
        return self.centres[input_ids[:, 0]]


class _Tokenizer:
    def __init__(self, names):
        self.names = names

    def __call__(self, texts, **kwargs):
        ids = torch.tensor([[next(i for i, n in enumerate(self.names) if n in t)] for t in texts])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_zero_shot_scores_pick_the_closest_class_prompt():
    val = _clustered_set(6, 5, 3, 16, 0.2, seed=1)
    centres = F.normalize(torch.randn(3, 16, generator=torch.Generator().manual_seed(99)), dim=-1)
    model, tokenizer = _TextTowerModel(centres, val.class_names), _Tokenizer(val.class_names)
    prompts = {name: [f"a photo of {name}", f"tissue of {name}"] for name in val.class_names}
    scores = zero_shot_scores(model, tokenizer, val, prompts)
    assert scores.shape == (30, 3)
    assert (scores.argmax(1) == val.labels).float().mean() > 0.95


def test_class_text_embeddings_of_a_plain_clip_model():
    """transformers' CLIPModel returns a ModelOutput from get_text_features; its pooled output is the embedding."""
    from _tiny import clip_config, tiny_tokenizer
    from transformers import CLIPModel

    from hlss_hf.evaluation import class_text_embeddings

    torch.manual_seed(0)
    model, tokenizer = CLIPModel(clip_config()).eval(), tiny_tokenizer()
    prompts = {"a": ["dense nuclei", "many cells"], "b": ["sparse stroma"]}
    rows = class_text_embeddings(model, tokenizer, prompts, ["b", "a"])
    with torch.no_grad():
        tokens = tokenizer(prompts["a"], padding=True, return_tensors="pt")
        per_prompt = F.normalize(model.get_text_features(**tokens).pooler_output, dim=-1)
    assert rows.shape == (2, model.config.projection_dim)
    torch.testing.assert_close(rows[1], F.normalize(per_prompt.mean(0), dim=-1))


def test_zero_shot_errors():
    val = _clustered_set(3, 2, 3, 16, 0.2, seed=1)
    centres = torch.eye(3, 16)
    model, tokenizer = _TextTowerModel(centres, val.class_names), _Tokenizer(val.class_names)
    prompts = {name: [name] for name in val.class_names}
    with pytest.raises(ValueError, match="unknown classes \\['tumour'\\]"):
        zero_shot_scores(model, tokenizer, val, {**prompts, "tumour": ["x"]})
    with pytest.raises(ValueError, match="no prompt for classes \\['class_2'\\]"):
        zero_shot_scores(model, tokenizer, val, {k: v for k, v in prompts.items() if k != "class_2"})
    model.text_model = None
    with pytest.raises(ValueError, match="no text tower"):
        zero_shot_scores(model, tokenizer, val, prompts)
    with pytest.raises(ValueError, match="no text tower"):
        zero_shot_scores(nn.Linear(2, 2), tokenizer, val, prompts)


# ------------------------------------------------------------------------------------------------------------------
# Extraction
# ------------------------------------------------------------------------------------------------------------------


class _CountingModel(nn.Module):
    def __init__(self, dim=8):
        super().__init__()
        self.proj = nn.Linear(3, dim)
        self.calls = 0

    def get_image_features(self, pixel_values):
        self.calls += 1
        return self.proj(pixel_values.mean(dim=(2, 3)))


def _he_dataset(n=10, split="train", hierarchy=True, seed=0):
    from _tiny import he_rows

    features = features_for("he", ["a", "b"])
    rows = he_rows(
        n,
        seed,
        x=[0] * n,
        y=[0] * n,
        level=[0] * n,
        mpp=[float("nan")] * n,
        magnification=[float("nan")] * n,
        source=["test"] * n,
    )
    dataset = datasets.Dataset.from_dict(rows, features=features, split=split)
    if not hierarchy:
        dataset = dataset.remove_columns(["slide_id", "patient_id"])
    return dataset


def test_extract_embeddings_batches_and_normalises():
    torch.manual_seed(0)
    model, dataset = _CountingModel(), _he_dataset(10)
    result = extract_embeddings(model, dataset, batch_size=4, progress=False)
    assert model.calls == 3
    assert result.embeddings.shape == (10, 8) and result.embeddings.dtype == torch.float32
    torch.testing.assert_close(result.embeddings.norm(dim=1), torch.ones(10))
    assert result.labels.tolist() == dataset["label"][:]
    assert result.slide_ids == [f"s{i // 2}" for i in range(10)]
    assert result.patient_ids[-1] == "p2" and result.class_names == ["a", "b"]
    # Same as embedding one image at a time from its [0, 1] pixels.
    first = np.asarray(dataset[0]["image"], dtype=np.float32) / 255.0
    expected = F.normalize(model.proj(torch.from_numpy(first).mean(dim=(0, 1))), dim=-1)
    torch.testing.assert_close(result.embeddings[0], expected.detach(), rtol=1e-5, atol=1e-5)


def test_extract_embeddings_cache_skips_forward(tmp_path):
    torch.manual_seed(0)
    model, dataset = _CountingModel(), _he_dataset(6)
    first = extract_embeddings(model, dataset, batch_size=4, cache_dir=tmp_path, progress=False)
    assert model.calls == 2
    second = extract_embeddings(model, dataset, batch_size=4, cache_dir=tmp_path, progress=False)
    assert model.calls == 2, "cached embeddings must not run the model again"
    torch.testing.assert_close(second.embeddings, first.embeddings)
    assert second.slide_ids == first.slide_ids
    # Changed weights -> new fingerprint -> new forward passes.
    with torch.no_grad():
        model.proj.bias.add_(1.0)
    extract_embeddings(model, dataset, batch_size=4, cache_dir=tmp_path, progress=False)
    assert model.calls == 4
    # Another split of other data -> another cache entry.
    extract_embeddings(
        model, _he_dataset(6, split="validation", seed=1), batch_size=8, cache_dir=tmp_path, progress=False
    )
    assert model.calls == 5
    assert len(list(tmp_path.glob("embeddings-*.pt"))) == 3
    assert not list(tmp_path.glob(".*tmp"))


def test_extract_embeddings_with_workers_equals_the_main_process():
    torch.manual_seed(0)
    model, dataset = _CountingModel(), _he_dataset(10)
    alone = extract_embeddings(model, dataset, batch_size=4, progress=False)
    workers = extract_embeddings(model, dataset, batch_size=4, progress=False, num_workers=2)
    assert model.calls == 6  # 3 batches each, in order
    assert torch.equal(workers.embeddings, alone.embeddings)
    with pytest.raises(ValueError, match="num_workers must be >= 0, got -1"):
        extract_embeddings(model, dataset, num_workers=-1, progress=False)


def test_model_fingerprint_tracks_weights():
    torch.manual_seed(0)
    a, b = _CountingModel(), _CountingModel()
    b.load_state_dict(a.state_dict())
    assert model_fingerprint(a) == model_fingerprint(b)
    with torch.no_grad():
        b.proj.weight[0, 0] += 1e-3
    assert model_fingerprint(a) != model_fingerprint(b)


def test_extract_embeddings_without_hierarchy_warns():
    with pytest.warns(UserWarning, match="only patch-level metrics"):
        result = extract_embeddings(_CountingModel(), _he_dataset(4, hierarchy=False), progress=False)
    assert result.slide_ids is None and result.patient_ids is None


def test_extract_embeddings_rejects_empty_split():
    empty = _he_dataset(4, split="validation").select([])
    with pytest.raises(ValueError, match="split 'validation' is empty"):
        extract_embeddings(_CountingModel(), empty, progress=False)


def test_extract_embeddings_rejects_missing_label_and_dataset_dict():
    with pytest.raises(ValueError, match="no 'label' column"):
        extract_embeddings(_CountingModel(), _he_dataset(4).remove_columns("label"), progress=False)
    with pytest.raises(ValueError, match="one split"):
        extract_embeddings(_CountingModel(), datasets.DatasetDict(train=_he_dataset(4)), progress=False)


def test_extract_embeddings_uses_processor():
    class Processor:
        def __call__(self, images, return_tensors):
            return {"pixel_values": torch.ones(len(images), 3, 2, 2)}

    model = _CountingModel()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = extract_embeddings(model, _he_dataset(3), processor=Processor(), progress=False)
    expected = F.normalize(model.proj(torch.ones(3)), dim=-1).detach()
    torch.testing.assert_close(result.embeddings, expected.expand(3, -1))


def test_extract_embeddings_srh_uses_srh_conversion():
    from hlss_hf.models.hlss.pixels_hlss import srh_to_float

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 65535, (12, 12, 2), dtype=np.uint16) for _ in range(3)]
    dataset = datasets.Dataset.from_dict(
        {
            "image": images,
            "patient_id": ["p0", "p0", "p1"],
            "slide_id": ["s0", "s0", "s1"],
            "patch_id": ["a", "b", "c"],
            "label": [0, 0, 1],
            "x": [0] * 3,
            "y": [0] * 3,
            "level": [0] * 3,
            "mpp": [float("nan")] * 3,
            "magnification": [float("nan")] * 3,
            "source": ["opensrh"] * 3,
        },
        features=features_for("srh", ["hgg", "lgg"], patch_size=12),
    )
    model = _CountingModel()
    result = extract_embeddings(model, dataset, batch_size=2, progress=False)
    expected = F.normalize(model.proj(srh_to_float(images[2]).mean(dim=(1, 2))), dim=-1).detach()
    torch.testing.assert_close(result.embeddings[2], expected, rtol=1e-5, atol=1e-5)
    assert result.class_names == ["hgg", "lgg"] and result.patient_ids == ["p0", "p0", "p1"]


def _encoded(image: np.ndarray, fmt: str, mode: str | None = None) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    pil = Image.fromarray(image)
    pil = pil.convert(mode) if mode else pil
    pil.save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


@pytest.mark.parametrize(
    "fmt, mode, fast",
    [("PNG", None, True), ("JPEG", None, True), ("PNG", "L", False), ("PNG", "RGBA", False), ("PNG", "P", False),
     ("JPEG", "L", False), ("TIFF", None, False)],
)  # fmt: skip
def test_batch_decoding_gives_pils_pixels_for_every_kind_of_image(fmt, mode, fast, tmp_path):
    import io

    from PIL import Image

    from hlss_hf.data.schema import _decode_rgb8, decode_image
    from hlss_hf.evaluation.embeddings import _decode_images

    image = np.random.default_rng(3).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    data = _encoded(image, fmt, mode)
    with Image.open(io.BytesIO(data)) as pil:
        expected = np.asarray(pil.convert("RGB"))
    # 8-bit RGB PNG / JPEG take the imagecodecs path; grey, alpha, palette and TIFF go to PIL.
    assert (_decode_rgb8(data) is not None) == fast
    path = tmp_path / f"patch.{fmt.lower()}"
    path.write_bytes(data)
    values = [{"bytes": data, "path": None}, data, {"bytes": None, "path": str(path)}]
    for decoded in [*_decode_images(values), decode_image(values[0])]:
        assert decoded.dtype == np.uint8 and decoded.shape == (20, 24, 3)
        np.testing.assert_array_equal(decoded, expected)


def test_array_columns_are_read_stacked_in_their_own_dtype():
    from hlss_hf.data.hierarchy import _FixedArrayReader
    from hlss_hf.evaluation.embeddings import _image_column

    images = [np.full((6, 6, 2), 60000 + i, dtype=np.uint16) for i in range(3)]
    data = datasets.Dataset.from_dict(
        {"image": images}, features=datasets.Features({"image": datasets.Array3D((6, 6, 2), "uint16")})
    )
    batch = _FixedArrayReader(_image_column(data)).slice(0, 3)  # how extraction's batches read it
    # One [N, H, W, C] uint16 array (datasets' numpy formatting would widen it to int64 otherwise).
    assert isinstance(batch, np.ndarray) and batch.dtype == np.uint16 and batch.shape == (3, 6, 6, 2)
    np.testing.assert_array_equal(batch, np.stack(images))


def test_array_batches_are_views_of_the_mapped_data_where_rows_are_consecutive(tmp_path):
    from hlss_hf.data.hierarchy import _FixedArrayReader
    from hlss_hf.evaluation.embeddings import _image_column, _ImageBatches, _pixels

    images = [np.full((6, 6, 2), 100 + i, dtype=np.uint16) for i in range(10)]
    features = datasets.Features({"image": datasets.Array3D((6, 6, 2), "uint16")})
    parts = [
        datasets.Dataset.from_dict({"image": images[a:b]}, features=features) for a, b in ((0, 6), (6, 10))
    ]
    datasets.concatenate_datasets(parts).save_to_disk(str(tmp_path / "d"), max_shard_size="1KB")
    data = datasets.load_from_disk(str(tmp_path / "d"))
    reader = _FixedArrayReader(data)
    assert len(reader.chunks) > 1  # several Arrow chunks: some slices straddle two
    for start, stop in ((0, 4), (2, 9), (9, 10)):
        batch = reader.slice(start, stop)
        np.testing.assert_array_equal(batch, np.stack(images[start:stop]))
        one_chunk = any(
            a <= start and stop <= b for a, b in zip(reader.starts, reader.starts[1:], strict=False)
        )
        assert (not batch.flags.writeable) == one_chunk  # a read-only view of the Arrow buffer, else a stack
    # A selection (as the distributed extraction makes): consecutive runs stay views, others are stacked.
    picked = data.select([3, 4, 5, 1, 0])
    order = [images[i] for i in (3, 4, 5, 1, 0)]
    assert not _FixedArrayReader(picked).slice(0, 3).flags.writeable
    np.testing.assert_array_equal(_FixedArrayReader(picked).slice(0, 5), np.stack(order))
    # The batches extraction reads give what datasets' own slicing gives.
    batches = _ImageBatches(_image_column(picked), 2, None, "srh", None)
    column = picked.with_format("numpy", dtype=np.uint16)
    for i in range(len(batches)):
        torch.testing.assert_close(batches[i], _pixels(column[2 * i : 2 * i + 2]["image"], None, "srh", None))


def test_extract_embeddings_of_png_patches_equals_the_per_image_pil_path():
    from PIL import Image

    from hlss_hf.models.hlss.processing_hlss import HLSSImageProcessor

    rng = np.random.default_rng(4)
    images = [rng.integers(0, 256, (40, 40, 3), dtype=np.uint8) for _ in range(5)]
    data = datasets.Dataset.from_dict(
        {"image": [Image.fromarray(i) for i in images], "label": [0, 1, 0, 1, 0]},
        features=datasets.Features(
            {"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])}
        ),
    )
    processor = HLSSImageProcessor(modality="he", crop_size=32, do_normalize=True)
    model = _CountingModel()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no hierarchy columns
        result = extract_embeddings(model, data, processor=processor, batch_size=2, progress=False)
    with torch.no_grad():
        expected = torch.cat(
            [model.get_image_features(processor(images=Image.fromarray(i))["pixel_values"]) for i in images]
        )
    torch.testing.assert_close(result.embeddings, F.normalize(expected, dim=-1), rtol=0, atol=1e-6)


def test_model_fingerprint_is_remembered_until_a_tensor_changes():
    torch.manual_seed(0)
    model = _CountingModel()
    first = model_fingerprint(model)
    assert model_fingerprint(model) == first
    original = model.proj.weight.detach().clone()
    with torch.no_grad():
        model.proj.weight.mul_(2)  # in place: bumps the version counter
    changed = model_fingerprint(model)
    assert changed != first
    model.proj.weight = nn.Parameter(original.clone())  # a new tensor holding the original values
    assert model_fingerprint(model) == first
    model.load_state_dict({"proj.weight": original * 2, "proj.bias": model.proj.bias.detach()})
    assert model_fingerprint(model) == changed


def test_default_num_workers(monkeypatch):
    from hlss_hf.data import default_num_workers

    assert default_num_workers("cpu") == 0
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert default_num_workers("cuda") == 7
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert default_num_workers(torch.device("cuda", 0)) == 16
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert default_num_workers("cuda") == 0
    # Processes launched on one machine share its cores: 64 cores among 4 GPU processes leave 15 workers each.
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert default_num_workers("cuda") == 15
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert default_num_workers("cuda") == 7


# ------------------------------------------------------------------------------------------------------------------
# Streamed splits and evaluation across processes
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_workers", [0, 2])
def test_extract_embeddings_of_a_stream_equals_the_map_style_split(num_workers):
    torch.manual_seed(0)
    model, dataset = _CountingModel(), _he_dataset(10)
    expected = extract_embeddings(model, dataset, batch_size=4, progress=False)
    stream = dataset.to_iterable_dataset(num_shards=3)
    assert isinstance(stream, datasets.IterableDataset)
    streamed = extract_embeddings(model, stream, batch_size=4, progress=False, num_workers=num_workers)
    assert torch.equal(streamed.embeddings, expected.embeddings)
    assert streamed.labels.tolist() == expected.labels.tolist()
    assert streamed.slide_ids == expected.slide_ids and streamed.patient_ids == expected.patient_ids
    assert streamed.class_names == expected.class_names


def test_extract_embeddings_of_a_stream_of_srh_arrays_equals_the_map_style_split():
    rng = np.random.default_rng(0)
    rows = {
        "image": [rng.integers(0, 65535, (12, 12, 2), dtype=np.uint16) for _ in range(5)],
        "label": [0, 1, 0, 1, 1],
        "slide_id": ["s0", "s0", "s1", "s1", "s2"],
        "patient_id": ["p0"] * 4 + ["p1"],
    }
    features = features_for("srh", ["hgg", "lgg"], patch_size=12)
    features = datasets.Features({name: features[name] for name in rows})
    dataset = datasets.Dataset.from_dict(rows, features=features)
    model = _CountingModel()
    expected = extract_embeddings(model, dataset, batch_size=2, progress=False)
    streamed = extract_embeddings(model, dataset.to_iterable_dataset(), batch_size=2, progress=False)
    assert torch.equal(streamed.embeddings, expected.embeddings)
    assert streamed.patient_ids == expected.patient_ids


def test_a_stream_is_not_cached_and_an_empty_or_untyped_stream_is_named(tmp_path):
    model, dataset = _CountingModel(), _he_dataset(4, split="train")
    with pytest.warns(UserWarning, match="is streamed: its embeddings are not cached"):
        extract_embeddings(model, dataset.to_iterable_dataset(), cache_dir=tmp_path, progress=False)
    assert not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="is empty: nothing to embed"):
        extract_embeddings(model, dataset.to_iterable_dataset().take(0), progress=False)

    def rows():
        yield {"image": np.zeros((4, 4, 3), np.uint8), "label": 0}

    with pytest.raises(ValueError, match="no declared features"):
        extract_embeddings(model, datasets.IterableDataset.from_generator(rows), progress=False)


def test_stream_rounds_give_each_process_its_slice_and_pad_the_last_round():
    from hlss_hf.evaluation.embeddings import _split_info, _StreamRounds

    dataset = _he_dataset(10)
    stream = dataset.to_iterable_dataset(num_shards=2)
    info = _split_info(stream)
    # 3 processes x 2 rows per round: rows 0-5, then 6-9; the last round does not reach process 2.
    seen = {}
    for rank in range(3):
        items = list(_StreamRounds(stream, info, 2, 3, rank, None, None))
        seen[rank] = [(n, len(pixels)) for pixels, n, _ in items]
        assert [rows["slide_id"] for _, _, rows in items] == [
            dataset["slide_id"][:6],
            dataset["slide_id"][6:],
        ]
    assert seen == {0: [(2, 2), (2, 2)], 1: [(2, 2), (2, 2)], 2: [(2, 2), (0, 1)]}


@pytest.fixture
def tiny_hlss():
    from _tiny import tiny_hlss_model

    return tiny_hlss_model()


def test_distributed_knn_on_one_process_equals_extract_and_knn_evaluate(tiny_hlss, fresh_accelerate_state):
    from accelerate import Accelerator

    from hlss_hf.evaluation import distributed_knn_evaluate
    from hlss_hf.evaluation.distributed import _embed_across_processes

    train, val = _he_dataset(10), _he_dataset(6, split="validation", seed=1)
    expected = knn_evaluate(
        extract_embeddings(tiny_hlss, train, batch_size=4, progress=False),
        extract_embeddings(tiny_hlss, val, batch_size=4, progress=False),
        k=3,
    )
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(tiny_hlss)
    model.train()
    rng = torch.get_rng_state()
    metrics = distributed_knn_evaluate(accelerator, model, train, val, batch_size=4, k=3)
    assert metrics == expected and "patient/acc" in metrics
    assert torch.equal(torch.get_rng_state(), rng) and model.training
    streamed = distributed_knn_evaluate(
        accelerator, model, train.to_iterable_dataset(), val, batch_size=4, k=3
    )
    assert streamed == expected
    with torch.no_grad():
        embedded = _embed_across_processes(accelerator, model.eval(), train, None, 4, None, False)
    assert torch.equal(
        embedded.embeddings, extract_embeddings(tiny_hlss, train, batch_size=4, progress=False).embeddings
    )
    assert embedded.slide_ids == train["slide_id"]


def test_distributed_knn_needs_image_embeds_and_reports_knn_errors(tiny_hlss, fresh_accelerate_state):
    from accelerate import Accelerator

    from hlss_hf.evaluation import distributed_knn_evaluate

    accelerator = Accelerator(cpu=True)
    train, val = _he_dataset(4), _he_dataset(4, split="validation", seed=1)

    class TensorForward(_CountingModel):
        def forward(self, pixel_values, **kwargs):
            return self.get_image_features(pixel_values)

    with pytest.raises(TypeError, match="TensorForward.forward.* returned no image_embeds"):
        distributed_knn_evaluate(accelerator, TensorForward(), train, val)
    with pytest.raises(ValueError, match="aggregation must be one of"):
        distributed_knn_evaluate(accelerator, tiny_hlss, train, val, aggregation="mean")
    other = _he_dataset(4, split="validation").cast_column("label", datasets.ClassLabel(names=["x", "y"]))
    with pytest.raises(ValueError, match="class"):
        distributed_knn_evaluate(accelerator, tiny_hlss, train, other, k=2)
