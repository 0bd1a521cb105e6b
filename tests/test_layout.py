"""The design guards: formats own their knowledge, the modules import without cycles, and a
construction initializes once."""

import ast
import pathlib

import pytest
import torch
from torch import nn

import tensorized as tz
from tensorized.formats import FORMATS

SRC = pathlib.Path(tz.__file__).parent
NAMES = set(FORMATS) | {"ttm", "tt-matrix", "mpo", "parafac", "low-rank"}


def _modules() -> dict[str, ast.Module]:
    return {
        ".".join(p.relative_to(SRC.parent).with_suffix("").parts): ast.parse(p.read_text())
        for p in SRC.rglob("*.py")
    }


def test_no_branch_on_a_format_name_outside_formats():
    """A comparison with, or a dict keyed by, a format name outside ``formats/`` means some
    format knowledge lives elsewhere (the demo's table of formats to run is data, not a
    branch, and is allowed)."""
    found = []
    for name, tree in _modules().items():
        if ".formats" in name or name.endswith("._demo"):
            continue
        for node in ast.walk(tree):
            literals = []
            if isinstance(node, ast.Compare):
                literals = [node.left, *node.comparators]
            elif isinstance(node, ast.Dict):  # a table keyed by formats (not a record that
                keys = [k for k in node.keys if isinstance(k, ast.Constant)]  # has a 'dense' field)
                if keys and all(k.value in NAMES for k in keys):
                    literals = keys
            for lit in literals:
                elts = lit.elts if isinstance(lit, ast.Tuple | ast.List | ast.Set) else [lit]
                for e in elts:
                    if isinstance(e, ast.Constant) and e.value in NAMES:
                        found.append(f"{name}:{e.lineno} {e.value!r}")
    assert found == []


def _imports(name: str, tree: ast.Module) -> set[str]:
    """Modules of the package that ``name`` imports at import time (not under
    ``TYPE_CHECKING``, not inside functions)."""
    package = name.rsplit(".", 1)[0] if not name.endswith("__init__") else name[: -len(".__init__")]
    out = set()
    for node in tree.body:
        if isinstance(node, ast.If):  # `if TYPE_CHECKING:` blocks are not import time
            continue
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")
            base = base[: len(base) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
            out.add(target)
            out |= {f"{target}.{a.name}" for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tensorized"):
            out.add(node.module)
    return out


def test_the_package_imports_without_cycles():
    trees = _modules()
    known = {n.removesuffix(".__init__") for n in trees}
    graph = {
        n.removesuffix(".__init__"): {m for m in _imports(n, t) if m in known}
        for n, t in trees.items()
    }
    # A package imports its submodules to export them; a cycle through a package's own
    # __init__ is therefore only one between two submodules.
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if nxt in node or node.startswith(nxt + "."):
                continue  # a submodule and its parent package
            if state.get(nxt) == 1:
                pytest.fail(f"import cycle: {' -> '.join([*path, node, nxt])}")
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [])


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_construction_draws_one_initialization(fmt):
    """Building a layer consumes the global RNG exactly as one ``reset_parameters()`` does
    (no throwaway inits); ``from_linear`` consumes none."""
    rank = "same" if fmt == "dense" else 0.5
    torch.manual_seed(0)
    built = tz.FactorizedLinear((4, 6), (3, 5), factorization=fmt, rank=rank)
    after_build = torch.rand(4)
    torch.manual_seed(1)
    again = tz.FactorizedLinear((4, 6), (3, 5), factorization=fmt, rank=rank)
    torch.manual_seed(0)
    again.reset_parameters()
    assert torch.equal(torch.rand(4), after_build)
    for p, q in zip(built.parameters(), again.parameters(), strict=True):
        assert torch.equal(p, q)
    source = nn.Linear(24, 15)
    torch.manual_seed(2)
    tz.FactorizedLinear.from_linear(source, (4, 6), (3, 5), rank, factorization=fmt)
    drawn = torch.rand(4)
    torch.manual_seed(2)
    assert torch.equal(torch.rand(4), drawn)
