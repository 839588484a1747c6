"""No import cycles in pma_train (docs/design.md: dependencies run downwards): neither between modules
nor between its packages (`pma_train.cli`, `pma_train.merge`, ..., top-level modules count as their
own node). Function-level imports count too: they may hide a cycle from the interpreter, not from the
design.

Static (ast) over the source, so it costs no import; the checker itself is tested on a made-up graph.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.launch import REPO

PACKAGE = REPO / "pma_train"


def module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The pma_train modules `name` imports anywhere in its body (a `from pkg import sub` names pkg.sub)."""
    found = set()
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return {m for m in found if m in known and m != name}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def package_of(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_checker_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    names = module_names()
    graph = {name: imports_of(name, path, set(names)) for name, path in names.items()}
    assert len(graph) > 50 and graph["pma_train.train.trainer"], "the walk found the package's modules"
    assert cycles(graph) == []
    packages: dict[str, set[str]] = {}
    for name, targets in graph.items():
        packages.setdefault(package_of(name), set()).update(
            package_of(t) for t in targets if package_of(t) != package_of(name))
    assert cycles(packages) == [], "a package imports one that imports it back (docs/design.md)"


OURS = ("pma_train", "tests", "benchmarks")


def private_imports(path: Path) -> list[str]:
    """`from <our module> import _name`: a helper private to one module, used by another."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0] in OURS):
            found += [f"{path.relative_to(REPO)}:{node.lineno} {alias.name}" for alias in node.names
                      if alias.name.startswith("_") and not alias.name.startswith("__")]
    return found


def test_no_private_helper_is_imported_across_modules():
    # One home per concept (docs/design.md): a helper another module needs is public in its home.
    files = [p for top in OURS for p in (REPO / top).rglob("*.py")]
    assert len(files) > 100 and private_imports(PACKAGE / "cli" / "train.py") == []
    assert [f for p in files for f in private_imports(p)] == []


def test_one_structured_merge_step():
    # Every entry point turns its hydra node into its dataclass with config.to_config, nowhere else.
    where = sorted(str(p.relative_to(REPO)) for p in PACKAGE.rglob("*.py") if "OmegaConf.merge(" in p.read_text())
    assert where == ["pma_train/config/schema.py"]


def test_one_registry_of_decay_shapes():
    # The names are spelled once, in pma_train/decay.py: no module binds its own DECAY_SHAPES or
    # lists two of the names in a literal (defaults naming one shape are fine).
    from pma_train.decay import DECAY_SHAPES

    assert set(DECAY_SHAPES) >= {"linear", "cosine", "1-sqrt"}
    bound, listed = [], []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                bound += [path.name for t in targets if isinstance(t, ast.Name) and t.id == "DECAY_SHAPES"]
            if isinstance(node, (ast.Tuple, ast.List, ast.Set, ast.Dict)):
                items = node.keys if isinstance(node, ast.Dict) else node.elts
                names = {i.value for i in items if isinstance(i, ast.Constant)} & set(DECAY_SHAPES)
                if len(names) > 1 and path.name != "decay.py":
                    listed.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert bound == ["decay.py"] and listed == []


def test_one_module_for_the_train_state_sidecar():
    # pma_train.json is named, written and parsed in checkpoint/sidecar.py only; others call it.
    from pma_train.checkpoint import sidecar

    naming = sorted(str(p.relative_to(REPO)) for p in PACKAGE.rglob("*.py")
                    for node in ast.walk(ast.parse(p.read_text(), str(p)))
                    if isinstance(node, ast.Constant) and node.value == sidecar.FILE)
    assert naming == ["pma_train/checkpoint/sidecar.py"]
