"""theory.ipynb runs top to bottom, is committed clean, and holds no second copy of a loss.

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


LOSSES = {"kl_div", "cross_entropy", "nll_loss", "binary_cross_entropy", "kl_divergence", "Categorical",
          "entr", "xlogy"}  # library calls that compute an entropy or a divergence themselves
LOGS = {"log", "log_", "log2", "log10", "log1p", "log_softmax", "logsumexp"}
REDUCTIONS = {"sum", "nansum", "mean", "dot", "einsum", "logsumexp"}
SIMPLE = (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Expr, ast.Return, ast.Assert)


def called(node):
    """The names of the functions called anywhere in `node` (`a.b.c(...)` -> "c")."""
    return {getattr(n.func, "attr", getattr(n.func, "id", None)) for n in ast.walk(node)
            if isinstance(n, ast.Call)}


def calls_tip(node):
    return any(isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
               and isinstance(n.func.value, ast.Name) and n.func.value.id == "tip" for n in ast.walk(node))


def second_copies(source):
    """The statements of `source` that compute an entropy or a divergence themselves: a library
    loss (F.kl_div, cross_entropy, ...), or a statement that both takes a log (log, log_softmax,
    logsumexp, ...) and reduces (sum, mean, einsum, @), as Σ P log P does. Such a formula may
    appear only in an assert that also calls tip: a check of the library against the formula."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, SIMPLE):
            continue
        names = called(node)
        reduces = bool(names & REDUCTIONS) or any(isinstance(n, ast.BinOp) and isinstance(n.op, ast.MatMult)
                                                   for n in ast.walk(node))
        formula = bool(names & LOGS) and reduces and not (isinstance(node, ast.Assert) and calls_tip(node))
        if names & LOSSES or formula:
            found.append(ast.unparse(node))
    return found


def test_the_second_copy_check_catches_a_formula_and_allows_a_check():
    for copy_ in ("kl = (p * (p.log() - q.log())).sum(-1)",
                  "kl = torch.sum(zs.softmax(-1) * (zs.log_softmax(-1) - zt.log_softmax(-1)), -1)",
                  "h = torch.logsumexp(z, -1) - (z.softmax(-1) * z).sum(-1)",
                  "d = p @ (p.log() - q.log())",
                  "loss = F.kl_div(q.log(), p, reduction='none')",
                  "def f(z):\n    return -(z.softmax(-1) * z.log_softmax(-1)).sum(-1)",
                  "assert torch.allclose((p * p.log()).sum(-1), -h)"):  # an assert without tip
        assert second_copies(copy_), copy_
    for fine in ("assert torch.allclose((p * (p.log() - q.log())).sum(-1), tip.reverse_kl(zs, zt))",
                 "g = p * (p.log() - q.log() - kl[:, None])",  # a closed-form gradient: no reduction
                 "trace = 1 - (p ** 2).sum()", "h = tip.entropy(z) / math.log(V)"):
        assert not second_copies(fine), fine


def test_notebook_does_not_redefine_the_library(notebook):
    """No second copy of a formula: the notebook takes its entropy and divergences from tip (and
    defines none of tip's or selection's names); the formulas it writes out are checked against
    tip inside asserts, never used in place of it."""
    source = code_of(notebook)
    assert "import tip" in source and "import selection" in source
    library = {name for module in (tip, selection) for name in dir(module)
               if not name.startswith("_") and callable(getattr(module, name))}
    tree = ast.parse(source)
    defined = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
    assert not defined & library, f"the notebook re-implements {sorted(defined & library)}"
    used = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name) and node.value.id == "tip"}
    assert {"entropy", "reverse_kl", "forward_kl"} <= used, "the notebook must use tip's divergences"
    copies = second_copies(source)
    assert not copies, f"the notebook computes a divergence itself (call tip instead): {copies}"


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
