"""The architecture holds: no import cycle anywhere in src/esa, and the engine's core never imports a run kind.

The graph is built from the AST of every module, imports inside functions included (issue 11: the old code
hid a cycle of ~14 modules behind function-local imports). Core = study, execution, store and report core;
it reaches kinds only through the registry :mod:`esa.kinds`, by name."""

from __future__ import annotations

import textwrap

from esa import kinds
from helpers.import_graph import SRC, cycles, graph, imports_of, modules

CORE = ("esa.study", "esa.store", "esa.executors", "esa.executors.core", "esa.executors.local",
        "esa.executors.ray_executor", "esa.report.study_report", "esa.report.html", "esa.kinds", "esa.kinds.base")


def _reachable(g: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in g.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_core_modules_exist_and_never_import_a_kind():
    g = graph()
    kind_modules = set(kinds.KIND_MODULES.values())
    assert set(CORE) <= set(g), set(CORE) - set(g)
    for mod in CORE:
        assert not (_reachable(g, mod) & kind_modules), (mod, _reachable(g, mod) & kind_modules)


def test_every_registered_kind_is_a_module_and_imports_no_other_core_hook():
    """Each registry entry names a module under esa/kinds that exists (adding a kind = a module + one line)."""
    known = modules()
    for name, module in kinds.KIND_MODULES.items():
        assert module == f"esa.kinds.{name}" and module in known


def test_the_graph_sees_function_local_and_relative_imports(tmp_path):
    """Independent check of the AST walk: a module whose only esa imports are hidden in a function body."""
    pkg = tmp_path / "esa" / "x"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    path = pkg / "m.py"
    path.write_text(textwrap.dedent("""
        def f():
            from esa.study import expand
            from . import other
            import esa.store
            return expand, other, esa.store
    """))
    known = {**modules(), "esa.x": pkg / "__init__.py", "esa.x.m": path, "esa.x.other": pkg / "other.py"}
    assert imports_of("esa.x.m", path, known) == {"esa.study", "esa.x.other", "esa.store", "esa.x"}
    assert SRC.name == "src"
