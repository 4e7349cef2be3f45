"""docs/architecture.md's layer table is the import order: a module imports only modules listed
before it (module-level and function-level imports alike), and every module is listed.

The table is read from the page itself, so the page and the code cannot drift apart; a new module
goes into the table in the row of its job.
"""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "kdlib"


def layer_order() -> list[str]:
    """The modules in the order the page's table lists them (a package as one unit: ``config``)."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    table = text.split("| layer | modules | job |", 1)[1].split("\n\n", 1)[0]
    order = []
    for row in table.strip().splitlines()[1:]:  # past the |---| line
        modules_cell = row.split("|")[2]
        outer = re.sub(r"\([^)]*\)", "", modules_cell)  # a package's submodules, in brackets, are one unit
        order += [name.rstrip("/") for name in re.findall(r"`([a-z_]+/?)`", outer)]
    return order


def unit(module: str) -> str:
    """kdlib.losses.fused -> losses; kdlib.train -> train."""
    return module.split(".")[1]


def imports_of(path: Path) -> set[str]:
    """The kdlib units ``path`` imports anywhere in its body (relative imports only: kdlib's style)."""
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
        here = parts
    else:
        here = parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = here[: len(here) - (node.level - 1)]
            target = base + (node.module.split(".") if node.module else [])
            if len(target) == 1:  # `from . import x`: x is the unit
                found |= {a.name for a in node.names}
            else:
                found.add(target[1])
    return found - {"__version__"}


def test_every_module_is_in_the_architecture_table_once():
    order = layer_order()
    assert len(order) == len(set(order)), "a module is listed twice in docs/architecture.md"
    units = {p.stem for p in PACKAGE.glob("*.py")} | {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    units -= {"__init__", "__main__"}
    assert units - set(order) == set(), "modules missing from docs/architecture.md's table"
    assert set(order) - units == set(), "the table lists modules that do not exist"


def test_imports_flow_down_the_table():
    rank = {name: i for i, name in enumerate(layer_order())}
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        name = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        if name in ("__init__", "__main__"):
            continue
        for target in imports_of(path):
            if target != name and rank[target] > rank[name]:
                wrong.append(f"{path.relative_to(ROOT)} imports kdlib.{target}, listed after {name}")
    assert not wrong, "\n".join(wrong)
