"""The TensorRT and pycuda names the code uses, read from its source (``ast``), for test_tensorrt_api.py.

Values are traced from the module objects that ``import tensorrt`` and ``import pycuda.driver`` bind:
whatever is assigned from an expression that mentions a traced value (a local, or ``self.<attr>``)
is traced too, as are function parameters where some call passes one, and what a function returns
(per tuple position). Every attribute read on a traced value is a use of its library. A name read
with ``getattr``/``hasattr`` and a literal, or read inside ``if ... hasattr(x, "NAME"):``, is a
"guarded" use: the code copes without it. The trace errs towards counting too much (anything an
expression with a traced value produces is traced), so attributes of numpy arrays made by pycuda
(``host.copy()``) appear too, and the test forgives names that Python or numpy objects have. Names
reached through a non-literal ``getattr`` are not seen.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT_MODULES = {"tensorrt": "tensorrt", "pycuda.driver": "pycuda"}
GUARDS = ("getattr", "hasattr")


@dataclass(frozen=True)
class Use:
    """One attribute read: ``name`` of a ``library`` value at ``where`` (``file:line``)."""

    name: str
    libraries: frozenset[str]
    where: str
    guarded: bool = False


def _functions(trees: dict[str, ast.Module]):
    """(file, scope name, function node or module) for every function and each module's top level."""
    for file, tree in trees.items():
        yield file, f"{file}:<module>", tree
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield file, f"{file}:{node.name}", node


def _own_nodes(scope_node):
    """Nodes of a function body, not descending into nested functions (they are scopes of their own)."""
    stack = list(ast.iter_child_nodes(scope_node))
    while stack:
        node = stack.pop()
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            stack.extend(ast.iter_child_nodes(node))


class _Trace:
    def __init__(self, trees: dict[str, ast.Module]) -> None:
        self.trees = trees
        self.taint: dict[str, set[str]] = {}  # "<scope>:<name>" or "self.<attr>" -> libraries
        self.returns: dict[str, list[set[str]]] = {}  # function name -> libraries per returned position
        self.params: dict[str, list[str]] = {}  # function name -> parameter keys (without self)
        for file, scope, node in _functions(trees):
            if not isinstance(node, ast.Module):
                args = [a.arg for a in node.args.posonlyargs + node.args.args + node.args.kwonlyargs]
                self.params[node.name] = [f"{scope}:{a}" for a in args if a != "self"]

    def key(self, scope: str, node) -> str | None:
        if isinstance(node, ast.Name):
            return f"{scope}:{node.id}"
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
            return f"self.{node.attr}"
        if isinstance(node, ast.Subscript):  # self._buffers[name] = ...: the container holds it
            return self.key(scope, node.value)
        return None

    def of(self, scope: str, expr) -> set[str]:
        """The libraries an expression's value may come from."""
        found: set[str] = set()
        for node in [expr, *ast.walk(expr)]:
            key = self.key(scope, node) if isinstance(node, (ast.Name, ast.Attribute)) else None
            found |= self.taint.get(key, set())
            if isinstance(node, ast.Call):
                found |= set().union(*self.returns.get(_called(node), []))
        return found

    def _positions(self, scope: str, value) -> list[set[str]]:
        if isinstance(value, ast.Tuple):
            return [self.of(scope, e) for e in value.elts]
        if isinstance(value, ast.Call) and _called(value) in self.returns:
            return self.returns[_called(value)]
        return [self.of(scope, value)]

    def _assign(self, scope: str, target, positions: list[set[str]]) -> bool:
        if isinstance(target, (ast.Tuple, ast.List)) and len(positions) == len(target.elts):
            return any([self._assign(scope, t, [p]) for t, p in zip(target.elts, positions)])
        libraries = set().union(*positions)
        if isinstance(target, (ast.Tuple, ast.List)):
            return any([self._assign(scope, t, [libraries]) for t in target.elts])
        return self._add(self.key(scope, target), libraries)

    def _add(self, key: str | None, libraries: set[str]) -> bool:
        if key is None or libraries <= self.taint.get(key, set()):
            return False
        self.taint.setdefault(key, set()).update(libraries)
        return True

    def step(self) -> bool:
        """One pass over every scope; True if anything new was traced."""
        changed = False
        for _, scope, function in _functions(self.trees):
            for node in _own_nodes(function):
                changed |= self._visit(scope, node)
        return changed

    def _visit(self, scope: str, node) -> bool:
        if isinstance(node, ast.Import):
            return any([self._assign(scope, ast.Name(a.asname or a.name.split(".")[0]), [{ROOT_MODULES[a.name]}])
                        for a in node.names if a.name in ROOT_MODULES])
        if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)) and node.value is not None:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            return any([self._assign(scope, t, self._positions(scope, node.value)) for t in targets])
        if isinstance(node, (ast.For, ast.comprehension)):
            return self._assign(scope, node.target, [self.of(scope, node.iter)])
        if isinstance(node, ast.NamedExpr):
            return self._assign(scope, node.target, [self.of(scope, node.value)])
        if isinstance(node, ast.Return) and node.value is not None:
            name = scope.rsplit(":", 1)[1]
            new = self._positions(scope, node.value)
            old = self.returns.get(name)
            if old is None or len(old) == len(new):
                merged = new if old is None else [a | b for a, b in zip(old, new)]
            else:  # returns of different lengths (or same-named functions): one position for all
                merged = [set().union(*old, *new)]
            self.returns[name] = merged
            return merged != old
        if isinstance(node, ast.Call) and _called(node) in self.params:
            keys = self.params[_called(node)]
            pairs = list(zip(keys, node.args)) + [(k, kw.value) for kw in node.keywords for k in keys
                                                  if kw.arg and k.endswith(f":{kw.arg}")]
            return any([self._add(k, self.of(scope, arg)) for k, arg in pairs])
        return False


def _called(call: ast.Call) -> str | None:
    """``f`` of ``f(...)`` and of ``self.f(...)``."""
    if isinstance(call.func, ast.Name):
        return call.func.id
    if isinstance(call.func, ast.Attribute) and isinstance(call.func.value, ast.Name) and call.func.value.id == "self":
        return call.func.attr
    return None


def library_uses(paths: list[Path]) -> list[Use]:
    """Every read of a TensorRT or pycuda attribute in these source files."""
    trees = {f"{path.parent.name}/{path.name}": ast.parse(path.read_text(), str(path)) for path in paths}
    trace = _Trace(trees)
    for _ in range(50):
        if not trace.step():
            break
    else:
        raise RuntimeError("the trace did not settle in 50 passes")
    uses = []
    for file, scope, function in _functions(trees):
        guarded = _guarded_by_hasattr(function)
        for node in _own_nodes(function):
            if isinstance(node, ast.Attribute) and (libraries := trace.of(scope, node.value)):
                uses.append(Use(node.attr, frozenset(libraries), f"{file}:{node.lineno}", id(node) in guarded))
            if (isinstance(node, ast.Call) and _called(node) in GUARDS and len(node.args) >= 2
                    and isinstance(node.args[1], ast.Constant) and (libraries := trace.of(scope, node.args[0]))):
                uses.append(Use(node.args[1].value, frozenset(libraries), f"{file}:{node.lineno}", guarded=True))
    return uses


def _guarded_by_hasattr(function) -> set[int]:
    """ids of the ``x.NAME`` nodes inside ``if ... hasattr(x, "NAME") ...:`` (the code checked first)."""
    guarded = set()
    for node in _own_nodes(function):
        if not isinstance(node, ast.If):
            continue
        names = {c.args[1].value for c in ast.walk(node.test) if isinstance(c, ast.Call) and _called(c) == "hasattr"
                 and len(c.args) == 2 and isinstance(c.args[1], ast.Constant)}
        guarded |= {id(a) for stmt in node.body for a in ast.walk(stmt) if isinstance(a, ast.Attribute) and a.attr in names}
    return guarded



def library_modules(repo: Path, folders=("pah_edge", "device", "export", "calibration")) -> list[Path]:
    """The project's ``.py`` files that import tensorrt or pycuda, or import from a project module that does."""
    imports = {path: _imported(path) for folder in folders for path in sorted((repo / folder).rglob("*.py"))}
    direct = {path for path, modules in imports.items() if {m.split(".")[0] for m in modules} & {"tensorrt", "pycuda"}}
    dotted = {_module_name(repo, path) for path in direct}
    return sorted(direct | {path for path, modules in imports.items() if modules & dotted})


def _imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def _module_name(repo: Path, path: Path) -> str:
    """device/runtimes/tensorrt.py -> pah_edge.device.runtimes.tensorrt (pyproject's package-dir)."""
    parts = path.relative_to(repo).with_suffix("").parts
    return ".".join(parts if parts[0] == "pah_edge" else ("pah_edge", *parts))
