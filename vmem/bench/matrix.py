"""The scenario matrix of a regression run: which migrations ``vmem bench`` makes.

A matrix is the cross product of its axes -- workloads (with parameters) x guest sizes x
policies (with options) x trackers x modes (``precopy``, ``postcopy``, ``hybrid``) x
bandwidth caps -- plus how often to repeat each cell.  It comes from a TOML file
(:func:`load_matrix`), from a built-in suite (:data:`SUITES`: ``standard``, small enough
for CI, and ``full``) or from command-line axes (:func:`matrix_from_axes`).  Every value is
checked before a single guest boots; a bad one raises :class:`ConfigError` naming it.

A TOML matrix (top-level keys first, then the tables)::

    name = "mine"
    repeats = 3            # runs per cell, interleaved (see vmem.bench.runner)
    warmup_s = 0.3         # the guest runs this long before each migration
    observe_s = 0.2        # the migrated guest runs this long after it
    seed = 1
    sizes = ["32M", "64M"]
    trackers = ["auto"]    # auto | uffd-wp | mprotect
    modes = ["precopy", "postcopy", "hybrid"]
    bandwidths = ["unlimited", "200M"]

    [[workloads]]
    name = "hotcold"
    params = { rate = 5000 }

    [[policies]]
    name = "threshold"
    options = { precopy_iterations = 3, precopy_threshold = 100 }

    [thresholds.downtime_ms]  # optional: the verdict rule per metric (vmem.bench.verdict)
    rel = 0.5
    abs = 20

A pure post-copy migration consults no policy, so ``postcopy`` cells collapse the policy
axis to one cell (policy ``none``).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from vmem.errors import ConfigError

__all__ = ["Cell", "Matrix", "MODES", "SUITES", "load_matrix", "matrix_from_dict", "matrix_from_axes",
           "suite_matrix", "typed_params", "build_policy"]

#: Modes and the ``MigrationOptions.postcopy`` each one asks for.
MODES = {"precopy": "off", "postcopy": "pure", "hybrid": "after-precopy"}
TRACKERS = ("auto", "uffd-wp", "mprotect")
_TOP_KEYS = {"name", "repeats", "warmup_s", "observe_s", "seed", "sizes", "trackers", "modes", "bandwidths",
             "workloads", "policies", "thresholds", "alpha"}


def _value(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


@dataclass(frozen=True)
class Cell:
    """One point of the matrix: everything that defines a migration except the repeat.

    ``cell_id`` is stable across vmem versions for the same values: baselines and trend
    views match cells by it.
    """

    workload: str
    params: tuple  # sorted (key, value) pairs, as the workload takes them
    size_bytes: int
    policy: str  # "none" for pure post-copy
    policy_options: tuple  # sorted (key, value) pairs
    tracker: str
    mode: str
    bandwidth_Bps: float | None

    @property
    def cell_id(self) -> str:
        wl = self.workload + (f"({','.join(f'{k}={_value(v)}' for k, v in self.params)})" if self.params else "")
        pol = self.policy + (f"({','.join(f'{k}={_value(v)}' for k, v in self.policy_options)})"
                             if self.policy_options else "")
        bw = f"{self.bandwidth_Bps / 1e6:g}MB/s" if self.bandwidth_Bps else "unlimited"
        return f"{wl}/{self.size_bytes >> 20}MiB/{pol}/{self.tracker}/{self.mode}/{bw}"

    def to_dict(self) -> dict:
        return {"workload": self.workload, "params": dict(self.params), "size_bytes": self.size_bytes,
                "policy": self.policy, "policy_options": dict(self.policy_options), "tracker": self.tracker,
                "mode": self.mode, "bandwidth_Bps": self.bandwidth_Bps}


@dataclass
class Matrix:
    """A validated matrix: its cells (in run order within a repeat) and how to run them."""

    name: str
    cells: list[Cell]
    repeats: int = 3
    warmup_s: float = 0.3
    observe_s: float = 0.2
    seed: int = 1
    #: per-metric verdict thresholds from the file: ``{metric: {"rel": x, "abs": y}}``
    thresholds: dict = field(default_factory=dict)
    alpha: float | None = None

    def to_dict(self) -> dict:
        return {"name": self.name, "repeats": self.repeats, "warmup_s": self.warmup_s, "observe_s": self.observe_s,
                "seed": self.seed, "cells": [c.cell_id for c in self.cells]}


#: Built-in suites.  ``standard``: 4 cells x 3 repeats of a 32 MiB guest, about a minute on a
#: 2-core machine -- small enough for CI.  ``full``: every mode, both trackers, two sizes,
#: three policies, capped and uncapped, four workloads.
SUITES: dict[str, dict] = {
    "standard": {
        "name": "standard", "repeats": 3, "warmup_s": 0.3, "observe_s": 0.2,
        "sizes": ["32M"], "trackers": ["auto"], "bandwidths": ["unlimited"],
        "workloads": [{"name": "hotcold", "params": {"rate": 5000}}],
        "policies": [{"name": "xen"}],
        "modes": ["precopy", "postcopy", "hybrid"],
        "extra": [  # one capped cell: a multi-round pre-copy under the seed patch's knobs
            {"workloads": [{"name": "uniform", "params": {"rate": 5000}}],
             "policies": [{"name": "threshold", "options": {"precopy_iterations": 4, "precopy_threshold": 50}}],
             "modes": ["precopy"], "bandwidths": ["200M"]},
        ],
    },
    "full": {
        "name": "full", "repeats": 5, "warmup_s": 0.5, "observe_s": 0.3,
        "sizes": ["64M", "256M"], "trackers": ["uffd-wp", "mprotect"], "bandwidths": ["unlimited", "200M"],
        "workloads": [{"name": "idle"}, {"name": "uniform", "params": {"rate": 20000}},
                      {"name": "hotcold", "params": {"rate": 20000}}, {"name": "zipf", "params": {"rate": 20000}}],
        "policies": [{"name": "xen"}, {"name": "threshold", "options": {"precopy_iterations": 3, "precopy_threshold": 100}},
                     {"name": "downtime-limit", "options": {"max_downtime_ms": 50}}],
        "modes": ["precopy", "postcopy", "hybrid"],
    },
}


def suite_matrix(name: str) -> Matrix:
    """The built-in suite ``name`` (ConfigError naming ``--suite`` if unknown)."""
    if name not in SUITES:
        raise ConfigError("--suite", f"unknown suite {name!r}; built-ins are {', '.join(SUITES)}")
    return matrix_from_dict(SUITES[name], where="--suite " + name)


def load_matrix(path: str) -> Matrix:
    """Read and validate a TOML matrix file.

    Raises:
        ConfigError: the file is unreadable, not TOML, or a value is wrong (the message
            names the file and the key).
    """
    import tomllib

    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as err:
        raise ConfigError("--matrix", f"cannot read {path}: {err.strerror}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError("--matrix", f"{path} is not valid TOML: {err}") from None
    doc.setdefault("name", path.rsplit("/", 1)[-1].removesuffix(".toml"))
    return matrix_from_dict(doc, where=path)


def _list(doc: dict, key: str, where: str, default: list) -> list:
    v = doc.get(key, default)
    if isinstance(v, (str, dict)):
        v = [v]
    if not isinstance(v, list) or not v:
        raise ConfigError(f"{where}: {key}", f"expected a non-empty list, got {v!r}")
    return v


def _number(doc: dict, key: str, where: str, default, kind=float, minimum=0.0):
    v = doc.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not float(v).is_integer()) \
            or v < minimum:
        raise ConfigError(f"{where}: {key}", f"expected {'an integer' if kind is int else 'a number'} >= {minimum:g}, "
                                             f"got {v!r}")
    return kind(v)


def _named_entry(entry, where: str, axis: str, table: str) -> tuple[str, dict]:
    """``(name, table)`` of one ``[[workloads]]`` / ``[[policies]]`` entry (or a bare name)."""
    if isinstance(entry, str):
        entry = {"name": entry}
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise ConfigError(f"{where}: {axis}", f"each entry needs a name, got {entry!r}")
    unknown = set(entry) - {"name", table}
    if unknown:
        raise ConfigError(f"{where}: {axis}", f"unknown key {sorted(unknown)[0]!r} (name, {table})")
    values = entry.get(table) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: {axis}.{table}", f"expected a table, got {values!r}")
    return entry["name"], values


def typed_params(workload: str, params: dict) -> dict:
    """``params`` (TOML or Python values) checked and typed as ``-W KEY=VALUE`` would be.

    Raises:
        ConfigError: unknown workload or parameter, or a value of the wrong type.
    """
    from guests.workload import load_workload, parse_params

    cls = load_workload(workload)
    return parse_params(cls, [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in params.items()])


def _workload(entry, where: str) -> tuple[str, tuple]:
    name, params = _named_entry(entry, where, "workloads", "params")
    try:
        typed = typed_params(name, params)
    except ConfigError as err:
        raise ConfigError(f"{where}: workload {name!r}", str(err)) from None
    return name, tuple(sorted(typed.items()))


def _policy(entry, where: str) -> tuple[str, tuple]:
    from vmem.analysis.compare import build_policies

    name, options = _named_entry(entry, where, "policies", "options")
    try:
        # One validation for the CLI's --policy-option and the file: vmem compare's.
        [(_, _, applied)], _ = build_policies([name], options)
    except ConfigError as err:
        raise ConfigError(f"{where}: policy {name!r}", str(err)) from None
    return name, tuple(sorted(applied.items()))


def build_policy(cell: Cell):
    """A fresh policy object for one run of ``cell`` (policies keep per-migration state)."""
    from vmem.analysis.compare import build_policies

    if cell.policy == "none":
        return None
    [(_, policy, _)], _ = build_policies([cell.policy], dict(cell.policy_options))
    return policy


def _axes_cells(doc: dict, where: str) -> list[Cell]:
    from vmem.ram import parse_size
    from vmem.units import bandwidth_from_arg

    sizes = []
    for s in _list(doc, "sizes", where, ["32M"]):
        try:
            sizes.append(parse_size(s if isinstance(s, str) else int(s), f"{where}: sizes"))
        except (ValueError, TypeError) as err:
            raise ConfigError(f"{where}: sizes", str(err)) from None
    trackers = _list(doc, "trackers", where, ["auto"])
    for t in trackers:
        if t not in TRACKERS:
            raise ConfigError(f"{where}: trackers", f"unknown tracker {t!r}; choose from {', '.join(TRACKERS)}")
    modes = _list(doc, "modes", where, ["precopy"])
    for m in modes:
        if m not in MODES:
            raise ConfigError(f"{where}: modes", f"unknown mode {m!r}; choose from {', '.join(MODES)}")
    bandwidths = []
    for b in _list(doc, "bandwidths", where, ["unlimited"]):
        bandwidths.append(None if b in ("unlimited", "none", 0) else bandwidth_from_arg(str(b), f"{where}: bandwidths"))
    workloads = [_workload(w, where) for w in _list(doc, "workloads", where, [{"name": "hotcold"}])]
    policies = [_policy(p, where) for p in _list(doc, "policies", where, [{"name": "xen"}])]
    cells: list[Cell] = []
    for (wl, params), size, (pol, opts), tracker, mode, bw in itertools.product(
            workloads, sizes, policies, trackers, modes, bandwidths):
        if mode == "postcopy":
            pol, opts = "none", ()
        cell = Cell(wl, params, size, pol, opts, tracker, mode, bw)
        if cell not in cells:
            cells.append(cell)
    return cells


def matrix_from_dict(doc: dict, *, where: str = "matrix") -> Matrix:
    """Validate a matrix given as a dict (a parsed TOML file or a built-in suite).

    ``extra`` (built-in suites only): a list of partial axis tables whose cells are added
    after the main product (each inherits the main table's axes it does not set).

    Raises:
        ConfigError: naming ``where`` and the key, for any unknown key or bad value.
    """
    if not isinstance(doc, dict):
        raise ConfigError(where, "expected a table")
    unknown = set(doc) - _TOP_KEYS - {"extra"}
    if unknown:
        raise ConfigError(f"{where}: {sorted(unknown)[0]}", f"unknown key; known keys are {', '.join(sorted(_TOP_KEYS))}")
    cells = _axes_cells(doc, where)
    for extra in doc.get("extra") or []:
        for c in _axes_cells({**{k: v for k, v in doc.items() if k != "extra"}, **extra}, where):
            if c not in cells:
                cells.append(c)
    thresholds = doc.get("thresholds") or {}
    from vmem.bench.verdict import check_thresholds

    check_thresholds(thresholds, f"{where}: thresholds")
    alpha = doc.get("alpha")
    if alpha is not None:
        alpha = _number(doc, "alpha", where, None)
        if not 0 < alpha < 1:
            raise ConfigError(f"{where}: alpha", f"must be between 0 and 1, got {alpha}")
    return Matrix(name=str(doc.get("name", "matrix")), cells=cells,
                  repeats=_number(doc, "repeats", where, 3, int, 1),
                  warmup_s=_number(doc, "warmup_s", where, 0.3), observe_s=_number(doc, "observe_s", where, 0.2),
                  seed=_number(doc, "seed", where, 1, int, 0), thresholds=thresholds, alpha=alpha)


def matrix_from_axes(*, workloads: list[str], workload_args: list[str], sizes: list[str], policies: list[str],
                     policy_options: dict[str, Any], trackers: list[str], modes: list[str], bandwidths: list[str],
                     repeats: int, warmup_s: float, observe_s: float, seed: int) -> Matrix:
    """A matrix from command-line axes (``-W`` and ``--policy-option`` apply to every
    workload / every policy that takes them, as in ``vmem compare``)."""
    from guests.workload import load_workload, parse_params
    from vmem.analysis.compare import build_policies

    wl_entries = []
    for w in workloads:
        try:
            params = parse_params(load_workload(w), workload_args)
        except ConfigError as err:
            raise ConfigError(f"workload {w!r}", str(err)) from None
        wl_entries.append({"name": w, "params": params})
    runs, _ = build_policies(policies, policy_options)
    pol_entries = [{"name": n, "options": applied} for n, _, applied in runs]
    doc = {"name": "cli", "workloads": wl_entries, "sizes": sizes, "policies": pol_entries, "trackers": trackers,
           "modes": modes, "bandwidths": bandwidths, "repeats": repeats, "warmup_s": warmup_s, "observe_s": observe_s,
           "seed": seed}
    return matrix_from_dict(doc, where="command line")
