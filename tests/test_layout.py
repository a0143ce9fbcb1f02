"""The layout stays as built: modules of a readable size, no import cycles, remote code that needs no hlss_hf."""

import ast
import graphlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "hlss_hf"
REMOTE_CODE = PACKAGE / "models" / "hlss"  # copied into saved folders by basename, imported without hlss_hf
MAX_LINES = 700


def _sources() -> list[Path]:
    return sorted([*PACKAGE.rglob("*.py"), ROOT / "train.py", ROOT / "finetune.py", *ROOT.glob("dataset_scripts/*.py")])


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_modules(path: Path, known: set[str]) -> set[str]:
    """hlss_hf modules that `path` imports anywhere (inside functions too), resolved to the modules we have."""
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in known)
    return found


def test_no_module_over_the_size_limit():
    too_long = {
        str(path.relative_to(ROOT)): n
        for path in _sources()
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not too_long, f"modules over {MAX_LINES} lines: {too_long}"


def test_hlss_hf_modules_import_without_cycles():
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in paths.items():
        # A package's __init__ runs before its modules; an edge to a parent package is not a cycle of ours.
        graph[name] = {m for m in _imported_modules(path, set(paths)) if m != name and not name.startswith(m + ".")}
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as err:
        pytest.fail(f"import cycle: {' -> '.join(err.args[1])}")


def test_remote_code_imports_only_its_siblings():
    siblings = {p.stem for p in REMOTE_CODE.glob("*.py")}
    for path in REMOTE_CODE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                # transformers copies a sibling only when it is named as `from .name import ...`
                assert node.level == 1 and node.module in siblings, f"{path.name}: from {'.' * node.level}{node.module}"
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and not node.level:
                modules = [node.module]
            assert not any(m.split(".")[0] == "hlss_hf" for m in modules), f"{path.name} imports hlss_hf"
