"""HLSS attribute banks as files: reading, validating, and the sets shipped with the package (docs/method.md,
attribute banks). Remote code: the standard library and PyYAML (a transformers dependency) only.
"""

from __future__ import annotations

import json
import os

from .configuration_hlss import LEVELS

__all__ = ["REFERENCE_BANK_KEYS", "load_attributes", "shipped_attribute_file"]


def shipped_attribute_file(name: str) -> str:
    """The path of an attribute set shipped with the package, by file name with or without `.yaml`."""
    # Absent where this file runs as remote code: the sets travel with the package, not with saved models.
    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "attributes")
    shipped = sorted(f for f in os.listdir(folder) if f.endswith(".yaml")) if os.path.isdir(folder) else []
    for candidate in (name, f"{name}.yaml"):
        if candidate in shipped:
            return os.path.join(folder, candidate)
    raise ValueError(f"attribute file {name!r} does not exist and is not a shipped set {shipped}")


# Where the HLSS reference's training config (hlss/config/train_hlss_attr3levels.yaml of GitHub Hasindri/HLSS) keeps
# its banks: under `model:`, one attribute -> descriptions mapping per level. Read as it is (names, order and
# descriptions unchanged), so that users can point at that file for the reference's own descriptions (this package
# ships none of its text).
REFERENCE_BANK_KEYS = {level: f"{level}_templates" for level in LEVELS}


def _reference_banks(attributes: dict, source: str) -> dict | None:
    """The level -> bank mapping of a reference-style config file, or None when `attributes` is not one."""
    model = attributes.get("model")
    if set(attributes) & set(LEVELS) or not isinstance(model, dict):
        return None
    present = [key for key in REFERENCE_BANK_KEYS.values() if key in model]
    if not present:
        return None
    missing = [key for key in REFERENCE_BANK_KEYS.values() if key not in model]
    if missing:
        raise ValueError(f"{source}: a reference config with model.{present[0]} but no model.{missing[0]}")
    return {level: model[key] for level, key in REFERENCE_BANK_KEYS.items()}


def _unique_pairs(pairs: list[tuple]) -> dict:
    """A JSON object whose keys are unique (``json.loads`` would keep the last of two same-named attributes)."""
    result = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"the key {key!r} appears twice in one mapping")
        result[key] = value
    return result


def _yaml_repeated_keys(text: str) -> tuple[object, list[str]]:
    """``yaml.safe_load``, and a sentence for each key repeated in one mapping (PyYAML keeps the last one silently:
    a second attribute of the same name would drop the first without a word)."""
    import yaml  # transformers depends on pyyaml; imported here so JSON users never need it

    repeated = []

    class RepeatedKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if key in seen:
                    repeated.append(
                        f"the key {key!r} appears twice in one mapping (line {key_node.start_mark.line + 1})"
                    )
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return yaml.load(text, Loader=RepeatedKeyLoader), repeated  # noqa: S506 - a SafeLoader subclass


def load_attributes(attributes) -> dict[str, dict[str, list[str]]]:
    """Read and validate an attribute bank description.

    Format (YAML or JSON; attributes/README.md): a mapping level -> attribute name -> list of description strings,
    with the levels `patch`, `slide` and `patient`; a single string is a one-description list. The HLSS reference's
    own training config is accepted as it is (`REFERENCE_BANK_KEYS`; the rest of that file is ignored).

    Args:
        attributes (`dict` or `str` or `os.PathLike`): the mapping itself, a `.yaml` / `.yml` / `.json` file, or
            the name of a set shipped in `hlss_hf/models/hlss/attributes/` (`"he_tcga"`, `.yaml` optional).

    Returns:
        `dict[str, dict[str, list[str]]]`: the validated mapping, levels in the order patch, slide, patient.
    """
    source, repeated = "attributes", []
    if isinstance(attributes, (str, os.PathLike)):
        path = os.fspath(attributes)
        source = path
        if not os.path.isfile(path):
            path = shipped_attribute_file(path)
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
        try:
            if path.lower().endswith(".json"):
                attributes = json.loads(text, object_pairs_hook=_unique_pairs)
            else:
                attributes, repeated = _yaml_repeated_keys(text)
        except Exception as err:  # noqa: BLE001 - re-raised with the file name
            reason = " ".join(str(err).split())
            raise ValueError(f"attribute file {path!r} could not be parsed: {reason}") from err
    if not isinstance(attributes, dict):
        raise ValueError(
            f"{source}: expected a mapping level -> attribute -> descriptions, got {type(attributes)}"
        )
    reference = _reference_banks(attributes, source)
    if reference is None and repeated:
        # The reference's own file repeats a few names (its loader keeps each at its first place with the last
        # descriptions, as PyYAML does here); in our format a repeat is a mistake.
        raise ValueError(f"attribute file {source!r}: {repeated[0]}")
    attributes = reference or attributes
    unknown = sorted(str(k) for k in set(attributes) - set(LEVELS))
    if unknown:
        raise ValueError(f"{source}: unknown level(s) {unknown}; levels are {list(LEVELS)}")
    checked: dict[str, dict[str, list[str]]] = {}
    for level in LEVELS:
        bank = attributes.get(level)
        if not isinstance(bank, dict) or not bank:
            raise ValueError(f"{source}: level {level!r} is missing or has no attributes")
        checked[level] = {}
        for name, descriptions in bank.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"{source}: level {level!r} has an attribute with an invalid name {name!r}")
            if isinstance(descriptions, str):
                descriptions = [descriptions]
            if not isinstance(descriptions, (list, tuple)) or not descriptions:
                raise ValueError(f"{source}: attribute {level}/{name} has no descriptions")
            bad = [d for d in descriptions if not isinstance(d, str) or not d.strip()]
            if bad:
                raise ValueError(
                    f"{source}: attribute {level}/{name} has empty or non-string descriptions {bad!r}"
                )
            checked[level][name] = list(descriptions)
    return checked
