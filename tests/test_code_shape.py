"""The code's shape, checked: no import cycles between moe_dist's modules or packages, small
files, a trainer that names no method, and a method registry a new method plugs into with
one file."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "moe_dist"
METHOD_NAMES = re.compile(r"hellora|hellori|epng|dmep", re.IGNORECASE)


def _modules() -> dict[str, Path]:
    out = {}
    for f in PACKAGE.rglob("*.py"):
        parts = f.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _import_graph() -> dict[str, set[str]]:
    """Module -> moe_dist modules it imports, anywhere in the file (function-level imports
    run too), except under `if TYPE_CHECKING:` (never executed)."""
    modules = _modules()
    graph = {}
    for name, f in modules.items():
        tree = ast.parse(f.read_text())
        type_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                     and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
        deps = set()
        for node in ast.walk(tree):
            if id(node) in type_only:
                continue
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                deps |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                         for a in node.names}
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one member (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_walker_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    graph = _import_graph()
    assert "moe_dist.moe.experts" in graph["moe_dist.models.convert"]  # it sees real imports


def test_no_module_imports_a_module_that_imports_it_back():
    assert _cycles(_import_graph()) == []


def test_no_import_cycle_between_packages():
    package = lambda m: ".".join(m.split(".")[:2])  # noqa: E731  moe_dist.train, moe_dist.config, ...
    graph: dict[str, set[str]] = {}
    for mod, deps in _import_graph().items():
        graph.setdefault(package(mod), set()).update(package(d) for d in deps if package(d) != package(mod))
    assert _cycles(graph) == []


def test_no_file_over_400_lines():
    long = {str(f.relative_to(PACKAGE.parent)): n for f in PACKAGE.rglob("*.py")
            if (n := len(f.read_text().splitlines())) > 400}
    assert long == {}


def test_the_trainer_names_no_method():
    hits = [f"{f.name}:{i}: {line.strip()}" for f in (PACKAGE / "train").rglob("*.py")
            for i, line in enumerate(f.read_text().splitlines(), 1) if METHOD_NAMES.search(line)]
    assert hits == []


def test_every_method_is_registered_with_its_sections():
    from moe_dist.config import RunConfig
    from moe_dist.methods import METHODS

    assert set(METHODS) == {"lora", "hellora", "hellori", "epng", "dmep"}
    cfg = RunConfig()
    for cls in METHODS.values():
        for section in (*cls.sections, *cls.uses_sections):
            assert hasattr(cfg, section), (cls.name, section)


def test_a_new_method_is_one_class(tmp_path):
    """A method defined outside the package registers, gets its config section, validates it
    by field path, and the trainer's calls reach it (the protocol the README shows)."""
    import dataclasses
    import types

    from moe_dist.config import ConfigError
    from moe_dist.methods import METHODS, Change, Method, method_class, method_sections, register

    @dataclasses.dataclass
    class HalveSection:
        at_step: int = 3

        def validate(self, path: str) -> None:
            if self.at_step <= 0:
                raise ConfigError(f"{path}.at_step must be > 0, got {self.at_step}")

    @register
    class Halve(Method):
        name = "halve_ranks_test"
        sections = {"halve": HalveSection}

        def decides_at(self, step):
            return step == self.cfg.halve.at_step

        def decide(self, step, model, plan):
            return Change(plan=plan, summary=f"step {step}: nothing to halve in a test")

    try:
        assert "halve" in method_sections() and method_class("halve_ranks_test") is Halve
        section = HalveSection(at_step=0)
        with pytest.raises(ConfigError, match="halve.at_step"):
            section.validate("halve")
        halve = Halve(types.SimpleNamespace(halve=HalveSection()))
        assert not halve.decides_at(1) and halve.decides_at(3)
        assert halve.extra_loss(None) is None and halve.state_dict() == {}
    finally:
        METHODS.pop("halve_ranks_test")
    with pytest.raises(ConfigError, match="not one of"):
        method_class("halve_ranks_test")
