"""The package is laid out by stage, and its imports say so: no cycle (lazy,
in-function imports included), and no stage reaching into a later one."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "kvgen"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(name: str) -> set[str]:
    """Every module this one imports, at any depth of its code (kvgen's own and others')."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:  # `from pkg import module` imports the module
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return found


def _kvgen_edges(name: str) -> set[str]:
    """kvgen modules this one imports (a package's own __init__ not counted as an edge back)."""
    return {m for m in _imports(name) if m in MODULES and m != name and m != "kvgen"}


def test_no_import_cycle():
    graph = {name: _kvgen_edges(name) for name in MODULES}
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def _stage(name: str) -> str:
    return name.split(".")[1] if name.count(".") else "kvgen"


# What each stage may import of kvgen and of the world.
NEVER = {
    "runtime": ({"build", "tools", "families", "spec", "cli"}, {"jinja2", "cutlass", "cuda.core", "cuda.bindings"}),
    "families": ({"build", "tools", "spec", "cli"}, {"jinja2", "cutlass", "cuda.core", "cuda.bindings"}),
    "build": ({"tools", "cli"}, set()),
    "formats": ({"runtime", "build", "tools", "families", "cli"}, {"torch", "jinja2", "cutlass"}),
    "config": ({"runtime", "build", "tools", "families", "cli"}, {"torch", "jinja2", "cutlass"}),
    "spec": ({"runtime", "build", "tools", "cli"}, {"torch", "jinja2", "cutlass"}),
}


@pytest.mark.parametrize("stage", sorted(NEVER))
def test_stages_import_only_what_comes_before_them(stage):
    stages, outside = NEVER[stage]
    for name in (n for n in MODULES if _stage(n) == stage):
        for imported in _imports(name):
            if imported in MODULES:
                assert _stage(imported) not in stages, f"{name} imports {imported}"
            else:
                assert not any(imported == o or imported.startswith(o + ".") for o in outside), \
                    f"{name} imports {imported}"


def test_the_checker_sees_lazy_imports():
    assert "kvgen.tools.bench" in _kvgen_edges("kvgen.tools.tune")  # imported inside a function
    assert "kvgen.runtime.loader" in _kvgen_edges("kvgen.runtime.backend")
    assert "kvgen.families.dequant_gather.op" in _kvgen_edges("kvgen")
