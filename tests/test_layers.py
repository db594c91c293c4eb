"""The import graph reads bottom-up: math -> plumbing -> tasks -> the algorithm -> tools.

Read from the source with `ast` (nothing is executed), so a lazy import inside a function counts
as much as one at the top: a lazy import that closes a circle is still a circle.

A package (a folder with an __init__.py, e.g. deepplanning/) sits in one layer as a whole, and every
module inside it is checked: it may import its own package's modules and the layers strictly below,
nothing beside it or above. Relative imports are resolved; `from pkg import name` is the submodule
pkg/name.py when there is one, else pkg/__init__.py; importing a package's module from outside it
runs the package's __init__.py first, so that counts as an import of the package too. A module that
imports its own package's __init__.py (which imports it back) is a cycle.
"""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = {  # a module may import only from its own layer or the ones below, and never in a circle
    "tip": 0, "selection": 0, "closed_form": 0, "quadrant_inputs": 0,
    "parallel": 1, "grading": 1, "task_api": 1, "rollouts": 1, "loading": 1, "checkpoint": 1, "memory": 1, "tracking": 1,
    "toy_task": 2, "toy": 2, "math_task": 2, "deepplanning": 2, "tasks": 2,
    "evaluate": 3, "opd_step": 3, "distill": 3,
    "analysis": 4, "sweep": 4, "bench": 4,
}


def is_package(path):
    return os.path.isfile(os.path.join(path, "__init__.py"))


def modules():
    """Every module: the top-level files, each package (its __init__.py) and the files inside it."""
    names = []
    for entry in os.listdir(ROOT):
        path = os.path.join(ROOT, entry)
        if entry.endswith(".py"):
            names.append(entry[:-3])
        elif is_package(path):
            names += [entry] + [f"{entry}.{f[:-3]}" for f in os.listdir(path)
                                if f.endswith(".py") and f != "__init__.py"]
    return sorted(names)


def source(name):
    """The file of a module name: pkg -> pkg/__init__.py, pkg.mod -> pkg/mod.py, mod -> mod.py."""
    path = os.path.join(ROOT, *name.split("."))
    return os.path.join(path, "__init__.py") if is_package(path) else path + ".py"


def package_of(name):
    """The package a module belongs to (itself for a package's __init__.py), or None at top level."""
    if is_package(os.path.join(ROOT, *name.split("."))):
        return name
    return name.rpartition(".")[0] or None


def imports_of(name):
    """The repository modules that `name` imports anywhere in its source."""
    known, package = set(modules()), package_of(name)
    tree = ast.parse(open(source(name), encoding="utf-8").read())
    wanted = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            wanted |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: `.` is this module's package, `..` its parent
                parts = (package or "").split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            wanted |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                       for alias in node.names}
    found = set()
    for dotted in wanted:  # the longest prefix that is a repository module: a.b.c -> a.b or a
        parts = dotted.split(".")
        hit = next((".".join(parts[:i]) for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in known),
                   None)
        if hit is None:
            continue
        found.add(hit)
        top = hit.split(".")[0]
        if hit != top and top != (package or "").split(".")[0]:  # from outside: __init__.py runs first
            found.add(top)
    return sorted(found - {name})


def upward_imports(name):
    """What `name` imports against the layers: above its layer; for a module of a package, also
    anything of the same layer outside its own package."""
    own, layer = name.split(".")[0], LAYERS[name.split(".")[0]]
    inside = package_of(name) is not None
    return [m for m in imports_of(name)
            if LAYERS[m.split(".")[0]] > layer
            or (inside and m.split(".")[0] != own and LAYERS[m.split(".")[0]] == layer)]


def find_cycle(graph):
    """A circle in {module: [modules it imports]} as a path that ends where it starts, or None."""
    state = {}  # name -> "visiting" | "done"

    def visit(name, path):
        if state.get(name) == "visiting":
            return path[path.index(name):] + [name]
        if state.get(name) == "done":
            return None
        state[name] = "visiting"
        for child in graph[name]:
            cycle = visit(child, path + [name])
            if cycle:
                return cycle
        state[name] = "done"
        return None

    return next((c for c in (visit(name, []) for name in graph) if c), None)


def test_every_top_level_module_has_a_layer():
    top = [m for m in modules() if "." not in m]
    assert sorted(top) == sorted(LAYERS), "add the new file or package to LAYERS (and to the README)"


def test_packages_are_seen_module_by_module():
    assert {"deepplanning.data", "deepplanning.episodes", "deepplanning.score"} <= set(modules())
    assert "deepplanning.data" in imports_of("deepplanning.sandbox")  # from .data import ...


@pytest.mark.parametrize("name", modules())
def test_imports_go_down_or_sideways_only(name):
    upward = upward_imports(name)
    layer = LAYERS[name.split(".")[0]]
    assert not upward, f"{name} (layer {layer}) imports from above, or beside out of its package: {upward}"


def test_no_import_cycles():
    cycle = find_cycle({name: imports_of(name) for name in modules()})
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_tools_use_the_step_not_the_training_script():
    """analysis and bench reach the statistics and the step from below distill.py: a tool that
    imports the training script gets its CLI, its defaults and its task wiring too."""
    for tool in ("analysis", "bench"):
        assert "distill" not in imports_of(tool), tool
    assert "opd_step" in imports_of("bench") and "quadrant_inputs" in imports_of("analysis")


def test_the_checker_sees_lazy_imports(tmp_path, monkeypatch):
    """The reader finds an import inside a function body, the form the old cycles took."""
    source = "def f():\n    import distill\n    from evaluate import score\n"
    (tmp_path / "probe.py").write_text(source)
    monkeypatch.setattr(__import__(__name__), "ROOT", str(tmp_path))
    (tmp_path / "distill.py").write_text("")
    (tmp_path / "evaluate.py").write_text("")
    assert imports_of("probe") == ["distill", "evaluate"]


def test_the_checker_reads_packages(tmp_path, monkeypatch):
    """Inside a package: relative imports, a submodule named by `from . import`, an upward import
    (lazy), a sideways one out of the package, and a cycle through the package's __init__.py."""
    me = __import__(__name__)
    monkeypatch.setattr(me, "ROOT", str(tmp_path))
    monkeypatch.setattr(me, "LAYERS", {"low": 1, "side": 2, "pkg": 2, "high": 3, "user": 3})
    for top in ("low", "side", "high"):
        (tmp_path / f"{top}.py").write_text("")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("from .a import f\n")
    (tmp_path / "pkg" / "a.py").write_text("import low\nfrom . import b\n\ndef f():\n    import high\n")
    (tmp_path / "pkg" / "b.py").write_text("from .c import g\nfrom side import x\n")
    (tmp_path / "pkg" / "c.py").write_text("from pkg import f\n")  # the __init__: a cycle
    (tmp_path / "user.py").write_text("from pkg.c import g\n")
    assert modules() == ["high", "low", "pkg", "pkg.a", "pkg.b", "pkg.c", "side", "user"]
    assert imports_of("pkg") == ["pkg.a"]
    assert imports_of("pkg.a") == ["high", "low", "pkg.b"]
    assert imports_of("pkg.b") == ["pkg.c", "side"]
    assert imports_of("user") == ["pkg", "pkg.c"]  # pkg/__init__.py runs first
    assert upward_imports("pkg.a") == ["high"] and upward_imports("pkg.b") == ["side"]
    assert upward_imports("user") == [] and upward_imports("pkg.c") == []
    graph = {name: imports_of(name) for name in modules()}
    assert find_cycle(graph) == ["pkg", "pkg.a", "pkg.b", "pkg.c", "pkg"]
    (tmp_path / "pkg" / "c.py").write_text("g = 1\n")
    assert find_cycle({name: imports_of(name) for name in modules()}) is None


def test_no_file_outside_the_repository_is_referenced():
    for name in modules():
        text = open(source(name), encoding="utf-8").read()
        assert "../shared" not in text and "TIP.md" not in text, name
