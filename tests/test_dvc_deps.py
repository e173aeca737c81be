"""dvc.yaml declares every project module a stage's command can import, so a change to one re-runs the stage.

Static: the imports of the stage's component (`python -m components.X`), followed through every veorl and
components module they name, function-level imports included, must each lie in a file or folder the stage lists
under `deps`. A stage that missed one would keep a stale result after that module changed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PROJECT_PACKAGES = ("veorl", "components")


def module_file(name: str) -> Path | None:
    parts = name.split(".")
    base = REPO / "src" if parts[0] == "veorl" else REPO
    path = base.joinpath(*parts)
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    return None  # a name imported from a module (a function or class), not a module itself


def imported_names(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return {n for n in names if n.split(".")[0] in PROJECT_PACKAGES}


def import_closure(start: Path) -> set[Path]:
    seen: set[Path] = set()
    todo = [start]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in imported_names(path):
            parts = name.split(".")
            for k in range(1, len(parts) + 1):  # the module and every package above it run on import
                found = module_file(".".join(parts[:k]))
                if found is not None:
                    todo.append(found)
    return seen


STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_module_a_stage_imports_is_one_of_its_deps(stage):
    spec = STAGES[stage]
    component = spec["cmd"].split("-m ", 1)[1].split()[0]
    start = module_file(component)
    assert start is not None, f"{stage}: cannot find {component}"
    deps = [str(d).rstrip("/") for d in spec["deps"]]
    files = {p.relative_to(REPO).as_posix() for p in import_closure(start) if p.name != "__init__.py"}
    missing = sorted(f for f in files if not any(f == d or f.startswith(d + "/") for d in deps))
    assert not missing, f"dvc.yaml stage {stage} imports {missing} without listing them under deps"
    assert len(files) > 1  # the walk followed the component's imports
