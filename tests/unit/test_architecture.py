"""The house rules of docs/ARCHITECTURE.md, measured on the source: each test reads
``src/largebatch`` statically (``ast``) and names every place that breaks its rule.

* The batch plan owns every batch number: no module but ``plan.py`` multiplies or divides the
  micro size, the accumulation or the world size with another batch quantity.
* Only the trainer changes the trainer: no module assigns an attribute of a trainer.
* The flow is one-way: no import cycle between modules.
* Small modules: no file over 400 lines.

Each rule is checked against a snippet that breaks it, so the check itself cannot rot into
one that passes everything.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = SRC / "largebatch"

#: Words that name a batch dimension the plan multiplies (``global = micro x accum x world``).
_FACTORS = ("micro", "accum", "world")
#: Words of what such a product is: batch sizes, sample counts, positions.
_QUANTITIES = _FACTORS + ("global", "window", "batch", "samples", "shard", "dataset",
                          "consumed", "per_rank", "position")
_OPS = (ast.Mult, ast.FloorDiv, ast.Div, ast.Mod)


def _words(node: ast.AST) -> set[str]:
    """Identifier and attribute names that make up the value of ``node`` (lower case). A
    call's arguments are left out: ``tau(micro)`` is a function of a micro size, not one."""
    if isinstance(node, ast.Name):
        return {node.id.lower()}
    if isinstance(node, ast.Attribute):
        return {node.attr.lower()} | _words(node.value)
    if isinstance(node, ast.Call):
        return _words(node.func)
    out: set[str] = set()
    for child in ast.iter_child_nodes(node):
        out |= _words(child)
    return out


def _mentions(words: set[str], vocabulary: tuple[str, ...]) -> bool:
    return any(v in w for w in words for v in vocabulary)


def batch_arithmetic(source: str) -> list[tuple[int, str]]:
    """``(line, expression)`` of every ``*``, ``/``, ``//`` or ``%`` between a batch factor
    (micro, accum, world) and another batch quantity."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.BinOp) and isinstance(node.op, _OPS):
            left, right = _words(node.left), _words(node.right)
            if ((_mentions(left, _FACTORS) and _mentions(right, _QUANTITIES))
                    or (_mentions(right, _FACTORS) and _mentions(left, _QUANTITIES))):
                found.append((node.lineno, ast.unparse(node)))
    return found


def trainer_assignments(source: str) -> list[tuple[int, str]]:
    """``(line, target)`` of every assignment to an attribute of something called trainer
    (``trainer.plan = ...``, ``self.trainer.x += ...``, ``setattr(trainer, ...)``)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        targets = []
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        for target in targets:
            if any(isinstance(sub, ast.Attribute) and "trainer" in _words(sub.value)
                   for sub in ast.walk(target)):
                found.append((node.lineno, ast.unparse(target)))
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id == "setattr" and node.args
                and "trainer" in _words(node.args[0])):
            found.append((node.lineno, ast.unparse(node)))
    return found


def _sources(exclude: tuple[str, ...] = ()) -> dict[str, str]:
    return {str(p.relative_to(SRC)): p.read_text() for p in sorted(PACKAGE.rglob("*.py"))
            if str(p.relative_to(PACKAGE)) not in exclude}


def test_the_checks_see_what_they_guard() -> None:
    """Each check finds the forms it exists to refuse, and lets plain code through."""
    bad = ("samples += window * self.engine.world_size\n"
           "per_rank = cfg.batch.global_size // denv.world_size\n"
           "g = plan.micro_size * accum * plan.world_size\n")
    assert sorted(line for line, _ in batch_arithmetic(bad)) == [1, 2, 3, 3]
    assert batch_arithmetic("lr = peak * factor\nn = len(x) // 2\nt = world + 1\n") == []
    writes = ("trainer.plan = new\nself.trainer.state.step += 1\nsetattr(trainer, 'x', 1)\n"
              "trainer._epoch_micro: int = 3\n")
    assert sorted(line for line, _ in trainer_assignments(writes)) == [1, 2, 3, 4]
    assert trainer_assignments("x = trainer.plan\ntrainer.apply(change)\n") == []


def test_only_the_plan_does_batch_arithmetic() -> None:
    """``global = micro x accum x world`` and what follows from it live in plan.py."""
    found = [f"{path}:{line}: {expr}" for path, text in _sources(exclude=("plan.py",)).items()
             for line, expr in batch_arithmetic(text)]
    assert not found, "batch arithmetic outside plan.py:\n" + "\n".join(found)


def test_no_module_assigns_the_trainers_attributes() -> None:
    """The trainer's state is changed by the trainer (policies return plan changes)."""
    found = [f"{path}:{line}: {target}"
             for path, text in _sources(exclude=("train/trainer.py",)).items()
             for line, target in trainer_assignments(text)]
    assert not found, "trainer state assigned from outside:\n" + "\n".join(found)


def _imports(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules ``module`` imports (anywhere in the file, lazily included)."""
    deps = set()
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = module.split(".")
            if node.level:
                base = base[: len(base) - node.level + (1 if is_pkg else 0)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names = [mod] + [f"{mod}.{a.name}" for a in node.names]
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            related = (name == module or module.startswith(name + ".")
                       or name.startswith(module + "."))
            if name and not related:
                deps.add(name)
    return deps


def import_cycles(root: Path = SRC, package: str = "largebatch") -> list[list[str]]:
    """Strongly connected groups of two or more modules in the import graph."""
    modules = {}
    for f in (root / package).rglob("*.py"):
        name = ".".join(f.relative_to(root).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = f
    graph = {m: _imports(m, f, modules) for m, f in modules.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))
    for m in sorted(graph):
        if m not in index:
            visit(m)
    return cycles


def test_import_cycles_are_found(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.b import f\n")
    (pkg / "b.py").write_text("def f():\n    from pkg import a\n")
    (pkg / "c.py").write_text("import pkg.a\n")
    assert import_cycles(tmp_path, "pkg") == [["pkg.a", "pkg.b"]]


def test_no_import_cycles() -> None:
    assert import_cycles() == []


@pytest.mark.parametrize("limit", [400])
def test_no_file_over_400_lines(limit: int) -> None:
    long = {path: text.count("\n") for path, text in _sources().items()
            if text.count("\n") > limit}
    assert not long, f"files over {limit} lines: {long}"
