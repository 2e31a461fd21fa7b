"""The layering of nanovl/: no import circle (imports inside functions count too), and the directions
docs/architecture.md gives: the model layer imports nothing above it, the engine knows no server,
no training and no handle."""

import ast
from pathlib import Path

import nanovl

ROOT = Path(nanovl.__file__).parent
ABOVE_MODELS = ("nanovl.engine", "nanovl.serve", "nanovl.eval", "nanovl.train", "nanovl.cli", "nanovl.api",
                "nanovl.processor", "nanovl.checkpoint", "nanovl.tiny", "nanovl.synth")  # fmt: skip
ABOVE_ENGINE = ("nanovl.serve", "nanovl.eval", "nanovl.train", "nanovl.cli", "nanovl.api", "nanovl.processor")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def graph() -> dict[str, set[str]]:
    """Module -> the nanovl modules it imports (resolved to modules that exist, packages included)."""
    files = {module_name(p): p for p in ROOT.rglob("*.py")}
    edges = {}
    for name, path in files.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("nanovl"):
                for alias in node.names:  # `from nanovl.x import y`: y may be a module itself
                    sub = f"{node.module}.{alias.name}"
                    deps.add(sub if sub in files else node.module)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("nanovl")}
        edges[name] = {d for d in deps if d in files and d != name}
    return edges


def cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(edges[n]):
            if state.get(m) == "open":
                return stack[stack.index(m) :] + [m]
            if m not in state and (found := visit(m)):
                return found
        state[n] = "done"
        stack.pop()
        return None

    for n in sorted(edges):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_graph_sees_imports_inside_functions():
    edges = graph()
    assert "nanovl.engine.embed_store" in edges["nanovl.processor"]  # imported inside encode_media
    assert "nanovl.models" in edges["nanovl.checkpoint"]


def test_no_import_circle():
    assert cycle(graph()) is None, " -> ".join(cycle(graph()))


def test_imports_go_one_way():
    edges = graph()
    wrong = [(a, b) for a, deps in edges.items() for b in deps
             if (a.startswith("nanovl.models") and b.startswith(ABOVE_MODELS))
             or (a.startswith("nanovl.engine") and b.startswith(ABOVE_ENGINE))]  # fmt: skip
    assert not wrong, wrong
