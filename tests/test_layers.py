"""psai's modules import one way: each from the layers below it (and from
the modules before it in its own layer), never up; and only cli.py and
the packages' __init__.py import inside a function (start-up time: every
command loads them). docs/architecture.md explains the layers."""
import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "psai"

# Lowest first. Within a layer, a module may import the ones listed before it.
LAYERS = [
    ("pure", ["errors", "_constants", "enums", "pricing", "_items", "schemas", "_responses", "_litellm", "_genai"]),
    ("peewee plumbing", ["fields", "db", "_sql"]),
    ("store", ["_base", "models"]),
    ("price versions and recording", ["_versions", "_arguments", "query", "rollups", "_budget_ledger", "_recording"]),
    ("reports, check, catalog, copy", ["reports", "usage", "_check", "migrations", "catalog", "_transfer", "_audit",
                                        "budget"]),
    ("history, HTML report, demo", ["_history", "report", "_demo", "writer", "_tracking", "capture", "otel",
                                    "openai_agents"]),
    ("command line", ["cli", "__main__", "__init__"]),
]
RANK = {name: (layer, position) for layer, (_title, names) in enumerate(LAYERS) for position, name in enumerate(names)}
LAZY_IMPORTS_ALLOWED = {"cli.py", "__init__.py"}  # file names


def module_name(path):
    relative = path.relative_to(PACKAGE)
    if relative.parts[0] == "migrations":
        return "migrations"  # the package and its numbered scripts, one module here
    return relative.stem


def psai_imports(tree, name):
    """(line, imported psai module, at function level) of every import."""
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.ImportFrom):
                if child.level == 0 and child.module and child.module.split(".")[0] == "psai":
                    targets = [child.module.split(".")[1] if "." in child.module else None]
                elif child.level > 0:
                    base = child.module.split(".")[0] if child.module else None
                    if name == "migrations" and child.level == 1 and base is None:
                        base = "migrations"
                    targets = [base] if base else [alias.name for alias in child.names]
                else:
                    targets = ["<other>"]
                if child.level == 0 and targets == [None]:
                    targets = [alias.name for alias in child.names]
                found.extend((child.lineno, target, in_function) for target in targets)
            elif isinstance(child, ast.Import):
                for alias in child.names:
                    parts = alias.name.split(".")
                    target = parts[1] if parts[0] == "psai" and len(parts) > 1 else "<other>"
                    found.extend([(child.lineno, target, in_function)])
            visit(child, inside)
    visit(tree, False)
    return found


def all_imports():
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        yield path, name, psai_imports(ast.parse(path.read_text(), str(path)), name)


def test_every_module_has_a_layer():
    missing = sorted({name for _path, name, _imports in all_imports()} - set(RANK))
    assert not missing, "give these modules a layer in LAYERS (and docs/architecture.md): %s" % missing


def test_modules_import_only_from_below():
    upward = []
    for path, name, imports in all_imports():
        for line, target, _in_function in imports:
            if target in ("<other>", name) or name not in RANK:
                continue
            if target not in RANK or RANK[target] >= RANK[name]:
                upward.append("%s:%d imports %s (%s) from %s (%s)" % (
                    path.relative_to(PACKAGE.parent), line, target, LAYERS[RANK[target][0]][0] if target in RANK
                    else "no layer", name, LAYERS[RANK[name][0]][0]))
    assert not upward, "imports against the layers:\n" + "\n".join(upward)


def test_no_imports_inside_functions_but_in_the_cli_and_the_package():
    lazy = ["%s:%d" % (path.relative_to(PACKAGE.parent), line)
            for path, name, imports in all_imports() if path.name not in LAZY_IMPORTS_ALLOWED
            for line, _target, in_function in imports if in_function]
    assert not lazy, "imports inside functions:\n" + "\n".join(lazy)


def test_the_walk_sees_imports_at_every_depth():
    """The checks above can fail: an import in a nested function, and one
    from a higher layer, are both found."""
    source = "from .cli import cli\n\ndef outer():\n    def inner():\n        from .models import PsAiModel\n"
    imports = psai_imports(ast.parse(source), "pricing")
    assert (1, "cli", False) in imports and (5, "models", True) in imports
