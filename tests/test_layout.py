"""The package's shape: no import cycles between modules, no module reaching up into the entry points (nor core into
runs), no module much over 400 lines, the public API intact."""
import ast
from pathlib import Path

import slimlm

PACKAGE = Path(slimlm.__file__).parent
MAX_LINES = 420  # "about 400": a module that outgrows it is two concepts
ENTRY_POINTS = ("slimlm.api", "slimlm.cli", "slimlm.pipeline", "slimlm.recipe", "slimlm.steps")  # the layer users call
# the modules above the stages, which may call the entry points: the package itself, ``python -m slimlm``, and
# sweeps (grids of recipes run through the pipeline)
TOP = ("slimlm", "slimlm.__main__", "slimlm.sweep")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path, known: set[str]) -> set[str]:
    """Every slimlm module ``path`` imports, at module level or inside functions (TYPE_CHECKING included):
    ``from a.b import c`` counts as ``a.b.c`` when that is a module, else ``a.b``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                      for a in node.names}
    return {m for m in found if m in known}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path + [node, nxt]
            if nxt not in state and (cycle := visit(nxt, path + [node])):
                return cycle
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node, [])):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycles():
    mods = modules()
    graph = {name: imports(path, set(mods)) - {name} for name, path in mods.items()}
    assert "slimlm.core.engine" in graph["slimlm.api"]  # the scan sees real edges
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def _within(name: str, packages) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def test_no_module_reaches_up():
    """Stages (core, analysis, allocate, pruning, quant, transforms, hooks, gguf, structured, formats, evaluation,
    report, runs) never import the entry points; core, which everything else stands on, never imports runs."""
    mods = modules()
    known = set(mods)
    found = {name: imports(path, known) for name, path in mods.items()}
    assert "slimlm.recipe" in found["slimlm.pipeline"] and "slimlm.runs.save" in found["slimlm.api"]  # real edges
    upward = {name: sorted(m for m in deps if _within(m, ENTRY_POINTS)) for name, deps in found.items()
              if not _within(name, ENTRY_POINTS) and name not in TOP}
    assert {name: deps for name, deps in upward.items() if deps} == {}
    core_on_runs = {name: sorted(m for m in deps if _within(m, ("slimlm.runs",))) for name, deps in found.items()
                    if _within(name, ("slimlm.core",))}
    assert {name: deps for name, deps in core_on_runs.items() if deps} == {}


def test_no_module_is_much_over_400_lines():
    sizes = {name: len(path.read_text().splitlines()) for name, path in modules().items()}
    assert {n: s for n, s in sizes.items() if s > MAX_LINES} == {}


def test_public_api_is_unchanged():
    for name in ("Result", "SlimlmError", "analyze", "apply_runtime", "calibration", "evaluate", "load_model",
                 "plan_budgets", "prune", "quantize", "save", "shrink", "lowrank", "measure_speed", "to_gguf",
                 "__version__"):
        assert name in slimlm.__all__ and hasattr(slimlm, name)
    assert callable(slimlm.prune) and callable(slimlm.evaluate)  # no subpackage shadows an API function


def test_the_command_line_parser_and_the_package_load_no_torch():
    """`slimlm --version` and --help stay fast: torch loads with the first model, check of a method or API call."""
    import subprocess
    import sys

    code = ("import sys, slimlm; from slimlm.cli.parser import build_parser; build_parser(); "
            "import slimlm.config, slimlm.cli; print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
