"""Graphs of migrations: PNG files and one self-contained HTML report.

Every plotting function takes plain data — a report dict as loaded from a ``--json``
file (``MigrationReport.to_dict()``, schema in docs/report.md) or plain arrays — writes
one PNG and returns its path.  Rendering is headless: figures are built with
:class:`matplotlib.figure.Figure` on the Agg canvas, never through pyplot, so nothing
here touches a display or matplotlib's global backend.

    plot_convergence(report, path, predicted=None)   dirty pages / pages and bytes sent per round
    plot_dirty_rate(report, path)                    dirty rate over time (+ throttle)
    plot_downtime(report, path, limit_ms=None)       estimated downtime per round vs the limit
    plot_working_set(windows_s, wws_pages, path)     writable working set vs window length
    plot_dirty_trace(t_s, dirty_pages, path)         dirty pages per interval over time
    plot_comparison(reports, path, labels=None)      policies side by side
    write_html(path, title, sections)                PNGs + tables in one HTML file

``vmem graph report.json [more.json ...] --out DIR`` renders all of these from saved
reports (see docs/graphs.md; :func:`render_documents`); its command line is
:mod:`vmem.cli.graph`.
"""
from __future__ import annotations

import base64
import functools
import html
import io
import json
import math
import os
import re
import textwrap
from collections.abc import Iterable, Sequence

import matplotlib
import matplotlib.ticker
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from vmem.pages import PAGE_SIZE

__all__ = [
    "plot_convergence",
    "plot_dirty_rate",
    "plot_downtime",
    "plot_working_set",
    "plot_dirty_trace",
    "plot_comparison",
    "write_html",
    "render_report",
    "summary_table",
    "rounds_table",
    "comparison_table",
    "downtime_limit_ms",
    "is_predicted",
    "report_label",
    "load_reports",
    "render_documents",
]

MiB = 1024 * 1024

# Okabe-Ito: distinguishable with every common colour-vision deficiency.
BLUE, ORANGE, GREEN, VERMILION = "#0072B2", "#E69F00", "#009E73", "#D55E00"
SKY, PURPLE, YELLOW, GREY, BLACK = "#56B4E9", "#CC79A7", "#F0E442", "#8C8C8C", "#000000"

OUTCOME_COLOURS = {"completed": GREEN, "aborted": ORANGE, "failed": VERMILION}
#: decision -> (colour, marker, short label)
DECISION_STYLE = {
    "continue": (BLUE, "o", "continue"),
    "stop-and-copy": (VERMILION, "s", "stop-and-copy"),
    "abort": (BLACK, "X", "abort"),
    "postcopy": (PURPLE, "D", "postcopy"),
}

_STYLE = {
    "font.size": 12,
    "axes.titlesize": 14,
    "axes.titleweight": "bold",
    "axes.labelsize": 12,
    "xtick.labelsize": 11,
    "ytick.labelsize": 11,
    "legend.fontsize": 10,
    "legend.framealpha": 0.9,
    "figure.titlesize": 16,
    "figure.titleweight": "bold",
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "savefig.facecolor": "white",
    "figure.facecolor": "white",
}
DPI = 100


def _commas():
    return matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}")


def _styled(fn):
    """Run a plotting function under the module's rc style (fonts, grid...)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with matplotlib.rc_context(_STYLE):
            return fn(*args, **kwargs)

    return wrapper


def _new_figure(width: float, height: float, **kw) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained", **kw)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | os.PathLike) -> str:
    path = os.fspath(path)
    d = os.path.dirname(path)
    if d:
        os.makedirs(d, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, dpi=DPI, format="png")
    data = buf.getvalue()
    try:
        # Plots use few colours: a 256-colour palette without dithering looks the same and
        # makes files (and the HTML that embeds them) about three times smaller.
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            small = io.BytesIO()
            im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT,
                                       dither=Image.Dither.NONE).save(small, format="PNG", optimize=True)
        if small.tell() < len(data):
            data = small.getvalue()
    except Exception:  # pragma: no cover - Pillow is a matplotlib dependency; keep the RGBA PNG
        pass
    with open(path, "wb") as f:
        f.write(data)
    return path


# --- reading reports ---------------------------------------------------------------------
def _check_report(report, what: str = "report") -> dict:
    if not isinstance(report, dict):
        raise ValueError(f"{what}: expected a report dict (MigrationReport.to_dict()), got {type(report).__name__}")
    rounds = report.get("rounds")
    if not isinstance(rounds, list):
        raise ValueError(f"{what}: not a migration report (no 'rounds' list); see docs/report.md")
    return report


def _num(v, default=0.0) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return default
    return f if math.isfinite(f) else default


def _rounds(report: dict) -> list[dict]:
    """The report's rounds with every key the graphs use filled in."""
    out = []
    for i, r in enumerate(report.get("rounds") or []):
        pages = int(_num(r.get("pages_sent")))
        out.append({
            "index": int(_num(r.get("index"), i)),
            "kind": r.get("kind") or "precopy",
            "pages_sent": pages,
            "bytes_sent": int(_num(r.get("bytes_sent"), pages * PAGE_SIZE)) if r.get("bytes_sent") is not None else pages * PAGE_SIZE,
            "duration_s": _num(r.get("duration_s")),
            "collect_ms": _num(r.get("collect_ms")),
            "dirty_pages": int(_num(r.get("dirty_pages"))),
            "dirty_rate_pps": _num(r.get("dirty_rate_pps")),
            "bandwidth_bps": _num(r.get("bandwidth_bps")),
            "est_downtime_ms": None if r.get("est_downtime_ms") is None else _num(r.get("est_downtime_ms"), None),
            "throttle": _num(r.get("throttle")),
            "decision": str(r.get("decision") or ""),
            "reason": str(r.get("reason") or ""),
        })
    return out


def is_predicted(report: dict) -> bool:
    """A prediction rather than a measurement: ``"predicted": true``, or a report from the
    simulator (``vmem predict``: tracker ``simulated`` / ``guest.prediction``)."""
    if not isinstance(report, dict):
        return False
    if "predicted" in report:
        return bool(report["predicted"])
    guest = report.get("guest")
    return report.get("tracker") == "simulated" or (isinstance(guest, dict) and "prediction" in guest)


def report_label(report: dict, default: str = "run") -> str:
    """A short label for a report: its policy's name (plus "predicted" for predictions)."""
    pol = report.get("policy") or {}
    label = report.get("label") or (pol.get("name") if isinstance(pol, dict) else None) or default
    if is_predicted(report) and "predict" not in str(label):
        label = f"{label} (predicted)"
    return str(label)


def downtime_limit_ms(report: dict) -> float | None:
    """The downtime limit the report's policy worked to, in ms, or None.

    Reads ``policy.max_downtime_ms`` or ``policy.max_downtime`` (ms, as ``--max-downtime
    MS``) first, then any other numeric ``*downtime*`` parameter (``*_s`` in seconds,
    anything else in ms), e.g. the budget policy's tolerable downtime.
    """
    pol = report.get("policy") or {}
    if not isinstance(pol, dict):
        return None
    keys = ["max_downtime_ms", "max_downtime"]
    keys += sorted(k for k in pol if "downtime" in k and k not in keys)
    for k in keys:
        v = pol.get(k)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            continue
        return float(v) * 1e3 if k.endswith("_s") else float(v)
    return None


def _fmt_pages(n: float) -> str:
    n = float(n)
    if n >= 1e6:
        return f"{n / 1e6:.1f}M"
    if n >= 1e4:
        return f"{n / 1e3:.0f}k"
    if n >= 1e3:
        return f"{n / 1e3:.1f}k"
    return f"{n:.0f}"


def _fmt_bytes(n: float) -> str:
    n = float(n)
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def _fmt_rate_Bps(bps_bits: float | None) -> str:
    if not bps_bits:
        return "unlimited"
    return f"{bps_bits / 8 / 1e6:,.0f} MB/s"


def _workload_text(report: dict) -> str:
    w = report.get("workload") or {}
    parts = []
    if w.get("workload"):
        parts.append(str(w["workload"]))
        params = w.get("params") or {}
        if params:
            parts.append(" ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()))
    size = report.get("guest_size_bytes") or (report.get("guest_pages") or 0) * PAGE_SIZE
    if size:
        parts.append(f"{_fmt_bytes(size)} guest")
    if "bandwidth_limit_bps" in report:
        parts.append(f"link {_fmt_rate_Bps(report.get('bandwidth_limit_bps'))}")
    return ", ".join(parts)


def _subtitle(report: dict) -> str:
    bits = [f"policy {report_label(report)}", _workload_text(report)]
    return " · ".join(b for b in bits if b)


def _wide(values: Iterable[float], ratio: float = 30.0) -> bool:
    pos = [v for v in values if v and v > 0]
    return bool(pos) and max(pos) / min(pos) > ratio


def _plain_log_ticks(ax, axis: str = "y") -> None:
    """Log axis ticks as plain numbers (1,000 rather than 10^3): easier to read aloud."""
    def fmt(v, _):
        if v <= 0:
            return ""
        return f"{v:,.0f}" if v >= 1000 else f"{v:g}"

    target = ax.yaxis if axis == "y" else ax.xaxis
    target.set_major_formatter(matplotlib.ticker.FuncFormatter(fmt))
    target.set_minor_formatter(matplotlib.ticker.NullFormatter())


def _int_ticks(axis) -> None:
    axis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))


def _outcome_text(report: dict) -> str:
    out = report.get("outcome") or "?"
    bits = [out]
    if report.get("downtime_ms") is not None:
        bits.append(f"downtime {_num(report['downtime_ms']):.1f} ms")
    if report.get("total_time_s") is not None:
        bits.append(f"total {_num(report['total_time_s']):.2f} s")
    gp = report.get("guest_pages") or 0
    if gp and report.get("pages_sent") is not None:
        bits.append(f"sent {_num(report['pages_sent']) / gp:.2f}× guest RAM")
    return " · ".join(bits)


def _decision_groups(rounds: list[dict]) -> list[str]:
    """Consecutive rounds with the same decision and reason, as readable lines."""
    groups: list[list] = []
    for r in rounds:
        if r["kind"] == "stop-and-copy" or not r["decision"]:
            continue
        key = (r["decision"], r["reason"])
        if groups and groups[-1][0] == key:
            groups[-1][2] = r["index"]
        else:
            groups.append([key, r["index"], r["index"]])
    lines = []
    for (decision, reason), a, b in groups:
        span = f"round {a}" if a == b else f"rounds {a}–{b}"
        lines.append(f"{span}: {decision}" + (f" — {reason}" if reason else ""))
    if len(lines) > 8:
        lines = lines[:4] + [f"… {len(lines) - 7} more …"] + lines[-3:]
    return [textwrap.shorten(line, 110, placeholder="…") for line in lines]


# --- convergence ----------------------------------------------------------------------------
#: bar colour of the phase after pre-copy (stop-and-copy, or the post-copy push)
_FINAL_COLOUR = {"stop-and-copy": VERMILION, "postcopy": PURPLE}


def _mark_switch(ax, rounds: list[dict]) -> None:
    """A vertical line where pre-copy ended, named after what followed (the switch)."""
    for r in rounds:
        if r["kind"] == "postcopy":
            ax.axvline(r["index"] - 0.5, color=PURPLE, ls="--", lw=1.5, zorder=1)
            ax.annotate("switch to post-copy", (r["index"] - 0.5, 0), xycoords=("data", "axes fraction"),
                        xytext=(-4, 4), textcoords="offset points", ha="right", va="bottom", fontsize=9,
                        color=PURPLE, rotation=90)
            return


@_styled
def plot_convergence(report: dict, path, *, predicted: dict | Sequence[dict] | None = None,
                     title: str | None = None) -> str:
    """The classic convergence plot.

    Top panel: pages sent per round (bars) and pages dirty at the end of each round
    (line; marker colour = the policy's decision), log y when the range is wide; the
    stop-and-copy round is marked and the policy's decisions are listed underneath.
    Bottom panel: MiB sent per round (bars) and cumulative MiB sent (line, right axis)
    against the guest's RAM size.

    Args:
        report: a report dict.  If it has ``"predicted": true`` it is drawn dashed.
        path: PNG file to write.
        predicted: one or more predicted runs (report dicts, e.g. ``vmem predict``
            output) overlaid as dashed lines.
        title: figure title (default: "Precopy convergence").
    Returns:
        ``path``.
    """
    _check_report(report)
    preds = [] if predicted is None else ([predicted] if isinstance(predicted, dict) else list(predicted))
    for p in preds:
        _check_report(p, "predicted")
    if is_predicted(report):
        preds.insert(0, report)
        measured = None
    else:
        measured = report
    rounds = _rounds(report)
    decisions = _decision_groups(rounds)
    n_lines = max(1, len(decisions))
    fig = _new_figure(11, 8.2 + 0.22 * n_lines)
    gs = fig.add_gridspec(3, 1, height_ratios=[3.2, 2.0, 0.35 + 0.2 * n_lines])
    ax = fig.add_subplot(gs[0])
    axb = fig.add_subplot(gs[1], sharex=ax)
    axt = fig.add_subplot(gs[2])
    axt.axis("off")
    fig.suptitle(title or "Precopy convergence: does each round's dirty set shrink?")

    all_pages: list[float] = []
    handles: list = []
    final_note = None
    if measured is not None and rounds:
        idx = [r["index"] for r in rounds]
        sent = [r["pages_sent"] for r in rounds]
        colours = [_FINAL_COLOUR.get(r["kind"], SKY) for r in rounds]
        bars = ax.bar(idx, sent, width=0.6, color=colours, edgecolor="#1f4e79", linewidth=0.6, zorder=2)
        for b, r in zip(bars, rounds):
            if r["kind"] in _FINAL_COLOUR:
                b.set_hatch("//" if r["kind"] == "stop-and-copy" else "..")
        pre = [r for r in rounds if r["kind"] == "precopy"]
        _mark_switch(ax, rounds)
        ax.plot([r["index"] for r in pre], [r["dirty_pages"] or math.nan for r in pre], color=BLUE, lw=2, zorder=3)
        for r in pre:
            c, m, _ = DECISION_STYLE.get(r["decision"], (GREY, "o", r["decision"]))
            if r["dirty_pages"] > 0:
                ax.scatter([r["index"]], [r["dirty_pages"]], s=70, color=c, marker=m, zorder=4, edgecolor="white", linewidth=0.8)
        all_pages += sent + [r["dirty_pages"] for r in pre]
        handles += [Patch(facecolor=SKY, edgecolor="#1f4e79", label="pages sent in the round"),
                    Line2D([], [], color=BLUE, lw=2, label="pages dirty at the end of the round")]
        if any(r["kind"] == "stop-and-copy" for r in rounds):
            handles.append(Patch(facecolor=VERMILION, hatch="//", edgecolor="#1f4e79", label="stop-and-copy (guest paused)"))
        if any(r["kind"] == "postcopy" for r in rounds):
            handles.append(Patch(facecolor=PURPLE, hatch="..", edgecolor="#1f4e79",
                                 label="post-copy: push + demand pages (guest runs at the destination)"))
        seen = {r["decision"] for r in pre if r["dirty_pages"] > 0}
        for d in ("continue", "stop-and-copy", "abort", "postcopy"):
            if d in seen:
                c, m, lab = DECISION_STYLE[d]
                handles.append(Line2D([], [], ls="", marker=m, color=c, markersize=8, label=f"policy: {lab}"))
        # Value labels while there is room for them.
        if len(rounds) <= 12:
            for r in rounds:
                ax.annotate(_fmt_pages(r["pages_sent"]), (r["index"], r["pages_sent"]), xytext=(0, 3),
                            textcoords="offset points", ha="center", va="bottom", fontsize=9, color="#1f4e79")
        # Arrow to the final decision.
        last = pre[-1] if pre else None
        if last is not None and last["decision"] and last["decision"] != "continue":
            c, _, lab = DECISION_STYLE.get(last["decision"], (GREY, "o", last["decision"]))
            y = last["dirty_pages"] or (last["pages_sent"] or 1)
            reason = textwrap.shorten(last["reason"], 100, placeholder=" …")
            text = f"after round {last['index']}: {lab.upper()}" + (f"\n{textwrap.fill(reason, 52)}" if reason else "")
            if any(r["kind"] == "postcopy" for r in rounds):
                # after-precopy (hybrid) turns the policy's stop-and-copy into the switch
                text = (f"after round {last['index']}: SWITCH TO POST-COPY\n(policy said {lab}"
                        + (f": {textwrap.shorten(reason, 40, placeholder=' …')}" if reason else "") + ")")
                c = PURPLE
            final_note = (last["index"], y, text, c)
    for k, p in enumerate(preds):
        pr = _rounds(p)
        if not pr:
            continue
        lab = "predicted" if len(preds) == 1 else f"predicted: {report_label(p)}"
        colour = (PURPLE, ORANGE, GREEN, GREY)[k % 4]
        ax.plot([r["index"] for r in pr], [r["pages_sent"] or math.nan for r in pr], ls="--", color=colour,
                marker="^", mfc="white", lw=1.8, zorder=5)
        prp = [r for r in pr if r["kind"] != "stop-and-copy"]
        ax.plot([r["index"] for r in prp], [r["dirty_pages"] or math.nan for r in prp], ls=":", color=colour,
                marker="o", mfc="white", lw=2, zorder=5)
        handles += [Line2D([], [], ls="--", marker="^", mfc="white", color=colour, label=f"{lab}: pages sent"),
                    Line2D([], [], ls=":", marker="o", mfc="white", color=colour, label=f"{lab}: dirty at end")]
        all_pages += [r["pages_sent"] for r in pr] + [r["dirty_pages"] for r in prp]
        axb.plot([r["index"] for r in pr], [r["bytes_sent"] / MiB or math.nan for r in pr], ls="--", color=colour,
                 marker="^", mfc="white", lw=1.8, label=f"{lab}: MiB sent", zorder=5)
    if _wide(all_pages):
        ax.set_yscale("log")
        ax.set_ylim(bottom=max(0.5, min(v for v in all_pages if v > 0) / 3))
        ax.set_ylabel("pages (4 KiB each, log scale)")
    else:
        ax.set_ylim(bottom=0)
        ax.set_ylabel("pages (4 KiB each)")
    gp = report.get("guest_pages")
    top = max(all_pages + [1])
    if ax.get_yscale() == "log":
        lo, hi = ax.get_ylim()
        ax.set_ylim(lo, top * (12 if final_note else 3))
        note_y = top * 3.5
        _plain_log_ticks(ax)
    else:
        ax.set_ylim(0, top * (1.65 if final_note else 1.2))
        note_y = top * 1.33
        ax.yaxis.set_major_formatter(_commas())
    if final_note is not None:
        # The policy's final decision, in the free band above every bar, with an arrow.
        x, y, text, c = final_note
        xs = [r["index"] for r in rounds] or [0]
        right_half = x > (min(xs) + max(xs)) / 2
        ax.annotate(text, (x, y), xytext=(x + (0.4 if right_half else -0.4), note_y), textcoords="data",
                    ha="right" if right_half else "left", va="center", fontsize=10, color=c, fontweight="bold",
                    bbox=dict(boxstyle="round,pad=0.35", fc="white", ec=c, alpha=0.95),
                    arrowprops=dict(arrowstyle="->", color=c, lw=1.5, shrinkB=6), zorder=6)
    ncols = 3
    ax.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=ncols, frameon=False,
              borderaxespad=0.2)
    ax.set_title(_subtitle(report), fontsize=11, fontweight="normal", color="#333333",
                 pad=8 + 19 * math.ceil(len(handles) / ncols))
    ax.tick_params(labelbottom=False)

    # Bottom: data per round and cumulative.
    if measured is not None and rounds:
        mib = [r["bytes_sent"] / MiB for r in rounds]
        colours = [_FINAL_COLOUR.get(r["kind"], "#7fb8dc") for r in rounds]
        axb.bar([r["index"] for r in rounds], mib, width=0.6, color=colours, edgecolor="#1f4e79", linewidth=0.6,
                label="MiB sent in the round", zorder=2)
        if _wide(mib):
            axb.set_yscale("log")
            axb.set_ylabel("MiB per round (log)")
            _plain_log_ticks(axb)
        else:
            axb.set_ylabel("MiB per round")
        cum = [sum(mib[: i + 1]) for i in range(len(mib))]
        ax2 = axb.twinx()
        ax2.plot([r["index"] for r in rounds], cum, color=GREEN, lw=2, marker="o", label="total MiB sent so far")
        ax2.set_ylabel("total MiB sent", color=GREEN)
        ax2.tick_params(axis="y", colors=GREEN)
        ax2.grid(False)
        size = report.get("guest_size_bytes") or (gp or 0) * PAGE_SIZE
        if size:
            ax2.axhline(size / MiB, color=GREEN, ls=":", lw=1.5, label=f"guest RAM ({_fmt_bytes(size)})")
        ax2.set_ylim(0, max(cum + [size / MiB if size else 0]) * 1.15 or 1)
    elif preds:
        axb.set_ylabel("MiB per round")
    h1, l1 = axb.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels() if measured is not None and rounds else ([], [])
    if h1 or h2:
        axb.legend(h1 + h2, l1 + l2, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=ncols, frameon=False,
                   borderaxespad=0.2)
    axb.set_xlabel("round (0 = first full pass over RAM)")
    ticks = sorted({r["index"] for r in rounds} | {r["index"] for p in preds for r in _rounds(p)})
    if ticks and len(ticks) <= 20:
        axb.set_xticks(ticks)
        labels = []
        kinds = {r["index"]: r["kind"] for r in rounds}
        for t in ticks:
            labels.append({"stop-and-copy": f"{t}\nstop&copy", "postcopy": f"{t}\npost-copy"}.get(kinds.get(t), str(t)))
        axb.set_xticklabels(labels)
    else:
        _int_ticks(axb.xaxis)
    nb = len(h1) + len(h2)
    axb.set_title("Data sent per round", fontsize=12, fontweight="bold", pad=8 + 19 * math.ceil(nb / ncols))

    text = ("Outcome: " if measured is not None else "Predicted outcome: ") + _outcome_text(report)
    for p in preds:
        if p is not report:
            text += "\nPredicted" + (f" ({report_label(p)})" if len(preds) > 1 else "") + ": " + _outcome_text(p)
    if decisions:
        text += "\nPolicy decisions after each round:\n" + "\n".join("   " + d for d in decisions)
    axt.text(0.0, 1.0, text, transform=axt.transAxes, va="top", ha="left", fontsize=10.5, family="DejaVu Sans",
             linespacing=1.35)
    return _save(fig, path)


# --- dirty rate over time -----------------------------------------------------------------
@_styled
def plot_dirty_rate(report: dict, path, *, title: str | None = None) -> str:
    """Dirty rate (pages/s) at the end of each precopy round over elapsed time.

    The x axis is the cumulative time at each round's end (round durations plus the
    dirty tracker's collect time).  The link's capacity in pages/s is drawn for
    reference: precopy can only converge while the dirty rate stays below it.  If any
    round ran with a guest CPU throttle, its level is drawn on a right-hand axis.
    """
    _check_report(report)
    rounds = _rounds(report)
    fig = _new_figure(11, 6)
    ax = fig.add_subplot()
    fig.suptitle(title or "Dirty rate over time")
    ax.set_title(_subtitle(report), fontsize=11, fontweight="normal", color="#333333")
    t = 0.0
    ends = []
    for r in rounds:
        t += r["duration_s"] + r["collect_ms"] / 1e3
        ends.append(t)
    pre = [(te, r) for te, r in zip(ends, rounds) if r["kind"] == "precopy"]
    handles = []
    if pre:
        starts = [0.0] + [te for te, _ in pre][:-1]
        for k, ((te, r), t0) in enumerate(zip(pre, starts)):
            if k % 2 == 0:
                ax.axvspan(t0, te, color="#e8eef5", zorder=0, lw=0)
            # The rate is an average over the round: draw it across the round.
            ax.hlines(r["dirty_rate_pps"], t0, te, color=BLUE, lw=2.5, zorder=3)
            frac = (te - t0) / max(ends[-1], 1e-9)
            if frac > 0.035:
                ax.annotate(f"round {r['index']}" if frac > 0.1 else f"r{r['index']}",
                            ((t0 + te) / 2, 0.0), xycoords=("data", "axes fraction"), xytext=(0, 4),
                            textcoords="offset points", ha="center", va="bottom", fontsize=9, color="#1f4e79")
        ax.plot([te for te, _ in pre], [r["dirty_rate_pps"] for _, r in pre], color=BLUE, lw=1, ls=":",
                marker="o", markersize=7, zorder=4)
        handles.append(Line2D([], [], color=BLUE, lw=2.5, marker="o",
                              label="dirty rate: distinct pages dirtied per second during the round"))
    link_bits = report.get("bandwidth_limit_bps")
    link_label = "link capacity (--bandwidth)"
    if not link_bits:
        measured = sorted(r["bandwidth_bps"] for r in rounds if r["bandwidth_bps"] > 0)
        link_bits = measured[len(measured) // 2] if measured else None
        link_label = "link rate measured (median)"
    ymax = max([r["dirty_rate_pps"] for _, r in pre] + [1.0])
    if link_bits:
        link_pps = link_bits / 8 / PAGE_SIZE
        if link_pps < ymax * 20:
            ax.axhline(link_pps, color=VERMILION, ls="--", lw=1.8, zorder=2)
            handles.append(Line2D([], [], color=VERMILION, ls="--", lw=1.8, label=f"{link_label}: {link_pps:,.0f} pages/s"))
            ymax = max(ymax, link_pps)
        else:
            ax.text(0.99, 0.97, f"{link_label}: {link_pps:,.0f} pages/s (off the scale)", transform=ax.transAxes,
                    ha="right", va="top", fontsize=10, color=VERMILION)
    sc = [(te, r) for te, r in zip(ends, rounds) if r["kind"] == "stop-and-copy"]
    for te, r in sc:
        ax.axvspan(te - r["duration_s"], te, color=VERMILION, alpha=0.25, zorder=1)
        ax.axvline(te - r["duration_s"], color=VERMILION, lw=1, zorder=1)
        handles.append(Patch(facecolor=VERMILION, alpha=0.4, label="stop-and-copy (guest paused)"))
    for te, r in [(te, r) for te, r in zip(ends, rounds) if r["kind"] == "postcopy"]:
        ax.axvspan(te - r["duration_s"], te, color=PURPLE, alpha=0.18, zorder=1)
        ax.axvline(te - r["duration_s"], color=PURPLE, lw=1.5, ls="--", zorder=1)
        ax.annotate("switch to post-copy", (te - r["duration_s"], 1), xycoords=("data", "axes fraction"),
                    xytext=(-4, -4), textcoords="offset points", ha="right", va="top", fontsize=9, color=PURPLE)
        handles.append(Patch(facecolor=PURPLE, alpha=0.3, label="post-copy (guest runs at the destination)"))
    ax.set_ylim(0, ymax * 1.3)
    ax.set_xlim(left=0)
    ax.set_xlabel("time since the first round started (s); shaded bands = rounds")
    ax.set_ylabel("dirty rate (pages/s)")
    ax.yaxis.set_major_formatter(_commas())
    if any(r["throttle"] > 0 for r in rounds):
        ax2 = ax.twinx()
        xs = [0.0] + [te for te, _ in pre]
        ys = [pre[0][1]["throttle"] * 100 if pre else 0.0] + [r["throttle"] * 100 for _, r in pre]
        ax2.step(xs, ys, where="pre", color=PURPLE, lw=2)
        ax2.fill_between(xs, ys, step="pre", color=PURPLE, alpha=0.12)
        ax2.set_ylim(0, 100)
        ax2.set_ylabel("guest CPU throttle (%)", color=PURPLE)
        ax2.tick_params(axis="y", colors=PURPLE)
        ax2.grid(False)
        handles.append(Line2D([], [], color=PURPLE, lw=2, label="guest CPU throttle during the round (right axis)"))
    fig.legend(handles=handles, loc="outside lower center", ncols=2)
    return _save(fig, path)


# --- downtime -----------------------------------------------------------------------------
@_styled
def plot_downtime(report: dict, path, *, limit_ms: float | None = None, title: str | None = None) -> str:
    """Estimated downtime if the policy had stopped after each round, against its limit.

    Bars: ``est_downtime_ms`` per precopy round (dirty pages / link rate).  Dashed line:
    the policy's downtime limit (``limit_ms``, else read from the report's ``policy``
    dict, see :func:`downtime_limit_ms`; none drawn if neither has one).  Star: the
    guest-visible downtime measured at the real switchover.
    """
    _check_report(report)
    rounds = _rounds(report)
    if limit_ms is None:
        limit_ms = downtime_limit_ms(report)
    fig = _new_figure(11, 6)
    ax = fig.add_subplot()
    fig.suptitle(title or "Estimated downtime if the policy stopped after this round")
    ax.set_title(_subtitle(report), fontsize=11, fontweight="normal", color="#333333")
    pre = [r for r in rounds if r["kind"] == "precopy"]
    handles = []
    vals = []
    for r in pre:
        est = r["est_downtime_ms"]
        if est is None:
            ax.annotate("∞", (r["index"], 0), xytext=(0, 4), textcoords="offset points", ha="center", fontsize=12)
            continue
        over = limit_ms is not None and est > limit_ms
        colour = ORANGE if over else (GREEN if limit_ms is not None else SKY)
        ax.bar(r["index"], max(est, 1e-3), width=0.6, color=colour, edgecolor="#333333", linewidth=0.6, zorder=2)
        vals.append(est)
        if len(pre) <= 15:
            ax.annotate(f"{est:,.1f}", (r["index"], max(est, 1e-3)), xytext=(0, 3), textcoords="offset points",
                        ha="center", va="bottom", fontsize=9)
    if limit_ms is not None:
        ests = [r["est_downtime_ms"] for r in pre if r["est_downtime_ms"] is not None]
        if any(e <= limit_ms for e in ests):
            handles.append(Patch(facecolor=GREEN, edgecolor="#333333", label="estimate within the limit"))
        if any(e > limit_ms for e in ests):
            handles.append(Patch(facecolor=ORANGE, edgecolor="#333333", label="estimate over the limit"))
        ax.axhline(limit_ms, color=VERMILION, ls="--", lw=2, zorder=3)
        handles.append(Line2D([], [], color=VERMILION, ls="--", lw=2, label=f"policy's downtime limit: {limit_ms:,.0f} ms"))
        vals.append(limit_ms)
    else:
        handles.append(Patch(facecolor=SKY, edgecolor="#333333", label="estimated downtime (no limit in this policy)"))
    measured = report.get("downtime_ms")
    sc = [r for r in rounds if r["kind"] in ("stop-and-copy", "postcopy")]
    if measured is not None:
        x = sc[0]["index"] if sc else (pre[-1]["index"] + 1 if pre else 0)
        ax.scatter([x], [max(_num(measured), 1e-3)], marker="*", s=380, color=PURPLE, edgecolor="black", zorder=5)
        ax.annotate(f"measured\n{_num(measured):,.1f} ms", (x, max(_num(measured), 1e-3)), xytext=(0, 14),
                    textcoords="offset points", ha="center", va="bottom", fontsize=10, color="#9c3d7a",
                    fontweight="bold", bbox=dict(boxstyle="round,pad=0.2", fc="white", ec="none", alpha=0.85))
        handles.append(Line2D([], [], ls="", marker="*", markersize=16, color=PURPLE, markeredgecolor="black",
                              label="measured guest-visible downtime"))
        vals.append(_num(measured))
    elif report.get("outcome") in ("aborted", "failed"):
        x = pre[-1]["index"] + 1 if pre else 0
        ax.annotate(f"{report.get('outcome')}:\nno switchover,\nguest kept running\nat the source", (x, 0),
                    xycoords=("data", "axes fraction"), xytext=(0, 12), textcoords="offset points", ha="center",
                    va="bottom", fontsize=10, color=OUTCOME_COLOURS.get(report.get("outcome"), GREY), fontweight="bold")
        ax.set_xlim(-0.6, x + 0.8)
    if _wide(vals):
        ax.set_yscale("log")
        ax.set_ylabel("downtime (ms, log scale)")
        _plain_log_ticks(ax)
    else:
        ax.set_ylim(0, (max(vals) if vals else 1) * 1.25)
        ax.set_ylabel("downtime (ms)")
    ticks = [r["index"] for r in rounds]
    if ticks and len(ticks) <= 20:
        ax.set_xticks(ticks)
        labels = []
        for r in rounds:
            if r["kind"] == "stop-and-copy":
                labels.append(f"{r['index']}\nstop&copy")
            elif r["kind"] == "postcopy":
                labels.append(f"{r['index']}\npost-copy\n(switch)")
            elif r["decision"] and r["decision"] != "continue":
                labels.append(f"{r['index']}\n→ {r['decision']}")
            else:
                labels.append(str(r["index"]))
        ax.set_xticklabels(labels)
    else:
        _int_ticks(ax.xaxis)
    if sc:
        ax.set_xlim(-0.6, sc[0]["index"] + 1.2)
    ax.set_xlabel("after round")
    if ax.get_yscale() != "log":
        ax.yaxis.set_major_formatter(_commas())
    fig.legend(handles=handles, loc="outside lower center", ncols=min(4, len(handles)))
    return _save(fig, path)


# --- profiling ----------------------------------------------------------------------------
@_styled
def plot_working_set(windows_s: Sequence[float], wws_pages: Sequence[float], path, *,
                     guest_pages: int | None = None, title: str | None = None, subtitle: str | None = None) -> str:
    """Writable working set (distinct pages written within a window) vs window length.

    Args:
        windows_s: window lengths in seconds.
        wws_pages: pages written at least once within a window of that length (mean
            over the recording, as the profiler measures it).
        guest_pages: guest RAM in pages; drawn as a reference when it fits the scale.
    """
    xs = [float(x) for x in windows_s]
    ys = [float(y) for y in wws_pages]
    if not xs or len(xs) != len(ys):
        raise ValueError(f"windows_s and wws_pages must be non-empty and of equal length (got {len(xs)} and {len(ys)})")
    pairs = sorted(zip(xs, ys))
    xs, ys = [p[0] for p in pairs], [p[1] for p in pairs]
    fig = _new_figure(10, 6)
    ax = fig.add_subplot()
    fig.suptitle(title or "Writable working set vs window length")
    if subtitle:
        ax.set_title(subtitle, fontsize=11, fontweight="normal", color="#333333")
    ax.plot(xs, ys, color=BLUE, lw=2.2, marker="o", markersize=8, label="pages written within the window", zorder=3)
    for x, y in zip(xs, ys):
        ax.annotate(f"{_fmt_pages(y)}\n({_fmt_bytes(y * PAGE_SIZE)})", (x, y), xytext=(0, 9), textcoords="offset points",
                    ha="center", fontsize=9, color="#1f4e79")
    if len(xs) > 1 and min(xs) > 0 and max(xs) / min(xs) > 20:
        ax.set_xscale("log")
        ax.set_xlabel("window length (s, log scale)")
        _plain_log_ticks(ax, "x")
    else:
        ax.set_xlabel("window length (s)")
    top = max(ys) if ys else 1
    if guest_pages:
        if guest_pages <= top * 3:
            ax.axhline(guest_pages, color=GREY, ls="-.", lw=1.2, label=f"guest RAM: {guest_pages:,} pages")
            top = max(top, guest_pages)
        else:
            ax.text(0.01, 0.97, f"guest RAM: {guest_pages:,} pages ({_fmt_bytes(guest_pages * PAGE_SIZE)}); "
                    f"largest working set = {max(ys) / guest_pages:.1%} of it", transform=ax.transAxes, va="top",
                    fontsize=10, color="#555555")
    ax.set_ylim(0, top * 1.25 or 1)
    ax.set_ylabel("writable working set (pages)")
    ax.yaxis.set_major_formatter(_commas())
    sec = ax.secondary_yaxis("right", functions=(lambda p: p * PAGE_SIZE / MiB, lambda m: m * MiB / PAGE_SIZE))
    sec.set_ylabel("MiB")
    sec.yaxis.set_major_formatter(_commas())
    ax.legend(loc="lower right")
    return _save(fig, path)


@_styled
def plot_dirty_trace(t_s: Sequence[float], dirty_pages: Sequence[float], path, *, interval_s: float | None = None,
                     title: str | None = None, subtitle: str | None = None) -> str:
    """Pages dirtied per interval over time (a profiler's dirty trace).

    Args:
        t_s: time of each interval's end, seconds from the start of the recording.
        dirty_pages: distinct pages dirtied during each interval.
        interval_s: the interval length; default: the median spacing of ``t_s``.  Used to
            show the rate in pages/s on the right-hand axis.
    """
    ts = [float(x) for x in t_s]
    ds = [float(y) for y in dirty_pages]
    if not ts or len(ts) != len(ds):
        raise ValueError(f"t_s and dirty_pages must be non-empty and of equal length (got {len(ts)} and {len(ds)})")
    if interval_s is None and len(ts) > 1:
        gaps = sorted(b - a for a, b in zip(ts, ts[1:]))
        interval_s = gaps[len(gaps) // 2]
    fig = _new_figure(11, 5.5)
    ax = fig.add_subplot()
    fig.suptitle(title or "Dirty pages per interval over time")
    if subtitle:
        ax.set_title(subtitle, fontsize=11, fontweight="normal", color="#333333")
    if len(ts) > 1:
        # Each value covers the interval that ends at its time stamp.
        xs = [max(0.0, ts[0] - (interval_s or 0))] + ts
        ys = [ds[0]] + ds
        ax.step(xs, ys, where="pre", color=BLUE, lw=1.6, label="pages dirtied in the interval")
        ax.fill_between(xs, ys, step="pre", color=SKY, alpha=0.35)
    else:
        ax.bar(ts, ds, width=interval_s or 0.1, color=SKY, label="pages dirtied in the interval")
    mean = sum(ds) / len(ds)
    ax.axhline(mean, color=VERMILION, ls="--", lw=1.6, label=f"mean {mean:,.0f} pages per interval")
    ax.set_xlim(left=0)
    ax.set_ylim(0, max(ds + [1]) * 1.2)
    ivl = f" per {interval_s * 1e3:g} ms interval" if interval_s else ""
    ax.set_xlabel("time (s)")
    ax.set_ylabel(f"dirty pages{ivl}")
    ax.yaxis.set_major_formatter(_commas())
    if interval_s:
        sec = ax.secondary_yaxis("right", functions=(lambda p: p / interval_s, lambda r: r * interval_s))
        sec.set_ylabel("pages/s")
        sec.yaxis.set_major_formatter(_commas())
    ax.legend(loc="upper right")
    return _save(fig, path)


# --- policy comparison --------------------------------------------------------------------
def _labels(reports: Sequence[dict], labels: Sequence[str] | None) -> list[str]:
    if labels is not None:
        if len(labels) != len(reports):
            raise ValueError(f"{len(labels)} labels for {len(reports)} reports")
        out = [str(x) for x in labels]
    else:
        out = [report_label(r, f"run {i + 1}") for i, r in enumerate(reports)]
    seen: dict[str, int] = {}
    for i, lab in enumerate(out):  # disambiguate repeated names
        if out.count(lab) > 1:
            seen[lab] = seen.get(lab, 0) + 1
            out[i] = f"{lab} #{seen[lab]}"
    return out


@_styled
def plot_comparison(reports: Sequence[dict], path, *, labels: Sequence[str] | None = None,
                    title: str | None = None) -> str:
    """Policies side by side on one workload: total time, downtime, data sent, outcome.

    One horizontal bar per report in each of three panels; bar colour = outcome
    (completed / aborted / failed), also written next to the bars.

    Raises:
        ValueError: no reports, or a dict that is not a report.
    """
    reports = list(reports)
    if not reports:
        raise ValueError("plot_comparison: no reports to compare (give at least one)")
    for i, r in enumerate(reports):
        _check_report(r, f"report {i + 1}")
    names = _labels(reports, labels)
    n = len(reports)
    fig = _new_figure(14, 2.6 + 0.75 * n)
    axes = fig.subplots(1, 3, sharey=True)
    fig.suptitle(title or "Precopy policies compared on the same workload")
    sub = _workload_text(reports[0])
    if sub:
        fig.supxlabel(f"same guest, workload and seed for every policy: {sub}", fontsize=11, color="#333333")
    ys = list(range(n))[::-1]
    colours = [OUTCOME_COLOURS.get(r.get("outcome"), GREY) for r in reports]
    panels = [
        ("Total migration time", "seconds", [_num(r.get("total_time_s"), math.nan) for r in reports], "{:.2f} s"),
        ("Downtime (guest paused)", "milliseconds, guest-visible",
         [(_num(r.get("downtime_ms"), math.nan) if r.get("downtime_ms") is not None else math.nan) for r in reports], "{:,.1f} ms"),
        ("Data sent", "pages sent ÷ guest pages",
         [(_num(r.get("pages_sent")) / r["guest_pages"]) if r.get("guest_pages") else math.nan for r in reports], "{:.2f}×"),
    ]
    for k, (ax, (ptitle, xlabel, vals, fmt)) in enumerate(zip(axes, panels)):
        ax.set_title(ptitle, fontsize=13)
        finite = [v for v in vals if not math.isnan(v)]
        vmax = max(finite) if finite else 1.0
        ax.barh(ys, [0 if math.isnan(v) else v for v in vals], color=colours, edgecolor="#333333", height=0.6, zorder=2)
        for y, v, r in zip(ys, vals, reports):
            if math.isnan(v):
                msg = "no switchover" if r.get("outcome") in ("aborted", "failed") else "n/a"
                ax.text(vmax * 0.02, y, msg, va="center", fontsize=10, style="italic", color="#555555")
            else:
                ax.text(v + vmax * 0.02, y, fmt.format(v), va="center", fontsize=11)
            if k == 0:
                out = r.get("outcome") or "?"
                ax.text(vmax * 0.02 if math.isnan(v) else v + vmax * 0.02, y - 0.22,
                        f"{out}, {len(r.get('rounds') or [])} rounds", va="center", fontsize=9.5, fontweight="bold",
                        color=OUTCOME_COLOURS.get(out, GREY))
        ax.set_xlim(0, vmax * 1.45 or 1)
        ax.set_xlabel(xlabel)
        ax.grid(axis="y", visible=False)
    axes[2].axvline(1.0, color=GREY, ls=":", lw=1.5, zorder=1)
    axes[2].text(1.0, -0.6, " RAM once", fontsize=9, color="#555555", va="center")
    axes[0].set_yticks(ys)
    axes[0].set_yticklabels(names, fontsize=12)
    axes[0].set_ylim(-0.8, n - 0.4)
    present = [o for o in OUTCOME_COLOURS if any(r.get("outcome") == o for r in reports)]
    fig.legend(handles=[Patch(facecolor=OUTCOME_COLOURS[o], edgecolor="#333333", label=o) for o in present],
               loc="outside upper right", ncols=len(present), title="outcome")
    return _save(fig, path)


# --- tables -------------------------------------------------------------------------------
def summary_table(report: dict) -> dict:
    """Key numbers of one report as a table ``{"columns", "rows"}`` for :func:`write_html`."""
    gp = report.get("guest_pages") or 0
    rows = [
        ["outcome", report.get("outcome", "?")],
        ["reason", report.get("reason", "")],
        ["verified", "yes" if report.get("verified") else "no"],
        ["workload", _workload_text(report)],
        ["policy", ", ".join(f"{k}={v}" for k, v in (report.get("policy") or {}).items())],
        ["tracker", report.get("tracker", "")],
        ["rounds", len(report.get("rounds") or [])],
        ["total time", f"{_num(report.get('total_time_s')):.3f} s"],
        ["downtime (guest-visible)", "—" if report.get("downtime_ms") is None else f"{_num(report['downtime_ms']):.2f} ms"],
        ["pages sent / guest pages", f"{int(_num(report.get('pages_sent'))):,} / {gp:,}"
         + (f" ({_num(report.get('pages_sent')) / gp:.2f}×)" if gp else "")],
        ["bytes sent", _fmt_bytes(_num(report.get("bytes_sent")))],
    ]
    if is_predicted(report):
        rows.insert(0, ["kind", "prediction"])
    return {"columns": ["", "value"], "rows": rows}


def rounds_table(report: dict) -> dict:
    """One row per round: what it sent, how long it took, what was dirty, what the policy said."""
    rows = []
    for r in _rounds(report):
        rows.append([
            r["index"], r["kind"], f"{r['pages_sent']:,}", _fmt_bytes(r["bytes_sent"]), f"{r['duration_s'] * 1e3:,.1f}",
            f"{r['dirty_pages']:,}" if r["kind"] == "precopy" else "—",
            f"{r['dirty_rate_pps']:,.0f}" if r["kind"] == "precopy" else "—",
            _fmt_rate_Bps(r["bandwidth_bps"]) if r["bandwidth_bps"] else "—",
            "—" if r["est_downtime_ms"] is None else f"{r['est_downtime_ms']:,.1f}",
            f"{r['throttle']:.0%}" if r["throttle"] else "",
            r["decision"], r["reason"],
        ])
    return {"columns": ["round", "kind", "pages sent", "bytes sent", "duration (ms)", "dirty at end", "dirty rate (pages/s)",
                        "bandwidth", "est. downtime (ms)", "throttle", "decision", "reason"], "rows": rows}


def comparison_table(reports: Sequence[dict], labels: Sequence[str] | None = None) -> dict:
    """One row per report: policy, outcome, rounds, total time, downtime, pages sent / guest pages, reason."""
    names = _labels(list(reports), labels)
    rows = []
    for name, r in zip(names, reports):
        gp = r.get("guest_pages") or 0
        ps = int(_num(r.get("pages_sent")))
        rows.append([
            name, r.get("outcome", "?"), len(r.get("rounds") or []), f"{_num(r.get('total_time_s')):.2f} s",
            "—" if r.get("downtime_ms") is None else f"{_num(r['downtime_ms']):,.1f} ms",
            f"{ps:,} / {gp:,}" + (f" ({ps / gp:.2f}×)" if gp else ""), r.get("reason", ""),
        ])
    return {"columns": ["policy", "outcome", "rounds", "total time", "downtime", "pages sent / guest pages", "reason"],
            "rows": rows}


# --- HTML ---------------------------------------------------------------------------------
_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; margin: 2em auto;
       max-width: 1200px; color: #222; line-height: 1.45; padding: 0 1em; }
h1 { border-bottom: 3px solid #0072B2; padding-bottom: .3em; }
h2 { margin-top: 2em; color: #0b3d66; border-bottom: 1px solid #ccc; }
figure { margin: 1em 0 2em; }
figure img { max-width: 100%; border: 1px solid #ddd; box-shadow: 0 1px 4px rgba(0,0,0,.08); }
figcaption { color: #555; font-size: .95em; margin-top: .3em; }
table { border-collapse: collapse; margin: 1em 0; font-size: .95em; }
th, td { border: 1px solid #ccc; padding: .35em .7em; text-align: left; vertical-align: top; }
th { background: #eef4fa; }
tr:nth-child(even) td { background: #fafafa; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
caption { font-weight: bold; text-align: left; padding: .3em 0; }
.o-completed { color: #00704f; font-weight: bold; } .o-aborted { color: #a86f00; font-weight: bold; }
.o-failed { color: #b04500; font-weight: bold; }
p.note { color: #444; }
footer { margin-top: 3em; color: #777; font-size: .85em; }
"""

_NUMERIC = re.compile(r"^[\s\d,.\-+×%]+(\s?(s|ms|KiB|MiB|GiB|B|MB/s|×)?)?(\s/\s[\d,]+.*)?$")


def _cell(v, numeric: bool = True) -> str:
    text = "" if v is None else str(v)
    cls = []
    if text in OUTCOME_COLOURS:
        cls.append(f"o-{text}")
    elif numeric and text and _NUMERIC.match(text):
        cls.append("num")
    attr = f' class="{" ".join(cls)}"' if cls else ""
    return f"<td{attr}>{html.escape(text)}</td>"


def _table_html(table: dict) -> str:
    cols = table.get("columns") or []
    parts = ["<table>"]
    if table.get("caption"):
        parts.append(f"<caption>{html.escape(str(table['caption']))}</caption>")
    if cols:
        parts.append("<tr>" + "".join(f"<th>{html.escape(str(c))}</th>" for c in cols) + "</tr>")
    numeric = len(cols) > 2   # key/value tables read better left-aligned
    for row in table.get("rows") or []:
        parts.append("<tr>" + "".join(_cell(v, numeric) for v in row) + "</tr>")
    parts.append("</table>")
    return "\n".join(parts)


def _img_html(path, caption: str = "") -> str:
    with open(path, "rb") as f:
        data = f.read()
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        raise ValueError(f"{path}: not a PNG file")
    b64 = base64.b64encode(data).decode("ascii")
    alt = html.escape(caption or os.path.basename(os.fspath(path)))
    cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return f'<figure><img alt="{alt}" src="data:image/png;base64,{b64}">{cap}</figure>'


def write_html(path, title: str, sections: Sequence[dict]) -> str:
    """Write one self-contained HTML file (no external assets; PNGs embedded as base64).

    Args:
        path: the HTML file to write.
        title: page title and heading.
        sections: each a dict with any of:
            ``heading`` (str), ``text`` (str or list of paragraphs, plain text),
            ``tables`` (list of ``{"columns": [...], "rows": [[...]], "caption": str}``;
            ``table`` for one), ``images`` (list of PNG paths or ``(path, caption)``
            pairs; ``image`` for one), ``tables_first`` (default True: tables above
            the images).
    Returns:
        ``path``.
    """
    body = [f"<h1>{html.escape(title)}</h1>"]
    for sec in sections:
        if not isinstance(sec, dict):
            raise ValueError(f"write_html: a section must be a dict, got {type(sec).__name__}")
        if sec.get("heading"):
            body.append(f"<h2>{html.escape(str(sec['heading']))}</h2>")
        texts = sec.get("text") or []
        for t in [texts] if isinstance(texts, str) else texts:
            body.append(f'<p class="note">{html.escape(str(t))}</p>')
        tables = [_table_html(t) for t in list(sec.get("tables") or []) + ([sec["table"]] if sec.get("table") else [])]
        images = []
        for im in list(sec.get("images") or []) + ([sec["image"]] if sec.get("image") else []):
            if isinstance(im, (tuple, list)):
                images.append(_img_html(im[0], im[1] if len(im) > 1 else ""))
            else:
                images.append(_img_html(im))
        body += (tables + images) if sec.get("tables_first", True) else (images + tables)
    body.append("<footer>Generated by vmem (vmem graph / vmem compare). Every number comes from the JSON reports; "
                "schema in docs/report.md.</footer>")
    doc = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
           f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n<body>\n"
           + "\n".join(body) + "\n</body></html>\n")
    path = os.fspath(path)
    d = os.path.dirname(path)
    if d:
        os.makedirs(d, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(doc)
    return path


# --- a whole report -----------------------------------------------------------------------
def safe_name(text: str) -> str:
    """``text`` as a file-name component."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-.")
    return s or "run"


CONVERGENCE_NOTE = ("Bars: pages sent in each round; line: pages still dirty when the round ended (what the next "
                    "round must send). Precopy converges while this line falls; it levels off at the writable "
                    "working set, and then only the policy's decision ends it.")
DIRTY_RATE_NOTE = ("Distinct pages dirtied per second, measured at each round's end. Precopy can only gain on the "
                   "guest while this stays below the link's capacity (dashed).")
DOWNTIME_NOTE = ("What stopping after each round would cost: dirty pages ÷ link rate. The star is the guest-visible "
                 "downtime measured at the real switchover.")


def render_report(report: dict, out_dir, *, name: str | None = None, predicted=None) -> dict:
    """Render one report's graphs into ``out_dir``; returns an HTML section dict.

    Writes ``NAME-convergence.png``, ``NAME-dirty-rate.png`` and ``NAME-downtime.png``
    (NAME defaults to the report's label).
    """
    _check_report(report)
    name = safe_name(name or report_label(report))
    label = report_label(report)
    conv = plot_convergence(report, os.path.join(out_dir, f"{name}-convergence.png"), predicted=predicted)
    images = [(conv, f"{label}: convergence. " + CONVERGENCE_NOTE)]
    if report.get("rounds") and not is_predicted(report):
        images.append((plot_dirty_rate(report, os.path.join(out_dir, f"{name}-dirty-rate.png")),
                       f"{label}: dirty rate over time. " + DIRTY_RATE_NOTE))
        images.append((plot_downtime(report, os.path.join(out_dir, f"{name}-downtime.png")),
                       f"{label}: estimated downtime per round. " + DOWNTIME_NOTE))
    tables = [dict(summary_table(report), caption="Key numbers"), dict(rounds_table(report), caption="Rounds")]
    return {"heading": label, "tables": tables, "images": images, "tables_first": False}


# --- loading ------------------------------------------------------------------------------
def load_reports(paths: Sequence[str]) -> list[tuple[str, dict]]:
    """Load JSON files: single reports, or ``vmem compare --json`` documents (expanded).

    Returns (source, document) pairs; documents are reports, or profile data with
    ``windows_s``/``wws_pages`` and/or ``t_s``/``dirty_pages`` arrays.

    Raises:
        ValueError: unreadable file, invalid JSON, or JSON that is neither.
    """
    if not paths:
        raise ValueError("no report files given")
    out: list[tuple[str, dict]] = []
    for p in paths:
        try:
            with open(p, encoding="utf-8") as f:
                doc = json.load(f)
        except OSError as err:
            raise ValueError(f"{p}: cannot read: {err.strerror or err}") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"{p}: not valid JSON ({err.msg} at line {err.lineno})") from None
        docs = doc if isinstance(doc, list) else [doc]
        for i, d in enumerate(docs):
            where = p if len(docs) == 1 else f"{p}[{i}]"
            if isinstance(d, dict) and isinstance(d.get("results"), list):   # vmem compare --json
                for j, res in enumerate(d["results"]):
                    rep = res.get("report") if isinstance(res, dict) else None
                    if isinstance(rep, dict):
                        if res.get("policy") and not rep.get("label"):
                            rep = dict(rep, label=res["policy"])
                        out.append((f"{where}:{j}", _check_report(rep, where)))
            elif isinstance(d, dict) and isinstance(d.get("rounds"), list):
                out.append((where, d))
            elif isinstance(d, dict) and _profile_arrays(d):
                out.append((where, d))
            else:
                raise ValueError(f"{where}: not a migration report (no 'rounds' list) nor a vmem compare/profile "
                                 "document; see docs/report.md")
    return out


def _profile_arrays(d: dict) -> dict:
    """Find plain profile arrays in a document (top level or under 'working_set' / 'trace')."""
    found = {}
    for src in (d, d.get("working_set") or {}, d.get("trace") or {}):
        if not isinstance(src, dict):
            continue
        for k in ("windows_s", "wws_pages", "t_s", "dirty_pages", "guest_pages", "interval_s"):
            if k in src and k not in found:
                found[k] = src[k]
    ok = ("windows_s" in found and "wws_pages" in found) or (
        "t_s" in found and isinstance(found.get("dirty_pages"), list))
    return found if ok else {}


# --- a set of documents -> one report -----------------------------------------------------
def render_documents(docs: Sequence[tuple[str, dict]], out_dir, *, extra_predicted: Sequence[dict] = (),
                     title: str | None = None) -> tuple[list[str], str]:
    """Draw :func:`load_reports`'s documents into ``out_dir``: a comparison of the measured runs
    (when there are several), each run's graphs and page map with the predictions that match it
    overlaid, predictions alone when nothing was measured, and each profile's working set and
    dirty trace; then one HTML page of them all (``vmem graph``).

    ``extra_predicted`` are reports drawn as predictions whether or not they say so.  Returns
    (the PNG and page-map files written, the HTML page)."""
    os.makedirs(out_dir, exist_ok=True)
    reports = [(src, d) for src, d in docs if isinstance(d.get("rounds"), list)]
    profiles = [(src, d) for src, d in docs if not isinstance(d.get("rounds"), list)]
    measured = [(src, d) for src, d in reports if not is_predicted(d)]
    predicted = [d for _, d in reports if is_predicted(d)] + [dict(d, predicted=True) for d in extra_predicted]

    def matching(rep):
        if len(measured) <= 1:
            return predicted
        return [p for p in predicted if report_label(p).split(" (")[0] == report_label(rep)]

    written: list[str] = []
    sections: list[dict] = []
    used_names: set[str] = set()
    if len(measured) > 1:
        comp = plot_comparison([d for _, d in measured], os.path.join(out_dir, "comparison.png"))
        written.append(comp)
        sections.append({"heading": "Policies compared", "table": comparison_table([d for _, d in measured]),
                         "images": [(comp, "Total time, guest-visible downtime and data sent per policy; bar colour = outcome.")]})
    for src, rep in measured:
        name = safe_name(report_label(rep))
        base, k = name, 1
        while name in used_names:
            k += 1
            name = f"{base}-{k}"
        used_names.add(name)
        preds = matching(rep)
        sec = render_report(rep, out_dir, name=name, predicted=preds or None)
        sec["text"] = [f"from {src}"]
        from vmem.analysis.pagemap import render_run

        for extra in render_run(rep, out_dir, name=name, report_path=src):
            if extra.endswith(".html"):
                sec["text"].append(f"step through the page map round by round: {os.path.basename(extra)}")
            else:
                what = ("Page map: pages x time, a column per round / post-copy step." if extra.endswith("pagemap.png")
                        else "Post-copy: faults per ms, pages remaining, fault latency, guest rate before/during/after.")
                sec["images"].append((extra, what))
            written.append(extra)
        for p in preds:
            sec["tables"].append(dict(summary_table(p), caption=f"Prediction: {report_label(p)}"))
        sections.append(sec)
        written += [im[0] for im in sec["images"] if im[0] not in written]
    if not measured:
        for i, p in enumerate(predicted):
            sec = render_report(p, out_dir, name=f"predicted-{i + 1}")
            sections.append(sec)
            written += [im[0] for im in sec["images"]]
    for i, (src, d) in enumerate(profiles):
        arrays = _profile_arrays(d)
        images = []
        stem = f"profile-{i + 1}" if len(profiles) > 1 else "profile"
        if "windows_s" in arrays:
            images.append((plot_working_set(arrays["windows_s"], arrays["wws_pages"], os.path.join(out_dir, f"{stem}-working-set.png"),
                                            guest_pages=arrays.get("guest_pages")),
                           "Writable working set: distinct pages written within a window of each length."))
        if "t_s" in arrays:
            images.append((plot_dirty_trace(arrays["t_s"], arrays["dirty_pages"], os.path.join(out_dir, f"{stem}-dirty-trace.png"),
                                            interval_s=arrays.get("interval_s")),
                           "Pages dirtied per interval while the guest ran under dirty logging."))
        sections.append({"heading": f"Profile ({src})", "images": images})
        written += [im[0] for im in images]
    title = title or ("vmem: " + (", ".join(report_label(d) for _, d in measured) or "migration graphs"))
    page = write_html(os.path.join(out_dir, "report.html"), title, sections)
    return written, page
