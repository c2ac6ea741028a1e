"""``vmem compare``: the same guest, workload and seed migrated once per policy, side by side.

    vmem compare --policies xen,threshold,two-threshold,budget,downtime-limit \\
                 --workload hotcold -W rate=20000 --size 256M --bandwidth 100M --out DIR

For each policy a fresh guest is booted with the same workload and seed, warmed up, and
migrated on this host (:func:`vmem.migration.local.run_local_migration`).  The reports are printed
as one table and written to ``DIR``: ``comparison.png``, per-policy convergence, dirty
rate and downtime graphs, ``report.html`` (self-contained), ``reports/POLICY.json`` and
``comparison.json`` (also to ``--json FILE``).

The command line (``add_compare_arguments``, ``cmd_compare``) is :mod:`vmem.cli.compare`.

``--policy-option KEY=VALUE`` goes to every selected policy that takes KEY and is
ignored (and said so, once) by the others; a KEY no selected policy takes is an error.
"""
from __future__ import annotations

import inspect
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

from guests.workload import load_workload
from vmem.errors import ConfigError
from vmem.migration.backend import GuestSpec, boot_guest

__all__ = [
    "PolicyRun",
    "Comparison",
    "policy_names",
    "accepted_options",
    "parse_policy_options",
    "build_policies",
    "run_comparison",
    "write_comparison",
    "comparison_document",
    "print_comparison",
]

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


# --- policies and their options -------------------------------------------------------------
def _policy_module():
    from vmem.migration import policy

    return policy


def policy_names() -> list[str]:
    """The built-in policies' CLI names (from ``POLICIES`` and ``POLICY_OPTIONS``)."""
    pol = _policy_module()
    names = list(getattr(pol, "POLICIES", {}) or {})
    for n in getattr(pol, "POLICY_OPTIONS", {}) or {}:
        if n not in names:
            names.append(n)
    return names


def _norm(key: str) -> str:
    return str(key).strip().lstrip("-").replace("-", "_")


def _spec_get(spec, attr):
    return spec.get(attr) if isinstance(spec, dict) else getattr(spec, attr, None)


def _spec_name(spec, fallback: str | None = None) -> str | None:
    """The make_policy keyword of one POLICY_OPTIONS entry (str, dict or object)."""
    if isinstance(spec, str):
        return _norm(spec)
    for attr in ("dest", "kwarg", "param", "key", "name"):
        v = _spec_get(spec, attr)
        if isinstance(v, str) and v:
            return _norm(v)
    return _norm(fallback) if fallback else None


def _spec_type(spec):
    """The converter of one option: a type, or a callable such as ``parse_rate``; None if unknown."""
    if isinstance(spec, type):
        return spec
    t = _spec_get(spec, "type")
    if callable(t):
        return t
    default = _spec_get(spec, "default")
    if default is not None and type(default) in (bool, int, float, str):
        return type(default)
    return None


@dataclass(frozen=True)
class _Opt:
    dest: str            # the make_policy keyword
    type: Any            # converter or None
    aliases: tuple = ()  # other spellings (the flag without dashes)


def _option_table(name: str) -> list[_Opt]:
    """Policy ``name``'s options, from POLICY_OPTIONS or by inspecting its constructor."""
    pol = _policy_module()
    table = getattr(pol, "POLICY_OPTIONS", None)
    if isinstance(table, dict) and name in table:
        entry = table[name]
        items = entry.items() if isinstance(entry, dict) else [(None, spec) for spec in entry]
        out = []
        for key, spec in items:
            dest = _norm(key) if key and isinstance(spec, (type, str)) else _spec_name(spec, key)
            if not dest:
                continue
            flag = None if isinstance(spec, (str, type)) else _spec_get(spec, "flag")
            aliases = (_norm(flag),) if isinstance(flag, str) and _norm(flag) != dest else ()
            out.append(_Opt(dest, None if isinstance(spec, str) else _spec_type(spec), aliases))
        return out
    cls = (getattr(pol, "POLICIES", {}) or {}).get(name)
    if cls is None:
        return []
    try:
        ctor = inspect.signature(cls)
    except (TypeError, ValueError):
        return []
    params = [p for p in ctor.parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name != "self"]
    try:
        mk = inspect.signature(pol.make_policy)
    except (TypeError, ValueError):
        mk = None
    mk_kw = [] if mk is None else [p.name for p in mk.parameters.values()
                                   if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "name"]
    takes_any = mk is not None and any(p.kind == p.VAR_KEYWORD for p in mk.parameters.values())
    out = []
    for p in params:
        typ = type(p.default) if p.default is not p.empty and p.default is not None else None
        if p.annotation in (int, float, bool, str):
            typ = p.annotation
        match = [k for k in mk_kw if k == p.name or k.endswith("_" + p.name)]
        if match:
            out.append(_Opt(match[0], typ, (p.name,) if match[0] != p.name else ()))
        elif takes_any:
            out.append(_Opt(p.name, typ))
    return out


def accepted_options(name: str) -> dict[str, Any]:
    """The ``make_policy(name, **options)`` keywords policy ``name`` takes -> their converter.

    Uses ``vmem.migration.policy.POLICY_OPTIONS[name]`` when the policy module declares it;
    otherwise inspects the policy class's constructor and matches its parameters to
    ``make_policy``'s keywords (``iterations`` -> ``precopy_iterations``).  The converter
    is None when unknown (values are then converted by their look: int, float, bool, str).
    """
    return {o.dest: o.type for o in _option_table(name)}


def _resolve_key(key: str, table: list[_Opt]) -> tuple[_Opt, bool] | None:
    """The option that ``key`` names, and whether a ``no_`` flag spelling inverts the value.

    Accepted spellings: the keyword (``max_downtime_ms``), the flag (``max-downtime-ms``,
    ``no-early-exit``, ``timeout``), or a unique unit-less / prefix-less form
    (``max_downtime`` -> ``max_downtime_ms``, ``iterations`` -> ``precopy_iterations``).
    """
    for o in table:
        if key == o.dest:
            return o, False
    for o in table:
        if key in o.aliases:
            inverted = o.type is bool and key.startswith("no_") and not o.dest.startswith("no_")
            return o, inverted
    for test in (lambda d: d.startswith(key + "_"), lambda d: d.endswith("_" + key) or key.endswith("_" + d)):
        found = [o for o in table if test(o.dest)]
        if len(found) == 1:
            return found[0], False
    return None


def _convert(key: str, text: str, typ):
    t = text.strip()
    if typ is not None and typ not in (bool, int, float, str):
        try:   # a converter such as transport.parse_rate
            return typ(t)
        except (TypeError, ValueError) as err:
            raise ConfigError(key, str(err)) from None
    if typ is bool:
        if t.lower() in _TRUE:
            return True
        if t.lower() in _FALSE:
            return False
        raise ConfigError(key, f"expected true/false, got {text!r}")
    if typ is int:
        try:
            return int(t, 0)
        except ValueError:
            try:
                f = float(t)
            except ValueError:
                raise ConfigError(key, f"expected an integer, got {text!r}") from None
            if f.is_integer():
                return int(f)
            raise ConfigError(key, f"expected an integer, got {text!r}") from None
    if typ is float:
        try:
            return float(t)
        except ValueError:
            raise ConfigError(key, f"expected a number, got {text!r}") from None
    if typ is str:
        return text
    # Unknown type: by its look.
    for conv in (int, float):
        try:
            return conv(t)
        except ValueError:
            pass
    if t.lower() in ("true", "false", "yes", "no", "on", "off"):
        return t.lower() in _TRUE
    return text


def parse_policy_options(items: list[str]) -> dict[str, str]:
    """``KEY=VALUE`` strings -> ``{key: raw value}`` (dashes in keys become underscores).

    Raises:
        ConfigError("--policy-option"): malformed item or a key given twice.
    """
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = str(item).partition("=")
        key = _norm(key)
        if not sep or not key:
            raise ConfigError("--policy-option", f"expected KEY=VALUE, got {item!r}")
        if key in out:
            raise ConfigError("--policy-option", f"{key} given twice")
        out[key] = value
    return out


def build_policies(names, options: dict[str, str] | None = None):
    """Validate policy names and options and build one policy per name.

    Args:
        names: policy names (list, or a comma-separated string).
        options: raw ``{key: value}`` from ``--policy-option``; values may already be typed.
    Returns:
        ``(runs, ignored)``: ``runs`` is a list of ``(name, policy, applied_options)``;
        ``ignored`` maps each option key to the policies that do not take it.
    Raises:
        ConfigError: no names, an unknown or repeated name, an option no selected policy
            takes, a value of the wrong type, or parameters a policy rejects.
    """
    from vmem.migration.policy import make_policy

    if isinstance(names, str):
        names = [n for n in (x.strip() for x in names.split(",")) if n]
    names = list(names or [])
    known = policy_names()
    if not names:
        raise ConfigError("--policies", f"no policy given; choose from {', '.join(known)}")
    for n in names:
        if n not in known:
            raise ConfigError("--policies", f"unknown policy {n!r}; choose from {', '.join(known)}")
        if names.count(n) > 1:
            raise ConfigError("--policies", f"policy {n!r} given twice")
    options = {_norm(k): v for k, v in (options or {}).items()}
    tables = {n: _option_table(n) for n in names}
    accepted = {n: [o.dest for o in t] for n, t in tables.items()}
    used: dict[str, set[str]] = {k: set() for k in options}
    runs = []
    for n in names:
        applied: dict[str, Any] = {}
        for key, raw in options.items():
            found = _resolve_key(key, tables[n])
            if found is None:
                continue
            opt, inverted = found
            value = _convert(key, raw, opt.type) if isinstance(raw, str) else raw
            if inverted:
                value = not value
            if opt.dest in applied and applied[opt.dest] != value:
                raise ConfigError("--policy-option", f"{key} contradicts another option for policy {n!r} ({opt.dest})")
            applied[opt.dest] = value
            used[key].add(n)
        try:
            policy = make_policy(n, **applied)
        except ConfigError:
            raise
        except TypeError as err:  # make_policy did not take a keyword after all
            raise ConfigError("--policy-option", f"policy {n!r} rejected {sorted(applied)}: {err}") from None
        runs.append((n, policy, applied))
    for key, by in used.items():
        if not by:
            takes = {n: sorted(a) for n, a in accepted.items() if a}
            hint = "; ".join(f"{n}: {', '.join(a)}" for n, a in takes.items()) or "none of them takes options"
            raise ConfigError("--policy-option", f"{key!r} is not an option of any selected policy "
                              f"({', '.join(names)}); options: {hint}")
    ignored = {key: [n for n in names if n not in by] for key, by in used.items() if len(by) < len(names)}
    return runs, ignored


# --- running ----------------------------------------------------------------------------
@dataclass
class PolicyRun:
    """One policy's migration in a comparison."""

    policy: str
    options: dict
    report: dict


@dataclass
class Comparison:
    """The result of :func:`run_comparison`."""

    runs: list[PolicyRun] = field(default_factory=list)
    workload: str = "hotcold"
    params: dict = field(default_factory=dict)
    size_bytes: int = 0
    bandwidth_Bps: float | None = None
    seed: int = 1
    warmup_s: float = 0.5
    policy_options: dict = field(default_factory=dict)
    ignored_options: dict = field(default_factory=dict)
    interrupted: bool = False

    @property
    def reports(self) -> list[dict]:
        return [r.report for r in self.runs]

    @property
    def labels(self) -> list[str]:
        return [r.policy for r in self.runs]


def run_comparison(policies, *, workload: str = "hotcold", params: dict | None = None, size_bytes: int = 256 << 20,
                   bandwidth_Bps: float | None = None, seed: int = 1, warmup_s: float = 0.5,
                   policy_options: dict | None = None, tracker: str = "auto", observe_s: float = 0.2,
                   verify: bool = True, progress_factory=None, on_run=None, backend: str = "process") -> Comparison:
    """Migrate a fresh guest once per policy, same workload and seed; collect the reports.

    Everything is validated before the first guest boots.  Every guest (and destination
    process) is reaped on every path; KeyboardInterrupt propagates once the current run's
    processes are gone, so use ``on_run`` to keep results as they arrive.

    Args:
        policies: names, or a comma-separated string.
        policy_options: ``{key: value}`` for the policies that take ``key``.
        progress_factory: ``f(name) -> context manager yielding a progress sink`` (e.g. a
            LiveDisplay) or None.
        on_run: called with each finished :class:`PolicyRun`.
        backend: ``process`` or ``kvm`` (vmem.migration.backend.boot_guest).
    Raises:
        ConfigError: bad policy names/options, workload or parameters (before any boot).
    """
    from vmem.migration.local import run_local_migration
    from vmem.migration.source import MigrationOptions

    if backend == "process":
        load_workload(workload)
    runs, ignored = build_policies(policies, policy_options)
    cmp = Comparison(workload=workload, params=dict(params or {}), size_bytes=size_bytes, bandwidth_Bps=bandwidth_Bps,
                     seed=seed, warmup_s=warmup_s, policy_options=dict(policy_options or {}), ignored_options=ignored)
    spec = GuestSpec(workload, dict(params or {}), seed)
    for name, policy, applied in runs:
        may_postcopy = applied.get("allow_postcopy") is True or applied.get("timeout_action") == "postcopy"
        options = MigrationOptions(tracker=tracker, policy=policy, observe_s=observe_s, bandwidth_Bps=bandwidth_Bps,
                                   verify=verify, postcopy="allow" if may_postcopy else "off")
        with boot_guest(spec, size_bytes, backend) as guest:
            if warmup_s > 0:
                time.sleep(warmup_s)
            if progress_factory is not None:
                with progress_factory(name) as progress:
                    report = run_local_migration(guest, options, progress)
            else:
                report = run_local_migration(guest, options)
        run = PolicyRun(name, applied, report.to_dict())
        cmp.runs.append(run)
        if on_run is not None:
            on_run(run)
    return cmp


# --- output -----------------------------------------------------------------------------
def comparison_document(cmp: Comparison) -> dict:
    """The ``comparison.json`` / ``--json`` document (reports in full under ``results``)."""
    return {
        "kind": "vmem-compare",
        "schema_version": 1,
        "workload": {"workload": cmp.workload, "params": cmp.params, "seed": cmp.seed},
        "guest_size_bytes": cmp.size_bytes,
        "bandwidth_limit_bps": cmp.bandwidth_Bps * 8 if cmp.bandwidth_Bps else None,
        "warmup_s": cmp.warmup_s,
        "policy_options": cmp.policy_options,
        "ignored_options": cmp.ignored_options,
        "interrupted": cmp.interrupted,
        "results": [
            {
                "policy": r.policy,
                "options": r.options,
                "outcome": r.report.get("outcome"),
                "reason": r.report.get("reason"),
                "rounds": len(r.report.get("rounds") or []),
                "total_time_s": r.report.get("total_time_s"),
                "downtime_ms": r.report.get("downtime_ms"),
                "pages_sent": r.report.get("pages_sent"),
                "guest_pages": r.report.get("guest_pages"),
                "report": r.report,
            }
            for r in cmp.runs
        ],
    }


def _json_dump(obj, path: str) -> None:
    from vmem.jsonout import json_default

    d = os.path.dirname(path)
    if d:
        os.makedirs(d, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, default=json_default)
        f.write("\n")


def write_comparison(cmp: Comparison, out_dir: str, *, json_path: str | None = None, title: str | None = None) -> dict:
    """Write graphs, ``report.html`` and JSON for a comparison into ``out_dir``.

    Returns a dict of what was written: ``comparison_png``, ``html``, ``json``,
    ``reports`` (per-policy JSON paths), ``graphs`` (all PNG paths).

    Raises:
        ValueError: the comparison has no runs.
    """
    from vmem.analysis import graphs

    if not cmp.runs:
        raise ValueError("no policy runs to write (the comparison is empty)")
    os.makedirs(out_dir, exist_ok=True)
    reports, labels = cmp.reports, cmp.labels
    first = reports[0]
    wl = graphs._workload_text(first)
    ttl = title or f"vmem compare: {len(labels)} precopy {'policy' if len(labels) == 1 else 'policies'}, one workload"
    comp = graphs.plot_comparison(reports, os.path.join(out_dir, "comparison.png"), labels=labels)
    written = {"comparison_png": comp, "graphs": [comp], "reports": []}
    intro = [f"Policies: {', '.join(labels)}. Each migrated a freshly booted guest running the same workload with "
             f"the same seed (seed {cmp.seed}; {wl}), warmed up {cmp.warmup_s:g} s, on this host."]
    if cmp.ignored_options:
        intro.append("Policy options: " + "; ".join(
            f"{k}={cmp.policy_options.get(k)} ignored by {', '.join(v)}" for k, v in cmp.ignored_options.items()))
    if cmp.interrupted:
        intro.append("Interrupted: only the policies above ran.")
    sections = [{"heading": "Policies compared", "text": intro, "table": graphs.comparison_table(reports, labels),
                 "images": [(comp, "Total migration time, guest-visible downtime and data sent per policy; "
                                   "bar colour = outcome (completed, aborted, failed).")]}]
    for run in cmp.runs:
        name = graphs.safe_name(run.policy)
        rp = os.path.join(out_dir, "reports", f"{name}.json")
        _json_dump(run.report, rp)
        written["reports"].append(rp)
        sec = graphs.render_report(dict(run.report, label=run.policy), out_dir, name=name)
        if run.options:
            sec["text"] = ["options: " + ", ".join(f"{k}={v}" for k, v in run.options.items())]
        written["graphs"] += [im[0] for im in sec["images"]]
        sections.append(sec)
    written["html"] = graphs.write_html(os.path.join(out_dir, "report.html"), ttl, sections)
    doc = comparison_document(cmp)
    written["json"] = os.path.join(out_dir, "comparison.json")
    _json_dump(doc, written["json"])
    if json_path:
        _json_dump(doc, json_path)
        written["json_extra"] = json_path
    return written


def print_comparison(cmp: Comparison, console=None) -> None:
    """The comparison as a rich table: policy, outcome, rounds, time, downtime, data, reason."""
    from rich.console import Console
    from rich.table import Table

    from vmem.analysis import graphs

    console = console or Console()
    t = graphs.comparison_table(cmp.reports, cmp.labels)
    gb = cmp.bandwidth_Bps
    table = Table(title=f"{cmp.workload} {cmp.params or ''} · {cmp.size_bytes >> 20} MiB guest · "
                        f"link {f'{gb / 1e6:,.0f} MB/s' if gb else 'unlimited'} · seed {cmp.seed}")
    styles = {"completed": "green", "aborted": "yellow", "failed": "red"}
    for c in t["columns"]:
        table.add_column(c, justify="right" if c in ("rounds", "total time", "downtime", "pages sent / guest pages") else "left",
                         overflow="fold")
    for row in t["rows"]:
        cells = [str(x) for x in row]
        cells[1] = f"[{styles.get(cells[1], 'white')}]{cells[1]}[/]"
        table.add_row(*cells)
    console.print(table)
