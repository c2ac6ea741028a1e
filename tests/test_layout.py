"""The package layout: dependencies point one way, and every guest backend speaks the
protocols the migrator drives.

Layers, lowest first: ``transport`` (bytes and fds) and ``vmem.format`` (the bytes on the
wire) know nothing of ours; ``guests`` use only the memory layer of ``vmem``;
``vmem.tracking`` knows no backend; ``vmem.migration`` drives guests through
``vmem.migration.backend``; ``vmem.analysis`` uses migration and parses no command line
(each command's arguments are its module in ``vmem.cli``); ``vmem.bench`` (regression
runs) and ``vmem.testing`` (the pytest plugin) use both; ``vmem.cli`` and
``vmem.agent`` sit on top, and the agent does not use the CLI.  Every import counts,
including those inside functions.
"""
from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from guests.launch import ProcessGuest
from vmem.migration.backend import IncomingGuest, PauseResult, PostcopyGuest, SourceGuest
from vmem.tracking import KvmDirtyGuest, MprotectGuest, UffdWpGuest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("vmem", "guests", "transport")

#: importer prefix -> imported prefixes it must not use.
FORBIDDEN = {
    "transport": ("vmem", "guests"),
    "guests": ("vmem.migration", "vmem.format", "vmem.analysis", "vmem.cli", "vmem.agent",
               "vmem.tracking"),
    "vmem.format": ("vmem.migration", "vmem.analysis", "vmem.cli", "vmem.agent", "transport",
                    "guests"),
    "vmem.migration": ("vmem.cli", "vmem.agent", "vmem.analysis", "vmem.bench", "vmem.testing"),
    # analysis is a library: each command's argument parsing is its module in vmem.cli
    "vmem.analysis": ("vmem.cli", "vmem.agent", "vmem.bench", "vmem.testing", "argparse"),
    "vmem.bench": ("vmem.cli", "vmem.agent", "vmem.testing"),
    "vmem.testing": ("vmem.cli", "vmem.agent"),
    # the agent is a daemon: it rebuilds migration options with vmem.migration.flags, never
    # with the command line's parser (a CLI change must not change what the daemon accepts)
    "vmem.agent": ("vmem.cli", "vmem.bench", "vmem.testing"),
    "vmem.tracking": ("guests", "vmem.migration"),
}

#: Known violations being removed on other branches of issue 10: (importer, imported).
#: Empty this list once they are merged; nothing may be added to it.
#: Known exceptions (importer, forbidden package), each with a comment saying why; empty now.
ALLOWED: set[tuple[str, str]] = set()


def _module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, root: Path = ROOT) -> list[tuple[str, int]]:
    """Absolute module names ``path`` imports anywhere (top level or inside functions)."""
    module = _module_name(path, root)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importer's package
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            # ``from vmem import _native`` or ``from vmem.format import stream``: the
            # submodule is what is imported.
            out += [(f"{name}.{alias.name}", node.lineno) for alias in node.names]
    return out


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def layering_violations(root: Path = ROOT) -> list[str]:
    """``file:line: importer -> imported`` for every import against :data:`FORBIDDEN`."""
    found = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            importer = _module_name(path, root)
            rules = [bad for src, bad in FORBIDDEN.items() if _within(importer, src)]
            for name, line in _imports(path, root):
                for bad in (b for rule in rules for b in rule):
                    if _within(name, bad) and not _within(importer, bad) \
                            and (importer, bad) not in ALLOWED:
                        found.append(f"{path.relative_to(root)}:{line}: {importer} -> {name}")
    return found


def test_dependencies_point_one_way():
    assert layering_violations() == []


@pytest.mark.parametrize("package,source,found", [
    # an import inside a function counts
    ("tracking", "def f():\n    from guests.control import Command\n",
     "vmem/tracking/sneaky.py:2: vmem.tracking.sneaky -> guests.control.Command"),
    # argument parsing belongs to the command's module in vmem.cli, not to analysis
    ("analysis", "import math\n\ndef add_tool_arguments(p):\n    import argparse\n",
     "vmem/analysis/sneaky.py:4: vmem.analysis.sneaky -> argparse"),
])
def test_the_checker_fires(tmp_path, package, source, found):
    bad = tmp_path / "vmem" / package
    bad.mkdir(parents=True)
    (bad / "sneaky.py").write_text(source)
    (tmp_path / "guests").mkdir()
    (tmp_path / "transport").mkdir()
    assert layering_violations(tmp_path) == [found]


def test_every_lazy_command_lives_in_the_cli():
    """``vmem X``'s arguments and runner are a vmem.cli module (the work may be anywhere)."""
    from vmem.cli.main import _LAZY_COMMANDS, _LAZY_RUNNERS

    modules = [m for m, *_ in _LAZY_COMMANDS.values()] + [m for m, _ in _LAZY_RUNNERS.values()]
    assert [m for m in modules if not _within(m, "vmem.cli")] == []


def test_allow_list_names_only_live_violations():
    """An entry whose import is gone must leave the list (it only shrinks)."""
    saved = set(ALLOWED)
    try:
        ALLOWED.clear()
        live = {tuple(v.split(": ", 1)[1].split(" -> ")) for v in layering_violations()}
    finally:
        ALLOWED.update(saved)
    for importer, bad in saved:
        assert any(i == importer and _within(n, bad) for i, n in live), \
            f"{importer} -> {bad} is fixed: remove it from ALLOWED"


# --- backend conformance ------------------------------------------------------------------

def _members(protocol) -> set[str]:
    names = set(getattr(protocol, "__annotations__", {}))
    for klass in protocol.__mro__:
        if klass.__module__ in ("typing", "builtins") or klass is object:
            continue
        names |= set(getattr(klass, "__annotations__", {}))
        names |= {n for n, v in vars(klass).items() if callable(v) and not n.startswith("_")}
    return names


def _check_conforms(implementation, protocol) -> None:
    for name in sorted(_members(protocol)):
        assert hasattr(implementation, name) or name in _instance_attributes(implementation), \
            f"{implementation.__name__} lacks {protocol.__name__}.{name}"
        wanted = getattr(protocol, name, None)
        if not callable(wanted) or isinstance(inspect.getattr_static(protocol, name), property):
            continue
        have = inspect.signature(getattr(implementation, name))
        want = inspect.signature(wanted)
        have_params = list(have.parameters.values())
        for i, param in enumerate(want.parameters.values()):
            match = have.parameters.get(param.name)
            assert match is not None, f"{implementation.__name__}.{name} lacks parameter {param.name}"
            if param.kind is param.POSITIONAL_OR_KEYWORD:
                assert have_params.index(match) == i, \
                    f"{implementation.__name__}.{name}: {param.name} is not parameter {i}"
            assert (param.default is param.empty) == (match.default is match.empty), \
                f"{implementation.__name__}.{name}({param.name}): default differs from {protocol.__name__}"
        extra = [p for p in have.parameters.values()
                 if p.name not in want.parameters and p.default is p.empty
                 and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        assert not extra, f"{implementation.__name__}.{name} requires {extra} the protocol does not pass"


def _instance_attributes(cls) -> set[str]:
    """Attributes ``cls`` or a base class of ours assigns on ``self``."""
    out = set()
    for klass in cls.__mro__:
        if klass is object or klass.__module__ == "builtins":
            continue
        tree = ast.parse(inspect.getsource(klass))
        out |= {node.attr for node in ast.walk(tree)
                if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id == "self" and isinstance(node.ctx, ast.Store)}
    return out


@pytest.mark.parametrize("protocol", [SourceGuest, IncomingGuest, PostcopyGuest, UffdWpGuest,
                                      MprotectGuest])
def test_process_guest_implements_the_backend_protocols(protocol):
    _check_conforms(ProcessGuest, protocol)


@pytest.mark.parametrize("protocol", [SourceGuest, IncomingGuest, PostcopyGuest, KvmDirtyGuest])
def test_kvm_guest_implements_the_backend_protocols(protocol):
    from guests.kvm import KvmGuest

    _check_conforms(KvmGuest, protocol)


def test_pause_info_is_a_pause_result():
    from guests.launch import PauseInfo

    assert isinstance(PauseInfo(1, 2, b"ctx"), PauseResult)
