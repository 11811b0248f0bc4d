"""The package's layers, read from its source (AST): imports only go downward, there are no cycles,
and no module imports inside functions except the CLI (and an optional extra where it is needed)."""

import ast
import inspect
from pathlib import Path

import pytest

import ddpmkit
from ddpmkit.cli import SAMPLER_OPTION_FLAGS, build_parser
from ddpmkit.core.samplers import SAMPLERS, sampler_options
from ddpmkit.run.config import SampleConfig

SRC = Path(ddpmkit.__file__).parent

# lowest first; a module may import modules of its own layer or of the layers before it
LAYERS = [
    ("foundation", ["ddpmkit", "ddpmkit.errors", "ddpmkit.fileio", "ddpmkit.notes", "ddpmkit.progress"]),
    ("core", ["ddpmkit.core"]),
    ("models", ["ddpmkit.models"]),
    ("data", ["ddpmkit.data"]),
    ("viz", ["ddpmkit.viz"]),
    ("run", ["ddpmkit.run"]),
    ("train", ["ddpmkit.train"]),
    ("eval", ["ddpmkit.eval"]),
    ("serve", ["ddpmkit.serve"]),
    ("faces", ["ddpmkit.cli", "ddpmkit.__main__", "ddpmkit.sampling", "ddpmkit.denoiser"]),
]
LAZY_IMPORTS_ALLOWED = {"ddpmkit.cli"}  # the CLI imports a subcommand's modules only when it runs
# optional extras, imported where they are used so that the core works without them: importer -> module prefix
OPTIONAL_EXTRAS = {"ddpmkit.serve": "gradio"}


def module_names(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under root (a package named `package`)."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def layer_of(module: str, layers=LAYERS) -> int:
    for rank, (_, prefixes) in enumerate(layers):
        # a prefix is a module or a package (its submodules too), except the root package: itself only
        if any(module == p or ("." in p and module.startswith(p + ".")) for p in prefixes):
            return rank
    raise AssertionError(f"{module} belongs to no layer; add it to LAYERS")


def imports_of(path: Path, module: str, known: set[str]):
    """(imported module, line, inside a function, third-party module name) for each import statement."""
    tree = ast.parse(path.read_text())
    is_package = path.name == "__init__.py"
    found = []

    def visit(node, nested):
        for child in ast.iter_child_nodes(node):
            inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    found.append((_resolve(alias.name, None, known), child.lineno, nested, alias.name))
            elif isinstance(child, ast.ImportFrom):
                base = _absolute(child, module, is_package)
                for alias in child.names:
                    found.append((_resolve(base, alias.name, known), child.lineno, nested, base))
            visit(child, inner)

    visit(tree, False)
    return found


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if node.level == 0:
        return node.module
    parts = module.split(".")
    base = parts if is_package else parts[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _resolve(base: str, name, known: set[str]):
    """The package module an import refers to (a submodule when `from pkg import sub`), or None."""
    if name is not None and f"{base}.{name}" in known:
        return f"{base}.{name}"
    return base if base in known else None


def check_package(
    root: Path, package: str = "ddpmkit", layers=LAYERS, lazy_ok=LAZY_IMPORTS_ALLOWED, extras=OPTIONAL_EXTRAS
) -> list[str]:
    """Every violation of the layering rules, one line each."""
    modules = module_names(root, package)
    known, problems, graph = set(modules), [], {}
    for module, path in modules.items():
        rank, edges = layer_of(module, layers), set()
        for target, line, nested, raw in imports_of(path, module, known):
            where = f"{path.relative_to(root.parent)}:{line}"
            if target is None:  # a third-party module
                allowed = any(module.startswith(m) and raw.startswith(x) for m, x in extras.items())
                if nested and module not in lazy_ok and not allowed:
                    problems.append(f"{where}: imports {raw} inside a function")
                continue
            if layer_of(target, layers) > rank:
                problems.append(
                    f"{where}: {module} ({layers[rank][0]}) imports {target} "
                    f"({layers[layer_of(target, layers)][0]}), a higher layer"
                )
            if nested and module not in lazy_ok:
                problems.append(f"{where}: imports {target} inside a function")
            if not nested and target != module:
                edges.add(target)
        graph[module] = edges
    problems += [f"import cycle: {' -> '.join(cycle)}" for cycle in _cycles(graph)]
    return problems


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component) + [sorted(component)[0]])

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def test_ddpmkit_imports_only_downward_without_cycles_or_lazy_imports():
    assert check_package(SRC) == []


def test_every_module_belongs_to_a_layer():
    for module in module_names(SRC, "ddpmkit"):
        layer_of(module)


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


TOY_LAYERS = [("base", ["pkg", "pkg.low"]), ("mid", ["pkg.mid"]), ("top", ["pkg.cli"])]


@pytest.mark.parametrize(
    "files,expected",
    [
        ({"low.py": "from pkg.mid import a\n", "mid/__init__.py": "", "mid/a.py": ""}, "a higher layer"),
        (
            {
                "low.py": "",
                "mid/__init__.py": "",
                "mid/a.py": "from pkg.mid import b\n",
                "mid/b.py": "from . import a\n",
            },
            "import cycle: pkg.mid.a -> pkg.mid.b -> pkg.mid.a",
        ),
        ({"low.py": "", "mid/__init__.py": "", "mid/a.py": "def f():\n    from pkg import low\n"}, "inside a function"),
        ({"low.py": "def f():\n    import json\n"}, "imports json inside a function"),
    ],
)
def test_the_checker_finds_each_kind_of_violation(tmp_path, files, expected):
    """The rules above can fail: a toy package with one violation each."""
    root = _write(tmp_path, {"__init__.py": "", **files})
    problems = check_package(root, "pkg", TOY_LAYERS, lazy_ok={"pkg.cli"}, extras={})
    assert len(problems) == 1 and expected in problems[0], problems


def test_the_cli_may_import_lazily(tmp_path):
    root = _write(tmp_path, {"__init__.py": "", "low.py": "", "cli.py": "def main():\n    from pkg import low\n"})
    assert check_package(root, "pkg", TOY_LAYERS, lazy_ok={"pkg.cli"}, extras={}) == []


# ---- registries: a new sampler option is reachable from the config and the command line -----------


def test_every_sampler_option_is_a_sample_config_field_and_a_flag():
    fields = set(SampleConfig.__dataclass_fields__)
    sample_flags = {a.dest for a in build_parser()._subparsers._group_actions[0].choices["sample"]._actions}
    for name in SAMPLERS:
        for option in sampler_options(name):
            assert option in fields, f"{name}'s option {option} is not a SampleConfig field"
            assert option in SAMPLER_OPTION_FLAGS and option in sample_flags, f"{name}'s {option} has no flag"


def test_sampler_options_come_from_the_signature():
    assert sampler_options("ddim") == ["eta"] and sampler_options("ddpm") == ["variance"]
    assert sampler_options("heun") == ["s_churn", "s_tmin", "s_tmax", "s_noise"] and sampler_options("unipc") == [
        "order"
    ]
    assert sampler_options("dpm++") == []
    assert all(p.kind is not p.VAR_KEYWORD for f in SAMPLERS.values() for p in inspect.signature(f).parameters.values())
