"""The import graph points one way: pipeline (app) -> stages -> stages.common (core).

Every import statement of every module is read from its source (imports inside functions
too), relative ones resolved to absolute module names."""

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORE = "stages.common"
STAGES = sorted(p.name for p in (ROOT / "stages").iterdir()
                if (p / "__init__.py").exists() and p.name != "common")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Absolute names of the modules that `path` imports (for "from X import y", X and X.y)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            out.add(source)
            out.update(f"{source}.{alias.name}" for alias in node.names)
    return out


def project_imports(path: Path) -> set[str]:
    return {m for m in imported_modules(path) if m.split(".")[0] in ("stages", "pipeline")}


def modules_under(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def test_the_graph_reader_sees_relative_and_lazy_imports(tmp_path, monkeypatch):
    fake = tmp_path / "stages" / "rerank"
    fake.mkdir(parents=True)
    (fake / "x.py").write_text("from . import merge\nfrom ..common.cache import FeatureStore\n"
                               "def f():\n    from pipeline.run import run\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert project_imports(fake / "x.py") >= {"stages.rerank.merge", "stages.common.cache",
                                              "stages.common.cache.FeatureStore", "pipeline.run"}


def test_there_are_stages_to_check():
    assert {"global_embed", "local_delf", "rerank"} <= set(STAGES)


@pytest.mark.parametrize("path", modules_under("stages/common"), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_core_imports_nothing_above_it(path):
    upward = {m for m in project_imports(path) if not (m == CORE or m.startswith(CORE + "."))}
    assert not upward, f"{path.relative_to(ROOT)} (core) imports {sorted(upward)}"


@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_imports_only_the_core_and_itself(stage):
    own = f"stages.{stage}"
    for path in modules_under(f"stages/{stage}"):
        bad = {m for m in project_imports(path)
               if not any(m == p or m.startswith(p + ".") for p in (CORE, own))}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}: stages import only {CORE} and themselves"


def test_nothing_under_stages_imports_the_app():
    for path in modules_under("stages"):
        assert not any(m.split(".")[0] == "pipeline" for m in project_imports(path)), path
