"""The module boundaries the design rests on, checked on the source tree (docs/index.md has the picture).

- Only ``plugins/distributed.py`` talks to ``torch.distributed``: everything
  that crosses ranks is in one place, called on the training thread.
- The core (``ckptbus/``) never imports the plugins: imports run one way.
- Trigger sources never import the saving side or the runtime (they only
  publish on the bus); that they import no torch at all is run for real in
  tests/test_custom_source.py.
- The core's modules import each other without a circle (TYPE_CHECKING
  imports included): each can be read and tested on top of those it imports.
- Every name ckptbus reserves on disk is spelled once, in ckptbus/_names.py;
  everything else imports it.
- The save path goes down the layers: adapters → runtime → sink → ranks and
  commit strategies. A sink never imports the runtime or an adapter; only
  the runtime publishes the outcome of a save; the built-in sinks keep the
  sink contract; the adapters stay translations (their size is the check).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest
from runs import REPO

from ckptbus import SetupError, _names

PLUGINS = REPO / "plugins"
CORE = REPO / "ckptbus"


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports (relative imports resolved against the plugins package)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    package = ["ckptbus", "plugins", *path.parent.relative_to(PLUGINS).parts] if path.is_relative_to(PLUGINS) else []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package[: len(package) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def modules(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)


@pytest.mark.parametrize("path", modules(PLUGINS) + modules(CORE), ids=lambda p: str(p.relative_to(REPO)))
def test_only_the_distributed_module_calls_torch_distributed(path: Path) -> None:
    if path == PLUGINS / "distributed.py":
        return
    assert not any(m == "torch.distributed" or m.startswith("torch.distributed.") for m in imported_modules(path))


@pytest.mark.parametrize("path", modules(CORE), ids=lambda p: str(p.relative_to(REPO)))
def test_the_core_never_imports_the_plugins(path: Path) -> None:
    assert not any(m.startswith("ckptbus.plugins") for m in imported_modules(path))


@pytest.mark.parametrize("path", modules(PLUGINS / "sources"), ids=lambda p: str(p.relative_to(REPO)))
def test_sources_only_publish(path: Path) -> None:
    forbidden = ("ckptbus.plugins.saving", "ckptbus.plugins.runtime", "ckptbus.plugins.distributed", "torch")
    assert not [m for m in imported_modules(path) if m.startswith(forbidden)]


# -- no import circle in the core ----------------------------------------------------------------------


def module_name(path: Path) -> str:
    """``ckptbus/commands/list.py`` -> ``ckptbus.commands.list``; a package's ``__init__.py`` is the package."""
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _compat_hooks(tree: ast.Module) -> set[int]:
    """The nodes inside a module-level ``__getattr__`` (PEP 562): where a module keeps names that moved away
    importable under their old path. It imports the new home only when an old name is asked for, so it is no
    dependency of the module (``ckptbus/_digest.py`` re-exports ``_verify``'s names this way)."""
    return {
        id(inner)
        for node in tree.body
        if isinstance(node, ast.FunctionDef) and node.name == "__getattr__"
        for inner in ast.walk(node)
    }


def core_imports(path: Path, known: set[str]) -> set[str]:
    """The core modules ``path`` imports anywhere in its body: at the top, under ``TYPE_CHECKING``, inside
    functions (all but a compatibility ``__getattr__``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    skipped = _compat_hooks(tree)
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                # ``from . import _verify`` imports a module; ``from ._layout import commit`` the module _layout.
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {m for m in found if m in known and m != name}


def core_graph() -> dict[str, set[str]]:
    paths = modules(CORE)
    known = {module_name(p) for p in paths}
    return {module_name(p): core_imports(p, known) for p in paths}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` (its modules in order, the first repeated at the end), or None."""
    done: set[str] = set()
    path: list[str] = []
    on_path: set[str] = set()

    def visit(module: str) -> list[str] | None:
        if module in on_path:
            return [*path[path.index(module) :], module]
        if module in done:
            return None
        path.append(module)
        on_path.add(module)
        for imported in sorted(graph[module]):
            cycle = visit(imported)
            if cycle:
                return cycle
        path.pop()
        on_path.discard(module)
        done.add(module)
        return None

    for module in sorted(graph):
        cycle = visit(module)
        if cycle:
            return cycle
    return None


def test_the_cycle_finder_finds_a_circle() -> None:
    """The check below is only as good as this."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_core_has_no_import_circle() -> None:
    graph = core_graph()
    assert graph["ckptbus._layout"] >= {"ckptbus._manifest", "ckptbus._names"}, "the graph is read as intended"
    assert graph["ckptbus._source"] >= {"ckptbus._bus"}, "TYPE_CHECKING imports count (_source's only one)"
    cycle = find_cycle(graph)
    assert cycle is None, "import circle in the core: " + " -> ".join(cycle or [])


def test_the_hashing_and_the_names_import_nothing_of_ckptbus() -> None:
    """The bottom of the core: everything may import them, so they import nothing of it."""
    graph = core_graph()
    assert graph["ckptbus._digest"] == set()
    assert graph["ckptbus._names"] == set()
    assert graph["ckptbus._verify"] >= {"ckptbus._layout", "ckptbus._digest"}


# -- every reserved name spelled once ----------------------------------------------------------------------

RESERVED = frozenset(
    {value for key, value in vars(_names).items() if key.isupper() and isinstance(value, str)}
    | _names.RESERVED_NAMES
    | set(_names.RESERVED_PREFIXES)
)

STILL_RESTATED: dict[Path, str] = {}
"""Modules known to restate a reserved name, each with what to do. Strict xfail: once one is fixed, its entry here
must go."""


def restated_names(path: Path) -> Iterator[str]:
    """``line: 'name'`` for each string constant of ``path`` equal to a reserved name (docstrings excluded; the
    literal parts of an f-string count: ``f"checkpoint-{step}"`` restates the prefix)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    documentation = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and node.value in RESERVED and id(node) not in documentation:
            yield f"{node.lineno}: {node.value!r}"


def test_the_scan_sees_a_restated_name(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(
        '''"""Docstrings may say ckptbus.json."""\nA = "ckptbus.json"\n"""metrics.jsonl"""\nB = f"checkpoint-{1}"\n''',
        encoding="utf-8",
    )
    assert list(restated_names(probe)) == ["2: 'ckptbus.json'", "4: 'checkpoint-'"]
    assert {"ckptbus.json", "metrics.jsonl", "checkpoint-", ".ckptbus-staging-", ".ckptbus-probe-"} <= RESERVED


@pytest.mark.parametrize(
    "path",
    [
        pytest.param(p, marks=pytest.mark.xfail(strict=True, reason=STILL_RESTATED[p])) if p in STILL_RESTATED else p
        for p in modules(PLUGINS) + modules(CORE)
        if p != CORE / "_names.py"
    ],
    ids=lambda p: str(p.relative_to(REPO)),
)
def test_reserved_names_are_spelled_only_in_the_names_module(path: Path) -> None:
    restated = list(restated_names(path))
    assert not restated, f"{path.relative_to(REPO)} restates reserved names; import them from ckptbus._names"


# -- the layers of the save path ---------------------------------------------------------------------

SAVE_EVENTS = ("SaveStarted", "SaveCompleted", "SaveFailed")


@pytest.mark.parametrize("path", modules(PLUGINS / "saving"), ids=lambda p: str(p.relative_to(REPO)))
def test_sinks_never_climb_back_into_the_runtime_or_an_adapter(path: Path) -> None:
    forbidden = ("ckptbus.plugins.runtime", "ckptbus.plugins.integrations")
    assert not [m for m in imported_modules(path) if m.startswith(forbidden)]


def save_outcomes_built(path: Path) -> list[str]:
    """``line: name`` for every SaveStarted/SaveCompleted/SaveFailed event ``path`` builds (a call of the class or
    of one of its constructors, such as ``SaveFailed.unserved``)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.id if isinstance(func, ast.Name) else None
        if isinstance(func, ast.Attribute):
            name = func.value.id if isinstance(func.value, ast.Name) else func.attr
        if name in SAVE_EVENTS:
            found.append(f"{node.lineno}: {name}")
    return found


@pytest.mark.parametrize(
    "path",
    [p for p in modules(PLUGINS) + modules(CORE) if p not in (PLUGINS / "runtime.py", CORE / "_events.py")],
    ids=lambda p: str(p.relative_to(REPO)),
)
def test_only_the_runtime_publishes_the_outcome_of_a_save(path: Path) -> None:
    assert save_outcomes_built(path) == []


def test_the_outcome_finder_sees_what_the_runtime_builds() -> None:
    built = {line.split(": ")[1] for line in save_outcomes_built(PLUGINS / "runtime.py")}
    assert built == set(SAVE_EVENTS)


@pytest.mark.slow  # imports torch and accelerate
def test_the_built_in_sinks_keep_the_sink_contract() -> None:
    from ckptbus.plugins.saving.accelerate_sink import AccelerateSink
    from ckptbus.plugins.saving.trainer_sink import TrainerSink

    from ckptbus._sink import check_sink

    assert check_sink(TrainerSink()) is not None
    # (check_sink looks at the class's methods: an instance needs an Accelerator, which this test does not make)
    assert check_sink(AccelerateSink.__new__(AccelerateSink)) is not None
    with pytest.raises(
        SetupError, match="has no plan, execute, begin, poll, abandon, rank_state, rescue_unsupported, rescue"
    ):
        check_sink(type("Half", (), {"start": lambda self, ranks, out: None})())


def code_lines(path: Path) -> int:
    """Lines of code of ``path``: without blank lines, comments and docstrings (module, class, function and
    attribute docstrings)."""
    source = path.read_text(encoding="utf-8")
    docs: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        body = getattr(node, "body", None)
        if not isinstance(body, list):
            continue
        for statement in body:
            value = statement.value if isinstance(statement, ast.Expr) else None
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                docs.update(range(statement.lineno, (statement.end_lineno or statement.lineno) + 1))
    return sum(
        1
        for number, line in enumerate(source.splitlines(), 1)
        if line.strip() and not line.strip().startswith("#") and number not in docs
    )


ADAPTER_LINES = {"accelerate_loop.py": 90, "trainer.py": 132, "axolotl.py": 150}  # trainer: +2, enable_jit_checkpoint
"""The most code lines each adapter may have: an adapter that grows past it has started deciding things the
runtime should own (the step protocol, a sink of its own)."""


@pytest.mark.parametrize("name", sorted(ADAPTER_LINES))
def test_adapters_stay_translations(name: str) -> None:
    assert code_lines(PLUGINS / "integrations" / name) <= ADAPTER_LINES[name]


def test_the_line_counter_skips_docstrings_and_comments(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text(
        '"""Doc."""\n\n# why\nX = 1\n"""X\'s doc."""\n\n\ndef f() -> None:\n    """Doc."""\n    return None\n'
    )
    assert code_lines(module) == 3
