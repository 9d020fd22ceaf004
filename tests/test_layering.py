"""The package's layers import only downward (/work docs: DESIGN.md "Layout of the repository").

Every import of every module under mmsparse/ is read from its syntax tree, in-function imports
included, and checked against the table below: a layer may import the layers it lists and,
through them, what those list (the closure). Three one-file base modules sit under the layers
that use them: `fileio` (atomic writes, checksums), `pixels` (uint8 pixels -> normalised frames,
for data and encoders alike) and `subcommand` (the sub-commands' parser helpers). Also: deepspeed only inside mmsparse/train, triton only inside
mmsparse/kernels, and no import cycle between modules (in-function imports count: an import
put inside a function to dodge a cycle is still one).

    data -> (nothing)      kernels -> (torch, triton)
    attention -> kernels   encoders -> attention   models -> attention, encoders
    infer -> models, data  eval -> infer, models, data   train, cli -> everything
"""

from __future__ import annotations

import ast
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "mmsparse"

# layer -> the layers it may import directly (closed transitively below)
DIRECT = {
    "kernels": set(),
    "fileio": set(),
    "pixels": set(),
    "subcommand": set(),
    "attention": {"kernels"},
    "encoders": {"attention", "pixels"},
    "models": {"attention", "encoders", "fileio", "pixels"},
    "data": {"fileio", "pixels"},
    "infer": {"models", "data", "subcommand"},
    "eval": {"infer", "models", "data", "subcommand"},
    "train": {"kernels", "attention", "encoders", "models", "data", "infer", "eval", "fileio", "subcommand"},
    "cli": {"kernels", "attention", "encoders", "models", "data", "infer", "eval", "train", "fileio", "subcommand"},
    "package": set(),  # mmsparse/__init__.py
}
# third-party packages confined to one layer
CONFINED = {"deepspeed": "train", "triton": "kernels"}


def _closure(direct: dict[str, set[str]]) -> dict[str, set[str]]:
    allowed = {}
    for layer in direct:
        seen, todo = set(), list(direct[layer])
        while todo:
            x = todo.pop()
            if x not in seen:
                seen.add(x)
                todo += direct[x]
        allowed[layer] = seen | {layer}
    return allowed


ALLOWED = _closure(DIRECT)


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "package"
    return parts[1]


def imports_of(path: Path, root: Path, modules: set[str]) -> list[tuple[int, str]]:
    """(line, imported module) for every import in the file, at any depth. `from X import y`
    names X.y when that is a module of the package, else X."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((node.lineno, sub if sub in modules else target))
    return found


def check(root: Path = ROOT) -> list[str]:
    """Every violation of the layering under `root` (a copy of mmsparse/ in the tests below)."""
    files = sorted(p for p in root.rglob("*.py"))
    modules = {module_name(p, root) for p in files}
    problems, graph = [], {}
    for path in files:
        name = module_name(path, root)
        layer = layer_of(name)
        where = f"{path.relative_to(root.parent)}"
        graph[name] = set()
        for line, target in imports_of(path, root, modules):
            top = target.split(".")[0]
            if top in CONFINED and layer != CONFINED[top]:
                problems.append(f"{where}:{line}: imports {target}, which only mmsparse/{CONFINED[top]} may import")
            if top != "mmsparse":
                continue
            graph[name].add(target)
            other = layer_of(target)
            if other not in ALLOWED[layer]:
                problems.append(f"{where}:{line}: {layer} imports {target} ({other}); "
                                f"{layer} may import {sorted(ALLOWED[layer] - {layer}) or 'no other layer'}")
    problems += [f"import cycle: {' -> '.join(c)}" for c in cycles(graph)]
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected component of more than one module (or a
    module importing itself); Tarjan's algorithm, iterative."""
    index, low, on, stack, found = {}, {}, set(), [], []
    counter = [0]
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on.add(start)
        while work:
            node, it = work[-1]
            nxt = next(it, None)
            if nxt is not None:
                if nxt not in graph:
                    continue
                if nxt not in index:
                    index[nxt] = low[nxt] = counter[0]
                    counter[0] += 1
                    stack.append(nxt)
                    on.add(nxt)
                    work.append((nxt, iter(sorted(graph.get(nxt, ())))))
                elif nxt in on:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    x = stack.pop()
                    on.discard(x)
                    comp.append(x)
                    if x == node:
                        break
                if len(comp) > 1 or node in graph.get(node, ()):
                    found.append(_path_in(sorted(comp), graph))
    return found


def _path_in(comp: list[str], graph) -> list[str]:
    """A cycle inside the component, from its first module back to it (breadth first)."""
    members, start = set(comp), comp[0]
    prev, todo = {start: None}, [start]
    while todo:
        node = todo.pop(0)
        for nxt in sorted(graph[node]):
            if nxt == start:
                path = [node]
                while prev[path[-1]] is not None:
                    path.append(prev[path[-1]])
                return path[::-1] + [start]
            if nxt in members and nxt not in prev:
                prev[nxt] = node
                todo.append(nxt)
    return comp


def test_the_package_keeps_its_layers():
    problems = check()
    assert not problems, "layering violations:\n" + "\n".join(problems)


def private_imports(root: Path = ROOT) -> list[str]:
    """`from X import _name` where X is another module of the package: a private name used
    across modules (make it public, or keep it in its module)."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("mmsparse")):
                found += [f"{path.relative_to(root.parent)}:{node.lineno}: imports {alias.name}"
                          for alias in node.names if alias.name.startswith("_") and not alias.name.startswith("__")]
    return found


def test_no_private_name_crosses_modules():
    assert not private_imports(), "\n".join(private_imports())


def test_kernels_import_only_torch_and_triton():
    modules = {module_name(p, ROOT) for p in ROOT.rglob("*.py")}
    for path in (ROOT / "kernels").rglob("*.py"):
        for line, target in imports_of(path, ROOT, modules):
            top = target.split(".")[0]
            assert top in ("torch", "triton", "__future__") or target.startswith("mmsparse.kernels") \
                or top in sys.stdlib_module_names, f"{path}:{line}: imports {target}"


@pytest.fixture
def copy(tmp_path) -> Path:
    """A copy of the package's sources to plant violations in."""
    dest = tmp_path / "mmsparse"
    shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def _plant(root: Path, rel: str, code: str) -> None:
    path = root / rel
    path.write_text(path.read_text() + "\n\n" + code + "\n")


def test_planted_upward_import_fails(copy):
    """An in-function import from the kernels up into attention is caught, with its place."""
    _plant(copy, "kernels/common.py", "def _plan():\n    from mmsparse.attention.patterns import Local\n    return Local")
    problems = check(copy)
    assert len(problems) == 1 and "mmsparse/kernels/common.py" in problems[0] \
        and "kernels imports mmsparse.attention.patterns" in problems[0], problems


def test_planted_data_to_models_import_fails(copy):
    _plant(copy, "data/collate.py", "from ..models import layers  # noqa")
    assert any("data imports mmsparse.models.layers" in p for p in check(copy))


def test_planted_confined_packages_fail(copy):
    _plant(copy, "models/layers.py", "import deepspeed  # noqa")
    _plant(copy, "attention/program.py", "def f():\n    import triton.language as tl\n    return tl")
    problems = check(copy)
    assert any("models/layers.py" in p and "deepspeed" in p for p in problems)
    assert any("attention/program.py" in p and "triton.language" in p for p in problems)


def test_planted_private_import_fails(copy):
    _plant(copy, "attention/lsh.py", "from .blocklayout import _pieces  # noqa")
    assert [p for p in private_imports(copy) if "attention/lsh.py" in p and "_pieces" in p]


def test_planted_cycle_fails(copy):
    """Two attention modules importing each other (one of them in a function) form a cycle."""
    _plant(copy, "attention/program.py", "def f():\n    from .stream import StreamLayout\n    return StreamLayout")
    _plant(copy, "attention/stream.py", "from . import program  # noqa")
    problems = check(copy)
    assert any(p.startswith("import cycle:") and "mmsparse.attention.program" in p
               and "mmsparse.attention.stream" in p for p in problems), problems
