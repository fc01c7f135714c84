"""The layering rules of DESIGN.md, checked on the source with ``ast`` (nothing is imported).

A module may import from its own top-level package or from a strictly lower layer, except
for the few same-layer edges listed in SAME_LAYER. Every top-level package needs a layer.
What the server installs is checked here too: no module imports the training libraries
(TRAINING_ONLY), anywhere, and an optional extra's library (LAZY_ONLY) only inside a function.
"""

import ast
from pathlib import Path

import pytest

import spillway

ROOT = "spillway"
SRC = Path(spillway.__file__).parent
MAX_LINES = 600
ENV_READER = "spillway.config.load"

LAYERS = {
    "spillway.errors": 0,
    "spillway.clock": 0,
    "spillway.config": 0,
    "spillway.secrets": 0,
    "spillway.prices": 0,
    "spillway.ids": 0,
    "spillway.quota": 0,
    "spillway.wire": 1,
    "spillway.pii": 1,
    "spillway.nodes": 2,
    "spillway.resilience": 2,
    "spillway.state": 2,
    "spillway.routing": 3,
    "spillway.cache": 3,
    "spillway.ledger": 3,
    "spillway.planner": 3,
    "spillway.pipeline": 4,
    "spillway.access": 4,
    "spillway.batch": 5,
    "spillway.server": 6,
    "spillway.cli": 7,
}
#: Same-layer imports that keep layer 0 acyclic: errors < config < secrets.
SAME_LAYER = {
    ("spillway.config", "spillway.errors"),
    ("spillway.secrets", "spillway.config"),
    ("spillway.config", "spillway.prices"),
    ("spillway.errors", "spillway.quota"),
}
_ENV_NAMES = {"environ", "getenv", "environb"}
#: The ``train`` extra and the training code (``training/`` at the repository root): the gateway
#: runs the shipped models on numpy and onnxruntime, so no module imports these, lazily or not.
TRAINING_ONLY = frozenset({"torch", "transformers", "sentence_transformers", "sklearn", "training"})
#: Optional extras a server need not install: imported only inside the function that uses them
#: (or under ``if TYPE_CHECKING:``), so that importing the module never needs them.
LAZY_ONLY = frozenset({"matplotlib"})  # the ``charts`` extra: report --png, roi --png


def package_of(module: str) -> str:
    """``spillway.wire.sse`` → ``spillway.wire``; the root package is its own."""
    return ".".join(module.split(".")[:2])


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(tree: ast.Module, module: str, is_package: bool) -> list[tuple[int, str]]:
    """Every spillway module named by an import anywhere in the tree (lazy ones included)."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            if base == ROOT:  # `from spillway import wire` imports spillway.wire
                found += [(node.lineno, f"{ROOT}.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, base))
    return [(line, name) for line, name in found if name.split(".")[0] == ROOT]


def outside_imports(tree: ast.Module) -> list[tuple[int, str, bool]]:
    """Every absolute import's top-level name, with whether it runs only when a function is
    called (or never: ``if TYPE_CHECKING:``), rather than when the module is imported."""
    found: list[tuple[int, str, bool]] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name.split(".")[0], lazy) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.append((node.lineno, node.module.split(".")[0], lazy))
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, True)
            for child in node.orelse:
                visit(child, lazy)
            return
        inner = lazy or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(tree, False)
    return found


def _is_type_checking(test: ast.expr) -> bool:
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


def check_module(module: str, source: str, is_package: bool = False) -> list[str]:
    """Problems in one module's source, each as 'module:line: what is wrong'."""
    problems: list[str] = []
    own = package_of(module)
    if module != ROOT and own not in LAYERS:
        problems.append(f"{module}:1: package {own} has no layer in test_architecture.LAYERS")
    lines = len(source.splitlines())
    if lines > MAX_LINES:
        problems.append(f"{module}:1: {lines} lines (at most {MAX_LINES})")
    tree = ast.parse(source)
    for line, target in imported_modules(tree, module, is_package):
        problem = _import_problem(module, own, target)
        if problem:
            problems.append(f"{module}:{line}: {problem}")
    for line, name, lazy in outside_imports(tree):
        if name in TRAINING_ONLY:
            problems.append(f"{module}:{line}: imports {name}, which is for training only")
        elif name in LAZY_ONLY and not lazy:
            problems.append(
                f"{module}:{line}: imports {name} at module level (an optional extra: "
                "import it inside the function that uses it)"
            )
    for node in ast.walk(tree):
        if isinstance(node, ast.Global):
            problems.append(f"{module}:{node.lineno}: `global {', '.join(node.names)}`")
        if module != ENV_READER and _reads_environment(node):
            line = getattr(node, "lineno", 0)
            problems.append(f"{module}:{line}: reads os.environ (only {ENV_READER} may)")
    return problems


def _import_problem(module: str, own: str, target: str) -> str | None:
    theirs = package_of(target)
    if theirs == own or target == ROOT:
        return None
    if theirs not in LAYERS:
        return f"imports {target}, whose package has no layer"
    if module == ROOT:
        return f"the root package imports {target}"
    if own not in LAYERS or (own, theirs) in SAME_LAYER:
        return None
    if LAYERS[theirs] >= LAYERS[own]:
        return (
            f"imports {target} (layer {LAYERS[theirs]}) from layer {LAYERS[own]}: "
            "imports must go to strictly lower layers"
        )
    return None


def _reads_environment(node: ast.AST) -> bool:
    if isinstance(node, ast.Attribute) and node.attr in _ENV_NAMES:
        return isinstance(node.value, ast.Name) and node.value.id == "os"
    if isinstance(node, ast.ImportFrom) and node.module == "os":
        return any(alias.name in _ENV_NAMES for alias in node.names)
    return False


def source_files() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def test_source_tree_is_found() -> None:
    modules = {module_name(p) for p in source_files()}
    assert {"spillway.errors", "spillway.wire.sse", "spillway.config.load"} <= modules


@pytest.mark.parametrize("path", source_files(), ids=lambda p: module_name(p))
def test_module_follows_the_layering_rules(path: Path) -> None:
    module = module_name(path)
    assert check_module(module, path.read_text(), path.name == "__init__.py") == []


def test_checker_catches_an_upward_import() -> None:
    source = "from spillway.wire.sse import SseEvent\nfrom spillway.routing import router\n"
    [problem] = check_module("spillway.nodes.fake", source)
    assert problem.startswith("spillway.nodes.fake:2: imports spillway.routing (layer 3)")


def test_checker_catches_a_same_layer_import_between_packages() -> None:
    assert check_module("spillway.routing.x", "import spillway.cache.exact\n") != []


def test_checker_allows_own_package_and_lower_layers() -> None:
    source = (
        "import os\nimport orjson\nfrom spillway.errors import ConfigError\n"
        "from spillway.server.auth import KeyRing\nfrom . import common\n"
    )
    assert check_module("spillway.cli.fake", source) == []


def test_checker_resolves_relative_imports() -> None:
    assert check_module("spillway.wire.fake", "from ..server import app\n") != []
    assert check_module("spillway.wire", "from .sse import SseDecoder\n", is_package=True) == []


def test_checker_catches_lazy_imports_and_root_imports() -> None:
    source = "def f():\n    from spillway import cli\n"
    assert check_module("spillway.server.fake", source) == [
        "spillway.server.fake:2: imports spillway.cli (layer 7) from layer 6: "
        "imports must go to strictly lower layers"
    ]


def test_checker_requires_a_layer_for_every_package() -> None:
    assert check_module("spillway.newpkg.mod", "x = 1\n") == [
        "spillway.newpkg.mod:1: package spillway.newpkg has no layer in test_architecture.LAYERS"
    ]
    assert check_module("spillway.server.x", "import spillway.newpkg\n") != []


def test_checker_catches_long_modules_global_and_environ() -> None:
    assert check_module("spillway.wire.long", "x = 1\n" * (MAX_LINES + 1)) != []
    assert check_module("spillway.wire.g", "def f():\n    global X\n") == [
        "spillway.wire.g:2: `global X`"
    ]
    for source in ("import os\nos.environ['A']\n", "import os\nos.getenv('A')\n"):
        assert len(check_module("spillway.nodes.x", source)) == 1
    assert len(check_module("spillway.nodes.x", "from os import environ\n")) == 1
    assert check_module(ENV_READER, "import os\nos.environ.get('A')\n") == []


def test_checker_catches_training_libraries_anywhere() -> None:
    sources = [
        "import torch\n",
        "import torch.nn as nn\n",
        "def f():\n    from sklearn.neural_network import MLPClassifier\n",
        "class C:\n    def f(self):\n        import transformers\n",
        "from sentence_transformers import SentenceTransformer\n",
        "from training.cross_training import encode\n",
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import torch\n",
        "try:\n    import torch\nexcept ImportError:\n    torch = None\n",
    ]
    for source in sources:
        [problem] = check_module("spillway.cache.x", source)
        assert "which is for training only" in problem, source
    # a module of spillway's own that happens to share a name is not the library
    assert check_module("spillway.cache.x", "from .torch import x\nfrom . import sklearn\n") == []


def test_checker_allows_an_optional_extra_only_where_it_is_used() -> None:
    lazy = [
        "def draw():\n    import matplotlib\n    matplotlib.use('Agg')\n",
        "async def draw():\n    from matplotlib.figure import Figure\n",
        "import typing\nif typing.TYPE_CHECKING:\n    from matplotlib.figure import Figure\n",
    ]
    for source in lazy:
        assert check_module("spillway.planner.x", source) == [], source
    eager = [
        "import matplotlib\n",
        "from matplotlib.figure import Figure\n",
        "try:\n    import matplotlib.pyplot as plt\nexcept ImportError:\n    plt = None\n",
        "import typing\nif typing.TYPE_CHECKING:\n    pass\nelse:\n    import matplotlib\n",
    ]
    for source in eager:
        [problem] = check_module("spillway.planner.x", source)
        assert "imports matplotlib at module level" in problem, source


#: Packages that must never touch a web framework: the pipeline is what every front door
#: (OpenAI's routes, the Messages API, the batch worker) shares.
PROTOCOL_NEUTRAL = ("spillway.pipeline",)


@pytest.mark.parametrize(
    "path",
    [p for p in source_files() if module_name(p).startswith(PROTOCOL_NEUTRAL)],
    ids=lambda p: module_name(p),
)
def test_the_pipeline_imports_no_web_framework(path: Path) -> None:
    tree = ast.parse(path.read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert [n for n in names if n.split(".")[0] in ("aiohttp", "multidict", "yarl")] == []
