"""The package's layers (docs/architecture.md): every import in src/ml_optim_plugins, at the top of a module or inside a
function, is checked against the allowed-imports table of that page, mirrored here as ``LAYERS`` and ``SEAMS``."""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
PAGE = REPO / "docs" / "architecture.md"
PACKAGE = "ml_optim_plugins"
ROOT = "__init__"  # the unit of ml_optim_plugins/__init__.py, the public API

# docs/architecture.md, "The layers": layer -> (its units, what it may import). A unit is a top-level module or
# subpackage of ml_optim_plugins; "may import" names layers, or one module of a unit ("multimodal.contract").
LAYERS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "base": (
        frozenset({"batch_slicing", "hyperparameters", "lightning_internals", "logger_metrics", "metric_names",
                   "module_copy", "names", "nonfinite", "process_group", "rank_mean", "rank_seed", "resume", "step_loss",
                   "text_models"}),
        frozenset({"base"}),
    ),
    "model": (frozenset({"multimodal"}), frozenset({"base"})),
    "data": (frozenset({"data"}), frozenset({"base"})),
    "methods": (
        frozenset({"balancing", "diagnostics", "finetuning", "gradcheck", "regularization", "schedules"}),
        frozenset({"base", "multimodal.contract"}),
    ),
    "functional": (frozenset({"functional"}), frozenset({"methods"})),
    "prediction": (frozenset({"prediction"}), frozenset({"base", "model", "data"})),
    "command-line support": (frozenset({"checkpoints", "cli_errors", "encoder_overrides"}), frozenset({"base"})),
    "recipe CLI": (
        frozenset({"recipe_cli"}),
        frozenset({"base", "model", "data", "prediction", "command-line support"}),
    ),
    "baselines": (frozenset({"baselines"}), frozenset({"base", "model", "data", "recipe CLI"})),
    "public API": (
        frozenset({ROOT}),
        frozenset({"base", "model", "data", "methods", "functional", "prediction", "baselines"}),
    ),
    "console entry": (
        frozenset({"cli"}),
        frozenset({"base", "model", "data", "methods", "prediction", "command-line support", "recipe CLI", "baselines",
                   "public API"}),
    ),
}
# docs/architecture.md, the seams table: (method, the method it drives through that one's __all__).
SEAMS = frozenset({("finetuning", "schedules")})
# Private Lightning / torch names (imported or accessed) outside lightning_internals.py: tests/test_lightning_internals.py.

# Imports that break the rules today: (importing module, imported module) -> why, and what removes it. Each is in
# another part of issue 18's refactor than the layers; an entry that no longer occurs fails
# test_known_violations_still_occur, so the list only shrinks.
KNOWN_VIOLATIONS: dict[tuple[str, str], str] = {
}


@dataclass(frozen=True)
class Import:
    """One import statement's edge: ``source`` imports ``names`` from module ``target`` (no names: the module)."""

    source: str
    target: str
    names: tuple[str, ...]
    path: Path
    line: int


def module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules(src: Path = SRC) -> dict[str, Path]:
    """Every module of the package under ``src``, by dotted name."""
    return {module_name(path, src): path for path in sorted((src / PACKAGE).rglob("*.py"))}


def imports_of(module: str, path: Path, modules: Mapping[str, Path]) -> Iterator[Import]:
    """Every import in ``path`` (``ast.walk``: in functions, classes and ``if TYPE_CHECKING`` blocks too), with
    ``from package import submodule`` resolved to the submodule."""
    package = module if path.stem == "__init__" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(module, alias.name, (), path, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join([*base, *([node.module] if node.module else [])])
            exports = exported_names(modules[target]) if target in modules else frozenset()
            names = []
            for alias in node.names:
                # A name the package exports is that (regularization's gaussian_dropout function), not its module.
                if f"{target}.{alias.name}" in modules and alias.name not in exports:
                    yield Import(module, f"{target}.{alias.name}", (), path, node.lineno)
                else:
                    names.append(alias.name)
            if names:
                yield Import(module, target, tuple(names), path, node.lineno)


def unit_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ROOT


def layer_of(unit: str) -> str | None:
    return next((layer for layer, (units, _) in LAYERS.items() if unit in units), None)


def allowed_targets(unit: str) -> tuple[set[str], set[str]]:
    """The units, and the single modules (dotted, without the package), that ``unit`` may import."""
    layer = layer_of(unit)
    units, modules = set(), set()
    for entry in LAYERS[layer][1] if layer else ():
        if entry in LAYERS:
            units |= LAYERS[entry][0]
        else:
            modules.add(entry)
    return units, modules


def exported_names(package_init: Path) -> frozenset[str]:
    """The ``__all__`` of a module (a package: its ``__init__.py``); empty without one."""
    for node in ast.parse(package_init.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return frozenset(ast.literal_eval(node.value))
    return frozenset()


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def problems_of(edge: Import, modules: Mapping[str, Path]) -> list[str]:
    """What ``edge`` breaks of docs/architecture.md's rules (nothing for an import inside one unit)."""
    if edge.target.split(".")[0] != PACKAGE:
        return []
    source, target = unit_of(edge.source), unit_of(edge.target)
    if source == target:
        return []
    problems = []
    units, single_modules = allowed_targets(source)
    relative = edge.target.partition(".")[2]
    in_module = any(relative == m or relative.startswith(m + ".") for m in single_modules)
    if target not in units and not in_module and (source, target) not in SEAMS:
        allowed = sorted(units) + sorted(single_modules)
        problems.append(
            f"{source} ({layer_of(source)}) may not import {target} ({layer_of(target)}); it may import only "
            f"{', '.join(allowed) or 'nothing of the package'} (docs/architecture.md)"
        )
    private = [part for part in edge.target.split(".")[1:] if is_private(part)]
    private += [name for name in edge.names if is_private(name)]
    if private:
        problems.append(f"imports the private {', '.join(private)} of {target}; import what {target} exports")
    if layer_of(target) == "methods":
        package_init = modules[f"{PACKAGE}.{target}"]
        exports = exported_names(package_init)
        undeclared = [name for name in edge.names if name not in exports]
        if not edge.names and edge.target != f"{PACKAGE}.{target}":
            undeclared = [edge.target]
        if undeclared:
            problems.append(
                f"takes {', '.join(undeclared)} from {edge.target}, which {target} does not export; a method is used "
                f"only through its __all__ ({', '.join(sorted(exports))})"
            )
    return problems


def violations(src: Path = SRC) -> dict[tuple[str, str], list[str]]:
    """``(importing module, imported module) -> ["path:line: problem", ...]`` for every rule an import breaks."""
    modules = package_modules(src)
    found: dict[tuple[str, str], list[str]] = defaultdict(list)
    for module, path in modules.items():
        for edge in imports_of(module, path, modules):
            for problem in problems_of(edge, modules):
                found[edge.source, edge.target].append(f"{path.relative_to(src)}:{edge.line}: {problem}")
    return dict(found)


def import_graph(src: Path = SRC, by_unit: bool = False) -> dict[str, set[str]]:
    """Who imports whom inside the package: between modules, or between units (``by_unit``)."""
    modules = package_modules(src)
    graph: dict[str, set[str]] = {(unit_of(m) if by_unit else m): set() for m in modules}
    for module, path in modules.items():
        for edge in imports_of(module, path, modules):
            if edge.target.split(".")[0] != PACKAGE:
                continue
            source, target = (unit_of(module), unit_of(edge.target)) if by_unit else (module, edge.target)
            if source != target:
                graph[source].add(target)
    return graph


def find_cycle(graph: Mapping[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or ``None``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for successor in sorted(graph.get(node, ())):
            if state.get(successor) == 1:
                return path[path.index(successor):] + [successor]
            if successor not in state and (cycle := visit(successor)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_every_module_is_in_one_layer():
    units = {unit_of(module) for module in package_modules()}
    placed = [unit for units_, _ in LAYERS.values() for unit in units_]
    assert len(placed) == len(set(placed)), f"a unit is in two layers: {sorted(placed)}"
    missing = sorted(units - set(placed))
    assert not missing, (
        f"{', '.join(f'{PACKAGE}.{unit}' for unit in missing)} in no layer; add each to the table of "
        "docs/architecture.md and to LAYERS in tests/test_architecture.py"
    )
    gone = sorted(set(placed) - units)
    assert not gone, f"LAYERS names {gone}, which no longer exist in src/{PACKAGE}; remove them here and in the page"


def test_imports_follow_the_layers():
    found = {edge: problems for edge, problems in violations().items() if edge not in KNOWN_VIOLATIONS}
    assert not found, "imports that docs/architecture.md does not allow:\n" + "\n".join(
        problem for problems in found.values() for problem in problems
    )


def test_known_violations_still_occur():
    """The allow-list only shrinks: an entry whose import was fixed must go."""
    stale = sorted(set(KNOWN_VIOLATIONS) - set(violations()))
    assert not stale, f"{stale} no longer break the layers; remove them from KNOWN_VIOLATIONS"


@pytest.mark.parametrize("by_unit", [True, False], ids=["packages", "modules"])
def test_no_import_cycles(by_unit):
    cycle = find_cycle(import_graph(by_unit=by_unit))
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def page_table(header: str) -> list[list[str]]:
    """The rows of the table of docs/architecture.md whose header row is ``header``, as lists of cells."""
    lines = PAGE.read_text().splitlines()
    start = lines.index(header) + 2  # after the header and its |---| line
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_layers_and_seams_mirror_the_page():
    layers = {
        layer: (frozenset(re.findall(r"`([^`]+)`", units)), frozenset(e.strip().strip("`") for e in may.split(",")))
        for layer, units, may in page_table("| layer | modules and packages | may import |")
    }
    assert layers == LAYERS
    seams = page_table("| method | drives | through |")
    assert {(method.strip("`"), driven.strip("`")) for method, driven, _ in seams} == SEAMS


# The checker itself, on a made-up package: each forbidden import is found, with a message that names it.
CASES = {
    "data imports the model (inside a function)": (
        {"data/collate.py": "def load():\n    from ml_optim_plugins.multimodal.encoders import resolve_text_model\n"},
        ("ml_optim_plugins.data.collate", "ml_optim_plugins.multimodal.encoders"),
        "data (data) may not import multimodal (model)",
    ),
    "a method imports the console entry": (
        {"balancing/callback.py": "import ml_optim_plugins.cli\n"},
        ("ml_optim_plugins.balancing.callback", "ml_optim_plugins.cli"),
        "balancing (methods) may not import cli (console entry)",
    ),
    "a sibling's private module": (
        {"gradcheck/core.py": "from ml_optim_plugins.batch_slicing._sizes import first\n"},
        ("ml_optim_plugins.gradcheck.core", "ml_optim_plugins.batch_slicing._sizes"),
        "imports the private _sizes of batch_slicing",
    ),
    "a name a method does not export": (
        {"finetuning/callback.py": "from ml_optim_plugins.schedules.param_groups import split_groups\n"},
        ("ml_optim_plugins.finetuning.callback", "ml_optim_plugins.schedules.param_groups"),
        "takes split_groups from ml_optim_plugins.schedules.param_groups, which schedules does not export",
    ),
}


def write_package(root: Path, files: Mapping[str, str]) -> Path:
    """A made-up ml_optim_plugins under ``root``: every unit the layers name, then ``files``."""
    package = root / PACKAGE
    for units, _ in LAYERS.values():
        for unit in units - {ROOT}:  # a package where the real one is a package
            path = package / unit / "__init__.py" if (SRC / PACKAGE / unit).is_dir() else package / f"{unit}.py"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("")
    (package / "__init__.py").write_text("")
    (package / "schedules" / "__init__.py").write_text('__all__ = ["WarmupDecay"]\n')
    for name, text in files.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text)
    return root


@pytest.mark.parametrize("files, edge, message", CASES.values(), ids=CASES.keys())
def test_the_checker_finds_a_forbidden_import(tmp_path, files, edge, message):
    found = violations(write_package(tmp_path, files))
    assert list(found) == [edge]
    assert message in found[edge][0], found[edge]


def test_the_checker_allows_the_contract_and_a_declared_seam(tmp_path):
    files = {
        "gradcheck/core.py": "from ml_optim_plugins.multimodal.contract import parameter_modalities\n",
        "multimodal/contract.py": "",
        "finetuning/callback.py": "from ml_optim_plugins.schedules import WarmupDecay\n",
        "data/base.py": "from ml_optim_plugins.resume import epoch_seed\nfrom ml_optim_plugins.data import collate\n",
        "data/collate.py": "",
    }
    assert violations(write_package(tmp_path, files)) == {}


def test_the_checker_finds_a_cycle(tmp_path):
    files = {"names.py": "from ml_optim_plugins import hyperparameters\n",
             "hyperparameters.py": "def check():\n    from ml_optim_plugins.names import metric_name\n"}
    root = write_package(tmp_path, files)
    assert find_cycle(import_graph(root, by_unit=True)) == ["hyperparameters", "names", "hyperparameters"]
    assert find_cycle(import_graph(root)) == [f"{PACKAGE}.hyperparameters", f"{PACKAGE}.names",
                                              f"{PACKAGE}.hyperparameters"]
