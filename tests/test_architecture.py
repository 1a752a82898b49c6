"""The package's shape: no import cycles, lower floors never import higher ones, the public API at the top."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import minimind_pl

PACKAGE = Path(minimind_pl.__file__).parent

# Floors, lowest first: a module may import its own floor and the ones below, never one above.
CORE = ("errors", "config", "model", "losses", "lora", "tokenizer", "chat_format", "generation", "checkpoints",
        "throughput", "rewards", "files", "lazy", "vision", "stats", "tools", "agent_rollout")
TRAINING = ("data", "stages", "callbacks", "checkpoint_io", "lightning_compat")
COMMANDS = ("commands", "demo", "cli", "training_cli")


def module_name(path: Path) -> str:
    """``minimind_pl.x.y`` of a file of the package."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that ``path`` imports anywhere (module level or inside functions)."""
    name, found = module_name(path), set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {t for t in targets if t in modules}
    return found - {name}


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports."""
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(f) for f in files}
    return {module_name(f): imported_modules(f, modules) for f in files}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path ``[a, b, ..., a]``, or None. A package importing its own submodules
    (``x/__init__.py`` re-exporting ``x.y``) is not a cycle unless ``x.y`` imports ``x`` back."""
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state and (cycle := visit(nxt, path + [nxt])):
                return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def floor(module: str) -> int:
    """0 = core, 1 = training, 2 = commands; the package's ``__init__`` counts as core."""
    top = module.split(".")[1] if "." in module else ""
    for level, names in enumerate((CORE, TRAINING, COMMANDS)):
        if top in names:
            return level
    assert module == "minimind_pl", f"{module} belongs to no floor: add it to CORE, TRAINING or COMMANDS"
    return 0


def test_find_cycle_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_package_has_no_import_cycle():
    assert find_cycle(import_graph()) is None


def test_lower_floors_never_import_higher_ones():
    upward = [f"{a} -> {b}" for a, deps in import_graph().items() for b in deps if floor(b) > floor(a)]
    assert not upward, "library code imports a command or training module: " + ", ".join(upward)


def top_level_imports(path: Path) -> set[str]:
    """The top-level packages a file imports (``lightning``, ``torch``, ``minimind_pl``, ...)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names.add((node.module or "").split(".")[0])
    return names


def test_the_core_does_not_import_lightning():
    """The model, tokenizer, generation and weight formats work without Lightning (plain PyTorch)."""
    core = [f for f in PACKAGE.rglob("*.py") if floor(module_name(f)) == 0]
    assert [module_name(f) for f in core if "lightning" in top_level_imports(f)] == []


# Modules that must load without Lightning (``import lightning`` takes seconds): the token cache and what it reads
# with, the data formats, and the commands that read data (``data`` except ``prepare``, ``eval``, ``tokenizer``).
LIGHTNING_FREE_PREFIXES = ("minimind_pl.data.formats", "minimind_pl.commands.data")
LIGHTNING_FREE = ("minimind_pl.data.cache", "minimind_pl.data.jsonl", "minimind_pl.data.block_map",
                  "minimind_pl.data.packing", "minimind_pl.data.loader", "minimind_pl.commands.evaluate",
                  "minimind_pl.commands.tokenizer")
NEEDS_LIGHTNING = ("minimind_pl.commands.data.prepare",)  # runs LightningCLI


def loaded_with(module: str, graph: dict[str, set[str]]) -> set[str]:
    """Every package module that importing ``module`` loads: its imports, theirs, and the packages above each."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parents = [name.rsplit(".", k)[0] for k in range(1, name.count(".") + 1)]
        todo += [m for m in [*graph.get(name, ()), *parents] if m in graph]
    return seen


def test_loaded_with_follows_imports_and_parent_packages():
    graph = {"p": set(), "p.a": {"p.b"}, "p.b": {"p.c.d"}, "p.c": set(), "p.c.d": set(), "p.e": set()}
    assert loaded_with("p.a", graph) == {"p", "p.a", "p.b", "p.c", "p.c.d"}


def test_the_data_tools_and_the_token_cache_load_without_lightning():
    """Transitively: nothing the data tools, eval, tokenizer training or the token cache load imports Lightning
    (at module level or inside a function)."""
    graph = import_graph()
    roots = [m for m in graph if m in LIGHTNING_FREE or m.startswith(LIGHTNING_FREE_PREFIXES)]
    roots = [m for m in roots if m not in NEEDS_LIGHTNING]
    assert len(roots) >= len(LIGHTNING_FREE) + 8, roots  # the prefixes matched the formats and the data tools
    files = {module_name(f): f for f in PACKAGE.rglob("*.py")}
    offenders = {f"{root} loads {m}" for root in roots for m in loaded_with(root, graph)
                 if "lightning" in top_level_imports(files[m])}
    assert not offenders, "Lightning is loaded by: " + ", ".join(sorted(offenders))


def test_public_api_imports_alone_without_lightning():
    """``from minimind_pl import ...`` in a fresh interpreter loads neither Lightning nor any command."""
    code = ("import sys; from minimind_pl import ModelConfig, MiniMindForCausalLM, Tokenizer, load_model; "
            "print(sorted(m for m in sys.modules if m.startswith(('lightning', 'minimind_pl.commands', "
            "'minimind_pl.stages', 'minimind_pl.demo'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_vision_package_loads_neither_transformers_nor_lightning():
    """MiniMind-V's image side is our own code over torch and Pillow: transformers is a test-only reference."""
    graph = import_graph()
    files = {module_name(f): f for f in PACKAGE.rglob("*.py")}
    vision = [m for m in graph if m.startswith("minimind_pl.vision.")]
    assert "minimind_pl.vision.preprocess" in vision
    offenders = {f"{root} loads {m}" for root in vision for m in loaded_with(root, graph)
                 if top_level_imports(files[m]) & {"transformers", "lightning"}}
    assert not offenders, ", ".join(sorted(offenders))
