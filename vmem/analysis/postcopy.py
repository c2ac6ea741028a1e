"""The post-copy figure: faults over time, their latency, the pages still missing, and the
guest's progress before, during and after — for a post-copy or hybrid run.

Four panels (:func:`plot_postcopy`):

1. **faults per ms** after the switch (bars) and pages pushed per ms (line, right axis);
2. **pages remaining** at the source (pending minus arrived, pushed or demanded);
3. **fault latency** (fault -> page placed) histogram, p50 and p99 marked;
4. **guest rate** in workload steps/s *before* (pre-copy, hybrid: from tracking armed to
   the pause; pure post-copy: the 0.5 s window before the pause), *during* (the
   destination guest from its resume until every page is placed) and *after* (the observe
   window), with the downtime and the blackout written beside.

Panels 1-3 need the page map's push and fault logs (``vmem migrate --pagemap``); without
them the panels say so and only the report's numbers are drawn.
"""
from __future__ import annotations

import numpy as np

__all__ = ["plot_postcopy", "guest_rate_explained"]

#: what each of guest_rate's three figures counts (the figure's and the summary's words)
guest_rate_explained = {
    "before": "before: steps/s at the source before the pause (hybrid: the pre-copy phase; "
              "pure post-copy: a 0.5 s window before the pause)",
    "during": "during: steps/s at the destination from its resume until the last page was placed (pages missing; "
              "a paced workload catches up the time it lost while paused, so this can exceed before)",
    "after": "after: steps/s at the destination from the last page placed to its final report (verify, observe window)",
}


def plot_postcopy(report: dict, pm: dict | None, path) -> str:
    """The four-panel post-copy figure of ``report``; ``pm`` the page map's arrays
    (:func:`vmem.analysis.pagemap.load_pagemap`) or None.  Returns ``path``."""
    from vmem.analysis.graphs import BLUE, GREEN, ORANGE, PURPLE, VERMILION, _new_figure, _save, _subtitle

    pc = report.get("postcopy") or {}
    fig = _new_figure(12, 8)
    fig.suptitle(f"Post-copy ({pc.get('mode') or report.get('mode')}): faults, pages still missing, the guest's rate\n"
                 f"{_subtitle(report)}", fontsize=11)
    ax1, ax2, ax3, ax4 = (fig.add_subplot(2, 2, i) for i in range(1, 5))
    have = pm is not None and not np.isnan(float(pm.get("pc_switch_s", np.nan)))
    if have:
        sw = float(pm["pc_switch_s"])
        ft_ms = (pm["fault_t_s"] - sw) * 1e3
        sizes = np.diff(np.concatenate([[0], pm["push_batch_end"]])).astype(np.int64)
        pt_ms = (pm["push_t_s"] - sw) * 1e3
        end_ms = max([1.0, *ft_ms[-1:], *pt_ms[-1:], (float(pm["pc_end_s"]) - sw) * 1e3 if not np.isnan(float(pm["pc_end_s"])) else 0])
        nbins = int(min(400, max(10, np.ceil(end_ms))))
        edges = np.linspace(0, end_ms, nbins + 1)
        width_ms = edges[1] - edges[0]
        fc, _ = np.histogram(ft_ms, bins=edges)
        pcount, _ = np.histogram(pt_ms, bins=edges, weights=sizes)
        # stairs, not bars: one artist for hundreds of bins (drawing stays fast)
        ax1.stairs(fc / width_ms, edges, fill=True, color=VERMILION, label="faults per ms")
        ax1b = ax1.twinx()
        ax1b.plot(edges[:-1] + width_ms / 2, pcount / width_ms, color=GREEN, lw=1.2, label="pages pushed per ms")
        ax1b.set_ylabel("pages pushed per ms", color=GREEN)
        ax1b.grid(False)
        ax1.set_xlabel("ms after the switch")
        ax1.set_ylabel("faults per ms", color=VERMILION)
        h1, l1 = ax1.get_legend_handles_labels()
        h2, l2 = ax1b.get_legend_handles_labels()
        ax1.legend(h1 + h2, l1 + l2, fontsize=8, loc="upper right")
        npages = int(pm["npages"])
        pending_mask = np.unpackbits(pm["pc_pending"], count=npages).astype(bool)
        pending = int(pending_mask.sum())
        # Each pending page arrives once: at its push or its fault, whichever came first.
        arrive = np.full(npages, np.inf)
        if len(pm["push_pages"]):
            arrive[pm["push_pages"].astype(np.int64)] = np.repeat(pt_ms, sizes)
        if len(pm["fault_page"]):
            np.minimum.at(arrive, pm["fault_page"].astype(np.int64), ft_ms)
        t = np.sort(arrive[pending_mask & np.isfinite(arrive)])
        ax2.step(np.concatenate([[0], t]), pending - np.arange(len(t) + 1), where="post", color=BLUE, lw=2)
        ax2.set_xlabel("ms after the switch")
        ax2.set_ylabel("pages still only at the source")
        ax2.set_ylim(bottom=0)
        lat = pm["fault_latency_us"]
        if len(lat):
            lo, hi = max(1.0, float(lat.min())), max(2.0, float(lat.max()))
            ax3.hist(lat, bins=np.geomspace(lo, hi * 1.01, 40), color=ORANGE, edgecolor="#333", histtype="stepfilled")
            ax3.set_xscale("log")
            for q, ls in ((50, "-"), (99, "--")):
                v = float(np.percentile(lat, q))
                ax3.axvline(v, color="black", ls=ls, lw=1.2, label=f"p{q} {v:,.0f} µs")
            ax3.legend(fontsize=8)
        else:
            ax3.text(0.5, 0.5, "no fault: the guest never waited for a page", ha="center", va="center",
                     transform=ax3.transAxes)
        ax3.set_xlabel("fault latency: fault -> page placed (µs, log)")
        ax3.set_ylabel("faults")
    else:
        for ax in (ax1, ax2, ax3):
            ax.text(0.5, 0.5, "no page map: run with --pagemap DIR\nto record the push and fault logs",
                    ha="center", va="center", transform=ax.transAxes)
    ax1.set_title("Faults and push after the switch", fontsize=10)
    ax2.set_title("Pages remaining", fontsize=10)
    lat_pct = pc.get("fault_latency_us") or {}
    ax3.set_title(f"Fault latency ({lat_pct.get('count', 0):,} faults, blocktime {pc.get('blocktime_ms', 0) or 0:,.1f} ms)",
                  fontsize=10)
    rate = pc.get("guest_rate") or {}
    names = ["before", "during", "after"]
    vals = [rate.get(n) for n in names]
    xs = np.arange(3)
    ax4.bar(xs, [v or 0 for v in vals], color=[BLUE, PURPLE, GREEN], edgecolor="#333")
    for x, v in zip(xs, vals):
        ax4.annotate("n/a" if v is None else f"{v:,.0f}", (x, v or 0), xytext=(0, 3), textcoords="offset points",
                     ha="center", fontsize=9)
    ax4.set_xticks(xs)
    ax4.set_xticklabels(["before\n(source)", "during\n(pages missing)", "after\n(all pages here)"])
    ax4.set_ylabel(rate.get("unit") or "workload steps/s")
    down, black = report.get("downtime_ms"), report.get("blackout_ms")
    ax4.set_title(f"Guest rate; downtime {down if down is not None else 'n/a'} ms, "
                  f"blackout {black if black is not None else 'n/a'} ms", fontsize=10)
    fig.supxlabel("\n".join(guest_rate_explained.values()), fontsize=8, ha="left", x=0.01)
    return _save(fig, path)
