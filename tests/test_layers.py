"""The layers of hata-jax, read from the source's imports, and the names an install provides.

Layers, lowest first (a module may import its own layer and the ones below, never one above):

    pallas_kernels <- hata_jax <- hata_jax.models <- hata_jax.train <- hata_jax.evaluation <- hata_jax.cli
                                                                   <- bench, tests (never imported by the above)

The repository folders models/, train/, evaluation/ and cli/ install as hata_jax.models,
hata_jax.train, hata_jax.evaluation and hata_jax.cli (pyproject.toml's package-dir), so the only
top-level names an install adds are `hata_jax` and `pallas_kernels`.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent

# folder -> (installed package name, layer)
FOLDERS = {
    "pallas_kernels": ("pallas_kernels", 0),
    "hata_jax": ("hata_jax", 1),
    "models": ("hata_jax.models", 2),
    "train": ("hata_jax.train", 3),
    "evaluation": ("hata_jax.evaluation", 4),
    "cli": ("hata_jax.cli", 5),
    "bench": ("bench", 6),
}
INSTALLED = {name: layer for name, layer in FOLDERS.values()}
# Imports of our modules inside functions that are allowed: the kernels load on first use (no cycle
# is involved: pallas_kernels imports nothing of hata_jax). (file, imported module)
LAZY_ALLOWED: set[tuple[str, str]] = set()


def module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT)
    package = FOLDERS[rel.parts[0]][0]
    parts = [package, *rel.parts[1:-1]] + ([] if rel.stem == "__init__" else [rel.stem])
    return ".".join(parts)


def source_files() -> list[pathlib.Path]:
    return sorted(p for folder in FOLDERS for p in (ROOT / folder).rglob("*.py"))


MODULES = {module_name(p): p for p in source_files()}


def layer_of(module: str) -> int | None:
    """The layer of one of our modules (by its installed dotted name), None if not ours."""
    best = None
    for package, layer in INSTALLED.items():
        inside = module == package or module.startswith(package + ".")
        if inside and (best is None or len(package) > len(best[0])):
            best = (package, layer)
    return None if best is None else best[1]


def imports(path: pathlib.Path):
    """(line, imported module, inside a function) for every import of `path` naming one of our modules;
    `from package import name` counts as an import of package.name when that is a module."""
    tree = ast.parse(path.read_text(), str(path))
    in_function = {id(node) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for node in ast.walk(f)}
    this = module_name(path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the package that holds `path`
                package = this.split(".") if path.name == "__init__.py" else this.split(".")[:-1]
                base = ".".join(package[:len(package) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in MODULES else module for a in node.names]
        else:
            continue
        for target in targets:
            if target.split(".")[0] in ("models", "train", "evaluation", "cli") or layer_of(target) is not None:
                yield node.lineno, target, id(node) in in_function


def test_the_layer_map_covers_every_source_folder():
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests"}
    assert packages == set(FOLDERS)


def test_imports_run_downward_only():
    upward = []
    for module, path in MODULES.items():
        if path.is_relative_to(ROOT / "bench"):
            continue  # the top: may import any layer
        for line, target, _ in imports(path):
            if layer_of(target) is None or layer_of(target) > layer_of(module):
                upward.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not upward, "imports of a higher layer (or of a name that is not installed):\n" + "\n".join(upward)


def test_installed_code_imports_installed_names_only():
    """`models`, `train`, `evaluation` and `cli` are folders here, not installed top-level names."""
    bad = [f"{path.relative_to(ROOT)}:{line} imports {target}" for module, path in MODULES.items()
           if not module.startswith("bench") for line, target, _ in imports(path) if layer_of(target) is None]
    assert not bad, "\n".join(bad)


def test_no_import_of_ours_hides_in_a_function():
    """In the installed layers (bench, the top, has no cycle to dodge)."""
    hidden = [f"{path.relative_to(ROOT)}:{line} imports {target}" for module, path in MODULES.items()
              if not module.startswith("bench") for line, target, inside in imports(path)
              if inside and (str(path.relative_to(ROOT)), target.split(".")[0]) not in LAZY_ALLOWED]
    assert not hidden, "imports of our modules inside functions:\n" + "\n".join(hidden)


def test_no_import_cycle():
    graph = {module: set() for module in MODULES}
    for module, path in MODULES.items():
        for _, target, _ in imports(path):
            while target not in MODULES and "." in target:  # `from a.b import name`: a.b
                target = target.rsplit(".", 1)[0]
            if target in MODULES and target != module:
                graph[module].add(target)
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_an_install_adds_only_two_top_level_names():
    top_level = importlib.metadata.distribution("hata-jax").read_text("top_level.txt").split()
    assert sorted(top_level) == ["hata_jax", "pallas_kernels"]


def test_installed_names_resolve_away_from_the_checkout(tmp_path):
    """Outside the checkout (no folder on sys.path), the layers import by their installed names and
    the folder names are free for a user's own packages."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "__init__.py").write_text("MINE = True\n")
    code = ("import importlib.util, json, models\n"
            "names = ['hata_jax.models', 'hata_jax.train', 'hata_jax.evaluation', 'hata_jax.cli', 'train', 'cli',"
            " 'evaluation']\n"
            "print(json.dumps({'mine': models.MINE, **{n: getattr(importlib.util.find_spec(n), 'origin', None)"
            " for n in names}}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    found = json.loads(out.stdout)
    assert found["mine"] is True  # the user's own `models` package, not ours
    for name, folder in [("hata_jax.models", "models"), ("hata_jax.train", "train"),
                         ("hata_jax.evaluation", "evaluation"), ("hata_jax.cli", "cli")]:
        assert pathlib.Path(found[name]).parent.name == folder
    assert found["train"] is None and found["cli"] is None and found["evaluation"] is None
