"""The package's folders are the pipeline's stages, and imports only go the pipeline's way.

This is the declared import graph: read from the source (every import statement, those inside
functions too), so a new import that crosses a stage boundary fails here, with the line, before
anyone has to find it in review. The README's "How it works" describes the same folders.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "picosnitch"

# Modules every stage may use: the vocabulary they share. They import only each other.
SHARED = {"picosnitch", "picosnitch.channels", "picosnitch.config", "picosnitch.files", "picosnitch.connection", "picosnitch.heap",
          "picosnitch.installed", "picosnitch.messages", "picosnitch.parent_death",
          "picosnitch.paths", "picosnitch.sanitize", "picosnitch.timestamps", "picosnitch.unprivileged"}

# What each stage may import besides itself and the shared modules: only stages before it in
# the pipeline. The daemon wires the stages together; the UIs read what the stages wrote.
MAY_IMPORT = {
    "picosnitch.kernel": (),
    "picosnitch.identity": ("picosnitch.kernel",),
    "picosnitch.store": (),
    "picosnitch.central": ("picosnitch.store",),
    "picosnitch.alerts": (),
    # Guard mode decides connections on identities (hashing, names), stores verdicts, prompts on the
    # desktop as the notifier does, and shows a prompt's country as the UIs do (ui.annotations).
    "picosnitch.guard": ("picosnitch.kernel", "picosnitch.identity", "picosnitch.store", "picosnitch.alerts",
                         "picosnitch.ui.annotations"),
    "picosnitch.daemon": ("picosnitch.kernel", "picosnitch.identity", "picosnitch.store",
                          "picosnitch.central", "picosnitch.alerts", "picosnitch.guard"),
    "picosnitch.ui": ("picosnitch.store", "picosnitch.central", "picosnitch.alerts", "picosnitch.guard",
                      "picosnitch.daemon.live_feed"),
}
# The command line starts any of them.
ENTRY_POINTS = {"picosnitch.cli", "picosnitch.__main__"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str) -> list[tuple[str, int]]:
    """(imported module, line) of every import in module `name`; `from X import y` counts as
    X.y when that is a module of the package, else as X."""
    tree = ast.parse(MODULES[name].read_text(), str(MODULES[name]))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{MODULES[name]}:{node.lineno}: use absolute imports"
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.append((child if child in MODULES else node.module, node.lineno))
    return found


def stage_of(name: str) -> str:
    return next((stage for stage in MAY_IMPORT if name == stage or name.startswith(stage + ".")), "")


def within(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_every_module_is_a_stage_a_shared_module_or_the_command_line():
    strays = [name for name in MODULES if not (stage_of(name) or name in SHARED or name in ENTRY_POINTS)]
    assert strays == [], "add each to a stage folder (or, if every stage needs it, to SHARED)"


def test_imports_follow_the_pipeline():
    crossings = []
    for name in MODULES:
        if name in ENTRY_POINTS:
            continue
        stage = stage_of(name)
        allowed = (stage, *MAY_IMPORT[stage]) if stage else ()
        for imported, line in imports(name):
            if not imported.startswith("picosnitch") or imported in SHARED or within(imported, allowed):
                continue
            crossings.append(f"{MODULES[name].relative_to(PACKAGE.parent)}:{line} imports {imported}")
    assert crossings == []


def test_kernel_identity_and_store_never_import_the_uis():
    for name in MODULES:
        if within(name, ("picosnitch.kernel", "picosnitch.identity", "picosnitch.store")):
            assert not any(within(i, ("picosnitch.ui",)) for i, _ in imports(name)), name


def closure(start: str) -> set[str]:
    """`start` and every module of the package it imports, directly or not."""
    seen, todo = set(), [start]
    while todo:
        name = todo.pop()
        if name in seen or name not in MODULES:
            continue
        seen.add(name)
        todo += [i for i, _ in imports(name)]
        todo += [n for n in MODULES if name.startswith(n + ".")]  # importing runs the parents
    return seen


def test_the_dashboard_and_the_shared_presentation_never_import_curses():
    readers = [n for n in MODULES if within(n, ("picosnitch.ui.dash", "picosnitch.ui.text",
                                                 "picosnitch.ui.annotations"))]
    assert "picosnitch.ui.dash.api" in readers
    for reader in readers:
        for name in closure(reader):
            assert not any(within(i, ("curses",)) for i, _ in imports(name)), (reader, name)


def test_the_curses_uis_share_their_presentation_instead_of_borrowing_from_each_other():
    for ui in ("picosnitch.ui.view", "picosnitch.ui.top", "picosnitch.ui.dash.api",
               "picosnitch.ui.dash.app"):
        others = {"picosnitch.ui.view", "picosnitch.ui.top"} - {ui}
        assert not any(i in others for i, _ in imports(ui)), ui


def test_no_module_imports_a_private_name_of_another():
    private = []
    for name in MODULES:
        tree = ast.parse(MODULES[name].read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("picosnitch"):
                private += [f"{name} imports {node.module}.{a.name}" for a in node.names
                            if a.name.startswith("_") and not a.name.startswith("__")]
    assert private == []
