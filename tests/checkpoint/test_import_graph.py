"""No import circles in `megatron_vita.checkpoint` (with `megatron_vita.inference`) and `megatron_vita.training`.

The import graph is read from the source with `ast`, not by importing: every `import` and
`from ... import` statement counts, at module level and inside functions alike (a function-level
import is still a dependency; it only defers the circle to run time). Imports under
`if TYPE_CHECKING:` are skipped: they never run. `from pkg import name` is an edge to `pkg.name`
when that is a module of the package, else to `pkg`. Package `__init__` modules are not implied
by importing a submodule (every module would otherwise depend on `megatron_vita/__init__`).
A circle is a strongly connected component of more than one module, or a module importing itself.
"""
import ast
import os
import textwrap
from typing import Dict, List, Set

import megatron_vita

ROOT = os.path.dirname(os.path.abspath(megatron_vita.__file__))


def _modules(root: str, package: str) -> Dict[str, str]:
    """Dotted module name -> file, for every .py under `root` (the directory of `package`)."""
    out = {}
    for directory, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        rel = os.path.relpath(directory, root)
        prefix = package if rel == "." else package + "." + rel.replace(os.sep, ".")
        for f in sorted(files):
            if f.endswith(".py"):
                out[prefix if f == "__init__.py" else f"{prefix}.{f[:-3]}"] = os.path.join(directory, f)
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, module: str, is_package: bool, modules: Set[str]) -> Set[str]:
    """The package's modules that the import statements in `tree` name."""
    found: Set[str] = set()

    def visit(node):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")
                anchor = parts if is_package else parts[:-1]
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found & modules


def import_graph(root: str, package: str) -> Dict[str, Set[str]]:
    """module -> the package's modules it imports (anywhere in its file)."""
    modules = _modules(root, package)
    graph = {}
    for name, path in modules.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        graph[name] = _imports(tree, name, path.endswith("__init__.py"), set(modules))
    return graph


def circles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module, or a module importing itself (Tarjan)."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []

    def connect(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return out


def _touching(prefixes) -> List[List[str]]:
    graph = import_graph(ROOT, "megatron_vita")
    return [c for c in circles(graph) if any(m == p or m.startswith(p + ".") for m in c for p in prefixes)]


def test_checkpoint_package_has_no_import_circle():
    found = _touching(["megatron_vita.checkpoint", "megatron_vita.inference"])
    assert not found, "import circles through checkpoint/: " + "; ".join(" <-> ".join(c) for c in found)


def test_training_package_has_no_import_circle():
    found = _touching(["megatron_vita.training"])
    assert not found, "import circles through training/: " + "; ".join(" <-> ".join(c) for c in found)


def test_the_checker_sees_function_level_circles_and_skips_type_checking(tmp_path):
    """The checker itself, on a package written here: a circle closed only by a function-level
    relative import is found; an import under TYPE_CHECKING and a chain without a way back are not."""
    pkg = tmp_path / "toy"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": "from toy import b\n",
        "b.py": "def f():\n    from .sub import c\n",
        "sub/__init__.py": "",
        "sub/c.py": "import toy.a\n",
        "d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from toy import e\nimport toy.a\n",
        "e.py": "from toy import d\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(textwrap.dedent(text))
    graph = import_graph(str(pkg), "toy")
    assert graph["toy.b"] == {"toy.sub.c"} and graph["toy.d"] == {"toy.a"}
    assert circles(graph) == [["toy.a", "toy.b", "toy.sub.c"]]
