"""The package's shape, checked: modules import each other without cycles (imports inside functions included),
no function is over 40 lines, and only layers.py reads weight layouts by op type."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "onnxprune"
LAYER_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


def modules() -> dict[str, ast.Module]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = ast.parse(path.read_text(), str(path))
    return found


def imported(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """The package modules `name` imports anywhere in its body (a package's own __init__ counts as the package)."""
    package = name if (PACKAGE.parent / name.replace(".", "/") / "__init__.py").exists() else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            targets |= {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names}
        elif isinstance(node, ast.Import):
            targets |= {a.name for a in node.names}
    return {t for t in targets if t in known and t != name}


def test_no_import_cycles():
    trees = modules()
    graph = {name: imported(name, tree, set(trees)) for name, tree in trees.items()}
    graph = {name: {t for t in targets if not name.startswith(t + ".")} for name, targets in graph.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(graph[name]):
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [target] if target in path else [name, target])
            elif target not in state:
                visit(target, path + [target])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, f"import cycles: {cycles}"


def test_no_function_over_40_lines():
    long = [f"{name}.{node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for name, tree in modules().items() for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 40]
    assert not long, long


def test_only_layers_branches_on_weight_layer_op_types():
    """A comparison with a layer op's name (`op_type == "Gemm"`, `in ("Conv", "MatMul")`) belongs in layers.py;
    rules register per op by name, which is not a branch."""
    offenders = []
    for name, tree in modules().items():
        if name == "onnxprune.layers":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare) and LAYER_OPS & _strings(node):
                offenders.append(f"{name}:{node.lineno}")
    assert not offenders, offenders


def _strings(node: ast.AST) -> set[str]:
    return {n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
