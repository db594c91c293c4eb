"""The import graph reads bottom-up: math -> plumbing -> tasks -> the algorithm -> tools.

Read from the source with `ast` (nothing is executed), so a lazy import inside a function counts
as much as one at the top: a lazy import that closes a circle is still a circle.
"""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = {  # a module may import only from its own layer or the ones below, and never in a circle
    "tip": 0, "selection": 0, "closed_form": 0,
    "parallel": 1, "rollouts": 1, "loading": 1, "checkpoint": 1, "memory": 1,
    "toy": 2, "evaluate": 2, "deepplanning": 2,
    "distill": 3,
    "analysis": 4, "sweep": 4, "bench": 4,
}


def modules():
    return sorted(f[:-3] for f in os.listdir(ROOT) if f.endswith(".py"))


def imports_of(name):
    """The repository modules that `name`.py imports anywhere in its source."""
    tree = ast.parse(open(os.path.join(ROOT, name + ".py")).read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return sorted(found & set(modules()) - {name})


def test_every_top_level_module_has_a_layer():
    assert sorted(modules()) == sorted(LAYERS), "add the new file to LAYERS (and to the README)"


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_imports_go_down_or_sideways_only(name):
    upward = [m for m in imports_of(name) if LAYERS[m] > LAYERS[name]]
    assert not upward, f"{name} (layer {LAYERS[name]}) imports from above: {upward}"


def test_no_import_cycles():
    graph = {name: imports_of(name) for name in modules()}
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

    for name in graph:
        cycle = visit(name, [])
        assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checker_sees_lazy_imports(tmp_path, monkeypatch):
    """The reader finds an import inside a function body, the form the old cycles took."""
    source = "def f():\n    import distill\n    from evaluate import score\n"
    (tmp_path / "probe.py").write_text(source)
    monkeypatch.setattr(__import__(__name__), "ROOT", str(tmp_path))
    (tmp_path / "distill.py").write_text("")
    (tmp_path / "evaluate.py").write_text("")
    assert imports_of("probe") == ["distill", "evaluate"]


def test_no_file_outside_the_repository_is_referenced():
    for name in modules():
        text = open(os.path.join(ROOT, name + ".py")).read()
        assert "../shared" not in text and "TIP.md" not in text, name
