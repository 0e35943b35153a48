"""The package's imports go one way: config, the domain, storage, providers, threads, the
HTTP API, then the app and the command line. Every import counts, at module level, inside
functions and for type checking alone.
"""

from __future__ import annotations

import ast
from pathlib import Path

import provider_router

PACKAGE = Path(provider_router.__file__).parent
# Lowest first; a module belongs to the first prefix that names it (the longest is listed first).
LAYERS: list[tuple[str, ...]] = [
    ("config", "location"),
    ("errors", "messages", "as_chat", "history", "sse", "replies", "routing", "records", "redact", "logsetup", "rowtext"),
    ("store",),
    ("providers",),
    ("sessions", "threads"),
    ("api", "middleware", "state", "metrics", "ui"),
    ("app", "serve", "startup", "stopping", "cli", "__main__", ""),
]
KNOWN_UPWARD: set[tuple[str, str]] = set()  # none: keep it so
KNOWN_CYCLES: list[set[str]] = []


def _name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(module: str) -> set[str]:
    """The package's modules `module` imports (a package's own `__init__` for a name it exports)."""
    path = MODULES[module]
    parts = module.split(".") if module else []
    here = parts if path.name == "__init__.py" else parts[:-1]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name.removeprefix("provider_router.") for a in node.names if a.name.startswith("provider_router.")}
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if not (node.module or "").startswith("provider_router"):
                    continue
                base = (node.module or "").removeprefix("provider_router").lstrip(".")
            else:
                base = ".".join([*here[: len(here) - node.level + 1], *([node.module] if node.module else [])])
            for a in node.names:
                sub = f"{base}.{a.name}".lstrip(".")
                out.add(sub if sub in MODULES else base)
    return out - {module}


def _layer(module: str) -> int:
    for i, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes if p) or module in prefixes:
            return i
    raise AssertionError(f"{module} is in no layer: add it to LAYERS")


GRAPH = {m: _imports(m) for m in MODULES}


def test_every_import_goes_down_the_layers_or_stays_in_its_own() -> None:
    """No module imports one from a layer above its own (the domain never reaches for the
    store, the store never for the API, providers never for threads)."""
    upward = {(m, d) for m, deps in GRAPH.items() for d in deps if _layer(d) > _layer(m)}
    assert upward <= KNOWN_UPWARD, sorted(upward - KNOWN_UPWARD)


def test_no_module_imports_itself_round_a_cycle() -> None:
    """No cycle of imports between modules, whichever way the imports run."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[set[str]] = []

    def visit(m: str) -> None:  # Tarjan's strongly connected components
        index[m] = low[m] = len(index)
        stack.append(m)
        for d in GRAPH.get(m, ()):
            if d not in index:
                visit(d)
                low[m] = min(low[m], low[d])
            elif d in stack:
                low[m] = min(low[m], index[d])
        if low[m] == index[m]:
            component = set()
            while (top := stack.pop()) != m:
                component.add(top)
            component.add(m)
            if len(component) > 1:
                cycles.append(component)

    for m in sorted(GRAPH):
        if m not in index:
            visit(m)
    assert [c for c in cycles if c not in KNOWN_CYCLES] == []


def test_the_request_path_modules_are_where_the_layers_say() -> None:
    """The threads sit below the API and above providers; replies and routing are domain."""
    assert _layer("api.chat") > _layer("threads") > _layer("providers.qwen") > _layer("store.rows") > _layer("replies")
    assert "threads" in GRAPH["api.chat"] and not any(d.startswith("api") for d in GRAPH["threads"])
