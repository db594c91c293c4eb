"""theory.ipynb runs top to bottom, and is committed clean.

The notebook's cells assert every derivation numerically (autograd against the closed forms, the
variance formula against Monte Carlo), so "it runs" here means "its claims hold for the current
tip.py and selection.py". It is executed in memory: nothing is written into the repository.
"""
import ast
import copy
import os

import nbformat
import pytest
from nbclient import NotebookClient

import selection
import tip

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "theory.ipynb")


@pytest.fixture(scope="module")
def notebook():
    return nbformat.read(NOTEBOOK, as_version=4)


def code_of(nb):
    return "\n".join(cell.source for cell in nb.cells if cell.cell_type == "code")


def test_notebook_is_committed_without_outputs(notebook):
    for i, cell in enumerate(notebook.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"cell {i} has outputs: strip them before committing"
            assert cell.execution_count is None, f"cell {i} has an execution count"


def test_notebook_does_not_redefine_the_library(notebook):
    """No second copy of a formula: the notebook imports tip/selection and defines none of their names."""
    source = code_of(notebook)
    assert "import tip" in source and "import selection" in source
    library = {name for module in (tip, selection) for name in dir(module)
               if not name.startswith("_") and callable(getattr(module, name))}
    defined = {node.name for node in ast.walk(ast.parse(source)) if isinstance(node, ast.FunctionDef)}
    assert not defined & library, f"the notebook re-implements {sorted(defined & library)}"


def test_notebook_runs_top_to_bottom(notebook):
    nb = copy.deepcopy(notebook)
    client = NotebookClient(nb, timeout=60, kernel_name="python3",
                            resources={"metadata": {"path": REPO}})  # cwd = repository root
    client.execute()  # raises CellExecutionError, with the cell and traceback, if any cell fails
    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    figures = sum("image/png" in out.get("data", {}) for out in outputs)
    assert figures >= 3, f"expected the three theory figures, got {figures}"
    text = "".join(out.get("text", "") for out in outputs if out.output_type == "stream")
    toy_cache = os.environ.get("TIP_TOY_CACHE") or os.path.join(REPO, ".cache", "toy")
    if os.path.isdir(toy_cache):  # section 8 runs on the toy pair: its table and its figure
        assert "Section 8:" in text and figures >= 4, "section 8 did not run on the built toy pair"
    else:
        assert "Section 8 skipped" in text and figures == 3, "section 8 neither ran nor said so"
