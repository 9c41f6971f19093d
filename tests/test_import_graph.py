"""The product's imports (issue 16): no import circle among the pack's modules, run.py and runner/ (imports
inside functions included, read with ast, nothing imported), no product file refers to the test bed, and the run
command's launcher runs on the standard library alone."""

import ast
import os
import subprocess
import sys

import pytest

from conftest import PACK_DIR

pytestmark = pytest.mark.one_host  # the marks of this module (registered in pyproject.toml)

PRODUCT = ("__init__.py", "loaders", "nodes", "run.py", "runner")


def product_files(root):
    """{module name: path} of the product's Python files ('' is the pack's own __init__.py)."""
    out = {}
    for entry in PRODUCT:
        path = os.path.join(root, entry)
        if os.path.isfile(path):
            out[_module_name(root, path)] = path
        elif os.path.isdir(path):
            for folder, dirs, files in os.walk(path):
                dirs[:] = [d for d in dirs if d != "__pycache__"]
                for name in files:
                    if name.endswith(".py"):
                        out[_module_name(root, os.path.join(folder, name))] = os.path.join(folder, name)
    return out


def _module_name(root, path):
    parts = os.path.relpath(path, root)[:-3].split(os.sep)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports(root):
    """{module: {product modules it imports}}: `from X import name` imports module X.name when that is a file
    of the product, else X; relative imports resolve against the importing file's package."""
    files = product_files(root)
    graph = {}
    for module, path in files.items():
        package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        edges = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name in files}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base_parts = package.split(".") if package else []
                    base_parts = base_parts[:len(base_parts) - (node.level - 1)] if node.level > 1 else base_parts
                    base = ".".join(base_parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                for alias in node.names:
                    full = f"{base}.{alias.name}" if base else alias.name
                    if full in files:
                        edges.add(full)
                    elif base in files and (node.level or base):
                        edges.add(base)
        edges.discard(module)
        graph[module] = edges
    return graph


def circles(graph):
    """The strongly connected groups of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_product_has_no_import_circle():
    graph = imports(PACK_DIR)
    assert {"", "loaders.recipe", "loaders.metadata", "loaders.text_tower", "nodes.token_route"} <= set(graph)
    assert "loaders.metadata" in graph["loaders.recipe"]  # the graph sees relative imports
    assert circles(graph) == []


def test_the_resolver_is_a_leaf():
    """loaders/recipe.py imports no module of the pack that imports it back, and metadata needs no recipe."""
    graph = imports(PACK_DIR)
    assert "loaders.recipe" not in graph["loaders.metadata"]
    reach, todo = set(), list(graph["loaders.recipe"])
    while todo:
        m = todo.pop()
        if m not in reach:
            reach.add(m)
            todo.extend(graph.get(m, ()))
    assert "loaders.recipe" not in reach and not any(m.startswith("nodes") for m in reach)


def test_the_checker_finds_a_circle_hidden_in_a_function(tmp_path):
    (tmp_path / "loaders").mkdir()
    (tmp_path / "__init__.py").write_text("", encoding="utf-8")
    (tmp_path / "loaders" / "__init__.py").write_text("", encoding="utf-8")
    (tmp_path / "loaders" / "a.py").write_text("from . import b\n", encoding="utf-8")
    (tmp_path / "loaders" / "b.py").write_text("def f():\n    from .a import thing\n", encoding="utf-8")
    assert circles(imports(str(tmp_path))) == [["loaders.a", "loaders.b"]]


@pytest.mark.parametrize("module", sorted(product_files(PACK_DIR)))
def test_no_product_file_refers_to_the_test_bed(module):
    path = product_files(PACK_DIR)[module]
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        assert not any(n.split(".")[0] in ("tests", "benchmarks", "conftest", "tiny_models", "reference")
                       for n in names), f"{path}:{node.lineno} imports the test bed"


def test_the_launcher_runs_on_the_standard_library_alone(tmp_path):
    """run.py's first stage (the arguments, a model folder, the environment) in a Python without site-packages
    (-S -I): it gets as far as refusing a folder that is no ComfyUI, having imported nothing beyond the standard
    library but the pack's own stdlib-only modules (not the second stage's generate and serve)."""
    model = tmp_path / "模型"
    for sub in ("unet", "text_encoder", "vae"):
        (model / sub).mkdir(parents=True)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from runner import launcher; "
            "rc = launcher.main(sys.argv[2:]); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] not in sys.stdlib_module_names)); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-S", "-I", "-c", code, PACK_DIR, "中国山水画", "--model", str(model),
                           "--comfyui", str(tmp_path)], capture_output=True, encoding="utf-8",
                          env={"PATH": os.environ.get("PATH", ""), "PYTHONIOENCODING": "utf-8"})
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: --comfyui {tmp_path}: not a ComfyUI folder (no main.py and "
                                                "comfy/)"]
    imported = ast.literal_eval(proc.stdout.strip().splitlines()[-1])
    assert {"runner.launcher", "runner.comfyui", "loaders.folders"} <= set(imported)  # the path it took
    assert {m.split(".")[0] for m in imported} == {"__main__", "loaders", "runner"}, imported
    assert not {"runner.generate", "runner.serve", "runner.batch", "runner.client"} & set(imported), imported
