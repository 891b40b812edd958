"""The package's shape, as DESIGN.md draws it: modules along the flow with no cycle, no private name crossing a
module, matplotlib loaded only where a figure is drawn, the book's loop on one screen, chapters that only call."""
import ast
import inspect
import os
import subprocess
import sys

from conftest import ROOT

PACKAGE = os.path.join(ROOT, "nli")
CHAPTERS = os.path.join(ROOT, "chapters")


def parsed_modules():
    """{module name: its syntax tree} of every module of nli/."""
    return {name[:-3]: ast.parse(open(os.path.join(PACKAGE, name), encoding="utf-8").read())
            for name in sorted(os.listdir(PACKAGE)) if name.endswith(".py")}


def nli_imports(tree, modules):
    """The nli modules a module imports, anywhere in it (an import inside a function makes a cycle too), with
    the names it takes from each: {module: {name, ...}}."""
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level == 1 or (node.module or "").startswith("nli")):
            target = (node.module or "").removeprefix("nli").lstrip(".")
            if target:
                found.setdefault(target.split(".")[0], set()).update(a.name for a in node.names)
            else:  # from . import a, b
                for alias in node.names:
                    if alias.name in modules:
                        found.setdefault(alias.name, set())
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("nli."):
                    found.setdefault(alias.name.split(".")[1], set())
    return found


def test_no_import_cycle_in_the_package():
    modules = parsed_modules()
    graph = {name: set(nli_imports(tree, modules)) - {"__init__", name} for name, tree in modules.items()}
    graph.pop("__init__")  # `nli` itself: what every submodule's import runs first, importing compat only
    done, path = set(), []

    def visit(name):
        assert name not in path, "import cycle: " + " -> ".join(path[path.index(name):] + [name])
        if name in done:
            return
        path.append(name)
        for target in sorted(graph.get(name, ())):
            visit(target)
        path.pop()
        done.add(name)
    for name in graph:
        visit(name)
    assert graph["fileio"] == set() and "rundir" not in graph["hub"] and "hub" not in graph["rundir"]


def test_no_private_name_crosses_a_module():
    modules = parsed_modules()
    for name, tree in modules.items():
        imported = nli_imports(tree, modules)
        taken = {n for names in imported.values() for n in names if n.startswith("_") and not n.startswith("__")}
        assert not taken, f"nli/{name}.py imports private names {taken}"
        bound = {alias.asname or alias.name for node in ast.walk(tree)  # the names that are nli modules there
                 if isinstance(node, ast.ImportFrom) and node.level == 1 and not node.module
                 for alias in node.names if alias.name in modules}
        used = {f"{node.value.id}.{node.attr}" for node in ast.walk(tree)
                if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in bound and node.attr.startswith("_") and not node.attr.startswith("__")}
        assert not used, f"nli/{name}.py uses private names of other modules: {used}"


def test_training_and_scoring_do_not_load_matplotlib():
    code = "import sys, nli.train, nli.evaluate, nli.predict, nli.runner; print('matplotlib' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.stdout.strip() == "False", result.stderr[-2000:]


def test_the_loop_fits_on_one_screen_as_the_books_does():
    from nli import train
    assert len(inspect.getsource(train.finetune).splitlines()) <= 45


def test_chapters_call_the_library_and_train_nothing_themselves():
    for name in sorted(os.listdir(CHAPTERS)):
        if not name.endswith(".py"):
            continue
        tree = ast.parse(open(os.path.join(CHAPTERS, name), encoding="utf-8").read())
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                    for alias in node.names} | {node.module for node in ast.walk(tree)
                                                if isinstance(node, ast.ImportFrom) and node.module}
        assert not {"cli", "nli.cli", "autograd"} & imported, f"chapters/{name} imports {imported}"
        calls = {node.func.attr for node in ast.walk(tree)
                 if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)}
        assert not {"backward", "record", "step", "update", "finetune"} & calls, f"chapters/{name} trains itself"
