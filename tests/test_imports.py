"""The package imports in one direction: storage formats and the runtime below the quantizer, a model that knows
no quantization, and no import cycles. Read from the source (every import statement, also inside functions)."""

from __future__ import annotations

import ast
from pathlib import Path

import quantkit

ROOT = Path(quantkit.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the quantkit modules it imports (`from pkg import sub` counts as importing pkg.sub)."""
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("quantkit")}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
                if not base.startswith("quantkit"):
                    continue
                subs = {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules}
                deps |= subs or {base}
                if len(subs) < len(node.names):
                    deps.add(base)
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def _in(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def test_formats_and_runtime_import_nothing_from_quant():
    graph = import_graph()
    bad = {m: sorted(d for d in deps if _in(d, "quantkit.quant")) for m, deps in graph.items()
           if _in(m, "quantkit.formats", "quantkit.quantized_model")}  # fmt: skip
    assert not {m: d for m, d in bad.items() if d}


def test_model_imports_no_quantization_code():
    graph = import_graph()
    bad = {m: sorted(d for d in deps if _in(d, "quantkit.quant", "quantkit.kernels", "quantkit.formats"))
           for m, deps in graph.items() if _in(m, "quantkit.model")}  # fmt: skip
    assert not {m: d for m, d in bad.items() if d}


def test_no_import_cycles():
    graph = import_graph()
    cycles, state = [], {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = "open"
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                cycles.append(stack[stack.index(d) :] + [d])
            elif d not in state:
                visit(d, [*stack, d])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles


def test_the_walker_sees_imports():
    """The checks above would pass on an empty graph: make sure edges are found, lazy ones included."""
    graph = import_graph()
    assert "quantkit.formats.packed" in graph["quantkit.formats.gptq"]
    assert "quantkit.quant.pipeline" in graph["quantkit.commands.quantize"]  # imported inside the command function
    assert sum(len(d) for d in graph.values()) > 100


def test_public_names_are_not_defined_twice():
    """One meaning per name across the package (two `dequantize` or `load_config` once read as one)."""
    seen: dict[str, list[str]] = {}
    for path in ROOT.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef | ast.ClassDef):
                names = [node.name]
            elif isinstance(node, ast.Assign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names = [t.id for t in targets if isinstance(t, ast.Name)]
            else:
                continue
            for n in names:
                if not n.startswith("_") and n not in ("__all__", "main"):
                    seen.setdefault(n, []).append(_module_name(path))
    for name in ("dequantize", "quantization_config", "load_config", "DTYPES"):
        assert len(seen.get(name, [])) <= 1, (name, seen[name])


def test_only_the_command_line_imports_the_commands():
    graph = import_graph()
    users = {m for m, deps in graph.items() if any(_in(d, "quantkit.commands") for d in deps)}
    assert users and all(_in(m, "quantkit.cli", "quantkit.commands") for m in users), users
