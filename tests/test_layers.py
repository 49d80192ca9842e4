"""The package's modules import only downward, never another module's private names, and never in a cycle.

Every module of ``src/updetr`` is read with ``ast`` (nothing is imported); each ``import`` and
``from ... import`` statement, at module level or inside a function, relative or absolute, that names an
``updetr`` module is an edge ``module -> imported module``. Third-party imports are not looked at.

Layers, lowest first; a module may import from its own layer and the layers below it:

=============  ==============================================================================================
layer          modules
=============  ==============================================================================================
core           ``config``, ``presets`` (the named recipes), ``structures`` (and the ImageNet mean/std of its
               pixels), ``box_ops``, ``serialization`` (checkpoint files: safe loading, atomic saving, strict
               weight transfer), ``coco_json`` (COCO JSON helpers), ``engine.distributed`` (process group and
               device)
data           ``data.*``
models         ``models.*``
losses         ``losses.*``
evaluation     ``evaluation.*``
engine         ``engine.*`` (the tasks, the training loop, run folders, inference loading)
applications   ``demo``, ``experiment``, ``experiment_plan``, ``experiment_tables``, ``experiment_report``,
               ``stages``, ``report``, ``predict``, ``one_shot_predict``, ``panoptic_predict``, ``query``,
               ``visualize``, ``export``, ``serve.*``
cli            ``cli.*`` (one module per subcommand), ``__main__``, and the package root
               ``updetr`` (``updetr/__init__.py``)
=============  ==============================================================================================

``data`` sits below ``models`` (a model may read a data constant, no data module builds a model); today
neither imports the other. ``engine.distributed`` is core by what it does (it imports only ``config``) although
it lives in the ``engine`` folder. The package root is a facade (``updetr.load_official_checkpoint``) at the
top: no module imports it. argparse is used only in the cli layer and ``print`` only in the applications and
cli layers (both checked below); drawing (``visualize``) is an application, so no lower layer can draw.

A private name is one that starts with exactly one underscore; importing it from a different module
(``from updetr.x import _helper``), or reading it as an attribute of an imported module
(``x._helper``), is an offence. Cycles are found over all edges, function-level and ``TYPE_CHECKING`` ones
included, since such an import is a dependency all the same.

Run ``python tests/test_layers.py`` for the counts.
"""

from __future__ import annotations

import ast
import functools
import sys
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "updetr"
SRC = Path(__file__).resolve().parents[1] / "src" / PACKAGE

# (layer, patterns): a pattern is a module name; a trailing ".*" means the package and everything under it
LAYERS: list[tuple[str, list[str]]] = [
    ("core", ["config", "presets", "structures", "box_ops", "serialization", "coco_json", "engine.distributed"]),
    ("data", ["data.*"]),
    ("models", ["models.*"]),
    ("losses", ["losses.*"]),
    ("evaluation", ["evaluation.*"]),
    ("engine", ["engine.*"]),
    ("applications", ["demo", "experiment", "experiment_plan", "experiment_tables", "experiment_report", "stages",
                      "report", "predict", "one_shot_predict", "panoptic_predict", "query", "visualize", "export",
                      "serve.*"]),
    ("cli", ["cli.*", "__main__", ""]),
]


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, e.g. "updetr.engine.loop"
    target: str  # the imported updetr module, e.g. "updetr.engine.checkpoint"
    name: str | None  # the imported name for ``from target import name`` (None for ``import target``)
    lineno: int
    in_function: bool

    def __str__(self) -> str:
        what = f"{self.target}.{self.name}" if self.name else self.target
        return f"{self.module} -> {what} (line {self.lineno})"


def module_files(src: Path = SRC) -> dict[str, Path]:
    """Module name -> file, for every ``.py`` under ``src`` (``pkg/__init__.py`` is ``pkg``)."""
    out = {}
    for path in sorted(src.rglob("*.py")):
        parts = (PACKAGE, *path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _resolve_relative(module: str, path: Path, level: int, name: str | None) -> str:
    base = module.split(".") if _is_package(path) else module.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _owner(dotted: str, modules: dict[str, Path]) -> str | None:
    """The longest existing module that ``dotted`` names or lies in (None outside the package)."""
    parts = dotted.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


class _Collector(ast.NodeVisitor):
    def __init__(self, module: str, path: Path, modules: dict[str, Path]):
        self.module, self.path, self.modules = module, path, modules
        self.imports: list[Import] = []
        self.private_attrs: list[Import] = []
        self.module_aliases: dict[str, str] = {}  # local name bound to an updetr module -> that module
        self._depth = 0

    def _function(self, node):
        self._depth += 1
        self.generic_visit(node)
        self._depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def _add(self, target: str, name: str | None, node: ast.AST):
        self.imports.append(Import(self.module, target, name, node.lineno, self._depth > 0))

    def visit_Import(self, node: ast.Import):
        for alias in node.names:
            if alias.name.split(".")[0] != PACKAGE:
                continue
            target = _owner(alias.name, self.modules)
            if target is None:
                continue
            self._add(target, None, node)
            if alias.asname:
                self.module_aliases[alias.asname] = target

    def visit_ImportFrom(self, node: ast.ImportFrom):
        if node.level:
            base = _resolve_relative(self.module, self.path, node.level, node.module)
        else:
            base = node.module or ""
            if base.split(".")[0] != PACKAGE:
                return
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            if submodule in self.modules:  # ``from pkg import submodule``
                self._add(submodule, None, node)
                self.module_aliases[alias.asname or alias.name] = submodule
                continue
            target = _owner(base, self.modules)
            if target is not None:
                self._add(target, alias.name, node)

    def visit_Attribute(self, node: ast.Attribute):
        if isinstance(node.value, ast.Name) and node.value.id in self.module_aliases and _private(node.attr):
            target = self.module_aliases[node.value.id]
            if target != self.module:
                self.private_attrs.append(Import(self.module, target, node.attr, node.lineno, self._depth > 0))
        self.generic_visit(node)


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


@functools.lru_cache(maxsize=None)
def collect(src: Path = SRC) -> tuple[dict[str, Path], list[Import], list[Import]]:
    """(modules, imports of updetr modules, private attributes read from imported modules)."""
    modules = module_files(src)
    imports, attrs = [], []
    for module, path in modules.items():
        collector = _Collector(module, path, modules)
        collector.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        imports += [i for i in collector.imports if i.target != module]
        attrs += collector.private_attrs
    return modules, imports, attrs


def layer_of(module: str) -> int | None:
    """Index into LAYERS of ``module`` (``updetr.x.y``), or None when no pattern claims it."""
    rel = module[len(PACKAGE) + 1:] if module != PACKAGE else ""
    best, best_len = None, -1
    for index, (_, patterns) in enumerate(LAYERS):
        for pattern in patterns:
            if pattern.endswith(".*"):
                stem = pattern[:-2]
                hit = rel == stem or rel.startswith(stem + ".")
                length = len(stem)
            else:
                hit, length = rel == pattern, len(pattern) + 1  # an exact name beats a package pattern
            if hit and length > best_len:
                best, best_len = index, length
    return best


def upward_imports(imports: list[Import]) -> list[Import]:
    return [i for i in imports
            if layer_of(i.module) is not None and layer_of(i.target) is not None
            and layer_of(i.target) > layer_of(i.module)]


def private_imports(imports: list[Import], attrs: list[Import]) -> list[Import]:
    return [i for i in imports if i.name is not None and _private(i.name)] + attrs


def cycles(imports: list[Import]) -> list[list[str]]:
    """The import cycles: strongly connected components of more than one module (Tarjan), sorted names."""
    graph: dict[str, set[str]] = {}
    for i in imports:
        graph.setdefault(i.module, set()).add(i.target)
        graph.setdefault(i.target, set())
    index, low, on_stack, stack, components = {}, {}, set(), [], []
    counter = [0]

    def strongconnect(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph) + 100))
    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return sorted(components)


def describe_cycle(component: list[str], imports: list[Import]) -> str:
    """The component's modules, and each import between two of them (``module -> imported module``)."""
    members = set(component)
    inner = sorted({f"{i.module} -> {i.target}" for i in imports if i.module in members and i.target in members})
    return f"{len(component)} modules ({', '.join(component)}) through: " + "; ".join(inner)


def counts(src: Path = SRC) -> dict[str, int]:
    modules, imports, attrs = collect(src)
    return {
        "modules": len(modules),
        "import cycles": len(cycles(imports)),
        "modules in cycles": sum(len(c) for c in cycles(imports)),
        "upward imports": len(upward_imports(imports)),
        "cross-module private imports": len(private_imports(imports, attrs)),
        "imports inside functions (statements naming updetr)": len({(i.module, i.lineno) for i in imports
                                                                     if i.in_function}),
        "imports inside functions (all statements)": _all_function_imports(modules),
    }


def _all_function_imports(modules: dict[str, Path]) -> int:
    """Import statements inside a function body, third-party ones included."""
    n = 0
    for path in modules.values():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        inside = set()
        for func in ast.walk(tree):
            if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                inside |= {id(node) for node in ast.walk(func) if isinstance(node, (ast.Import, ast.ImportFrom))}
        n += len(inside)
    return n


def _listing(title: str, items) -> str:
    return f"{title}:\n" + "\n".join(f"  {item}" for item in items)


# ---------------------------------------------------------------------------------------------------- tests


def test_every_module_has_a_layer():
    modules, _, _ = collect()
    unplaced = [m for m in modules if layer_of(m) is None]
    assert not unplaced, _listing("modules in no layer (add them to LAYERS and the docstring)", unplaced)


def test_the_table_is_documented():
    """Every pattern of LAYERS is in this module's docstring and in docs/design.md."""
    design = (SRC.parents[1] / "docs" / "design.md").read_text(encoding="utf-8")
    for _, patterns in LAYERS:
        for pattern in filter(None, patterns):
            assert f"``{pattern}``" in __doc__, pattern
            assert f"`{pattern}`" in design, pattern


def test_no_import_goes_up_a_layer():
    _, imports, _ = collect()
    bad = [f"{i}  [{LAYERS[layer_of(i.module)][0]} imports {LAYERS[layer_of(i.target)][0]}]"
           for i in upward_imports(imports)]
    assert not bad, _listing("imports from a higher layer", bad)


def test_no_private_name_crosses_modules():
    _, imports, attrs = collect()
    bad = [str(i) for i in private_imports(imports, attrs)]
    assert not bad, _listing("private names imported from another module", bad)


def test_no_import_cycle():
    _, imports, _ = collect()
    found = cycles(imports)
    assert not found, _listing("import cycles", [describe_cycle(c, imports) for c in found])


# the only imports of updetr modules inside functions, each for a reason: the package root stays light
# (``import updetr.config`` does not build the model zoo), and the page's app needs the optional `serve` extra
LAZY_IMPORTS = {("updetr", "updetr.models.official"), ("updetr.serve", "updetr.serve.app")}


def test_updetr_modules_are_imported_at_module_level():
    _, imports, _ = collect()
    inside = [i for i in imports if i.in_function and (i.module, i.target) not in LAZY_IMPORTS]
    assert not inside, _listing("imports of updetr modules inside functions", inside)


def _calls(path: Path, names: set[str]) -> list[tuple[int, str]]:
    """(line, name) of each call of a function or method named in ``names``, and each use of those names."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None
        if name in names:
            found.append((node.lineno, name))
    return found


def test_argument_parsing_only_in_the_cli_layer():
    cli = [index for index, (name, _) in enumerate(LAYERS) if name == "cli"]
    modules, _, _ = collect()
    bad = [f"{module}:{line} uses {name}" for module, path in modules.items() if layer_of(module) not in cli
           for line, name in _calls(path, {"ArgumentParser", "add_argument", "add_subparsers", "parse_args"})]
    assert not bad, _listing("argparse outside the cli layer", bad)


def test_printing_only_in_applications_and_cli():
    top = [index for index, (name, _) in enumerate(LAYERS) if name in ("applications", "cli")]
    modules, _, _ = collect()
    bad = [f"{module}:{line} calls print" for module, path in modules.items() if layer_of(module) not in top
           for line, _ in _calls(path, {"print"})]
    assert not bad, _listing("print() below the applications layer (log instead)", bad)


def test_the_walker_sees_every_kind_of_import(tmp_path):
    """A fake package with one import of each kind: the machinery above finds each edge and offence."""
    pkg = tmp_path / PACKAGE
    (pkg / "engine").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "engine" / "__init__.py").write_text("")
    (pkg / "config.py").write_text("def f():\n    from .engine import loop\n")  # up, in a function
    (pkg / "engine" / "loop.py").write_text("from ..config import _hidden\nimport updetr.cli as c\nc._x\n")
    (pkg / "cli.py").write_text("from updetr.engine.loop import run\n")
    modules, imports, attrs = collect(pkg)
    edges = {(i.module, i.target) for i in imports}
    assert edges == {("updetr.config", "updetr.engine.loop"), ("updetr.engine.loop", "updetr.config"),
                     ("updetr.engine.loop", "updetr.cli"), ("updetr.cli", "updetr.engine.loop")}
    assert [i.in_function for i in imports if i.module == "updetr.config"] == [True]
    assert {(i.module, i.target) for i in upward_imports(imports)} == {
        ("updetr.config", "updetr.engine.loop"), ("updetr.engine.loop", "updetr.cli")}
    assert {(i.target, i.name) for i in private_imports(imports, attrs)} == {
        ("updetr.config", "_hidden"), ("updetr.cli", "_x")}
    assert cycles(imports) == [
        ["updetr.cli", "updetr.config", "updetr.engine.loop"]]


if __name__ == "__main__":
    mods, imps, private_attrs = collect()
    for key, value in counts().items():
        print(f"{key}: {value}")
    if "-v" in sys.argv:
        print(_listing("cycles", [describe_cycle(c, imps) for c in cycles(imps)]))
        print(_listing("upward", upward_imports(imps)))
        print(_listing("private", private_imports(imps, private_attrs)))
        print(_listing("unplaced", [m for m in mods if layer_of(m) is None]))
