"""The package structure stays as docs/architecture.md draws it: imports (module level and inside functions)
only go down the layers, and no modules import each other in a cycle. Scanned from the source tree."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "torchspec"

# lower number = lower layer; a module may import its own layer's packages and any lower layer
LAYERS = {
    "utils": 0, "config": 0,
    "data": 1, "models": 1, "export": 1,
    "inference": 2, "transfer": 2,
    "training": 3, "eval": 3,
    "pipeline": 4,
    "train_entry": 5, "regenerate": 5, "__main__": 5,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in ROOT.rglob("*.py"):
        mod = module_name(path)
        deps = graph.setdefault(mod, set())
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                if name.startswith("torchspec.") and name != mod:
                    deps.add(name)
    modules = set(graph)
    # keep edges to modules (an imported name that is not a module counts as its module)
    return {m: {d if d in modules else d.rsplit(".", 1)[0] for d in deps} & modules - {m} for m, deps in graph.items()}


def package(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "torchspec"


def test_imports_only_go_down_the_layers():
    graph = import_graph()
    assert set(map(package, graph)) - {"torchspec"} <= set(LAYERS), "a new package needs a layer in LAYERS"
    upward = sorted(f"{m} -> {d}" for m, deps in graph.items() for d in deps
                    if package(m) != package(d) and LAYERS.get(package(d), 0) > LAYERS.get(package(m), 0))
    assert upward == [], "imports against the layering:\n" + "\n".join(upward)


def test_no_import_cycles():
    graph = import_graph()
    # a module importing its own package's __init__ is how Python loads submodules, not a cycle
    graph = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):   # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
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
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert cycles == [], f"import cycles: {cycles}"


def test_the_scan_sees_real_imports():
    graph = import_graph()
    assert "torchspec.models.eagle3" in graph["torchspec.training.trainer"]       # a lazy import inside a function
    assert "torchspec.transfer.batch" in graph["torchspec.pipeline.ranks"]
