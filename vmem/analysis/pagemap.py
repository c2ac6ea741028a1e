"""The page map: pages x time, round by round and fault by fault (PNG and step-through HTML).

Input: the ``.npz`` a migration wrote with a page map recorder
(:mod:`vmem.migration.pagemap`, ``vmem migrate --pagemap DIR``).  Output:

* :func:`plot_pagemap` — one raster PNG: a column per frame (pre-copy rounds, the
  stop-and-copy, then time slices of the post-copy phase), a row per page or per bin of
  pages, one colour per state;
* :func:`write_pagemap_html` — one self-contained HTML file (no external asset, works
  offline) that shows the guest's RAM as a grid, frame by frame, with play/pause, a slider,
  previous/next, the per-state counts of each frame and a legend.

States (a frame's code per page; a bin of pages shows its highest code, so a single
faulted page in a bin of 64 stays visible)::

    0 zero       never held data, never sent           5 dirtied    written during this round: sent again next round
    1 clean      at the destination, unchanged         6 pending    post-copy: still only at the source
    2 sent       sent for the first time this round    7 stop&copy  sent with the guest paused
    3 re-sent    sent again (it had been dirtied)      8 faulted    post-copy: the guest faulted on it (sent on demand)
    4 pushed     post-copy: arrived with the background push

Frames: one per pre-copy round (what it sent, and what was dirtied during it), one for the
stop-and-copy, and in post-copy one per fault (the fault log's times; at most
``max_postcopy_frames``, else evenly spaced quantiles of the fault times) plus a few
evenly spaced over the push, and a last one with every page arrived.
"""
from __future__ import annotations

import base64
import html
import json
import math
import os

import numpy as np

__all__ = ["STATES", "COLORS", "load_pagemap", "build_frames", "plot_pagemap", "write_pagemap_html", "render_pagemap"]

ZERO, CLEAN, SENT, RESENT, PUSHED, DIRTIED, PENDING, STOPCOPY, FAULTED = range(9)
#: state names by code (the legend, the HTML and the counts use them)
STATES = ("zero", "clean", "sent", "re-sent", "pushed", "dirtied", "pending", "stop-and-copy", "faulted")
#: one colour per state
COLORS = ("#f2f2f2", "#b9d3ea", "#2b7bba", "#7b3fb5", "#41ab5d", "#f39c12", "#9e9e9e", "#d7301f", "#000000")
#: cells in the HTML grid at most (pages are binned above this)
MAX_CELLS = 16384
#: rows in the PNG at most
MAX_PNG_ROWS = 512
#: post-copy columns in the PNG at most (the HTML has every frame)
MAX_PNG_POSTCOPY_COLUMNS = 16
#: post-copy frames at most (fault by fault below this)
MAX_POSTCOPY_FRAMES = 120


def load_pagemap(path) -> dict:
    """The arrays of a page map ``.npz``; ValueError if it is not one this version reads."""
    try:
        with np.load(path, allow_pickle=False) as z:
            d = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as err:
        raise ValueError(f"{path}: not a page map ({err})") from None
    if int(d.get("version", -1)) != 1 or "npages" not in d:
        raise ValueError(f"{path}: not a version 1 page map")
    return d


def _unpack(packed: np.ndarray, npages: int) -> np.ndarray:
    return np.unpackbits(packed, count=npages).astype(bool)


def _bin(codes: np.ndarray, k: int) -> np.ndarray:
    """Highest code per bin of ``k`` pages."""
    if k == 1:
        return codes
    pad = (-len(codes)) % k
    if pad:
        codes = np.concatenate([codes, np.zeros(pad, dtype=codes.dtype)])
    return codes.reshape(-1, k).max(axis=1)


def build_frames(d: dict, *, max_cells: int = MAX_CELLS, max_postcopy_frames: int = MAX_POSTCOPY_FRAMES) -> dict:
    """The frames of a page map: ``{"pages_per_cell", "cells", "frames": [...]}``.

    Each frame: ``label``, ``phase`` (precopy, stop-and-copy, postcopy), ``t_s`` (seconds
    since the migration started), ``counts`` (pages per state, full resolution), ``codes``
    (uint8 per cell) and ``text`` (one sentence saying what the frame shows).
    """
    npages = int(d["npages"])
    k = max(1, math.ceil(npages / max_cells))
    zero = _unpack(d["zero"], npages)
    frames: list[dict] = []
    ever = np.zeros(npages, dtype=bool)

    def add(codes: np.ndarray, label: str, phase: str, t_s: float, text: str) -> None:
        frames.append({"label": label, "phase": phase, "t_s": round(float(t_s), 6),
                       "counts": np.bincount(codes, minlength=len(STATES)).tolist(), "codes": _bin(codes, k),
                       "text": text})

    for i in range(len(d["round_sent"])):
        sent = _unpack(d["round_sent"][i], npages)
        dirty = _unpack(d["round_dirty"][i], npages)
        codes = np.where(~ever & zero, ZERO, CLEAN).astype(np.uint8)
        codes[sent & ~ever] = SENT
        codes[sent & ever] = RESENT
        codes[dirty] = DIRTIED
        t0, t1 = d["round_t_s"][i]
        add(codes, f"round {i}", "precopy", t1,
            f"pre-copy round {i} ({(t1 - t0) * 1e3:.1f} ms): sent {int(sent.sum()):,} pages "
            f"({int((sent & ever).sum()):,} of them again); the guest dirtied {int(dirty.sum()):,} meanwhile")
        ever |= sent
    base = np.where(ever, CLEAN, ZERO).astype(np.uint8)
    sc = _unpack(d["sc_sent"], npages)
    if sc.any() or not math.isnan(float(d["sc_t_s"][0])):
        codes = base.copy()
        codes[sc] = STOPCOPY
        t0, t1 = d["sc_t_s"]
        add(codes, "stop-and-copy", "stop-and-copy", t1,
            f"stop-and-copy: the guest is paused; the last {int(sc.sum()):,} dirty pages go over "
            f"({(t1 - t0) * 1e3:.1f} ms from the pause)")
    switch_s = float(d["pc_switch_s"])
    if not math.isnan(switch_s):
        for f in _postcopy_frames(d, base, npages, switch_s, max_postcopy_frames):
            codes = f.pop("full")
            f["counts"] = np.bincount(codes, minlength=len(STATES)).tolist()
            f["codes"] = _bin(codes, k)
            frames.append(f)
    return {"npages": npages, "pages_per_cell": k, "cells": math.ceil(npages / k), "frames": frames}


def _postcopy_frames(d: dict, base: np.ndarray, npages: int, switch_s: float, max_frames: int) -> list[dict]:
    """The switch, then a frame per fault time (or quantiles of them) and a few over the push;
    codes at full resolution under ``full``."""
    pending = _unpack(d["pc_pending"], npages)
    end_s = float(d["pc_end_s"])
    push_pages = d["push_pages"].astype(np.int64)
    sizes = np.diff(np.concatenate([[0], d["push_batch_end"]])).astype(np.int64)
    push_at = np.full(npages, np.inf)
    if len(push_pages):
        push_at[push_pages] = np.repeat(d["push_t_s"], sizes)
    fault_at = np.full(npages, np.inf)
    fpages = d["fault_page"].astype(np.int64)
    ftimes = d["fault_t_s"].astype(np.float64)
    if len(fpages):
        np.minimum.at(fault_at, fpages, ftimes)
    # Pending pages neither pushed nor in the fault log were served on demand too (a
    # truncated log, or a fault the log did not time): they count as faulted, at the end.
    demanded_untimed = pending & np.isinf(push_at) & np.isinf(fault_at)
    if math.isnan(end_s):
        end_s = max([switch_s, *push_at[np.isfinite(push_at)][-1:], *ftimes[-1:]])
    ft = np.sort(ftimes[np.isfinite(ftimes)])
    nspread = 8
    if len(ft) <= max_frames - nspread - 1:
        times = list(ft)
    else:
        times = list(np.quantile(ft, np.linspace(0, 1, max_frames - nspread - 1)))
    times += list(np.linspace(switch_s, end_s, nspread + 1)[1:])
    times = sorted(set(float(t) for t in times))
    out = []
    codes0 = base.copy()
    codes0[pending] = PENDING
    out.append({"label": "switch", "phase": "postcopy", "t_s": round(switch_s, 6), "full": codes0,
                "text": f"the switch to post-copy: the guest resumes at the destination; {int(pending.sum()):,} pages "
                        "are still only at the source (pending)"})
    nfaults_total = 0
    for t in times:
        codes = codes0.copy()
        pushed = pending & (push_at <= t)
        faulted = pending & (fault_at <= t)
        codes[pushed] = PUSHED
        codes[faulted] = FAULTED
        last = t >= end_s
        if last:
            codes[demanded_untimed] = FAULTED
        nf = int(faulted.sum())
        what = "a fault" if nf > nfaults_total else "the push"
        nfaults_total = nf
        out.append({"label": f"+{(t - switch_s) * 1e3:.1f} ms", "phase": "postcopy", "t_s": round(t, 6), "full": codes,
                    "text": f"post-copy, {(t - switch_s) * 1e3:.1f} ms after the switch ({what}): "
                            f"{int(pushed.sum()):,} pages pushed, {nf:,} faulted on demand, "
                            f"{int((codes == PENDING).sum()):,} still pending"})
    return out


def _palette_cmap():
    from matplotlib.colors import ListedColormap

    return ListedColormap(list(COLORS))


def plot_pagemap(pm: dict, path, *, title: str | None = None) -> str:
    """The raster PNG: a column per frame, a row per bin of pages (``pm`` from
    :func:`build_frames`).  Returns ``path``."""
    from matplotlib.patches import Patch

    from vmem.analysis.graphs import _new_figure, _save

    frames = pm["frames"]
    if not frames:
        raise ValueError("the page map holds no frame (nothing was sent)")
    # Every pre-copy round and the stop-and-copy; post-copy thinned to MAX_PNG_POSTCOPY_COLUMNS
    # evenly spaced frames (the switch and the last one always kept).
    pc = [i for i, f in enumerate(frames) if f["phase"] == "postcopy"]
    if len(pc) > MAX_PNG_POSTCOPY_COLUMNS:
        keep = set(np.linspace(0, len(pc) - 1, MAX_PNG_POSTCOPY_COLUMNS).round().astype(int).tolist())
        drop = {pc[j] for j in range(len(pc)) if j not in keep}
        frames = [f for i, f in enumerate(frames) if i not in drop]
    cells = pm["cells"]
    k2 = max(1, math.ceil(cells / MAX_PNG_ROWS))
    raster = np.stack([_bin(f["codes"], k2) for f in frames], axis=1)
    pages_per_row = pm["pages_per_cell"] * k2
    fig = _new_figure(max(7.0, min(16.0, 3.5 + 0.18 * len(frames))), 6.0)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(raster, aspect="auto", interpolation="nearest", cmap=_palette_cmap(), vmin=-0.5,
              vmax=len(STATES) - 0.5, extent=(-0.5, len(frames) - 0.5, pm["npages"], 0))
    labels = [("r" + f["label"].split()[-1]) if f["phase"] == "precopy" else
              ("S&C" if f["phase"] == "stop-and-copy" else f["label"]) for f in frames]
    step = max(1, len(frames) // 24)
    ax.set_xticks(range(0, len(frames), step))
    ax.set_xticklabels(labels[::step], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel(f"guest page (one row = {pages_per_row:,} page{'s' if pages_per_row > 1 else ''}"
                  + (": the highest state among them)" if pages_per_row > 1 else ")"), fontsize=9)
    ax.set_xlabel("frame: pre-copy rounds, stop-and-copy, then post-copy (time after the switch)")
    for i, f in enumerate(frames):
        if f["phase"] == "postcopy" and f["label"] == "switch":
            ax.axvline(i - 0.5, color="#d7301f", lw=1.5)
            ax.annotate("switch to post-copy", (i - 0.5, 0), xytext=(3, -12), textcoords="offset points",
                        color="#d7301f", fontsize=8, annotation_clip=False)
        if f["phase"] == "stop-and-copy":
            ax.axvline(i - 0.5, color="#d7301f", lw=1.0, ls="--")
    used = sorted({c for f in frames for c in range(len(STATES)) if f["counts"][c]})
    ax.legend(handles=[Patch(facecolor=COLORS[c], edgecolor="#555", label=STATES[c]) for c in used],
              loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, title="page state", title_fontsize=8)
    ax.set_title(title or "page map: pages x time", fontsize=10)
    return _save(fig, path)


_HTML = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:70em}
#grid{image-rendering:pixelated;border:1px solid #888;background:#fff}
.row{display:flex;gap:1.5em;align-items:flex-start;flex-wrap:wrap}
button{font-size:1em;padding:.2em .8em}
#slider{width:32em}
table{border-collapse:collapse;font-size:.9em}td,th{padding:.1em .6em;text-align:right}
td:first-child{text-align:left}
.sw{display:inline-block;width:1em;height:1em;border:1px solid #555;vertical-align:middle;margin-right:.3em}
#text{min-height:2.6em}
</style></head><body>
<h1>__TITLE__</h1>
<p>__INTRO__</p>
<div><button id="prev" title="previous frame">&#9664;</button>
<button id="play">play</button>
<button id="next" title="next frame">&#9654;</button>
<input id="slider" type="range" min="0" max="0" value="0" step="1">
<b id="label"></b></div>
<p id="text"></p>
<div class="row"><canvas id="grid"></canvas>
<div style="max-width:22em"><table id="counts"><tr><th>state</th><th>pages</th></tr></table>
<p id="layout"></p></div></div>
<pre id="errors" style="color:#b00"></pre>
<script id="pagemap-data" type="application/json">__DATA__</script>
<script>
"use strict";
(function(){
const D = JSON.parse(document.getElementById("pagemap-data").textContent);
function b64(s){const b=atob(s);const a=new Uint8Array(b.length);for(let i=0;i<b.length;i++)a[i]=b.charCodeAt(i);return a;}
// Rebuild every frame's cells from the first frame and the per-frame changes.
const cells=D.cells, frames=[];
let cur=b64(D.first);
frames.push(cur);
for(const ch of D.changes){
  const next=cur.slice(), idx=new Uint32Array(b64(ch.i).buffer), code=b64(ch.c);
  for(let j=0;j<idx.length;j++) next[idx[j]]=code[j];
  frames.push(next); cur=next;
}
const cols=D.grid_cols, rows=Math.ceil(cells/cols), px=D.cell_px;
const cv=document.getElementById("grid"); cv.width=cols*px; cv.height=rows*px;
const ctx=cv.getContext("2d");
const rgb=D.colors.map(h=>[parseInt(h.substr(1,2),16),parseInt(h.substr(3,2),16),parseInt(h.substr(5,2),16)]);
const img=ctx.createImageData(cols,rows);
const off=document.createElement("canvas"); off.width=cols; off.height=rows;
const octx=off.getContext("2d");
ctx.imageSmoothingEnabled=false;
const slider=document.getElementById("slider"), label=document.getElementById("label");
slider.max=String(frames.length-1);
const tbl=document.getElementById("counts");
const countCells=[];
D.states.forEach((name,c)=>{const tr=tbl.insertRow();const td=tr.insertCell();
  td.innerHTML='<span class="sw" style="background:'+D.colors[c]+'"></span>'+name;
  const n=tr.insertCell(); countCells.push(n);});
document.getElementById("layout").textContent=D.layout;
let shown=-1;
function show(i){
  i=Math.max(0,Math.min(frames.length-1,i|0));
  const f=frames[i], m=D.meta[i];
  for(let j=0;j<cells;j++){const c=rgb[f[j]];const o=4*j;img.data[o]=c[0];img.data[o+1]=c[1];img.data[o+2]=c[2];img.data[o+3]=255;}
  for(let j=cells;j<cols*rows;j++){img.data[4*j+3]=0;}
  octx.putImageData(img,0,0);
  ctx.clearRect(0,0,cv.width,cv.height);
  ctx.drawImage(off,0,0,cv.width,cv.height);
  label.textContent=(i+1)+"/"+frames.length+": "+m.label;
  document.getElementById("text").textContent=m.text;
  m.counts.forEach((n,c)=>{countCells[c].textContent=n.toLocaleString("en");});
  slider.value=String(i); shown=i;
  document.body.dataset.frame=String(i);
}
slider.addEventListener("input",()=>show(+slider.value));
document.getElementById("prev").onclick=()=>show(shown-1);
document.getElementById("next").onclick=()=>show(shown+1);
let timer=null; const play=document.getElementById("play");
play.onclick=()=>{
  if(timer){clearInterval(timer);timer=null;play.textContent="play";return;}
  if(shown>=frames.length-1) show(0);
  play.textContent="pause";
  timer=setInterval(()=>{if(shown>=frames.length-1){clearInterval(timer);timer=null;play.textContent="play";return;}show(shown+1);},D.frame_ms);
};
show(0);
// Self-test (#selftest): move the slider through every frame as a user would (input
// events), check the label and the canvas each time, and publish the result in the DOM.
if(location.hash==="#selftest"){
  const seen=[]; let bad="";
  for(let i=0;i<frames.length;i++){
    slider.value=String(i); slider.dispatchEvent(new Event("input"));
    if(shown!==i||!label.textContent.startsWith((i+1)+"/")) bad+="frame "+i+" not shown; ";
    seen.push(D.meta[i].label);
  }
  const px0=ctx.getImageData(0,0,1,1).data;
  if(px0[3]!==255) bad+="canvas not drawn; ";
  document.body.dataset.labels=JSON.stringify(seen);
  // Then play from the first frame: it must advance; pause: it must stop.
  show(0); play.click();
  setTimeout(()=>{
    const moved=shown>0; play.click(); const at=shown;
    if(!moved&&frames.length>1) bad+="play did not advance; ";
    setTimeout(()=>{
      if(shown!==at) bad+="pause did not stop; ";
      document.body.dataset.selftest=bad?("FAIL "+bad):("ok "+frames.length);
    }, 3*D.frame_ms);
  }, 3*D.frame_ms);
}
})();
</script>
<script>window.addEventListener("error",e=>{document.getElementById("errors").textContent+=String(e.message)+"\\n";document.body.dataset.jserror="1";});</script>
</body></html>
"""


def write_pagemap_html(pm: dict, path, *, title: str = "vmem page map", intro: str = "") -> str:
    """The self-contained step-through HTML (``pm`` from :func:`build_frames`); returns ``path``.

    The frames travel as the first frame's cells plus, per later frame, the cells that
    changed (uint32 indices and uint8 codes, base64), so a long post-copy stays small.
    """
    frames = pm["frames"]
    if not frames:
        raise ValueError("the page map holds no frame (nothing was sent)")
    cells = pm["cells"]
    cols = max(1, math.ceil(math.sqrt(cells)))
    changes = []
    for a, b in zip(frames, frames[1:]):
        idx = np.flatnonzero(a["codes"] != b["codes"]).astype("<u4")
        changes.append({"i": base64.b64encode(idx.tobytes()).decode(),
                        "c": base64.b64encode(b["codes"][idx].astype(np.uint8).tobytes()).decode()})
    k = pm["pages_per_cell"]
    data = {
        "cells": cells, "grid_cols": cols, "cell_px": max(1, min(12, 512 // cols)),
        "first": base64.b64encode(frames[0]["codes"].astype(np.uint8).tobytes()).decode(), "changes": changes,
        "meta": [{"label": f["label"], "text": f["text"], "counts": f["counts"], "t_s": f["t_s"]} for f in frames],
        "states": list(STATES), "colors": list(COLORS), "frame_ms": 400,
        "layout": (f"{pm['npages']:,} guest pages, one cell = {k:,} page{'s' if k > 1 else ''} "
                   f"(a cell shows the highest state among its pages), row by row from page 0."),
    }
    blob = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    doc = (_HTML.replace("__TITLE__", html.escape(title))
           .replace("__INTRO__", html.escape(intro or "Each cell is guest RAM; step through the migration "
                                                   "round by round and, after a switch to post-copy, fault by fault."))
           .replace("__DATA__", blob))
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(doc)
    os.replace(tmp, path)
    return str(path)


def render_pagemap(npz_path, out_dir, *, name: str = "pagemap", title: str | None = None) -> dict:
    """Both pictures of one page map into ``out_dir``: ``{"png": path, "html": path, "frames": n}``."""
    d = load_pagemap(npz_path)
    pm = build_frames(d)
    os.makedirs(out_dir, exist_ok=True)
    png = plot_pagemap(pm, os.path.join(out_dir, f"{name}.png"), title=title)
    page = write_pagemap_html(pm, os.path.join(out_dir, f"{name}.html"), title=title or "vmem page map")
    return {"png": png, "html": page, "frames": len(pm["frames"])}


def render_run(report: dict, out_dir, *, name: str = "", report_path: str | None = None) -> list[str]:
    """Everything the page map of one report gives, into ``out_dir``: ``pagemap.png`` and
    ``pagemap.html`` (when the report names a page map file that exists) and, for a
    post-copy or hybrid run, ``postcopy.png`` (the fault timeline and the guest's rate;
    without a page map only its last panel has data).  ``name``: a prefix for the files
    (``NAME-pagemap.png``); ``report_path``: where the report was read from — a page map no
    longer at its recorded path is looked for beside it (a run directory that moved).
    Returns the paths written."""
    from vmem.analysis.graphs import _subtitle

    os.makedirs(out_dir, exist_ok=True)
    prefix = f"{name}-" if name else ""
    info = report.get("pagemap") or {}
    path = info.get("file")
    if path and not os.path.exists(path) and report_path:
        path = os.path.join(os.path.dirname(os.path.abspath(report_path)), os.path.basename(path))
    arrays = None
    out: list[str] = []
    if path and os.path.exists(path):
        arrays = load_pagemap(path)
        pm = build_frames(arrays)
        if pm["frames"]:
            title = f"page map: {_subtitle(report)}"
            out.append(plot_pagemap(pm, os.path.join(out_dir, f"{prefix}pagemap.png"), title=title))
            out.append(write_pagemap_html(pm, os.path.join(out_dir, f"{prefix}pagemap.html"), title=title))
    if report.get("postcopy"):
        from vmem.analysis.postcopy import plot_postcopy

        out.append(plot_postcopy(report, arrays, os.path.join(out_dir, f"{prefix}postcopy.png")))
    return out
