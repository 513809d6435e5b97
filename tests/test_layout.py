"""The shape of the house: import rules, the installed package list, and complete cache keys.

The import graph is read from the source (every `import`, also inside functions), so a lazy
import counts as much as one at the top of a module.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

from tuneline import pipeline, store
from tuneline.recipe import FileSource
from tuneline.sources.collect import run_collect

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
PACKAGE_DIRS = {"tuneline": ROOT / "tuneline"} | {
    name: ROOT / folder for name, folder in PYPROJECT["tool"]["setuptools"]["package-dir"].items()
}
# The pipeline's parts, lowest first: a part may import the ones before it, never one after it.
LAYERS = ("recipe", "formats", "sources", "augment", "curate", "evaluate", "train", "register", "cli")
# The layers above the core: the only project code that may import Prefect.
ORCHESTRATION = ("tuneline.flows", "tuneline.tasks", "tuneline.cli")
# Modules a stage's code digest may leave out, and why.
NOT_IN_CODE_DIGESTS = {
    "tuneline": "the package version is in every stage digest",
    "tuneline.errors": "exception classes only",
    "tuneline.store": "writes the stage folder, not its content",
    "tuneline.objectstore": "copies stage folders to and from an object store, not their content",
    "tuneline.pipeline": "the stage catalogue (names and code lists)",
    "tuneline.recipe": "the section's content is in the digest, defaults and validation included",
}


def project_modules() -> dict[str, Path]:
    """Every project module by dotted name, the folders mapped by package-dir included."""
    modules: dict[str, Path] = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


MODULES = project_modules()


def imports_of(name: str) -> set[str]:
    """Every module that module `name` imports (third-party ones too), resolved to modules."""
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    project = {module for module in found if module in MODULES}
    return project | {module for module in found if not module.startswith("tuneline")}


def project_imports(name: str) -> set[str]:
    """The project modules that `name` imports, with the packages that importing them runs."""
    direct = {module for module in imports_of(name) if module in MODULES}
    parents = {module.rsplit(".", depth)[0] for module in direct for depth in range(1, module.count("."))}
    return (direct | parents) - {name}


def closure(entry: str) -> set[str]:
    """Every project module that importing `entry` and running its functions can import."""
    seen: set[str] = set()
    todo = [entry]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(project_imports(name))
    return seen


def part_of(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def test_pyproject_installs_every_package_folder():
    packages = {name for name, path in MODULES.items() if path.name == "__init__.py"}
    assert set(PYPROJECT["tool"]["setuptools"]["packages"]) == packages


def test_no_generic_top_level_names_are_installed():
    assert {name.split(".")[0] for name in PYPROJECT["tool"]["setuptools"]["packages"]} == {"tuneline"}


def test_the_core_never_imports_prefect():
    offenders = {
        name: sorted(m for m in imports_of(name) if m.split(".")[0] == "prefect")
        for name in MODULES
        if not name.startswith(ORCHESTRATION)
    }
    assert {name: found for name, found in offenders.items() if found} == {}


def test_no_part_imports_a_later_part():
    backwards = [
        f"{name} imports {imported}"
        for name in MODULES
        if (part := part_of(name))
        for imported in project_imports(name)
        if (other := part_of(imported)) and LAYERS.index(other) > LAYERS.index(part)
    ]
    assert backwards == []


def test_nothing_below_the_cli_imports_it():
    users = [
        f"{name} imports {imported}"
        for name in MODULES
        if not name.startswith(ORCHESTRATION)
        for imported in project_imports(name)
        if imported.startswith("tuneline.cli")
    ]
    assert users == []


def test_no_import_cycles():
    graph = {name: {m for m in project_imports(name) if m in MODULES} for name in MODULES}
    cycles = []
    for start in graph:
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start and not _is_package_of(start, path):
                    cycles.append(" -> ".join([*path, start]))
                elif nxt not in path and nxt > start:  # each cycle once, from its smallest module
                    stack.append((nxt, [*path, nxt]))
    assert cycles == []


def _is_package_of(start: str, path: list[str]) -> bool:
    """A package's __init__ importing its own submodules is no cycle: importing a submodule runs it."""
    return all(module.startswith(start + ".") or module == start for module in path) or any(
        start.startswith(module + ".") for module in path
    )


@pytest.mark.parametrize("stage", pipeline.STAGES, ids=lambda stage: stage.name)
def test_a_stages_code_digest_covers_every_module_it_runs(stage):
    covered = set(store.stage_code_files(stage))
    exempt = lambda name: name in NOT_IN_CODE_DIGESTS or name.startswith("tuneline.recipe.")  # noqa: E731
    missing = sorted(
        name for name in closure(stage.entry) if not exempt(name) and MODULES[name].resolve() not in covered
    )
    assert missing == [], f"stage {stage.name} runs {missing}; add them to its code in tuneline/pipeline.py"


def test_stage_names_are_unique():
    names = [stage.name for stage in pipeline.STAGES]
    assert len(names) == len(set(names))


@pytest.fixture
def edited_code(monkeypatch):
    """Pretend one source file changed: its digested bytes get a comment appended."""

    def edit(module: str) -> None:
        target = MODULES[module].resolve()
        original = store.read_code
        monkeypatch.setattr(
            store, "read_code", lambda path: original(path) + (b"\n# edited" if path == target else b"")
        )

    return edit


def test_a_change_to_a_reader_reruns_collect_and_a_change_to_training_does_not(tmp_path, edited_code):
    data = tmp_path / "data.jsonl"
    data.write_text('{"instruction": "Say hi", "output": "Hi!"}\n', encoding="utf-8")
    sources = [FileSource(name="demo", kind="file", path=str(data))]
    first = run_collect(tmp_path / "art", sources)

    edited_code("tuneline.train.stage")
    assert run_collect(tmp_path / "art", sources) == first  # reused: training code is not collect's

    edited_code("tuneline.formats.codecs")  # where the Alpaca reader lives
    second = run_collect(tmp_path / "art", sources)
    assert second.digest != first.digest and second.file("records.jsonl").is_file()
    assert {p.name for p in (tmp_path / "art" / "stages" / "collect").iterdir()} == {
        first.digest,
        second.digest,
    }
