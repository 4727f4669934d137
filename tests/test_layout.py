"""The package layout is the architecture: no import circle, and each folder imports only what its
__init__.py docstring allows (model side below the engine, the engine above its pairings)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules() -> dict[str, Path]:
    out = {}
    for base, prefix in ((ROOT / "nudge_engine", "nudge_engine"), (ROOT / "kernels", "nudge_engine.kernels")):
        for path in base.rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([prefix, *parts])] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Modules of the package that `name` imports, at load time or lazily inside a function (a lazy
    import still makes a circle of the design; imports for type checkers only do not)."""
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    found = set()

    def visit(stmts):
        for node in stmts:
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - node.level + 1]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                if not (name + ".").startswith(mod + "."):   # its own package is loaded already
                    found.add(mod)
                found.update(f"{mod}.{a.name}" for a in node.names)
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and getattr(block.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(block)}
    visit([n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in typing_only])
    return {m for m in found if m in known and m != name}


def _graph():
    mods = _modules()
    return {n: _imports(n, p, set(mods)) for n, p in mods.items()}


def test_no_import_circle_in_the_package():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(m):] + [m]))
            if m not in state:
                walk(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            walk(n)


def test_each_folder_imports_only_what_its_docstring_allows():
    never = {  # folder -> folders it must never import
        "nudge_engine.model": ("nudge_engine.engine", "nudge_engine.pairing", "nudge_engine.server",
                               "nudge_engine.distributed"),
        "nudge_engine.layers": ("nudge_engine.engine", "nudge_engine.pairing", "nudge_engine.server",
                                "nudge_engine.distributed"),
        "nudge_engine.distributed": ("nudge_engine.engine", "nudge_engine.pairing", "nudge_engine.server"),
        "nudge_engine.pairing": ("nudge_engine.engine.engine", "nudge_engine.server", "nudge_engine.distributed"),
        "nudge_engine.engine": ("nudge_engine.server",),
    }
    bad = [(n, m) for n, deps in _graph().items() for folder, banned in never.items()
           if n == folder or n.startswith(folder + ".")
           for m in deps if any(m == b or m.startswith(b + ".") for b in banned)]
    assert not bad, bad


MAX_LINES = 450
OVER_BUDGET: set[str] = set()   # modules allowed over MAX_LINES (none)


def test_no_module_over_450_lines():
    over = {str(p.relative_to(ROOT)) for p in _modules().values() if len(p.read_text().splitlines()) > MAX_LINES}
    assert over <= OVER_BUDGET, sorted(over - OVER_BUDGET)


def test_repo_kernels_folder_never_hides_an_installed_kernels_package(tmp_path):
    """From the repository root (the root first on sys.path, as `python -m pytest`, `python -m
    benchmarks.x` and `python -c` put it), an installed regular package named `kernels` (Hugging
    Face's, which transformers >= 5.25 imports) is the one `import kernels` finds, and
    `nudge_engine.kernels` is still ours. A stand-in package after the root on sys.path proves it
    where Hugging Face's is not installed; where it is, transformers' hub_kernels must import too."""
    import subprocess
    import sys
    assert not (ROOT / "kernels" / "__init__.py").exists(), "kernels/ must stay a namespace folder (kernels/README.md)"
    fake = tmp_path / "site" / "kernels"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("CUDAProperties = 'the installed kernels package'\n")
    code = (
        "import sys; sys.path.append(sys.argv[1])\n"
        "import importlib.util as u\n"
        "real = u.find_spec('kernels').origin\n"
        "import kernels\n"
        "from kernels import CUDAProperties\n"
        "import nudge_engine.kernels.top1_stats as t\n"
        "assert t.__file__.startswith(sys.argv[2]), t.__file__\n"
        "assert not kernels.__file__.startswith(sys.argv[2] + '/kernels'), kernels.__file__\n"
        "if u.find_spec('transformers') is not None and real.endswith('site-packages/kernels/__init__.py'):\n"
        "    import transformers.integrations.hub_kernels\n"
        "    print('hub_kernels')\n"
        "print(kernels.__file__)\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "site"), str(ROOT)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "kernels/__init__.py" in out.stdout and str(ROOT / "kernels") not in out.stdout, out.stdout
